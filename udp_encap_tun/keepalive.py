"""Client keepalives: an empty UDP datagram to each server now and then keeps a
NAT mapping and the server's store entry alive while TCP is idle.

An empty datagram can never be a TCP segment.  Our server refreshes the
sender's entry and answers with an empty datagram (so that the client hears
from it while TCP is idle, see Router.tick); the original C program builds a
20-byte IPv4 packet with no TCP header from it, which the kernel discards as
malformed (and its entry is refreshed too)."""

from __future__ import annotations

from typing import cast

from .service import Service, TunnelView, UdpTunnelView


class Keepalive(Service):
    def __init__(self, interval: float):
        self.interval = interval
        self.next: float | None = None

    def tick(self, view: TunnelView, now: float) -> None:
        tunnel = cast(UdpTunnelView, view)  # cli.py gives keepalives to default-wire clients only
        if self.next is None:
            self.next = now + self.interval
        if now < self.next:
            return
        self.next = now + self.interval
        for dest in tunnel.router.keepalive_targets(now):
            tunnel.send_keepalive(dest, now)
