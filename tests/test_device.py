"""The send side of the I/O loop on loopback sockets (no root, no tun)."""

import socket

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
