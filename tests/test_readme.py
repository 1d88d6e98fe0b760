"""README.md lists every counter the code counts (the operator's only key to them)."""

import re
from pathlib import Path

from udp_encap_tun import core, drops

ROOT = Path(__file__).resolve().parent.parent
LITERAL = re.compile(r'(?:counters\[|count_rarely_logged\(\s*)"([a-z0-9_]+)"\]?')


def counter_names() -> set[str]:
    names = set()
    for path in sorted((ROOT / "udp_encap_tun").glob("*.py")):
        names.update(n for n in LITERAL.findall(path.read_text()) if not n.endswith("_"))
    # every drop reason (tests/test_drops.py: every reason the code counts is in the table)
    names.update(drop.counter for drop in drops.DROPS)
    names.update(counter for counter, _what in core.ICMP_ERRORS.values())
    names.update({"icmp_unreachable", "tx_mss_clamped", "rx_mss_clamped"})
    return names


def test_every_counter_is_in_the_readme():
    documented = set(re.findall(r"`([a-z0-9_]+)`", (ROOT / "README.md").read_text()))
    names = counter_names()
    assert {"tx_packets", "rx_drop_too_short", "tx_drop_not_ipv4", "peers_expired"} <= names
    assert sorted(names - documented) == []
