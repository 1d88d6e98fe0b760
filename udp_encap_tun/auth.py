"""Pre-shared-key admission over the data socket (pure: no I/O, clock passed in).

Handshake, on the same UDP address and port the data uses, so that it works
behind port-translating NAT (the original design's TCP side channel does not):

    client                                         server (no state until 3)
 1. HELLO     nonce, padding         ------>
 2.                                  <------  CHALLENGE nonce, window, cookie
        cookie = MAC(server secret of the window; window, peer address, peer port, nonce)
 3. RESPONSE  nonce, window, cookie, proof  ->  cookie recomputed for the address
        proof = MAC(K; cookie, window, nonce)      and port it came from; proof checked;
                                                   only now: store entry, address
 4.                                  <------  WELCOME nonce, confirm = MAC(K; cookie, nonce)

K is derived from the pre-shared key, which never crosses the wire.  The proof
covers the cookie, and the cookie covers the address and port the server saw,
so a captured RESPONSE replayed from another address or port, or after the
cookie's window, is refused.  The server's cookie secrets are random and
rotate; it holds no per-peer state before step 3, so a spoofed flood costs it
no memory and no pool addresses.  HELLO is larger than CHALLENGE, so the
server never amplifies.  WELCOME proves the server knows the key too.

Control messages can never be mistaken for TCP: byte 12 (a TCP segment's data
offset) is 0, and every valid segment has a data offset of at least 5.

    0      4    5     6         12   13        16
    | UETA | 1  | type | 0 * 6  | 00 | 0 * 3   | body ...
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import struct
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from .errors import OperatorError
from .packet import ReadBuffer
from .store import Peer

MAGIC: Final = b"UETA"
VERSION: Final = 1
HELLO, CHALLENGE, RESPONSE, WELCOME, AUTH_REQUIRED = 1, 2, 3, 4, 5
TYPE_NAMES: Final = {HELLO: "hello", CHALLENGE: "challenge", RESPONSE: "response",
              WELCOME: "welcome", AUTH_REQUIRED: "auth_required"}
HEADER: Final = struct.Struct("!4sBB6xB3x")  # magic, version, type, marker (always 0)
HEADER_LEN: Final = HEADER.size  # 16
NONCE_LEN = MAC_LEN = 16
WINDOW: Final = struct.Struct("!I")
BODY_LEN: Final = {
    HELLO: NONCE_LEN,
    CHALLENGE: NONCE_LEN + 4 + MAC_LEN,
    RESPONSE: NONCE_LEN + 4 + MAC_LEN + MAC_LEN,
    WELCOME: NONCE_LEN + MAC_LEN,
    AUTH_REQUIRED: 0,
}
HELLO_SIZE: Final = 96  # padded: the CHALLENGE it asks for is smaller (no amplification)

# outcomes of on_control that are not failures
SUCCESS: Final = {"challenge_sent", "accepted", "response_sent", "authenticated", "auth_required"}

WINDOW_SECONDS: Final = 10  # a cookie is good for 2 to 3 windows
SECRET_EPOCH: Final = 6  # windows per server secret (a minute); current and previous are kept
MIN_PSK: Final = 16
QUEUE_LIMIT: Final = 128  # client: packets held per server while authenticating
HELLO_RETRY: Final = 1.0  # client: seconds between HELLOs while no WELCOME came
FAILING_AFTER: Final = 10.0  # client: an attempt without WELCOME this long is "failing"
RECENT_NONCES: Final = 4  # client: a CHALLENGE to any of its last few HELLOs is answered

# What a client holds for a server while authenticating: one packet's datagrams, as
# (buffer, segment size) batches the loop sends.
Held: TypeAlias = list[tuple[bytes, int]]
Random: TypeAlias = Callable[[int], bytes]  # os.urandom, or a test's


def header(kind: int) -> bytes:
    return HEADER.pack(MAGIC, VERSION, kind, 0)


def is_control(datagram: ReadBuffer) -> bool:
    """Cheap test, for datagrams that failed the TCP check (data offset < 5)."""
    return len(datagram) >= HEADER_LEN and datagram[12] == 0 and datagram[:4] == MAGIC


def parse(datagram: ReadBuffer) -> tuple[int, bytes] | None:
    """(type, body bytes) of a control message, or None.  Never raises."""
    if not is_control(datagram):
        return None
    magic, version, kind, marker = HEADER.unpack_from(datagram, 0)
    need = BODY_LEN.get(kind)
    if version != VERSION or need is None:
        return None
    # an unpadded HELLO would make the server send more than it got
    if len(datagram) < (HELLO_SIZE if kind == HELLO else HEADER_LEN + need):
        return None
    return kind, bytes(datagram[HEADER_LEN:HEADER_LEN + need])


def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"".join(parts), hashlib.sha256).digest()[:MAC_LEN]


def load_psk(path: str) -> bytes:
    """Read a key file the way ssh treats private keys: refuse one others can read."""
    try:
        # O_NONBLOCK: a FIFO named by mistake must not hang the start (it is refused below)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise OperatorError(f"key file {path}: no such file") from None
    except PermissionError:
        raise OperatorError(f"key file {path}: permission denied") from None
    except OSError as exc:
        raise OperatorError(f"key file {path}: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):  # before fdopen, which refuses a directory with a traceback
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise OperatorError(f"key file {path}: {kind}")
    with os.fdopen(fd, "rb") as f:
        if mode & 0o077:
            raise OperatorError(f"key file {path} is accessible by others (mode "
                                f"{stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
        key = f.read(1 << 16).strip()
    if not key:
        raise OperatorError(f"key file {path} is empty")
    if len(key) < MIN_PSK:
        raise OperatorError(f"key file {path} holds {len(key)} bytes; at least {MIN_PSK} "
                            "are needed (e.g. head -c 32 /dev/urandom | base64 > FILE)")
    return key


class Keys:
    """What both ends derive from the pre-shared key."""

    def __init__(self, psk: bytes) -> None:
        self.mac = _mac(psk, b"udp-encap-tun v1 mac")
        self.address = _mac(psk, b"udp-encap-tun v1 address pool")  # keys the address hash

    def proof(self, cookie: bytes, window: bytes, nonce: bytes) -> bytes:
        return _mac(self.mac, b"proof", cookie, window, nonce)

    def confirm(self, cookie: bytes, nonce: bytes) -> bytes:
        return _mac(self.mac, b"welcome", cookie, nonce)


class TokenBucket:
    def __init__(self, rate: float, burst: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = burst
        self.last: float | None = None

    def take(self, now: float) -> bool:
        if self.last is not None and now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        if self.last is None or now > self.last:
            self.last = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class SourceBuckets:
    """A token bucket per source /24, for replies to sources that have not
    authenticated: each spoofed victim network gets a bounded trickle, and no
    flood from other (spoofed) sources can use up a real client's share, as
    it could with one bucket for everybody.  At most *limit* prefixes are
    tracked; beyond that the least recently seen is forgotten (and starts
    again with a full bucket)."""

    def __init__(self, rate: float, burst: float, limit: int = 8192) -> None:
        self.rate, self.burst, self.limit = rate, burst, limit
        self.buckets: OrderedDict[str, list[float]] = OrderedDict()  # prefix -> [tokens, last]

    def take(self, host: str, now: float) -> bool:
        prefix = host.rpartition(".")[0]  # dotted quad: its /24
        bucket = self.buckets.get(prefix)
        if bucket is None:
            if len(self.buckets) >= self.limit:
                self.buckets.popitem(last=False)
            bucket = self.buckets[prefix] = [self.burst, now]
        else:
            self.buckets.move_to_end(prefix)
            if now > bucket[1]:
                bucket[0] = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
                bucket[1] = now
        if bucket[0] >= 1:
            bucket[0] -= 1
            return True
        return False


def _peer_bytes(peer: Peer) -> bytes:
    host, port = peer
    return host.encode() + b"|" + port.to_bytes(2, "big")


class ServerAuth:
    """Stateless challenge and proof check.  *on_control* returns the reply (or
    None) and, for an accepted RESPONSE, sets ``accepted``; the caller admits
    the peer."""

    def __init__(self, keys: Keys, rate: float = 100.0, burst: float = 200.0,
                 random: Random = os.urandom) -> None:
        """*rate* and *burst*: handshake messages handled per second per source /24
        (a tenth of that for AUTH_REQUIRED)."""
        self.keys = keys
        self.random = random
        self.secrets: dict[int, bytes] = {}
        self.buckets = SourceBuckets(rate, burst)
        self.auth_required_buckets = SourceBuckets(rate / 10, burst / 10)

    def _secret(self, epoch: int) -> bytes | None:
        secret = self.secrets.get(epoch)
        if secret is None:
            current = max(self.secrets, default=epoch)
            if epoch < current:
                return None  # too old: never recreate a past secret
            secret = self.secrets[epoch] = self.random(32)
            for old in [e for e in self.secrets if e < epoch - 1]:
                del self.secrets[old]
        return secret

    def cookie(self, peer: Peer, window: int, nonce: bytes) -> bytes | None:
        secret = self._secret(window // SECRET_EPOCH)
        if secret is None:
            return None
        return _mac(secret, WINDOW.pack(window), _peer_bytes(peer), nonce)

    def on_control(self, kind: int, body: bytes, peer: Peer,
                   now: float) -> tuple[bytes | None, str]:
        """(reply bytes or None, outcome) where outcome is a counter name suffix:
        'challenge_sent', 'accepted', or the reason it was refused."""
        if kind not in (HELLO, RESPONSE):
            return None, "unexpected_" + TYPE_NAMES[kind]
        if not self.buckets.take(peer[0], now):
            return None, "rate_limited"
        nonce = body[:NONCE_LEN]
        window_now = int(now // WINDOW_SECONDS)
        if kind == HELLO:
            window = WINDOW.pack(window_now)
            cookie = self.cookie(peer, window_now, nonce)
            if cookie is None:  # *now* is a minute before a secret already made
                return None, "clock_went_back"
            return header(CHALLENGE) + nonce + window + cookie, "challenge_sent"
        window = body[NONCE_LEN:NONCE_LEN + 4]
        cookie = body[NONCE_LEN + 4:NONCE_LEN + 4 + MAC_LEN]
        proof = body[NONCE_LEN + 4 + MAC_LEN:]
        (w,) = WINDOW.unpack(window)
        if not window_now - 2 <= w <= window_now:
            return None, "stale_cookie"
        expected = self.cookie(peer, w, nonce)
        if expected is None or not hmac.compare_digest(expected, cookie):
            return None, "bad_cookie"  # forged, or replayed from another address/port
        if not hmac.compare_digest(self.keys.proof(cookie, window, nonce), proof):
            return None, "bad_proof"  # does not know the key
        return header(WELCOME) + nonce + self.keys.confirm(cookie, nonce), "accepted"

    def auth_required(self, peer: Peer, now: float) -> bytes | None:
        """Reply to data from a peer we do not know (it should authenticate again)."""
        return header(AUTH_REQUIRED) if self.auth_required_buckets.take(peer[0], now) else None


@dataclass
class Session:
    """Client side, one per server (host, port)."""
    ok: bool = False
    # nonce -> cookie (b"" until its CHALLENGE came) of the last few HELLOs: a slow or
    # busy server's answer to an earlier HELLO still counts after a retry
    pending: OrderedDict[bytes, bytes] = field(default_factory=OrderedDict)
    next_hello: float = 0.0
    queue: deque[Held] = field(default_factory=lambda: deque(maxlen=QUEUE_LIMIT))
    started: float | None = None  # first HELLO of the attempt under way (None: none)
    hellos: int = 0  # HELLOs sent in this attempt
    challenges: int = 0  # CHALLENGEs answered in this attempt


class ClientAuth:
    """Authenticates to each server before data goes there; holds a little data meanwhile."""

    def __init__(self, keys: Keys, random: Random = os.urandom) -> None:
        self.keys = keys
        self.random = random
        self.sessions: dict[Peer, Session] = {}
        self.ready: set[Peer] = set()  # servers data may go to now (the hot path looks here)

    def hold(self, dest: Peer, item: Held, now: float) -> tuple[bytes | None, bool]:
        """Data for a server we are not authenticated to: keep *item* (bounded).
        Returns (HELLO to send or None, dropped: bool)."""
        session = self.sessions.get(dest)
        if session is None:
            if len(self.sessions) >= 4096:
                return None, True
            session = self.sessions[dest] = Session()
        dropped = len(session.queue) == session.queue.maxlen
        session.queue.append(item)
        return self._hello(session, now), dropped

    def _hello(self, session: Session, now: float, force: bool = False) -> bytes | None:
        if not force and now < session.next_hello:
            return None
        nonce = self.random(NONCE_LEN)
        session.pending[nonce] = b""
        while len(session.pending) > RECENT_NONCES:
            session.pending.popitem(last=False)
        session.next_hello = now + HELLO_RETRY
        if session.started is None:
            session.started, session.hellos, session.challenges = now, 0, 0
        session.hellos += 1
        msg = header(HELLO) + nonce
        return msg + bytes(HELLO_SIZE - len(msg))

    def on_control(self, kind: int, body: bytes, peer: Peer,
                   now: float) -> tuple[bytes | None, Sequence[Held], str]:
        """(reply or None, released data items, outcome)."""
        session = self.sessions.get(peer)
        if session is None:
            return None, (), "unexpected_" + TYPE_NAMES[kind]
        nonce = body[:NONCE_LEN]
        if kind == AUTH_REQUIRED:
            # the server forgot us (expiry, restart): authenticate again, keep sending
            return self._hello(session, now), (), "auth_required"
        if nonce not in session.pending:  # nonces are random: no secret to time here
            return None, (), "stale_" + TYPE_NAMES[kind]
        if kind == CHALLENGE:
            window = body[NONCE_LEN:NONCE_LEN + 4]
            cookie = session.pending[nonce] = body[NONCE_LEN + 4:]
            session.challenges += 1
            return (header(RESPONSE) + nonce + window + cookie
                    + self.keys.proof(cookie, window, nonce)), (), "response_sent"
        if kind == WELCOME:
            cookie = session.pending[nonce]
            if not cookie or not hmac.compare_digest(
                    body[NONCE_LEN:], self.keys.confirm(cookie, nonce)):
                return None, (), "bad_welcome"
            session.ok = True
            session.pending.clear()  # a replayed WELCOME finds nothing to match
            session.next_hello = now
            session.started = None
            self.ready.add(peer)
            released = list(session.queue)
            session.queue.clear()
            return None, released, "authenticated"
        return None, (), "unexpected_" + TYPE_NAMES[kind]

    def state(self, dest: Peer, now: float) -> str:
        """'authenticated', 'pending' or 'failing' (an attempt, first or again
        after AUTH_REQUIRED, has gone FAILING_AFTER seconds without WELCOME)."""
        session = self.sessions.get(dest)
        if session is None:
            return "pending"
        if session.started is not None and now - session.started >= FAILING_AFTER:
            return "failing"
        return "authenticated" if session.ok else "pending"

    def retries(self, now: float) -> list[tuple[bytes | None, Peer]]:
        """HELLOs due for servers that still hold data or never answered."""
        out: list[tuple[bytes | None, Peer]] = []
        for dest, session in self.sessions.items():
            if not session.ok and session.queue and now >= session.next_hello:
                out.append((self._hello(session, now), dest))
        return out
