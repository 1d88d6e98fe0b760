"""The operator's side: mistakes, the tun's life cycle, config file and environment."""

from __future__ import annotations

import socket
import sys

import pytest

from uetlab import Pair, assert_operator_error, counter_delta, wait_for

MB = 1 << 20


def run_tool(lab, ns, *args, env=None):
    """Run udp-encap-tun to completion (it is expected to fail fast)."""
    argv = [sys.executable, "-m", "udp_encap_tun", *args, *lab.datapath_args]
    return ns.run(*argv, check=False, timeout=30, env=env)


OPERATOR_ERRORS = {
    "no such bind interface": (["--bind-to-interface", "nosuchdev0"], ["nosuchdev0"]),
    "pool not a CIDR": (["--address-pool", "banana"], ["banana"]),
    "pool prefix too long": (["--address-pool", "10.9.0.0/33"], []),
    "unknown option": (["--bogus-option"], ["--bogus-option"]),
    "listen port out of range": (["--listen-port", "70000"], []),
    "keepalive in server mode": (["--keepalive", "5"], ["--keepalive"]),
    "bad --tun-address": (["--tun-address", "10.9.0.1/40"], ["10.9.0.1/40"]),
    # the tun exists by then: it must be removed again
    "MTU the tun refuses": (["--mtu", "1000000"], ["1000000"]),
    "MTU too small": (["--mtu", "10"], []),
    # a name the kernel would take as a pattern (and make tun0 of): refused, none made
    "interface name pattern": (["--interface", "tun%d"], ["tun%d"]),
    "key file is a directory": (["--psk-file", "/"], ["key file /: a directory"]),
    "server option on a client": (["--endpoint-port", "5000", "--max-peers", "5"],
                                  ["--max-peers", "client"]),
    # an interface that is there but no tun (the veth itself): refused, and kept
    "interface is not a tun": (["--interface", "{vs}"], ["{vs}"]),
}


@pytest.mark.parametrize("case", list(OPERATOR_ERRORS))
def test_operator_error(pair: Pair, case):
    """Exit status 2, one ``udp-encap-tun: error:`` line, no tun left behind."""
    extra, needles = OPERATOR_ERRORS[case]
    extra = [x.format(vs=pair.vs) for x in extra]
    needles = [x.format(vs=pair.vs) for x in needles]
    args = {"--interface": pair.stun, "--listen-port": "5000", "--bind-to-interface": pair.vs}
    rest = []
    for i in range(0, len(extra), 2):
        if extra[i] in args:
            args[extra[i]] = extra[i + 1]
        else:
            rest.extend(extra[i:i + 2])
    argv = [x for kv in args.items() for x in kv] + rest
    links_before = pair.s.links()
    result = run_tool(pair.lab, pair.s, *argv)
    assert_operator_error(result, *needles)
    assert not pair.s.link_exists(pair.stun)
    assert pair.s.links() == links_before  # nothing added, nothing removed


def test_port_already_in_use(pair: Pair):
    """A second tunnel on a port in use, and a port held by another socket:
    exit 2, and the running tunnel and its tun are unharmed."""
    server = pair.start_server()
    other_tun = pair.lab.ifname("tx")
    result = run_tool(pair.lab, pair.s, "--interface", other_tun, "--listen-port", Pair.PORT,
                      "--bind-to-interface", pair.vs)
    assert_operator_error(result, str(Pair.PORT))
    assert not pair.s.link_exists(other_tun)

    with pair.s.socket(socket.AF_INET, socket.SOCK_DGRAM) as holder:
        holder.bind(("0.0.0.0", 5099))
        result = run_tool(pair.lab, pair.s, "--interface", other_tun, "--listen-port", 5099,
                          "--bind-to-interface", pair.vs)
    assert_operator_error(result, "5099")
    assert not pair.s.link_exists(other_tun)

    assert server.alive() and pair.s.link_exists(pair.stun)
    pair.start_client()
    pair.transfer(7001, "upload", MB)
    server.stop()


def test_created_tun_is_removed_on_sigterm(pair: Pair):
    server = pair.start_server()
    assert pair.s.link_exists(pair.stun)
    # a tun it creates keeps IPv6 on, without router solicitations to drop
    for key, value in (("disable_ipv6", "0"), ("accept_ra", "0"), ("router_solicitations", "0")):
        got = pair.s.run("sysctl", "-n", f"net.ipv6.conf.{pair.stun}.{key}").stdout.strip()
        assert got == value, key
    final = server.stop()  # exit status 0
    assert "tx_drop_not_ipv4" not in final, final
    assert not pair.s.link_exists(pair.stun)


def test_existing_tun_is_left_in_place(pair: Pair):
    """A tun made beforehand (persistent, ``ip tuntap add``) is used, and still
    there after the tool exits - also after a second run on it - with the
    IPv6 settings the tool changed while it ran put back."""
    pair.s.run("ip", "tuntap", "add", "dev", pair.stun, "mode", "tun")
    index = pair.s.index(pair.stun)
    accept_ra = f"net.ipv6.conf.{pair.stun}.accept_ra"
    pair.s.sysctl(accept_ra, 2)
    server = pair.start_server()
    assert pair.s.run("sysctl", "-n", accept_ra).stdout.strip() == "0"
    pair.start_client()
    pair.transfer(7001, "download", MB)
    server.stop()
    assert pair.s.run("sysctl", "-n", accept_ra).stdout.strip() == "2"
    assert pair.s.index(pair.stun) == index

    # again, on the same tun, which kept its address
    server = pair.lab.tool(pair.s, "--interface", pair.stun, "--listen-port", Pair.PORT,
        "--bind-to-interface", pair.vs)
    pair.transfer(7002, "upload", MB)
    server.stop()
    assert pair.s.index(pair.stun) == index


def test_config_file_sets_options(pair: Pair, tmp_path):
    """listen-port (and the rest) from --config: the server listens where the
    file says and a client configured the same way gets through."""
    server_conf = tmp_path / "server.conf"
    server_conf.write_text(f"interface = {pair.stun}\nlisten-port = 5055\n"
                           f"bind-to-interface = {pair.vs}\n")
    client_conf = tmp_path / "client.conf"
    client_conf.write_text("# client side\nlisten-port = 5066\nendpoint-port = 5055\n")

    server = pair.start_server("--config", server_conf, port=None)
    assert "UDP port 5055" in server.log()
    pair.client = pair.lab.tool(pair.c, "--config", client_conf, "--interface", pair.ctun,
                                "--bind-to-interface", pair.vc)
    assert "client mode" in pair.client.log() and "UDP port 5066" in pair.client.log()
    pair.c.add_address(pair.ctun, f"{Pair.CLIENT_TUN_IP}/32")
    pair.c.add_route(f"{Pair.SERVER_IP}/32", dev=pair.ctun)

    pair.transfer(7001, "upload", MB)
    assert [(h, p) for h, p, _ in server.new_peers()] == [(Pair.CLIENT_IP, 5066)]
    server.stop()


def test_environment_sets_options(pair: Pair):
    """UDP_ENCAP_TUN_PEER_TIMEOUT shortens the peer timeout (the peer expires),
    UDP_ENCAP_TUN_LISTEN_PORT sets the port; the command line beats the environment."""
    server = pair.start_server(port=None, env={"UDP_ENCAP_TUN_PEER_TIMEOUT": "2",
                                               "UDP_ENCAP_TUN_LISTEN_PORT": "5077"})
    assert "UDP port 5077" in server.log()
    client = pair.start_client(endpoint_port=5077,
                               env={"UDP_ENCAP_TUN_LISTEN_PORT": "5999"})  # overridden
    assert "UDP port 5000" in client.log()

    first = pair.transfer(7001, "upload", MB)
    wait_for(lambda: server.counters().get("peers_expired", 0) >= 1, 30, interval=0.5,
             what="peers_expired to move with UDP_ENCAP_TUN_PEER_TIMEOUT=2")
    before = server.counters()
    second = pair.transfer(7002, "download", MB)
    after = server.stop()
    assert counter_delta(after, before, "peers_added") >= 1  # back after the expiry
    assert first["server_saw"] == second["server_saw"]


def test_sigterm_during_transfer(pair: Pair):
    """SIGTERM in the middle of traffic: both ends exit 0 and remove their tuns."""
    server = pair.start_server()
    client = pair.start_client()
    pair.lab.transfer(pair.s, pair.c, Pair.SERVER_IP, 7001, "upload", 256 * MB,
                      timeout=60, wait=False)
    wait_for(lambda: server.counters().get("rx_packets", 0) > 100, 30, interval=0.2,
             what="traffic through the tunnel")
    for tool, ns, tun in ((server, pair.s, pair.stun), (client, pair.c, pair.ctun)):
        counters = tool.stop()
        assert counters.get("internal_error", 0) == 0
        assert not ns.link_exists(tun)


def test_mtu_larger_than_the_link_warns(pair: Pair):
    """--mtu 9000 on a 1500 veth: it starts (the operator may know better), with one
    WARNING line at start saying what will happen to the largest datagrams."""
    server = pair.start_server("--mtu", "9000")
    warnings = [line for line in server.log().splitlines() if " WARNING " in line]
    assert len(warnings) == 1, server.log()
    assert "--mtu 9000" in warnings[0] and f"{pair.vs}'s MTU 1500" in warnings[0]
    assert "cut into segments that fit" in warnings[0] and "tx_resegmented" in warnings[0]
    assert server.alive()
    server.stop()
