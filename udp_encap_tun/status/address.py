"""Where a tunnel serves its status: the abstract unix stream socket
``\\0udp-encap-tun/<tun name>``, which belongs to the network namespace like
the interface name does."""

from __future__ import annotations

NAME_PREFIX = "udp-encap-tun/"


def socket_name(interface: str) -> bytes:
    """The abstract socket address of the tunnel on *interface*."""
    return b"\0" + (NAME_PREFIX + interface).encode()


def display_name(interface: str) -> str:
    return "@" + NAME_PREFIX + interface
