"""scripts/bench's choice of configurations, git revisions included (no root, no network)."""

import importlib.machinery
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def load_bench():
    loader = importlib.machinery.SourceFileLoader("scripts_bench", str(REPO / "scripts" / "bench"))
    spec = importlib.util.spec_from_loader("scripts_bench", loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


bench = load_bench()


def fake_resolve(rev):
    known = {"old": "78e8943", "78e8943": "78e8943", "main": "abc1234"}
    if rev not in known:
        raise ValueError(f"{rev!r} is not a commit")
    return known[rev]


def expand(configs, revs=(), wire=True):
    return bench.expand_configs(configs.split(","), list(revs), resolve=fake_resolve,
                                has_wire_mode=lambda rev: wire)


def test_rev_adds_a_twin_after_each_tunnel_configuration():
    keys, notes = expand("bare,udp-encap-tun,no-offload,socat", ["old"])
    assert keys == ["bare", "udp-encap-tun", "udp-encap-tun@78e8943", "no-offload",
                    "no-offload@78e8943", "socat"]
    assert notes == []


def test_two_revisions_and_aliases():
    keys, _ = expand("uet,--no-offload", ["old", "main"])
    assert keys == ["udp-encap-tun", "udp-encap-tun@78e8943", "udp-encap-tun@abc1234",
                    "no-offload", "no-offload@78e8943", "no-offload@abc1234"]


def test_key_at_rev_in_configs_is_normalised_and_not_doubled():
    keys, _ = expand("offload@old,udp-encap-tun", ["78e8943"])
    assert keys == ["udp-encap-tun@78e8943", "udp-encap-tun"]


def test_revision_without_wire_mode_leaves_out_tcp_in_udp_twins():
    keys, notes = expand("udp-encap-tun,tcp-in-udp", ["old"], wire=False)
    assert keys == ["udp-encap-tun", "udp-encap-tun@78e8943", "tcp-in-udp"]
    assert notes == ["tcp-in-udp@78e8943 left out: 78e8943 has no --wire tcp-in-udp"]
    keys, _ = expand("tcp-in-udp", ["old"], wire=True)
    assert keys == ["tcp-in-udp", "tcp-in-udp@78e8943"]


def test_rev_with_no_tunnel_configuration_says_so():
    keys, notes = expand("bare,socat", ["old"])
    assert keys == ["bare", "socat"]
    assert notes == ["--rev added nothing: no udp-encap-tun configuration is chosen"]


@pytest.mark.parametrize("configs, revs, message", [
    ("nope", [], "unknown configuration 'nope'"),
    ("bare@old", [], "only udp-encap-tun configurations take @REV"),
    ("udp-encap-tun@nope", [], "'nope' is not a commit"),
    ("udp-encap-tun", ["nope"], "'nope' is not a commit"),
])
def test_operator_mistakes(configs, revs, message):
    with pytest.raises(ValueError, match=message):
        expand(configs, revs)


def test_labels_name_the_revision():
    assert bench.key_label("udp-encap-tun@78e8943") == "udp-encap-tun@78e8943"
    assert bench.key_label("no-offload@78e8943") == "udp-encap-tun@78e8943 --no-offload"
    assert bench.key_label("no-offload") == "udp-encap-tun --no-offload"


def test_export_runs_that_revisions_code_and_is_removed(tmp_path):
    """HEAD exported: its package imports from the export (not from this tree or the cwd),
    and cleanup leaves nothing."""
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"],
                      capture_output=True).returncode:
        pytest.skip("not a git checkout")
    rev = bench.resolve_rev("HEAD")
    trees = bench.RevTrees()
    try:
        tree = trees.get(rev)
        r = subprocess.run([sys.executable, "-c", bench.IMPORT_ALL], cwd=tree,
                           env={"PYTHONPATH": str(tree)}, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        imported = Path(r.stdout.strip()).resolve()
        assert imported == (tree / "udp_encap_tun" / "__init__.py").resolve()
        assert trees.get(rev) == tree  # exported once
        root = trees.root
    finally:
        trees.cleanup()
    assert not root.exists()


def test_export_of_a_non_commit_fails_in_setup():
    trees = bench.RevTrees()
    try:
        with pytest.raises(bench.SetupError, match="exporting 0000000 failed"):
            trees.get("0000000")
    finally:
        trees.cleanup()


def test_compare_revisions_pairs_rounds_and_skips_failures():
    def row(rnd, key, up, rate, cpu_txn, rr_error=False):
        return {"round": rnd, "config": key, "up": {"gbps": up, "cpu_s_per_gb": 5.0},
                "down": {"error": "iperf3 exit 1"},
                "rr": {"error": "x"} if rr_error else {"rate": rate, "cpu_us_per_txn": cpu_txn}}
    rounds = [row(1, "udp-encap-tun", 2.0, 3000, 200),
              row(1, "udp-encap-tun@78e8943", 1.0, 2000, 250),
              row(2, "udp-encap-tun@78e8943", 1.0, 1000, 100),
              row(2, "udp-encap-tun", 1.5, 0, 0, True),
              row(3, "udp-encap-tun", 1.0, 1000, 100),
              row(3, "udp-encap-tun@78e8943", 1.0, 1000, 100)]
    (c,) = bench.compare_revisions(rounds, ["udp-encap-tun", "udp-encap-tun@78e8943", "bare"])
    assert (c["base"], c["rev"]) == ("udp-encap-tun", "78e8943")
    assert c["upload Gb/s"] == {"median": 1.5, "low": 1.0, "high": 2.0, "rounds": 3}
    assert c["download Gb/s"] is None  # failed everywhere
    assert c["RR/s"] == {"median": 1.25, "low": 1.0, "high": 1.5, "rounds": 2}  # round 2 failed
    assert c["RR CPU µs/transaction"]["median"] == 0.9
    assert c["CPU s/GB up"]["median"] == 1.0
    # a revision run without this tree's configuration has nothing to compare with
    assert bench.compare_revisions(rounds, ["udp-encap-tun@78e8943"]) == []


def test_hopcount_counts_the_same_work_twice():
    """scripts/bench_tools/hopcount.py: bytecodes per packet of both handlers on
    both paths, the same in two runs (a count, not a timing)."""
    from udp_encap_tun import build

    if build.compiled_modules():
        pytest.skip("compiled modules run no bytecode: hopcount.py needs the pure build")
    tool = Path(__file__).resolve().parent.parent / "scripts" / "bench_tools" / "hopcount.py"

    def counts():
        out = subprocess.run([sys.executable, str(tool)], capture_output=True, text=True,
                             check=True, timeout=120).stdout
        return re.findall(r"(simple|offload)\s+TX\s+([\d.]+)\s+RX\s+([\d.]+)", out)

    first = counts()
    assert [path for path, _, _ in first] == ["simple", "offload"]
    assert all(float(tx) > 50 and float(rx) > 50 for _, tx, rx in first)
    assert counts() == first
