"""TCP-in-UDP codec (udp_encap_tun.tiu) against real traffic of the eBPF
implementation (/work/shared/tcp-in-udp, see its README) and by properties."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from testkit import tcp_segment
from udp_encap_tun import packet as P, tiu

CAPTURES = Path(__file__).resolve().parents[1] / ".." / "shared" / "tcp-in-udp"
if not (CAPTURES / "wire.pcap").exists():  # the worktree sits two levels below /work
    CAPTURES = Path("/work/shared/tcp-in-udp")
LINKTYPE_ETHERNET, LINKTYPE_NFLOG = 1, 239
NFULA_PAYLOAD = 9


def read_pcap(path: Path) -> tuple[int, list[bytes]]:
    """(link type, packets) of a little- or big-endian microsecond pcap file."""
    data = path.read_bytes()
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">"}[magic]
    linktype = struct.unpack_from(endian + "I", data, 20)[0]
    packets, off = [], 24
    while off + 16 <= len(data):
        incl = struct.unpack_from(endian + "I", data, off + 8)[0]
        packets.append(data[off + 16:off + 16 + incl])
        off += 16 + incl
    assert off == len(data), f"{path}: trailing bytes"
    return linktype, packets


def nflog_payload(record: bytes) -> bytes:
    """The packet inside an NFLOG record: a 4-byte header (family, version,
    resource id), then TLVs (length and type in host order = little-endian
    here, value, padding to 4 bytes); the payload is type 9."""
    off = 4
    while off + 4 <= len(record):
        length, kind = struct.unpack_from("<HH", record, off)
        assert length >= 4, record.hex()
        if kind & 0x7FFF == NFULA_PAYLOAD:
            return record[off + 4:off + length]
        off += (length + 3) & ~3
    raise AssertionError("NFLOG record without a payload")


def wire_packets() -> list[bytes]:
    linktype, frames = read_pcap(CAPTURES / "wire.pcap")
    assert linktype == LINKTYPE_ETHERNET
    packets = []
    for frame in frames:
        assert frame[12:14] == b"\x08\x00"  # IPv4, no VLAN tag
        ip = frame[14:]
        packets.append(ip[:(ip[2] << 8) | ip[3]])  # without Ethernet padding
    return packets


def tcp_packets(name: str) -> list[bytes]:
    linktype, records = read_pcap(CAPTURES / f"{name}.pcap")
    assert linktype == LINKTYPE_NFLOG
    return [nflog_payload(r) for r in records]


needs_captures = pytest.mark.skipif(not (CAPTURES / "wire.pcap").exists(),
                                    reason="the shared TCP-in-UDP captures are not here")


def ip_fields(packet) -> tuple:
    """What the mapping keeps of an IPv4 header: length, ID, flags/fragment,
    addresses (TTL is compared separately: the -in captures are taken after
    the router forwarded, one hop later)."""
    return packet[2:4], packet[4:6], packet[6:8], packet[12:20]


def udp_checksum_ok(packet) -> bool:
    """A full UDP checksum check of an IPv4 UDP packet (pseudo-header included)."""
    total = (packet[2] << 8) | packet[3]
    udp = packet[20:total]
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 17, len(udp))
    return P.ones_sum(pseudo + udp) == 0xFFFF


@needs_captures
def test_every_datagram_decodes_to_its_captured_segment():
    wire = wire_packets()
    out = {name: tcp_packets(f"{name}-tcp-out") for name in ("client", "server")}
    inn = {name: tcp_packets(f"{name}-tcp-in") for name in ("client", "server")}
    assert len(wire) == len(out["client"]) + len(out["server"]) == 24
    for dgram in wire:
        assert dgram[9] == 17 and udp_checksum_ok(dgram), dgram.hex()
        segment = tiu.ipv4_datagram_to_segment(dgram)
        assert P.tcp_checksum_ok(segment), dgram.hex()
        # exactly the segment that entered the encapsulating router ...
        sent = [s for side in out.values() for s in side if s == segment]
        assert len(sent) == 1, dgram.hex()
        # ... and, but for the TTL one hop later, the one the other router produced
        produced = [s for side in inn.values() for s in side if s[20:] == segment[20:]]
        assert len(produced) == 1, dgram.hex()
        assert ip_fields(produced[0]) == ip_fields(dgram)
        assert produced[0][8] == dgram[8] - 1 and produced[0][9] == 6


@needs_captures
def test_every_captured_segment_encodes_to_its_datagram():
    wire = wire_packets()
    count = 0
    for name in ("client-tcp-out", "server-tcp-out", "client-tcp-in", "server-tcp-in"):
        for segment in tcp_packets(name):
            assert P.tcp_checksum_ok(segment)
            dgram = tiu.ipv4_segment_to_datagram(segment)
            if name.endswith("-out"):  # before the hop: byte for byte the datagram on the wire
                assert dgram in wire, (name, segment.hex())
            else:  # after it: the wire datagram with the TTL one lower
                twin = [w for w in wire if w[20:] == dgram[20:]]
                assert len(twin) == 1 and ip_fields(twin[0]) == ip_fields(dgram), name
            assert udp_checksum_ok(dgram)
            # the wire payload (what a UDP socket hands over) is the datagram after 8 bytes
            seg = segment[20:]
            assert tiu.encode_payload(seg) == dgram[28:]
            assert tiu.decode_payload(dgram[28:], seg[:4])[20:] == seg[20:]
            count += 1
    assert count == 48


@needs_captures
def test_in_place_decode_matches_captures():
    """The data path's in-place decode gives the captured segment (check field aside)."""
    for dgram in wire_packets():
        segment = tiu.ipv4_datagram_to_segment(dgram)[20:]
        payload = dgram[28:]
        buf = bytearray(4) + bytearray(8) + payload
        tiu.decode_in_place(buf, 4, len(payload), dgram[20:24])
        expected = bytearray(segment)
        expected[16:18] = b"\0\0"
        assert buf[4:] == expected
        assert tiu.classify_payload(payload) is None


SRC, DST = bytes([198, 51, 100, 2]), bytes([203, 0, 113, 2])


def make_segment(payload=b"", flags=P.ACK, opts=b"", urgent=0, seq=1, ack=2, window=512,
                 sport=40000, dport=7000) -> bytearray:
    return bytearray(tcp_segment(payload, sport=sport, dport=dport, seq=seq, ack=ack, flags=flags,
                                 window=window, options=opts, urgent=urgent, src=SRC, dst=DST))


@given(payload=st.binary(max_size=300), opts=st.sampled_from([b"", bytes([1, 1, 1, 0]),
                                                              bytes(range(1, 13))]),
       flags=st.integers(0, 255).map(lambda f: f & ~P.URG), urgent=st.integers(0, 0xFFFF),
       seq=st.integers(0, 2**32 - 1), ack=st.integers(0, 2**32 - 1),
       sport=st.integers(1, 65535), dport=st.integers(1, 65535))
def test_round_trip_and_checksum_relation(payload, opts, flags, urgent, seq, ack, sport, dport):
    seg = make_segment(payload, flags, opts, urgent, seq, ack, 1234, sport, dport)
    dgram = tiu.encode(seg)
    assert len(dgram) == len(seg)
    assert struct.unpack_from("!HHH", dgram) == (sport, dport, len(seg))
    # the derived UDP checksum is the real one over the UDP pseudo-header
    packet = bytes(20) + dgram
    packet = bytearray(packet)
    packet[2:4] = struct.pack("!H", len(packet))
    packet[12:20] = SRC + DST
    assert udp_checksum_ok(packet)
    back = tiu.decode(dgram)
    expected = bytearray(seg)
    expected[18:20] = b"\0\0"  # the urgent pointer does not cross
    P.fill_tcp_checksum(expected, 0, len(expected), SRC, DST)
    assert back == expected


def test_urgent_segments_are_refused():
    seg = make_segment(b"x", P.ACK | P.URG, urgent=1)
    with pytest.raises(ValueError):
        tiu.encode(seg)
    assert tiu.classify_payload(tiu.encode_payload(seg)) == tiu.RX_URGENT


@pytest.mark.parametrize("payload, reason", [
    (b"", "too_short"),
    (bytes(11), "too_short"),
    (bytes([0x40]) + bytes(11), "bad_data_offset"),  # data offset 4 words
    (bytes([0x60, P.ACK]) + bytes(10), "bad_data_offset"),  # 24 bytes claimed, 20 there
    (bytes([0x50, P.ACK]) + bytes(10), None),
])
def test_classify_payload(payload, reason):
    assert tiu.classify_payload(payload) == reason


def test_zero_udp_checksum_is_sent_as_all_ones():
    # a TCP checksum that maps to a UDP sum of 0xFFFF would give 0, meaning "none"
    length = 20
    tcp_check = ~tiu._sub(tiu._sub(0xFFFF, tiu.PROTO_DELTA), length) & 0xFFFF
    assert tiu.udp_checksum_from_tcp(tcp_check, length) == 0xFFFF
