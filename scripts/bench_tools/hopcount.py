"""hopcount.py: the Python work of one hop, counted: bytecodes executed per packet by the loop's
TX handler (tun -> UDP, on_tun) and RX handler (UDP -> tun, on_udp), for one small packet per
call, on the simple and the offload path.  Unlike CPU time it does not move with the load on the
machine, so two trees can be compared exactly (scripts/bench measures time; this counts work).
Needs no root: a socket pair stands in for the tun, the UDP side is on loopback.

    hopcount.py [TREE ...]        # default: this checkout; each TREE's udp_encap_tun, in turn

Prints one line per tree and path: bytecodes per packet sent and received.  Pure Python only:
compiled modules (mypyc) execute no bytecode, and a tree with them is refused.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

PACKETS = 20
HERE = Path(__file__).resolve().parent.parent.parent


def segment(seq: int) -> bytes:
    """A TCP segment with one byte of payload (checksum left 0: nothing checks it on TX)."""
    return struct.pack("!HHIIBBHHH", 40000, 7000, seq, 1, 5 << 4, 0x18, 500, 0, 0) + b"x"


def count(path: str) -> tuple[float, float]:
    """(bytecodes per packet sent, per packet received) on *path* ('simple' or 'offload')."""
    from udp_encap_tun import build, packet
    from udp_encap_tun.core import Router
    from udp_encap_tun.loop import default_wire

    if build.compiled_modules():
        sys.exit(f"hopcount: {build.describe()}: compiled modules run no bytecode "
                 "(scripts/build pure)")
    offload = path == "offload"
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)  # dual-stack, as the daemon's
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.bind(("::", 0))
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(2)
    theirs.settimeout(2)
    router = Router(endpoint_port=peer.getsockname()[1], mss=1400)
    router.set_tun_address(bytes([10, 9, 0, 2]), None)
    loop = default_wire(router, SimpleNamespace(fd=ours.fileno(), name="hop"), sock,
                        offload=offload)
    executed = 0

    def tracer(frame, event, _arg):
        nonlocal executed
        frame.f_trace_opcodes = True
        if event == "opcode":
            executed += 1
        return tracer

    def run(handler) -> int:
        nonlocal executed
        executed = 0
        sys.settrace(tracer)
        try:
            handler()
        finally:
            sys.settrace(None)
        return executed

    tx = rx = 0
    to_us = ("127.0.0.1", sock.getsockname()[1])
    for i in range(PACKETS + 1):  # the first of each is a warm-up (caches filled), not counted
        pkt = bytearray(20) + segment(i)
        packet.write_ipv4_header(pkt, 0, len(pkt), i, bytes([10, 9, 0, 2]), bytes([127, 0, 0, 1]))
        theirs.send((bytes(10) if offload else b"") + bytes(pkt))
        ops = run(loop.on_tun)
        peer.recv(2048)
        peer.sendto(segment(i), to_us)
        select.select([sock], [], [], 2)
        rx_ops = run(loop.on_udp)
        theirs.recv(2048)
        if i:
            tx += ops
            rx += rx_ops
    if router.counters["tx_packets"] != PACKETS + 1 or router.counters["rx_packets"] != PACKETS + 1:
        sys.exit(f"hopcount: packets were lost: {dict(router.counters)}")
    return tx / PACKETS, rx / PACKETS


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--one":  # the child: one tree, on sys.path first
        tree, path = sys.argv[2], sys.argv[3]
        tx, rx = count(path)
        print(f"{tree}  {path:8}  TX {tx:6.1f}  RX {rx:6.1f} bytecodes per packet")
        return
    for tree in sys.argv[1:] or [str(HERE)]:
        for path in ("simple", "offload"):
            env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
            subprocess.run([sys.executable, __file__, "--one", tree, path], env=env, cwd=tree,
                           check=True)


if __name__ == "__main__":
    main()
