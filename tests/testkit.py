"""What the tests share: an Internet checksum, a TCP segment and an IP packet
built by hand (independent of udp_encap_tun, the code under test) and one fake
clock.  Used by tests/ and, through netns-tests/conftest.py, by netns-tests/.

Every header field is a parameter, so a test can build a deliberately wrong
packet (a bad data offset, IHL, total length or checksum) as easily as a good
one.  Addresses are bytes; their length gives the family: 4 bytes IPv4,
16 bytes IPv6.
"""

from __future__ import annotations

import struct

TCP_HEADER = struct.Struct("!HHIIBBHHH")
IPV4_HEADER = struct.Struct("!BBHHHBBH4s4s")
IPV6_HEADER = struct.Struct("!IHBB16s16s")
IPPROTO_TCP = 6
DF = 0x4000


def internet_checksum(data: bytes, initial: int = 0) -> int:
    """RFC 1071 the slow, obvious way: the one's complement of the one's
    complement sum of 16-bit words (odd length padded with a zero byte)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = initial
    for (word,) in struct.iter_unpack("!H", data):
        total += word
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _family(src: bytes, dst: bytes) -> int:
    if len(src) == len(dst) == 4:
        return 4
    if len(src) == len(dst) == 16:
        return 6
    raise ValueError(f"addresses of {len(src)} and {len(dst)} bytes: IPv4 takes 4, IPv6 16")


def pseudo_header(src: bytes, dst: bytes, proto: int, length: int) -> bytes:
    """The pseudo-header a TCP or UDP checksum covers (RFC 793 for IPv4,
    RFC 8200 section 8.1 for IPv6: a 32-bit length, 3 zero bytes, next header)."""
    if _family(src, dst) == 6:
        return bytes(src) + bytes(dst) + struct.pack("!I3xB", length, proto)
    return bytes(src) + bytes(dst) + struct.pack("!BBH", 0, proto, length)


def tcp_segment(payload: bytes = b"", *, sport: int = 40000, dport: int = 7000, seq: int = 1,
                ack: int = 2, flags: int = 0x10, window: int = 500, options: bytes = b"",
                urgent: int = 0, doff: int | None = None, checksum: int | None = None,
                src: bytes | None = None, dst: bytes | None = None) -> bytes:
    """A TCP header (flags default ACK), *options* and *payload*.

    *doff* is the data offset field in 32-bit words, by default what the
    options (a multiple of 4 bytes then) make.  *checksum* is written as
    given; left out, it is the valid one for the addresses *src* and *dst* if
    both are given, else 0.  *seq* is taken modulo 2**32.
    """
    if doff is None:
        assert len(options) % 4 == 0, "pad the options, or give doff"
        doff = 5 + len(options) // 4
    seg = TCP_HEADER.pack(sport, dport, seq & 0xFFFFFFFF, ack, doff << 4, flags, window,
                          checksum or 0, urgent) + bytes(options) + bytes(payload)
    if checksum is None and src is not None and dst is not None:
        valid = internet_checksum(pseudo_header(src, dst, IPPROTO_TCP, len(seg)) + seg)
        seg = seg[:16] + valid.to_bytes(2, "big") + seg[18:]
    return seg


def ip_packet(payload: bytes, src: bytes, dst: bytes, *, proto: int = IPPROTO_TCP,
              ident: int = 1, frag: int = DF, ttl: int = 64, tos: int = 0,
              options: bytes = b"", ihl: int | None = None, total: int | None = None,
              version: int | None = None, checksum: int | None = None,
              flow: int = 0) -> bytearray:
    """An IP packet carrying *payload* (a TCP segment unless *proto* says
    otherwise) from *src* to *dst*; the family follows from the addresses.

    IPv4: *frag* holds the flags and fragment offset (default DF), *ihl* and
    *total* default to what *options* and *payload* make, *checksum* to the
    valid header checksum (give 0 where the kernel fills it in, IP_HDRINCL).

    IPv6: *proto* is the next header, *ttl* the hop limit, *tos* the traffic
    class, *flow* the flow label; *options* are extension headers put between
    the fixed header and *payload* (as given: *proto* names the first one);
    *total* is the packet length the header claims (payload length + 40),
    by default the real one.  *ident*, *frag*, *ihl* and *checksum* do not exist.
    """
    if _family(src, dst) == 6:
        total = 40 + len(options) + len(payload) if total is None else total
        first = ((6 if version is None else version) << 28) | (tos & 0xFF) << 20 | flow
        return bytearray(IPV6_HEADER.pack(first, total - 40, proto, ttl, bytes(src), bytes(dst))
                         + bytes(options) + bytes(payload))
    version = 4 if version is None else version
    ihl = 5 + len(options) // 4 if ihl is None else ihl
    total = 20 + len(options) + len(payload) if total is None else total
    fields = [(version << 4) | ihl, tos, total, ident & 0xFFFF, frag, ttl, proto, 0,
              bytes(src), bytes(dst)]
    if checksum is None:
        checksum = internet_checksum(IPV4_HEADER.pack(*fields) + bytes(options))
    fields[7] = checksum
    return bytearray(IPV4_HEADER.pack(*fields) + bytes(options) + bytes(payload))


class FakeClock:
    """A clock the test sets: ``clock()`` and ``clock.now`` give the time,
    ``clock.advance(dt)`` (or ``clock.now += dt``) moves it.  It starts where
    it is told, never reads the host's clock."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, dt: float) -> float:
        self.now += dt
        return self.now


NEEDS_CSUM = 1  # virtio-net header flag: the kernel finishes a checksum (linux/virtio_net.h)
VNET_HEADER = struct.Struct("=BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, offset


def finish_csum(pkt: bytearray, csum_start: int, csum_offset: int, end: int | None = None) -> None:
    """What the kernel does for NEEDS_CSUM: sum ``pkt[csum_start:end]`` with the
    check field as stored, write the complement at csum_start + csum_offset."""
    struct.pack_into("!H", pkt, csum_start + csum_offset,
                     internet_checksum(bytes(pkt[csum_start:end])))


def as_the_kernel_takes(out: bytes, vnet: bool) -> bytearray:
    """The IP packet of one tun write (no GSO) as the kernel takes it: behind
    the virtio-net header if *vnet*, its checksum finished if the header asks
    for that (NEEDS_CSUM)."""
    if not vnet:
        return bytearray(out)
    flags, gso_type, _hdr_len, _gso_size, start, offset = VNET_HEADER.unpack_from(out)
    assert gso_type == 0, "a GSO write: not one packet"
    pkt = bytearray(out[VNET_HEADER.size:])
    if flags & NEEDS_CSUM:
        finish_csum(pkt, start, offset)
    return pkt
