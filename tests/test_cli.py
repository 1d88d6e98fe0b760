"""The command line as operators meet it: every mistake one line and exit 2,
found before anything is touched (no root needed: these fail before the network)."""

import logging
import os

import pytest

from udp_encap_tun import __version__, cli
from udp_encap_tun.errors import one_line
from udp_encap_tun.tun import quiet_pyroute2

BASE = ["--interface", "t0", "--listen-port", "5000", "--bind-to-interface", "eth0"]
CLIENT = BASE + ["--endpoint-port", "5000"]


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith(cli.ENV_PREFIX):
            monkeypatch.delenv(name)


def refused(capsys, argv) -> str:
    """Parsing *argv* fails as operator mistakes must: exit 2, one stderr line."""
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("udp-encap-tun: error: "), lines[0]
    return lines[0]


@pytest.mark.parametrize("value", ["70000", "65528", "67", "10", "0", "-1", "99999999999"])
def test_mtu_out_of_range_is_a_parse_error(capsys, value):
    """Refused before pyroute2 is asked (which printed (22, 'Invalid argument') or its
    own 40-line traceback for a value it cannot encode)."""
    line = refused(capsys, BASE + ["--mtu", value])
    assert value in line and "--mtu" in line


@pytest.mark.parametrize("value", [cli.MIN_MTU, 1400, cli.MAX_MTU])
def test_mtu_in_range(value):
    assert cli.parse_args(BASE + ["--mtu", str(value)]).mtu == value


def test_mtu_that_does_not_fit_the_link_warns(caplog):
    args = cli.parse_args(BASE + ["--mtu", "9000"])
    with caplog.at_level(logging.WARNING, logger="udp_encap_tun"):
        assert cli.tun_mtu(args, 1500) == 9000
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "9000" in record.getMessage() and "1500" in record.getMessage()
    assert "\n" not in record.getMessage()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="udp_encap_tun"):
        assert cli.tun_mtu(cli.parse_args(BASE + ["--mtu", "1492"]), 1500) == 1492
    assert caplog.records == []


def test_default_mtu_follows_the_link():
    args = cli.parse_args(BASE)
    assert cli.tun_mtu(args, 1500) == 1492
    assert cli.tun_mtu(args, 65536) == cli.MAX_MTU  # loopback: capped at what IPv4 carries
    with pytest.raises(cli.OperatorError, match="too small"):
        cli.tun_mtu(args, 70)


def test_tcp_in_udp_mtu_that_does_not_fit_the_link_warns(caplog):
    """--wire tcp-in-udp adds nothing to a segment: the limit is the link's MTU
    itself, and the same start-up warning names it (without the MSS clamp,
    which that mode does not have)."""
    tiu = ["--wire", "tcp-in-udp"] + BASE
    with caplog.at_level(logging.WARNING, logger="udp_encap_tun"):
        assert cli.tun_mtu(cli.parse_args(tiu + ["--mtu", "1501"]), 1500) == 1501
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "1501" in record.getMessage() and "1500" in record.getMessage()
    assert "clamp" not in record.getMessage() and "\n" not in record.getMessage()

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="udp_encap_tun"):
        assert cli.tun_mtu(cli.parse_args(tiu + ["--mtu", "1500"]), 1500) == 1500
    assert caplog.records == []


def test_tcp_in_udp_default_mtu_is_the_link_mtu():
    args = cli.parse_args(["--wire", "tcp-in-udp"] + BASE)
    assert cli.tun_mtu(args, 1500) == 1500
    assert cli.tun_mtu(args, 65536) == 65535


@pytest.mark.parametrize("name", ["tun%d", "a/b", "a:b", "a b", "", "x" * 16, "..", "t\n0"])
def test_bad_interface_name(capsys, name):
    line = refused(capsys, ["--interface", name] + BASE[2:])
    assert "--interface" in line


def test_newline_in_an_environment_value_stays_one_line(capsys, monkeypatch):
    monkeypatch.setenv("UDP_ENCAP_TUN_BIND_TO_INTERFACE", "eth0\nrest")
    line = refused(capsys, BASE[:4])
    assert "--bind-to-interface" in line and "eth0\\nrest" in line


def test_main_reports_a_runtime_error_as_one_line(capsys, tmp_path):
    """An OperatorError after parsing (here the key file, read first) is one line too."""
    assert cli.main(BASE + ["--psk-file", str(tmp_path)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == f"udp-encap-tun: error: key file {tmp_path}: a directory\n"


def test_one_line():
    assert one_line("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert one_line("eth0\udcff") == "eth0\\udcff"  # an undecodable byte of the environment
    assert one_line("plain text: ok") == "plain text: ok"


# --- options of the other mode -------------------------------------------------------

SERVER_ONLY = [("--address-pool", "10.9.0.0/24"), ("--address-key", "k"),
               ("--peer-timeout", "60"), ("--max-peers", "5"), ("--admission-rate", "5")]


def test_mode_table_covers_the_server_options():
    assert {o[2:].replace("-", "_") for o, _ in SERVER_ONLY} == set(cli.MODE_OPTIONS["server"])
    assert cli.MODE_OPTIONS["client"] == ("keepalive",)


@pytest.mark.parametrize("option,value", SERVER_ONLY)
@pytest.mark.parametrize("source", ["command line", "environment", "config file"])
def test_server_option_refused_in_client_mode(capsys, monkeypatch, tmp_path, option, value,
                                              source):
    argv = list(CLIENT)
    if source == "command line":
        argv += [option, value]
    elif source == "environment":
        monkeypatch.setenv(cli.ENV_PREFIX + option[2:].replace("-", "_").upper(), value)
    else:
        conf = tmp_path / "c.conf"
        conf.write_text(f"{option[2:]} = {value}\n")
        argv += ["--config", str(conf)]
    line = refused(capsys, argv)
    assert f"{option} is a server option" in line and "client" in line


def test_abbreviated_server_option_refused_in_client_mode(capsys):
    assert "--max-peers" in refused(capsys, CLIENT + ["--max-p", "5"])


@pytest.mark.parametrize("source", ["command line", "environment"])
def test_client_option_refused_in_server_mode(capsys, monkeypatch, source):
    argv = list(BASE)
    if source == "command line":
        argv += ["--keepalive", "5"]
    else:
        monkeypatch.setenv("UDP_ENCAP_TUN_KEEPALIVE", "5")
    line = refused(capsys, argv)
    assert "--keepalive is a client option" in line and "server" in line


def test_defaults_of_the_other_mode_are_not_given():
    """Only options given count: a client has the server options' defaults."""
    args = cli.parse_args(CLIENT)
    assert args.peer_timeout == 300.0 and args.endpoint_port == 5000
    assert not hasattr(args, "given")
    args = cli.parse_args(BASE + ["--max-peers", "5", "--peer-timeout", "60"])
    assert args.max_peers == 5 and args.keepalive is None


# --- config file ---------------------------------------------------------------------

def config(tmp_path, data) -> list:
    path = tmp_path / "tunnel.conf"
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return ["--config", str(path)]


def test_config_file_sets_options(tmp_path):
    args = cli.parse_args(config(tmp_path, "# comment\ninterface = t1\nlisten-port: 5001\n"
                                           "bind-to-interface eth1\nno-offload = true\n"
                                           "route = [10.0.0.0/8, 192.0.2.0/24]\n"))
    assert (args.interface, args.listen_port, args.bind_to_interface) == ("t1", 5001, "eth1")
    assert args.no_offload and args.route == ["10.0.0.0/8", "192.0.2.0/24"]


@pytest.mark.parametrize("data,needles", [
    ("interface = t0\npeer-timout = 60\n", ["line 2", "'peer-timout'", "'peer-timeout'"]),
    ("listen_port = 5000\n", ["line 1", "'listen_port'", "'listen-port'"]),
    ("interface = t0\n\n# x\nbogus = 1\n", ["line 4", "'bogus'"]),
    (b"interface = t0\nbind-to-interface = eth\xff0\n", ["line 2", "not UTF-8"]),
    ("config = other.conf\n", ["line 1", "'config'"]),
])
def test_config_file_mistakes_name_file_and_line(capsys, tmp_path, data, needles):
    argv = config(tmp_path, data)
    line = refused(capsys, argv + ["--listen-port", "5000"])
    assert argv[1] in line
    for needle in needles:
        assert needle in line


def test_config_file_that_cannot_be_opened(capsys, tmp_path):
    assert str(tmp_path) in refused(capsys, BASE + ["--config", str(tmp_path)])
    assert "nope.conf" in refused(capsys, BASE + ["--config", str(tmp_path / "nope.conf")])


# --- help and version ------------------------------------------------------------------

def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out == f"udp-encap-tun {__version__}\n"


def test_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    usage = out.split("\n\n")[0]
    assert "udp-encap-tun status" in usage
    assert "goo.gl" not in out and "Args that start with" not in out  # configargparse's footer
    assert "[env: UDP_ENCAP_TUN_MAX_PEERS]" in out


def test_quiet_pyroute2(caplog):
    """pyroute2 logs its own traceback (ERROR, from a child logger) for a request it
    cannot encode; around our calls that is silenced, and restored after."""
    child = logging.getLogger("pyroute2.netlink.core")
    with caplog.at_level(logging.DEBUG):
        with quiet_pyroute2():
            child.error("Traceback (most recent call last): ...")
        assert caplog.records == []
        child.error("after")
    assert [r.getMessage() for r in caplog.records] == ["after"]


# --- IPv6 (#13): addresses, prefixes, pools of both families ------------------------

def test_tun_address_one_of_each_family():
    args = cli.parse_args(BASE + ["--tun-address", "10.9.0.1/24",
                                  "--tun-address", "FD00:9:0::1/64"])
    assert args.tun_address == ["10.9.0.1/24", "fd00:9::1/64"]
    assert (args.tun_address4, args.tun_address6) == ("10.9.0.1/24", "fd00:9::1/64")
    args = cli.parse_args(BASE + ["--tun-address", "fd00:9::1"])  # no prefix: a host prefix
    assert (args.tun_address4, args.tun_address6) == (None, "fd00:9::1/128")
    args = cli.parse_args(BASE)
    assert args.tun_address == [] and args.tun_address4 is None and args.tun_address6 is None


@pytest.mark.parametrize("values,needles", [
    (["10.9.0.1/24", "10.9.1.1/24"], ["two IPv4", "10.9.0.1/24", "10.9.1.1/24"]),
    (["fd00::1/64", "10.9.0.1/24", "fd01::1/64"], ["two IPv6", "fd00::1/64", "fd01::1/64"]),
])
def test_two_tun_addresses_of_one_family_refused(capsys, values, needles):
    argv = list(BASE)
    for value in values:
        argv += ["--tun-address", value]
    line = refused(capsys, argv)
    assert "--tun-address" in line
    for needle in needles:
        assert needle in line


@pytest.mark.parametrize("option,value", [
    ("--tun-address", "10.9.0.1/40"), ("--tun-address", "fd00::1/129"),
    ("--tun-address", "banana"), ("--tun-address", "ff02::1/128"),
    ("--tun-address", "fe80::1/64"), ("--tun-address", "::/0"),
    ("--route", "fd00::1/64"), ("--route", "fd00::/200"), ("--route", "10.1.2.3/8"),
    ("--route", "x"), ("--address-pool", "fd00::/129"), ("--address-pool", "banana"),
    ("--listen-address", "fd00::1/64"), ("--listen-address", "10.0.0"),
])
def test_bad_ipv6_and_ipv4_values_are_one_line(capsys, option, value):
    line = refused(capsys, BASE + [option, value])
    assert option in line and value in line


def test_routes_and_pools_of_both_families():
    args = cli.parse_args(BASE + ["--route", "10.1.0.0/16", "--route", "FD00:77::/48",
                                  "--address-pool", "10.9.0.0/24",
                                  "--address-pool", "fd00:9::1/64"])
    assert args.route == ["10.1.0.0/16", "fd00:77::/48"]
    assert args.address_pool == ["10.9.0.0/24", "fd00:9::/64"]  # a pool names its subnet
    assert (args.address_pool4, args.address_pool6) == ("10.9.0.0/24", "fd00:9::/64")


def test_two_pools_of_one_family_refused(capsys):
    line = refused(capsys, BASE + ["--address-pool", "fd00:9::/64", "--address-pool",
                                   "fd00:8::/64"])
    assert "--address-pool" in line and "two IPv6" in line


def test_ipv6_pool_is_a_server_option(capsys):
    line = refused(capsys, CLIENT + ["--address-pool", "fd00:9::/64"])
    assert "--address-pool is a server option" in line


@pytest.mark.parametrize("value,expected", [
    ("::", "::"), ("0.0.0.0", "0.0.0.0"), ("2001:DB8::1", "2001:db8::1"),
    ("192.0.2.2", "192.0.2.2"),
])
def test_listen_address_of_either_family(value, expected):
    assert cli.parse_args(BASE + ["--listen-address", value]).listen_address == expected
    assert cli.parse_args(BASE).listen_address is None  # any address of both families


def test_ipv6_options_from_config_file_and_environment(tmp_path, monkeypatch):
    """The README's forms: a list in the config file, a list in the environment, and
    the command line adding to neither (it wins, as for every option)."""
    args = cli.parse_args(config(tmp_path, "interface = t1\nlisten-port = 5000\n"
                                           "bind-to-interface = eth1\n"
                                           "tun-address = [10.9.0.1/24, fd00:9::1/64]\n"
                                           "route = [fd00:77::/48]\n"
                                           "address-pool = [fd00:9::/64]\n"
                                           "listen-address = ::\n"))
    assert args.tun_address == ["10.9.0.1/24", "fd00:9::1/64"]
    assert args.route == ["fd00:77::/48"] and args.address_pool6 == "fd00:9::/64"
    assert args.listen_address == "::"

    monkeypatch.setenv("UDP_ENCAP_TUN_TUN_ADDRESS", "[10.9.0.2/32, fd00:9::2/128]")
    monkeypatch.setenv("UDP_ENCAP_TUN_LISTEN_ADDRESS", "2001:db8::1")
    args = cli.parse_args(BASE)
    assert (args.tun_address4, args.tun_address6) == ("10.9.0.2/32", "fd00:9::2/128")
    assert args.listen_address == "2001:db8::1"


def test_command_line_tun_addresses_replace_the_config_files(tmp_path):
    """As for every option, the command line wins: its --tun-address values replace
    the file's (they are not added to them, so no 'two of a family' from the mix)."""
    args = cli.parse_args(BASE + config(tmp_path, "tun-address = [10.9.0.1/24, fd00:9::1/64]\n")
                          + ["--tun-address", "fd00:8::1/64"])
    assert args.tun_address == ["fd00:8::1/64"] and args.tun_address4 is None


@pytest.mark.parametrize("option,value", [
    ("--tun-address", "fd00:9::2/128"), ("--route", "fd00:77::/48"),
    ("--listen-address", "::"), ("--listen-address", "2001:db8::1"),
])
def test_tcp_in_udp_refuses_ipv6(capsys, option, value):
    line = refused(capsys, ["--wire", "tcp-in-udp"] + BASE + [option, value])
    assert option in line and value in line and "IPv4 only" in line
    # and takes the IPv4 forms as before
    args = cli.parse_args(["--wire", "tcp-in-udp"] + BASE + [
        "--tun-address", "10.9.0.2/32", "--route", "192.0.2.0/24",
        "--listen-address", "0.0.0.0"])
    assert args.tun_address4 == "10.9.0.2/32" and args.route == ["192.0.2.0/24"]
