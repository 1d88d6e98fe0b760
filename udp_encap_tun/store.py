"""Server-mode peer store and address pool (pure: the clock is injected).

A peer is identified by its UDP (address, port) as the server sees it, because
peers are usually behind NAT.  Each peer gets a generated address from the
pool of its family: a peer heard over IPv4 an IPv4 address, one heard over IPv6
an IPv6 address (the inner family follows the datagram's), when the store has
an IPv6 pool (``PeerStore(pool, ..., pool6=AddressPool(cidr6, ipv6=True))``).
One store holds both families' peers: max_peers counts them together, each
pool is filled on its own, and lookup_address takes a 4- or 16-byte address.
The address is derived from the peer by a keyed hash into the pool, with
linear probing on collision, so the same peer gets the same address after its
entry expired or the server restarted, whenever that address is free.  Nothing
ever takes an address that a live peer holds.

Lookups are O(1) both ways: by peer on RX (an OrderedDict in the order of last
refresh, which also gives the expiry order) and by generated address on TX (a
dict kept in step).  There is one clock, the caller's: every method takes *now*.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections import Counter, OrderedDict
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from typing import Final

Peer = tuple[str, int]

# refresh an entry's expiry at most this often (seconds), to keep RX cheap
REFRESH_INTERVAL: Final = 1.0


class PoolError(ValueError):
    """The address pool cannot be used (operator mistake)."""


class AddressPool:
    """The usable addresses of a CIDR, minus network, broadcast and reserved ones.

    With *ipv6* the CIDR is an IPv6 prefix (up to /126): every address but the
    prefix's first (the subnet-router anycast address) and the reserved ones;
    addresses are 16 bytes instead of 4 (``address_len``).  The same keyed hash
    picks a peer's address, over 128 bits instead of 64 bits of digest."""

    def __init__(self, cidr: str | ipaddress.IPv4Network | ipaddress.IPv6Network,
                 reserved: Iterable[str | int | bytes | ipaddress.IPv4Address
                                    | ipaddress.IPv6Address] = (),
                 key: bytes = b"", ipv6: bool = False) -> None:
        family = "IPv6" if ipv6 else "IPv4"
        net: ipaddress.IPv4Network | ipaddress.IPv6Network
        try:
            if ipv6:
                net = ipaddress.IPv6Network(cidr, strict=False)
            else:
                net = ipaddress.IPv4Network(cidr, strict=False)
        except ValueError as exc:
            raise PoolError(f"address pool {cidr!r} is not an {family} CIDR: {exc}") from None
        self.network = net
        self.ipv6 = ipv6
        self.address_len = 16 if ipv6 else 4
        if ipv6:
            if net.prefixlen > 126:
                raise PoolError(f"address pool {net} has no room for peers (the longest IPv6 "
                                "prefix is /126)")
            self.first = int(net.network_address) + 1
            self.size = net.num_addresses - 1
        elif net.prefixlen >= 31:
            self.first = int(net.network_address)
            self.size = net.num_addresses
        else:
            self.first = int(net.network_address) + 1
            self.size = net.num_addresses - 2
        self._digest_size = 16 if ipv6 else 8
        as_address = ipaddress.IPv6Address if ipv6 else ipaddress.IPv4Address
        self.reserved = {int(as_address(a)) for a in reserved}
        self.capacity = self.size - sum(1 for r in self.reserved
                                        if self.first <= r < self.first + self.size)
        if self.capacity <= 0:
            raise PoolError(f"address pool {net} has no usable address")
        self.key = hashlib.blake2b(key or b"udp-encap-tun", digest_size=32).digest()

    def preferred_index(self, peer: Peer) -> int:
        host, port = peer
        digest = hashlib.blake2b(f"{host}|{port}".encode(), key=self.key,
                                 digest_size=self._digest_size).digest()
        return int.from_bytes(digest, "big") % self.size

    def candidates(self, peer: Peer) -> Iterator[bytes]:
        """Addresses (as 4- or 16-byte values) in probing order: the peer's own
        first, then the next ones, wrapping.  Lazy: a store takes the first
        one no live peer holds, so it probes at most (live peers + reserved
        addresses + 1) of them, however large the pool (an IPv6 /64)."""
        start = self.preferred_index(peer)
        width = self.address_len
        for i in range(self.size):
            addr = self.first + (start + i) % self.size
            if addr not in self.reserved:
                yield addr.to_bytes(width, "big")

    def __contains__(self, addr: bytes) -> bool:
        if len(addr) != self.address_len:
            return False
        value = int.from_bytes(addr, "big")
        return self.first <= value < self.first + self.size and value not in self.reserved


@dataclass(slots=True)
class Entry:
    peer: Peer
    address: bytes  # generated address: 4 bytes (IPv4) or 16 (IPv6)
    refreshed: float
    created: float
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    answered: float | None = None  # when the server last answered its keepalive


# reasons a new peer is refused
FULL_POOL: Final = "pool_full"
FULL_STORE: Final = "peers_full"
NO_POOL: Final = "no_pool"  # a peer of a family the store has no pool for


def peer_is_ipv6(peer: Peer) -> bool:
    """True if *peer* was heard over IPv6: an IPv6 host that is not an
    IPv4-mapped address (which a dual-stack socket reports for IPv4 peers)."""
    host = peer[0]
    if ":" not in host:
        return False
    try:
        return ipaddress.IPv6Address(host).ipv4_mapped is None
    except ValueError:
        return True


class PeerStore:
    """Live peers, both ways, expired *timeout* seconds after they were last heard from.

    One clock: every method is given the loop's *now*; the store never reads a
    clock of its own.  ``order`` holds the live peers in the order of last
    refresh (oldest first), so expiry pops from its front and stops at the
    first live entry; RX looks up ``live``, a plain dict (cheaper than an
    OrderedDict's get), and an entry moves in ``order`` at most once a second.
    Expiries and admissions are counted in *counters* (``peers_expired``,
    ``peers_added``), wherever they happen.

    *pool* gives the addresses of peers heard over its family, *pool6* (an
    IPv6 AddressPool, optional) those of peers heard over IPv6 when *pool* is
    IPv4; a peer of a family without a pool is refused (``no_pool``)."""

    def __init__(self, pool: AddressPool, timeout: float = 300.0, max_peers: int = 65536,
                 counters: MutableMapping[str, int] | None = None,
                 pool6: AddressPool | None = None):
        if pool6 is not None and (pool.ipv6 or not pool6.ipv6):
            raise PoolError("pool6 is the IPv6 pool next to an IPv4 pool")
        self.pool = pool
        self.pool6 = pool6
        # the pool of each family: peer_is_ipv6(peer) -> pool
        self.pools: dict[bool, AddressPool] = {pool.ipv6: pool}
        if pool6 is not None:
            self.pools[True] = pool6
        self.held: Counter[int] = Counter()  # live entries by address length (4, 16)
        self.timeout = timeout
        self.max_peers = max_peers
        self.counters = counters if counters is not None else Counter()
        self.live: dict[Peer, Entry] = {}  # peer -> Entry
        self.order: OrderedDict[Peer, Entry] = OrderedDict()  # the same, by last refresh
        self.by_address: dict[bytes, Entry] = {}
        self.refresh = min(REFRESH_INTERVAL, timeout / 4)

    @property
    def added(self) -> int:
        return self.counters["peers_added"]

    @property
    def expired(self) -> int:
        return self.counters["peers_expired"]

    def _forget(self, entry: Entry) -> None:
        del self.live[entry.peer]
        del self.order[entry.peer]
        del self.by_address[entry.address]
        self.held[len(entry.address)] -= 1
        self.counters["peers_expired"] += 1

    def lookup_peer(self, peer: Peer, now: float) -> Entry | None:
        """RX: the live entry for *peer*, refreshed (the peer was just heard from)."""
        entry = self.live.get(peer)
        if entry is None or now - entry.refreshed < self.refresh:
            return entry  # the common case: one dict lookup
        if now - entry.refreshed >= self.timeout:
            self._forget(entry)
            return None
        entry.refreshed = now
        self.order.move_to_end(peer)
        return entry

    def pool_for(self, peer: Peer, ipv6: bool | None = None) -> AddressPool | None:
        """The pool *peer* gets its address from: that of the family it was
        heard over (*ipv6*, by default read from its host), None if none."""
        return self.pools.get(peer_is_ipv6(peer) if ipv6 is None else ipv6)

    def admit(self, peer: Peer, now: float, ipv6: bool | None = None) -> Entry | str:
        """RX from an unknown peer: a new entry, or the reason it was refused.
        A peer that is still live keeps its entry (refreshed): never two for one peer.
        The address comes from the pool of the family the peer was heard over
        (*ipv6*: the caller says; None: read from the peer's host)."""
        self.expire(now)
        entry = self.lookup_peer(peer, now)
        if entry is not None:
            return entry
        if len(self.live) >= self.max_peers:
            return FULL_STORE
        pool = self.pool if self.pool6 is None and ipv6 is None else self.pool_for(peer, ipv6)
        if pool is None:
            return NO_POOL
        if self.held[pool.address_len] >= pool.capacity:
            return FULL_POOL
        for address in pool.candidates(peer):
            if address not in self.by_address:
                break
        else:  # pragma: no cover - excluded by the capacity check above
            return FULL_POOL
        entry = Entry(peer, address, now, now)
        self.adopt(entry)
        self.counters["peers_added"] += 1
        return entry

    def adopt(self, entry: Entry) -> None:
        """Take over an entry (from a store with another pool), as the most recently heard."""
        self.live[entry.peer] = entry
        self.order[entry.peer] = entry
        self.by_address[entry.address] = entry
        self.held[len(entry.address)] += 1

    def lookup_address(self, address: bytes, now: float) -> Entry | None:
        """TX: the live entry that holds generated *address*, if any (no refresh)."""
        entry = self.by_address.get(address)
        if entry is None or now - entry.refreshed < self.timeout:
            return entry
        self._forget(entry)
        return None

    def expire(self, now: float) -> None:
        """Forget every peer not heard from for *timeout* seconds."""
        order, timeout = self.order, self.timeout
        while order:
            entry = order[next(iter(order))]
            if now - entry.refreshed < timeout:
                return
            self._forget(entry)

    def clear(self) -> None:
        self.live.clear()
        self.order.clear()
        self.by_address.clear()
        self.held.clear()

    def __len__(self) -> int:
        return len(self.live)

    def entries(self) -> list[Entry]:
        """Every live entry, least recently heard first."""
        return list(self.order.values())
