"""The UDP edge: the socket (bound to an interface and the listen port) and
the classes that send and receive batches of datagrams on it."""

from __future__ import annotations

import errno
import logging
import socket
import struct
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeAlias

from . import offload as ol
from .errors import OperatorError
from .faults import Links

if TYPE_CHECKING:  # an annotation only: loop.py imports this module
    from .loop import Loop

Address: TypeAlias = tuple[str, int]
# what an IPv6 socket names a peer: (host, port, flowinfo, scope id)
SockAddr: TypeAlias = tuple[str, int, int, int] | tuple[str, int]
Buffer: TypeAlias = bytes | bytearray | memoryview
# wire segments to send: [(buffer, segment size)], every segment of a buffer but
# its last exactly that size (one datagram each)
Batches: TypeAlias = Sequence[tuple[Buffer, int]]
# an ICMP error read from the error queue: (destination, errno, info, offender or None)
IcmpError: TypeAlias = tuple[Address, int, int, str | None]
MAX_DATAGRAM: Final = 65536

log = logging.getLogger(__name__)

SO_RCVBUFFORCE: Final[int] = getattr(socket, "SO_RCVBUFFORCE", 33)
SO_SNDBUFFORCE: Final[int] = getattr(socket, "SO_SNDBUFFORCE", 32)
SOCKET_BUFFER: Final = 8 << 20
# ip(7); not in every Python build
IP_MTU_DISCOVER: Final[int] = getattr(socket, "IP_MTU_DISCOVER", 10)
IP_PMTUDISC_DO: Final[int] = getattr(socket, "IP_PMTUDISC_DO", 2)
IP_RECVERR: Final[int] = getattr(socket, "IP_RECVERR", 11)
IPV6_MTU_DISCOVER: Final[int] = getattr(socket, "IPV6_MTU_DISCOVER", 23)  # ipv6(7)
IPV6_PMTUDISC_DO: Final[int] = getattr(socket, "IPV6_PMTUDISC_DO", 2)
IPV6_RECVERR: Final[int] = getattr(socket, "IPV6_RECVERR", 25)
SO_EE_ORIGIN_ICMP: Final = 2
SO_EE_ORIGIN_ICMP6: Final = 3
V4_MAPPED: Final = "::ffff:"  # an IPv4 peer as a dual-stack socket names it
CACHED_PEERS: Final = 4096  # peer conversions remembered (each way) before starting over
# struct sock_extended_err, then the offender's sockaddr
EXTENDED_ERR: Final = struct.Struct("=IBBBBII")
# errors a send can fail with only because an earlier ICMP error is still pending (IP_RECVERR)
REPORTED_ERRORS: Final = frozenset((errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                             errno.EHOSTDOWN, errno.EPROTO))
# errors a read fails with, once each, because of an ICMP error about our datagrams
# (IP_RECVERR; "fragmentation needed" as EMSGSIZE): the socket itself is fine
PENDING_ICMP_ERRORS: Final = REPORTED_ERRORS | {errno.EMSGSIZE}


def open_udp(port: int, device: str, address: str | None = "0.0.0.0",
             buffer: int = SOCKET_BUFFER) -> socket.socket:
    """A UDP socket bound to *device* (SO_BINDTODEVICE) and *address*:*port*.

    *address* None (or ``::``): one socket for both families (AF_INET6,
    IPV6_V6ONLY off, bound to ``::``; IPv4 peers arrive v4-mapped: Datagrams converts), or an
    IPv4 one bound to 0.0.0.0 where the host has no IPv6.  An IPv4 *address*
    keeps the plain AF_INET socket (no conversion per datagram), an IPv6 one
    makes an IPv6-only socket.  Replies always leave from this socket, so from
    the listen port (and, when *address* is given, from that address)."""
    if address == "::":
        address = None  # any address of both families
    family = socket.AF_INET if address is not None and ":" not in address else socket.AF_INET6
    try:
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    except OSError as exc:
        if address is not None or exc.errno != errno.EAFNOSUPPORT:
            raise OperatorError(f"cannot open a UDP socket for {address}: {exc.strerror}") from None
        log.info("no IPv6 on this host: the UDP socket carries IPv4 only")
        family, address = socket.AF_INET, "0.0.0.0"
        sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if address is None else 1)
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
            sock.bind((address or "::", port))
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


SOL_UDP: Final = 17
UDP_SEGMENT: Final = 103
UDP_GRO: Final = 104


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
    needed" (PROBE would ignore those and keep sending what gets dropped).
    An IPv6 socket: the same for IPv6 (IPV6_PMTUDISC_DO: no local
    fragmentation, "packet too big" learnt) and, dual-stack, for IPv4."""
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_DO)


def enable_icmp_errors(sock: socket.socket) -> None:
    """Client: have ICMP errors about our datagrams queued on the socket
    (IP_RECVERR), so that "port unreachable" from a server that is not there
    names it.  Without it an unconnected UDP socket never hears of them.  The
    kernel also fails the next send (to any destination) with such an error
    once; Datagrams.send sends that datagram again.  An IPv6 socket: also
    IPV6_RECVERR (ICMPv6 errors; a dual-stack socket reports the IPv4 ones
    in the IPv6 form too)."""
    sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)


def parse_icmp_error(
        ancdata: list[tuple[int, int, bytes]]) -> tuple[int, int, str | None] | None:
    """(errno, info, offender address or None) of an ICMP or ICMPv6 error read
    from the error queue, or None (a local error, e.g. EMSGSIZE on send:
    counted there).  *info* is the next-hop MTU of "fragmentation needed" (or
    ICMPv6 "packet too big").  An IPv6 socket reports the IPv4 errors of
    v4-mapped destinations in its own form (IPV6_RECVERR, a v4-mapped
    offender): the offender is given as the IPv4 address."""
    for level, kind, data in ancdata:
        if len(data) < EXTENDED_ERR.size or (level, kind) not in (
                (socket.IPPROTO_IP, IP_RECVERR), (socket.IPPROTO_IPV6, IPV6_RECVERR)):
            continue
        err, origin, _type, _code, _pad, info, _data = EXTENDED_ERR.unpack_from(data)
        if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
            return None
        offender: str | None = None
        family = int.from_bytes(data[16:18], "little") if len(data) >= 18 else None
        if family == socket.AF_INET and len(data) >= EXTENDED_ERR.size + 8:
            offender = socket.inet_ntoa(data[20:24])
        elif family == socket.AF_INET6 and len(data) >= EXTENDED_ERR.size + 24:
            offender = unmapped(socket.inet_ntop(socket.AF_INET6, data[24:40]))
        return err, info, offender
    return None


def unmapped(host: str) -> str:
    """An IPv6 socket's name of a host: a v4-mapped address as the IPv4 dotted quad."""
    return host[7:] if host.startswith(V4_MAPPED) and "." in host else host


def read_icmp_errors(sock: socket.socket, limit: int = 64) -> list[IcmpError]:
    """Drain (up to *limit* of) the error queue: [(destination, errno, info,
    offender)] of the ICMP errors in it; local errors are dropped."""
    out: list[IcmpError] = []
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
            out.append(((unmapped(dest[0]), dest[1]), *found))
    return out


def set_buffers(sock: socket.socket, size: int) -> None:
    """Large socket buffers: the FORCE variants where privileged, else as much as allowed."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


# --------------------------------------------------------------------------- the UDP edge


class Datagrams:
    """The UDP edge of the simple data path: datagrams go out and come in one
    per system call.  It sends *batches* -- ``[(buffer, segment size)]``, every
    segment of a buffer but its last exactly that size -- and receives into a
    buffer the loop gives it.  The system calls' failures are its business:
    an error an ICMP message left pending (client, IP_RECVERR) is tried again
    once, a datagram refused because the bound link's MTU just fell is cut to
    the new size (*too_long*, asked with the refused size, says whether it fell
    and sets ``max_segment``), every other failure goes to *failed* (exc,
    destination, size) to be counted.

    Peers are ``(host, port)`` in both families.  On an IPv6 socket (``v6``)
    the edge converts: a source ``(host, port, flowinfo, scope id)`` becomes
    ``(host, port)``, a v4-mapped host the IPv4 dotted quad; an IPv4
    destination is sent to v4-mapped.  Both conversions are remembered (at
    most CACHED_PEERS each): a dictionary lookup per datagram.  An IPv4
    socket converts nothing."""

    gso = False
    gro = False

    def __init__(self, sock: socket.socket, retry_pending: bool = False):
        self.sock = sock
        sock.setblocking(False)
        self.fd = sock.fileno()
        self.retry_pending = retry_pending  # client: IP_RECVERR leaves errors pending
        # set by the loop: count a failed send; after EMSGSIZE, whether the link's MTU fell
        self.failed: Callable[[OSError, Address, int], None] = _ignore
        self.too_long: Callable[[int], bool] | None = None
        self.max_segment = MAX_DATAGRAM  # the largest datagram the bound link carries
        self._sendto = sock.sendto
        self.v6 = sock.family == socket.AF_INET6  # peers converted (see above)
        self._peers: dict[SockAddr, Address] = {}  # socket address -> peer
        self.wire: dict[Address, Address] = {}  # peer -> socket address

    def peer(self, address: SockAddr) -> Address:
        """The peer ``(host, port)`` of an IPv6 socket's source *address*."""
        peer = self._peers.get(address)
        if peer is None:
            if len(self._peers) >= CACHED_PEERS:
                self._peers.clear()
            peer = self._peers[address] = (unmapped(address[0]), address[1])
        return peer

    def wire_address(self, dest: Address) -> Address:
        """What an IPv6 socket sends to for the peer *dest*."""
        to = self.wire.get(dest)
        if to is None:
            if len(self.wire) >= CACHED_PEERS:
                self.wire.clear()
            host = dest[0] if ":" in dest[0] else V4_MAPPED + dest[0]
            to = self.wire[dest] = (host, dest[1])
        return to

    def describe(self) -> str:
        return "one datagram per system call"

    def describe_udp(self) -> str:
        return f"UDP port {self.sock.getsockname()[1]:d}"

    def watch(self, loop: Loop[Address]) -> list[tuple[int, Callable[[], None]]]:
        """(fd, callback) of the UDP side for the loop to watch."""
        return [(self.fd, loop.on_udp)]

    def tick(self, now: float) -> None:
        """About once a second (the loop's timer)."""

    def rebind(self, links: Links) -> None:
        """An interface of the bound name is back (at a new index): bind the
        socket to it again."""
        name = links.bind_name
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, name.encode())
        except OSError as exc:  # EPERM without CAP_NET_RAW; ENODEV if gone again
            links.bind_index = None  # still missing; the next event of it retries
            log.error("cannot bind the UDP socket to %s again: %s", name, exc.strerror)
            return
        log.info("bound interface %s is back (index %d): UDP socket bound to it again",
                 name, links.bind_index)

    # -- sending -------------------------------------------------------------
    def send(self, batches: Batches, dest: Address) -> tuple[int, int]:
        """Send the wire segments of *batches* to *dest*: (datagrams, bytes) sent."""
        packets = nbytes = 0
        to = (self.wire.get(dest) or self.wire_address(dest)) if self.v6 else dest
        for data, size in batches:
            n = len(data)
            try:
                if n <= size:  # one datagram: the common case, no detour
                    self._sendto(data, to)
                else:
                    self.send_batch(data, size, to)
            except OSError as exc:
                err: OSError | None = exc
                if exc.errno in REPORTED_ERRORS or (exc.errno == errno.EMSGSIZE
                                                    and self.retry_pending):
                    err = self._send_again(data, size, to)
                if err is not None:
                    if err.errno == errno.EMSGSIZE and self.too_long is not None \
                            and self.too_long(min(n, size)):
                        sent = self._send_recut(data, size, to, dest)
                        packets += sent[0]
                        nbytes += sent[1]
                    else:
                        self.failed(err, dest, min(n, size))
                    continue
            packets += -(-n // size) if size else 1
            nbytes += n
        return packets, nbytes

    def send_batch(self, data: Buffer, size: int, dest: Address) -> None:
        """Several segments: one datagram each (*dest*: a socket address)."""
        for off in range(0, len(data), size):
            self._sendto(data[off:off + size], dest)

    def _send_again(self, data: Buffer, size: int, dest: Address) -> OSError | None:
        """An error left pending by an ICMP message fails the next send whatever
        its destination: send it again, once.  Returns the second try's error."""
        try:
            if len(data) <= size:
                self._sendto(data, dest)
            else:
                self.send_batch(data, size, dest)
        except OSError as exc:
            return exc
        return None

    def _send_recut(self, data: Buffer, size: int, to: Address,
                    dest: Address) -> tuple[int, int]:
        """A batch the kernel refused as too long, cut to the bound link's new
        MTU (sent to the socket address *to* of the peer *dest*)."""
        packets = nbytes = 0
        for part, part_size in self.recut(data, size):
            n = len(part)
            try:
                if n <= part_size:
                    self._sendto(part, to)
                else:
                    self.send_batch(part, part_size, to)
            except OSError as exc:
                self.failed(exc, dest, min(n, part_size))
                continue
            packets += -(-n // part_size)
            nbytes += n
        return packets, nbytes

    def recut(self, data: Buffer, size: int) -> Batches:
        return ol.recut(data, size, self.max_segment)

    # -- receiving -----------------------------------------------------------
    def recv(self, view: memoryview) -> tuple[int, Address, int]:
        """One datagram into *view*: (length, source, GRO segment size or 0).
        Raises BlockingIOError when none is queued."""
        n, peer = self.sock.recvfrom_into(view)
        if self.v6:
            peer = self._peers.get(peer) or self.peer(peer)
        return n, peer, 0

    def split(self, view: memoryview, n: int, seg_size: int) -> list[memoryview]:
        """The datagrams of a receive of *n* bytes (several with UDP_GRO)."""
        return ol.split_gro(view, n, seg_size) if n else [view[:0]]

    def icmp_errors(self) -> list[IcmpError]:
        return read_icmp_errors(self.sock)


class OffloadDatagrams(Datagrams):
    """The UDP edge of the offload path: a batch of segments leaves in one
    sendmsg (UDP_SEGMENT) and a receive may return several datagrams of one
    peer at once (UDP_GRO: the segment size comes as a control message)."""

    def __init__(self, sock: socket.socket, retry_pending: bool = False,
                 gso: bool = False, gro: bool = False):
        super().__init__(sock, retry_pending)
        self.gso, self.gro = gso, gro
        self._cmsg_space = socket.CMSG_SPACE(4)
        self._recvmsg_into = sock.recvmsg_into

    def describe(self) -> str:
        return (f"UDP GSO {'on' if self.gso else 'off: one sendto per segment'}, "
                f"GRO {'on' if self.gro else 'off'}")

    def send_batch(self, data: Buffer, size: int, dest: Address) -> None:
        """All segments in one sendmsg (UDP_SEGMENT), where the kernel has it."""
        if not self.gso:
            return super().send_batch(data, size, dest)
        self.sock.sendmsg((data,), ((SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder)),),
                          0, dest)
        return None

    def recv(self, view: memoryview) -> tuple[int, Address, int]:
        n, ancdata, _flags, peer = self._recvmsg_into((view,), self._cmsg_space)
        if self.v6:
            peer = self._peers.get(peer) or self.peer(peer)
        return n, peer, gro_size(ancdata) if ancdata else 0


def _ignore(exc: OSError, dest: Address, size: int) -> None:
    log.debug("sendto %s:%d: %s", *dest, exc)


def gro_size(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The segment size of a UDP_GRO receive (0: one datagram)."""
    for level, kind, data in ancdata:
        if level == SOL_UDP and kind == UDP_GRO:
            return int.from_bytes(data[:4], sys.byteorder)
    return 0
