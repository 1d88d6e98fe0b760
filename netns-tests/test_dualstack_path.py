"""IPv6 through the data path (#13): the inner family follows the datagram's."""

from __future__ import annotations

import ipaddress
import time

from uetlab import Lab

MB = 1 << 20
PORT = 5000


class Link6:
    """Client C and server S on an IPv6-only veth (no IPv4 address anywhere):

        C: vc fd00:a::1/64, tun fd00:c::2/128, route fd00:a::2/128 dev tun
        S: vs fd00:a::2/64, tun fd00:b::1/64 (pool: the rest of fd00:b::/64)
    """

    CLIENT_IP, SERVER_IP = "fd00:a::1", "fd00:a::2"
    CLIENT_TUN, SERVER_TUN = "fd00:c::2/128", "fd00:b::1/64"

    def __init__(self, lab: Lab):
        self.lab = lab
        self.c, self.s = lab.netns("c"), lab.netns("s")
        for ns in (self.c, self.s):  # addresses usable at once (no duplicate detection)
            ns.sysctl("net.ipv6.conf.default.accept_dad", 0)
        self.vc, self.vs = lab.ifname("vc"), lab.ifname("vs")
        self.ctun, self.stun = lab.ifname("tc"), lab.ifname("ts")
        lab.veth(self.c, self.vc, f"{self.CLIENT_IP}/64", self.s, self.vs, f"{self.SERVER_IP}/64")

    def start(self):
        server = self.lab.tool(self.s, "--interface", self.stun, "--listen-port", PORT,
                               "--bind-to-interface", self.vs, "--tun-address", self.SERVER_TUN)
        client = self.lab.tool(self.c, "--interface", self.ctun, "--listen-port", PORT,
                               "--bind-to-interface", self.vc, "--endpoint-port", PORT,
                               "--tun-address", self.CLIENT_TUN)
        self.c.add_route(f"{self.SERVER_IP}/128", dev=self.ctun)
        return server, client


def test_ipv6_only_link_carries_tcp_byte_exact_both_ways(lab: Lab):
    """No IPv4 at all: IPv6 TCP in IPv6 datagrams, 8 MB each way byte-exact;
    the server gives the client an address of its tun's IPv6 subnet."""
    link = Link6(lab)
    server, client = link.start()
    for tool in (server, client):
        assert "tun" in tool.log() and "IPv6 address: fd00:" in tool.log(), tool.log()
    up = lab.transfer(link.s, link.c, Link6.SERVER_IP, 7001, "upload", 8 * MB, timeout=150)
    down = lab.transfer(link.s, link.c, Link6.SERVER_IP, 7002, "download", 8 * MB, timeout=150)
    generated = up["server_saw"]
    assert down["server_saw"] == generated
    assert ipaddress.IPv6Address(generated) in ipaddress.IPv6Network("fd00:b::/64")
    assert generated != "fd00:b::1"
    assert up["client_saw"] == down["client_saw"] == Link6.SERVER_IP
    assert f"new peer {Link6.CLIENT_IP}:{PORT} -> {generated}" in server.log()
    c, s = client.stop(), server.stop()
    for counters in (c, s):
        assert counters.get("internal_error", 0) == 0, counters
        assert not [k for k in counters if k.startswith(("tx_drop_", "rx_drop_"))
                    and k != "tx_drop_send_buffer_full"], counters
    assert c["tx_bytes"] >= 8 * MB and s["rx_bytes"] >= 8 * MB, (c, s)
    assert s["tx_bytes"] >= 8 * MB and c["rx_bytes"] >= 8 * MB, (c, s)
    if lab.datapath == "offload":  # TSO6 super-packets cut, IPv6 GRO runs coalesced
        assert "data path: offload" in client.log()


def test_idle_tun_with_an_ipv6_address_reads_no_kernel_chatter(lab: Lab):
    """IPv6 stays on on a created tun (an address can be added any time), but
    no router solicitation, DAD or MLD packet is read from it and dropped."""
    link = Link6(lab)
    server, _client = link.start()
    ipv6_off = link.s.run("sysctl", "-n", f"net.ipv6.conf.{link.stun}.disable_ipv6").stdout
    assert ipv6_off.strip() == "0"
    link.s.add_address(link.stun, "fd00:d::1/64")  # one more, after start
    time.sleep(3)  # idle: what the kernel sends on its own would be read meanwhile
    counters = server.stop()
    assert not [k for k in counters if k.startswith("tx_drop_")], counters
