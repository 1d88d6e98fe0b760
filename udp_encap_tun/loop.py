"""The loop: an epoll over the tun, the UDP side, the netlink monitor
(addresses and links), a signal wake-up pipe and the services, with a timer
about once a second.

It dispatches and carries out; it decides nothing about packets and reads
no header byte.  Decisions are the Router's
(core.Router, tiumode.TiuRouter); reading, writing, cutting and coalescing
packets are the edges' (tun.Packets / tun.OffloadPackets for the tun,
conn.Datagrams / conn.OffloadDatagrams / tiudev.TiuConn for the UDP side).
The simple and the offload path are the same loop given other edges.  On
the default wire each packet is first offered to fastpath.FastPath, which
does the common case (one plain IPv4 packet, a known peer) in one call with
the Router's tables and the edges' buffers, and gives the rest back to the
layered path (tx_layered, rx_layered)."""

from __future__ import annotations

import functools
import json
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable, Iterable
from typing import Any, Final, Generic, Protocol, TypeVar

from . import build, packet as pk
from .conn import PENDING_ICMP_ERRORS, Address, Batches, Datagrams, IcmpError
from .core import Router
from .errors import LinkFault
from .fastpath import FastPath
from .faults import Changes, Links, ReadErrors
from .service import HOUSEKEEPING, Service
from .store import PoolError
from .tun import BUFSIZE, Packets, Tun, TunGone

log = logging.getLogger(__name__)

BATCH: Final = 64  # packets read from the tun before looking at the other fds again
RX_BATCH: Final = 256  # receives per drain of the UDP side when the tun edge coalesces
RX_AREA: Final = 4 << 20  # the RX buffer then: room for a whole drain
# After a read shorter than this (an ACK, a small request) the drain of an fd
# goes on only while the loop is busy (its last epoll_wait found more than one
# fd ready: traffic both ways, as in bulk transfer, where the ACKs queued on
# one fd must not wait behind a drain of the other) and a zero-timeout epoll
# says more is queued (see Pending).  Otherwise it ends, and the next
# epoll_wait says whether more is queued: a one-packet wake-up (request/
# response: one fd ready) then costs no system call beyond its read and its
# send.  After a longer read (bulk: super-packets, GRO buffers) the drain reads on.
SMALL: Final = 512
KEEPALIVE: Final = ((b"", 0),)  # an empty datagram

# Where the Router sends a packet and the UDP edge takes it: a peer (host, port) on the
# default wire, a tiumode.Flow in the TCP-in-UDP mode; the loop only carries it across.
Dest = TypeVar("Dest")


class UdpEdge(Protocol[Dest]):
    """The UDP edge the loop is given: conn.Datagrams / conn.OffloadDatagrams
    (one socket, Dest a peer) or tiudev.TiuConn (a socket per port or flow, Dest
    a flow).  ``fd`` is the one socket's (on_udp reads it), None for TiuConn,
    which reads its own sockets (the callbacks ``watch`` returns)."""

    gso: bool
    gro: bool
    max_segment: int  # the largest wire segment the bound link carries (set by the loop)
    failed: Callable[[OSError, Address, int], None]  # set by the loop: a send failed
    too_long: Callable[[int], bool] | None  # set by the loop: after EMSGSIZE, did the MTU fall?

    @property
    def fd(self) -> int | None: ...
    def describe(self) -> str: ...
    def describe_udp(self) -> str: ...
    def watch(self, loop: Loop[Dest]) -> list[tuple[int, Callable[[], None]]]: ...
    def tick(self, now: float) -> None: ...
    def rebind(self, links: Links) -> None: ...
    def send(self, batches: Batches, dest: Dest) -> tuple[int, int]: ...
    def icmp_errors(self) -> list[IcmpError]: ...


class Pending:
    """Whether an fd has something queued, without reading it: a zero-timeout
    epoll_wait on an epoll that watches only that fd.  That costs about a
    third of a read that fails with EAGAIN, whose exception Python builds with
    a decoded strerror message."""

    def __init__(self, fd: int):
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)
        # what the data path calls: the bound C method itself (a non-empty list: queued)
        self.now = functools.partial(self._epoll.poll, 0)

    def __call__(self) -> bool:
        return bool(self.now())

    def close(self) -> None:
        self._epoll.close()


class Loop(Generic[Dest]):
    """*router* decides; *packets* is the tun edge, *conn* the UDP edge;
    *links* (faults.Links) follows the tun and the bound interface (None: not)."""

    # conn when it is one socket (conn.Datagrams): the one on_udp and on_udp_error read
    # (its watch() registers on_udp; TiuConn reads its own sockets and has none)
    datagrams: Datagrams

    def __init__(self, router: Any, tun: Tun, packets: Packets, conn: UdpEdge[Dest],
                 clock: Callable[[], float] = time.monotonic, services: Iterable[Service] = (),
                 links: Links | None = None):
        # router: core.Router or tiumode.TiuRouter (same interface, Dest the destination)
        self.router = router
        self.counters = router.counters
        self.tun = tun
        self.packets = packets
        self.conn = conn
        edge: object = conn  # (as object: UdpEdge[Dest] does not narrow to a UdpEdge[Address])
        if isinstance(edge, Datagrams):
            self.datagrams = edge
        # the UDP socket (default wire)
        self.sock: socket.socket | None = getattr(conn, "sock", None)
        # what the status document reads (service.TunnelView)
        self.tun_header_len = packets.header_len
        self.gso, self.gro = conn.gso, conn.gro
        if hasattr(conn, "describe_flows") and hasattr(conn, "device"):  # tcp-in-udp: its flows
            self.describe_flows = conn.describe_flows
            self.device = conn.device
        self.links = links
        self.clock = clock
        self.services = list(services)
        self.failure: str | None = None  # why the loop ended, if it must end the daemon
        self.poller: select.epoll | None = None
        self.callbacks: dict[int, Callable[[], None]] = {}
        self.tun_errors, self.udp_errors = ReadErrors(), ReadErrors()
        self.tun_pending = Pending(packets.fd)
        self.udp_pending = Pending(conn.fd) if conn.fd is not None else None
        self.busy = False  # the last epoll_wait found more than one fd ready (see SMALL)
        self.running = False
        # the tun's addresses (IPv4, IPv6) the Router was last told of (None: never)
        self._tun_addresses: tuple[Any, Any] = (None, None)
        # set by the signal handler (Python runs it in this thread, between bytecodes);
        # the wake-up pipe only wakes the loop, its bytes are not relied on
        self.stop_signal: int | None = None
        self.log_requested = False
        conn.failed = self._send_failed
        conn.too_long = self._shrunk if links is not None else None
        self.set_max_segment((links and links.max_segment) or BUFSIZE)
        # RX buffer: datagrams land at rx_start, with room for the tun's headers
        # in front: an IPv6 header (40 bytes) or an IPv4 one (20), then the tun
        # header (kept zero: no offload flags)
        self.rx_start = packets.header_len + pk.IPV6_HEADER_LEN
        self.rx_batch = RX_BATCH if packets.coalesces else BATCH
        self.rxbuf = bytearray(self.rx_start + (RX_AREA if packets.coalesces else BUFSIZE))
        self.rxview = memoryview(self.rxbuf)
        self.rx_target = self.rxview[self.rx_start:self.rx_start + BUFSIZE]  # one receive's
        # the fast path (default wire only): the common case of each direction in one call
        self.fast: FastPath | None = None
        if isinstance(router, Router) and isinstance(edge, Datagrams) and not packets.tiu_wire:
            self.fast = FastPath(router, packets, edge, self.rxview, self.rx_start)
        if packets.coalesces:
            self.data_path = f"offload ({packets.describe()}; {conn.describe()})"
        else:
            self.data_path = "simple (one packet per system call)"

    def set_max_segment(self, size: int) -> None:
        """The largest wire segment the bound link carries: both edges cut to it."""
        self.max_segment = self.packets.max_segment = self.conn.max_segment = size

    # -- running -------------------------------------------------------------
    def run(self) -> None:
        # A bare epoll and a dict of callbacks: selectors costs a few microseconds
        # per wake-up, which one-packet wake-ups (request/response) feel.
        poller = self.poller = select.epoll()
        callbacks = self.callbacks
        rpipe, wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wpipe, warn_on_full_buffer=False)
        handlers = {s: signal.signal(s, self.on_signal_handler)
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)}
        monitor = self.tun.start_monitor()
        self._address_changed()
        if self.links is not None:  # what changed before the monitor listened
            self.apply_links(self.links.resync(self.tun.link_snapshot(self._link_names())))
        watched = [(self.packets.fd, self.on_tun), *self.conn.watch(self),
                   (monitor.fileno(), self.on_netlink), (rpipe, lambda: self.on_signal(rpipe))]
        for service in self.services:
            watched.extend(service.watch(self))
        for fd, callback in watched:
            poller.register(fd, select.EPOLLIN)
            callbacks[fd] = callback
        # a stop requested (signal) or a fault found during the start-up above holds
        self.running = self.stop_signal is None and self.failure is None
        clock, poll, router = self.clock, poller.poll, self.router
        udp_fd, epollerr = self.conn.fd, select.EPOLLERR
        next_housekeeping = clock() + HOUSEKEEPING
        log.info("ready: %s mode, tun %s, %s; %s", "client" if router.client else "server",
                 self.tun.name, self.conn.describe_udp(), build.describe())
        for service in self.services:
            service.ready(self)
        now = clock()
        try:
            while self.running:  # the SIGTERM/SIGINT handler clears it
                timeout = next_housekeeping - now
                ready = poll(timeout if timeout > 0 else 0)
                self.busy = len(ready) > 1
                for fd, events in ready:
                    try:
                        callbacks[fd]()
                        if events & epollerr and fd == udp_fd:
                            self.on_udp_error()
                    except TunGone as exc:
                        self.fail(str(exc))
                    except Exception:  # a bug must not take the tunnel down
                        self.counters["internal_error"] += 1
                        log.exception("internal error (tunnel keeps running)")
                now = clock()
                if now >= next_housekeeping:
                    self.housekeeping(now)
                    next_housekeeping = now + HOUSEKEEPING
                if router.outbox:
                    self.flush_outbox()
            if self.stop_signal is not None:
                log.info("%s: stopping", signal.Signals(self.stop_signal).name)
        finally:
            for service in self.services:
                service.close(self)
            poller.close()
            self.tun_pending.close()
            if self.udp_pending is not None:
                self.udp_pending.close()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in handlers.items():
                signal.signal(s, h)
            os.close(rpipe)
            os.close(wpipe)
        if self.failure is not None:
            raise LinkFault(self.failure)

    def fail(self, message: str) -> None:
        """End the loop; the daemon exits non-zero with *message*."""
        if self.failure is None:
            self.failure = message
        self.running = False

    def watch(self, fd: int, callback: Callable[[], None]) -> None:
        """Watch one more fd from now on (the loop is running)."""
        if self.poller is not None:
            self.poller.register(fd, select.EPOLLIN)
        self.callbacks[fd] = callback

    def unwatch(self, fd: int) -> None:
        if self.poller is not None:
            self.poller.unregister(fd)
        del self.callbacks[fd]

    def housekeeping(self, now: float) -> None:
        if self.log_requested:  # the wake-up byte may have been lost (a full pipe)
            self.on_signal_flags()
        store = getattr(self.router, "store", None)
        if store is not None:
            store.expire(now)  # counts peers_expired itself
        self.router.tick(now)
        self.conn.tick(now)
        for errors, fd in ((self.tun_errors, self.packets.fd),
                           (self.udp_errors, self.conn.fd)):
            if fd is not None and errors.tick() and self.poller is not None:
                self.poller.register(fd, select.EPOLLIN)
        for service in self.services:
            service.tick(self, now)

    def flush_outbox(self) -> None:
        """Send what the Router queued: control messages, released data, keepalives."""
        router, send = self.router, self.conn.send
        outbox, router.outbox = router.outbox, []
        for dest, batches in outbox:
            if batches is None:
                if send(KEEPALIVE, dest)[0]:
                    self.counters["tx_keepalives"] += 1
            else:
                router.sent_data(None, *send(batches, dest))

    # -- TX: tun -> UDP --------------------------------------------------------
    def on_tun(self) -> None:
        """Packets from the tun become UDP datagrams: each by the fast path, or
        else the layered one (tx_layered)."""
        read, fast = self.packets.read, self.fast.tx if self.fast is not None else None
        busy, pending = self.busy, self.tun_pending.now
        now = self.clock()
        for _ in range(BATCH):
            try:
                n = read()
            except BlockingIOError:
                return
            except OSError as exc:
                self.packets.check_gone(exc)  # raises TunGone: the loop ends
                self.counters["tx_read_error"] += 1
                log.debug("tun read: %s", exc)
                self._read_failed(self.tun_errors, self.packets.fd, "tun " + self.tun.name)
                return
            if fast is None or not fast(n, now):
                self.tx_layered(n, now)
            if n < SMALL and not (busy and pending()):
                return

    def tx_layered(self, n: int, now: float) -> None:
        """A read of *n* bytes from the tun, by the tun edge, the Router and the UDP edge."""
        packets, router = self.packets, self.router
        item = packets.packet(n)
        if item is None:
            return
        pkt, gso_size = item
        route = router.tx(pkt, now)
        if route is not None:
            dest, entry = route
            batches = packets.segments(pkt, gso_size)
            if batches is not None and not (router.holds and router.held(dest, batches, now)):
                router.sent_data(entry, *self.conn.send(batches, dest))

    def _send_failed(self, exc: OSError, dest: Address, size: int) -> None:
        if self.router.send_failed(dest, exc.errno, size, self.clock()) == "send_error":
            log.debug("sendto %s:%d: %s", *dest, exc)

    def _shrunk(self, size: int) -> bool:
        """After EMSGSIZE: read the pending link events; True if the largest
        wire segment that fits is now below *size*."""
        self.on_netlink()
        if self.max_segment >= size:
            return False
        self.counters["tx_resegmented"] += 1
        return True

    # -- RX: UDP -> tun --------------------------------------------------------
    def on_udp(self) -> None:
        """Datagrams become IP packets written to the tun.  A small one (a
        request, an ACK) goes on its own, in place (by the fast path, or else
        rx_layered), and ends the drain unless the loop is busy (see SMALL); on
        the simple path every datagram goes on its own; on the offload path a
        longer one starts a drain whose segments are written coalesced
        (coalesce)."""
        recv, target = self.datagrams.recv, self.rx_target
        fast = self.fast.rx if self.fast is not None else None
        coalesces = self.packets.coalesces
        busy, pending = self.busy, self._udp_pending()
        now = self.clock()
        for _ in range(self.rx_batch):
            try:
                n, peer, seg_size = recv(target)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                if self._udp_read_failed(exc):
                    return
                continue
            if coalesces and (seg_size or n >= SMALL):
                self.coalesce(n, peer, seg_size, now)
                return
            if fast is None or not fast(n, peer, now):
                self.rx_layered(n, peer, now)
            if n < SMALL and not (busy and pending()):
                return

    def rx_layered(self, n: int, peer: Address, now: float) -> None:
        """The datagram of *n* bytes from *peer* at ``rx_start``, by the Router and the tun edge."""
        router = self.router
        if router.rx_segment(self.rx_target[:n], peer, now):
            addrs = router.rx_addresses(peer, now)
            if addrs is not None:
                src, dst, entry = addrs
                if self.packets.write_received(self.rxview, self.rx_start, n, src, dst,
                                               router.next_ident):
                    router.received(entry, 1, n)

    def coalesce(self, n: int, peer: Address, seg_size: int, now: float) -> None:
        """Offload path: the receive of *n* bytes at ``rx_start`` (a GRO buffer
        if *seg_size*, else one datagram) and what follows it queued, up to a
        drain's worth, written to the tun with each run of one peer's segments
        coalesced."""
        view, router, conn = self.rxview, self.router, self.datagrams
        recv, split, rx_segments = conn.recv, conn.split, router.rx_segments
        busy, pending = self.busy, self._udp_pending()
        groups: list[tuple[Address, list[memoryview]]] = []
        off = self.rx_start
        limit = len(view) - BUFSIZE
        in_hand = True  # the first receive is (at rx_start)
        for _ in range(self.rx_batch):
            if not in_hand:
                if off > limit:
                    break
                try:
                    n, peer, seg_size = recv(view[off:off + BUFSIZE])
                except BlockingIOError:
                    break
                except OSError as exc:
                    if self._udp_read_failed(exc):
                        break
                    continue
            in_hand = False
            if seg_size:  # a GRO buffer: the UDP edge cuts it into its datagrams
                good = rx_segments(split(view[off:off + n], n, seg_size), peer, now)
            else:
                good = rx_segments((view[off:off + n],), peer, now)
            off += n
            if good:
                if groups and groups[-1][0] == peer:
                    groups[-1][1].extend(good)
                else:
                    groups.append((peer, good))
            if n < SMALL and not seg_size and not (busy and pending()):  # see SMALL
                break
        write = self.packets.write_segments
        for peer, segments in groups:
            addrs = router.rx_addresses(peer, now, len(segments))
            if addrs is not None:
                src, dst, entry = addrs
                router.received(entry, *write(segments, src, dst, router.next_ident))

    def _udp_pending(self) -> Callable[[], list[tuple[int, int]]]:
        pending = self.udp_pending
        assert pending is not None  # on_udp is registered only by conn.Datagrams (conn.fd set)
        return pending.now

    def on_udp_error(self) -> None:
        """The socket's error queue holds ICMP errors (client: IP_RECVERR)."""
        now = self.clock()
        for dest, err, info, offender in self.datagrams.icmp_errors():
            self.router.icmp_error(dest, err, info, offender, now)

    def _read_failed(self, errors: ReadErrors, fd: int, what: str) -> bool:
        """A read of *fd* failed (already counted): one that keeps failing is
        taken out of the epoll set until the next tick instead of spinning.
        True if it was."""
        if not errors.failed():
            return False
        if self.poller is not None:
            self.poller.unregister(fd)
        self.router.count_rarely_logged("read_paused", "%s: reads keep failing: not read "
                                        "until the next second", what, now=self.clock())
        return True

    def _udp_read_failed(self, exc: OSError) -> bool:
        """A read of the UDP socket failed (counted here); True if the socket is
        paused.  An error that an ICMP message left pending (client, IP_RECVERR)
        fails one read and is gone: however many come, they never pause the
        socket (forged ICMP errors, a few hundred a second, would stall RX)."""
        self.counters["rx_recv_error"] += 1
        log.debug("UDP read: %s", exc)
        if exc.errno in PENDING_ICMP_ERRORS:
            return False
        return self._read_failed(self.udp_errors, self.datagrams.fd, "UDP socket")

    # -- signals ---------------------------------------------------------------
    def on_signal_handler(self, signum: int, _frame: object) -> None:
        """The Python-level handler: only flags (a storm of one signal can
        neither lose another nor hold up the loop)."""
        if signum in (signal.SIGTERM, signal.SIGINT):
            if self.stop_signal is None:
                self.stop_signal = signum
            self.running = False
        else:  # SIGUSR1, SIGHUP: log the counters (once, however many came)
            self.log_requested = True

    def on_signal(self, rpipe: int) -> None:
        """The wake-up pipe is readable: empty it, then act on the flags."""
        try:
            while len(os.read(rpipe, 4096)) == 4096:
                pass
        except BlockingIOError:
            pass
        self.on_signal_flags()

    def on_signal_flags(self) -> None:
        if self.log_requested:
            self.log_requested = False
            self.log_counters()

    def log_counters(self) -> None:
        log.info("counters %s", json.dumps(self.counters.snapshot(), sort_keys=True))

    # -- the tun's address and the links -----------------------------------------
    def _address_changed(self) -> None:
        """The tun's addresses (may) have changed: the Router hears of each
        family whose address did."""
        tun, router = self.tun, self.router
        four, six = (tun.address, tun.network), (tun.address6, tun.network6)
        if four != self._tun_addresses[0]:
            try:
                router.set_tun_address(*four)
            except PoolError as exc:
                log.error("%s: new IPv4 peers are refused until the tun address or pool is "
                          "fixed", exc)
        if six != self._tun_addresses[1] and hasattr(router, "set_tun_address6"):
            try:
                router.set_tun_address6(*six)
            except PoolError as exc:
                log.error("%s: new IPv6 peers are refused until the tun's IPv6 address or pool "
                          "is fixed", exc)
        self._tun_addresses = (four, six)

    def _link_names(self) -> tuple[str, ...]:
        return (self.links.bind_name,) if self.links is not None else ()

    def on_netlink(self) -> None:
        address, events = self.tun.drain_monitor(self._link_names())
        if address:
            self._address_changed()
        if self.links is not None:
            if events is None:  # some were lost: look the links up
                changes = self.links.resync(self.tun.link_snapshot(self._link_names()))
            else:
                changes = self.links.update(events)
            if changes:
                self.apply_links(changes)

    def apply_links(self, ch: Changes) -> None:
        """Carry out what faults.Links decided about link events."""
        links = self.links
        assert links is not None
        if ch.tun_gone:
            self.fail(f"tun {self.tun.name} was deleted: exiting")
            return
        if ch.rebind is not None:
            self.conn.rebind(links)
        elif ch.bind_gone:
            log.warning("bound interface %s is gone: datagrams are dropped (tx_drop_no_interface) "
                        "until an interface of that name is back", links.bind_name)
        if ch.set_tun_mtu is not None:
            old = links.tun_mtu
            try:
                self.tun.set_mtu(ch.set_tun_mtu)
                links.tun_mtu_set(ch.set_tun_mtu)
            except Exception as exc:  # NetlinkError
                log.warning("cannot set MTU %d on %s: %s", ch.set_tun_mtu, self.tun.name, exc)
            else:
                log.info("bound interface %s MTU %d: tun %s MTU %d (was %d)%s", links.bind_name,
                         links.bind_mtu, self.tun.name, links.tun_mtu, old,
                         f", MSS clamp {links.mss}" if links.clamp else "")
        if ch.set_tun_mtu is not None or ch.mss_changed:
            self.router.mss = links.mss
        if ch.bind_mtu_changed:
            self.set_max_segment(links.max_segment or BUFSIZE)


def default_wire(router: Any, tun: Tun, sock: socket.socket, offload: bool = False,
                 gso: bool = False, gro: bool = False, **kwargs: Any) -> Loop[Address]:
    """The loop of the default wire format (a bare TCP segment per datagram) on
    *tun* and the UDP socket *sock*: the simple path's edges, or the offload
    path's (*offload*: the tun has TSO/checksum offload; *gso*, *gro*: the
    kernel's UDP segmentation offloads)."""
    from .conn import OffloadDatagrams
    from .tun import OffloadPackets

    if offload:
        return Loop(router, tun, OffloadPackets(tun, router.counters),
                    OffloadDatagrams(sock, router.client, gso, gro), **kwargs)
    return Loop(router, tun, Packets(tun, router.counters), Datagrams(sock, router.client),
                **kwargs)
