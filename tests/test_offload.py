"""Tests for udp_encap_tun.offload (pure, no root)."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import testkit
from udp_encap_tun import packet as P
from udp_encap_tun.offload import (
    DATA_VALID,
    GSO_ECN,
    GSO_NONE,
    GSO_TCPV4,
    GSO_TCPV6,
    NEEDS_CSUM,
    UDP_MAX_SEGMENTS,
    VNET_HDR,
    VNET_HDR_LEN,
    coalesce,
    split_gro,
    tso_split,
    wire_size,
)

SRC = bytes([10, 98, 0, 1])
DST = bytes([10, 98, 0, 2])
TS_OPTS = bytes([1, 1, 8, 10]) + struct.pack("!II", 123456, 654321)  # NOP NOP timestamps
MASK32 = 0xFFFFFFFF


# ----------------------------------------------------------------------------- helpers


def tcp_seg(seq=1000, payload=b"", flags=P.ACK, sport=40000, dport=5201, ack=777,
            win=502, opts=b"", check=0xBEEF, urg=0) -> bytes:
    return testkit.tcp_segment(payload, sport=sport, dport=dport, seq=seq, ack=ack, flags=flags,
                               window=win, options=opts, urgent=urg, checksum=check)


def ipv4(seg, src=SRC, dst=DST, ident=1) -> bytearray:
    return testkit.ip_packet(seg, src, dst, ident=ident)


def doff_of(seg) -> int:
    return (seg[12] >> 4) * 4


def payload_of(seg) -> bytes:
    return bytes(seg[doff_of(seg):])


def seq_of(seg) -> int:
    return struct.unpack_from("!I", seg, 4)[0]


def wire_segments(batches) -> list[bytes]:
    """What UDP_SEGMENT puts on the wire: every batch cut at its segment size."""
    out = []
    for buf, size in batches:
        assert len(buf) > 0
        out.extend(bytes(buf[o:o + size]) for o in range(0, len(buf), size))
    return out


def masked(seg) -> bytes:
    """Segment with the TCP check field zeroed (coalesce rewrites it)."""
    b = bytearray(seg)
    b[16:18] = b"\0\0"
    return bytes(b)


def ones_add(a: int, b: int) -> int:
    s = a + b
    s = (s & 0xFFFF) + (s >> 16)
    return (s & 0xFFFF) + (s >> 16)


def kernel_write(buf, ident_start=100) -> list[bytearray]:
    """Emulate the kernel handling a tun write: parse the vnet header, segment
    a GSO packet the way tcp_gso_segment does (pseudo-header length adjusted
    per segment), finish checksums; returns finished IPv4 packets."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf, 0)
    pkt = bytearray(buf[VNET_HDR_LEN:])
    assert flags == NEEDS_CSUM
    assert (csum_start, csum_offset) == (20, 16)
    assert P.classify_tx(pkt) is None
    assert P.total_length(pkt) == len(pkt)
    assert P.checksum(pkt[:20]) == 0  # IP header checksum valid
    assert pkt[6] & 0x40 and pkt[8] == 64  # DF, TTL 64
    src, dst = bytes(pkt[12:16]), bytes(pkt[16:20])
    tcp_len = len(pkt) - 20
    stored = struct.unpack_from("!H", pkt, 36)[0]
    assert stored == P.pseudo_header_sum(src, dst, tcp_len)
    assert hdr_len == 20 + doff_of(pkt[20:])
    if gso_type == GSO_NONE:
        assert gso_size == 0
        testkit.finish_csum(pkt, csum_start, csum_offset, P.total_length(pkt))
        return [pkt]
    assert gso_type == GSO_TCPV4
    assert 0 < gso_size < len(pkt) - hdr_len  # really more than one segment
    out = []
    pieces = wire_segments(tso_split(pkt, gso_size, max_segments=1 << 30, max_bytes=1 << 30))
    for i, seg in enumerate(pieces):
        seg = bytearray(seg)
        # tcp_gso_segment: replace the length in the pseudo-header sum
        adj = ones_add(ones_add(stored, ~tcp_len & 0xFFFF), len(seg))
        struct.pack_into("!H", seg, 16, adj)
        assert adj == P.pseudo_header_sum(src, dst, len(seg))
        p = ipv4(seg, src, dst, ident_start + i)
        testkit.finish_csum(p, 20, 16, P.total_length(p))
        out.append(p)
    return out


def resplit(bufs) -> list[bytes]:
    """coalesce output -> the TCP segments the kernel would deliver, check masked."""
    segs = []
    for b in bufs:
        segs.extend(masked(p[20:]) for p in kernel_write(b))
    return segs


def by_flow(segs) -> dict:
    d: dict = {}
    for s in segs:
        d.setdefault(bytes(s[:4]), []).append(bytes(s))
    return d


class Ident:
    def __init__(self, start=1):
        self.n = start
        self.calls = 0

    def __call__(self):
        self.calls += 1
        self.n = (self.n + 1) & 0xFFFF
        return self.n


def vnet(buf):
    return VNET_HDR.unpack_from(buf, 0)


# ----------------------------------------------------------------------------- constants


def test_constants():
    assert VNET_HDR.size == VNET_HDR_LEN == 10
    assert (NEEDS_CSUM, DATA_VALID) == (1, 2)
    assert (GSO_NONE, GSO_TCPV4, GSO_ECN) == (0, 1, 0x80)
    assert UDP_MAX_SEGMENTS == 64


# ----------------------------------------------------------------------------- tso_split


@pytest.mark.parametrize("plen,gso", [(0, 1448), (1, 1448), (1448, 1448), (5000, 0), (100, 0)])
def test_tso_passthrough(plen, gso):
    seg = tcp_seg(payload=os.urandom(plen), opts=TS_OPTS, flags=P.ACK | P.PSH | P.FIN)
    pkt = ipv4(seg)
    res = tso_split(pkt, gso)
    assert len(res) == 1
    buf, size = res[0]
    assert bytes(buf) == seg and size == len(seg)
    assert isinstance(buf, memoryview)  # slice, not a copy


def test_tso_passthrough_ignores_bytes_after_total_length():
    seg = tcp_seg(payload=b"abc")
    pkt = ipv4(seg) + b"garbage"
    (buf, size), = tso_split(bytes(pkt), 1448)
    assert bytes(buf) == seg and size == len(seg)


def test_tso_split_even():
    data = os.urandom(4000)
    seg = tcp_seg(seq=5000, payload=data)
    res = tso_split(ipv4(seg), 1000)
    assert len(res) == 1
    buf, size = res[0]
    assert size == 1020 and len(buf) == 4 * 1020
    segs = wire_segments(res)
    assert [seq_of(s) for s in segs] == [5000, 6000, 7000, 8000]
    assert b"".join(payload_of(s) for s in segs) == data
    for s in segs:
        assert s[:4] == seg[:4] and s[8:20] == seg[8:20]  # ports, ack, doff, flags, win, check, urg


def test_tso_split_odd_last_shorter():
    data = os.urandom(4001)
    res = tso_split(ipv4(tcp_seg(payload=data)), 1000)
    segs = wire_segments(res)
    assert [len(payload_of(s)) for s in segs] == [1000, 1000, 1000, 1000, 1]
    assert len(res[0][0]) == 4 * 1020 + 21
    assert b"".join(payload_of(s) for s in segs) == data


def test_tso_sequence_wrap():
    data = os.urandom(5000)
    seq0 = 2**32 - 1500
    segs = wire_segments(tso_split(ipv4(tcp_seg(seq=seq0, payload=data)), 1000))
    assert [seq_of(s) for s in segs] == [seq0, seq0 + 1000, (seq0 + 2000) & MASK32,
                                         (seq0 + 3000) & MASK32, (seq0 + 4000) & MASK32]
    assert seq_of(segs[2]) == 500


def test_tso_sequence_wrap_across_batches():
    data = os.urandom(100 * 150)
    seq0 = 2**32 - 7000
    segs = wire_segments(tso_split(ipv4(tcp_seg(seq=seq0, payload=data)), 100))
    assert [seq_of(s) for s in segs] == [(seq0 + 100 * i) & MASK32 for i in range(150)]


def test_tso_flags():
    flags = P.ACK | P.PSH | P.FIN | P.CWR | P.ECE
    segs = wire_segments(tso_split(ipv4(tcp_seg(payload=os.urandom(3500), flags=flags)), 1000))
    got = [s[13] for s in segs]
    assert got[0] == P.ACK | P.CWR | P.ECE
    assert got[1] == got[2] == P.ACK | P.ECE
    assert got[3] == P.ACK | P.PSH | P.FIN | P.ECE


def test_tso_flags_across_batches():
    flags = P.ACK | P.PSH | P.FIN | P.CWR
    packet = ipv4(tcp_seg(payload=os.urandom(100 * 130 + 7), flags=flags))
    segs = wire_segments(tso_split(packet, 100))
    assert len(segs) == 131
    assert segs[0][13] == P.ACK | P.CWR
    assert all(s[13] == P.ACK for s in segs[1:-1])
    assert segs[-1][13] == P.ACK | P.PSH | P.FIN


def test_tso_options_copied():
    opts = TS_OPTS + bytes([1, 1, 4, 2])  # + NOP NOP SACK-permitted
    seg = tcp_seg(payload=os.urandom(3000), opts=opts)
    segs = wire_segments(tso_split(ipv4(seg), 1448))
    assert len(segs) == 3
    for s in segs:
        assert doff_of(s) == 20 + len(opts)
        assert s[20:20 + len(opts)] == opts


def test_tso_segment_count_limit():
    data = os.urandom(100 * 150)
    res = tso_split(ipv4(tcp_seg(payload=data)), 100)
    assert [len(b) for b, _ in res] == [64 * 120, 64 * 120, 22 * 120]
    assert all(size == 120 for _, size in res)
    assert b"".join(payload_of(s) for s in wire_segments(res)) == data


def test_tso_byte_limit_64k():
    # the biggest super-packet the tun can hand us, MSS 1448 with timestamps
    plen = 65535 - 20 - 32
    data = os.urandom(plen)
    res = tso_split(ipv4(tcp_seg(payload=data, opts=TS_OPTS)), 1448)
    assert all(size == 1480 for _, size in res)
    assert [len(b) for b, _ in res] == [44 * 1480, 2 * 32 + plen - 44 * 1448]  # 2 segments left
    assert all(len(b) <= 65507 for b, _ in res)
    segs = wire_segments(res)
    assert len(segs) == 46
    assert b"".join(payload_of(s) for s in segs) == data


def test_tso_custom_limits():
    data = os.urandom(10000)
    res = tso_split(ipv4(tcp_seg(payload=data)), 1000, max_segments=3, max_bytes=2500)
    assert [len(b) for b, _ in res] == [2040] * 5
    res = tso_split(ipv4(tcp_seg(payload=data)), 1000, max_segments=3, max_bytes=100000)
    assert [len(b) for b, _ in res] == [3060, 3060, 3060, 1020]
    assert b"".join(payload_of(s) for s in wire_segments(res)) == data


def test_tso_segment_larger_than_max_bytes_raises():
    with pytest.raises(ValueError):
        tso_split(ipv4(tcp_seg(payload=os.urandom(3000))), 1000, max_bytes=500)


def test_tso_accepts_memoryview_and_bytes():
    seg = tcp_seg(payload=os.urandom(3000))
    pkt = ipv4(seg)
    a = wire_segments(tso_split(memoryview(pkt), 1000))
    b = wire_segments(tso_split(bytes(pkt), 1000))
    assert a == b and len(a) == 3


# ----------------------------------------------------------------------------- split_gro


def test_split_gro():
    buf = bytearray(os.urandom(5000))
    parts = split_gro(buf, 4500, 1000)
    assert [len(p) for p in parts] == [1000] * 4 + [500]
    assert all(isinstance(p, memoryview) for p in parts)
    assert b"".join(parts) == buf[:4500]
    assert [len(p) for p in split_gro(buf, 3000, 1000)] == [1000] * 3
    assert [bytes(p) for p in split_gro(buf, 700, 1000)] == [bytes(buf[:700])]
    assert [bytes(p) for p in split_gro(buf, 700, 0)] == [bytes(buf[:700])]
    assert split_gro(buf, 0, 1000) == []


# ----------------------------------------------------------------------------- coalesce


def test_coalesce_single_segment():
    seg = tcp_seg(payload=b"hello", flags=P.ACK | P.PSH, opts=TS_OPTS)
    ident = Ident(41)
    (out,) = coalesce([seg], SRC, DST, ident)
    assert vnet(out) == (NEEDS_CSUM, GSO_NONE, 20 + 32, 0, 20, 16)
    pkt = out[VNET_HDR_LEN:]
    assert len(pkt) == 20 + len(seg) == P.total_length(pkt)
    assert pkt[:2] == b"\x45\x00" and pkt[9] == P.IPPROTO_TCP
    assert bytes(pkt[12:16]) == SRC and bytes(pkt[16:20]) == DST
    assert struct.unpack_from("!H", pkt, 4)[0] == 42 and ident.calls == 1
    assert masked(pkt[20:]) == masked(seg)
    assert struct.unpack_from("!H", pkt, 36)[0] == P.pseudo_header_sum(SRC, DST, len(seg))
    (fin,) = kernel_write(out)
    assert P.tcp_checksum_ok(fin)
    assert masked(fin[20:]) == masked(seg)


def test_coalesce_empty():
    assert coalesce([], SRC, DST, Ident()) == []


def test_coalesce_merges_run():
    datas = [os.urandom(1448) for _ in range(9)] + [os.urandom(500)]
    segs, seq = [], 2**32 - 3000  # wraps inside the run
    for i, d in enumerate(datas):
        segs.append(tcp_seg(seq=seq, payload=d, opts=TS_OPTS,
                            flags=P.ACK | (P.PSH if i == len(datas) - 1 else 0),
                            check=i * 1111))
        seq = (seq + len(d)) & MASK32
    ident = Ident()
    (out,) = coalesce(segs, SRC, DST, ident)
    assert ident.calls == 1
    tcp_len = 32 + 9 * 1448 + 500
    assert vnet(out) == (NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16)
    pkt = out[VNET_HDR_LEN:]
    assert P.total_length(pkt) == len(pkt) == 20 + tcp_len
    assert pkt[20 + 13] == P.ACK | P.PSH
    assert struct.unpack_from("!H", pkt, 36)[0] == P.pseudo_header_sum(SRC, DST, tcp_len)
    assert bytes(pkt[20 + 32:]) == b"".join(datas)
    assert bytes(pkt[20:20 + 32][:16]) == segs[0][:13] + bytes([P.ACK | P.PSH]) + segs[0][14:16]
    # kernel re-segments it: the very same segments, each with a valid checksum
    finished = kernel_write(out)
    assert [masked(p[20:]) for p in finished] == [masked(s) for s in segs]
    assert all(P.tcp_checksum_ok(p) for p in finished)


def test_coalesce_no_psh_on_last():
    segs = [tcp_seg(seq=1000 + 100 * i, payload=bytes([i]) * 100) for i in range(3)]
    (out,) = coalesce(segs, SRC, DST, Ident())
    assert out[VNET_HDR_LEN + 20 + 13] == P.ACK
    assert resplit([out]) == [masked(s) for s in segs]


def test_coalesce_psh_ends_run():
    segs = [tcp_seg(seq=1000 + 100 * i, payload=os.urandom(100),
                    flags=P.ACK | (P.PSH if i == 1 else 0)) for i in range(4)]
    outs = coalesce(segs, SRC, DST, Ident())
    assert [vnet(o)[1] for o in outs] == [GSO_TCPV4, GSO_TCPV4]
    assert outs[0][VNET_HDR_LEN + 33] == P.ACK | P.PSH
    assert resplit(outs) == [masked(s) for s in segs]


def test_coalesce_interleaved_flows():
    a = [tcp_seg(seq=10 + 1000 * i, payload=os.urandom(1000), sport=1111) for i in range(4)]
    b = [tcp_seg(seq=99 + 500 * i, payload=os.urandom(500), sport=2222) for i in range(4)]
    mixed = [s for pair in zip(a, b, strict=False) for s in pair]
    outs = coalesce(mixed, SRC, DST, Ident())
    assert len(outs) == 2
    assert [vnet(o)[:4] for o in outs] == [(NEEDS_CSUM, GSO_TCPV4, 40, 1000),
                                          (NEEDS_CSUM, GSO_TCPV4, 40, 500)]
    assert resplit(outs) == [masked(s) for s in a + b]


def test_coalesce_same_ports_different_direction_not_merged():
    a = tcp_seg(seq=0, payload=b"x" * 100, sport=1, dport=2)
    b = tcp_seg(seq=100, payload=b"y" * 100, sport=2, dport=1)
    outs = coalesce([a, b], SRC, DST, Ident())
    assert [vnet(o)[1] for o in outs] == [GSO_NONE, GSO_NONE]


def test_coalesce_out_of_order_breaks_run():
    s = [tcp_seg(seq=1000 * i, payload=os.urandom(1000)) for i in range(5)]
    order = [s[0], s[1], s[3], s[2], s[4]]
    outs = coalesce(order, SRC, DST, Ident())
    # [s0 s1] merged; s3 alone (s2 does not follow it); s2 alone (s4 follows s3, not s2); s4 alone
    assert [vnet(o)[1] for o in outs] == [GSO_TCPV4, GSO_NONE, GSO_NONE, GSO_NONE]
    assert resplit(outs) == [masked(x) for x in order]


def test_coalesce_retransmission_not_merged():
    s = [tcp_seg(seq=1000 * i, payload=os.urandom(1000)) for i in range(3)]
    order = [s[0], s[1], s[1], s[2]]
    outs = coalesce(order, SRC, DST, Ident())
    assert [vnet(o)[1] for o in outs] == [GSO_TCPV4, GSO_TCPV4]
    assert resplit(outs) == [masked(x) for x in order]


def test_coalesce_different_sizes():
    def run(sizes):
        segs, seq = [], 0
        for n in sizes:
            segs.append(tcp_seg(seq=seq, payload=os.urandom(n)))
            seq += n
        outs = coalesce(segs, SRC, DST, Ident())
        assert resplit(outs) == [masked(x) for x in segs]
        return [(vnet(o)[1], vnet(o)[3]) for o in outs]

    # bigger after smaller: no merge
    assert run([1000, 1448]) == [(GSO_NONE, 0), (GSO_NONE, 0)]
    # shorter one ends the run
    assert run([1448, 1000, 1448]) == [(GSO_TCPV4, 1448), (GSO_NONE, 0)]
    assert run([1448, 1448, 1000, 1000, 1000]) == [(GSO_TCPV4, 1448), (GSO_TCPV4, 1000)]
    assert run([1448] * 3) == [(GSO_TCPV4, 1448)]


@pytest.mark.parametrize("flag", [P.SYN, P.FIN, P.RST, P.URG, P.CWR, P.ECE])
def test_coalesce_special_flags_not_merged(flag):
    segs = [tcp_seg(seq=100 * i, payload=os.urandom(100), flags=P.ACK | (flag if i == 2 else 0))
            for i in range(5)]
    outs = coalesce(segs, SRC, DST, Ident())
    kinds = [(vnet(o)[1], len(resplit([o]))) for o in outs]
    # [0 1] merged, 2 alone, [3 4] merged
    assert kinds == [(GSO_TCPV4, 2), (GSO_NONE, 1), (GSO_TCPV4, 2)]
    assert resplit(outs) == [masked(x) for x in segs]


def test_coalesce_syn_without_ack_and_first_flagged():
    segs = [tcp_seg(seq=0, flags=P.SYN), tcp_seg(seq=1, payload=b"a" * 10, flags=P.ACK | P.FIN),
            tcp_seg(seq=11, payload=b"b" * 10, flags=P.ACK)]
    outs = coalesce(segs, SRC, DST, Ident())
    assert [vnet(o)[1] for o in outs] == [GSO_NONE] * 3
    assert resplit(outs) == [masked(x) for x in segs]


def test_coalesce_zero_length_acks_not_merged():
    acks = [tcp_seg(seq=5, ack=1000 * i) for i in range(3)]
    outs = coalesce(acks, SRC, DST, Ident())
    assert [vnet(o)[1] for o in outs] == [GSO_NONE] * 3
    acks = [tcp_seg(seq=5, ack=1000) for i in range(3)]  # identical ones too
    assert [vnet(o)[1] for o in coalesce(acks, SRC, DST, Ident())] == [GSO_NONE] * 3
    # a pure ACK between data segments of the flow ends the run
    d = [tcp_seg(seq=100 * i, payload=os.urandom(100)) for i in range(4)]
    order = [d[0], d[1], tcp_seg(seq=200), d[2], d[3]]
    outs = coalesce(order, SRC, DST, Ident())
    assert [vnet(o)[1] for o in outs] == [GSO_TCPV4, GSO_NONE, GSO_TCPV4]
    assert resplit(outs) == [masked(x) for x in order]


@pytest.mark.parametrize("field", ["ack", "win", "opts", "urg", "dport"])
def test_coalesce_header_difference_not_merged(field):
    base = dict(payload=os.urandom(100), opts=TS_OPTS)
    a = tcp_seg(seq=0, **base)
    other = {"ack": dict(ack=778), "win": dict(win=503), "urg": dict(urg=1),
             "opts": dict(opts=TS_OPTS[:4] + struct.pack("!II", 123457, 654321)),
             "dport": dict(dport=5202)}[field]
    b = tcp_seg(seq=100, **{**base, **other})
    outs = coalesce([a, b], SRC, DST, Ident())
    assert [vnet(o)[1] for o in outs] == [GSO_NONE, GSO_NONE]
    # but the same difference in the check field is irrelevant
    b2 = tcp_seg(seq=100, **base, check=1)
    assert [vnet(o)[1] for o in coalesce([a, b2], SRC, DST, Ident())] == [GSO_TCPV4]


def test_coalesce_different_option_length_not_merged():
    a = tcp_seg(seq=0, payload=os.urandom(100), opts=TS_OPTS)
    b = tcp_seg(seq=100, payload=os.urandom(100), opts=TS_OPTS + b"\1\1\1\1")
    assert [vnet(o)[1] for o in coalesce([a, b], SRC, DST, Ident())] == [GSO_NONE, GSO_NONE]


def test_coalesce_65535_limit():
    n = 47
    segs = [tcp_seg(seq=1448 * i, payload=os.urandom(1448)) for i in range(n)]
    outs = coalesce(segs, SRC, DST, Ident())
    max_segs = (65535 - 40) // 1448  # 45
    assert max_segs == 45
    assert [P.total_length(o[VNET_HDR_LEN:]) for o in outs] == [40 + 45 * 1448, 40 + 2 * 1448]
    assert all(len(o) - VNET_HDR_LEN <= 65535 for o in outs)
    assert resplit(outs) == [masked(x) for x in segs]


def test_coalesce_exactly_65535():
    # 20 + 20 + 43 * 1523 = 65529; + 6 bytes last = 65535
    segs = [tcp_seg(seq=1523 * i, payload=os.urandom(1523)) for i in range(43)]
    segs.append(tcp_seg(seq=1523 * 43, payload=b"123456"))
    (out,) = coalesce(segs, SRC, DST, Ident())
    assert len(out) - VNET_HDR_LEN == 65535 == P.total_length(out[VNET_HDR_LEN:])
    assert resplit([out]) == [masked(x) for x in segs]


def test_coalesce_from_gro_memoryviews():
    segs = [tcp_seg(seq=1000 * i, payload=os.urandom(1000), opts=TS_OPTS) for i in range(8)]
    segs[-1] = segs[-1][:-300]  # last datagram shorter
    glued = bytearray(b"".join(segs)) + bytearray(1000)  # receive buffer bigger than the data
    parts = split_gro(glued, sum(map(len, segs)), 1032)
    assert [bytes(p) for p in parts] == segs
    (out,) = coalesce(parts, SRC, DST, Ident())
    assert vnet(out)[1:4] == (GSO_TCPV4, 52, 1000)
    assert resplit([out]) == [masked(x) for x in segs]


def test_tso_then_coalesce_round_trip():
    data = os.urandom(65535 - 20 - 32)
    flags = P.ACK | P.PSH
    seg = tcp_seg(seq=2**32 - 20000, payload=data, opts=TS_OPTS, flags=flags)
    segs = wire_segments(tso_split(ipv4(seg), 1448))
    assert len(segs) == 46
    (out,) = coalesce(segs, SRC, DST, Ident())
    assert vnet(out) == (NEEDS_CSUM, GSO_TCPV4, 52, 1448, 20, 16)
    assert masked(out[VNET_HDR_LEN + 20:]) == masked(seg)
    finished = kernel_write(out)
    assert len(finished) == 46 and all(P.tcp_checksum_ok(p) for p in finished)


def test_ident_called_per_output():
    segs = [tcp_seg(seq=0, flags=P.SYN), tcp_seg(seq=1, payload=b"a" * 10),
            tcp_seg(seq=11, payload=b"b" * 10), tcp_seg(seq=21, flags=P.ACK | P.FIN)]
    ident = Ident(7)
    outs = coalesce(segs, SRC, DST, ident)
    assert ident.calls == len(outs) == 3
    assert [struct.unpack_from("!H", o, VNET_HDR_LEN + 4)[0] for o in outs] == [8, 9, 10]


# ----------------------------------------------------------------------------- hypothesis

FLAG_CHOICES = [P.ACK] * 6 + [P.ACK | P.PSH] * 2 + [P.SYN, P.SYN | P.ACK, P.ACK | P.FIN, P.RST,
                                                     P.ACK | P.URG, P.ACK | P.CWR, P.ACK | P.ECE]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plen=st.integers(0, 20000), gso=st.integers(0, 3000), seq=st.integers(0, MASK32),
       nopts=st.integers(0, 10), flags=st.integers(0, 255), max_segments=st.integers(1, 70),
       extra=st.integers(0, 70000), data=st.data())
def test_hypothesis_tso_split(plen, gso, seq, nopts, flags, max_segments, extra, data):
    opts = bytes(range(nopts * 4))
    payload = data.draw(st.binary(min_size=plen, max_size=plen)) if plen < 64 else os.urandom(plen)
    seg = tcp_seg(seq=seq, payload=payload, flags=flags, opts=opts)
    doff = 20 + len(opts)
    max_bytes = doff + gso + extra
    res = tso_split(ipv4(seg), gso, max_segments=max_segments, max_bytes=max_bytes)
    segs = wire_segments(res)
    assert b"".join(payload_of(s) for s in segs) == payload
    if gso == 0 or plen <= gso:
        assert segs == [seg]
        return
    assert len(segs) == -(-plen // gso)
    for buf, size in res:
        assert size == doff + gso
        assert len(buf) <= max_bytes and -(-len(buf) // size) <= max_segments
    off = 0
    for i, s in enumerate(segs):
        assert s[:4] == seg[:4] and s[8:13] == seg[8:13] and s[14:doff] == seg[14:doff]
        assert seq_of(s) == (seq + off) & MASK32
        off += len(s) - doff
        want = flags
        if i != 0:
            want &= ~P.CWR
        if i != len(segs) - 1:
            want &= ~(P.FIN | P.PSH)
        assert s[13] == want


@st.composite
def segment_streams(draw):
    nflows = draw(st.integers(1, 3))
    sizes = draw(st.sampled_from([[1, 2, 3], [100], [100, 50], [1448, 1000], [5000]]))
    state = {f: draw(st.integers(0, MASK32)) for f in range(nflows)}
    segs = []
    for _ in range(draw(st.integers(0, 40))):
        f = draw(st.integers(0, nflows - 1))
        flags = draw(st.sampled_from(FLAG_CHOICES))
        n = draw(st.sampled_from(sizes + [0]))
        seq = state[f] if draw(st.integers(0, 9)) else draw(st.integers(0, MASK32))
        opts = TS_OPTS if draw(st.integers(0, 9)) else b""
        ack = 1 if draw(st.integers(0, 9)) else 2
        seg = tcp_seg(seq=seq, payload=os.urandom(n), flags=flags, sport=1000 + f, opts=opts,
                      ack=ack, check=draw(st.integers(0, 0xFFFF)))
        state[f] = (seq + n) & MASK32
        segs.append(seg)
    as_view = draw(st.booleans())
    return [memoryview(s) for s in segs] if as_view else segs


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segs=segment_streams())
def test_hypothesis_coalesce(segs):
    ident = Ident()
    outs = coalesce(segs, SRC, DST, ident)
    assert ident.calls == len(outs) <= len(segs)
    for o in outs:
        assert len(o) - VNET_HDR_LEN <= 65535
    back = resplit(outs)  # also checks headers and checksums of every output
    assert by_flow(back) == by_flow(masked(s) for s in segs)
    assert len(back) == len(segs)


# ----------------------------------------------------------------------------- fast-path edges


def test_coalesce_same_length_different_header_length_not_merged():
    a = tcp_seg(seq=0, payload=os.urandom(100), opts=TS_OPTS)       # 132 bytes
    b = tcp_seg(seq=100, payload=os.urandom(100), opts=TS_OPTS)     # 132 bytes, merges
    c = tcp_seg(seq=200, payload=os.urandom(112))                   # 132 bytes, doff 20
    outs = coalesce([a, b, c], SRC, DST, Ident())
    assert [vnet(o)[1] for o in outs] == [GSO_TCPV4, GSO_NONE]
    assert resplit(outs) == [masked(x) for x in (a, b, c)]


def test_coalesce_limit_reached_by_full_segments():
    # 20 + 20 + 5 * 13099 == 65535: the sixth full segment starts a new packet
    segs = [tcp_seg(seq=13099 * i, payload=os.urandom(13099)) for i in range(7)]
    outs = coalesce(segs, SRC, DST, Ident())
    assert [len(o) - VNET_HDR_LEN for o in outs] == [65535, 40 + 2 * 13099]
    assert [vnet(o)[3] for o in outs] == [13099, 13099]
    assert resplit(outs) == [masked(x) for x in segs]


def test_coalesce_flow_switching_keeps_run_state():
    a = [tcp_seg(seq=1000 * i, payload=os.urandom(1000), sport=1) for i in range(6)]
    b = [tcp_seg(seq=7 + 1000 * i, payload=os.urandom(1000), sport=2) for i in range(6)]
    ack_c = tcp_seg(seq=1, sport=3)
    order = a[:2] + b[:3] + [ack_c] + a[2:5] + b[3:] + [a[5]]
    outs = coalesce(order, SRC, DST, Ident())
    assert [(vnet(o)[1], len(resplit([o]))) for o in outs] == [(GSO_TCPV4, 6), (GSO_TCPV4, 6),
                                                              (GSO_NONE, 1)]
    assert by_flow(resplit(outs)) == by_flow(masked(x) for x in order)


def test_coalesce_wraps_sequence_in_fast_path():
    segs = [tcp_seg(seq=(2**32 - 2500 + 1000 * i) & MASK32, payload=os.urandom(1000))
            for i in range(6)]
    (out,) = coalesce(segs, SRC, DST, Ident())
    assert resplit([out]) == [masked(x) for x in segs]


def test_coalesce_address_pairs():
    seg = tcp_seg(payload=b"abc")
    for src, dst in [(SRC, DST), (DST, SRC), (b"\xc0\xa8\x01\x02", b"\x08\x08\x08\x08"),
                     (SRC, DST), (b"\xff\xff\xff\xff", b"\0\0\0\0")]:
        (out,) = coalesce([seg], src, dst, Ident())
        pkt = out[VNET_HDR_LEN:]
        assert bytes(pkt[12:16]) == src and bytes(pkt[16:20]) == dst
        assert struct.unpack_from("!H", pkt, 36)[0] == P.pseudo_header_sum(src, dst, len(seg))
        (fin,) = kernel_write(out)
        assert P.tcp_checksum_ok(fin)


def test_wire_size_counts_what_coalesce_merged():
    segs = [tcp_seg(seq=1000 + i * 1448, payload=bytes([i]) * 1448, opts=TS_OPTS) for i in range(5)]
    segs.append(tcp_seg(seq=1000 + 5 * 1448, payload=b"z" * 100, opts=TS_OPTS))
    single = tcp_seg(seq=5, payload=b"x", flags=P.ACK | P.SYN)
    outs = coalesce(segs + [single], SRC, DST, iter(range(1, 100)).__next__)
    assert [wire_size(o) for o in outs] == [(6, sum(map(len, segs))), (1, len(single))]


# ----------------------------------------------------------------------------- IPv6

SRC6 = bytes.fromhex("fd00009800000000000000000000000a")
DST6 = bytes.fromhex("fd0000980000000000000000000000ff")


def ipv6(seg, src=SRC6, dst=DST6) -> bytearray:
    return testkit.ip_packet(seg, src, dst)


def pseudo_sum6(src: bytes, dst: bytes, tcp_len: int) -> int:
    """The folded (not complemented) sum of the IPv6 pseudo-header, by the reference."""
    return ~testkit.internet_checksum(testkit.pseudo_header(src, dst, 6, tcp_len)) & 0xFFFF


def check_ipv6_packet(pkt, src, dst) -> None:
    """A complete IPv6 TCP packet as the tunnel must write it, checked by the reference."""
    first, plen, nh, hops = struct.unpack_from("!IHBB", pkt, 0)
    assert (first >> 28, first >> 20 & 0xFF, plen, nh, hops) == (6, 0, len(pkt) - 40, 6, 64)
    assert bytes(pkt[8:24]) == src and bytes(pkt[24:40]) == dst
    assert first & 0xFFFFF == P.flow_label(src, dst, pkt[40:44]) != 0
    assert P.classify_tx(bytes(pkt), ipv6=True) is None
    assert testkit.internet_checksum(testkit.pseudo_header(src, dst, 6, plen) + pkt[40:]) == 0


def kernel_write6(buf) -> list[bytearray]:
    """kernel_write for IPv6 buffers: a lone packet must come complete (full
    checksum, nothing asked of the kernel); a GSO_TCPV6 one is cut the way
    tcp_gso_segment does and its checksums finished from the partial sum."""
    flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(buf, 0)
    pkt = bytearray(buf[VNET_HDR_LEN:])
    assert P.classify_tx(pkt, ipv6=True) is None and P.packet_length(pkt) == len(pkt)
    src, dst = bytes(pkt[8:24]), bytes(pkt[24:40])
    assert hdr_len == 40 + doff_of(pkt[40:])
    if gso_type == GSO_NONE:
        assert (flags, gso_size, csum_start, csum_offset) == (0, 0, 0, 0)
        check_ipv6_packet(pkt, src, dst)
        return [pkt]
    assert (flags, gso_type, csum_start, csum_offset) == (NEEDS_CSUM, GSO_TCPV6, 40, 16)
    tcp_len = len(pkt) - 40
    assert 0 < gso_size < tcp_len - doff_of(pkt[40:])
    stored = struct.unpack_from("!H", pkt, 56)[0]
    assert stored == pseudo_sum6(src, dst, tcp_len)
    label = int.from_bytes(pkt[1:4], "big") & 0xFFFFF
    out = []
    for seg in wire_segments(tso_split(pkt, gso_size, max_segments=1 << 30, max_bytes=1 << 30)):
        seg = bytearray(seg)
        adj = ones_add(ones_add(stored, ~tcp_len & 0xFFFF), len(seg))
        assert adj == pseudo_sum6(src, dst, len(seg))
        struct.pack_into("!H", seg, 16, adj)
        struct.pack_into("!H", seg, 16, P.checksum(seg))  # finish: sum from csum_start
        p = testkit.ip_packet(seg, src, dst, flow=label)
        check_ipv6_packet(p, src, dst)
        out.append(p)
    return out


def resplit6(bufs) -> list[bytes]:
    segs = []
    for b in bufs:
        segs.extend(masked(p[40:]) for p in kernel_write6(b))
    return segs


def test_gso_tcpv6_constant():
    assert GSO_TCPV6 == 4  # VIRTIO_NET_HDR_GSO_TCPV6


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(plen=st.integers(0, 20000), gso=st.integers(0, 3000), seq=st.integers(0, MASK32),
       nopts=st.integers(0, 10), flags=st.integers(0, 255), max_segments=st.integers(1, 70),
       extra=st.integers(0, 70000), tiu=st.booleans(), trailing=st.integers(0, 9))
def test_tso_split_ipv6_cuts_the_same_wire_segments(plen, gso, seq, nopts, flags, max_segments,
                                                    extra, tiu, trailing):
    """A wire segment is a bare TCP segment: an IPv6 super-packet gives exactly
    the batches its IPv4 twin gives (bytes after the payload length ignored)."""
    opts = bytes(range(nopts * 4))
    seg = tcp_seg(seq=seq, payload=os.urandom(plen), flags=flags, opts=opts)
    kw = dict(max_segments=max_segments, max_bytes=20 + len(opts) + gso + extra, tiu=tiu)
    v4 = [(bytes(b), n) for b, n in tso_split(ipv4(seg), gso, **kw)]
    v6 = [(bytes(b), n) for b, n in tso_split(ipv6(seg) + bytes(trailing), gso, **kw)]
    assert v6 == v4


def test_tso_then_coalesce_round_trip_ipv6():
    data = os.urandom(65535 - 40 - 32)  # the largest IPv6 packet coalesce makes
    seg = tcp_seg(seq=2**32 - 20000, payload=data, opts=TS_OPTS, flags=P.ACK | P.PSH)
    segs = wire_segments(tso_split(ipv6(seg), 1428))
    ident = Ident()
    (out,) = coalesce(segs, SRC6, DST6, ident)
    assert ident.calls == 0  # IPv6 has no ID
    assert vnet(out) == (NEEDS_CSUM, GSO_TCPV6, 72, 1428, 40, 16)
    assert len(out) == VNET_HDR_LEN + 65535
    assert masked(out[VNET_HDR_LEN + 40:]) == masked(seg)
    finished = kernel_write6(out)
    assert len(finished) == len(segs) and all(P.tcp_checksum_ok(p) for p in finished)
    assert [masked(p[40:]) for p in finished] == [masked(s) for s in segs]
    assert wire_size(out) == (len(segs), sum(map(len, segs)))


def test_coalesce_ipv6_limit_is_65535_ip_bytes():
    # 40 + 20 + 5 * 13095 == 65535: the sixth full segment starts a new packet
    segs = [tcp_seg(seq=13095 * i, payload=os.urandom(13095)) for i in range(7)]
    outs = coalesce(segs, SRC6, DST6, Ident())
    assert [len(o) - VNET_HDR_LEN for o in outs] == [65535, 60 + 2 * 13095]
    assert resplit6(outs) == [masked(x) for x in segs]


def test_coalesce_ipv6_single_segments_are_complete():
    seg = tcp_seg(seq=5, payload=b"odd!!", flags=P.ACK | P.SYN, check=0x1234)
    (out,) = coalesce([seg], SRC6, DST6, Ident())
    assert vnet(out) == (0, GSO_NONE, 60, 0, 0, 0)
    check_ipv6_packet(out[VNET_HDR_LEN:], SRC6, DST6)
    assert masked(out[VNET_HDR_LEN + 40:]) == masked(seg)
    # the same bytes as the plain (no offload) path writes
    plain = bytearray(40) + seg
    P.build_rx_packet(plain, len(seg), 0, SRC6, DST6)
    assert out[VNET_HDR_LEN:] == plain
    # alone among others, too
    ack = tcp_seg(seq=9, sport=1)
    outs = coalesce([seg, ack], SRC6, DST6, Ident())
    assert [vnet(o)[:2] for o in outs] == [(0, GSO_NONE)] * 2
    assert resplit6(outs) == [masked(seg), masked(ack)]
    assert [wire_size(o) for o in outs] == [(1, len(seg)), (1, len(ack))]


def test_coalesce_ipv6_flow_label_is_the_flows():
    segs = [tcp_seg(seq=1000 * i, payload=os.urandom(1000), sport=7) for i in range(4)]
    alone = tcp_seg(seq=4000, sport=7, flags=P.ACK | P.FIN)
    outs = coalesce(segs + [alone], SRC6, DST6, Ident())
    labels = [int.from_bytes(o[VNET_HDR_LEN + 1:VNET_HDR_LEN + 4], "big") & 0xFFFFF
              for o in outs]
    assert len(outs) == 2 and labels[0] == labels[1] == P.flow_label(SRC6, DST6, segs[0])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(segs=segment_streams())
def test_hypothesis_coalesce_ipv6(segs):
    """The IPv4 property for IPv6: every segment comes back out of the kernel
    (emulated) in flow order, every packet checked by the reference; the
    merging is the same as for IPv4 but for the larger header's room."""
    ident = Ident()
    outs = coalesce(segs, SRC6, DST6, ident)
    assert ident.calls == 0
    for o in outs:
        assert len(o) - VNET_HDR_LEN <= 65535
    back = resplit6(outs)
    assert by_flow(back) == by_flow(masked(s) for s in segs)
    assert len(back) == len(segs)
    v4 = coalesce(segs, SRC, DST, Ident())
    if all(len(o) - VNET_HDR_LEN <= 65535 - 20 for o in v4):  # no run near the limit
        assert [wire_size(o) for o in outs] == [wire_size(o) for o in v4]
