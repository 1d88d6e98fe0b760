"""Pure IPv4/TCP packet logic: classification, header synthesis, checksums.

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

IPV4_HEADER_LEN = 20
TCP_HEADER_MIN = 20
IPPROTO_TCP = 6
DEFAULT_TTL = 64
MAX_UDP_PAYLOAD = 65507  # 65535 - 20 (IPv4) - 8 (UDP)

# TCP flag bits (byte 13 of the TCP header)
FIN, SYN, RST, PSH, ACK, URG, ECE, CWR = 0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80

# TX drop reasons (a packet read from the tun that does not go on the wire)
TX_NOT_IPV4 = "not_ipv4"
TX_IP_OPTIONS = "ip_options"
TX_TRUNCATED = "truncated"
TX_FRAGMENT = "fragment"
TX_NOT_TCP = "not_tcp"
TX_BAD_TCP_HEADER = "bad_tcp_header"

# RX drop reasons (a datagram that cannot be a TCP segment)
RX_TOO_SHORT = "too_short"
RX_BAD_DATA_OFFSET = "bad_data_offset"
RX_TOO_LONG = "too_long"

_IP_HDR = struct.Struct("!BBHHHBBH4s4s")


def ones_sum(data, initial: int = 0) -> int:
    """Ones'-complement 16-bit sum of *data* (odd length padded with zero), folded, plus *initial*."""
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


def checksum(data, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of *data*, with *initial* a partial ones' sum."""
    return ~ones_sum(data, initial) & 0xFFFF


def pseudo_header_sum(src: bytes, dst: bytes, tcp_length: int) -> int:
    """Folded ones' sum of the IPv4 TCP pseudo-header (not complemented)."""
    return fold(address_sums(src, dst)[1] + tcp_length)


def fold(total: int) -> int:
    """A ones' sum of a few 16-bit terms folded back into 16 bits."""
    total = (total & 0xFFFF) + (total >> 16)
    return (total & 0xFFFF) + (total >> 16)


# the fixed 16-bit words of our IPv4 headers: version/IHL, DF, TTL/protocol
_IP_FIXED_SUM = 0x4500 + 0x4000 + (DEFAULT_TTL << 8 | IPPROTO_TCP)
_address_sums: dict = {}


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


def classify_tx(packet) -> str | None:
    """Return None if *packet* (an IPv4 packet read from the tun) can go on the
    wire, otherwise the reason it is dropped.  On success the TCP segment is
    ``packet[20:total_length(packet)]``."""
    n = len(packet)
    if n < IPV4_HEADER_LEN or packet[0] >> 4 != 4:
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


def total_length(packet) -> int:
    return (packet[2] << 8) | packet[3]


def classify_rx(segment) -> str | None:
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


def write_ipv4_header(buf, offset: int, total_len: int, ident: int, src: bytes,
                      dst: bytes) -> None:
    """Write a 20-byte IPv4 header for a TCP packet (TTL 64, DF) with a correct
    checksum, added up from the cached address part."""
    ident &= 0xFFFF
    csum = ~fold(address_sums(src, dst)[0] + total_len + ident) & 0xFFFF
    _IP_HDR.pack_into(buf, offset, 0x45, 0, total_len, ident, 0x4000, DEFAULT_TTL,
                      IPPROTO_TCP, csum, src, dst)


def fill_tcp_checksum(buf, offset: int, length: int, src: bytes, dst: bytes) -> None:
    """Compute the full TCP checksum of ``buf[offset:offset+length]`` for the
    pseudo-header (src, dst) and store it in the segment."""
    buf[offset + 16] = 0
    buf[offset + 17] = 0
    csum = checksum(buf[offset:offset + length], address_sums(src, dst)[1] + length)
    buf[offset + 16] = csum >> 8
    buf[offset + 17] = csum & 0xFF


def tcp_checksum_ok(packet) -> bool:
    """True if the TCP checksum of an IPv4 packet (20-byte header) verifies."""
    total = total_length(packet)
    seg = memoryview(packet)[IPV4_HEADER_LEN:total]
    return ones_sum(seg, pseudo_header_sum(bytes(packet[12:16]), bytes(packet[16:20]), len(seg))) == 0xFFFF


def build_rx_packet(buf: bytearray, seg_len: int, ident: int, src: bytes, dst: bytes,
                    offset: int = 0) -> None:
    """Turn ``buf[offset+20:offset+20+seg_len]`` (a received TCP segment) into a
    full IPv4 packet ``buf[offset:offset+20+seg_len]``: header synthesized, TCP
    checksum made valid for (src, dst)."""
    fill_tcp_checksum(buf, offset + IPV4_HEADER_LEN, seg_len, src, dst)
    write_ipv4_header(buf, offset, IPV4_HEADER_LEN + seg_len, ident, src, dst)


def clamp_mss(segment, mss_max: int) -> bool:
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

IPV6_HEADER_LEN = 40


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
