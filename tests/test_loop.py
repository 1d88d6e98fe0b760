"""The loop and its edges on loopback sockets, with a socket pair or a pipe
standing in for the tun (no root)."""

import contextlib
import ipaddress
import logging
import os
import re
import select
import signal
import socket
import time
from types import SimpleNamespace

import pytest

from testkit import as_the_kernel_takes, ip_packet, tcp_segment
from udp_encap_tun import build, conn, offload, packet
from udp_encap_tun.conn import probe_udp_offload
from udp_encap_tun.core import Router
from udp_encap_tun.errors import OperatorError
from udp_encap_tun.loop import SMALL, Pending, default_wire


@pytest.fixture
def sockets():
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.bind(("127.0.0.1", 0))
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    yield tx, rx
    tx.close()
    rx.close()


def received(rx, count):
    return [rx.recv(65535) for _ in range(count)]


def fake_tun(fd):
    return SimpleNamespace(fd=fd, name="tun-test")


@pytest.mark.parametrize("path", ["simple", "offload-no-gso", "offload-gso"])
def test_batches_leave_as_one_datagram_per_segment(sockets, path):
    tx, rx = sockets
    if path == "simple":
        edge = conn.Datagrams(tx)
    else:
        gso = path == "offload-gso"
        if gso and not probe_udp_offload(tx)[0]:
            pytest.skip("no UDP GSO on this kernel")
        edge = conn.OffloadDatagrams(tx, gso=gso)
    segments = [bytes([i]) * 100 for i in range(3)] + [b"last"]
    batches = [(b"".join(segments[:3]), 100), (segments[3], 4)]
    assert edge.send(batches, rx.getsockname()) == (4, 304)
    assert received(rx, 4) == segments


def test_send_errors_are_counted_not_raised(sockets, tun_pair, caplog):
    """EMSGSIZE (here: larger than any datagram) is counted under its own name
    and warned about, naming the destination; other errors are send_error."""
    tx, _ = sockets
    tunnel = default_wire(Router(endpoint_port=1), fake_tun(tun_pair[0].fileno()), tx)
    assert tunnel.conn.send([(b"x" * 70000, 70000)], ("127.0.0.1", 9)) == (0, 0)
    assert tunnel.counters["tx_drop_message_too_long"] == 1
    assert "tx_drop_send_error" not in tunnel.counters
    [record] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert "70000 bytes to 127.0.0.1:9" in record.getMessage() and "--mtu" in record.getMessage()
    assert tunnel.conn.send([(b"x", 1)], ("127.0.0.1", 0)) == (0, 0)  # port 0: EINVAL
    assert tunnel.counters["tx_drop_send_error"] == 1


def test_udp_socket_sets_df_on_every_datagram():
    """IP_PMTUDISC_DO: DF on every datagram, batched ones too (the default sets
    it only on datagrams that fit the route's MTU, never on a UDP_SEGMENT batch)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        assert sock.getsockopt(socket.IPPROTO_IP, conn.IP_MTU_DISCOVER) != conn.IP_PMTUDISC_DO
        conn.set_path_mtu_discovery(sock)
        assert sock.getsockopt(socket.IPPROTO_IP, conn.IP_MTU_DISCOVER) == conn.IP_PMTUDISC_DO
    try:
        sock = conn.open_udp(0, "lo", "127.0.0.1")
    except OperatorError as exc:  # SO_BINDTODEVICE needs CAP_NET_RAW
        pytest.skip(str(exc))
    with sock:
        assert sock.getsockopt(socket.IPPROTO_IP, conn.IP_MTU_DISCOVER) == conn.IP_PMTUDISC_DO


def test_tx_path_cuts_a_tso_packet_and_counts_per_peer(sockets):
    """The TX loop end to end, with a pipe standing in for the tun: a 3-MSS
    super-packet to a peer's generated address leaves as 3 datagrams, and the
    peer's own counters say so."""
    tx, rx = sockets
    router = Router()
    router.set_tun_address(bytes([10, 9, 0, 1]), ipaddress.IPv4Network("10.9.0.0/24"))
    entry = router.rx_addresses(rx.getsockname(), time.monotonic())[2]
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    try:
        tunnel = default_wire(router, fake_tun(rfd), tx, offload=True)
        payload = bytes(range(256)) * 2 + b"end"
        pkt = ip_packet(tcp_segment(payload, flags=packet.ACK | packet.PSH),
                        bytes([10, 9, 0, 1]), entry.address)
        vnet = offload.VNET_HDR.pack(offload.NEEDS_CSUM, offload.GSO_TCPV4, 40, 256, 20, 16)
        os.write(wfd, vnet + pkt)
        tunnel.on_tun()
    finally:
        os.close(rfd)
        os.close(wfd)
    datagrams = received(rx, 3)
    assert [len(d) for d in datagrams] == [276, 276, 23]
    assert b"".join(d[20:] for d in datagrams) == payload
    assert (entry.tx_packets, entry.tx_bytes) == (3, 3 * 20 + len(payload))
    assert tunnel.counters["tx_packets"] == 3


# -- the receive side and the drain rules ----------------------------------------


def data_segment(seq: int, payload: bytes) -> bytes:
    return tcp_segment(payload, sport=7000, dport=40000, seq=seq, ack=1)


def rx_tunnel(kind, sockets, tun_pair):
    tx, rx = sockets
    router = Router(endpoint_port=1)
    router.set_tun_address(bytes([10, 9, 0, 2]), None)
    rx.setblocking(False)
    tun = fake_tun(tun_pair[0].fileno())
    if kind == "simple":
        return default_wire(router, tun, rx)
    return default_wire(router, tun, rx, offload=True, gro=probe_udp_offload(rx)[1])


def written(theirs, count):
    return [theirs.recv(70000) for _ in range(count)]


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_lone_small_datagram_reaches_the_tun_with_valid_checksums(sockets, tun_pair, kind):
    tunnel = rx_tunnel(kind, sockets, tun_pair)
    tx, rx = sockets
    seg = data_segment(5, b"?")
    tx.sendto(seg, rx.getsockname())
    time.sleep(0.05)
    tunnel.on_udp()
    [out] = written(tun_pair[1], 1)
    if kind == "offload":  # the kernel finishes the TCP checksum (NEEDS_CSUM)
        assert offload.VNET_HDR.unpack_from(out) == (offload.NEEDS_CSUM, offload.GSO_NONE, 40, 0,
                                                     20, 16)
    out = as_the_kernel_takes(out, kind == "offload")
    assert out[20:] == seg[:16] + out[36:38] + seg[18:]
    assert packet.checksum(out[:20]) == 0 and packet.tcp_checksum_ok(out)
    assert out[12:16] == bytes([127, 0, 0, 1]) and out[16:20] == bytes([10, 9, 0, 2])
    assert tunnel.counters["rx_packets"] == 1


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_a_small_datagram_ends_a_drain(sockets, tun_pair, kind):
    """After a small datagram the drain ends (no system call asks whether more
    is queued): the loop's next epoll_wait finds the next one, and every call
    writes one, in order."""
    tunnel = rx_tunnel(kind, sockets, tun_pair)
    tx, rx = sockets
    for i in range(3):  # not in sequence: nothing to coalesce
        tx.sendto(data_segment(i * 100, b"?"), rx.getsockname())
    time.sleep(0.05)
    for i in range(3):
        tunnel.on_udp()
        [out] = written(tun_pair[1], 1)
        assert out[-21 + 4:-21 + 8] == (i * 100).to_bytes(4, "big")
        assert tunnel.counters["rx_packets"] == i + 1
    assert not select.select([tun_pair[1]], [], [], 0.05)[0]  # nothing more written


@pytest.mark.parametrize("kind", ["simple", "offload"])
def test_a_busy_loop_drains_small_datagrams_queued_together(sockets, tun_pair, kind):
    """When the last epoll_wait found more than one fd ready (traffic both ways:
    bulk transfer's ACKs), a small datagram ends the drain only when nothing
    else is queued."""
    tunnel = rx_tunnel(kind, sockets, tun_pair)
    tx, rx = sockets
    for i in range(3):  # not in sequence: nothing to coalesce
        tx.sendto(data_segment(i * 100, b"?"), rx.getsockname())
    time.sleep(0.05)
    tunnel.busy = True
    tunnel.on_udp()
    outs = [as_the_kernel_takes(o, kind == "offload") for o in written(tun_pair[1], 3)]
    assert [o[24:28] for o in outs] == [(i * 100).to_bytes(4, "big") for i in range(3)]
    assert tunnel.counters["rx_packets"] == 3
    assert not tunnel.udp_pending()


def test_a_busy_drain_goes_on_after_a_small_datagram_while_more_is_queued(sockets, tun_pair):
    """Offload path, busy: a drain started by a full segment takes the small
    datagrams queued after it too (and stops when nothing more is)."""
    tunnel = rx_tunnel("offload", sockets, tun_pair)
    tx, rx = sockets
    payload = bytes(range(256)) * 4
    tx.sendto(data_segment(1, payload), rx.getsockname())
    for i in range(2):  # out of sequence: written on their own
        tx.sendto(data_segment(100000 + i * 100, b"?"), rx.getsockname())
    time.sleep(0.05)
    tunnel.busy = True
    tunnel.on_udp()
    assert len(written(tun_pair[1], 3)) == 3
    assert tunnel.counters["rx_packets"] == 3
    assert not tunnel.udp_pending()


def test_pending_tells_whether_something_is_queued(tun_pair):
    ours, theirs = tun_pair
    pending = Pending(ours.fileno())
    try:
        assert not pending()
        theirs.send(b"x")
        assert pending()
        ours.recv(10)
        assert not pending()
    finally:
        pending.close()


def test_a_large_datagram_does_not_end_a_drain(sockets, tun_pair):
    tunnel = rx_tunnel("simple", sockets, tun_pair)
    tx, rx = sockets
    big = b"x" * SMALL
    for i in range(3):
        tx.sendto(data_segment(i * 1000, big), rx.getsockname())
    time.sleep(0.05)
    tunnel.on_udp()
    assert len(written(tun_pair[1], 3)) == 3
    assert tunnel.counters["rx_packets"] == 3


def test_offload_drain_coalesces_full_segments(sockets, tun_pair):
    tunnel = rx_tunnel("offload", sockets, tun_pair)
    tx, rx = sockets
    payload = bytes(range(256)) * 4
    for i in range(3):
        tx.sendto(data_segment(1 + i * len(payload), payload), rx.getsockname())
    time.sleep(0.05)
    tunnel.on_udp()
    [out] = written(tun_pair[1], 1)
    _flags, gso_type, _hdr_len, gso_size, _, _ = offload.VNET_HDR.unpack_from(out, 0)
    assert (gso_type, gso_size) == (offload.GSO_TCPV4, len(payload))
    assert out[offload.VNET_HDR_LEN + 40:] == payload * 3
    assert tunnel.counters["rx_packets"] == 3


@pytest.mark.parametrize("size,busy", [(1, False), (SMALL, False), (1, True)])
def test_tx_reads_one_small_packet_per_call_unless_busy(sockets, tun_pair, size, busy):
    """A small packet ends the drain unless the loop is busy (then it goes on
    while more is queued); large ones never do."""
    tx, rx = sockets
    ours, theirs = tun_pair
    router = Router()
    router.set_tun_address(bytes([10, 9, 0, 1]), ipaddress.IPv4Network("10.9.0.0/24"))
    entry = router.rx_addresses(rx.getsockname(), time.monotonic())[2]
    tunnel = default_wire(router, fake_tun(ours.fileno()), tx)
    for i in range(3):
        pkt = bytearray(20) + data_segment(i, b"!" * size)
        packet.write_ipv4_header(pkt, 0, len(pkt), i, bytes([10, 9, 0, 1]), entry.address)
        theirs.send(pkt)
    rx.setblocking(False)
    tunnel.busy = busy
    calls = 0
    got = []
    while len(got) < 3 and calls < 5:
        tunnel.on_tun()
        calls += 1
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(rx.recv(65535))
    assert [d[4:8] for d in got] == [i.to_bytes(4, "big") for i in range(3)]
    assert calls == (1 if size >= SMALL or busy else 3)
    assert not tunnel.tun_pending()


class _Storm:
    """A service whose first tick sends the process a SIGUSR1 storm big enough
    to fill the loop's wake-up pipe (64 KiB), then SIGTERM; its second tick
    (about a second later) notes that the loop is still running, and stops it."""

    def __init__(self, storm: int):
        self.storm = storm
        self.ticks = 0
        self.still_running_after_sigterm = False

    def watch(self, tunnel):
        return ()

    def ready(self, tunnel):
        pass

    def tick(self, tunnel, now):
        self.ticks += 1
        if self.ticks == 1:
            for _ in range(self.storm):
                os.kill(os.getpid(), signal.SIGUSR1)
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            self.still_running_after_sigterm = True
            tunnel.running = False

    def close(self, tunnel):
        pass


class _EarlySigterm(_Storm):
    """SIGTERM while the loop is still starting (its handlers are in place)."""

    def watch(self, tunnel):
        os.kill(os.getpid(), signal.SIGTERM)
        return ()

    def tick(self, tunnel, now):
        self.still_running_after_sigterm = True
        tunnel.running = False


def _run_signal_tunnel(sockets, tun_pair, service, caplog) -> None:
    """Run a tunnel with *service* beside it until the loop ends."""
    monitor = socket.socketpair()
    tx, _ = sockets
    tun = SimpleNamespace(fd=tun_pair[0].fileno(), name="tun-test", address=None, network=None,
                          address6=None, network6=None,
                          start_monitor=lambda: monitor[0], drain_monitor=lambda: False)
    caplog.set_level(logging.INFO, logger="udp_encap_tun.loop")
    try:
        default_wire(Router(endpoint_port=1), tun, tx, services=[service]).run()
    finally:
        for sock in monitor:
            sock.close()


class _BusyProbe(_Storm):
    """Two fds of its own, made readable together, then one alone: what the
    loop's ``busy`` said in each callback."""

    def __init__(self):
        super().__init__(0)
        self.pairs = [socket.socketpair(), socket.socketpair()]
        self.seen = []

    def watch(self, tunnel):
        return [(ours.fileno(), lambda ours=ours: self.read(tunnel, ours))
                for ours, _ in self.pairs]

    def ready(self, tunnel):
        for _, theirs in self.pairs:
            theirs.send(b"x")

    def read(self, tunnel, ours):
        ours.recv(1)
        self.seen.append(tunnel.busy)
        if len(self.seen) == 2:
            self.pairs[0][1].send(b"x")  # one fd alone next
        elif len(self.seen) == 3:
            tunnel.running = False

    def tick(self, tunnel, now):
        pass

    def close(self, tunnel):
        for pair in self.pairs:
            for sock in pair:
                sock.close()


def test_the_loop_is_busy_when_more_than_one_fd_is_ready(sockets, tun_pair, caplog):
    service = _BusyProbe()
    _run_signal_tunnel(sockets, tun_pair, service, caplog)
    assert service.seen == [True, True, False]


def test_sigterm_during_start_up_is_not_lost(sockets, tun_pair, caplog):
    service = _EarlySigterm(0)
    _run_signal_tunnel(sockets, tun_pair, service, caplog)
    assert not service.still_running_after_sigterm
    assert "SIGTERM: stopping" in caplog.text
    # the ready line says which build runs
    assert re.search(r"ready: client mode, tun tun-test, .*; " + re.escape(build.describe()),
                     caplog.text)


@pytest.mark.parametrize("storm", [0, 70_000])
def test_sigterm_after_a_sigusr1_storm_stops_the_loop(sockets, tun_pair, caplog, storm):
    storm_service = _Storm(storm)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    _run_signal_tunnel(sockets, tun_pair, storm_service, caplog)
    assert not storm_service.still_running_after_sigterm
    assert "SIGTERM: stopping" in caplog.text
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # put back
    # a storm is coalesced: the loop logs the counters once per wake-up, not per signal
    assert caplog.text.count("counters {") < 100
