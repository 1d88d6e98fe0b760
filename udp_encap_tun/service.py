"""What lives beside the data path in the loop (status socket, service manager
notification): the Service base class, and the small view of the
tunnel that services read (TunnelView), so that no service imports the loop.

The loop (loop.Loop, whatever edges it is given) satisfies these Protocols
structurally; they list exactly what the services use:

* every service: ``TunnelView`` (the router's common part, the tun, counters,
  the UDP socket, the links, the data path, the clock);
* the default wire's tunnels also: ``UdpTunnelView`` (the client's servers and
  keepalive targets, the server's peer limit);
* ``--wire tcp-in-udp`` tunnels: ``FlowsTunnelView`` (the flows, the bound
  interface's name and ``describe_flows``): test for it first.

The offload tunnels' ``gso`` and ``gro`` flags are read with getattr (absent:
off) by the status document.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:  # pure modules, but services need none of them at run time
    from .core import Counters, ServerState
    from .faults import Links
    from .store import PeerStore

HOUSEKEEPING = 1.0  # seconds between the loop's housekeeping ticks (store expiry, Service.tick)

Address = tuple[str, int]  # a UDP (host, port)
Watch = tuple[int, Callable[[], None]]  # an fd to watch for reading, and what to call then


class TunView(Protocol):
    @property
    def name(self) -> str: ...
    @property
    def address(self) -> bytes | None: ...  # the tun's IPv4 address (4 bytes)
    @property
    def network(self) -> ipaddress.IPv4Network | None: ...


class RouterView(Protocol):
    """What services read of the loop's router, whatever the wire."""

    @property
    def client(self) -> bool: ...
    @property
    def mss(self) -> int | None: ...  # the MSS clamp (None: off)
    @property
    def store(self) -> PeerStore | None: ...  # server: the peers (None: no pool)
    @property
    def timeout(self) -> float: ...  # seconds before an idle peer (flow) is forgotten


class UdpRouterView(RouterView, Protocol):
    """The default wire's router (core.Router)."""

    @property
    def endpoint_port(self) -> int | None: ...
    @property
    def max_peers(self) -> int: ...
    @property
    def servers(self) -> Mapping[Address, ServerState]: ...
    @property
    def remotes(self) -> Mapping[Address, float]: ...  # client: server -> last TX time
    def auth_state(self, dest: Address, now: float) -> str: ...
    def keepalive_targets(self, now: float) -> Iterable[Address]: ...


class FlowsRouterView(RouterView, Protocol):
    """The TCP-in-UDP router (tiumode.TiuRouter)."""

    @property
    def flows(self) -> Mapping[bytes, Any]: ...


@runtime_checkable
class TunnelView(Protocol):
    """What services read of the tunnel the loop runs."""

    @property
    def router(self) -> RouterView: ...
    @property
    def tun(self) -> TunView: ...
    @property
    def counters(self) -> Counters: ...
    @property
    def sock(self) -> socket.socket | None: ...  # None: no single UDP socket (tcp-in-udp)
    @property
    def links(self) -> Links | None: ...  # following the tun and the bound interface (None: not)
    @property
    def data_path(self) -> str: ...  # in words, for the operator
    @property
    def tun_header_len(self) -> int: ...  # non-zero: the tun carries offload headers
    def clock(self) -> float: ...  # the loop's monotonic clock


@runtime_checkable
class UdpTunnelView(TunnelView, Protocol):
    @property
    def router(self) -> UdpRouterView: ...


@runtime_checkable
class FlowsTunnelView(TunnelView, Protocol):
    @property
    def router(self) -> FlowsRouterView: ...
    @property
    def device(self) -> str | None: ...  # the interface the flows' sockets are bound to
    def describe_flows(self, now: float) -> dict[str, Any]: ...

HOUSEKEEPING = 1.0  # seconds between the loop's timer runs (Service.tick)


class Service:
    """Something that lives beside the data path in the same loop (status
    socket, service manager notification...).  Override what you need."""

    def watch(self, tunnel: TunnelView) -> Iterable[Watch]:
        """(fd, callback) pairs to watch for reading; called once at start."""
        return ()

    def ready(self, tunnel: TunnelView) -> None:
        """The tun and the socket are up and the loop is about to run."""

    def tick(self, tunnel: TunnelView, now: float) -> None:
        """Called about every HOUSEKEEPING seconds."""

    def close(self, tunnel: TunnelView) -> None:
        """The loop has ended."""
