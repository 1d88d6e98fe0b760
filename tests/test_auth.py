import os
import struct

import pytest
from hypothesis import given, strategies as st

from udp_encap_tun import auth
from udp_encap_tun.core import Router
from udp_encap_tun.errors import OperatorError
from udp_encap_tun.packet import classify_rx

KEY = b"0123456789abcdef-secret"
CLIENT = ("198.51.100.7", 40000)
SERVER = ("192.0.2.2", 5000)


def handshake(server, client, peer=CLIENT, now=100.0, tamper=None):
    """Run the handshake; return (server outcome of the RESPONSE, released items)."""
    hello, _ = client.hold(SERVER, b"data", now)
    kind, body = auth.parse(hello)
    challenge, outcome = server.on_control(kind, body, peer, now)
    assert outcome == "challenge_sent"
    assert len(challenge) < len(hello)  # no amplification
    response, _, outcome = client.on_control(*auth.parse(challenge), SERVER, now)
    assert outcome == "response_sent"
    if tamper:
        response = tamper(response)
    welcome, outcome = server.on_control(*auth.parse(response), peer, now)
    if welcome is None:
        return outcome, ()
    _, released, client_outcome = client.on_control(*auth.parse(welcome), SERVER, now)
    assert client_outcome == "authenticated"
    return outcome, released


def test_right_key_authenticates_and_releases_held_data():
    client = auth.ClientAuth(auth.Keys(KEY))
    outcome, released = handshake(auth.ServerAuth(auth.Keys(KEY)), client)
    assert outcome == "accepted" and released == [b"data"]
    assert SERVER in client.ready


def test_challenge_to_an_earlier_hello_still_counts_after_a_retry():
    """A busy server answers a HELLO after the client already retried with a new
    nonce: the answer to any of the last RECENT_NONCES HELLOs is taken (before,
    only the last: a server slower than HELLO_RETRY never got the client in)."""
    server = auth.ServerAuth(auth.Keys(KEY))
    client = auth.ClientAuth(auth.Keys(KEY))
    hellos = [client.hold(SERVER, b"data", 100.0)[0]]
    for i in range(1, auth.RECENT_NONCES + 1):
        hellos.append(client.retries(100.0 + i * auth.HELLO_RETRY)[0][0])
    assert len({h[auth.HEADER_LEN:auth.HEADER_LEN + auth.NONCE_LEN] for h in hellos}) == len(hellos)
    oldest, second = (server.on_control(*auth.parse(h), CLIENT, 105.0)[0] for h in hellos[:2])
    assert client.on_control(*auth.parse(oldest), SERVER, 105.0)[2] == "stale_challenge"  # too old
    response, _, outcome = client.on_control(*auth.parse(second), SERVER, 105.0)
    assert outcome == "response_sent"
    welcome, outcome = server.on_control(*auth.parse(response), CLIENT, 105.0)
    assert outcome == "accepted"
    _, released, outcome = client.on_control(*auth.parse(welcome), SERVER, 105.0)
    assert outcome == "authenticated" and released == [b"data"]
    assert client.on_control(*auth.parse(welcome), SERVER, 105.0)[2] == "stale_welcome"  # replayed


def test_wrong_key_is_refused():
    outcome, _ = handshake(auth.ServerAuth(auth.Keys(KEY)),
                           auth.ClientAuth(auth.Keys(b"another key of 16+ bytes")))
    assert outcome == "bad_proof"


def test_replay_from_another_port_or_address_is_refused():
    server = auth.ServerAuth(auth.Keys(KEY))
    client = auth.ClientAuth(auth.Keys(KEY))
    hello, _ = client.hold(SERVER, b"x", 100.0)
    challenge, _ = server.on_control(*auth.parse(hello), CLIENT, 100.0)
    response, _, _ = client.on_control(*auth.parse(challenge), SERVER, 100.0)
    for other in (("198.51.100.7", 40001), ("198.51.100.8", 40000)):
        assert server.on_control(*auth.parse(response), other, 100.0) == (None, "bad_cookie")
    # later: the cookie's window has passed
    later = 100.0 + 5 * auth.WINDOW_SECONDS
    assert server.on_control(*auth.parse(response), CLIENT, later)[1] == "stale_cookie"
    # and across secret epochs, an old window is never honoured again
    late = 100.0 + 3 * auth.SECRET_EPOCH * auth.WINDOW_SECONDS
    server.on_control(*auth.parse(hello), CLIENT, late)  # rotates the secret
    assert server.on_control(*auth.parse(response), CLIENT, late)[1] in ("stale_cookie",
                                                                        "bad_cookie")


def test_forged_cookie_is_refused():
    def flip(response):
        b = bytearray(response)
        b[auth.HEADER_LEN + auth.NONCE_LEN + 5] ^= 1
        return bytes(b)
    outcome, _ = handshake(auth.ServerAuth(auth.Keys(KEY)), auth.ClientAuth(auth.Keys(KEY)),
                           tamper=flip)
    assert outcome == "bad_cookie"


def test_server_keeps_no_state_per_hello():
    server = auth.ServerAuth(auth.Keys(KEY), rate=1e9, burst=1e9)
    for i in range(5000):
        hello = auth.header(auth.HELLO) + os.urandom(16) + bytes(64)
        server.on_control(*auth.parse(hello), (f"10.{i % 250}.0.1", i), 100.0)
    assert len(server.secrets) <= 2


def test_hello_after_the_clock_went_back_a_secret_epoch_is_refused_not_a_crash():
    """Past secrets are never made again: a HELLO at a time before the newest
    secret's epoch (an injected clock that went back) gets no cookie, and no
    reply, instead of a TypeError."""
    server = auth.ServerAuth(auth.Keys(KEY))
    hello = auth.parse(auth.header(auth.HELLO) + bytes(80))
    late = 100.0 + 2 * auth.SECRET_EPOCH * auth.WINDOW_SECONDS
    assert server.on_control(*hello, CLIENT, late)[1] == "challenge_sent"
    assert server.on_control(*hello, CLIENT, 100.0) == (None, "clock_went_back")
    assert server.on_control(*hello, CLIENT, late)[1] == "challenge_sent"


def test_handshake_is_rate_limited():
    server = auth.ServerAuth(auth.Keys(KEY), rate=10, burst=5)
    hello = auth.header(auth.HELLO) + bytes(80)
    outcomes = [server.on_control(*auth.parse(hello), CLIENT, 100.0)[1] for _ in range(20)]
    assert outcomes.count("challenge_sent") == 5 and outcomes.count("rate_limited") == 15
    assert server.on_control(*auth.parse(hello), CLIENT, 101.0)[1] == "challenge_sent"
    # per source /24: other addresses of the same /24 share its bucket, another /24 does not
    outcomes = [server.on_control(*auth.parse(hello), (f"198.51.100.{i}", 1), 101.0)[1]
                for i in range(10, 20)]
    assert outcomes.count("challenge_sent") == 4 and outcomes.count("rate_limited") == 6
    assert server.on_control(*auth.parse(hello), ("198.51.101.7", 1), 101.0)[1] == "challenge_sent"


def _spoofed_source(rng) -> tuple[str, int]:
    return f"100.{64 + rng.randrange(64)}.{rng.randrange(256)}.{rng.randrange(1, 255)}", \
        rng.randrange(1024, 65536)


def test_spoofed_hello_flood_does_not_starve_a_client_answering_from_its_address():
    """HELLOs at 65,000 a second from random spoofed sources; in the middle of it
    a keyed client sends a HELLO from its real address and answers the CHALLENGE:
    it is accepted at its first try, every time (one bucket for everybody,
    drained by the flood, refused it)."""
    import random
    rng = random.Random(5)
    server = _keyed_server()
    flood = auth.header(auth.HELLO) + bytes(auth.HELLO_SIZE - auth.HEADER_LEN)
    accepted = 0
    now = 1000.0
    rounds, per_round = 3, 3000
    for _ in range(rounds):
        for _ in range(per_round):
            now += 1 / 65_000
            server.control(flood, _spoofed_source(rng), now)
        server.outbox.clear()
        client = auth.ClientAuth(auth.Keys(KEY))
        hello, _ = client.hold(SERVER, (b"data", 4), now)
        server.control(hello, CLIENT, now)
        (dest, [(challenge, _)]), = server.outbox
        server.outbox.clear()
        response, _, outcome = client.on_control(*auth.parse(challenge), SERVER, now)
        assert outcome == "response_sent"
        server.control(response, CLIENT, now)
        (dest, [(welcome, _)]), = server.outbox
        assert client.on_control(*auth.parse(welcome), SERVER, now)[2] == "authenticated"
        accepted += 1
        server.store.clear()  # as if it expired: it shakes hands again
    assert accepted == rounds
    assert server.counters["auth_challenge_sent"] > rounds * per_round * 0.9  # the flood was too,
    assert len(server.server_auth.buckets.buckets) <= server.server_auth.buckets.limit  # boundedly


def test_junk_flood_does_not_use_up_a_restarted_servers_auth_required():
    """TCP-looking junk from random spoofed sources: a real client whose server
    forgot it still gets its AUTH_REQUIRED."""
    import random
    rng = random.Random(6)
    server = _keyed_server()
    for _ in range(20_000):
        server.rx_addresses(_spoofed_source(rng), 100.0)
    server.outbox.clear()
    server.rx_addresses(CLIENT, 100.0)
    (dest, [(msg, _)]), = server.outbox
    assert dest == CLIENT and auth.parse(msg)[0] == auth.AUTH_REQUIRED
    # one source /24 gets a bounded trickle however much it sends
    server.outbox.clear()
    for _ in range(1000):
        server.rx_addresses(("203.0.113.7", 1), 100.0)
    assert 0 < len(server.outbox) <= server.server_auth.auth_required_buckets.burst


def test_source_buckets_are_bounded_and_refill():
    buckets = auth.SourceBuckets(rate=2, burst=2, limit=100)
    for i in range(1000):
        assert buckets.take(f"10.{i // 256}.{i % 256}.1", 0.0)
    assert len(buckets.buckets) == 100
    assert buckets.take("192.0.2.1", 0.0) and buckets.take("192.0.2.200", 0.0)
    assert not buckets.take("192.0.2.1", 0.0)
    assert buckets.take("192.0.2.1", 0.5) and not buckets.take("192.0.2.1", 0.5)
    assert not buckets.take("192.0.2.1", 0.4)  # a clock going back adds nothing


def test_client_ignores_unsolicited_or_forged_welcome():
    client = auth.ClientAuth(auth.Keys(KEY))
    fake = auth.header(auth.WELCOME) + bytes(32)
    assert client.on_control(*auth.parse(fake), SERVER, 1.0)[2].startswith("unexpected")
    client.hold(SERVER, b"x", 1.0)
    assert client.on_control(*auth.parse(fake), SERVER, 1.0)[2] in ("stale_welcome", "bad_welcome")
    assert SERVER not in client.ready


def test_client_queue_is_bounded_and_hello_retried():
    client = auth.ClientAuth(auth.Keys(KEY))
    hellos = [client.hold(SERVER, i, 0.0) for i in range(auth.QUEUE_LIMIT + 10)]
    assert hellos[0][0] is not None and all(h is None for h, _ in hellos[1:])
    assert sum(dropped for _, dropped in hellos) == 10
    assert client.retries(0.5) == []
    assert len(client.retries(auth.HELLO_RETRY + 0.1)) == 1


def test_control_messages_are_never_tcp_and_tcp_never_control():
    for kind, size in auth.BODY_LEN.items():
        msg = auth.header(kind) + bytes(size)
        if kind == auth.HELLO:
            assert auth.parse(msg) is None  # must be padded
            msg += bytes(auth.HELLO_SIZE - len(msg))
        assert classify_rx(msg) is not None  # no TCP segment looks like this
        assert auth.parse(msg) == (kind, bytes(size))


@given(st.binary(min_size=20, max_size=100))
def test_valid_tcp_segments_are_never_control(data):
    if classify_rx(data) is None:
        assert not auth.is_control(data)
        assert auth.parse(data) is None


@given(st.binary(max_size=200))
def test_parse_never_raises(data):
    auth.parse(data)
    auth.parse(auth.MAGIC + data)
    auth.parse(auth.header(data[0] if data else 0) + data)


@given(st.sampled_from(sorted(auth.BODY_LEN)), st.binary(max_size=120), st.integers(0, 65535))
def test_handlers_never_raise(kind, body, port):
    msg = auth.header(kind) + body
    for router in (Router(keys=auth.Keys(KEY)), Router(endpoint_port=5000, keys=auth.Keys(KEY))):
        router.control(msg, ("198.51.100.1", port), 100.0)


def test_router_server_admits_only_after_proof():
    import ipaddress
    server = Router(keys=auth.Keys(KEY))
    server.set_tun_address(bytes([10, 0, 0, 1]), ipaddress.IPv4Network("10.0.0.0/24"))
    assert server.rx_addresses(CLIENT, 100.0) is None
    assert server.counters["rx_drop_unauthenticated"] == 1
    (dest, [(msg, _)]), = server.outbox  # asks the peer to authenticate
    assert dest == CLIENT and auth.parse(msg)[0] == auth.AUTH_REQUIRED
    assert len(server.store) == 0
    client = auth.ClientAuth(auth.Keys(KEY))
    outcome, _ = handshake(server.server_auth, client)
    assert outcome == "accepted"
    server.outbox.clear()
    # through the Router the same handshake creates the entry
    hello, _ = auth.ClientAuth(auth.Keys(KEY)).hold(SERVER, b"", 100.0)
    server.control(hello, CLIENT, 100.0)
    assert len(server.store) == 0  # still nothing after HELLO


@pytest.mark.parametrize("content,mode,message", [
    (None, 0o600, "no such file"),
    (b"", 0o600, "is empty"),
    (b"short\n", 0o600, "at least 16"),
    (KEY, 0o644, "accessible by others"),
    (KEY, 0o640, "accessible by others"),
])
def test_psk_file_errors(tmp_path, content, mode, message):
    path = tmp_path / "psk"
    if content is not None:
        path.write_bytes(content)
        path.chmod(mode)
    with pytest.raises(OperatorError, match=message):
        auth.load_psk(str(path))


def test_psk_file_that_is_a_directory_or_fifo(tmp_path):
    """Named by mistake: refused as one OperatorError (was IsADirectoryError), and a
    FIFO does not hang the start."""
    with pytest.raises(OperatorError, match="a directory"):
        auth.load_psk(str(tmp_path))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    with pytest.raises(OperatorError, match="not a regular file"):
        auth.load_psk(str(fifo))


def test_psk_file_ok(tmp_path):
    path = tmp_path / "psk"
    path.write_bytes(KEY + b"\n")
    path.chmod(0o600)
    assert auth.load_psk(str(path)) == KEY
    assert struct.calcsize("!4sBB6xB3x") == auth.HEADER_LEN == 16


def _keyed_server():
    import ipaddress
    server = Router(keys=auth.Keys(KEY))
    server.set_tun_address(bytes([10, 0, 0, 1]), ipaddress.IPv4Network("10.0.0.0/24"))
    return server


def _receive(router, datagram, peer, now):
    """What the loop asks the Router about a received datagram."""
    if router.rx_segment(memoryview(bytearray(datagram)), peer, now):
        router.rx_addresses(peer, now)


def test_keepalive_from_unknown_peer_draws_nothing_data_draws_auth_required():
    server = _keyed_server()
    _receive(server, b"", CLIENT, 100.0)
    assert server.outbox == [] and server.counters["rx_keepalives"] == 1
    segment = bytes(12) + bytes([5 << 4]) + bytes(7)  # the smallest TCP segment: 20 bytes
    _receive(server, segment, CLIENT, 100.0)
    (dest, [(msg, _)]), = server.outbox
    assert dest == CLIENT and auth.parse(msg)[0] == auth.AUTH_REQUIRED
    assert len(msg) <= len(segment)


_HELLO = auth.ClientAuth(auth.Keys(KEY)).hold(SERVER, b"", 0.0)[0]
_TCP = bytes(12) + bytes([5 << 4]) + bytes(7)


@given(st.lists(st.one_of(st.binary(max_size=120),
                          st.integers(0, len(_HELLO)).map(lambda n: _HELLO[:n]),
                          st.binary(max_size=60).map(lambda b: _TCP + b),
                          st.sampled_from(sorted(auth.BODY_LEN)).flatmap(
                              lambda k: st.binary(max_size=80).map(lambda b: auth.header(k) + b))),
                max_size=20))
def test_server_never_answers_with_more_bytes_than_it_got(datagrams):
    server = _keyed_server()
    for i, datagram in enumerate(datagrams):
        server.outbox.clear()
        _receive(server, datagram, ("198.51.100.1", 1000 + i % 3), 100.0 + i)
        for _dest, batches in server.outbox:
            assert sum(len(b) for b, _ in batches) <= len(datagram), (datagram, batches)
