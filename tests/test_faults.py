"""Faults of links and host: the pure decisions (faults.py), the re-cut of wire
segments (offload.recut) and how the loop applies them, with fakes for the tun,
the netlink monitor and the socket (no root)."""

import errno
import os
import select
import socket
import struct
from types import SimpleNamespace

import pytest

import testkit
from udp_encap_tun import offload, packet
from udp_encap_tun.core import Router
from udp_encap_tun.faults import LinkEvent, Links, ReadErrors, tun_mtu_for
from udp_encap_tun.loop import default_wire
from udp_encap_tun.tun import TunGone

TUN, ETH, OTHER = 7, 2, 3


def links(**kw) -> Links:
    args = dict(tun_index=TUN, tun_mtu=1492, bind_name="eth0", bind_index=ETH, bind_mtu=1500)
    args.update(kw)
    return Links(**args)


# -- decisions ------------------------------------------------------------------------


def test_tun_mtu_follows_the_link_and_an_explicit_mtu_is_a_ceiling():
    assert tun_mtu_for(1500) == 1492
    assert tun_mtu_for(1400) == 1392
    assert tun_mtu_for(1500, explicit=1400) == 1400  # fits: kept
    assert tun_mtu_for(1300, explicit=1400) == 1292  # does not fit: lowered
    assert tun_mtu_for(70) == 68  # never below the IPv4 minimum


def test_tun_deleted():
    ln = links()
    ch = ln.update([LinkEvent(True, TUN, "tun0")])
    assert ch.tun_gone and ln.tun_gone


def test_bound_interface_deleted_and_recreated_with_the_same_name():
    ln = links()
    ch = ln.update([LinkEvent(True, ETH, "eth0")])
    assert ch.bind_gone and ch.rebind is None and not ln.bind_present
    ch = ln.update([LinkEvent(False, 9, "eth0", 1500)])
    assert ch.rebind == 9 and not ch.bind_gone and ln.bind_index == 9 and ln.bind_present
    assert ch.set_tun_mtu is None  # same MTU as before
    # later events of the new link: no rebind again
    assert not ln.update([LinkEvent(False, 9, "eth0", 1500)])


def test_deleted_and_back_in_one_batch_rebinds():
    ln = links()
    ch = ln.update([LinkEvent(True, ETH, "eth0"), LinkEvent(False, 9, "eth0", 1500)])
    assert ch.rebind == 9 and not ch.bind_gone


def test_other_links_are_ignored():
    ln = links()
    assert not ln.update([LinkEvent(False, OTHER, "eth1", 1400), LinkEvent(True, OTHER, "eth1")])
    assert ln.bind_present and ln.tun_mtu == 1492 and ln.bind_mtu == 1500


def test_link_mtu_lowered_and_raised():
    ln = links()
    ch = ln.update([LinkEvent(False, ETH, "eth0", 1400)])
    assert ch.set_tun_mtu == 1392 and ch.bind_mtu_changed and ln.max_segment == 1372
    ln.tun_mtu_set(1392)
    assert ln.mss == 1352
    ch = ln.update([LinkEvent(False, ETH, "eth0", 1500)])
    assert ch.set_tun_mtu == 1492 and ln.max_segment == 1472
    # the tun's own event about the MTU we set changes nothing more
    ln.tun_mtu_set(1492)
    assert not ln.update([LinkEvent(False, TUN, "tun0", 1492)])


def test_explicit_mtu_kept_while_it_fits():
    ln = links(tun_mtu=1300, explicit_mtu=1300)
    assert ln.update([LinkEvent(False, ETH, "eth0", 1400)]).set_tun_mtu is None
    assert ln.update([LinkEvent(False, ETH, "eth0", 1200)]).set_tun_mtu == 1192
    ln.tun_mtu_set(1192)
    assert ln.update([LinkEvent(False, ETH, "eth0", 9000)]).set_tun_mtu == 1300


def test_recreated_link_with_another_mtu():
    ln = links()
    ln.update([LinkEvent(True, ETH, "eth0")])
    ch = ln.update([LinkEvent(False, 9, "eth0", 1400)])
    assert ch.rebind == 9 and ch.set_tun_mtu == 1392


def test_mss_follows_the_tun_mtu_whoever_set_it():
    ln = links()
    assert ln.mss == 1452
    ch = ln.update([LinkEvent(False, TUN, "tun0", 1280)])
    assert ch.mss_changed and ln.mss == 1240
    assert links(clamp=False).mss is None


def test_resync_after_lost_events():
    ln = links()
    ch = ln.resync([LinkEvent(False, TUN, "tun0", 1492)])  # eth0 is not there any more
    assert ch.bind_gone and not ln.bind_present
    ch = ln.resync([LinkEvent(False, TUN, "tun0", 1492), LinkEvent(False, 12, "eth0", 1500)])
    assert ch.rebind == 12
    assert ln.resync([LinkEvent(True, TUN, "tun0")]).tun_gone


def test_read_errors_pause_an_fd_once_per_tick():
    errors = ReadErrors(limit=3)
    assert [errors.failed() for _ in range(5)] == [False, False, True, False, False]
    assert errors.tick() is True  # watch it again
    assert errors.tick() is False
    assert [errors.failed() for _ in range(3)] == [False, False, True]


# -- re-cutting wire segments -----------------------------------------------------------


def tcp_segment(seq: int, payload: bytes, flags: int = packet.ACK | packet.PSH,
                options: bytes = b"") -> bytes:
    return testkit.tcp_segment(payload, seq=seq, ack=99, flags=flags, options=options,
                               checksum=0x1234)


def pieces(batches):
    for data, size in batches:
        data = bytes(data)
        for off in range(0, len(data), size):
            yield data[off:off + size]


def test_recut_keeps_what_fits_and_cuts_the_rest():
    payload = bytes(range(256)) * 10  # 2560 bytes
    big = tcp_segment(1000, payload, options=bytes([1, 1, 1, 1]))  # 24-byte header
    small = tcp_segment(5000, b"tail")
    batches = offload.recut(big + small, len(big), 1000)
    segs = list(pieces(batches))
    assert all(len(s) <= 1000 for s in segs)
    assert segs[-1] == small
    cut = segs[:-1]
    assert b"".join(s[24:] for s in cut) == payload
    assert [struct.unpack_from("!I", s, 4)[0] for s in cut] == [1000 + k * 976 for k in range(3)]
    assert all(s[24 - 4:24] == bytes([1, 1, 1, 1]) for s in cut)
    assert [s[13] & packet.PSH for s in cut] == [0, 0, packet.PSH]  # PSH on the last piece


def test_recut_of_segments_that_fit_changes_nothing():
    segs = [tcp_segment(k * 100, bytes([k]) * 100) for k in range(3)]
    assert list(pieces(offload.recut(b"".join(segs), 120, 1400))) == segs


# -- the loop -----------------------------------------------------------------------------


class FakeSocket:
    """Takes datagrams up to *limit* bytes; a larger one fails with EMSGSIZE."""

    def __init__(self, limit: int):
        self.limit = limit
        self.sent = []
        self.bound = []

    def sendto(self, data, dest):
        if len(data) > self.limit:
            raise OSError(errno.EMSGSIZE, "Message too long")
        self.sent.append(bytes(data))
        return len(data)

    def setsockopt(self, level, option, value):
        self.bound.append(value)

    def fileno(self):
        return -1

    def setblocking(self, flag):
        pass


class FakeTun:
    """The tun and its netlink monitor: drain_monitor hands over *events* once."""

    name, index, fd = "tun0", TUN, -1
    address = network = None

    def __init__(self, events=()):
        self.events = list(events)
        self.mtus = []

    def drain_monitor(self, names=()):
        events, self.events = self.events, []
        return False, events

    def set_mtu(self, mtu):
        self.mtus.append(mtu)


_PIPE = os.pipe()  # an fd for the tun edge (never read: the tests swap in the fakes)


def make_tunnel(kind, sock, tun, ln):
    """A loop on the fakes (built on a real socket and a pipe, then swapped)."""
    router = Router(endpoint_port=1, mss=ln.mss)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as real:
        t = default_wire(router, SimpleNamespace(fd=_PIPE[0], name=tun.name), real,
                         offload=kind != "simple", links=ln)
    t.sock = t.conn.sock = sock
    t.conn._sendto = sock.sendto
    t.tun = t.packets.tun = tun
    return t


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_emsgsize_reads_the_link_events_and_resends_cut_smaller(kind):
    """The link's MTU fell (1500 -> 1400) and the loop has not read the event
    yet: the refused batch is cut to fit and sent, the tun MTU and the MSS
    clamp follow, and later packets are cut before sending."""
    sock = FakeSocket(limit=1400 - 28)
    tun = FakeTun([LinkEvent(False, ETH, "eth0", 1400)])
    t = make_tunnel(kind, sock, tun, links())
    segs = [tcp_segment(1 + k * 1440, bytes([k]) * 1440) for k in range(3)]  # 1460 bytes each
    assert t.conn.send([(b"".join(segs), 1460)], ("192.0.2.2", 5000)) == (6, 3 * 1440 + 6 * 20)
    assert all(len(d) <= 1372 for d in sock.sent)
    assert b"".join(d[20:] for d in sock.sent) == b"".join(s[20:] for s in segs)
    assert t.counters["tx_resegmented"] == 1
    assert tun.mtus == [1392] and t.router.mss == 1352 and t.max_segment == 1372

    # a packet from the tun larger than now fits: cut before it is sent
    sock.sent.clear()
    pkt = bytearray(20) + tcp_segment(7, bytes(range(200)) * 10)
    packet.write_ipv4_header(pkt, 0, len(pkt), 1, bytes([10, 9, 0, 2]), bytes([192, 0, 2, 2]))
    batches = t.packets.segments(memoryview(pkt), 0)
    assert t.conn.send(batches, ("192.0.2.2", 5000)) == (2, 2000 + 40)
    assert [len(d) for d in sock.sent] == [1372, 2000 - 1352 + 20]
    assert t.counters["tx_resegmented"] == 2


def test_tso_packet_with_segments_too_large_for_the_link_is_cut_smaller():
    sock = FakeSocket(limit=1372)
    t = make_tunnel("offload", sock, FakeTun(), links(bind_mtu=1400))
    payload = bytes(range(250)) * 12  # 3000 bytes, gso_size 1448 from the tun
    pkt = bytearray(20) + tcp_segment(1, payload)
    packet.write_ipv4_header(pkt, 0, len(pkt), 1, bytes([10, 9, 0, 2]), bytes([192, 0, 2, 2]))
    t.packets.buf[:10] = offload.VNET_HDR.pack(offload.NEEDS_CSUM, offload.GSO_TCPV4, 40, 1448,
                                               20, 16)
    t.packets.buf[10:10 + len(pkt)] = pkt
    view, gso_size = t.packets.packet(10 + len(pkt))
    assert gso_size == 1448
    batches = t.packets.segments(view, gso_size)
    assert [size for _, size in batches] == [1372]
    t.conn.send(batches, ("192.0.2.2", 5000))
    assert [len(d) for d in sock.sent] == [1372, 1372, 3000 - 2 * 1352 + 20]
    assert b"".join(d[20:] for d in sock.sent) == payload
    assert "tx_drop_message_too_long" not in t.counters


def test_bound_interface_back_rebinds_the_socket():
    sock = FakeSocket(limit=1472)
    tun = FakeTun([LinkEvent(True, ETH, "eth0")])
    t = make_tunnel("simple", sock, tun, links())
    t.on_netlink()
    assert not t.links.bind_present and sock.bound == []
    tun.events = [LinkEvent(False, 9, "eth0", 1500)]
    t.on_netlink()
    assert t.links.bind_index == 9 and sock.bound == [b"eth0"]


def test_send_to_a_missing_interface_is_a_named_drop():
    t = make_tunnel("simple", SimpleNamespace(sendto=raiser(errno.ENODEV)), FakeTun(), links())
    assert t.conn.send([(b"x" * 30, 30)], ("192.0.2.2", 5000)) == (0, 0)
    assert t.counters["tx_drop_no_interface"] == 1


def raiser(code):
    def fail(*_):
        raise OSError(code, os.strerror(code))
    return fail


def test_tun_deleted_event_ends_the_loop_with_a_reason():
    t = make_tunnel("simple", FakeSocket(1472), FakeTun([LinkEvent(True, TUN, "tun0")]), links())
    t.running = True
    t.on_netlink()
    assert not t.running and "tun tun0 was deleted" in t.failure


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_tun_read_ebadfd_ends_the_loop(monkeypatch, kind):
    t = make_tunnel(kind, FakeSocket(1472), FakeTun(), links())
    t.running = True
    monkeypatch.setattr(t.packets, "read", raiser(errno.EBADFD))
    with pytest.raises(TunGone, match="tun tun0 was deleted"):  # the loop ends with it
        t.on_tun()
    assert "tx_read_error" not in t.counters


def test_a_tun_read_failing_again_and_again_is_paused_not_spun(monkeypatch):
    """Another persistent read error: after ReadErrors' limit in one tick the tun
    is out of the epoll set (no busy loop), and back in at the next tick."""
    r, w = os.pipe()
    try:
        tun = FakeTun()
        tun.fd = r
        t = make_tunnel("simple", FakeSocket(1472), tun, links())
        t.packets.fd = r
        t.poller = select.epoll()
        t.poller.register(r, select.EPOLLIN)
        os.write(w, b"x")  # readable: epoll would wake the loop for ever
        monkeypatch.setattr(t.packets, "read", raiser(errno.EIO))
        calls = 0
        while t.poller.poll(0) and calls < 1000:
            t.on_tun()
            calls += 1
        assert calls == t.tun_errors.limit and t.counters["tx_read_error"] == calls
        assert t.counters["read_paused"] == 1
        t.housekeeping(0.0)
        assert t.poller.poll(0) == [(r, select.EPOLLIN)]
        t.poller.close()
    finally:
        os.close(r)
        os.close(w)


def test_status_follows_the_links():
    """The status document and its renderings: the bound interface missing, the
    current link and tun MTU and the MSS clamp that follows it."""
    from udp_encap_tun import status

    tun = FakeTun([LinkEvent(True, ETH, "eth0")])
    tun.address = tun.network = None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        t = make_tunnel("simple", sock, tun, links())
        t.on_netlink()
        doc = status.describe(t, 100.0, 1_700_000_000.0)
        assert (doc["bind_interface"], doc["bind_interface_present"]) == ("eth0", False)
        assert "on eth0 (MISSING" in status.render_text(doc)
        assert "udp_encap_tun_bind_interface_present{interface=\"tun0\"} 0" in \
            status.render_prometheus(doc)
        tun.events = [LinkEvent(False, 9, "eth0", 1400)]
        t.on_netlink()
        doc = status.describe(t, 100.0, 1_700_000_000.0)
        assert doc["bind_interface_present"] and (doc["link_mtu"], doc["mtu"], doc["mss_clamp"]) \
            == (1400, 1392, 1352)
        text = status.render_text(doc)
        assert "on eth0 (MTU 1400)" in text and "MTU 1392, MSS clamp 1352" in text


class PendingErrorSocket(FakeSocket):
    """A client socket (IP_RECVERR) on which an ICMP "fragmentation needed"
    about an earlier datagram is pending: the next send fails with EMSGSIZE,
    whatever its size, once."""

    def __init__(self, limit: int):
        super().__init__(limit)
        self.pending = errno.EMSGSIZE

    def sendto(self, data, dest):
        if self.pending:
            err, self.pending = self.pending, None
            raise OSError(err, os.strerror(err))
        return super().sendto(data, dest)


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_a_small_datagram_failing_with_a_pending_frag_needed_is_sent_again(kind, caplog):
    sock = PendingErrorSocket(limit=1400)  # a path MTU of 1428 (the link's is 1500)
    t = make_tunnel(kind, sock, FakeTun(), links())
    ack = tcp_segment(1, b"")
    assert t.conn.send([(ack, len(ack))], ("192.0.2.2", 5000)) == (1, len(ack))
    assert sock.sent == [ack]
    assert "tx_drop_message_too_long" not in t.counters
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    # a datagram that is too large indeed is still dropped under that name
    big = tcp_segment(1, bytes(1430))
    assert t.conn.send([(big, len(big))], ("192.0.2.2", 5000)) == (0, 0)
    assert t.counters["tx_drop_message_too_long"] == 1


def test_keepalive_send_failures_are_counted_and_a_pending_error_is_sent_again():
    sock = PendingErrorSocket(limit=1472)
    sock.pending = errno.ECONNREFUSED  # a "port unreachable" about an earlier datagram
    t = make_tunnel("simple", sock, FakeTun(), links())
    t.router.outbox.append((("192.0.2.2", 5000), None))  # a keepalive
    t.flush_outbox()
    assert sock.sent == [b""] and t.counters["tx_keepalives"] == 1
    sock.pending = errno.ENODEV  # the bound interface is gone: not sent, counted by name
    t.router.outbox.append((("192.0.2.2", 5000), None))
    t.flush_outbox()
    assert t.counters["tx_drop_no_interface"] == 1 and t.counters["tx_keepalives"] == 1
