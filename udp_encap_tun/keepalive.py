"""Client keepalives: an empty UDP datagram to each server now and then keeps a
NAT mapping and the server's store entry alive while TCP is idle.

An empty datagram can never be a TCP segment.  Our server only refreshes the
sender's entry; the original C program builds a 20-byte IPv4 packet with no
TCP header from it, which the kernel discards as malformed (and its entry is
refreshed too)."""

from __future__ import annotations

import logging

from .device import Service

log = logging.getLogger(__name__)


class Keepalive(Service):
    def __init__(self, interval: float):
        self.interval = interval
        self.next = None

    def tick(self, tunnel, now: float) -> None:
        if self.next is None:
            self.next = now + self.interval
        if now < self.next:
            return
        self.next = now + self.interval
        for dest in tunnel.router.keepalive_targets(now):
            try:
                tunnel.sock.sendto(b"", dest)
            except OSError as exc:
                log.debug("keepalive to %s:%d: %s", *dest, exc)
                continue
            tunnel.counters["tx_keepalives"] += 1
