import ipaddress
from collections import Counter

import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from testkit import FakeClock
from udp_encap_tun.core import Router
from udp_encap_tun.store import (
    FULL_POOL,
    FULL_STORE,
    NO_POOL,
    AddressPool,
    Entry,
    PeerStore,
    PoolError,
)

# clocks the store must not care about: a machine booted a second ago, one up for 30 years
EPOCHS = [0.0, 0.5, 1000.0, 1e9]


def ip(addr: bytes) -> str:
    return str(ipaddress.IPv4Address(addr))


def make_store(cidr="10.0.0.0/24", reserved=("10.0.0.1",), timeout=300.0, max_peers=65536, key=b"",
               now=1000.0):
    clock = FakeClock(now)
    return PeerStore(AddressPool(cidr, reserved, key), timeout, max_peers), clock


def test_pool_excludes_network_broadcast_and_reserved():
    pool = AddressPool("10.0.0.0/29", reserved=["10.0.0.1"])
    got = set()
    for i in range(200):
        got.update(ip(a) for a in pool.candidates(("198.51.100.1", i)))
    assert got == {f"10.0.0.{n}" for n in range(2, 7)}
    assert pool.capacity == 5


@pytest.mark.parametrize("cidr", ["10.0.0.1/32", "nonsense", "10.0.0.0/33", "2001:db8::/64"])
def test_pool_errors(cidr):
    with pytest.raises(PoolError):
        AddressPool(cidr, reserved=["10.0.0.1"])


def test_pool_31_uses_both_addresses():
    assert AddressPool("10.0.0.0/31").capacity == 2


def test_same_peer_same_address_across_stores_and_keys_matter():
    a, _ = make_store()
    b, _ = make_store()  # "after a restart"
    c, _ = make_store(key=b"other secret")
    peers = [("198.51.100.7", p) for p in range(40000, 40020)]
    addrs_a = [a.admit(p, 1000).address for p in peers]
    addrs_b = [b.admit(p, 1000).address for p in peers]
    addrs_c = [c.admit(p, 1000).address for p in peers]
    assert addrs_a == addrs_b
    assert addrs_a != addrs_c
    assert len(set(addrs_a)) == len(peers)


def test_lookup_both_ways():
    store, clock = make_store()
    peer = ("198.51.100.7", 5000)
    entry = store.admit(peer, clock.now)
    assert store.lookup_peer(peer, clock.now) is entry
    assert store.lookup_address(entry.address, clock.now) is entry
    assert store.lookup_address(bytes([10, 0, 0, 250]) if entry.address != bytes([10, 0, 0, 250])
                                else bytes([10, 0, 0, 251]), clock.now) is None


def test_same_address_different_ports_are_different_peers():
    store, clock = make_store()
    e1 = store.admit(("198.51.100.7", 5000), clock.now)
    e2 = store.admit(("198.51.100.7", 5001), clock.now)
    assert e1.address != e2.address


def test_expiry_after_last_heard_and_returning_peer_gets_same_address():
    store, clock = make_store(timeout=300)
    peer = ("198.51.100.7", 5000)
    first = store.admit(peer, clock.now).address
    clock.advance(200)
    assert store.lookup_peer(peer, clock.now) is not None  # heard from: refreshed
    clock.advance(250)  # 450 s after admission, 250 s after last heard
    store.expire(clock.now)
    assert store.lookup_address(first, clock.now) is not None
    clock.advance(51)
    store.expire(clock.now)
    assert store.lookup_address(first, clock.now) is None
    assert store.lookup_peer(peer, clock.now) is None
    assert len(store) == 0 and store.expired == 1
    assert store.admit(peer, clock.now).address == first


def test_tx_does_not_refresh():
    store, clock = make_store(timeout=10)
    entry = store.admit(("198.51.100.7", 5000), clock.now)
    for _ in range(5):
        clock.advance(3)
        store.lookup_address(entry.address, clock.now)
    assert store.lookup_address(entry.address, clock.now) is None


def test_collision_probes_and_keeps_live_address():
    # a /29 has six usable addresses; with one reserved, five peers fill it
    store, clock = make_store("10.0.0.0/29", reserved=("10.0.0.1",))
    holders = {}
    port = 1
    while len(holders) < 5:
        entry = store.admit(("198.51.100.7", port), clock.now)
        assert entry.address not in holders  # never an address a live peer holds
        holders[entry.address] = entry.peer
        port += 1
    # find a newcomer whose preferred address is taken: it still gets none while full
    assert store.admit(("198.51.100.8", 1), clock.now) == FULL_POOL
    for address, peer in holders.items():
        assert store.lookup_address(address, clock.now).peer == peer


def test_collision_gets_next_free_address_then_own_after_expiry():
    store, clock = make_store("10.0.0.0/24", timeout=10)
    pool = store.pool
    victim = ("198.51.100.9", 7)
    preferred = next(pool.candidates(victim))
    # find another peer whose preferred address is the victim's one
    squatter = next(("198.51.100.1", p) for p in range(1, 100000)
                    if next(pool.candidates(("198.51.100.1", p))) == preferred)
    assert store.admit(squatter, clock.now).address == preferred
    got = store.admit(victim, clock.now).address
    assert got != preferred and got in pool
    clock.advance(11)
    store.expire(clock.now)
    assert store.admit(victim, clock.now).address == preferred


def test_full_pool_refuses_without_hanging_and_recovers():
    store, clock = make_store("10.0.0.0/30", reserved=("10.0.0.1",), timeout=5)
    only = store.admit(("198.51.100.1", 1), clock.now)
    assert only.address == bytes([10, 0, 0, 2])
    assert store.admit(("198.51.100.2", 1), clock.now) == FULL_POOL
    clock.advance(6)
    assert store.admit(("198.51.100.2", 1), clock.now).address == bytes([10, 0, 0, 2])


def test_max_peers_refuses_new_never_evicts():
    store, clock = make_store(max_peers=2)
    a = store.admit(("198.51.100.1", 1), clock.now)
    b = store.admit(("198.51.100.1", 2), clock.now)
    assert store.admit(("198.51.100.1", 3), clock.now) == FULL_STORE
    assert store.lookup_peer(a.peer, clock.now) is a and store.lookup_peer(b.peer, clock.now) is b


def test_large_pool_is_cheap():
    store, clock = make_store("10.0.0.0/8", reserved=("10.0.0.1",))
    assert store.pool.capacity == 2 ** 24 - 3
    for port in range(2000):
        assert not isinstance(store.admit(("198.51.100.1", port), clock.now), str)
    assert len(store) == 2000


# --------------------------------------------------------------------------- one clock


@pytest.mark.parametrize("start", EPOCHS)
def test_expiry_follows_the_given_clock_only(start):
    store, clock = make_store(timeout=10, now=start)
    peer = ("198.51.100.7", 5000)
    entry = store.admit(peer, clock.now)
    clock.advance(9.9)
    store.expire(clock.now)
    assert store.lookup_peer(peer, clock.now) is entry  # refreshed at start + 9.9
    clock.advance(9.9)
    store.expire(clock.now)
    assert store.lookup_address(entry.address, clock.now) is entry
    clock.advance(0.2)
    store.expire(clock.now)
    assert len(store) == 0 and store.expired == 1 and store.added == 1
    assert store.lookup_peer(peer, clock.now) is None


@pytest.mark.parametrize("start", EPOCHS)
def test_peers_returning_around_the_timeout_keep_their_address_and_leak_nothing(start):
    # the old store stamped entries with the host's monotonic clock and was asked
    # with the loop's: a peer back between the two expiry times got a second address
    # and its first stayed taken forever
    store, clock = make_store("10.0.0.0/27", timeout=1.0, now=start)
    peers = [("198.51.100.7", 4000 + i) for i in range(12)]
    first = {p: store.admit(p, clock.now).address for p in peers}
    for step in range(400):
        clock.advance(0.05 + (step % 7) * 0.01)  # come back just before, at or after the timeout
        p = peers[step % len(peers)]
        entry = store.lookup_peer(p, clock.now)
        if entry is None:
            entry = store.admit(p, clock.now)
        assert entry.address == first[p]  # its own address again: its TCP connections survive
        assert len(store.by_address) == len(store.live) <= len(peers)
    assert store.added - store.expired == len(store)


@pytest.mark.parametrize("start", EPOCHS)
def test_admit_of_a_live_peer_returns_its_entry(start):
    store, clock = make_store(now=start)
    peer = ("198.51.100.7", 5000)
    entry = store.admit(peer, clock.now)
    clock.advance(5)
    assert store.admit(peer, clock.now) is entry
    assert len(store) == 1 and len(store.by_address) == 1 and store.added == 1
    assert entry.refreshed == clock.now


@pytest.mark.parametrize("how", ["expire", "lookup_peer", "lookup_address", "admit"])
def test_every_expiry_is_counted_once(how):
    counters = Counter()
    store = PeerStore(AddressPool("10.0.0.0/22", ["10.0.0.1"]), 10.0, 65536, counters)
    peers = [("198.51.100.7", p) for p in range(500)]
    entries = [store.admit(p, 0.0) for p in peers]
    now = 10.0
    for peer, entry in zip(peers, entries, strict=False):
        if how == "expire":
            store.expire(now)
        elif how == "lookup_peer":
            assert store.lookup_peer(peer, now) is None
        elif how == "lookup_address":
            assert store.lookup_address(entry.address, now) is None
        else:
            store.admit(("203.0.113.1", peer[1]), now)
    store.expire(now + 100)
    assert len(store) == 0
    assert counters["peers_added"] == (1000 if how == "admit" else 500)
    assert counters["peers_expired"] == counters["peers_added"]


def test_router_counts_expiries_across_a_pool_change():
    r = Router(timeout=10.0)
    r.set_tun_address(bytes([10, 0, 0, 1]), ipaddress.IPv4Network("10.0.0.0/24"))
    for port in range(50):
        assert r.rx_addresses(("198.51.100.1", port), 0.5) is not None
    r.set_tun_address(bytes([10, 0, 0, 1]), ipaddress.IPv4Network("10.0.0.0/16"))  # a new store
    assert len(r.store) == 50
    r.rx_addresses(("198.51.100.1", 0), 20.0)  # expires that one in lookup, the rest in admit
    assert r.counters["peers_added"] == 51 and r.counters["peers_expired"] == 50


# --------------------------------------------------------------------------- invariants


class StoreMachine(RuleBasedStateMachine):
    """Arbitrary admit / lookup / expire sequences with a clock that starts
    anywhere and only moves forward, against a model of who is live."""

    TIMEOUT = 5.0

    def __init__(self):
        super().__init__()
        self.store = None

    @rule(start=st.sampled_from(EPOCHS), max_peers=st.integers(1, 12))
    @precondition(lambda self: self.store is None)
    def start(self, start, max_peers):
        # a /28 with one reserved address: 13 addresses for up to 16 peers
        self.store = PeerStore(AddressPool("10.0.0.0/28", ["10.0.0.1"]), self.TIMEOUT, max_peers)
        self.now = start
        self.heard = {}  # model: peer -> last time its entry was refreshed
        self.address = {}  # peer -> the address it held last

    def _expired_in_model(self):
        for peer, heard in list(self.heard.items()):
            if self.now - heard >= self.TIMEOUT:
                del self.heard[peer]

    @rule(dt=st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 4.99, 5.0, 5.01, 20.0]))
    @precondition(lambda self: self.store is not None)
    def advance(self, dt):
        self.now += dt

    @rule(port=st.integers(0, 15))
    @precondition(lambda self: self.store is not None)
    def admit(self, port):
        peer = ("198.51.100.1", port)
        got = self.store.admit(peer, self.now)
        self._expired_in_model()
        if peer in self.heard:
            assert got is self.store.live[peer]
            self.heard[peer] = got.refreshed
        elif isinstance(got, str):
            assert got == (FULL_STORE if len(self.heard) >= self.store.max_peers else FULL_POOL)
            assert got != FULL_POOL or len(self.heard) == self.store.pool.capacity
        else:
            assert got.refreshed == self.now
            self.heard[peer] = self.now
            # the first free address in the peer's own probing order: the same one
            # whenever it is free (a returning peer's TCP connections survive)
            taken = self.store.by_address.keys() - {got.address}
            assert got.address == next(a for a in self.store.pool.candidates(peer)
                                       if a not in taken)
            self.address[peer] = got.address

    @rule(port=st.integers(0, 15))
    @precondition(lambda self: self.store is not None)
    def lookup_peer(self, port):
        peer = ("198.51.100.1", port)
        got = self.store.lookup_peer(peer, self.now)
        alive = peer in self.heard and self.now - self.heard[peer] < self.TIMEOUT
        assert (got is not None) == alive
        if got is not None:
            assert self.now - got.refreshed < self.store.refresh or got.refreshed == self.now
            self.heard[peer] = got.refreshed
        else:
            self.heard.pop(peer, None)

    @rule(last_byte=st.integers(0, 15))
    @precondition(lambda self: self.store is not None)
    def lookup_address(self, last_byte):
        address = bytes([10, 0, 0, last_byte])
        got = self.store.lookup_address(address, self.now)
        holder = next((p for p in self.heard if self.address[p] == address), None)
        alive = holder is not None and self.now - self.heard[holder] < self.TIMEOUT
        assert (got is not None) == alive
        if alive:
            assert got.peer == holder and got.refreshed == self.heard[holder]  # TX does not refresh
        elif holder is not None:
            del self.heard[holder]

    @rule()
    @precondition(lambda self: self.store is not None)
    def expire(self):
        self.store.expire(self.now)
        self._expired_in_model()
        assert set(self.store.live) == set(self.heard)

    @invariant()
    def consistent(self):
        store = self.store
        if store is None:
            return
        assert len(store.live) == len(store.order) == len(store.by_address) <= store.max_peers
        assert store.live == store.order
        for address, entry in store.by_address.items():
            assert store.live[entry.peer] is entry and entry.address == address
            assert address in store.pool
        assert set(self.heard) <= set(store.live)  # nobody live is forgotten
        for peer, entry in store.live.items():  # only expired entries the model dropped remain
            assert peer in self.heard or self.now - entry.refreshed >= self.TIMEOUT
        stamps = [e.refreshed for e in store.order.values()]
        assert stamps == sorted(stamps)  # the expiry order
        assert store.added - store.expired == len(store)


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = settings(max_examples=150, stateful_step_count=50, deadline=None)


# --------------------------------------------------------------------------- IPv6


def ip6(addr: bytes) -> str:
    return str(ipaddress.IPv6Address(addr))


TUN6 = "fd00:9::1"


def test_ipv6_pool_hands_out_16_byte_addresses_of_the_prefix():
    pool = AddressPool("fd00:9::/64", reserved=[TUN6], key=b"k", ipv6=True)
    net = ipaddress.IPv6Network("fd00:9::/64")
    assert pool.capacity == 2 ** 64 - 2 and pool.address_len == 16  # minus ::0 and the tun's
    for port in range(300):
        first = next(pool.candidates(("2001:db8::7", port)))
        assert len(first) == 16 and ipaddress.IPv6Address(first) in net and first in pool
        assert ip6(first) not in (TUN6, "fd00:9::")
    assert bytes(4) not in pool and ipaddress.IPv6Address(TUN6).packed not in pool
    # the same keyed hash picks the same address again, another key another one
    again = AddressPool("fd00:9::/64", reserved=[TUN6], key=b"k", ipv6=True)
    other = AddressPool("fd00:9::/64", reserved=[TUN6], key=b"other", ipv6=True)
    peers = [("2001:db8::7", p) for p in range(20)]
    assert [next(pool.candidates(p)) for p in peers] == [next(again.candidates(p)) for p in peers]
    assert [next(pool.candidates(p)) for p in peers] != [next(other.candidates(p)) for p in peers]


def test_ipv6_pool_spreads_over_a_prefix_wider_than_64_bits():
    pool = AddressPool("fd00::/16", ipv6=True)
    firsts = [int.from_bytes(next(pool.candidates(("2001:db8::1", p))), "big") for p in range(64)]
    # 112 bits to choose from: a 64-bit digest would leave the top 48 of them 0
    assert any(f & ((1 << 112) - 1) >> 64 for f in firsts)


def test_ipv6_small_pool_excludes_the_prefix_address_and_reserved():
    pool = AddressPool("fd00:9::/125", reserved=[TUN6], ipv6=True)
    got = set()
    for i in range(200):
        got.update(ip6(a) for a in pool.candidates(("2001:db8::1", i)))
    assert got == {f"fd00:9::{n}" for n in range(2, 8)} and pool.capacity == 6


@pytest.mark.parametrize("cidr", ["fd00:9::1/128", "fd00:9::/127", "10.0.0.0/24", "nonsense",
                                  "fd00::/129"])
def test_ipv6_pool_errors(cidr):
    with pytest.raises(PoolError, match="IPv6|no room"):
        AddressPool(cidr, reserved=[TUN6], ipv6=True)


def test_ipv6_pool_of_four_with_the_tun_reserved_has_two():
    assert AddressPool("fd00:9::/126", reserved=[TUN6], ipv6=True).capacity == 2
    with pytest.raises(PoolError, match="no usable address"):
        AddressPool("fd00:9::/126", reserved=["fd00:9::1", "fd00:9::2", "fd00:9::3"], ipv6=True)


def make_dual_store(pool6="fd00:9::/120", timeout=300.0, max_peers=65536):
    return PeerStore(AddressPool("10.0.0.0/24", ["10.0.0.1"]), timeout, max_peers,
                     pool6=AddressPool(pool6, [TUN6], ipv6=True))


def test_one_store_gives_each_peer_an_address_of_its_family():
    store = make_dual_store()
    v4 = store.admit(("198.51.100.7", 5000), 1000.0)
    v6 = store.admit(("2001:db8::7", 5000), 1000.0)
    mapped = store.admit(("::ffff:198.51.100.8", 5000), 1000.0)  # IPv4 on a dual-stack socket
    scoped = store.admit(("fe80::1%eth0", 5000), 1000.0)
    assert [len(e.address) for e in (v4, v6, mapped, scoped)] == [4, 16, 4, 16]
    assert v6.address in store.pool6 and v4.address in store.pool
    assert store.lookup_address(v6.address, 1000.0) is v6
    assert store.lookup_address(v4.address, 1000.0) is v4
    assert store.lookup_peer(("2001:db8::7", 5000), 1000.0) is v6
    # the caller may say the family (what the socket saw), whatever the host looks like
    told = store.admit(("198.51.100.9", 1), 1000.0, ipv6=True)
    assert len(told.address) == 16


def test_store_without_a_pool_for_the_family_refuses():
    v4only, _ = make_store()
    assert len(v4only.admit(("2001:db8::7", 1), 1000.0).address) == 4  # one pool: as before
    assert v4only.admit(("2001:db8::7", 2), 1000.0, ipv6=True) == NO_POOL
    v6only = PeerStore(AddressPool("fd00:9::/64", [TUN6], ipv6=True))
    assert len(v6only.admit(("2001:db8::7", 1), 1000.0).address) == 16
    assert v6only.admit(("198.51.100.1", 1), 1000.0, ipv6=False) == NO_POOL
    with pytest.raises(PoolError):
        PeerStore(AddressPool("10.0.0.0/24"), pool6=AddressPool("10.0.1.0/24"))


def test_ipv6_pool_fills_on_its_own_and_recovers():
    store = make_dual_store(pool6="fd00:9::/126", timeout=10.0)  # two usable addresses
    a = store.admit(("2001:db8::1", 1), 1000.0)
    b = store.admit(("2001:db8::1", 2), 1000.0)
    assert a.address != b.address
    assert {a.address, b.address} == {ipaddress.IPv6Address(f"fd00:9::{n}").packed for n in (2, 3)}
    assert store.admit(("2001:db8::1", 3), 1000.0) == FULL_POOL
    assert len(store.admit(("198.51.100.1", 3), 1000.0).address) == 4  # IPv4 still has room
    assert len(store.admit(("2001:db8::1", 3), 1010.0).address) == 16  # the others expired
    assert store.held == {4: 0, 16: 1} and len(store) == 1


def test_ipv6_probing_is_bounded_by_the_live_peers():
    """A live peer's address is never taken; a newcomer probes past the held
    ones only (a /64 is never walked)."""
    pool = AddressPool("fd00:9::/64", [TUN6], ipv6=True)
    store = PeerStore(pool)
    peer = ("2001:db8::99", 4242)
    own = next(pool.candidates(peer))
    start = int.from_bytes(own, "big")
    for k in range(3):  # hold own, own+1, own+2 by adopting entries
        store.adopt(Entry(("2001:db8::2", k), (start + k).to_bytes(16, "big"), 1000.0, 1000.0))
    got = store.admit(peer, 1000.0)
    assert int.from_bytes(got.address, "big") == start + 3
    assert all(store.lookup_address((start + k).to_bytes(16, "big"), 1000.0).peer[1] == k
               for k in range(3))


def test_large_ipv6_pool_is_cheap():
    store = make_dual_store(pool6="fd00:9::/64")
    for port in range(2000):
        assert len(store.admit(("2001:db8::1", port), 1000.0).address) == 16
    assert len({e.address for e in store.entries()}) == 2000
