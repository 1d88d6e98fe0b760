"""Faults of links and host under a running tunnel: the tun deleted, the bound
interface deleted and re-created with the same name (what ppp, wwan and VPN
links do on every reconnect), the bound interface's MTU lowered mid-run."""

from __future__ import annotations

import json
import socket
import sys

from ops_tools import link_info, wait_counter
from uetlab import Pair, counter_delta, wait_for

MB = 1 << 20


def status(ns, tun: str) -> dict:
    out = ns.run(sys.executable, "-m", "udp_encap_tun", "status", "--interface", tun, "--json")
    return json.loads(out.stdout)


def set_mtu(ns, ifname: str, mtu: int) -> None:
    with ns.ipr() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], mtu=mtu)


def wait_bind_missing(pair) -> None:
    """Both ends' status says the bound interface is missing (the client's
    text status too), once the veth between them is deleted."""
    for ns, tun in ((pair.c, pair.ctun), (pair.s, pair.stun)):
        wait_for(lambda ns=ns, tun=tun: status(ns, tun)["bind_interface_present"] is False, 20,
                 what=f"status of {tun} to say the bound interface is missing")
    text = pair.c.run(sys.executable, "-m", "udp_encap_tun", "status", "--interface",
                      pair.ctun).stdout
    assert f"on {pair.vc} (MISSING" in text, text


def delete_link(ns, ifname: str) -> None:
    with ns.ipr() as ipr:
        ipr.link("del", index=ipr.link_lookup(ifname=ifname)[0])


def test_tun_deleted_ends_the_daemon_with_one_line(tunnel: Pair):
    """The server's tun deleted under it: exit 1 with one error line naming the
    tun (a service manager starts it again), after a handful of failed reads,
    not hundreds of thousands."""
    tunnel.transfer(7001, "upload", MB)
    delete_link(tunnel.s, tunnel.stun)
    assert tunnel.server.wait_exit(30) == 1, tunnel.server.log()
    log = tunnel.server.log()
    errors = [line for line in log.splitlines() if "error" in line.lower()]
    assert errors == [f"udp-encap-tun: error: tun {tunnel.stun} was deleted: exiting"], log
    assert "Traceback" not in log
    final = tunnel.server.counter_lines()[-1]
    assert final.get("tx_read_error", 0) < 100 and final.get("internal_error", 0) == 0, final
    assert tunnel.client.alive()  # the other end is unharmed


def test_persistent_tun_with_our_address_and_route_deleted(pair: Pair):
    """A tun made beforehand, given --tun-address and --route by the tool, then
    deleted: the same one line and exit 1, no traceback from undoing what the
    tool added to a tun that is no longer there."""
    pair.s.run("ip", "tuntap", "add", "dev", pair.stun, "mode", "tun")
    server = pair.lab.tool(pair.s, "--interface", pair.stun, "--listen-port", Pair.PORT,
                           "--bind-to-interface", pair.vs, "--tun-address", "10.9.0.1/24",
                           "--route", "10.77.0.0/16")
    delete_link(pair.s, pair.stun)
    assert server.wait_exit(30) == 1, server.log()
    errors = [line for line in server.log().splitlines() if "error" in line.lower()]
    assert errors == [f"udp-encap-tun: error: tun {pair.stun} was deleted: exiting"], server.log()
    assert "Traceback" not in server.log()


def test_explicit_mtu_above_the_link_is_cut_to_fit(pair: Pair):
    """Both tunnels with --mtu 1492 on a veth of MTU 1400: TCP sends packets of
    up to 1492 bytes into the tun, each is cut into segments that fit one
    datagram (tx_resegmented, nothing dropped as too long) and transfers each
    way arrive byte-exact."""
    for ns, vif in ((pair.c, pair.vc), (pair.s, pair.vs)):
        set_mtu(ns, vif, 1400)
    pair.start_server("--mtu", 1492)
    pair.start_client("--mtu", 1492)
    assert link_info(pair.c, pair.ctun)["mtu"] == 1492
    pair.transfer(7001, "upload", 4 * MB)
    pair.transfer(7002, "download", 4 * MB)
    for tool in (pair.client, pair.server):
        final = tool.stop()
        assert final.get("tx_resegmented", 0) > 0, final
        assert final.get("tx_drop_message_too_long", 0) == 0, final


def test_bound_interface_deleted_and_recreated(tunnel: Pair):
    """The veth both tunnels are bound to is deleted: status says the interface
    is missing and TCP into the tunnel is counted as dropped (no_interface).
    Re-created with the same names: both sockets are bound again (logged) and
    transfers each way arrive byte-exact."""
    tunnel.transfer(7001, "upload", MB)
    before = tunnel.client.counters()
    old = link_info(tunnel.c, tunnel.vc)["index"]
    delete_link(tunnel.c, tunnel.vc)  # takes its peer in S with it
    wait_bind_missing(tunnel)

    # TCP into the client tunnel meanwhile: its SYNs are dropped by name
    probe = tunnel.c.socket(type=socket.SOCK_STREAM)
    probe.setblocking(False)
    probe.connect_ex((Pair.SERVER_IP, 7999))
    try:
        wait_counter(tunnel.client, "tx_drop_no_interface")
    finally:
        probe.close()

    tunnel.lab.veth(tunnel.c, tunnel.vc, f"{Pair.CLIENT_IP}/24",
                    tunnel.s, tunnel.vs, f"{Pair.SERVER_IP}/24")
    assert link_info(tunnel.c, tunnel.vc)["index"] != old
    for tool, vif in ((tunnel.client, tunnel.vc), (tunnel.server, tunnel.vs)):
        wait_for(lambda vif=vif, tool=tool: f"bound interface {vif} is back" in tool.log(), 20,
                 what=f"{tool!r} to bind to {vif} again")
    for ns, tun in ((tunnel.c, tunnel.ctun), (tunnel.s, tunnel.stun)):
        assert status(ns, tun)["bind_interface_present"] is True
    tunnel.transfer(7002, "upload", 2 * MB)
    tunnel.transfer(7003, "download", 2 * MB)
    after = tunnel.client.stop()
    assert counter_delta(after, before, "tx_drop_send_error") == 0, after
    assert tunnel.server.stop().get("internal_error", 0) == 0


def test_link_mtu_lowered_mid_run(tunnel: Pair):
    """The veth's MTU lowered from 1500 to 1400 at both ends while a download
    runs: the tuns follow (1392) and so does the MSS clamp (1352); the running
    transfer and new ones each way arrive byte-exact."""
    assert link_info(tunnel.c, tunnel.ctun)["mtu"] == 1492
    running = tunnel.transfer(7001, "download", 24 * MB, wait=False)
    wait_counter(tunnel.client, "rx_bytes", 2 * MB)
    for ns, vif in ((tunnel.c, tunnel.vc), (tunnel.s, tunnel.vs)):
        set_mtu(ns, vif, 1400)
    for ns, tun in ((tunnel.c, tunnel.ctun), (tunnel.s, tunnel.stun)):
        wait_for(lambda ns=ns, tun=tun: link_info(ns, tun)["mtu"] == 1392, 20,
                 what=f"{tun} MTU 1392")
        doc = status(ns, tun)
        assert (doc["mtu"], doc["mss_clamp"], doc["link_mtu"]) == (1392, 1352, 1400), doc
    running.wait()
    tunnel.transfer(7002, "upload", 8 * MB)
    tunnel.transfer(7003, "download", 8 * MB)
    for tool in (tunnel.client, tunnel.server):
        assert "MTU 1400: tun" in tool.log(), tool.log()
        final = tool.stop()
        assert final.get("internal_error", 0) == 0, final
