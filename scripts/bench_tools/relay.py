"""relay.py: relay.c's loop in plain Python, a yardstick for scripts/bench (not part of
udp-encap-tun): one select, then at most one tun read and one UDP read per wake-up,
checksums recomputed.  Same arguments as relay.c:

    relay.py c TUN DEV PORT LOCAL        |    relay.py s TUN DEV PORT LOCAL PEER
"""
import fcntl
import os
import select
import socket
import struct
import sys

TUNSETIFF, IFF_TUN, IFF_NO_PI = 0x400454CA, 0x0001, 0x1000


def csum(data: bytes, start: int = 0) -> int:
    total = start + sum(struct.unpack(f"!{len(data) // 2}H", data[:len(data) & ~1]))
    if len(data) & 1:
        total += data[-1] << 8
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def open_ends(tun_name, dev, port):
    """The tun fd (IFF_TUN, no packet info) and a UDP socket on *port* bound to *dev*
    (relay_lean.py opens its ends here too)."""
    tun = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    fcntl.ioctl(tun, TUNSETIFF, struct.pack("16sH", tun_name.encode(), IFF_TUN | IFF_NO_PI))
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
    sock.bind(("0.0.0.0", port))
    return tun, sock


def main(mode, tun_name, dev, port, local, peer_addr=None):
    server, port, local = mode == "s", int(port), socket.inet_aton(local)
    tun, sock = open_ends(tun_name, dev, port)
    peer, ident = None, 0
    while True:
        ready, _, _ = select.select([tun, sock], [], [])
        if tun in ready:
            pkt = os.read(tun, 65536)
            if len(pkt) >= 40 and pkt[0] == 0x45 and pkt[9] == socket.IPPROTO_TCP:
                to = peer if server else (socket.inet_ntoa(pkt[16:20]), port)
                if to:
                    sock.sendto(pkt[20:], to)
        if sock in ready:
            seg, sender = sock.recvfrom(65536)
            if len(seg) < 20:
                continue
            if server:
                peer = sender
            src = socket.inet_aton(peer_addr if server else sender[0])
            ident = (ident + 1) & 0xFFFF
            header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), ident, 0x4000, 64,
                                 socket.IPPROTO_TCP, 0, src, local)
            header = header[:10] + csum(header).to_bytes(2, "big") + header[12:]
            seg = seg[:16] + b"\0\0" + seg[18:]
            pseudo = src + local + struct.pack("!HH", socket.IPPROTO_TCP, len(seg))
            check = csum(pseudo + seg)
            os.write(tun, header + seg[:16] + check.to_bytes(2, "big") + seg[18:])


if __name__ == "__main__":
    if len(sys.argv) < 6 or (sys.argv[1] == "s" and len(sys.argv) < 7):
        sys.exit(__doc__)
    main(*sys.argv[1:7])
