"""Fixtures for the end-to-end tests of udp-encap-tun in network namespaces.

Every test gets a ``lab`` (see uetlab.Lab) whose namespaces are named
``uetnt<6 hex>-<role>``, unique per test, and which is torn down whatever the
outcome: processes killed, namespaces deleted.  Tests that run the tool are
parametrized over the two data paths, ``offload`` (default CLI) and
``simple`` (``--no-offload``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from uetlab import DATAPATHS, Lab, Pair, Pair6, remove_registered, require_root

# the packet builders the unit tests use too (tests/testkit.py); appended, so
# that no module here is shadowed by one of tests/
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))


def pytest_configure(config):
    config.addinivalue_line("markers", "netns: needs root, network namespaces and /dev/net/tun")


def pytest_collection_modifyitems(config, items):
    for item in items:
        item.add_marker(pytest.mark.netns)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


def pytest_sessionfinish(session, exitstatus):
    remove_registered()


@pytest.fixture(params=list(DATAPATHS))
def datapath(request) -> str:
    return request.param


@pytest.fixture
def lab(request, tmp_path, datapath):
    require_root()
    lab = Lab(tmp_path, datapath)
    try:
        yield lab
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(lab.logs())  # lands in the failure report's captured output
        lab.cleanup()


@pytest.fixture
def pair(lab) -> Pair:
    """Namespaces C and S joined by a veth (no tunnels yet)."""
    return Pair(lab)


@pytest.fixture
def tunnel(pair) -> Pair:
    """The standard pair with the server and client tunnels running."""
    pair.start_server()
    pair.start_client()
    return pair


@pytest.fixture
def pair6(lab) -> Pair6:
    """Namespaces C and S joined by a veth over IPv6 only (no tunnels yet)."""
    return Pair6(lab)


@pytest.fixture
def tunnel6(pair6) -> Pair6:
    """The IPv6-only pair with the server and client tunnels running."""
    pair6.start_server()
    pair6.start_client()
    return pair6
