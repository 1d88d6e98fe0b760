"""Renderings of the status document: text for people (``udp-encap-tun
status``) and the Prometheus text exposition format (``--prometheus``, for node
exporter's textfile collector).  Drop reasons come from drops.py's table."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

from .. import drops
from ..units import format_bytes, format_duration
from .document import Document, endpoint_text


def split_counters(counters: Mapping[str, int]) -> tuple[dict[str, dict[str, int]],
                                                          dict[str, int]]:
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


def _table(rows: Iterable[Iterable[object]], align: str, indent: str = "  ") -> list[str]:
    """Rows of cells as aligned lines; *align* has 'l' or 'r' per column."""
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(cells[0]))]
    return [(indent + "  ".join(c.ljust(w) if a == "l" else c.rjust(w)
                                 for c, w, a in zip(row, widths, align, strict=False))).rstrip()
            for row in cells]


def _address_key(text: str) -> tuple[int, int]:
    """Sort key of a generated address: IPv4 first, then IPv6, each in order."""
    address = ipaddress.ip_address(text)
    return address.version, int(address)


def _ago_text(seconds: float | None) -> str:
    return "never" if seconds is None else format_duration(seconds) + " ago"


def render_text(doc: Document) -> str:
    lines: list[str] = []
    head = f"udp-encap-tun on {doc['interface']}: {doc['mode']}, pid {doc['pid']}"
    if doc.get("uptime") is not None:
        head += f", up {format_duration(doc['uptime'])}"
    lines.append(head)
    udp = endpoint_text(doc.get("listen_address") or "0.0.0.0", doc.get("listen_port"))
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
    tun = ", ".join(a for a in (doc.get("tun_address"), doc.get("tun_address6")) if a) \
        or "no address"
    if doc.get("mtu"):
        tun += f", MTU {doc['mtu']}"
    tun += f", MSS clamp {doc['mss_clamp']}" if doc.get("mss_clamp") else ", MSS clamp off"
    facts.append(("tun", tun))
    facts.append(("data path", doc.get("data_path", "?")))
    facts.append(("build", doc.get("build", "?")))
    if doc.get("wire") == "tcp-in-udp":
        facts.append(("flows", f"{doc['flow_count']} (at most {doc['max_flows']}; forgotten "
                               f"after {doc['flow_timeout']:g}s without a packet)"))
    elif doc["mode"] == "server":
        peers = doc.get("peers", [])
        pools = [f"pool {doc[key]}, {doc[key + '_capacity']} addresses"
                 for key in ("pool", "pool6") if doc.get(key)]
        pool = "; ".join(pools) or "no pool (no tun address): new peers are refused"
        facts.append(("peers", f"{len(peers)} (at most {doc.get('max_peers')}; {pool}; "
                               f"forgotten after {doc.get('peer_timeout'):g}s without a datagram)"))
    else:
        facts.append(("servers", str(len(doc.get("servers", [])))))
    width = max(len(k) for k, _ in facts) + 1
    lines += [f"  {(k + ':').ljust(width)}  {v}" for k, v in facts]

    if doc["mode"] == "server" and doc.get("peers"):
        rows: list[tuple[object, ...]] = [
            ("PEER", "ADDRESS", "LAST HEARD", "CONNECTED", "RX PACKETS", "RX BYTES",
             "TX PACKETS", "TX BYTES")]
        for p in sorted(doc["peers"], key=lambda p: _address_key(p["address"])):
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
        sorted(k for k in by_direction
               if k not in ("packets", "bytes") and not k.startswith("drop_"))
    rows = [("COUNTER", "TX", "RX")]
    for name in order:
        ntx, nrx = by_direction[name].get("tx", 0), by_direction[name].get("rx", 0)
        tx: object = ntx
        rx: object = nrx
        if name == "bytes":
            tx, rx = f"{ntx} ({format_bytes(ntx)})", f"{nrx} ({format_bytes(nrx)})"
        label = f"dropped: {name[5:].replace('_', ' ')}" if name.startswith("drop_") else \
            name.replace("_", " ")
        rows.append((label, tx, rx))
    lines.append("")
    lines += _table(rows, "lrr")
    if not any(k.startswith("drop_") for k in by_direction):
        lines.append("  (no drops)")
    if other:
        lines.append("")
        lines += _table([("OTHER", "")] + [(k.replace("_", " "), v)
                                           for k, v in sorted(other.items())], "lr")
    return "\n".join(lines) + "\n"


def _label_value(value: object) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, object]) -> str:
    return "{" + ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items()) + "}"


def _metric_name(text: str) -> str:
    name = "".join(c if c.isascii() and (c.isalnum() or c == "_") else "_" for c in text)
    return name if not name[:1].isdigit() else "_" + name


class _Exposition:
    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[str]]] = {}

    def add(self, name: str, kind: str, help_text: str, labels: Mapping[str, object],
            value: Any) -> None:
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


def render_prometheus(doc: Document, per_peer: bool = False) -> str:
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
           "tun_address6": doc.get("tun_address6") or "",
           "data_path": "offload" if offload.get("tun") else "simple",
           # the build in one word: compiled, pure or mixed (build.describe()'s first)
           "build": (doc.get("build") or "").split(" ")[0].rstrip(":"),
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
            where = ("sent as UDP" if direction == "tx"
                     else "received over UDP and written to the tun")
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
        if doc.get("pool6_capacity") is not None:
            m.add(p + "pool6_addresses", "gauge", "Addresses the IPv6 pool can hand out.",
                  iface, doc["pool6_capacity"])
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

