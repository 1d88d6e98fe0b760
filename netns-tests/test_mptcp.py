"""MPTCP bonding over several udp-encap-tun client tunnels (one per WAN link)
to one udp-encap-tun server, set up with scripts/bond-client and
scripts/bond-server inside network namespaces (layout: mptcp_helpers.py).

Every transfer is MPTCP at both ends (IPPROTO_MPTCP) and checked byte-exact
with SHA-256.  Nothing here asserts a timing.
"""

from __future__ import annotations

import re

import pytest

from mptcp_helpers import LINKS, SERVER_ADDR, SERVER_TUN, BondLab, Endpoint, skip_reason, wait_for

MB = 1 << 20
SIZE = 40 * MB
RATE = "100mbit"  # each WAN path, both directions: a single path cannot carry it all


@pytest.fixture
def make_lab(tmp_path):
    """make_lab(mtus=(1500, 1500)) -> BondLab with both scripts' `up` done; always torn
    down (scripts' `down`, then the namespaces), the tunnels' logs printed (shown on failure)."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    labs = []

    def make(mtus=(1500, 1500), up=True) -> BondLab:
        lab = BondLab(tmp_path / f"lab{len(labs)}", mtus)
        labs.append(lab)
        if up:
            lab.up()
        return lab

    yield make
    for lab in labs:
        try:
            print(lab.logs())
        finally:
            lab.cleanup()


def tx_bytes(lab: BondLab) -> dict[str, int]:
    return {tun: lab.counters(tun).get("tx_bytes", 0) for *_, tun, _addr in LINKS}


def rx_bytes(lab: BondLab) -> dict[str, int]:
    return {tun: lab.counters(tun).get("rx_bytes", 0) for *_, tun, _addr in LINKS}


def assert_real_shares(before: dict, after: dict, minimum: float = 0.10) -> dict:
    moved = {tun: after[tun] - before[tun] for tun in after}
    total = sum(moved.values())
    for tun, n in moved.items():
        assert n >= minimum * total, f"{tun} carried {n} of {total} bytes: {moved}"
    return moved


def assert_both_paths_at_server(results: dict, lab: BondLab, hosts: set[str]) -> None:
    """The server's MPTCP socket had subflows from the generated addresses of both
    client tunnel ends (two peers of the one server tunnel, seen from *hosts*)."""
    peers = lab.new_peers()
    generated = {address for _host, _port, address in peers}
    assert len({(host, port) for host, port, _a in peers}) == 2, peers
    assert {host for host, _port, _a in peers} == hosts, peers
    assert len(generated) == 2, peers
    server = results["server"]
    assert server["max_subflows"] >= 1, server
    assert generated <= set(server["subflow_remotes"]), (server, peers)


# --------------------------------------------------------------------------- transfers


@pytest.mark.parametrize("direction, nat", [("upload", False), ("download", False),
                                            ("upload", True)],
                         ids=["upload", "download", "upload-behind-nat"])
def test_transfer_uses_both_tunnels(make_lab, direction, nat):
    """40 MB over MPTCP with both WAN paths shaped to the same rate: intact, and each
    client tunnel carries at least 10% of it (its tx_bytes for an upload, rx_bytes
    for a download); the server's socket has subflows from both tunnel ends' generated
    addresses.  Behind NAT the router masquerades both links to one address, so the
    two ends (same listen port) differ to the server by the port NAT gave them."""
    lab = make_lab()
    if nat:
        lab.masquerade()
    lab.shape(RATE)
    count = tx_bytes if direction == "upload" else rx_bytes
    before = count(lab)
    results = lab.transfer(SIZE, direction=direction)
    moved = assert_real_shares(before, count(lab))
    assert sum(moved.values()) >= SIZE  # payload plus TCP headers
    assert_both_paths_at_server(results, lab, {"10.77.3.1"} if nat else
                                {link[1].split("/")[0] for link in LINKS})
    client = results["client"]
    assert set(client["subflow_locals"]) == {addr for *_, addr in LINKS}, client


def _cut_when_under_way(cut):
    """A `during` hook: once a quarter of SIZE has arrived, cut."""
    seen = {}

    def during(receiver):
        wait_for(lambda: receiver.progress() >= SIZE // 4 or receiver.proc.poll() is not None,
                 30, "a quarter of the transfer")
        seen["at"] = receiver.progress()
        cut()
    return during, seen


@pytest.mark.parametrize("how", ["secondary-link-down", "primary-blackholed"])
def test_failover_mid_transfer(make_lab, how):
    """One WAN path dies a quarter into a 40 MB upload: `ip link set wan1 down` on the
    client (the join subflow's path), or a router that silently drops all the UDP of the
    primary path (the initial subflow's).  The transfer completes intact over the other."""
    lab = make_lab()
    lab.shape(RATE)
    if how == "secondary-link-down":
        def cut():
            lab.c.ip("link", "set", "wan1", "down")
        other_tun = "tunA"
    else:
        def cut():
            lab.drop_udp_on("rc0")
        other_tun = "tunB"
    during, seen = _cut_when_under_way(cut)
    before = tx_bytes(lab)
    results = lab.transfer(SIZE, during=during)
    assert seen["at"] < SIZE, "the transfer was over before the cut"
    after = tx_bytes(lab)
    # the surviving path carried what was left after the cut (at least)
    assert after[other_tun] - before[other_tun] >= SIZE - seen["at"], (seen, before, after)
    assert results["client"]["max_subflows"] >= 1
    if how == "primary-blackholed":
        drops = [int(m) for m in re.findall(r"counter packets (\d+)", lab.nft_counters())]
        assert sum(drops) > 0, lab.nft_counters()


def test_random_loss_on_one_path(make_lab):
    """2% random loss (nftables on the router, both directions) on the second path's
    UDP during a 40 MB upload and a 40 MB download: both intact."""
    lab = make_lab()
    lab.drop_udp_on("rc1", percent=2)
    lab.transfer(SIZE, port=7000, direction="upload")
    lab.transfer(SIZE, port=7001, direction="download")
    drops = [int(m) for m in re.findall(r"counter packets (\d+)", lab.nft_counters())]
    assert len(drops) == 2 and all(drops), lab.nft_counters()  # loss really hit both ways


def test_each_tunnel_follows_its_link_mtu(make_lab):
    """WAN MTUs 1500 and 1408: the tunnels' MTUs are 1492 and 1400 (read back with
    pyroute2) and 40 MB each way arrive intact with both tunnels in use."""
    lab = make_lab(mtus=(1500, 1408))
    assert lab.c.mtu("wan0") == 1500 and lab.c.mtu("wan1") == 1408
    assert lab.c.mtu("tunA") == 1492
    assert lab.c.mtu("tunB") == 1400
    assert lab.s.mtu(SERVER_TUN) == 1492
    lab.shape(RATE)
    before = tx_bytes(lab)
    lab.transfer(SIZE, port=7000, direction="upload")
    assert_real_shares(before, tx_bytes(lab))
    before = rx_bytes(lab)
    lab.transfer(SIZE, port=7001, direction="download")
    assert_real_shares(before, rx_bytes(lab))
    # nothing dropped for its size; a send buffer that is full for a moment (a loaded
    # machine, the shaped link backing up) is another matter and is not asserted on
    for *_, tun, _addr in LINKS:
        drops = {k: v for k, v in lab.counters(tun).items()
                 if "drop" in k and "not_ipv4" not in k and "send_buffer_full" not in k}
        assert not drops, (tun, drops)


def test_other_mptcp_connections_stay_out_of_the_tunnels(make_lab):
    """The MPTCP endpoints are for the whole client host: an MPTCP connection to some
    other host (here the router, 10.77.1.1) must not get subflows from the tun addresses
    -- their join SYNs would go into the tunnels and out as UDP to that host.  The
    per-link tables refuse them (unreachable default), the connection works over its
    own path, and neither tunnel sends a thing."""
    lab = make_lab()
    before = {tun: lab.counters(tun).get("tx_packets", 0) for *_, tun, _a in LINKS}
    server = Endpoint(lab, lab.r, ["--listen", 7000, "--recv", "--timeout", 20], "router-server")
    wait_for(lambda: server.lines() or server.proc.poll() is not None, 15, "the router's listener")
    client = Endpoint(lab, lab.c, ["--connect", "10.77.1.1:7000", "--send-seconds", 1.5,
                                   "--timeout", 20], "router-client")
    sent, got = client.result(40), server.result(20)
    assert sent.get("ok") and got.get("ok") and sent["match"], (sent, got)
    assert sent["mptcp"] and sent["subflow_locals"] == ["10.77.1.2"], sent
    nstat = lab.c.run("nstat", "-az", "MPTcpExtMPJoinSynTx", "MPTcpExtMPJoinSynTxConnectErr").stdout
    assert re.search(r"MPTcpExtMPJoinSynTx\s+0\b", nstat), nstat  # no join SYN went anywhere
    after = {tun: lab.counters(tun).get("tx_packets", 0) for *_, tun, _a in LINKS}
    assert after == before, (before, after)


# --------------------------------------------------------------------------- the scripts


def _snapshot(ns) -> dict:
    return {
        "rules": ns.ip("rule", "show"),
        "routes": ns.ip("-4", "route", "show", "table", "all"),
        "endpoints": ns.ip("mptcp", "endpoint", "show"),
        "limits": ns.ip("mptcp", "limits", "show"),
        "enabled": ns.run("sysctl", "-n", "net.mptcp.enabled").stdout,
        "links": sorted(re.findall(r"^\d+: ([^:@]+)", ns.ip("-o", "link", "show"), re.M)),
        "addresses": ns.ip("-4", "-o", "addr", "show"),
    }


def test_scripts_are_idempotent_and_down_undoes_exactly_their_changes(make_lab):
    """`up` twice changes nothing the second time; `down` stops the tunnels and restores
    rules, routes, endpoints, limits and net.mptcp.enabled, keeping what was there before."""
    lab = make_lab(up=False)
    for ns in (lab.c, lab.s):
        ns.sysctl("net.mptcp.enabled", 0)
        ns.ip("mptcp", "limits", "set", "subflow", 1, "add_addr_accepted", 0)
    # something of the admin's own that must survive
    lab.c.ip("addr", "add", "10.99.0.1/32", "dev", "lo")
    lab.c.ip("mptcp", "endpoint", "add", "10.99.0.1", "signal")
    lab.c.ip("rule", "add", "from", "10.99.0.1", "lookup", 99, "pref", 400)
    before = {"c": _snapshot(lab.c), "s": _snapshot(lab.s)}

    # --no-start with no tunnel running: fails, telling how to start it
    failed = lab.bond_client("up", "--no-start", "--wait", "1", check=False)
    assert failed.returncode != 0 and "start it with:" in failed.stderr, failed
    lab.bond_client("down")
    assert _snapshot(lab.c) == before["c"]

    lab.up()
    first = {"c": _snapshot(lab.c), "s": _snapshot(lab.s)}
    states = {"c": (lab.client_run / "client.state").read_text(),
              "s": (lab.server_run / "server.state").read_text()}
    pids = {tun: lab.tunnel_pid(tun) for tun in ("tunA", "tunB", SERVER_TUN)}
    lab.up()
    assert {"c": _snapshot(lab.c), "s": _snapshot(lab.s)} == first
    assert (lab.client_run / "client.state").read_text() == states["c"]
    assert (lab.server_run / "server.state").read_text() == states["s"]
    assert {tun: lab.tunnel_pid(tun) for tun in pids} == pids  # not restarted

    c = first["c"]
    assert c["enabled"].strip() == "1"
    assert "subflows 2" in c["limits"] and "add_addr_accepted 2" in c["limits"]
    for i, (_wan, _wc, _rif, _r_cidr, tun, addr) in enumerate(LINKS, start=1):
        assert f"{500 + i}:\tfrom {addr} lookup {100 + i}" in c["rules"]
        assert re.search(rf"^{addr} id \d+ subflow\s*$", c["endpoints"], re.M), c["endpoints"]
        assert f"unreachable default table {100 + i}" in c["routes"]
        assert f"{SERVER_ADDR} dev {tun} table {100 + i} scope link src {addr}" in c["routes"]
    assert "from all oif wan1 lookup 202" in c["rules"]
    assert "10.99.0.1 id" in c["endpoints"]
    assert first["s"]["enabled"].strip() == "1"
    assert "10.9.0.1/24" in first["s"]["addresses"]

    status = lab.bond_client("status").stdout
    assert status.count("tunnel: running") == 2 and "counters {" in status, status
    assert "tunnel: running" in lab.bond_server("status").stdout

    lab.bond_client("down")
    lab.bond_server("down")
    assert _snapshot(lab.c) == before["c"]
    assert _snapshot(lab.s) == before["s"]
    assert not list(lab.client_run.glob("*.pid")) and not list(lab.server_run.glob("*.pid"))
    # the tunnels exited cleanly (SIGTERM) and logged their counters
    for tun in pids:
        assert "counters {" in lab.tunnel_log(tun), lab.tunnel_log(tun)
    again = lab.bond_client("down")
    assert "nothing to undo" in again.stdout
