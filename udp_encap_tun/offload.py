"""Segmentation offload helpers for the fast path (pure code, no I/O).

The tun device is opened with ``IFF_VNET_HDR`` and ``TUNSETOFFLOAD(TUN_F_CSUM |
TUN_F_TSO4)``, so every read/write carries a 10-byte ``virtio_net_hdr`` in
front of the IPv4 packet, and the UDP socket uses ``UDP_SEGMENT`` (send) and
``UDP_GRO`` (receive).  The wire format does not change: one UDP datagram holds
exactly one TCP segment (TCP header + payload, no IP header).  IPv6 (a 40-byte
header, gso_type TCPV6) works the same way: a wire segment is a bare TCP
segment whatever the family.

* TX: :func:`tso_split` cuts a TCP super-packet read from the tun into batches
  of wire segments, each batch one ``sendmsg`` with ``UDP_SEGMENT``.
* RX: :func:`split_gro` cuts a ``UDP_GRO`` buffer into its datagrams and
  :func:`coalesce` merges consecutive in-order segments of a flow back into
  super-packets for one tun write each.

Only header-level work is done per segment: payload bytes are moved by
``bytearray.join`` (one copy, in C) and never summed in Python.  TCP checksums
are left to the kernel: on TX the check field is copied as it came from the
kernel (the receiver recomputes it anyway), on RX the check field gets the
pseudo-header sum and the vnet header asks the kernel to finish it
(``NEEDS_CSUM``).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from itertools import islice, repeat
from operator import getitem
from typing import Any, Final, final

from .packet import (
    ACK,
    CWR,
    FIN,
    IPV4_HEADER_LEN,
    IPV6_HEADER_LEN,
    MAX_UDP_PAYLOAD,
    PSH,
    TCP_HEADER_MIN,
    ReadBuffer,
    WriteBuffer,
    address_sums,
    build_rx_packet6,
    flow_label,
    fold,
    write_ipv4_header,
    write_ipv6_header,
)
from .tiu import UDP_HEADER_LEN, decode_payload, encode_payload, wire_header

# flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR: Final = struct.Struct("=BBHHHH")
VNET_HDR_LEN: Final = 10
assert VNET_HDR.size == VNET_HDR_LEN

NEEDS_CSUM, DATA_VALID = 1, 2
GSO_NONE, GSO_TCPV4, GSO_TCPV6, GSO_ECN = 0, 1, 4, 0x80
UDP_MAX_SEGMENTS: Final = 64

MAX_IP_PACKET: Final = 0xFFFF
TCP_CSUM_OFFSET: Final = 16  # offset of the check field in the TCP header

_SEQ_MASK: Final = 0xFFFFFFFF
_U32: Final = struct.Struct("!I")
_U16: Final = struct.Struct("!H")
# ports (as one u32), seq, ack, data offset byte, flags, window, check, urgent pointer
_TCP_HDR: Final = struct.Struct("!IIIBBHHH")

# Flags of the middle pieces of a split super-packet: FIN/PSH go on the last
# piece only, CWR on the first only.
_MID_MASK: Final = ~(FIN | PSH | CWR) & 0xFF
_FIRST_MASK: Final = ~(FIN | PSH) & 0xFF
_LAST_MASK: Final = ~CWR & 0xFF

# Room for the vnet header + IPv4 header, written in place after the join.
_PREFIX: Final = bytes(VNET_HDR_LEN + IPV4_HEADER_LEN)
_TCP_OFF: Final = VNET_HDR_LEN + IPV4_HEADER_LEN  # offset of the TCP header in a tun buffer
_PREFIX6: Final = bytes(VNET_HDR_LEN + IPV6_HEADER_LEN)  # the same for IPv6
_TCP_OFF6: Final = VNET_HDR_LEN + IPV6_HEADER_LEN
_ACK_BYTE: Final = bytes([ACK])
_ACK_PSH_BYTE: Final = bytes([ACK | PSH])

_pack_vnet_into: Final = VNET_HDR.pack_into
_pack_u16_into: Final = _U16.pack_into

# The virtio-net header of one IPv4 TCP packet whose checksum the kernel finishes
# (hdr_len, a hint, that of the shortest TCP header: the kernel raises it as needed),
# and of a packet written complete.
VNET_CSUM_ONE: Final[bytes] = VNET_HDR.pack(NEEDS_CSUM, GSO_NONE,
                                            IPV4_HEADER_LEN + TCP_HEADER_MIN, 0,
                                            IPV4_HEADER_LEN, TCP_CSUM_OFFSET)
VNET_NONE: Final[bytes] = bytes(VNET_HDR_LEN)


def put_pseudo_sum(buf: WriteBuffer, tcp: int, tcp_len: int, src: bytes, dst: bytes) -> None:
    """Store the TCP pseudo-header sum (*src*, *dst*, *tcp_len*) in the check
    field of the segment at ``buf[tcp:]``: with NEEDS_CSUM the kernel adds the
    segment's own sum to it."""
    _pack_u16_into(buf, tcp + TCP_CSUM_OFFSET, fold(address_sums(src, dst)[1] + tcp_len))
_unpack_tcp: Final = _TCP_HDR.unpack_from

_seq_structs: Final[dict[int, struct.Struct]] = {}


def _seq_struct(n: int) -> struct.Struct:
    """Struct packing *n* big-endian u32 (cached: n <= max_segments)."""
    st = _seq_structs.get(n)
    if st is None:
        st = _seq_structs[n] = struct.Struct(f"!{n}I")
    return st


# --------------------------------------------------------------------------- TX


def tso_split(packet: ReadBuffer, gso_size: int, max_segments: int = UDP_MAX_SEGMENTS,
              max_bytes: int = MAX_UDP_PAYLOAD,
              tiu: bool = False) -> Sequence[tuple[ReadBuffer, int]]:
    """Cut a TCP super-packet into ``UDP_SEGMENT`` batches.

    *packet* is an IPv4 packet (20-byte header) or an IPv6 packet (40-byte
    header, TCP next), TCP, already validated, as read from the tun after the
    vnet header (gso_type TCPV4 or TCPV6).  The pieces do not depend on the
    family: a wire segment is a bare TCP segment.  Returns ``[(buffer, segment_size),
    ...]``: each buffer is the concatenation of wire segments (TCP header +
    payload piece) for one ``sendmsg`` with ``UDP_SEGMENT=segment_size``;
    every segment but the last of a batch is exactly ``segment_size`` bytes,
    and a batch holds at most *max_segments* segments and *max_bytes* bytes.

    If the payload fits in one piece (or *gso_size* is 0) the result is
    ``[(tcp_segment, len(tcp_segment))]`` with *tcp_segment* a memoryview
    slice of *packet* (no copy).

    With *tiu* the pieces are TCP-in-UDP wire payloads instead (tiu.py: the
    header words moved, 8 bytes shorter; the sequence number stays at bytes 4-7).
    """
    mv = packet if type(packet) is memoryview else memoryview(packet)
    if mv[0] >> 4 == 6:
        hlen = IPV6_HEADER_LEN
        total = hlen + ((mv[4] << 8) | mv[5])
        if total == hlen or total > len(mv):  # defensive, as below
            total = len(mv)
    else:
        hlen = IPV4_HEADER_LEN
        total = (mv[2] << 8) | mv[3]
        if total == 0 or total > len(mv):  # defensive; validated packets never hit this
            total = len(mv)
    tcp = mv[hlen:total]
    tcp_len = total - hlen
    doff = (tcp[12] >> 4) << 2
    plen = tcp_len - doff
    if gso_size <= 0 or plen <= gso_size:
        if tiu:
            return [(encode_payload(tcp), tcp_len - UDP_HEADER_LEN)]
        return [(tcp, tcp_len)]

    seg_size = doff - UDP_HEADER_LEN + gso_size if tiu else doff + gso_size
    flags_at = 13 - 12 if tiu else 13  # the flags byte's offset in a piece
    per_batch = min(max_segments, max_bytes // seg_size)
    if per_batch < 1:
        raise ValueError(f"segment of {seg_size} bytes exceeds max_bytes={max_bytes}")

    flags = tcp[13]
    head = bytearray(tcp[:doff])
    head[13] = flags & _MID_MASK
    hdr = wire_header(head) if tiu else bytes(head)
    seq0 = _U32.unpack_from(tcp, 4)[0]
    payload = tcp[doff:]
    nseg = -(-plen // gso_size)

    batches: list[tuple[bytearray, int]] = []
    batch_bytes = per_batch * gso_size  # payload bytes per full batch
    for pstart in range(0, plen, batch_bytes):
        pend = min(pstart + batch_bytes, plen)
        n = -(-(pend - pstart) // gso_size)
        parts: list[bytes | memoryview] = [hdr] * (2 * n)
        parts[1::2] = [payload[o:o + gso_size] for o in range(pstart, pend, gso_size)]
        buf = bytearray().join(parts)
        # Sequence numbers: pack them all at once, then scatter byte i of every
        # one into byte 4+i of every header with strided slice assignments.
        s = seq0 + pstart
        if seq0 + pend <= _SEQ_MASK:  # no wrap inside this batch (common case)
            seqs = _seq_struct(n).pack(*range(s, s + n * gso_size, gso_size))
        else:
            seqs = _seq_struct(n).pack(*[(s + k * gso_size) & _SEQ_MASK for k in range(n)])
        end = n * seg_size
        buf[4:end:seg_size] = seqs[0::4]
        buf[5:end:seg_size] = seqs[1::4]
        buf[6:end:seg_size] = seqs[2::4]
        buf[7:end:seg_size] = seqs[3::4]
        batches.append((buf, seg_size))

    # FIN/PSH only on the very last piece, CWR only on the very first.
    batches[0][0][flags_at] = flags & _FIRST_MASK
    last = batches[-1][0]
    last[((nseg - 1) % per_batch) * seg_size + flags_at] = flags & _LAST_MASK
    return batches


def recut(data: ReadBuffer, size: int, max_size: int,
          tiu: bool = False) -> list[tuple[ReadBuffer, int]]:
    """The wire segments of one batch (*data*: segments of *size* bytes, the
    last one shorter or equal) cut again so that none exceeds *max_size* bytes,
    as batches for send_batches.  A segment that fits is kept as it is; one that
    does not becomes pieces of ``max_size - its TCP header`` payload bytes each,
    sequence numbers and flags as tso_split sets them.  With *tiu* the segments
    are TCP-in-UDP wire payloads (tiu.py), and so are the pieces."""
    mv = data if type(data) is memoryview else memoryview(data)
    out: list[tuple[ReadBuffer, int]] = []
    for off in range(0, len(mv), size):
        seg: ReadBuffer = mv[off:off + size]
        n = len(seg)
        if n <= max_size:
            out.append((seg, n))
            continue
        if tiu:  # back to a TCP segment (ports and checksum do not matter: not sent)
            doff = (seg[0] >> 4) << 2
            seg = decode_payload(seg, bytes(4))
            room = max_size + UDP_HEADER_LEN - doff
        else:
            room = max_size - ((seg[12] >> 4) << 2)
        pkt = bytearray(IPV4_HEADER_LEN) + seg  # tso_split cuts IPv4 packets
        pkt[2:4] = len(pkt).to_bytes(2, "big")
        out.extend(tso_split(pkt, room, tiu=tiu))
    return out


# --------------------------------------------------------------------------- RX


def split_gro(buf: ReadBuffer, length: int, seg_size: int) -> list[memoryview]:
    """Cut a ``UDP_GRO`` receive buffer ``buf[:length]`` into datagrams of
    *seg_size* bytes (the last may be shorter); memoryview slices, no copy."""
    if length <= 0:
        return []
    mv = memoryview(buf)[:length]
    if seg_size <= 0 or seg_size >= length:
        return [mv]
    return [mv[o:o + seg_size] for o in range(0, length, seg_size)]


_run_structs: Final[dict[int, struct.Struct]] = {}


def _run_struct(doff: int) -> struct.Struct:
    """Struct reading (ports as u32, seq, bytes 8..15 = ack/doff/flags/window,
    bytes 18..doff = urgent pointer + options) of a TCP header of *doff* bytes:
    everything that must be identical in merged segments apart from seq, in
    three objects compared with ``==``."""
    st = _run_structs.get(doff)
    if st is None:
        st = _run_structs[doff] = struct.Struct(f"!II8s2x{doff - 18}s")
    return st


@final
class _Run:
    """In-order data segments of one flow being merged into a super-packet."""

    __slots__ = ("segs", "doff", "gso", "plen", "max_plen", "next_seq", "mid", "mid_psh",
                 "tail", "unpack", "push")

    def __init__(self, seg: ReadBuffer, doff: int, plen: int, seq: int,
                 ip_hlen: int = IPV4_HEADER_LEN) -> None:
        self.segs = [seg]  # whole segments; the payloads are sliced out when building
        self.doff = doff
        self.gso = plen
        self.plen = plen
        # IPv6 too: at most 65535 bytes of IP packet (the payload length field
        # would allow 40 more, the stack's 64 KiB GSO limit would not)
        self.max_plen = MAX_IP_PACKET - ip_hlen - doff
        self.next_seq = (seq + plen) & _SEQ_MASK
        self.unpack = _run_struct(doff).unpack_from
        # bytes 8..15 (ack, data offset, flags, window) as the fast path reads
        # them, with flags ACK only or ACK|PSH; bytes 18..doff (urgent, options)
        ack_doff = bytes(seg[8:13])
        win = bytes(seg[14:16])
        self.mid = ack_doff + _ACK_BYTE + win
        self.mid_psh = ack_doff + _ACK_PSH_BYTE + win
        self.tail = bytes(seg[18:doff])
        self.push: int = False  # flags & PSH of the run's last segment (PSH or 0)


def wire_size(buf: ReadBuffer) -> tuple[int, int]:
    """(segments, bytes) on the wire of a tun buffer that coalesce made (either family)."""
    _, gso_type, hdr_len, gso_size, _, _ = VNET_HDR.unpack_from(buf, 0)
    payload = len(buf) - VNET_HDR_LEN - hdr_len
    count = -(-payload // gso_size) if gso_type != GSO_NONE and gso_size else 1
    ip_hlen = IPV6_HEADER_LEN if buf[VNET_HDR_LEN] >> 4 == 6 else IPV4_HEADER_LEN
    return count, payload + count * (hdr_len - ip_hlen)


def _single(seg: ReadBuffer, doff: int, base: int, src: bytes, dst: bytes,
            ident: int) -> bytearray:
    out = bytearray().join((_PREFIX, seg))
    tcp_len = len(seg)
    _pack_vnet_into(out, 0, NEEDS_CSUM, GSO_NONE, IPV4_HEADER_LEN + doff, 0,
                    IPV4_HEADER_LEN, TCP_CSUM_OFFSET)
    write_ipv4_header(out, VNET_HDR_LEN, IPV4_HEADER_LEN + tcp_len, ident, src, dst)
    _pack_u16_into(out, _TCP_OFF + TCP_CSUM_OFFSET, fold(base + tcp_len))
    return out


def _single6(seg: ReadBuffer, doff: int, base: int, src: bytes, dst: bytes,
             ident: int) -> bytearray:
    """_single for IPv6 (*base*, *ident* unused): the packet written complete,
    full TCP checksum, no offload asked of the kernel."""
    out = bytearray().join((_PREFIX6, seg))
    _pack_vnet_into(out, 0, 0, GSO_NONE, IPV6_HEADER_LEN + doff, 0, 0, 0)
    build_rx_packet6(out, len(seg), src, dst, VNET_HDR_LEN)
    return out


def _fast_path_off(*_args: object) -> Any:
    """What coalesce's fast path calls until it has a run (never: c_full is -1 until then)."""
    raise AssertionError("coalesce: fast path taken without a run")


def coalesce(segments: Sequence[ReadBuffer], src: bytes, dst: bytes,
             next_ident: Callable[[], int]) -> list[bytearray]:
    """Turn received TCP segments (all from one UDP peer, validated, in
    arrival order) into tun write buffers (vnet header + IPv4 + TCP, or
    IPv6 + TCP when *src* and *dst* are 16-byte addresses).

    Consecutive in-order data segments of one flow (same ports, identical
    header apart from seq/check/PSH, only ACK set, equal payload sizes with a
    possibly shorter last one, PSH only on the last) become one GSO
    super-packet (gso_type TCPV4) of at most 65535 IP bytes.  Everything else
    is written alone (gso_type NONE).  Either way ``NEEDS_CSUM`` is set and the
    TCP check field holds the pseudo-header sum, so the kernel finishes the
    checksum.  Segments of different flows may be interleaved; the order
    within a flow is kept, and outputs are ordered by their first segment.

    IPv6: super-packets are gso_type TCPV6 (40-byte header, flow label per
    flow, csum_start 40, the IPv6 pseudo-header sum in the check field), at
    most 65535 IP bytes too; a segment written alone gets its full checksum
    (flags 0: nothing left to the kernel).  *next_ident* is called for IPv4
    packets only.
    """
    v6 = len(src) == 16
    if len(segments) == 1:  # the common case at low rates: nothing to merge
        seg = segments[0]
        if v6:
            return [_single6(seg, (seg[12] >> 4) << 2, 0, src, dst, 0)]
        return [_single(seg, (seg[12] >> 4) << 2, address_sums(src, dst)[1], src, dst,
                        next_ident())]
    ip_hlen = IPV6_HEADER_LEN if v6 else IPV4_HEADER_LEN
    items: list[_Run | tuple[ReadBuffer, int]] = []  # _Run for data runs, (segment, doff)
    open_runs: dict[int, _Run] = {}  # ports -> _Run that may still grow

    # The run that the last segment went to, unpacked into locals: the fast
    # path below handles a full-size, ACK-only, in-order segment of that flow.
    cur: _Run | None = None
    c_full = -1  # doff + gso of cur; -1 disables the fast path
    c_ports = c_next = c_len = c_limit = c_gso = 0
    c_mid = c_tail = b""
    # typed as what _run_struct's unpack gives: compiled, the comparisons below are then
    # native (on an untyped tuple they are generic calls, slower than the interpreter)
    c_unpack: Callable[[ReadBuffer, int], tuple[int, int, bytes, bytes]] = _fast_path_off
    c_append: Callable[[ReadBuffer], None] = _fast_path_off

    for seg in segments:
        if len(seg) == c_full:
            ports, seq, mid, tail = c_unpack(seg, 0)
            if (seq == c_next and mid == c_mid and ports == c_ports and tail == c_tail
                    and c_len <= c_limit):
                c_append(seg)
                c_len += c_gso
                c_next = (seq + c_gso) & _SEQ_MASK
                continue
        if cur is not None:  # leave the fast path: store its state back
            cur.plen = c_len
            cur.next_seq = c_next
            cur = None
            c_full = -1

        ports, seq, _ack, offb, flags, _win, _check, _urg = _unpack_tcp(seg, 0)
        doff = (offb >> 4) << 2
        plen = len(seg) - doff
        run = open_runs.get(ports)
        if flags != ACK and (flags != ACK | PSH or run is None) or not plen:
            # not mergeable (a PSH segment can only end a run): goes alone,
            # after (and closing) the flow's run
            if run is not None:
                del open_runs[ports]
            items.append((seg, doff))
            continue

        if run is not None:
            if (seq == run.next_seq and doff == run.doff and plen <= run.gso
                    and run.plen + plen <= run.max_plen):
                _, _, mid, tail = run.unpack(seg, 0)
                if (mid == run.mid or mid == run.mid_psh) and tail == run.tail:
                    run.segs.append(seg)
                    run.plen += plen
                    run.next_seq = (seq + plen) & _SEQ_MASK
                    if flags & PSH or plen < run.gso:  # nothing may follow
                        run.push = flags & PSH
                        del open_runs[ports]
                        continue
                    cur = run
            if cur is None:
                del open_runs[ports]
        if cur is None:
            if flags & PSH:  # PSH ends a run: this one has nothing to merge with
                items.append((seg, doff))
                continue
            run = _Run(seg, doff, plen, seq, ip_hlen)
            items.append(run)
            open_runs[ports] = cur = run
        c_full = cur.doff + cur.gso
        c_ports = ports
        c_next = cur.next_seq
        c_len = cur.plen
        c_gso = cur.gso
        c_limit = cur.max_plen - cur.gso
        c_mid = cur.mid
        c_tail = cur.tail
        c_unpack = cur.unpack
        c_append = cur.segs.append
    if cur is not None:
        cur.plen = c_len

    base = address_sums(src, dst)[1]
    out: list[bytearray] = []
    append = out.append
    single, prefix, tcp_off = (_single6, _PREFIX6, _TCP_OFF6) if v6 else (_single, _PREFIX,
                                                                           _TCP_OFF)
    for item in items:
        if type(item) is not _Run:
            append(single(item[0], item[1], base, src, dst, 0 if v6 else next_ident()))
            continue
        segs = item.segs
        doff = item.doff
        if len(segs) == 1:
            append(single(segs[0], doff, base, src, dst, 0 if v6 else next_ident()))
            continue
        # typeshed: operator.getitem of a slice is a Sequence (here a memoryview, a buffer),
        # and map() cannot infer memoryview's item type parameter from its constructor
        buf = bytearray().join([prefix, segs[0],
                                *map(getitem, map(memoryview, islice(segs, 1, None)),  # type: ignore[arg-type, list-item]
                                     repeat(slice(doff, None)))])
        tcp_len = doff + item.plen
        if v6:
            _pack_vnet_into(buf, 0, NEEDS_CSUM, GSO_TCPV6, IPV6_HEADER_LEN + doff, item.gso,
                            IPV6_HEADER_LEN, TCP_CSUM_OFFSET)
            write_ipv6_header(buf, VNET_HDR_LEN, tcp_len, src, dst,
                              flow_label(src, dst, segs[0]))
        else:
            _pack_vnet_into(buf, 0, NEEDS_CSUM, GSO_TCPV4, IPV4_HEADER_LEN + doff, item.gso,
                            IPV4_HEADER_LEN, TCP_CSUM_OFFSET)
            write_ipv4_header(buf, VNET_HDR_LEN, IPV4_HEADER_LEN + tcp_len, next_ident(), src,
                              dst)
        if item.push:
            buf[tcp_off + 13] |= PSH
        _pack_u16_into(buf, tcp_off + TCP_CSUM_OFFSET, fold(base + tcp_len))
        append(buf)
    return out


# --------------------------------------------------------------------------- RX, TCP-in-UDP

_WIRE_SEQ: Final = struct.Struct("!I")


def coalesce_wire_gro(buf: ReadBuffer, length: int, seg_size: int, ports: bytes, src: bytes,
                      dst: bytes, ident: int) -> bytearray | None:
    """The TCP-in-UDP receive fast path: a ``UDP_GRO`` buffer ``buf[:length]`` of
    wire payloads (tiu.py) that are one in-order run of a flow - equal headers
    but for the sequence number, ACK only (PSH allowed on the last), equal
    sizes but the last - becomes one tun write buffer (a GSO super-packet, as
    coalesce() makes it) without touching each segment in Python: the header
    bytes are compared with strided slices.  None if the buffer is anything
    else (the caller then decodes segment by segment)."""
    mv = memoryview(buf)[:length]
    hl = ((mv[0] >> 4) << 2) - UDP_HEADER_LEN  # wire header length (TCP header - 8)
    gso = seg_size - hl
    count = -(-length // seg_size)
    if hl < 12 or gso <= 0 or count < 2 or length - (count - 1) * seg_size <= hl:
        return None
    tcp_len = hl + UDP_HEADER_LEN + length - count * hl
    if tcp_len + IPV4_HEADER_LEN > MAX_IP_PACKET:
        return None
    last = (count - 1) * seg_size
    flags = mv[1]
    if flags != ACK or mv[last + 1] & ~PSH != ACK:
        return None
    # every header byte but the sequence number equal in all segments
    # (the flags byte: in all but the last)
    for i in range(hl):
        if 4 <= i < 8:
            continue
        end = last + i + 1 if i != 1 else last
        if mv[i:end:seg_size] != bytes([mv[i]]) * (count if i != 1 else count - 1):
            return None
    seq0 = _WIRE_SEQ.unpack_from(mv, 4)[0]
    if seq0 + (count - 1) * gso <= _SEQ_MASK:
        seqs = _seq_struct(count).pack(*range(seq0, seq0 + count * gso, gso))
    else:
        seqs = _seq_struct(count).pack(*[(seq0 + k * gso) & _SEQ_MASK for k in range(count)])
    for j in range(4):
        if mv[4 + j:last + 5 + j:seg_size] != seqs[j::4]:
            return None
    doff = hl + UDP_HEADER_LEN
    out = bytearray().join([_PREFIX, ports, mv[4:12], mv[0:4], bytes(4), mv[12:hl],
                            *[mv[o + hl:o + seg_size] for o in range(0, length, seg_size)]])
    _pack_vnet_into(out, 0, NEEDS_CSUM, GSO_TCPV4, IPV4_HEADER_LEN + doff, gso,
                    IPV4_HEADER_LEN, TCP_CSUM_OFFSET)
    write_ipv4_header(out, VNET_HDR_LEN, IPV4_HEADER_LEN + tcp_len, ident, src, dst)
    if mv[last + 1] & PSH:
        out[_TCP_OFF + 13] |= PSH
    put_pseudo_sum(out, _TCP_OFF, tcp_len, src, dst)
    return out
