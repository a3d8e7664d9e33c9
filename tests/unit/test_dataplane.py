"""The TCP data plane's C (cffi_build/vhostpasst/dataplane.c) held equal to the Python path.

Two dispatchers over fake sockets and a fake link, one with the data plane (its consumer
offered every guest frame first, as the vhost-user link does) and one with
VHOSTPASST_DATAPLANE=python, get the same handshake and then the same hypothesis-drawn
sequence of batches: the guest's pure ACKs (new, old, duplicate, beyond what was sent, with
windows that open, close and stay), its data, host data arriving. After every batch both sent
the guest the same frames and hold the same connection state and socket queues. The clock
is fixed, so RTT samples and timer deadlines compare exactly. The C writes the guest's data
with a real sendmsg(), so each fake socket sends through a real socket pair (both paths:
the ioctls on its descriptor then answer alike) and what it sent is read at the other end.
"""

from __future__ import annotations

import select
import socket
import time

import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st
from vhostpasst._dataplane import ffi as dp_ffi
from vhostpasst._dataplane import lib as dp_lib

from tests.fakes import FakeLoop
from tests.unit.test_tcp import (
    FakeLink,
    FakeSock,
    _handshake,
    feed,
    guest_frame,
    make_env,
    parse,
)
from vhostpasst.core.loop import EPOLLIN
from vhostpasst.dispatch import Dispatcher
from vhostpasst.proto.tcp import conn as tcp_conn
from vhostpasst.proto.tcp.conn import _SHARED, SO_PEEK_OFF, TcpConn, unread
from vhostpasst.proto.tcp.dataplane import ENV_DATAPLANE

NOW = 5000.0
ISN = 0x7FFFFF00  # near the wrap: sequence arithmetic is tested across it
VNET_HDR = bytes(12)

Env = tuple[Dispatcher, FakeLoop, FakeLink]


class PairSock(FakeSock):
    """A FakeSock over a real socket pair: the C writes to its descriptor itself, and the
    ioctls on that descriptor must answer what the queues hold. `host_sends()` queues data
    from the far end; peeks (with SO_PEEK_OFF) and discards are the real socket's; `sent` is
    what reached the far end; TCP_INFO stays FakeSock's."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.near, self.far = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.near.setblocking(False)
        self.far.setblocking(False)
        self.fd = self.near.fileno()
        self._got = bytearray()

    def host_sends(self, data: bytes) -> None:
        self.far.sendall(data)

    @property  # type: ignore[override]
    def sent(self) -> bytearray:
        while True:
            try:
                chunk = self.far.recv(1 << 16)
            except BlockingIOError:
                return self._got
            if not chunk:
                return self._got
            self._got += chunk

    @sent.setter
    def sent(self, value: bytearray) -> None:
        self._got = bytearray(value)

    def setsockopt(self, level: int, opt: int, value: object) -> None:
        super().setsockopt(level, opt, value)
        if (level, opt) == (socket.SOL_SOCKET, SO_PEEK_OFF):
            self.near.setsockopt(level, opt, value)  # type: ignore[call-overload]

    def recvmsg_into(self, iov: list[memoryview], _anc: int = 0,
                     flags: int = 0) -> tuple[int, list, int, None]:
        n, anc, fl, _addr = self.near.recvmsg_into(iov, 0, flags)
        return n, anc, fl, None

    def discard(self, count: int) -> int:
        done = 0
        while done < count:
            try:
                chunk = self.near.recv(count - done)
            except BlockingIOError:
                break
            if not chunk:
                break
            done += len(chunk)
        return done

    def queues(self) -> tuple[int, int, bytes]:
        """Unread bytes (SIOCINQ), the peek offset, what was sent."""
        return (unread(self.fd) or 0,
                self.near.getsockopt(socket.SOL_SOCKET, SO_PEEK_OFF), bytes(self.sent))

    def sendmsg(self, bufs: list, _anc: object = (), _flags: int = 0) -> int:
        if self.full:
            raise BlockingIOError
        return self.near.sendmsg(bufs, [], socket.MSG_DONTWAIT)

    def close(self) -> None:
        super().close()
        self.near.close()
        self.far.close()


def _env(monkeypatch: pytest.MonkeyPatch, dataplane: str) -> Env:
    monkeypatch.setenv(ENV_DATAPLANE, dataplane)
    d, loop, link = make_env(monkeypatch)
    assert d.tcp is not None
    assert (d.tcp.dataplane is not None) == (dataplane == "c")
    d.tcp._isn = lambda conn: ISN  # type: ignore[method-assign]
    d.tcp.socket_factory = PairSock  # type: ignore[assignment]
    monkeypatch.setattr(tcp_conn, "discard", lambda sock, count: sock.discard(count))
    if d.tcp.dataplane is not None:
        d.tcp.dataplane.table.now = NOW
    return d, loop, link


def _offer(d: Dispatcher, frames: list[bytes]) -> int:
    """What the vhost-user link's tx_pass() does with a batch: the consumer first, the rest
    to the dispatcher, then the consumer's followups. Returns the frames the C took."""
    assert d.tcp is not None and d.tcp.dataplane is not None and d.tcp.tx_consumer is not None
    consumer = d.tcp.tx_consumer
    consumer.begin()
    rest = []
    hdr = dp_ffi.from_buffer(VNET_HDR)
    table = d.tcp.dataplane.table
    keep = []  # the frames stay valid until dp_tx_end() wrote their payloads
    for frame in frames:
        buf = dp_ffi.from_buffer(frame)
        keep.append(buf)
        if dp_lib.dp_take_tx(table, buf, len(frame), hdr, 0) != 1:
            rest.append(frame)
    dp_lib.dp_tx_end(table)
    if rest:
        feed(d, *rest)
    consumer.after()
    return len(frames) - len(rest)


def _state(conn: TcpConn) -> dict[str, object]:
    names = (*_SHARED, "srtt", "rtt_seq", "fin_seq", "stalled", "drained", "peek_full",
             "want_out", "tap_fin_acked", "sock_eof")
    state = {name: getattr(conn, name) for name in names}
    if not conn.rto_armed:
        # a stopped retransmission timer's loop timer may be parked at another time (Python
        # made one for an ACK of the pass a later ACK stopped, the C asked for none): no
        # deadline comes of it either way
        del state["rto_when"], state["rto_deadline"]
    return state


def _conn(d: Dispatcher) -> TcpConn:
    assert d.ctx is not None
    conns = [f for f in d.ctx.flows if isinstance(f, TcpConn)]
    assert len(conns) == 1
    return conns[0]


# one step of a batch: ("ack", offset from the last ACK the guest sent, window) or
# ("data", bytes from the guest) or ("host", bytes the far end sends)
_step = st.one_of(
    st.tuples(st.just("ack"), st.integers(-3, 6000), st.sampled_from([0, 1, 8, 300, 1000])),
    st.tuples(st.just("dup"), st.just(0), st.sampled_from([0, 8, 1000])),
    st.tuples(st.just("data"), st.integers(1, 300), st.just(0)),
    st.tuples(st.just("host"), st.integers(1, 9000), st.just(0)),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(_step, min_size=1, max_size=6), min_size=1, max_size=8))
@example(batches=[[("host", 1, 0), ("ack", 1, 0), ("host", 1, 0), ("ack", 1, 1)]])
def test_the_c_takes_acks_and_data_exactly_as_python_does(
        monkeypatch: pytest.MonkeyPatch, batches: list[list[tuple[str, int, int]]]) -> None:
    monkeypatch.setattr(time, "monotonic", lambda: NOW)
    envs = {"c": _env(monkeypatch, "c"), "python": _env(monkeypatch, "python")}
    socks: dict[str, PairSock] = {}
    for name, (d, loop, link) in envs.items():
        sock, _synack = _handshake(d, loop, link)
        assert isinstance(sock, PairSock)
        socks[name] = sock
    acked = {name: ISN + 1 for name in envs}  # the last ACK number each guest sent
    guest_seq = {name: 1001 for name in envs}
    for batch in batches:
        for name, (d, loop, _link) in envs.items():
            sock = socks[name]
            frames = []
            for kind, n, window in batch:
                if kind == "host":
                    sock.host_sends(bytes(range(256)) * (n // 256) + bytes(n % 256))
                    loop.fds[sock.fd][1](EPOLLIN)
                elif kind == "data":
                    frames.append(guest_frame("PA", guest_seq[name], ack=acked[name],
                                              payload=b"d" * n, window=1000))
                    guest_seq[name] += n
                else:
                    ack = (acked[name] + n) & 0xFFFFFFFF
                    frames.append(guest_frame("A", guest_seq[name], ack=ack, window=window))
                    if n > 0:
                        acked[name] = ack
            if name == "c":
                taken = _offer(d, frames)
                event(f"frames the C took in a batch: {min(taken, 3)}")
                # a batch split between the C's write and Python's rest of it (dataplane.c's
                # `split`): Python then acts after the write, not before it (doc/design.md)
                assert d.tcp is not None and d.tcp.dataplane is not None
                assume(d.tcp.dataplane.table.split == 0)
            elif frames:
                feed(d, *frames)
        (dc, _lc, link_c), (dp, _lp, link_p) = envs["c"], envs["python"]
        assert link_c.frames == link_p.frames
        if any(f.closed for f in (socks["c"], socks["python"])):
            assert socks["c"].closed == socks["python"].closed
            return
        assert _state(_conn(dc)) == _state(_conn(dp))
        assert socks["c"].queues() == socks["python"].queues()


def test_the_c_takes_acks_and_in_sequence_data_and_leaves_the_rest_to_python(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "monotonic", lambda: NOW)
    d, loop, link = _env(monkeypatch, "c")
    sock, synack = _handshake(d, loop, link)
    assert isinstance(sock, PairSock)
    conn = _conn(d)
    assert conn.r.in_table
    sock.host_sends(bytes(3000))
    loop.fds[sock.fd][1](EPOLLIN)
    seq = conn.seq_to_tap
    assert _offer(d, [guest_frame("A", 1001, ack=ISN + 1 + 1000, window=1000)]) == 1
    assert conn.seq_ack_from_tap == (ISN + 1 + 1000) & 0xFFFFFFFF
    assert sock.queues()[0] == 2000  # discarded after the pass, as Python does
    assert conn.seq_to_tap == seq  # nothing more to read: the window was already filled
    # in-sequence data is the C's: written at the end of the pass, our ACK left to Python
    n = len(link.frames)
    assert _offer(d, [guest_frame("PA", 1001, ack=ISN + 1 + 1000, payload=b"x")]) == 1
    assert bytes(sock.sent) == b"x" and conn.seq_from_tap == 1002
    assert len(link.frames) == n + 1 and parse(link.frames[-1]).ack == 1002
    # old data, an unknown port, an option-carrying ACK, a FIN: Python's
    assert _offer(d, [guest_frame("PA", 1001, ack=ISN + 1 + 1000, payload=b"x")]) == 0
    assert _offer(d, [guest_frame("A", 1002, ack=ISN + 1 + 1000, sport=40001)]) == 0
    assert _offer(d, [guest_frame("A", 1002, ack=ISN + 1 + 2000,
                                  options=[("NOP", None)] * 4)]) == 0
    assert _offer(d, [guest_frame("FA", 1002, ack=ISN + 1 + 2000)]) == 0
    # after a declined frame, the same connection's next ACK in the pass is Python's too
    assert _offer(d, [guest_frame("PA", 1003, ack=ISN + 1 + 2000, payload=b"y"),
                      guest_frame("A", 1003, ack=ISN + 1 + 3000)]) == 0
    conn.close()
    assert not conn.r.in_table


def test_connections_leave_the_table_when_they_close(monkeypatch: pytest.MonkeyPatch) -> None:
    d, loop, link = _env(monkeypatch, "c")
    assert d.tcp is not None and d.tcp.dataplane is not None
    for port in range(40000, 40040):
        _handshake(d, loop, link, sport=port)
    table = d.tcp.dataplane.table
    assert table.count == 40
    assert d.ctx is not None
    for conn in [f for f in d.ctx.flows if isinstance(f, TcpConn)][::2]:
        conn.close()
    assert table.count == 20
    # every one left is still found (the table's deletions moved entries, not lost them)
    for conn in [f for f in d.ctx.flows if isinstance(f, TcpConn) and not f.sock.closed]:
        frame = guest_frame("A", conn.seq_from_tap, ack=conn.seq_ack_from_tap,
                            sport=conn.gport, window=1000)
        assert _offer(d, [frame]) == 1


def test_data_the_socket_takes_only_part_of_goes_as_in_python(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of guest data larger than the socket takes: both paths acknowledge only what
    went, wait for EPOLLOUT, and then send the same window update."""
    monkeypatch.setattr(time, "monotonic", lambda: NOW)
    results = []
    for name in ("c", "python"):
        d, loop, link = _env(monkeypatch, name)
        sock, _synack = _handshake(d, loop, link)
        assert isinstance(sock, PairSock)
        sock.near.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        conn = _conn(d)
        frames = [guest_frame("PA", 1001 + 1000 * i, ack=ISN + 1, payload=b"z" * 1000,
                              window=1000) for i in range(200)]
        if name == "c":
            assert _offer(d, frames) == 200
        else:
            feed(d, *frames)
        went = (conn.seq_from_tap - 1001) & 0xFFFFFFFF
        assert 0 < went < 200_000 and conn.want_out
        assert parse(link.frames[-1]).ack == conn.seq_from_tap
        before = len(link.frames)
        assert len(sock.sent) == went  # the far end reads: room again
        loop.fds[sock.fd][1](select.EPOLLOUT)
        assert not conn.want_out and len(link.frames) == before + 1  # the window update
        results.append((went, link.frames, _state(conn)))
    assert results[0] == results[1]
