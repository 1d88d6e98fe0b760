"""The daemon side of live status: StatusServer, a Service in the tunnel's loop.

The server accepts, writes one JSON document and closes; it never reads.

It never blocks the loop and never stalls it.  The service keeps its own epoll
set (the listener and the connections being written) and gives the tunnel's
epoll loop only that epoll's descriptor, so it is called exactly when a
connection can be accepted or written.  The document is encoded in slices of
PEERS_PER_CHUNK peers, about SLICE seconds of work each time the loop calls
us, and only as fast as the reader takes them: a server with 65536 peers (a
13 MB document, about half a second of encoding) interleaves that work with
the data path instead of stopping it.  At most MAX_CLIENTS connections are
served at once (more wait in the listen backlog) and a connection that has not
taken its document after SEND_DEADLINE seconds is closed, so a client that
connects and never reads costs a bounded amount.  Every call from the loop is
bounded by count and by time: at most ACCEPTS_PER_CALL accepts (refused and
small answers free their slot at once, so a local user's connect/close loop
would otherwise keep the backlog, and us, busy forever) and about SLICE
seconds of writing; what is left waits for the loop's next turn, after the
data path had its own.  The counters, the peer list and the time are taken
when the connection is accepted; each peer's numbers are read as its slice is
encoded.

Only root and the tunnel's own user get the document (SO_PEERCRED), unless the
daemon runs with ``--status-public``: an abstract socket has no file
permissions, and the document lists the peers' public addresses.

If the abstract name is taken when the tunnel starts, it logs a warning and
runs without live status.  The tun name is already exclusive in a namespace
(a second tunnel on the same tun fails to attach), so the name can only be
held by something else; and since any local user can bind an abstract name,
failing would let any user stop the tunnel from starting.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Iterable, Iterator
from typing import Any

from ..service import Service, TunnelView, Watch
from .address import display_name, socket_name
from .document import describe_head, encode, peer_entries

log = logging.getLogger(__name__)

BACKLOG = 16
MAX_CLIENTS = 8  # connections being served at once
ACCEPTS_PER_CALL = 4  # connections accepted per call from the loop, then the data path again
SEND_DEADLINE = 10.0  # seconds a client has to take its whole document
SLICE = 0.002  # seconds of encoding per call from the loop, then the data path again
UCRED = struct.Struct("3i")  # pid, uid, gid

_REFUSED = (b'{"program":"udp-encap-tun","error":"permission denied: only root and the '
            b'tunnel\'s user may read its status"}\n')


class _Client:
    __slots__ = ("conn", "chunks", "buffer", "deadline")

    def __init__(self, conn: socket.socket, chunks: Iterator[bytes], deadline: float):
        self.conn, self.chunks, self.deadline = conn, chunks, deadline
        self.buffer = b""


class StatusServer(Service):
    """Serves the status document on the tunnel's abstract socket."""

    def __init__(self, public: bool = False, extra: dict[str, Any] | None = None):
        self.public = public
        self.extra = dict(extra or {})
        self.listener: socket.socket | None = None
        self.poller: select.epoll | None = None
        self.tunnel: TunnelView | None = None
        self.clients: dict[int, _Client] = {}
        self.accepting = False
        self.started: float | None = None
        self.served = 0
        self.refused = 0

    # -- Service hooks ---------------------------------------------------------
    def watch(self, tunnel: TunnelView) -> Iterable[Watch]:
        self.tunnel = tunnel
        name = tunnel.tun.name
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.bind(socket_name(name))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                log.warning("status socket %s is taken by another process in this network "
                            "namespace: running without live status", display_name(name))
            else:
                log.warning("status socket %s: %s: running without live status",
                            display_name(name), exc.strerror or exc)
            return ()
        self.listener = sock
        self.poller = select.epoll()
        self.poller.register(sock.fileno(), select.EPOLLIN)
        self.accepting = True
        log.debug("live status on %s", display_name(name))
        return ((self.poller.fileno(), self.on_event),)

    def ready(self, tunnel: TunnelView) -> None:
        self.started = time.time()

    def tick(self, tunnel: TunnelView, now: float) -> None:
        for fd, client in list(self.clients.items()):
            if now >= client.deadline:  # a reader that does not read
                self._finish(fd)

    def close(self, tunnel: TunnelView) -> None:
        for fd in list(self.clients):
            self._finish(fd)
        if self.poller is not None:
            self.poller.close()
            self.poller = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # -- events ------------------------------------------------------------------
    def on_event(self) -> None:
        """Our epoll is readable: accept and/or write, a bounded amount each."""
        if self.listener is None or self.poller is None:
            return  # closed
        listen_fd = self.listener.fileno()
        until = time.perf_counter() + SLICE
        for fd, _events in self.poller.poll(0):
            if fd == listen_fd:
                self._accept(until)
            elif fd in self.clients:
                self._write(fd, until)

    def _accept(self, until: float) -> None:
        tunnel, listener, poller = self.tunnel, self.listener, self.poller
        if tunnel is None or listener is None or poller is None:
            return  # not watching
        now = tunnel.clock()
        for i in range(ACCEPTS_PER_CALL):
            if len(self.clients) >= MAX_CLIENTS or (i and time.perf_counter() >= until):
                break  # the rest waits in the backlog for the loop's next turn
            try:
                conn, _addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. out of descriptors: try again at the next event
                log.debug("status accept: %s", exc)
                break
            conn.setblocking(False)
            if self.allowed(conn):
                head = describe_head(tunnel, now, time.time(), self.started, self.extra)
                chunks = encode(head, peer_entries(tunnel), now)
                self.served += 1
            else:
                chunks = iter((_REFUSED,))
                self.refused += 1
            fd = conn.fileno()
            self.clients[fd] = _Client(conn, chunks, now + SEND_DEADLINE)
            poller.register(fd, select.EPOLLOUT)
            self._write(fd, until)  # a small document goes at once
        self._listen(len(self.clients) < MAX_CLIENTS)

    def _listen(self, on: bool) -> None:
        """Full: leave new clients in the backlog (and stop the listener waking us)."""
        if on != self.accepting and self.poller is not None and self.listener is not None:
            self.poller.modify(self.listener.fileno(), select.EPOLLIN if on else 0)
            self.accepting = on

    def _write(self, fd: int, until: float) -> None:
        """Send what the socket takes, encoding more until *until* (perf_counter)."""
        client = self.clients[fd]
        send = client.conn.send
        flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
        first = True
        while first or time.perf_counter() < until:  # always some progress
            first = False
            if not client.buffer:
                client.buffer = next(client.chunks, b"")
                if not client.buffer:
                    self._finish(fd)  # all sent
                    return
            try:
                n = send(client.buffer, flags)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the reader went away
                self._finish(fd)
                return
            client.buffer = client.buffer[n:]
            if client.buffer:
                return  # the socket is full: epoll tells us when it drains

    def _finish(self, fd: int) -> None:
        client = self.clients.pop(fd)
        try:
            if self.poller is not None:
                self.poller.unregister(fd)
        except (OSError, ValueError):
            pass
        client.conn.close()
        self._listen(True)

    def allowed(self, conn: socket.socket) -> bool:
        if self.public:
            return True
        try:
            _pid, uid, _gid = UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
        except OSError:
            return False
        return uid in (0, os.geteuid())

