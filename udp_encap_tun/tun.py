"""The tun edge: the device (open or create it, configure it with pyroute2,
follow its IPv4 and IPv6 addresses and the links -- tun and bound interface -- through
netlink, remove it on exit if we created it) and the classes that read and
write batches of packets on it (the virtio-net header, TSO super-packets cut
into wire segments and coalescing on write are theirs)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import ipaddress
import logging
import os
import socket
import struct
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Final

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_IPV6_IFADDR, RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from . import offload as ol, packet as pk, tiu
from .conn import Batches, Buffer
from .errors import OperatorError, interface_name_problem
from .faults import LinkEvent

log = logging.getLogger(__name__)

TUNSETIFF: Final = 0x400454CA
TUNSETOFFLOAD: Final = 0x400454D0
TUNSETVNETHDRSZ: Final = 0x400454D8
IFF_TUN: Final = 0x0001
IFF_NO_PI: Final = 0x1000
IFF_VNET_HDR: Final = 0x4000
TUN_F_CSUM: Final = 0x01
TUN_F_TSO4: Final = 0x02
TUN_F_TSO6: Final = 0x04
# per-interface IPv6 settings that keep the kernel's own chatter off a tun
# (IPv6 stays on): no router solicitations, no duplicate address detection
QUIET_IPV6: Final = (("accept_ra", "0"), ("router_solicitations", "0"), ("accept_dad", "0"),
                     ("dad_transmits", "0"))
RT_SCOPE_UNIVERSE: Final = 0

MONITOR_BUFFER: Final = 1 << 20
RTPROT_KERNEL: Final = 2


class Tun:
    """An open tun device.  ``fd`` is non-blocking."""

    def __init__(self, name: str, vnet_hdr: bool = False):
        problem = interface_name_problem(name)
        if problem:
            raise OperatorError(f"invalid interface name {name!r}: it {problem}")
        self.name = name
        self.ipr = IPRoute()
        self.created = not self.ipr.link_lookup(ifname=name)
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except PermissionError:
            raise OperatorError("cannot open /dev/net/tun: permission denied (run as root, or "
                                "make it usable by this user: most distributions ship it "
                                "with mode 0666)") from None
        except FileNotFoundError:
            raise OperatorError("/dev/net/tun does not exist (is the tun module loaded?)") from None
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), flags))
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EPERM:
                raise OperatorError(f"cannot attach tun {name}: operation not permitted "
                                    "(needs CAP_NET_ADMIN)") from None
            if exc.errno == errno.EINVAL:
                raise OperatorError(f"cannot attach tun {name}: an interface of that name "
                                    "exists and is not a tun device") from None
            if exc.errno == errno.EBUSY:
                raise OperatorError(f"cannot attach tun {name}: it is in use by another "
                                    "process") from None
            raise OperatorError(f"cannot attach tun {name}: {exc.strerror}") from None
        self.fd = fd
        self.index = self.ipr.link_lookup(ifname=name)[0]
        self.sysctls: dict[str, str] = {}  # IPv6 settings we changed on a kept tun: old values
        self._quiet_ipv6()
        self.address: bytes | None = None  # the tun's own IPv4 address, 4 bytes
        self.network: ipaddress.IPv4Network | None = None
        self.address6: bytes | None = None  # its own global IPv6 address, 16 bytes
        self.network6: ipaddress.IPv6Network | None = None
        self.monitor: socket.socket | None = None
        self.marshal = MarshalRtnl()
        # what we configured, undone on close: ("addr" or "route", its pyroute2 arguments)
        self.added: list[tuple[str, dict[str, Any]]] = []

    def add_address(self, cidr: str) -> None:
        """Give the tun this IPv4 or IPv6 address (kept if it already has it)."""
        iface = _interface(cidr, "--tun-address")
        family = socket.AF_INET6 if iface.version == 6 else socket.AF_INET
        have = {(ipaddress.ip_address(a.get_attr("IFA_ADDRESS")), a["prefixlen"])
                for a in self.ipr.get_addr(index=self.index, family=family)}
        if (iface.ip, iface.network.prefixlen) in have:
            return
        spec: dict[str, object] = {"index": self.index, "address": str(iface.ip),
                                   "prefixlen": iface.network.prefixlen, "family": family}
        try:
            with quiet_pyroute2():
                self.ipr.addr("add", **spec)
        except Exception as exc:
            raise OperatorError(f"cannot add address {cidr} to {self.name}: {exc}") from None
        self.added.append(("addr", spec))

    def add_route(self, cidr: str) -> None:
        """Route *cidr* into the tun (kept as it is if that route exists)."""
        net = _interface(cidr, "--route").network
        spec: dict[str, object] = {
            "dst": str(net.network_address), "dst_len": net.prefixlen, "oif": self.index,
            "family": socket.AF_INET6 if net.version == 6 else socket.AF_INET}
        try:
            with quiet_pyroute2():
                self.ipr.route("add", **spec)
        except Exception as exc:
            if getattr(exc, "code", None) == errno.EEXIST:
                log.info("route %s exists already: left as it is", net)
                return
            raise OperatorError(f"cannot add route {net} via {self.name}: {exc}") from None
        self.added.append(("route", spec))

    def _quiet_ipv6(self) -> None:
        """IPv6 stays on (the operator may give the tun an IPv6 address at any
        time), but the kernel's own IPv6 chatter would be read from the tun and
        counted as dropped: no router solicitations (accept_ra, router_
        solicitations) and no duplicate address detection.  (A tun is NOARP: it
        joins no solicited-node group; a host that forwards IPv6 still reports
        the all-routers group by MLD, a few packets when the link comes up.)
        On a tun we keep the old values are restored on exit."""
        for key, value in QUIET_IPV6:
            path = f"/proc/sys/net/ipv6/conf/{self.name}/{key}"
            try:
                with open(path) as f:
                    old = f.read().strip()
                if old != value:
                    with open(path, "w") as f:
                        f.write(value)
                    if not self.created:
                        self.sysctls.setdefault(key, old)
            except OSError:  # no IPv6, or /proc/sys read-only (a sandboxed service)
                return

    def _restore_ipv6(self) -> None:
        for key, old in self.sysctls.items():
            try:
                with open(f"/proc/sys/net/ipv6/conf/{self.name}/{key}", "w") as f:
                    f.write(old)
            except OSError as exc:  # deleted meanwhile
                log.debug("restoring %s of %s: %s", key, self.name, exc)
        self.sysctls.clear()

    def enable_offload(self) -> bool:
        """Ask for TCP segmentation and checksum offload (needs IFF_VNET_HDR)."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        except OSError as exc:
            log.warning("tun %s refuses TSO/checksum offload (%s): using the simple path",
                        self.name, exc.strerror)
            return False
        return True

    def configure(self, mtu: int) -> None:
        """Set the MTU and bring the link up."""
        try:
            with quiet_pyroute2():
                self.ipr.link("set", index=self.index, mtu=mtu, state="up")
        except Exception as exc:  # pyroute2 raises NetlinkError
            raise OperatorError(f"cannot set MTU {mtu} on {self.name}: {exc}") from None

    def set_mtu(self, mtu: int) -> None:
        """Change the MTU of the running tun (the loop follows the bound link)."""
        self.ipr.link("set", index=self.index, mtu=mtu)

    def start_monitor(self) -> socket.socket:
        """A netlink socket that becomes readable when addresses or links
        change.  A plain non-blocking socket, read to EAGAIN, with pyroute2's
        parser: an IPRoute reads every queued datagram into a queue of its own
        and hands out one per call, so epoll would miss what it holds."""
        monitor = self.monitor = socket.socket(
            socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC,
            socket.NETLINK_ROUTE)
        with contextlib.suppress(OSError):
            monitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MONITOR_BUFFER)
        monitor.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_IPV6_IFADDR | RTMGRP_LINK))
        self.refresh_address()
        return monitor

    def _monitor_messages(self, monitor: socket.socket) -> Iterator[Any]:
        """The parsed messages (pyroute2's) queued on *monitor* (OSError: ENOBUFS,
        some were lost)."""
        while True:
            try:
                data = monitor.recv(MONITOR_BUFFER)
            except BlockingIOError:
                return
            yield from self.marshal.parse(data)

    def drain_monitor(self, names: Iterable[str] = ()) -> tuple[bool, list[LinkEvent] | None]:
        """Read pending events: (whether the tun's address changed, the link
        events of the tun and of the interfaces named *names*, in order).  The
        link events are None when some were lost (the monitor's buffer
        overflowed): then the caller must look the links up (link_snapshot)."""
        address = False
        links: list[LinkEvent] = []
        monitor = self.monitor
        assert monitor is not None, "drain_monitor before start_monitor"  # the loop starts it
        try:
            messages = list(self._monitor_messages(monitor))
        except OSError as exc:  # ENOBUFS: events were lost
            log.warning("netlink monitor: %s: looking the links up again", exc.strerror)
            return self.refresh_address(), None
        for m in messages:
            event = m.get("event")
            if event in ("RTM_NEWLINK", "RTM_DELLINK"):
                name = m.get_attr("IFLA_IFNAME")
                if m["index"] == self.index or name in names:
                    links.append(LinkEvent(event == "RTM_DELLINK", m["index"], name,
                                           m.get_attr("IFLA_MTU")))
            elif m.get("index") == self.index:
                address = True
        return address and self.refresh_address(), links

    def link_snapshot(self, names: Iterable[str] = ()) -> list[LinkEvent]:
        """The tun and the interfaces named *names* as they are now, as link
        events (a deleted one for the tun if it is gone)."""
        events = []
        for name in names:
            found = self.ipr.link_lookup(ifname=name)
            for link in self.ipr.get_links(ifname=name) if found else ():
                events.append(LinkEvent(False, link["index"], name, link.get_attr("IFLA_MTU")))
        try:
            tun = self.ipr.get_links(self.index)[0]
            events.append(LinkEvent(False, self.index, tun.get_attr("IFLA_IFNAME"),
                                    tun.get_attr("IFLA_MTU")))
        except NetlinkError:  # ENODEV: the tun is gone
            events.append(LinkEvent(True, self.index, self.name))
        return events

    def refresh_address(self) -> bool:
        """Look the tun's IPv4 address and its global IPv6 address up (the
        first of each); True if either changed."""
        addrs = self.ipr.get_addr(index=self.index, family=socket.AF_INET)
        if addrs:
            iface = ipaddress.IPv4Interface(
                f"{addrs[0].get_attr('IFA_ADDRESS')}/{addrs[0]['prefixlen']}")
            address: bytes | None = iface.ip.packed
            network: ipaddress.IPv4Network | None = iface.network
        else:
            address, network = None, None
        changed = (address, network) != (self.address, self.network)
        self.address, self.network = address, network
        if changed:
            log.info("tun %s address: %s", self.name,
                     f"{ipaddress.IPv4Address(address)}/{iface.network.prefixlen}" if address
                     else "none")
        return self._refresh_address6() or changed

    def _refresh_address6(self) -> bool:
        address6: bytes | None = None
        network6: ipaddress.IPv6Network | None = None
        for a in self.ipr.get_addr(index=self.index, family=socket.AF_INET6):
            if a["scope"] == RT_SCOPE_UNIVERSE:
                iface6 = ipaddress.IPv6Interface(
                    f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
                address6, network6 = iface6.ip.packed, iface6.network
                break
        changed = (address6, network6) != (self.address6, self.network6)
        self.address6, self.network6 = address6, network6
        if changed:
            log.info("tun %s IPv6 address: %s", self.name,
                     f"{ipaddress.IPv6Address(address6)}/{network6.prefixlen}"
                     if address6 and network6 else "none")
        return changed

    def _routes(self) -> dict[tuple[str, int], Any]:
        """IPv4 routes through the tun (main table, not the kernel's own prefix
        routes of addresses), by destination."""
        routes: dict[tuple[str, int], Any] = {}  # pyroute2's route messages
        for r in self.ipr.get_routes(family=2, oif=self.index):
            if r.get_attr("RTA_TABLE") == 254 and r["proto"] != RTPROT_KERNEL:
                routes[(r.get_attr("RTA_DST") or "0.0.0.0", r["dst_len"])] = r
        return routes

    def undo(self) -> None:
        """Remove what we added to a tun we keep.  Deleting its last IPv4 address
        makes the kernel flush every route through it, the operator's too: those
        are put back."""
        if self.created or not self.added:
            self.added.clear()
            return
        ours = {(spec["dst"], spec["dst_len"]) for kind, spec in self.added if kind == "route"}
        theirs = {key: r for key, r in self._routes().items() if key not in ours}
        for kind, spec in self.added[::-1]:  # not reversed(): mypyc 2.4 fails on it
            try:
                getattr(self.ipr, kind)("del", **spec)
            except Exception as exc:  # removed by hand meanwhile
                log.debug("removing %s %s: %s", kind, spec, exc)
        self.added.clear()
        for (dst, dst_len) in theirs.keys() - self._routes().keys():
            route = theirs[(dst, dst_len)]
            try:
                self.ipr.route("add", dst=dst, dst_len=dst_len, oif=self.index,
                               scope=route["scope"], proto=route["proto"])
            except Exception as exc:
                log.warning("could not restore route %s/%d via %s: %s", dst, dst_len, self.name,
                            exc)

    def close(self) -> None:
        self.undo()
        self._restore_ipv6()
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.created:
            # a non-persistent tun goes away with its fd; make sure anyway
            try:
                if self.ipr.link_lookup(ifname=self.name):
                    self.ipr.link("del", ifname=self.name)
            except Exception as exc:  # pragma: no cover - best effort on exit
                log.warning("could not remove %s: %s", self.name, exc)
        self.ipr.close()


def open_tun(name: str, mtu: int, address: str | Sequence[str] | None,
             offload: bool) -> tuple[Tun, bool]:
    """Open the tun *name* -- with TSO/checksum offload if *offload* and the kernel
    grants it, else reopened without -- set its MTU, bring it up and give it
    *address* (if any: one CIDR or several, IPv4 or IPv6).  Returns (tun,
    offload granted); the tun is closed again if configuring it fails."""
    tun = Tun(name, vnet_hdr=offload)
    if offload and not tun.enable_offload():
        tun.close()
        offload = False
        tun = Tun(name)
    try:
        tun.configure(mtu)
        for cidr in [address] if isinstance(address, str) else address or ():
            tun.add_address(cidr)
    except BaseException:
        tun.close()
        raise
    return tun, offload


@contextlib.contextmanager
def quiet_pyroute2() -> Iterator[None]:
    """pyroute2 logs a traceback of its own (ERROR) for a request it cannot
    encode before raising; around a call whose failure we report ourselves, as
    one line, its logger is silenced."""
    logger = logging.getLogger("pyroute2")  # its modules log through children of it
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        logger.setLevel(level)


def _interface(cidr: str, option: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        return ipaddress.ip_interface(cidr)
    except ValueError:
        raise OperatorError(f"{option} {cidr!r} is not an IPv4 or IPv6 address/prefix") from None


def link_info(ifname: str) -> tuple[int, int]:
    """(index, MTU) of the interface *ifname*."""
    with IPRoute() as ipr:
        links = ipr.get_links(ifname=ifname) if ipr.link_lookup(ifname=ifname) else []
        if not links:
            raise OperatorError(f"no such interface: {ifname}")
        return links[0]["index"], links[0].get_attr("IFLA_MTU")


# --------------------------------------------------------------------------- the tun edge

TUN_GONE: Final = frozenset({errno.EBADFD})  # read/write errors of a tun deleted under us
BUFSIZE: Final = 65536


class TunGone(Exception):
    """The tun was deleted under us: its fd is detached for good."""


class Packets:
    """The tun edge of the simple data path: one IPv4 packet per read and per
    write, no virtio-net header.  TX: ``read`` then ``packet`` gives the packet
    and its GSO size (always 0 here) and ``segments`` its wire segments.  RX:
    ``write`` one packet (its header room, ``header_len`` bytes, in front)."""

    header_len = 0  # bytes in front of each packet read from or written to the tun
    coalesces = False  # whether write_segments is worth calling (else: one write each)
    # write_received: the tun headers of one IPv4 packet (kernel_csum: its TCP checksum
    # left for the kernel to finish) and of an IPv6 one (written complete)
    kernel_csum = False
    ipv4_tun_header = plain_tun_header = b""

    def __init__(self, tun: Tun, counters: Counter[str], tiu_wire: bool = False):
        self.tun = tun
        self.fd = tun.fd
        self.counters = counters
        self.tiu_wire = tiu_wire  # the wire payloads are TCP-in-UDP's (tiu.py), not TCP segments
        self.max_segment = BUFSIZE  # the largest wire segment the bound link carries
        self.buf = bytearray(BUFSIZE + 16)
        self.view = memoryview(self.buf)
        # read(): one packet into buf, its length; BlockingIOError when none is
        # queued, OSError otherwise (check_gone tells a deleted tun).  os.readv
        # bound to the fd and buffer: no Python frame per packet.
        self.read: Callable[[], int] = functools.partial(os.readv, self.fd, (self.buf,))

    def describe(self) -> str:
        return "one packet per system call"

    # -- TX --------------------------------------------------------------------
    def packet(self, n: int) -> tuple[memoryview, int] | None:
        """The IPv4 packet of a read of *n* bytes and its GSO size (0: one segment)."""
        return self.view[:n], 0

    def segments(self, pkt: memoryview, gso_size: int) -> Batches | None:
        """The wire segments of a validated TCP packet, cut to fit the bound
        link, or None (counted) if they cannot be."""
        if pkt[0] >> 4 == 4:  # pk.packet_length and pk.header_len inline (every packet)
            total, hlen = (pkt[2] << 8) | pkt[3], 20
        else:
            total, hlen = 40 + ((pkt[4] << 8) | pkt[5]), 40
        tcp_len = total - hlen
        if not gso_size and tcp_len <= self.max_segment and not self.tiu_wire:
            return ((pkt[hlen:total], tcp_len),)  # the common case: one segment as it is
        if gso_size:
            if ((pkt[hlen + 12] >> 4) << 2) + gso_size > self.max_segment:
                return self._cut_to_fit(pkt, total, hlen, gso_size)
            return ol.tso_split(pkt[:total], gso_size, tiu=self.tiu_wire)
        if tcp_len > self.max_segment:
            return self._cut_to_fit(pkt, total, hlen, total)
        if self.tiu_wire:
            return ((tiu.encode_payload(pkt[hlen:total]), tcp_len - tiu.UDP_HEADER_LEN),)
        return ((pkt[hlen:total], tcp_len),)

    def _cut_to_fit(self, pkt: memoryview, total: int, hlen: int,
                    payload: int) -> Batches | None:
        """A TX packet whose segments (of *payload* bytes of TCP payload at most)
        do not fit in one datagram on the bound link (its MTU fell): cut into
        segments that fit, or None (counted) if none can."""
        size = self.max_segment - ((pkt[hlen + 12] >> 4) << 2)
        if size <= 0:
            self.counters["tx_drop_message_too_long"] += 1
            return None
        self.counters["tx_resegmented"] += 1
        return ol.tso_split(pkt[:total], min(size, payload), tiu=self.tiu_wire)

    # -- RX --------------------------------------------------------------------
    def write(self, data: Buffer) -> bool:
        """Write one tun buffer; False if it failed (counted).  Raises TunGone."""
        try:
            os.write(self.fd, data)
        except OSError as exc:
            self.check_gone(exc)
            self.counters["rx_drop_write_error"] += 1
            log.debug("tun write: %s", exc)
            return False
        return True

    def write_received(self, view: memoryview, start: int, n: int, src: bytes, dst: bytes,
                       next_ident: Callable[[], int]) -> bool:
        """Write the received TCP segment ``view[start:start + n]`` as one IP
        packet from *src* to *dst* (4 or 16 bytes), its headers built in place
        in front of it (*start* leaves room for an IPv6 header and the tun
        header) and its TCP checksum made valid.  False if the write failed."""
        if len(src) == 4:
            return self.write_ipv4(view, start, n, next_ident(), src, dst)
        header = start - pk.IPV6_HEADER_LEN
        pk.build_rx_packet6(view, n, src, dst, header)
        begin = header - self.header_len
        view[begin:header] = self.plain_tun_header
        return self.write(view[begin:start + n])

    def write_ipv4(self, view: memoryview, start: int, n: int, ident: int, src: bytes,
                   dst: bytes) -> bool:
        """write_received for IPv4 addresses, the IP header's ID given (the
        kernel finishes the TCP checksum where ``ipv4_tun_header`` asks)."""
        header = start - pk.IPV4_HEADER_LEN
        pk.build_rx_packet(view, n, ident, src, dst, header, self.kernel_csum)
        begin = header - self.header_len
        view[begin:header] = self.ipv4_tun_header
        return self.write(view[begin:start + n])

    def write_segments(self, segments: Sequence[Buffer], src: bytes, dst: bytes,
                       next_ident: Callable[[], int]) -> tuple[int, int]:
        """Write received TCP segments of one peer, in arrival order, as IP
        packets from *src* to *dst* (IPv4 or IPv6: 4 or 16 bytes): (packets,
        bytes) of them that went in."""
        buf, view, hlen = self.buf, self.view, self.header_len
        ipv6 = len(src) == 16
        start = hlen + (pk.IPV6_HEADER_LEN if ipv6 else pk.IPV4_HEADER_LEN)
        packets = nbytes = 0
        for seg in segments:
            n = len(seg)
            view[start:start + n] = seg
            if ipv6:
                pk.build_rx_packet6(buf, n, src, dst, hlen)
            else:
                pk.build_rx_packet(buf, n, next_ident(), src, dst, hlen)
            if self.write(view[:start + n]):
                packets += 1
                nbytes += n
        return packets, nbytes

    def check_gone(self, exc: OSError) -> None:
        """Raise TunGone if *exc* says the tun was deleted under us."""
        if exc.errno in TUN_GONE:
            log.debug("tun %s: %s", self.tun.name, exc.strerror)
            raise TunGone(f"tun {self.tun.name} was deleted: exiting") from None


class OffloadPackets(Packets):
    """The tun edge of the offload path (IFF_VNET_HDR, TSO and checksum
    offload): a read may give a TCP super-packet (its GSO size in the
    virtio-net header), and received segments of one peer are coalesced into
    super-packets the kernel checksums."""

    header_len = ol.VNET_HDR_LEN
    coalesces = True
    # one IPv4 packet goes as offload.coalesce writes one alone: NEEDS_CSUM
    kernel_csum = True
    ipv4_tun_header, plain_tun_header = ol.VNET_CSUM_ONE, ol.VNET_NONE

    def __init__(self, tun: Tun, counters: Counter[str], tiu_wire: bool = False):
        super().__init__(tun, counters, tiu_wire)
        self._unpack_vnet = ol.VNET_HDR.unpack_from

    def describe(self) -> str:
        return "TUN TSO and checksum"

    def packet(self, n: int) -> tuple[memoryview, int] | None:
        pkt = self.view[ol.VNET_HDR_LEN:n]
        if self.buf[1] == ol.GSO_NONE:  # the vnet header's gso_type: a plain packet
            return pkt, 0
        _flags, gso_type, _hdr_len, gso_size = self._unpack_vnet(self.buf, 0)[:4]
        if gso_type & ~ol.GSO_ECN in (ol.GSO_TCPV4, ol.GSO_TCPV6) and gso_size:
            return pkt, gso_size
        self.counters["tx_drop_unsupported_gso"] += 1
        return None

    def write_segments(self, segments: Sequence[Buffer], src: bytes, dst: bytes,
                       next_ident: Callable[[], int]) -> tuple[int, int]:
        packets, nbytes = len(segments), sum(map(len, segments))
        lost, lost_bytes = self.write_buffers(ol.coalesce(segments, src, dst, next_ident))
        return packets - lost, nbytes - lost_bytes

    def write_buffers(self, outs: Iterable[bytearray]) -> tuple[int, int]:
        """Write tun buffers made by offload.coalesce: the (segments, bytes) lost."""
        lost = lost_bytes = 0
        for out in outs:
            if not self.write(out):
                count, size = ol.wire_size(out)
                self.counters["rx_drop_write_error"] += count - 1  # write counted one
                lost += count
                lost_bytes += size
        return lost, lost_bytes
