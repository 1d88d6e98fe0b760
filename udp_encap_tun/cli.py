"""Command line, config file and environment; start-up and shutdown."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys

import configargparse

from .errors import OneLineErrors, OperatorError, positive
from .store import PoolError

log = logging.getLogger("udp_encap_tun")

PROG = "udp-encap-tun"
ENV_PREFIX = "UDP_ENCAP_TUN_"
LINK_OVERHEAD = 8  # the UDP header: a TCP segment in UDP costs 8 bytes more than in IPv4


class _Parser(OneLineErrors, configargparse.ArgParser):
    pass


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(text)
    return value


_port.__name__ = "port"


def _ipv4(text: str) -> str:
    return str(ipaddress.IPv4Address(text))


_ipv4.__name__ = "IPv4 address"


def build_parser() -> configargparse.ArgParser:
    p = _Parser(
        prog=PROG,
        description="Carry TCP inside UDP through a tun device. With --endpoint-port it is a "
                    "client, without it a server that gives each peer a generated address.",
        auto_env_var_prefix=ENV_PREFIX,
        args_for_setting_config_path=["--config"],
        config_arg_help_message="config file (key = value lines, option names without --)",
    )
    p.add_argument("--interface", required=True, metavar="TUN",
                   help="tun device to use; created if missing (and then removed on exit)")
    p.add_argument("--listen-port", required=True, type=_port, metavar="PORT",
                   help="local UDP port; all datagrams leave from it")
    p.add_argument("--bind-to-interface", required=True, metavar="DEV",
                   help="network interface the UDP socket is bound to (SO_BINDTODEVICE)")
    p.add_argument("--listen-address", default="0.0.0.0", type=_ipv4, metavar="ADDR",
                   help="local IPv4 address of the UDP socket (default: any); set it on a "
                        "server with several addresses so replies leave from the one peers use")
    p.add_argument("--endpoint-port", type=_port, metavar="PORT",
                   help="client mode: send to each packet's IPv4 destination at this UDP port")
    p.add_argument("--mtu", type=positive(int), metavar="BYTES",
                   help="tun MTU (default: MTU of --bind-to-interface minus 8)")
    p.add_argument("--address-pool", metavar="CIDR",
                   help="server: generated peer addresses (default: the tun address's subnet, "
                        "minus network, broadcast and the tun's own address)")
    p.add_argument("--address-key", default="", metavar="TEXT",
                   help="server: secret that keys the peer-to-address hash (keep it stable so "
                        "peers keep their address across restarts; default: derived from "
                        "--psk-file, else a fixed key)")
    p.add_argument("--peer-timeout", type=positive(float), default=300.0, metavar="SECONDS",
                   help="server: forget a peer this long after it was last heard from (default 300)")
    p.add_argument("--max-peers", type=positive(int), default=65536, metavar="N",
                   help="server: at most this many peers at once (default 65536)")
    p.add_argument("--psk-file", metavar="PATH",
                   help="pre-shared key (at least 16 bytes, mode 0600) both ends must hold: "
                        "the server admits only peers that prove they know it")
    p.add_argument("--admission-rate", type=positive(float), default=100.0, metavar="N",
                   help="server: admit at most N new peers per second (default 100)")
    p.add_argument("--tun-address", metavar="CIDR",
                   help="give the tun this IPv4 address/prefix at start (removed on exit)")
    p.add_argument("--route", action="append", default=[], metavar="CIDR",
                   help="route this prefix into the tun (repeatable; removed on exit)")
    p.add_argument("--keepalive", type=positive(float), metavar="SECONDS",
                   help="client: send an empty datagram to each server this often, to keep "
                        "NAT mappings and the server's entry alive while TCP is idle")
    p.add_argument("--no-clamp-mss", action="store_true",
                   help="do not lower the MSS option of SYNs to fit the tun MTU")
    p.add_argument("--no-offload", action="store_true",
                   help="use the simple one-packet-per-system-call path")
    p.add_argument("--no-status", action="store_true",
                   help="do not serve live status (udp-encap-tun status) on the abstract "
                        "unix socket @udp-encap-tun/TUN")
    p.add_argument("--status-public", action="store_true",
                   help="let every local user in the network namespace read the live status "
                        "(default: only root and the tunnel's own user)")
    p.epilog = ("Live status of a running tunnel (in its network namespace): "
                "udp-encap-tun status --interface TUN [--json | --prometheus]")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="default info")
    return p


class JournalFormatter(logging.Formatter):
    """For stderr connected to journald: a syslog priority prefix (<N>) instead of a
    timestamp, which the journal adds itself."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        return f"<{self.PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler])
    for noisy in ("pyroute2", "asyncio"):  # their debug output is every netlink message
        logging.getLogger(noisy).setLevel(max(logging.INFO, logging.root.level))


def run(args) -> None:
    from .auth import Keys, load_psk
    from .conn import open_udp, probe_udp_offload
    from .core import Router
    from .device import OffloadTunnel, Tunnel
    from .keepalive import Keepalive
    from .notify import Notify
    from .status import StatusServer
    from .store import AddressPool
    from .tun import Tun, link_mtu

    if args.endpoint_port is None:
        if args.keepalive:
            raise OperatorError("--keepalive is for client mode (with --endpoint-port)")
        if args.address_pool:
            AddressPool(args.address_pool)  # validate before touching anything
    keys = Keys(load_psk(args.psk_file)) if args.psk_file else None
    mtu = args.mtu or link_mtu(args.bind_to_interface) - LINK_OVERHEAD
    sock = open_udp(args.listen_port, args.bind_to_interface, args.listen_address)
    tun = None
    try:
        offload = not args.no_offload
        tun = Tun(args.interface, vnet_hdr=offload)
        if offload and not tun.enable_offload():
            tun.close()
            tun, offload = None, False
            tun = Tun(args.interface)
        tun.configure(mtu)
        if args.tun_address:
            tun.add_address(args.tun_address)
        for cidr in args.route:
            tun.add_route(cidr)
        address_key = args.address_key.encode() or (keys.address if keys else b"")
        router = Router(args.endpoint_port, args.address_pool, args.peer_timeout,
                        args.max_peers, address_key, mss=None if args.no_clamp_mss else mtu - 40,
                        keys=keys, admission_rate=args.admission_rate)
        tun.refresh_address()
        router.set_tun_address(tun.address, tun.network)  # validates a derived pool
        services = [Keepalive(args.keepalive)] if args.keepalive else []
        if not args.no_status:
            services.append(StatusServer(public=args.status_public, extra={"mtu": mtu}))
        notify = Notify.from_environ()  # None unless $NOTIFY_SOCKET is set
        if notify is not None:
            services.append(notify)
        if offload:
            gso, gro = probe_udp_offload(sock)
            tunnel = OffloadTunnel(router, tun, sock, gso, gro, services=services)
        else:
            tunnel = Tunnel(router, tun, sock, services=services)
        log.info("data path: %s", tunnel.data_path)
        tunnel.run()
        tunnel.log_counters()
    finally:
        if tun is not None:
            tun.close()
        sock.close()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:  # a query of a running tunnel: none of the daemon's options
        from .status import main as status_main
        return status_main(argv[1:])
    args = build_parser().parse_args(argv)
    setup_logging(args.log_level)
    try:
        run(args)
    except (OperatorError, PoolError) as exc:
        sys.stderr.write(f"{PROG}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
