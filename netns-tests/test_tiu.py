"""The TCP-in-UDP wire mode (--wire tcp-in-udp) end to end: a server and a
client tunnel in two namespaces, real kernel TCP through them, byte-exact,
on both data paths.  nftables counters on the server's link prove what
crossed it: the tunnelled ports only as UDP, the others as plain TCP."""

from __future__ import annotations

import json
import re
import socket
import struct
import sys

import pytest

from udp_encap_tun import packet as P, tiu as tiu_codec
from uetlab import Lab, ToolProcess, assert_operator_error, wait_for
from wirecap import UdpCapture

MB = 1 << 20
PORTS = "7000-7009"
SERVER_IP, CLIENT_IP = "192.0.2.2", "192.0.2.1"

WIRE_COUNTERS = """
table ip uettiu {
    counter tunnelled_tcp {}
    counter tunnelled_udp {}
    counter other_tcp {}
    chain input {
        type filter hook input priority 0; policy accept;
        iifname "%(dev)s" tcp dport 7000-7009 counter name tunnelled_tcp
        iifname "%(dev)s" udp dport 7000-7009 counter name tunnelled_udp
        iifname "%(dev)s" tcp dport 8000 counter name other_tcp
    }
}
"""


def wait_ready(tool: ToolProcess) -> ToolProcess:
    def ready():
        if not tool.alive():
            raise AssertionError(f"exited with {tool.proc.returncode}:\n{tool.log()}")
        return "ready:" in tool.log()
    wait_for(ready, 20, what=f"{tool!r} to be ready")
    return tool


class TiuPair:
    """C (vc 192.0.2.1/24) and S (vs 192.0.2.2/24) joined by a veth; a TCP-in-UDP
    server in S for ports 7000-7009 and a client in C for them."""

    def __init__(self, lab: Lab):
        self.lab = lab
        self.c, self.s = lab.netns("c"), lab.netns("s")
        self.vc, self.vs = lab.ifname("vc"), lab.ifname("vs")
        self.ctun, self.stun = lab.ifname("tc"), lab.ifname("ts")
        lab.veth(self.c, self.vc, f"{CLIENT_IP}/24", self.s, self.vs, f"{SERVER_IP}/24")
        self.s.run("nft", "-f", "-", input=WIRE_COUNTERS % {"dev": self.vs})

    def start_server(self, *extra) -> ToolProcess:
        self.server = wait_ready(self.lab.tool(
            self.s, "--wire", "tcp-in-udp", "--interface", self.stun, "--listen-port", PORTS,
            "--bind-to-interface", self.vs, *extra, ready=False))
        return self.server

    def start_client(self, *extra) -> ToolProcess:
        self.client = wait_ready(self.lab.tool(
            self.c, "--wire", "tcp-in-udp", "--interface", self.ctun, "--endpoint-port", PORTS,
            "--route", f"{SERVER_IP}/32", "--bind-to-interface", self.vc, *extra, ready=False))
        return self.client

    def wire(self) -> dict:
        """Packets that crossed into S, by nft counter."""
        out = self.s.run("nft", "list", "counters", "table", "ip", "uettiu").stdout
        return {name: int(n) for name, n in
                re.findall(r"counter (\w+) \{\s*packets (\d+)", out)}


@pytest.fixture
def tiu(lab) -> TiuPair:
    pair = TiuPair(lab)
    pair.start_server()
    pair.start_client()
    return pair


def assert_clean(counters: dict) -> None:
    for name in ("internal_error", "rx_drop_write_error", "tx_drop_send_error",
                 "tx_drop_flow_socket"):
        assert counters.get(name, 0) == 0, counters


def test_both_ways_byte_exact_with_real_addresses(tiu: TiuPair):
    """Upload and download through the tunnel, byte-exact; both ends' TCP see
    each other's real addresses; only UDP crossed for those ports; a port that
    is not tunnelled is plain TCP; nothing is left behind at exit."""
    expected = {"offload": "data path: offload", "simple": "data path: simple"}[tiu.lab.datapath]
    assert expected in tiu.server.log() and expected in tiu.client.log()
    up = tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7001, "upload", 16 * MB, timeout=150)
    down = tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7002, "download", 16 * MB, timeout=150)
    for result in (up, down):
        assert result["server_saw"] == CLIENT_IP and result["client_saw"] == SERVER_IP
        # the client's TCP source port is the UDP source port the server saw
        assert result["server"]["peer_port"] == result["client"]["local_port"]
    wire = tiu.wire()
    assert wire["tunnelled_tcp"] == 0 and wire["tunnelled_udp"] > 2 * 16 * MB // 65536, wire

    plain = tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 8000, "upload", MB)
    assert plain["server_saw"] == CLIENT_IP
    assert tiu.wire()["other_tcp"] > 0

    client, server = tiu.client.stop(), tiu.server.stop()
    for counters in (client, server):
        assert_clean(counters)
    assert client["tx_bytes"] >= 16 * MB and server["rx_bytes"] >= 16 * MB
    assert server["tx_bytes"] >= 16 * MB and client["rx_bytes"] >= 16 * MB
    assert server["flows_added"] >= 2 and client["flows_added"] >= 2
    # nothing left behind: rules, tables, tuns
    for ns in (tiu.c, tiu.s):
        rules = ns.run("ip", "rule").stdout
        assert "ipproto tcp" not in rules, rules
        assert not ns.run("ip", "route", "show", "table", "all").stdout.count("table 77"), ns
    assert not tiu.s.link_exists(tiu.stun) and not tiu.c.link_exists(tiu.ctun)


def test_several_flows_at_once(tiu: TiuPair):
    """Six concurrent transfers on three ports, both directions."""
    transfers = [tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, port, direction, 4 * MB,
                                  timeout=150, wait=False)
                 for port, direction in ((7003, "upload"), (7004, "download"),
                                         (7005, "upload"), (7006, "download"),
                                         (7007, "upload"), (7008, "download"))]
    results = [t.wait() for t in transfers]
    assert len({r["client"]["local_port"] for r in results}) == 6
    # status lists the flows by their real addresses and ports
    doc = json.loads(tiu.s.run(sys.executable, "-m", "udp_encap_tun", "status", "--interface",
                               tiu.stun, "--json").stdout)
    assert doc["wire"] == "tcp-in-udp" and doc["ports"] == PORTS and doc["flow_count"] >= 6
    remotes = {f["remote"] for f in doc["flows"]}
    assert {f"{CLIENT_IP}:{r['client']['local_port']}" for r in results} <= remotes, doc
    text = tiu.c.run(sys.executable, "-m", "udp_encap_tun", "status", "--interface",
                     tiu.ctun).stdout
    assert "flows:" in text and f"{SERVER_IP}:7003" in text, text
    server = tiu.server.stop()
    assert_clean(server)
    assert server["flows_added"] >= 6


NAT = """
table ip uettiunat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "%s" meta l4proto udp masquerade to :40000-49999 random
    }
}
"""


def test_client_behind_port_translating_nat(lab):
    """The client sits behind a router that translates UDP source ports: the
    server's TCP sees the router's address and the translated port, and the
    transfers are byte-exact both ways."""
    s, r, c = lab.netns("s"), lab.netns("r"), lab.netns("c")
    vs, up, down, vc = lab.ifname("vs"), lab.ifname("ru"), lab.ifname("rd"), lab.ifname("vc")
    lab.veth(r, up, "198.51.100.1/24", s, vs, "198.51.100.2/24")
    lab.veth(r, down, "10.1.1.1/24", c, vc, "10.1.1.2/24")
    r.sysctl("net.ipv4.ip_forward", 1)
    r.run("nft", "-f", "-", input=NAT % up)
    c.add_route("0.0.0.0/0", gateway="10.1.1.1")
    server = wait_ready(lab.tool(s, "--wire", "tcp-in-udp", "--interface", lab.ifname("ts"),
                                 "--listen-port", PORTS, "--bind-to-interface", vs, ready=False))
    client = wait_ready(lab.tool(c, "--wire", "tcp-in-udp", "--interface", lab.ifname("tc"),
                                 "--endpoint-port", PORTS, "--route", "198.51.100.2/32",
                                 "--bind-to-interface", vc, ready=False))
    results = [lab.transfer(s, c, "198.51.100.2", 7001, "upload", 4 * MB, timeout=150),
               lab.transfer(s, c, "198.51.100.2", 7002, "download", 4 * MB, timeout=150)]
    for result in results:
        assert result["server_saw"] == "198.51.100.1"  # the router, not 10.1.1.2
        assert 40000 <= result["server"]["peer_port"] <= 49999, result
        assert result["client"]["local"] == "10.1.1.2"
    assert_clean(server.stop())
    assert_clean(client.stop())


@pytest.mark.parametrize("extra, needle", [
    (["--psk-file", "/nonexistent"], "--psk-file"),
    (["--keepalive", "5"], "--keepalive"),
    (["--listen-port", "1000-9000"], "at most 4096"),
    (["--listen-port", "9000-8000"], "9000-8000"),
])
def test_refused_options(lab, extra, needle):
    """One line, exit 2, nothing created."""
    ns = lab.netns("s")
    vs = lab.ifname("vs")
    lab.veth(ns, vs, f"{SERVER_IP}/24", lab.netns("c"), lab.ifname("vc"), f"{CLIENT_IP}/24")
    args = ["--wire", "tcp-in-udp", "--interface", lab.ifname("ts"), "--bind-to-interface", vs]
    if "--listen-port" not in extra:
        args += ["--listen-port", PORTS]
    links = ns.links()
    result = ns.run(sys.executable, "-m", "udp_encap_tun", *args, *extra, check=False, timeout=30)
    assert_operator_error(result, needle)
    assert ns.links() == links
    assert "ipproto" not in ns.run("ip", "rule").stdout


def test_hostile_datagrams_are_counted_and_dropped(tiu: TiuPair):
    """Datagrams that cannot be a segment, or carry URG, are counted by reason;
    valid-looking ones from spoofed flows are bounded by the admission rate; the
    tunnel keeps working."""
    junk = [b"", b"\x50" * 5, bytes([0x40, 0x10]) + bytes(10),  # too short, too short, doff 4
            bytes([0xF0, 0x10]) + bytes(10),  # doff 60 bytes, 20 there
            bytes([0x50, 0x30]) + bytes(10)]  # URG
    with tiu.c.socket() as sock:
        for i, payload in enumerate(junk * 20):
            sock.sendto(payload, (SERVER_IP, 7000 + i % 10))
    wait_for(lambda: tiu.server.counters().get("rx_drop_urgent", 0) >= 20, 20,
             what="the junk to be counted")
    counters = tiu.server.counters()
    assert counters["rx_drop_too_short"] == 40 and counters["rx_drop_bad_data_offset"] == 40
    assert counters.get("flows_added", 0) == 0 and counters.get("rx_packets", 0) == 0, counters
    tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7001, "download", MB)
    assert_clean(tiu.server.stop())


NO_OFFLOAD_FEATURES = """
from pyroute2.ethtool import Ethtool
e = Ethtool(); f = e.get_features(%r)
for name in ("tx-udp-segmentation", "tx-checksum-ip-generic"):
    f.features[name].enable = False
e.set_features(%r, f)
"""


def test_wire_is_the_eBPF_format_one_segment_per_datagram(tiu: TiuPair):
    """With UDP segmentation and checksum offload off on both veth ends (what an
    eBPF peer between namespaces needs), every datagram either end sends is one
    TCP segment in the draft's format: UDP length = the IP payload, a valid UDP
    checksum whose relation gives a valid TCP checksum, DF set; and transfers
    both ways are byte-exact."""
    for ns, dev in ((tiu.c, tiu.vc), (tiu.s, tiu.vs)):
        ns.run(sys.executable, "-c", NO_OFFLOAD_FEATURES % (dev, dev))
    capture = UdpCapture(tiu.s, tiu.vs, ports=range(7000, 7010))
    try:
        tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7001, "upload", 4 * MB)
        tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7002, "download", 4 * MB)
    finally:
        tunnel = capture.stop()
    to_server = [f.ip for f in tunnel if f.ip[16:20] == socket.inet_aton(SERVER_IP)]
    assert len(to_server) > 4 * MB // 1500 and len(tunnel) - len(to_server) > 4 * MB // 1500
    for flags, gso_type, _gso_size, ip in tunnel:
        assert gso_type == 0 and not flags & 1, (flags, gso_type)  # one datagram, checksummed
        assert struct.unpack_from("!H", ip, 24)[0] == len(ip) - 20
        assert struct.unpack_from("!H", ip, 6)[0] & 0x4000  # DF
        pseudo = ip[12:20] + struct.pack("!BBH", 0, 17, len(ip) - 20)
        assert P.ones_sum(pseudo + ip[20:]) == 0xFFFF, ip[:40].hex()
        segment = tiu_codec.ipv4_datagram_to_segment(ip)
        assert P.tcp_checksum_ok(segment), ip[:40].hex()
    assert_clean(tiu.server.stop())
    assert_clean(tiu.client.stop())
