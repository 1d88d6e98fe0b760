"""The ``udp-encap-tun status`` command: query the tunnel on a tun device in
this network namespace and print its document (text, ``--json`` or
``--prometheus``)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from collections.abc import Sequence

from ..errors import OneLineErrors, positive
from .address import display_name, socket_name
from .document import Document
from .render import prometheus_down, render_prometheus, render_text

PROG = "udp-encap-tun status"
TIMEVAL = struct.Struct("@ll")  # struct timeval: seconds, microseconds


class StatusError(Exception):
    pass


def query(interface: str, timeout: float = 5.0) -> Document:
    """The status document of the tunnel on *interface* in this network namespace."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    deadline = time.monotonic() + timeout
    try:
        # A blocking connect to a unix socket whose backlog is full waits for room, up
        # to SO_SNDTIMEO (a non-blocking one fails at once with EAGAIN)
        seconds = max(timeout, 0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO,
                        TIMEVAL.pack(int(seconds), int(seconds % 1 * 1e6)))
        try:
            sock.connect(socket_name(interface))
        except (ConnectionRefusedError, FileNotFoundError):
            raise StatusError(f"no udp-encap-tun is running on {interface} in this network "
                              "namespace") from None
        except (BlockingIOError, TimeoutError):  # the backlog stayed full
            raise StatusError(f"the tunnel on {interface} did not accept within "
                              f"{timeout:g}s") from None
        chunks = []
        while True:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                raise StatusError(f"the tunnel on {interface} did not answer within "
                                  f"{timeout:g}s") from None
            if not chunk:
                break
            chunks.append(chunk)
    except OSError as exc:
        raise StatusError(f"status of {interface}: {exc.strerror or exc}") from None
    finally:
        sock.close()
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or doc.get("program") != "udp-encap-tun":
        raise StatusError(f"{display_name(interface)} did not answer with a udp-encap-tun status "
                          "document (incomplete, or another program holds the name)")
    if doc.get("error"):
        raise StatusError(f"tunnel on {interface}: {doc['error']}")
    return doc


class _Parser(OneLineErrors, argparse.ArgumentParser):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Show the live status of the udp-encap-tun running on a "
                "tun device. Run it in the tunnel's network namespace, as root or the "
                "tunnel's user.")
    p.add_argument("--interface", metavar="TUN",
                   help="the tunnel's tun device (default: 'interface' from --config)")
    p.add_argument("--config", metavar="FILE",
                   help="take the interface from this udp-encap-tun config file")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the JSON status document")
    fmt.add_argument("--prometheus", action="store_true",
                     help="print Prometheus text exposition format (node exporter textfile "
                          "collector); prints udp_encap_tun_up 0 when no tunnel answers")
    p.add_argument("--per-peer", action="store_true",
                   help="with --prometheus: metrics for every peer too (one series per peer)")
    p.add_argument("--timeout", type=positive(float), default=5.0, metavar="SECONDS",
                   help="give up after this long (default 5)")
    return p


def interface_from_config(path: str) -> str | None:
    """The ``interface`` setting of a config file (the daemon's syntax: key = value,
    key: value or key value; # and ; comments)."""
    import configargparse

    with open(path) as f:
        items = configargparse.DefaultConfigFileParser().parse(f)
    value = items.get("interface")
    return value if isinstance(value, str) and value else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    interface = args.interface
    if interface is None and args.config:
        try:
            interface = interface_from_config(args.config)
        except Exception as exc:  # unreadable, or not a config file
            sys.stderr.write(f"{PROG}: error: {args.config}: {exc}\n")
            return 2
    if not interface:
        sys.stderr.write(f"{PROG}: error: --interface is required (or --config with an "
                         "interface setting)\n")
        return 2
    try:
        doc = query(interface, args.timeout)
    except StatusError as exc:
        if args.prometheus:
            sys.stdout.write(prometheus_down(interface))
        sys.stderr.write(f"udp-encap-tun: error: {exc}\n")
        return 1
    if args.json:
        out = json.dumps(doc, indent=2) + "\n"
    elif args.prometheus:
        out = render_prometheus(doc, per_peer=args.per_peer)
    else:
        out = render_text(doc)
    try:
        sys.stdout.write(out)
        sys.stdout.flush()
    except BrokenPipeError:  # e.g. | head
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0

