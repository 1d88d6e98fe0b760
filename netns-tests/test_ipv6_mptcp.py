"""MPTCP bonding over one IPv4 and one IPv6 WAN (#13): scripts/bond-client with an
IPv4 link and an IPv6 link (its tunnel carries IPv6 TCP over IPv6), scripts/bond-server
with an IPv6 tun address beside the IPv4 one, announcing the server's IPv6 address.
One MPTCP connection gets a subflow over each; either WAN can fail mid-transfer.
Layout: mptcp_helpers.py (BondLab with MIXED_LINKS).  Nothing asserts a timing."""

from __future__ import annotations

import ipaddress

import pytest

from mptcp_helpers import MIXED_LINKS, BondLab, skip_reason, wait_for

MB = 1 << 20
SIZE = 40 * MB
RATE = "100mbit"


@pytest.fixture
def lab(tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = BondLab(tmp_path / "lab", links=MIXED_LINKS)
    try:
        lab.up()
        yield lab
    finally:
        try:
            print(lab.logs())
        finally:
            lab.cleanup()


def tx_bytes(lab: BondLab) -> dict[str, int]:
    return {tun: lab.counters(tun).get("tx_bytes", 0) for *_, tun, _addr in MIXED_LINKS}


@pytest.mark.parametrize("cut", ["ipv4-wan-blackholed", "ipv6-wan-down"])
def test_ipv4_and_ipv6_wans_failover_from_either(lab: BondLab, cut):
    """A 40 MB MPTCP upload uses both tunnels (the IPv6 one carrying an IPv6 subflow
    from the client's IPv6 tun address to the server's announced IPv6 address); a
    quarter in, one WAN dies (all UDP of the IPv4 path dropped by the router, or the
    IPv6 WAN link down) and the transfer completes intact over the other."""
    lab.shape(RATE)
    survivor = {"ipv4-wan-blackholed": "tunB", "ipv6-wan-down": "tunA"}[cut]
    seen = {}

    def during(receiver):
        start = tx_bytes(lab)
        # both subflows carry data before the cut (the IPv6 one joins after ADD_ADDR)
        wait_for(lambda: receiver.progress() >= SIZE // 4
                 and all(n > start[t] + MB for t, n in tx_bytes(lab).items())
                 or receiver.proc.poll() is not None, 40, "a quarter, over both tunnels")
        seen["at"] = receiver.progress()
        if cut == "ipv4-wan-blackholed":
            lab.drop_udp_on("rc0")
        else:
            lab.c.ip("link", "set", "wan1", "down")

    before = tx_bytes(lab)
    results = lab.transfer(SIZE, during=during, timeout=90)
    assert seen["at"] < SIZE, "the transfer was over before the cut"
    after = tx_bytes(lab)
    # what arrived after the cut crossed the surviving tunnel (at least)
    assert after[survivor] - before[survivor] >= SIZE - seen["at"], (seen, before, after)

    client, server = results["client"], results["server"]
    assert set(client["subflow_locals"]) == {"10.9.1.2", "fd00:9:2::2"}, client
    remotes = {ipaddress.ip_address(a) for a in server["subflow_remotes"]}
    assert any(a.version == 4 and a in ipaddress.ip_network("10.9.0.0/24") for a in remotes)
    assert any(a.version == 6 and a in ipaddress.ip_network("fd00:9::/64") for a in remotes)
    peers = lab.new_peers()
    assert {host for host, _port, _a in peers} == {"10.77.1.2", "2001:db8:77:2::2"}, peers


def _snapshot(ns) -> dict:
    return {family: {"rules": ns.ip(family, "rule", "show"),
                     "routes": ns.ip(family, "route", "show", "table", "all"),
                     "addresses": ns.ip(family, "-o", "addr", "show", "scope", "global")}
            for family in ("-4", "-6")} | {"endpoints": ns.ip("mptcp", "endpoint", "show")}


def test_mixed_scripts_are_idempotent_and_down_undoes_them(lab: BondLab):
    """With an IPv6 link: `up` again changes nothing; the IPv6 rules, tables, tun
    addresses and endpoints are there (the server's announced address a signal
    endpoint); `down` on both ends takes exactly those away again."""
    first = {"c": _snapshot(lab.c), "s": _snapshot(lab.s)}
    lab.up()
    assert {"c": _snapshot(lab.c), "s": _snapshot(lab.s)} == first
    c6, s6 = first["c"]["-6"], first["s"]["-6"]
    assert "502:\tfrom fd00:9:2::2 lookup 102" in c6["rules"], c6["rules"]
    assert "from all oif wan1 lookup 202" in c6["rules"], c6["rules"]
    assert "unreachable default dev lo table 102" in c6["routes"], c6["routes"]
    assert "2001:db8:77:3::2 dev tunB table 102" in c6["routes"], c6["routes"]
    assert "fd00:9:2::2/128" in c6["addresses"] and "fd00:9::1/64" in s6["addresses"]
    assert "fd00:9:2::2 id" in first["c"]["endpoints"]
    assert "2001:db8:77:3::2 id" in first["s"]["endpoints"] and \
        "signal" in first["s"]["endpoints"], first["s"]["endpoints"]
    status = lab.bond_client("status").stdout  # the main-table route of each family
    assert "main route to 2001:db8:77:3::2: 2001:db8:77:3::2 dev tunB" in status, status
    assert "main route to 10.77.3.2: 10.77.3.2 dev tunA" in status, status

    lab.bond_client("down")
    lab.bond_server("down")
    for ns, side in ((lab.c, "c"), (lab.s, "s")):
        now = _snapshot(ns)
        assert "fd00:9" not in now["-6"]["addresses"] + now["-6"]["rules"] + now["endpoints"]
        assert "2001:db8:77:3::2 id" not in now["endpoints"], (side, now)
    assert "lookup 102" not in _snapshot(lab.c)["-6"]["rules"]
