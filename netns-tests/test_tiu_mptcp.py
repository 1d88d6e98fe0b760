"""MPTCP over two WANs in the TCP-in-UDP wire mode: the BondLab namespaces
(mptcp_helpers.py) with one --wire tcp-in-udp client tunnel per WAN and one
server tunnel, started directly (the bond scripts set up the default format).

The first subflow takes the first tunnel (its rule for any source), the
second subflow, bound to the second WAN's address by the MPTCP endpoint, the
second tunnel (its rule for that source).  The server sees both subflows from
the WANs' real addresses.  All namespaces run with rp_filter 2 in conf/all (so
the tuns get their anchor address)."""

from __future__ import annotations

import sys

import pytest

from mptcp_helpers import LINKS, SERVER_ADDR, BondLab, skip_reason, wait_for
from uetlab import DATAPATHS

MB = 1 << 20
SIZE = 24 * MB
RATE = "100mbit"
PORT = 7000
TUNS = {"tunA": "wan0", "tunB": "wan1"}


def start(lab: BondLab, ns, run, tun: str, *args) -> None:
    run.mkdir(parents=True, exist_ok=True)
    proc = ns.popen([sys.executable, "-m", "udp_encap_tun", "--wire", "tcp-in-udp",
                     "--interface", tun, *args, *lab.datapath_args], run / f"{tun}.log")
    lab.procs.append(proc)
    (run / f"{tun}.pid").write_text(str(proc.pid))
    wait_for(lambda: "ready:" in lab.tunnel_log(tun) or proc.poll() is not None, 20,
             f"{tun} to be ready")
    assert proc.poll() is None, lab.tunnel_log(tun)


@pytest.fixture(params=["offload", "simple"])
def lab(request, tmp_path):
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    lab = BondLab(tmp_path)
    lab.datapath_args = DATAPATHS[request.param]
    try:
        for ns in (lab.c, lab.s):
            ns.sysctl("net.mptcp.enabled", 1)
            ns.ip("mptcp", "limits", "set", "subflow", "2", "add_addr_accepted", "2")
        # the second WAN's UDP needs a route of its own (SO_BINDTODEVICE wan1)
        lab.c.ip("route", "add", "default", "via", LINKS[1][3].split("/")[0], "dev", "wan1",
                 "metric", "100")
        start(lab, lab.s, lab.server_run, "tunS", "--listen-port", PORT,
              "--bind-to-interface", "swan")
        for tun, wan in TUNS.items():
            start(lab, lab.c, lab.client_run, tun, "--endpoint-port", PORT, "--route",
                  f"{SERVER_ADDR}/32", "--bind-to-interface", wan)
        lab.c.ip("mptcp", "endpoint", "add", LINKS[1][1].split("/")[0], "subflow")
        yield lab
    finally:
        try:
            print(lab.logs())
        finally:
            lab.cleanup()


def tx_bytes(lab: BondLab) -> dict:
    return {tun: lab.counters(tun).get("tx_bytes", 0) for tun in TUNS}


def test_mptcp_uses_both_wans_with_real_addresses(lab):
    lab.shape(RATE)
    before = tx_bytes(lab)
    results = lab.transfer(SIZE, port=PORT)
    after = tx_bytes(lab)
    moved = {tun: after[tun] - before[tun] for tun in TUNS}
    assert all(n >= 0.1 * SIZE for n in moved.values()), moved
    wans = {link[1].split("/")[0] for link in LINKS}
    assert set(results["client"]["subflow_locals"]) == wans, results["client"]
    assert wans <= set(results["server"]["subflow_remotes"]), results["server"]


def test_mptcp_failover_when_a_wan_is_blackholed(lab):
    """A quarter into the upload the router drops all UDP of the first WAN: the
    transfer completes intact over the second tunnel."""
    lab.shape(RATE)
    seen = {}

    def during(receiver):
        wait_for(lambda: receiver.progress() >= SIZE // 4 or receiver.proc.poll() is not None,
                 30, "a quarter of the transfer")
        seen["at"] = receiver.progress()
        lab.drop_udp_on("rc0")

    before = tx_bytes(lab)
    lab.transfer(SIZE, port=PORT, during=during, timeout=90)
    after = tx_bytes(lab)
    assert seen["at"] < SIZE, "the transfer was over before the cut"
    assert after["tunB"] - before["tunB"] >= SIZE - seen["at"], (seen, before, after)
