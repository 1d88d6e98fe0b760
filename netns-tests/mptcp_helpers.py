"""MPTCP bonding over udp-encap-tun in network namespaces: the lab for
test_mptcp.py and scripts/bench-bond, and (run as a program) the MPTCP
transfer endpoint that runs inside the namespaces.

The lab (``BondLab``)::

  client ns "c"                      router ns "r"                 server ns "s"
  wan0 10.77.1.2/24 ---veth--- rc0 10.77.1.1/24
  wan1 10.77.2.2/24 ---veth--- rc1 10.77.2.1/24   rs 10.77.3.1/24 ---veth--- swan 10.77.3.2/24
  tunA 10.9.1.2/32 (bound to wan0)                                 tunS 10.9.0.1/24 (bound to swan)
  tunB 10.9.2.2/32 (bound to wan1)

The client's main table has a default route through wan0 only; wan1's gateway is
given to scripts/bond-client (which then adds the oif rule for tunB's UDP socket).
Everything is set up with scripts/bond-client and scripts/bond-server run inside
the namespaces.  Namespaces are named ``uetmp<6 hex>-<c|r|s>``; ``cleanup`` (and an
atexit hook) kills what runs in them and deletes them.  Only private addresses are
used, and only inside these namespaces.

The transfer program::

    python3 mptcp_helpers.py xfer --listen PORT  (--recv | --send BYTES | --send-seconds S)
    python3 mptcp_helpers.py xfer --connect HOST:PORT (--recv | --send ... )  [--tcp]

prints JSON lines: ``{"event": "listening"}`` and at the end one result with
ok, bytes, sha256 of the bytes sent or received, seconds (first to last byte),
whether the socket was really MPTCP, the most subflows seen and the peer
addresses of the subflows seen (MPTCP_SUBFLOW_ADDRS).  The receiver sends its
SHA-256 back to the sender before closing, so the sender also reports ``match``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import ipaddress
import json
import os
import random
import re
import secrets
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from uetlab import (
    NEW_PEER_RE,
    json_lines,
    read_text,
    register_namespace,
    remove_namespace,
    wait_for,
)

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BOND_CLIENT = REPO / "scripts" / "bond-client"
BOND_SERVER = REPO / "scripts" / "bond-server"

IPPROTO_MPTCP = 262
SOL_MPTCP = 284
MPTCP_INFO = 1
MPTCP_SUBFLOW_ADDRS = 3
PROGRESS_INTERVAL = 0.1  # seconds between the transfer program's progress lines

PREFIX = "uetmp"
SERVER_ADDR = "10.77.3.2"
SERVER_TUN, SERVER_TUN_CIDR = "tunS", "10.9.0.1/24"
UDP_PORT = 5000
# (client WAN, its address, router side, router address, client tun, tun address)
LINKS = [
    ("wan0", "10.77.1.2/24", "rc0", "10.77.1.1/24", "tunA", "10.9.1.2"),
    ("wan1", "10.77.2.2/24", "rc1", "10.77.2.1/24", "tunB", "10.9.2.2"),
]
# one IPv4 and one IPv6 WAN (``BondLab(links=MIXED_LINKS)``): the second link's tunnel
# carries IPv6 TCP over IPv6 to the server's IPv6 address, which the server announces
SERVER_ADDR6, SERVER_TUN_CIDR6 = "2001:db8:77:3::2", "fd00:9::1/64"
MIXED_LINKS = [
    LINKS[0],
    ("wan1", "2001:db8:77:2::2/64", "rc1", "2001:db8:77:2::1/64", "tunB", "fd00:9:2::2"),
]

COUNTERS_RE = re.compile(r"\bcounters (\{.*\})\s*$")

def skip_reason() -> str | None:
    """Why these tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces)"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun"
    try:
        socket.socket(socket.AF_INET, socket.SOCK_STREAM, IPPROTO_MPTCP).close()
    except OSError as exc:
        return f"no MPTCP in this kernel ({exc.strerror})"
    probe = subprocess.run(["ip", "mptcp", "limits", "show"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"'ip mptcp' does not work: {probe.stderr.strip()}"
    return None


def env_for_tools() -> dict:
    """The environment for the scripts and tools: nothing that configures
    udp-encap-tun or the scripts behind the lab's back, the repository importable."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("UDP_ENCAP_TUN_", "BOND_")) and k != "JOURNAL_STREAM"}
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"]
                                     if env.get("PYTHONPATH") else "")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


class Namespace:
    def __init__(self, name: str):
        self.name = name
        register_namespace(name)
        subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
        self.ip("link", "set", "lo", "up")

    def __repr__(self) -> str:
        return f"Namespace({self.name})"

    def argv(self, *argv) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def run(self, *argv, check=True, timeout=60, input=None) -> subprocess.CompletedProcess:
        proc = subprocess.run(self.argv(*argv), capture_output=True, text=True, timeout=timeout,
                              env=env_for_tools(), cwd=REPO, input=input)
        if check and proc.returncode != 0:
            raise AssertionError(f"{self.name}: {shlex.join(map(str, argv))} exited "
                                 f"{proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def ip(self, *args, check=True) -> str:
        return self.run("ip", *args, check=check).stdout

    def sysctl(self, key: str, value) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def popen(self, argv, out: Path) -> subprocess.Popen:
        with open(out, "wb") as f:
            return subprocess.Popen(self.argv(*argv), stdin=subprocess.DEVNULL, stdout=f,
                                    stderr=subprocess.STDOUT, env=env_for_tools(), cwd=REPO)

    def mtu(self, ifname: str) -> int:
        """The interface's MTU read back with pyroute2."""
        from pyroute2 import NetNS

        with NetNS(self.name, flags=0) as ipr:
            return ipr.get_links(ifname=ifname)[0].get_attr("IFLA_MTU")

    def delete(self) -> None:
        remove_namespace(self.name)


class BondLab:
    """Client, router and server namespaces (see the module docstring) with the
    bond scripts; ``cleanup`` takes everything down whatever state it is in."""

    def __init__(self, tmp: Path, mtus=(1500, 1500), links=LINKS):
        self.tmp = Path(tmp)
        self.links = links
        # IPv6 outside too (router, server) when a link is IPv6
        self.ipv6 = any(":" in link[5] for link in links)
        self.suffix = secrets.token_hex(3)
        self.namespaces: list[Namespace] = []
        self.procs: list[subprocess.Popen] = []
        self.client_run = self.tmp / "client-run"
        self.server_run = self.tmp / "server-run"
        self.c = self._netns("c")
        self.r = self._netns("r")
        self.s = self._netns("s")
        for ns in self.namespaces:
            # the kernel may hand the host's strict reverse-path filter to new namespaces;
            # the recipe needs loose mode on the client's WANs (the README says so)
            ns.sysctl("net.ipv4.conf.all.rp_filter", 2)
            ns.sysctl("net.ipv4.conf.default.rp_filter", 2)
        self.r.sysctl("net.ipv4.ip_forward", 1)
        for (wan, wan_cidr, rif, r_cidr, _tun, _addr), mtu in zip(links, mtus, strict=False):
            self._veth(self.c, wan, wan_cidr, self.r, rif, r_cidr, mtu)
        self._veth(self.r, "rs", "10.77.3.1/24", self.s, "swan", f"{SERVER_ADDR}/24", 1500)
        self.c.ip("route", "add", "default", "via", links[0][3].split("/")[0], "dev", links[0][0])
        self.s.ip("route", "add", "default", "via", "10.77.3.1", "dev", "swan")
        if self.ipv6:
            self.r.sysctl("net.ipv6.conf.all.forwarding", 1)
            self.r.ip("addr", "add", "2001:db8:77:3::1/64", "dev", "rs", "nodad")
            self.s.ip("addr", "add", f"{SERVER_ADDR6}/64", "dev", "swan", "nodad")
            self.s.ip("-6", "route", "add", "default", "via", "2001:db8:77:3::1", "dev", "swan")

    def _netns(self, role: str) -> Namespace:
        ns = Namespace(f"{PREFIX}{self.suffix}-{role}")
        self.namespaces.append(ns)
        return ns

    @staticmethod
    def _veth(a: Namespace, a_if: str, a_cidr: str, b: Namespace, b_if: str, b_cidr: str,
              mtu: int) -> None:
        a.ip("link", "add", "name", a_if, "mtu", mtu, "type", "veth",
             "peer", "name", b_if, "mtu", mtu, "netns", b.name)
        for ns, ifname, cidr in ((a, a_if, a_cidr), (b, b_if, b_cidr)):
            ns.ip("addr", "add", cidr, "dev", ifname, *(["nodad"] if ":" in cidr else []))
            ns.ip("link", "set", ifname, "up")

    # -- the scripts ---------------------------------------------------------
    def tunnel_cmd(self) -> str:
        return f"{shlex.quote(sys.executable)} -m udp_encap_tun"

    def client_args(self, *, gateway_for_wan1: bool = True) -> list[str]:
        args = ["--server", SERVER_ADDR, "--server-port", UDP_PORT, "--listen-port", UDP_PORT,
                "--run-dir", self.client_run, "--tunnel-cmd", self.tunnel_cmd()]
        if self.ipv6:
            args += ["--server", SERVER_ADDR6]
        for i, (wan, _wc, _rif, r_cidr, tun, addr) in enumerate(self.links):
            spec = f"{wan},{tun},{addr}"
            if i > 0 and gateway_for_wan1:
                spec += "," + r_cidr.split("/")[0]
            args += ["--link", spec]
        return args

    def server_args(self) -> list[str]:
        ipv6 = ["--address", SERVER_TUN_CIDR6, "--announce", SERVER_ADDR6] if self.ipv6 else []
        return ["--wan", "swan", "--tun", SERVER_TUN, "--address", SERVER_TUN_CIDR, *ipv6,
                "--listen-port", UDP_PORT, "--run-dir", self.server_run,
                "--tunnel-cmd", self.tunnel_cmd()]

    def bond_client(self, action: str, *extra, check=True) -> subprocess.CompletedProcess:
        return self.c.run(BOND_CLIENT, action, *self.client_args(), *extra, check=check)

    def bond_server(self, action: str, *extra, check=True) -> subprocess.CompletedProcess:
        return self.s.run(BOND_SERVER, action, *self.server_args(), *extra, check=check)

    def up(self) -> None:
        self.bond_server("up")
        self.bond_client("up")

    # -- the tunnels ----------------------------------------------------------
    def tunnel_log(self, tun: str) -> str:
        run = self.server_run if tun == SERVER_TUN else self.client_run
        return read_text(run / f"{tun}.log")

    def tunnel_pid(self, tun: str) -> int:
        run = self.server_run if tun == SERVER_TUN else self.client_run
        return int((run / f"{tun}.pid").read_text())

    def counters(self, tun: str, timeout: float = 10) -> dict:
        """The counters of a running tunnel (SIGUSR1, then its new log line)."""
        def lines():
            return [json.loads(m.group(1)) for line in self.tunnel_log(tun).splitlines()
                    if (m := COUNTERS_RE.search(line))]
        before = len(lines())
        os.kill(self.tunnel_pid(tun), signal.SIGUSR1)
        wait_for(lambda: len(lines()) > before, timeout, f"counters of {tun}")
        return lines()[-1]

    def new_peers(self) -> list[tuple[str, int, str]]:
        return [(m.group(1), int(m.group(2)), m.group(3))
                for m in NEW_PEER_RE.finditer(self.tunnel_log(SERVER_TUN))]

    # -- link conditions (all in the router namespace unless said) ---------------
    def shape(self, rate: str) -> None:
        """tbf at *rate* on both WAN paths, both directions (client and router egress)."""
        for wan, _wc, rif, *_ in self.links:
            for ns, dev in ((self.c, wan), (self.r, rif)):
                ns.run("tc", "qdisc", "replace", "dev", dev, "root", "tbf", "rate", rate,
                       "burst", "64kb", "latency", "40ms")

    def nft(self, ruleset: str) -> None:
        self.r.run("nft", "-f", "-", input=ruleset)

    def drop_udp_on(self, rif: str, percent: int | None = None) -> None:
        """Drop the tunnel's UDP through router interface *rif*, both directions:
        all of it, or *percent* % at random."""
        cond = f"numgen random mod 100 < {percent} " if percent is not None else ""
        table = f"uetmp_{rif}"
        self.nft(f"""
table inet {table} {{
    chain forward {{
        type filter hook forward priority 0; policy accept;
        iifname "{rif}" meta l4proto udp {cond}counter drop
        oifname "{rif}" meta l4proto udp {cond}counter drop
    }}
}}
""")

    def masquerade(self) -> None:
        """The router NATs both client links to its own address toward the server (as
        when both WANs share one public address): the server tells the client's tunnel
        ends apart by UDP port only."""
        self.nft("""
table ip uetmp_nat {
    chain postrouting {
        type nat hook postrouting priority srcnat; policy accept;
        oifname "rs" masquerade
    }
}
""")

    def nft_counters(self) -> str:
        return self.r.run("nft", "list", "ruleset").stdout

    # -- transfers -------------------------------------------------------------
    def xfer_server(self, port: int, *mode, tag: str = "server") -> Endpoint:
        listen = ["--listen-host", "::"] if self.ipv6 else []  # both families, one socket
        ep = Endpoint(self, self.s, ["--listen", port, *listen, *mode], tag)
        wait_for(lambda: ep.lines() or ep.proc.poll() is not None, 15, "the MPTCP listener")
        assert ep.lines() and ep.lines()[0].get("event") == "listening", ep.text()
        return ep

    def xfer_client(self, port: int, *mode, tag: str = "client") -> Endpoint:
        # with IPv6 links, an IPv6 socket to the server's IPv4 address (v4-mapped): the
        # kernel gives an MPTCP socket subflows of its own family only (AF_INET: IPv4
        # only; AF_INET6 without V6ONLY: both)
        host = f"[::ffff:{SERVER_ADDR}]" if self.ipv6 else SERVER_ADDR
        return Endpoint(self, self.c, ["--connect", f"{host}:{port}", *mode], tag)

    def transfer(self, size: int, port: int = 7000, direction: str = "upload",
                 timeout: float = 45, during=None) -> dict:
        """*size* bytes from client to server (upload) or back, over MPTCP through
        the bond; asserts it arrived byte-exact.  *during(receiving_endpoint)*
        runs while the transfer is going."""
        send, recv = ["--send", size], ["--recv"]
        server = self.xfer_server(port, *(recv if direction == "upload" else send),
                                  "--timeout", timeout)
        client = self.xfer_client(port, *(send if direction == "upload" else recv),
                                  "--timeout", timeout)
        if during is not None:
            during(server if direction == "upload" else client)
        results = {}
        deadline = time.monotonic() + timeout + 10
        for tag, ep in (("client", client), ("server", server)):
            results[tag] = ep.result(max(1.0, deadline - time.monotonic()))
        sender, receiver = ((results["client"], results["server"]) if direction == "upload"
                            else (results["server"], results["client"]))
        detail = f"client: {client.text()}\nserver: {server.text()}"
        assert sender.get("ok") and receiver.get("ok"), f"transfer failed\n{detail}"
        assert sender["bytes"] == receiver["bytes"] == size, detail
        assert sender["sha256"] == receiver["sha256"], f"data corrupted\n{detail}"
        assert sender["match"], detail
        assert sender["mptcp"] and receiver["mptcp"], f"fell back to plain TCP\n{detail}"
        return results

    def measure(self, port: int, direction: str, seconds: float, *, tcp: bool = False,
                bind: str | None = None) -> dict:
        """Send for *seconds* (upload: client to server; download: back); the receiver's
        result (its mbit_per_s is first to last byte) plus each client tunnel's share."""
        extra = ["--tcp"] if tcp else []
        send, recv = ["--send-seconds", seconds], ["--recv"]
        key = "tx_bytes" if direction == "upload" else "rx_bytes"
        before = {link[4]: self.counters(link[4]).get(key, 0) for link in self.links}
        server = self.xfer_server(port, *(recv if direction == "upload" else send), *extra,
                                  tag=f"bench-server-{direction}")
        client = self.xfer_client(port, *(send if direction == "upload" else recv), *extra,
                                  *(["--bind", bind] if bind else []),
                                  tag=f"bench-client-{direction}")
        results = {"client": client.result(seconds + 60), "server": server.result(30)}
        receiver = results["server" if direction == "upload" else "client"]
        sender = results["client" if direction == "upload" else "server"]
        assert receiver.get("ok") and sender.get("ok") and sender.get("match"), results
        moved = {tun: self.counters(tun).get(key, 0) - n for tun, n in before.items()}
        return {**receiver, "tunnel_bytes": moved}

    def logs(self) -> str:
        out = []
        for tun in (SERVER_TUN, *(link[4] for link in self.links)):
            out.append(f"===== {tun}.log\n{self.tunnel_log(tun)}")
        for path in sorted(self.tmp.glob("xfer-*.out")):
            out.append(f"===== {path.name}\n{path.read_text(errors='replace')}")
        return "\n".join(out)

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        # the scripts' own teardown first (it stops the tunnels gracefully) ...
        for ns, script, run in ((self.c, BOND_CLIENT, self.client_run),
                                (self.s, BOND_SERVER, self.server_run)):
            if (run / ("client.state" if ns is self.c else "server.state")).exists():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    ns.run(script, "down", "--run-dir", run, check=False, timeout=60)
        # ... then whatever is left goes with the namespaces
        for ns in reversed(self.namespaces):
            ns.delete()


class Endpoint:
    """One run of this file's ``xfer`` program in a namespace."""

    def __init__(self, lab: BondLab, ns: Namespace, args, tag: str):
        self.out = lab.tmp / f"xfer-{tag}-{len(lab.procs)}.out"
        self.proc = ns.popen([sys.executable, Path(__file__).resolve(), "xfer", *args], self.out)
        lab.procs.append(self.proc)

    def text(self) -> str:
        return read_text(self.out)

    def lines(self) -> list[dict]:
        return json_lines(self.text())

    def progress(self) -> int:
        """Bytes moved so far (from the progress lines)."""
        done = [line["bytes"] for line in self.lines() if line.get("event") == "progress"]
        return done[-1] if done else 0

    def result(self, timeout: float) -> dict:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        done = [line for line in self.lines() if "ok" in line]
        return done[-1] if done else {"ok": False, "error": "no result", "output": self.text()}


# =========================================================================== the program

def _libc():
    return ctypes.CDLL(None, use_errno=True)


def mptcp_subflows(sock: socket.socket) -> int | None:
    """Additional subflows of an MPTCP socket (MPTCP_INFO), None if not MPTCP."""
    try:
        info = sock.getsockopt(SOL_MPTCP, MPTCP_INFO, 64)
    except OSError:
        return None
    return info[0] if info else None


def subflow_addrs(sock: socket.socket) -> list[tuple[str, str]] | None:
    """(local, remote) "addr:port" of each subflow (MPTCP_SUBFLOW_ADDRS), None if unavailable."""
    max_subflows, head, item = 8, 16, 256  # struct mptcp_subflow_data, two sockaddr_storage
    buf = ctypes.create_string_buffer(head + max_subflows * item)
    struct.pack_into("IIII", buf, 0, head, 0, 0, item)
    size = ctypes.c_uint32(len(buf))
    if _libc().getsockopt(sock.fileno(), SOL_MPTCP, MPTCP_SUBFLOW_ADDRS, buf, ctypes.byref(size)):
        return None
    _, count, _, _ = struct.unpack_from("IIII", buf, 0)
    addrs = []
    for i in range(min(count, max_subflows)):
        pair = []
        for half in (0, 128):
            off = head + i * item + half
            family, port = struct.unpack_from("=HH", buf, off)
            if family == socket.AF_INET:
                host = socket.inet_ntoa(buf.raw[off + 4:off + 8])
            elif family == socket.AF_INET6:  # sockaddr_in6: flowinfo, then the address
                address = ipaddress.IPv6Address(buf.raw[off + 8:off + 24])
                host = str(address.ipv4_mapped or address)  # a dual-stack socket's IPv4
            else:
                pair.append(f"family {family}")
                continue
            pair.append(f"{host}:{socket.ntohs(port)}")
        addrs.append(tuple(pair))
    return addrs


class _Watch:
    """Samples the subflows of a connection while it runs."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.is_mptcp = sock.proto == IPPROTO_MPTCP
        self.max_subflows = 0
        self.remotes: set[str] = set()
        self.locals: set[str] = set()
        self.next = 0.0

    def sample(self, force=False) -> None:
        now = time.monotonic()
        if not self.is_mptcp or (now < self.next and not force):
            return
        self.next = now + 0.05
        count = mptcp_subflows(self.sock)
        if count is None:  # fallen back to TCP
            self.is_mptcp = False
            return
        self.max_subflows = max(self.max_subflows, count)
        for local, remote in subflow_addrs(self.sock) or ():
            self.locals.add(local.rsplit(":", 1)[0])
            self.remotes.add(remote.rsplit(":", 1)[0])

    def report(self) -> dict:
        return {"mptcp": self.is_mptcp, "max_subflows": self.max_subflows,
                "subflow_locals": sorted(self.locals), "subflow_remotes": sorted(self.remotes)}


def _emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def _send(sock: socket.socket, watch: _Watch, size: int | None, seconds: float | None,
          seed: int) -> dict:
    rng = random.Random(seed)
    digest = hashlib.sha256()
    sent = 0
    chunk_size = 1 << 20
    start = time.monotonic()
    last_report = start
    while True:
        if size is not None:
            if sent >= size:
                break
            n = min(chunk_size, size - sent)
        else:
            if time.monotonic() - start >= seconds:
                break
            n = chunk_size
        chunk = rng.randbytes(n)
        digest.update(chunk)
        view = memoryview(chunk)
        while view:
            k = sock.send(view)
            view = view[k:]
            sent += k
            watch.sample()
        if time.monotonic() - last_report >= PROGRESS_INTERVAL:
            last_report = time.monotonic()
            _emit(event="progress", bytes=sent)
    sock.shutdown(socket.SHUT_WR)
    watch.sample(force=True)
    echo = b""
    while len(echo) < 64:
        part = sock.recv(64 - len(echo))
        if not part:
            break
        echo += part
    elapsed = time.monotonic() - start
    return {"bytes": sent, "sha256": digest.hexdigest(),
            "match": echo.decode() == digest.hexdigest(),
            "seconds": round(elapsed, 3), "mbit_per_s": round(sent * 8 / elapsed / 1e6, 1)}


def _recv(sock: socket.socket, watch: _Watch) -> dict:
    digest = hashlib.sha256()
    got = 0
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    first = last = None
    last_report = time.monotonic()
    while True:
        n = sock.recv_into(buf)
        if not n:
            break
        now = time.monotonic()
        if first is None:
            first = now
        last = now
        digest.update(view[:n])
        got += n
        watch.sample()
        if now - last_report >= PROGRESS_INTERVAL:
            last_report = now
            _emit(event="progress", bytes=got)
    sock.sendall(digest.hexdigest().encode())
    sock.shutdown(socket.SHUT_WR)
    elapsed = (last - first) if first is not None and last > first else 0.0
    return {"bytes": got, "sha256": digest.hexdigest(), "match": True, "seconds": round(elapsed, 3),
            "mbit_per_s": round(got * 8 / elapsed / 1e6, 1) if elapsed else None}


def xfer_main(argv) -> int:
    p = argparse.ArgumentParser(prog="mptcp_helpers.py xfer")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--listen", type=int, metavar="PORT")
    where.add_argument("--connect", metavar="HOST:PORT")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--recv", action="store_true")
    what.add_argument("--send", type=int, metavar="BYTES")
    what.add_argument("--send-seconds", type=float, metavar="S")
    p.add_argument("--listen-host", default="0.0.0.0",
                   help="listen address ('::': IPv6, and IPv4 as v4-mapped)")
    p.add_argument("--tcp", action="store_true", help="plain TCP instead of MPTCP")
    p.add_argument("--bind", metavar="ADDR", help="connect from this local address")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60, help="inactivity timeout (s)")
    args = p.parse_args(argv)
    proto = socket.IPPROTO_TCP if args.tcp else IPPROTO_MPTCP
    lsock = None
    try:
        if args.listen is not None:
            family = socket.AF_INET6 if ":" in args.listen_host else socket.AF_INET
            lsock = socket.socket(family, socket.SOCK_STREAM, proto)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                lsock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            lsock.bind((args.listen_host, args.listen))
            lsock.listen(1)
            lsock.settimeout(args.timeout)
            _emit(event="listening", port=args.listen)
            sock, peer = lsock.accept()
            # lsock stays open: MP_JOIN SYNs of the connection's later subflows arrive at it
        else:
            host, port = args.connect.rsplit(":", 1)
            host = host.strip("[]")
            sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                 socket.SOCK_STREAM, proto)
            sock.settimeout(args.timeout)
            if args.bind:
                sock.bind((args.bind, 0))
            sock.connect((host, int(port)))
            peer = sock.getpeername()
        sock.settimeout(args.timeout)
        watch = _Watch(sock)
        watch.sample(force=True)
        if args.recv:
            result = _recv(sock, watch)
        else:
            result = _send(sock, watch, args.send, args.send_seconds, args.seed)
        sock.close()
        if lsock is not None:
            lsock.close()
        _emit(ok=True, peer=f"{peer[0]}:{peer[1]}", **result, **watch.report())
        return 0
    except (OSError, ValueError) as exc:
        _emit(ok=False, error=f"{type(exc).__name__}: {exc}")
        return 1


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "xfer":
        sys.exit(xfer_main(sys.argv[2:]))
    sys.exit("usage: mptcp_helpers.py xfer ... (see the module docstring)")
