"""The TCP-in-UDP mode follows its links with faults.Links (no overhead, no MSS
clamp) through the loop's own application of its decisions, with fakes for the
tun, the netlink monitor and the sockets (no root)."""

import errno
import socket
import struct

import pytest

from test_faults import _PIPE, FakeTun
from testkit import FakeClock, ip_packet, tcp_segment
from udp_encap_tun import offload, packet, status, tiu, tiudev
from udp_encap_tun.faults import TIU_OVERHEAD, LinkEvent, Links, tun_mtu_for
from udp_encap_tun.loop import Loop
from udp_encap_tun.tiudev import TiuConn
from udp_encap_tun.tiumode import TiuRouter
from udp_encap_tun.tun import OffloadPackets, Packets

TUN, ETH = 7, 2
LOCAL, REMOTE = bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2])


def tiu_links(**kw) -> Links:
    args = dict(tun_index=TUN, tun_mtu=1500, bind_name="eth0", bind_index=ETH, bind_mtu=1500,
                clamp=False, overhead=TIU_OVERHEAD)
    args.update(kw)
    return Links(**args)


# -- decisions ------------------------------------------------------------------------


def test_no_overhead_the_tun_mtu_is_the_link_mtu():
    assert tun_mtu_for(1500, overhead=TIU_OVERHEAD) == 1500
    assert tun_mtu_for(65536, overhead=TIU_OVERHEAD) == 65535
    assert tun_mtu_for(1300, explicit=1400, overhead=TIU_OVERHEAD) == 1300
    ln = tiu_links()
    assert ln.mss is None and ln.max_segment == 1480  # a TCP segment: link MTU - IPv4
    ch = ln.update([LinkEvent(False, ETH, "eth0", 1400)])
    assert ch.set_tun_mtu == 1400 and ch.bind_mtu_changed and ln.max_segment == 1380
    ln.tun_mtu_set(1400)
    assert ln.mss is None  # nothing to clamp in this mode


# -- fakes ------------------------------------------------------------------------------


class FakeSocket:
    """Takes datagrams (sendmsg) up to *limit* bytes of payload; a larger one
    fails with EMSGSIZE; records SO_BINDTODEVICE."""

    def __init__(self, limit: int = 65507, fail_bind: int | None = None):
        self.limit, self.fail_bind = limit, fail_bind
        self.sent, self.bound = [], []
        self.closed = False

    def sendmsg(self, buffers, ancdata=(), flags=0, addr=None):
        data = b"".join(bytes(b) for b in buffers)
        if len(data) > self.limit:
            raise OSError(errno.EMSGSIZE, "Message too long")
        self.sent.append(data)
        return len(data)

    def setsockopt(self, level, option, value):
        if option == socket.SO_BINDTODEVICE:
            if self.fail_bind:
                raise OSError(self.fail_bind, "No such device")
            self.bound.append(value)

    def fileno(self):
        return -1

    def setblocking(self, flag):
        pass

    def close(self):
        self.closed = True


def make(kind, client=False, ln=None, sockets=None, source=None):
    router = TiuRouter(client, [(7000, 7009)], admission_rate=1000)
    ln = ln or tiu_links()
    sockets = sockets if sockets is not None else {}
    tun = FakeTun()
    packets = (Packets if kind == "simple" else OffloadPackets)(
        tun, router.counters, tiu_wire=True)
    packets.fd = _PIPE[0]
    conn = TiuConn(router, packets, sockets, "eth0", source=source)
    t = Loop(router, tun, packets, conn, links=ln)
    conn.watch(t)
    t.unwatch = lambda fd: None
    return t


def ipv4_tcp(seq: int, payload: bytes, sport=7001, dport=40000) -> bytearray:
    seg = tcp_segment(payload, sport=sport, dport=dport, seq=seq, ack=9,
                      flags=packet.ACK | packet.PSH)
    return ip_packet(seg, REMOTE, LOCAL)


def payload_of(wire_payloads) -> bytes:
    """The TCP payload bytes carried by wire payloads (20-byte TCP headers)."""
    return b"".join(p[12:] for p in wire_payloads)


# -- the loop ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_link_mtu_lowered_tun_follows_without_overhead_or_clamp(kind):
    t = make(kind)
    t.tun.events = [LinkEvent(False, ETH, "eth0", 1400)]
    t.on_netlink()
    assert t.tun.mtus == [1400] and t.router.mss is None and t.max_segment == 1380
    assert t.describe_flows(0.0)["mtu"] == 1400


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_packet_larger_than_the_link_now_carries_is_cut_into_wire_payloads(kind):
    t = make(kind, ln=tiu_links(bind_mtu=1400))
    data = bytes(range(250)) * 8  # 2000 bytes: a 2040-byte packet from a tun of MTU 1500+
    pkt = ipv4_tcp(1, data)
    batches = t.packets.segments(memoryview(pkt), 0)
    sizes = [size for _, size in batches]
    assert sizes and max(sizes) <= 1380 - 8  # wire payload + UDP header + IPv4 <= 1400
    pieces = [bytes(b[o:o + s]) for b, s in batches for o in range(0, len(b), s)]
    assert all(len(p) + 28 <= 1400 for p in pieces) and payload_of(pieces) == data
    # the sequence numbers (wire payload bytes 4-7) advance by the payload cut
    seqs = [struct.unpack_from("!I", p, 4)[0] for p in pieces]
    assert seqs == [1 + k * 1360 for k in range(len(pieces))]
    assert t.counters["tx_resegmented"] == 1


def test_tso_super_packet_with_segments_too_large_is_cut_to_fit():
    t = make("offload", ln=tiu_links(bind_mtu=1400))
    data = bytes(range(250)) * 12  # 3000 bytes, gso_size 1448 from the tun
    pkt = ipv4_tcp(1, data)
    batches = t.packets.segments(memoryview(pkt), 1448)
    pieces = [bytes(b[o:o + s]) for b, s in batches for o in range(0, len(b), s)]
    assert [len(p) for p in pieces] == [1372, 1372, 3000 - 2 * 1360 + 12]
    assert payload_of(pieces) == data


def test_recut_of_wire_payloads():
    data = bytes(range(256)) * 10
    pkt = ipv4_tcp(1000, data)
    (wire, size), = offload.tso_split(pkt, 4000, tiu=True)  # one 2572-byte wire payload
    small = tiu.encode_payload(ipv4_tcp(5000, b"tail")[20:])
    batches = offload.recut(bytes(wire) + small, size, 1000, tiu=True)
    pieces = [bytes(b[o:o + s]) for b, s in batches for o in range(0, len(b), s)]
    assert all(len(p) <= 1000 for p in pieces) and pieces[-1] == small
    assert payload_of(pieces[:-1]) == data
    assert [struct.unpack_from("!I", p, 4)[0] for p in pieces[:-1]] == \
        [1000 + k * 988 for k in range(3)]
    assert [p[tiu.WIRE_FLAGS] & packet.PSH for p in pieces[:-1]] == [0, 0, packet.PSH]


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_emsgsize_reads_the_link_events_and_resends_cut_smaller(kind):
    """The link's MTU fell (1500 -> 1400) and the loop has not read the event
    yet: the refused wire payloads are cut to fit and sent, the tun follows."""
    sock = FakeSocket(limit=1400 - 28)
    t = make(kind, sockets={7001: sock})
    t.tun.events = [LinkEvent(False, ETH, "eth0", 1400)]
    data = bytes(range(200)) * 7  # 1400 bytes: a 1440-byte packet, fits the old MTU
    pkt = ipv4_tcp(1, data)
    route = t.router.tx(memoryview(pkt), 0.0)
    batches = t.packets.segments(memoryview(pkt), 0)
    assert t.conn.send(batches, route[0]) == (2, 1400 + 2 * 12)
    assert all(len(d) <= 1372 for d in sock.sent) and payload_of(sock.sent) == data
    assert t.tun.mtus == [1400] and t.counters["tx_resegmented"] == 1
    assert "tx_drop_send_error" not in t.counters


def test_bound_interface_back_rebinds_every_socket():
    """Server listen sockets and client flow sockets are bound again in place
    (a flow socket keeps receiving); one that cannot be is closed and forgotten."""
    listen = {7000: FakeSocket(), 7001: FakeSocket()}
    t = make("simple", sockets=listen)
    t.tun.events = [LinkEvent(True, ETH, "eth0")]
    t.on_netlink()
    assert not t.links.bind_present and t.describe_flows(0.0)
    t.tun.events = [LinkEvent(False, 9, "eth0", 1500)]
    t.on_netlink()
    assert t.links.bind_index == 9 and all(s.bound == [b"eth0"] for s in listen.values())
    assert not t.conn.check_source  # a server has no source address to check

    c = make("simple", client=True, source="192.0.2.1")
    flows = [c.router.tx_flow(ipv4_tcp(1, b"", sport=40000 + k, dport=7001), 0.0)
             for k in range(2)]
    flows[0].sock, flows[1].sock = FakeSocket(), FakeSocket(fail_bind=errno.ENODEV)
    bad = flows[1].sock
    c.tun.events = [LinkEvent(True, ETH, "eth0"), LinkEvent(False, 9, "eth0", 1500)]
    c.on_netlink()
    assert flows[0].sock.bound == [b"eth0"] and list(c.router.flows.values()) == [flows[0]]
    assert bad.closed and flows[1].sock is None
    assert c.conn.check_source


def test_client_source_address_checked_once_the_interface_has_one_again(monkeypatch):
    t = make("simple", client=True, source="192.0.2.1")
    t.running, t.conn.check_source = True, True
    answers = [[], ["192.0.2.1"]]
    monkeypatch.setattr(tiudev, "interface_addresses", lambda name: answers.pop(0))
    t.conn.tick(0.0)
    assert t.conn.check_source and t.running  # no address yet: wait
    t.conn.tick(1.0)
    assert not t.conn.check_source and t.running and t.failure is None
    t.conn.check_source = True
    monkeypatch.setattr(tiudev, "interface_addresses", lambda name: ["198.51.100.7"])
    t.conn.tick(2.0)
    assert not t.running and "back with the address 198.51.100.7, not 192.0.2.1" in t.failure


def test_new_client_flow_while_the_interface_is_missing_is_a_named_drop():
    t = make("simple", client=True, ln=tiu_links(bind_index=None))
    t.clock = FakeClock(0.0)
    pkt = ipv4_tcp(1, b"", sport=40000, dport=7001)
    flow, _ = t.router.tx(memoryview(pkt), 0.0)
    assert t.conn.send(t.packets.segments(memoryview(pkt), 0), flow) == (0, 0)
    assert t.counters["tx_drop_no_interface"] == 1 and not t.router.flows


def test_status_says_missing_in_tiu_mode():
    t = make("simple")
    t.sock = None
    t.tun.events = [LinkEvent(True, ETH, "eth0")]
    t.on_netlink()
    doc = status.describe(t, 100.0, 1_700_000_000.0)
    assert doc["bind_interface_present"] is False and doc["wire"] == "tcp-in-udp"
    assert "ports 7000-7009 on eth0 (MISSING" in status.render_text(doc)
