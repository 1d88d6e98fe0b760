"""Service manager notification (sd_notify protocol) and the systemd files; no root."""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from testkit import FakeClock
from udp_encap_tun import cli, notify, status
from udp_encap_tun.core import Router

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "udp-encap-tun@.service"
EXAMPLE = REPO / "systemd" / "example.conf"


class Listener:
    """The service manager's end: a datagram socket at a path or an abstract name."""

    def __init__(self, tmp_path: Path | None = None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if tmp_path is not None:
            self.path = str(tmp_path / "notify")
            self.sock.bind(self.path)
            self.env_value = self.path
        else:
            name = "uets-test-" + secrets.token_hex(8)
            self.sock.bind(b"\0" + name.encode())
            self.env_value = "@" + name
        self.sock.settimeout(2)

    def messages(self) -> list[list[str]]:
        """Everything received so far, each datagram as its lines."""
        out = []
        self.sock.setblocking(False)
        try:
            while True:
                out.append(self.sock.recv(4096).decode().split("\n"))
        except BlockingIOError:
            pass
        finally:
            self.sock.settimeout(2)
        return out

    def close(self):
        self.sock.close()


@pytest.fixture(params=["path", "abstract"])
def listener(request, tmp_path):
    ln = Listener(tmp_path if request.param == "path" else None)
    yield ln
    ln.close()


def fake_tunnel(client=False, clock=None):
    router = Router(5000 if client else None)
    router.set_tun_address(bytes([10, 9, 0, 1]), ipaddress.IPv4Network("10.9.0.0/24"))
    return SimpleNamespace(router=router, counters=router.counters,
                           tun=SimpleNamespace(name="tun0"), clock=clock or FakeClock(0.0))


# --------------------------------------------------------------------------- protocol


def test_notify_address():
    assert notify.notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify.notify_address("@foo/bar") == b"\0foo/bar"
    assert notify.notify_address("") is None
    assert notify.notify_address(None) is None
    assert notify.notify_address("vsock:2:1234") is None  # not ours to support


def test_send_to_path_and_abstract_sockets(listener):
    n = notify.Notifier(notify.notify_address(listener.env_value))
    assert n.send("READY=1", "STATUS=hello\nworld")
    assert n.send("WATCHDOG=1")
    assert listener.messages() == [["READY=1", "STATUS=hello world"], ["WATCHDOG=1"]]
    assert n.sent == 2 and n.failed == 0
    n.close()


def test_send_never_blocks_or_raises(tmp_path):
    ln = Listener(tmp_path)  # never reads: its queue fills up
    n = notify.Notifier(ln.path)
    results = [n.send(f"STATUS={i}") for i in range(2000)]
    assert not all(results) and n.failed > 0
    ln.close()
    assert n.send("WATCHDOG=1") is False  # nobody listens any more
    n.close()


def test_watchdog_interval_from_environment():
    assert notify.watchdog_interval({}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "junk"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert notify.watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    env = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "4242"}
    assert notify.watchdog_interval(env, pid=4242) == 0.5
    assert notify.watchdog_interval(env, pid=4243) is None  # meant for another process
    assert notify.watchdog_interval({**env, "WATCHDOG_PID": "x"}, pid=4242) is None
    assert notify.watchdog_interval({**env, "WATCHDOG_PID": str(os.getpid())}) == 0.5


@pytest.mark.parametrize("interval", [15.0, 2.5, 1.0, 0.5, 0.2])
def test_watchdog_pings_are_never_further_apart_than_the_interval(interval):
    """Ticks every second with jitter: a ping goes out early rather than late, so
    the gaps stay within max(interval, one tick)."""
    dog = notify.Watchdog(interval, tick=1.0)
    now, sent = 0.0, []
    for i in range(200):
        if dog.due(now):
            sent.append(now)
        now += 1.0 + (0.05 if i % 3 else -0.04)  # loop jitter
    gaps = [b - a for a, b in zip(sent, sent[1:], strict=False)]
    assert sent[0] == 0.0 and len(sent) > 5
    assert max(gaps) <= max(interval, 1.05) + 1e-9
    if interval >= 2:
        assert min(gaps) >= interval - 1.0 - 0.05  # not needlessly often


def test_watchdog_first_call_is_due_and_then_waits():
    dog = notify.Watchdog(15.0, tick=1.0)
    assert dog.due(100.0)
    assert not dog.due(100.5)
    assert not dog.due(113.9)
    assert dog.due(114.0)  # within one tick of the deadline
    assert not dog.due(115.0)


# --------------------------------------------------------------------------- the service


def test_service_ready_status_watchdog_stopping(listener):
    tunnel = fake_tunnel(clock=FakeClock(10.0))
    svc = notify.Notify(notify.Notifier(notify.notify_address(listener.env_value)),
                        notify.Watchdog(2.0, tick=1.0), status_every=5)
    svc.ready(tunnel)
    first = listener.messages()
    assert first[0][0] == "READY=1"
    assert first[0][1] == "STATUS=server on tun0: 0 peers, tx 0 B rx 0 B"
    assert first[1:] == [["WATCHDOG=1"]]

    tunnel.router.rx_addresses(("198.51.100.1", 4000), 10.0)  # a peer arrives
    tunnel.counters.update(tx_bytes=12_345_678, rx_bytes=40_100_000, tx_drop_not_tcp=2)
    for i in range(1, 11):
        svc.tick(tunnel, 10.0 + i)
    msgs = listener.messages()
    pings = [m for m in msgs if m == ["WATCHDOG=1"]]
    statuses = [m for m in msgs if m[0].startswith("STATUS=")]
    assert len(pings) == 10  # interval 2 s, ticks 1 s: due at every tick (never late)
    # every 5 ticks, only when changed: once
    assert statuses == [["STATUS=server on tun0: 1 peer, tx 12.3 MB rx 40.1 MB, 2 dropped"]]

    svc.close(tunnel)
    assert listener.messages() == [["STOPPING=1", "STATUS=stopping"]]


def test_service_without_watchdog_and_client_status(listener):
    tunnel = fake_tunnel(client=True)
    tunnel.router.tx_destination(bytes([192, 0, 2, 2]), 0.0)
    svc = notify.Notify(notify.Notifier(notify.notify_address(listener.env_value)))
    svc.ready(tunnel)
    for i in range(6):
        svc.tick(tunnel, float(i))
    svc.close(tunnel)
    msgs = listener.messages()
    assert msgs[0] == ["READY=1",
                       "STATUS=client on tun0 to UDP port 5000: 1 servers, tx 0 B rx 0 B"]
    assert ["WATCHDOG=1"] not in msgs
    assert msgs[-1][0] == "STOPPING=1"


def test_status_line_names_a_missing_bound_interface():
    from udp_encap_tun.faults import Links

    tunnel = fake_tunnel()
    tunnel.links = Links(7, 1492, "ppp0", None, 1500)
    assert notify.status_line(tunnel).startswith("server on tun0: ppp0 MISSING: nothing sent, ")
    tunnel.links.bind_index = 9
    assert "MISSING" not in notify.status_line(tunnel)


def test_status_line_without_pool():
    tunnel = fake_tunnel()
    tunnel.router.set_tun_address(None, None)
    assert "no tun address" in notify.status_line(tunnel)


def test_from_environ(listener, caplog):
    assert notify.Notify.from_environ({}) is None
    svc = notify.Notify.from_environ({"NOTIFY_SOCKET": listener.env_value})
    assert svc is not None and svc.watchdog is None
    svc.notifier.close()
    env = {"NOTIFY_SOCKET": listener.env_value, "WATCHDOG_USEC": "30000000"}
    svc = notify.Notify.from_environ(env)
    assert svc.watchdog.interval == 15.0
    svc.notifier.close()
    with caplog.at_level("WARNING"):
        svc = notify.Notify.from_environ({**env, "WATCHDOG_USEC": "1000000"})
    assert "short" in caplog.text
    svc.notifier.close()


# --------------------------------------------------------------------------- systemd files


def unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_unit_essentials():
    u = unit_settings()
    assert u["Type"] == ["notify"] and u["NotifyAccess"] == ["main"]
    assert u["DynamicUser"] == ["yes"]
    assert set(u["AmbientCapabilities"][0].split()) == set(u["CapabilityBoundingSet"][0].split()) \
        == {"CAP_NET_ADMIN", "CAP_NET_RAW"}
    assert u["DeviceAllow"] == ["/dev/net/tun rw"] and "PrivateDevices" not in u
    assert "PrivateUsers" not in u and "PrivateNetwork" not in u
    assert "--config %d/config" in u["ExecStart"][0]
    assert u["LoadCredential"] == ["config:/etc/udp-encap-tun/%i.conf"]
    assert int(u["WatchdogSec"][0]) >= 3  # see notify.py: pings come from a 1 s tick
    assert u["Restart"] == ["on-failure"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path):
    """systemd-analyze verify accepts every directive (ExecStart pointed at this Python,
    since the console script need not be installed where the unit expects it)."""
    text = UNIT.read_text().replace("/opt/udp-encap-tun/bin/udp-encap-tun",
                                    f"{sys.executable} -m udp_encap_tun")
    (tmp_path / "udp-encap-tun@.service").write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", "udp-encap-tun@example.service"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    problems = [line for line in (r.stdout + r.stderr).splitlines()
                if "udp-encap-tun" in line and not re.search(r"\.mount|\.slice", line)]
    assert r.returncode == 0 and not problems, r.stdout + r.stderr


def test_example_config_parses():
    args = cli.parse_args(["--config", str(EXAMPLE)])  # with the checks of the mode
    assert args.interface == "tun0" and args.listen_port == 5000
    assert args.bind_to_interface and args.tun_address
    assert args.endpoint_port is None  # the example is a server
    assert status.interface_from_config(str(EXAMPLE)) == "tun0"
