"""Service manager notification (systemd ``Type=notify``), no library needed.

The sd_notify protocol: the service manager passes the path of an AF_UNIX
datagram socket in ``$NOTIFY_SOCKET`` (``@name`` means the abstract name
``\\0name``); each datagram holds newline-separated ``KEY=VALUE`` assignments.
We send

* ``READY=1`` (with a first ``STATUS=``) once the tun and the socket are up,
* ``STATUS=server on tun0: 3 peers, tx 12.0 MB rx 40.1 MB`` every
  STATUS_EVERY ticks when the text changed (``systemctl status`` shows it),
* ``WATCHDOG=1`` every ``$WATCHDOG_USEC``/2 when ``$WATCHDOG_USEC`` is set and
  ``$WATCHDOG_PID`` is unset or our pid, from the loop's housekeeping tick, so
  a stuck loop stops the pings and the service manager restarts us,
* ``STOPPING=1`` when the loop ends.

Sends never block (MSG_DONTWAIT): a full notification socket loses a message,
which is counted and logged at debug level, and the data path goes on.

Timing: housekeeping ticks come about every service.HOUSEKEEPING (1 s) seconds,
so a ping is sent at the first tick less than one tick period before it is due
(early rather than late: the gap between pings never exceeds the interval by
more than the loop's jitter).  If ``$WATCHDOG_USEC``/2 is shorter than a tick,
a ping goes out at every tick, which only satisfies the service manager while
``WatchdogSec`` is comfortably above one tick (use 3 s or more).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from typing import cast

from .drops import is_drop
from .service import HOUSEKEEPING, Service, TunnelView, UdpRouterView
from .units import format_bytes

log = logging.getLogger(__name__)

STATUS_EVERY = 5  # housekeeping ticks between STATUS= updates


def notify_address(value: str | None) -> str | bytes | None:
    """The socket address for a ``$NOTIFY_SOCKET`` value, or None if unusable."""
    if not value:
        return None
    if value.startswith("@"):  # abstract namespace
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    log.warning("NOTIFY_SOCKET=%s: unsupported address (only paths and @abstract names): "
                "no service manager notification", value)
    return None


def watchdog_interval(environ: Mapping[str, str] | None = None,
                      pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when
    no watchdog is asked of this process."""
    environ = os.environ if environ is None else environ
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = environ.get("WATCHDOG_PID", "")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None  # meant for another process (e.g. our parent)
        except ValueError:
            return None
    return usec / 2e6


class Watchdog:
    """When the next ping is due, for ticks that come every *tick* seconds."""

    def __init__(self, interval: float, tick: float = HOUSEKEEPING):
        self.interval = interval
        self.slack = min(tick, interval)
        self.next: float | None = None

    def due(self, now: float) -> bool:
        """True if a ping should go now (the first call always says yes)."""
        if self.next is not None and now < self.next - self.slack:
            return False
        self.next = now + self.interval
        return True


class Notifier:
    """The sending half of the sd_notify protocol."""

    def __init__(self, address: str | bytes):
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX,
                                  socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sent = 0
        self.failed = 0

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram; False if it was lost."""
        message = "\n".join(a.replace("\n", " ") for a in assignments).encode()
        try:
            self.sock.sendto(message, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL, self.address)
        except OSError as exc:
            self.failed += 1
            if self.failed & (self.failed - 1) == 0:  # 1st, 2nd, 4th, ... failure
                log.debug("service manager notification lost (%d so far): %s", self.failed, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        self.sock.close()


def status_line(tunnel: TunnelView) -> str:
    """One line for ``STATUS=``: mode, peers and traffic."""
    router, counters = tunnel.router, tunnel.counters
    where = f"{'client' if router.client else 'server'} on {tunnel.tun.name}"
    traffic = (f"tx {format_bytes(counters.get('tx_bytes', 0))} "
               f"rx {format_bytes(counters.get('rx_bytes', 0))}")
    dropped = sum(v for k, v in counters.items() if is_drop(k))
    parts = []
    links = getattr(tunnel, "links", None)
    if links is not None and not links.bind_present:
        parts.append(f"{links.bind_name} MISSING: nothing sent")
    flows = getattr(router, "flows", None)
    if flows is not None:  # tcp-in-udp: flows, no peers or servers
        n = len(flows)
        parts.append(f"tcp-in-udp, {n} flow{'' if n == 1 else 's'}")
    elif router.client:
        udp_router = cast(UdpRouterView, router)  # not tcp-in-udp: the default wire's router
        where += f" to UDP port {udp_router.endpoint_port}"
        parts.append(f"{len(udp_router.remotes)} servers")
    elif router.store is None:
        parts.append("no tun address: new peers refused")
    else:
        n = len(router.store)
        parts.append(f"{n} peer{'' if n == 1 else 's'}")
    parts.append(traffic)
    if dropped:
        parts.append(f"{dropped} dropped")
    return f"{where}: {', '.join(parts)}"


class Notify(Service):
    """Tells the service manager we are ready, alive, busy with what, stopping."""

    def __init__(self, notifier: Notifier, watchdog: Watchdog | None = None,
                 status_every: int = STATUS_EVERY):
        self.notifier = notifier
        self.watchdog = watchdog
        self.status_every = status_every
        self.ticks = 0
        self.last_status: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> Notify | None:
        """A Notify if ``$NOTIFY_SOCKET`` is set (and usable), else None."""
        environ = os.environ if environ is None else environ
        address = notify_address(environ.get("NOTIFY_SOCKET"))
        if address is None:
            return None
        interval = watchdog_interval(environ)
        if interval is not None and interval < HOUSEKEEPING:
            log.warning("WatchdogSec=%.3gs is short for a loop that pings every %gs: "
                        "use 3 s or more", 2 * interval, HOUSEKEEPING)
        return cls(Notifier(address), Watchdog(interval) if interval is not None else None)

    def ready(self, tunnel: TunnelView) -> None:
        self.last_status = status_line(tunnel)
        self.notifier.send("READY=1", "STATUS=" + self.last_status)
        self._ping(tunnel.clock())

    def tick(self, tunnel: TunnelView, now: float) -> None:
        self._ping(now)
        self.ticks += 1
        if self.ticks % self.status_every == 0:
            line = status_line(tunnel)
            if line != self.last_status:
                self.last_status = line
                self.notifier.send("STATUS=" + line)

    def _ping(self, now: float) -> None:
        if self.watchdog is not None and self.watchdog.due(now):
            self.notifier.send("WATCHDOG=1")

    def close(self, tunnel: TunnelView) -> None:
        self.notifier.send("STOPPING=1", "STATUS=stopping")
        self.notifier.close()


__all__ = ["Notify", "Notifier", "Watchdog", "notify_address", "status_line",
           "watchdog_interval"]
