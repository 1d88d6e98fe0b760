"""Misconfiguration that speaks: the warnings the Router decides on (clock
injected), the client's view of its servers, and the ICMP error queue."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import time

import pytest

from udp_encap_tun import auth, conn, status
from udp_encap_tun.conn import Datagrams
from udp_encap_tun.core import SILENCE, WARN_INTERVAL, Router

KEY = b"0123456789abcdef-secret"
OTHER_KEY = b"another key of 16+ bytes"
SERVER = ("192.0.2.2", 5000)
CLIENT = ("198.51.100.7", 40000)
SERVER_DST = bytes([192, 0, 2, 2])
TUN = bytes([10, 9, 0, 1])
NET = ipaddress.IPv4Network("10.9.0.0/24")


@pytest.fixture
def warnings(caplog):
    """The WARNING messages logged so far (a function)."""
    caplog.set_level(logging.INFO)
    return lambda: [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def client(key: bytes | None = None) -> Router:
    r = Router(endpoint_port=SERVER[1], keys=auth.Keys(key) if key else None)
    r.set_tun_address(bytes([10, 9, 0, 2]), None)
    return r


def server(key: bytes | None = None, address: bytes | None = TUN) -> Router:
    r = Router(keys=auth.Keys(key) if key else None)
    r.set_tun_address(address, NET if address else None)
    return r


def deliver(outbox_of: Router, to: Router, source, now: float) -> int:
    """Hand what *outbox_of* wants to send to *to*, as from *source*: control
    messages to control(), keepalives to keepalive_received(), data to
    rx_addresses().  Returns how many datagrams went."""
    items, outbox_of.outbox = outbox_of.outbox, []
    for _dest, batches in items:
        for data, _size in batches:
            data = bytes(data)
            if not data:
                to.keepalive_received(source, now)
            elif auth.is_control(data):
                to.control(data, source, now)
            else:
                to.rx_addresses(source, now)
    return len(items)


def send_data(c: Router, s: Router, now: float) -> None:
    """The client's TCP sends a packet to the server (held while authenticating)."""
    dest, _ = c.tx_destination(SERVER_DST, now)
    if c.client_auth is not None and dest not in c.client_auth.ready:
        c.hold(dest, [(b"segment", 7)], now)
    elif s is not None:
        s.rx_addresses(CLIENT, now)


# ------------------------------------------------------------------ 1. PSK on the server only


def test_keyless_client_is_told_the_server_requires_a_key(warnings):
    c, s = client(), server(KEY)
    send_data(c, s, 100.0)
    assert s.counters["rx_drop_unauthenticated"] == 1 and len(s.outbox) == 1  # AUTH_REQUIRED
    deliver(s, c, SERVER, 100.0)
    assert c.counters["rx_drop_bad_control"] == 1
    assert warnings() == ["server 192.0.2.2:5000 requires a pre-shared key (--psk-file): it "
                          "drops everything we send"]
    # rate-limited: more of the same within the interval say nothing new
    for t in (101.0, 150.0):
        c.control(auth.header(auth.AUTH_REQUIRED), SERVER, t)
    assert len(warnings()) == 1
    c.control(auth.header(auth.AUTH_REQUIRED), SERVER, 100.0 + WARN_INTERVAL)
    assert len(warnings()) == 2
    # from somebody we never sent to: counted, not believed
    c.control(auth.header(auth.AUTH_REQUIRED), ("203.0.113.9", 5000), 300.0)
    assert c.counters["rx_drop_bad_control"] == 5 and len(warnings()) == 2


# ------------------------------------------------------------------ 2. PSK on the client only


def test_keyless_server_names_a_peer_that_wants_to_authenticate(warnings):
    c, s = client(KEY), server()
    send_data(c, s, 100.0)
    deliver(c, s, CLIENT, 100.0)  # the HELLO
    assert s.counters["rx_drop_bad_control"] == 1
    [message] = warnings()
    assert message.startswith("peer 198.51.100.7:40000 wants to authenticate") \
        and "no pre-shared key" in message and "--psk-file" in message


def test_keyed_client_warns_when_its_hellos_get_no_answer(warnings):
    """The keyless server never answers HELLOs: after SILENCE seconds the client
    says so, with how many HELLOs went unanswered and what to check."""
    c, s = client(KEY), server()
    send_data(c, s, 100.0)
    for t in range(101, 100 + int(SILENCE)):
        c.tick(float(t))
        deliver(c, s, CLIENT, float(t))
    client_warnings = [w for w in warnings() if w.startswith("server")]
    assert client_warnings == []
    assert c.auth_state(SERVER, 109.0) == "pending"
    for t in range(100 + int(SILENCE), 103 + int(SILENCE)):  # TCP retransmits, HELLOs go on
        send_data(c, s, float(t))
        c.tick(float(t))
    [message] = [w for w in warnings() if w.startswith("server")]
    assert message.startswith("server 192.0.2.2:5000 has not answered our authentication for")
    assert "HELLOs" in message and "--endpoint-port 5000" in message and "--psk-file" in message
    assert c.auth_state(SERVER, 100.0 + SILENCE + 2) == "failing"


# ------------------------------------------------------------------ 3. keys differ


def test_different_keys_warn_on_both_sides(warnings):
    c, s = client(OTHER_KEY), server(KEY)
    send_data(c, s, 100.0)
    t = 100.0
    while t < 100.0 + SILENCE + 2:
        for _ in range(3):  # HELLO -> CHALLENGE -> RESPONSE (refused)
            deliver(c, s, CLIENT, t)
            deliver(s, c, SERVER, t)
        t += 1.0
        c.tick(t)
    assert s.counters["auth_fail_bad_proof"] >= 10
    assert c.counters["auth_authenticated"] == 0
    server_side = [w for w in warnings() if "bad proof" in w]
    assert server_side == ["authentication with 198.51.100.7:40000: bad proof: it holds another "
                           "pre-shared key (--psk-file) (1 so far)"]
    client_side = [w for w in warnings() if w.startswith("server 192.0.2.2:5000")]
    assert len(client_side) == 1 and "does not accept our pre-shared key" in client_side[0]
    assert "no reply" not in " ".join(warnings())  # it does answer: not silent
    assert c.auth_state(SERVER, t) == "failing"


def test_auth_states_of_a_good_handshake():
    c, s = client(KEY), server(KEY)
    assert client().auth_state(SERVER, 0.0) == "no key"
    send_data(c, s, 100.0)
    assert c.auth_state(SERVER, 100.0) == "pending"
    for _ in range(3):
        deliver(c, s, CLIENT, 100.0)
        deliver(s, c, SERVER, 100.0)
    assert c.auth_state(SERVER, 100.0) == "authenticated"
    assert c.auth_state(SERVER, 1000.0) == "authenticated"  # no attempt under way
    # the server forgot us and the new attempt never completes: failing
    c.control(auth.header(auth.AUTH_REQUIRED), SERVER, 2000.0)
    assert c.auth_state(SERVER, 2000.0 + auth.FAILING_AFTER) == "failing"


# ------------------------------------------------------------------ 4. no tun address


def test_server_without_tun_address_names_the_peer_and_the_fix(warnings):
    s = server(address=None)
    for t in (100.0, 101.0):
        assert s.rx_addresses(CLIENT, t, count=3) is None
    assert s.counters["rx_drop_no_tun_address"] == 6
    [message] = warnings()
    assert message.startswith("dropping datagrams from 198.51.100.7:40000: the tun has no IPv4 "
                              "address") and "--tun-address" in message and "ip addr add" in message


def test_keyed_server_without_tun_address_says_so_instead_of_a_handshake(warnings):
    c, s = client(KEY), server(KEY, address=None)
    send_data(c, s, 100.0)
    deliver(c, s, CLIENT, 100.0)  # HELLO
    assert s.outbox == [] and s.counters["rx_drop_no_tun_address"] == 1
    assert any("the tun has no IPv4 address" in w for w in warnings())


# ------------------------------------------------------------------ 5. silence


def test_client_warns_after_ten_seconds_of_silence_and_says_when_it_ends(warnings, caplog):
    c = client()
    for t in range(100, 101 + int(SILENCE)):  # TCP keeps trying for 10 s; nothing comes back
        c.tx_destination(SERVER_DST, float(t))
        c.tick(t + 0.5)
    assert warnings() == []  # the send at 110 has not had a tick's time to be answered
    c.tick(100.0 + SILENCE + 1.5)
    [message] = warnings()
    assert message.startswith("no reply from server 192.0.2.2:5000 for 12 s")
    assert "--endpoint-port 5000" in message and "firewall" in message
    # still silent, still sending: no repetition within the interval
    for t in range(112, 140):
        c.tx_destination(SERVER_DST, float(t))
        c.tick(t + 0.5)
    assert len(warnings()) == 1
    c.rx_addresses(SERVER, 140.0)
    c.tick(140.5)
    assert "server 192.0.2.2:5000 answers again" in caplog.text
    view = status.client_servers(c, 141.0)
    assert view[0]["last_heard"] == 1.0 and view[0]["last_sent"] == 2.0


def test_no_silence_warning_for_a_last_segment_or_a_send_after_a_pause(warnings):
    """The final ACK of an exchange draws no reply, and a new connection after a
    long pause is answered within a round trip: neither is a silent server."""
    c = client()
    c.tx_destination(SERVER_DST, 100.0)
    c.rx_addresses(SERVER, 100.05)
    c.tx_destination(SERVER_DST, 100.1)  # the last ACK: nothing comes back
    for t in range(101, 160):
        c.tick(float(t))
    c.tx_destination(SERVER_DST, 160.2)  # a SYN after a minute, answered 0.3 s later
    c.tick(160.4)
    c.rx_addresses(SERVER, 160.5)
    for t in range(161, 200):
        c.tick(float(t))
    assert warnings() == []


def test_no_silence_warning_while_the_server_answers(warnings):
    """A bulk upload: sends all the time, answers all the time, never at the
    same instant; and a client that only sends keepalives, which the server
    answers."""
    c, s = client(), server()
    t = 100.0
    while t < 160.0:
        c.tx_destination(SERVER_DST, t)
        c.rx_addresses(SERVER, t + 0.05)
        t += 0.1
        if abs(t - round(t)) < 1e-6:
            c.tick(t)
    s.rx_addresses(CLIENT, 0.0)  # the server knows the client
    c2 = client()
    c2.tx_destination(SERVER_DST, 200.0)
    c2.rx_addresses(SERVER, 200.1)
    for t in range(201, 300):
        if t % 5 == 0:  # --keepalive 5
            c2.sent(SERVER, float(t))
            assert s.keepalive_received(CLIENT, float(t)) is True  # answered
            assert c2.keepalive_received(SERVER, t + 0.01) is False  # never answered back
        c2.tick(t + 0.5)
    assert warnings() == []


def test_keepalives_alone_to_a_dead_server_warn(warnings):
    c = client()
    c.tx_destination(SERVER_DST, 0.0)  # some TCP once (keepalives go where TCP went)
    c.rx_addresses(SERVER, 0.1)
    for t in range(1, 40):
        if t % 5 == 0:
            c.sent(SERVER, float(t))
        c.tick(float(t))
    assert [w for w in warnings() if w.startswith("no reply from server 192.0.2.2:5000")]


def test_server_answers_keepalives_of_known_peers_only():
    s = server()
    assert s.keepalive_received(CLIENT, 1.0) is False  # unknown: never creates an entry
    s.rx_addresses(CLIENT, 1.0)
    assert s.keepalive_received(CLIENT, 2.0) is True
    assert s.counters["rx_keepalives"] == 2 and s.counters["peers_added"] == 1


# ------------------------------------------------------------------ 6. ICMP errors


def test_port_unreachable_names_the_server_and_the_fix(warnings):
    c = client()
    c.tx_destination(SERVER_DST, 100.0)
    c.icmp_error(SERVER, errno.ECONNREFUSED, 0, SERVER[0], 100.1)
    c.icmp_error(("203.0.113.5", 9), errno.ECONNREFUSED, 0, "203.0.113.5", 100.1)  # not ours
    c.icmp_error(SERVER, errno.EHOSTUNREACH, 0, "192.0.2.254", 100.2)
    c.icmp_error(SERVER, errno.EMSGSIZE, 1400, "192.0.2.254", 100.3)
    assert c.counters["icmp_port_unreachable"] == 2
    assert c.counters["icmp_unreachable"] == 1 and c.counters["icmp_frag_needed"] == 1
    assert warnings() == [
        "server 192.0.2.2:5000: port unreachable: nothing listens on UDP port 5000 there "
        "(is --endpoint-port right, is the server running?)",
        "the path MTU to server 192.0.2.2 is 1400 (ICMP from 192.0.2.254): datagrams larger "
        "than that are refused; the tun MTU should be at most 1392 (--mtu)"]
    # host unreachable is the same kind as port unreachable about this server: rate-limited
    c.icmp_error(SERVER, errno.EHOSTUNREACH, 0, "192.0.2.254", 100.1 + WARN_INTERVAL)
    assert warnings()[-1] == ("server 192.0.2.2:5000 is unreachable: no route to host "
                              "(ICMP from 192.0.2.254)")


def test_parse_icmp_error():
    err = conn.EXTENDED_ERR.pack(errno.EMSGSIZE, conn.SO_EE_ORIGIN_ICMP, 3, 4, 0, 1400, 0)
    offender = socket.AF_INET.to_bytes(2, "little") + bytes(2) + bytes([192, 0, 2, 254]) + bytes(8)
    anc = [(socket.IPPROTO_IP, conn.IP_RECVERR, err + offender)]
    assert conn.parse_icmp_error(anc) == (errno.EMSGSIZE, 1400, "192.0.2.254")
    local = conn.EXTENDED_ERR.pack(errno.EMSGSIZE, 1, 0, 0, 0, 1500, 0)  # SO_EE_ORIGIN_LOCAL
    assert conn.parse_icmp_error([(socket.IPPROTO_IP, conn.IP_RECVERR, local)]) is None
    assert conn.parse_icmp_error([(socket.IPPROTO_IP, conn.IP_RECVERR, b"short")]) is None
    assert conn.parse_icmp_error([]) is None


@pytest.fixture
def recverr_socket():
    """A loopback UDP socket with IP_RECVERR that has sent to a closed port
    (the kernel answers "port unreachable" on lo), and a socket that listens."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    conn.enable_icmp_errors(sock)
    sock.setblocking(False)
    closed = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    closed.bind(("127.0.0.1", 0))
    dead = closed.getsockname()
    closed.close()
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(2)
    sock.sendto(b"anyone?", dead)
    time.sleep(0.05)
    yield sock, dead, listener
    sock.close()
    listener.close()


def test_icmp_errors_are_read_from_the_error_queue(recverr_socket):
    sock, dead, _ = recverr_socket
    assert conn.read_icmp_errors(sock) == [(dead, errno.ECONNREFUSED, 0, "127.0.0.1")]
    assert conn.read_icmp_errors(sock) == []  # drained


def test_a_send_failing_with_an_earlier_icmp_error_is_sent_again(recverr_socket, warnings):
    """The pending error fails the next send, whatever its destination: the
    datagram goes anyway (sent again once), and the loop's error-queue handler
    names the server."""
    sock, dead, listener = recverr_socket
    router = Router(endpoint_port=dead[1])
    router.tx_destination(socket.inet_aton(dead[0]), 1.0)
    edge = Datagrams(sock, retry_pending=True)
    edge.failed = lambda exc, dest, size: router.send_failed(dest, exc.errno, size, 2.0)
    assert edge.send([(b"data", 4)], listener.getsockname()) == (1, 4)
    assert listener.recv(100) == b"data"
    assert "tx_drop_send_error" not in router.counters
    for dest, err, info, offender in edge.icmp_errors():  # what the loop does on EPOLLERR
        router.icmp_error(dest, err, info, offender, 2.0)
    assert router.counters["icmp_port_unreachable"] == 1
    assert warnings() == [f"server 127.0.0.1:{dead[1]}: port unreachable: nothing listens on UDP "
                          f"port {dead[1]} there "
                          "(is --endpoint-port right, is the server running?)"]


# ------------------------------------------------------------------ 7. status


def test_client_status_lists_servers_with_last_heard_and_auth_state():
    c = client(KEY)
    s = server(KEY)
    send_data(c, s, 100.0)
    other = bytes([198, 51, 100, 9])
    c.tx_destination(other, 95.0)
    for _ in range(3):
        deliver(c, s, CLIENT, 100.0)
        deliver(s, c, SERVER, 100.0)
    servers = status.client_servers(c, 110.0)
    assert [(x["server"], x["last_sent"], x["last_heard"], x["auth"]) for x in servers] == [
        ("192.0.2.2:5000", 10.0, 10.0, "authenticated"),
        ("198.51.100.9:5000", 15.0, None, "pending")]
    doc = {"interface": "tun0", "mode": "client", "pid": 1, "servers": servers, "counters": {},
           "endpoint_port": 5000}
    text = status.render_text(doc)
    assert "LAST HEARD" in text and "AUTHENTICATION" in text
    line = next(x for x in text.splitlines() if "198.51.100.9:5000" in x)
    assert line.split()[1:] == ["15s", "ago", "never", "pending"]
    metrics = status.render_prometheus(doc)
    assert 'udp_encap_tun_server_auth{interface="tun0",server="192.0.2.2:5000",' \
           'state="authenticated"} 1' in metrics
    assert 'udp_encap_tun_server_auth{interface="tun0",server="192.0.2.2:5000",' \
           'state="failing"} 0' in metrics
    assert 'udp_encap_tun_server_last_heard_seconds{interface="tun0",server="192.0.2.2:5000"} 10' \
        in metrics
    assert 'server_last_heard_seconds{interface="tun0",server="198.51.100.9:5000"}' not in metrics


def test_two_servers_that_know_each_other_do_not_ping_pong_keepalives():
    """Spoofed TCP segments can make two open servers each other's peers; one
    spoofed empty datagram must not start an endless exchange of answers."""
    a, b = server(), server()
    a_addr, b_addr = ("192.0.2.10", 5000), ("192.0.2.11", 5000)
    a.rx_addresses(b_addr, 0.0)  # a spoofed segment "from b" to a
    b.rx_addresses(a_addr, 0.0)  # and one "from a" to b
    answers, now, to_a = 0, 1.0, True  # a spoofed keepalive "from b" reaches a
    for _ in range(1000):  # the answers cross within 1 ms
        answered = (a if to_a else b).keepalive_received(b_addr if to_a else a_addr, now)
        if not answered:
            break
        answers += 1
        to_a = not to_a
        now += 0.001
    assert 1 <= answers <= 2
    # a real client with --keepalive 1 still hears an answer to each of its keepalives
    c = server()
    c.rx_addresses(CLIENT, 0.0)
    assert all(c.keepalive_received(CLIENT, float(t)) for t in range(1, 30))


def test_frag_needed_without_a_usable_mtu_is_named_so(warnings):
    """An ICMP "fragmentation needed" with MTU 0 (an old router, or forged): no
    "path MTU 0", no "--mtu -8"."""
    c = client()
    c.tx_destination(SERVER_DST, 100.0)
    c.icmp_error(SERVER, errno.EMSGSIZE, 0, "192.0.2.254", 100.1)
    assert c.counters["icmp_frag_needed"] == 1
    [line] = warnings()
    assert "names no usable MTU (0" in line and "ICMP from 192.0.2.254" in line
    assert "-8" not in line and "is 0" not in line
