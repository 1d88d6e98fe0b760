"""Services depend on service.py's small view of the tunnel, never on the loop."""

from __future__ import annotations

import ast
import socket
from pathlib import Path
from types import SimpleNamespace

from test_faults import _PIPE
from udp_encap_tun import service
from udp_encap_tun.core import Router
from udp_encap_tun.loop import Loop, default_wire
from udp_encap_tun.tiudev import TiuConn
from udp_encap_tun.tiumode import TiuRouter
from udp_encap_tun.tun import Packets

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "udp_encap_tun"
SERVICES = ["notify", "service", "status"]  # modules or subpackages
LOOP = {"loop", "tiudev", "tun", "conn", "cli"}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add((node.module or "").split(".")[-1])
            if node.module is None:  # from . import tiudev
                names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name.split(".")[-1] for alias in node.names)
    return names


def service_files() -> list[Path]:
    files = []
    for name in SERVICES:
        path = PACKAGE / name
        files += sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")]
    return files


def test_services_never_import_the_loop():
    files = service_files()
    assert len(files) >= 3
    for path in files:
        assert imported_modules(path) & LOOP == set(), path


def test_notify_does_not_import_status():
    """Its byte formatter is units.py's, shared with the status text."""
    assert "status" not in imported_modules(PACKAGE / "notify.py")
    assert "units" in imported_modules(PACKAGE / "notify.py")


def test_the_import_check_sees_loop_imports(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from .loop import HOUSEKEEPING\nfrom . import tiudev\n")
    assert {"loop", "tiudev"} <= imported_modules(bad)


def test_the_loop_satisfies_the_views():
    tun = SimpleNamespace(fd=_PIPE[0], name="tun-test")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for tunnel in (default_wire(Router(endpoint_port=1), tun, sock),
                       default_wire(Router(), tun, sock, offload=True)):
            assert isinstance(tunnel, service.TunnelView)
            assert isinstance(tunnel, service.UdpTunnelView)
            assert not isinstance(tunnel, service.FlowsTunnelView)
    router = TiuRouter(True, [(7000, 7009)])
    packets = Packets(tun, router.counters, tiu_wire=True)
    tiu = Loop(router, tun, packets, TiuConn(router, packets, {}, "eth0"))
    assert isinstance(tiu, service.FlowsTunnelView)
