import struct

import pytest
from hypothesis import given, settings, strategies as st

import testkit
from testkit import internet_checksum as reference_checksum
from udp_encap_tun import packet as pk


def test_checksum_rfc1071_example():
    # RFC 1071 section 3: words 0001 f203 f4f5 f6f7 sum to ddf2
    assert pk.ones_sum(bytes.fromhex("0001f203f4f5f6f7")) == 0xDDF2
    assert pk.checksum(bytes.fromhex("0001f203f4f5f6f7")) == 0x220D


def test_known_ipv4_header_checksum():
    # a widely used textbook header: 4500 0073 0000 4000 4011 b861 c0a8 0001 c0a8 00c7
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    assert pk.checksum(hdr) == 0xB861


@pytest.mark.parametrize("data", [b"", b"\x00", b"\xff\xff", b"\xff\xff" * 7, b"\x12",
                                  b"\x00\x00\x00"])
def test_checksum_edge_cases(data):
    assert pk.checksum(data) == reference_checksum(data)


@given(st.binary(max_size=3000), st.integers(0, 0xFFFF))
def test_checksum_matches_reference(data, initial):
    assert pk.checksum(data, initial) == reference_checksum(data, initial)


def tcp_segment(payload=b"hello", flags=pk.ACK | pk.PSH, doff=None, options=b""):
    return testkit.tcp_segment(payload, seq=1000, ack=2000, flags=flags, window=65535,
                               options=options, doff=doff, checksum=0xBEEF)


def ipv4(segment, **quirks):
    return bytes(testkit.ip_packet(segment, bytes([10, 0, 0, 2]), bytes([192, 0, 2, 2]),
                                   checksum=0, **quirks))


def test_classify_tx_accepts_tcp():
    assert pk.classify_tx(ipv4(tcp_segment())) is None


@pytest.mark.parametrize("packet,reason", [
    (b"", pk.TX_NOT_IPV4),
    (b"\x45" * 10, pk.TX_NOT_IPV4),
    (ipv4(tcp_segment(), version=6), pk.TX_NOT_IPV4),
    (ipv4(tcp_segment(), options=bytes(4)), pk.TX_IP_OPTIONS),
    (ipv4(tcp_segment(), proto=17), pk.TX_NOT_TCP),
    (ipv4(tcp_segment(), frag=0x2000), pk.TX_FRAGMENT),  # MF
    (ipv4(tcp_segment(), frag=0x0010), pk.TX_FRAGMENT),  # offset
    (ipv4(tcp_segment(), total=200), pk.TX_TRUNCATED),
    (ipv4(tcp_segment()[:10]), pk.TX_TRUNCATED),
    (ipv4(tcp_segment(doff=4)), pk.TX_BAD_TCP_HEADER),
    (ipv4(tcp_segment(payload=b"", doff=6)), pk.TX_BAD_TCP_HEADER),
])
def test_classify_tx_drops(packet, reason):
    assert pk.classify_tx(packet) == reason


def test_classify_tx_ignores_trailing_bytes():
    pkt = ipv4(tcp_segment()) + b"junk"
    assert pk.classify_tx(pkt) is None
    assert pk.total_length(pkt) == len(pkt) - 4


def _ipv4_acceptable(p: bytes) -> bool:
    """The rules classify_tx applies to IPv4, spelled out one by one."""
    if len(p) < 20 or p[0] != 0x45 or p[9] != 6:
        return False
    total = int.from_bytes(p[2:4], "big")
    if not 40 <= total <= len(p) or int.from_bytes(p[6:8], "big") & 0x3FFF:
        return False
    return 20 <= (p[32] >> 4) * 4 <= total - 20


@given(st.sampled_from([0x45, 0x46, 0x44, 0x55, 0x65]) | st.integers(0, 255),
       st.integers(-25, 3) | st.integers(0, 0xFFFF),
       st.sampled_from([0, 0x4000, 0x2000, 0x0001, 0x4100]) | st.integers(0, 0xFFFF),
       st.sampled_from([6, 17]) | st.integers(0, 255), st.integers(0, 15), st.integers(0, 80),
       st.integers(0, 40))
def test_classify_tx_accepts_exactly_the_good_ipv4_packets(first, total, frag, proto, doff,
                                                           payload, trailing):
    """The one expression (plain_ipv4_tcp) and the checks that name a reason
    agree with the rules, field by field (*total*: off the true length by
    that much, or any value)."""
    seg = bytearray(tcp_segment(bytes(payload)))
    seg[12] = doff << 4
    pkt = bytearray(testkit.ip_packet(bytes(seg), bytes(4), bytes(4))) + bytes(trailing)
    pkt[0], pkt[9] = first, proto
    if total <= 3:
        total = max(0, 20 + len(seg) + total)
    pkt[2:4] = total.to_bytes(2, "big")
    pkt[6:8] = frag.to_bytes(2, "big")
    acceptable = _ipv4_acceptable(bytes(pkt))
    assert (pk.classify_tx(bytes(pkt)) is None) == acceptable
    # the one expression alone (fastpath.FastPath's test) says the same, with the length
    assert pk.plain_ipv4_tcp(pkt, len(pkt)) == (total if acceptable else 0)


@pytest.mark.parametrize("segment,reason", [
    (b"", pk.RX_TOO_SHORT),
    (b"\x00" * 19, pk.RX_TOO_SHORT),
    (tcp_segment(doff=4), pk.RX_BAD_DATA_OFFSET),
    (tcp_segment(payload=b"", doff=15), pk.RX_BAD_DATA_OFFSET),
    (tcp_segment(payload=b"x" * 65500), pk.RX_TOO_LONG),
    (tcp_segment(), None),
    (tcp_segment(payload=b"", options=b"\x01" * 40, doff=15), None),
])
def test_classify_rx(segment, reason):
    assert pk.classify_rx(segment) == reason


@given(st.binary(max_size=200))
def test_classify_never_raises(data):
    pk.classify_rx(data)
    pk.classify_tx(data)


def test_build_rx_packet_makes_valid_ipv4_and_tcp():
    seg = tcp_segment(b"payload!" * 100 + b"odd")
    buf = bytearray(20 + len(seg))
    buf[20:] = seg
    src, dst = bytes([10, 0, 0, 7]), bytes([10, 0, 0, 1])
    pk.build_rx_packet(buf, len(seg), 0x1234, src, dst)
    ver_ihl, tos, total, ident, frag, ttl, proto, _, s, d = struct.unpack("!BBHHHBBH4s4s", buf[:20])
    assert (ver_ihl, total, ident, frag, ttl, proto, s, d) == (0x45, len(buf), 0x1234, 0x4000,
                                                                64, 6, src, dst)
    assert pk.checksum(bytes(buf[:20])) == 0
    assert pk.tcp_checksum_ok(bytes(buf))
    assert pk.classify_tx(bytes(buf)) is None  # what we write is what a TX would accept
    # only the checksum changed
    assert bytes(buf[20:36]) == seg[:16] and bytes(buf[38:]) == seg[18:]


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.binary(max_size=1500) | st.sampled_from([b"", b"\xff" * 6, b"\xff" * 7, bytes(9)]),
       st.integers(0, 0x1FFFF), st.integers(0, 12), st.booleans())
def test_build_rx_packet_checksums_verify_by_the_reference(src, dst, payload, ident, offset,
                                                           partial):
    """Header and TCP checksums (added up from cached per-address sums) check
    out with the slow reference, for any addresses, length, ID and offset;
    *partial* (the pseudo-header sum left for the kernel) once finished as
    the kernel does (NEEDS_CSUM)."""
    seg = tcp_segment(payload)
    buf = bytearray(offset + 20) + seg
    pk.build_rx_packet(buf, len(seg), ident, src, dst, offset, partial)
    if partial:
        assert struct.unpack_from("!H", buf, offset + 36)[0] % 0xFFFF == \
            pk.pseudo_header_sum(src, dst, len(seg)) % 0xFFFF
        testkit.finish_csum(buf, offset + 20, 16)
    packet = bytes(buf[offset:])
    assert reference_checksum(packet[:20]) == 0
    pseudo = src + dst + struct.pack("!HH", pk.IPPROTO_TCP, len(seg))
    assert reference_checksum(pseudo + packet[20:]) == 0
    assert struct.unpack_from("!H", packet, 4)[0] == ident & 0xFFFF


def test_build_rx_packet_overrides_any_incoming_checksum():
    seg = bytearray(tcp_segment(b"x" * 33))
    seg[16:18] = b"\x12\x34"  # whatever the sender's pseudo-header gave
    buf = bytearray(20) + seg
    pk.build_rx_packet(buf, len(seg), 1, bytes(4), bytes([255] * 4))
    assert pk.tcp_checksum_ok(bytes(buf))


def syn(options: bytes) -> bytearray:
    pad = (-len(options)) % 4
    return bytearray(tcp_segment(b"", flags=pk.SYN, options=options + b"\0" * pad))


@pytest.mark.parametrize("options,expected,changed", [
    (b"\x02\x04\x05\xb4", 1400, True),  # MSS 1460 -> 1400
    (b"\x02\x04\x05\x00", 1280, False),  # already smaller
    (b"\x01\x01\x04\x02\x02\x04\x05\xb4", 1400, True),  # after NOPs and SACK-permitted
    (b"\x08\x0a" + b"\0" * 8 + b"\x02\x04\x05\xb4", 1400, True),  # after a timestamp
])
def test_clamp_mss(options, expected, changed):
    seg = syn(options)
    assert pk.clamp_mss(seg, 1400) is changed
    i = bytes(seg).index(b"\x02\x04", 20)
    assert int.from_bytes(seg[i + 2:i + 4], "big") == expected


@pytest.mark.parametrize("options", [b"", b"\x00\x02\x04\x05\xb4", b"\x03", b"\x05\x00",
                                     b"\x05\x30\x01\x01"])
def test_clamp_mss_without_usable_option_changes_nothing(options):
    seg = syn(options)
    before = bytes(seg)
    assert pk.clamp_mss(seg, 1000) is False
    assert bytes(seg) == before


@given(st.binary(min_size=0, max_size=40))
def test_clamp_mss_never_raises(options):
    pk.clamp_mss(syn(options), 536)


def test_family_helpers_read_the_offsets_of_either_family():
    src4, dst4 = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    v4 = testkit.ip_packet(testkit.tcp_segment(b"abc"), src4, dst4)
    assert (pk.header_len(v4), pk.packet_length(v4)) == (20, 43)
    assert (pk.source(v4), pk.destination(v4)) == (src4, dst4)
    src6, dst6 = bytes(range(16)), bytes(range(16, 32))
    seg = testkit.tcp_segment(b"abcd")
    v6 = bytes([0x60, 0, 0, 0]) + len(seg).to_bytes(2, "big") + bytes([6, 64]) + src6 + dst6 + seg
    assert (pk.header_len(v6), pk.packet_length(v6)) == (40, 40 + len(seg))
    assert (pk.source(v6), pk.destination(v6)) == (src6, dst6)


# --------------------------------------------------------------------------- IPv6

SRC6 = bytes.fromhex("fd000000000000000000000000000002")
DST6 = bytes.fromhex("fd000000000000000000000000000001")


def ipv6(segment, **quirks):
    return bytes(testkit.ip_packet(segment, SRC6, DST6, **quirks))


def test_testkit_builds_ipv6_by_the_rfc():
    seg = testkit.tcp_segment(b"xyz", src=SRC6, dst=DST6)
    packet = ipv6(seg, flow=0x12345, tos=0xAB, ttl=7)
    assert packet[:8] == bytes.fromhex("6ab12345") + len(seg).to_bytes(2, "big") + bytes([6, 7])
    assert packet[8:24] == SRC6 and packet[24:40] == DST6 and packet[40:] == seg
    # RFC 8200 8.1: addresses, 32-bit upper-layer length, 3 zero bytes, next header
    assert testkit.pseudo_header(SRC6, DST6, 6, 0x10203) == SRC6 + DST6 + bytes.fromhex(
        "0001020300000006")
    assert reference_checksum(testkit.pseudo_header(SRC6, DST6, 6, len(seg)) + seg) == 0


def test_classify_tx_accepts_ipv6_tcp_only_when_asked():
    packet = ipv6(tcp_segment())
    assert pk.classify_tx(packet, ipv6=True) is None
    assert pk.classify_tx(packet) == pk.TX_NOT_IPV4  # IPv4-only callers: as before IPv6
    assert pk.classify_tx(packet + b"junk", ipv6=True) is None  # trailing bytes, as for IPv4
    assert pk.packet_length(packet + b"junk") == len(packet)
    options = tcp_segment(b"", options=b"\x01" * 40, doff=15)
    assert pk.classify_tx(ipv6(options), ipv6=True) is None


EXTENSIONS = [0, 43, 60, 51, 135, 139, 140, 253, 254]


@pytest.mark.parametrize("packet,reason", [
    (b"\x60", pk.TX_TRUNCATED),
    (ipv6(tcp_segment())[:39], pk.TX_TRUNCATED),
    (ipv6(tcp_segment(), total=200), pk.TX_TRUNCATED),  # payload length past the buffer
    (ipv6(tcp_segment()[:10]), pk.TX_TRUNCATED),
    (ipv6(b"", proto=6), pk.TX_TRUNCATED),
    (ipv6(tcp_segment(), proto=44), pk.TX_FRAGMENT),
    (ipv6(tcp_segment(), proto=58), pk.TX_NOT_TCP),  # ICMPv6
    (ipv6(tcp_segment(), proto=17), pk.TX_NOT_TCP),
    (ipv6(b"", proto=59), pk.TX_NOT_TCP),  # no next header
    (ipv6(tcp_segment(doff=4)), pk.TX_BAD_TCP_HEADER),
    (ipv6(tcp_segment(payload=b"", doff=6)), pk.TX_BAD_TCP_HEADER),
    (ipv6(tcp_segment(), version=5), pk.TX_NOT_IPV4),
    (ipv6(tcp_segment(), version=7), pk.TX_NOT_IPV4),
    *[(ipv6(tcp_segment(), proto=nh, options=bytes([6, 0]) + bytes(6)),
       pk.TX_IPV6_EXTENSION_HEADER) for nh in EXTENSIONS],
])
def test_classify_tx6_drops(packet, reason):
    assert pk.classify_tx(packet, ipv6=True) == reason


@pytest.mark.parametrize("packet", [
    ipv4(tcp_segment()), ipv4(tcp_segment(), options=bytes(4)), ipv4(tcp_segment(), proto=17),
    ipv4(tcp_segment(), total=200), ipv4(tcp_segment(doff=4)), b"\x45" * 10, b"",
])
def test_classify_tx_ipv4_is_the_same_with_ipv6_on(packet):
    assert pk.classify_tx(packet, ipv6=True) == pk.classify_tx(packet)


@settings(deadline=None)
@given(st.binary(max_size=120))
def test_classify_tx6_never_raises(data):
    for first in (b"", b"\x60"):
        reason = pk.classify_tx(first + data, ipv6=True)
        if reason is None:  # accepted: the segment is where the helpers say
            packet = first + data
            seg = packet[pk.header_len(packet):pk.packet_length(packet)]
            assert pk.classify_rx(seg) is None or len(seg) > pk.MAX_UDP_PAYLOAD


def test_build_rx_packet_makes_valid_ipv6_and_tcp():
    seg = tcp_segment(b"payload!" * 100 + b"odd")
    buf = bytearray(40) + seg
    pk.build_rx_packet(buf, len(seg), 0x1234, SRC6, DST6)  # dispatches on the address length
    first, plen, nh, hops, s, d = struct.unpack("!IHBB16s16s", buf[:40])
    assert (first >> 28, first >> 20 & 0xFF, plen, nh, hops, s, d) == (
        6, 0, len(seg), 6, 64, SRC6, DST6)
    assert 0 < first & 0xFFFFF == pk.flow_label(SRC6, DST6, seg[:4])
    assert pk.tcp_checksum_ok(bytes(buf))
    assert pk.classify_tx(bytes(buf), ipv6=True) is None  # what we write, a TX would accept
    assert bytes(buf[40:56]) == seg[:16] and bytes(buf[58:]) == seg[18:]
    again = bytearray(40) + seg
    pk.build_rx_packet6(again, len(seg), SRC6, DST6)
    assert again == buf


@settings(deadline=None)
@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
       st.binary(max_size=1500), st.integers(0, 12), st.integers(0, 0xFFFF))
def test_build_rx_packet6_checksum_verifies_by_the_reference(src, dst, payload, offset, port):
    seg = testkit.tcp_segment(payload, sport=port, checksum=0x4321)
    buf = bytearray(offset + 40) + seg
    pk.build_rx_packet6(buf, len(seg), src, dst, offset)
    packet = bytes(buf[offset:])
    assert reference_checksum(testkit.pseudo_header(src, dst, 6, len(seg)) + packet[40:]) == 0
    assert pk.tcp_checksum_ok(packet)
    assert packet[0] >> 4 == 6 and 0 < pk.flow_label(src, dst, seg) <= 0xFFFFF
    assert int.from_bytes(packet[1:4], "big") & 0xFFFFF == pk.flow_label(src, dst, seg)


def test_flow_label_is_per_flow():
    seg = testkit.tcp_segment(sport=1000, dport=2000)
    label = pk.flow_label(SRC6, DST6, seg)
    assert label == pk.flow_label(SRC6, DST6, bytes(seg[:4]) + b"other")  # only the ports count
    others = {pk.flow_label(SRC6, DST6, testkit.tcp_segment(sport=p, dport=2000))
              for p in range(1001, 1065)} | {pk.flow_label(DST6, SRC6, seg)}
    assert label not in others and len(others) > 60  # 20 bits: collisions are rare


def test_tcp_checksum_ok_detects_a_bad_ipv6_checksum():
    seg = testkit.tcp_segment(b"data", src=SRC6, dst=DST6)
    assert pk.tcp_checksum_ok(ipv6(seg))
    assert not pk.tcp_checksum_ok(ipv6(seg[:-1] + b"e"))
    v4seg = testkit.tcp_segment(b"data", src=SRC6[:4], dst=DST6[:4])  # same sum, other family
    assert not pk.tcp_checksum_ok(ipv6(v4seg))


def test_mss_and_header_length_per_family():
    assert pk.mss_for_mtu(1400) == 1360 and pk.mss_for_mtu(1400, ipv6=True) == 1340
    assert pk.address_header_len(SRC6) == 40 and pk.address_header_len(SRC6[:4]) == 20
