"""Property-based fuzzing (hypothesis, bounded by max_examples) of the two Python entry points
a hostile peer feeds: the vhost-user message reader (virtio/message.py: the byte stream and
its fds, then validate()) and the dispatch of guest frames (vhostpasst/dispatch.py down to
the services and the UDP/ICMP handlers). The wire parsers alone are fuzzed in test_wire.py
and validate() alone in tests/virtio/test_message.py; this adds the stream (arbitrary
chunking, fds on arbitrary chunks, broken headers, many messages in a row) and whole frames
(valid ones mutated and cut, in batches) through the dispatcher.

The properties: the reader returns exactly the messages sent, each with the fds sent with its
bytes, or raises only its own errors (ProtocolError, RequestError, ConnectionClosed), and no
fd is leaked either way; the dispatcher raises nothing and logs no "error while handling" (its
catch-all for bugs) whatever the frames. hypothesis rather than atheris: no new dependency,
it runs inside pytest's process with a bounded example count (atheris.Fuzz() owns the process
until it is killed), and strategies that build valid messages and frames then mutate them
reach past the first length check far sooner than byte-level mutation would in seconds.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from ipaddress import IPv4Address as A4
from ipaddress import IPv6Address as A6

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.unit.test_udp import Harness  # fake UDP/ICMP sockets
from vhostpasst.config.conf import Config, Ip4Conf, Ip6Conf
from vhostpasst.dispatch import Dispatcher
from vhostpasst.wire import arp, eth, icmp, ip, tcp, udp
from virtio import message as m

# --- the vhost-user message reader -----------------------------------------------------------


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


# One message as a front end might send it: request, flags (mostly VERSION), payload, fds.
_messages = st.lists(st.tuples(
    st.integers(0, 60) | st.integers(0, 2**32 - 1),
    st.just(m.VERSION) | st.sampled_from([m.VERSION | m.FLAG_NEED_REPLY, m.VERSION | m.FLAG_REPLY])
    | st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
    st.integers(0, m.MAX_FDS + 2),
    st.booleans(),  # lie about the size: header says more than MAX_PAYLOAD
), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=_messages, cuts=st.lists(st.integers(1, 64), max_size=40),
       close_at_end=st.booleans())
def test_reader_returns_what_was_sent_or_its_own_errors(messages, cuts, close_at_end):
    before = _open_fds()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    reader = m.MessageReader(b)
    r, w = os.pipe()
    # the stream: each message's bytes, the fds travelling with its first chunk
    stream = bytearray()
    fds_at: dict[int, int] = {}  # stream offset -> fds sent with the chunk starting there
    for request, flags, payload, nfds, lie in messages:
        data = struct.pack("=III", request, flags,
                           m.MAX_PAYLOAD + 1 if lie else len(payload)) + payload
        if nfds:
            fds_at[len(stream)] = nfds
        stream += data
    got: list[m.Message] = []
    error: Exception | None = None
    try:
        pos, k = 0, 0
        while pos < len(stream) and error is None:
            # a chunk: up to the next fd boundary, sized by `cuts`
            end = min(len(stream), pos + (cuts[k % len(cuts)] if cuts else len(stream)))
            nxt = [o for o in fds_at if pos < o < end]
            end = min(nxt) if nxt else end
            k += 1
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                    struct.pack(f"={fds_at[pos]}i", *([r] * fds_at[pos])))] \
                if pos in fds_at else []
            a.sendmsg([bytes(stream[pos:end])], anc)
            pos = end
            while error is None:
                try:
                    msg = reader.read()
                except (m.ProtocolError, m.ConnectionClosed) as e:
                    error = e
                    break
                except m.RequestError:
                    got.append(None)  # type: ignore[arg-type]  # refused, fds closed
                    continue
                if msg is None:
                    break
                got.append(msg)
        if close_at_end and error is None:
            a.close()
            with pytest.raises((m.ConnectionClosed, m.ProtocolError)):
                while reader.read() is not None:
                    pass
        # What came out is what went in, in order, up to the first stream error.
        for msg, (request, flags, payload, nfds, lie) in zip(got, messages, strict=False):
            if msg is None:
                assert nfds > m.MAX_FDS
                continue
            assert not lie and nfds <= m.MAX_FDS
            assert (msg.request, msg.flags, msg.payload) == (request, flags, payload)
            assert len(msg.fds) == nfds
            try:
                m.validate(msg)
            except m.RequestError:
                pass
            msg.close_fds()
        if error is None and not close_at_end:
            assert len(got) == len(messages)
        if isinstance(error, m.ProtocolError):
            bad = messages[len(got)]
            assert bad[4] or bad[1] & m.VERSION_MASK != m.VERSION
    finally:
        reader.close()
        for s in (a, b):
            s.close()
        os.close(r)
        os.close(w)
    assert _open_fds() == before  # no fd leaked, whatever happened


# --- guest frames through the dispatcher ------------------------------------------------------

GW4, HOST4 = A4("10.0.2.2"), A4("10.0.2.15")
GW6, HOST6 = A6("fd00::2"), A6("fd00::15")
GUEST_MAC, OUR_MAC = bytes.fromhex("525400123456"), bytes.fromhex("9a5570e1a1b2")
BCAST = b"\xff" * 6


def _config(**kw) -> Config:
    return Config(ip4=Ip4Conf(addr=HOST4, gateway=GW4, our_tap_addr=GW4, map_host_loopback=GW4,
                              dns_match=GW4, dns=(GW4,)),
                  ip6=Ip6Conf(addr=HOST6, gateway=GW6, map_host_loopback=GW6,
                              addr_ll=A6("fe80::2")), **kw)


def _dhcp(msg_type: int) -> bytes:
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, 0x1234, 0, 0x8000,
                        b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4, GUEST_MAC.ljust(16, b"\0"),
                        b"", b"")
    opts = bytes([53, 1, msg_type, 55, 4, 1, 3, 6, 15, 50, 4]) + HOST4.packed + b"\xff"
    return bootp + b"\x63\x82\x53\x63" + opts


def _frames() -> list[bytes]:
    ll = A6("fe80::5054:ff:fe12:3456")
    all_routers, dhcp6 = A6("ff02::2"), A6("ff02::1:2")
    v4 = [
        (BCAST, eth.ETH_P_ARP, arp.build_arp(1, GUEST_MAC, HOST4, b"\0" * 6, GW4)),
        (BCAST, eth.ETH_P_IP, ip.build_ipv4(A4("0.0.0.0"), A4("255.255.255.255"), 17,
                                            udp.build_udp4(A4("0.0.0.0"),
                                                           A4("255.255.255.255"), 68, 67,
                                                           _dhcp(1)))),
        (OUR_MAC, eth.ETH_P_IP, ip.build_ipv4(HOST4, GW4, 17, udp.build_udp4(
            HOST4, GW4, 40000, 53, b"\x12\x34\x01\x00\x00\x01" + b"\0" * 6))),
        (OUR_MAC, eth.ETH_P_IP, ip.build_ipv4(HOST4, GW4, 1,
                                              icmp.build_icmp_echo(8, 7, 1, b"ping"))),
        (OUR_MAC, eth.ETH_P_IP, ip.build_ipv4(HOST4, GW4, 6, tcp.build_tcp4(
            HOST4, GW4, 40000, 80, 1, 0, tcp.SYN, 1000, b"",
            tcp.build_tcp_options(mss=1460, wscale=7, sack_ok=True)))),
    ]
    rs = icmp.build_icmpv6(ll, all_routers, icmp.ND_ROUTER_SOLICIT, 0,
                           b"\0" * 4 + bytes([1, 1]) + GUEST_MAC)
    ns = icmp.build_icmpv6(ll, A6("ff02::1:ff00:2"), icmp.ND_NEIGHBOR_SOLICIT, 0,
                           b"\0" * 4 + GW6.packed + bytes([1, 1]) + GUEST_MAC)
    solicit = bytes([1, 0x12, 0x34, 0x56]) + struct.pack("!HH", 1, 10) + \
        struct.pack("!HH", 3, 4) + GUEST_MAC + struct.pack("!HHI", 3, 12, 1) + b"\0" * 8
    v6 = [
        (b"\x33\x33\0\0\0\x02", eth.ETH_P_IPV6, ip.build_ipv6(ll, all_routers, 58, rs)),
        (b"\x33\x33\xff\0\0\x02", eth.ETH_P_IPV6,
         ip.build_ipv6(ll, A6("ff02::1:ff00:2"), 58, ns)),
        (b"\x33\x33\0\x01\0\x02", eth.ETH_P_IPV6,
         ip.build_ipv6(ll, dhcp6, 17, udp.build_udp6(ll, dhcp6, 546, 547, solicit))),
        (OUR_MAC, eth.ETH_P_IPV6, ip.build_ipv6(HOST6, GW6, 58, icmp.build_icmpv6_echo(
            HOST6, GW6, icmp.ICMPV6_ECHO_REQUEST, 7, 1, b"ping"))),
        (OUR_MAC, eth.ETH_P_IPV6, ip.build_ipv6(HOST6, GW6, 17, udp.build_udp6(
            HOST6, GW6, 40000, 5353, b"query"))),
    ]
    return [eth.build_eth(dst, GUEST_MAC, et, body) for dst, et, body in v4 + v6]


FRAMES = _frames()

_edits = st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=8)
_frame = st.one_of(
    st.tuples(st.sampled_from(FRAMES), _edits, st.integers(0, 600)).map(
        lambda t: _mutate(*t)),
    st.binary(max_size=120),
)


def _mutate(frame: bytes, edits: list[tuple[int, int]], cut: int) -> bytes:
    buf = bytearray(frame)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    return bytes(buf[:cut])


class _Link:
    connected = True

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    @property
    def buffers_link(self) -> _Link:
        return self

    def send(self, frame: bytes) -> None:
        self.sent.append(bytes(frame))


def _no_errors(caplog: pytest.LogCaptureFixture) -> None:
    bad = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not bad, bad[0].getMessage() + "\n" + (bad[0].exc_text or "")


def test_frames_parse() -> None:
    """The seeds are what they claim: each valid frame is answered or taken, no error."""
    d = Dispatcher(_config())
    d.link = _Link()  # type: ignore[assignment]
    d.on_frames([memoryview(f) for f in FRAMES])
    assert d.dropped == 0


@settings(max_examples=400, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(_frame, min_size=1, max_size=4))
def test_services_dispatch_never_fails(batch: list[bytes], caplog: pytest.LogCaptureFixture
                                       ) -> None:
    """ARP, DHCP, DHCPv6 and NDP (no loop: no sockets) behind the dispatcher."""
    caplog.clear()
    d = Dispatcher(_config())
    d.link = _Link()  # type: ignore[assignment]
    with caplog.at_level(logging.WARNING):
        d.on_frames([memoryview(bytearray(f)) for f in batch])
    _no_errors(caplog)


@settings(max_examples=300, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(batch=st.lists(_frame, min_size=1, max_size=4))
def test_udp_icmp_dispatch_never_fails(batch: list[bytes], caplog: pytest.LogCaptureFixture
                                       ) -> None:
    """The same with the UDP and ICMP handlers on fake sockets (test_udp.Harness; TCP off:
    a guest SYN would open a real connection)."""
    caplog.clear()
    h = Harness(no_tcp=True)
    with caplog.at_level(logging.WARNING):
        h.d.on_frames([memoryview(bytearray(f)) for f in batch])
        for fd in list(h.loop.fds):
            if fd in h.loop.fds:
                h.loop.fds[fd][1](1)  # readable: whatever the fake socket has queued
    h.d.close()
    _no_errors(caplog)
