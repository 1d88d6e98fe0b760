"""The I/O edge of the TCP-in-UDP wire mode (``--wire tcp-in-udp``): the UDP
sockets (one per listen port on a server, one per flow on a client), the
policy routing that sends the tunnelled TCP into the tun, and the loop's
UDP edge (TiuConn) the loop is given in this mode.  Decisions are in
tiumode.py, the byte mapping in tiu.py, the loop in loop.py."""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import ipaddress
import itertools
import logging
import resource
import socket
import struct
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeAlias

from pyroute2 import IPRoute

from . import offload as ol, packet as pk, tiu
from .conn import (
    SOL_UDP,
    UDP_GRO,
    UDP_SEGMENT,
    Address,
    Batches,
    Buffer,
    IcmpError,
    open_udp,
    probe_udp_offload,
    set_buffers,
    set_path_mtu_discovery,
)
from .errors import OperatorError
from .faults import TIU_OVERHEAD, Links
from .loop import BATCH, RX_AREA, RX_BATCH, SMALL, Loop
from .service import Service
from .tiumode import (
    MAX_PORTS,
    Ancillary,
    Flow,
    FlowDest,
    TiuRouter,
    count_ports,
    format_ranges,
    parse_port_ranges,
)
from .tun import BUFSIZE, OffloadPackets, Packets, Tun

log = logging.getLogger(__name__)

IP_PKTINFO: Final[int] = getattr(socket, "IP_PKTINFO", 8)
TABLE_BASE: Final = 7700000  # routing table of a tunnel: this + the tun's ifindex
RULE_PRIORITY: Final = 1000  # client rules by source address; the others at +1
SHOWN_FLOWS: Final = 256  # flows listed in the status document (the newest)
FLOW_BUFFER: Final = 4 << 20  # socket buffers of a client flow's socket
_PORTS: Final = struct.Struct("!HH")
_PKTINFO: Final = struct.Struct("=I4s4s")
_ZERO_ADDR: Final = bytes(4)
# pyroute2's arguments of a rule or route (kept to delete it again)
Spec: TypeAlias = dict[str, Any]
# a drain's run of one flow's datagrams: (flow, remote ip, local ip, remote port, payloads
# to coalesce, or None and a buffer ready for the tun)
_Group: TypeAlias = tuple[Flow, bytes, bytes, int, list[Buffer] | None, bytearray | None]


# --------------------------------------------------------------------------- policy routing


class PolicyRouting:
    """A routing table with a default route into the tun and the rules that
    send the tunnelled TCP there; everything removed by close()."""

    def __init__(self, tun_index: int, table: int | None = None):
        self.ipr = IPRoute()
        self.tun_index = tun_index
        self.table = table or TABLE_BASE + tun_index
        self.rules: list[Spec] = []
        self.routes: list[Spec] = []

    def _add(self, kind: str, spec: Spec) -> None:
        try:
            getattr(self.ipr, kind)("add", **spec)
        except Exception as exc:
            if getattr(exc, "code", None) == errno.EEXIST:
                return  # left over from a run that was killed: take it over
            raise OperatorError(f"cannot add the {kind} {_describe(spec)}: {exc}") from None
        (self.rules if kind == "rule" else self.routes).append(spec)

    def default_route(self, src: str | None = None) -> None:
        spec: Spec = {"dst": "0.0.0.0", "dst_len": 0, "oif": self.tun_index, "table": self.table}
        if src:
            spec["prefsrc"] = src
        self._add("route", spec)

    def rule(self, priority: int, **match: object) -> None:
        self._add("rule", {"family": socket.AF_INET, "table": self.table, "priority": priority,
                           "ip_proto": socket.IPPROTO_TCP, "iifname": "lo", **match})

    def close(self) -> None:
        for kind, items in (("rule", self.rules), ("route", self.routes)):
            for spec in reversed(items):
                try:
                    getattr(self.ipr, kind)("del", **spec)
                except Exception as exc:  # gone with the tun, or removed by hand
                    log.debug("removing %s %s: %s", kind, spec, exc)
            items.clear()
        self.ipr.close()


def _describe(spec: Spec) -> str:
    return " ".join(f"{k} {v}" for k, v in spec.items() if k != "family")


def interface_addresses(ifname: str) -> list[str]:
    """The IPv4 addresses of *ifname* (OperatorError if there is no such interface)."""
    with IPRoute() as ipr:
        index = ipr.link_lookup(ifname=ifname)
        if not index:
            raise OperatorError(f"no such interface: {ifname}")
        addrs = ipr.get_addr(index=index[0], family=socket.AF_INET)
    return [a.get_attr("IFA_ADDRESS") for a in addrs]


def interface_address(ifname: str) -> str:
    """The first IPv4 address of *ifname* (the client's inner and outer source)."""
    addrs = interface_addresses(ifname)
    if not addrs:
        raise OperatorError(f"--bind-to-interface {ifname} has no IPv4 address: the client's "
                            "TCP takes it as its source")
    return addrs[0]


class RpFilter:
    """No reverse-path filtering on the tun: segments arrive from real addresses
    that are routed elsewhere (the old value is put back on exit).

    The kernel applies the larger of the tun's and conf/all's rp_filter; where
    conf/all is not 0 (systemd sets 2), loose filtering still passes segments on
    an interface with an IPv4 address, so a tun without one gets ANCHOR."""

    ANCHOR = "169.254.77.1/32"

    def __init__(self, tun: Tun):
        self.path = f"/proc/sys/net/ipv4/conf/{tun.name}/rp_filter"
        self.old = _read(self.path)
        if self.old not in (None, "0") and not _write(self.path, "0"):
            log.warning("cannot set %s to 0: segments may be dropped by reverse-path filtering",
                        self.path)
        # what the kernel applies: the larger of conf/all and the tun's own (read back:
        # /proc/sys may be read-only, e.g. under ProtectKernelTunables)
        values = [_read("/proc/sys/net/ipv4/conf/all/rp_filter"), _read(self.path)]
        strict = max((int(v) for v in values if v and v.isdigit()), default=0)
        if strict and tun.address is None:
            log.info("reverse-path filtering stays %d on %s: giving it the address %s so "
                     "that its segments pass", strict, tun.name, self.ANCHOR)
            tun.add_address(self.ANCHOR)

    def close(self) -> None:
        if self.old not in (None, "0"):
            _write(self.path, self.old)  # fails quietly if the tun is gone


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _write(path: str, value: str) -> bool:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        return False
    return True


# --------------------------------------------------------------------------- the UDP edge


class TiuConn:
    """The UDP edge of the TCP-in-UDP mode: the sockets (server: one per listen
    port, with IP_PKTINFO; client: one per flow, bound to its TCP source
    address and port and connected to its server), sending wire payloads to a
    flow, and receiving them: each socket is drained on its own and its
    payloads go to the tun as TCP segments (through the tun edge, coalesced
    when it can; a GRO buffer that is one in-order run in one piece)."""

    fd = None  # many sockets: no single one for the loop to watch

    # the loop, set by watch() (the loop starts the edge before anything else runs)
    loop: Loop[Flow]

    def __init__(self, router: TiuRouter, packets: Packets, sockets: dict[int, socket.socket],
                 device: str,
                 gso: bool = False, gro: bool = False, flow_buffer: int = FLOW_BUFFER,
                 source: str | None = None):
        self.router = router
        self.counters = router.counters
        self.packets = packets
        # the tun edge when it coalesces (OffloadPackets): the drains write through it
        self.offload = packets if isinstance(packets, OffloadPackets) else None
        self.sockets = sockets  # server: listen port -> socket
        self.device = device
        self.gso, self.gro = gso, gro
        self.source = source  # client: the bound interface's address (the TCP source)
        self.check_source = False  # client: the interface is back; is its address too?
        self.flow_buffer = flow_buffer
        self.max_segment = BUFSIZE
        self.links: Links | None = None
        self.tun_mtu: int | None = None  # for the status document
        # RX buffer: a wire payload lands at rx_payload; the tun's headers and the
        # TCP header's first 8 bytes (the payload is 8 bytes shorter) fit in front
        self.rx_start = packets.header_len + pk.IPV4_HEADER_LEN
        self.rx_payload = self.rx_start + tiu.UDP_HEADER_LEN
        self.rxbuf = bytearray(self.rx_payload + (RX_AREA if packets.coalesces else BUFSIZE))
        self.rxview = memoryview(self.rxbuf)
        self._aton: dict[str, bytes] = {}
        self._pktinfo: dict[bytes, Ancillary] = {}
        self.cmsg_space = socket.CMSG_SPACE(4) + socket.CMSG_SPACE(_PKTINFO.size)
        self.failed: Callable[[OSError, Address, int], None] = lambda exc, dest, size: None
        self.too_long: Callable[[int], bool] | None = None

    # -- the loop's edge interface -----------------------------------------------
    def describe(self) -> str:
        return (f"UDP GSO {'on' if self.gso else 'off: one sendto per segment'}, "
                f"GRO {'on' if self.gro else 'off'}")

    def describe_udp(self) -> str:
        if self.router.client:
            return f"TCP-in-UDP to ports {format_ranges(self.router.ranges)}"
        return f"TCP-in-UDP on ports {format_ranges(self.router.ranges)}"

    def watch(self, loop: Loop[Flow]) -> list[tuple[int, Callable[[], None]]]:
        self.loop, self.links = loop, loop.links
        if self.tun_mtu is None and loop.links is not None:
            self.tun_mtu = loop.links.tun_mtu
        watched: list[tuple[int, Callable[[], None]]] = []
        for port, sock in self.sockets.items():
            sock.setblocking(False)
            watched.append((sock.fileno(), functools.partial(self.on_listen, sock, port)))
        return watched

    def tick(self, now: float) -> None:
        for flow in self.router.expire(now):
            self._close_flow(flow)
        if self.check_source:
            self._check_source()

    def icmp_errors(self) -> list[IcmpError]:
        return []

    # -- TX --------------------------------------------------------------------
    def send(self, batches: Batches, flow: Flow) -> tuple[int, int]:
        """Send wire payloads of *flow* (a client's from its own socket, opened
        on its first packet; a server's from its listen port's, from the
        address the peer sent to)."""
        dest = flow.dest
        if dest is None:
            dest = self._client_dest(flow) if self.router.client else self._server_dest(flow)
            if dest is None:
                return 0, 0
        return self._send(batches, dest, True)

    def _server_dest(self, flow: Flow) -> FlowDest:
        key = flow.key
        sock = self.sockets[(key[8] << 8) | key[9]]
        src = key[0:4]
        cmsg = self._pktinfo.get(src)
        if cmsg is None:
            if len(self._pktinfo) > 4096:
                self._pktinfo.clear()
            cmsg = self._pktinfo[src] = [(socket.IPPROTO_IP, IP_PKTINFO,
                                          _PKTINFO.pack(0, src, _ZERO_ADDR))]
        addr = flow.remote
        dest = flow.dest = (sock, addr, cmsg, addr)
        return dest

    def _client_dest(self, flow: Flow) -> FlowDest | None:
        if flow.sock is None and not self._open_flow(flow):
            return None
        return flow.dest

    def _send(self, batches: Batches, dest: FlowDest, recut: bool) -> tuple[int, int]:
        """Send wire payloads; one the kernel refuses as too long because the
        bound link's MTU just fell is cut to fit (once) and sent again."""
        sock, addr, cmsg, peer = dest
        gso = self.gso
        packets = nbytes = 0
        parts: Sequence[tuple[Buffer, Ancillary]]
        for data, size in batches:
            n = len(data)
            try:
                if n <= size:
                    parts = ((data, cmsg),)
                elif gso:
                    parts = ((data, [*cmsg, (SOL_UDP, UDP_SEGMENT,
                                             size.to_bytes(2, sys.byteorder))]),)
                else:
                    parts = [(data[off:off + size], cmsg) for off in range(0, n, size)]
                for piece, anc in parts:
                    if addr is None:
                        sock.sendmsg((piece,), anc)
                    else:
                        sock.sendmsg((piece,), anc, 0, addr)
            except OSError as exc:
                if (recut and exc.errno == errno.EMSGSIZE and self.too_long is not None
                        and self.too_long(min(n, size) + tiu.UDP_HEADER_LEN)):
                    sent = self._send(ol.recut(data, size, self.max_segment - tiu.UDP_HEADER_LEN,
                                               tiu=True), dest, False)
                    packets += sent[0]
                    nbytes += sent[1]
                else:
                    self.failed(exc, peer, min(n, size))
                continue
            packets += -(-n // size)
            nbytes += n
        return packets, nbytes

    # -- the bound interface re-created ------------------------------------------
    def rebind(self, links: Links) -> None:
        """An interface of the bound name is back (at a new index): every socket
        of the mode (the listen sockets, the client's flow sockets) is bound to
        it again, in place (a flow socket keeps its address and port: the
        server's datagrams keep arriving on it).  A flow socket that cannot be
        is closed (its flow is opened again by its next packet)."""
        name = links.bind_name
        try:
            for sock in self.sockets.values():
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode())
        except OSError as exc:  # EPERM without CAP_NET_RAW; ENODEV if gone again
            links.bind_index = None  # still missing; the next event of it retries
            log.error("cannot bind the UDP sockets to %s again: %s", name, exc.strerror)
            return
        count = len(self.sockets)
        for flow in list(self.router.flows.values()):
            if flow.sock is None:
                continue
            try:
                flow.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode())
            except OSError as exc:
                log.debug("flow socket %s:%d: %s", *flow.local, exc.strerror)
                self._close_flow(flow)
                self.router.forget(flow)
                continue
            count += 1
        log.info("bound interface %s is back (index %d): %d UDP sockets bound to it again",
                 name, links.bind_index, count)
        self.check_source = self.router.client

    def _check_source(self) -> None:
        """Client, each tick after the bound interface came back: once it has an
        IPv4 address again, it must be the one the policy rules, the route's
        source and the TCP connections use; another one ends the daemon (exit
        1: a service manager starts it again with the new address)."""
        links = self.links
        assert links is not None  # set by rebind(), which the loop calls with its links
        try:
            addresses = interface_addresses(links.bind_name)
        except Exception as exc:  # gone again (or netlink failed): tried at the next tick
            log.debug("addresses of %s: %s", links.bind_name, exc)
            return
        if not addresses:
            return  # not given its address yet
        self.check_source = False
        if self.source not in addresses:
            self.loop.fail(f"bound interface {links.bind_name} is back with the address "
                           f"{addresses[0]}, not {self.source}: exiting (restart to use it)")

    def describe_flows(self, now: float) -> dict[str, object]:
        """The status document's part of this mode: the newest SHOWN_FLOWS flows
        (O(SHOWN_FLOWS), whatever the table holds) and how many there are."""
        router = self.router
        flows = router.flows
        shown: list[dict[str, object]] = []
        for f in itertools.islice(reversed(flows.values()), SHOWN_FLOWS):
            (lhost, lport), (rhost, rport) = f.local, f.remote
            shown.append({"local": f"{lhost}:{lport}", "remote": f"{rhost}:{rport}",
                          "last": round(max(0.0, now - f.last), 1),
                          "age": round(max(0.0, now - f.created), 1),
                          "rx_packets": f.rx_packets, "rx_bytes": f.rx_bytes,
                          "tx_packets": f.tx_packets, "tx_bytes": f.tx_bytes})
        mtu = self.links.tun_mtu if self.links is not None else self.tun_mtu
        return {"wire": "tcp-in-udp", "ports": format_ranges(router.ranges), "mtu": mtu,
                "flow_timeout": router.timeout, "max_flows": router.max_flows,
                "flow_count": len(flows), "flows": shown}

    # -- client flow sockets ---------------------------------------------------
    def _open_flow(self, flow: Flow) -> bool:
        """The UDP socket of a client flow: bound to the TCP source address and
        port on the bound interface, connected to the server's address and port."""
        if self.links is not None and not self.links.bind_present:
            self.router.forget(flow)
            self.router.count_rarely_logged("tx_drop_no_interface", "bound interface %s is "
                                            "missing", self.links.bind_name, now=self.loop.clock())
            return False
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                             | socket.SOCK_NONBLOCK)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, self.device.encode())
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(flow.local)
            sock.connect(flow.remote)
            set_buffers(sock, self.flow_buffer)
            set_path_mtu_discovery(sock)
            if self.gro:
                sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        except OSError as exc:
            sock.close()
            self.router.forget(flow)
            self.router.count_rarely_logged("tx_drop_flow_socket", "cannot open the UDP socket "
                                            "%s:%d -> %s:%d: %s", *flow.local, *flow.remote,
                                            exc.strerror, now=self.loop.clock())
            return False
        flow.sock = sock
        flow.dest = (sock, None, (), flow.remote)
        self.loop.watch(sock.fileno(), lambda: self.on_flow(flow))
        return True

    def _close_flow(self, flow: Flow) -> None:
        sock, flow.sock, flow.dest = flow.sock, None, None
        if sock is not None:
            self.loop.unwatch(sock.fileno())
            sock.close()

    def close_flows(self) -> None:
        for flow in list(self.router.flows.values()):
            sock, flow.sock = flow.sock, None
            if sock is not None:
                sock.close()

    # -- RX --------------------------------------------------------------------
    def _ip(self, host: str) -> bytes:
        ip = self._aton.get(host)
        if ip is None:
            if len(self._aton) > 4096:
                self._aton.clear()
            ip = self._aton[host] = socket.inet_aton(host)
        return ip

    def _local_ip(self, ancdata: list[tuple[int, int, bytes]], sock: socket.socket) -> bytes:
        for level, kind, data in ancdata:
            if level == socket.IPPROTO_IP and kind == IP_PKTINFO:
                return data[8:12]
        return self._ip(sock.getsockname()[0])

    def on_listen(self, sock: socket.socket, port: int) -> None:
        """Server: datagrams to one listen port."""
        offload = self.offload
        if offload is not None:  # the tun edge coalesces
            router = self.router
            self._drain(offload, sock, lambda anc: self._local_ip(anc, sock),
                        lambda local_ip, remote_ip, rport, now, count:
                        router.rx_flow(local_ip, remote_ip, port, rport, now, count))
            return
        view, recvmsg_into, cmsg_space = self.rxview, sock.recvmsg_into, self.cmsg_space
        target = (view[self.rx_payload:self.rx_payload + BUFSIZE],)
        router = self.router
        now = self.loop.clock()
        for _ in range(BATCH):
            try:
                n, ancdata, _flags, peer = recvmsg_into(target, cmsg_space)
            except BlockingIOError:
                return
            except OSError as exc:
                self.counters["rx_recv_error"] += 1
                log.debug("recvmsg: %s", exc)
                continue
            reason = tiu.classify_payload(view[self.rx_payload:self.rx_payload + n])
            if reason is not None:
                self.counters["rx_drop_" + reason] += 1
                continue
            remote_ip, local_ip = self._ip(peer[0]), self._local_ip(ancdata, sock)
            flow = router.rx_flow(local_ip, remote_ip, port, peer[1], now)
            if flow is not None:
                self.deliver_tiu(n, flow, remote_ip, local_ip, _PORTS.pack(peer[1], port))
            if n < SMALL:  # one packet at a time (an ACK, a request): epoll says if more
                return

    def on_flow(self, flow: Flow) -> None:
        """Client: datagrams on a flow's socket (connected: only from its server)."""
        sock = flow.sock
        if sock is None:
            return
        offload = self.offload
        if offload is not None:  # the tun edge coalesces
            key = flow.key
            self._drain(offload, sock, lambda anc: key[0:4], lambda *_: flow)
            return
        view, recv_into = self.rxview, sock.recv_into
        target = view[self.rx_payload:self.rx_payload + BUFSIZE]
        key = flow.key
        local_ip, remote_ip, ports = key[0:4], key[4:8], flow.rx_ports
        flow.last = self.loop.clock()
        for _ in range(BATCH):
            try:
                n = recv_into(target)
            except BlockingIOError:
                return
            except OSError as exc:  # e.g. ICMP port unreachable
                self.counters["rx_recv_error"] += 1
                log.debug("recv: %s", exc)
                continue
            reason = tiu.classify_payload(view[self.rx_payload:self.rx_payload + n])
            if reason is not None:
                self.counters["rx_drop_" + reason] += 1
                continue
            self.deliver_tiu(n, flow, remote_ip, local_ip, ports)
            if n < SMALL:
                return

    def deliver_tiu(self, n: int, flow: Flow, src: bytes, dst: bytes, ports: bytes) -> None:
        """The wire payload of *n* bytes at rx_payload becomes a TCP segment in
        front of it and is written to the tun, with its TCP checksum."""
        start, buf = self.rx_start, self.rxbuf
        tiu.decode_in_place(buf, start, n, ports)
        seg_len = n + tiu.UDP_HEADER_LEN
        pk.build_rx_packet(buf, seg_len, self.router.next_ident(), src, dst,
                           start - pk.IPV4_HEADER_LEN)
        if self.packets.write(self.rxview[:start + seg_len]):
            self.router.received(flow, 1, seg_len)

    def _drain(self, packets: OffloadPackets, sock: socket.socket,
               local_ip_of: Callable[[list[tuple[int, int, bytes]]], bytes],
               flow_of: Callable[[bytes, bytes, int, float, int], Flow | None]) -> None:
        """Read what *sock* holds (GRO buffers or single datagrams) and write it
        to the tun as super-packets: a GRO buffer that is one in-order run
        directly (offload.coalesce_wire_gro), the rest decoded segment by
        segment and coalesced."""
        view, counters, router = self.rxview, self.counters, self.router
        recvmsg_into, cmsg_space = sock.recvmsg_into, self.cmsg_space
        classify, decode, fast = tiu.classify_payload, tiu.decode_payload, ol.coalesce_wire_gro
        now = self.loop.clock()
        groups: list[_Group] = []
        off = self.rx_payload  # a lone datagram can be delivered in place from there
        limit = len(view) - BUFSIZE
        stop = False
        for _ in range(RX_BATCH):
            if off > limit or stop:
                break
            try:
                n, ancdata, _flags, peer = recvmsg_into((view[off:off + BUFSIZE],), cmsg_space)
            except BlockingIOError:
                break
            except OSError as exc:
                counters["rx_recv_error"] += 1
                log.debug("recvmsg: %s", exc)
                continue
            seg_size = 0
            for level, kind, data in ancdata:
                if level == SOL_UDP and kind == UDP_GRO:
                    seg_size = int.from_bytes(data[:4], sys.byteorder)
            start, off = off, off + n
            local_ip, remote_ip = local_ip_of(ancdata), self._ip(peer[0])
            if n < SMALL and not seg_size:
                if start == self.rx_payload:  # a lone small datagram: written in place
                    reason = classify(view[start:off])
                    if reason is not None:
                        counters["rx_drop_" + reason] += 1
                    else:
                        flow = flow_of(local_ip, remote_ip, peer[1], now, 1)
                        if flow is not None:
                            flow.last = now
                            self.deliver_tiu(n, flow, remote_ip, local_ip, flow.rx_ports)
                    return
                stop = True  # one packet at a time: epoll says whether more is queued
            last = groups[-1] if groups else None  # kept only if of the same peer
            if last is not None and (last[1] != remote_ip or last[3] != peer[1]
                                     or last[2] != local_ip):
                last = None
            if seg_size and n > seg_size and n >= tiu.WIRE_MIN:
                flow = last[0] if last is not None else flow_of(local_ip, remote_ip, peer[1], now,
                                                                -(-n // seg_size))
                if flow is None:
                    continue
                out = fast(view[start:off], n, seg_size, flow.rx_ports, remote_ip, local_ip,
                           router.ident + 1)
                if out is not None:
                    router.next_ident()
                    groups.append((flow, remote_ip, local_ip, peer[1], None, out))
                    continue
            payloads = ol.split_gro(view[start:off], n, seg_size) if n else (view[start:off],)
            good: list[Buffer] = []
            for p in payloads:
                reason = classify(p)
                if reason is None:
                    good.append(p)
                else:
                    counters["rx_drop_" + reason] += 1
            if not good:
                continue
            if last is not None and last[4] is not None:
                last[4].extend(good)
                continue
            flow = last[0] if last is not None else flow_of(local_ip, remote_ip, peer[1], now,
                                                            len(good))
            if flow is None:
                continue
            groups.append((flow, remote_ip, local_ip, peer[1], good, None))
        for flow, remote_ip, local_ip, _port, segs, ready in groups:
            if ready is not None:
                npackets, nbytes = ol.wire_size(ready)
                lost, lost_bytes = packets.write_buffers((ready,))
                npackets, nbytes = npackets - lost, nbytes - lost_bytes
            else:
                assert segs is not None  # a group holds payloads or a ready buffer
                ports = flow.rx_ports
                npackets, nbytes = packets.write_segments([decode(p, ports) for p in segs],
                                                          remote_ip, local_ip, router.next_ident)
            flow.last = now
            router.received(flow, npackets, nbytes)

# --------------------------------------------------------------------------- start-up


def open_listen_sockets(ranges: list[tuple[int, int]], device: str,
                        address: str) -> dict[int, socket.socket]:
    """Server: one UDP socket per listen port, with IP_PKTINFO (the address
    each datagram was sent to)."""
    needed = count_ports(ranges) + 64
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard) if hard !=
                                                        resource.RLIM_INFINITY else needed, hard))
    sockets: dict[int, socket.socket] = {}
    try:
        for lo, hi in ranges:
            for port in range(lo, hi + 1):
                try:
                    sock = open_udp(port, device, address,
                                    buffer=FLOW_BUFFER if len(sockets) < 16 else 1 << 20)
                except OSError as exc:
                    if exc.errno == errno.EMFILE:
                        raise OperatorError(f"cannot open {count_ports(ranges)} UDP sockets: "
                                            "too many open files (raise the limit, "
                                            "ulimit -n)") from None
                    raise
                sockets[port] = sock
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    except BaseException:
        for sock in sockets.values():
            sock.close()
        raise
    return sockets


def port_ranges(option: str, items: Iterable[str | int]) -> list[tuple[int, int]]:
    try:
        ranges = parse_port_ranges(items)
    except ValueError as exc:
        raise OperatorError(f"{option}: {exc}") from None
    if count_ports(ranges) > MAX_PORTS:
        raise OperatorError(f"{option}: {count_ports(ranges)} ports, at most {MAX_PORTS} "
                            "(one socket each)")
    return ranges


def run(args: argparse.Namespace, mtu: int, services_for: Callable[[int], list[Service]],
        bind_index: int | None = None, bind_mtu: int | None = None) -> None:
    """Start the TCP-in-UDP mode with the parsed command line; returns when it
    stopped.  The loop follows the tun and the bound interface (*bind_index*,
    *bind_mtu* at start) with faults.Links, without overhead or MSS clamp."""
    from .tun import open_tun

    client = args.endpoint_port is not None
    if client:
        if args.listen_port is not None:
            raise OperatorError("--listen-port: a --wire tcp-in-udp client has none (each flow "
                                "leaves from its TCP source port)")
        ranges = port_ranges("--endpoint-port", args.endpoint_port_all)
        if not args.route:
            raise OperatorError("--wire tcp-in-udp as a client needs --route PREFIX: the "
                                "servers whose ports are tunnelled")
        prefixes = []
        for cidr in args.route:
            try:
                prefixes.append(ipaddress.IPv4Network(cidr, strict=False))
            except ValueError:
                raise OperatorError(f"--route {cidr!r} is not an IPv4 prefix") from None
        source = interface_address(args.bind_to_interface)
        sockets: dict[int, socket.socket] = {}
    else:
        if args.listen_port is None:
            raise OperatorError("--wire tcp-in-udp as a server needs --listen-port: the "
                                "tunnelled TCP ports")
        ranges = port_ranges("--listen-port", args.listen_port_all)
        sockets = open_listen_sockets(ranges, args.bind_to_interface,
                                      args.listen_address or "0.0.0.0")
        source = None
    tun: Tun | None = None
    routing: PolicyRouting | None = None
    rp: RpFilter | None = None
    router = TiuRouter(client, ranges, args.peer_timeout, args.max_peers, args.admission_rate)
    conn: TiuConn | None = None
    try:
        tun, offload = open_tun(args.interface, mtu, args.tun_address4, not args.no_offload)
        tun.refresh_address()
        rp = RpFilter(tun)
        routing = PolicyRouting(tun.index)
        if client:
            routing.default_route(src=source)
            for net in prefixes:
                for lo, hi in ranges:
                    # by source first (a second path's subflows bound to its address),
                    # then any source (new connections)
                    routing.rule(RULE_PRIORITY, src=source, src_len=32,
                                 dst=str(net.network_address), dst_len=net.prefixlen,
                                 dport_range=f"{lo}:{hi}")
                    routing.rule(RULE_PRIORITY + 1, dst=str(net.network_address),
                                 dst_len=net.prefixlen, dport_range=f"{lo}:{hi}")
        else:
            routing.default_route()
            for lo, hi in ranges:
                routing.rule(RULE_PRIORITY + 1, sport_range=f"{lo}:{hi}")
        services = services_for(mtu)
        links = Links(tun.index, mtu, args.bind_to_interface, bind_index, bind_mtu,
                      explicit_mtu=args.mtu, clamp=False, overhead=TIU_OVERHEAD)
        gso = gro = False
        if offload:
            probe = next(iter(sockets.values()), None)
            if probe is None:
                probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    gso, gro = probe_udp_offload(probe)
                finally:
                    probe.close()
            else:
                gso, gro = probe_udp_offload(probe)
                for sock in sockets.values():
                    if gro:
                        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        packets = (OffloadPackets if offload else Packets)(tun, router.counters, tiu_wire=True)
        conn = TiuConn(router, packets, sockets, args.bind_to_interface, gso, gro, source=source)
        conn.tun_mtu = mtu
        tunnel = Loop(router, tun, packets, conn, services=services, links=links)
        log.info("wire: tcp-in-udp, %s %s; data path: %s", "client to ports" if client else
                 "server on ports", format_ranges(ranges), tunnel.data_path)
        tunnel.run()
        tunnel.log_counters()
    finally:
        if conn is not None:
            conn.close_flows()
        if routing is not None:
            routing.close()
        if rp is not None:
            rp.close()
        if tun is not None:
            tun.close()
        for sock in sockets.values():
            sock.close()
