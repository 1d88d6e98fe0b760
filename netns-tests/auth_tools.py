"""Helpers for the authentication tests (test_auth.py): key files, kernel link
statistics, a hand-driven handshake, a long-lived TCP stream held by the test
process, spoofed datagrams and a bridged topology with an attacker.

All traffic stays inside the test's namespaces; spoofed sources come from the
documentation / shared ranges 203.0.113.0/24 and 100.64.0.0/10.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import random
import socket
import struct
import threading
import time
from pathlib import Path

from testkit import ip_packet, tcp_segment
from udp_encap_tun import auth
from uetlab import Lab, Namespace, Pair

# ------------------------------------------------------------------ keys


def write_psk(path: Path, key: bytes | None = None) -> Path:
    """A key file as the tool wants it: mode 0600, at least 16 bytes."""
    key = key if key is not None else base64.b64encode(os.urandom(32))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key + b"\n")
    os.chmod(path, 0o600)
    return path


def read_psk(path: Path) -> bytes:
    return path.read_bytes().strip()  # what auth.load_psk keeps


# ------------------------------------------------------------------ kernel view


def link_stats(ns: Namespace, ifname: str) -> dict:
    """The kernel's 64-bit statistics of *ifname* in *ns* (rx_packets, tx_packets, ...).

    For a tun, "rx" is what the process WRITES into the device (packets the
    kernel receives from it) and "tx" what the kernel hands the process to read."""
    with ns.ipr() as ipr:
        link = ipr.get_links(ipr.link_lookup(ifname=ifname)[0])[0]
        stats = link.get_attr("IFLA_STATS64")
        return {k: stats[k] for k in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes",
                                      "rx_dropped", "tx_dropped")}


def vm_rss_kib(pid: int) -> int:
    """VmRSS of *pid* in KiB (from /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def tool_pid(tool) -> int:
    """The pid of the udp_encap_tun Python process itself (``ip netns exec``
    execs it, so this is normally the Popen pid; checked, not assumed)."""
    pid = tool.pid
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    if b"udp_encap_tun" in cmdline and b"netns" not in cmdline:
        return pid
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        cmd = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        if b"udp_encap_tun" in cmd:
            return int(child)
    raise AssertionError(f"cannot find the udp_encap_tun process under pid {pid}: {cmdline}")


# ------------------------------------------------------------------ handshake by hand


def udp_socket(ns: Namespace, device: str, addr: str, port: int,
               timeout: float = 5.0) -> socket.socket:
    """A UDP socket in *ns*, bound to *device* and (addr, port)."""
    sock = ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
    sock.bind((addr, port))
    sock.settimeout(timeout)
    return sock


def recv_control(sock: socket.socket, expect_from, kinds=None):
    """(kind, body, raw) of the next control message from *expect_from*;
    anything else is skipped.  socket.timeout if none comes."""
    while True:
        data, peer = sock.recvfrom(65536)
        if peer != expect_from:
            continue
        msg = auth.parse(data)
        if msg is None or (kinds is not None and msg[0] not in kinds):
            continue
        return msg[0], msg[1], data


class HandDriven:
    """A client side of the handshake driven by the test: udp_encap_tun's own
    ClientAuth computes the messages, the test decides where they go from."""

    def __init__(self, psk: bytes, server):
        self.server = server
        self.keys = auth.Keys(psk)
        self.client = auth.ClientAuth(self.keys)

    def hello(self) -> bytes:
        """A HELLO with a fresh nonce (a new client state each time: ClientAuth
        itself would wait a second between HELLOs)."""
        self.client = auth.ClientAuth(self.keys)
        hello, _ = self.client.hold(self.server, (b"", 0), time.monotonic())
        assert hello is not None and auth.parse(hello)[0] == auth.HELLO
        return hello

    def response_to(self, challenge_kind: int, body: bytes) -> bytes:
        assert challenge_kind == auth.CHALLENGE, auth.TYPE_NAMES.get(challenge_kind)
        reply, _, outcome = self.client.on_control(challenge_kind, body, self.server,
                                                   time.monotonic())
        assert outcome == "response_sent", outcome
        return reply

    def welcome(self, kind: int, body: bytes) -> str:
        """The outcome of a WELCOME: 'authenticated' if the server proved it knows the key."""
        _, _, outcome = self.client.on_control(kind, body, self.server, time.monotonic())
        return outcome


# ------------------------------------------------------------------ a long-lived TCP stream


class Stream:
    """One TCP connection, both ends held by the test process: a paced sender
    of random bytes in the client namespace, a hashing receiver in the server
    namespace.  ``finish`` half-closes and returns both sides' byte counts and
    digests."""

    CHUNK = 16 * 1024

    def __init__(self, client_ns: Namespace, server_ns: Namespace, host: str, port: int,
                 pause: float = 0.004, io_timeout: float = 90.0):
        self.pause = pause
        self.listener = server_ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("0.0.0.0", port))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.csock = client_ns.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.csock.settimeout(30)
        self.csock.connect((host, port))
        self.ssock, self.server_saw = self.listener.accept()
        self.listener.close()
        self.csock.settimeout(io_timeout)
        self.ssock.settimeout(io_timeout)
        self.sent = self.received = 0
        self.sent_digest, self.received_digest = hashlib.sha256(), hashlib.sha256()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._send, daemon=True),
                         threading.Thread(target=self._receive, daemon=True)]
        for t in self._threads:
            t.start()

    def _send(self) -> None:
        try:
            while not self._stop.is_set():
                block = os.urandom(self.CHUNK)
                self.csock.sendall(block)
                self.sent_digest.update(block)
                self.sent += len(block)
                time.sleep(self.pause)
            self.csock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            self.errors.append(f"sender: {type(exc).__name__}: {exc}")

    def _receive(self) -> None:
        buf = bytearray(256 * 1024)
        try:
            while True:
                n = self.ssock.recv_into(buf)
                if not n:
                    break
                self.received_digest.update(memoryview(buf)[:n])
                self.received += n
        except OSError as exc:
            self.errors.append(f"receiver: {type(exc).__name__}: {exc}")

    def check(self) -> None:
        assert not self.errors, self.errors

    def finish(self, timeout: float = 90.0) -> dict:
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        alive = [t for t in self._threads if t.is_alive()]
        for s in (self.csock, self.ssock):
            s.close()
        assert not alive, f"stream threads still running after {timeout}s"
        return {"sent": self.sent, "received": self.received,
                "sent_sha256": self.sent_digest.hexdigest(),
                "received_sha256": self.received_digest.hexdigest(), "errors": self.errors}

    def close(self) -> None:
        self._stop.set()
        for s in (self.csock, self.ssock):
            with contextlib.suppress(OSError):
                s.close()


# ------------------------------------------------------------------ spoofing


SPOOF_NETS = [(0xCB007100, 8), (0x64400000, 22)]  # 203.0.113.0/24, 100.64.0.0/10


def random_source(rng: random.Random) -> bytes:
    base, bits = rng.choice(SPOOF_NETS)
    host = rng.randrange(1, (1 << bits) - 1)
    return (base | host).to_bytes(4, "big")


def ipv4_udp(src: bytes, sport: int, dst: bytes, dport: int, payload: bytes) -> bytes:
    """IPv4 + UDP headers and *payload*, for a raw IP_HDRINCL socket.  The kernel
    fills in the IPv4 checksum (and total length); the UDP checksum is 0 (none)."""
    udp_len = 8 + len(payload)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    return bytes(ip_packet(udp, src, dst, proto=socket.IPPROTO_UDP, ident=0, checksum=0))


def flood_payloads(rng: random.Random, count: int, window: bytes, real_cookie: bytes):
    """*count* (kind, payload) pairs: random junk (a lot of it TCP-looking),
    malformed control messages, HELLOs and RESPONSEs with forged cookies (random,
    or the attacker's own real cookie replayed from spoofed sources)."""
    out = []
    for _ in range(count):
        r = rng.random()
        if r < 0.35:
            kind, payload = "junk", rng.randbytes(rng.randrange(0, 200))
        elif r < 0.40:  # magic right, type unknown: a broken control message
            kind = "bad_control"
            payload = auth.HEADER.pack(auth.MAGIC, auth.VERSION, 99, 0) + rng.randbytes(40)
        elif r < 0.70:
            nonce = rng.randbytes(auth.NONCE_LEN)
            msg = auth.header(auth.HELLO) + nonce
            kind, payload = "hello", msg + bytes(auth.HELLO_SIZE - len(msg))
        else:
            cookie = real_cookie if rng.random() < 0.2 else rng.randbytes(auth.MAC_LEN)
            kind, payload = "response", (auth.header(auth.RESPONSE) + rng.randbytes(auth.NONCE_LEN)
                                         + window + cookie + rng.randbytes(auth.MAC_LEN))
        out.append((kind, payload))
    return out


def tcp_looking(rng: random.Random) -> bytes:
    """A datagram that passes the tool's TCP check: an ACK segment with a few bytes."""
    return tcp_segment(sport=rng.randrange(1024, 65536), dport=rng.randrange(1, 65536),
                       seq=rng.getrandbits(32), ack=rng.getrandbits(32), window=65535,
                       payload=rng.randbytes(rng.randrange(0, 64)))  # drawn in this order


def send_spoofed(sock: socket.socket, dst: str, dport: int, payloads, rng: random.Random,
                 batch: int = 200, pause: float = 0.002) -> int:
    """Send each payload from a random spoofed source and port; a short pause
    after every *batch* keeps the veths' backlogs from overflowing.  Returns the
    number sent."""
    dst_b = socket.inet_aton(dst)
    sent = 0
    for i, payload in enumerate(payloads, 1):
        sock.sendto(ipv4_udp(random_source(rng), rng.randrange(1024, 65536), dst_b, dport, payload),
                    (dst, 0))
        sent += 1
        if i % batch == 0:
            time.sleep(pause)
    return sent


FLOOD_NFT = """
table ip uetflood {
    counter flood { }
    chain input {
        type filter hook input priority 0; policy accept;
        ip saddr { 203.0.113.0/24, 100.64.0.0/10 } udp dport %d counter name "flood"
    }
}
"""


def nft_counter(ns: Namespace, table: str = "uetflood", name: str = "flood") -> int:
    out = ns.run("nft", "-j", "list", "counter", "ip", table, name).stdout
    for item in json.loads(out)["nftables"]:
        if "counter" in item:
            return item["counter"]["packets"]
    raise AssertionError(f"no counter in {out}")


# ------------------------------------------------------------------ topology


class SwitchedPair(Pair):
    """The standard pair, but C, S and an attacker A meet on a bridge in a
    switch namespace W, so that A's spoofed datagrams arrive on the veth the
    server's socket is bound to.  Replies to spoofed sources are routed to A
    (which does not forward) and die there.

        C: vc 192.0.2.1/24     S: vs 192.0.2.2/24     A: va 192.0.2.9/24
    """

    ATTACKER_IP = "192.0.2.9"

    def __init__(self, lab: Lab):  # noqa: D107 - replaces Pair's direct veth
        self.lab = lab
        self.c, self.s, self.a, self.w = (lab.netns(r) for r in ("c", "s", "a", "w"))
        self.vc, self.vs, self.va = lab.ifname("vc"), lab.ifname("vs"), lab.ifname("va")
        self.ctun, self.stun = lab.ifname("tc"), lab.ifname("ts")
        self.server = self.client = None
        bridge = lab.ifname("br")
        with self.w.ipr() as ipr:
            ipr.link("add", ifname=bridge, kind="bridge")
        ports = []
        for ns, ifname, ip, role in ((self.c, self.vc, self.CLIENT_IP, "wc"),
                                     (self.s, self.vs, self.SERVER_IP, "ws"),
                                     (self.a, self.va, self.ATTACKER_IP, "wa")):
            port = lab.ifname(role)
            lab.veth(ns, ifname, f"{ip}/24", self.w, port, None)
            ports.append(port)
        with self.w.ipr() as ipr:
            br = ipr.link_lookup(ifname=bridge)[0]
            for port in ports:
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=br)
            ipr.link("set", index=br, state="up")
        # S: accept spoofed sources (no reverse-path check); send replies to A
        for key in ("all", "default", self.vs):
            self.s.sysctl(f"net.ipv4.conf.{key}.rp_filter", 0)
        for net in ("203.0.113.0/24", "100.64.0.0/10"):
            self.s.add_route(net, dev=self.vs, gateway=self.ATTACKER_IP)
        self.a.sysctl("net.ipv4.ip_forward", 0)
