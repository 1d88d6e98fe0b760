"""Live status of a running tunnel: the daemon side (StatusServer, a Service in
the tunnel's loop) and the ``udp-encap-tun status`` command.

Transport: the abstract unix stream socket ``\\0udp-encap-tun/<tun name>``.
Abstract names belong to the network namespace, like interface names, so
``status --interface tun0`` run in the tunnel's namespace finds that tunnel.
The server accepts, writes one JSON document and closes; it never reads.

The daemon side never blocks the loop and never stalls it.  The service keeps
its own epoll set (the listener and the connections being written) and gives
the tunnel's epoll loop only that epoll's descriptor, so it is called exactly
when a connection can be accepted or written.  The document is encoded in
slices of PEERS_PER_CHUNK peers, about SLICE seconds of work each time the
loop calls us, and only as fast as the reader takes them: a server with 65536
peers (a 13 MB document, about half a second of encoding) interleaves that work
with the data path instead of stopping it.  At most
MAX_CLIENTS connections are served at once (more wait in the listen backlog)
and a connection that has not taken its document after SEND_DEADLINE seconds
is closed, so a client that connects and never reads costs a bounded amount.
Every call from the loop is bounded by count and by time: at most
ACCEPTS_PER_CALL accepts (refused and small answers free their slot at once,
so a local user's connect/close loop would otherwise keep the backlog, and us,
busy forever) and about SLICE seconds of writing; what is left waits for the
loop's next turn, after the data path had its own.
The counters, the peer list and the time are taken when the connection is
accepted; each peer's numbers are read as its slice is encoded.

Only root and the tunnel's own user get the document (SO_PEERCRED), unless the
daemon runs with ``--status-public``: an abstract socket has no file
permissions, and the document lists the peers' public addresses.

If the abstract name is taken when the tunnel starts, it logs a warning and
runs without live status.  The tun name is already exclusive in a namespace
(a second tunnel on the same tun fails to attach), so the name can only be
held by something else; and since any local user can bind an abstract name,
failing would let any user stop the tunnel from starting.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import select
import socket
import struct
import sys
import time

from . import drops
from .service import Service
from .errors import OneLineErrors, positive

log = logging.getLogger(__name__)

PROG = "udp-encap-tun status"
NAME_PREFIX = "udp-encap-tun/"
VERSION = 1  # of the document layout

BACKLOG = 16
MAX_CLIENTS = 8  # connections being served at once
ACCEPTS_PER_CALL = 4  # connections accepted per call from the loop, then the data path again
SEND_DEADLINE = 10.0  # seconds a client has to take its whole document
PEERS_PER_CHUNK = 128  # peers encoded per slice (about 25 kB)
SLICE = 0.002  # seconds of encoding per call from the loop, then the data path again
UCRED = struct.Struct("3i")  # pid, uid, gid
TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds


def socket_name(interface: str) -> bytes:
    """The abstract socket address of the tunnel on *interface*."""
    return b"\0" + (NAME_PREFIX + interface).encode()


def display_name(interface: str) -> str:
    return "@" + NAME_PREFIX + interface


# --------------------------------------------------------------------------- the document

_ntoa = socket.inet_ntoa


def _bound_device(sock: socket.socket) -> str | None:
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, 16)
    except OSError:
        return None
    return raw.split(b"\0", 1)[0].decode(errors="replace") or None


def describe_head(tunnel, now: float, wall: float, started: float | None = None,
                  extra: dict | None = None) -> dict:
    """Everything but the server's peer list (cheap: no per-peer work)."""
    router, tun, store = tunnel.router, tunnel.tun, tunnel.router.store
    try:
        listen_address, listen_port = tunnel.sock.getsockname()[:2]
    except (OSError, AttributeError):  # no single socket (tcp-in-udp)
        listen_address, listen_port = None, None
    tun_address = (f"{_ntoa(tun.address)}/{tun.network.prefixlen}"
                   if tun.address and tun.network is not None else None)
    doc = {
        "program": "udp-encap-tun",
        "version": VERSION,
        "pid": os.getpid(),
        "interface": tun.name,
        "mode": "client" if router.client else "server",
        "bind_interface": (_bound_device(tunnel.sock) if tunnel.sock is not None
                           else getattr(tunnel, "device", None)),
        "listen_address": listen_address,
        "listen_port": listen_port,
        "endpoint_port": getattr(router, "endpoint_port", None),
        "tun_address": tun_address,
        "mss_clamp": router.mss,
        "data_path": tunnel.data_path,
        "offload": {"tun": bool(getattr(tunnel, "tun_header_len", 0)),
                    "gso": bool(getattr(tunnel, "gso", False)),
                    "gro": bool(getattr(tunnel, "gro", False))},
        "time": round(wall, 3),
        "started": round(started, 3) if started is not None else None,
        "uptime": round(wall - started, 1) if started is not None else None,
    }
    links = getattr(tunnel, "links", None)
    if links is not None:  # followed by the loop (the socket's own binding is lost with the link)
        doc.update(bind_interface=links.bind_name, bind_interface_present=links.bind_present,
                   link_mtu=links.bind_mtu, mtu=links.tun_mtu)
    doc.update(extra or {})
    if hasattr(tunnel, "describe_flows"):  # tcp-in-udp: flows, no peers or servers
        doc.update(tunnel.describe_flows(now))
    elif router.client:
        doc["servers"] = client_servers(router, now)
    else:
        if store is not None:  # what the last sweep (up to a second ago) left: never shown
            store.expire(now)
        doc["peer_timeout"] = router.timeout
        doc["max_peers"] = router.max_peers
        doc["pool"] = str(store.pool.network) if store is not None else None
        doc["pool_capacity"] = store.pool.capacity if store is not None else None
        doc["peer_count"] = len(store) if store is not None else 0
    doc["counters"] = tunnel.counters.snapshot()
    return doc


def _ago(now: float, then: float | None) -> float | None:
    return None if then is None else round(max(0.0, now - then), 1)


def client_servers(router, now: float) -> list:
    """Client: each server it talks to (bounded: 4096), most recently sent to
    first, with seconds since we last sent to it (anything), last used it for
    TCP and last heard from it (None: never), and the authentication state."""
    servers = []
    for (host, port), server in router.servers.items():
        last_used = router.remotes.get((host, port))
        last_sent = server.last_sent
        if last_used is not None and (last_sent is None or last_used > last_sent):
            last_sent = last_used
        servers.append({"server": f"{host}:{port}", "host": host, "port": port,
                        "last_sent": _ago(now, last_sent), "last_used": _ago(now, last_used),
                        "last_heard": _ago(now, server.last_heard),
                        "auth": router.auth_state((host, port), now)})
    servers.sort(key=lambda s: (s["last_sent"] is None, s["last_sent"] or 0.0))
    return servers


def peer_entries(tunnel) -> list:
    """Server: the peers' store entries, oldest first (client: none).  Not sorted
    here: sorting 65536 peers would stall the loop; the renderers sort."""
    store = tunnel.router.store
    if tunnel.router.client or store is None:
        return []
    return store.entries()


_PEER_JSON = ('{"peer":"%s:%d","host":"%s","port":%d,"address":"%s","last_heard":%.1f,'
              '"connected":%.1f,"rx_packets":%d,"rx_bytes":%d,"tx_packets":%d,"tx_bytes":%d}')


def _peer_json(e, now: float) -> str:
    host, port = e.peer  # a socket address: an IPv4 literal, nothing to escape
    return _PEER_JSON % (host, port, host, port, _ntoa(e.address),
                         max(0.0, now - e.refreshed), max(0.0, now - e.created),
                         e.rx_packets, e.rx_bytes, e.tx_packets, e.tx_bytes)


def encode(head: dict, entries: list, now: float, per_chunk: int = PEERS_PER_CHUNK):
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


def describe(tunnel, now: float, wall: float, started: float | None = None,
             extra: dict | None = None) -> dict:
    """The whole status document of *tunnel* at loop time *now* (wall clock *wall*)."""
    head = describe_head(tunnel, now, wall, started, extra)
    return json.loads(b"".join(encode(head, peer_entries(tunnel), now)))


# --------------------------------------------------------------------------- the daemon side

_REFUSED = (b'{"program":"udp-encap-tun","error":"permission denied: only root and the '
            b'tunnel\'s user may read its status"}\n')


class _Client:
    __slots__ = ("conn", "chunks", "buffer", "deadline")

    def __init__(self, conn, chunks, deadline):
        self.conn, self.chunks, self.buffer, self.deadline = conn, chunks, b"", deadline


class StatusServer(Service):
    """Serves the status document on the tunnel's abstract socket."""

    def __init__(self, public: bool = False, extra: dict | None = None):
        self.public = public
        self.extra = dict(extra or {})
        self.listener: socket.socket | None = None
        self.poller = None
        self.tunnel = None
        self.clients: dict[int, _Client] = {}
        self.accepting = False
        self.started: float | None = None
        self.served = 0
        self.refused = 0

    # -- Service hooks ---------------------------------------------------------
    def watch(self, tunnel):
        self.tunnel = tunnel
        name = tunnel.tun.name
        sock = socket.socket(socket.AF_UNIX,
                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            sock.bind(socket_name(name))
            sock.listen(BACKLOG)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                log.warning("status socket %s is taken by another process in this network "
                            "namespace: running without live status", display_name(name))
            else:
                log.warning("status socket %s: %s: running without live status",
                            display_name(name), exc.strerror or exc)
            return ()
        self.listener = sock
        self.poller = select.epoll()
        self.poller.register(sock.fileno(), select.EPOLLIN)
        self.accepting = True
        log.debug("live status on %s", display_name(name))
        return ((self.poller.fileno(), self.on_event),)

    def ready(self, tunnel) -> None:
        self.started = time.time()

    def tick(self, tunnel, now: float) -> None:
        for fd, client in list(self.clients.items()):
            if now >= client.deadline:  # a reader that does not read
                self._finish(fd)

    def close(self, tunnel) -> None:
        for fd in list(self.clients):
            self._finish(fd)
        if self.poller is not None:
            self.poller.close()
            self.poller = None
        if self.listener is not None:
            self.listener.close()
            self.listener = None

    # -- events ------------------------------------------------------------------
    def on_event(self) -> None:
        """Our epoll is readable: accept and/or write, a bounded amount each."""
        listen_fd = self.listener.fileno()
        until = time.perf_counter() + SLICE
        for fd, _events in self.poller.poll(0):
            if fd == listen_fd:
                self._accept(until)
            elif fd in self.clients:
                self._write(fd, until)

    def _accept(self, until: float) -> None:
        now = self.tunnel.clock()
        for i in range(ACCEPTS_PER_CALL):
            if len(self.clients) >= MAX_CLIENTS or (i and time.perf_counter() >= until):
                break  # the rest waits in the backlog for the loop's next turn
            try:
                conn, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:  # e.g. out of descriptors: try again at the next event
                log.debug("status accept: %s", exc)
                break
            conn.setblocking(False)
            if self.allowed(conn):
                head = describe_head(self.tunnel, now, time.time(), self.started, self.extra)
                chunks = encode(head, peer_entries(self.tunnel), now)
                self.served += 1
            else:
                chunks = iter((_REFUSED,))
                self.refused += 1
            fd = conn.fileno()
            self.clients[fd] = _Client(conn, chunks, now + SEND_DEADLINE)
            self.poller.register(fd, select.EPOLLOUT)
            self._write(fd, until)  # a small document goes at once
        self._listen(len(self.clients) < MAX_CLIENTS)

    def _listen(self, on: bool) -> None:
        """Full: leave new clients in the backlog (and stop the listener waking us)."""
        if on != self.accepting and self.poller is not None:
            self.poller.modify(self.listener.fileno(), select.EPOLLIN if on else 0)
            self.accepting = on

    def _write(self, fd: int, until: float) -> None:
        """Send what the socket takes, encoding more until *until* (perf_counter)."""
        client = self.clients[fd]
        send = client.conn.send
        flags = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
        first = True
        while first or time.perf_counter() < until:  # always some progress
            first = False
            if not client.buffer:
                client.buffer = next(client.chunks, b"")
                if not client.buffer:
                    self._finish(fd)  # all sent
                    return
            try:
                n = send(client.buffer, flags)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the reader went away
                self._finish(fd)
                return
            client.buffer = client.buffer[n:]
            if client.buffer:
                return  # the socket is full: epoll tells us when it drains

    def _finish(self, fd: int) -> None:
        client = self.clients.pop(fd)
        try:
            self.poller.unregister(fd)
        except (OSError, ValueError):
            pass
        client.conn.close()
        self._listen(True)

    def allowed(self, conn: socket.socket) -> bool:
        if self.public:
            return True
        try:
            _pid, uid, _gid = UCRED.unpack(
                conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, UCRED.size))
        except OSError:
            return False
        return uid in (0, os.geteuid())


# --------------------------------------------------------------------------- rendering


def format_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError  # pragma: no cover


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    s = int(seconds)
    d, s = divmod(s, 86400)
    h, s = divmod(s, 3600)
    m, s = divmod(s, 60)
    parts = [f"{d}d"] if d else []
    if d or h:
        parts.append(f"{h}h")
    parts.append(f"{m}m")
    if not d:
        parts.append(f"{s}s")
    return " ".join(parts)


def split_counters(counters: dict):
    """(by_direction, other): by_direction[name] = {"tx": n, "rx": n} where name is
    'packets', 'bytes', 'drop_<reason>' or another per-direction event."""
    by_direction: dict[str, dict[str, int]] = {}
    other: dict[str, int] = {}
    for key, value in counters.items():
        direction, _, rest = key.partition("_")
        if direction in ("tx", "rx") and rest:
            by_direction.setdefault(rest, {})[direction] = value
        else:
            other[key] = value
    return by_direction, other


def _table(rows, align: str, indent: str = "  ") -> list[str]:
    """Rows of cells as aligned lines; *align* has 'l' or 'r' per column."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [(indent + "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(row, widths, align))).rstrip()
            for row in rows]


def _ago_text(seconds: float | None) -> str:
    return "never" if seconds is None else format_duration(seconds) + " ago"


def render_text(doc: dict) -> str:
    lines = []
    head = f"udp-encap-tun on {doc['interface']}: {doc['mode']}, pid {doc['pid']}"
    if doc.get("uptime") is not None:
        head += f", up {format_duration(doc['uptime'])}"
    lines.append(head)
    udp = f"{doc.get('listen_address') or '0.0.0.0'}:{doc.get('listen_port')}"
    bound = ""
    if doc.get("bind_interface"):
        bound = f" on {doc['bind_interface']}"
        if doc.get("bind_interface_present") is False:
            bound += " (MISSING: datagrams are dropped until an interface of that name is back)"
        elif doc.get("link_mtu"):
            bound += f" (MTU {doc['link_mtu']})"
    udp += bound
    if doc.get("endpoint_port") is not None:
        udp += f", sends to each destination's UDP port {doc['endpoint_port']}"
    facts = [("UDP socket", udp)]
    if doc.get("wire") == "tcp-in-udp":
        facts = [("wire", f"tcp-in-udp, {'to' if doc['mode'] == 'client' else 'on'} ports "
                          f"{doc['ports']}{bound}")]
    tun = doc.get("tun_address") or "no address"
    if doc.get("mtu"):
        tun += f", MTU {doc['mtu']}"
    tun += f", MSS clamp {doc['mss_clamp']}" if doc.get("mss_clamp") else ", MSS clamp off"
    facts.append(("tun", tun))
    facts.append(("data path", doc.get("data_path", "?")))
    if doc.get("wire") == "tcp-in-udp":
        facts.append(("flows", f"{doc['flow_count']} (at most {doc['max_flows']}; forgotten "
                               f"after {doc['flow_timeout']:g}s without a packet)"))
    elif doc["mode"] == "server":
        peers = doc.get("peers", [])
        if doc.get("pool"):
            pool = f"pool {doc['pool']}, {doc['pool_capacity']} addresses"
        else:
            pool = "no pool (no tun address): new peers are refused"
        facts.append(("peers", f"{len(peers)} (at most {doc.get('max_peers')}; {pool}; "
                               f"forgotten after {doc.get('peer_timeout'):g}s without a datagram)"))
    else:
        facts.append(("servers", str(len(doc.get("servers", [])))))
    width = max(len(k) for k, _ in facts) + 1
    lines += [f"  {(k + ':').ljust(width)}  {v}" for k, v in facts]

    if doc["mode"] == "server" and doc.get("peers"):
        rows = [("PEER", "ADDRESS", "LAST HEARD", "CONNECTED", "RX PACKETS", "RX BYTES",
                 "TX PACKETS", "TX BYTES")]
        for p in sorted(doc["peers"], key=lambda p: socket.inet_aton(p["address"])):
            rows.append((p["peer"], p["address"], format_duration(p["last_heard"]) + " ago",
                         format_duration(p["connected"]), p["rx_packets"],
                         format_bytes(p["rx_bytes"]), p["tx_packets"], format_bytes(p["tx_bytes"])))
        lines.append("")
        lines += _table(rows, "llrrrrrr")
    elif doc.get("flows"):
        rows = [("LOCAL", "REMOTE", "LAST PACKET", "AGE", "RX PACKETS", "RX BYTES",
                 "TX PACKETS", "TX BYTES")]
        for f in doc["flows"]:
            rows.append((f["local"], f["remote"], format_duration(f["last"]) + " ago",
                         format_duration(f["age"]), f["rx_packets"], format_bytes(f["rx_bytes"]),
                         f["tx_packets"], format_bytes(f["tx_bytes"])))
        lines.append("")
        lines += _table(rows, "llrrrrrr")
        if doc["flow_count"] > len(doc["flows"]):
            lines.append(f"  ({doc['flow_count'] - len(doc['flows'])} older flows not shown)")
    elif doc["mode"] == "client" and doc.get("servers"):
        rows = [("SERVER", "LAST SENT", "LAST HEARD", "AUTHENTICATION")]
        rows += [(s["server"], _ago_text(s.get("last_sent")), _ago_text(s.get("last_heard")),
                  s.get("auth", "-")) for s in doc["servers"]]
        lines.append("")
        lines += _table(rows, "lrrl")

    by_direction, other = split_counters(doc.get("counters", {}))
    for name in ("packets", "bytes"):
        by_direction.setdefault(name, {})
    order = ["packets", "bytes"] + sorted(k for k in by_direction if k.startswith("drop_")) + \
        sorted(k for k in by_direction if k not in ("packets", "bytes") and not k.startswith("drop_"))
    rows = [("COUNTER", "TX", "RX")]
    for name in order:
        tx, rx = by_direction[name].get("tx", 0), by_direction[name].get("rx", 0)
        if name == "bytes":
            tx, rx = f"{tx} ({format_bytes(tx)})", f"{rx} ({format_bytes(rx)})"
        label = f"dropped: {name[5:].replace('_', ' ')}" if name.startswith("drop_") else \
            name.replace("_", " ")
        rows.append((label, tx, rx))
    lines.append("")
    lines += _table(rows, "lrr")
    if not any(k.startswith("drop_") for k in by_direction):
        lines.append("  (no drops)")
    if other:
        lines.append("")
        lines += _table([("OTHER", "")] + [(k.replace("_", " "), v) for k, v in sorted(other.items())],
                        "lr")
    return "\n".join(lines) + "\n"


def _label_value(value) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"


def _metric_name(text: str) -> str:
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in text)
    return name if not name[:1].isdigit() else "_" + name


class _Exposition:
    def __init__(self):
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, labels: dict, value) -> None:
        family = self.families.setdefault(name, (kind, help_text, []))
        if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
            value = int(value)
        family[2].append(f"{name}{_labels(labels)} {value}")

    def text(self) -> str:
        out = []
        for name, (kind, help_text, samples) in self.families.items():
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out += samples
        return "\n".join(out) + "\n"


AUTH_STATES = ("no key", "pending", "authenticated", "failing")


def prometheus_down(interface: str) -> str:
    m = _Exposition()
    m.add("udp_encap_tun_up", "gauge", "1 if the tunnel answered the status query.",
          {"interface": interface}, 0)
    return m.text()


def render_prometheus(doc: dict, per_peer: bool = False) -> str:
    """Prometheus text exposition format (for node exporter's textfile collector)."""
    iface = {"interface": doc["interface"]}
    m = _Exposition()
    p = "udp_encap_tun_"
    m.add(p + "up", "gauge", "1 if the tunnel answered the status query.", iface, 1)
    offload = doc.get("offload") or {}
    m.add(p + "info", "gauge", "Facts about the tunnel in labels; the value is always 1.",
          {**iface, "mode": doc["mode"], "bind_interface": doc.get("bind_interface") or "",
           "listen_port": doc.get("listen_port") or "",
           "endpoint_port": doc.get("endpoint_port") or "",
           "tun_address": doc.get("tun_address") or "",
           "data_path": "offload" if offload.get("tun") else "simple",
           "gso": str(bool(offload.get("gso"))).lower(),
           "gro": str(bool(offload.get("gro"))).lower()}, 1)
    if doc.get("bind_interface_present") is not None:
        m.add(p + "bind_interface_present", "gauge", "1 while the interface the UDP socket is "
              "bound to exists, 0 while it is missing.", iface, int(doc["bind_interface_present"]))
    if doc.get("mtu"):
        m.add(p + "tun_mtu", "gauge", "The tun's MTU.", iface, doc["mtu"])
    if doc.get("started") is not None:
        m.add(p + "start_time_seconds", "gauge", "When the tunnel started, in seconds since "
              "the epoch.", iface, doc["started"])
    by_direction, other = split_counters(doc.get("counters", {}))
    for what in ("packets", "bytes"):
        for direction in ("tx", "rx"):
            where = "sent as UDP" if direction == "tx" else "received over UDP and written to the tun"
            m.add(f"{p}{direction}_{what}_total", "counter",
                  f"TCP {'segments' if what == 'packets' else 'segment bytes'} {where}.",
                  iface, by_direction.get(what, {}).get(direction, 0))
    for direction in drops.DIRECTIONS:
        # the table's reasons of the default wire are exported as 0 until counted
        reasons = drops.reasons(direction, tiu_only=False) | {
            k[5:] for k, v in by_direction.items() if k.startswith("drop_") and direction in v}
        for reason in sorted(reasons):
            m.add(p + "drops_total", "counter",
                  "Packets dropped, by direction (tx: tun to UDP, rx: UDP to tun) and reason.",
                  {**iface, "direction": direction, "reason": reason},
                  by_direction.get("drop_" + reason, {}).get(direction, 0))
    for name in sorted(k for k in by_direction if k not in ("packets", "bytes")
                       and not k.startswith("drop_")):
        for direction, value in sorted(by_direction[name].items()):
            metric = _metric_name(f"{p}{direction}_{name}_total")
            m.add(metric, "counter", f"Counter {direction}_{name}.", iface, value)
    defaults = {"internal_error": 0}
    if doc.get("wire") == "tcp-in-udp":
        defaults.update(flows_added=0, flows_expired=0)
    elif doc["mode"] == "server":
        defaults.update(peers_added=0, peers_expired=0)
    for name, value in sorted({**defaults, **other}.items()):
        if name.startswith("auth_fail_"):
            m.add(p + "auth_failures_total", "counter", "Failed authentication steps, by reason.",
                  {**iface, "reason": name[10:]}, value)
        elif name.startswith("auth_"):
            m.add(p + "auth_events_total", "counter", "Authentication steps that succeeded.",
                  {**iface, "event": name[5:]}, value)
        else:
            m.add(_metric_name(f"{p}{name}_total"), "counter", f"Counter {name}.", iface, value)
    if doc.get("wire") == "tcp-in-udp":
        m.add(p + "flows", "gauge", "TCP-in-UDP flows the tunnel currently knows.", iface,
              doc.get("flow_count", 0))
        m.add(p + "flows_max", "gauge", "At most this many flows at once (--max-peers).", iface,
              doc.get("max_flows") or 0)
    elif doc["mode"] == "server":
        peers = doc.get("peers", [])
        m.add(p + "peers", "gauge", "Peers the server currently knows.", iface, len(peers))
        m.add(p + "peers_max", "gauge", "At most this many peers at once (--max-peers).", iface,
              doc.get("max_peers") or 0)
        if doc.get("pool_capacity") is not None:
            m.add(p + "pool_addresses", "gauge", "Addresses the pool can hand out.", iface,
                  doc["pool_capacity"])
        if per_peer:
            for peer in peers:
                labels = {**iface, "peer": peer["peer"], "address": peer["address"]}
                for key in ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes"):
                    m.add(f"{p}peer_{key}_total", "counter", f"Per peer: {key.replace('_', ' ')}.",
                          labels, peer[key])
                m.add(p + "peer_last_heard_seconds", "gauge",
                      "Per peer: seconds since the last datagram from it.", labels,
                      peer["last_heard"])
    else:
        servers = doc.get("servers", [])
        m.add(p + "servers", "gauge", "Servers the client sent to recently.", iface, len(servers))
        for server in servers:
            labels = {**iface, "server": server["server"]}
            for key, what in (("last_sent", "we last sent it anything"),
                              ("last_heard", "we last heard from it (absent: never)")):
                if server.get(key) is not None:
                    m.add(f"{p}server_{key}_seconds", "gauge",
                          f"Per server: seconds since {what}.", labels, server[key])
            for state in AUTH_STATES:
                m.add(p + "server_auth", "gauge", "Per server: 1 for its authentication state "
                      "(no key, pending, authenticated, failing).",
                      {**labels, "state": state}, int(server.get("auth") == state))
    return m.text()


# --------------------------------------------------------------------------- the command


class StatusError(Exception):
    pass


def query(interface: str, timeout: float = 5.0) -> dict:
    """The status document of the tunnel on *interface* in this network namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + timeout
    try:
        # A blocking connect to a unix socket whose backlog is full waits for room, up
        # to SO_SNDTIMEO (a non-blocking one fails at once with EAGAIN)
        seconds = max(timeout, 0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6)))
        try:
            sock.connect(socket_name(interface))
        except (ConnectionRefusedError, FileNotFoundError):
            raise StatusError(f"no udp-encap-tun is running on {interface} in this network "
                              "namespace") from None
        except (BlockingIOError, TimeoutError):  # the backlog stayed full
            raise StatusError(f"the tunnel on {interface} did not accept within {timeout:g}s") from None
        chunks = []
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                raise StatusError(f"the tunnel on {interface} did not answer within "
                                  f"{timeout:g}s") from None
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        raise StatusError(f"status of {interface}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("program") != "udp-encap-tun":
        raise StatusError(f"{display_name(interface)} did not answer with a udp-encap-tun status "
                          "document (incomplete, or another program holds the name)")
    if doc.get("error"):
        raise StatusError(f"tunnel on {interface}: {doc['error']}")
    return doc


class _Parser(OneLineErrors, argparse.ArgumentParser):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Show the live status of the udp-encap-tun running on a "
                "tun device. Run it in the tunnel's network namespace, as root or the "
                "tunnel's user.")
    p.add_argument("--interface", metavar="TUN",
                   help="the tunnel's tun device (default: 'interface' from --config)")
    p.add_argument("--config", metavar="FILE",
                   help="take the interface from this udp-encap-tun config file")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the JSON status document")
    fmt.add_argument("--prometheus", action="store_true",
                     help="print Prometheus text exposition format (node exporter textfile "
                          "collector); prints udp_encap_tun_up 0 when no tunnel answers")
    p.add_argument("--per-peer", action="store_true",
                   help="with --prometheus: metrics for every peer too (one series per peer)")
    p.add_argument("--timeout", type=positive(float), default=5.0, metavar="SECONDS",
                   help="give up after this long (default 5)")
    return p


def interface_from_config(path: str) -> str | None:
    """The ``interface`` setting of a config file (the daemon's syntax: key = value,
    key: value or key value; # and ; comments)."""
    import configargparse

    with open(path) as f:
        items = configargparse.DefaultConfigFileParser().parse(f)
    value = items.get("interface")
    return value if isinstance(value, str) and value else None


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    interface = args.interface
    if interface is None and args.config:
        try:
            interface = interface_from_config(args.config)
        except Exception as exc:  # unreadable, or not a config file
            sys.stderr.write(f"{PROG}: error: {args.config}: {exc}\n")
            return 2
    if not interface:
        sys.stderr.write(f"{PROG}: error: --interface is required (or --config with an "
                         "interface setting)\n")
        return 2
    try:
        doc = query(interface, args.timeout)
    except StatusError as exc:
        if args.prometheus:
            sys.stdout.write(prometheus_down(interface))
        sys.stderr.write(f"udp-encap-tun: error: {exc}\n")
        return 1
    if args.json:
        out = json.dumps(doc, indent=2) + "\n"
    elif args.prometheus:
        out = render_prometheus(doc, per_peer=args.per_peer)
    else:
        out = render_text(doc)
    try:
        sys.stdout.write(out)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
