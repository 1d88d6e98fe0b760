"""The README's walkthrough, as an operator runs it: what reaches the server through
the tunnel (TCP, to the server host itself, addressed to its tun address), and the
recipe bonding-router users run to reach the internet through the server: a SOCKS5
proxy that speaks MPTCP (microsocks under ``mptcpize run``) on the server.

    C (client tunnel) ---veth--- S (server tunnel, proxy) ---veth--- I ("the internet")

C routes only the server's public address into its tun; I is reachable from S only.
"""

from __future__ import annotations

import errno
import hashlib
import re
import secrets
import shutil
import socket

import pytest

from uetlab import Pair, wait_for

INTERNET_S, INTERNET_I = "198.51.100.1", "198.51.100.2"
HTTP_PORT, PROXY_PORT = 8080, 1080


def nstat(ns, name: str) -> int:
    """A kernel counter of *ns* (absolute, history left alone)."""
    out = ns.run("nstat", "-asz", name).stdout
    found = re.search(rf"^{name}\s+(\d+)", out, re.M)
    return int(found.group(1)) if found else 0


def listening(ns, port: int):
    return lambda: f":{port} " in ns.run("ss", "-Hltn", f"sport = :{port}").stdout


def connect_error(ns, host: str, port: int) -> int:
    """0 if a TCP connection from *ns* to host:port is accepted, else its errno."""
    with ns.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        return s.connect_ex((host, port))


@pytest.mark.parametrize("bind", ["any", "tun"])
def test_tcp_arrives_at_the_tun_address(tunnel: Pair, bind):
    """A client's TCP to the server's public address arrives addressed to the server's
    tun address: a service bound to 0.0.0.0 or the tun address takes it, one bound to
    the public address refuses it (the README's walkthrough says so)."""
    s = tunnel.s
    address = {"any": "0.0.0.0", "tun": Pair.SERVER_TUN_IP}[bind]
    with s.socket(socket.AF_INET, socket.SOCK_STREAM) as good, \
            s.socket(socket.AF_INET, socket.SOCK_STREAM) as public:
        good.bind((address, 7100))
        good.listen()
        public.bind((Pair.SERVER_IP, 7101))
        public.listen()
        # from S itself both answer: the difference is the tunnel's doing
        assert connect_error(s, Pair.SERVER_IP, 7101) == 0
        assert connect_error(tunnel.c, Pair.SERVER_IP, 7100) == 0
        conn, peer = good.accept()
        conn.close()
        assert peer[0].startswith("10.9.0.")  # the client's generated address
        assert connect_error(tunnel.c, Pair.SERVER_IP, 7101) == errno.ECONNREFUSED


@pytest.mark.parametrize("bind", ["any", "tun"])
def test_socks5_proxy_under_mptcpize_reaches_the_internet(tunnel: Pair, tmp_path, bind):
    """The recipe: `mptcpize run microsocks` on the server, listening on 0.0.0.0 or the
    tun address; the client (MPTCP too, `mptcpize run curl`) fetches from a host only
    the server can reach, byte-exact, and the proxy's side of the connection is MPTCP."""
    missing = [t for t in ("microsocks", "mptcpize", "curl", "nstat") if not shutil.which(t)]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (scripts/test installs them)")
    lab, s, c = tunnel.lab, tunnel.s, tunnel.c
    i = lab.netns("i")
    lab.veth(s, lab.ifname("si"), f"{INTERNET_S}/24", i, lab.ifname("is"), f"{INTERNET_I}/24")

    www = tmp_path / "www"
    www.mkdir()
    blob = secrets.token_bytes(3 << 20)
    (www / "blob").write_bytes(blob)
    lab.popen(i, ["python3", "-m", "http.server", "--bind", INTERNET_I, "--directory", www,
                  HTTP_PORT], tmp_path / "http.log")
    listen = {"any": "0.0.0.0", "tun": Pair.SERVER_TUN_IP}[bind]
    lab.popen(s, ["mptcpize", "run", "microsocks", "-i", listen, "-p", PROXY_PORT],
              tmp_path / "proxy.log")
    wait_for(listening(i, HTTP_PORT), 20, what="the HTTP server in I")
    wait_for(listening(s, PROXY_PORT), 20, what="microsocks in S")
    # the client cannot reach the internet host itself: only through the proxy
    assert c.run("curl", "-sS", "--max-time", "3", f"http://{INTERNET_I}:{HTTP_PORT}/blob",
                 check=False).returncode != 0

    syn_before = nstat(s, "MPTcpExtMPCapableSYNRX")
    out = tmp_path / "fetched"
    r = c.run("mptcpize", "run", "curl", "-sS", "--fail", "--max-time", "120",
              "--socks5", f"{Pair.SERVER_IP}:{PROXY_PORT}",
              f"http://{INTERNET_I}:{HTTP_PORT}/blob", "-o", out, check=False, timeout=150)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(blob).hexdigest()
    assert nstat(s, "MPTcpExtMPCapableSYNRX") > syn_before  # MPTCP reached the proxy
    assert nstat(c, "MPTcpExtMPCapableSYNACKRX") >= 1  # and the client knows it
    assert [h for h, _, _ in tunnel.server.new_peers()] == [Pair.CLIENT_IP]  # via the tunnel
