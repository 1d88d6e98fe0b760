"""The UDP socket (I/O edge): bound to an interface and the listen port."""

from __future__ import annotations

import errno
import logging
import socket

from .errors import OperatorError

log = logging.getLogger(__name__)

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SOCKET_BUFFER = 8 << 20
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)  # ip(7); not in every Python build
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)


def open_udp(port: int, device: str, address: str = "0.0.0.0",
             buffer: int = SOCKET_BUFFER) -> socket.socket:
    """A UDP socket bound to *device* (SO_BINDTODEVICE) and *address*:*port*.

    Replies always leave from this socket, so from the listen port (and, when
    *address* is given, from that address)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
        except OSError as exc:
            if exc.errno == errno.ENODEV:
                raise OperatorError(f"no such interface: {device}") from None
            if exc.errno == errno.EPERM:
                raise OperatorError(f"cannot bind to interface {device}: operation not permitted "
                                    "(needs CAP_NET_RAW)") from None
            raise OperatorError(f"cannot bind to interface {device}: {exc.strerror}") from None
        try:
            sock.bind((address, port))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise OperatorError(f"--listen-address {address} is not an address of this "
                                    "host") from None
            if exc.errno == errno.EADDRINUSE:
                raise OperatorError(f"UDP port {port} is already in use on {device}") from None
            if exc.errno == errno.EACCES:
                raise OperatorError(f"cannot bind UDP port {port}: permission denied") from None
            raise OperatorError(f"cannot bind UDP port {port}: {exc.strerror}") from None
        set_buffers(sock, buffer)
        set_path_mtu_discovery(sock)
    except BaseException:
        sock.close()
        raise
    return sock


SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104


def probe_udp_offload(sock: socket.socket) -> tuple[bool, bool]:
    """(gso, gro): whether this kernel takes UDP_SEGMENT sends and UDP_GRO receives."""
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        gso = True
    except OSError:
        gso = False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        gro = True
    except OSError:
        gro = False
    return gso, gro


def set_path_mtu_discovery(sock: socket.socket) -> None:
    """DF on every datagram (IP_PMTUDISC_DO).  The default (IP_PMTUDISC_WANT)
    sets DF only on a datagram that fits the route's MTU, which a UDP_SEGMENT
    batch as a whole never does: its segments left without DF and could be
    fragmented on the way.  With DO the kernel refuses a datagram larger than
    the known path MTU (EMSGSIZE: counted tx_drop_message_too_long) instead
    of fragmenting it, and learns the path MTU from ICMP "fragmentation
    needed" (PROBE would ignore those and keep sending what gets dropped)."""
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)


def set_buffers(sock: socket.socket, size: int) -> None:
    """Large socket buffers: the FORCE variants where privileged, else as much as allowed."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
