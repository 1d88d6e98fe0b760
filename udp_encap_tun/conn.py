"""The UDP socket (I/O edge): bound to an interface and the listen port."""

from __future__ import annotations

import errno
import logging
import socket
import struct

from .errors import OperatorError

log = logging.getLogger(__name__)

SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)
SOCKET_BUFFER = 8 << 20
IP_MTU_DISCOVER = getattr(socket, "IP_MTU_DISCOVER", 10)  # ip(7); not in every Python build
IP_PMTUDISC_DO = getattr(socket, "IP_PMTUDISC_DO", 2)
IP_RECVERR = getattr(socket, "IP_RECVERR", 11)
SO_EE_ORIGIN_ICMP = 2
EXTENDED_ERR = struct.Struct("=IBBBBII")  # struct sock_extended_err, then the offender's sockaddr
# errors a send can fail with only because an earlier ICMP error is still pending (IP_RECVERR)
REPORTED_ERRORS = frozenset((errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                             errno.EHOSTDOWN, errno.EPROTO))
# errors a read fails with, once each, because of an ICMP error about our datagrams
# (IP_RECVERR; "fragmentation needed" as EMSGSIZE): the socket itself is fine
PENDING_ICMP_ERRORS = REPORTED_ERRORS | {errno.EMSGSIZE}


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


def enable_icmp_errors(sock: socket.socket) -> None:
    """Client: have ICMP errors about our datagrams queued on the socket
    (IP_RECVERR), so that "port unreachable" from a server that is not there
    names it.  Without it an unconnected UDP socket never hears of them.  The
    kernel also fails the next send (to any destination) with such an error
    once; device.Tunnel sends that datagram again."""
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


def parse_icmp_error(ancdata):
    """(errno, info, offender address or None) of an ICMP error read from the
    error queue, or None (a local error, e.g. EMSGSIZE on send: counted there).
    *info* is the next-hop MTU of "fragmentation needed"."""
    for level, kind, data in ancdata:
        if level != socket.IPPROTO_IP or kind != IP_RECVERR or len(data) < EXTENDED_ERR.size:
            continue
        err, origin, _type, _code, _pad, info, _data = EXTENDED_ERR.unpack_from(data)
        if origin != SO_EE_ORIGIN_ICMP:
            return None
        offender = None
        if len(data) >= EXTENDED_ERR.size + 8 and \
                int.from_bytes(data[16:18], "little") == socket.AF_INET:
            offender = socket.inet_ntoa(data[20:24])
        return err, info, offender
    return None


def read_icmp_errors(sock: socket.socket, limit: int = 64):
    """Drain (up to *limit* of) the error queue: [(destination, errno, info,
    offender)] of the ICMP errors in it; local errors are dropped."""
    out = []
    for _ in range(limit):
        try:
            _data, ancdata, _flags, dest = sock.recvmsg(64, 512, socket.MSG_ERRQUEUE)
        except (BlockingIOError, InterruptedError):
            break
        except OSError as exc:
            log.debug("error queue: %s", exc)
            break
        found = parse_icmp_error(ancdata)
        if found is not None:
            out.append((dest, *found))
    return out


def set_buffers(sock: socket.socket, size: int) -> None:
    """Large socket buffers: the FORCE variants where privileged, else as much as allowed."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)
