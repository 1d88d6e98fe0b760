"""The TCP-in-UDP mode (--wire tcp-in-udp) follows its links like the default
mode: the bound veth deleted and re-created with the same name (every socket of
the mode bound again, a connection that was open keeps working), the veth's
MTU lowered mid-run (the tun follows it, with no overhead and no MSS clamp)."""

from __future__ import annotations

import os
import socket
import threading

from ops_tools import link_info, wait_counter
from test_links import delete_link, set_mtu, status, wait_bind_missing
from test_tiu import CLIENT_IP, SERVER_IP, TiuPair, assert_clean, tiu  # noqa: F401 (fixture)
from uetlab import counter_delta, wait_for

MB = 1 << 20


def exchange(a: socket.socket, b: socket.socket, size: int) -> None:
    """*size* random bytes from a to b and other ones from b to a, at once;
    both arrive byte-exact."""
    out = {a: os.urandom(size), b: os.urandom(size)}
    got = {a: bytearray(), b: bytearray()}

    def pump(src, dst):
        src.sendall(out[src])
        while len(got[dst]) < size:
            chunk = dst.recv(1 << 16)
            assert chunk, "connection closed"
            got[dst] += chunk

    threads = [threading.Thread(target=pump, args=pair) for pair in ((a, b), (b, a))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "exchange did not finish"
    assert bytes(got[b]) == out[a] and bytes(got[a]) == out[b]


def connected(tiu: TiuPair, port: int):  # noqa: F811 (the fixture's name)
    """A TCP connection from C to S through the tunnel: (client end, server end)."""
    listener = tiu.s.socket(type=socket.SOCK_STREAM)
    listener.bind((SERVER_IP, port))
    listener.listen(1)
    client = tiu.c.socket(type=socket.SOCK_STREAM)
    client.settimeout(60)
    client.connect((SERVER_IP, port))
    listener.settimeout(20)
    server, _ = listener.accept()
    listener.close()
    server.settimeout(60)
    return client, server


def test_bound_interface_deleted_and_recreated(tiu: TiuPair):  # noqa: F811 (fixture)
    """The veth both ends are bound to is deleted: status says MISSING (the
    TCP addresses went with it, so the kernel's TCP holds its data; the tunnel's
    drops while missing are unit-tested).  Re-created with the
    same names and addresses: every socket of the mode is bound again (the
    server's listen sockets, the client's flow socket of an open connection),
    which then carries data both ways, and new transfers are byte-exact."""
    client_end, server_end = connected(tiu, 7005)
    exchange(client_end, server_end, 256 << 10)
    before = tiu.client.counters()
    delete_link(tiu.c, tiu.vc)  # takes its peer in S with it
    wait_bind_missing(tiu)
    # the address went with the link: TCP holds this until it is back
    client_end.send(b"x" * 1000)

    tiu.lab.veth(tiu.c, tiu.vc, f"{CLIENT_IP}/24", tiu.s, tiu.vs, f"{SERVER_IP}/24")
    for tool, vif in ((tiu.client, tiu.vc), (tiu.server, tiu.vs)):
        wait_for(lambda vif=vif, tool=tool: f"bound interface {vif} is back" in tool.log(), 20,
                 what=f"{tool!r} to bind to {vif} again")
    for ns, tun in ((tiu.c, tiu.ctun), (tiu.s, tiu.stun)):
        assert status(ns, tun)["bind_interface_present"] is True
    assert server_end.recv(1000, socket.MSG_WAITALL) == b"x" * 1000  # retransmitted
    exchange(client_end, server_end, MB)
    client_end.close()
    server_end.close()
    tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7002, "upload", 2 * MB, timeout=150)
    tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7003, "download", 2 * MB, timeout=150)
    client, server = tiu.client.stop(), tiu.server.stop()
    # the client's TCP sends as soon as its address is back, which the harness adds before
    # it sets the veth up: a retransmission may meet ENETUNREACH then (tx_drop_send_error)
    assert counter_delta(client, before, "tx_drop_send_error") <= 3, client
    assert_clean(server)
    assert client.get("internal_error", 0) == 0, client
    assert tiu.client.proc.returncode == 0  # the address came back the same: no exit


def test_link_mtu_lowered_mid_run(tiu: TiuPair):  # noqa: F811 (fixture)
    """The veth's MTU lowered from 1500 to 1400 at both ends during a download:
    the tuns follow with no overhead (1400) and no MSS clamp; the running
    transfer and new ones each way arrive byte-exact, segments cut to fit."""
    assert link_info(tiu.c, tiu.ctun)["mtu"] == 1500
    running = tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7001, "download", 24 * MB,
                               timeout=150, wait=False)
    wait_counter(tiu.client, "rx_bytes", 2 * MB)
    for ns, vif in ((tiu.c, tiu.vc), (tiu.s, tiu.vs)):
        set_mtu(ns, vif, 1400)
    for ns, tun in ((tiu.c, tiu.ctun), (tiu.s, tiu.stun)):
        wait_for(lambda ns=ns, tun=tun: link_info(ns, tun)["mtu"] == 1400, 20,
                 what=f"{tun} MTU 1400")
        doc = status(ns, tun)
        assert (doc["mtu"], doc["mss_clamp"], doc["link_mtu"]) == (1400, None, 1400), doc
    running.wait()
    tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7002, "upload", 8 * MB, timeout=150)
    tiu.lab.transfer(tiu.s, tiu.c, SERVER_IP, 7003, "download", 8 * MB, timeout=150)
    for tool in (tiu.client, tiu.server):
        assert "MTU 1400: tun" in tool.log(), tool.log()
        final = tool.stop()
        assert_clean(final)
        assert final.get("tx_drop_message_too_long", 0) == 0, final
