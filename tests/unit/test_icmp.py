"""ICMP/ICMPv6 echo with fake ping sockets (no real network): NAT of the destination, one
socket per flow, the guest's echo identifier restored on replies, --no-icmp, EACCES."""

from __future__ import annotations

import errno
import logging
import socket
from ipaddress import IPv4Address as A4
from ipaddress import IPv6Address as A6
from typing import Any

import pytest

from tests.fakes import FakeLoop
from tests.unit.test_udp import GUEST_MAC, GW4, GW6, HOST4, HOST6, OUR_MAC, FakeSocket, Harness
from vhostpasst.wire import eth, icmp, ip

scapy = pytest.importorskip("scapy.all")


def echo4(h: Harness, dst: A4, ident: int, seq: int, data: bytes = b"abc",
          type_: int = icmp.ICMP_ECHO) -> None:
    msg = icmp.build_icmp_echo(type_, ident, seq, data)
    frame = eth.build_eth(OUR_MAC, GUEST_MAC, eth.ETH_P_IP,
                          ip.build_ipv4(HOST4, dst, ip.IPPROTO_ICMP, msg, ttl=64))
    h.d.on_frames([memoryview(frame)])


def echo6(h: Harness, dst: A6, ident: int, seq: int, data: bytes = b"abc") -> None:
    msg = icmp.build_icmpv6_echo(HOST6, dst, icmp.ICMPV6_ECHO_REQUEST, ident, seq, data)
    frame = eth.build_eth(OUR_MAC, GUEST_MAC, eth.ETH_P_IPV6,
                          ip.build_ipv6(HOST6, dst, ip.IPPROTO_ICMPV6, msg))
    h.d.on_frames([memoryview(frame)])


def test_echo_to_gateway_goes_to_loopback_and_the_reply_gets_the_guests_id() -> None:
    h = Harness()
    echo4(h, GW4, 0x1234, 1)
    echo4(h, GW4, 0x1234, 2)
    [s] = FakeSocket.instances
    assert (s.family, s.proto) == (socket.AF_INET, socket.IPPROTO_ICMP)
    assert [addr for _, addr in s.sent] == [("127.0.0.1", 0)] * 2
    assert icmp.parse_icmp(s.sent[1][0]).seq == 2
    # the kernel chose identifier 777 for the socket; the guest must see its own again
    s.rx.append((icmp.build_icmp_echo(icmp.ICMP_ECHOREPLY, 777, 2, b"abc"), ("127.0.0.1", 0),
                 0))
    s.rx.append((icmp.build_icmp_echo(icmp.ICMP_ECHO, 777, 3, b"abc"), None, 0))  # not a reply
    h.ready(s)
    [frame] = h.link.frames
    p = scapy.Ether(frame)
    assert (p["IP"].src, p["IP"].dst) == (str(GW4), str(HOST4))
    assert (p["ICMP"].type, p["ICMP"].id, p["ICMP"].seq) == (0, 0x1234, 2)
    q = scapy.Ether(frame)
    del q["ICMP"].chksum
    assert scapy.Ether(bytes(q))["ICMP"].chksum == p["ICMP"].chksum


def test_a_reply_from_another_address_is_not_passed_off_as_the_pinged_ones() -> None:
    h = Harness(no_map_gw=True)
    echo4(h, A4("203.0.113.5"), 5, 1)
    [s] = FakeSocket.instances
    s.rx.append((icmp.build_icmp_echo(icmp.ICMP_ECHOREPLY, 777, 1), ("198.51.100.1", 0), 0))
    s.rx.append((icmp.build_icmp_echo(icmp.ICMP_ECHOREPLY, 777, 1), ("203.0.113.5", 0), 0))
    h.ready(s)
    assert len(h.link.frames) == 1


def test_each_identifier_and_destination_is_its_own_flow() -> None:
    h = Harness(no_map_gw=True)
    echo4(h, GW4, 1, 1)
    echo4(h, GW4, 2, 1)
    echo4(h, A4("203.0.113.5"), 1, 1)
    assert [s.sent[0][1] for s in FakeSocket.instances] == [
        ("192.0.2.1", 0), ("192.0.2.1", 0), ("203.0.113.5", 0)]


def test_echo6_and_reply() -> None:
    h = Harness()
    echo6(h, GW6, 42, 7)
    [s] = FakeSocket.instances
    assert (s.family, s.proto) == (socket.AF_INET6, socket.IPPROTO_ICMPV6)
    assert s.sent[0][1] == ("::1", 0, 0, 0)
    s.rx.append((icmp.build_icmpv6_echo(A6("::1"), A6("::1"), icmp.ICMPV6_ECHO_REPLY, 9, 7,
                                        b"abc"), ("::1", 0, 0, 0), 0))
    h.ready(s)
    p = scapy.Ether(h.link.frames[0])
    assert (p["IPv6"].src, p["IPv6"].dst) == (str(GW6), str(HOST6))
    r = p["ICMPv6EchoReply"]
    assert (r.id, r.seq, bytes(r.data)) == (42, 7, b"abc")
    q = scapy.Ether(h.link.frames[0])
    del q["ICMPv6EchoReply"].cksum
    assert scapy.Ether(bytes(q))["ICMPv6EchoReply"].cksum == r.cksum


def test_other_types_and_no_icmp_are_dropped() -> None:
    h = Harness()
    echo4(h, GW4, 1, 1, type_=icmp.ICMP_ECHOREPLY)
    echo4(h, GW4, 1, 1, type_=13)  # timestamp
    assert FakeSocket.instances == []
    h = Harness(no_icmp=True)
    echo4(h, GW4, 1, 1)
    assert FakeSocket.instances == [] and h.d.icmp is None


def test_ping_socket_permission_error_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    h = Harness()

    def denied(*_a: Any) -> Any:
        raise OSError(errno.EACCES, "Permission denied")

    assert h.d.icmp is not None
    h.d.icmp.socket_factory = denied
    with caplog.at_level(logging.WARNING):
        for i in range(5):
            echo4(h, GW4, i, 1)
    lines = [r.getMessage() for r in caplog.records if "ping_group_range" in r.getMessage()]
    assert len(lines) == 1


def test_flow_close_releases_the_socket() -> None:
    h = Harness()
    echo4(h, GW4, 1, 1)
    [s] = FakeSocket.instances
    h.d.close()
    assert s.closed and s.fd not in h.loop.fds


# --- NDP and DHCPv6 through the dispatcher ---------------------------------------------------


def ndp_harness() -> tuple[Harness, FakeLoop]:
    from vhostpasst.core.flow import FlowTable
    from vhostpasst.dispatch import Dispatcher

    h = Harness()
    loop = FakeLoop()
    h.d = Dispatcher(h.d.config, loop, FlowTable(loop))  # type: ignore[arg-type]
    h.d.link = h.link
    return h, loop


def test_router_solicitation_gets_an_advertisement_and_unsolicited_ras_follow() -> None:
    h, loop = ndp_harness()
    rs = scapy.Ether(src="02:00:00:00:00:01", dst="33:33:00:00:00:02") / scapy.IPv6(
        src="fe80::5", dst="ff02::2", hlim=255) / scapy.ICMPv6ND_RS()
    h.d.on_frames([memoryview(bytes(rs))])
    ras = [scapy.Ether(f) for f in h.link.frames if scapy.Ether(f).haslayer("ICMPv6ND_RA")]
    assert ras and ras[0]["IPv6"].src.startswith("fe80::")
    assert h.d.guest.addr6_ll_seen == A6("fe80::5")
    # the burst of unsolicited RAs is driven by one loop timer at a time
    [timer] = loop.due()
    before = len(h.link.frames)
    loop.timers.remove(timer)  # fired, as Loop pops it
    timer.cb()
    assert len(h.link.frames) == before + 1
    assert scapy.Ether(h.link.frames[-1])["IPv6"].dst == "ff02::1"
    assert len(loop.due()) == 1


def test_neighbour_solicitation_for_the_gateway_is_answered() -> None:
    h, _ = ndp_harness()
    ns = scapy.Ether(src="02:00:00:00:00:01", dst="33:33:ff:00:00:01") / scapy.IPv6(
        src=str(HOST6), dst="ff02::1:ff00:1", hlim=255) / scapy.ICMPv6ND_NS(tgt=str(GW6)) / \
        scapy.ICMPv6NDOptSrcLLAddr(lladdr="02:00:00:00:00:01")
    h.d.on_frames([memoryview(bytes(ns))])
    nas = [scapy.Ether(f) for f in h.link.frames if scapy.Ether(f).haslayer("ICMPv6ND_NA")]
    assert nas and nas[0]["ICMPv6ND_NA"].tgt == str(GW6)


def test_dhcpv6_to_the_multicast_server_address_is_answered_not_forwarded() -> None:
    h, _ = ndp_harness()
    sol = scapy.Ether(src="02:00:00:00:00:01", dst="33:33:00:01:00:02") / scapy.IPv6(
        src="fe80::5", dst="ff02::1:2") / scapy.UDP(sport=546, dport=547) / \
        scapy.DHCP6_Solicit(trid=0x123456) / scapy.DHCP6OptClientId(
            duid=scapy.DUID_LL(lladdr="02:00:00:00:00:01")) / scapy.DHCP6OptIA_NA(iaid=1)
    h.d.on_frames([memoryview(bytes(sol))])
    replies = [scapy.Ether(f) for f in h.link.frames if scapy.Ether(f).haslayer("UDP")
               and scapy.Ether(f)["UDP"].dport == 546]
    assert replies
    assert FakeSocket.instances == []  # not treated as a datagram for the host
