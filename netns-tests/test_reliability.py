"""Faults of the host and floods against availability: signal storms, peers
coming and going around the timeout, a local user hammering the status socket,
a spoofed HELLO flood while a keyed client connects."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from auth_tools import (
    FLOOD_NFT,
    HandDriven,
    Stream,
    SwitchedPair,
    ipv4_udp,
    nft_counter,
    random_source,
    read_psk,
    recv_control,
    tcp_looking,
    udp_socket,
    write_psk,
)
from ops_tools import setpriv_argv, tcp_connect, tcp_listen, udp_rcvbuf_errors
from udp_encap_tun import auth
from uetlab import Pair, counter_delta, wait_for

MB = 1 << 20


# --------------------------------------------------------------------------- signals


class SignalStorm:
    """SIGUSR1 to *pid* as fast as one thread can send them, until stopped."""

    def __init__(self, pid: int):
        self.pid = pid
        self.sent = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                os.kill(self.pid, signal.SIGUSR1)
            except ProcessLookupError:
                return
            self.sent += 1

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(10)


def fill_pipes(pid: int) -> int:
    """Fill every pipe *pid* holds (the daemon has one: its signal wake-up pipe)
    to the brim, through /proc, with SIGUSR1 bytes.  Returns the bytes written."""
    written = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        path = f"/proc/{pid}/fd/{fd}"
        try:
            if not os.readlink(path).startswith("pipe:"):
                continue
            w = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            while True:
                written += os.write(w, bytes([signal.SIGUSR1]) * 4096)
        except BlockingIOError:
            pass
        finally:
            os.close(w)
    return written


@pytest.mark.parametrize("datapath", ["offload"])  # signals do not touch the data path
def test_sigterm_during_a_sigusr1_storm_is_never_lost(pair: Pair):
    """A SIGUSR1 storm, and the signal wake-up pipe full at the moment SIGTERM
    comes: the daemon still stops (exit 0, its tun removed), every time.
    Before, the SIGTERM byte was lost whenever the pipe was full (1 in 6 tries
    under a storm alone) and the daemon stayed up."""
    for attempt in range(3):
        server = pair.start_server()
        with SignalStorm(server.pid) as storm:
            wait_for(lambda server=server: storm.sent >= 20_000 or not server.alive(), 30,
                     interval=0.05, what="the SIGUSR1 storm to get going")
            assert server.alive(), server.log()
            filled = fill_pipes(server.pid)
            server.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)  # the storm goes on after the SIGTERM
        try:
            code = server.wait_exit(20)
        except Exception as exc:
            raise AssertionError(f"try {attempt + 1}: still running 20 s after SIGTERM "
                                 f"({storm.sent} SIGUSR1 sent):\n{server.log()[-3000:]}") from exc
        lines = server.counter_lines()
        print(f"try {attempt + 1}: {storm.sent} SIGUSR1 sent, wake-up pipe topped up with "
              f"{filled} bytes before SIGTERM, {len(lines)} counter lines logged, exit {code}")
        assert filled > 0  # the pipe was found and was full when SIGTERM came
        assert code == 0, server.log()[-3000:]
        assert "SIGTERM: stopping" in server.log()
        assert not pair.s.link_exists(pair.stun)


# --------------------------------------------------------------------------- the store's clock


def status_json(pair: Pair) -> dict:
    r = pair.s.run(sys.executable, "-m", "udp_encap_tun", "status", "--json", "--interface",
                   pair.stun, "--timeout", "30", timeout=60)
    return json.loads(r.stdout)


def test_peers_returning_around_the_timeout_keep_their_address_and_leak_nothing(pair: Pair):
    """--peer-timeout 1; twelve peers each send a segment every 0.8 to 1.2 s for
    8 s, so that they come back just before, at and just after their expiry.
    Each gets the same generated address every time, the server never lists a
    peer twice, and once they are all quiet nothing is left: every address
    back in the pool, peers_expired equal to peers_added.  (With two clocks in
    the store, returning peers got a second address and the first leaked.)"""
    import random
    rng = random.Random(11)
    from udp_encap_tun.store import AddressPool
    pair.start_server("--peer-timeout", "1")
    # ports whose preferred addresses differ (the default key), so that each peer's
    # address is always free when it comes back: its own address every time
    pool = AddressPool(f"{Pair.SERVER_TUN_IP}/24", reserved=[Pair.SERVER_TUN_IP])
    ports, preferred = [], set()
    for port in range(41000, 42000):
        first = next(pool.candidates((Pair.CLIENT_IP, port)))
        if first not in preferred and len(ports) < 12:
            ports.append(port)
            preferred.add(first)
    socks = [udp_socket(pair.c, pair.vc, Pair.CLIENT_IP, port) for port in ports]
    try:
        due = {port: time.monotonic() + rng.uniform(0, 1) for port in ports}
        end = time.monotonic() + 8
        most_listed = 0
        while time.monotonic() < end:
            now = time.monotonic()
            for sock, port in zip(socks, ports, strict=False):
                if now >= due[port]:
                    sock.sendto(tcp_looking(rng), (Pair.SERVER_IP, Pair.PORT))
                    due[port] = now + rng.uniform(0.8, 1.2)
            time.sleep(0.01)
            if rng.random() < 0.02:
                doc = status_json(pair)
                listed = [p["peer"] for p in doc["peers"]]
                assert len(listed) == len(set(listed)) == doc["peer_count"], doc["peers"]
                most_listed = max(most_listed, len(listed))
    finally:
        for sock in socks:
            sock.close()
    quiet = wait_for(lambda: (d := status_json(pair)) and d["peer_count"] == 0 and d, 30,
                     interval=0.5, what="every peer to expire once all are quiet")
    counters = quiet["counters"]
    addresses = {}
    for host, port, address in pair.server.new_peers():
        addresses.setdefault((host, port), set()).add(address)
    print(f"peers came back {counters['peers_added'] - len(ports)} times; at most {most_listed} "
          f"listed at once; expired {counters.get('peers_expired', 0)}")
    assert set(addresses) == {(Pair.CLIENT_IP, p) for p in ports}
    assert all(len(a) == 1 for a in addresses.values()), addresses  # the same address each time
    assert len({a for s in addresses.values() for a in s}) == len(ports)
    assert counters["peers_added"] > len(ports)  # they did expire and come back
    assert counters["peers_expired"] == counters["peers_added"], counters
    assert quiet["peers"] == []
    final = pair.server.stop()
    assert final.get("internal_error", 0) == 0


# --------------------------------------------------------------------------- status socket


class PingPong:
    """One-byte request/response over one TCP connection through the tunnel,
    back to back, from a thread; records each round trip (seconds)."""

    def __init__(self, pair: Pair, port: int):
        listener = tcp_listen(pair.s, port)
        self.client, self.server = tcp_connect(pair.c, listener, Pair.SERVER_IP, port)
        listener.close()
        for sock in (self.client, self.server):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.rtts: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._echo, daemon=True),
                         threading.Thread(target=self._ping, daemon=True)]
        for t in self._threads:
            t.start()

    def _echo(self) -> None:
        try:
            while data := self.server.recv(1):
                self.server.sendall(data)
        except OSError as exc:
            if not self._stop.is_set():
                self.errors.append(f"echo: {exc}")

    def _ping(self) -> None:
        try:
            while not self._stop.is_set():
                start = time.perf_counter()
                self.client.sendall(b"x")
                if self.client.recv(1) != b"x":
                    if not self._stop.is_set():
                        self.errors.append("ping: connection closed")
                    return
                self.rtts.append(time.perf_counter() - start)
        except OSError as exc:
            if not self._stop.is_set():
                self.errors.append(f"ping: {exc}")

    def count(self) -> int:
        return len(self.rtts)

    def close(self) -> None:
        self._stop.set()
        self.client.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(10)
        self.client.close()
        self.server.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# connect, close, as fast as possible, for a while; prints what it did
HAMMER = """
import socket, sys, time
name, seconds = sys.argv[1].encode(), float(sys.argv[2])
connected = refused_full = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        s.connect(b"\\0" + name)
        connected += 1
    except BlockingIOError:
        refused_full += 1
    s.close()
print(connected, refused_full)
"""


def hammer_python() -> str:
    """A Python the unprivileged user can run (the test's own may live under /root)."""
    return "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else shutil.which("python3")


def test_status_hammer_by_an_unprivileged_user_leaves_the_data_path_running(pair: Pair):
    """An unprivileged local user connects to the status socket and closes, as
    fast as two processes can, for 6 s, while a one-byte ping-pong runs through
    the tunnel: the ping-pong keeps completing, root's ``status --timeout``
    gets its document through the full backlog, and the server is alive and
    well afterwards.  (Before, a connect/close loop held the loop in one accept
    call for up to 421 ms.)  Round-trip figures are printed, not asserted."""
    pair.start_server()
    pair.start_client()
    pingpong = PingPong(pair, 7101)
    try:
        wait_for(lambda: pingpong.count() >= 200 or pingpong.errors, 60, interval=0.05,
                 what="the ping-pong to get going")
        mark = pingpong.count()
        time.sleep(2)
        calm = pingpong.rtts[mark:]
        seconds = 6
        hammers = [subprocess.Popen(
            pair.s.exec_args([*setpriv_argv(False), hammer_python(), "-c", HAMMER,
                              f"udp-encap-tun/{pair.stun}", seconds]),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
        try:
            time.sleep(1)  # the hammer is at full swing
            during_start = pingpong.count()
            queries = []
            for _ in range(3):  # root's status gets through, however full the backlog is
                q = pair.s.run(sys.executable, "-m", "udp_encap_tun", "status", "--json",
                               "--interface", pair.stun, "--timeout", "30", check=False, timeout=60)
                queries.append(q)
            outs = [h.communicate(timeout=seconds + 30) for h in hammers]
        finally:
            for h in hammers:
                if h.poll() is None:
                    h.kill()
                    h.wait(10)
        during = pingpong.rtts[during_start:]
        after_mark = pingpong.count()
        wait_for(lambda: pingpong.count() >= after_mark + 100 or pingpong.errors, 60,
                 interval=0.05, what="the ping-pong to go on after the hammer")
    finally:
        pingpong.close()
    connects = [tuple(map(int, out.split())) for out, _err in outs]
    print(f"hammer: {connects} (connected, backlog full) per process in {seconds}s")
    print(f"ping-pong round trips: calm {len(calm)} in 2s, "
          f"p50 {percentile(calm, .5) * 1e3:.2f} ms, "
          f"p99 {percentile(calm, .99) * 1e3:.2f} ms; under the hammer {len(during)}, "
          f"p50 {percentile(during, .5) * 1e3:.2f} ms, "
          f"p99 {percentile(during, .99) * 1e3:.2f} ms, "
          f"max {max(during, default=0) * 1e3:.1f} ms")
    for h, (_out, err) in zip(hammers, outs, strict=False):
        assert h.returncode == 0, err
    assert sum(c for c, _ in connects) > 1000, connects  # the hammer did hammer
    assert not pingpong.errors, pingpong.errors
    assert len(during) > 0  # the data path kept serving while the hammer ran
    for q in queries:
        assert q.returncode == 0, q.stderr
        doc = json.loads(q.stdout)
        assert doc["interface"] == pair.stun and doc["mode"] == "server"
    counters = pair.server.stop()
    assert counters.get("internal_error", 0) == 0, counters


# --------------------------------------------------------------------------- floods


class SpoofedFlood:
    """Datagrams from random spoofed sources (203.0.113.0/24, 100.64.0.0/10) to
    the server at about *rate* a second from a raw socket in the attacker's
    namespace, from a thread, until stopped or *limit* seconds have passed."""

    def __init__(self, net: SwitchedPair, payload: bytes, rate: float, limit: float = 90.0,
                 seed: int = 1):
        import random
        self.rng = random.Random(seed)
        self.raw = net.a.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.payload, self.rate, self.limit = payload, rate, limit
        self.sent = 0
        self.hit_limit = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        dst = socket.inet_aton(Pair.SERVER_IP)
        start = time.monotonic()
        end = start + self.limit
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= end:
                self.hit_limit = True
                return
            ahead = self.sent / self.rate - (now - start)
            if ahead > 0:
                time.sleep(ahead)
            for _ in range(8):  # small bursts: a steady flood, not one with pauses
                datagram = ipv4_udp(random_source(self.rng), self.rng.randrange(1024, 65536),
                                    dst, Pair.PORT, self.payload)
                try:
                    self.raw.sendto(datagram, (Pair.SERVER_IP, 0))
                except OSError:  # ENOBUFS: the veth's queue is full, go on
                    continue
                self.sent += 1

    def __enter__(self):
        self.start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(30)
        self.seconds = time.monotonic() - self.start
        self.raw.close()


HELLO = auth.header(auth.HELLO) + bytes(auth.HELLO_SIZE - auth.HEADER_LEN)
FLOOD_RATE = 8000  # datagrams a second


def test_spoofed_hello_flood_does_not_keep_a_keyed_client_out(lab, tmp_path):
    """A HELLO flood from random spoofed sources, several times what one
    handshake bucket for everybody allowed (1000/s), runs against a server with
    a PSK.  HELLOs from a real address in the middle of it are answered (all
    that the kernel did not drop for a full receive buffer, but 2; the one
    bucket answered 7 in 10 of them with no kernel drops),
    and a keyed client started then authenticates and carries a transfer
    through the tunnel while the flood is still running.  The rate is one the
    server can read on this machine: a flood that overflows the socket's
    receive buffer loses real datagrams in the kernel, which no fairness in
    the server can help."""
    psk = write_psk(tmp_path / "psk")
    net = SwitchedPair(lab)
    net.s.run("nft", "-f", "-", input=FLOOD_NFT % Pair.PORT)
    server = net.start_server("--psk-file", psk)
    with SpoofedFlood(net, HELLO, rate=FLOOD_RATE) as flood:
        wait_for(lambda: nft_counter(net.s) >= 2 * FLOOD_RATE, 60, interval=0.1,
                 what="the flood to reach the server")
        before = server.counters()
        hand = HandDriven(read_psk(psk), (Pair.SERVER_IP, Pair.PORT))
        probes, answered = 20, 0
        arrived_before, lost_before = nft_counter(net.s), udp_rcvbuf_errors(net.s)
        with udp_socket(net.c, net.vc, Pair.CLIENT_IP, 40001, timeout=3) as sock:
            for _ in range(probes):
                hello = hand.hello()
                sock.sendto(hello, (Pair.SERVER_IP, Pair.PORT))
                try:
                    while True:
                        _, body, _ = recv_control(sock, (Pair.SERVER_IP, Pair.PORT),
                                                  {auth.CHALLENGE})
                        nonce = hello[auth.HEADER_LEN:auth.HEADER_LEN + auth.NONCE_LEN]
                        if body[:auth.NONCE_LEN] == nonce:
                            answered += 1
                            break
                except TimeoutError:
                    pass
                time.sleep(0.1)
        arrived_probing = nft_counter(net.s) - arrived_before
        lost_probing = udp_rcvbuf_errors(net.s) - lost_before
        client = net.start_client("--psk-file", psk)
        result = net.transfer(7201, "upload", MB, timeout=60)
        still_flooding = not flood.hit_limit
        during = server.counters()
    arrived = nft_counter(net.s)
    rate = flood.sent / flood.seconds
    print(f"flood: {flood.sent} spoofed HELLOs sent in {flood.seconds:.1f}s ({rate:.0f}/s), "
          f"{arrived} arrived; server while the client came in: "
          f"{counter_delta(during, before, 'auth_challenge_sent')} challenges sent, "
          f"{counter_delta(during, before, 'auth_fail_rate_limited')} rate-limited")
    # a server slower than the flood (a loaded machine) loses datagrams in the kernel,
    # real HELLOs as much as spoofed ones; of what the kernel kept, all must be answered
    kept = 1 - min(1.0, lost_probing / max(1, arrived_probing))
    print(f"HELLOs from a real address during the flood: {answered} of {probes} answered; "
          f"the kernel dropped {lost_probing} of {arrived_probing} datagrams meanwhile "
          f"(full receive buffer)")
    assert answered >= probes * kept - 2, (answered, probes, kept)
    assert still_flooding, "the flood ended before the client got through"
    assert result["server_saw"], result  # byte-exact (Transfer.wait checked it)
    assert counter_delta(during, before, "auth_challenge_sent") > 1000, (before, during)
    final = server.stop()
    # a slow server may answer two of the client's HELLOs, and accept both RESPONSEs:
    # still one peer
    assert final.get("auth_accepted", 0) >= 1 and final["peers_added"] == 1, final
    assert client.stop().get("auth_authenticated", 0) >= 1
    assert final.get("internal_error", 0) == 0


@pytest.mark.parametrize("datapath", ["offload"])  # AUTH_REQUIRED is decided before the data path
def test_junk_flood_does_not_keep_a_restarted_server_from_asking_clients_back(lab, tmp_path):
    """A flood of TCP-looking junk from random spoofed sources, each of which a
    keyed server answers with AUTH_REQUIRED (rate-limited); the server restarts
    under a live TCP stream: the client is told to authenticate again, does, and
    the stream goes on byte-exact while the flood is still running.  (With one
    AUTH_REQUIRED bucket for everybody the flood used it up.)"""
    import random
    psk = write_psk(tmp_path / "psk")
    net = SwitchedPair(lab)
    net.s.run("ip", "tuntap", "add", "dev", net.stun, "mode", "tun")  # survives the restart
    first = net.start_server("--psk-file", psk)
    net.start_client("--psk-file", psk)
    junk = tcp_looking(random.Random(3))
    stream = Stream(net.c, net.s, Pair.SERVER_IP, 7301)
    try:
        wait_for(lambda: stream.check() or stream.received >= 256 * 1024, 60, interval=0.05,
                 what="the stream to get going")
        with SpoofedFlood(net, junk, rate=FLOOD_RATE) as flood:
            time.sleep(1)
            first.stop()
            at_restart = stream.received
            second = lab.tool(net.s, "--interface", net.stun, "--listen-port", Pair.PORT,
                              "--bind-to-interface", net.vs, "--psk-file", psk)
            net.server = second
            wait_for(lambda: stream.check() or stream.received >= at_restart + 2 * MB, 90,
                     interval=0.1, what="the stream to go on after the restart")
            still_flooding = not flood.hit_limit
            during = second.counters()
        result = stream.finish()
    finally:
        stream.close()
    print(f"flood: {flood.sent} spoofed segments in {flood.seconds:.1f}s; restarted server: "
          f"{during.get('rx_drop_unauthenticated', 0)} unauthenticated datagrams dropped")
    assert still_flooding
    assert not result["errors"], result
    assert result["sent"] == result["received"]
    assert result["sent_sha256"] == result["received_sha256"]
    assert during.get("rx_drop_unauthenticated", 0) > 1000, during  # the flood reached it
    client = net.client.stop()
    assert client.get("auth_auth_required", 0) >= 1, client
    assert client.get("auth_authenticated", 0) >= 2, client
    final = second.stop()
    assert final.get("auth_accepted", 0) >= 1 and final["peers_added"] == 1, final
    assert final.get("internal_error", 0) == 0
