"""TCP translation in-process: fake sockets, fake loop, fake link (no network at all).

The fake socket's fileno() is a number far above any real descriptor, so the one call the
module makes on a bare descriptor (the SIOCINQ ioctl) fails with EBADF instead of touching a
real descriptor of the test process.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP  # type: ignore[import-untyped]
from scapy.layers.l2 import Ether  # type: ignore[import-untyped]
from vhostpasst._tcpseg import ffi as seg_ffi
from vhostpasst._tcpseg import lib as seg_lib

from tests.fakes import FakeLoop
from vhostpasst.config.conf import Config, Ip4Conf
from vhostpasst.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP
from vhostpasst.dispatch import Dispatcher
from vhostpasst.link.base import Link
from vhostpasst.proto import tcp
from vhostpasst.proto.tcp import seq_le, seq_lt

GUEST = IPv4Address("192.0.2.2")
REMOTE = IPv4Address("198.51.100.7")
GUEST_MAC = bytes.fromhex("020000000002")
OUR_MAC = bytes.fromhex("9a559a559a55")


class FakeLink(Link):
    """A link whose frames are kept in `frames` (rx_scatter() and commit_scatter(): Link's,
    one buffer per frame)."""

    connected = True  # type: ignore[assignment]

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self._bufs: list[bytearray] = []
        self.limit: int | None = None  # buffers available (None: as many as asked)
        self.rx_ready: list[Callable[[], None]] = []

    def add_rx_ready_callback(self, cb: Callable[[], None]) -> None:
        self.rx_ready.append(cb)

    def remove_rx_ready_callback(self, cb: Callable[[], None]) -> None:
        self.rx_ready.remove(cb)

    def rx_buffers(self, count: int) -> list[memoryview]:
        if self.limit is not None:
            count = min(count, self.limit)
        self._bufs = [bytearray(65549) for _ in range(count)]
        return [memoryview(b) for b in self._bufs]

    def commit(self, lengths: list[int]) -> None:
        for buf, n in zip(self._bufs, lengths, strict=False):
            self.frames.append(bytes(buf[:n]))

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        self.frames.append(bytes(frame))
        return True

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


_next_fd = [10_000_000]


class FakeSock:
    """Enough of a non-blocking TCP socket for proto/tcp/; `rx` is what the far end sent."""

    instances: list[FakeSock] = []

    def __init__(self, *_args: object) -> None:
        _next_fd[0] += 1
        self.fd = _next_fd[0]
        self.rx = bytearray()
        self.peek_off = 0
        self.eof = False
        self.sent = bytearray()
        self.full = False
        self.connect_rc = errno.EINPROGRESS
        self.so_error = 0
        self.closed = False
        self.shut = False
        self.opts: dict[tuple[int, int], object] = {}
        self.no_tcp_info = False  # a kernel without TCP_INFO (or a shorter one)
        FakeSock.instances.append(self)

    def fileno(self) -> int:
        return self.fd

    def setsockopt(self, level: int, opt: int, value: object) -> None:
        self.opts[(level, opt)] = value
        if (level, opt) == (socket.SOL_SOCKET, tcp.SO_PEEK_OFF):
            self.peek_off = int(value)  # type: ignore[call-overload]

    def getsockopt(self, level: int, opt: int, size: int = 0) -> int | bytes:
        if opt == socket.TCP_INFO and level == socket.IPPROTO_TCP:
            if self.no_tcp_info:
                raise OSError(errno.ENOPROTOOPT, "no TCP_INFO")
            info = bytearray(tcp.TCP_INFO_LEN)
            struct.pack_into("=Q", info, 120, 1 + len(self.sent))
            struct.pack_into("=I", info, 228, 1 << 20)
            return bytes(info)
        if opt == socket.SO_ERROR:
            return self.so_error
        if opt == socket.SO_SNDBUF:
            return 1 << 20
        return 0

    def bind(self, addr: object) -> None:
        pass

    def connect_ex(self, addr: object) -> int:
        return self.connect_rc

    def recvmsg_into(self, iov: list[memoryview], _anc: int = 0,
                     flags: int = 0) -> tuple[int, list, int, None]:
        data = self.rx[self.peek_off:]
        if not data:
            if self.eof:
                return 0, [], 0, None
            raise BlockingIOError
        n = 0
        for v in iov:
            piece = data[n:n + len(v)]
            v[:len(piece)] = piece
            n += len(piece)
            if n >= len(data):
                break
        self.peek_off += n
        return n, [], 0, None

    def sendmsg(self, bufs: list, _anc: object = (), _flags: int = 0) -> int:
        if self.full:
            raise BlockingIOError
        n = 0
        for b in bufs:
            self.sent += bytes(b)
            n += len(b)
        return n

    def shutdown(self, how: int) -> None:
        self.shut = True

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> tuple[Dispatcher, FakeLoop, FakeLink]:
    return make_env(monkeypatch)


def make_env(monkeypatch: pytest.MonkeyPatch) -> tuple[Dispatcher, FakeLoop, FakeLink]:
    """A dispatcher with TCP over fake sockets, a fake loop and a fake link (the `env`
    fixture of this module and test_tcp_tso.py)."""
    FakeSock.instances = []
    config = Config(ip4=Ip4Conf(addr=GUEST, gateway=IPv4Address("192.0.2.1"),
                                our_tap_addr=IPv4Address("192.0.2.1")), ip6=None)
    loop = FakeLoop()
    d = Dispatcher(config, loop)  # type: ignore[arg-type]
    assert d.tcp is not None
    d.tcp.socket_factory = FakeSock  # type: ignore[assignment]

    def fake_discard(s: FakeSock, count: int) -> int:
        del s.rx[:count]
        s.peek_off = max(0, s.peek_off - count)
        return count

    monkeypatch.setattr(tcp.conn, "discard", fake_discard)
    link = FakeLink()
    d.link = link  # type: ignore[assignment]
    return d, loop, link


def guest_frame(flags: str, seq: int, ack: int = 0, payload: bytes = b"", sport: int = 40000,
                dport: int = 80, window: int = 65535, options: list | None = None) -> bytes:
    pkt = Ether(src=GUEST_MAC, dst=OUR_MAC) / IP(src=str(GUEST), dst=str(REMOTE)) / TCP(
        sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=window,
        options=options or []) / payload
    return bytes(pkt)


def parse(frame: bytes) -> TCP:
    return Ether(frame)[TCP]


def feed(d: Dispatcher, *frames: bytes) -> None:
    d.on_frames([memoryview(f) for f in frames])


def test_seq_comparisons_wrap() -> None:
    assert seq_lt(0xFFFFFFF0, 5) and not seq_lt(5, 0xFFFFFFF0)
    assert seq_le(7, 7) and not seq_lt(7, 7)


def test_segment_for_unknown_connection_gets_rst(env: tuple) -> None:
    d, _loop, link = env
    feed(d, guest_frame("A", 1000, ack=5555))
    rst = parse(link.frames[-1])
    assert rst.flags == "R" and rst.seq == 5555 and (rst.sport, rst.dport) == (80, 40000)
    feed(d, guest_frame("P", 1000, payload=b"abc"))  # no ACK bit: RST|ACK acking it all
    rst = parse(link.frames[-1])
    assert rst.flags == "RA" and rst.seq == 0 and rst.ack == 1003
    n = len(link.frames)
    feed(d, guest_frame("R", 1000))  # never a RST for a RST
    assert len(link.frames) == n


def _handshake(d: Dispatcher, loop: FakeLoop, link: FakeLink, sport: int = 40000,
               options: list | None = None) -> tuple[FakeSock, TCP]:
    feed(d, guest_frame("S", 1000, sport=sport,
                        options=options if options is not None else
                        [("MSS", 1460), ("WScale", 7)]))
    sock = FakeSock.instances[-1]
    assert loop.fds[sock.fd][0] & EPOLLOUT  # waiting for connect()
    loop.fds[sock.fd][1](EPOLLOUT)
    synack = parse(link.frames[-1])
    assert synack.flags == "SA" and synack.ack == 1001
    feed(d, guest_frame("A", 1001, ack=synack.seq + 1, sport=sport, window=1000))
    return sock, synack


def test_connect_synack_options_and_data_both_ways(env: tuple) -> None:
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    opts = dict(synack.options)
    assert opts["MSS"] == 65520 - 40 and opts["WScale"] == tcp.WS_TO_TAP
    # guest -> host: one sendmsg, acknowledged
    feed(d, guest_frame("PA", 1001, ack=synack.seq + 1, payload=b"x" * 100, window=1000),
         guest_frame("PA", 1101, ack=synack.seq + 1, payload=b"y" * 50, window=1000))
    assert bytes(sock.sent) == b"x" * 100 + b"y" * 50
    assert parse(link.frames[-1]).ack == 1151
    # host -> guest: MSS-sized segments (the guest said 1460), within its window (1000<<7)
    sock.rx += bytes(range(256)) * 20
    loop.fds[sock.fd][1](EPOLLIN)
    segs = [parse(f) for f in link.frames if parse(f).payload and parse(f).sport == 80]
    assert [len(bytes(s.payload)) for s in segs] == [1460, 1460, 1460, 740]
    assert b"".join(bytes(s.payload) for s in segs) == bytes(range(256)) * 20
    # the guest acknowledges two segments: they are discarded from the socket
    feed(d, guest_frame("A", 1151, ack=synack.seq + 1 + 2920, window=1000))
    assert len(sock.rx) == 5120 - 2920


def test_a_connection_whose_callback_raises_is_reset_by_the_loops_last_resort(
        env: tuple) -> None:
    """loop.py's last resort calls the fd's owner: for a TCP connection, a reset both ways
    (RST to the guest, SO_LINGER 0 on the socket) and the socket no longer watched."""
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    loop.on_error[sock.fd](RuntimeError("a bug in a callback"))
    rst = parse(link.frames[-1])
    assert rst.flags == "RA" and rst.seq == synack.seq + 1 and rst.ack == 1001
    assert sock.fd not in loop.fds and sock.closed


def test_out_of_order_data_is_dropped_with_duplicate_ack(env: tuple) -> None:
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    feed(d, guest_frame("PA", 1101, ack=synack.seq + 1, payload=b"late"))
    assert not sock.sent
    dup = parse(link.frames[-1])
    assert dup.flags == "A" and dup.ack == 1001
    # the hole filled later in the same batch: both go out in order
    feed(d, guest_frame("PA", 1005, ack=synack.seq + 1, payload=b"5678"),
         guest_frame("PA", 1001, ack=synack.seq + 1, payload=b"1234"))
    assert bytes(sock.sent) == b"12345678"


def test_full_socket_is_not_acknowledged(env: tuple) -> None:
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    sock.full = True
    feed(d, guest_frame("PA", 1001, ack=synack.seq + 1, payload=b"abc"))
    assert all(parse(f).ack != 1004 for f in link.frames)
    assert loop.fds[sock.fd][0] & EPOLLOUT  # a window update once there is room
    sock.full = False
    feed(d, guest_frame("PA", 1001, ack=synack.seq + 1, payload=b"abc"))
    assert parse(link.frames[-1]).ack == 1004


def test_guest_rst_resets_host_socket(env: tuple) -> None:
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    feed(d, guest_frame("R", 1001))
    assert sock.closed and sock.opts[(socket.SOL_SOCKET, socket.SO_LINGER)] == \
        struct.pack("ii", 1, 0)
    assert sock.fd not in loop.fds


def test_rst_out_of_sequence_gets_challenge_ack(env: tuple) -> None:
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    feed(d, guest_frame("R", 5000))
    assert not sock.closed and parse(link.frames[-1]).flags == "A"


def test_refused_connect_becomes_rst(env: tuple) -> None:
    d, loop, link = env
    feed(d, guest_frame("S", 1000))
    sock = FakeSock.instances[-1]
    sock.so_error = errno.ECONNREFUSED
    loop.fds[sock.fd][1](EPOLLOUT | EPOLLERR)
    rst = parse(link.frames[-1])
    assert rst.flags == "RA" and rst.ack == 1001 and sock.closed


def test_half_open_connections_are_capped(env: tuple) -> None:
    d, loop, link = env
    d.tcp.half_open_max = 5
    for port in range(5):
        feed(d, guest_frame("S", 1000, sport=30000 + port))
    assert len(FakeSock.instances) == 5
    feed(d, guest_frame("S", 1000, sport=31000))
    assert len(FakeSock.instances) == 5  # dropped: the guest will retry
    loop.fds[FakeSock.instances[0].fd][1](EPOLLOUT)  # one completes: room again
    feed(d, guest_frame("A", 1001, ack=parse(link.frames[-1]).seq + 1, sport=30000))
    feed(d, guest_frame("S", 1000, sport=31000))
    assert len(FakeSock.instances) == 6


def test_retransmission_timeout_backs_off_and_gives_up(env: tuple) -> None:
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    sock.rx += b"z" * 100
    loop.fds[sock.fd][1](EPOLLIN)
    conn = d.ctx.flows.lookup(("tcp", False, int(GUEST), 40000, int(REMOTE), 80))
    rtos = []

    def fire_rto() -> None:
        # FakeLoop fires every timer at once, whatever its time: a loop timer due before
        # the RTO deadline (the handshake's, taken up again) re-arms itself, then fires
        n = len(link.frames)
        for _ in range(3):
            loop.fire_timers()
            if len(link.frames) > n:
                return

    for _ in range(d.tcp.max_retrans):
        rtos.append(conn.rto)
        fire_rto()
        assert parse(link.frames[-1]).payload  # the data again, from the ACK point
    assert rtos == sorted(rtos) and rtos[-1] > rtos[0]
    fire_rto()
    assert sock.closed and parse(link.frames[-1]).flags == "RA"


def test_rtt_estimate(env: tuple) -> None:
    d, loop, link = env
    sock, _ = _handshake(d, loop, link)
    conn = d.ctx.flows.lookup(("tcp", False, int(GUEST), 40000, int(REMOTE), 80))
    d.tcp._rtt_sample(conn, 0.05)
    assert conn.srtt == 0.05 and conn.rto == pytest.approx(max(tcp.RTO_MIN, 0.05 + 0.1))
    for _ in range(50):
        d.tcp._rtt_sample(conn, 0.001)
    assert conn.rto == tcp.RTO_MIN


def test_fin_both_ways_closes(env: tuple) -> None:
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    feed(d, guest_frame("FA", 1001, ack=synack.seq + 1))
    assert sock.shut and parse(link.frames[-1]).ack == 1002
    sock.eof = True
    loop.fds[sock.fd][1](EPOLLIN | EPOLLRDHUP)
    fin = parse(link.frames[-1])
    assert "F" in str(fin.flags)
    feed(d, guest_frame("A", 1002, ack=fin.seq + 1))
    assert sock.closed


def test_keepalive_is_answered(env: tuple) -> None:
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    n = len(link.frames)
    feed(d, guest_frame("A", 1000, ack=synack.seq + 1))  # seq one below: a keep-alive probe
    assert len(link.frames) == n + 1 and parse(link.frames[-1]).ack == 1001
    assert not sock.closed


def test_idle_connection_gets_keepalives_and_is_reset_after_two_hours(env: tuple) -> None:
    """As passt 2026: a connection without traffic for 30 s gets a keepalive probe (an
    ACK one below its ACK point, which a live guest answers); one with no activity at all for
    7200 s is reset."""
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    conn = d.ctx.flows.lookup(("tcp", False, int(GUEST), 40000, int(REMOTE), 80))
    assert d.tcp.idle_timeout == 7200.0 and d.tcp.keepalive_interval == 30.0
    loop.fire_timers()
    n = len(link.frames)
    conn.last_seen -= 31
    loop.fire_timers()
    assert len(link.frames) == n + 1
    probe = parse(link.frames[-1])
    assert probe.flags == "A" and probe.seq == synack.seq and probe.ack == 1001
    assert not sock.closed
    conn.last_seen -= 7200
    loop.fire_timers()
    assert sock.closed and parse(link.frames[-1]).flags == "RA"


def test_a_guest_keepalive_turns_so_keepalive_on(env: tuple) -> None:
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    assert not sock.opts.get((socket.SOL_SOCKET, socket.SO_KEEPALIVE))
    feed(d, guest_frame("A", 1000, ack=synack.seq + 1))  # a keep-alive probe
    assert sock.opts.get((socket.SOL_SOCKET, socket.SO_KEEPALIVE)) == 1


def test_inactivity_timeout_resets_when_set(env: tuple,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOSTPASST_TCP_IDLE_TIMEOUT", "100")
    d, loop, link = env
    assert Dispatcher(d.config, loop).tcp.idle_timeout == 100.0  # type: ignore[union-attr]
    d.tcp.idle_timeout = 100.0
    sock, synack = _handshake(d, loop, link)
    conn = d.ctx.flows.lookup(("tcp", False, int(GUEST), 40000, int(REMOTE), 80))
    loop.fire_timers()
    assert not sock.closed  # not idle yet: the timer is simply set again
    conn.last_seen -= d.tcp.idle_timeout + 1
    loop.fire_timers()
    assert sock.closed and parse(link.frames[-1]).flags == "RA"


# --- fuzzing -----------------------------------------------------------------------------

FLAGS = ["S", "SA", "A", "PA", "FA", "R", "RA", "F", "", "SF", "FPAU"]

step = st.one_of(
    st.tuples(st.just("frame"), st.integers(0, 2), st.sampled_from(FLAGS),
              st.integers(-3, 3), st.integers(-3, 3), st.integers(0, 65535),
              st.integers(0, 3000), st.booleans()),
    st.tuples(st.just("sock"), st.integers(0, 5), st.sampled_from(
        [EPOLLIN, EPOLLOUT, EPOLLERR, EPOLLHUP | EPOLLIN, EPOLLRDHUP]),
        st.integers(0, 5000), st.booleans(), st.booleans()),
    st.tuples(st.just("timers")),
)


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(steps=st.lists(step, max_size=40))
def test_random_segments_never_raise(env: tuple, caplog: pytest.LogCaptureFixture,
                                     steps: list) -> None:
    d, loop, link = env
    FakeSock.instances = []
    caplog.set_level(logging.ERROR)
    caplog.clear()
    seen: dict[int, tuple[int, int]] = {}  # guest port -> (next seq, our seq) learned
    for s in steps:
        if s[0] == "frame":
            _, port, flags, dseq, dack, window, plen, random_seq = s
            sport = 40000 + port
            for f in link.frames[-5:]:
                seg = parse(f)
                if seg.dport == sport:
                    seen[sport] = (seg.ack, seg.seq + len(bytes(seg.payload)) + ("S" in
                                                                                   str(seg.flags)))
            nxt, ours = seen.get(sport, (1000, 0))
            seq = (nxt + dseq * 500) & 0xFFFFFFFF if not random_seq else (dseq * 0x3FFFFFFF) \
                & 0xFFFFFFFF
            ack = (ours + dack * 700) & 0xFFFFFFFF
            feed(d, guest_frame(flags, seq, ack, b"q" * plen, sport=sport, window=window,
                                options=[("MSS", 536 + plen), ("WScale", port * 5)]))
        elif s[0] == "sock":
            _, idx, mask, data, eof, full = s
            if not FakeSock.instances:
                continue
            sock = FakeSock.instances[idx % len(FakeSock.instances)]
            sock.rx += b"d" * data
            sock.eof, sock.full = eof, full
            entry = loop.fds.get(sock.fd)
            if entry is not None:
                entry[1](mask)
        else:
            loop.fire_timers()
        del link.frames[:-10]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors[0].getMessage() + str(errors[0].exc_info)


def test_no_link_buffers_then_rx_ready_resumes_without_a_timer(env: tuple) -> None:
    """The link had no buffers: sending stops, and the link's rx-ready call (not the
    retransmission timer) resumes it."""
    d, loop, link = env
    assert link.rx_ready == [d.tcp.rx_ready]  # the dispatcher registered TCP
    sock, synack = _handshake(d, loop, link)
    link.limit = 0
    sock.rx += b"z" * 3000
    loop.fds[sock.fd][1](EPOLLIN)
    n = len(link.frames)
    link.limit = None
    for cb in link.rx_ready:
        cb()
    data = [parse(f) for f in link.frames[n:]]
    assert b"".join(bytes(s.payload) for s in data) == b"z" * 3000
    for cb in link.rx_ready:
        cb()  # nothing waits any more: nothing is sent
    assert len(link.frames) == n + len(data)
    d.link = None
    assert link.rx_ready == []


def test_ack_and_window_without_tcp_info(env: tuple) -> None:
    """No TCP_INFO: what was written is acknowledged at once and the window comes from the
    send buffer alone (3/4 of SO_SNDBUF below 4 MiB), scaled by our window scale."""
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    sock.no_tcp_info = True
    conn = next(iter(d.ctx.flows))
    ack, wnd = conn.ack_wnd()
    assert ack == conn.seq_from_tap == 1001
    assert wnd == ((1 << 20) * 3 // 4) >> tcp.WS_TO_TAP
    feed(d, guest_frame("PA", 1001, ack=synack.seq + 1, payload=b"q" * 300, window=1000))
    last = parse(link.frames[-1])
    assert bytes(sock.sent) == b"q" * 300 and last.ack == 1301
    assert last.window == ((1 << 20) * 3 // 4) >> tcp.WS_TO_TAP


def _writer_conn(six: bool) -> tuple[Dispatcher, tcp.TcpConn]:
    """An established connection (guest 40000 <-> remote 443) for the frame writer tests."""
    from ipaddress import IPv6Address
    config = Config(ip4=Ip4Conf(addr=GUEST, gateway=IPv4Address("192.0.2.1"),
                                our_tap_addr=IPv4Address("192.0.2.1")), ip6=None)
    d = Dispatcher(config, FakeLoop())  # type: ignore[arg-type]
    assert d.tcp is not None
    faddr = IPv6Address("2001:db8::7") if six else REMOTE
    gaddr = IPv6Address("2001:db8::2") if six else GUEST
    conn = tcp.TcpConn(d.tcp, FakeSock(), six, gaddr, 40000, faddr, 443,  # type: ignore
                       tcp.ESTABLISHED)
    return d, conn


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_batch_frame_writer_matches_the_python_writers(six: bool) -> None:
    """_tcpseg (one C call per batch) writes byte for byte what wire/tcp.py's per-segment
    writers write: odd sizes, seq wrap-around, PSH on the last frame only."""
    import random

    from vhostpasst.wire import tcp as wtcp
    rng = random.Random(4)
    d, conn = _writer_conn(six)
    off = wtcp.TCP6_PAYLOAD_OFFSET if six else wtcp.TCP4_PAYLOAD_OFFSET
    write = wtcp.write_eth_ipv6_tcp_headers if six else wtcp.write_eth_ipv4_tcp_headers
    ffi, lib = seg_ffi, seg_lib
    for _ in range(30):
        sizes = [rng.choice([0, 1, 2, 3, 1459, 1460, 1461, 8191, 65000]) for _ in
                 range(rng.randint(1, 5))]
        seq, ack, wnd = rng.choice([0xFFFFFF00, rng.getrandbits(32)]), rng.getrandbits(32), \
            rng.getrandbits(16)
        ours = [bytearray(off + s) for s in sizes]
        ref = [bytearray(off + s) for s in sizes]
        for a, b in zip(ours, ref, strict=True):
            a[off:] = b[off:] = rng.randbytes(len(a) - off)
        tmpl = conn.template(GUEST_MAC, d.config.our_mac)
        out = ffi.new("uint32_t[]", len(sizes))
        end = lib.vp_tcp_frames([ffi.from_buffer(b) for b in ours], sizes, len(sizes), tmpl,
                                six, conn.pseudo, seq, ack, wnd, wtcp.ACK,
                                wtcp.ACK | wtcp.PSH, out)
        s = seq
        for i, (buf, size) in enumerate(zip(ref, sizes, strict=True)):
            flags = wtcp.ACK | (wtcp.PSH if i == len(sizes) - 1 else 0)
            n = write(memoryview(buf), GUEST_MAC, d.config.our_mac, conn.faddr_b, conn.gaddr_b,
                      443, 40000, s, ack, flags, wnd, size)
            assert out[i] == n
            s = (s + size) & 0xFFFFFFFF
            assert ours[i] == buf, (i, size)
        assert end == s


# --- the dispatcher's TCP fast path against the full parsers -------------------------------

def _fast_path_record(frame: bytes, fast: bool) -> tuple:
    """What the dispatcher hands TCP, and what it learns, for one frame."""
    from vhostpasst.config.conf import Ip6Conf
    config = Config(ip4=Ip4Conf(addr=GUEST, gateway=IPv4Address("192.0.2.1"),
                                our_tap_addr=IPv4Address("192.0.2.1")), ip6=Ip6Conf())
    d = Dispatcher(config, FakeLoop())  # type: ignore[arg-type]
    assert d.tcp is not None
    got: list = []
    d.tcp.segment = lambda six, src, dst, seg: got.append(  # type: ignore[method-assign]
        (six, src, dst, *(bytes(x) if isinstance(x, memoryview) else x for x in seg)))
    if not fast:
        d._tcp_fast = lambda frame: False  # type: ignore[method-assign]
    d.on_frames([memoryview(frame)])
    g = d.guest
    return (got, g.mac, g.addr4_seen, g.addr6_seen, g.addr6_ll_seen, d.dropped)


def _tcp_frames() -> st.SearchStrategy[bytes]:
    from scapy.layers.inet6 import IPv6  # type: ignore[import-untyped]
    base = [guest_frame("PA", 1000, 2000, b"x" * 30, options=[("NOP", None)] * 4),
            guest_frame("A", 5, 6),
            guest_frame("S", 5, options=[("MSS", 1460)]),
            bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IPv6(src="fe80::2", dst="2001:db8::9")
                  / TCP(sport=1, dport=2, flags="PA", seq=7, ack=8) / (b"y" * 9)),
            bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / IPv6(src="2001:db8::2", dst="::1")
                  / TCP(sport=1, dport=2, flags="A"))]
    edits = st.lists(st.tuples(st.integers(0, 120), st.integers(0, 255)), max_size=4)
    return st.tuples(st.sampled_from(base), edits, st.integers(0, 130)).map(
        lambda t: bytes(_edit(t[0], t[1]))[:t[2]] if t[2] < len(t[0]) else _edit(t[0], t[1]))


def _edit(frame: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(frame)
    for i, v in edits:
        if i < len(out):
            out[i] = v
    return bytes(out)


@settings(max_examples=500, deadline=None)
@given(frame=_tcp_frames())
def test_dispatcher_tcp_fast_path_matches_the_parsers(frame: bytes) -> None:
    assert _fast_path_record(frame, True) == _fast_path_record(frame, False)
