"""TCP-in-UDP (draft-cheshire-tcp-over-udp, as the eBPF tcp-in-udp does it): the
pure byte mapping between a TCP segment and a UDP datagram.  No I/O.

A datagram is a TCP segment with its header words moved, so that the first
eight bytes are a valid UDP header and nothing is added::

    UDP datagram bytes   holds                          TCP segment bytes
    0-3                  source and destination port    0-3 (unchanged)
    4-5                  UDP length                     (replaces the urgent pointer)
    6-7                  UDP checksum                   derived from the TCP checksum
    8-11                 data offset, flags, window     12-15
    12-15                sequence number                4-7
    16-19                acknowledgement number         8-11
    20-                  options and payload            20- (unchanged)

Moving aligned 16-bit words leaves a ones'-complement sum unchanged, so the two
checksums differ only by the pseudo-header protocol (6 -> 17) and the urgent
pointer (-> the UDP length L): ``udp = ~(~tcp + 11 + L - urg)`` and back
``tcp = ~(~udp - 11 - L)`` (the urgent pointer of a decoded segment is 0).

A UDP socket hands over the payload only (datagram bytes 8-): "wire payload"
below means that part, which is what the data path sends and receives.
Segments with URG set are not converted (the eBPF peer sends those as plain TCP).
"""

from __future__ import annotations

import struct
from typing import Final

from .packet import (
    IPV4_HEADER_LEN,
    TCP_HEADER_MIN,
    URG,
    ReadBuffer,
    WriteBuffer,
    checksum,
    fold,
)

UDP_HEADER_LEN: Final = 8
IPPROTO_UDP: Final = 17
IPPROTO_TCP: Final = 6
PROTO_DELTA: Final = IPPROTO_UDP - IPPROTO_TCP  # the pseudo-header's protocol word, 6 -> 17
WIRE_FLAGS: Final = 1  # offset of the TCP flags byte in the wire payload (13 in the TCP header)
WIRE_MIN: Final = TCP_HEADER_MIN - UDP_HEADER_LEN  # 12: the shortest wire payload

# RX drop reasons (wire payloads that cannot be a segment) beside packet.py's
RX_URGENT: Final = "urgent"
TX_URGENT: Final = "urgent"

_U16: Final = struct.Struct("!H")
_ZERO4: Final = bytes(4)


def _add(a: int, b: int) -> int:
    return fold(a + b)


def _sub(a: int, b: int) -> int:
    return fold(a + (~b & 0xFFFF))


def udp_checksum_from_tcp(tcp_check: int, length: int, urgent: int = 0) -> int:
    """The UDP checksum of the datagram a segment of *length* bytes with TCP
    checksum *tcp_check* (and urgent pointer *urgent*) becomes."""
    total = _sub(_add(_add(~tcp_check & 0xFFFF, PROTO_DELTA), length), urgent)
    check = ~total & 0xFFFF
    return check or 0xFFFF  # 0 means "no checksum" in UDP


def tcp_checksum_from_udp(udp_check: int, length: int) -> int:
    """The TCP checksum of the segment a datagram of *length* bytes with UDP
    checksum *udp_check* becomes (its urgent pointer 0)."""
    total = _sub(_sub(~udp_check & 0xFFFF, PROTO_DELTA), length)
    return ~total & 0xFFFF


# ------------------------------------------------------------------ segment -> wire


def wire_header(tcp_header: ReadBuffer) -> bytes:
    """The wire payload's header (12 bytes + options) for a TCP header."""
    return bytes(tcp_header[12:16]) + bytes(tcp_header[4:12]) + bytes(tcp_header[20:])


def encode_payload(segment: ReadBuffer) -> bytes:
    """The wire payload (UDP payload) of a TCP segment: data offset/flags/window,
    seq, ack, options and payload.  The caller has refused URG segments."""
    mv = memoryview(segment)
    return b"".join((mv[12:16], mv[4:12], mv[20:]))


def encode(segment: ReadBuffer) -> bytes:
    """The whole UDP datagram (header included) for a TCP segment, with the UDP
    checksum derived from the TCP one (what the eBPF encapsulation writes).
    Raises ValueError for URG segments."""
    if segment[13] & URG:
        raise ValueError("URG segments are not converted")
    length = len(segment)
    tcp_check, urgent = struct.unpack_from("!HH", segment, 16)
    return (bytes(segment[0:4]) + struct.pack("!HH", length,
                                              udp_checksum_from_tcp(tcp_check, length, urgent))
            + encode_payload(segment))


# ------------------------------------------------------------------ wire -> segment


def decode(datagram: ReadBuffer) -> bytes:
    """The TCP segment for a whole UDP datagram (header included), with the
    TCP checksum derived from the UDP one."""
    length = len(datagram)
    udp_check = _U16.unpack_from(datagram, 6)[0]
    seg = bytearray(decode_payload(memoryview(datagram)[UDP_HEADER_LEN:], bytes(datagram[0:4])))
    _U16.pack_into(seg, 16, tcp_checksum_from_udp(udp_check, length))
    return bytes(seg)


def decode_payload(payload: ReadBuffer, ports: bytes) -> bytearray:
    """The TCP segment (check field zero) for a wire payload and the 4 bytes of
    UDP source and destination port."""
    mv = memoryview(payload)
    return bytearray().join((ports, mv[4:12], mv[0:4], _ZERO4, mv[12:]))


def classify_payload(payload: ReadBuffer) -> str | None:
    """None if a wire payload can become a TCP segment, else the drop reason
    (the default mode's names where they apply, ``urgent`` for URG)."""
    n = len(payload)
    if n < WIRE_MIN:
        return "too_short"
    if n + UDP_HEADER_LEN > 0xFFFF - IPV4_HEADER_LEN:
        return "too_long"
    doff = (payload[0] >> 4) * 4
    if doff < TCP_HEADER_MIN or doff > n + UDP_HEADER_LEN:
        return "bad_data_offset"
    if payload[WIRE_FLAGS] & URG:
        return RX_URGENT
    return None


def decode_in_place(buf: WriteBuffer, start: int, n: int, ports: bytes) -> None:
    """The wire payload ``buf[start+8:start+8+n]`` becomes the TCP segment
    ``buf[start:start+8+n]`` (check field zero): seq and ack move down, the
    data offset/flags/window word moves behind them, ports and zeros go in
    front.  Options and payload stay where they are."""
    b4, b8 = start + 4, start + 8
    moved = bytes(buf[b8 + 4:b8 + 12]) + bytes(buf[b8:b8 + 4])
    buf[start:b4] = ports
    buf[b4:start + 16] = moved
    buf[start + 16:start + 20] = _ZERO4


# ------------------------------------------------------------------ IPv4 packets


def ipv4_segment_to_datagram(packet: ReadBuffer) -> bytes:
    """An IPv4 TCP packet (20-byte header) as the eBPF encapsulation turns it
    into an IPv4 UDP packet: ID, TTL, DF and length kept, protocol and header
    checksum changed."""
    total = (packet[2] << 8) | packet[3]
    return _ipv4_with(packet, IPPROTO_UDP) + encode(memoryview(packet)[IPV4_HEADER_LEN:total])


def ipv4_datagram_to_segment(packet: ReadBuffer) -> bytes:
    """The reverse of ipv4_segment_to_datagram."""
    total = (packet[2] << 8) | packet[3]
    return _ipv4_with(packet, IPPROTO_TCP) + decode(memoryview(packet)[IPV4_HEADER_LEN:total])


def _ipv4_with(packet: ReadBuffer, proto: int) -> bytes:
    hdr = bytearray(packet[:IPV4_HEADER_LEN])
    hdr[9] = proto
    hdr[10:12] = b"\0\0"
    _U16.pack_into(hdr, 10, checksum(hdr))
    return bytes(hdr)
