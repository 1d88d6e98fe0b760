"""Running it for real: without root, keepalives across an idle period, MSS
clamping for a LAN behind a router, --tun-address/--route and their removal,
and every daemon option from a config file and from the environment.

Helpers: ops_tools.py (unprivileged runs, /dev/net/tun mode, reading
addresses/routes/sockets, TCP driven from the test process)."""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import time

import pytest

from ops_tools import (
    CAP_NET_ADMIN,
    CAP_NET_RAW,
    TUN_NODE,
    AsUser,
    addresses,
    build_runtime,
    drain_nonblocking,
    exchange,
    link_info,
    process_credentials,
    push_nonblocking,
    routes,
    tcp_ack_segment,
    tcp_connect,
    tcp_listen,
    tcp_maxseg,
    tcp_syn_mss,
    tun_node_lock,
    tun_node_mode,
    udp_sockets,
    wait_counter,
)
from uetlab import Pair, assert_operator_error, require_root, wait_for

MB = 1 << 20


def set_mtu(ns, ifname: str, mtu: int) -> None:
    with ns.ipr() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=mtu)


def start_all(*tools):
    """Tools started with ``ready=False`` come up in parallel; wait for each."""
    for tool in tools:
        tool.wait_ready()
    return tools


# =========================================================================== 1. without root


@pytest.fixture(scope="session")
def runtime():
    """An interpreter and the tool's libraries, usable by uid 65534."""
    require_root()
    rt = build_runtime()
    yield rt
    rt.close()


@pytest.fixture
def tun_node():
    """/dev/net/tun as this test may change it: yields its original mode and
    restores that mode afterwards, whatever happens (serialised with other
    sessions running this test by a lock)."""
    with tun_node_lock():
        original = tun_node_mode()
        try:
            yield original
        finally:
            os.chmod(TUN_NODE, original)
            assert tun_node_mode() == original


def test_runs_without_root_with_net_admin_and_net_raw(pair: Pair, runtime, tun_node):
    """As uid 65534 with only CAP_NET_ADMIN and CAP_NET_RAW (ambient, through
    setpriv), and /dev/net/tun mode 0666 as common distributions ship it,
    both ends create their tun, set its MTU, address and route, bind their
    socket to the interface and carry a byte-exact transfer each way, then
    remove their tun on SIGTERM.  Without the capabilities: exit status 2 and
    one line naming the missing capability, nothing left behind."""
    lab = pair.lab
    server_args = ["--interface", pair.stun, "--listen-port", Pair.PORT,
                   "--bind-to-interface", pair.vs, "--tun-address", "10.9.0.1/24"]
    client_args = ["--interface", pair.ctun, "--listen-port", Pair.PORT,
                   "--bind-to-interface", pair.vc, "--endpoint-port", Pair.PORT, "--mtu", 1400,
                   "--tun-address", "10.9.0.2/32", "--route", f"{Pair.SERVER_IP}/32"]

    if not tun_node & 0o006:  # a node only root may open: the capabilities do not help
        result = AsUser(pair.s, runtime).run_tool(*server_args, *lab.datapath_args)
        assert_operator_error(result, TUN_NODE)
        assert not pair.s.link_exists(pair.stun)

    os.chmod(TUN_NODE, 0o666)  # as Debian/Fedora/Arch ship it; restored by the fixture

    result = AsUser(pair.s, runtime, caps=False).run_tool(*server_args, *lab.datapath_args)
    assert_operator_error(result, "CAP_NET_ADMIN")
    assert pair.s.links() == sorted(["lo", pair.vs])  # no tun left behind

    env = runtime.env
    server = lab.tool(AsUser(pair.s, runtime), *server_args, env=env, ready=False)
    client = lab.tool(AsUser(pair.c, runtime), *client_args, env=env, ready=False)
    start_all(server, client)

    for tool in (server, client):
        uid, caps = process_credentials(tool.pid)
        assert uid == 65534, f"{tool!r} runs as uid {uid}"
        assert caps == (1 << CAP_NET_ADMIN) | (1 << CAP_NET_RAW), f"CapEff {caps:#x}"
    info = link_info(pair.s, pair.stun)
    assert (info["kind"], info["mtu"]) == ("tun", 1500 - 8), info  # MTU of the veth minus 8
    assert link_info(pair.c, pair.ctun)["mtu"] == 1400
    # one socket for both families (ss: '*'), bound to the interface
    assert f"*%{pair.vs}:{Pair.PORT}" in udp_sockets(pair.s)
    assert f"*%{pair.vc}:{Pair.PORT}" in udp_sockets(pair.c)
    assert "10.9.0.1/24" in addresses(pair.s, pair.stun)
    assert "10.9.0.2/32" in addresses(pair.c, pair.ctun)
    assert routes(pair.c).get(f"{Pair.SERVER_IP}/32") == {pair.ctun}

    up = pair.transfer(7001, "upload", 2 * MB)
    down = pair.transfer(7002, "download", 2 * MB)
    assert up["client_saw"] == down["client_saw"] == Pair.SERVER_IP

    for tool in (client, server):
        counters = tool.stop()  # exit status 0
        assert counters.get("internal_error", 0) == 0, counters
    assert not pair.s.link_exists(pair.stun) and not pair.c.link_exists(pair.ctun)


# =========================================================================== 2. keepalive

# --peer-timeout on both servers: 3, not the 2 one might pick.  Keepalives leave on the
# ~1 s housekeeping tick whatever --keepalive says, so at 2 a stall of about one second of
# either process lets the entry of a peer that sends keepalives expire.  (Seen: 1 run in
# 12 under CPU load while store.py refreshed entries at most once a second; 0 in 16 since
# it refreshes at most every min(1 s, timeout / 4).)  3 tolerates a 2 s stall.
PEER_TIMEOUT = 3
IDLE = 8  # seconds without TCP on the connections (more than 2.5 peer timeouts)


def test_keepalive_keeps_an_idle_peer(lab):
    """Two tunnels side by side, servers with --peer-timeout 3: client K with
    --keepalive 0.5, client P without.  One TCP connection through each goes
    idle for 8 s, then carries data again (the SAME connection).  K's server
    never forgot K (peers_expired 0, keepalives received); P's server did
    (peers_expired >= 1, P came back and got its old address, so P's
    connection survives too)."""
    c = lab.netns("c")
    sides = {}
    for key, n, wan, extra in (("keepalive", 1, "192.0.2", ["--keepalive", "0.5"]),
                               ("plain", 2, "198.51.100", [])):
        s = lab.netns(f"s{n}")
        vc, vs = lab.ifname(f"vc{n}"), lab.ifname(f"vs{n}")
        lab.veth(c, vc, f"{wan}.1/24", s, vs, f"{wan}.2/24")
        server = lab.tool(s, "--interface", lab.ifname("ts"), "--listen-port", 5000,
                          "--bind-to-interface", vs, "--peer-timeout", PEER_TIMEOUT,
                          "--tun-address", f"10.9.{n}.1/24", ready=False)
        client = lab.tool(c, "--interface", lab.ifname(f"tc{n}"), "--listen-port", 5000 + n,
                          "--bind-to-interface", vc, "--endpoint-port", 5000,
                          "--tun-address", f"10.9.{n}.2/32", "--route", f"{wan}.2/32", *extra,
                          ready=False)
        sides[key] = {"s": s, "host": f"{wan}.2", "server": server, "client": client}
    start_all(*(t for side in sides.values() for t in (side["server"], side["client"])))

    for side in sides.values():
        listener = tcp_listen(side["s"], 7000)
        side["conn"] = tcp_connect(c, listener, side["host"], 7000)
        listener.close()
        exchange(*side["conn"])
        assert side["server"].counters().get("peers_expired", 0) == 0

    # idle: no TCP on either tunnel (the counters are read by signal, not through the tunnel)
    idle_since = time.monotonic()
    wait_for(lambda: sides["plain"]["server"].counters().get("peers_expired", 0) >= 1, 60,
             interval=0.5, what="the server without keepalives to forget its idle peer")
    time.sleep(max(0.0, IDLE - (time.monotonic() - idle_since)))

    for side in sides.values():
        exchange(*side["conn"])  # the same connection, after the idle period
        for sock in side["conn"]:
            sock.close()

    k_client = sides["keepalive"]["client"].stop()
    k_server = sides["keepalive"]["server"].stop()
    p_server = sides["plain"]["server"].stop()
    p_client = sides["plain"]["client"].stop()
    assert k_server.get("peers_expired", 0) == 0, k_server
    assert k_server.get("rx_keepalives", 0) > 0, k_server
    assert k_server["peers_added"] == 1, k_server
    assert k_client.get("tx_keepalives", 0) > 0, k_client
    assert p_server["peers_expired"] >= 1, p_server
    assert p_server.get("rx_keepalives", 0) == 0 and p_client.get("tx_keepalives", 0) == 0
    assert p_server["peers_added"] == 2, p_server  # forgotten, then back
    peers = sides["plain"]["server"].new_peers()
    assert peers[0][2] == peers[1][2], peers  # with its old generated address


# =========================================================================== 3. MSS clamping

ROUTER_NFT = """
table ip uetops {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "%(tun)s" masquerade
    }
    chain output {
        type filter hook output priority filter; policy accept;
        icmp type destination-unreachable icmp code frag-needed counter drop
    }
    chain forward {
        type filter hook forward priority filter; policy accept;
        icmp type destination-unreachable icmp code frag-needed counter drop
    }
}
"""

NO_PMTUD_NFT = """
table ip uetops {
    chain output {
        type filter hook output priority filter; policy accept;
        icmp type destination-unreachable icmp code frag-needed counter drop
    }
}
"""


def frag_needed_dropped(ns) -> int:
    out = ns.run("nft", "list", "chain", "ip", "uetops", "output").stdout
    return sum(int(n) for n in re.findall(r"counter packets (\d+)", out))


WAN_MTU = 1280  # router <-> middle
TUN_MTU = WAN_MTU - 8
CLAMP = TUN_MTU - 40  # 1232


def test_mss_clamping_for_a_lan_behind_the_client_router(lab):
    """H (LAN host, MTU 1500) -> R (router: client tunnel, masquerade into the
    tun) -(MTU 1280)- M (router) -(MTU 1500)- S (server).  R and M drop ICMP
    "fragmentation needed", so path MTU discovery cannot help.

    Clamped (default): the SYN of H (MSS 1460) and the SYN-ACK of S (MSS 1452)
    are lowered to 1232 by R's tunnel, and 4 MB each way arrive byte-exact.
    --no-clamp-mss on both ends: the connection opens (small packets), the
    server side sends with a larger MSS, and H's data never arrives at S: a
    black hole (R's kernel tried to send "fragmentation needed").  Only this
    direction is asserted to stall (S -> H stalls too: every datagram carries
    DF, UDP GSO batches included, and M drops its "fragmentation needed")."""
    h, r, m, s = (lab.netns(role) for role in ("h", "r", "m", "s"))
    hl, rl = lab.ifname("hl"), lab.ifname("rl")
    rw, mw = lab.ifname("rw"), lab.ifname("mw")
    ms, vs = lab.ifname("ms"), lab.ifname("vs")
    tun_r, tun_s = lab.ifname("tr"), lab.ifname("ts")
    lab.veth(h, hl, "10.20.0.2/24", r, rl, "10.20.0.1/24")
    lab.veth(r, rw, "192.0.2.1/24", m, mw, "192.0.2.254/24")
    lab.veth(m, ms, "198.51.100.254/24", s, vs, "198.51.100.2/24")
    set_mtu(r, rw, WAN_MTU)
    set_mtu(m, mw, WAN_MTU)
    h.add_route("0.0.0.0/0", gateway="10.20.0.1")
    r.add_route("198.51.100.0/24", gateway="192.0.2.254")
    s.add_route("192.0.2.0/24", gateway="198.51.100.254")
    for ns in (r, m):
        ns.sysctl("net.ipv4.ip_forward", 1)
    for ns in (h, s):
        ns.sysctl("net.ipv4.tcp_mtu_probing", 0)  # no black-hole detection either
    r.run("nft", "-f", "-", input=ROUTER_NFT % {"tun": tun_r})
    m.run("nft", "-f", "-", input=NO_PMTUD_NFT)
    server_ip = "198.51.100.2"

    def start(*extra):
        server = lab.tool(s, "--interface", tun_s, "--listen-port", 5000, "--bind-to-interface", vs,
                          "--tun-address", "10.9.0.1/24", *extra, ready=False)
        router = lab.tool(r, "--interface", tun_r, "--listen-port", 5000, "--bind-to-interface", rw,
                          "--endpoint-port", 5000, "--tun-address", "10.9.0.2/32",
                          "--route", f"{server_ip}/32", *extra, ready=False)
        return start_all(server, router)

    # -- clamped (the default) --------------------------------------------------------
    server, router = start()
    assert link_info(r, tun_r)["mtu"] == TUN_MTU
    assert link_info(s, tun_s)["mtu"] == 1500 - 8
    listener = tcp_listen(s, 7100)
    lan_sock, server_sock = tcp_connect(h, listener, server_ip, 7100)
    listener.close()
    assert tcp_syn_mss(lan_sock) == 1460  # what H asked for: more than the tunnel carries
    clamped_mss = tcp_maxseg(server_sock)
    assert clamped_mss <= CLAMP, clamped_mss
    assert tcp_maxseg(lan_sock) <= CLAMP
    exchange(lan_sock, server_sock, 256 * 1024)
    lan_sock.close()
    server_sock.close()

    up = lab.transfer(s, h, server_ip, 7101, "upload", 4 * MB, timeout=150)
    down = lab.transfer(s, h, server_ip, 7102, "download", 4 * MB, timeout=150)
    assert up["server_saw"] == down["server_saw"] == server.new_peers()[0][2]  # masqueraded
    r_counters, s_counters = router.stop(), server.stop()
    assert r_counters.get("tx_mss_clamped", 0) >= 3, r_counters  # H's SYNs, into the tunnel
    assert r_counters.get("rx_mss_clamped", 0) >= 3, r_counters  # S's SYN-ACKs, out of it
    for counters in (r_counters, s_counters):
        assert counters.get("internal_error", 0) == 0, counters

    # -- unclamped ----------------------------------------------------------------
    server, router = start("--no-clamp-mss")
    icmp_before = frag_needed_dropped(r)
    listener = tcp_listen(s, 7200)
    lan_sock, server_sock = tcp_connect(h, listener, server_ip, 7200)  # SYNs are small
    listener.close()
    unclamped_mss = tcp_maxseg(server_sock)
    assert unclamped_mss > CLAMP, unclamped_mss
    assert unclamped_mss > clamped_mss
    queued = push_nonblocking(lan_sock, 1 * MB)
    assert queued > 0
    # H's full-size segments reach R, which cannot put them in its tun (MTU 1272, DF set);
    # the "fragmentation needed" it sends back is dropped: nothing ever gets through
    wait_for(lambda: frag_needed_dropped(r) > icmp_before, 60, interval=0.2,
             what="R to refuse an oversized segment of H")
    time.sleep(3)  # retransmissions: RTOs go by, still nothing
    arrived = drain_nonblocking(server_sock)
    assert arrived == 0, f"{arrived} of {queued} bytes crossed without clamping"
    lan_sock.close()
    server_sock.close()
    r_counters, s_counters = router.stop(), server.stop()
    for counters in (r_counters, s_counters):
        assert "tx_mss_clamped" not in counters and "rx_mss_clamped" not in counters, counters


# ==================================================================== 4. --tun-address, --route


def tun_state(ns, tun):
    """(index or None, addresses, routes) for assertions."""
    info = link_info(ns, tun)
    return (info["index"] if info else None), addresses(ns, tun), routes(ns)


@pytest.mark.parametrize("datapath", ["offload"])
def test_tun_address_and_routes_added_then_removed(pair: Pair):
    """--tun-address and --route configure the tun (and the tunnel works with
    nothing else); SIGTERM takes them away again: with the created tun, and
    on a persistent tun (``ip tuntap add``) that stays, without them.  A route
    and an address that were there before start are left in place."""
    lab, s, c = pair.lab, pair.s, pair.c
    s.add_route("10.80.0.0/24", dev=pair.vs)  # the operator's route, before start

    def start(extra_server=(), extra_client=()):
        server = lab.tool(s, "--interface", pair.stun, "--listen-port", Pair.PORT,
                          "--bind-to-interface", pair.vs, "--tun-address", "10.9.0.1/24",
                          "--route", "10.77.0.0/16", "--route", "10.78.0.0/24",
                          "--route", "10.80.0.0/24", *extra_server, ready=False)
        client = lab.tool(c, "--interface", pair.ctun, "--listen-port", Pair.PORT,
                          "--bind-to-interface", pair.vc, "--endpoint-port", Pair.PORT,
                          "--tun-address", "10.9.0.2/32", "--route", f"{Pair.SERVER_IP}/32",
                          *extra_client, ready=False)
        return start_all(server, client)

    def check_running():
        _, s_addrs, s_routes = tun_state(s, pair.stun)
        _, c_addrs, c_routes = tun_state(c, pair.ctun)
        assert "10.9.0.1/24" in s_addrs and "10.9.0.2/32" in c_addrs
        assert s_routes["10.77.0.0/16"] == s_routes["10.78.0.0/24"] == {pair.stun}, s_routes
        assert s_routes["10.80.0.0/24"] == {pair.vs}, s_routes  # not replaced
        assert c_routes[f"{Pair.SERVER_IP}/32"] == {pair.ctun}, c_routes

    def check_removed():
        s_routes, c_routes = routes(s), routes(c)
        for gone in ("10.77.0.0/16", "10.78.0.0/24", "10.9.0.0/24"):
            assert gone not in s_routes, s_routes
        assert f"{Pair.SERVER_IP}/32" not in c_routes, c_routes
        assert s_routes["10.80.0.0/24"] == {pair.vs}, s_routes  # the operator's, still there
        assert "10.9.0.1/24" not in addresses(s, pair.stun)

    # -- tuns the tool creates ----------------------------------------------------
    server, client = start()
    assert "route 10.80.0.0/24 exists already" in server.log()
    check_running()
    pair.transfer(7001, "upload", MB)  # nothing configured by the test on either tun
    client.stop()
    server.stop()
    assert not s.link_exists(pair.stun) and not c.link_exists(pair.ctun)
    check_removed()

    # -- persistent tuns made beforehand ------------------------------------------------
    for ns, tun in ((s, pair.stun), (c, pair.ctun)):
        ns.run("ip", "tuntap", "add", "dev", tun, "mode", "tun")
        ns.set_up(tun)
    c.add_address(pair.ctun, "10.9.0.2/32")  # the operator's address, the one asked for
    c.add_route("10.79.0.0/24", dev=pair.ctun)  # the operator's route on the tun itself
    s_index, c_index = s.index(pair.stun), c.index(pair.ctun)
    server, client = start(extra_client=["--route", "10.79.0.0/24"])
    assert "route 10.79.0.0/24 exists already" in client.log()
    check_running()
    pair.transfer(7002, "download", MB)
    client.stop()
    server.stop()
    s_after, s_addrs, _ = tun_state(s, pair.stun)
    c_after, c_addrs, c_routes = tun_state(c, pair.ctun)
    assert (s_after, c_after) == (s_index, c_index)  # both tuns stay, the same devices
    check_removed()
    assert s_addrs == set(), s_addrs  # the address the tool added is gone
    assert c_addrs == {"10.9.0.2/32"}, c_addrs  # the operator's address stays
    assert c_routes.get("10.79.0.0/24") == {pair.ctun}, c_routes  # the operator's route stays


@pytest.mark.parametrize("datapath", ["offload"])
def test_operator_route_on_addressless_persistent_tun_survives(pair: Pair):
    """A persistent tun with a route but no address of its own; the tool adds
    --tun-address and finds the --route there already ("left as it is").  On
    exit it deletes the address - the last IPv4 address of the tun, so the
    kernel removes all routes through it, the operator's one included."""
    s = pair.s
    s.run("ip", "tuntap", "add", "dev", pair.stun, "mode", "tun")
    s.set_up(pair.stun)
    s.add_route("10.79.0.0/24", dev=pair.stun)
    server = pair.lab.tool(s, "--interface", pair.stun, "--listen-port", Pair.PORT,
                           "--bind-to-interface", pair.vs, "--tun-address", "10.9.0.1/24",
                           "--route", "10.79.0.0/24")
    assert "route 10.79.0.0/24 exists already: left as it is" in server.log()
    server.stop()
    assert s.link_exists(pair.stun)
    assert routes(s).get("10.79.0.0/24") == {pair.stun}, routes(s)


# ================================================================ 5. config file, environment

PSK = b"correct horse battery staple, 32"


def config_text(options: dict) -> str:
    """``key = value`` lines: flags as ``key = true``, repeated options as ``key = [a, b]``."""
    lines = ["# written by test_operations.py"]
    for key, value in options.items():
        if value is True:
            value = "true"
        elif isinstance(value, list):
            value = "[" + ", ".join(value) + "]"
        lines.append(f"{key} = {value}")
    return "\n".join(lines) + "\n"


def environment(options: dict) -> dict:
    """UDP_ENCAP_TUN_<KEY>: the same value syntax as in the file."""
    env = {}
    for key, value in options.items():
        if value is True:
            value = "true"
        elif isinstance(value, list):
            value = "[" + ", ".join(value) + "]"
        env["UDP_ENCAP_TUN_" + key.upper().replace("-", "_")] = str(value)
    return env


SOURCES = {
    "file": {"ports": (5055, 5056, 5057), "mtus": (1300, 1400), "pool": "10.9.0.128/25",
             "key": "file-key", "routes": ["10.70.0.0/24", "10.71.0.0/24"]},
    "env": {"ports": (5065, 5066, 5067), "mtus": (1320, 1420), "pool": "10.9.0.64/26",
            "key": "env-key", "routes": ["10.74.0.0/24", "10.75.0.0/24"]},
}


def expected_address(pool: str, key: bytes, peer) -> str:
    from udp_encap_tun.store import AddressPool

    p = AddressPool(pool, reserved=[ipaddress.IPv4Address("10.9.0.1").packed], key=key)
    return str(ipaddress.IPv4Address(next(p.candidates(peer))))


@pytest.mark.parametrize("datapath", ["simple"])  # the options themselves say no-offload
@pytest.mark.parametrize("source", list(SOURCES))
def test_every_option_from(pair: Pair, tmp_path, source):
    """Three tools whose command line is empty but for ``--config FILE`` (or
    entirely empty, everything in UDP_ENCAP_TUN_* variables), and what each
    option visibly does:

    A: a PSK server and its client: interface (tun of that name), listen-port
    and bind-to-interface (the socket ``*%dev:port``, both families), endpoint-port
    (client mode, reaches the server there), mtu (tun MTU), address-pool and
    address-key (the generated address is the key's hash into that pool),
    peer-timeout (the peer expires once its client stops), psk-file
    (authenticated), tun-address and route (present; a list of two), keepalive
    (keepalives counted), no-clamp-mss (a SYN with MSS 1460 crosses both ends
    unclamped), no-offload (simple data path), log-level (DEBUG lines).
    B: an open server: max-peers 1 and admission-rate 1 (of three new peers at
    one instant one is admitted and two refused by the rate; a later one is
    refused as the store is full)."""
    lab, cfg = pair.lab, SOURCES[source]
    server_port, client_port, open_port = cfg["ports"]
    server_mtu, client_mtu = cfg["mtus"]
    psk = tmp_path / "psk"
    psk.write_bytes(PSK)
    psk.chmod(0o600)
    tun_a, tun_c, tun_b = lab.ifname("ta"), lab.ifname("ca"), lab.ifname("tb")
    options = {
        "server": {"interface": tun_a, "listen-port": server_port, "bind-to-interface": pair.vs,
                   "mtu": server_mtu, "address-pool": cfg["pool"], "address-key": cfg["key"],
                   "peer-timeout": 2, "psk-file": psk, "tun-address": "10.9.0.1/24",
                   "route": cfg["routes"], "no-clamp-mss": True, "no-offload": True,
                   "log-level": "debug"},
        "client": {"interface": tun_c, "listen-port": client_port, "bind-to-interface": pair.vc,
                   "endpoint-port": server_port, "mtu": client_mtu, "psk-file": psk,
                   "tun-address": "10.9.0.2/32", "route": [f"{Pair.SERVER_IP}/32", "10.72.0.0/24"],
                   "keepalive": 0.5, "no-clamp-mss": True, "no-offload": True,
                   "log-level": "debug"},
        "open": {"interface": tun_b, "listen-port": open_port, "bind-to-interface": pair.vs,
                 "tun-address": "10.10.0.1/24", "max-peers": 1, "admission-rate": 1},
    }
    tools = {}
    for name, ns in (("server", pair.s), ("client", pair.c), ("open", pair.s)):
        if source == "file":
            path = tmp_path / f"{name}.conf"
            path.write_text(config_text(options[name]))
            tools[name] = lab.tool(ns, "--config", path, datapath=False, ready=False)
        else:
            tools[name] = lab.tool(ns, env=environment(options[name]), datapath=False, ready=False)
    start_all(*tools.values())
    server, client, open_server = tools["server"], tools["client"], tools["open"]
    for name, tool in tools.items():  # nothing else on the command line
        expected_args = [] if source == "env" else ["--config", str(tmp_path / f"{name}.conf")]
        assert tool.args == expected_args

    # interface, mtu, listen-port, bind-to-interface, endpoint-port, no-offload, log-level
    assert link_info(pair.s, tun_a)["kind"] == "tun" and link_info(pair.s, tun_b)["kind"] == "tun"
    assert link_info(pair.s, tun_a)["mtu"] == server_mtu
    assert link_info(pair.c, tun_c)["mtu"] == client_mtu
    for port in (server_port, open_port):
        assert f"*%{pair.vs}:{port}" in udp_sockets(pair.s)  # both families (ss: '*')
    assert f"*%{pair.vc}:{client_port}" in udp_sockets(pair.c)
    assert f"server mode, tun {tun_a}, UDP port {server_port}" in server.log()
    assert f"client mode, tun {tun_c}, UDP port {client_port}" in client.log()
    for tool in (server, client):
        assert "INFO data path: simple" in tool.log(), tool.log()[-2000:]
        assert " DEBUG " in tool.log()
    assert " DEBUG " not in open_server.log() and "data path: offload" in open_server.log()
    # tun-address, route (two each)
    assert "10.9.0.1/24" in addresses(pair.s, tun_a) and "10.9.0.2/32" in addresses(pair.c, tun_c)
    s_routes, c_routes = routes(pair.s), routes(pair.c)
    for cidr in cfg["routes"]:
        assert s_routes.get(cidr) == {tun_a}, s_routes
    for cidr in (f"{Pair.SERVER_IP}/32", "10.72.0.0/24"):
        assert c_routes.get(cidr) == {tun_c}, c_routes

    # no-clamp-mss: make the client's SYN ask for MSS 1460, more than either tun carries
    pair.c.run("ip", "route", "change", f"{Pair.SERVER_IP}/32", "dev", tun_c, "advmss", "1460")
    listener = tcp_listen(pair.s, 7000)
    sock, accepted = tcp_connect(pair.c, listener, Pair.SERVER_IP, 7000)
    listener.close()
    assert tcp_syn_mss(sock) == 1460
    exchange(sock, accepted)
    sock.close()
    accepted.close()
    result = pair.transfer(7001, "upload", MB)
    assert "tx_mss_clamped" not in client.counters()  # 1460 > client MTU - 40, left alone
    assert "rx_mss_clamped" not in server.counters()  # 1460 > server MTU - 40, left alone

    # psk-file: the client proved it knows the key before its data went through
    assert f"authenticated to {Pair.SERVER_IP}:{server_port}" in client.log()
    assert server.counters().get("auth_accepted", 0) >= 1
    # address-pool, address-key: the generated address is the key's hash into the pool
    peer = (Pair.CLIENT_IP, client_port)
    expected = expected_address(cfg["pool"], cfg["key"].encode(), peer)
    from udp_encap_tun.auth import Keys
    assert expected != expected_address(cfg["pool"], Keys(PSK).address, peer)  # the key matters
    assert set(server.new_peers()) == {(*peer, expected)}, server.new_peers()
    assert result["server_saw"] == expected
    assert ipaddress.IPv4Address(expected) in ipaddress.IPv4Network(cfg["pool"])
    # keepalive: the idle client keeps sending them
    wait_counter(server, "rx_keepalives", 1)
    assert client.counters().get("tx_keepalives", 0) >= 1

    # admission-rate 1: three new peers at the same instant (the server is stopped while they
    # send, so it reads all three in one go): one admitted, two refused by the rate
    senders = [pair.c.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(4)]
    try:
        for i, sock in enumerate(senders):  # on the wire, not into the client's tun
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, pair.vc.encode())
            sock.bind((Pair.CLIENT_IP, 6001 + i))
        before = open_server.counters()
        with open_server.paused():
            for sock in senders[:3]:
                sock.sendto(tcp_ack_segment(), (Pair.SERVER_IP, open_port))
        counters = wait_for(lambda: (c := open_server.counters()).get("rx_drop_admission_rate", 0)
                            + c.get("peers_added", 0) >= 3 and c, 30, interval=0.3,
                            what="the open server to take the three new peers")
        assert counters.get("peers_added", 0) - before.get("peers_added", 0) == 1, counters
        assert counters["rx_drop_admission_rate"] == 2, counters
        # max-peers 1: once the rate allows again, a fourth is refused as the store is full
        def refused_full():
            senders[3].sendto(tcp_ack_segment(), (Pair.SERVER_IP, open_port))
            time.sleep(0.3)
            return open_server.counters().get("rx_drop_peers_full", 0) >= 1
        wait_for(refused_full, 30, interval=0.2, what="a new peer refused by max-peers 1")
        assert open_server.counters()["peers_added"] == 1
    finally:
        for sock in senders:
            sock.close()

    # peer-timeout 2: once its client is gone (no more keepalives), the peer is forgotten
    client.stop()
    wait_counter(server, "peers_expired", 1)
    for tool in (server, open_server):
        assert tool.stop().get("internal_error", 0) == 0


@pytest.mark.parametrize("datapath", ["offload"])
def test_fractional_admission_rate_still_admits(pair: Pair):
    """--admission-rate 0.5 (one new peer every two seconds, accepted by the
    option parser) must still let a peer in."""
    server = pair.start_server("--admission-rate", "0.5")
    with pair.c.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((Pair.CLIENT_IP, 6001))

        def admitted():
            sock.sendto(tcp_ack_segment(), (Pair.SERVER_IP, Pair.PORT))
            time.sleep(0.5)
            return server.counters().get("peers_added", 0) >= 1
        try:
            wait_for(admitted, 10, what="a peer admitted at --admission-rate 0.5")
        finally:
            counters = server.stop()
    assert counters.get("rx_drop_admission_rate", 0) == 0, counters
