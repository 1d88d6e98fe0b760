"""Every reason a packet is dropped (or a new peer refused), enumerated once.

A drop is counted as ``<direction>_drop_<reason>``: ``tx`` for a packet read
from the tun that does not go on the wire, ``rx`` for a datagram that is not
written to the tun.  The modules that decide keep their own constants
(packet.TX_NOT_IPV4, core.TX_UNKNOWN_PEER, store.FULL_POOL, tiu.RX_URGENT, ...)
and literals; tests/test_drops.py checks that every one of them is in this
table, and the status renderers, the service manager notification and the
README check read the table, never the modules.  The meanings are README's
counter tables, one line each.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Direction = Literal["tx", "rx"]
DIRECTIONS: tuple[Direction, ...] = ("tx", "rx")


@dataclass(frozen=True)
class Drop:
    direction: Direction
    reason: str
    meaning: str
    tiu_only: bool = False  # counted only with --wire tcp-in-udp (README: its own table)

    @property
    def counter(self) -> str:
        return f"{self.direction}_drop_{self.reason}"


def _tx(reason: str, meaning: str, tiu_only: bool = False) -> Drop:
    return Drop("tx", reason, meaning, tiu_only)


def _rx(reason: str, meaning: str, tiu_only: bool = False) -> Drop:
    return Drop("rx", reason, meaning, tiu_only)


DROPS: tuple[Drop, ...] = (
    # TX: read from the tun, not sent
    _tx("not_ipv4", "neither IPv4 nor IPv6 where IPv6 is carried (IPv6 elsewhere, garbage)"),
    _tx("ip_options", "IPv4 header longer than 20 bytes"),
    _tx("ipv6_extension_header", "IPv6 with an extension header (hop-by-hop, routing, "
        "destination options, ...) before TCP"),
    _tx("fragment", "an IPv4 fragment, or IPv6 with a fragment header"),
    _tx("not_tcp", "UDP, ICMP, ICMPv6, ..."),
    _tx("truncated", "shorter than its headers say"),
    _tx("bad_tcp_header", "TCP data offset < 5 or past the end"),
    _tx("unknown_peer", "server: no live peer holds the destination address"),
    _tx("send_error", "the kernel refused the datagram"),
    _tx("send_buffer_full", "the kernel refused the datagram: the socket's send buffer is full"),
    _tx("message_too_long", "the datagram is larger than the path MTU (EMSGSIZE)"),
    _tx("no_interface", "the bound interface is missing (deleted)"),
    _tx("auth_pending", "client: more than 128 packets waiting for authentication"),
    _tx("unsupported_gso", "offload path: the tun handed over a segmentation type other "
        "than TCPv4"),
    _tx("not_tunnelled_port", "tcp-in-udp: a packet in the tun not from (server) / to "
        "(client) a tunnelled port", tiu_only=True),
    _tx("urgent", "tcp-in-udp: a segment with URG set", tiu_only=True),
    _tx("flows_full", "tcp-in-udp: --max-peers flows exist", tiu_only=True),
    _tx("flow_socket", "tcp-in-udp client: the flow's UDP socket could not be opened",
        tiu_only=True),
    # RX: received over UDP, not written to the tun
    _rx("too_short", "the datagram cannot be a TCP segment: too short"),
    _rx("bad_data_offset", "the datagram cannot be a TCP segment: bad data offset"),
    _rx("too_long", "the datagram cannot be a TCP segment: too long"),
    _rx("no_tun_address", "the tun has no IPv4 address yet"),
    _rx("pool_full", "server: a new peer refused: the address pool is full"),
    _rx("peers_full", "server: a new peer refused: --max-peers reached"),
    _rx("admission_rate", "server: a new peer (or flow) refused: more than --admission-rate"),
    _rx("no_pool", "server: a new peer refused: no address pool"),
    _rx("unauthenticated", "with a PSK: data from a peer that has not authenticated"),
    _rx("bad_control", "a malformed control message, or one this end has no key for"),
    _rx("write_error", "the tun refused a write (counted per wire segment)"),
    _rx("urgent", "tcp-in-udp: a segment with URG set", tiu_only=True),
    _rx("flows_full", "tcp-in-udp: --max-peers flows exist", tiu_only=True),
)

BY_COUNTER: dict[str, Drop] = {d.counter: d for d in DROPS}


def reasons(direction: Direction, tiu_only: bool | None = None) -> frozenset[str]:
    """The reasons of *direction* (with *tiu_only* given: only those that are,
    or are not, counted only with --wire tcp-in-udp)."""
    return frozenset(d.reason for d in DROPS if d.direction == direction
                     and (tiu_only is None or d.tiu_only == tiu_only))


def is_drop(counter: str) -> bool:
    """True for a counter that counts dropped packets (``tx_drop_*``, ``rx_drop_*``),
    in the table or not (an unknown one is still a drop)."""
    direction, _, rest = counter.partition("_")
    return direction in DIRECTIONS and rest.startswith("drop_") and len(rest) > 5


def counter(direction: Direction, reason: str) -> str:
    return f"{direction}_drop_{reason}"
