"""The fast path (fastpath.FastPath) against the layered path it stands in
for: the same packets and datagrams through a loop with it and through one
without must give the same bytes out, to the same places, and the same
counters and peer state.  Loopback sockets, a socket pair for the tun (no root)."""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from testkit import FakeClock, ip_packet, tcp_segment
from udp_encap_tun import auth, offload, packet
from udp_encap_tun.core import Router
from udp_encap_tun.loop import Loop, default_wire

TUN4 = bytes([10, 9, 0, 1])
TUN6 = bytes.fromhex("fd000000000000000000000000000001")
LOOPBACK = bytes([127, 0, 0, 1])
ELSEWHERE = bytes([127, 0, 0, 2])  # client: routed, nobody listens; server: no peer's
MSS_OPTION = bytes([2, 4, 0x05, 0xB4])  # MSS 1460


@dataclass
class Rig:
    """The sockets both loops of a case share, one after the other: the tun
    (ours: the loop's end), the loop's UDP socket and the peer's."""

    tun: socket.socket
    theirs: socket.socket
    sock: socket.socket
    peer: socket.socket

    def drain(self, sock: socket.socket) -> list[bytes]:
        out = []
        while True:
            try:
                out.append(sock.recv(70000))
            except BlockingIOError:
                return out


@pytest.fixture(params=["ipv4", "dual-stack, IPv4 peer", "dual-stack, IPv6 peer"])
def rig(request) -> Iterator[Rig]:
    """The loop's UDP socket: IPv4, or dual-stack as the daemon's is by
    default (its peers' addresses converted: conn.Datagrams); the peer over
    IPv4 or IPv6 (the fast path gives IPv6 back)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "ipv4":
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
    else:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0))
    if request.param.endswith("IPv6 peer"):
        peer = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        peer.bind(("::1", 0))
    else:
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
    for s in (ours, theirs, peer):
        s.setblocking(False)
    yield Rig(ours, theirs, sock, peer)
    for s in (ours, theirs, sock, peer):
        s.close()


def tunnel(rig: Rig, client: bool, offload_path: bool, mss: int | None, max_segment: int,
           fast: bool) -> Loop:
    if client:
        router = Router(endpoint_port=rig.peer.getsockname()[1], mss=mss)
    else:
        router = Router(mss=mss, pool_key=b"k" * 16, timeout=300.0)
    router.set_tun_address(TUN4, ipaddress.IPv4Network("10.9.0.0/24"))
    router.set_tun_address6(TUN6, ipaddress.IPv6Network("fd00::/64"))
    tun = SimpleNamespace(fd=rig.tun.fileno(), name="tun-fast")  # as the loop reads a tun
    loop = default_wire(router, tun, rig.sock, offload=offload_path, clock=FakeClock())
    loop.set_max_segment(max_segment)
    assert loop.fast is not None
    if not fast:
        loop.fast = None
    return loop


def tx_packet(kind: str, payload: int, dst: bytes, offload_path: bool) -> bytes:
    """A packet as the tun gives it (offload: behind a virtio-net header)."""
    data = bytes(range(256)) * (payload // 256 + 1)
    seg = tcp_segment(data[:payload], flags=packet.ACK | packet.PSH)
    gso = 0
    if kind == "syn":
        seg = tcp_segment(b"", flags=packet.SYN, options=MSS_OPTION)
    elif kind == "bad_doff":
        seg = tcp_segment(data[:payload], doff=15 if payload < 40 else 2)
    elif kind == "tso":
        gso = 100 if payload > 100 else 0
    pkt = ip_packet(seg, TUN4, dst)
    if kind == "options":
        pkt = ip_packet(seg, TUN4, dst, options=bytes(4))
    elif kind == "fragment":
        pkt = ip_packet(seg, TUN4, dst, frag=0x2000)
    elif kind == "udp":
        pkt = ip_packet(seg, TUN4, dst, proto=17)
    elif kind == "truncated":
        pkt = ip_packet(seg, TUN4, dst, total=len(seg) + 30)
    elif kind == "trailing":
        pkt = ip_packet(seg, TUN4, dst) + bytes(7)
    elif kind == "ipv6":  # to ::1 (a client routes it to its IPv6 peer, if it has one)
        pkt = ip_packet(seg, TUN6, bytes(15) + b"\1")
    if not offload_path:
        return bytes(pkt)
    gso_type = offload.GSO_TCPV4 if gso else offload.GSO_NONE
    return offload.VNET_HDR.pack(offload.NEEDS_CSUM if gso else 0, gso_type, 40 if gso else 0,
                                 gso, 20, 16) + bytes(pkt)


def rx_datagram(kind: str, payload: int) -> bytes:
    data = bytes(range(1, 256)) * (payload // 255 + 1)
    if kind == "syn":
        return tcp_segment(b"", flags=packet.SYN, options=MSS_OPTION, sport=7000, dport=40000)
    if kind == "short":
        return data[:payload % 20]
    if kind == "bad_doff":
        return tcp_segment(data[:payload], doff=15 if payload < 40 else 3)
    if kind == "control":
        return auth.header(auth.HELLO) + bytes(40)
    return tcp_segment(data[:payload], sport=7000, dport=40000, seq=payload, ack=9,
                       flags=packet.ACK | packet.PSH)


def run(rig: Rig, loop: Loop, events: list[tuple]) -> tuple:
    """The events through *loop*: what came out where, and the state after."""
    router, out = loop.router, []
    for event in events:
        if event[0] == "tx":
            _, kind, payload, to_peer = event
            dst = LOOPBACK if router.client else ELSEWHERE
            if to_peer and not router.client:
                entry = router.store.live.get(rig.peer.getsockname()[:2])
                if entry is not None and len(entry.address) == 4:
                    dst = entry.address
            rig.theirs.send(tx_packet(kind, payload, dst if to_peer else ELSEWHERE,
                                      loop.packets.coalesces))
            loop.on_tun()
            out.append(("udp", rig.drain(rig.peer)))
        elif event[0] == "rx":
            port = rig.sock.getsockname()[1]
            rig.peer.sendto(rx_datagram(event[1], event[2]),
                            ("::1" if rig.peer.family == socket.AF_INET6 else "127.0.0.1", port))
            loop.on_udp()
            out.append(("tun", rig.drain(rig.theirs), [(dest, batches and [bytes(b) for b, _
                                                                            in batches])
                                                        for dest, batches in router.outbox]))
            router.outbox.clear()
        else:
            loop.clock.advance(event[1])
    rig.drain(rig.sock)
    state: list[object] = [loop.counters.snapshot(), router.ident, dict(router.remotes)]
    if router.store is not None:
        state.append(sorted((e.peer, e.address, e.refreshed, e.rx_packets, e.rx_bytes,
                             e.tx_packets, e.tx_bytes) for e in router.store.entries()))
    state.append(sorted((peer, s.last_heard) for peer, s in router.servers.items()))
    return out, state


def close(loop: Loop) -> None:
    """What Loop.run closes at its end (these loops are driven by hand)."""
    loop.tun_pending.close()
    if loop.udp_pending is not None:
        loop.udp_pending.close()


# the common case weighs most: most packets and datagrams are plain data, and small
TX_KINDS = ["plain"] * 6 + ["syn", "options", "fragment", "udp", "truncated", "trailing",
                            "ipv6", "bad_doff", "tso"]
RX_KINDS = ["data"] * 5 + ["syn", "short", "bad_doff", "control"]
sizes = st.integers(0, 100) | st.integers(0, 1400)
events = st.lists(st.one_of(
    st.tuples(st.just("tx"), st.sampled_from(TX_KINDS), sizes, st.booleans()),
    st.tuples(st.just("rx"), st.sampled_from(RX_KINDS), sizes),
    st.tuples(st.just("wait"), st.sampled_from([0.5, 2.0, 301.0]))), min_size=1, max_size=12)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
# a known peer first, then what the fast path must give back: a SYN while the MSS is
# clamped (either way), an entry due for a refresh, then expired
@example(client=True, offload_path=False, mss=1300, max_segment=65536,
         script=[("tx", "plain", 9, True), ("tx", "syn", 0, True), ("rx", "data", 9),
                 ("rx", "syn", 0), ("wait", 2.0), ("rx", "data", 9)])
@example(client=False, offload_path=True, mss=1300, max_segment=65536,
         script=[("rx", "data", 9), ("tx", "plain", 9, True), ("tx", "syn", 0, True),
                 ("rx", "syn", 0), ("wait", 2.0), ("rx", "data", 9), ("wait", 301.0),
                 ("tx", "plain", 9, True), ("rx", "data", 9)])
# a client's server over IPv6 (the dual-stack rig's IPv6 peer): its datagrams go layered
@example(client=True, offload_path=False, mss=None, max_segment=65536,
         script=[("tx", "ipv6", 9, True), ("rx", "data", 9)])
@given(client=st.booleans(), offload_path=st.booleans(), mss=st.sampled_from([None, 1300]),
       max_segment=st.sampled_from([65536, 600]), script=events)
def test_the_fast_path_does_what_the_layered_path_does(rig, client, offload_path, mss,
                                                       max_segment, script):
    results = []
    for fast in (True, False):
        loop = tunnel(rig, client, offload_path, mss, max_segment, fast)
        try:
            results.append(run(rig, loop, script))
        finally:
            close(loop)
    assert results[0] == results[1]


IPV4_PEERS = pytest.mark.parametrize("rig", ["ipv4", "dual-stack, IPv4 peer"], indirect=True)


@IPV4_PEERS
@pytest.mark.parametrize("client", [True, False])
@pytest.mark.parametrize("offload_path", [False, True])
def test_the_common_case_takes_the_fast_path(rig, client, offload_path):
    """A plain data packet each way to and from a known peer is the fast path's:
    with the layered path taken away it still goes through."""
    loop = tunnel(rig, client, offload_path, None, 65536, True)
    try:
        # the Router learns the peer (layered): a client by sending to it, a server by hearing it
        run(rig, loop, [("tx", "plain", 10, True) if client else ("rx", "data", 10)])

        def layered(*_args: object) -> None:
            raise AssertionError("the layered path ran")

        # what only the layered path calls (the tun edge stays pure Python in either build:
        # a compiled loop's own methods could not be replaced)
        loop.packets.packet = loop.packets.write_received = layered  # type: ignore[method-assign]
        out, state = run(rig, loop, [("tx", "plain", 30, True), ("rx", "data", 30)])
    finally:
        close(loop)
    assert [len(o[1]) for o in out] == [1, 1]
    assert out[0][1][0] == tcp_segment(bytes(range(30)), flags=packet.ACK | packet.PSH)
    assert len(out[1][1][0]) == loop.packets.header_len + 20 + 20 + 30
    assert state[0]["tx_packets"] == (2 if client else 1)
    assert state[0]["rx_packets"] == (1 if client else 2)


@IPV4_PEERS
def test_a_failed_send_is_given_back_to_the_layered_path(rig):
    """The fast path does not count a send the kernel refused: the layered
    path sends again and counts what it decides (here: port 0, EINVAL)."""
    loop = tunnel(rig, True, False, None, 65536, True)
    try:
        loop.router.endpoint_port = 0
        run(rig, loop, [("tx", "plain", 5, True)])  # the route (layered): to port 0
        tried = []
        fast = loop.fast
        assert fast is not None
        sendto = fast.sendto
        fast.sendto = lambda data, to: tried.append(to) or sendto(data, to)
        run(rig, loop, [("tx", "plain", 5, True)])  # known now: the fast path tries, gives back
    finally:
        close(loop)
    assert [to[1] for to in tried] == [0]
    assert loop.counters["tx_drop_send_error"] == 2 and loop.counters["tx_packets"] == 0
