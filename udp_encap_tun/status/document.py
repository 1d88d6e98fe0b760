"""The status document: what ``udp-encap-tun status`` shows, built from the
tunnel's view (service.TunnelView) and encoded in chunks (a server's peers
PEERS_PER_CHUNK at a time, so that the server can interleave the work with the
data path)."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

from .. import build
from ..service import FlowsTunnelView, RouterView, TunnelView, UdpRouterView

if TYPE_CHECKING:
    from ..faults import Links
    from ..store import AddressPool, Entry

VERSION = 1  # of the document layout
PEERS_PER_CHUNK = 128  # peers encoded per slice (about 25 kB)

Document = dict[str, Any]

_ntoa = socket.inet_ntoa


def _address_text(address: bytes) -> str:
    """A tunnel address (4 or 16 bytes) as text."""
    return socket.inet_ntop(socket.AF_INET6 if len(address) == 16 else socket.AF_INET, address)


def endpoint_text(host: str, port: int | None) -> str:
    """A UDP peer as people write it: 192.0.2.1:5000, [2001:db8::1]:5000."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"




def _bound_device(sock: socket.socket) -> str | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace") or None


def describe_head(tunnel: TunnelView, now: float, wall: float, started: float | None = None,
                  extra: dict[str, Any] | None = None) -> Document:
    """Everything but the server's peer list (cheap: no per-peer work)."""
    router, tun = tunnel.router, tunnel.tun
    sock = tunnel.sock
    listen_address: str | None = None
    listen_port: int | None = None
    if sock is not None:  # else no single socket (tcp-in-udp)
        with contextlib.suppress(OSError):
            listen_address, listen_port = sock.getsockname()[:2]
    tun_address = (f"{_ntoa(tun.address)}/{tun.network.prefixlen}"
                   if tun.address and tun.network is not None else None)
    address6: bytes | None = getattr(tun, "address6", None)
    network6: ipaddress.IPv6Network | None = getattr(tun, "network6", None)
    tun_address6 = (f"{_address_text(address6)}/{network6.prefixlen}"
                    if address6 and network6 is not None else None)
    doc: Document = {
        "program": "udp-encap-tun",
        "version": VERSION,
        "pid": os.getpid(),
        "interface": tun.name,
        "mode": "client" if router.client else "server",
        "bind_interface": (_bound_device(sock) if sock is not None
                           else getattr(tunnel, "device", None)),
        "listen_address": listen_address,
        "listen_port": listen_port,
        "endpoint_port": getattr(router, "endpoint_port", None),
        "tun_address": tun_address,
        "tun_address6": tun_address6,
        "mss_clamp": router.mss,
        "data_path": tunnel.data_path,
        "build": build.describe(),
        "offload": {"tun": bool(getattr(tunnel, "tun_header_len", 0)),
                    "gso": bool(getattr(tunnel, "gso", False)),
                    "gro": bool(getattr(tunnel, "gro", False))},
        "time": round(wall, 3),
        "started": round(started, 3) if started is not None else None,
        "uptime": round(wall - started, 1) if started is not None else None,
    }
    links: Links | None = getattr(tunnel, "links", None)
    if links is not None:  # followed by the loop (the socket's own binding is lost with the link)
        doc.update(bind_interface=links.bind_name, bind_interface_present=links.bind_present,
                   link_mtu=links.bind_mtu, mtu=links.tun_mtu)
    doc.update(extra or {})
    if hasattr(tunnel, "describe_flows"):  # tcp-in-udp: flows, no peers or servers
        doc.update(cast(FlowsTunnelView, tunnel).describe_flows(now))
    elif router.client:
        doc["servers"] = client_servers(cast(UdpRouterView, router), now)
    else:
        store = router.store  # one store holds the peers of both families
        pools: dict[int, AddressPool | None] = {4: None, 6: None}
        if store is not None:  # what the last sweep (up to a second ago) left: never shown
            store.expire(now)
            pools.update((pool.network.version, pool) for pool in (store.pool, store.pool6)
                         if pool is not None)
        doc["peer_timeout"] = router.timeout
        doc["max_peers"] = cast(UdpRouterView, router).max_peers
        for key, pool in (("pool", pools[4]), ("pool6", pools[6])):
            doc[key] = str(pool.network) if pool is not None else None
            doc[key + "_capacity"] = pool.capacity if pool is not None else None
        doc["peer_count"] = len(store) if store is not None else 0
    doc["counters"] = tunnel.counters.snapshot()
    return doc


def _ago(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 1)


def client_servers(router: UdpRouterView, now: float) -> list[dict[str, Any]]:
    """Client: each server it talks to (bounded: 4096), most recently sent to
    first, with seconds since we last sent to it (anything), last used it for
    TCP and last heard from it (None: never), and the authentication state."""
    servers = []
    for (host, port), server in router.servers.items():
        last_used = router.remotes.get((host, port))
        last_sent = server.last_sent
        if last_used is not None and (last_sent is None or last_used > last_sent):
            last_sent = last_used
        servers.append({"server": endpoint_text(host, port), "host": host, "port": port,
                        "last_sent": _ago(now, last_sent), "last_used": _ago(now, last_used),
                        "last_heard": _ago(now, server.last_heard),
                        "auth": router.auth_state((host, port), now)})
    servers.sort(key=lambda s: (s["last_sent"] is None, s["last_sent"] or 0.0))
    return servers


def peer_entries(tunnel: TunnelView) -> list[Entry]:
    """Server: the peers' store entries, oldest first (client: none).  Not sorted
    here: sorting 65536 peers would stall the loop; the renderers sort."""
    router: RouterView = tunnel.router
    store = router.store
    if router.client or store is None:
        return []
    return store.entries()


_PEER_JSON = ('{"peer":"%s","host":"%s","port":%d,"address":"%s","last_heard":%.1f,'
              '"connected":%.1f,"rx_packets":%d,"rx_bytes":%d,"tx_packets":%d,"tx_bytes":%d}')


def _peer_json(e: Entry, now: float) -> str:
    host, port = e.peer  # a socket address: an IPv4 or IPv6 literal, nothing to escape
    address = _ntoa(e.address) if len(e.address) == 4 else _address_text(e.address)
    return _PEER_JSON % (endpoint_text(host, port), host, port, address,
                         max(0.0, now - e.refreshed), max(0.0, now - e.created),
                         e.rx_packets, e.rx_bytes, e.tx_packets, e.tx_bytes)


def encode(head: Document, entries: list[Entry], now: float,
           per_chunk: int = PEERS_PER_CHUNK) -> Iterator[bytes]:
    """The document as byte chunks: the head, then the peers *per_chunk* at a time."""
    if head["mode"] != "server":
        yield (json.dumps(head, separators=(",", ":")) + "\n").encode()
        return
    text = json.dumps(head, separators=(",", ":"))[:-1] + ',"peers":['
    for i in range(0, len(entries), per_chunk):
        text += ("," if i else "") + ",".join(_peer_json(e, now) for e in entries[i:i + per_chunk])
        yield text.encode()
        text = ""
    yield (text + "]}\n").encode()


def describe(tunnel: TunnelView, now: float, wall: float, started: float | None = None,
             extra: dict[str, Any] | None = None) -> Document:
    """The whole status document of *tunnel* at loop time *now* (wall clock *wall*)."""
    head = describe_head(tunnel, now, wall, started, extra)
    doc: Document = json.loads(b"".join(encode(head, peer_entries(tunnel), now)))
    return doc
