"""Data through the tunnel: bulk transfers, NAT, peers coming back."""

from __future__ import annotations

import ipaddress

from uetlab import Pair, wait_for

MB = 1 << 20
BULK = 32 * MB


def test_bulk_transfer_both_directions(tunnel: Pair):
    """32 MB each way, byte-exact (sha256 on both ends), through client and server."""
    # the data path asked for is the one running (it says so at start)
    expected = {"offload": "data path: offload", "simple": "data path: simple"}[tunnel.lab.datapath]
    for tool in (tunnel.server, tunnel.client):
        assert expected in tool.log(), tool.log()

    up = tunnel.transfer(7001, "upload", BULK, timeout=150)
    down = tunnel.transfer(7002, "download", BULK, timeout=150)

    # the server-side TCP saw the client as its generated address, from the pool
    peers = tunnel.server.new_peers()
    assert len(peers) == 1, tunnel.server.log()
    host, port, generated = peers[0]
    assert (host, port) == (Pair.CLIENT_IP, Pair.PORT)
    assert ipaddress.IPv4Address(generated) in ipaddress.IPv4Network("10.9.0.0/24")
    assert generated not in ("10.9.0.0", Pair.SERVER_TUN_IP, "10.9.0.255")
    assert up["server_saw"] == down["server_saw"] == generated
    # the client-side TCP talked to the server's real address
    assert up["client_saw"] == down["client_saw"] == Pair.SERVER_IP

    client = tunnel.client.stop()
    server = tunnel.server.stop()
    for counters in (client, server):
        assert counters.get("internal_error", 0) == 0, counters
        assert counters.get("rx_drop_write_error", 0) == 0, counters
        assert counters.get("tx_drop_send_error", 0) == 0, counters
    # at least the payload crossed the tunnel each way (headers and retransmissions on top)
    assert client["tx_bytes"] >= BULK and server["rx_bytes"] >= BULK, (client, server)
    assert server["tx_bytes"] >= BULK and client["rx_bytes"] >= BULK, (client, server)
    assert server["peers_added"] == 1


def test_peer_returns_after_timeout_gets_same_address(pair: Pair):
    """A peer idle for longer than --peer-timeout is forgotten; when it comes
    back it gets the same generated address."""
    pair.start_server("--peer-timeout", "2")
    pair.start_client()

    first = pair.transfer(7001, "upload", MB)
    peers_before = pair.server.new_peers()

    # idle: wait (no traffic) until the server reports the peer expired
    wait_for(lambda: pair.server.counters().get("peers_expired", 0) >= 1, 30, interval=0.5,
             what="peers_expired to move")

    second = pair.transfer(7002, "download", MB)
    peers = pair.server.new_peers()
    # admitted again after the expiry ...
    assert len(peers) > len(peers_before) >= 1, pair.server.log()
    # ... always as the same peer, always with the same generated address
    assert {(h, p) for h, p, _ in peers} == {(Pair.CLIENT_IP, Pair.PORT)}, pair.server.log()
    assert len({a for _, _, a in peers}) == 1, pair.server.log()
    assert first["server_saw"] == second["server_saw"] == peers[0][2]

    counters = pair.server.stop()
    assert counters["peers_added"] == len(peers) >= 2
    assert counters["peers_expired"] >= 1


NAT_TABLE = """
table ip uetnat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "%s" masquerade
    }
}
"""


def test_two_clients_behind_one_nat(lab):
    """Two clients behind one masquerading router, both using UDP source port
    5000: the server sees two peers with the same address and different ports,
    gives them distinct generated addresses, and concurrent transfers of both
    work."""
    s, r = lab.netns("s"), lab.netns("r")
    clients = [lab.netns("c1"), lab.netns("c2")]
    upstream, vs = lab.ifname("ru"), lab.ifname("vs")
    lab.veth(r, upstream, "198.51.100.1/24", s, vs, "198.51.100.2/24")
    r.sysctl("net.ipv4.ip_forward", 1)
    r.run("nft", "-f", "-", input=NAT_TABLE % upstream)

    server = lab.tool(s, "--interface", lab.ifname("ts"), "--listen-port", 5000,
                      "--bind-to-interface", vs)
    s.add_address(lab.ifname("ts"), "10.9.0.1/24")

    tools = []
    for i, c in enumerate(clients, 1):
        down, vc, tun = lab.ifname(f"rd{i}"), lab.ifname(f"vc{i}"), lab.ifname(f"tc{i}")
        lab.veth(r, down, f"10.1.{i}.1/24", c, vc, f"10.1.{i}.2/24")
        c.add_route("0.0.0.0/0", gateway=f"10.1.{i}.1")
        tools.append(lab.tool(c, "--interface", tun, "--listen-port", 5000,
                              "--bind-to-interface", vc, "--endpoint-port", 5000))
        c.add_address(tun, "10.9.0.2/32")  # the same inner address on both: they are separate
        c.add_route("198.51.100.2/32", dev=tun)

    size = 8 * MB
    transfers = {}
    for i, c in enumerate(clients, 1):
        for direction, port in (("upload", 7000 + 10 * i), ("download", 7001 + 10 * i)):
            transfers[i, direction] = lab.transfer(s, c, "198.51.100.2", port, direction, size,
                                                   timeout=150, wait=False)
    results = {key: t.wait() for key, t in transfers.items()}

    peers = server.new_peers()
    assert len(peers) == 2, server.log()
    (h1, p1, a1), (h2, p2, a2) = peers
    assert h1 == h2 == "198.51.100.1"  # both behind the router's address
    assert p1 != p2  # the NAT translated one of the two source ports
    assert 5000 in (p1, p2)
    assert a1 != a2
    saw = {i: {results[i, d]["server_saw"] for d in ("upload", "download")} for i in (1, 2)}
    # each client is one peer to the server: both its connections came from one address ...
    assert all(len(addrs) == 1 for addrs in saw.values()), saw
    # ... and the two clients came from the two distinct generated addresses
    assert saw[1] | saw[2] == {a1, a2}, (saw, peers)

    counters = server.stop()
    assert counters["peers_added"] == 2
    assert counters.get("internal_error", 0) == 0
    for tool in tools:
        assert tool.stop().get("internal_error", 0) == 0


def test_server_with_two_addresses_replies_from_the_one_peers_use(pair: Pair):
    """Clients reach the server at its second address: with --listen-address the
    replies leave from that address (the client's RX takes the datagram's source
    as the TCP source, so a reply from the primary address would be reset)."""
    second = "192.0.2.3"
    pair.s.add_address(pair.vs, f"{second}/24")
    pair.start_server("--listen-address", second)
    pair.start_client()
    pair.c.add_route(f"{second}/32", dev=pair.ctun)
    # asserts byte-exact
    result = pair.lab.transfer(pair.s, pair.c, second, 7001, "download", 2 * MB)
    assert result["client_saw"].startswith(second), result
