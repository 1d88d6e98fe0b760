"""Sans-IO tunnel logic: where a TX packet goes, which addresses an RX segment
gets, and the counters.  The I/O loop (device.py) calls into this; the unit
tests drive it directly with an injected clock."""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections import Counter

from .store import AddressPool, Entry, PeerStore, PoolError

log = logging.getLogger(__name__)

# drop reasons decided here (packet.py has the parsing ones)
TX_UNKNOWN_PEER = "unknown_peer"
TX_NO_TUN_ADDRESS = RX_NO_TUN_ADDRESS = "no_tun_address"
KEEPALIVE_FORGET = 86400.0  # stop keeping a server's mapping alive after a day without TCP


class Counters(Counter):
    """Named event counts: ``tx_packets``, ``rx_drop_too_short``, ..."""

    def snapshot(self) -> dict:
        return dict(sorted((k, v) for k, v in self.items() if v))


class Router:
    """Client mode when *endpoint_port* is set, server mode otherwise."""

    def __init__(self, endpoint_port: int | None = None, pool_cidr: str | None = None,
                 timeout: float = 300.0, max_peers: int = 65536, pool_key: bytes = b"",
                 mss: int | None = None):
        self.endpoint_port = endpoint_port
        self.mss = mss  # clamp the MSS of SYNs crossing the tunnel to this (None: off)
        self.remotes: dict = {}  # client: (host, port) -> last TX/RX time, for keepalives
        self.pool_cidr = pool_cidr
        self.pool_key = pool_key
        self.timeout = timeout
        self.max_peers = max_peers
        self.counters = Counters()
        self.tun_address: bytes | None = None
        self.store: PeerStore | None = None
        self._aton: dict[str, bytes] = {}
        self._ntoa: dict[bytes, str] = {}
        self.ident = 0

    @property
    def client(self) -> bool:
        return self.endpoint_port is not None

    def drop(self, direction: str, reason: str) -> None:
        self.counters[f"{direction}_drop_{reason}"] += 1

    # -- configuration -------------------------------------------------
    def set_tun_address(self, address: bytes | None, network: ipaddress.IPv4Network | None,
                        clock=None) -> None:
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
        self.store = PeerStore(pool, self.timeout, self.max_peers, **({"clock": clock} if clock else {}))
        if old is not None:
            for entry in old.entries():
                if entry.address in pool:
                    self.store.by_peer[entry.peer] = entry
                    self.store.by_address[entry.address] = entry
                else:
                    log.warning("peer %s:%d lost address %s: no longer in the pool",
                                *entry.peer, ipaddress.IPv4Address(entry.address))

    # -- TX: tun -> UDP -----------------------------------------------------
    def tx_destination(self, dst: bytes, now: float, nbytes: int):
        """UDP (host, port) for *nbytes* of TCP to IPv4 *dst* (4 bytes), or None (counted)."""
        if self.client:
            host = self._ntoa.get(dst)
            if host is None:
                host = self._cache_ntoa(dst)
            dest = (host, self.endpoint_port)
            self.remotes[dest] = now
            return dest
        store = self.store
        entry = store.lookup_address(dst, now) if store is not None else None
        if entry is None:
            self.counters["tx_drop_" + TX_UNKNOWN_PEER] += 1
            return None
        entry.tx_packets += 1
        entry.tx_bytes += nbytes
        return entry.peer

    def _cache_ntoa(self, dst: bytes) -> str:
        if len(self._ntoa) > 4096:  # bounded: a scan through the tun must not grow memory
            self._ntoa.clear()
            self.remotes.clear()
        host = self._ntoa[bytes(dst)] = socket.inet_ntoa(dst)
        return host

    # -- RX: UDP -> tun -----------------------------------------------------
    def rx_addresses(self, peer, now: float):
        """(source, destination, entry) for a segment from UDP *peer*, or None (counted).

        entry is the server's store entry (None in client mode)."""
        dst = self.tun_address
        if dst is None:
            self.counters["rx_drop_" + RX_NO_TUN_ADDRESS] += 1
            return None
        if self.client:
            src = self._aton.get(peer[0])
            if src is None:
                if len(self._aton) > 4096:
                    self._aton.clear()
                src = self._aton[peer[0]] = socket.inet_aton(peer[0])
            return src, dst, None
        store = self.store
        entry = store.lookup_peer(peer, now)
        if entry is None:
            entry = store.admit(peer, now)
            if isinstance(entry, str):
                count = self.counters["rx_drop_" + entry] = self.counters["rx_drop_" + entry] + 1
                if count & (count - 1) == 0:  # log the 1st, 2nd, 4th, 8th, ... time
                    log.warning("refusing new peer %s:%d: %s (%d so far)", *peer,
                                entry.replace("_", " "), count)
                return None
            self.counters["peers_added"] += 1
            log.info("new peer %s:%d -> %s", *peer, ipaddress.IPv4Address(entry.address))
        return entry.address, dst, entry

    def keepalive_received(self, peer, now: float) -> None:
        """An empty datagram: refresh the peer's entry (never creates one)."""
        self.counters["rx_keepalives"] += 1
        if self.store is not None:
            self.store.lookup_peer(peer, now)

    def keepalive_targets(self, now: float, forget: float = KEEPALIVE_FORGET):
        """Client: the servers TCP went to in the last *forget* seconds."""
        for dest, last in list(self.remotes.items()):
            if now - last > forget:
                del self.remotes[dest]
        return list(self.remotes)

    def next_ident(self) -> int:
        self.ident = (self.ident + 1) & 0xFFFF
        return self.ident


__all__ = ["Router", "Counters", "Entry", "PoolError"]
