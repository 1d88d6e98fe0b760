"""Helpers for test_operations.py ("running it for real").

* running udp-encap-tun as an unprivileged user with only CAP_NET_ADMIN and
  CAP_NET_RAW (setpriv), with an interpreter and libraries that user can read;
* making /dev/net/tun world read-writable the way common distributions ship
  it, serialised between concurrent sessions and always restored;
* reading a namespace's addresses, routes and UDP sockets;
* TCP sockets driven from the test process inside a namespace (one connection
  kept open across an idle period, the MSS a socket uses).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from testkit import tcp_segment
from uetlab import REPO, Namespace, clean_env, wait_for

UNPRIVILEGED_UID = UNPRIVILEGED_GID = 65534  # nobody / nogroup
CAPS = "+net_admin,+net_raw"
CAP_NET_ADMIN, CAP_NET_RAW = 12, 13
TUN_NODE = "/dev/net/tun"
TUN_NODE_LOCK = Path(tempfile.gettempdir()) / "uetnt-dev-net-tun.lock"

# the libraries the tool imports (all pure Python)
LIBRARIES = ("pyroute2", "configargparse")


# --------------------------------------------------------------------------- unprivileged runs


def setpriv_argv(caps: bool) -> list[str]:
    """``setpriv`` switching to the unprivileged user, keeping (through exec, as
    ambient capabilities) CAP_NET_ADMIN and CAP_NET_RAW if *caps*, else none."""
    argv = ["setpriv", f"--reuid={UNPRIVILEGED_UID}", f"--regid={UNPRIVILEGED_GID}",
            "--clear-groups"]
    if caps:
        argv += [f"--inh-caps={CAPS}", f"--ambient-caps={CAPS}"]
    else:
        argv += ["--inh-caps=-all"]
    return argv


@dataclass
class Runtime:
    """An interpreter the unprivileged user can execute and a PYTHONPATH with
    the tool's libraries it can read (the repository itself is the cwd)."""

    python: str
    pythonpath: str
    base: Path

    @property
    def env(self) -> dict:
        return {"PYTHONPATH": self.pythonpath, "PYTHONNOUSERSITE": "1"}

    def close(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def _readable_by_all(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for name in files:
            os.chmod(os.path.join(root, name), 0o644)


def build_runtime() -> Runtime:
    """Copy the libraries next to each other in a fresh world-readable
    directory and find an interpreter (3.11+) the unprivileged user can run
    with them.  The test's own interpreter may live under a home directory
    that user cannot enter (pyenv under /root here); the system python3 is
    the usual fallback, as for a package installed system-wide."""
    import importlib

    base = Path(tempfile.mkdtemp(prefix="uetnt-runtime-"))
    try:
        site = base / "site"
        site.mkdir()
        for name in LIBRARIES:
            src = Path(importlib.import_module(name).__file__)
            if src.name == "__init__.py":
                shutil.copytree(src.parent, site / src.parent.name,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(src, site / src.name)
        _readable_by_all(base)
        probe = ("import sys; assert sys.version_info >= (3, 11), sys.version; "
                 "import pyroute2, configargparse, udp_encap_tun.cli")
        tried = []
        for python in dict.fromkeys([sys.executable, "/usr/bin/python3",
                                     shutil.which("python3") or "python3"]):
            runtime = Runtime(python, str(site), base)
            # compile once (as root) so that every start need not compile pyroute2
            subprocess.run([python, "-m", "compileall", "-q", str(site)],
                           capture_output=True, timeout=300, cwd=REPO)
            _readable_by_all(base)
            result = subprocess.run([*setpriv_argv(False), python, "-c", probe],
                                    capture_output=True, text=True, timeout=120, cwd=REPO,
                                    env=clean_env(runtime.env))
            if result.returncode == 0:
                return runtime
            tried.append(f"{python}: {result.stderr.strip().splitlines()[-1:]}")
        raise RuntimeError(f"no interpreter usable by uid {UNPRIVILEGED_UID}: {tried}")
    except BaseException:
        shutil.rmtree(base, ignore_errors=True)
        raise


class AsUser:
    """A Namespace stand-in whose processes run as the unprivileged user.

    Passed to ``Lab.tool`` (which hands it to ``ToolProcess``): the command
    ``<sys.executable> -m udp_encap_tun ...`` becomes
    ``ip netns exec NS setpriv ... <runtime python> -m udp_encap_tun ...``.
    Everything else (name, links, addresses) is the wrapped namespace's."""

    def __init__(self, ns: Namespace, runtime: Runtime, caps: bool = True):
        self.ns, self.runtime, self.caps = ns, runtime, caps

    def __getattr__(self, name):
        return getattr(self.ns, name)

    def __repr__(self) -> str:
        return f"AsUser({self.ns.name}, uid {UNPRIVILEGED_UID}, caps={self.caps})"

    def exec_args(self, argv) -> list[str]:
        argv = [str(a) for a in argv]
        if argv and argv[0] == sys.executable:
            argv[0] = self.runtime.python
        return self.ns.exec_args([*setpriv_argv(self.caps), *argv])

    def run_tool(self, *args, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the tool to completion (for start-up failures)."""
        argv = self.exec_args([sys.executable, "-m", "udp_encap_tun", *args])
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=clean_env(self.runtime.env), cwd=REPO)


def process_credentials(pid: int) -> tuple[int, int]:
    """(effective uid, effective capability mask) of a running process."""
    uid = cap_eff = None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            uid = int(line.split()[2])
        elif line.startswith("CapEff:"):
            cap_eff = int(line.split()[1], 16)
    return uid, cap_eff


@contextlib.contextmanager
def tun_node_lock(timeout: float = 600):
    """Exclusive use of /dev/net/tun's mode for this test (other sessions
    running it wait), so that two runs never record each other's 0666 as the
    original mode."""
    with open(TUN_NODE_LOCK, "a") as lock:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"{TUN_NODE_LOCK} held for more than {timeout}s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def tun_node_mode() -> int:
    return stat.S_IMODE(os.stat(TUN_NODE).st_mode)


# --------------------------------------------------------------------------- namespace state


def addresses(ns: Namespace, ifname: str) -> set[str]:
    """IPv4 ``address/prefix`` of an interface (empty if it does not exist)."""
    with ns.ipr() as ipr:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            return set()
        return {f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
                for a in ipr.get_addr(index=index[0], family=socket.AF_INET)}


def routes(ns: Namespace) -> dict[str, set[str]]:
    """Main-table IPv4 routes: ``dst/len`` -> names of their output interfaces."""
    out: dict[str, set[str]] = {}
    with ns.ipr() as ipr:
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        for r in ipr.get_routes(family=socket.AF_INET, table=254):
            dst = f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}"
            out.setdefault(dst, set()).add(names.get(r.get_attr("RTA_OIF"), "?"))
    return out


def link_info(ns: Namespace, ifname: str) -> dict | None:
    """index, mtu and kind of a link, or None."""
    with ns.ipr() as ipr:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            return None
        link = ipr.get_links(index[0])[0]
        info = link.get_attr("IFLA_LINKINFO")
        return {"index": index[0], "mtu": link.get_attr("IFLA_MTU"),
                "kind": info.get_attr("IFLA_INFO_KIND") if info else None}


def udp_sockets(ns: Namespace) -> list[str]:
    """Local ``address%device:port`` of every UDP socket in *ns* (from ss)."""
    out = ns.run("ss", "-H", "-u", "-a", "-n").stdout
    return [line.split()[3] for line in out.splitlines() if len(line.split()) >= 4]


# --------------------------------------------------------------------------- TCP from the test


def tcp_listen(ns: Namespace, port: int) -> socket.socket:
    sock = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("0.0.0.0", port))
    sock.listen(8)
    return sock


def tcp_connect(ns: Namespace, listener: socket.socket, host: str, port: int,
                timeout: float = 30) -> tuple[socket.socket, socket.socket]:
    """(client socket in *ns*, accepted server socket), retrying refusals and
    lost SYNs while a fresh tunnel settles."""
    deadline = time.monotonic() + timeout
    while True:
        client = ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(max(1.0, min(5.0, deadline - time.monotonic())))
        try:
            client.connect((host, port))
            break
        except OSError:
            client.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    listener.settimeout(max(1.0, deadline - time.monotonic()))
    server, _ = listener.accept()
    client.settimeout(30)
    server.settimeout(30)
    return client, server


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def exchange(a: socket.socket, b: socket.socket, size: int = 64 * 1024) -> None:
    """*size* random bytes a -> b, then b -> a; both arrive intact.  The
    receiving end reads in a thread: no size has to fit in socket buffers."""
    for src, dst in ((a, b), (b, a)):
        data = os.urandom(size)
        got: list = []
        reader = threading.Thread(
            target=lambda got=got, dst=dst: got.append(_recv_or_error(dst, size)), daemon=True)
        reader.start()
        src.sendall(data)
        reader.join(120)
        assert got, f"receiver still waiting for {size} bytes"
        if isinstance(got[0], Exception):
            raise got[0]
        assert got[0] == data, "data corrupted on an established connection"


def _recv_or_error(sock: socket.socket, n: int):
    try:
        return recv_exact(sock, n)
    except Exception as exc:  # handed to the caller's thread
        return exc


TCP_INFO_OPTIONS, TCPI_OPT_TIMESTAMPS = 5, 2  # tcpi_options in struct tcp_info (linux/tcp.h)
TCP_INFO_ADVMSS = 84  # offset of tcpi_advmss
TCPOLEN_TSTAMP_ALIGNED = 12


def tcp_maxseg(sock: socket.socket) -> int:
    """The MSS the connection sends with (limited by the peer's SYN option)."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)


def tcp_syn_mss(sock: socket.socket) -> int:
    """The MSS option this end put in its SYN (or SYN-ACK): tcpi_advmss, which
    the kernel lowers by the timestamp option's 12 bytes once timestamps are
    agreed."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    advmss = struct.unpack_from("I", info, TCP_INFO_ADVMSS)[0]
    if info[TCP_INFO_OPTIONS] & TCPI_OPT_TIMESTAMPS:
        advmss += TCPOLEN_TSTAMP_ALIGNED
    return advmss


def push_nonblocking(sock: socket.socket, size: int) -> int:
    """Queue up to *size* bytes without blocking; returns how many were queued."""
    sock.setblocking(False)
    queued = 0
    block = os.urandom(64 * 1024)
    try:
        while queued < size:
            queued += sock.send(block[:size - queued])
    except BlockingIOError:
        pass
    return queued


def drain_nonblocking(sock: socket.socket) -> int:
    """Read whatever has arrived; returns the byte count."""
    sock.setblocking(False)
    total = 0
    try:
        while True:
            chunk = sock.recv(1 << 16)
            if not chunk:
                break
            total += len(chunk)
    except BlockingIOError:
        pass
    return total


def tcp_ack_segment(sport: int = 40000, dport: int = 7999) -> bytes:
    """A bare 20-byte TCP ACK header: what a peer's first datagram can look like."""
    return tcp_segment(sport=sport, dport=dport, seq=1, ack=1, window=65535)


def wait_counter(tool, key: str, minimum: int = 1, timeout: float = 30) -> dict:
    """Poll the tool's counters (SIGUSR1) until *key* reaches *minimum*."""
    return wait_for(lambda: (c := tool.counters()).get(key, 0) >= minimum and c, timeout,
                    interval=0.3, what=f"{key} >= {minimum} in {tool!r}")


def udp_rcvbuf_errors(ns) -> int:
    """Datagrams the kernel of *ns* dropped for a full socket receive buffer."""
    lines = [line.split() for line in ns.run("cat", "/proc/net/snmp").stdout.splitlines()
             if line.startswith("Udp:")]
    return int(lines[1][lines[0].index("RcvbufErrors")])
