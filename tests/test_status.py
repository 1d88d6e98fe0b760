"""Live status: the document, its text and Prometheus renderings, the status
server's socket handling (in-process, no root) and the ``status`` command."""

from __future__ import annotations

import ipaddress
import json
import re
import secrets
import socket
import threading
import time
from types import SimpleNamespace

import pytest

from testkit import FakeClock
from udp_encap_tun import cli, status
from udp_encap_tun.core import Router


def make_tunnel(client: bool = False, peers: int = 2, name: str | None = None, clock=None):
    """A stand-in for the loop with a real Router and an unbound UDP socket."""
    clock = clock or FakeClock(1000.0)
    router = Router(5000 if client else None, max_peers=100_000, admission_rate=1e9, mss=1452)
    address, network = bytes([10, 9, 0, 1]), ipaddress.IPv4Network("10.9.0.0/16")
    router.set_tun_address(address, network)
    now = clock()
    if client:
        router.tx_destination(bytes([192, 0, 2, 2]), now - 3)
        router.tx_destination(bytes([198, 51, 100, 9]), now - 1)
    else:
        for i in range(peers):
            entry = router.store.admit((f"198.51.{100 + i // 250}.{i % 250 + 1}", 5000 + i),
                                       now - 60)
            entry.refreshed = now - 2.5
            entry.rx_packets, entry.rx_bytes = 10 + i, 10_000 + i
            entry.tx_packets, entry.tx_bytes = 20 + i, 20_000 + i
    router.counters.update(tx_packets=1234, tx_bytes=5_600_000, rx_packets=4321,
                           rx_bytes=12_000_000, tx_drop_not_tcp=3, rx_drop_too_short=1,
                           tx_mss_clamped=2)  # the store counted peers_added
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    tun = SimpleNamespace(name=name or "tun0", address=address, network=network)
    return SimpleNamespace(router=router, counters=router.counters, tun=tun, sock=sock,
                           clock=clock, gso=True, gro=False, tun_header_len=10,
                           data_path="offload (TUN TSO and checksum; UDP GSO on, GRO off)")


def unique_name() -> str:
    """A tun name nobody else uses: the abstract socket is per network namespace,
    and unit tests run in the host's."""
    return "t" + secrets.token_hex(6)


@pytest.fixture
def server_doc():
    t = make_tunnel()
    doc = status.describe(t, t.clock(), 1_700_000_100.0, 1_700_000_000.0, {"mtu": 1492})
    t.sock.close()
    return doc


# --------------------------------------------------------------------------- the document


def test_socket_name_is_abstract_and_per_interface():
    assert status.socket_name("tun0") == b"\0udp-encap-tun/tun0"
    assert status.display_name("tun0") == "@udp-encap-tun/tun0"


def test_server_document(server_doc):
    doc = server_doc
    assert doc["program"] == "udp-encap-tun" and doc["version"] == status.VERSION
    assert doc["mode"] == "server" and doc["interface"] == "tun0"
    assert doc["listen_address"] == "127.0.0.1" and isinstance(doc["listen_port"], int)
    assert doc["bind_interface"] is None  # the test socket is bound to no device
    assert doc["endpoint_port"] is None
    assert doc["tun_address"] == "10.9.0.1/16"
    assert doc["mtu"] == 1492 and doc["mss_clamp"] == 1452
    assert doc["offload"] == {"tun": True, "gso": True, "gro": False}
    assert doc["uptime"] == 100.0
    assert doc["pool"] == "10.9.0.0/16" and doc["max_peers"] == 100_000
    assert len(doc["peers"]) == 2
    peer = doc["peers"][0]
    assert set(peer) >= {"peer", "host", "port", "address", "last_heard", "connected",
                         "rx_packets", "rx_bytes", "tx_packets", "tx_bytes"}
    assert peer["peer"] == f"{peer['host']}:{peer['port']}"
    assert ipaddress.IPv4Address(peer["address"]) in ipaddress.IPv4Network("10.9.0.0/16")
    assert peer["last_heard"] == 2.5 and peer["connected"] == 60.0
    assert doc["counters"]["tx_drop_not_tcp"] == 3
    json.dumps(doc)  # serialisable as it is


def test_client_document():
    t = make_tunnel(client=True)
    doc = status.describe(t, t.clock(), time.time())
    assert doc["mode"] == "client" and doc["endpoint_port"] == 5000
    assert "peers" not in doc
    assert [s["server"] for s in doc["servers"]] == ["198.51.100.9:5000", "192.0.2.2:5000"]
    assert doc["servers"][0]["last_used"] == 1.0
    t.sock.close()


# --------------------------------------------------------------------------- text


def test_format_helpers():
    assert status.format_bytes(0) == "0 B"
    assert status.format_bytes(999) == "999 B"
    assert status.format_bytes(12_345_678) == "12.3 MB"
    assert status.format_bytes(4e15) == "4000.0 TB"
    assert status.format_duration(0.42) == "0.4s"
    assert status.format_duration(42) == "42s"
    assert status.format_duration(3723) == "1h 2m 3s"
    assert status.format_duration(90061) == "1d 1h 1m"


def test_text_rendering_server(server_doc):
    text = status.render_text(server_doc)
    lines = text.splitlines()
    assert lines[0].startswith("udp-encap-tun on tun0: server, pid ")
    assert "127.0.0.1:" in text and "10.9.0.1/16" in text and "MTU 1492" in text
    assert "offload (TUN TSO" in text
    for peer in server_doc["peers"]:
        row = next(line for line in lines if peer["peer"] in line)
        assert peer["address"] in row and "2.5s ago" in row
    counters = {line.split()[0]: line.split()[1:] for line in lines if line.startswith("  ")}
    assert counters["packets"] == ["1234", "4321"]
    assert any(line.split()[:3] == ["dropped:", "not", "tcp"] and line.split()[3:] == ["3", "0"]
               for line in lines)
    assert "mss clamped" in text and "peers added" in text


def test_text_rendering_client_and_empty():
    t = make_tunnel(client=True)
    doc = status.describe(t, t.clock(), time.time())
    text = status.render_text(doc)
    assert "client" in text.splitlines()[0]
    assert "UDP port 5000" in text and "198.51.100.9:5000" in text
    doc["counters"] = {}
    assert "(no drops)" in status.render_text(doc)
    t.sock.close()


# --------------------------------------------------------------------------- Prometheus

SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*"'
                    r'(?:,[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*")*)?\})? (-?[0-9.e+]+)$')


def parse_exposition(text: str) -> dict:
    """{(name, frozenset(labels)): value}; asserts the format rules we rely on."""
    assert text.endswith("\n")
    samples, typed, helped, seen_families = {}, {}, set(), []
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helped, f"HELP twice for {name}"
            helped.add(name)
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            assert name not in typed and kind in ("counter", "gauge")
            typed[name] = kind
            seen_families.append(name)
            continue
        m = SAMPLE.match(line)
        assert m, f"bad sample line {line!r}"
        name = m.group(1)
        assert seen_families and seen_families[-1] == name, f"{name} outside its family"
        if typed[name] == "counter":
            assert name.endswith("_total")
        labels = frozenset(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"',
                                      m.group(2) or ""))
        assert (name, labels) not in samples, f"duplicate series {line}"
        samples[(name, labels)] = float(m.group(3))
    assert helped == set(typed)
    return samples


def value(samples, name, **labels):
    return samples[(name, frozenset({"interface": "tun0", **labels}.items()))]


def test_prometheus_rendering(server_doc):
    samples = parse_exposition(status.render_prometheus(server_doc))
    assert value(samples, "udp_encap_tun_up") == 1
    assert value(samples, "udp_encap_tun_tx_packets_total") == 1234
    assert value(samples, "udp_encap_tun_rx_bytes_total") == 12_000_000
    assert value(samples, "udp_encap_tun_drops_total", direction="tx", reason="not_tcp") == 3
    assert value(samples, "udp_encap_tun_drops_total", direction="rx", reason="too_short") == 1
    # known reasons are there before they happen (rate() needs the zero)
    assert value(samples, "udp_encap_tun_drops_total", direction="rx", reason="too_long") == 0
    assert value(samples, "udp_encap_tun_tx_mss_clamped_total") == 2
    assert value(samples, "udp_encap_tun_peers") == 2
    assert value(samples, "udp_encap_tun_peers_added_total") == 2
    assert value(samples, "udp_encap_tun_peers_expired_total") == 0
    assert value(samples, "udp_encap_tun_start_time_seconds") == 1_700_000_000
    info = [k for k in samples if k[0] == "udp_encap_tun_info"]
    assert len(info) == 1
    assert ("mode", "server") in info[0][1] and ("data_path", "offload") in info[0][1]
    assert not any(k[0].startswith("udp_encap_tun_peer_") for k in samples)


def test_prometheus_per_peer_and_client(server_doc):
    samples = parse_exposition(status.render_prometheus(server_doc, per_peer=True))
    peer = server_doc["peers"][1]
    labels = {"peer": peer["peer"], "address": peer["address"]}
    assert value(samples, "udp_encap_tun_peer_rx_bytes_total", **labels) == peer["rx_bytes"]
    assert value(samples, "udp_encap_tun_peer_last_heard_seconds", **labels) == 2.5

    t = make_tunnel(client=True)
    samples = parse_exposition(status.render_prometheus(status.describe(t, t.clock(), time.time())))
    assert value(samples, "udp_encap_tun_servers") == 2
    assert not any(k[0] == "udp_encap_tun_peers" for k in samples)
    t.sock.close()


def test_prometheus_escapes_labels_and_odd_counter_names(server_doc):
    doc = dict(server_doc, interface='we"ird\\tun\n')
    doc["counters"] = {"auth_fail_bad-proof": 1, "rx_drop_new reason": 2, "odd-one": 3,
                       "auth_accepted": 4}
    samples = parse_exposition(status.render_prometheus(doc))
    assert samples[("udp_encap_tun_auth_failures_total",
                    frozenset({("interface", 'we\\"ird\\\\tun\\n'), ("reason", "bad-proof")}))] == 1
    assert samples[("udp_encap_tun_auth_events_total",
                    frozenset({("interface", 'we\\"ird\\\\tun\\n'), ("event", "accepted")}))] == 4
    assert samples[("udp_encap_tun_odd_one_total",
                    frozenset({("interface", 'we\\"ird\\\\tun\\n')}))] == 3
    assert samples[("udp_encap_tun_drops_total",
                    frozenset({("interface", 'we\\"ird\\\\tun\\n'), ("direction", "rx"),
                               ("reason", "new reason")}))] == 2


def test_prometheus_down():
    samples = parse_exposition(status.prometheus_down("tun0"))
    assert samples == {("udp_encap_tun_up", frozenset({("interface", "tun0")})): 0}


# --------------------------------------------------------------------------- the server


class Served:
    """A StatusServer on a fake tunnel, driven by hand or by a thread."""

    def __init__(self, **kw):
        self.name = unique_name()
        self.tunnel = make_tunnel(name=self.name, **kw)
        self.server = status.StatusServer(extra={"mtu": 1492})
        self.watched = list(self.server.watch(self.tunnel))
        self.server.ready(self.tunnel)
        self.stop = threading.Event()
        self.thread = None

    def connect(self) -> socket.socket:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.settimeout(5)
        c.connect(status.socket_name(self.name))
        return c

    def loop(self):
        """Serve from a thread, as the tunnel's selector would."""
        import selectors

        def run():
            sel = selectors.DefaultSelector()
            for fd, cb in self.watched:
                sel.register(fd, selectors.EVENT_READ, cb)
            while not self.stop.is_set():
                for key, _ in sel.select(0.05):
                    key.data()
                self.server.tick(self.tunnel, self.tunnel.clock())
            sel.close()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        return self

    def close(self):
        self.stop.set()
        if self.thread:
            self.thread.join(5)
        self.server.close(self.tunnel)
        self.tunnel.sock.close()


@pytest.fixture
def served():
    s = Served()
    yield s
    s.close()


def read_all(c: socket.socket) -> bytes:
    out = b""
    while chunk := c.recv(65536):
        out += chunk
    return out


def test_server_writes_one_document_and_closes(served):
    assert len(served.watched) == 1
    c = served.connect()
    # the selector saw our epoll readable; each call works for a 2 ms slice at most,
    # which a loaded machine may spend on part of the document: call until done
    for calls in range(1, 1001):  # noqa: B007 (shown by the assert after the loop)
        served.watched[0][1]()
        if served.server.served and not served.server.clients:
            break
    assert served.server.served == 1 and not served.server.clients, calls
    doc = json.loads(read_all(c))
    assert doc["interface"] == served.name and len(doc["peers"]) == 2 and doc["mtu"] == 1492
    assert doc["started"] is not None and doc["peer_count"] == 2
    c.close()


def test_spurious_wakeup_does_nothing(served):
    served.watched[0][1]()
    assert served.server.served == 0


def test_streamed_document_equals_describe():
    t = make_tunnel(peers=600)
    now = t.clock()
    head = status.describe_head(t, now, 1.0, None)
    chunks = list(status.encode(head, status.peer_entries(t), now, per_chunk=256))
    assert len(chunks) == 4  # 256 + 256 + 88 peers, then the end
    doc = json.loads(b"".join(chunks))
    assert doc == status.describe(t, now, 1.0, None)
    assert [p["address"] for p in doc["peers"]] == [  # oldest first: no sorting in the loop
        socket.inet_ntoa(e.address) for e in t.router.store.entries()]
    t.router.store.clear()
    assert status.describe(t, now, 1.0)["peers"] == []
    t.sock.close()


def test_name_taken_runs_without_status(caplog):
    name = unique_name()
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squatter.bind(status.socket_name(name))
    t = make_tunnel(name=name)
    server = status.StatusServer()
    with caplog.at_level("WARNING"):
        assert list(server.watch(t)) == []
    assert "taken" in caplog.text and "without live status" in caplog.text
    server.ready(t)
    server.tick(t, 1.0)
    server.close(t)
    squatter.close()
    t.sock.close()


def test_readers_that_never_read_cost_a_bounded_amount():
    """A big document and more clients than MAX_CLIENTS that never read: serving
    returns at once, at most MAX_CLIENTS are held (the rest wait in the backlog)
    and they are closed after SEND_DEADLINE."""
    s = Served(peers=3000)
    try:
        clients = [s.connect() for _ in range(status.MAX_CLIENTS + 3)]
        for _ in range(status.MAX_CLIENTS):  # a few accepts per turn of the loop
            s.watched[0][1]()
        assert len(s.server.clients) == status.MAX_CLIENTS == s.server.served
        assert not s.server.accepting
        s.watched[0][1]()  # nothing can move: no work, no busy loop
        assert s.server.served == status.MAX_CLIENTS
        s.tunnel.clock.advance(status.SEND_DEADLINE + 1)
        s.server.tick(s.tunnel, s.tunnel.clock())
        assert not s.server.clients and s.server.accepting
        for _ in range(3):
            s.watched[0][1]()  # the ones from the backlog now
        assert s.server.served == status.MAX_CLIENTS + 3
        # each got the start of a document, then (after the deadline) the end of the stream
        s.tunnel.clock.advance(status.SEND_DEADLINE + 1)
        s.server.tick(s.tunnel, s.tunnel.clock())
        for c in clients:
            data = read_all(c)
            assert data.startswith(b'{"program":"udp-encap-tun"')
            c.close()
    finally:
        s.close()


def test_slow_reader_gets_the_whole_big_document():
    s = Served(peers=3000).loop()
    try:
        c = s.connect()
        data = b""
        while chunk := c.recv(4096):  # small reads: many rounds of the loop
            data += chunk
        doc = json.loads(data)
        assert len(doc["peers"]) == 3000 and len(data) > 400_000
        c.close()
    finally:
        s.close()


def test_refused_client_gets_an_error_document(served, monkeypatch):
    monkeypatch.setattr(served.server, "allowed", lambda conn: False)
    served.loop()
    with pytest.raises(status.StatusError, match="permission denied"):
        status.query(served.name)
    assert served.server.refused == 1


def _fill_backlog(name: str) -> list:
    """Connect without being accepted until the listener's backlog is full."""
    waiting = []
    while True:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            c.connect(status.socket_name(name))
        except BlockingIOError:
            c.close()
            return waiting
        waiting.append(c)


def test_connect_close_hammer_is_served_a_bounded_amount_per_call(served, monkeypatch):
    """Refused clients free their slot at once: one call from the loop must still
    accept no more than ACCEPTS_PER_CALL of them, whatever waits in the backlog."""
    monkeypatch.setattr(served.server, "allowed", lambda conn: False)
    hammer = _fill_backlog(served.name)
    for c in hammer:
        c.close()  # connect, close: the hammer's loop
    assert len(hammer) > status.ACCEPTS_PER_CALL
    calls = 0
    while served.server.refused < len(hammer):
        before = served.server.refused
        served.watched[0][1]()
        calls += 1
        assert served.server.refused - before <= status.ACCEPTS_PER_CALL
        assert not served.server.clients  # each freed its slot at once
    assert calls >= len(hammer) / status.ACCEPTS_PER_CALL


def test_query_waits_through_a_full_backlog(served):
    """The backlog is full when the query connects: it waits (up to --timeout)
    instead of failing with EAGAIN, and gets its document once the loop runs."""
    waiting = _fill_backlog(served.name)
    with pytest.raises(status.StatusError, match="did not accept within 0.3s"):
        status.query(served.name, timeout=0.3)
    threading.Timer(0.5, served.loop).start()
    doc = status.query(served.name, timeout=30)
    assert doc["interface"] == served.name
    for c in waiting:
        c.close()


def test_peer_credentials_checked(served):
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    assert served.server.allowed(a)  # the peer is us: our own user
    a.close()
    b.close()


# --------------------------------------------------------------------------- the command


def test_query_and_command_outputs(served, capsys):
    served.loop()
    doc = status.query(served.name)
    assert doc["mode"] == "server" and doc["interface"] == served.name

    assert cli.main(["status", "--interface", served.name, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["interface"] == served.name

    assert cli.main(["status", "--interface", served.name]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"udp-encap-tun on {served.name}: server")

    assert cli.main(["status", "--interface", served.name, "--prometheus", "--per-peer"]) == 0
    samples = parse_exposition(capsys.readouterr().out)
    assert samples[("udp_encap_tun_up", frozenset({("interface", served.name)}))] == 1


def test_command_takes_interface_from_config(served, tmp_path, capsys):
    served.loop()
    conf = tmp_path / "x.conf"
    conf.write_text(f"# a daemon config\ninterface = {served.name}\nlisten-port = 5000\n"
                    "no-offload = true\n")
    assert cli.main(["status", "--config", str(conf), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["interface"] == served.name


def test_command_without_tunnel(capsys):
    name = unique_name()
    assert cli.main(["status", "--interface", name]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "no udp-encap-tun is running" in err
    assert cli.main(["status", "--interface", name, "--prometheus"]) == 1
    out, err = capsys.readouterr()
    assert parse_exposition(out)[("udp_encap_tun_up", frozenset({("interface", name)}))] == 0


def test_command_usage_errors(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["status", "--interface", "tun0", "--json", "--prometheus"])
    assert exc.value.code == 2
    assert cli.main(["status"]) == 2
    err = capsys.readouterr().err
    assert "--interface is required" in err


def test_query_rejects_other_programs_and_silence():
    name = unique_name()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(status.socket_name(name))
    listener.listen(4)

    def answer(payload):
        conn, _ = listener.accept()
        if payload is not None:
            conn.sendall(payload)
            conn.close()
        return conn

    th = threading.Thread(target=answer, args=(b"HTTP/1.0 200 OK\r\n\r\n",))
    th.start()
    with pytest.raises(status.StatusError, match="did not answer with a udp-encap-tun status"):
        status.query(name)
    th.join()

    held = []
    th = threading.Thread(target=lambda: held.append(answer(None)))
    th.start()
    with pytest.raises(status.StatusError, match="did not answer within"):
        status.query(name, timeout=0.3)
    th.join()
    held[0].close()
    listener.close()


def test_peers_past_their_timeout_are_not_shown():
    """The loop sweeps expired peers once a second: status never shows one that
    is past --peer-timeout meanwhile, and counts it (peers_expired)."""
    t = make_tunnel(peers=3)
    store, now = t.router.store, t.clock()
    store.entries()[0].refreshed = now - t.router.timeout  # just expired, not swept
    doc = status.describe(t, now, 1.0)
    assert doc["peer_count"] == len(doc["peers"]) == 2
    assert all(p["last_heard"] < t.router.timeout for p in doc["peers"])
    assert doc["counters"]["peers_expired"] == 1
    t.sock.close()


# --------------------------------------------------------------------------- IPv6 (#13)

def make_dual_stack_server(peers6: int = 2):
    """The server of make_tunnel with an IPv6 tun address and IPv6 peers beside the
    IPv4 one, in one store with an IPv6 pool (as the dual-stack router keeps them)."""
    from udp_encap_tun.store import AddressPool, PeerStore

    t = make_tunnel(peers=1)
    t.tun.address6 = ipaddress.IPv6Address("fd00:9::1").packed
    t.tun.network6 = ipaddress.IPv6Network("fd00:9::/64")
    now = t.clock()
    old = t.router.store
    store = PeerStore(old.pool, 300.0, 1000, t.router.counters,
                      pool6=AddressPool("fd00:9::/64", reserved=["fd00:9::1"], ipv6=True))
    for entry in old.entries():
        store.adopt(entry)
    for i in range(peers6):
        entry = store.admit((f"2001:db8::{i + 1:x}", 6000 + i), now - 30)
        entry.refreshed = now - 1.5
        entry.rx_bytes, entry.tx_bytes = 1000 + i, 2000 + i
    t.router.store = store
    return t


def test_server_document_with_ipv6_peers_and_addresses():
    t = make_dual_stack_server()
    doc = status.describe(t, t.clock(), 1_700_000_100.0, 1_700_000_000.0)
    t.sock.close()
    # the IPv4 fields as they were
    assert doc["tun_address"] == "10.9.0.1/16" and doc["pool"] == "10.9.0.0/16"
    assert doc["pool_capacity"] == 65533  # minus network, broadcast, the tun's own
    # and the IPv6 ones beside them
    assert doc["tun_address6"] == "fd00:9::1/64"
    assert doc["pool6"] == "fd00:9::/64" and doc["pool6_capacity"] == (1 << 64) - 2
    assert doc["peer_count"] == 3 and len(doc["peers"]) == 3
    v6 = [p for p in doc["peers"] if ":" in p["host"]]
    assert [p["peer"] for p in v6] == ["[2001:db8::1]:6000", "[2001:db8::2]:6001"]
    for p in v6:
        assert ipaddress.IPv6Address(p["address"]) in ipaddress.IPv6Network("fd00:9::/64")
        assert p["last_heard"] == 1.5 and p["connected"] == 30.0
    v4 = [p for p in doc["peers"] if ":" not in p["host"]]
    assert v4[0]["peer"] == f"{v4[0]['host']}:{v4[0]['port']}"
    json.dumps(doc)


def test_ipv4_only_server_has_empty_ipv6_fields(server_doc):
    assert server_doc["tun_address6"] is None
    assert server_doc["pool6"] is None and server_doc["pool6_capacity"] is None


def test_text_and_prometheus_with_ipv6():
    t = make_dual_stack_server()
    doc = status.describe(t, t.clock(), 1_700_000_100.0, 1_700_000_000.0)
    t.sock.close()
    text = status.render_text(doc)
    assert "  tun:         10.9.0.1/16, fd00:9::1/64, MSS clamp 1452" in text.splitlines()
    assert f"pool 10.9.0.0/16, 65533 addresses; pool fd00:9::/64, {(1 << 64) - 2} addresses" \
        in text
    rows = [line for line in text.splitlines() if "[2001:db8::" in line]
    assert len(rows) == 2 and all("fd00:9::" in row for row in rows)
    # IPv4 peers first, then IPv6, each in address order
    peer_rows = [line for line in text.splitlines() if line.startswith(("  198.51.", "  ["))]
    assert "198.51." in peer_rows[0] and "[2001:db8::1]:6000" in peer_rows[1]

    samples = parse_exposition(status.render_prometheus(doc, per_peer=True))
    assert value(samples, "udp_encap_tun_peers") == 3
    assert value(samples, "udp_encap_tun_pool6_addresses") == float((1 << 64) - 2)
    peer = next(p for p in doc["peers"] if p["host"] == "2001:db8::2")
    assert value(samples, "udp_encap_tun_peer_tx_bytes_total", peer="[2001:db8::2]:6001",
                 address=peer["address"]) == 2001
    info = next(k for k in samples if k[0] == "udp_encap_tun_info")
    assert ("tun_address6", "fd00:9::1/64") in info[1]


def test_ipv6_listen_address_and_servers_in_brackets():
    """A client over IPv6: its socket and its servers are shown [host]:port."""
    from udp_encap_tun.core import ServerState

    t = make_tunnel(client=True)
    now = t.clock()
    state = ServerState("192.0.2.2")  # (the IPv4 source of this stand-in is not read)
    state.last_sent, state.last_heard = now - 2, now - 1
    t.router.servers[("2001:db8::9", 5000)] = state
    doc = status.describe(t, now, time.time())
    t.sock.close()
    server = next(s for s in doc["servers"] if s["host"] == "2001:db8::9")
    assert server["server"] == "[2001:db8::9]:5000" and server["port"] == 5000
    doc["listen_address"] = "::"
    text = status.render_text(doc)
    assert "UDP socket:  [::]:" in text and "[2001:db8::9]:5000" in text
    samples = parse_exposition(status.render_prometheus(doc))
    assert value(samples, "udp_encap_tun_server_last_heard_seconds",
                 server="[2001:db8::9]:5000") == 1.0
