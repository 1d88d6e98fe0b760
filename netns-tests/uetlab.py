"""Helpers for the end-to-end tests of udp-encap-tun in network namespaces.

Everything a test builds lives in namespaces named ``uetnt<hex>-<role>``
(unique per test) and is torn down by the ``lab`` fixture whatever the test's
outcome: processes are killed first (a live process would keep its namespace
alive), then the namespaces are deleted, which takes their veths and tuns with
them.  A session-end hook removes anything this session registered that is
still there (e.g. after an interrupted teardown).

Only private test addresses are used, and only inside these namespaces.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
TCPXFER = HERE / "tcpxfer.py"

IFA_F_NODAD = 0x02  # linux/if_addr.h

PREFIX = "uetnt"  # namespaces of this harness: uetnt<6 hex>-<role>

# The two data paths every tunnel test runs on.
DATAPATHS = {"offload": [], "simple": ["--no-offload"]}

COUNTERS_RE = re.compile(r"\bINFO counters (\{.*\})\s*$")
# "new peer 192.0.2.1:5000 -> 10.9.0.131", "new peer 2001:db8::1:5000 -> fd00:9::83"
# (and "[2001:db8::1]:5000" too): the port is what follows the last colon
NEW_PEER_RE = re.compile(r"\bnew peer \[?([0-9a-fA-F.:]+?)\]?:(\d+) -> ([0-9a-fA-F.:]+)")
READY_RE = re.compile(r"\bready: .*UDP port (\d+).*")
# scripts/test runs the suite once per build (see README, "Compiled build"): the tool's ready
# line must name the build it asked for
EXPECTED_BUILD = {"compiled": "compiled (mypyc)", "pure": "pure Python"}.get(
    os.environ.get("UDP_ENCAP_TUN_EXPECT_BUILD", ""))

_registered_namespaces: set[str] = set()


# --------------------------------------------------------------------------- helpers

def read_text(path: Path) -> str:
    """A process's output file so far ("" before it exists)."""
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def json_lines(text: str) -> list[dict]:
    """The lines of *text* that are JSON (anything else, e.g. a traceback, skipped)."""
    out = []
    for line in text.splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


def wait_for(predicate, timeout: float, what: str = "condition", interval: float = 0.05):
    """Poll *predicate* until it returns a truthy value (returned) or *timeout* passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def assert_operator_error(result, *needles) -> str:
    """The tool failed the way operator mistakes must: exit 2, one stderr line
    ``udp-encap-tun: error: ...`` (containing *needles*), nothing on stdout."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("udp-encap-tun: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def clean_env(extra: dict | None = None) -> dict:
    """The caller's environment without anything that would configure the tool
    behind the test's back, plus *extra*."""
    drop = ("UDP_ENCAP_TUN_", "NOTIFY_SOCKET", "WATCHDOG_", "JOURNAL_STREAM")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra or {})
    return env


def _kill(proc: subprocess.Popen, grace: float = 2.0) -> None:
    if proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
    except ProcessLookupError:
        pass


def remove_namespace(name: str) -> None:
    """Kill what still runs in a namespace of ours and delete it."""
    path = Path("/run/netns") / name
    if not path.exists():
        _registered_namespaces.discard(name)
        return
    # kill anything still running inside (started by this harness: the namespace is ours)
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                          text=True).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    subprocess.run(["ip", "netns", "del", name], capture_output=True)
    if not path.exists():
        _registered_namespaces.discard(name)


def _remove_registered() -> None:
    for name in sorted(_registered_namespaces):
        remove_namespace(name)


atexit.register(_remove_registered)


# --------------------------------------------------------------------------- namespaces


def register_namespace(name: str) -> None:
    """Delete *name* at the end of the session (or of the process) if still there."""
    _registered_namespaces.add(name)


class Namespace:
    """A network namespace created for one test (pyroute2 for configuration,
    ``ip netns exec`` for processes)."""

    def __init__(self, name: str):
        from pyroute2 import netns

        self.name = name
        _registered_namespaces.add(name)
        netns.create(name)
        with self.ipr() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")

    def __repr__(self) -> str:
        return f"Namespace({self.name})"

    def ipr(self):
        from pyroute2 import NetNS

        return NetNS(self.name, flags=0)

    def exec_args(self, argv) -> list[str]:
        return ["ip", "netns", "exec", self.name, *map(str, argv)]

    def run(self, *argv, check: bool = True, timeout: float = 30, env=None,
            **kw) -> subprocess.CompletedProcess:
        return subprocess.run(self.exec_args(argv), capture_output=True, text=True,
                              timeout=timeout, check=check, env=clean_env(env), cwd=REPO, **kw)

    def socket(self, family=socket.AF_INET, type=socket.SOCK_DGRAM, proto=0) -> socket.socket:
        """A socket that lives in this namespace (usable from the test process)."""
        from pyroute2 import netns

        return netns.create_socket(self.name, family, type, proto, flags=0)

    # -- configuration ------------------------------------------------------
    def index(self, ifname: str) -> int | None:
        with self.ipr() as ipr:
            found = ipr.link_lookup(ifname=ifname)
        return found[0] if found else None

    def link_exists(self, ifname: str) -> bool:
        return self.index(ifname) is not None

    def links(self) -> list[str]:
        with self.ipr() as ipr:
            return sorted(link.get_attr("IFLA_IFNAME") for link in ipr.get_links())

    def add_address(self, ifname: str, cidr: str) -> None:
        """Add *cidr* to *ifname*; an IPv6 address without duplicate address detection
        (usable at once, not tentative for a second or two)."""
        address, prefix = cidr.split("/")
        kw = {"family": socket.AF_INET6, "flags": IFA_F_NODAD} if ":" in address else {}
        with self.ipr() as ipr:
            ipr.addr("add", index=ipr.link_lookup(ifname=ifname)[0], address=address,
                     prefixlen=int(prefix), **kw)

    def addresses(self, family: int) -> list[str]:
        """Every address of *family* (socket.AF_INET, AF_INET6) in this namespace."""
        with self.ipr() as ipr:
            return sorted(a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(family=family))

    def add_route(self, dst: str, dev: str | None = None, gateway: str | None = None) -> None:
        kw = {"dst": dst}
        if ":" in dst:
            kw["family"] = socket.AF_INET6
        with self.ipr() as ipr:
            if dev is not None:
                kw["oif"] = ipr.link_lookup(ifname=dev)[0]
            if gateway is not None:
                kw["gateway"] = gateway
            ipr.route("add", **kw)

    def set_up(self, ifname: str) -> None:
        with self.ipr() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname=ifname)[0], state="up")

    def sysctl(self, key: str, value) -> None:
        self.run("sysctl", "-q", "-w", f"{key}={value}")

    def wait_link(self, ifname: str, timeout: float = 10) -> None:
        wait_for(lambda: self.link_exists(ifname), timeout, what=f"link {ifname} in {self.name}")


# --------------------------------------------------------------------------- the tool


class ToolProcess:
    """``python -m udp_encap_tun ...`` running in a namespace, stderr in a file
    (*command*: another udp-encap-tun command instead, e.g. an installed one)."""

    def __init__(self, ns: Namespace, args, log_path: Path, env=None, command=None):
        self.ns = ns
        self.args = [str(a) for a in args]
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (the process's stderr while it runs)
        self.of_checkout = command is None  # the checkout's package: EXPECTED_BUILD's build
        command = command or [sys.executable, "-m", "udp_encap_tun"]
        self.proc = subprocess.Popen(
            ns.exec_args([*command, *self.args]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._log,
            env=clean_env(env), cwd=REPO)
        self.returncode: int | None = None

    def __repr__(self) -> str:
        return f"ToolProcess({self.ns.name}: {' '.join(self.args)})"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout: float = 20) -> int:
        """Wait for the ``ready:`` line; returns the UDP port it reports."""
        def ready():
            m = READY_RE.search(self.log())
            if m:
                assert EXPECTED_BUILD is None or not self.of_checkout \
                    or m.group(0).endswith("; " + EXPECTED_BUILD), \
                    f"not the {EXPECTED_BUILD} build: {m.group(0)}"
                return m
            if not self.alive():
                raise AssertionError(f"udp-encap-tun exited with {self.proc.returncode} before "
                                     f"ready:\n{self.log()}")
            return None
        return int(wait_for(ready, timeout, what=f"{self!r} to be ready").group(1))

    def counter_lines(self) -> list[dict]:
        return [json.loads(m.group(1)) for line in self.log().splitlines()
                if (m := COUNTERS_RE.search(line))]

    def counters(self, timeout: float = 10) -> dict:
        """Counters of the running process (SIGUSR1, then the new log line)."""
        assert self.alive(), f"{self!r} is not running:\n{self.log()}"
        before = len(self.counter_lines())
        self.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: len(self.counter_lines()) > before, timeout,
                 what="a counters line after SIGUSR1")
        return self.counter_lines()[-1]

    def stop(self, timeout: float = 15) -> dict:
        """SIGTERM; the process must exit 0.  Returns the final counters."""
        assert self.alive(), f"{self!r} died early ({self.proc.returncode}):\n{self.log()}"
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.returncode = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(
                f"{self!r} did not exit within {timeout}s of SIGTERM:\n{self.log()}") from None
        assert self.returncode == 0, f"exit status {self.returncode} after SIGTERM:\n{self.log()}"
        lines = self.counter_lines()
        assert lines, f"no counters line at exit:\n{self.log()}"
        return lines[-1]

    @contextlib.contextmanager
    def paused(self):
        """SIGSTOP for the duration of the block, then SIGCONT: what arrives
        meanwhile queues up and is read in one burst."""
        self.proc.send_signal(signal.SIGSTOP)
        try:
            yield
        finally:
            self.proc.send_signal(signal.SIGCONT)

    def wait_exit(self, timeout: float = 20) -> int:
        self.returncode = self.proc.wait(timeout)
        return self.returncode

    def new_peers(self) -> list[tuple[str, int, str]]:
        """(host, port, generated address) of every ``new peer`` log line, in order."""
        return [(m.group(1), int(m.group(2)), m.group(3)) for m in NEW_PEER_RE.finditer(self.log())]

    def close(self) -> None:
        _kill(self.proc)
        self._log.close()


# --------------------------------------------------------------------------- TCP transfers


class Transfer:
    """One tcpxfer.py server (in *server_ns*) and client (in *client_ns*)."""

    def __init__(self, lab: Lab, server_ns: Namespace, client_ns: Namespace, host: str,
                 port: int, direction: str, size: int, timeout: float):
        self.direction, self.size, self.timeout = direction, size, timeout
        tag = f"{direction}-{port}-{len(lab.procs)}"
        self.server_out = lab.tmp / f"xfer-server-{tag}.out"
        self.client_out = lab.tmp / f"xfer-client-{tag}.out"
        common = ["--port", port, "--direction", direction, "--size", size,
                  "--timeout", min(timeout, 30)]
        bind = ["--bind", "::"] if ":" in host else []  # an IPv6 server for an IPv6 host
        self.server = lab.popen(server_ns, [sys.executable, TCPXFER, "server", *common, *bind,
                                            "--accept-timeout", timeout], self.server_out)
        wait_for(lambda: self._lines(self.server_out) or self.server.poll() is not None, 15,
                 what="the transfer server to listen")
        first = self._lines(self.server_out)
        assert first and first[0].get("event") == "listening", \
            f"transfer server did not start: {self.server_out.read_text()}"
        self.client = lab.popen(client_ns, [sys.executable, TCPXFER, "client", "--host", host,
                                            *common, "--connect-timeout", 20], self.client_out)

    @staticmethod
    def _lines(path: Path) -> list[dict]:
        """The JSON lines of an end's output."""
        return json_lines(read_text(path))

    def wait(self) -> dict:
        """Wait for both ends; assert a byte-exact transfer; return both results.

        Nothing hangs: past the timeout, or a few seconds after one end failed,
        whatever still runs is killed."""
        deadline = time.monotonic() + self.timeout
        procs = (self.client, self.server)
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                deadline = min(deadline, time.monotonic() + 5)
            time.sleep(0.05)
        for proc in procs:
            _kill(proc)
        client = [r for r in self._lines(self.client_out) if "ok" in r]
        server = [r for r in self._lines(self.server_out) if "ok" in r]
        detail = (f"client: {self.client_out.read_text() if self.client_out.exists() else ''}"
                  f"server: {self.server_out.read_text()}")
        assert client and server, \
            f"transfer incomplete (an end failed, or {self.timeout:.0f}s passed); {detail}"
        client, server = client[-1], server[-1]
        assert client["ok"] and server["ok"], f"transfer failed; {detail}"
        src, dst = (client, server) if self.direction == "upload" else (server, client)
        assert src["bytes"] == dst["bytes"] == self.size, detail
        assert src["sha256"] == dst["sha256"], f"data corrupted; {detail}"
        assert src["match"], f"digest echo mismatch; {detail}"
        return {"client": client, "server": server,
                "server_saw": server["peer"], "client_saw": client["peer"]}


# --------------------------------------------------------------------------- the lab


class Lab:
    """Namespaces, links and processes of one test; ``cleanup`` undoes it all."""

    def __init__(self, tmp: Path, datapath: str):
        self.tmp = tmp
        self.datapath = datapath
        self.datapath_args = DATAPATHS[datapath]
        self.suffix = secrets.token_hex(3)
        self.namespaces: list[Namespace] = []
        self.procs: list[subprocess.Popen] = []
        self.tools: list[ToolProcess] = []

    # -- building -------------------------------------------------------------
    def netns(self, role: str) -> Namespace:
        ns = Namespace(f"{PREFIX}{self.suffix}-{role}")
        self.namespaces.append(ns)
        return ns

    def ifname(self, role: str) -> str:
        name = f"{role}{self.suffix}"
        assert len(name) <= 15, name
        return name

    def veth(self, a: Namespace, a_if: str, a_cidr: str | None,
             b: Namespace, b_if: str, b_cidr: str | None) -> None:
        """A veth pair created directly inside *a* (its peer inside *b*), addressed and up."""
        with a.ipr() as ipr:
            ipr.link("add", ifname=a_if, kind="veth", peer={"ifname": b_if, "net_ns_fd": b.name})
        for ns, ifname, cidr in ((a, a_if, a_cidr), (b, b_if, b_cidr)):
            ns.wait_link(ifname)
            if cidr:
                ns.add_address(ifname, cidr)
            ns.set_up(ifname)

    # -- processes --------------------------------------------------------------
    def popen(self, ns: Namespace, argv, out_path: Path, env=None) -> subprocess.Popen:
        with open(out_path, "wb") as out:
            proc = subprocess.Popen(ns.exec_args(argv), stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, env=clean_env(env), cwd=REPO)
        self.procs.append(proc)
        return proc

    def tool(self, ns: Namespace, *args, env=None, datapath: bool = True,
             ready: bool = True, command=None) -> ToolProcess:
        """Start udp-encap-tun in *ns* (with this test's data-path option unless
        ``datapath=False``; *command*: see ToolProcess); by default wait for ``ready:``."""
        argv = [*args, *(self.datapath_args if datapath else [])]
        t = ToolProcess(ns, argv, self.tmp / f"tool-{len(self.tools)}-{ns.name}.log", env,
                        command)
        self.tools.append(t)
        if ready:
            t.wait_ready()
        return t

    def transfer(self, server_ns, client_ns, host, port, direction="upload",
                 size=1 << 20, timeout=120.0, wait=True):
        t = Transfer(self, server_ns, client_ns, host, port, direction, size, timeout)
        return t.wait() if wait else t

    # -- teardown -----------------------------------------------------------------
    def logs(self, tail: int = 60) -> str:
        """The last *tail* lines of each tool's log (for failure reports)."""
        return "\n".join(f"===== {t!r}\n(full log: {t.log_path})\n"
                         + "\n".join(t.log().splitlines()[-tail:]) for t in self.tools)

    def cleanup(self) -> None:
        for t in self.tools:
            t.close()
        for p in self.procs:
            _kill(p)
        for ns in reversed(self.namespaces):
            remove_namespace(ns.name)
        left = [ns.name for ns in self.namespaces if Path("/run/netns", ns.name).exists()]
        assert not left, f"namespaces left behind: {left}"


# --------------------------------------------------------------------------- the standard pair


class Pair:
    """Client namespace C and server namespace S joined by a veth, a server
    tunnel in S and (optionally) a client tunnel in C, following the recipe:

        C: vc 192.0.2.1/24, tun 10.9.0.2/32, route 192.0.2.2/32 dev tun
        S: vs 192.0.2.2/24, tun 10.9.0.1/24 (pool: the rest of 10.9.0.0/24)
    """

    CLIENT_IP, SERVER_IP = "192.0.2.1", "192.0.2.2"
    CLIENT_TUN_IP, SERVER_TUN_IP = "10.9.0.2", "10.9.0.1"
    PORT = 5000
    LINK_PREFIX, TUN_PREFIX, HOST_PREFIX = 24, 24, 32  # the veth's, the server tun's, a host's

    def __init__(self, lab: Lab):
        self.lab = lab
        self.c, self.s = lab.netns("c"), lab.netns("s")
        self.vc, self.vs = lab.ifname("vc"), lab.ifname("vs")
        self.ctun, self.stun = lab.ifname("tc"), lab.ifname("ts")
        lab.veth(self.c, self.vc, f"{self.CLIENT_IP}/{self.LINK_PREFIX}",
                 self.s, self.vs, f"{self.SERVER_IP}/{self.LINK_PREFIX}")
        self.server: ToolProcess | None = None
        self.client: ToolProcess | None = None

    def start_server(self, *extra, env=None, port: int | None = PORT,
                     command=None) -> ToolProcess:
        """Server tunnel in S (``port=None``: no --listen-port on the command line;
        *command*: see ToolProcess)."""
        listen = ["--listen-port", port] if port is not None else []
        self.server = self.lab.tool(self.s, "--interface", self.stun, *listen,
                                    "--bind-to-interface", self.vs, *extra, env=env,
                                    command=command)
        self.s.add_address(self.stun, f"{self.SERVER_TUN_IP}/{self.TUN_PREFIX}")
        return self.server

    def start_client(self, *extra, env=None, port: int = PORT,
                     endpoint_port: int = PORT, command=None) -> ToolProcess:
        """Client tunnel in C, its address and the host route into it."""
        self.client = self.lab.tool(
            self.c, "--interface", self.ctun, "--listen-port", port,
            "--bind-to-interface", self.vc, "--endpoint-port", endpoint_port, *extra, env=env,
            command=command)
        self.c.add_address(self.ctun, f"{self.CLIENT_TUN_IP}/{self.HOST_PREFIX}")
        self.c.add_route(f"{self.SERVER_IP}/{self.HOST_PREFIX}", dev=self.ctun)
        return self.client

    def transfer(self, port: int, direction: str = "upload", size: int = 1 << 20, **kw):
        return self.lab.transfer(self.s, self.c, self.SERVER_IP, port, direction, size, **kw)


class Pair6(Pair):
    """The standard pair over IPv6 only: no IPv4 address anywhere (not even
    loopback's), IPv6 outside and inside the tunnel:

        C: vc 2001:db8:1::1/64, tun fd00:9::2/128, route 2001:db8:1::2/128 dev tun
        S: vs 2001:db8:1::2/64, tun fd00:9::1/64 (pool: the rest of fd00:9::/64)
    """

    CLIENT_IP, SERVER_IP = "2001:db8:1::1", "2001:db8:1::2"
    CLIENT_TUN_IP, SERVER_TUN_IP = "fd00:9::2", "fd00:9::1"
    LINK_PREFIX, TUN_PREFIX, HOST_PREFIX = 64, 64, 128
    POOL = "fd00:9::/64"

    def __init__(self, lab: Lab):
        super().__init__(lab)
        for ns in (self.c, self.s):
            ns.run("ip", "-4", "addr", "flush", "dev", "lo")


def counter_delta(after: dict, before: dict, key: str) -> int:
    return after.get(key, 0) - before.get(key, 0)


def require_root() -> None:
    import pytest

    if os.geteuid() != 0:
        pytest.skip("network-namespace tests need root")
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (ip) is not installed")
    if not os.path.exists("/dev/net/tun"):
        pytest.skip("/dev/net/tun is missing")


def remove_registered() -> None:
    """Delete every namespace this process created that still exists."""
    _remove_registered()
