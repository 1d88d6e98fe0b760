"""Sans-IO decisions of the TCP-in-UDP wire mode (``--wire tcp-in-udp``): port
ranges, the flow table, and what a packet from the tun or a datagram does.
The clock is injected (``now``); the I/O edge is tiudev.py.

A flow is one TCP connection as the tunnel sees it: (local address, remote
address, local port, remote port), the local side being this host's TCP.  The
key is those 12 bytes in that order, which is ``packet[12:24]`` of a packet
read from the tun (source = local).

* Server: datagrams reach the socket of one listen port; a new flow is
  admitted at the admission rate while fewer than max_flows exist.  Packets
  from the tun leave from the socket of their TCP source port.
* Client: a packet from the tun to an endpoint port opens the flow (and the
  I/O edge its UDP socket, bound to the TCP source address and port);
  datagrams arrive on the flow's own socket.

Flows are forgotten ``timeout`` seconds after their last packet; a client
flow's socket is closed then.  Expiry costs what expires, not the table: flows
are also kept in an OrderedDict in the order they were last moved, and a flow
moves to its end at most once a second (TX and RX only set ``last`` between
moves), as the peer store does.  The clock is the caller's ``now``.
"""

from __future__ import annotations

import ipaddress
import logging
import struct
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final, TypeAlias

from . import auth
from .core import Accounting, Counters, Warnings
from .packet import ReadBuffer, classify_tx

if TYPE_CHECKING:
    import socket

log = logging.getLogger(__name__)

MAX_PORTS: Final = 4096  # listen or endpoint ports at most (server: one socket each)
REFRESH_INTERVAL: Final = 1.0  # a flow moves in the expiry order at most this often
_PORTS: Final = struct.Struct("!HH")


class PortRangeError(ValueError):
    pass


def parse_port_ranges(items: Iterable[str | int]) -> list[tuple[int, int]]:
    """'5000', '32768-33279', ints, or several of them separated by commas ->
    merged, sorted inclusive ranges.  Raises PortRangeError with a one-line reason."""
    ranges: list[tuple[int, int]] = []
    for item in items:
        for part in str(item).replace(",", " ").split():
            lo, sep, hi = part.partition("-")
            try:
                lo_i, hi_i = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise PortRangeError(f"{part!r} is not a port or a port range") from None
            if not (1 <= lo_i <= hi_i <= 65535):
                raise PortRangeError(f"{part!r} is not a port range within 1-65535")
            ranges.append((lo_i, hi_i))
    ranges.sort()
    merged: list[list[int]] = []
    for first, last in ranges:
        if merged and first <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], last)
        else:
            merged.append([first, last])
    return [(first, last) for first, last in merged]


def count_ports(ranges: Iterable[tuple[int, int]]) -> int:
    return sum(hi - lo + 1 for lo, hi in ranges)


def format_ranges(ranges: Iterable[tuple[int, int]]) -> str:
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ranges)


# ancillary data of a sendmsg: [(level, type, data)]
Ancillary: TypeAlias = Sequence[tuple[int, int, bytes]]
# where a flow's packets go, as the I/O edge (tiudev.TiuConn) sends them: (socket,
# destination address or None (a connected socket), ancillary data, the peer)
FlowDest: TypeAlias = "tuple[socket.socket, tuple[str, int] | None, Ancillary, tuple[str, int]]"


@dataclass(slots=True, eq=False)
class Flow:
    key: bytes  # local address, remote address, local port, remote port (12 bytes)
    created: float
    last: float  # its last packet
    moved: float = 0.0  # when it last moved to the end of TiuRouter.order
    sock: socket.socket | None = None  # client: the flow's UDP socket (the I/O edge's)
    dest: FlowDest | None = None  # where its packets go, as the I/O edge sends them
    rx_packets: int = 0
    rx_bytes: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0

    @property
    def local(self) -> tuple[str, int]:
        return str(ipaddress.IPv4Address(self.key[0:4])), _PORTS.unpack_from(self.key, 8)[0]

    @property
    def remote(self) -> tuple[str, int]:
        return str(ipaddress.IPv4Address(self.key[4:8])), _PORTS.unpack_from(self.key, 8)[1]

    @property
    def rx_ports(self) -> bytes:
        """TCP source and destination port of a segment from the remote end."""
        return self.key[10:12] + self.key[8:10]


def flow_key(local_ip: bytes, remote_ip: bytes, local_port: int, remote_port: int) -> bytes:
    return local_ip + remote_ip + _PORTS.pack(local_port, remote_port)


class TiuRouter(Accounting):
    """The TCP-in-UDP mode's decisions and counters; the loop's ``router``."""

    mss = None  # the datagram is exactly as long as the segment: nothing to clamp
    client_auth = None  # no control messages in this format
    holds = False  # nothing waits for authentication
    store = None

    def __init__(self, client: bool, ports: Iterable[tuple[int, int]], timeout: float = 300.0,
                 max_flows: int = 65536, admission_rate: float = 100.0) -> None:
        self.client = client
        self.ranges = list(ports)
        self.ports = frozenset(p for lo, hi in self.ranges for p in range(lo, hi + 1))
        self.timeout = timeout
        self.max_flows = max_flows
        self.flows: dict[bytes, Flow] = {}  # by key, in the order they were added
        self.order: OrderedDict[bytes, Flow] = OrderedDict()  # the same, by last move
        self.refresh = min(REFRESH_INTERVAL, timeout / 4)
        self.counters = Counters()
        # (destination, batches) the loop sends (Router's interface): never any in this mode
        self.outbox: list[tuple[tuple[str, int], Sequence[tuple[ReadBuffer, int]]]] = []
        self.admission = auth.TokenBucket(admission_rate, max(1.0, admission_rate))
        self.ident = 0
        self.tun_address: bytes | None = None
        self.warnings = Warnings()

    # the loop's Router interface
    def set_tun_address(self, address: bytes | None,
                        network: ipaddress.IPv4Network | None) -> None:
        self.tun_address = address  # not used: segments carry the real addresses

    def next_ident(self) -> int:
        self.ident = (self.ident + 1) & 0xFFFF
        return self.ident

    def tick(self, now: float) -> None:
        pass

    def tx(self, packet: ReadBuffer, now: float) -> tuple[Flow, Flow] | None:
        """A packet read from the tun: (its flow, the flow to count on), or None
        if it is dropped (counted).  The UDP edge sends to the flow."""
        reason = classify_tx(packet)
        if reason is not None:
            self.counters["tx_drop_" + reason] += 1
            return None
        flow = self.tx_flow(packet, now)
        return None if flow is None else (flow, flow)

    # -- flows ---------------------------------------------------------------
    def _new_flow(self, key: bytes, now: float, direction: str, count: int = 1) -> Flow | None:
        if len(self.flows) >= self.max_flows:
            self.expire(now)
            if len(self.flows) >= self.max_flows:
                self.count_rarely_logged(direction + "_drop_flows_full",
                                         "refusing a new flow: --max-peers flows exist",
                                         now=now, amount=count)
                return None
        flow = self.flows[key] = self.order[key] = Flow(key, now, now, now)
        self.counters["flows_added"] += 1
        return flow

    def tx_flow(self, packet: ReadBuffer, now: float) -> Flow | None:
        """The flow of an IPv4 TCP packet read from the tun (validated), or None
        (counted): not to/from one of our ports, URG, or no room for a new flow."""
        if packet[33] & 0x20:  # URG: the eBPF peer sends those as plain TCP; we cannot
            self.counters["tx_drop_urgent"] += 1
            return None
        ports = ((packet[20] << 8 | packet[21]) if not self.client
                 else (packet[22] << 8 | packet[23]))
        if ports not in self.ports:
            self.counters["tx_drop_not_tunnelled_port"] += 1
            return None
        key = bytes(packet[12:24])
        flow = self.flows.get(key)
        if flow is None:
            flow = self._new_flow(key, now, "tx")
            if flow is None:
                return None
        self._touch(flow, now)
        return flow

    def rx_flow(self, local_ip: bytes, remote_ip: bytes, local_port: int, remote_port: int,
                now: float, count: int = 1) -> Flow | None:
        """Server: the flow of datagrams from (remote) to (local), admitted if new,
        or None (counted as *count* drops)."""
        key = local_ip + remote_ip + _PORTS.pack(local_port, remote_port)
        flow = self.flows.get(key)
        if flow is None:
            if not self.admission.take(now):
                self.count_rarely_logged("rx_drop_admission_rate", "refusing a new flow from "
                                         "%s:%d: more new flows than --admission-rate allows",
                                         str(ipaddress.IPv4Address(remote_ip)), remote_port,
                                         now=now, peer=remote_ip, amount=count)
                return None
            flow = self._new_flow(key, now, "rx", count)
            if flow is None:
                return None
        self._touch(flow, now)
        return flow

    def _touch(self, flow: Flow, now: float) -> None:
        """A packet of *flow*: it is live; it moves to the back of the expiry
        order at most once every ``refresh`` seconds."""
        flow.last = now
        if now - flow.moved >= self.refresh:
            flow.moved = now
            self.order.move_to_end(flow.key)

    def forget(self, flow: Flow) -> None:
        if self.flows.get(flow.key) is flow:
            del self.flows[flow.key]
            del self.order[flow.key]

    def expire(self, now: float) -> list[Flow]:
        """Forget the flows idle for ``timeout``; return them (their sockets to
        close).  Looks only at the front of ``order``: the flows not moved for
        ``timeout``.  One of them that had packets since (``last``, set without
        a move by TX, RX and the I/O edge) moves to the end instead: a flow is
        never forgotten early, and at most about a second late."""
        limit = now - self.timeout
        order, flows, gone = self.order, self.flows, []
        while order:
            flow = order[next(iter(order))]
            if flow.moved > limit:
                break
            if flow.last > limit:
                flow.moved = now
                order.move_to_end(flow.key)
                continue
            del order[flow.key]
            del flows[flow.key]
            gone.append(flow)
        if gone:
            self.counters["flows_expired"] += len(gone)
        return gone
