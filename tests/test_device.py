"""The send side of the I/O loop on loopback sockets (no root, no tun)."""

import socket
import time

import pytest

from udp_encap_tun.conn import probe_udp_offload
from udp_encap_tun.core import Router
from udp_encap_tun.device import OffloadTunnel, Tunnel


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


@pytest.mark.parametrize("path", ["simple", "offload-no-gso", "offload-gso"])
def test_batches_leave_as_one_datagram_per_segment(sockets, path):
    tx, rx = sockets
    if path == "simple":
        tunnel = Tunnel(Router(endpoint_port=1), None, tx)
    else:
        gso = path == "offload-gso"
        if gso and not probe_udp_offload(tx)[0]:
            pytest.skip("no UDP GSO on this kernel")
        tunnel = OffloadTunnel(Router(endpoint_port=1), None, tx, gso=gso, gro=False)
    segments = [bytes([i]) * 100 for i in range(3)] + [b"last"]
    batches = [(b"".join(segments[:3]), 100), (segments[3], 4)]
    assert tunnel.send_batches(batches, rx.getsockname()) == (4, 304)
    assert received(rx, 4) == segments
    assert tunnel.counters["tx_packets"] == 4 and tunnel.counters["tx_bytes"] == 304


def test_send_errors_are_counted_not_raised(sockets):
    tx, _ = sockets
    tunnel = Tunnel(Router(endpoint_port=1), None, tx)
    assert tunnel.send_batches([(b"x" * 70000, 70000)], ("127.0.0.1", 9)) == (0, 0)
    assert tunnel.counters["tx_drop_send_error"] == 1


def test_tx_path_cuts_a_tso_packet_and_counts_per_peer(sockets):
    """The TX loop end to end, with a pipe standing in for the tun: a 3-MSS
    super-packet to a peer's generated address leaves as 3 datagrams, and the
    peer's own counters say so."""
    import ipaddress
    import os
    import struct
    from types import SimpleNamespace

    from udp_encap_tun import offload, packet

    tx, rx = sockets
    router = Router()
    router.set_tun_address(bytes([10, 9, 0, 1]), ipaddress.IPv4Network("10.9.0.0/24"))
    entry = router.rx_addresses(rx.getsockname(), time.monotonic())[2]
    rfd, wfd = os.pipe()
    os.set_blocking(rfd, False)
    try:
        tunnel = OffloadTunnel(router, SimpleNamespace(fd=rfd), tx, gso=False, gro=False)
        payload = bytes(range(256)) * 2 + b"end"
        seg = struct.pack("!HHIIBBHHH", 40000, 7000, 1, 2, 5 << 4, packet.ACK | packet.PSH,
                          500, 0, 0) + payload
        pkt = bytearray(20) + seg
        packet.write_ipv4_header(pkt, 0, len(pkt), 1, bytes([10, 9, 0, 1]), entry.address)
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
