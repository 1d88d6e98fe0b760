"""Command line, config file and environment; start-up and shutdown."""

from __future__ import annotations

import argparse
import difflib
import io
import ipaddress
import logging
import os
import signal
import sys
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import IO, TYPE_CHECKING, Any, Final

import configargparse

from . import __version__
from .errors import (
    LinkFault,
    OneLineErrors,
    OperatorError,
    interface_name_problem,
    positive,
    report,
)
from .faults import LINK_OVERHEAD, MAX_MTU, MIN_MTU, TIU_OVERHEAD, tun_mtu_for
from .store import PoolError

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger("udp_encap_tun")

PROG: Final = "udp-encap-tun"
ENV_PREFIX: Final = "UDP_ENCAP_TUN_"

# Options that mean something in one mode only, by their dest: given (on the command
# line, in the environment or in the config file) in the other mode, they are refused.
MODE_OPTIONS: Final = {
    "server": ("address_pool", "address_key", "peer_timeout", "max_peers", "admission_rate"),
    "client": ("keepalive",),
}


def version() -> str:
    try:
        from importlib.metadata import version as installed
        return installed("udp-encap-tun")
    except Exception:  # run from a source tree that is not installed
        return __version__


class ConfigFile(configargparse.DefaultConfigFileParser):
    """The config file syntax of configargparse's default parser, line by line, so that
    a mistake names the file and line: a key that is no option (``listen_port``,
    ``peer-timout``), a line that is no setting, bytes that are not UTF-8."""

    def __init__(self) -> None:
        super().__init__()
        self.known: set[str] = set()  # filled in by build_parser

    @staticmethod
    def open(path: str) -> IO[bytes]:
        return open(path, "rb")

    def parse(self, stream: Iterable[bytes | str]) -> OrderedDict[str, configargparse.ConfigValue]:
        name = getattr(stream, "name", "config file")
        items: OrderedDict[str, configargparse.ConfigValue] = OrderedDict()
        for number, raw in enumerate(stream, 1):
            where = f"{name} line {number}"
            try:
                line = raw.decode("utf-8") if isinstance(raw, bytes) else raw
            except UnicodeDecodeError:
                raise configargparse.ConfigFileParserException(
                    f"{where}: not UTF-8 text") from None
            try:
                parsed = super().parse(io.StringIO(line))
            except configargparse.ConfigFileParserException:
                raise configargparse.ConfigFileParserException(
                    f"{where}: not a setting (key = value): {line.strip()!r}") from None
            for key, value in parsed.items():
                if key not in self.known:
                    raise configargparse.ConfigFileParserException(
                        f"{where}: unknown option {key!r}{self._hint(key)}")
                items[key] = value
        return items

    def _hint(self, key: str) -> str:
        names = sorted(k for k in self.known if not k.startswith("-"))
        guess = key.strip("-").replace("_", "-").lower()
        if guess in names:
            return f" (did you mean {guess!r}? option names are spelled with '-')"
        close = difflib.get_close_matches(guess, names, n=1)
        return f" (did you mean {close[0]!r}?)" if close else ""


def _given(namespace: argparse.Namespace, dest: str) -> None:
    """Record *dest* in ``namespace.given``: an option given on the command line, in
    the environment or in a config file (configargparse turns the latter two into
    command-line arguments), not merely defaulted."""
    namespace.__dict__.setdefault("given", set()).add(dest)


class _Remembering(argparse.Action):
    """Mixin in front of an argparse action class (see _remembering)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        super().__call__(parser, namespace, values, option_string)
        _given(namespace, self.dest)


def _remembering(action_class: type[argparse.Action]) -> type:
    """*action_class* that also records its dest (see _given), under the same name:
    configargparse tells flags and lists from other options by their action classes."""
    return type(action_class.__name__, (_Remembering, action_class), {})


class _Parser(OneLineErrors, configargparse.ArgParser):
    def format_help(self) -> str:
        """argparse's help with the environment variable of each option, without
        configargparse's stock footer (the epilog says it in our words)."""
        for a in self._actions:
            env = getattr(a, "env_var", None)
            if env and a.help and a.help != argparse.SUPPRESS and env not in a.help:
                a.help += f" [env: {env}]"
        return argparse.ArgumentParser.format_help(self)


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise ValueError(text)
    return value


_port.__name__ = "port"


def _port_spec(text: str) -> int | str:
    """A port (int), or with --wire tcp-in-udp also ranges 'LOW-HIGH' and lists
    'A,B' (kept as text)."""
    if not any(c in str(text) for c in "-, "):
        return _port(text)
    from .tiumode import parse_port_ranges
    parse_port_ranges([text])
    return str(text)


_port_spec.__name__ = "port"


class _Ports(argparse._AppendAction):
    """--listen-port / --endpoint-port: the value in dest (one port: the default
    wire format), every value given in dest_all (tcp-in-udp: repeatable, ranges)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        setattr(namespace, self.dest + "_all", [*(getattr(namespace, self.dest + "_all", None)
                                                  or []), values])
        setattr(namespace, self.dest, values)
        _given(namespace, self.dest)


# what the TCP-in-UDP format has no room for, refused with it
NOT_IN_TIU: Final = {
    "psk_file": "the format has no room for control messages",
    "keepalive": "the TCP flows keep their NAT mappings themselves",
    "address_pool": "no generated addresses: TCP sees the real ones",
    "address_key": "no generated addresses: TCP sees the real ones",
    "no_clamp_mss": "a datagram is exactly as long as its segment: nothing is clamped",
}


def _listen_address(text: str) -> str:
    """--listen-address: one address of either family ('::' all of both, '0.0.0.0' all
    of IPv4's), normalized."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--listen-address {text!r} is not an IPv4 or IPv6 address") from None


def _tun_address(text: str) -> str:
    """--tun-address: an address with its prefix length (either family; without one,
    a host prefix), normalized ('fd00:9::2/64')."""
    try:
        iface = ipaddress.ip_interface(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--tun-address {text!r} is not an IPv4 or IPv6 address/prefix") from None
    if iface.ip.is_multicast or iface.ip.is_unspecified:
        raise argparse.ArgumentTypeError(
            f"--tun-address {text!r}: a multicast or unspecified address cannot be the tun's")
    if iface.version == 6 and iface.ip.is_link_local:
        raise argparse.ArgumentTypeError(
            f"--tun-address {text!r}: the tunnel uses the tun's global IPv6 address, "
            "not a link-local one")
    return str(iface)


def _prefix(option: str) -> Callable[[str], str]:
    """--route, --address-pool: a prefix of either family, normalized; host bits set
    are refused for routes (the kernel would refuse them too) and allowed for pools
    (the tun's own address/prefix names its subnet)."""
    def parse(text: str) -> str:
        try:
            return str(ipaddress.ip_network(text, strict=option == "--route"))
        except ValueError as exc:
            raise argparse.ArgumentTypeError(
                f"{option} {text!r} is not an IPv4 or IPv6 prefix: {exc}") from None
    return parse


def _family(text: str) -> int:
    """4 or 6: the family of an address, interface or prefix text."""
    return 6 if ":" in text else 4


def _one_per_family(parser: argparse.ArgumentParser, option: str, values: list[str]
                    ) -> tuple[str | None, str | None]:
    """(the IPv4 value, the IPv6 value) of a repeatable option that takes at most one
    of each family; two of one family is an operator mistake."""
    by_family: dict[int, str] = {}
    for value in values:
        family = _family(value)
        if family in by_family and by_family[family] != value:
            parser.error(f"{option} given two IPv{family} values ({by_family[family]}, "
                         f"{value}): at most one IPv4 and one IPv6")
        by_family[family] = value
    return by_family.get(4), by_family.get(6)


def _mtu(text: str) -> int:
    value = int(text)
    if not MIN_MTU <= value <= MAX_MTU:
        raise argparse.ArgumentTypeError(
            f"{value} is out of range: {MIN_MTU} (IPv4's minimum) to {MAX_MTU} (a tun packet "
            f"travels in a datagram {LINK_OVERHEAD} bytes larger, at most 65535)")
    return value


_mtu.__name__ = "MTU"


def _interface(text: str) -> str:
    problem = interface_name_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"interface name {text!r} {problem}")
    return text


USAGE: Final = """%(prog)s --interface TUN --listen-port PORT --bind-to-interface DEV [options]
       %(prog)s status [--interface TUN | --config FILE] [--json | --prometheus]"""

EPILOG: Final = (
    "Every option can also be set in the --config file (one \"option = value\" per line, "
    "the option's name without --; flags take \"true\") or in the environment (the "
    "[env: ...] name). The command line beats the environment, which beats the config file.")


def build_parser() -> configargparse.ArgParser:
    config_file = ConfigFile()
    p = _Parser(
        prog=PROG,
        usage=USAGE,
        description="Carry TCP inside UDP through a tun device. With --endpoint-port it is a "
                    "client, without it a server that gives each peer a generated address.",
        epilog=EPILOG,
        auto_env_var_prefix=ENV_PREFIX,
        args_for_setting_config_path=["--config"],
        config_arg_help_message="config file (key = value lines, option names without --)",
        config_file_parser_class=config_file,
        config_file_open_func=ConfigFile.open,
        add_config_file_help=False,
        add_env_var_help=False,
    )
    for name in (None, "store", "store_true", "append"):
        p.register("action", name, _remembering(p._registry_get("action", name)))
    p.add_argument("--version", action="version", version=f"%(prog)s {version()}")
    p.add_argument("--interface", required=True, type=_interface, metavar="TUN",
                   help="tun device to use; created if missing (and then removed on exit)")
    p.add_argument("--listen-port", type=_port_spec, action=_Ports, metavar="PORT",
                   help="local UDP port; all datagrams leave from it (required; tcp-in-udp: the "
                        "server's tunnelled TCP ports, repeatable, ranges LOW-HIGH allowed; "
                        "a client has none)")
    p.add_argument("--bind-to-interface", required=True, type=_interface, metavar="DEV",
                   help="network interface the UDP socket is bound to (SO_BINDTODEVICE)")
    p.add_argument("--listen-address", type=_listen_address, metavar="ADDR",
                   help="local address of the UDP socket, IPv4 or IPv6 (default: any address "
                        "of both families; '::' the same, '0.0.0.0' any IPv4 only); set it on "
                        "a server with several addresses so replies leave from the one peers use")
    p.add_argument("--endpoint-port", type=_port_spec, action=_Ports, metavar="PORT",
                   help="client mode: send to each packet's destination at this UDP port "
                        "(tcp-in-udp: the tunnelled TCP ports, repeatable, ranges allowed)")
    p.add_argument("--wire", choices=["udp-encap-tun", "tcp-in-udp"], default="udp-encap-tun",
                   help="wire format: udp-encap-tun (default: the C original's, generated "
                        "addresses) or tcp-in-udp (draft-cheshire-tcp-over-udp, interoperable "
                        "with the eBPF tcp-in-udp: no overhead, real addresses)")
    p.add_argument("--mtu", type=_mtu, metavar="BYTES",
                   help=f"tun MTU, {MIN_MTU} to {MAX_MTU} (default: MTU of --bind-to-interface "
                        "minus 8, following it when it changes; an explicit MTU is lowered "
                        "when the link shrinks below it)")
    p.add_argument("--address-pool", action="append", default=[], type=_prefix("--address-pool"),
                   metavar="CIDR",
                   help="server: generated peer addresses, an IPv4 or IPv6 prefix (repeatable: "
                        "one of each family; default: the subnet of the tun's address of the "
                        "family, minus its network, broadcast and the tun's own address)")
    p.add_argument("--address-key", default="", metavar="TEXT",
                   help="server: secret that keys the peer-to-address hash (keep it stable so "
                        "peers keep their address across restarts; default: derived from "
                        "--psk-file, else a fixed key)")
    p.add_argument("--peer-timeout", type=positive(float), default=300.0, metavar="SECONDS",
                   help="server: forget a peer this long after it was last heard from "
                        "(default 300)")
    p.add_argument("--max-peers", type=positive(int), default=65536, metavar="N",
                   help="server: at most this many peers at once (default 65536)")
    p.add_argument("--psk-file", metavar="PATH",
                   help="pre-shared key (at least 16 bytes, mode 0600) both ends must hold: "
                        "the server admits only peers that prove they know it")
    p.add_argument("--admission-rate", type=positive(float), default=100.0, metavar="N",
                   help="server: admit at most N new peers per second (default 100)")
    p.add_argument("--tun-address", action="append", default=[], type=_tun_address,
                   metavar="CIDR",
                   help="give the tun this address/prefix at start (removed on exit); "
                        "repeatable: one IPv4 and one IPv6")
    p.add_argument("--route", action="append", default=[], type=_prefix("--route"),
                   metavar="CIDR",
                   help="route this prefix, IPv4 or IPv6, into the tun (repeatable; removed "
                        "on exit)")
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
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"], help="default info")
    config_file.known = {key for a in p._actions
                         if a.dest not in ("help", "version")
                         and not getattr(a, "is_config_file_arg", False)  # configargparse's
                         for key in p.get_possible_config_keys(a)}
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The options, checked: one that belongs to the other mode is refused."""
    parser = build_parser()
    args = parser.parse_args(argv)
    given = vars(args).pop("given", set())
    args.tun_address4, args.tun_address6 = _one_per_family(parser, "--tun-address",
                                                           args.tun_address)
    args.address_pool4, args.address_pool6 = _one_per_family(parser, "--address-pool",
                                                             args.address_pool)
    if args.wire == "tcp-in-udp":
        for option, values in (("--tun-address", args.tun_address), ("--route", args.route),
                               ("--listen-address", [args.listen_address or ""])):
            for value in values:
                if _family(value) == 6:
                    parser.error(f"{option} {value}: --wire tcp-in-udp is IPv4 only")
        for dest, why in NOT_IN_TIU.items():
            if dest in given:
                parser.error(f"--{dest.replace('_', '-')} does not exist in --wire tcp-in-udp: "
                             f"{why}")
        for option, values in (("--tun-address", args.tun_address), ("--route", args.route),
                               ("--listen-address", [args.listen_address or ""])):
            for value in values:
                if ":" in value:
                    parser.error(f"{option} {value}: --wire tcp-in-udp carries IPv4 only")
        return args  # both roles use --peer-timeout, --max-peers, --admission-rate (flows)
    if args.listen_port is None:
        parser.error("the following arguments are required: --listen-port")
    for dest in ("listen_port", "endpoint_port"):
        values = getattr(args, dest + "_all", None) or []
        if len(values) > 1 or any(isinstance(v, str) for v in values):
            parser.error(f"--{dest.replace('_', '-')}: one port in the default wire format "
                         "(repeats and ranges are for --wire tcp-in-udp)")
    mode = "client" if args.endpoint_port is not None else "server"
    other = "server" if mode == "client" else "client"
    for dest in MODE_OPTIONS[other]:
        if dest in given:
            option = "--" + dest.replace("_", "-")
            why = "--endpoint-port is set" if mode == "client" else "no --endpoint-port"
            parser.error(f"{option} is a {other} option; this is a {mode} ({why})")
    return args


def tun_mtu(args: argparse.Namespace, link: int) -> int:
    """The tun MTU: --mtu, else what fits the link (its MTU minus what the wire adds
    to a segment: 8 on the default wire, 0 with --wire tcp-in-udp); warns if --mtu
    does not fit it."""
    tiu = args.wire == "tcp-in-udp"
    overhead = TIU_OVERHEAD if tiu else LINK_OVERHEAD
    fits = link - overhead
    if args.mtu is None:
        if fits < MIN_MTU:
            raise OperatorError(f"{args.bind_to_interface} has MTU {link}: too small to carry "
                                f"a tun of MTU {MIN_MTU} ({overhead} bytes more)")
        return tun_mtu_for(link, overhead=overhead)
    if args.mtu > fits:
        log.warning("--mtu %d is more than %s's MTU %d minus %d: larger TCP packets are cut "
                    "into segments that fit (counted tx_resegmented)%s", args.mtu,
                    args.bind_to_interface, link, overhead,
                    "" if tiu else "; the MSS clamp follows --mtu")
    explicit: int = args.mtu
    return explicit


class JournalFormatter(logging.Formatter):
    """For stderr connected to journald: a syslog priority prefix (<N>) instead of a
    timestamp, which the journal adds itself."""

    PRIORITY: Final = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
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


def run(args: argparse.Namespace) -> None:
    from .auth import Keys, load_psk
    from .conn import enable_icmp_errors, open_udp, probe_udp_offload
    from .core import Router
    from .faults import Links
    from .loop import default_wire
    from .store import AddressPool
    from .tun import link_info, open_tun

    # SIGUSR1/SIGHUP ask for the counters: while the loop runs it logs them, before
    # and after it (start-up, shutdown) they must not kill the process
    for signum in (signal.SIGUSR1, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    if args.wire == "tcp-in-udp":
        from . import tiudev
        bind_index, link = link_info(args.bind_to_interface)
        return tiudev.run(args, tun_mtu(args, link), lambda mtu: _services(args), bind_index, link)
    if args.endpoint_port is None:
        for pool, ipv6 in ((args.address_pool4, False), (args.address_pool6, True)):
            if pool:
                AddressPool(pool, ipv6=ipv6)  # validate before touching anything
    keys = Keys(load_psk(args.psk_file)) if args.psk_file else None
    bind_index, bind_mtu = link_info(args.bind_to_interface)
    mtu = tun_mtu(args, bind_mtu)
    # default (None) and '::': one socket for both families
    sock = open_udp(args.listen_port, args.bind_to_interface,
                    None if args.listen_address in (None, "::") else args.listen_address)
    tun = None
    try:
        if args.endpoint_port is not None:
            enable_icmp_errors(sock)  # "port unreachable" from a server names it
        tun, offload = open_tun(args.interface, mtu,
                                [a for a in (args.tun_address4, args.tun_address6) if a],
                                not args.no_offload)
        for cidr in args.route:
            tun.add_route(cidr)
        address_key = args.address_key.encode() or (keys.address if keys else b"")
        router = Router(args.endpoint_port, args.address_pool4, args.peer_timeout,
                        args.max_peers, address_key, mss=None if args.no_clamp_mss else mtu - 40,
                        keys=keys, admission_rate=args.admission_rate,
                        keepalive=args.keepalive or None, pool6_cidr=args.address_pool6)
        tun.refresh_address()
        # both validate a pool derived from the tun's address
        router.set_tun_address(tun.address, tun.network)
        router.set_tun_address6(tun.address6, tun.network6)
        links = Links(tun.index, mtu, args.bind_to_interface, bind_index, bind_mtu,
                      explicit_mtu=args.mtu, clamp=not args.no_clamp_mss)
        gso, gro = probe_udp_offload(sock) if offload else (False, False)
        tunnel = default_wire(router, tun, sock, offload, gso, gro, services=_services(args),
                              links=links)
        log.info("data path: %s", tunnel.data_path)
        try:
            tunnel.run()
        finally:
            tunnel.log_counters()
    finally:
        if tun is not None:
            tun.close()
        sock.close()


def _services(args: argparse.Namespace) -> list[Service]:
    """Status and service-manager notification, for both wire formats."""
    from .notify import Notify
    from .status import StatusServer

    services: list[Service] = []
    if not args.no_status:
        services.append(StatusServer(public=args.status_public))
    notify = Notify.from_environ()  # None unless $NOTIFY_SOCKET is set
    if notify is not None:
        services.append(notify)
    return services


def main(argv: Iterable[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["status"]:  # a query of a running tunnel: none of the daemon's options
        from .status import main as status_main
        return status_main(argv[1:])
    args = parse_args(argv)
    setup_logging(args.log_level)
    try:
        run(args)
    except (OperatorError, PoolError) as exc:
        report(PROG, str(exc))
        return 2
    except LinkFault as exc:
        report(PROG, str(exc))
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
