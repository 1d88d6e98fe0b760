"""The I/O loop: an epoll over the tun, the UDP socket, the netlink monitor
(addresses and links) and a signal wake-up pipe.  Packet decisions live in
core.Router and packet.py, link faults in faults.Links; this file only moves
bytes and makes the system calls they ask for."""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time

from . import offload as ol
from . import packet as pk
from .auth import is_control
from .conn import PENDING_ICMP_ERRORS, REPORTED_ERRORS, SOL_UDP, UDP_GRO, UDP_SEGMENT, read_icmp_errors
from .core import Router
from .errors import LinkFault
from .faults import Links, ReadErrors
from .service import HOUSEKEEPING, Service  # noqa: F401  (services import it from here for now)
from .store import PoolError

log = logging.getLogger(__name__)

BATCH = 64  # packets handled per fd before looking at the others again
# After a read shorter than this (an ACK, a small request) the drain of an fd goes
# on only if a zero-timeout epoll says more is queued (see Pending).  After a
# longer one (bulk: super-packets, GRO buffers) it just reads on.
SMALL = 512
BUFSIZE = 65536
# read/write errors of a tun that was deleted under us (its fd is detached for good)
TUN_GONE = frozenset({errno.EBADFD})


class Pending:
    """Whether an fd has something queued, without reading it: a zero-timeout
    epoll_wait on an epoll that watches only that fd.  That costs about a
    third of a read that fails with EAGAIN, whose exception Python builds with
    a decoded strerror message; a one-packet wake-up (request/response) would
    pay for such a read on every hop."""

    def __init__(self, fd: int):
        self._epoll = select.epoll()
        self._epoll.register(fd, select.EPOLLIN)
        self._poll = self._epoll.poll

    def __call__(self) -> bool:
        return bool(self._poll(0))

    def close(self) -> None:
        self._epoll.close()


class Tunnel:
    tun_header_len = 0  # bytes in front of each packet read from or written to the tun
    tiu_wire = False  # the wire payloads are TCP-in-UDP's (tiudev.py), not TCP segments
    rx_size = BUFSIZE  # the RX buffer's room for received datagrams

    def __init__(self, router: Router, tun, sock: socket.socket, clock=time.monotonic,
                 services=(), links: Links | None = None):
        self.router = router
        self.links = links  # following the tun and the bound interface (None: not)
        # the largest wire segment the bound interface carries: TX packets cut to fit
        self.max_segment = (links and links.max_segment) or BUFSIZE
        self.failure: str | None = None  # why the loop ended, if it must end the daemon
        self.poller = None
        self.tun_errors, self.udp_errors = ReadErrors(), ReadErrors()
        self.services = list(services)
        self.counters = router.counters
        self.tun = tun
        self.sock = sock
        self.tun_pending = Pending(tun.fd) if tun is not None else None
        self.udp_pending = Pending(sock.fileno()) if sock is not None else None
        self.clock = clock
        self.running = False
        # set by the signal handler (Python runs it in this thread, between bytecodes);
        # the wake-up pipe only wakes the loop, its bytes are not relied on
        self.stop_signal: int | None = None
        self.log_requested = False
        # RX buffer: datagrams land at rx_start, with room for the tun's headers
        # in front (the tun header part stays zero: no offload flags)
        self.rx_start = self.tun_header_len + pk.IPV4_HEADER_LEN
        self.rxbuf = bytearray(self.rx_start + self.rx_size)
        self.rxview = memoryview(self.rxbuf)
        self.txbuf = bytearray(BUFSIZE + 16)
        self.txview = memoryview(self.txbuf)
        self.data_path = "simple (one packet per system call)"

    # -- setup -----------------------------------------------------------
    def _address_changed(self) -> None:
        try:
            self.router.set_tun_address(self.tun.address, self.tun.network)
        except PoolError as exc:
            self.router.store = None
            log.error("%s: new peers are refused until the tun address or pool is fixed", exc)

    def run(self) -> None:
        # A bare epoll and a dict of callbacks: selectors costs a few microseconds
        # per wake-up, which one-packet wake-ups (request/response) feel.
        poller = self.poller = select.epoll()
        callbacks = self.callbacks = {}
        rpipe, wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wpipe, warn_on_full_buffer=False)
        handlers = {s: signal.signal(s, self.on_signal_handler)
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)}
        monitor = self.tun.start_monitor()
        self._address_changed()
        if self.links is not None:  # what changed before the monitor listened
            self.apply_links(self.links.resync(self.tun.link_snapshot(self._link_names())))
        watched = [(self.tun.fd, self.on_tun), *self.udp_watch(),
                   (monitor.fileno(), self.on_netlink), (rpipe, lambda: self.on_signal(rpipe))]
        for service in self.services:
            watched.extend(service.watch(self))
        for fd, callback in watched:
            poller.register(fd, select.EPOLLIN)
            callbacks[fd] = callback
        # a stop requested (signal) or a fault found during the start-up above holds
        self.running = self.stop_signal is None and self.failure is None
        clock, poll, router = self.clock, poller.poll, self.router
        udp_fd, epollerr = self.sock.fileno() if self.sock else -1, select.EPOLLERR
        next_housekeeping = clock() + HOUSEKEEPING
        log.info("ready: %s mode, tun %s, %s", "client" if router.client else "server",
                 self.tun.name, self.describe_udp())
        for service in self.services:
            service.ready(self)
        now = clock()
        try:
            while self.running:  # the SIGTERM/SIGINT handler clears it
                timeout = next_housekeeping - now
                for fd, events in poll(timeout if timeout > 0 else 0):
                    try:
                        callbacks[fd]()
                        if events & epollerr and fd == udp_fd:
                            self.on_udp_error()
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

    def udp_watch(self):
        """(fd, callback) of the UDP side, watched from the start."""
        self.sock.setblocking(False)
        return [(self.sock.fileno(), self.on_udp)]

    def describe_udp(self) -> str:
        return "UDP port %d" % self.sock.getsockname()[1]

    def watch(self, fd: int, callback) -> None:
        """Watch one more fd from now on (the loop is running)."""
        self.poller.register(fd, select.EPOLLIN)
        self.callbacks[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.poller.unregister(fd)
        del self.callbacks[fd]

    def tx_route(self, pkt, now: float):
        """(destination, entry to count on or None) of a packet from the tun, or None."""
        return self.router.tx_destination(bytes(pkt[16:20]), now)

    def housekeeping(self, now: float) -> None:
        if self.log_requested:  # the wake-up byte may have been lost (a full pipe)
            self.on_signal_flags()
        store = self.router.store
        if store is not None:
            store.expire(now)  # counts peers_expired itself
        self.router.tick(now)
        for errors, fd in ((self.tun_errors, self.tun.fd),
                           (self.udp_errors, self.sock.fileno() if self.sock else None)):
            if fd is not None and errors.tick() and self.poller is not None:
                self.poller.register(fd, select.EPOLLIN)
        for service in self.services:
            service.tick(self, now)

    def flush_outbox(self) -> None:
        outbox, self.router.outbox = self.router.outbox, []
        for dest, batches in outbox:
            self.send_batches(batches, dest)

    def send_batches(self, batches, dest) -> tuple[int, int]:
        """Send wire segments: each batch is (buffer, segment size), every
        segment but a batch's last exactly that size.  Returns the datagrams
        and bytes sent (also counted)."""
        packets = nbytes = 0
        for data, size in batches:
            n = len(data)
            try:
                if n <= size:  # one datagram: the common case, no detour
                    self.sock.sendto(data, dest)
                else:
                    self.send_batch(data, size, dest)
            except OSError as exc:
                if self._maybe_pending(exc):
                    exc = self._send_again(data, size, dest)
                if exc is not None:
                    if exc.errno == errno.EMSGSIZE and self._shrunk(min(n, size)):
                        # the bound link's MTU fell and we just learnt it: cut smaller
                        sent = self._send_recut(data, size, dest)
                        packets += sent[0]
                        nbytes += sent[1]
                    else:
                        self._send_error(exc, dest, min(n, size))
                    continue
            packets += -(-n // size)
            nbytes += n
        self.counters["tx_packets"] += packets
        self.counters["tx_bytes"] += nbytes
        return packets, nbytes

    def _send_recut(self, data, size: int, dest) -> tuple[int, int]:
        """A batch the kernel refused as too long, cut to the bound link's new MTU."""
        self.counters["tx_resegmented"] += 1
        packets = nbytes = 0
        for part, part_size in ol.recut(data, size, self.max_segment):
            n = len(part)
            try:
                if n <= part_size:
                    self.sock.sendto(part, dest)
                else:
                    self.send_batch(part, part_size, dest)
            except OSError as exc:
                self._send_error(exc, dest, min(n, part_size))
                continue
            packets += -(-n // part_size)
            nbytes += n
        return packets, nbytes

    def _shrunk(self, size: int) -> bool:
        """After EMSGSIZE: read the pending link events; True if the largest
        wire segment that fits is now below *size*."""
        if self.links is None:
            return False
        self.on_netlink()
        return self.max_segment < size

    def send_batch(self, data, size: int, dest) -> None:
        """Several segments: one datagram each."""
        for off in range(0, len(data), size):
            self.sock.sendto(data[off:off + size], dest)

    # -- events ------------------------------------------------------------
    def on_signal_handler(self, signum: int, _frame) -> None:
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

    def _link_names(self) -> tuple:
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

    def apply_links(self, ch) -> None:
        """Carry out what faults.Links decided about link events."""
        links = self.links
        if ch.tun_gone:
            self.fail(f"tun {self.tun.name} was deleted: exiting")
            return
        if ch.rebind is not None:
            self.rebind()
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
            self.max_segment = links.max_segment or BUFSIZE

    def rebind(self) -> None:
        """An interface of the bound name is back (at a new index): bind the
        socket to it again."""
        name = self.links.bind_name
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode())
        except OSError as exc:  # EPERM without CAP_NET_RAW; ENODEV if gone again
            self.links.bind_index = None  # still missing; the next event of it retries
            log.error("cannot bind the UDP socket to %s again: %s", name, exc.strerror)
            return
        log.info("bound interface %s is back (index %d): UDP socket bound to it again",
                 name, self.links.bind_index)

    def _tun_failed(self, exc: OSError) -> bool:
        """A tun read or write failed; True if the tun is gone (the loop ends)."""
        if exc.errno in TUN_GONE:
            log.debug("tun %s: %s", self.tun.name, exc.strerror)
            self.fail(f"tun {self.tun.name} was deleted: exiting")
            return True
        return False

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
        return self._read_failed(self.udp_errors, self.sock.fileno(), "UDP socket")

    def on_tun(self) -> None:
        """TX: packets from the tun become UDP datagrams."""
        fd, buf, view, hlen = self.tun.fd, self.txbuf, self.txview, self.tun_header_len
        router, counters = self.router, self.counters
        client_auth, send_batches, wire_segments = router.client_auth, self.send_batches, self.wire_segments
        tx_route = self.tx_route
        pending = self.tun_pending
        now = self.clock()
        more = True
        for _ in range(BATCH):
            if not more:
                return
            try:
                n = os.readv(fd, (buf,))
            except BlockingIOError:
                return
            except OSError as exc:
                if not self._tun_failed(exc):
                    counters["tx_read_error"] += 1
                    log.debug("tun read: %s", exc)
                    self._read_failed(self.tun_errors, fd, "tun " + self.tun.name)
                return
            more = n >= SMALL or pending()
            pkt = view[hlen:n]
            reason = pk.classify_tx(pkt)
            if reason is not None:
                counters["tx_drop_" + reason] += 1
                continue
            total = (pkt[2] << 8) | pkt[3]
            route = tx_route(pkt, now)
            if route is None:
                continue
            dest, entry = route
            if pkt[33] & pk.SYN and router.mss:
                self._clamp(pkt[20:total], "tx")
            batches = wire_segments(pkt, total)
            if batches is None:
                continue
            if client_auth is not None and dest not in client_auth.ready:
                router.hold(dest, batches, now)
                continue
            packets, nbytes = send_batches(batches, dest)
            if entry is not None:
                entry.tx_packets += packets
                entry.tx_bytes += nbytes

    def wire_segments(self, pkt, total: int):
        """The TCP segments of a TX packet as [(buffer, segment size)] (see send_batches)."""
        if total - 20 > self.max_segment:
            return self.cut_to_fit(pkt, total, total)
        return ((pkt[20:total], total - 20),)

    def cut_to_fit(self, pkt, total: int, payload: int):
        """A TX packet whose segments (of *payload* bytes of TCP payload at
        most) do not fit in one datagram on the bound link (its MTU fell):
        cut into segments that fit, or None (counted) if none can."""
        size = self.max_segment - ((pkt[32] >> 4) << 2)
        if size <= 0:
            self.counters["tx_drop_message_too_long"] += 1
            return None
        self.counters["tx_resegmented"] += 1
        return ol.tso_split(pkt[:total], min(size, payload), tiu=self.tiu_wire)

    def not_tcp(self, datagram, reason: str, peer, now: float) -> None:
        """A datagram that is no TCP segment: keepalive, control message or junk."""
        if not datagram:
            if self.router.keepalive_received(peer, now):
                self.send_keepalive(peer, now)
        elif is_control(datagram):
            self.router.control(datagram, peer, now)
        else:
            self.counters["rx_drop_" + reason] += 1

    def _clamp(self, segment, direction: str) -> None:
        if pk.clamp_mss(segment, self.router.mss):
            self.counters[direction + "_mss_clamped"] += 1

    def _count_received(self, entry, packets: int, nbytes: int) -> None:
        self.counters["rx_packets"] += packets
        self.counters["rx_bytes"] += nbytes
        if entry is not None:  # server: the peer's own counts
            entry.rx_packets += packets
            entry.rx_bytes += nbytes

    def _maybe_pending(self, exc: OSError) -> bool:
        """Whether a failed send may have failed only because of an ICMP error
        about an earlier datagram (client, IP_RECVERR: "fragmentation needed"
        fails the next send, of any size, with EMSGSIZE)."""
        return exc.errno in REPORTED_ERRORS or (exc.errno == errno.EMSGSIZE
                                                and self.router.client)

    def _send_again(self, data, size: int, dest) -> OSError | None:
        """An error left pending by an ICMP message (client, IP_RECVERR) fails
        the next send whatever its destination: send it again, once.  Returns
        the second try's error (None: it went)."""
        try:
            if len(data) <= size:
                self.sock.sendto(data, dest)
            else:
                self.send_batch(data, size, dest)
        except OSError as exc:
            return exc
        return None

    def _send_error(self, exc: OSError, dest, size: int) -> None:
        if self.router.send_failed(dest, exc.errno, size, self.clock()) == "send_error":
            log.debug("sendto %s:%d: %s", *dest, exc)

    def send_keepalive(self, dest, now: float) -> None:
        """An empty datagram to *dest* (client: a keepalive; server: the answer to one)."""
        try:
            self.sock.sendto(b"", dest)
        except OSError as exc:
            if self._maybe_pending(exc):
                exc = self._send_again(b"", 0, dest)
            if exc is not None:
                self._send_error(exc, dest, 0)  # counted: tx_drop_no_interface, ...
                return
        self.counters["tx_keepalives"] += 1
        if self.router.client:
            self.router.sent(dest, now)

    def on_udp_error(self) -> None:
        """The socket's error queue holds ICMP errors (client: IP_RECVERR)."""
        now = self.clock()
        for dest, err, info, offender in read_icmp_errors(self.sock):
            self.router.icmp_error(dest, err, info, offender, now)

    def on_udp(self) -> None:
        """RX: datagrams become IPv4 packets written to the tun, one by one."""
        deliver = self.deliver
        recvfrom_into, seg_view = self.sock.recvfrom_into, self.rxview[self.rx_start:]
        pending = self.udp_pending
        now = self.clock()
        for _ in range(BATCH):
            try:
                n, peer = recvfrom_into(seg_view)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                if self._udp_read_failed(exc):
                    return
                continue
            deliver(n, peer, now)
            if n < SMALL and not pending():
                return

    def deliver(self, n: int, peer, now: float) -> None:
        """A datagram of *n* bytes at ``rxbuf[rx_start:]`` (the tun's headers fit
        in front of it) goes to the tun on its own, with a TCP checksum computed here."""
        buf, view, router, start = self.rxbuf, self.rxview, self.router, self.rx_start
        seg = view[start:start + n]
        reason = pk.classify_rx(seg)
        if reason is not None:
            self.not_tcp(seg, reason, peer, now)
            return
        addrs = router.rx_addresses(peer, now)
        if addrs is None:
            return
        src, dst, entry = addrs
        if seg[13] & pk.SYN and router.mss:
            self._clamp(seg, "rx")
        pk.build_rx_packet(buf, n, router.next_ident(), src, dst, start - pk.IPV4_HEADER_LEN)
        try:
            os.write(self.tun.fd, view[:start + n])
        except OSError as exc:
            self.counters["rx_drop_write_error"] += 1
            log.debug("tun write: %s", exc)
            self._tun_failed(exc)
            return
        self._count_received(entry, 1, n)


RX_AREA = 4 << 20  # the offload path's RX buffer: room for a whole drain of the socket
RX_BATCH = 256  # datagrams (or GRO buffers) per drain before writing to the tun


class OffloadTunnel(Tunnel):
    """The fast path: TUN TSO/checksum offload on one side, UDP GSO/GRO on the other.

    TX: one tun read gives a TCP super-packet; offload.tso_split cuts it into
    wire segments that leave in one sendmsg each batch (UDP_SEGMENT).
    RX: a whole drain of the socket (GRO buffers or single datagrams) is
    coalesced per peer into super-packets the kernel checksums (NEEDS_CSUM).
    A lone small datagram takes the simple path's deliver()."""

    tun_header_len = ol.VNET_HDR_LEN
    rx_size = RX_AREA

    def __init__(self, router: Router, tun, sock: socket.socket, gso: bool, gro: bool,
                 clock=time.monotonic, services=(), links: Links | None = None):
        super().__init__(router, tun, sock, clock, services, links)
        self.gso = gso
        self.gro = gro
        self.data_path = "offload (TUN TSO and checksum; UDP GSO %s, GRO %s)" % (
            "on" if gso else "off: one sendto per segment", "on" if gro else "off")
        self._unpack_vnet = ol.VNET_HDR.unpack_from
        self.cmsg_space = socket.CMSG_SPACE(4)

    def wire_segments(self, pkt, total: int):
        if self.txbuf[1] == ol.GSO_NONE:  # the vnet header's gso_type: a plain packet
            if total - 20 > self.max_segment:
                return self.cut_to_fit(pkt, total, total)
            return ((pkt[20:total], total - 20),)
        gso_type, gso_size = self._unpack_vnet(self.txbuf, 0)[1:4:2]
        if gso_type & ~ol.GSO_ECN == ol.GSO_TCPV4 and gso_size:
            if ((pkt[32] >> 4) << 2) + gso_size > self.max_segment:
                return self.cut_to_fit(pkt, total, gso_size)
            return ol.tso_split(pkt[:total], gso_size)
        self.counters["tx_drop_unsupported_gso"] += 1
        return None

    def send_batch(self, data, size: int, dest) -> None:
        """All segments in one sendmsg (UDP_SEGMENT), where the kernel has it."""
        if not self.gso:
            return super().send_batch(data, size, dest)
        self.sock.sendmsg((data,), ((SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder)),), 0, dest)

    def on_udp(self) -> None:
        view = self.rxview
        router, counters = self.router, self.counters
        recvmsg_into, cmsg_space = self.sock.recvmsg_into, self.cmsg_space
        classify_rx, pending = pk.classify_rx, self.udp_pending
        fd = self.tun.fd
        now = self.clock()
        groups = []  # [peer, [segments]] in arrival order, one per run of a peer
        off = start = self.rx_start
        limit = len(view) - BUFSIZE
        more = True
        for _ in range(RX_BATCH):
            if off > limit or not more:
                break
            try:
                n, ancdata, _flags, peer = recvmsg_into((view[off:off + BUFSIZE],), cmsg_space)
            except BlockingIOError:
                break
            except OSError as exc:
                if self._udp_read_failed(exc):
                    break
                continue
            more = n >= SMALL or pending()
            seg_size = 0
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg_size = int.from_bytes(data[:4], sys.byteorder)
            if not more and off == start and not seg_size:
                # a lone small datagram (request/response): nothing to coalesce
                return self.deliver(n, peer, now)
            good = []
            for seg in ol.split_gro(view[off:off + n], n, seg_size) if n else (view[off:off],):
                reason = classify_rx(seg)
                if reason is None:
                    good.append(seg)
                    if seg[13] & pk.SYN and router.mss:
                        self._clamp(seg, "rx")
                else:
                    self.not_tcp(seg, reason, peer, now)
            off += n
            if not good:
                continue
            if groups and groups[-1][0] == peer:
                groups[-1][1].extend(good)
            else:
                groups.append((peer, good))
        for peer, segments in groups:
            addrs = router.rx_addresses(peer, now, len(segments))
            if addrs is None:
                continue
            src, dst, entry = addrs
            npackets, nbytes = len(segments), sum(map(len, segments))
            for out in ol.coalesce(segments, src, dst, router.next_ident):
                try:
                    os.write(fd, out)
                except OSError as exc:
                    lost, lost_bytes = ol.wire_size(out)
                    counters["rx_drop_write_error"] += lost
                    npackets -= lost
                    nbytes -= lost_bytes
                    log.debug("tun write: %s", exc)
                    if self._tun_failed(exc):
                        break
            self._count_received(entry, npackets, nbytes)
