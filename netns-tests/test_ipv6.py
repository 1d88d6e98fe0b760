"""IPv6 (#13): the inner family follows the datagram's.  Over an IPv6-only link,
IPv4 and IPv6 clients on one server port, NAT66, a returning IPv6 peer, hostile
IPv6 input, a pre-shared key over IPv6.  Every test runs on both data paths."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import sys

from auth_tools import write_psk
from testkit import ip_packet, tcp_segment
from uetlab import Lab, Pair6, counter_delta, wait_for

MB = 1 << 20
BULK = 30 * MB
ETH_P_IPV6 = 0x86DD
JUNK_PORT = 6000


def no_errors(*counters: dict) -> None:
    for c in counters:
        for key in ("internal_error", "rx_drop_write_error", "tx_drop_send_error"):
            assert c.get(key, 0) == 0, c


def in_pool(address: str, pool: str = Pair6.POOL) -> bool:
    return ipaddress.ip_address(address) in ipaddress.ip_network(pool)


def test_ipv6_only_link_bulk_both_directions(tunnel6: Pair6):
    """Client and server have no IPv4 address at all (not even on loopback): 30 MB
    each way, byte-exact, TCP over IPv6 inside, UDP over IPv6 outside; the server's
    TCP sees the client from a generated IPv6 address of the tun's subnet."""
    for ns in (tunnel6.c, tunnel6.s):
        assert ns.addresses(socket.AF_INET) == [], ns.addresses(socket.AF_INET)
    up = tunnel6.transfer(7001, "upload", BULK, timeout=240)
    down = tunnel6.transfer(7002, "download", BULK, timeout=240)

    peers = tunnel6.server.new_peers()
    assert len(peers) == 1, tunnel6.server.log()
    host, port, generated = peers[0]
    assert (host, port) == (Pair6.CLIENT_IP, Pair6.PORT)
    assert in_pool(generated) and generated != Pair6.SERVER_TUN_IP
    assert generated != "fd00:9::"  # the subnet-router anycast address is never handed out
    assert up["server_saw"] == down["server_saw"] == generated
    assert up["client_saw"] == down["client_saw"] == Pair6.SERVER_IP

    client, server = tunnel6.client.stop(), tunnel6.server.stop()
    no_errors(client, server)
    assert client["tx_bytes"] >= BULK and server["rx_bytes"] >= BULK, (client, server)
    assert server["tx_bytes"] >= BULK and client["rx_bytes"] >= BULK, (client, server)
    assert server["peers_added"] == 1


def _router_lab(lab: Lab, clients: dict[str, tuple[str, str, str]]):
    """A server S behind a router R (R-S link dual-stack) and client namespaces
    behind R, each on its own link: role -> (R's side, the client's side, its
    default gateway).  Returns (S, R, {role: namespace}, S's veth)."""
    s, r = lab.netns("s"), lab.netns("r")
    upstream, vs = lab.ifname("ru"), lab.ifname("vs")
    lab.veth(r, upstream, "198.51.100.1/24", s, vs, "198.51.100.2/24")
    r.add_address(upstream, "2001:db8:100::1/64")
    s.add_address(vs, "2001:db8:100::2/64")
    r.sysctl("net.ipv4.ip_forward", 1)
    r.sysctl("net.ipv6.conf.all.forwarding", 1)
    s.add_route("0.0.0.0/0", gateway="198.51.100.1")
    s.add_route("::/0", gateway="2001:db8:100::1")
    namespaces = {}
    for i, (role, (r_cidr, c_cidr, gateway)) in enumerate(clients.items(), 1):
        c = namespaces[role] = lab.netns(role)
        lab.veth(r, lab.ifname(f"rd{i}"), r_cidr, c, lab.ifname(f"vc{i}"), c_cidr)
        c.add_route("::/0" if ":" in gateway else "0.0.0.0/0", gateway=gateway)
    return s, r, namespaces, vs


def _start_client(lab: Lab, c, i: int, tun_cidr: str, server_ip: str):
    tun = lab.ifname(f"tc{i}")
    tool = lab.tool(c, "--interface", tun, "--listen-port", 5000,
                    "--bind-to-interface", lab.ifname(f"vc{i}"), "--endpoint-port", 5000,
                    "--tun-address", tun_cidr)
    c.add_route(f"{server_ip}/{128 if ':' in server_ip else 32}", dev=tun)
    return tool


def test_ipv4_and_ipv6_clients_on_one_server_port(lab: Lab):
    """One server socket (one UDP port, no --listen-address: both families) serves
    an IPv4 client and an IPv6 client at once: each gets a generated address of its
    own family (10.9.0.0/24, fd00:9::/64) and concurrent transfers both ways are
    byte-exact."""
    s, _r, cs, vs = _router_lab(lab, {"c4": ("10.1.1.1/24", "10.1.1.2/24", "10.1.1.1"),
                                      "c6": ("2001:db8:1::1/64", "2001:db8:1::2/64",
                                             "2001:db8:1::1")})
    server = lab.tool(s, "--interface", lab.ifname("ts"), "--listen-port", 5000,
                      "--bind-to-interface", vs, "--tun-address", "10.9.0.1/24",
                      "--tun-address", "fd00:9::1/64")
    tools = [_start_client(lab, cs["c4"], 1, "10.9.0.2/32", "198.51.100.2"),
             _start_client(lab, cs["c6"], 2, "fd00:9::2/128", "2001:db8:100::2")]

    size = 8 * MB
    transfers = {}
    for name, host in (("c4", "198.51.100.2"), ("c6", "2001:db8:100::2")):
        for direction, port in (("upload", 7001), ("download", 7002)):
            port += 10 if name == "c6" else 0
            transfers[name, direction] = lab.transfer(s, cs[name], host, port, direction, size,
                                                      timeout=180, wait=False)
    results = {key: t.wait() for key, t in transfers.items()}

    peers = {host: address for host, _port, address in server.new_peers()}
    assert set(peers) == {"10.1.1.2", "2001:db8:1::2"}, server.log()
    assert ipaddress.ip_address(peers["10.1.1.2"]) in ipaddress.ip_network("10.9.0.0/24")
    assert in_pool(peers["2001:db8:1::2"])
    for name, host in (("c4", "10.1.1.2"), ("c6", "2001:db8:1::2")):
        for direction in ("upload", "download"):
            assert results[name, direction]["server_saw"] == peers[host], results
    assert results["c6", "upload"]["client_saw"] == "2001:db8:100::2"

    status = s.run(sys.executable, "-m", "udp_encap_tun", "status", "--interface",
                   lab.ifname("ts"), "--json").stdout
    assert '"peer":"[2001:db8:1::2]:5000"' in status.replace(" ", ""), status
    counters = server.stop()
    assert counters["peers_added"] == 2
    no_errors(counters, *(tool.stop() for tool in tools))


NAT66_TABLE = """
table ip6 uetnat66 {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "%s" masquerade
    }
}
"""


def test_two_ipv6_clients_behind_one_nat66(lab: Lab):
    """Two IPv6 clients behind one NAT66 router (nftables masquerade), both from UDP
    port 5000: the server sees one address with two ports and gives them distinct
    generated IPv6 addresses; concurrent transfers of both are byte-exact."""
    s, r, cs, vs = _router_lab(lab, {"c1": ("fd00:1:1::1/64", "fd00:1:1::2/64", "fd00:1:1::1"),
                                     "c2": ("fd00:1:2::1/64", "fd00:1:2::2/64", "fd00:1:2::1")})
    r.run("nft", "-f", "-", input=NAT66_TABLE % lab.ifname("ru"))
    server = lab.tool(s, "--interface", lab.ifname("ts"), "--listen-port", 5000,
                      "--bind-to-interface", vs, "--tun-address", "fd00:9::1/64")
    tools = [_start_client(lab, c, i, "fd00:9::2/128", "2001:db8:100::2")  # the same inner
             for i, c in enumerate(cs.values(), 1)]                      # address on both

    transfers = {}
    for i, c in enumerate(cs.values(), 1):
        for direction, port in (("upload", 7000 + 10 * i), ("download", 7001 + 10 * i)):
            transfers[i, direction] = lab.transfer(s, c, "2001:db8:100::2", port, direction,
                                                   8 * MB, timeout=180, wait=False)
    results = {key: t.wait() for key, t in transfers.items()}

    peers = server.new_peers()
    assert len(peers) == 2, server.log()
    (h1, p1, a1), (h2, p2, a2) = peers
    assert h1 == h2 == "2001:db8:100::1"  # both behind the router's address
    assert p1 != p2 and 5000 in (p1, p2)  # the NAT translated one source port
    assert a1 != a2 and in_pool(a1) and in_pool(a2)
    saw = {i: {results[i, d]["server_saw"] for d in ("upload", "download")} for i in (1, 2)}
    assert all(len(addresses) == 1 for addresses in saw.values()), saw
    assert saw[1] | saw[2] == {a1, a2}, (saw, peers)
    counters = server.stop()
    assert counters["peers_added"] == 2
    no_errors(counters, *(tool.stop() for tool in tools))


def test_returning_ipv6_peer_keeps_its_address(pair6: Pair6):
    """An IPv6 peer forgotten after --peer-timeout gets the same generated IPv6
    address when it comes back."""
    pair6.start_server("--peer-timeout", "2")
    pair6.start_client()
    first = pair6.transfer(7001, "upload", MB)
    before = pair6.server.new_peers()
    wait_for(lambda: pair6.server.counters().get("peers_expired", 0) >= 1, 30, interval=0.5,
             what="peers_expired to move")
    second = pair6.transfer(7002, "download", MB)
    peers = pair6.server.new_peers()
    assert len(peers) > len(before) >= 1, pair6.server.log()
    assert {(h, p) for h, p, _ in peers} == {(Pair6.CLIENT_IP, Pair6.PORT)}
    assert len({a for _, _, a in peers}) == 1 and in_pool(peers[0][2]), peers
    assert first["server_saw"] == second["server_saw"] == peers[0][2]
    counters = pair6.server.stop()
    assert counters["peers_added"] == len(peers) >= 2 and counters["peers_expired"] >= 1


def _inject(ns, ifname: str, packets) -> None:
    """Hand raw IPv6 packets to the tunnel as if the kernel routed them into the tun
    (an AF_PACKET socket sending on it): no checks of the kernel's in the way."""
    with ns.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_IPV6)) as sock:
        for packet in packets:
            sock.sendto(bytes(packet), (ifname, ETH_P_IPV6))


def test_hostile_ipv6_into_the_tun_is_counted(tunnel6: Pair6):
    """IPv6 packets the wire cannot carry, handed to the client's tunnel: extension
    headers (hop-by-hop, routing, destination options), fragments, not TCP, lengths
    that lie.  Each is counted by its reason, none is sent, the tunnel goes on."""
    c = tunnel6.c
    src = ipaddress.IPv6Address(Pair6.CLIENT_TUN_IP).packed
    dst = ipaddress.IPv6Address(Pair6.SERVER_IP).packed
    seg = tcp_segment(b"x" * 10, flags=0x02, src=src, dst=dst)

    def ext(next_header: int) -> bytes:  # an 8-byte extension header: next, length 0, padding
        return bytes([next_header, 0, 1, 4, 0, 0, 0, 0])

    hostile = {
        "ipv6_extension_header": [ip_packet(seg, src, dst, proto=0, options=ext(6)),
                                  ip_packet(seg, src, dst, proto=43, options=ext(6)),
                                  ip_packet(seg, src, dst, proto=60, options=ext(6))],
        "fragment": [ip_packet(seg, src, dst, proto=44, options=bytes([6, 0, 0, 1, 0, 0, 0, 7])),
                     ip_packet(seg, src, dst, proto=44, options=bytes([6, 0, 0, 8, 0, 0, 0, 7]))],
        "not_tcp": [ip_packet(b"\0\x09\0\x09\0\x0c\0\0udp!", src, dst, proto=17),
                    ip_packet(b"\x80\0\0\0\0\1\0\1", src, dst, proto=58)],
        # the payload length claims more than there is; a packet shorter than its header
        "truncated": [ip_packet(seg, src, dst, total=40 + len(seg) + 100),
                      ip_packet(seg, src, dst)[:39],
                      ip_packet(seg[:12], src, dst)],
        # data offset 4 words; data offset past the end the payload length says
        "bad_tcp_header": [ip_packet(tcp_segment(doff=4, src=src, dst=dst), src, dst),
                           ip_packet(tcp_segment(doff=15, src=src, dst=dst), src, dst)],
    }
    before = tunnel6.client.counters()
    _inject(c, tunnel6.ctun, [p for packets in hostile.values() for p in packets])

    def all_counted():
        now = tunnel6.client.counters()
        done = all(counter_delta(now, before, f"tx_drop_{reason}") >= len(packets)
                   for reason, packets in hostile.items())
        return now if done else None

    after = wait_for(all_counted, 20, interval=0.2, what="every hostile packet counted")
    assert counter_delta(after, before, "tx_packets") == 0, (before, after)
    assert tunnel6.client.alive()
    no_errors(after)
    tunnel6.transfer(7001, "upload", 2 * MB)
    no_errors(tunnel6.client.stop())


def test_hostile_datagrams_over_ipv6_at_the_server(tunnel6: Pair6):
    """Junk sent over IPv6 straight to the server's UDP port: counted and dropped (or,
    when it looks like TCP, passed on as IPv6 TCP, which the server's TCP answers with
    a RST); the server keeps working for its real client."""
    def header(doff: int) -> bytes:
        return tcp_segment(doff=doff, sport=1234, dport=4321, flags=0x10)[:20]

    junk = [b"\x60", header(5)[:19], header(4), header(15), header(5) + bytes(9000 - 20),
            header(5) + bytes(60000)]
    before = tunnel6.server.counters()
    with tunnel6.c.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, tunnel6.vc.encode())
        sock.bind((Pair6.CLIENT_IP, JUNK_PORT))
        for payload in junk:
            assert sock.sendto(payload, (Pair6.SERVER_IP, Pair6.PORT)) == len(payload)

        def accounted(c: dict) -> int:
            return (c.get("rx_packets", 0)
                    + sum(v for k, v in c.items() if k.startswith("rx_drop_")))

        after = wait_for(lambda: (c := tunnel6.server.counters())
                         and accounted(c) - accounted(before) >= len(junk) and c, 20,
                         interval=0.2, what="the server to account for every datagram")
        delivered = counter_delta(after, before, "rx_packets")
        sock.settimeout(5)
        replies = []
        for _ in range(delivered):
            try:
                replies.append(sock.recv(65535))
            except TimeoutError:
                break
    assert delivered >= 1 and len(replies) == delivered, (replies, before, after)
    for reply in replies:
        assert reply[:4] == bytes.fromhex("10e104d2") and reply[13] & 0x04, reply.hex()  # RST
    assert counter_delta(after, before, "rx_drop_too_short") == 2, (before, after)
    assert counter_delta(after, before, "rx_drop_bad_data_offset") == 2, (before, after)
    assert tunnel6.server.alive()
    no_errors(after)
    tunnel6.transfer(7001, "download", 2 * MB)
    no_errors(tunnel6.server.stop(), tunnel6.client.stop())


def test_psk_over_ipv6(pair6: Pair6, tmp_path):
    """A pre-shared key works over IPv6 as over IPv4: the handshake on the data
    socket, then byte-exact data; a client with another key gets nothing through."""
    psk = write_psk(tmp_path / "psk")
    pair6.start_server("--psk-file", psk)
    pair6.start_client("--psk-file", psk)
    up = pair6.transfer(7001, "upload", 4 * MB)
    pair6.transfer(7002, "download", 2 * MB)
    peers = pair6.server.new_peers()
    assert [(h, p) for h, p, _ in peers] == [(Pair6.CLIENT_IP, Pair6.PORT)]
    assert up["server_saw"] == peers[0][2] and in_pool(peers[0][2])

    client = pair6.client.stop()
    assert client.get("auth_authenticated", 0) >= 1, client
    no_errors(client)

    # the client again with another key: its TCP gets nowhere, the proof is refused
    pair6.start_client("--psk-file", write_psk(tmp_path / "other"))
    with pair6.c.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.settimeout(3)
        with contextlib.suppress(TimeoutError):  # nothing listens there: a RST would answer
            sock.connect((Pair6.SERVER_IP, 7003))
    server = wait_for(lambda: (c := pair6.server.counters())
                      and c.get("auth_fail_bad_proof", 0) >= 1 and c, 20, interval=0.2,
                      what="the other key refused")
    assert server.get("peers_added", 0) == 1, server  # still only the first client
    assert pair6.client.counters().get("auth_authenticated", 0) == 0
    client, server = pair6.client.stop(), pair6.server.stop()
    assert server.get("auth_accepted", 0) >= 1
    no_errors(client, server)
