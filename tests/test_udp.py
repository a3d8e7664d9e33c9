"""UDP and the ICMP-error relay, with fake sockets, loop and link: nothing here touches a real
network, so guest frames can be fuzzed freely. (End-to-end: tests/test_e2e_udp_icmp.py.)
Frames we emit are decoded by scapy, an independent implementation."""

from __future__ import annotations

import errno
import itertools
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import replace
from ipaddress import IPv4Address as A4
from ipaddress import IPv6Address as A6
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpasst import fwd
from vhostpasst import udp as udp_mod
from vhostpasst.conf import Config, Ip4Conf, Ip6Conf
from vhostpasst.dispatch import Dispatcher
from vhostpasst.flow import FlowTable
from vhostpasst.link.base import ETH_MAX_FRAME, Link
from vhostpasst.udp import IP_RECVERR, SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6, UdpFlow
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

    def __init__(self, family: int, type_: int, proto: int = 0) -> None:
        self.family, self.type, self.proto = family, type_, proto
        self.fd = next(_fds)
        self.bound: Any = None
        self.connected: Any = None
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
        self.connected = addr

    def send(self, data: Any) -> int:
        self.sent.append((bytes(data), self.connected))
        return len(data)

    def sendto(self, data: Any, addr: Any) -> int:
        self.sent.append((bytes(data), addr))
        return len(data)

    def recvmsg_into(self, bufs: Sequence[memoryview]) -> tuple[int, list[Any], int, Any]:
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


class FakeTimer:
    def cancel(self) -> None:
        pass


class FakeLoop:
    def __init__(self) -> None:
        self.fds: dict[int, Callable[[int], None]] = {}

    def add_fd(self, fd: int, events: int, cb: Callable[[int], None]) -> None:
        assert fd not in self.fds
        self.fds[fd] = cb

    def remove_fd(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def call_at(self, when: float, cb: Callable[[], None]) -> FakeTimer:
        return FakeTimer()


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
        self.loop.fds[sock.fd](mask)


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


def test_multicast_broadcast_port_zero_and_loopback_are_dropped() -> None:
    h = Harness()
    h.guest4(0, GW4, 5001, b"x")
    h.guest4(1, GW4, 0, b"x")
    h.guest4(1, "255.255.255.255", 9, b"x")
    h.guest4(1, "224.0.0.9", 520, b"x")
    h.guest4(1, "127.0.0.1", 9, b"x")
    h.guest4(1, GW4, 9, b"x", src="127.0.0.1")
    assert FakeSocket.instances == []


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
            assert flow.gport and flow.fport and not flow.faddr.is_multicast


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
        h.d.udp._read(b, False, lambda _addr: flow)  # type: ignore[arg-type]
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
    from vhostpasst import nat

    h = Harness()
    h.guest6(40001, "ff02::16", 5001, b"mld-like", src="fe80::99")
    assert h.d.addr6_ll_seen == A6("fe80::99") and h.d.addr6_seen is None
    assert h.d.ctx is not None
    assert nat.guest_destination(h.d.config, h.d.ctx.guest, True) == HOST6
    h.guest6(40001, GW6, 5001, b"from its address", src="2001:db8::77")
    assert h.d.addr6_seen == A6("2001:db8::77")
    # given no address, the link-local one is all there is
    h2 = Harness()
    assert h2.d.config.ip6 is not None
    h2.d.config = replace(h2.d.config, ip6=replace(h2.d.config.ip6, addr=None))
    h2.guest6(40001, "ff02::16", 5001, b"x", src="fe80::99")
    assert h2.d.addr6_seen == A6("fe80::99")
