"""Running it as a service: the sd_notify protocol (READY, STATUS, WATCHDOG,
STOPPING) from the real CLI, and ``udp-encap-tun status`` against a running
tunnel after a TCP transfer.  Needs root; skipped otherwise.

Self-contained: namespaces ``uets<6 hex>c`` / ``uets<6 hex>s`` (unique per test)
joined by a veth, removed with everything in them whatever the outcome.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from uetlab import clean_env, require_root, wait_for

REPO = Path(__file__).resolve().parent.parent
MB = 1 << 20

TCP_SINK = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(1)
s.settimeout(60)
print("listening", flush=True)
c, _ = s.accept()
c.settimeout(60)
n = 0
while True:
    d = c.recv(1 << 16)
    if not d:
        break
    n += len(d)
c.sendall(str(n).encode())
c.close()
print(n, flush=True)
"""

TCP_SOURCE = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=60)
c.sendall(b"x" * int(sys.argv[3]))
c.shutdown(socket.SHUT_WR)
print(c.recv(100).decode(), flush=True)
"""

SQUATTER = r"""
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(b"\0udp-encap-tun/" + sys.argv[1].encode())
s.listen(1)
print("bound", flush=True)
time.sleep(120)
"""


class World:
    """Namespaces C and S joined by a veth (vc 192.0.2.1/24 in C, vs 192.0.2.2/24
    in S), and every process started in them."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        suffix = secrets.token_hex(3)
        self.c, self.s = f"uets{suffix}c", f"uets{suffix}s"
        self.namespaces: list[str] = []
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        for ns in (self.c, self.s):
            subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True)
            self.namespaces.append(ns)
            self.ip(ns, "link", "set", "lo", "up")
        self.ip(self.c, "link", "add", "vc", "type", "veth", "peer", "name", "vs", "netns", self.s)
        self.ip(self.c, "addr", "add", "192.0.2.1/24", "dev", "vc")
        self.ip(self.s, "addr", "add", "192.0.2.2/24", "dev", "vs")
        self.ip(self.c, "link", "set", "vc", "up")
        self.ip(self.s, "link", "set", "vs", "up")

    @staticmethod
    def ip(ns: str, *args: str) -> None:
        r = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True)
        assert r.returncode == 0, f"ip -n {ns} {' '.join(args)}: {r.stderr}"

    def start(self, ns: str, argv, env=None, tag: str = "proc") -> tuple[subprocess.Popen, Path]:
        log = self.tmp / f"{tag}-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", ns, *map(str, argv)],
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    env=clean_env(env), cwd=REPO)
        self.procs.append((proc, log))
        return proc, log

    def run(self, ns: str, *argv, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *map(str, argv)], capture_output=True,
                              text=True, timeout=timeout, env=clean_env(), cwd=REPO)

    def tunnel(self, ns: str, *args, env=None) -> tuple[subprocess.Popen, Path]:
        """udp-encap-tun in *ns*; returns once it logged ``ready:``."""
        proc, log = self.start(ns, [sys.executable, "-m", "udp_encap_tun", *args], env, "tunnel")

        def ready():
            if "ready:" in log.read_text(errors="replace"):
                return True
            assert proc.poll() is None, f"exited {proc.returncode}:\n{log.read_text()}"
            return False
        wait_for(ready, 30, f"the tunnel in {ns} to be ready")
        return proc, log

    def server(self, *extra, env=None):
        proc = self.tunnel(self.s, "--interface", "tun0", "--listen-port", 5000,
                           "--bind-to-interface", "vs", *extra, env=env)
        self.ip(self.s, "addr", "add", "10.9.0.1/24", "dev", "tun0")
        return proc

    def client(self, *extra):
        proc = self.tunnel(self.c, "--interface", "tun0", "--listen-port", 5000,
                           "--bind-to-interface", "vc", "--endpoint-port", 5000, *extra)
        self.ip(self.c, "addr", "add", "10.9.0.2/32", "dev", "tun0")
        self.ip(self.c, "route", "add", "192.0.2.2/32", "dev", "tun0")
        return proc

    def transfer(self, port: int, size: int) -> None:
        """*size* bytes of TCP from C to 192.0.2.2:*port* (so through the tunnel)."""
        sink, sink_log = self.start(self.s, [sys.executable, "-c", TCP_SINK, port], tag="sink")
        wait_for(lambda: "listening" in sink_log.read_text() or sink.poll() is not None, 20,
                 "the TCP sink")
        source, source_log = self.start(self.c, [sys.executable, "-c", TCP_SOURCE, "192.0.2.2",
                                                 port, size], tag="source")
        source.wait(90)
        sink.wait(30)
        assert source.returncode == 0 and source_log.read_text().split() == [str(size)], \
            source_log.read_text() + sink_log.read_text()

    def status(self, ns: str, *args) -> subprocess.CompletedProcess:
        return self.run(ns, sys.executable, "-m", "udp_encap_tun", "status", "--interface",
                        "tun0", *args)

    def logs(self) -> str:
        return "\n".join(f"===== {p.args[4:]} ({log})\n{log.read_text(errors='replace')}"
                         for p, log in self.procs)

    def cleanup(self) -> None:
        for proc, _ in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True).stdout.split()
            for pid in pids:  # anything left in our own namespace is ours
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        left = [ns for ns in self.namespaces if Path("/run/netns", ns).exists()]
        assert not left, f"namespaces left behind: {left}"


@pytest.fixture
def world(request, tmp_path):
    require_root()
    w = World(tmp_path)
    try:
        yield w
    finally:
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(w.logs())
        w.cleanup()


def stop(proc: subprocess.Popen, log: Path) -> None:
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, log.read_text()


# --------------------------------------------------------------------------- (a) notify


def test_notify_protocol(world: World, tmp_path):
    """READY=1 with a STATUS=, then WATCHDOG=1 pings (WATCHDOG_USEC=1 s: every tick),
    then STOPPING=1 on SIGTERM; all over a datagram socket given in NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(path)  # a path socket reaches across network namespaces
    manager.settimeout(1)
    messages: list[list[str]] = []

    def receive(until) -> bool:
        with contextlib.suppress(TimeoutError):
            messages.append(manager.recv(4096).decode().split("\n"))
        return until()

    try:
        proc, log = world.server(env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})
        wait_for(lambda: receive(lambda: sum(m == ["WATCHDOG=1"] for m in messages) >= 2), 30,
                 "two WATCHDOG=1", interval=0)
        ready = [m for m in messages if "READY=1" in m]
        assert len(ready) == 1, messages
        assert messages.index(ready[0]) == 0, messages  # nothing before READY
        statuses = [a for m in messages for a in m if a.startswith("STATUS=")]
        assert statuses and statuses[0].startswith("STATUS=server on tun0: "), messages
        assert "WatchdogSec=1s is short" in log.read_text()  # told the operator

        stop(proc, log)
        wait_for(lambda: receive(lambda: any("STOPPING=1" in m for m in messages)), 10,
                 "STOPPING=1", interval=0)
    finally:
        manager.close()


# --------------------------------------------------------------------------- (b) status


@pytest.mark.parametrize("datapath", [[], ["--no-offload"]], ids=["offload", "simple"])
def test_status_after_transfer(world: World, datapath):
    server, server_log = world.server(*datapath)
    client, client_log = world.client(*datapath)
    world.transfer(7001, MB)

    r = world.status(world.s, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "server" and doc["interface"] == "tun0"
    assert doc["bind_interface"] == "vs" and doc["listen_port"] == 5000
    assert doc["endpoint_port"] is None and doc["tun_address"] == "10.9.0.1/24"
    assert doc["data_path"].startswith("offload" if not datapath else "simple")
    assert doc["offload"]["tun"] is (not datapath)
    assert len(doc["peers"]) == 1, doc["peers"]
    peer = doc["peers"][0]
    assert (peer["host"], peer["port"]) == ("192.0.2.1", 5000)
    assert ipaddress.IPv4Address(peer["address"]) in ipaddress.IPv4Network("10.9.0.0/24")
    assert peer["rx_bytes"] >= MB and peer["tx_packets"] > 0 and peer["last_heard"] >= 0
    counters = doc["counters"]
    assert counters["rx_bytes"] >= MB and counters["tx_packets"] > 0
    assert counters["peers_added"] == 1

    r = world.status(world.s)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("udp-encap-tun on tun0: server")
    row = next(line for line in r.stdout.splitlines() if "192.0.2.1:5000" in line)
    assert peer["address"] in row
    assert any(line.split()[:1] == ["packets"] for line in r.stdout.splitlines())

    r = world.status(world.s, "--prometheus")
    assert r.returncode == 0, r.stderr
    assert 'udp_encap_tun_peers{interface="tun0"} 1\n' in r.stdout
    assert 'udp_encap_tun_up{interface="tun0"} 1\n' in r.stdout

    r = world.status(world.c, "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["mode"] == "client" and doc["endpoint_port"] == 5000
    assert doc["bind_interface"] == "vc"
    assert [s["server"] for s in doc["servers"]] == ["192.0.2.2:5000"]
    assert doc["counters"]["tx_bytes"] >= MB

    stop(client, client_log)
    stop(server, server_log)
    r = world.status(world.s)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "no udp-encap-tun is running on tun0" in r.stderr


def test_status_name_taken_tunnel_still_runs(world: World):
    """Something else holds @udp-encap-tun/tun0 in the namespace: the tunnel warns,
    runs without live status, and ``status`` does not show the squatter's bytes."""
    squatter, squatter_log = world.start(world.s, [sys.executable, "-c", SQUATTER, "tun0"],
                                         tag="squatter")
    wait_for(lambda: "bound" in squatter_log.read_text() or squatter.poll() is not None, 20,
             "the squatter")
    server, server_log = world.server()
    assert "is taken by another process" in server_log.read_text()
    world.client()
    world.transfer(7002, 64 * 1024)  # the tunnel works
    r = world.status(world.s, "--timeout", "1")
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
    stop(server, server_log)
