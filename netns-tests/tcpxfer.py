"""Byte-exact TCP transfer, one end per process (run inside a namespace).

    tcpxfer.py server --port P --direction upload|download [--size N] [--bind ADDR]
                      (--bind :: listens on IPv6, and on IPv4 as v4-mapped)
    tcpxfer.py client --host H --port P --direction upload|download [--size N]

``upload`` moves N bytes client -> server, ``download`` server -> client.  The
source sends random bytes, half-closes, and reads back the sink's sha256 digest;
the sink reads to EOF, sends back the 32-byte digest of what it got, and closes.
Each end prints exactly one JSON line on stdout (the server prints a
``{"event": "listening", ...}`` line first) with byte count, sha256 of the bytes
it sent or received, the peer's address as its socket sees it, and - on the
source - whether the sink's digest matched.  Every blocking step has a timeout;
any failure prints ``{"ok": false, "error": ...}`` and exits 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time

CHUNK = 256 * 1024


def emit(obj) -> None:
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def source(sock: socket.socket, size: int) -> dict:
    """Send *size* random bytes, half-close, then read the sink's digest."""
    digest = hashlib.sha256()
    remaining = size
    while remaining:
        block = os.urandom(min(CHUNK, remaining))
        digest.update(block)
        sock.sendall(block)
        remaining -= len(block)
    sock.shutdown(socket.SHUT_WR)
    echoed = recv_exact(sock, 32)
    extra = sock.recv(1)
    sent = digest.hexdigest()
    return {"role": "source", "bytes": size, "sha256": sent,
            "peer_sha256": echoed.hex(), "match": echoed.hex() == sent and not extra}


def sink(sock: socket.socket) -> dict:
    """Read to EOF, send back the sha256 digest of everything read."""
    digest = hashlib.sha256()
    total = 0
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while True:
        n = sock.recv_into(buf)
        if not n:
            break
        digest.update(view[:n])
        total += n
    sock.sendall(digest.digest())
    sock.shutdown(socket.SHUT_WR)
    return {"role": "sink", "bytes": total, "sha256": digest.hexdigest()}


def run_server(args) -> dict:
    lsock = socket.socket(socket.AF_INET6 if ":" in args.bind else socket.AF_INET,
                          socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((args.bind, args.port))
    lsock.listen(4)
    lsock.settimeout(args.accept_timeout)
    emit({"event": "listening", "port": lsock.getsockname()[1]})
    conn, peer = lsock.accept()
    lsock.close()
    with conn:
        conn.settimeout(args.timeout)
        result = sink(conn) if args.direction == "upload" else source(conn, args.size)
    result.update(peer=peer[0], peer_port=peer[1])
    return result


def run_client(args) -> dict:
    deadline = time.monotonic() + args.connect_timeout
    while True:  # the path may need a moment (e.g. a fresh tunnel); retry refusals
        sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.settimeout(min(5.0, args.connect_timeout))
        try:
            sock.connect((args.host, args.port))
            break
        except OSError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)
    with sock:
        sock.settimeout(args.timeout)
        local = sock.getsockname()
        peer = sock.getpeername()
        result = source(sock, args.size) if args.direction == "upload" else sink(sock)
    result.update(peer=peer[0], peer_port=peer[1], local=local[0], local_port=local[1])
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="tcpxfer")
    p.add_argument("role", choices=["server", "client"])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--bind", default="0.0.0.0")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--direction", choices=["upload", "download"], required=True)
    p.add_argument("--size", type=int, default=1 << 20)
    p.add_argument("--timeout", type=float, default=30.0, help="per-operation socket timeout")
    p.add_argument("--accept-timeout", type=float, default=60.0)
    p.add_argument("--connect-timeout", type=float, default=20.0)
    args = p.parse_args(argv)
    try:
        result = run_server(args) if args.role == "server" else run_client(args)
    except Exception as exc:  # reported, never hangs or tracebacks silently
        emit({"ok": False, "role": args.role, "error": f"{type(exc).__name__}: {exc}"})
        return 1
    result["ok"] = True
    result["direction"] = args.direction
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
