"""Sans-IO tunnel logic: the Router decides, the I/O loop (loop.py) carries
out.  For a packet read from the tun: dropped (why), held until the client is
authenticated, or sent to which UDP destination; for a received datagram: a
TCP segment for the tun (with which addresses), a keepalive, a control message
or junk (why).  Every datagram that is not data -- control replies, keepalives
and their answers, data released after authentication -- waits in ``outbox``
until the loop sends it.  Every method takes ``now``; the unit tests drive it
with an injected clock."""

from __future__ import annotations

import errno
import ipaddress
import logging
import os
import socket
from collections import Counter
from collections.abc import Hashable, Iterable
from typing import TYPE_CHECKING, Final

from . import auth, packet as pk
from .packet import SYN, classify_rx, classify_tx
from .store import AddressPool, Entry, Peer, PeerStore

if TYPE_CHECKING:  # annotations only: the I/O edge and tiumode are not imported here
    from .conn import Batches
    from .packet import ReadBuffer, WriteBuffer
    from .tiumode import Flow

log = logging.getLogger(__name__)

# drop reasons decided here (packet.py has the parsing ones)
TX_UNKNOWN_PEER: Final = "unknown_peer"
RX_NO_TUN_ADDRESS: Final = "no_tun_address"
KEEPALIVE_FORGET: Final = 86400.0  # stop keeping a server's mapping alive after a day without TCP
TX_MESSAGE_TOO_LONG: Final = "message_too_long"  # the kernel refused a datagram with EMSGSIZE
TX_NO_INTERFACE: Final = "no_interface"  # the bound interface is gone (ENODEV)
WARN_INTERVAL: Final = 60.0  # seconds: at most one warning per kind and peer this often
WARN_BURST: Final = 10  # warnings of one kind, all peers together, per WARN_INTERVAL at most
KEEPALIVE_ANSWER_INTERVAL: Final = 1.0  # server: at most one keepalive answer per peer this often
MIN_IPV4_MTU: Final = 68  # RFC 791: an ICMP "fragmentation needed" naming less names none
MIN_IPV6_MTU: Final = 1280  # RFC 8200: an ICMPv6 "packet too big" naming less names none
# an IPv6 header is 20 bytes longer than an IPv4 one: its SYNs' MSS clamp is that much lower
IPV6_MSS_LESS: Final = 20
SILENCE: Final = 10.0  # client: warn when we have sent to a server this long and heard nothing back
# ICMP errors about datagrams we sent (client: IP_RECVERR), by errno: counter, what it means
ICMP_ERRORS: Final[dict[int, tuple[str, str]]] = {
    errno.ECONNREFUSED: ("icmp_port_unreachable", "port unreachable"),
    errno.EMSGSIZE: ("icmp_frag_needed", "fragmentation needed"),
}
AUTH_FAILURE_HINTS: Final[dict[str, str]] = {
    "bad_proof": ": it holds another pre-shared key (--psk-file)",
    "bad_cookie": ": a forged or replayed handshake, or its address changed midway",
    "stale_cookie": ": its answer came too late (a slow path, or a replay)",
    "admission_refused": ": it knows the key, but new peers are refused (see the warnings above)",
}


class Counters(Counter[str]):
    """Named event counts: ``tx_packets``, ``rx_drop_too_short``, ..."""

    def snapshot(self) -> dict[str, int]:
        return dict(sorted((k, v) for k, v in self.items() if v))


class Warnings:
    """The one rate limit of operator warnings: at most one per (kind, peer)
    every *interval* seconds, and per kind at most *burst* per interval over
    all peers together, so that many (spoofed) sources cannot flood the log.
    Memory is bounded: past *size* remembered (kind, peer) pairs the old ones
    are forgotten."""

    def __init__(self, interval: float = WARN_INTERVAL, burst: int = WARN_BURST,
                 size: int = 4096):
        self.interval, self.burst, self.size = interval, burst, size
        # (kind, peer) -> time of its last warning; the peer is whatever the warning is
        # about (a (host, port), a tcp-in-udp flow's address) or None
        self.last: dict[tuple[str, Hashable], float] = {}
        self.kinds: dict[str, auth.TokenBucket] = {}

    def allow(self, kind: str, peer: Hashable, now: float) -> bool:
        key = (kind, peer)
        last = self.last.get(key)
        if last is not None and now - last < self.interval:
            return False
        bucket = self.kinds.get(kind)
        if bucket is None:
            bucket = self.kinds[kind] = auth.TokenBucket(self.burst / self.interval, self.burst)
        if not bucket.take(now):
            return False
        if len(self.last) >= self.size:
            self.last = {k: t for k, t in self.last.items() if now - t < self.interval}
            if len(self.last) >= self.size:
                self.last.clear()
        self.last[key] = now
        return True


def pton(host: str) -> bytes:
    """The 4 (IPv4) or 16 (IPv6) bytes of a host address (a link-local one's
    scope, ``%interface``, left out)."""
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host.partition("%")[0])
    return socket.inet_aton(host)


def ntop(address: bytes) -> str:
    """The text form of 4 (IPv4) or 16 (IPv6) bytes of address."""
    return socket.inet_ntop(socket.AF_INET6 if len(address) == 16 else socket.AF_INET, address)


class ServerState:
    """Client: what we know of one server (host, port)."""

    __slots__ = ("src", "last_sent", "last_heard", "silent_since", "silence_warned",
                 "answerable")

    def __init__(self, host: str):
        self.src = pton(host)  # what its segments get as source (4 or 16 bytes)
        self.last_sent: float | None = None  # anything: data, keepalive, handshake
        self.last_heard: float | None = None  # any datagram from it
        self.silent_since: float | None = None  # a send after which nothing came back
        self.silence_warned: float | None = None
        # the last send as the previous tick saw it: a send that has had a tick's
        # time (about a second) to be answered
        self.answerable: float | None = None


class Accounting:
    """The counters and rate-limited warnings of both routers (Router, and
    tiumode.TiuRouter of the TCP-in-UDP wire): one class both inherit, so that
    either build (pure or compiled) runs one body."""

    counters: Counters
    warnings: Warnings

    def warn(self, kind: str, peer: Hashable, now: float, message: str, *args: object) -> bool:
        """Log a WARNING about *peer* (None: about no peer in particular) unless
        one of this kind about it was logged lately (see Warnings)."""
        if not self.warnings.allow(kind, peer, now):
            return False
        log.warning(message, *args)
        return True

    def count_rarely_logged(self, name: str, message: str, *args: object, now: float,
                            peer: Hashable = None, amount: int = 1) -> None:
        """Count an event and warn about it, rate-limited per counter and peer."""
        count = self.counters[name] = self.counters[name] + amount
        self.warn(name, peer, now, message + " (%d so far)", *args, count)

    def send_failed(self, dest: Peer, err: int, size: int, now: float) -> str:
        """The kernel refused a datagram of *size* bytes to *dest*: the counter
        suffix it is dropped under (tx_drop_...)."""
        if err in (errno.EAGAIN, errno.ENOBUFS):
            self.counters["tx_drop_send_buffer_full"] += 1
            return "send_buffer_full"
        if err == errno.EMSGSIZE:
            self.count_rarely_logged(
                "tx_drop_" + TX_MESSAGE_TOO_LONG, "a datagram of %d bytes to %s:%d is larger than "
                "the path MTU (EMSGSIZE): dropped; the tun MTU (--mtu) must not exceed the path "
                "MTU minus 8", size, *dest, now=now, peer=dest)
            return TX_MESSAGE_TOO_LONG
        if err == errno.ENODEV:  # logged once by the loop when the link went away
            self.counters["tx_drop_" + TX_NO_INTERFACE] += 1
            return TX_NO_INTERFACE
        self.counters["tx_drop_send_error"] += 1
        return "send_error"

    def sent_data(self, entry: Entry | Flow | None, packets: int, nbytes: int) -> None:
        """Data went out (to the peer of *entry*, server; a flow of TiuRouter)."""
        counters = self.counters
        counters["tx_packets"] += packets
        counters["tx_bytes"] += nbytes
        if entry is not None:
            entry.tx_packets += packets
            entry.tx_bytes += nbytes

    def received(self, entry: Entry | Flow | None, packets: int, nbytes: int) -> None:
        """Data from the peer of *entry* (server; a flow of TiuRouter) went into the tun."""
        counters = self.counters
        counters["rx_packets"] += packets
        counters["rx_bytes"] += nbytes
        if entry is not None:
            entry.rx_packets += packets
            entry.rx_bytes += nbytes


class Router(Accounting):
    """Client mode when *endpoint_port* is set, server mode otherwise.

    Dual-stack: the inner family follows the datagram's.  A peer whose host is
    IPv6 exchanges IPv6 TCP: the server gives it an address of the IPv6 pool
    (*pool6_cidr*, else the tun's IPv6 subnet), kept in the one ``store``
    with the IPv4 peers; a client sends an IPv6 packet to its destination's
    IPv6 address.  The tun's addresses: set_tun_address (IPv4),
    set_tun_address6 (IPv6)."""

    def __init__(self, endpoint_port: int | None = None, pool_cidr: str | None = None,
                 timeout: float = 300.0, max_peers: int = 65536, pool_key: bytes = b"",
                 mss: int | None = None, keys: auth.Keys | None = None,
                 admission_rate: float = 100.0, keepalive: float | None = None,
                 pool6_cidr: str | None = None):
        self.endpoint_port = endpoint_port
        self.client = endpoint_port is not None  # client mode (else server mode)
        self.mss = mss  # clamp the MSS of SYNs crossing the tunnel to this (None: off)
        self.remotes: dict[Peer, float] = {}  # client: (host, port) -> last TX time, keepalives
        self.servers: dict[Peer, ServerState] = {}  # client: (host, port) -> its state
        self.pool_cidr = pool_cidr
        self.pool_key = pool_key
        self.timeout = timeout
        self.max_peers = max_peers
        self.counters = Counters()
        self.tun_address: bytes | None = None
        self.store: PeerStore | None = None
        self.pool6_cidr = pool6_cidr
        self.tun_address6: bytes | None = None  # the tun's own IPv6 address, 16 bytes
        # server: the pools of the store, by family (True: IPv6)
        self.pools: dict[bool, AddressPool | None] = {False: None, True: None}
        self._aton: dict[str, bytes] = {}
        # client: IP destination (4 or 16 bytes) -> (UDP dest, None)
        self.routes: dict[bytes, tuple[Peer, None]] = {}
        self.ident = 0
        # datagrams to send, [(dest, [(buffer, segment size), ...] or None)]: control
        # replies, data released after authentication, keepalives (None: an empty
        # datagram); the I/O loop empties it
        self.outbox: list[tuple[Peer, Batches | None]] = []
        self.keepalive = keepalive  # client: seconds between keepalives (None: none)
        self.next_keepalive: float | None = None
        self.admission = auth.TokenBucket(admission_rate, max(1.0, admission_rate))
        self.client_auth = auth.ClientAuth(keys) if keys and self.client else None
        self.holds = self.client_auth is not None  # data may have to wait for authentication
        self.server_auth = auth.ServerAuth(keys) if keys and not self.client else None
        self.warnings = Warnings()

    # -- configuration -------------------------------------------------
    def set_tun_address(self, address: bytes | None,
                        network: ipaddress.IPv4Network | None) -> None:
        """The tun's own IPv4 address changed (or became known).  In server mode
        the store is rebuilt with the new IPv4 pool; peers whose address is
        still valid keep it.  PoolError: IPv4 peers are refused from now on
        (IPv6 ones are still admitted)."""
        self.tun_address = address
        if self.client:
            return
        cidr = self.pool_cidr or (network if address else None)
        self._set_pool(False, cidr, address)

    def set_tun_address6(self, address: bytes | None,
                         network: ipaddress.IPv6Network | None) -> None:
        """The tun's own (global) IPv6 address changed, or became known (None,
        None: it has none).  Server: as set_tun_address, for the IPv6 pool
        (*pool6_cidr*, else the tun's IPv6 subnet) that peers over IPv6 get
        their addresses from."""
        self.tun_address6 = address
        if self.client:
            return
        cidr = self.pool6_cidr or (network if address else None)
        self._set_pool(True, cidr, address)

    def _set_pool(self, ipv6: bool,
                  cidr: str | ipaddress.IPv4Network | ipaddress.IPv6Network | None,
                  address: bytes | None) -> None:
        """Server: the pool of one family is now that of *cidr* (None: none),
        the tun's *address* reserved in it; the store (one for both families:
        max_peers counts them together) is rebuilt, live peers whose address
        is still in their family's pool keep it."""
        self.pools[ipv6] = None
        try:
            if cidr is not None:
                self.pools[ipv6] = AddressPool(cidr, reserved=[address] if address else [],
                                               key=self.pool_key, ipv6=ipv6)
        finally:
            self._rebuild_store()

    def _rebuild_store(self) -> None:
        pool4, pool6 = self.pools[False], self.pools[True]
        old = self.store
        if pool4 is not None:
            store = PeerStore(pool4, self.timeout, self.max_peers, self.counters, pool6=pool6)
        elif pool6 is not None:
            store = PeerStore(pool6, self.timeout, self.max_peers, self.counters)
        else:
            self.store = None
            return
        self.store = store
        if old is None:
            return
        for entry in old.entries():
            pool = pool6 if len(entry.address) == 16 else pool4
            if pool is not None and entry.address in pool:
                store.adopt(entry)
            else:
                log.warning("peer %s:%d lost address %s: no longer in the pool",
                            *entry.peer, ntop(entry.address))

    # -- TX: tun -> UDP -----------------------------------------------------
    def tx(self, pkt: WriteBuffer, now: float) -> tuple[Peer, Entry | None] | None:
        """A packet read from the tun: (UDP destination, store entry to count on
        or None), or None if it is dropped (counted).  A TCP SYN's MSS is clamped
        here.  Then the loop gives its wire segments to held() (if ``holds``),
        sends them, and reports with sent_data()."""
        reason = classify_tx(pkt, True)
        if reason is not None:
            self.counters["tx_drop_" + reason] += 1
            return None
        # the header offsets of either family inline (pk.header_len and its kin
        # say the same): this runs for every packet
        if pkt[0] >> 4 == 4:
            route = self.tx_destination(bytes(pkt[16:20]), now)
            hlen = 20
        else:
            route = self.tx_destination(bytes(pkt[24:40]), now)
            hlen = 40
        if route is not None and self.mss and pkt[hlen + 13] & SYN:
            self.clamp(pkt[hlen:pk.packet_length(pkt)], "tx", hlen == 40)
        return route

    def clamp(self, segment: WriteBuffer, direction: str, ipv6: bool = False) -> None:
        """Clamp the MSS of a SYN (the callers check ``mss`` is set first): to
        ``mss`` over IPv4, 20 less over IPv6 (its header is 20 bytes longer)."""
        mss = self.mss
        if mss is not None and pk.clamp_mss(segment, mss - IPV6_MSS_LESS if ipv6 else mss):
            self.counters[direction + "_mss_clamped"] += 1

    def held(self, dest: Peer, batches: Batches, now: float) -> bool:
        """Client with a key: True if *dest* has not authenticated us yet (the
        segments are held, and a HELLO goes out)."""
        # called only when ``holds``, i.e. client_auth is set (no check per packet here)
        if dest in self.client_auth.ready:  # type: ignore[union-attr]
            return False
        self.hold(dest, batches, now)
        return True

    def tx_destination(self, dst: bytes, now: float) -> tuple[Peer, Entry | None] | None:
        """(UDP (host, port), store entry or None) for a packet to *dst* (4
        bytes: IPv4, 16: IPv6), or None (counted)."""
        if self.client:
            route = self.routes.get(dst)
            if route is None:
                route = self._new_route(dst)
            self.remotes[route[0]] = now
            return route
        store = self.store
        entry = store.lookup_address(dst, now) if store is not None else None
        if entry is None:
            self.counters["tx_drop_" + TX_UNKNOWN_PEER] += 1
            return None
        return entry.peer, entry

    def _new_route(self, dst: bytes) -> tuple[Peer, None]:
        if len(self.routes) > 4096:  # bounded: a scan through the tun must not grow memory
            self.routes.clear()
        if len(self.remotes) > 4096:  # so are the servers TCP went to: the latest used stay
            recent = sorted(self.remotes.items(), key=lambda item: item[1])[-2048:]
            self.remotes = dict(recent)
            self.servers = {d: s for d, s in self.servers.items() if d in self.remotes}
        port = self.endpoint_port
        assert port is not None  # client mode: endpoint_port is set (see client)
        route = self.routes[bytes(dst)] = ((ntop(dst), port), None)
        if route[0] not in self.servers:
            self.servers[route[0]] = ServerState(route[0][0])
        return route

    # -- RX: UDP -> tun -----------------------------------------------------
    def rx_segment(self, seg: WriteBuffer, peer: Peer, now: float) -> bool:
        """A datagram from *peer*: True if it is a TCP segment for the tun (a
        SYN's MSS clamped), else it was handled here: a keepalive (answered
        through the outbox), a control message, or junk (counted)."""
        reason = classify_rx(seg)
        if reason is None:
            if seg[13] & SYN and self.mss:
                self.clamp(seg, "rx", ":" in peer[0])
            return True
        self._not_data(seg, reason, peer, now)
        return False

    def rx_segments(self, segs: Iterable[WriteBuffer], peer: Peer,
                    now: float) -> list[WriteBuffer]:
        """rx_segment for the datagrams of one receive (several: a GRO buffer):
        the TCP segments among them, in order (one call per receive, not per
        segment: rx_segment's body inline)."""
        good = []
        for seg in segs:
            reason = classify_rx(seg)
            if reason is None:
                if seg[13] & SYN and self.mss:
                    self.clamp(seg, "rx", ":" in peer[0])
                good.append(seg)
            else:
                self._not_data(seg, reason, peer, now)
        return good

    def _not_data(self, seg: WriteBuffer, reason: str, peer: Peer, now: float) -> None:
        """A datagram that is no TCP segment: a keepalive (answered through the
        outbox), a control message, or junk (counted under *reason*)."""
        if not seg:
            if self.keepalive_received(peer, now):
                self.outbox.append((peer, None))
        elif auth.is_control(seg):
            self.control(seg, peer, now)
        else:
            self.counters["rx_drop_" + reason] += 1

    def rx_addresses(self, peer: Peer, now: float,
                     count: int = 1) -> tuple[bytes, bytes, Entry | None] | None:
        """(source, destination, entry) for *count* segments from UDP *peer*, or
        None (then counted as *count* drops).

        entry is the server's store entry (None in client mode).  Addresses
        are of the peer's family: 16 bytes for a peer over IPv6."""
        ipv6 = ":" in peer[0]
        dst = self.tun_address6 if ipv6 else self.tun_address
        if self.client:
            src: bytes | None
            server = self.servers.get(peer)
            if server is not None:
                server.last_heard = now
                src = server.src
            else:  # not a server we use
                src = self._aton.get(peer[0])
                if src is None:
                    if len(self._aton) > 4096:
                        self._aton.clear()
                    src = self._aton[peer[0]] = pton(peer[0])
            if dst is None:
                self._no_tun_address(peer, now, count)
                return None
            if self.client_auth is not None and peer not in self.client_auth.ready:
                self.counters["rx_drop_unauthenticated"] += count
                return None
            return src, dst, None
        if dst is None:
            self._no_tun_address(peer, now, count)
            return None
        store = self.store
        if store is None:
            self.counters["rx_drop_no_pool"] += count
            return None
        entry = store.lookup_peer(peer, now)
        if entry is None:
            if self.server_auth is not None:
                self.counters["rx_drop_unauthenticated"] += count
                self._ask_to_authenticate(peer, now)
                return None
            if not self.admission.take(now):
                self.count_rarely_logged("rx_drop_admission_rate", "refusing new peer %s:%d: "
                                         "more new peers than --admission-rate allows", *peer,
                                         now=now, peer=peer, amount=count)
                return None
            entry = self._admit(store, peer, now, count)
            if entry is None:
                return None
        return entry.address, dst, entry

    def _no_tun_address(self, peer: Peer, now: float, count: int = 1) -> None:
        family = "IPv6" if ":" in peer[0] else "IPv4"
        self.count_rarely_logged(
            "rx_drop_" + RX_NO_TUN_ADDRESS, "dropping datagrams from %s:%d: the tun has no %s "
            "address (give it one: --tun-address, or ip addr add ADDRESS dev TUN)", *peer,
            family, now=now, peer=peer, amount=count)

    def _admit(self, store: PeerStore, peer: Peer, now: float, count: int = 1) -> Entry | None:
        entry = store.admit(peer, now, ":" in peer[0])
        if isinstance(entry, str):
            self.count_rarely_logged("rx_drop_" + entry, "refusing new peer %s:%d: %s",
                                     *peer, entry.replace("_", " "), now=now, peer=peer,
                                     amount=count)
            return None
        log.info("new peer %s:%d -> %s", *peer, ntop(entry.address))
        return entry

    def _ask_to_authenticate(self, peer: Peer, now: float) -> None:
        """Only for TCP segments (at least 20 bytes): never more than was received."""
        server_auth = self.server_auth
        assert server_auth is not None  # the caller checked: a server with a key
        self._send_control(peer, server_auth.auth_required(peer, now), now)

    def _send_control(self, dest: Peer, message: bytes | None, now: float) -> None:
        if message is not None:
            self.outbox.append((dest, [(message, len(message))]))
            if self.client:
                self.sent(dest, now)

    # -- authentication --------------------------------------------------------
    def control(self, datagram: ReadBuffer, peer: Peer, now: float) -> None:
        """A datagram that is no TCP segment and looks like a control message."""
        msg = auth.parse(datagram)
        server = self.servers.get(peer) if self.client else None
        if server is not None:
            server.last_heard = now
        if msg is None or not (self.server_auth or self.client_auth):
            self.counters["rx_drop_bad_control"] += 1
            if msg is not None:
                self._control_without_key(msg[0], peer, server, now)
            return
        kind, body = msg
        if self.server_auth is not None:
            ipv6 = ":" in peer[0]
            if (self.tun_address6 if ipv6 else self.tun_address) is None:
                self._no_tun_address(peer, now)  # nobody can be admitted: say why
                return
            reply, outcome = self.server_auth.on_control(kind, body, peer, now)
            store = self.store
            if outcome == "accepted" and (store is None or (store.lookup_peer(peer, now) is None
                                                            and self._admit(store, peer, now)
                                                            is None)):
                reply, outcome = None, "admission_refused"
        else:
            client_auth = self.client_auth
            assert client_auth is not None  # one of the two is set (checked above)
            reply, released, outcome = client_auth.on_control(kind, body, peer, now)
            if outcome == "authenticated":
                log.info("authenticated to %s:%d", *peer)
            self.outbox.extend((peer, item) for item in released)
        if outcome in auth.SUCCESS:
            self.counters["auth_" + outcome] += 1
        else:
            self.count_rarely_logged("auth_fail_" + outcome, "authentication with %s:%d: %s%s",
                                     *peer, outcome.replace("_", " "),
                                     AUTH_FAILURE_HINTS.get(outcome, ""), now=now, peer=peer)
        self._send_control(peer, reply, now)

    def _control_without_key(self, kind: int, peer: Peer, server: ServerState | None,
                             now: float) -> None:
        """A well-formed control message, and we have no pre-shared key."""
        if not self.client and kind == auth.HELLO:
            self.warn("hello_without_key", peer, now, "peer %s:%d wants to authenticate (it has "
                      "--psk-file) but this server has no pre-shared key: it will send nothing "
                      "until it is authenticated (give both ends the same --psk-file)", *peer)
        elif server is not None and kind == auth.AUTH_REQUIRED:  # only from a server we use
            self.warn("key_required", peer, now, "server %s:%d requires a pre-shared key "
                      "(--psk-file): it drops everything we send", *peer)

    def hold(self, dest: Peer, batches: Batches, now: float) -> None:
        """Client: data for a server we have not authenticated to yet."""
        client_auth = self.client_auth
        assert client_auth is not None  # only held() calls it: holds, a client with a key
        hello, dropped = client_auth.hold(dest, [(bytes(b), n) for b, n in batches], now)
        if dropped:
            self.counters["tx_drop_auth_pending"] += 1
        self._send_control(dest, hello, now)

    def tick(self, now: float) -> None:
        """About once a second: handshake retries, client keepalives, warnings."""
        if self.keepalive is not None:
            self._keepalives(now)
        if self.client_auth is not None:
            for hello, dest in self.client_auth.retries(now):
                self._send_control(dest, hello, now)
        if self.client:
            self._watch_servers(now)

    # -- client: is anybody there? ---------------------------------------------
    def sent(self, dest: Peer, now: float) -> None:
        """Client: something other than data (keepalive, handshake) went to *dest*."""
        server = self.servers.get(dest)
        if server is None:
            if len(self.servers) > 4096:
                return
            server = self.servers[dest] = ServerState(dest[0])
        server.last_sent = now

    def auth_state(self, dest: Peer, now: float) -> str:
        """Client: 'no key', 'pending', 'authenticated' or 'failing'."""
        if self.client_auth is None:
            return "no key"
        return self.client_auth.state(dest, now)

    def _watch_servers(self, now: float) -> None:
        """Warn about servers that do not answer, or do not accept our key."""
        for dest, server in self.servers.items():
            data = self.remotes.get(dest)
            if data is not None and (server.last_sent is None or data > server.last_sent):
                server.last_sent = data
            sent, heard = server.last_sent, server.last_heard
            answerable, server.answerable = server.answerable, sent
            if server.silent_since is not None and heard is not None \
                    and heard >= server.silent_since:
                server.silent_since = None
                if server.silence_warned is not None:
                    server.silence_warned = None
                    log.info("server %s:%d answers again", *dest)
            if server.silent_since is None and sent is not None and (heard is None or sent > heard):
                server.silent_since = sent
            # Silence is sending for SILENCE seconds with nothing back: a lone last
            # segment (the final ACK of an exchange) draws no reply, and a send
            # after a pause has not had the time to be answered yet.
            # (sent is set once answerable is: last_sent is never unset)
            if server.silent_since is not None and answerable is not None and sent is not None \
                    and answerable - server.silent_since >= SILENCE and (
                    server.silence_warned is None or sent > server.silence_warned) \
                    and self._warn_silent(dest, server, server.silent_since, now):
                server.silence_warned = now
            if self.client_auth is not None:
                self._watch_authentication(dest, now)

    def _warn_silent(self, dest: Peer, server: ServerState, silent_since: float,
                     now: float) -> bool:
        quiet = now - silent_since
        session = self.client_auth.sessions.get(dest) if self.client_auth else None
        if session is not None and session.started is not None and not session.challenges:
            return self.warn(
                "silent", dest, now, "server %s:%d has not answered our authentication for "
                "%.0f s (%d HELLOs): is it running with --psk-file, is --endpoint-port %d its "
                "--listen-port, does a firewall drop the UDP?", *dest, quiet, session.hellos,
                dest[1])
        return self.warn(
            "silent", dest, now, "no reply from server %s:%d for %.0f s although we keep "
            "sending to it: is it running, is --endpoint-port %d its --listen-port, does a "
            "firewall drop the UDP, has its tun an address?", *dest, quiet, dest[1])

    def _watch_authentication(self, dest: Peer, now: float) -> None:
        client_auth = self.client_auth
        assert client_auth is not None  # the caller checked
        session = client_auth.sessions.get(dest)
        if session is None or session.started is None or not session.challenges \
                or now - session.started < auth.FAILING_AFTER:
            return
        self.warn("auth_failing", dest, now, "server %s:%d does not accept our pre-shared key: "
                  "%d challenges answered in %.0f s, no welcome (does it hold the same "
                  "--psk-file? or it refuses new peers: see its log)", *dest, session.challenges,
                  now - session.started)

    def icmp_error(self, dest: Peer, err: int, info: int, offender: str | None,
                   now: float) -> None:
        """The kernel reports an ICMP error about a datagram we sent to *dest*
        (client: IP_RECVERR).  *info* is the next-hop MTU for EMSGSIZE."""
        counter, what = ICMP_ERRORS.get(err) or ("icmp_unreachable", os.strerror(err).lower())
        self.counters[counter] += 1
        if dest not in self.servers:
            return
        via = f" (ICMP from {offender})" if offender and offender != dest[0] else ""
        if err == errno.ECONNREFUSED:
            self.warn("unreachable", dest, now, "server %s:%d: port unreachable%s: nothing "
                      "listens on UDP port %d there (is --endpoint-port right, is the server "
                      "running?)", *dest, via, dest[1])
        elif err == errno.EMSGSIZE and info < (MIN_IPV6_MTU if ":" in dest[0] else MIN_IPV4_MTU):
            self.warn("path_mtu", dest, now, "server %s: a \"fragmentation needed\"%s names no "
                      "usable MTU (%d: a broken router, or a forged message); the kernel lowers "
                      "the path MTU to its minimum for a while: larger datagrams are refused",
                      dest[0], via, info)
        elif err == errno.EMSGSIZE:
            self.warn("path_mtu", dest, now, "the path MTU to server %s is %d%s: datagrams "
                      "larger than that are refused; the tun MTU should be at most %d (--mtu)",
                      dest[0], info, via, info - 8)
        else:
            self.warn("unreachable", dest, now, "server %s:%d is unreachable: %s%s", *dest,
                      what, via)

    def keepalive_received(self, peer: Peer, now: float) -> bool:
        """An empty datagram.  Server: refresh the peer's entry (never creates
        one); True if the peer is known: answer with an empty datagram, so that a
        client whose only traffic is keepalives hears that we are there.  At most
        one answer per peer per KEEPALIVE_ANSWER_INTERVAL: two servers that know
        each other as peers (spoofed TCP segments can make them) would otherwise
        answer each other's answers for ever, as fast as they can.
        Client: the server's answer (never answered: no ping-pong)."""
        self.counters["rx_keepalives"] += 1
        if self.client:
            server = self.servers.get(peer)
            if server is not None:
                server.last_heard = now
            return False
        if self.store is None:
            return False
        entry = self.store.lookup_peer(peer, now)
        if entry is None:
            # no AUTH_REQUIRED: 16 bytes for 0 would amplify (its next data segment,
            # at least 20 bytes, is answered)
            return False
        if entry.answered is not None and now - entry.answered < KEEPALIVE_ANSWER_INTERVAL:
            return False
        entry.answered = now
        return True

    def _keepalives(self, now: float) -> None:
        """Client: an empty datagram to each server TCP went to, every
        ``keepalive`` seconds (keeps a NAT mapping and the server's entry alive
        while TCP is idle; our server answers, the C original ignores it)."""
        interval = self.keepalive
        assert interval is not None  # tick() calls it only then
        if self.next_keepalive is None:
            self.next_keepalive = now + interval
        if now < self.next_keepalive:
            return
        self.next_keepalive = now + interval
        for dest in self.keepalive_targets(now):
            self.outbox.append((dest, None))
            self.sent(dest, now)

    def keepalive_targets(self, now: float, forget: float = KEEPALIVE_FORGET) -> list[Peer]:
        """Client: the servers TCP went to in the last *forget* seconds."""
        for dest, last in list(self.remotes.items()):
            if now - last > forget:
                del self.remotes[dest]
                self.servers.pop(dest, None)
        return list(self.remotes)

    def next_ident(self) -> int:
        self.ident = (self.ident + 1) & 0xFFFF
        return self.ident

