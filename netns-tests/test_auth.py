"""Authentication and a hostile network: the pre-shared-key handshake end to end.

* the right key carries data, a wrong key or none carries nothing;
* a captured RESPONSE replayed from another port or address is refused (replay
  after the cookie window needs 30 s waits: covered by tests/test_auth.py);
* a server restart under a live TCP connection: the client authenticates
  again and the connection goes on;
* a spoofed flood (junk, HELLOs, forged RESPONSEs) during a transfer: no peer,
  no memory growth, the transfer completes; without a key the admission rate
  limits new peers.
"""

from __future__ import annotations

import random
import socket

import pytest

from auth_tools import (
    FLOOD_NFT,
    HandDriven,
    Stream,
    SwitchedPair,
    flood_payloads,
    link_stats,
    nft_counter,
    read_psk,
    recv_control,
    send_spoofed,
    tcp_looking,
    tool_pid,
    udp_socket,
    vm_rss_kib,
    write_psk,
)
from udp_encap_tun import auth
from uetlab import Pair, counter_delta, wait_for

MB = 1 << 20
SERVER = (Pair.SERVER_IP, Pair.PORT)


@pytest.fixture
def psk(tmp_path):
    return write_psk(tmp_path / "psk")


def no_errors(counters: dict) -> None:
    for key in ("internal_error", "rx_drop_write_error"):
        assert counters.get(key, 0) == 0, counters


# --------------------------------------------------------------------------- 1. right key


def test_right_key_carries_data(pair: Pair, psk):
    """Both ends hold the same key: byte-exact transfers both ways, one
    handshake, and the server's tun receives what the tool writes (the kernel
    counts writes into a tun as its RX: the statistic test 2 watches)."""
    pair.start_server("--psk-file", psk)
    pair.start_client("--psk-file", psk)
    tun_before = link_stats(pair.s, pair.stun)

    up = pair.transfer(7001, "upload", 4 * MB, timeout=120)
    pair.transfer(7002, "download", 2 * MB, timeout=120)

    tun_after = link_stats(pair.s, pair.stun)
    # 4 MB entered the server's tun from the tool: rx from the kernel's view
    assert tun_after["rx_bytes"] - tun_before["rx_bytes"] >= 4 * MB, (tun_before, tun_after)
    assert tun_after["rx_packets"] > tun_before["rx_packets"]

    peers = pair.server.new_peers()
    assert [(h, p) for h, p, _ in peers] == [(Pair.CLIENT_IP, Pair.PORT)], pair.server.log()
    assert up["server_saw"] == peers[0][2]

    client = pair.client.stop()
    server = pair.server.stop()
    assert server.get("auth_accepted", 0) >= 1, server
    assert server.get("auth_challenge_sent", 0) >= 1, server
    assert client.get("auth_authenticated", 0) >= 1, client
    assert client.get("auth_response_sent", 0) >= 1, client
    assert server["peers_added"] == 1, server
    assert not [k for k in server if k.startswith("auth_fail_")], server
    assert server["rx_bytes"] >= 4 * MB and client["rx_bytes"] >= 2 * MB, (client, server)
    no_errors(client)
    no_errors(server)


# --------------------------------------------------------------------------- 2. wrong key, no key


@pytest.mark.parametrize("client_key", ["wrong", "none"])
def test_wrong_or_no_key_carries_nothing(pair: Pair, psk, tmp_path, client_key):
    """A client with another key (or none) gets nothing through: its TCP
    connect times out, the server counts why, admits no peer and writes
    nothing into its tun."""
    pair.start_server("--psk-file", psk)
    if client_key == "wrong":
        pair.start_client("--psk-file", write_psk(tmp_path / "other-psk"))
        reason = "auth_fail_bad_proof"
    else:
        pair.start_client()
        reason = "rx_drop_unauthenticated"
    tun_before = link_stats(pair.s, pair.stun)
    before = pair.server.counters()

    # a listener is there: anything that got through would complete the connect
    with pair.s.socket(socket.AF_INET, socket.SOCK_STREAM) as listener, \
            pair.c.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        listener.bind(("0.0.0.0", 7001))
        listener.listen(1)
        sock.settimeout(3)
        with pytest.raises(socket.timeout):
            sock.connect((Pair.SERVER_IP, 7001))

    after = wait_for(lambda: (c := pair.server.counters()) and c.get(reason, 0) >= 1 and c,
                     20, interval=0.2, what=reason)
    tun_after = link_stats(pair.s, pair.stun)
    assert tun_after["rx_packets"] == tun_before["rx_packets"], (tun_before, tun_after)
    assert after.get("peers_added", 0) == 0, after
    assert after.get("rx_packets", 0) == 0 and after.get("auth_accepted", 0) == 0, after
    if client_key == "wrong":
        # the handshake ran (challenge sent) and the proof was refused
        assert after.get("auth_challenge_sent", 0) >= 1, after
        # data never left the client (it is held until a WELCOME that never comes):
        # the server got nothing but control messages from it
        assert after.get("rx_drop_unauthenticated", 0) == 0, after
        client = pair.client.counters()
        assert client.get("auth_authenticated", 0) == 0, client
        assert client.get("auth_response_sent", 0) >= 1, client
    else:
        # no handshake at all; the server asked the client to authenticate
        assert not [k for k in after if k.startswith("auth_")], after
        client = wait_for(lambda: (c := pair.client.counters()) and
                          c.get("rx_drop_bad_control", 0) >= 1 and c, 20, interval=0.2,
                          what="the client to drop the server's AUTH_REQUIRED")
    no_errors(after)
    pair.client.stop()
    final = pair.server.stop()
    assert final.get("peers_added", 0) == 0, final
    assert counter_delta(final, before, reason) >= 1



# --------------------------------------------------------------------------- 3. replay


def test_replayed_response_from_another_port_or_address_fails(pair: Pair, psk):
    """The handshake driven by hand from port A: the RESPONSE it yields,
    replayed from port B or from a second address of the client namespace
    (same port), is refused as a bad cookie and admits nobody; sent from A it
    is accepted, the WELCOME proves the server knows the key, and only A
    becomes a peer.  (A replay after the cookie window needs waits of 30 s
    and more: tests/test_auth.py covers it with an injected clock.)"""
    pair.start_server("--psk-file", psk)
    other_ip = "192.0.2.3"
    pair.c.add_address(pair.vc, f"{other_ip}/24")
    port_a, port_b = 40001, 40002
    a = udp_socket(pair.c, pair.vc, Pair.CLIENT_IP, port_a)
    b = udp_socket(pair.c, pair.vc, Pair.CLIENT_IP, port_b)
    elsewhere = udp_socket(pair.c, pair.vc, other_ip, port_a)
    try:
        hand = HandDriven(read_psk(psk), SERVER)
        a.sendto(hand.hello(), SERVER)
        kind, body, _ = recv_control(a, SERVER, {auth.CHALLENGE})
        response = hand.response_to(kind, body)
        before = pair.server.counters()

        b.sendto(response, SERVER)
        elsewhere.sendto(response, SERVER)
        after = wait_for(lambda: (c := pair.server.counters()) and
                         counter_delta(c, before, "auth_fail_bad_cookie") >= 2 and c,
                         20, interval=0.2, what="two bad cookies")
        assert counter_delta(after, before, "auth_fail_bad_cookie") == 2, (before, after)
        assert after.get("auth_accepted", 0) == 0 and after.get("peers_added", 0) == 0, after
        assert after.get("auth_fail_bad_proof", 0) == 0, after
        assert pair.server.new_peers() == []
        # and no WELCOME went to either (the counters line comes after the replies)
        for sock in (b, elsewhere):
            sock.settimeout(0.3)
            with pytest.raises(socket.timeout):
                recv_control(sock, SERVER)

        # the same RESPONSE from where the challenge went: accepted
        a.sendto(response, SERVER)
        kind, body, _ = recv_control(a, SERVER, {auth.WELCOME})
        assert hand.welcome(kind, body) == "authenticated"
        accepted = pair.server.counters()
        assert accepted.get("auth_accepted", 0) == 1, accepted
        assert accepted.get("peers_added", 0) == 1, accepted
        assert [(h, p) for h, p, _ in pair.server.new_peers()] == [(Pair.CLIENT_IP, port_a)]

        # replaying it from B again is still refused; B's data is not let in
        # (the server asks B to authenticate), A's data is
        b.settimeout(5)
        b.sendto(response, SERVER)
        rng = random.Random(1)
        tun_before = link_stats(pair.s, pair.stun)
        b.sendto(tcp_looking(rng), SERVER)
        kind, _, _ = recv_control(b, SERVER)
        assert kind == auth.AUTH_REQUIRED
        a.sendto(tcp_looking(rng), SERVER)
        final = wait_for(lambda: (c := pair.server.counters())
                         and c.get("rx_packets", 0) >= 1 and c,
                         20, interval=0.2, what="A's segment written to the tun")
        assert counter_delta(final, before, "auth_fail_bad_cookie") == 3, (before, final)
        assert final.get("rx_drop_unauthenticated", 0) == 1, final
        assert final["rx_packets"] == 1 and final["peers_added"] == 1, final
        assert link_stats(pair.s, pair.stun)["rx_packets"] == tun_before["rx_packets"] + 1
        no_errors(final)
    finally:
        for sock in (a, b, elsewhere):
            sock.close()
    pair.server.stop()


# --------------------------------------------------------------------------- 4. server restart


def test_server_restart_under_live_tcp_connection(pair: Pair, psk):
    """A TCP stream keeps running while the server tunnel is stopped and
    started again (same options, same key: the peer gets the same generated
    address).  The new server does not know the client and answers its data
    with AUTH_REQUIRED; the client authenticates again and the same
    connection completes byte-exact.

    The tun is created persistent beforehand, so it and its address survive
    the restart (the tool removes only a tun it created)."""
    pair.s.run("ip", "tuntap", "add", "dev", pair.stun, "mode", "tun")
    first = pair.start_server("--psk-file", psk)
    pair.start_client("--psk-file", psk)

    stream = Stream(pair.c, pair.s, Pair.SERVER_IP, 7001)
    try:
        wait_for(lambda: stream.check() or stream.received >= 512 * 1024, 60, interval=0.05,
                 what="the stream to get going")
        old = first.stop()
        assert old.get("auth_accepted", 0) == 1 and old["peers_added"] == 1, old
        assert pair.s.link_exists(pair.stun), "the persistent tun went away with the server"
        at_restart = stream.received

        second = pair.lab.tool(pair.s, "--interface", pair.stun, "--listen-port", Pair.PORT,
                               "--bind-to-interface", pair.vs, "--psk-file", psk)
        pair.server = second
        wait_for(lambda: stream.check() or stream.received >= at_restart + 2 * MB, 90,
                 interval=0.1, what="the stream to go on after the restart")
        result = stream.finish()
    finally:
        stream.close()
    print(f"stream: {result['sent']} bytes, {at_restart} before the restart")
    assert not result["errors"], result
    assert result["sent"] == result["received"], result
    assert result["sent_sha256"] == result["received_sha256"], result

    (host, port, address), = first.new_peers()
    assert second.new_peers() == [(host, port, address)], second.log()
    assert (host, port) == (Pair.CLIENT_IP, Pair.PORT)
    assert stream.server_saw[0] == address

    client = pair.client.stop()
    new = second.stop()
    assert client.get("auth_authenticated", 0) >= 2, client
    assert client.get("auth_auth_required", 0) >= 1, client
    assert new.get("auth_accepted", 0) >= 1 and new["peers_added"] == 1, new
    assert new.get("rx_drop_unauthenticated", 0) >= 1, new
    no_errors(client)
    no_errors(new)


# --------------------------------------------------------------------------- 5. flood

FLOOD = 50_000
RSS_BOUND_KIB = 16 * 1024
STREAM_MIN = 24 * MB


def _barrier(sock: socket.socket, hand: HandDriven, tries: int = 60):
    """A HELLO from the attacker's real address, repeated until its CHALLENGE
    comes: the server reads its socket in order, so everything sent before has
    been dealt with.  Returns (window, cookie) of that challenge, the number of
    HELLOs sent and how many of them were answered (a late answer to an earlier
    HELLO arrives before the last one's: same path, in order)."""
    nonces = []
    answered = 0
    for _ in range(tries):
        hello = hand.hello()
        nonces.append(hello[auth.HEADER_LEN:auth.HEADER_LEN + auth.NONCE_LEN])
        sock.sendto(hello, SERVER)
        try:
            while True:
                kind, body, _ = recv_control(sock, SERVER, {auth.CHALLENGE})
                if body[:auth.NONCE_LEN] in nonces:
                    answered += 1
                if body[:auth.NONCE_LEN] == nonces[-1]:
                    return (body[auth.NONCE_LEN:auth.NONCE_LEN + 4], body[auth.NONCE_LEN + 4:],
                            len(nonces), answered)
        except TimeoutError:
            continue  # rate limited (the flood drained the bucket), or slow: ask again
    raise AssertionError("the server never answered the barrier HELLO")


def _auth_and_drop_deltas(after: dict, before: dict) -> dict:
    keys = {k for k in (*after, *before)
            if k.startswith(("auth_", "rx_drop_")) and k != "auth_accepted"}
    return {k: counter_delta(after, before, k) for k in sorted(keys)
            if counter_delta(after, before, k)}


@pytest.mark.parametrize("datapath", ["offload"])  # the default path only: time
def test_spoofed_flood_during_transfer(lab, psk):
    """50,000 spoofed datagrams (junk, broken control messages, HELLOs,
    RESPONSEs with forged or replayed cookies) from random sources in
    203.0.113.0/24 and 100.64.0.0/10 while a PSK client streams >= 24 MB: the
    stream is byte-exact, nobody else becomes a peer, the server's RSS grows by
    less than 16 MiB."""
    net = SwitchedPair(lab)
    net.s.run("nft", "-f", "-", input=FLOOD_NFT % Pair.PORT)
    server = net.start_server("--psk-file", psk)
    net.start_client("--psk-file", psk)
    net.transfer(7001, "upload", 4 * MB)  # warm-up: buffers touched before measuring
    pid = tool_pid(server)

    attacker = udp_socket(net.a, net.va, net.ATTACKER_IP, 6000, timeout=0.5)
    hand = HandDriven(b"the attacker does not know the key", SERVER)
    window, real_cookie, *_ = _barrier(attacker, hand)
    rng = random.Random(20240611)
    payloads = flood_payloads(rng, FLOOD, window, real_cookie)
    kinds = {k: sum(1 for kind, _ in payloads if kind == k)
             for k in ("junk", "bad_control", "hello", "response")}

    before = server.counters()
    rss_before = vm_rss_kib(pid)
    stream = Stream(net.c, net.s, Pair.SERVER_IP, 7002, pause=0)
    try:
        raw = net.a.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with raw:
            received_at_start = stream.received
            sent = send_spoofed(raw, Pair.SERVER_IP, Pair.PORT, (p for _, p in payloads), rng)
            received_at_end = stream.received
        *_, barrier_hellos, barrier_answered = _barrier(attacker, hand)
        rss_after = vm_rss_kib(pid)
        after = server.counters()
        wait_for(lambda: stream.check() or stream.received >= STREAM_MIN, 120, interval=0.1,
                 what=f"the stream to carry {STREAM_MIN} bytes")
        result = stream.finish()
    finally:
        stream.close()
        attacker.close()
    arrived = nft_counter(net.s)
    seen = _auth_and_drop_deltas(after, before)
    # the barrier's own HELLOs: answered, or refused by the rate limit
    seen["auth_challenge_sent"] -= barrier_answered
    seen["auth_fail_rate_limited"] = (seen.get("auth_fail_rate_limited", 0)
                                      - (barrier_hellos - barrier_answered))
    accounted = sum(seen.values()) + counter_delta(after, before, "rx_keepalives")
    print(f"flood: sent {sent} {kinds}, arrived at the server's input hook {arrived}; "
          f"server counted {accounted}: {seen}")
    print(f"stream: {result['received']} bytes, {received_at_end - received_at_start} of them "
          "while the flood was being sent")
    print(f"server VmRSS: {rss_before} KiB before, {rss_after} KiB after the flood, "
          f"growth {rss_after - rss_before} KiB (bound {RSS_BOUND_KIB} KiB)")

    assert sent == FLOOD
    assert arrived >= FLOOD * 0.9, f"only {arrived} of {FLOOD} spoofed datagrams arrived"
    assert not result["errors"], result
    assert result["sent"] == result["received"] >= STREAM_MIN, result
    assert result["sent_sha256"] == result["received_sha256"], result
    # the flood was seen, in each of its kinds
    assert seen.get("rx_drop_unauthenticated", 0) > 0, seen  # TCP-looking junk
    assert seen.get("rx_drop_too_short", 0) + seen.get("rx_drop_bad_data_offset", 0) > 0, seen
    assert seen.get("rx_drop_bad_control", 0) > 0, seen
    assert seen.get("auth_challenge_sent", 0) > 0, seen  # HELLOs (answered into A)
    assert seen.get("auth_fail_bad_cookie", 0) > 0, seen  # RESPONSEs: forged or replayed cookies
    assert accounted <= sent, (accounted, seen)  # nothing counted twice (kernel drops aside)
    assert not seen.get("auth_fail_bad_proof"), seen  # no forged cookie passed
    final = server.stop()
    assert final["peers_added"] == 1, final  # only the legitimate client
    assert final.get("auth_accepted", 0) == 1, final
    assert [(h, p) for h, p, _ in server.new_peers()] == [(Pair.CLIENT_IP, Pair.PORT)]
    no_errors(final)
    assert rss_after - rss_before < RSS_BOUND_KIB, (rss_before, rss_after)
    assert net.client.stop().get("internal_error", 0) == 0


@pytest.mark.parametrize("datapath", ["offload"])
def test_admission_rate_limits_spoofed_peers_without_key(lab):
    """Without a key every TCP-looking datagram from a new address would make
    a peer: --admission-rate caps how fast.  A spoofed flood of TCP-looking
    datagrams is mostly refused (rx_drop_admission_rate) and the live peer's
    stream is unaffected."""
    net = SwitchedPair(lab)
    server = net.start_server("--admission-rate", "20")
    net.start_client()
    net.transfer(7001, "upload", MB)
    rng = random.Random(7)
    count = 3000
    before = server.counters()
    stream = Stream(net.c, net.s, Pair.SERVER_IP, 7002, pause=0.001)
    try:
        with net.a.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            send_spoofed(raw, Pair.SERVER_IP, Pair.PORT,
                         (tcp_looking(rng) for _ in range(count)), rng)
        after = wait_for(lambda: (c := server.counters()) and
                         c.get("rx_drop_admission_rate", 0) > 0 and c, 30, interval=0.2,
                         what="rx_drop_admission_rate")
        mark = stream.received
        wait_for(lambda: stream.check() or stream.received >= mark + 2 * MB, 60, interval=0.1,
                 what="the stream to go on")
        result = stream.finish()
    finally:
        stream.close()
    added = counter_delta(after, before, "peers_added")
    print(f"admission: {count} spoofed TCP-looking datagrams, {added} spoofed peers admitted, "
          f"{after['rx_drop_admission_rate']} refused by the rate")
    assert not result["errors"], result
    assert result["sent"] == result["received"]
    assert result["sent_sha256"] == result["received_sha256"]
    assert after["rx_drop_admission_rate"] > 0, after
    assert added < count, after
    final = server.stop()
    assert final.get("peers_expired", 0) == 0, final  # the live peer was never dropped
    assert server.new_peers()[0][:2] == (Pair.CLIENT_IP, Pair.PORT)
    no_errors(final)


# --------------------------------------------------------------------------- amplification


@pytest.mark.parametrize("datapath", ["offload"])  # the control path is the same on both
def test_server_never_answers_with_more_than_it_got(pair: Pair, psk):
    """A CHALLENGE is never larger than the HELLO that asked for it, whether
    the HELLO is padded as the client sends it or cut to the least the parser
    takes (an attacker's choice, from a spoofed victim address).  An empty
    datagram (a keepalive) from an unknown peer draws nothing; the smallest
    TCP segment draws an AUTH_REQUIRED no larger than itself."""
    pair.start_server("--psk-file", psk)
    hand = HandDriven(b"no key needed to say hello", SERVER)
    sizes = {}
    with udp_socket(pair.c, pair.vc, Pair.CLIENT_IP, 40001, timeout=0.5) as sock:
        for name, cut in (("padded", auth.HELLO_SIZE),
                          ("unpadded", auth.HEADER_LEN + auth.NONCE_LEN)):
            before = pair.server.counters()
            hello = hand.hello()[:cut]
            sock.sendto(hello, SERVER)
            # the server has dealt with it once a counter moved (answered, refused or dropped)
            wait_for(lambda before=before: _auth_and_drop_deltas(pair.server.counters(), before),
                     20, interval=0.2, what=f"the server to handle the {name} HELLO")
            try:
                _, _, reply = recv_control(sock, SERVER, {auth.CHALLENGE})
            except TimeoutError:
                reply = b""
            sizes[name] = (len(hello), len(reply))
        smallest_segment = bytes(12) + bytes([5 << 4]) + bytes(7)
        for name, datagram, counter in (("empty", b"", "rx_keepalives"),
                                        ("segment", smallest_segment, "rx_drop_unauthenticated")):
            before = pair.server.counters()
            sock.sendto(datagram, SERVER)
            wait_for(lambda before=before, counter=counter:
                     counter_delta(pair.server.counters(), before, counter),
                     20, interval=0.2, what=f"the server to count the {name} datagram")
            try:  # anything at all, from anywhere
                reply = sock.recv(65536)
            except TimeoutError:
                reply = b""
            sizes[name] = (len(datagram), len(reply))
    print(f"request -> reply sizes: {sizes}")
    assert sizes["padded"][1] > 0, sizes  # a proper HELLO is answered
    assert sizes["segment"][1] > 0, sizes  # data from an unknown peer: AUTH_REQUIRED
    assert sizes["empty"][1] == 0, sizes
    for name, (asked, answered) in sizes.items():
        assert answered <= asked, f"{name} HELLO of {asked} bytes answered with {answered} bytes"
