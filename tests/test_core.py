import ipaddress
import logging

from testkit import FakeClock, ip_packet, tcp_segment
from udp_encap_tun.core import WARN_INTERVAL, Router, Warnings

TUN = bytes([10, 0, 0, 1])
NET = ipaddress.IPv4Network("10.0.0.0/24")


def test_client_routes_to_packet_destination_and_uses_datagram_source():
    r = Router(endpoint_port=4000)
    assert r.rx_addresses(("192.0.2.2", 4000), 0) is None
    assert r.counters["rx_drop_no_tun_address"] == 1
    r.set_tun_address(TUN, NET)
    assert r.tx_destination(bytes([192, 0, 2, 2]), 0) == (("192.0.2.2", 4000), None)
    src, dst, entry = r.rx_addresses(("192.0.2.2", 4000), 0)
    assert (src, dst, entry) == (bytes([192, 0, 2, 2]), TUN, None)


def test_server_generates_addresses_and_routes_back():
    r = Router()
    r.set_tun_address(TUN, NET)
    src, dst, entry = r.rx_addresses(("198.51.100.1", 4000), 0)
    assert dst == TUN and src in r.store.pool and src != TUN
    assert r.tx_destination(src, 0) == (("198.51.100.1", 4000), entry)
    other = bytes([10, 0, 0, 99]) if src != bytes([10, 0, 0, 99]) else bytes([10, 0, 0, 98])
    assert r.tx_destination(other, 0) is None
    assert r.counters["tx_drop_unknown_peer"] == 1
    assert r.counters["peers_added"] == 1


def test_server_without_address_drops():
    r = Router()
    r.set_tun_address(None, None)
    assert r.rx_addresses(("198.51.100.1", 4000), 0) is None
    assert r.tx_destination(TUN, 0) is None


def test_explicit_pool_and_full_pool_counted():
    r = Router(pool_cidr="100.64.0.0/30")
    r.set_tun_address(TUN, NET)
    assert r.rx_addresses(("198.51.100.1", 1), 0)[0] in (bytes([100, 64, 0, 1]),
                                                         bytes([100, 64, 0, 2]))
    assert r.rx_addresses(("198.51.100.1", 2), 0) is not None
    assert r.rx_addresses(("198.51.100.1", 3), 0) is None
    assert r.counters["rx_drop_pool_full"] == 1


def test_address_change_keeps_peers_that_still_fit():
    r = Router()
    r.set_tun_address(TUN, NET)
    src, _, _ = r.rx_addresses(("198.51.100.1", 4000), 0)
    # a new tun address in the same subnet: the peer keeps its address
    r.set_tun_address(bytes([10, 0, 0, 254]) if src != bytes([10, 0, 0, 254])
                      else bytes([10, 0, 0, 253]), NET)
    assert r.tx_destination(src, 0)[0] == ("198.51.100.1", 4000)
    # another subnet: it is gone, and comes back with an address from the new pool
    r.set_tun_address(bytes([172, 16, 0, 1]), ipaddress.IPv4Network("172.16.0.0/24"))
    assert r.tx_destination(src, 0) is None
    new_src, dst, _ = r.rx_addresses(("198.51.100.1", 4000), 0)
    assert dst == bytes([172, 16, 0, 1]) and new_src[:3] == bytes([172, 16, 0])


def test_ident_wraps():
    r = Router(endpoint_port=1)
    r.ident = 0xFFFF
    assert r.next_ident() == 0


def test_journal_log_lines_carry_a_priority_and_no_timestamp():
    import logging

    from udp_encap_tun.cli import JournalFormatter
    fmt = JournalFormatter("%(levelname)s %(message)s")
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "pool full", None, None)
    assert fmt.format(record) == "<4>WARNING pool full"


def test_warnings_are_limited_per_kind_and_peer():
    w = Warnings(interval=60, burst=3)
    a, b = ("192.0.2.1", 1), ("192.0.2.2", 1)
    assert w.allow("silent", a, 100.0)
    assert not w.allow("silent", a, 159.0)  # the same about the same peer: once a minute
    assert w.allow("silent", b, 100.0)  # another peer
    assert w.allow("other", a, 100.0)  # another kind
    assert w.allow("silent", a, 160.0)


def test_warnings_of_one_kind_are_limited_over_all_peers():
    """Many (spoofed) sources get no more than the burst, then a trickle."""
    w = Warnings(interval=60, burst=3)
    allowed = [w.allow("flood", (f"198.51.100.{i}", 1), 5.0) for i in range(100)]
    assert sum(allowed) == 3
    assert w.allow("flood", ("203.0.113.1", 1), 5.0 + 20)  # one more per interval/burst
    assert w.allow("quiet", ("203.0.113.1", 1), 5.0)  # other kinds are not held back


def test_warnings_memory_is_bounded():
    w = Warnings(interval=60, burst=10**9, size=100)
    for i in range(1000):
        w.allow("k", i, float(i))
    assert len(w.last) <= 100


def test_count_rarely_logged_counts_every_event_and_warns_rarely(caplog):
    caplog.set_level(logging.WARNING)
    r = Router()
    peer = ("198.51.100.1", 4000)
    for i in range(5):
        r.count_rarely_logged("rx_drop_x", "dropping from %s:%d", *peer, now=1.0 + i, peer=peer)
    r.count_rarely_logged("rx_drop_x", "dropping from %s:%d", *peer, now=1.0 + WARN_INTERVAL,
                          peer=peer, amount=3)
    assert r.counters["rx_drop_x"] == 8
    assert [m.getMessage() for m in caplog.records] == [
        "dropping from 198.51.100.1:4000 (1 so far)", "dropping from 198.51.100.1:4000 (8 so far)"]


# -- the decisions the loop carries out ----------------------------------------------------

SERVER = bytes([192, 0, 2, 2])


def tx_packet(flags=0x10, options=b"", payload=b"x", dst=SERVER):
    return memoryview(ip_packet(tcp_segment(payload, flags=flags, options=options), TUN, dst))


def test_tx_drops_by_reason_routes_and_clamps_a_syn():
    r = Router(endpoint_port=4000, mss=1300)
    r.set_tun_address(TUN, NET)
    assert r.tx(memoryview(ip_packet(b"x" * 8, TUN, SERVER, proto=17)), 0.0) is None
    assert r.counters["tx_drop_not_tcp"] == 1
    assert r.tx(tx_packet(), 0.0) == (("192.0.2.2", 4000), None)
    syn = tx_packet(flags=0x02, options=bytes([2, 4, 0x05, 0xB4]))  # MSS 1460
    assert r.tx(syn, 0.0) == (("192.0.2.2", 4000), None)
    assert syn[20 + 22:20 + 24] == (1300).to_bytes(2, "big")
    assert r.counters["tx_mss_clamped"] == 1


def test_server_tx_counts_on_the_peer_entry():
    r = Router()
    r.set_tun_address(TUN, NET)
    src, _, entry = r.rx_addresses(("198.51.100.1", 4000), 0.0)
    route = r.tx(tx_packet(dst=src), 0.0)
    assert route == (("198.51.100.1", 4000), entry)
    r.sent_data(entry, 3, 300)
    r.received(entry, 2, 100)
    assert (entry.tx_packets, entry.tx_bytes, entry.rx_packets, entry.rx_bytes) == (3, 300, 2, 100)
    assert (r.counters["tx_packets"], r.counters["rx_bytes"]) == (3, 100)


def test_rx_segment_tells_data_from_keepalives_control_and_junk():
    r = Router()
    r.set_tun_address(TUN, NET)
    peer = ("198.51.100.1", 4000)
    r.rx_addresses(peer, 0.0)
    assert r.rx_segment(memoryview(bytearray(tcp_segment(b"data"))), peer, 0.0)
    assert not r.rx_segment(memoryview(bytearray(b"")), peer, 1.0)  # a keepalive: answered
    assert r.outbox == [(peer, None)] and r.counters["rx_keepalives"] == 1
    assert not r.rx_segment(memoryview(bytearray(b"short")), peer, 2.0)
    assert r.counters["rx_drop_too_short"] == 1


def test_client_keepalives_are_timer_output_in_the_outbox():
    clock = FakeClock(0.0)
    r = Router(endpoint_port=4000, keepalive=25.0)
    r.set_tun_address(TUN, NET)
    r.tx(tx_packet(), clock())  # TCP went to the server once
    r.tick(clock())
    assert r.outbox == []
    r.tick(clock.advance(25.0))
    assert r.outbox == [(("192.0.2.2", 4000), None)]
    assert r.servers[("192.0.2.2", 4000)].last_sent == 25.0
    r.outbox.clear()
    r.tick(clock.advance(10.0))
    assert r.outbox == []


def test_a_full_route_cache_keeps_the_keepalive_targets():
    r = Router(endpoint_port=4000, keepalive=25.0)
    for i in range(6000):  # a scan through the tun fills the route cache, TCP to SERVER goes on
        r.tx_destination(bytes([10, 1, i >> 8, i & 0xFF]), 1.0 + i)
        if i % 100 == 0:
            r.tx_destination(SERVER, 1.0 + i)
    assert len(r.routes) <= 4097 and len(r.remotes) <= 4097
    assert ("192.0.2.2", 4000) in r.keepalive_targets(6000.0)
    assert ("192.0.2.2", 4000) in r.servers


def test_client_data_is_held_until_authenticated():
    from udp_encap_tun import auth

    r = Router(endpoint_port=4000, keys=auth.Keys(b"k" * 32))
    assert r.holds
    assert r.held(("192.0.2.2", 4000), [(b"segment", 7)], 0.0)
    (dest, [(hello, _)]), = r.outbox  # a HELLO goes out instead
    assert dest == ("192.0.2.2", 4000) and auth.parse(hello)[0] == auth.HELLO
    assert not Router(endpoint_port=4000).holds
