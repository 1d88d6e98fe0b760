"""Dual stack (#13) at the Router, the UDP edge and the loop: the inner family
follows the datagram's.  No root: loopback sockets, a socket pair for the tun."""

import errno
import ipaddress
import socket
import struct
import time
from types import SimpleNamespace

import pytest

from testkit import (
    as_the_kernel_takes,
    internet_checksum,
    ip_packet,
    pseudo_header,
    tcp_segment,
)
from udp_encap_tun import conn, offload, packet
from udp_encap_tun.core import Router
from udp_encap_tun.loop import default_wire
from udp_encap_tun.store import PoolError

TUN = bytes([10, 0, 0, 1])
NET = ipaddress.IPv4Network("10.0.0.0/24")
TUN6 = ipaddress.IPv6Address("fd00:13::1").packed
NET6 = ipaddress.IPv6Network("fd00:13::/64")
PEER6 = ("2001:db8::7", 4000)
PEER4 = ("198.51.100.1", 4000)
MSS_OPTION = 2


def syn(mss: int, **kw) -> bytes:
    return tcp_segment(flags=packet.SYN, options=struct.pack("!BBH", MSS_OPTION, 4, mss), **kw)


def mss_of(segment) -> int:
    return struct.unpack_from("!H", segment, 22)[0]


def server() -> Router:
    r = Router(mss=1400)
    r.set_tun_address(TUN, NET)
    r.set_tun_address6(TUN6, NET6)
    return r


# -- Router: server ----------------------------------------------------------------------


def test_server_gives_an_ipv6_peer_an_address_of_the_tun_ipv6_subnet_and_routes_back():
    r = server()
    src, dst, entry = r.rx_addresses(PEER6, 0)
    assert len(src) == 16 and dst == TUN6 and src != TUN6
    assert ipaddress.IPv6Address(src) in NET6
    assert r.tx_destination(src, 0) == (PEER6, entry)
    # an IPv4 peer at the same time: an IPv4 address, both in the one store
    src4, dst4, entry4 = r.rx_addresses(PEER4, 0)
    assert len(src4) == 4 and dst4 == TUN and r.tx_destination(src4, 0) == (PEER4, entry4)
    assert len(r.store) == 2 and r.counters["peers_added"] == 2


def test_server_tx_of_an_ipv6_packet_goes_to_the_peer_that_holds_its_destination():
    r = server()
    src, _, entry = r.rx_addresses(PEER6, 0)
    pkt = ip_packet(tcp_segment(b"data", src=TUN6, dst=src), TUN6, src)
    assert r.tx(pkt, 0) == (PEER6, entry)
    other = bytearray(pkt)
    other[39] ^= 1  # another destination in the subnet: nobody holds it
    assert r.tx(other, 0) is None and r.counters["tx_drop_unknown_peer"] == 1


def test_server_without_an_ipv6_address_refuses_ipv6_peers_and_still_serves_ipv4():
    r = Router()
    r.set_tun_address(TUN, NET)
    assert r.rx_addresses(PEER6, 0) is None
    assert r.counters["rx_drop_no_tun_address"] == 1
    assert r.rx_addresses(PEER4, 0) is not None


def test_ipv6_only_server_refuses_ipv4_peers_for_want_of_an_ipv4_address():
    r = Router()
    r.set_tun_address(None, None)
    r.set_tun_address6(TUN6, NET6)
    assert r.rx_addresses(PEER6, 0) is not None
    assert r.rx_addresses(PEER4, 0) is None and r.counters["rx_drop_no_tun_address"] == 1


def test_explicit_ipv6_pool_is_used_and_its_exhaustion_counted():
    r = Router(pool6_cidr="fd00:99::/126")  # 3 usable: the subnet-router anycast is not
    r.set_tun_address6(TUN6, NET6)
    got = {r.rx_addresses(("2001:db8::1", port), 0)[0] for port in (1, 2, 3)}
    assert {ipaddress.IPv6Address(a) for a in got} == {
        ipaddress.IPv6Address("fd00:99::1"), ipaddress.IPv6Address("fd00:99::2"),
        ipaddress.IPv6Address("fd00:99::3")}
    assert r.rx_addresses(("2001:db8::1", 4), 0) is None
    assert r.counters["rx_drop_pool_full"] == 1


def test_returning_ipv6_peer_keeps_its_address():
    r = Router(timeout=10)
    r.set_tun_address6(TUN6, NET6)
    first = r.rx_addresses(PEER6, 0)[0]
    r.store.expire(100)
    assert len(r.store) == 0 and r.counters["peers_expired"] == 1
    assert r.rx_addresses(PEER6, 100)[0] == first


def test_ipv6_address_change_keeps_peers_that_still_fit_and_leaves_ipv4_peers_alone():
    r = server()
    src6 = r.rx_addresses(PEER6, 0)[0]
    src4 = r.rx_addresses(PEER4, 0)[0]
    other = ipaddress.IPv6Address("fd00:13::2").packed
    r.set_tun_address6(other if other != src6 else ipaddress.IPv6Address("fd00:13::3").packed,
                       NET6)
    assert r.tx_destination(src6, 0)[0] == PEER6 and r.tx_destination(src4, 0)[0] == PEER4
    r.set_tun_address6(ipaddress.IPv6Address("fd00:14::1").packed,
                       ipaddress.IPv6Network("fd00:14::/64"))
    assert r.tx_destination(src6, 0) is None and r.tx_destination(src4, 0)[0] == PEER4
    assert ipaddress.IPv6Address(r.rx_addresses(PEER6, 0)[0]) in ipaddress.IPv6Network(
        "fd00:14::/64")


def test_a_bad_ipv6_pool_refuses_ipv6_peers_only():
    r = Router()
    r.set_tun_address(TUN, NET)
    with pytest.raises(PoolError):  # a /128 leaves no address for a peer
        r.set_tun_address6(TUN6, ipaddress.IPv6Network("fd00:13::1/128"))
    assert r.rx_addresses(PEER6, 0) is None and r.counters["rx_drop_no_pool"] == 1
    assert r.rx_addresses(PEER4, 0) is not None


def test_ipv6_syns_are_clamped_20_bytes_lower_both_ways():
    r = server()
    src, _, _ = r.rx_addresses(PEER6, 0)
    seg = bytearray(syn(1460))
    assert r.rx_segment(seg, PEER6, 0) and mss_of(seg) == 1380
    pkt = ip_packet(syn(1460, src=TUN6, dst=src), TUN6, src)
    assert r.tx(memoryview(pkt), 0) is not None and mss_of(pkt[40:]) == 1380
    seg4 = bytearray(syn(1460))
    assert r.rx_segment(seg4, PEER4, 0) and mss_of(seg4) == 1400  # IPv4: the clamp itself
    assert r.counters["rx_mss_clamped"] == 2 and r.counters["tx_mss_clamped"] == 1
    # a drain's worth at once (the offload path's coalescing receive): the same clamp
    segs = [bytearray(syn(1460)), bytearray(b""), bytearray(syn(1460))]
    assert r.rx_segments(segs, PEER6, 1) == [segs[0], segs[2]]
    assert mss_of(segs[0]) == mss_of(segs[2]) == 1380 and r.counters["rx_keepalives"] == 1


def test_keepalive_of_an_ipv6_peer_is_answered_like_an_ipv4_one():
    r = server()
    r.rx_addresses(PEER6, 0)
    assert not r.rx_segment(b"", PEER6, 5)
    assert r.outbox == [(PEER6, None)]
    assert not r.rx_segment(b"", ("2001:db8::99", 1), 5)  # unknown: not answered
    assert r.outbox == [(PEER6, None)]


def test_ipv6_extension_headers_are_dropped_by_reason():
    r = server()
    src, _, _ = r.rx_addresses(PEER6, 0)
    hop_by_hop = bytes([packet.IPPROTO_TCP, 0]) + bytes(6)
    pkt = ip_packet(tcp_segment(src=TUN6, dst=src), TUN6, src, proto=0, options=hop_by_hop)
    assert r.tx(pkt, 0) is None and r.counters["tx_drop_ipv6_extension_header"] == 1


# -- Router: client ----------------------------------------------------------------------


def test_client_sends_an_ipv6_packet_to_its_ipv6_destination_and_rx_gets_ipv6_addresses():
    r = Router(endpoint_port=4000, mss=1400)
    r.set_tun_address(TUN, NET)
    server6 = ipaddress.IPv6Address("2001:db8::1").packed
    pkt = ip_packet(syn(1460, src=TUN6, dst=server6), TUN6, server6)
    assert r.tx(memoryview(pkt), 0) == (("2001:db8::1", 4000), None)  # as the tun edge gives it
    assert mss_of(pkt[40:]) == 1380
    assert r.rx_addresses(("2001:db8::1", 4000), 0) is None  # no IPv6 address on the tun yet
    assert r.counters["rx_drop_no_tun_address"] == 1
    r.set_tun_address6(TUN6, NET6)
    assert r.rx_addresses(("2001:db8::1", 4000), 0) == (server6, TUN6, None)
    # from a host it never sent to: the same addresses, computed
    assert r.rx_addresses(("2001:db8::2", 4000), 0)[:2] == (
        ipaddress.IPv6Address("2001:db8::2").packed, TUN6)
    assert r.rx_addresses(("192.0.2.2", 4000), 0) == (bytes([192, 0, 2, 2]), TUN, None)


def test_client_keepalives_go_to_ipv6_servers_too():
    r = Router(endpoint_port=4000, keepalive=1.0)
    r.set_tun_address6(TUN6, NET6)
    r.tx_destination(ipaddress.IPv6Address("2001:db8::1").packed, 0)
    r.tick(0)
    r.tick(1)
    assert r.outbox == [(("2001:db8::1", 4000), None)]


# -- the UDP edge --------------------------------------------------------------------------


@pytest.fixture
def dual():
    """A dual-stack socket as open_udp makes it (without SO_BINDTODEVICE, which
    needs CAP_NET_RAW), on loopback."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    conn.set_path_mtu_discovery(sock)
    yield sock
    sock.close()


def _peer_socket(family, host):
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.settimeout(2)
    return sock


@pytest.mark.parametrize("offloaded", [False, True])
def test_dual_stack_edge_names_peers_host_port_and_answers_both_families(dual, offloaded):
    edge = conn.OffloadDatagrams(dual) if offloaded else conn.Datagrams(dual)
    assert edge.v6
    port = dual.getsockname()[1]
    buf = memoryview(bytearray(2048))
    with _peer_socket(socket.AF_INET, "127.0.0.1") as four, \
            _peer_socket(socket.AF_INET6, "::1") as six:
        for sock, host, name in ((four, "127.0.0.1", "127.0.0.1"), (six, "::1", "::1")):
            sock.sendto(b"hello", (host, port))
            time.sleep(0.02)
            n, peer, _ = edge.recv(buf)
            assert (n, peer) == (5, (name, sock.getsockname()[1]))
            # the conversion was remembered: the next datagram's peer is the one remembered
            # (compared by value: the compiled build boxes a new tuple on every return)
            (address,) = [a for a, p in edge._peers.items() if p == peer]
            edge._peers[address] = ("remembered", 1)
            sock.sendto(b"again", (host, port))
            time.sleep(0.02)
            assert edge.recv(buf)[1] == ("remembered", 1)
            edge._peers[address] = peer
            assert edge.send([(b"reply", 5)], peer) == (1, 5)
            assert sock.recv(100) == b"reply"


def test_ipv4_edge_converts_nothing():
    with _peer_socket(socket.AF_INET, "127.0.0.1") as sock, \
            _peer_socket(socket.AF_INET, "127.0.0.1") as other:
        edge = conn.Datagrams(sock)
        assert not edge.v6
        other.sendto(b"x", sock.getsockname())
        time.sleep(0.02)
        assert edge.recv(memoryview(bytearray(100)))[1] == other.getsockname()
        assert edge.send([(b"y", 1)], other.getsockname()) == (1, 1)
        assert other.recv(10) == b"y"
        assert edge._peers == {} and edge.wire == {}


def test_peer_conversions_are_cached_and_bounded(dual):
    edge = conn.Datagrams(dual)
    mapped = ("::ffff:192.0.2.1", 5, 0, 0)
    first = edge.peer(mapped)
    assert first == ("192.0.2.1", 5) and edge._peers == {mapped: first}
    edge._peers[mapped] = ("remembered", 5)  # looked up, not converted again
    assert edge.peer(mapped) == ("remembered", 5)
    assert edge.peer(("2001:db8::1", 6, 7, 0)) == ("2001:db8::1", 6)  # flowinfo dropped
    assert edge.wire_address(("192.0.2.1", 5)) == ("::ffff:192.0.2.1", 5)
    assert edge.wire_address(("2001:db8::1", 6)) == ("2001:db8::1", 6)
    for i in range(conn.CACHED_PEERS + 10):
        edge.peer(("2001:db8::1", i, 0, 0))
        edge.wire_address(("192.0.2.1", i))
    assert len(edge._peers) <= conn.CACHED_PEERS and len(edge.wire) <= conn.CACHED_PEERS


def _errqueue(origin: int, family: int, address: bytes, err: int = errno.EMSGSIZE,
              info: int = 1280):
    extended = conn.EXTENDED_ERR.pack(err, origin, 2, 0, 0, info, 0)
    if family == socket.AF_INET6:
        sockaddr = struct.pack("<H", family) + bytes(6) + address + bytes(4)
    else:
        sockaddr = struct.pack("<H", family) + bytes(2) + address + bytes(8)
    return [(socket.IPPROTO_IPV6, conn.IPV6_RECVERR, extended + sockaddr)]


def test_icmpv6_errors_are_parsed_with_their_offender():
    router6 = ipaddress.IPv6Address("2001:db8::fe").packed
    assert conn.parse_icmp_error(_errqueue(conn.SO_EE_ORIGIN_ICMP6, socket.AF_INET6, router6)) \
        == (errno.EMSGSIZE, 1280, "2001:db8::fe")
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.254").packed
    assert conn.parse_icmp_error(_errqueue(conn.SO_EE_ORIGIN_ICMP, socket.AF_INET6, mapped,
                                           info=1400)) == (errno.EMSGSIZE, 1400, "192.0.2.254")
    assert conn.parse_icmp_error(_errqueue(1, socket.AF_INET6, router6)) is None  # local
    assert conn.parse_icmp_error([(socket.IPPROTO_IPV6, conn.IPV6_RECVERR, b"short")]) is None


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_dual_stack_client_hears_port_unreachable_of_either_family(dual, host):
    conn.enable_icmp_errors(dual)
    with _peer_socket(socket.AF_INET6 if ":" in host else socket.AF_INET, host) as closed:
        port = closed.getsockname()[1]
    edge = conn.Datagrams(dual, retry_pending=True)
    edge.send([(b"x", 1)], (host, port))
    time.sleep(0.05)
    assert (((host, port), errno.ECONNREFUSED)) in [(d, e) for d, e, _, _ in edge.icmp_errors()]


def test_dual_stack_socket_sets_df_for_both_families(dual):
    assert dual.getsockopt(socket.IPPROTO_IP, conn.IP_MTU_DISCOVER) == conn.IP_PMTUDISC_DO
    assert dual.getsockopt(socket.IPPROTO_IPV6, conn.IPV6_MTU_DISCOVER) == conn.IPV6_PMTUDISC_DO


# -- the loop: RX of an IPv6 segment --------------------------------------------------------


def _tcp_ok(pkt: bytes) -> bool:
    """The TCP checksum of an IPv6 packet verifies (the reference checksum)."""
    seg = pkt[40:]
    return internet_checksum(pseudo_header(pkt[8:24], pkt[24:40], packet.IPPROTO_TCP,
                                           len(seg)) + seg) == 0


def _client_loop(dual, tun_pair, kind):
    router = Router(endpoint_port=1)
    router.set_tun_address(bytes([10, 9, 0, 2]), None)
    router.set_tun_address6(TUN6, NET6)
    dual.setblocking(False)
    tun = SimpleNamespace(fd=tun_pair[0].fileno(), name="tun-test")
    if kind == "simple":
        return default_wire(router, tun, dual)
    return default_wire(router, tun, dual, offload=True, gro=conn.probe_udp_offload(dual)[1])


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_loop_delivers_an_ipv6_segment_then_an_ipv4_one(dual, tun_pair, kind):
    """The IPv6 header goes 40 bytes before the segment, the IPv4 one 20 (and
    the tun header in front of it is right after an IPv6 packet was built)."""
    tunnel = _client_loop(dual, tun_pair, kind)
    hlen = tunnel.tun_header_len
    port = dual.getsockname()[1]
    seg = tcp_segment(b"v6!", sport=7000, dport=40000, seq=9)
    with _peer_socket(socket.AF_INET6, "::1") as six, \
            _peer_socket(socket.AF_INET, "127.0.0.1") as four:
        six.sendto(seg, ("::1", port))
        time.sleep(0.05)
        tunnel.on_udp()
        [out6] = [tun_pair[1].recv(70000)]
        four.sendto(seg, ("127.0.0.1", port))
        time.sleep(0.05)
        tunnel.on_udp()
        [out4] = [tun_pair[1].recv(70000)]
    assert out6[:hlen] == bytes(hlen)  # IPv6: written complete (no offload asked)
    out6, out4 = out6[hlen:], as_the_kernel_takes(out4, hlen > 0)
    assert out6[0] >> 4 == 6 and out6[6] == packet.IPPROTO_TCP and out6[7] == 64
    assert struct.unpack_from("!H", out6, 4)[0] == len(seg)
    assert out6[8:24] == ipaddress.IPv6Address("::1").packed and out6[24:40] == TUN6
    assert out6[40:56] == seg[:16] and out6[58:] == seg[18:] and _tcp_ok(out6)
    assert out4[0] == 0x45 and out4[12:16] == bytes([127, 0, 0, 1])
    assert packet.tcp_checksum_ok(out4) and out4[20:36] == seg[:16]
    assert tunnel.counters["rx_packets"] == 2


def test_offload_drain_coalesces_ipv6_segments(dual, tun_pair):
    tunnel = _client_loop(dual, tun_pair, "offload")
    port = dual.getsockname()[1]
    payload = bytes(range(256)) * 4
    with _peer_socket(socket.AF_INET6, "::1") as six:
        for i in range(3):
            six.sendto(tcp_segment(payload, sport=7000, dport=40000, seq=1 + i * len(payload)),
                       ("::1", port))
        time.sleep(0.05)
        tunnel.on_udp()
    [out] = [tun_pair[1].recv(70000)]
    _flags, gso_type, _hdr_len, gso_size, _, _ = offload.VNET_HDR.unpack_from(out, 0)
    assert (gso_type, gso_size) == (offload.GSO_TCPV6, len(payload))
    ip6 = out[offload.VNET_HDR_LEN:]
    assert ip6[0] >> 4 == 6 and ip6[24:40] == TUN6 and ip6[60:] == payload * 3
    assert tunnel.counters["rx_packets"] == 3


def test_a_link_local_server_gets_its_address_without_the_scope():
    r = Router(endpoint_port=4000)
    r.set_tun_address6(TUN6, NET6)
    src, dst, _ = r.rx_addresses(("fe80::1%vc0", 4000), 0)
    assert src == ipaddress.IPv6Address("fe80::1").packed and dst == TUN6


def test_psk_handshake_over_ipv6_admits_the_peer_with_an_ipv6_address():
    """Client and server Routers with one key, talking over IPv6: the data
    the client held is released once authenticated, and the server admits the
    peer with an address of its IPv6 pool."""
    from udp_encap_tun import auth

    key = b"k" * 32
    client6, server6 = ("2001:db8::2", 5000), ("2001:db8::1", 5000)
    server = Router(keys=auth.Keys(key))
    server.set_tun_address6(TUN6, NET6)
    client = Router(endpoint_port=5000, keys=auth.Keys(key))
    client.set_tun_address6(ipaddress.IPv6Address("fd00:13::99").packed, None)
    dst = ipaddress.IPv6Address(server6[0]).packed
    pkt = ip_packet(tcp_segment(b"held", src=TUN6, dst=dst), TUN6, dst)
    route = client.tx(memoryview(pkt), 0)
    assert route is not None and route[0] == server6
    assert client.held(server6, [(pkt[40:], len(pkt) - 40)], 0)
    segments = []  # what reached the server as TCP (for its tun)
    for _ in range(6):  # deliver each side's datagrams to the other
        for sender, receiver, source in ((client, server, client6), (server, client, server6)):
            outbox, sender.outbox = sender.outbox, []
            for _dest, batches in outbox:
                for data, _size in batches or [(b"", 0)]:
                    if receiver.rx_segment(bytearray(data), source, 0):
                        segments.append(bytes(data))
    assert segments == [bytes(pkt[40:])]  # the held segment, released
    assert server.counters["auth_accepted"] == 1 and client.counters["auth_authenticated"] == 1
    entry = server.store.lookup_peer(client6, 0)
    assert entry is not None and len(entry.address) == 16
    assert ipaddress.IPv6Address(entry.address) in NET6
