import ipaddress

from udp_encap_tun.core import Router

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
    assert r.tx_destination(bytes([10, 0, 0, 99]) if src != bytes([10, 0, 0, 99]) else bytes([10, 0, 0, 98]),
                            0) is None
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
    assert r.rx_addresses(("198.51.100.1", 1), 0)[0] in (bytes([100, 64, 0, 1]), bytes([100, 64, 0, 2]))
    assert r.rx_addresses(("198.51.100.1", 2), 0) is not None
    assert r.rx_addresses(("198.51.100.1", 3), 0) is None
    assert r.counters["rx_drop_pool_full"] == 1


def test_address_change_keeps_peers_that_still_fit():
    r = Router()
    r.set_tun_address(TUN, NET)
    src, _, _ = r.rx_addresses(("198.51.100.1", 4000), 0)
    # a new tun address in the same subnet: the peer keeps its address
    r.set_tun_address(bytes([10, 0, 0, 254]) if src != bytes([10, 0, 0, 254]) else bytes([10, 0, 0, 253]), NET)
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
