"""Live status of a running tunnel, by role:

* ``address``: the abstract socket ``\\0udp-encap-tun/<tun name>`` it is served on;
* ``document``: the status document, built from the tunnel's view (service.TunnelView);
* ``server``: StatusServer, the non-blocking Service in the tunnel's loop that serves it;
* ``render``: the text and Prometheus renderings;
* ``command``: the ``udp-encap-tun status`` command (query, parser, main).

What cli.py, notify and the tests use is re-exported here.
"""

from __future__ import annotations

from ..units import format_bytes, format_duration
from .address import NAME_PREFIX, display_name, socket_name
from .command import PROG, StatusError, build_parser, interface_from_config, main, query
from .document import (
    PEERS_PER_CHUNK,
    VERSION,
    Document,
    client_servers,
    describe,
    describe_head,
    encode,
    peer_entries,
)
from .render import AUTH_STATES, prometheus_down, render_prometheus, render_text, split_counters
from .server import ACCEPTS_PER_CALL, BACKLOG, MAX_CLIENTS, SEND_DEADLINE, SLICE, StatusServer

__all__ = [
    "ACCEPTS_PER_CALL", "AUTH_STATES", "BACKLOG", "MAX_CLIENTS", "NAME_PREFIX", "PEERS_PER_CHUNK",
    "PROG", "SEND_DEADLINE", "SLICE", "VERSION", "Document", "StatusError", "StatusServer",
    "build_parser", "client_servers", "describe", "describe_head", "display_name", "encode",
    "format_bytes", "format_duration", "interface_from_config", "main", "peer_entries",
    "prometheus_down", "query", "render_prometheus", "render_text", "socket_name",
    "split_counters",
]
