import ipaddress

import pytest

from udp_encap_tun.store import FULL_POOL, FULL_STORE, AddressPool, PeerStore, PoolError


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


def ip(addr: bytes) -> str:
    return str(ipaddress.IPv4Address(addr))


def make_store(cidr="10.0.0.0/24", reserved=("10.0.0.1",), timeout=300.0, max_peers=65536, key=b""):
    clock = Clock()
    return PeerStore(AddressPool(cidr, reserved, key), timeout, max_peers, clock), clock


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
    clock.now += 200
    assert store.lookup_peer(peer, clock.now) is not None  # heard from: refreshed
    clock.now += 250  # 450 s after admission, 250 s after last heard
    store.expire(clock.now)
    assert store.lookup_address(first, clock.now) is not None
    clock.now += 51
    store.expire(clock.now)
    assert store.lookup_address(first, clock.now) is None
    assert store.lookup_peer(peer, clock.now) is None
    assert len(store) == 0 and store.expired == 1
    assert store.admit(peer, clock.now).address == first


def test_tx_does_not_refresh():
    store, clock = make_store(timeout=10)
    entry = store.admit(("198.51.100.7", 5000), clock.now)
    for _ in range(5):
        clock.now += 3
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
    clock.now += 11
    store.expire(clock.now)
    assert store.admit(victim, clock.now).address == preferred


def test_full_pool_refuses_without_hanging_and_recovers():
    store, clock = make_store("10.0.0.0/30", reserved=("10.0.0.1",), timeout=5)
    only = store.admit(("198.51.100.1", 1), clock.now)
    assert only.address == bytes([10, 0, 0, 2])
    assert store.admit(("198.51.100.2", 1), clock.now) == FULL_POOL
    clock.now += 6
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
