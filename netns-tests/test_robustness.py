"""Bad input on either side: junk datagrams at the server, non-TCP into the tun."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
import time

from auth_tools import ipv4_udp, tool_pid, vm_rss_kib
from ops_tools import udp_rcvbuf_errors
from testkit import ip_packet, tcp_segment
from udp_encap_tun import auth, packet
from uetlab import Pair, counter_delta, wait_for

MB = 1 << 20
JUNK_PORT = 6000
IP_MTU_DISCOVER, IP_PMTUDISC_DONT = 10, 0  # linux/in.h (not in the socket module)


def tcp_header(doff_words: int = 5, flags: int = 0x10, sport: int = 1234,
               dport: int = 4321) -> bytes:
    """A 20-byte TCP header (data offset field set to *doff_words*)."""
    return tcp_segment(sport=sport, dport=dport, seq=1, ack=1, flags=flags, window=65535,
                       doff=doff_words)


def rx_accounted(counters: dict) -> int:
    """Datagrams the server has dealt with: written to the tun, taken as a
    keepalive (an empty datagram) or dropped for a reason."""
    return (counters.get("rx_packets", 0) + counters.get("rx_keepalives", 0)
            + sum(v for k, v in counters.items() if k.startswith("rx_drop_")))


def test_malformed_and_oversized_datagrams(tunnel: Pair):
    """Junk sent straight to the server's UDP port is counted and dropped (or,
    when it looks like TCP, passed on) and the server keeps working."""
    junk = {
        "empty": b"",
        "1 byte": b"\x45",
        "19 bytes": tcp_header()[:19],
        "20 bytes, data offset 4": tcp_header(doff_words=4),
        "20 bytes, data offset 15": tcp_header(doff_words=15),
        "9000 bytes, valid-looking": tcp_header() + bytes(9000 - 20),
        "65507 bytes, valid-looking": tcp_header() + bytes(65507 - 20),
    }
    before = tunnel.server.counters()

    sock = tunnel.c.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        # leave on the veth, not into the tun that the host route points at
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, tunnel.vc.encode())
        sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
        sock.bind((Pair.CLIENT_IP, JUNK_PORT))
        for payload in junk.values():
            assert sock.sendto(payload, (Pair.SERVER_IP, Pair.PORT)) == len(payload)

        after = wait_for(
            lambda: (c := tunnel.server.counters()) and
            rx_accounted(c) - rx_accounted(before) >= len(junk) and c, 20, interval=0.2,
            what="the server to account for every junk datagram")

        # Each valid-looking segment that reached the server's TCP (no socket on
        # port 4321) is answered with a RST, which the tunnel carries back to
        # the junk socket: proof that the packet written to the tun was well formed.
        delivered = counter_delta(after, before, "rx_packets")
        replies = []
        sock.settimeout(5)
        for _ in range(delivered):
            try:
                replies.append(sock.recv(65535))
            except TimeoutError:
                break
    assert len(replies) == delivered, (replies, before, after)
    for reply in replies:
        sport, dport, _seq, _ack, _off, flags = struct.unpack_from("!HHIIBB", reply)
        assert (sport, dport) == (4321, 1234) and flags & 0x04, reply.hex()  # RST
    # exactly one new peer: the junk socket, admitted by its valid-looking datagrams
    assert [(h, p) for h, p, _ in tunnel.server.new_peers()] == [(Pair.CLIENT_IP, JUNK_PORT)]

    assert tunnel.server.alive()
    assert rx_accounted(after) - rx_accounted(before) == len(junk), (before, after)
    # the empty datagram is either too short or a keepalive (it refreshes a known
    # peer and never creates one); 1 and 19 bytes are too short
    assert counter_delta(after, before, "rx_drop_too_short") + \
        counter_delta(after, before, "rx_keepalives") == 3, (before, after)
    assert counter_delta(after, before, "rx_drop_too_short") >= 2, (before, after)
    assert counter_delta(after, before, "rx_drop_bad_data_offset") == 2, (before, after)
    assert after.get("internal_error", 0) == 0, tunnel.server.log()
    # the two big ones look like TCP: a new peer whose segments went to the tun
    # (or, if the data path refuses them, a counted drop - but never silence)
    big = (counter_delta(after, before, "rx_packets")
           + counter_delta(after, before, "rx_drop_too_long")
           + counter_delta(after, before, "rx_drop_write_error"))
    assert big == 2, (before, after)

    # the tunnel still works, in both directions
    tunnel.transfer(7001, "upload", 2 * MB)
    tunnel.transfer(7002, "download", 2 * MB)
    final = tunnel.server.stop()
    assert final.get("internal_error", 0) == 0
    assert tunnel.client.stop().get("internal_error", 0) == 0


def _raw_ipv4(payload: bytes, dst: str, **quirks) -> bytes:
    # source 0.0.0.0, ID 0 and checksum 0: the kernel fills them in (IP_HDRINCL)
    return bytes(ip_packet(payload, bytes(4), socket.inet_aton(dst), ident=0, checksum=0,
                           **quirks))


def test_tx_drops_of_non_tcp_traffic(tunnel: Pair):
    """What the client's tun hands over that is not one whole IPv4 TCP segment
    is counted by reason and not sent; the tunnel goes on working."""
    c, dst = tunnel.c, Pair.SERVER_IP
    # IPv6 into the tun as well (UDP over IPv6: not TCP either)
    c.run("ip", "-6", "addr", "add", "fd00:9::2/128", "dev", tunnel.ctun, "nodad")
    c.add_route("fd00:9::1/128", dev=tunnel.ctun)
    before = tunnel.client.counters()

    sent = {"not_tcp": 0, "ip_options": 0, "fragment": 0,
            "bad_tcp_header": 0, "truncated": 0}
    with c.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        for _ in range(3):
            udp.sendto(b"not tcp", (dst, 9))
            sent["not_tcp"] += 1
    with c.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as icmp:
        for seq in range(2):  # echo requests (what ping sends)
            msg = struct.pack("!BBHHH", 8, 0, 0, 0x5545, seq) + b"ping"
            csum = 0
            for i in range(0, len(msg), 2):
                csum += (msg[i] << 8) | msg[i + 1]
            csum = (csum & 0xFFFF) + (csum >> 16)
            msg = msg[:2] + struct.pack("!H", ~csum & 0xFFFF) + msg[4:]
            icmp.sendto(msg, (dst, 0))
            sent["not_tcp"] += 1
    with c.socket(socket.AF_INET6, socket.SOCK_DGRAM) as udp6:
        udp6.sendto(b"v6", ("fd00:9::1", 9))
        sent["not_tcp"] += 1
    with c.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:  # IP_HDRINCL
        seg = tcp_header(flags=0x02)
        crafted = {
            # options: IHL 6 with four NOPs
            "ip_options": _raw_ipv4(seg, dst, options=b"\x01\x01\x01\x01"),
            # more-fragments set
            "fragment": _raw_ipv4(seg, dst, frag=0x2000),
            # TCP data offset 4 (< 20 bytes)
            "bad_tcp_header": _raw_ipv4(tcp_header(doff_words=4), dst),
            # only 10 bytes of TCP header
            "truncated": _raw_ipv4(seg[:10], dst),
        }
        for reason, packet in crafted.items():
            raw.sendto(packet, (dst, 0))
            sent[reason] += 1

    def all_counted():
        now = tunnel.client.counters()
        ok = all(counter_delta(now, before, f"tx_drop_{r}") >= n for r, n in sent.items())
        return now if ok else None

    after = wait_for(all_counted, 20, interval=0.2, what="the client's tx_drop counters")
    for reason in ("ip_options", "fragment", "bad_tcp_header", "truncated"):
        assert counter_delta(after, before, f"tx_drop_{reason}") == 1, (reason, before, after)
    # nothing of this was sent on the wire
    assert counter_delta(after, before, "tx_packets") == 0, (before, after)
    assert after.get("internal_error", 0) == 0

    tunnel.transfer(7001, "upload", MB)
    assert tunnel.client.stop().get("internal_error", 0) == 0


def test_server_drops_tcp_to_unknown_peer(tunnel: Pair):
    """The server counts TCP for a pool address that no peer holds (unknown_peer)."""
    before = tunnel.server.counters()
    with tunnel.s.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect(("10.9.0.77", 80))  # a SYN into the server's tun
        wait_for(lambda: counter_delta(tunnel.server.counters(), before,
                                       "tx_drop_unknown_peer") >= 1,
                 20, interval=0.2, what="tx_drop_unknown_peer")
    tunnel.transfer(7001, "download", MB)
    tunnel.server.stop()


def test_refused_peer_is_counted_per_datagram(pair: Pair):
    """With --max-peers 1 a second peer is refused: every one of its datagrams
    is counted as rx_drop_peers_full (the same on both data paths), none gets
    through, and the admitted peer keeps working."""
    server = pair.start_server("--max-peers", "1")
    pair.start_client()
    pair.transfer(7001, "upload", MB)  # the client is the one admitted peer

    count = 20
    before = server.counters()
    with pair.c.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, pair.vc.encode())
        sock.bind((Pair.CLIENT_IP, JUNK_PORT))
        with server.paused():  # one burst, as from a busy peer
            for _ in range(count):
                sock.sendto(tcp_header(), (Pair.SERVER_IP, Pair.PORT))
        after = wait_for(lambda: (c := server.counters()) and
                         counter_delta(c, before, "rx_drop_peers_full") >= 1 and c, 20,
                         interval=0.2, what="rx_drop_peers_full")
        after = server.counters()  # settle: everything sent has been read by now
    assert len(server.new_peers()) == 1
    assert counter_delta(after, before, "rx_packets") == 0, (before, after)
    pair.transfer(7002, "download", MB)
    assert counter_delta(after, before, "rx_drop_peers_full") == count, (before, after)


HOSTILE_SMALL, HOSTILE_LARGE = 3000, 150


def hostile_payloads(rng: random.Random, count: int, large: bool) -> list[bytes]:
    """Random bytes, TCP headers with lying data offsets, SYNs with random
    options (the MSS clamp parses them), control-message lookalikes; *large*:
    lengths up to 65,507 bytes."""
    out = []
    for _ in range(count):
        size = rng.randrange(0, 65508) if large else rng.randrange(0, 1400)
        r = rng.random()
        if r < 0.3:
            out.append(rng.randbytes(size))
        elif r < 0.6:  # a TCP header whose data offset may point past the end
            out.append(tcp_header(doff_words=rng.randrange(16), flags=rng.randrange(256),
                                  sport=rng.randrange(1, 65536), dport=rng.randrange(1, 65536))
                       [:max(size, 1)] + rng.randbytes(max(0, size - 20)))
        elif r < 0.8:  # a SYN with 40 bytes of random options
            out.append(tcp_header(doff_words=15, flags=0x02, sport=rng.randrange(1, 65536),
                                  dport=rng.randrange(1, 65536)) + rng.randbytes(40 + size % 64))
        else:  # the control magic, any version, type and length
            out.append(auth.MAGIC + bytes([rng.randrange(4), rng.randrange(8)]) + bytes(6)
                       + bytes([0, 0, 0, 0]) + rng.randbytes(size % 200))
    return out


def not_tcp(payloads) -> int:
    return sum(1 for p in payloads if packet.classify_rx(p) is not None)


def test_hostile_input_at_both_ends_during_a_transfer(tunnel: Pair):
    """Junk at both ends at once, from the addresses each end trusts (the
    server's address and port at the client, the client's at the server) and
    from another port with datagrams up to 65,507 bytes, while a download runs:
    the download is byte-exact; every datagram that is no TCP segment is
    counted by a reason (bar the kernel's receive-buffer drops); no internal
    error, no traceback; memory stays flat."""
    rng = random.Random(20261130)
    ends = {"server": (tunnel.server, tunnel.c, Pair.CLIENT_IP, tunnel.vc, Pair.SERVER_IP),
            "client": (tunnel.client, tunnel.s, Pair.SERVER_IP, tunnel.vs, Pair.CLIENT_IP)}
    tunnel.transfer(7000, "download", MB)  # warm-up
    pids = {name: tool_pid(end[0]) for name, end in ends.items()}
    rss = {name: vm_rss_kib(pid) for name, pid in pids.items()}
    before = {name: end[0].counters() for name, end in ends.items()}
    lost = {name: udp_rcvbuf_errors(end[0].ns) for name, end in ends.items()}
    xfer = tunnel.lab.transfer(tunnel.s, tunnel.c, Pair.SERVER_IP, 7003, "download", 8 * MB,
                               wait=False)
    expected = {}
    for name, (_tool, ns, src, dev, dst) in ends.items():
        small = hostile_payloads(rng, HOSTILE_SMALL, large=False)
        large = hostile_payloads(rng, HOSTILE_LARGE, large=True)
        expected[name] = not_tcp(small) + not_tcp(large)
        with ns.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
            # on the veth, not into the client's tun that its host route points at
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
            for i, payload in enumerate(small, 1):  # spoofed: the trusted address and port
                raw.sendto(ipv4_udp(socket.inet_aton(src), Pair.PORT, socket.inet_aton(dst),
                                    Pair.PORT, payload), (dst, 0))
                if i % 100 == 0:
                    time.sleep(0.005)
        with ns.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, dev.encode())
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DONT)
            sock.bind((src, JUNK_PORT))
            for payload in large:
                sock.sendto(payload, (dst, Pair.PORT))
                time.sleep(0.002)
    xfer.wait()
    afters = {name: end[0].counters() for name, end in ends.items()}
    # the server answers the spoofed keepalives of its known client: to the client
    expected["client"] += counter_delta(afters["server"], before["server"], "tx_keepalives")
    for name, (tool, *_rest) in ends.items():
        after = afters[name]
        not_tcp_counted = sum(counter_delta(after, before[name], k) for k in after
                              if k in ("rx_drop_too_short", "rx_drop_bad_data_offset",
                                       "rx_drop_bad_control", "rx_keepalives"))
        # what the kernel dropped for a full receive buffer never reached the tool
        dropped = udp_rcvbuf_errors(tool.ns) - lost[name]
        assert expected[name] - dropped <= not_tcp_counted <= expected[name], \
            (name, expected[name], dropped, before[name], after)
        assert after.get("internal_error", 0) == 0, tool.log()
        assert "Traceback" not in tool.log(), tool.log()
        growth = vm_rss_kib(pids[name]) - rss[name]
        assert growth < 16 << 10, (name, rss[name], growth)
    tunnel.transfer(7004, "upload", 2 * MB)  # and it still works
    for tool, *_rest in ends.values():
        assert tool.stop().get("internal_error", 0) == 0
