"""Pure IPv4/IPv6 TCP packet logic: classification, header synthesis, checksums.

No I/O here. Everything works on bytes-like objects and preallocated buffers so
that the TX/RX paths (and the offload code) can share it.

The Internet checksum is computed without a Python loop over the data: the
ones'-complement sum of 16-bit big-endian words equals the value of the whole
buffer, read as one big-endian integer, modulo 0xFFFF (because 2**16 == 1 mod
0xFFFF), except that a non-zero sum is never 0 but 0xFFFF.  int.from_bytes and
the modulo run in C.
"""

from __future__ import annotations

import struct
import zlib
from typing import Final, TypeAlias

# Buffers as the data paths pass them (slices of a receive buffer, never copied for typing's
# sake): ReadBuffer is only read, WriteBuffer is written in place.
ReadBuffer: TypeAlias = bytes | bytearray | memoryview
WriteBuffer: TypeAlias = bytearray | memoryview

IPV4_HEADER_LEN: Final = 20
TCP_HEADER_MIN: Final = 20
IPPROTO_TCP: Final = 6
DEFAULT_TTL: Final = 64
MAX_UDP_PAYLOAD: Final = 65507  # 65535 - 20 (IPv4) - 8 (UDP)

# TCP flag bits (byte 13 of the TCP header)
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# TX drop reasons (a packet read from the tun that does not go on the wire)
TX_NOT_IPV4: Final = "not_ipv4"
TX_IP_OPTIONS: Final = "ip_options"
TX_TRUNCATED: Final = "truncated"
TX_FRAGMENT: Final = "fragment"
TX_NOT_TCP: Final = "not_tcp"
TX_BAD_TCP_HEADER: Final = "bad_tcp_header"
TX_IPV6_EXTENSION_HEADER: Final = "ipv6_extension_header"

# RX drop reasons (a datagram that cannot be a TCP segment)
RX_TOO_SHORT: Final = "too_short"
RX_BAD_DATA_OFFSET: Final = "bad_data_offset"
RX_TOO_LONG: Final = "too_long"

_IP_HDR: Final = struct.Struct("!BBHHHBBH4s4s")


def ones_sum(data: ReadBuffer, initial: int = 0) -> int:
    """Ones'-complement 16-bit sum of *data* (odd length padded with zero), folded, plus
    *initial*."""
    n = len(data)
    value = int.from_bytes(data, "big")
    if n & 1:
        value <<= 8
    total = value % 0xFFFF
    if total == 0 and value:
        total = 0xFFFF
    total += initial
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


def checksum(data: ReadBuffer, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of *data*, with *initial* a partial ones' sum."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, tcp_length: int) -> int:
    """Folded ones' sum of the TCP pseudo-header (not complemented): IPv4's,
    or IPv6's for 16-byte addresses (the same sum: see the note at the end)."""
    return fold(address_sums(src, dst)[1] + tcp_length)


def fold(total: int) -> int:
    """A ones' sum of a few 16-bit terms folded back into 16 bits."""
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


# the fixed 16-bit words of our IPv4 headers: version/IHL, DF, TTL/protocol
_IP_FIXED_SUM: Final = 0x4500 + 0x4000 + (DEFAULT_TTL << 8 | IPPROTO_TCP)
_address_sums: Final[dict[tuple[bytes, bytes], tuple[int, int]]] = {}


def address_sums(src: bytes, dst: bytes) -> tuple[int, int]:
    """Folded ones' sums of what depends only on the address pair, cached (a
    tunnel sees few pairs): our IPv4 header without its length and ID, and the
    TCP pseudo-header without its length."""
    key = (src, dst)
    sums = _address_sums.get(key)
    if sums is None:
        if len(_address_sums) >= 256:
            _address_sums.clear()
        addresses = bytes(src) + bytes(dst)
        sums = _address_sums[key] = (ones_sum(addresses, _IP_FIXED_SUM),
                                     ones_sum(addresses, IPPROTO_TCP))
    return sums


# version and header length, total length, flags and fragment offset, protocol:
# one C call instead of a subscript each
_PLAIN_FIELDS: Final = struct.Struct("!BxHxxHxB").unpack_from


def plain_ipv4_tcp(packet: ReadBuffer, n: int) -> int:
    """The total length of *packet* (*n* bytes read from the tun) if it is the
    common case, all checked in one expression: IPv4 without options, TCP,
    not a fragment, lengths consistent; else 0 (classify_tx says why)."""
    if n < 40:
        return 0
    first: int
    total: int
    fragment: int
    protocol: int
    first, total, fragment, protocol = _PLAIN_FIELDS(packet)
    if first == 0x45 and protocol == IPPROTO_TCP and not fragment & 0x3FFF \
            and 40 <= total <= n \
            and TCP_HEADER_MIN <= (packet[32] >> 4) * 4 <= total - IPV4_HEADER_LEN:
        return total
    return 0


def classify_tx(packet: ReadBuffer, ipv6: bool = False) -> str | None:
    """Return None if *packet* (an IP packet read from the tun) can go on the
    wire, otherwise the reason it is dropped.  On success the TCP segment is
    ``packet[header_len(packet):packet_length(packet)]``.

    IPv6 packets are classified only with *ipv6* (the caller carries IPv6);
    without it every non-IPv4 packet is ``not_ipv4``, as before IPv6 existed.
    The IPv4 checks cost the same either way."""
    n = len(packet)
    if plain_ipv4_tcp(packet, n):  # the common case first (the checks below say what fails)
        return None
    if n < IPV4_HEADER_LEN or packet[0] >> 4 != 4:
        if ipv6 and n and packet[0] >> 4 == 6:
            return _classify_tx6(packet, n)
        return TX_NOT_IPV4
    if packet[0] != 0x45:
        return TX_IP_OPTIONS if packet[0] & 0x0F > 5 else TX_NOT_IPV4
    total = (packet[2] << 8) | packet[3]
    if total > n or total < IPV4_HEADER_LEN:
        return TX_TRUNCATED
    if packet[9] != IPPROTO_TCP:
        return TX_NOT_TCP
    if ((packet[6] << 8) | packet[7]) & 0x3FFF:  # MF or fragment offset
        return TX_FRAGMENT
    if total - IPV4_HEADER_LEN < TCP_HEADER_MIN:
        return TX_TRUNCATED
    doff = (packet[IPV4_HEADER_LEN + 12] >> 4) * 4
    if doff < TCP_HEADER_MIN or doff > total - IPV4_HEADER_LEN:
        return TX_BAD_TCP_HEADER
    return None


def _classify_tx6(packet: ReadBuffer, n: int) -> str | None:
    """classify_tx for a packet whose version is 6: TCP right after the fixed
    header (no extension headers), lengths consistent with the buffer (which
    may be longer, as for IPv4's total length)."""
    if n < IPV6_HEADER_LEN:
        return TX_TRUNCATED
    payload = (packet[4] << 8) | packet[5]
    if IPV6_HEADER_LEN + payload > n:
        return TX_TRUNCATED
    next_header = packet[6]
    if next_header != IPPROTO_TCP:
        if next_header == IPV6_FRAGMENT_HEADER:
            return TX_FRAGMENT
        if next_header in IPV6_EXTENSION_HEADERS:
            return TX_IPV6_EXTENSION_HEADER
        return TX_NOT_TCP
    if payload < TCP_HEADER_MIN:
        return TX_TRUNCATED
    doff = (packet[IPV6_HEADER_LEN + 12] >> 4) * 4
    if doff < TCP_HEADER_MIN or doff > payload:
        return TX_BAD_TCP_HEADER
    return None


def total_length(packet: ReadBuffer) -> int:
    return (packet[2] << 8) | packet[3]


def classify_rx(segment: ReadBuffer) -> str | None:
    """Return None if *segment* (a UDP payload) can be a TCP segment, else the drop reason."""
    n = len(segment)
    if n < TCP_HEADER_MIN:
        return RX_TOO_SHORT
    if n > MAX_UDP_PAYLOAD:
        return RX_TOO_LONG
    doff = (segment[12] >> 4) * 4
    if doff < TCP_HEADER_MIN or doff > n:
        return RX_BAD_DATA_OFFSET
    return None


def write_ipv4_header(buf: WriteBuffer, offset: int, total_len: int, ident: int, src: bytes,
                      dst: bytes) -> None:
    """Write a 20-byte IPv4 header for a TCP packet (TTL 64, DF) with a correct
    checksum, added up from the cached address part."""
    ident &= 0xFFFF
    csum = ~fold(address_sums(src, dst)[0] + total_len + ident) & 0xFFFF
    _IP_HDR.pack_into(buf, offset, 0x45, 0, total_len, ident, 0x4000, DEFAULT_TTL,
                      IPPROTO_TCP, csum, src, dst)


def fill_tcp_checksum(buf: WriteBuffer, offset: int, length: int, src: bytes,
                      dst: bytes) -> None:
    """Compute the full TCP checksum of ``buf[offset:offset+length]`` for the
    pseudo-header (src, dst) and store it in the segment."""
    buf[offset + 16] = 0
    buf[offset + 17] = 0
    csum = checksum(buf[offset:offset + length], address_sums(src, dst)[1] + length)
    buf[offset + 16] = csum >> 8
    buf[offset + 17] = csum & 0xFF


def tcp_checksum_ok(packet: ReadBuffer) -> bool:
    """True if the TCP checksum of an IPv4 packet (20-byte header) or an IPv6
    packet (40-byte header, TCP next) verifies."""
    hlen = header_len(packet)
    seg = memoryview(packet)[hlen:packet_length(packet)]
    pseudo = pseudo_header_sum(source(packet), destination(packet), len(seg))
    return ones_sum(seg, pseudo) == 0xFFFF


def build_rx_packet(buf: WriteBuffer, seg_len: int, ident: int, src: bytes, dst: bytes,
                    offset: int = 0, partial: bool = False) -> None:
    """Turn a received TCP segment into a full IP packet of the addresses'
    family, header at *offset*.  IPv4 (4-byte addresses): the segment is
    ``buf[offset+20:offset+20+seg_len]``, the header gets *ident* as its ID.
    IPv6 (16-byte addresses): the segment is at ``offset+40``
    (:func:`build_rx_packet6`; *ident* and *partial* are not used).  Either
    way the TCP checksum is made valid for (src, dst) -- or, IPv4 and
    *partial*, the check field gets the pseudo-header sum for the kernel to
    finish (NEEDS_CSUM on a tun with offload).

    The sums are taken modulo 0xFFFF: a ones' complement sum S of words that
    are not all zero is ``(total - 1) % 0xFFFF + 1`` for their plain total,
    and the pseudo-header (protocol 6) is never all zero."""
    if len(src) == 16:
        build_rx_packet6(buf, seg_len, src, dst, offset)
        return
    # one body for both headers: every received packet comes here, and each
    # Python call costs
    sums = _address_sums.get((src, dst)) or address_sums(src, dst)
    tcp = offset + IPV4_HEADER_LEN
    total = sums[1] + seg_len
    if partial:
        csum = (total - 1) % 0xFFFF + 1  # the sum itself, not complemented
    else:
        buf[tcp + 16] = buf[tcp + 17] = 0
        value = int.from_bytes(buf[tcp:tcp + seg_len], "big")
        if seg_len & 1:
            value <<= 8
        csum = 0xFFFE - (total + value % 0xFFFF - 1) % 0xFFFF  # ~S & 0xFFFF
    buf[tcp + 16] = csum >> 8
    buf[tcp + 17] = csum & 0xFF
    ident &= 0xFFFF
    _IP_HDR.pack_into(buf, offset, 0x45, 0, IPV4_HEADER_LEN + seg_len, ident, 0x4000,
                      DEFAULT_TTL, IPPROTO_TCP,
                      0xFFFE - (sums[0] + IPV4_HEADER_LEN + seg_len + ident - 1) % 0xFFFF,
                      src, dst)


def clamp_mss(segment: WriteBuffer, mss_max: int) -> bool:
    """Lower the MSS option of a TCP SYN segment (writable buffer starting at
    the TCP header) to *mss_max*.  True if it changed.  The TCP checksum is
    not touched: the receiving end recomputes it (see build_rx_packet), and on
    RX this runs before our own checksum is computed."""
    end = (segment[12] >> 4) * 4
    i = TCP_HEADER_MIN
    while i < end:
        kind = segment[i]
        if kind == 0:  # end of option list
            return False
        if kind == 1:  # no-operation
            i += 1
            continue
        if i + 1 >= end:
            return False
        size = segment[i + 1]
        if size < 2 or i + size > end:
            return False
        if kind == 2 and size == 4:
            if (segment[i + 2] << 8) | segment[i + 3] > mss_max:
                segment[i + 2] = mss_max >> 8
                segment[i + 3] = mss_max & 0xFF
                return True
            return False
        i += size
    return False


# --------------------------------------------------------------------------- address families
# The offsets that depend on the IP version, in one place: the data path asks
# these instead of reading header bytes at fixed offsets.  The TCP pseudo-header
# sum (address_sums, pseudo_header_sum) is the same formula for both families:
# the addresses, the protocol and the segment length (IPv6 widens the last two
# to 32 bits, which leaves a ones' sum of values below 65536 unchanged).

IPV6_HEADER_LEN: Final = 40
IPV6_FRAGMENT_HEADER: Final = 44
# next header values that are IPv6 extension headers (RFC 7045's list, fragment aside):
# hop-by-hop, routing, destination options, AH, mobility, HIP, shim6, experiments
IPV6_EXTENSION_HEADERS: Final = frozenset({0, 43, 60, 51, 135, 139, 140, 253, 254})
IPV6_HOP_LIMIT: Final = 64

# version/class/flow, payload length, next header, hop limit, addresses
_IP6_HDR: Final = struct.Struct("!IHBB16s16s")
_flow_seeds: Final[dict[tuple[bytes, bytes], int]] = {}


def header_len(packet: bytes | bytearray | memoryview) -> int:
    """Bytes of IP header in front of the TCP segment of a packet that passed
    classify_tx: 20 (IPv4, no options) or 40 (IPv6, no extension headers)."""
    return IPV4_HEADER_LEN if packet[0] >> 4 == 4 else IPV6_HEADER_LEN


def packet_length(packet: bytes | bytearray | memoryview) -> int:
    """The packet's length as its header says (IPv4: total length; IPv6:
    payload length plus the fixed header)."""
    if packet[0] >> 4 == 4:
        return (packet[2] << 8) | packet[3]
    return IPV6_HEADER_LEN + ((packet[4] << 8) | packet[5])


def source(packet: bytes | bytearray | memoryview) -> bytes:
    """The source address (4 or 16 bytes)."""
    return bytes(packet[12:16]) if packet[0] >> 4 == 4 else bytes(packet[8:24])


def destination(packet: bytes | bytearray | memoryview) -> bytes:
    """The destination address (4 or 16 bytes)."""
    return bytes(packet[16:20]) if packet[0] >> 4 == 4 else bytes(packet[24:40])


def address_header_len(address: bytes) -> int:
    """The IP header a packet to or from *address* gets here: 20 bytes for a
    4-byte (IPv4) address, 40 for a 16-byte (IPv6) one."""
    return IPV6_HEADER_LEN if len(address) == 16 else IPV4_HEADER_LEN


def mss_for_mtu(mtu: int, ipv6: bool = False) -> int:
    """The largest MSS that fits a tun MTU: MTU - 40 (IPv4 + TCP headers) or
    MTU - 60 (IPv6 + TCP), the value for clamp_mss."""
    return mtu - (IPV6_HEADER_LEN if ipv6 else IPV4_HEADER_LEN) - TCP_HEADER_MIN


def flow_label(src: bytes, dst: bytes, ports: bytes | bytearray | memoryview) -> int:
    """A 20-bit, non-zero IPv6 flow label, the same for every packet of one flow
    (*ports*: the TCP header's first 4 bytes): a CRC-32 of the addresses
    (cached per pair) continued over the ports."""
    seed = _flow_seeds.get((src, dst))
    if seed is None:
        if len(_flow_seeds) >= 256:
            _flow_seeds.clear()
        seed = _flow_seeds[(src, dst)] = zlib.crc32(bytes(src) + bytes(dst))
    return (zlib.crc32(ports[:4], seed) & 0xFFFFF) or 1


def write_ipv6_header(buf: bytearray | memoryview, offset: int, payload_len: int, src: bytes,
                      dst: bytes, label: int) -> None:
    """Write a 40-byte IPv6 header for a TCP packet: traffic class 0, flow
    *label*, hop limit 64, TCP right after (no extension headers)."""
    _IP6_HDR.pack_into(buf, offset, 0x60000000 | label, payload_len, IPPROTO_TCP,
                       IPV6_HOP_LIMIT, src, dst)


def build_rx_packet6(buf: bytearray | memoryview, seg_len: int, src: bytes, dst: bytes,
                     offset: int = 0) -> None:
    """Turn ``buf[offset+40:offset+40+seg_len]`` (a received TCP segment) into
    a full IPv6 packet ``buf[offset:offset+40+seg_len]``: header synthesized
    (flow label from the addresses and ports), TCP checksum made valid over the
    IPv6 pseudo-header."""
    start = offset + IPV6_HEADER_LEN
    fill_tcp_checksum(buf, start, seg_len, src, dst)
    write_ipv6_header(buf, offset, seg_len, src, dst, flow_label(src, dst, buf[start:start + 4]))
