"""What the wire and the log say: DF on every datagram (a capture on the veth),
and the warnings a wrong setup must produce on the side that can tell."""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import sys
import time

import pytest

from auth_tools import write_psk
from testkit import internet_checksum, ip_packet
from uetlab import Pair, wait_for
from wirecap import GSO_UDP_L4, Frame, UdpCapture

MB = 1 << 20
IP_DF = 0x4000


def describe(frame: Frame, server_ip: str) -> dict:
    """Of a captured tunnel frame: its DF bit (for a batch, the one every segment
    gets), how many datagrams it carries, whether it is a batch, its direction."""
    ip = frame.ip
    payload = int.from_bytes(ip[2:4], "big") - (ip[0] & 15) * 4 - 8
    batched = frame.gso_type == GSO_UDP_L4 and frame.gso_size
    return {"df": bool(int.from_bytes(ip[6:8], "big") & IP_DF),
            "datagrams": -(-payload // frame.gso_size) if batched else 1,
            "batched": bool(batched), "to_server": ip[16:20] == socket.inet_aton(server_ip)}


def test_every_datagram_carries_df(pair: Pair, datapath):
    """Bulk transfers both ways, captured on the client's veth: every datagram
    of the tunnel, in a UDP_SEGMENT batch or alone, has DF set.  On the offload
    path the capture must have seen batches (before IP_PMTUDISC_DO their
    segments left without DF while single datagrams had it)."""
    pair.start_server()
    pair.start_client()
    capture = UdpCapture(pair.c, pair.vc, ports={Pair.PORT})
    try:
        pair.transfer(7001, "upload", 8 * MB)
        pair.transfer(7002, "download", 8 * MB)
    finally:
        frames = [describe(f, Pair.SERVER_IP) for f in capture.stop()]
    client = pair.client.stop()
    server = pair.server.stop()
    datagrams = sum(f["datagrams"] for f in frames)
    batched = [f for f in frames if f["batched"]]
    without_df = [f for f in frames if not f["df"]]
    print(f"{datapath}: {len(frames)} frames, {datagrams} datagrams, {len(batched)} batches "
          f"({sum(f['datagrams'] for f in batched)} datagrams), "
          f"{len(without_df)} frames without DF")
    assert datagrams >= 2 * 8 * MB // 1500, datagrams  # the transfers were captured
    assert any(f["to_server"] for f in frames) and any(not f["to_server"] for f in frames)
    assert not without_df, without_df[:5]
    if datapath == "offload":
        assert server.get("tx_packets", 0) and client.get("tx_packets", 0)
        for direction in (True, False):  # both ends sent batches
            assert any(f["to_server"] == direction and f["datagrams"] > 1 for f in batched), \
                (direction, len(batched))
    for counters in (client, server):
        assert counters.get("tx_drop_message_too_long", 0) == 0, counters


# --------------------------------------------------------------------------- warnings

SERVER = f"{Pair.SERVER_IP}:{Pair.PORT}"
FIREWALL_NFT = """
table ip uetdiag {
    chain input {
        type filter hook input priority filter; policy accept;
        udp dport %d counter drop
    }
}
"""


@contextlib.contextmanager
def connecting(pair: Pair, port: int = 7001):
    """A TCP connect from C to the server's address, through the client tunnel,
    kept trying (SYN retransmissions) for the duration of the block."""
    sock = pair.c.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.connect_ex((Pair.SERVER_IP, port))
        yield sock
    finally:
        sock.close()


def warned(tool, *needles, timeout: float = 30) -> str:
    """Wait for a WARNING line of *tool* that contains every needle; return it."""
    def find():
        for line in tool.log().splitlines():
            if " WARNING " in line and all(n in line for n in needles):
                return line
        return None
    return wait_for(find, timeout, what=f"a warning with {needles}")


def client_servers(pair: Pair) -> list[dict]:
    """The servers section of the client's live status (``status --json``)."""
    out = pair.c.run(sys.executable, "-m", "udp_encap_tun", "status", "--interface", pair.ctun,
                     "--json")
    return json.loads(out.stdout)["servers"]


@pytest.mark.parametrize("datapath", ["offload"])  # the control path is the same on both
def test_keyless_client_is_told_the_server_requires_a_key(pair: Pair, tmp_path):
    """Server with --psk-file, client without: the client says what is wrong
    (it used to count rx_drop_bad_control and log nothing), and its status
    shows the server heard from, without a key."""
    pair.start_server("--psk-file", write_psk(tmp_path / "psk"))
    pair.start_client()
    with connecting(pair):
        line = warned(pair.client, f"server {SERVER} requires a pre-shared key (--psk-file)")
    print(line)
    [server] = client_servers(pair)
    assert server["server"] == SERVER and server["auth"] == "no key", server
    assert server["last_heard"] is not None and server["last_sent"] is not None, server
    assert pair.client.stop().get("rx_drop_bad_control", 0) >= 1
    assert pair.server.stop().get("rx_drop_unauthenticated", 0) >= 1


@pytest.mark.parametrize("datapath", ["offload"])
def test_keyed_client_against_keyless_server_warns_on_both_sides(pair: Pair, tmp_path):
    """Client with --psk-file, server without: the server names the peer that
    wants to authenticate; the client, whose HELLOs get no answer, says so
    after 10 s and shows the server as failing."""
    pair.start_server()
    pair.start_client("--psk-file", write_psk(tmp_path / "psk"))
    with connecting(pair):
        print(warned(pair.server, "peer 192.0.2.1:5000 wants to authenticate",
                     "no pre-shared key"))
        print(warned(pair.client, f"server {SERVER} has not answered our authentication",
                     "--endpoint-port 5000"))
        [server] = client_servers(pair)
    assert server["auth"] == "failing" and server["last_heard"] is None, server
    assert pair.server.stop().get("rx_drop_bad_control", 0) >= 1


@pytest.mark.parametrize("datapath", ["offload"])
def test_different_keys_warn_on_both_sides(pair: Pair, tmp_path):
    """Both ends hold a key, not the same one: the server says the proof was
    bad and why, the client that the server does not accept its key (it does
    answer, so the client does not call it silent)."""
    pair.start_server("--psk-file", write_psk(tmp_path / "psk"))
    pair.start_client("--psk-file", write_psk(tmp_path / "other"))
    with connecting(pair):
        print(warned(pair.server, "authentication with 192.0.2.1:5000: bad proof",
                     "another pre-shared key (--psk-file)"))
        print(warned(pair.client, f"server {SERVER} does not accept our pre-shared key"))
        [server] = client_servers(pair)
    assert server["auth"] == "failing" and server["last_heard"] is not None, server
    assert "no reply from server" not in pair.client.log()


@pytest.mark.parametrize("datapath", ["offload"])
def test_server_without_tun_address_says_why_it_drops(pair: Pair):
    """The server's tun has no address: it names the peer it drops and the
    fix; the client, which hears nothing, warns after 10 s."""
    pair.server = pair.lab.tool(pair.s, "--interface", pair.stun, "--listen-port", Pair.PORT,
                                "--bind-to-interface", pair.vs)
    pair.start_client()
    with connecting(pair):
        print(warned(pair.server, "dropping datagrams from 192.0.2.1:5000: the tun has no IPv4 "
                     "address", "--tun-address", "ip addr add"))
        print(warned(pair.client, f"no reply from server {SERVER}"))
    assert pair.server.stop().get("rx_drop_no_tun_address", 0) >= 1


@pytest.mark.parametrize("datapath", ["offload"])
def test_wrong_endpoint_port_is_named_from_the_icmp_error(pair: Pair):
    """The client sends to a port nothing listens on: the server's kernel
    answers ICMP port unreachable, and the client names the server and the
    likely fix at once (not only after 10 s)."""
    pair.start_server()
    pair.start_client(endpoint_port=Pair.PORT + 1)
    wrong = f"{Pair.SERVER_IP}:{Pair.PORT + 1}"
    with connecting(pair):
        line = warned(pair.client, f"server {wrong}: port unreachable", "--endpoint-port",
                      timeout=8)
    print(line)
    counters = pair.client.stop()
    assert counters.get("icmp_port_unreachable", 0) >= 1, counters
    assert counters.get("internal_error", 0) == 0, counters


@pytest.mark.parametrize("datapath", ["offload"])
def test_unreachable_server_warns_after_ten_seconds_of_silence(pair: Pair):
    """A firewall in front of the server drops the tunnel's UDP (no ICMP): the
    client warns once it has sent for 10 s and heard nothing, and its status
    shows the server never heard from."""
    pair.start_server()
    pair.s.run("nft", "-f", "-", input=FIREWALL_NFT % Pair.PORT)
    pair.start_client()
    with connecting(pair):
        line = warned(pair.client, f"no reply from server {SERVER} for 1", "firewall")
        [server] = client_servers(pair)
    print(line)
    assert server["last_heard"] is None and server["last_sent"] is not None, server
    assert server["auth"] == "no key", server
    assert pair.server.stop().get("rx_packets", 0) == 0
    assert pair.client.stop().get("tx_packets", 0) >= 1


# --------------------------------------------------------------------------- a smaller path MTU

PATH_MTU = 1280


def test_path_mtu_below_the_tun_is_named_and_fixed_by_mtu(lab):
    """C -(1500)- M -(1280)- S: the client's tun expects a path MTU of 1500.
    Full-size datagrams (DF) are dropped at M, whose "fragmentation needed"
    the client names (the path MTU and the --mtu to use); after that its kernel
    refuses them itself: tx_drop_message_too_long, and nothing of the upload
    arrives.  With --mtu 1272 (path MTU - 8) the same upload is byte-exact."""
    c, m, s = lab.netns("c"), lab.netns("m"), lab.netns("s")
    vc, mc = lab.ifname("vc"), lab.ifname("mc")
    ms, vs = lab.ifname("ms"), lab.ifname("vs")
    tun_c, tun_s = lab.ifname("tc"), lab.ifname("ts")
    lab.veth(c, vc, "192.0.2.1/24", m, mc, "192.0.2.254/24")
    lab.veth(m, ms, "198.51.100.254/24", s, vs, "198.51.100.2/24")
    with m.ipr() as ipr:  # M's way to S is the narrow one
        ipr.link("set", index=ipr.link_lookup(ifname=ms)[0], mtu=PATH_MTU)
    m.sysctl("net.ipv4.ip_forward", 1)
    c.add_route("198.51.100.0/24", gateway="192.0.2.254")
    s.add_route("192.0.2.0/24", gateway="198.51.100.254")
    server_ip = "198.51.100.2"
    server = lab.tool(s, "--interface", tun_s, "--listen-port", 5000, "--bind-to-interface", vs,
                      "--tun-address", "10.9.0.1/24")

    def client(*extra):
        return lab.tool(c, "--interface", tun_c, "--listen-port", 5000, "--bind-to-interface", vc,
                        "--endpoint-port", 5000, "--tun-address", "10.9.0.2/32",
                        "--route", f"{server_ip}/32", *extra)

    first = client()
    with contextlib.ExitStack() as stack:
        listener = stack.enter_context(s.socket(socket.AF_INET, socket.SOCK_STREAM))
        listener.bind(("0.0.0.0", 7001))
        listener.listen(1)
        sock = stack.enter_context(c.socket(socket.AF_INET, socket.SOCK_STREAM))
        sock.settimeout(20)
        sock.connect((server_ip, 7001))  # SYNs are small: they cross
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.send(bytes(256 * 1024))
        print(warned(first, f"the path MTU to server {server_ip} is {PATH_MTU}",
                     f"at most {PATH_MTU - 8} (--mtu)"))
        print(warned(first, f"to {server_ip}:5000 is larger than the path MTU", "--mtu"))
        accepted, _ = listener.accept()
        accepted.setblocking(False)
        with pytest.raises(BlockingIOError):
            accepted.recv(1 << 16)  # not one full-size segment crossed
        accepted.close()
    counters = first.stop()
    assert counters.get("icmp_frag_needed", 0) >= 1, counters
    assert counters.get("tx_drop_message_too_long", 0) >= 1, counters

    second = client("--mtu", PATH_MTU - 8)
    lab.transfer(s, c, server_ip, 7002, "upload", 2 * MB, timeout=90)
    counters = second.stop()
    assert counters.get("tx_drop_message_too_long", 0) == 0, counters
    assert server.stop().get("rx_bytes", 0) >= 2 * MB


def icmp_port_unreachable(src: str, dst: str, sport: int, dport: int) -> bytes:
    """An ICMP "port unreachable" (type 3, code 3) about a UDP datagram from
    *src*:*sport* to *dst*:*dport*, for a raw ICMP socket."""
    # the quoted datagram's headers only: its lengths still count 32 payload bytes
    quoted = ip_packet(struct.pack("!HHHH", sport, dport, 8 + 32, 0), socket.inet_aton(src),
                       socket.inet_aton(dst), proto=socket.IPPROTO_UDP, ident=0, checksum=0,
                       total=28 + 32)
    body = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    return body[:2] + struct.pack("!H", internet_checksum(body)) + body[4:]


def test_spoofed_icmp_errors_do_not_pause_the_client(tunnel: Pair):
    """With IP_RECVERR each ICMP error about our datagrams (anyone can forge
    one: it only quotes addresses and ports) fails the socket's next read or
    send once.  A stream of them is counted and named, but the client's socket
    keeps being read (no read_paused) and a download arrives byte-exact."""
    error = icmp_port_unreachable(Pair.CLIENT_IP, Pair.SERVER_IP, Pair.PORT, Pair.PORT)
    running = tunnel.transfer(7001, "download", 16 * MB, wait=False)
    with tunnel.s.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as raw:
        for i in range(20000):  # bounded: at most a few thousand a second for a few seconds
            raw.sendto(error, (Pair.CLIENT_IP, 0))
            if i % 100 == 99:
                time.sleep(0.02)
    running.wait()
    counters = tunnel.client.stop()
    assert counters.get("icmp_port_unreachable", 0) > 0, counters
    assert counters.get("read_paused", 0) == 0, counters
    assert counters.get("internal_error", 0) == 0, counters
