"""The I/O loop: a selector over the tun, the UDP socket, the netlink address
monitor and a signal wake-up pipe.  Packet decisions live in core.Router and
packet.py; this file only moves bytes."""

from __future__ import annotations

import errno
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time

from . import offload as ol
from . import packet as pk
from .auth import is_control
from .conn import SOL_UDP, UDP_GRO, UDP_SEGMENT
from .core import Router
from .store import PoolError

log = logging.getLogger(__name__)

BATCH = 64  # packets handled per fd before looking at the others again
HOUSEKEEPING = 1.0  # seconds between store expiry runs
BUFSIZE = 65536


class Service:
    """Something that lives beside the data path in the same loop (status
    socket, service manager notification, keepalive...).  Override what you need."""

    def watch(self, tunnel: "Tunnel"):
        """(fd, callback) pairs to watch for reading; called once at start."""
        return ()

    def ready(self, tunnel: "Tunnel") -> None:
        """The tun and the socket are up and the loop is about to run."""

    def tick(self, tunnel: "Tunnel", now: float) -> None:
        """Called about every HOUSEKEEPING seconds."""

    def close(self, tunnel: "Tunnel") -> None:
        """The loop has ended."""


class Tunnel:
    def __init__(self, router: Router, tun, sock: socket.socket, clock=time.monotonic,
                 services=()):
        self.router = router
        self.services = list(services)
        self.counters = router.counters
        self.tun = tun
        self.sock = sock
        self.clock = clock
        self.running = False
        # RX buffer: room for the IPv4 header in front of the received segment
        self.rxbuf = bytearray(pk.IPV4_HEADER_LEN + BUFSIZE)
        self.rxview = memoryview(self.rxbuf)
        self.txbuf = bytearray(BUFSIZE + 16)
        self.txview = memoryview(self.txbuf)
        self.tun_header_len = 0
        self.data_path = "simple (one packet per system call)"

    # -- setup -----------------------------------------------------------
    def _address_changed(self) -> None:
        try:
            self.router.set_tun_address(self.tun.address, self.tun.network)
        except PoolError as exc:
            self.router.store = None
            log.error("%s: new peers are refused until the tun address or pool is fixed", exc)

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        rpipe, wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(wpipe)
        handlers = {s: signal.signal(s, lambda *_: None)
                    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGHUP)}
        monitor = self.tun.start_monitor()
        self._address_changed()
        self.sock.setblocking(False)
        sel.register(self.tun.fd, selectors.EVENT_READ, self.on_tun)
        sel.register(self.sock.fileno(), selectors.EVENT_READ, self.on_udp)
        sel.register(monitor.fileno(), selectors.EVENT_READ, self.on_netlink)
        sel.register(rpipe, selectors.EVENT_READ, lambda: self.on_signal(rpipe))
        for service in self.services:
            for fd, callback in service.watch(self):
                sel.register(fd, selectors.EVENT_READ, callback)
        self.running = True
        next_housekeeping = self.clock() + HOUSEKEEPING
        log.info("ready: %s mode, tun %s, UDP port %d",
                 "client" if self.router.client else "server", self.tun.name,
                 self.sock.getsockname()[1])
        for service in self.services:
            service.ready(self)
        try:
            while self.running:
                events = sel.select(max(0.0, next_housekeeping - self.clock()))
                for key, _ in events:
                    try:
                        key.data()
                    except Exception:  # a bug must not take the tunnel down
                        self.counters["internal_error"] += 1
                        log.exception("internal error (tunnel keeps running)")
                now = self.clock()
                if now >= next_housekeeping:
                    self.housekeeping(now)
                    next_housekeeping = now + HOUSEKEEPING
                if self.router.outbox:
                    self.flush_outbox()
        finally:
            for service in self.services:
                service.close(self)
            sel.close()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in handlers.items():
                signal.signal(s, h)
            os.close(rpipe)
            os.close(wpipe)

    def housekeeping(self, now: float) -> None:
        store = self.router.store
        if store is not None:
            before = store.expired
            store.expire(now)
            if store.expired != before:
                self.counters["peers_expired"] += store.expired - before
        self.router.tick(now)
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
            try:
                self.send_batch(data, size, dest)
            except OSError as exc:
                self._send_error(exc)
                continue
            packets += -(-len(data) // size)
            nbytes += len(data)
        self.counters["tx_packets"] += packets
        self.counters["tx_bytes"] += nbytes
        return packets, nbytes

    def send_batch(self, data, size: int, dest) -> None:
        """One datagram per segment."""
        if len(data) <= size:
            self.sock.sendto(data, dest)
            return
        for off in range(0, len(data), size):
            self.sock.sendto(data[off:off + size], dest)

    # -- events ------------------------------------------------------------
    def on_signal(self, rpipe: int) -> None:
        try:
            signums = os.read(rpipe, 64)
        except BlockingIOError:
            return
        for signum in signums:
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("%s: stopping", signal.Signals(signum).name)
                self.running = False
            elif signum in (signal.SIGUSR1, signal.SIGHUP):
                self.log_counters()

    def log_counters(self) -> None:
        log.info("counters %s", json.dumps(self.counters.snapshot(), sort_keys=True))

    def on_netlink(self) -> None:
        if self.tun.drain_monitor():
            self._address_changed()

    def on_tun(self) -> None:
        """TX: packets from the tun become UDP datagrams."""
        fd, buf, view, hlen = self.tun.fd, self.txbuf, self.txview, self.tun_header_len
        router, counters = self.router, self.counters
        client_auth, send_batches, wire_segments = router.client_auth, self.send_batches, self.wire_segments
        now = self.clock()
        for _ in range(BATCH):
            try:
                n = os.readv(fd, (buf,))
            except BlockingIOError:
                return
            except OSError as exc:
                counters["tx_read_error"] += 1
                log.debug("tun read: %s", exc)
                return
            pkt = view[hlen:n]
            reason = pk.classify_tx(pkt)
            if reason is not None:
                counters["tx_drop_" + reason] += 1
                continue
            total = (pkt[2] << 8) | pkt[3]
            route = router.tx_destination(bytes(pkt[16:20]), now)
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
        return ((pkt[20:total], total - 20),)

    def not_tcp(self, datagram, reason: str, peer, now: float) -> None:
        """A datagram that is no TCP segment: keepalive, control message or junk."""
        if not datagram:
            self.router.keepalive_received(peer, now)
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

    def _send_error(self, exc: OSError) -> None:
        reason = "send_buffer_full" if exc.errno in (errno.EAGAIN, errno.ENOBUFS) else "send_error"
        self.counters["tx_drop_" + reason] += 1
        if reason == "send_error":
            log.debug("sendto: %s", exc)

    def on_udp(self) -> None:
        """RX: datagrams become IPv4 packets written to the tun."""
        buf, view = self.rxbuf, self.rxview
        seg_view = view[pk.IPV4_HEADER_LEN:]
        router, counters, recvfrom_into = self.router, self.counters, self.sock.recvfrom_into
        fd = self.tun.fd
        now = self.clock()
        for _ in range(BATCH):
            try:
                n, peer = recvfrom_into(seg_view)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. ICMP errors queued on the socket
                counters["rx_recv_error"] += 1
                log.debug("recvfrom: %s", exc)
                continue
            reason = pk.classify_rx(seg_view[:n])
            if reason is not None:
                self.not_tcp(seg_view[:n], reason, peer, now)
                continue
            addrs = router.rx_addresses(peer, now)
            if addrs is None:
                continue
            src, dst, entry = addrs
            if buf[33] & pk.SYN and router.mss:
                self._clamp(seg_view[:n], "rx")
            pk.build_rx_packet(buf, n, router.next_ident(), src, dst)
            try:
                os.write(fd, view[:pk.IPV4_HEADER_LEN + n])
            except OSError as exc:
                counters["rx_drop_write_error"] += 1
                log.debug("tun write: %s", exc)
                continue
            self._count_received(entry, 1, n)


RX_AREA = 4 << 20  # one receive area for a whole drain of the socket
RX_BATCH = 256  # datagrams (or GRO buffers) per drain before writing to the tun


class OffloadTunnel(Tunnel):
    """The fast path: TUN TSO/checksum offload on one side, UDP GSO/GRO on the other.

    TX: one tun read gives a TCP super-packet; offload.tso_split cuts it into
    wire segments that leave in one sendmsg each batch (UDP_SEGMENT).
    RX: a whole drain of the socket (GRO buffers or single datagrams) is
    coalesced per peer into super-packets the kernel checksums (NEEDS_CSUM)."""

    def __init__(self, router: Router, tun, sock: socket.socket, gso: bool, gro: bool,
                 clock=time.monotonic, services=()):
        super().__init__(router, tun, sock, clock, services)
        self.gso = gso
        self.gro = gro
        self.data_path = "offload (TUN TSO and checksum; UDP GSO %s, GRO %s)" % (
            "on" if gso else "off: one sendto per segment", "on" if gro else "off")
        self.tun_header_len = ol.VNET_HDR_LEN
        self._unpack_vnet = ol.VNET_HDR.unpack_from
        self.rxarea = bytearray(RX_AREA)
        self.rxareaview = memoryview(self.rxarea)
        self.cmsg_space = socket.CMSG_SPACE(4)

    def wire_segments(self, pkt, total: int):
        gso_type, gso_size = self._unpack_vnet(self.txbuf, 0)[1:4:2]
        if gso_type & ~ol.GSO_ECN == ol.GSO_TCPV4 and gso_size:
            return ol.tso_split(pkt[:total], gso_size)
        if gso_type == ol.GSO_NONE:
            return super().wire_segments(pkt, total)
        self.counters["tx_drop_unsupported_gso"] += 1
        return None

    def send_batch(self, data, size: int, dest) -> None:
        """All segments in one sendmsg (UDP_SEGMENT), where the kernel has it."""
        if len(data) <= size or not self.gso:
            return super().send_batch(data, size, dest)
        self.sock.sendmsg((data,), ((SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder)),), 0, dest)

    def on_udp(self) -> None:
        area, view = self.rxarea, self.rxareaview
        router, counters = self.router, self.counters
        recvmsg_into, cmsg_space = self.sock.recvmsg_into, self.cmsg_space
        classify_rx = pk.classify_rx
        fd = self.tun.fd
        now = self.clock()
        groups = []  # [peer, [segments]] in arrival order, one per run of a peer
        off = 0
        limit = len(area) - BUFSIZE
        for _ in range(RX_BATCH):
            if off > limit:
                break
            try:
                n, ancdata, _flags, peer = recvmsg_into((view[off:off + BUFSIZE],), cmsg_space)
            except BlockingIOError:
                break
            except OSError as exc:
                counters["rx_recv_error"] += 1
                log.debug("recvmsg: %s", exc)
                continue
            seg_size = 0
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg_size = int.from_bytes(data[:4], sys.byteorder)
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
            self._count_received(entry, npackets, nbytes)
