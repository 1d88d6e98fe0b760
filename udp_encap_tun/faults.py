"""Faults of links and host, decided in pure code (no I/O): what the loop does
when the tun or the bound interface goes away, comes back or changes its MTU,
and when an fd keeps failing.  The loop (device.py) feeds in the link events
the netlink monitor (tun.py) parsed and applies the answers with syscalls."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

LINK_OVERHEAD: Final = 8  # the UDP header: a TCP segment in UDP costs 8 bytes more than in IPv4
TIU_OVERHEAD: Final = 0  # --wire tcp-in-udp: the datagram is exactly as long as the segment
IPV4_HEADER: Final = 20
TCP_IP_HEADERS: Final = 40  # MSS = MTU - 40 (IPv4 and TCP headers without options)
MIN_MTU: Final = 68  # IPv4's minimum, and the smallest MTU the kernel lets a tun have
MAX_MTU: Final = 65535 - LINK_OVERHEAD  # the largest packet whose datagram IPv4 can still carry


def tun_mtu_for(link_mtu: int, explicit: int | None = None,
                overhead: int = LINK_OVERHEAD) -> int:
    """The tun MTU for a bound interface of *link_mtu*: what fits in one
    datagram (link MTU - *overhead*: 8 on the default wire, 0 in tcp-in-udp);
    an explicit ``--mtu`` is a ceiling (kept while it fits, lowered to what
    fits when the link shrinks)."""
    mtu = min(link_mtu - overhead, 65535 - overhead)
    if explicit:
        mtu = min(explicit, mtu)
    return max(MIN_MTU, mtu)


@dataclass(frozen=True, slots=True)
class LinkEvent:
    """An RTM_NEWLINK or RTM_DELLINK, as the monitor parsed it."""
    deleted: bool
    index: int
    name: str | None = None
    mtu: int | None = None


class Changes:
    """What one batch of link events asks the loop to do."""

    def __init__(self) -> None:
        self.tun_gone = False  # the tun was deleted: end the daemon
        self.bind_gone = False  # the bound interface was deleted
        self.rebind: int | None = None  # an interface of the bound name is back at this index
        self.set_tun_mtu: int | None = None  # give the tun this MTU
        self.mss_changed = False  # Links.mss changed (the tun's MTU did)
        self.bind_mtu_changed = False

    def __bool__(self) -> bool:
        return any(vars(self).values())


class Links:
    """The tun and the bound interface as the loop knows them.

    The socket is bound (SO_BINDTODEVICE) to an interface *index*; the operator
    named it.  When that index is deleted the interface is *missing*; when a
    link with the name appears at another index (ppp, wwan and VPN links are
    re-created on every reconnect) the socket must be bound again.  The tun
    MTU follows the bound interface's MTU (see tun_mtu_for) and the MSS clamp
    follows the tun's MTU, whoever set it.  *overhead* is what the wire adds
    to a TCP segment: LINK_OVERHEAD on the default wire, TIU_OVERHEAD (and no
    clamp) with ``--wire tcp-in-udp``."""

    def __init__(self, tun_index: int, tun_mtu: int, bind_name: str, bind_index: int | None,
                 bind_mtu: int | None, explicit_mtu: int | None = None, clamp: bool = True,
                 overhead: int = LINK_OVERHEAD):
        self.tun_index = tun_index
        self.tun_mtu = tun_mtu
        self.bind_name = bind_name
        self.bind_index = bind_index  # None while the interface is missing
        self.bind_mtu = bind_mtu
        self.explicit_mtu = explicit_mtu
        self.clamp = clamp
        self.overhead = overhead
        self.tun_gone = False

    @property
    def bind_present(self) -> bool:
        return self.bind_index is not None

    @property
    def mss(self) -> int | None:
        """The MSS clamp: what fits in the tun's MTU (None: clamping off)."""
        return self.tun_mtu - TCP_IP_HEADERS if self.clamp else None

    @property
    def max_segment(self) -> int | None:
        """The largest TCP segment (header + payload) one datagram on the
        bound interface carries unfragmented (None: MTU unknown)."""
        return self.bind_mtu - IPV4_HEADER - self.overhead if self.bind_mtu else None

    def update(self, events: Iterable[LinkEvent]) -> Changes:
        """Take link events in the order the kernel sent them."""
        ch = Changes()
        for ev in events:
            if ev.index == self.tun_index:
                if ev.deleted:
                    self.tun_gone = ch.tun_gone = True
                elif ev.mtu and ev.mtu != self.tun_mtu:
                    self.tun_mtu = ev.mtu
                    ch.mss_changed = True
            elif ev.deleted:
                if ev.index == self.bind_index:
                    self.bind_index = None
                    ch.bind_gone, ch.rebind = True, None
            elif ev.name == self.bind_name and ev.index != self.bind_index:
                self.bind_index = ch.rebind = ev.index
                ch.bind_gone = False
                self._bind_mtu(ev.mtu, ch)
            elif ev.index == self.bind_index:
                self._bind_mtu(ev.mtu, ch)
        return ch

    def resync(self, present: Iterable[LinkEvent]) -> Changes:
        """After lost events: *present* are the tun and the links of the bound
        name as they are now (LinkEvents, a deleted one for a missing tun)."""
        events = list(present)
        if self.bind_index is not None and all(e.index != self.bind_index for e in events):
            events.insert(0, LinkEvent(True, self.bind_index, self.bind_name))
        return self.update(events)

    def _bind_mtu(self, mtu: int | None, ch: Changes) -> None:
        if not mtu or mtu == self.bind_mtu:
            return
        self.bind_mtu = mtu
        ch.bind_mtu_changed = True
        want = tun_mtu_for(mtu, self.explicit_mtu, self.overhead)
        if want != self.tun_mtu:
            ch.set_tun_mtu = want

    def tun_mtu_set(self, mtu: int) -> None:
        """The loop gave the tun this MTU."""
        self.tun_mtu = mtu


class ReadErrors:
    """Failed reads of one fd since the last housekeeping tick.  An fd that
    fails at once, again and again, would spin the loop (epoll reports it
    ready every time, e.g. with EPOLLERR): past *limit* failures in one tick it
    is paused (taken out of the epoll set) until the next tick."""

    def __init__(self, limit: int = 64):
        self.limit = limit
        self.count = 0
        self.paused = False

    def failed(self) -> bool:
        """A read failed; True if the fd must be paused now."""
        self.count += 1
        if self.count >= self.limit and not self.paused:
            self.paused = True
            return True
        return False

    def tick(self) -> bool:
        """A new tick; True if the fd was paused and must be watched again."""
        resume, self.paused, self.count = self.paused, False, 0
        return resume
