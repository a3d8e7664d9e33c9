"""UDP and the ICMP-error relay, with fake sockets, loop and link: nothing here touches a real
network, so guest frames can be fuzzed freely. (End-to-end: tests/netns/test_e2e_udp_icmp.py.)
Frames we emit are decoded by scapy, an independent implementation. The broadcast and multicast
tests at the end use real sockets, in a pair of network namespaces they create themselves."""

from __future__ import annotations

import errno
import itertools
import logging
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import replace
from ipaddress import IPv4Address as A4
from ipaddress import IPv6Address as A6
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.fakes import FakeLoop
from tests.netns.sandbox import NS_PREFIX, dhcp_payload, parse_dhcp_reply, wait_until
from vhostpasst.config import fwd
from vhostpasst.config.conf import Config, Ip4Conf, Ip6Conf
from vhostpasst.core.flow import FlowTable
from vhostpasst.dispatch import Dispatcher
from vhostpasst.link.base import ETH_MAX_FRAME, Link
from vhostpasst.proto import udp as udp_mod
from vhostpasst.proto.udp import UdpFlow
from vhostpasst.proto.udp_errors import IP_RECVERR, SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6
from vhostpasst.system import netns
from vhostpasst.wire import eth, ip, udp
from vhostpasst.wire.errors import Malformed

scapy = pytest.importorskip("scapy.all")

GW4, HOST4 = A4("192.0.2.1"), A4("192.0.2.2")
GW6, HOST6 = A6("2001:db8::1"), A6("2001:db8::2")
GUEST_MAC = bytes.fromhex("020000000001")
OUR_MAC = bytes.fromhex("9a559a559a55")
_fds = itertools.count(1000)


class FakeSocket:
    """Records what the handler asks of a socket; `rx` / `errq` feed its reads."""

    instances: list[FakeSocket] = []
    bind_fails_for_port: set[int] = set()
    broadcast_addrs: set[str] = set()  # connect() needs SO_BROADCAST, as Linux's does
    connect_errno: dict[str, int] = {}  # connect() to these always fails

    def __init__(self, family: int, type_: int, proto: int = 0) -> None:
        self.family, self.type, self.proto = family, type_, proto
        self.fd = next(_fds)
        self.bound: Any = None
        self.connected: Any = None
        self.connects = 0
        self.sent: list[tuple[bytes, Any]] = []
        self.rx: list[tuple[bytes, Any, int]] = []
        self.errq: list[tuple[bytes, list[tuple[int, int, bytes]], Any]] = []
        self.closed = False
        self.opts: dict[tuple[int, int], Any] = {}
        FakeSocket.instances.append(self)

    def fileno(self) -> int:
        return self.fd

    def setsockopt(self, level: int, name: int, value: Any) -> None:
        self.opts[(level, name)] = value

    def bind(self, addr: Any) -> None:
        if addr[1] in self.bind_fails_for_port:
            raise OSError(errno.EADDRINUSE, "Address in use")
        self.bound = addr

    def connect(self, addr: Any) -> None:
        self.connects += 1
        if addr[0] in self.connect_errno:
            raise OSError(self.connect_errno[addr[0]], "connect failed")
        if addr[0] in self.broadcast_addrs and not self.opts.get(
                (socket.SOL_SOCKET, socket.SO_BROADCAST)):
            raise OSError(errno.EACCES, "Permission denied")
        self.connected = addr

    def send(self, data: Any) -> int:
        self.sent.append((bytes(data), self.connected))
        return len(data)

    def sendto(self, data: Any, addr: Any) -> int:
        self.sent.append((bytes(data), addr))
        return len(data)

    def recvmsg_into(self, bufs: Sequence[memoryview],
                     ancbufsize: int = 0) -> tuple[int, list[Any], int, Any]:
        if not self.rx:
            raise BlockingIOError
        data, addr, flags = self.rx.pop(0)
        n = min(len(data), len(bufs[0]))
        bufs[0][:n] = data[:n]
        if n < len(data):
            flags |= socket.MSG_TRUNC
        return n, [], flags, addr

    def recvmsg(self, size: int, anc: int, flags: int) -> tuple[bytes, list[Any], int, Any]:
        assert flags & socket.MSG_ERRQUEUE
        if not self.errq:
            raise BlockingIOError
        data, cmsgs, addr = self.errq.pop(0)
        return data, cmsgs, 0, addr

    def close(self) -> None:
        self.closed = True


class FakeLink(Link):
    def __init__(self) -> None:
        super().__init__(lambda frames: None)
        self.pool = [memoryview(bytearray(ETH_MAX_FRAME)) for _ in range(32)]
        self.frames: list[bytes] = []

    @property
    def connected(self) -> bool:
        return True

    def rx_buffers(self, count: int) -> list[memoryview]:
        return self.pool[:count]

    def commit(self, lengths: Sequence[int]) -> None:
        for buf, n in zip(self.pool, lengths, strict=False):
            self.frames.append(bytes(buf[:n]))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def make_config(**kw: Any) -> Config:
    ip4 = Ip4Conf(addr=HOST4, gateway=GW4, our_tap_addr=GW4, map_host_loopback=GW4,
                  dns_match=GW4, dns_host=A4("127.0.0.53"), dns=(GW4,))
    ip6 = Ip6Conf(addr=HOST6, gateway=GW6, map_host_loopback=GW6, addr_ll=A6("fe80::2"))
    if kw.get("no_map_gw"):  # what build_config() does with --no-map-gw
        ip4 = replace(ip4, map_host_loopback=None, dns_match=None)
        ip6 = replace(ip6, map_host_loopback=None)
    return Config(ip4=ip4, ip6=ip6, **kw)


class Harness:
    def __init__(self, **kw: Any) -> None:
        FakeSocket.instances = []
        FakeSocket.bind_fails_for_port = set()
        FakeSocket.broadcast_addrs = set()
        FakeSocket.connect_errno = {}
        self.loop = FakeLoop()
        self.d = Dispatcher(make_config(**kw), self.loop, FlowTable(self.loop))  # type: ignore
        self.link = FakeLink()
        self.d.link = self.link
        for h in (self.d.udp, self.d.icmp):
            if h is not None:
                h.socket_factory = FakeSocket  # type: ignore[assignment]
        if self.d.udp is not None:
            self.d.udp.mmsg = None  # fake fds: the recvmmsg path is tested on real sockets

    def guest4(self, sport: int, dst: A4 | str, dport: int, payload: bytes,
               src: A4 | str = HOST4) -> None:
        seg = udp.build_udp4(A4(src), A4(dst), sport, dport, payload)
        frame = eth.build_eth(OUR_MAC, GUEST_MAC, eth.ETH_P_IP,
                              ip.build_ipv4(A4(src), A4(dst), ip.IPPROTO_UDP, seg, ttl=64))
        self.d.on_frames([memoryview(frame)])

    def guest6(self, sport: int, dst: A6 | str, dport: int, payload: bytes,
               src: A6 | str = HOST6) -> None:
        seg = udp.build_udp6(A6(src), A6(dst), sport, dport, payload)
        frame = eth.build_eth(OUR_MAC, GUEST_MAC, eth.ETH_P_IPV6,
                              ip.build_ipv6(A6(src), A6(dst), ip.IPPROTO_UDP, seg))
        self.d.on_frames([memoryview(frame)])

    def ready(self, sock: FakeSocket, mask: int = 1) -> None:
        self.loop.fds[sock.fd][1](mask)


def test_guest_flow_keeps_the_source_port_and_maps_the_gateway_to_loopback() -> None:
    h = Harness()
    h.guest4(40001, GW4, 5001, b"hello")
    h.guest4(40001, GW4, 5001, b"again")
    [s] = FakeSocket.instances  # one flow, one socket
    assert s.family == socket.AF_INET and s.bound == ("", 40001)
    assert s.connected == ("127.0.0.1", 5001)
    assert [d for d, _ in s.sent] == [b"hello", b"again"]
    assert s.opts[(socket.IPPROTO_IP, IP_RECVERR)] == 1


def test_source_port_taken_falls_back_to_any_port() -> None:
    h = Harness()
    FakeSocket.bind_fails_for_port = {40001}
    h.guest4(40001, A4("203.0.113.9"), 9, b"x")
    [s] = FakeSocket.instances
    assert s.bound == ("", 0) and s.connected == ("203.0.113.9", 9)


def test_dns_forwarding_and_the_reply_comes_from_the_address_asked() -> None:
    h = Harness()
    h.guest4(33333, GW4, 53, b"query")
    [s] = FakeSocket.instances
    assert s.connected == ("127.0.0.53", 53)
    s.rx.append((b"answer", ("127.0.0.53", 53), 0))
    h.ready(s)
    [frame] = h.link.frames
    p = scapy.Ether(frame)
    assert (p.src, p.dst) == ("9a:55:9a:55:9a:55", "02:00:00:00:00:01")
    assert (p["IP"].src, p["IP"].dst) == (str(GW4), str(HOST4))
    assert (p["UDP"].sport, p["UDP"].dport) == (53, 33333)
    assert bytes(p["UDP"].payload) == b"answer"
    assert _checksums_ok(frame)


def test_ipv6_flow_and_reply() -> None:
    h = Harness()
    h.guest6(40001, GW6, 5001, b"six")
    [s] = FakeSocket.instances
    assert s.family == socket.AF_INET6 and s.connected == ("::1", 5001, 0, 0)
    s.rx.append((b"x" * 3000, ("::1", 5001, 0, 0), 0))
    h.ready(s)
    p = scapy.Ether(h.link.frames[0])
    assert (p["IPv6"].src, p["IPv6"].dst) == (str(GW6), str(HOST6))
    assert bytes(p["UDP"].payload) == b"x" * 3000 and _checksums_ok(h.link.frames[0])


def test_datagrams_beyond_the_guest_mtu_are_dropped_not_truncated() -> None:
    h = Harness(mtu=1500)
    h.guest4(40001, GW4, 5001, b"q")
    [s] = FakeSocket.instances
    s.rx += [(b"a" * 1472, None, 0), (b"b" * 1473, None, 0), (b"c", None, 0)]
    h.ready(s)
    assert [len(f) for f in h.link.frames] == [1514, 43]


def test_bad_sources_unspecified_destinations_port_zero_and_loopback_are_dropped() -> None:
    h = Harness()
    h.guest4(0, GW4, 5001, b"x")
    h.guest4(1, GW4, 0, b"x")
    h.guest4(1, "255.255.255.255", 0, b"x")
    h.guest4(1, GW4, 9, b"x", src="224.0.0.9")
    h.guest4(1, GW4, 9, b"x", src="0.0.0.0")
    h.guest4(1, "0.0.0.0", 9, b"x")
    h.guest6(1, GW6, 9, b"x", src="ff02::1")
    h.guest6(1, GW6, 9, b"x", src="::")
    h.guest6(1, "::", 9, b"x")
    h.guest4(1, "127.0.0.1", 9, b"x")
    h.guest4(1, GW4, 9, b"x", src="127.0.0.1")
    assert FakeSocket.instances == []


def test_broadcast_and_multicast_get_flows_but_dhcp_comes_first() -> None:
    h = Harness()
    FakeSocket.broadcast_addrs = {"255.255.255.255", "203.0.113.255"}
    FakeSocket.connect_errno = {"198.51.100.255": errno.EACCES}  # refused even so
    h.guest4(40001, "255.255.255.255", 9, b"all")
    h.guest4(40001, "203.0.113.255", 9, b"subnet")  # the host routes it as a broadcast
    h.guest4(40001, "224.0.0.9", 520, b"rip")
    h.guest6(40001, "ff05::db8", 9, b"six")
    h.guest4(40001, "198.51.100.255", 9, b"refused")
    limited, subnet, group, group6, refused = FakeSocket.instances
    broadcast = (socket.SOL_SOCKET, socket.SO_BROADCAST)
    assert limited.opts[broadcast] == 1 and limited.connects == 1  # set before connect()
    assert limited.bound == ("", 40001) and limited.sent == [(b"all", ("255.255.255.255", 9))]
    assert subnet.opts[broadcast] == 1 and subnet.connects == 2  # EACCES, then once more
    assert subnet.sent == [(b"subnet", ("203.0.113.255", 9))]
    assert broadcast not in group.opts and group.sent == [(b"rip", ("224.0.0.9", 520))]
    assert group6.sent == [(b"six", ("ff05::db8", 9, 0, 0))]
    assert refused.connects == 2 and refused.closed and refused.sent == []
    assert refused.fd not in h.loop.fds
    # The guest's DHCP and DHCPv6 servers take their frames before UDP sees them.
    h.guest4(68, "255.255.255.255", 67, dhcp_payload(1, GUEST_MAC, 7), src=HOST4)
    h.guest6(546, "ff02::1:2", 547, b"\x01\x00\x00\x07")
    assert len(FakeSocket.instances) == 5
    offer = parse_dhcp_reply(h.link.frames[-1])
    assert offer is not None and offer.msg_type == "OFFER"


def test_no_udp_drops_everything() -> None:
    h = Harness(no_udp=True)
    h.guest4(40001, GW4, 5001, b"x")
    assert FakeSocket.instances == [] and h.d.udp is None


def test_flows_close_their_sockets() -> None:
    h = Harness()
    h.guest4(40001, GW4, 5001, b"x")
    [s] = FakeSocket.instances
    h.d.close()
    assert s.closed and s.fd not in h.loop.fds


# --- -u inbound ----------------------------------------------------------------------------


def test_inbound_flow_to_the_guest_and_replies_out_of_the_listening_socket(
        monkeypatch: pytest.MonkeyPatch) -> None:
    h = Harness()
    assert h.d.udp is not None
    h.d.udp.listen(fwd.parse_spec("5002:6002", option="-u"))
    s4, s6 = FakeSocket.instances
    assert s4.bound == ("", 5002) and s6.bound == ("", 5002)
    assert s6.opts[(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)] == 1
    s4.rx.append((b"ping", ("127.0.0.1", 41002), 0))
    h.ready(s4)
    p = scapy.Ether(h.link.frames[0])
    assert (p["IP"].src, p["IP"].dst) == (str(GW4), str(HOST4))  # loopback shows as gateway
    assert (p["UDP"].sport, p["UDP"].dport) == (41002, 6002)
    h.guest4(6002, GW4, 41002, b"pong")
    assert s4.sent == [(b"pong", ("127.0.0.1", 41002))]
    assert len(FakeSocket.instances) == 2  # no new socket for the reply


def test_inbound_goes_to_the_address_the_guest_uses() -> None:
    h = Harness()
    assert h.d.udp is not None
    h.d.udp.listen(fwd.parse_spec("0.0.0.0/5002", option="-u"))
    [s4] = FakeSocket.instances
    h.guest4(1234, A4("203.0.113.1"), 9, b"x", src="192.0.2.77")  # the guest shows itself
    s4.rx.append((b"in", ("198.51.100.9", 7), 0))
    h.ready(s4)
    p = scapy.Ether(h.link.frames[-1])
    assert (p["IP"].src, p["IP"].dst) == ("198.51.100.9", "192.0.2.77")


# --- ICMP errors ---------------------------------------------------------------------------


def _ee(origin: int, type_: int, code: int, info: int = 0, errno_: int = 111) -> bytes:
    return struct.pack("=IBBBBII", errno_, origin, type_, code, 0, info, 0)


def _sin(addr: str) -> bytes:
    return struct.pack("=HH4s8x", socket.AF_INET, 0, A4(addr).packed)


def _sin6(addr: str) -> bytes:
    return struct.pack("=HHI16sI", socket.AF_INET6, 0, 0, A6(addr).packed, 0)


def test_port_unreachable_becomes_an_icmp_error_quoting_the_guest_datagram() -> None:
    h = Harness()
    h.guest4(40001, GW4, 5999, b"anyone?")
    [s] = FakeSocket.instances
    s.errq.append((b"anyone?", [(socket.IPPROTO_IP, IP_RECVERR,
                                 _ee(SO_EE_ORIGIN_ICMP, 3, 3) + _sin("127.0.0.1"))],
                   ("127.0.0.1", 5999)))
    h.ready(s, mask=8)  # EPOLLERR: the error queue has something
    [frame] = h.link.frames
    p = scapy.Ether(frame)
    assert (p["IP"].src, p["IP"].dst) == (str(GW4), str(HOST4))
    assert (p["ICMP"].type, p["ICMP"].code) == (3, 3)
    inner = p["ICMP"].payload
    assert (inner.src, inner.dst) == (str(HOST4), str(GW4))  # as the guest sent it
    assert (inner["UDPerror"].sport, inner["UDPerror"].dport) == (40001, 5999)
    assert bytes(inner["UDPerror"].payload) == b"anyone?"
    assert _checksums_ok(frame, inner_too=False)


def test_frag_needed_carries_the_mtu_and_errors_from_routers_show_the_router() -> None:
    h = Harness(no_map_gw=True)
    h.guest4(40001, A4("203.0.113.9"), 9, b"big")
    [s] = FakeSocket.instances
    s.errq.append((b"big", [(socket.IPPROTO_IP, IP_RECVERR,
                             _ee(SO_EE_ORIGIN_ICMP, 3, 4, info=1400) + _sin("198.51.100.1"))],
                   None))
    h.ready(s, mask=8)
    p = scapy.Ether(h.link.frames[0])
    assert p["IP"].src == "198.51.100.1" and p["ICMP"].nexthopmtu == 1400


def test_ipv6_errors_and_local_errors_are_ignored() -> None:
    h = Harness()
    h.guest6(40001, GW6, 5999, b"six")
    [s] = FakeSocket.instances
    s.errq.append((b"six", [(socket.IPPROTO_IPV6, 25, _ee(1, 0, 0, errno_=90))], None))
    s.errq.append((b"six", [(socket.IPPROTO_IPV6, 25,
                             _ee(SO_EE_ORIGIN_ICMP6, 1, 4) + _sin6("::1"))], None))
    h.ready(s, mask=8)
    [frame] = h.link.frames  # the local one (EMSGSIZE) was not relayed
    p = scapy.Ether(frame)
    assert (p["IPv6"].src, p["IPv6"].dst) == (str(GW6), str(HOST6))
    assert (p["ICMPv6DestUnreach"].type, p["ICMPv6DestUnreach"].code) == (1, 4)
    inner = p["ICMPv6DestUnreach"].payload
    assert (inner.src, inner.dst, inner["UDPerror"].dport) == (str(HOST6), str(GW6), 5999)
    assert _checksums_ok(frame, inner_too=False)


def test_icmp_errors_are_rate_limited() -> None:
    h = Harness()
    h.guest4(40001, GW4, 5999, b"x")
    [s] = FakeSocket.instances
    cm = [(socket.IPPROTO_IP, IP_RECVERR, _ee(SO_EE_ORIGIN_ICMP, 3, 3) + _sin("127.0.0.1"))]
    for _ in range(5):
        s.errq += [(b"x", cm, None)] * 30
        h.ready(s, mask=8)
    assert 10 <= len(h.link.frames) <= 25


def test_quote_is_bounded() -> None:
    h = Harness()
    h.guest4(40001, GW4, 5999, b"x")
    [s] = FakeSocket.instances
    s.errq.append((b"y" * 1200, [(socket.IPPROTO_IP, IP_RECVERR,
                                  _ee(SO_EE_ORIGIN_ICMP, 3, 3))], None))
    h.ready(s, mask=8)
    assert len(h.link.frames[0]) - 14 <= 576


def _checksums_ok(frame: bytes, inner_too: bool = True) -> bool:
    """Let scapy recompute every checksum and compare with ours."""
    p = scapy.Ether(frame)
    for layer in ("IP", "UDP", "ICMP"):
        if p.haslayer(layer):
            got = p[layer].chksum
            q = scapy.Ether(frame)
            del q[layer].chksum
            if scapy.Ether(bytes(q))[layer].chksum != got:
                return False
            if not inner_too:
                break
    for layer in ("ICMPv6DestUnreach", "UDP"):
        if p.haslayer("IPv6") and p.haslayer(layer):
            got = p[layer].cksum if layer != "UDP" else p[layer].chksum
            q = scapy.Ether(frame)
            if layer == "UDP":
                del q[layer].chksum
                return bool(scapy.Ether(bytes(q))[layer].chksum == got)
            del q[layer].cksum
            return bool(scapy.Ether(bytes(q))[layer].cksum == got)
    return True


# --- fuzzing: nothing a guest sends escapes as anything but Malformed ------------------------

ADDRS4 = st.sampled_from(["192.0.2.1", "192.0.2.2", "0.0.0.0", "127.0.0.1", "224.0.0.1",
                          "255.255.255.255", "203.0.113.5", "192.0.2.99"])
ADDRS6 = st.sampled_from(["2001:db8::1", "2001:db8::2", "::", "::1", "ff02::1", "fe80::1",
                          "fe80::5", "2001:db8:9::9", "::ffff:127.0.0.1"])


@st.composite
def guest_frames(draw: st.DrawFn) -> bytes:
    six = draw(st.booleans())
    proto = draw(st.sampled_from([ip.IPPROTO_UDP, ip.IPPROTO_ICMP, ip.IPPROTO_ICMPV6, 6, 99]))
    body = draw(st.binary(max_size=64))
    if proto == ip.IPPROTO_UDP and draw(st.booleans()):
        body = struct.pack("!HHHH", draw(st.sampled_from([0, 53, 67, 547, 40001])),
                           draw(st.sampled_from([0, 53, 67, 547, 5001])),
                           draw(st.integers(0, 0xFFFF)), 0) + body
    elif draw(st.booleans()):
        body = bytes([draw(st.sampled_from([0, 3, 8, 128, 129, 133, 135, 255])), 0, 0, 0]) \
            + draw(st.binary(min_size=4, max_size=4)) + body
    if six:
        pkt = bytearray(ip.build_ipv6(A6(draw(ADDRS6)), A6(draw(ADDRS6)), proto, body))
        et = eth.ETH_P_IPV6
        if draw(st.booleans()):
            struct.pack_into("!H", pkt, 4, draw(st.integers(0, 0xFFFF)))
    else:
        pkt = bytearray(ip.build_ipv4(A4(draw(ADDRS4)), A4(draw(ADDRS4)), proto, body))
        et = eth.ETH_P_IP
        if draw(st.booleans()):
            struct.pack_into("!HH", pkt, 2, draw(st.integers(0, 0xFFFF)),
                             draw(st.integers(0, 0xFFFF)))
    cut = draw(st.integers(0, len(pkt)))
    pkt = pkt[:cut] if draw(st.booleans()) else pkt
    return eth.build_eth(OUR_MAC, draw(st.sampled_from([GUEST_MAC, b"\xff" * 6])), et, pkt)


@settings(max_examples=400, deadline=None)
@given(st.lists(guest_frames(), max_size=4))
def test_malformed_guest_frames_never_raise(frames: list[bytes]) -> None:
    h = Harness()
    for frame in frames:
        try:
            h.d._handle(memoryview(frame))
        except Malformed:
            pass
    if h.d.udp is not None:
        h.d.udp.flush_tap()
    for s in FakeSocket.instances:  # and whatever came back is written without errors
        if s.fd in h.loop.fds:
            s.rx.append((b"r" * 20, ("127.0.0.1", 41000), 0))
            s.errq.append((b"r", [(socket.IPPROTO_IP, IP_RECVERR, _ee(2, 3, 3))], None))
            h.ready(s, mask=9)
    assert h.d.ctx is not None
    for flow in h.d.ctx.flows:  # every flow made from fuzz is for a sane guest-side tuple
        if isinstance(flow, UdpFlow):
            assert flow.gport and flow.fport and not flow.gaddr.is_multicast
            assert not flow.gaddr.is_unspecified and not flow.faddr.is_unspecified


# --- recvmmsg/sendmmsg (cffi) on a local socketpair: no network involved --------------------

mmsg_built = pytest.mark.skipif(udp_mod._mlib is None, reason="vhostpasst._mmsg not built")


@mmsg_built
def test_mmsg_receives_many_flags_truncation_and_is_bounded() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        m = udp_mod.Mmsg(4)
        assert m.recv(b.fileno(), [memoryview(bytearray(8))], False) == -errno.EAGAIN
        for data in (b"one", b"x" * 20, b"three", b"4", b"5"):
            a.send(data)
        bufs = [bytearray(8) for _ in range(6)]  # more views than the arrays: capped at 4
        n = m.recv(b.fileno(), [memoryview(x) for x in bufs], True)
        assert n == 4
        res = [m.result(i, True) for i in range(n)]
        assert [r[0] for r in res] == [3, 8, 5, 1]
        assert [bool(r[1] & socket.MSG_TRUNC) for r in res] == [False, True, False, False]
        assert all(r[2] is None for r in res)  # AF_UNIX: no IP source
        assert bytes(bufs[0][:3]) == b"one" and bytes(bufs[1]) == b"x" * 8
        assert m.recv(b.fileno(), [memoryview(bytearray(8))], False) == 1  # the fifth
        sent = m.send(a.fileno(), [memoryview(b"p"), memoryview(b"qq"), memoryview(b"rrr")])
        assert sent == 3
        assert [b.recv(10) for _ in range(3)] == [b"p", b"qq", b"rrr"]


@mmsg_built
def test_batched_read_closes_the_gap_left_by_a_dropped_datagram() -> None:
    h = Harness(mtu=1500)
    assert h.d.udp is not None and h.d.ctx is not None
    h.d.udp.mmsg = udp_mod.Mmsg()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        flow = UdpFlow(h.d.ctx, False, HOST4, 40001, GW4, 5001, b, None, 10)  # type: ignore
        for data in (b"first", b"y" * 1473, b"third"):  # the middle one exceeds the MTU
            a.send(data)
        h.d.udp._read(b, False, lambda _addr, _dst: flow)  # type: ignore[arg-type]
    payloads = [bytes(scapy.Ether(f)["UDP"].payload) for f in h.link.frames]
    assert payloads == [b"first", b"third"]
    assert all(_checksums_ok(f) for f in h.link.frames)


@mmsg_built
def test_a_run_of_guest_datagrams_goes_out_in_order_through_sendmmsg() -> None:
    h = Harness()
    assert h.d.udp is not None and h.d.ctx is not None
    h.d.udp.mmsg = udp_mod.Mmsg()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        flow = UdpFlow(h.d.ctx, False, HOST4, 40001, GW4, 5001, b, None, 10)  # type: ignore
        h.d.ctx.flows.add(flow, ("udp", False, HOST4, 40001, GW4, 5001))
        frames = []
        for i in range(5):
            seg = udp.build_udp4(HOST4, GW4, 40001, 5001, bytes([i]) * (i + 1))
            frames.append(memoryview(eth.build_eth(OUR_MAC, GUEST_MAC, eth.ETH_P_IP,
                                                   ip.build_ipv4(HOST4, GW4, 17, seg))))
        h.d.on_frames(frames)
        a.settimeout(1)
        assert [a.recv(10) for _ in range(5)] == [bytes([i]) * (i + 1) for i in range(5)]


def test_link_local_source_does_not_replace_the_assigned_address() -> None:
    """Reference 4.2: the guest's link-local source stands in for its address only when it
    was given none; traffic from the host then still goes to the assigned address."""
    from vhostpasst.core import nat

    h = Harness()
    h.guest6(40001, "ff02::16", 5001, b"mld-like", src="fe80::99")
    assert h.d.guest.addr6_ll_seen == A6("fe80::99") and h.d.guest.addr6_seen is None
    assert h.d.ctx is not None
    assert nat.guest_destination(h.d.config, h.d.ctx.guest, True) == HOST6
    h.guest6(40001, GW6, 5001, b"from its address", src="2001:db8::77")
    assert h.d.guest.addr6_seen == A6("2001:db8::77")
    # given no address, the link-local one is all there is
    h2 = Harness()
    assert h2.d.config.ip6 is not None
    h2.d.config = replace(h2.d.config, ip6=replace(h2.d.config.ip6, addr=None))
    h2.guest6(40001, "ff02::16", 5001, b"x", src="fe80::99")
    assert h2.d.guest.addr6_seen == A6("fe80::99")


# --- broadcast and multicast for real, in two namespaces of the test's own ------------------
#
# Namespace "a" holds the flow sockets (v0: 192.0.2.2/24, 2001:db8::2/64, default routes via
# .1 / ::1); its veth peer v1 (192.0.2.1/24, 2001:db8::1/64) in namespace "b" holds the
# receivers. Deleting the namespaces removes the veth pair; nothing else is touched.

_ns_ids = itertools.count(1)
RECV_TIMEOUT = 3.0
GROUP4, GROUP6 = "239.255.0.1", "ff15::db8:1"


class Upstream:
    def __init__(self, a: int, b: int) -> None:
        self.a, self.b = a, b  # namespace fds

    def harness(self) -> Harness:
        """A Harness whose UDP flow sockets are real ones, created in namespace a."""
        h = Harness()
        assert h.d.udp is not None
        h.d.udp.socket_factory = lambda *args: netns.call_in_netns(  # type: ignore[assignment]
            self.a, socket.socket, *args)
        return h

    def receiver(self, six: bool, port: int, group: str | None = None) -> socket.socket:
        """A socket in namespace b on [::]:port or 0.0.0.0:port, in `group` on v1."""
        def make() -> socket.socket:
            s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
            s.settimeout(RECV_TIMEOUT)
            s.bind(("", port))
            if group and six:
                mreq = A6(group).packed + struct.pack("@I", socket.if_nametoindex("v1"))
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
            elif group:
                mreq = socket.inet_aton(group) + socket.inet_aton(str(GW4))
                s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
            return s
        return netns.call_in_netns(self.b, make)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True)


def _multicast_route(ns: str) -> str:
    return subprocess.run(["ip", "-n", ns, "-6", "route", "show", "table", "local", "ff00::/8"],
                          capture_output=True, text=True, timeout=10).stdout.strip()


@pytest.fixture
def upstream() -> Iterator[Upstream]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and ip(8) to create network namespaces")
    # sandbox.remove_stale_namespaces() deletes what a killed run leaves behind
    base = f"{NS_PREFIX}{os.getpid()}-udp{next(_ns_ids)}"
    a, b = f"{base}-a", f"{base}-b"
    fds: list[int] = []
    try:
        for ns in (a, b):
            _ip("netns", "add", ns)
            fds.append(os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC))
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", a, "link", "add", "v0", "type", "veth", "peer", "name", "v1", "netns", b)
        for ns, dev, addr4, addr6 in ((a, "v0", HOST4, HOST6), (b, "v1", GW4, GW6)):
            _ip("-n", ns, "addr", "add", f"{addr4}/24", "dev", dev)
            _ip("-n", ns, "addr", "add", f"{addr6}/64", "dev", dev, "nodad")
            _ip("-n", ns, "link", "set", dev, "up")
        _ip("-n", a, "route", "add", "default", "via", str(GW4))
        _ip("-n", a, "-6", "route", "add", "default", "via", str(GW6))
        # The carrier comes through linkwatch, later: it activates the queues and adds the
        # IPv6 multicast route (ff00::/8) that incoming group traffic needs.
        wait_until(lambda: all(_multicast_route(ns) for ns in (a, b)), 5,
                   "the veth pair's carrier (ff00::/8 routes)")
        yield Upstream(*fds)
    finally:
        for fd in fds:
            os.close(fd)
        for ns in (a, b):
            subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=10)


def test_guest_broadcasts_reach_the_link(upstream: Upstream) -> None:
    """255.255.255.255 (SO_BROADCAST set up front) and 192.0.2.255, the subnet-directed
    broadcast of v0's /24 (connect() gets EACCES first), both arrive from the guest's port."""
    h = upstream.harness()
    with upstream.receiver(False, 5300) as r:
        h.guest4(40001, "255.255.255.255", 5300, b"limited")
        assert r.recvfrom(64) == (b"limited", (str(HOST4), 40001))
        h.guest4(40002, "192.0.2.255", 5300, b"directed")
        assert r.recvfrom(64) == (b"directed", (str(HOST4), 40002))
    h.d.close()


def test_guest_multicast_reaches_a_group_joined_on_the_link(
        upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    h = upstream.harness()
    with upstream.receiver(False, 5301, GROUP4) as r4, upstream.receiver(True, 5302,
                                                                           GROUP6) as r6:
        h.guest4(40003, GROUP4, 5301, b"group4")
        assert r4.recvfrom(64) == (b"group4", (str(HOST4), 40003))
        h.guest6(40004, GROUP6, 5302, b"group6")
        data, addr = r6.recvfrom(64)
        assert (data, addr[:2]) == (b"group6", (str(HOST6), 40004))
        # A link-scope group needs an interface the flow does not name: connect() fails
        # (EINVAL), and that is a debug line and a dropped datagram, not an error.
        with caplog.at_level(logging.DEBUG, logger="vhostpasst"):
            h.guest6(40005, "ff02::db8:1", 5302, b"nowhere")
        assert not [rec for rec in caplog.records if rec.levelno >= logging.WARNING]
        assert any(rec.getMessage().startswith("UDP flow to ff02::db8:1:5302: [Errno 22]")
                   for rec in caplog.records)
        assert h.d.ctx is not None
        flows = {f.faddr for f in h.d.ctx.flows if isinstance(f, UdpFlow)}
        assert flows == {A4(GROUP4), A6(GROUP6)}
    h.d.close()


def test_a_flow_whose_callback_raises_is_ended_by_the_loops_last_resort() -> None:
    """loop.py's last resort calls the fd's owner: for a UDP flow, the flow ends (socket
    closed, no longer watched), and the next datagram of the guest makes a new one."""
    h = Harness()
    h.guest4(40001, GW4, 5001, b"hello")
    [s] = FakeSocket.instances
    h.loop.on_error[s.fd](RuntimeError("a bug in a callback"))
    assert s.fd not in h.loop.fds and s.closed
    h.guest4(40001, GW4, 5001, b"again")
    assert len(FakeSocket.instances) == 2 and FakeSocket.instances[1].sent[0][0] == b"again"
