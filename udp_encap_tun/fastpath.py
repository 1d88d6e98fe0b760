"""The one-packet fast path: the common case of each direction of the
default wire, fused into one function.

The layered path -- the loop handing a packet to the tun edge, the Router and
the UDP edge in turn (loop.Loop.tx_layered, rx_layered) -- handles anything
that comes, and costs about 400 bytecodes a hop.  Nearly every packet is the
common case: one plain IPv4 TCP packet from the tun to a peer the Router
already knows, or one datagram holding a TCP segment from such a peer.
FastPath does that case with the layered path's own tables and decisions, in
one function per direction, and gives anything else back (returns False)
without having changed anything; the loop then runs the layered path on it.

Given back: not IPv4 (IPv6 goes layered), not the plain TCP case that
classify_tx accepts at once, a TSO super-packet, a SYN while the MSS is
clamped, a segment longer than the bound link carries, a destination or peer
the Router does not know yet (or whose entry is due for expiry or a
refresh), a client's server it has not authenticated to, a tun without an
IPv4 address, and a send that fails (the layered path sends it again and
deals with the error).  The layered path stays the reference:
tests/test_fastpath.py sends the same packets both ways and compares the
bytes out and the counters."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from .offload import GSO_NONE
from .packet import IPV4_HEADER_LEN, SYN, TCP_HEADER_MIN, plain_ipv4_tcp

if TYPE_CHECKING:
    from .conn import Address, Datagrams
    from .core import Router
    from .tun import Packets

TCP_FLAGS: Final = IPV4_HEADER_LEN + 13  # the TCP flags' offset in an IPv4 packet


class FastPath:
    """The fast path of a loop on the default wire: *router* decides, *packets*
    is the tun edge, *conn* the UDP edge; received datagrams land in *rxview*
    at *rx_start* (the loop's RX buffer)."""

    def __init__(self, router: Router, packets: Packets, conn: Datagrams, rxview: memoryview,
                 rx_start: int):
        self.router = router
        self.packets = packets
        # TX: the packet read from the tun, behind its tun header (offload: the
        # virtio-net header, whose gso_type, byte 1, says whether it is a super-packet)
        self.tun_header = packets.header_len
        self.tun_buf = packets.buf
        self.pkt = packets.view[packets.header_len:]
        self.sendto = conn.sock.sendto
        # a peer's socket address on an IPv6 socket (None: an IPv4 socket, the peer itself)
        self.wire: dict[Address, Address] | None = conn.wire if conn.v6 else None
        self.wire_address = conn.wire_address
        # RX: the datagram at rx_start, the IP header to be built in front of it
        self.rxview = rxview
        self.rx_start = rx_start
        self.segment = rxview[rx_start:]

    def tx(self, n: int, now: float) -> bool:
        """The read of *n* bytes from the tun: True if it went out, False if
        it is given back (nothing sent, nothing counted)."""
        pkt, router = self.pkt, self.router
        if self.tun_header and self.tun_buf[1] != GSO_NONE:
            return False
        total = plain_ipv4_tcp(pkt, n - self.tun_header)
        if not total or total - IPV4_HEADER_LEN > self.packets.max_segment \
                or (pkt[TCP_FLAGS] & SYN and router.mss):
            return False
        dst = pkt[16:20].tobytes()
        if router.client:
            route = router.routes.get(dst)
            if route is None:
                return False
            dest, entry = route
            if router.holds and dest not in router.client_auth.ready:  # type: ignore[union-attr]
                return False
        else:
            store = router.store
            if store is None:
                return False
            entry = store.by_address.get(dst)
            if entry is None or now - entry.refreshed >= store.timeout:
                return False
            dest = entry.peer
        wire = self.wire
        to = (wire.get(dest) or self.wire_address(dest)) if wire is not None else dest
        try:
            self.sendto(pkt[IPV4_HEADER_LEN:total], to)
        except OSError:
            return False
        if router.client:
            router.remotes[dest] = now  # for keepalives (as tx_destination does)
        router.sent_data(entry, 1, total - IPV4_HEADER_LEN)
        return True

    def rx(self, n: int, peer: Address, now: float) -> bool:
        """The datagram of *n* bytes from *peer* at ``rx_start``: True if it
        went to the tun (or the write failed, counted), False if it is given
        back."""
        segment, router = self.segment, self.router
        # classify_rx's checks (the data offset within the datagram: at least 20 bytes;
        # only an IPv6 datagram can be longer than MAX_UDP_PAYLOAD)
        if not TCP_HEADER_MIN <= (segment[12] >> 4) * 4 <= n \
                or (segment[13] & SYN and router.mss):
            return False
        dst = router.tun_address
        if dst is None:
            return False
        entry = None
        if router.client:
            server = router.servers.get(peer)
            if server is None or len(server.src) != 4 or (
                    router.client_auth is not None and peer not in router.client_auth.ready):
                return False
            server.last_heard = now
            src = server.src
        else:
            store = router.store
            if store is None:
                return False
            entry = store.live.get(peer)
            if entry is None or now - entry.refreshed >= store.refresh \
                    or len(entry.address) != 4:
                return False
            src = entry.address
        if self.packets.write_ipv4(self.rxview, self.rx_start, n, router.next_ident(), src, dst):
            router.received(entry, 1, n)
        return True
