"""A capture of the UDP frames on a veth, with their virtio-net headers: what
the tests that check the wire (DF, segmentation, checksums) read."""

from __future__ import annotations

import socket
import struct
import threading
from typing import NamedTuple

ETH_P_ALL = 0x0003
ETH_HLEN = 14
SOL_PACKET, PACKET_VNET_HDR = 263, 15  # linux/if_packet.h (not in the socket module)
SO_RCVBUFFORCE = 33
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
GSO_UDP_L4 = 5


class Frame(NamedTuple):
    flags: int  # virtio-net header flags (1: checksum still to be completed)
    gso_type: int  # 0: one datagram; GSO_UDP_L4: a UDP_SEGMENT batch of gso_size segments
    gso_size: int
    ip: bytes  # the IPv4 packet (for a batch: the whole super-packet)


class UdpCapture:
    """Every IPv4/UDP frame on *ifname* in *ns* (both directions) with a source
    or destination port in *ports* (any port if None), read by a thread from an
    AF_PACKET socket with PACKET_VNET_HDR: a UDP_SEGMENT batch that crosses the
    veth in one piece (GSO) is one frame whose header says so."""

    def __init__(self, ns, ifname: str, ports=None):
        self.ports = ports
        self.frames: list[Frame] = []
        self.sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        self.sock.bind((ifname, ETH_P_ALL))
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                frame = self.sock.recv(1 << 17)
            except TimeoutError:
                continue
            flags, gso_type, _hlen, gso_size, _cs, _co = VNET_HDR.unpack_from(frame)
            ip = frame[VNET_HDR.size + ETH_HLEN:]
            if frame[VNET_HDR.size + 12:VNET_HDR.size + ETH_HLEN] != b"\x08\x00" or ip[9] != 17:
                continue
            if self.ports is not None:
                sport, dport = struct.unpack_from("!HH", ip, (ip[0] & 15) * 4)
                if sport not in self.ports and dport not in self.ports:
                    continue
            self.frames.append(Frame(flags, gso_type, gso_size, ip[:(ip[2] << 8) | ip[3]]))

    def stop(self) -> list[Frame]:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()
        return self.frames
