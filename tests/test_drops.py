"""The drop reasons table (drops.py) holds every reason the code counts, and only those."""

from __future__ import annotations

import errno
import re
from pathlib import Path

from hypothesis import given, strategies as st

from udp_encap_tun import core, drops, notify, packet, status, store, tiu
from udp_encap_tun.core import Router

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for p in (ROOT / "udp_encap_tun").rglob("*.py") if p.name != "drops.py")
# "tx_drop_no_interface" in a counter, a log message or a comment
NAMED = re.compile(r"\b(tx|rx)_drop_([a-z0-9_]*[a-z0-9])\b")
# direction + "_drop_flows_full": both directions
EITHER = re.compile(r'\+\s*"_drop_([a-z0-9_]*[a-z0-9])"')


def constants() -> set[tuple[str, str]]:
    """(direction, reason) of the deciding modules' reason constants."""
    found = set()
    for module in (packet, core, tiu):
        for name, value in vars(module).items():
            if isinstance(value, str) and name.isupper() and name[:3] in ("TX_", "RX_"):
                found.add((name[:2].lower(), value))
    found |= {("rx", store.FULL_POOL), ("rx", store.FULL_STORE), ("rx", store.NO_POOL)}
    return found


def named_in_source() -> set[tuple[str, str]]:
    found = set()
    for path in SOURCES:
        text = path.read_text()
        found.update(NAMED.findall(text))
        for reason in EITHER.findall(text):
            found |= {("tx", reason), ("rx", reason)}
    return found


TABLE = {(d.direction, d.reason) for d in drops.DROPS}


def test_table_is_well_formed():
    assert len(TABLE) == len(drops.DROPS)  # each reason once per direction
    assert set(drops.BY_COUNTER) == {d.counter for d in drops.DROPS}
    for d in drops.DROPS:
        assert d.direction in drops.DIRECTIONS
        assert re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)*", d.reason), d
        assert d.meaning and "\n" not in d.meaning, d
        assert d.counter == drops.counter(d.direction, d.reason)


def test_every_reason_constant_is_in_the_table():
    assert ("tx", packet.TX_NOT_IPV4) in constants()  # the scan finds them
    assert sorted(constants() - TABLE) == []


def test_every_reason_named_in_the_source_is_in_the_table():
    found = named_in_source()
    assert {("tx", "no_interface"), ("rx", "write_error"), ("tx", "flows_full"),
            ("rx", "flows_full")} <= found  # literals, messages and direction + "_drop_..."
    assert sorted(found - TABLE) == []


def test_every_reason_in_the_table_is_counted_somewhere():
    assert sorted(TABLE - constants() - named_in_source()) == []


@given(st.binary(max_size=80))
def test_classify_functions_return_table_reasons(data):
    for direction, classify in (("tx", packet.classify_tx), ("rx", packet.classify_rx),
                                ("rx", tiu.classify_payload)):
        reason = classify(data)
        assert reason is None or reason in drops.reasons(direction), (classify, reason)
    for first in (b"", b"\x60"):  # IPv6 as well, where it is carried
        reason = packet.classify_tx(first + data, ipv6=True)
        assert reason is None or reason in drops.reasons("tx"), reason


def test_classify_reasons_are_reached():
    """The property above is no empty check: junk gets reasons."""
    assert packet.classify_tx(b"\x60" + bytes(39)) == packet.TX_NOT_IPV4
    assert packet.classify_tx(b"\x60" + bytes(39), ipv6=True) == packet.TX_IPV6_EXTENSION_HEADER
    assert packet.classify_rx(b"") == packet.RX_TOO_SHORT
    urgent = bytearray(20)
    urgent[0], urgent[tiu.WIRE_FLAGS] = 0x50, 0x20
    assert tiu.classify_payload(bytes(urgent)) == tiu.RX_URGENT


def test_send_failures_are_table_reasons():
    router = Router(endpoint_port=4000)
    for err in (errno.EAGAIN, errno.ENOBUFS, errno.EMSGSIZE, errno.ENODEV, errno.EPERM):
        reason = router.send_failed(("192.0.2.1", 4000), err, 1500, 1.0)
        assert reason in drops.reasons("tx")
        assert router.counters[drops.counter("tx", reason)] == (2 if err == errno.ENOBUFS else 1)


def test_reasons_split_by_wire():
    assert drops.reasons("tx", tiu_only=True) == {"not_tunnelled_port", "urgent", "flows_full",
                                                  "flow_socket"}
    assert "urgent" not in drops.reasons("rx", tiu_only=False)
    assert drops.reasons("rx") == drops.reasons("rx", True) | drops.reasons("rx", False)


def test_is_drop():
    assert drops.is_drop("tx_drop_not_tcp") and drops.is_drop("rx_drop_something_new")
    assert not any(drops.is_drop(c) for c in ("tx_packets", "rx_drop_", "drop_x", "auth_fail_x",
                                              "peers_expired", "tx_dropped"))


def _doc(counters: dict) -> dict:
    return {"interface": "tun9", "mode": "client", "pid": 1, "servers": [],
            "counters": counters}


def test_prometheus_reasons_come_from_the_table():
    text = status.render_prometheus(_doc({"rx_drop_brand_new": 2, "tx_drop_urgent": 1}))
    labels = set(re.findall(r'udp_encap_tun_drops_total\{interface="tun9",direction="(tx|rx)",'
                            r'reason="([a-z0-9_]+)"\}', text))
    expected = {(d, r) for d in drops.DIRECTIONS for r in drops.reasons(d, tiu_only=False)}
    # the default wire's reasons always (0 until counted), and whatever else was counted
    assert labels == expected | {("rx", "brand_new"), ("tx", "urgent")}
    assert 'reason="brand_new"} 2' in text


def test_notify_counts_drops_by_the_table():
    from types import SimpleNamespace

    counters = core.Counters(tx_bytes=1, tx_drop_not_tcp=2, rx_drop_too_short=3,
                             auth_fail_bad_proof=5)
    router = SimpleNamespace(client=True, endpoint_port=4000, remotes={}, store=None)
    tunnel = SimpleNamespace(router=router, counters=counters, tun=SimpleNamespace(name="tun9"))
    assert notify.status_line(tunnel).endswith(", 5 dropped")
