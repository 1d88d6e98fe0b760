"""What the wire and the log say: DF on every datagram (a capture on the veth),
and the warnings a wrong setup must produce on the side that can tell."""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from uetlab import Pair

MB = 1 << 20
ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_VNET_HDR = 263, 15  # linux/if_packet.h (not in the socket module)
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
GSO_UDP_L4 = 5
ETH_HLEN = 14
IP_DF = 0x4000


class Capture:
    """Every IPv4/UDP frame on *ifname* in *ns* to or from *port*, both
    directions (towards *server_ip* or from it), read by a thread from an AF_PACKET socket.  With PACKET_VNET_HDR
    each frame comes with its virtio-net header: a UDP_SEGMENT batch that
    crosses the veth in one piece (GSO) is one frame whose header says so, and
    the DF bit of its IPv4 header is the one every segment gets."""

    def __init__(self, ns, ifname: str, port: int, server_ip: str):
        self.port, self.server_ip = port, socket.inet_aton(server_ip)
        self.frames: list[dict] = []
        self.sock = ns.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, 33, 32 << 20)  # SO_RCVBUFFORCE
        self.sock.bind((ifname, ETH_P_ALL))
        self.sock.settimeout(0.2)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stopping.is_set():
            try:
                frame = self.sock.recv(1 << 17)
            except socket.timeout:
                continue
            _flags, gso_type, _hlen, gso_size, _cs, _co = VNET_HDR.unpack_from(frame)
            ip = frame[VNET_HDR.size + ETH_HLEN:]
            if frame[VNET_HDR.size + 12:VNET_HDR.size + ETH_HLEN] != b"\x08\x00" or ip[9] != 17:
                continue
            ihl = (ip[0] & 15) * 4
            sport, dport, udp_len = struct.unpack_from("!HHH", ip, ihl)
            if self.port not in (sport, dport):
                continue
            payload = int.from_bytes(ip[2:4], "big") - ihl - 8
            batched = gso_type == GSO_UDP_L4 and gso_size
            self.frames.append({
                "df": bool(int.from_bytes(ip[6:8], "big") & IP_DF),
                "datagrams": -(-payload // gso_size) if batched else 1,
                "batched": bool(batched), "to_server": ip[16:20] == self.server_ip})

    def stop(self) -> list[dict]:
        self.stopping.set()
        self.thread.join(5)
        self.sock.close()
        return self.frames


def test_every_datagram_carries_df(pair: Pair, datapath):
    """Bulk transfers both ways, captured on the client's veth: every datagram
    of the tunnel, in a UDP_SEGMENT batch or alone, has DF set.  On the offload
    path the capture must have seen batches (before IP_PMTUDISC_DO their
    segments left without DF while single datagrams had it)."""
    pair.start_server()
    pair.start_client()
    capture = Capture(pair.c, pair.vc, Pair.PORT, Pair.SERVER_IP)
    try:
        pair.transfer(7001, "upload", 8 * MB)
        pair.transfer(7002, "download", 8 * MB)
    finally:
        frames = capture.stop()
    client = pair.client.stop()
    server = pair.server.stop()
    datagrams = sum(f["datagrams"] for f in frames)
    batched = [f for f in frames if f["batched"]]
    without_df = [f for f in frames if not f["df"]]
    print(f"{datapath}: {len(frames)} frames, {datagrams} datagrams, {len(batched)} batches "
          f"({sum(f['datagrams'] for f in batched)} datagrams), {len(without_df)} frames without DF")
    assert datagrams >= 2 * 8 * MB // 1500, datagrams  # the transfers were captured
    assert any(f["to_server"] for f in frames) and any(not f["to_server"] for f in frames)
    assert not without_df, without_df[:5]
    if datapath == "offload":
        assert server.get("tx_packets", 0) and client.get("tx_packets", 0)
        for direction in (True, False):  # both ends sent batches
            assert any(f["to_server"] == direction and f["datagrams"] > 1 for f in batched), \
                (direction, len(batched))
    for counters in (client, server):
        assert counters.get("tx_drop_message_too_long", 0) == 0, counters
