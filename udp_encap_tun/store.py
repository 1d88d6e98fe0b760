"""Server-mode peer store and address pool (pure: the clock is injected).

A peer is identified by its UDP (address, port) as the server sees it, because
peers are usually behind NAT.  Each peer gets a generated IPv4 address from the
pool.  The address is derived from the peer by a keyed hash into the pool, with
linear probing on collision, so the same peer gets the same address after its
entry expired or the server restarted, whenever that address is free.  Nothing
ever takes an address that a live peer holds.

Lookups are O(1) both ways: by peer on RX (``cachetools.TTLCache``) and by
generated address on TX (a dict kept in step with the cache's expiry).
"""

from __future__ import annotations

import hashlib
import ipaddress
import time
from dataclasses import dataclass, field
from typing import Callable

import cachetools

Peer = tuple[str, int]

# refresh an entry's expiry at most this often (seconds), to keep RX cheap
REFRESH_INTERVAL = 1.0


class PoolError(ValueError):
    """The address pool cannot be used (operator mistake)."""


class AddressPool:
    """The usable addresses of a CIDR, minus network, broadcast and reserved ones."""

    def __init__(self, cidr: str | ipaddress.IPv4Network, reserved=(), key: bytes = b""):
        try:
            net = ipaddress.IPv4Network(cidr, strict=False)
        except ValueError as exc:
            raise PoolError(f"address pool {cidr!r} is not an IPv4 CIDR: {exc}") from None
        self.network = net
        if net.prefixlen >= 31:
            self.first = int(net.network_address)
            self.size = net.num_addresses
        else:
            self.first = int(net.network_address) + 1
            self.size = net.num_addresses - 2
        self.reserved = {int(ipaddress.IPv4Address(a)) for a in reserved}
        self.capacity = self.size - sum(1 for r in self.reserved if self.first <= r < self.first + self.size)
        if self.capacity <= 0:
            raise PoolError(f"address pool {net} has no usable address")
        self.key = hashlib.blake2b(key or b"udp-encap-tun", digest_size=32).digest()

    def preferred_index(self, peer: Peer) -> int:
        host, port = peer
        digest = hashlib.blake2b(f"{host}|{port}".encode(), key=self.key, digest_size=8).digest()
        return int.from_bytes(digest, "big") % self.size

    def candidates(self, peer: Peer):
        """Addresses (as 4-byte values) in probing order: the peer's own first."""
        start = self.preferred_index(peer)
        for i in range(self.size):
            addr = self.first + (start + i) % self.size
            if addr not in self.reserved:
                yield addr.to_bytes(4, "big")

    def __contains__(self, addr: bytes) -> bool:
        value = int.from_bytes(addr, "big")
        return self.first <= value < self.first + self.size and value not in self.reserved


@dataclass(slots=True)
class Entry:
    peer: Peer
    address: bytes  # generated IPv4 address, 4 bytes
    refreshed: float
    created: float
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0


class _PeerCache(cachetools.TTLCache):
    """TTLCache that tells its owner which entries it expired."""

    def __init__(self, maxsize, ttl, timer, on_expire):
        super().__init__(maxsize, ttl, timer=timer)
        self._on_expire = on_expire

    def expire(self, time=None):
        expired = super().expire(time)
        for _key, entry in expired:
            self._on_expire(entry)
        return expired

    def popitem(self):  # never evict a live peer to make room
        raise KeyError("peer store is full")


# reasons a new peer is refused
FULL_POOL = "pool_full"
FULL_STORE = "peers_full"


@dataclass
class PeerStore:
    pool: AddressPool
    timeout: float = 300.0
    max_peers: int = 65536
    clock: Callable[[], float] = time.monotonic
    by_address: dict = field(default_factory=dict)
    added: int = 0
    expired: int = 0

    def __post_init__(self):
        self.by_peer = _PeerCache(self.max_peers, self.timeout, self.clock, self._forget)
        self.live: dict = {}  # peer -> Entry, the cache's content without its bookkeeping
        self.refresh = min(REFRESH_INTERVAL, self.timeout / 4)

    def _forget(self, entry: Entry) -> None:
        if self.by_address.get(entry.address) is entry:
            del self.by_address[entry.address]
        if self.live.get(entry.peer) is entry:
            del self.live[entry.peer]
        self.expired += 1

    def lookup_peer(self, peer: Peer, now: float) -> Entry | None:
        """RX: the live entry for *peer*, refreshed (the peer was just heard from)."""
        entry = self.live.get(peer)
        if entry is None or now - entry.refreshed < self.refresh:
            return entry  # the common case: one dict lookup
        if now - entry.refreshed >= self.timeout:
            self.by_peer.expire(now)
            return None
        entry.refreshed = now
        self.by_peer[peer] = entry
        return entry

    def admit(self, peer: Peer, now: float) -> Entry | str:
        """RX from an unknown peer: a new entry, or the reason it was refused."""
        self.by_peer.expire(now)
        if len(self.by_peer) >= self.max_peers:
            return FULL_STORE
        if len(self.by_address) >= self.pool.capacity:
            return FULL_POOL
        for address in self.pool.candidates(peer):
            if address not in self.by_address:
                break
        else:  # pragma: no cover - excluded by the capacity check above
            return FULL_POOL
        entry = Entry(peer, address, now, now)
        self.adopt(entry)
        self.added += 1
        return entry

    def adopt(self, entry: Entry) -> None:
        self.by_peer[entry.peer] = entry
        self.by_address[entry.address] = entry
        self.live[entry.peer] = entry

    def lookup_address(self, address: bytes, now: float) -> Entry | None:
        """TX: the live entry that holds generated *address*, if any."""
        entry = self.by_address.get(address)
        if entry is None:
            return None
        if now - entry.refreshed >= self.timeout:
            self.by_peer.expire(now)
            return None
        return entry

    def expire(self, now: float) -> None:
        self.by_peer.expire(now)

    def clear(self) -> None:
        self.by_peer.clear()
        self.by_address.clear()
        self.live.clear()

    def __len__(self) -> int:
        return len(self.by_address)

    def entries(self):
        return list(self.by_address.values())
