"""The tun device (I/O edge): open or create it, configure it with pyroute2,
follow its IPv4 address and the links (tun and bound interface) through
netlink, remove it on exit if we created it."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import logging
import os
import socket
import struct

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTMGRP_IPV4_IFADDR, RTMGRP_LINK
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from .errors import OperatorError, interface_name_problem
from .faults import LinkEvent

log = logging.getLogger(__name__)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02

MONITOR_BUFFER = 1 << 20
RTPROT_KERNEL = 2


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
                raise OperatorError(f"cannot attach tun {name}: it is in use by another process") from None
            raise OperatorError(f"cannot attach tun {name}: {exc.strerror}") from None
        self.fd = fd
        self.index = self.ipr.link_lookup(ifname=name)[0]
        if self.created:
            self._disable_ipv6()
        self.address: bytes | None = None  # the tun's own IPv4 address, 4 bytes
        self.network: ipaddress.IPv4Network | None = None
        self.monitor: socket.socket | None = None
        self.marshal = MarshalRtnl()
        self.added: list[tuple[str, dict]] = []  # what we configured, undone on close

    def add_address(self, cidr: str) -> None:
        """Give the tun this address (kept if it already has it)."""
        iface = _interface(cidr, "--tun-address")
        have = {(a.get_attr("IFA_ADDRESS"), a["prefixlen"])
                for a in self.ipr.get_addr(index=self.index, family=2)}
        if (str(iface.ip), iface.network.prefixlen) in have:
            return
        spec = {"index": self.index, "address": str(iface.ip), "prefixlen": iface.network.prefixlen}
        try:
            with quiet_pyroute2():
                self.ipr.addr("add", **spec)
        except Exception as exc:
            raise OperatorError(f"cannot add address {cidr} to {self.name}: {exc}") from None
        self.added.append(("addr", spec))

    def add_route(self, cidr: str) -> None:
        """Route *cidr* into the tun (kept as it is if that route exists)."""
        net = _interface(cidr, "--route").network
        spec = {"dst": str(net.network_address), "dst_len": net.prefixlen, "oif": self.index}
        try:
            with quiet_pyroute2():
                self.ipr.route("add", **spec)
        except Exception as exc:
            if getattr(exc, "code", None) == errno.EEXIST:
                log.info("route %s exists already: left as it is", net)
                return
            raise OperatorError(f"cannot add route {net} via {self.name}: {exc}") from None
        self.added.append(("route", spec))

    def _disable_ipv6(self) -> None:
        """Nothing but IPv4 crosses the tunnel: spare a new tun the kernel's IPv6
        chatter (router solicitations), which would only be counted and dropped."""
        try:
            with open(f"/proc/sys/net/ipv6/conf/{self.name}/disable_ipv6", "w") as f:
                f.write("1")
        except OSError:  # no IPv6, or /proc/sys read-only (a sandboxed service)
            pass

    def enable_offload(self) -> bool:
        """Ask for TCP segmentation and checksum offload (needs IFF_VNET_HDR)."""
        try:
            fcntl.ioctl(self.fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
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
        """A netlink socket that becomes readable when IPv4 addresses or links
        change.  A plain non-blocking socket, read to EAGAIN, with pyroute2's
        parser: an IPRoute reads every queued datagram into a queue of its own
        and hands out one per call, so epoll would miss what it holds."""
        self.monitor = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                     | socket.SOCK_CLOEXEC, socket.NETLINK_ROUTE)
        try:
            self.monitor.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, MONITOR_BUFFER)
        except OSError:
            pass
        self.monitor.bind((0, RTMGRP_IPV4_IFADDR | RTMGRP_LINK))
        self.refresh_address()
        return self.monitor

    def _monitor_messages(self):
        """The parsed messages queued on the monitor (OSError: ENOBUFS, some were lost)."""
        while True:
            try:
                data = self.monitor.recv(MONITOR_BUFFER)
            except BlockingIOError:
                return
            yield from self.marshal.parse(data)

    def drain_monitor(self, names=()) -> tuple[bool, list[LinkEvent] | None]:
        """Read pending events: (whether the tun's address changed, the link
        events of the tun and of the interfaces named *names*, in order).  The
        link events are None when some were lost (the monitor's buffer
        overflowed): then the caller must look the links up (link_snapshot)."""
        address, links = False, []
        try:
            messages = list(self._monitor_messages())
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

    def link_snapshot(self, names=()) -> list[LinkEvent]:
        """The tun and the interfaces named *names* as they are now, as link
        events (a deleted one for the tun if it is gone)."""
        events = []
        for name in names:
            for link in self.ipr.get_links(ifname=name) if self.ipr.link_lookup(ifname=name) else ():
                events.append(LinkEvent(False, link["index"], name, link.get_attr("IFLA_MTU")))
        try:
            tun = self.ipr.get_links(self.index)[0]
            events.append(LinkEvent(False, self.index, tun.get_attr("IFLA_IFNAME"),
                                    tun.get_attr("IFLA_MTU")))
        except NetlinkError:  # ENODEV: the tun is gone
            events.append(LinkEvent(True, self.index, self.name))
        return events

    def refresh_address(self) -> bool:
        addrs = self.ipr.get_addr(index=self.index, family=2)
        if addrs:
            iface = ipaddress.IPv4Interface(f"{addrs[0].get_attr('IFA_ADDRESS')}/{addrs[0]['prefixlen']}")
            address, network = iface.ip.packed, iface.network
        else:
            address, network = None, None
        changed = (address, network) != (self.address, self.network)
        self.address, self.network = address, network
        if changed:
            log.info("tun %s address: %s", self.name,
                     f"{ipaddress.IPv4Address(address)}/{network.prefixlen}" if address else "none")
        return changed

    def _routes(self) -> dict:
        """IPv4 routes through the tun (main table, not the kernel's own prefix
        routes of addresses), by destination."""
        routes = {}
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
        for kind, spec in reversed(self.added):
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
                log.warning("could not restore route %s/%d via %s: %s", dst, dst_len, self.name, exc)

    def close(self) -> None:
        self.undo()
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


def open_tun(name: str, mtu: int, address: str | None, offload: bool) -> tuple[Tun, bool]:
    """Open the tun *name* -- with TSO/checksum offload if *offload* and the kernel
    grants it, else reopened without -- set its MTU, bring it up and give it
    *address* (if any).  Returns (tun, offload granted); the tun is closed again
    if configuring it fails."""
    tun = Tun(name, vnet_hdr=offload)
    if offload and not tun.enable_offload():
        tun.close()
        tun, offload = None, False
        tun = Tun(name)
    try:
        tun.configure(mtu)
        if address:
            tun.add_address(address)
    except BaseException:
        tun.close()
        raise
    return tun, offload


@contextlib.contextmanager
def quiet_pyroute2():
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


def _interface(cidr: str, option: str) -> ipaddress.IPv4Interface:
    try:
        return ipaddress.IPv4Interface(cidr)
    except ValueError:
        raise OperatorError(f"{option} {cidr!r} is not an IPv4 address/prefix") from None


def link_info(ifname: str) -> tuple[int, int]:
    """(index, MTU) of the interface *ifname*."""
    with IPRoute() as ipr:
        links = ipr.get_links(ifname=ifname) if ipr.link_lookup(ifname=ifname) else []
        if not links:
            raise OperatorError(f"no such interface: {ifname}")
        return links[0]["index"], links[0].get_attr("IFLA_MTU")
