"""IPv6 through the data path (#13): the inner family follows the datagram's."""

from __future__ import annotations

import ipaddress
import time

from uetlab import Pair6

MB = 1 << 20


def test_ipv6_only_link_carries_tcp_byte_exact_both_ways(tunnel6: Pair6):
    """No IPv4 at all: IPv6 TCP in IPv6 datagrams, 8 MB each way byte-exact;
    the server gives the client an address of its tun's IPv6 subnet."""
    server, client = tunnel6.server, tunnel6.client
    assert server is not None and client is not None
    up = tunnel6.transfer(7001, "upload", 8 * MB, timeout=150)
    down = tunnel6.transfer(7002, "download", 8 * MB, timeout=150)
    generated = up["server_saw"]
    assert down["server_saw"] == generated
    assert ipaddress.IPv6Address(generated) in ipaddress.IPv6Network(Pair6.POOL)
    assert generated != Pair6.SERVER_TUN_IP
    assert up["client_saw"] == down["client_saw"] == Pair6.SERVER_IP
    assert f"new peer {Pair6.CLIENT_IP}:{Pair6.PORT} -> {generated}" in server.log()
    c, s = client.stop(), server.stop()
    for counters in (c, s):
        assert counters.get("internal_error", 0) == 0, counters
        assert not [k for k in counters if k.startswith(("tx_drop_", "rx_drop_"))
                    and k != "tx_drop_send_buffer_full"], counters
    assert c["tx_bytes"] >= 8 * MB and s["rx_bytes"] >= 8 * MB, (c, s)
    assert s["tx_bytes"] >= 8 * MB and c["rx_bytes"] >= 8 * MB, (c, s)


def test_idle_tun_with_ipv6_addresses_reads_no_kernel_chatter(pair6: Pair6):
    """IPv6 stays on on a created tun (given an IPv6 --tun-address, and another
    address later), but no router solicitation, DAD or MLD packet is read from
    it and dropped."""
    lab = pair6.lab
    server = lab.tool(pair6.s, "--interface", pair6.stun, "--listen-port", Pair6.PORT,
                      "--bind-to-interface", pair6.vs, "--tun-address", "fd00:9::1/64")
    assert "IPv6 address: fd00:9::1/64" in server.log(), server.log()
    ipv6_off = pair6.s.run("sysctl", "-n", f"net.ipv6.conf.{pair6.stun}.disable_ipv6").stdout
    assert ipv6_off.strip() == "0"
    pair6.s.add_address(pair6.stun, "fd00:d::1/64")  # one more, after start
    time.sleep(3)  # idle: what the kernel sends on its own would be read meanwhile
    counters = server.stop()
    assert not [k for k in counters if k.startswith("tx_drop_")], counters
