"""Sans-IO tunnel logic: where a TX packet goes, which addresses an RX segment
gets, and the counters.  The I/O loop (device.py) calls into this; the unit
tests drive it directly with an injected clock."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
from collections import Counter

from . import auth
from .store import AddressPool, Entry, PeerStore

log = logging.getLogger(__name__)

# drop reasons decided here (packet.py has the parsing ones)
TX_UNKNOWN_PEER = "unknown_peer"
RX_NO_TUN_ADDRESS = "no_tun_address"
KEEPALIVE_FORGET = 86400.0  # stop keeping a server's mapping alive after a day without TCP
TX_MESSAGE_TOO_LONG = "message_too_long"  # the kernel refused a datagram with EMSGSIZE
TX_NO_INTERFACE = "no_interface"  # the bound interface is gone (ENODEV)
WARN_INTERVAL = 60.0  # seconds: at most one warning per kind and peer this often
WARN_BURST = 10  # warnings of one kind, all peers together, per WARN_INTERVAL at most


class Counters(Counter):
    """Named event counts: ``tx_packets``, ``rx_drop_too_short``, ..."""

    def snapshot(self) -> dict:
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
        self.last: dict = {}  # (kind, peer) -> time of its last warning
        self.kinds: dict[str, auth.TokenBucket] = {}

    def allow(self, kind: str, peer, now: float) -> bool:
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


class Router:
    """Client mode when *endpoint_port* is set, server mode otherwise."""

    def __init__(self, endpoint_port: int | None = None, pool_cidr: str | None = None,
                 timeout: float = 300.0, max_peers: int = 65536, pool_key: bytes = b"",
                 mss: int | None = None, keys: auth.Keys | None = None,
                 admission_rate: float = 100.0):
        self.endpoint_port = endpoint_port
        self.client = endpoint_port is not None  # client mode (else server mode)
        self.mss = mss  # clamp the MSS of SYNs crossing the tunnel to this (None: off)
        self.remotes: dict = {}  # client: (host, port) -> last TX time, for keepalives
        self.pool_cidr = pool_cidr
        self.pool_key = pool_key
        self.timeout = timeout
        self.max_peers = max_peers
        self.counters = Counters()
        self.tun_address: bytes | None = None
        self.store: PeerStore | None = None
        self._aton: dict[str, bytes] = {}
        self._routes: dict[bytes, tuple] = {}  # client: IPv4 destination -> (UDP dest, None)
        self.ident = 0
        # datagrams to send, [(dest, [(buffer, segment size), ...])]: control replies
        # and data released after authentication; the I/O loop empties it
        self.outbox: list = []
        self.admission = auth.TokenBucket(admission_rate, max(1.0, admission_rate))
        self.client_auth = auth.ClientAuth(keys) if keys and self.client else None
        self.server_auth = auth.ServerAuth(keys) if keys and not self.client else None
        self.warnings = Warnings()

    def warn(self, kind: str, peer, now: float, message: str, *args) -> bool:
        """Log a WARNING about *peer* (None: about no peer in particular) unless
        one of this kind about it was logged lately (see Warnings)."""
        if not self.warnings.allow(kind, peer, now):
            return False
        log.warning(message, *args)
        return True

    def count_rarely_logged(self, name: str, message: str, *args, now: float, peer=None,
                            amount: int = 1) -> None:
        """Count an event and warn about it, rate-limited per counter and peer."""
        count = self.counters[name] = self.counters[name] + amount
        self.warn(name, peer, now, message + " (%d so far)", *args, count)

    def send_failed(self, dest, err: int, size: int, now: float) -> str:
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

    # -- configuration -------------------------------------------------
    def set_tun_address(self, address: bytes | None,
                        network: ipaddress.IPv4Network | None) -> None:
        """The tun's own address changed (or became known).  In server mode the
        pool is rebuilt; peers whose address is still valid keep it."""
        self.tun_address = address
        if self.client:
            return
        cidr = self.pool_cidr or (network if address else None)
        if cidr is None:
            self.store = None
            return
        pool = AddressPool(cidr, reserved=[address] if address else [], key=self.pool_key)
        old = self.store
        self.store = PeerStore(pool, self.timeout, self.max_peers)
        if old is not None:
            for entry in old.entries():
                if entry.address in pool:
                    self.store.adopt(entry)
                else:
                    log.warning("peer %s:%d lost address %s: no longer in the pool",
                                *entry.peer, ipaddress.IPv4Address(entry.address))

    # -- TX: tun -> UDP -----------------------------------------------------
    def tx_destination(self, dst: bytes, now: float):
        """(UDP (host, port), store entry or None) for a packet to IPv4 *dst*
        (4 bytes), or None (counted)."""
        if self.client:
            route = self._routes.get(dst)
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

    def _new_route(self, dst: bytes):
        if len(self._routes) > 4096:  # bounded: a scan through the tun must not grow memory
            self._routes.clear()
            self.remotes.clear()
        route = self._routes[bytes(dst)] = ((socket.inet_ntoa(dst), self.endpoint_port), None)
        return route

    # -- RX: UDP -> tun -----------------------------------------------------
    def rx_addresses(self, peer, now: float, count: int = 1):
        """(source, destination, entry) for *count* segments from UDP *peer*, or
        None (then counted as *count* drops).

        entry is the server's store entry (None in client mode)."""
        dst = self.tun_address
        if dst is None:
            self.counters["rx_drop_" + RX_NO_TUN_ADDRESS] += count
            return None
        if self.client:
            src = self._aton.get(peer[0])
            if src is None:
                if len(self._aton) > 4096:
                    self._aton.clear()
                src = self._aton[peer[0]] = socket.inet_aton(peer[0])
            if self.client_auth is not None and peer not in self.client_auth.ready:
                self.counters["rx_drop_unauthenticated"] += count
                return None
            return src, dst, None
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
            entry = self._admit(peer, now, count)
            if entry is None:
                return None
        return entry.address, dst, entry

    def _admit(self, peer, now: float, count: int = 1) -> Entry | None:
        entry = self.store.admit(peer, now)
        if isinstance(entry, str):
            self.count_rarely_logged("rx_drop_" + entry, "refusing new peer %s:%d: %s",
                                     *peer, entry.replace("_", " "), now=now, peer=peer,
                                     amount=count)
            return None
        self.counters["peers_added"] += 1
        log.info("new peer %s:%d -> %s", *peer, ipaddress.IPv4Address(entry.address))
        return entry

    def _ask_to_authenticate(self, peer, now: float) -> None:
        self._send_control(peer, self.server_auth.auth_required(now))

    def _send_control(self, dest, message: bytes | None) -> None:
        if message is not None:
            self.outbox.append((dest, [(message, len(message))]))

    # -- authentication --------------------------------------------------------
    def control(self, datagram, peer, now: float) -> None:
        """A datagram that is no TCP segment and looks like a control message."""
        msg = auth.parse(datagram)
        if msg is None or not (self.server_auth or self.client_auth):
            self.counters["rx_drop_bad_control"] += 1
            return
        kind, body = msg
        if self.server_auth is not None:
            reply, outcome = self.server_auth.on_control(kind, body, peer, now)
            if outcome == "accepted" and (self.store is None or (
                    self.store.lookup_peer(peer, now) is None and self._admit(peer, now) is None)):
                reply, outcome = None, "admission_refused"
        else:
            reply, released, outcome = self.client_auth.on_control(kind, body, peer, now)
            if outcome == "authenticated":
                log.info("authenticated to %s:%d", *peer)
            self.outbox.extend((peer, item) for item in released)
        if outcome in auth.SUCCESS:
            self.counters["auth_" + outcome] += 1
        else:
            self.count_rarely_logged("auth_fail_" + outcome, "authentication with %s:%d: %s",
                                     *peer, outcome.replace("_", " "), now=now, peer=peer)
        self._send_control(peer, reply)

    def hold(self, dest, batches, now: float) -> None:
        """Client: data for a server we have not authenticated to yet."""
        hello, dropped = self.client_auth.hold(dest, [(bytes(b), n) for b, n in batches], now)
        if dropped:
            self.counters["tx_drop_auth_pending"] += 1
        self._send_control(dest, hello)

    def tick(self, now: float) -> None:
        if self.client_auth is not None:
            for hello, dest in self.client_auth.retries(now):
                self._send_control(dest, hello)

    def keepalive_received(self, peer, now: float) -> None:
        """An empty datagram: refresh the peer's entry (never creates one)."""
        self.counters["rx_keepalives"] += 1
        if self.store is not None and self.store.lookup_peer(peer, now) is None \
                and self.server_auth is not None:
            self._ask_to_authenticate(peer, now)

    def keepalive_targets(self, now: float, forget: float = KEEPALIVE_FORGET):
        """Client: the servers TCP went to in the last *forget* seconds."""
        for dest, last in list(self.remotes.items()):
            if now - last > forget:
                del self.remotes[dest]
        return list(self.remotes)

    def next_ident(self) -> int:
        self.ident = (self.ident + 1) & 0xFFFF
        return self.ident

