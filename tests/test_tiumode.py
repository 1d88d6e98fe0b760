"""Sans-IO parts of the TCP-in-UDP mode: port ranges, flows, TSO split into
wire payloads (no root)."""

from __future__ import annotations

import struct

import pytest

from testkit import FakeClock, ip_packet, tcp_segment
from udp_encap_tun import packet as P, tiu
from udp_encap_tun.cli import parse_args
from udp_encap_tun.offload import tso_split
from udp_encap_tun.tiumode import (
    PortRangeError,
    TiuRouter,
    count_ports,
    format_ranges,
    parse_port_ranges,
)

LOCAL, REMOTE = bytes([192, 0, 2, 2]), bytes([192, 0, 2, 1])


def test_port_ranges_merge_and_validate():
    assert parse_port_ranges(["7000-7009", 7010, "5000,5001 5003"]) == \
        [(5000, 5001), (5003, 5003), (7000, 7010)]
    assert count_ports([(5000, 5001), (7000, 7010)]) == 13
    assert format_ranges([(5000, 5000), (7000, 7010)]) == "5000,7000-7010"
    for bad in ("0", "70000", "9000-8000", "a-b", "1-"):
        with pytest.raises(PortRangeError):
            parse_port_ranges([bad])


def ipv4_tcp(src, dst, sport, dport, flags=P.ACK, payload=b"") -> bytearray:
    return ip_packet(tcp_segment(payload, sport=sport, dport=dport, flags=flags, window=100),
                     src, dst)


def test_server_flows_admitted_bounded_and_expired():
    router = TiuRouter(False, [(7000, 7009)], timeout=10, max_flows=2, admission_rate=1000)
    a = router.rx_flow(LOCAL, REMOTE, 7001, 40000, now=0.0)
    assert a is not None and a.remote == ("192.0.2.1", 40000) and a.local == ("192.0.2.2", 7001)
    assert router.rx_flow(LOCAL, REMOTE, 7001, 40000, now=1.0) is a  # known: same flow
    # TX of the server's TCP reply finds the same flow (key = packet[12:24])
    assert router.tx_flow(ipv4_tcp(LOCAL, REMOTE, 7001, 40000), now=2.0) is a
    assert a.rx_ports == struct.pack("!HH", 40000, 7001)
    assert router.rx_flow(LOCAL, REMOTE, 7002, 40001, now=2.0) is not None
    assert router.rx_flow(LOCAL, REMOTE, 7003, 40002, now=3.0) is None  # full
    assert router.counters["rx_drop_flows_full"] == 1
    # idle flows go after the timeout, then there is room again
    assert {f.local[1] for f in router.expire(now=12.5)} == {7001, 7002}
    assert router.counters["flows_expired"] == 2 and not router.flows
    assert router.rx_flow(LOCAL, REMOTE, 7003, 40002, now=13.0) is not None


def test_new_flows_are_rate_limited():
    router = TiuRouter(False, [(7000, 7000)], admission_rate=2)
    got = [router.rx_flow(LOCAL, REMOTE, 7000, port, now=0.0) for port in range(40000, 40005)]
    assert sum(f is not None for f in got) == 2
    assert router.counters["rx_drop_admission_rate"] == 3


def test_tx_only_tunnelled_ports_and_no_urgent():
    server = TiuRouter(False, [(7000, 7009)])
    assert server.tx_flow(ipv4_tcp(LOCAL, REMOTE, 8000, 40000), now=0.0) is None
    assert server.counters["tx_drop_not_tunnelled_port"] == 1
    assert server.tx_flow(ipv4_tcp(LOCAL, REMOTE, 7000, 40000, P.ACK | P.URG), now=0.0) is None
    assert server.counters["tx_drop_urgent"] == 1
    client = TiuRouter(True, [(7000, 7009)])
    # the client's flows go by destination port; the key's local side is the source
    flow = client.tx_flow(ipv4_tcp(REMOTE, LOCAL, 40000, 7005), now=0.0)
    assert flow.local == ("192.0.2.1", 40000) and flow.remote == ("192.0.2.2", 7005)
    assert client.tx_flow(ipv4_tcp(REMOTE, LOCAL, 7005, 40000), now=0.0) is None


def test_tso_split_into_wire_payloads():
    """A super-packet cut for the TCP-in-UDP wire: each piece is exactly the
    wire payload of the segment the default split makes."""
    payload = bytes(range(256)) * 40  # 10240 bytes
    opts = bytes([1, 1, 8, 10]) + struct.pack("!II", 5, 6)
    seg = tcp_segment(payload, dport=7001, seq=2**32 - 3000, ack=9, flags=P.ACK | P.PSH | P.CWR,
                      options=opts, checksum=0x1234)
    packet = ip_packet(seg, LOCAL, REMOTE)
    plain = tso_split(packet, 1000, max_segments=4)
    wire = tso_split(packet, 1000, max_segments=4, tiu=True)
    assert len(plain) == len(wire) == 3
    for (pbuf, psize), (wbuf, wsize) in zip(plain, wire, strict=False):
        assert wsize == psize - 8
        pieces = [bytes(pbuf[o:o + psize]) for o in range(0, len(pbuf), psize)]
        assert bytes(wbuf) == b"".join(tiu.encode_payload(p) for p in pieces)
    # small packets are one wire payload
    small = ip_packet(seg[:40], LOCAL, REMOTE)
    assert tso_split(small, 1000, tiu=True) == [(tiu.encode_payload(seg[:40]), 32)]


def test_cli_wire_options_from_a_config_file(tmp_path):
    conf = tmp_path / "tiu.conf"
    conf.write_text("wire = tcp-in-udp\ninterface = t0\nbind-to-interface = eth0\n"
                    "listen-port = [7000-7009, 8000]\n")
    args = parse_args(["--config", str(conf)])
    assert args.wire == "tcp-in-udp" and args.listen_port_all == ["7000-7009", 8000]


def test_cli_wire_options():
    args = parse_args(["--wire", "tcp-in-udp", "--interface", "t0", "--bind-to-interface",
                       "eth0", "--listen-port", "7000-7009", "--listen-port", "8000"])
    assert args.listen_port_all == ["7000-7009", 8000]
    # the default format keeps one port, as before
    args = parse_args(["--interface", "t0", "--bind-to-interface", "eth0", "--listen-port", "5000"])
    assert args.listen_port == 5000 and args.wire == "udp-encap-tun"


@pytest.mark.parametrize("argv, needle", [
    (["--wire", "tcp-in-udp", "--listen-port", "7000", "--psk-file", "k"], "--psk-file"),
    (["--wire", "tcp-in-udp", "--endpoint-port", "7000", "--keepalive", "5"], "--keepalive"),
    (["--listen-port", "5000-5001"], "--listen-port"),
    (["--listen-port", "5000", "--listen-port", "5001"], "--listen-port"),
    (["--wire", "tcp-in-udp", "--listen-port", "9-8"], "--listen-port"),
])
def test_cli_refuses_in_one_line(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(["--interface", "t0", "--bind-to-interface", "eth0", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_gro_fast_path_equals_decode_and_coalesce():
    """A GRO buffer of wire payloads (what tso_split(tiu=True) sends in one
    UDP_SEGMENT batch) becomes exactly the super-packet that decoding each
    payload and coalescing them makes; anything irregular is left to them."""
    from udp_encap_tun.offload import coalesce, coalesce_wire_gro

    opts = bytes([1, 1, 8, 10]) + struct.pack("!II", 5, 6)
    ports = struct.pack("!HH", 7001, 40000)
    for seq0, plen, flags in ((1000, 10000, P.ACK), (2**32 - 2500, 7000, P.ACK | P.PSH),
                              (5, 4000, P.ACK)):
        seg = tcp_segment(bytes(range(256)) * (plen // 256) + bytes(plen % 256), sport=7001,
                          dport=40000, seq=seq0, ack=9, flags=flags, options=opts)
        packet = ip_packet(seg, LOCAL, REMOTE)
        [(gro, size)] = tso_split(packet, 1000, tiu=True)
        fast = coalesce_wire_gro(gro, len(gro), size, ports, REMOTE, LOCAL, 77)
        segments = [tiu.decode_payload(gro[o:o + size], ports) for o in range(0, len(gro), size)]
        [slow] = coalesce(segments, REMOTE, LOCAL, lambda: 77)
        assert fast == slow
        # irregular: one window differs, one sequence number skips, a SYN
        for pos, value in ((2 * size + 3, 0x99), (3 * size + 7, 0x01), (1, P.SYN | P.ACK)):
            bad = bytearray(gro)
            bad[pos] ^= value
            assert coalesce_wire_gro(bad, len(bad), size, ports, REMOTE, LOCAL, 77) is None


def test_status_line_prometheus_and_text_for_flows():
    """The service manager's STATUS= line, the Prometheus text and the status
    text of a tcp-in-udp tunnel speak of flows."""
    from types import SimpleNamespace

    from udp_encap_tun import notify, status

    for client in (False, True):
        router = TiuRouter(client, [(7000, 7009)])
        router.rx_flow(LOCAL, REMOTE, 7001, 40000, now=0.0)
        tunnel = SimpleNamespace(router=router, counters=router.counters,
                                 tun=SimpleNamespace(name="tiu0"), clock=FakeClock(0.0))
        assert notify.status_line(tunnel).endswith(": tcp-in-udp, 1 flow, tx 0 B rx 0 B")
    doc = {"interface": "tiu0", "mode": "server", "wire": "tcp-in-udp", "flow_count": 3,
           "max_flows": 10, "ports": "7000-7009", "flow_timeout": 300.0, "pid": 1,
           "data_path": "simple", "mss_clamp": None, "counters": {"flows_added": 3},
           "flows": [{"local": "192.0.2.2:7001", "remote": "192.0.2.1:40000", "last": 1.0,
                      "age": 2.0, "rx_packets": 1, "rx_bytes": 2, "tx_packets": 3,
                      "tx_bytes": 4}]}
    prom = status.render_prometheus(doc)
    assert 'udp_encap_tun_flows{interface="tiu0"} 3' in prom, prom
    assert "udp_encap_tun_peers{" not in prom and "peers_added" not in prom, prom
    text = status.render_text(doc)
    assert "flows:" in text and "192.0.2.1:40000" in text and "2 older flows" in text, text


# -- flow expiry --------------------------------------------------------------------------


@pytest.mark.parametrize("base", [0.0, 1e9])
def test_flow_expiry_by_last_activity_whatever_the_clock(base):
    router = TiuRouter(False, [(7000, 7009)], timeout=10, admission_rate=1000)
    a = router.rx_flow(LOCAL, REMOTE, 7001, 40000, now=base)
    b = router.rx_flow(LOCAL, REMOTE, 7002, 40001, now=base + 1)
    router.rx_flow(LOCAL, REMOTE, 7001, 40000, now=base + 8)  # a active again
    assert router.expire(base + 10.5) == []  # b: 9.5 s idle, a: 2.5 s
    assert router.expire(base + 11.5) == [b]
    b.last = base  # the I/O edge sets ``last`` without moving the flow
    a.last = base + 18  # e.g. the client's RX
    assert router.expire(base + 18.5) == [] and list(router.flows.values()) == [a]
    assert router.expire(base + 28.5) == [a]
    assert router.counters["flows_expired"] == 2 and not router.order


def test_flow_moves_at_most_once_a_second():
    router = TiuRouter(False, [(7000, 7009)], timeout=300, admission_rate=1000)
    a = router.rx_flow(LOCAL, REMOTE, 7001, 40000, now=5.0)
    b = router.rx_flow(LOCAL, REMOTE, 7002, 40001, now=5.0)
    router.rx_flow(LOCAL, REMOTE, 7001, 40000, now=5.5)
    assert list(router.order.values()) == [a, b] and a.last == 5.5  # not moved yet
    assert router.rx_flow(LOCAL, REMOTE, 7001, 40000, now=6.0) is a  # a second later: moved
    assert list(router.order.values()) == [b, a] and a.moved == 6.0


def test_expiry_looks_only_at_what_is_due():
    """Only the front of the order is examined: a flow behind a live one is
    not looked at (a scan of the whole table would find this one idle)."""
    router = TiuRouter(False, [(7000, 7009)], timeout=10, admission_rate=1e6)
    flows = [router.rx_flow(LOCAL, REMOTE, 7001, 40000 + k, now=100.0 + k) for k in range(1000)]
    flows[500].last = 0.0  # idle by its own clock, but behind live flows in the order
    assert router.expire(109.5) == []
    gone = router.expire(111.5)
    assert gone == flows[:2] and flows[500].key in router.flows


def test_forget_keeps_both_views_in_step():
    router = TiuRouter(False, [(7000, 7009)], admission_rate=1000)
    a = router.rx_flow(LOCAL, REMOTE, 7001, 40000, now=0.0)
    router.forget(a)
    assert not router.flows and not router.order
