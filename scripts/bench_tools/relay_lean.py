"""relay_lean.py: relay.py's loop written for speed, a yardstick for scripts/bench (not part of
udp-encap-tun): the leanest per-packet Python we know how to write for one poll, then at most one
tun read and one UDP read per wake-up, checksums recomputed.  An epoll, buffers allocated once,
reads into them, the IPv4 header packed in place and both checksums from int.from_bytes (no
Python loop over bytes).  What it reaches is about what any pure-Python relay can on the
machine at hand.  Same arguments as relay.c:

    relay_lean.py c TUN DEV PORT LOCAL        |    relay_lean.py s TUN DEV PORT LOCAL PEER
"""
import os
import select
import socket
import struct
import sys

from relay import open_ends  # beside this file: the same tun and socket as relay.py's

IP_HEADER = struct.Struct("!BBHHHBBH4s4s")


def main(mode, tun_name, dev, port, local, peer_addr=None):
    server, port, local = mode == "s", int(port), socket.inet_aton(local)
    tun, sock = open_ends(tun_name, dev, port)
    epoll = select.epoll()
    epoll.register(tun, select.EPOLLIN)
    epoll.register(sock.fileno(), select.EPOLLIN)
    poll, readv, write = epoll.poll, os.readv, os.write
    sendto, recvfrom_into = sock.sendto, sock.recvfrom_into
    pack_into, from_bytes, ntoa = IP_HEADER.pack_into, int.from_bytes, socket.inet_ntoa
    tx = bytearray(65536)
    tx_view, tx_bufs = memoryview(tx), (tx,)
    rx = bytearray(20 + 65536)  # the segment lands behind room for the IPv4 header
    rx_view = memoryview(rx)
    rx_target = rx_view[20:]
    peer, ident, sources = None, 0, {}
    local_sum = from_bytes(local[:2], "big") + from_bytes(local[2:], "big") + socket.IPPROTO_TCP
    while True:
        for fd, _events in poll():
            if fd == tun:
                n = readv(tun, tx_bufs)
                if n >= 40 and tx[0] == 0x45 and tx[9] == socket.IPPROTO_TCP:
                    to = peer if server else (ntoa(tx[16:20]), port)
                    if to:
                        sendto(tx_view[20:n], to)
                continue
            n, sender = recvfrom_into(rx_target)
            if n < 20:
                continue
            if server:
                peer = sender
            src = sources.get(sender[0])
            if src is None:
                src = sources[sender[0]] = socket.inet_aton(peer_addr if server else sender[0])
            ident = (ident + 1) & 0xFFFF
            rx[36] = rx[37] = 0
            value = from_bytes(rx_view[20:20 + n], "big") << (8 if n & 1 else 0)
            total = value % 0xFFFF + local_sum + from_bytes(src[:2], "big") \
                + from_bytes(src[2:], "big") + n
            check = 0xFFFE - (total - 1) % 0xFFFF
            rx[36], rx[37] = check >> 8, check & 0xFF
            pack_into(rx, 0, 0x45, 0, 20 + n, ident, 0x4000, 64, socket.IPPROTO_TCP, 0, src,
                      local)
            check = 0xFFFE - (from_bytes(rx_view[:20], "big") - 1) % 0xFFFF
            rx[10], rx[11] = check >> 8, check & 0xFF
            write(tun, rx_view[:20 + n])


if __name__ == "__main__":
    if len(sys.argv) < 6 or (sys.argv[1] == "s" and len(sys.argv) < 7):
        sys.exit(__doc__)
    main(*sys.argv[1:7])
