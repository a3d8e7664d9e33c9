"""The qemu stream-socket link, against real UNIX socket clients speaking the length framing.

Socket paths live in a temporary directory: the probing tests use their own pattern, so a
real passt's /tmp/passt_N.socket is never touched.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostpasst.core.loop import Loop
from vhostpasst.core.pcap import PcapWriter
from vhostpasst.link.base import ETH_MAX_FRAME
from vhostpasst.link.stream import (
    StreamLink,
    StreamListener,
    StreamSetupError,
    stream_link_from_fd,
)


def frame(i: int, size: int = 60) -> bytes:
    """An Ethernet frame of `size` bytes whose payload is the byte i % 256 repeated."""
    return bytes.fromhex("02000000000a" "9a559a559a55" "88b5") + bytes([i % 256]) * (size - 14)


def framed(f: bytes) -> bytes:
    return struct.pack(">I", len(f)) + f


def parse_stream(data: bytes) -> tuple[list[bytes], bytes]:
    """Reference parser: complete frames, and the unparsed rest."""
    frames, off = [], 0
    while len(data) - off >= 4:
        (n,) = struct.unpack_from(">I", data, off)
        if off + 4 + n > len(data):
            break
        frames.append(data[off + 4 : off + 4 + n])
        off += 4 + n
    return frames, data[off:]


class Harness:
    """A loop plus a frame sink; `run_until` drives the loop with bounded time."""

    def __init__(self) -> None:
        self.loop = Loop()
        self.frames: list[bytes] = []
        self.batches: list[int] = []
        self.exits = 0
        self.handler: Callable[[Sequence[memoryview]], None] | None = None

    def on_frames(self, frames: Sequence[memoryview]) -> None:
        self.batches.append(len(frames))
        self.frames.extend(bytes(f) for f in frames)
        if self.handler is not None:
            self.handler(frames)

    def on_exit(self) -> None:
        self.exits += 1

    def run_until(self, cond: Callable[[], object], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, "condition not met in time"
            self.loop.run_once(0.02)

    def spin(self, n: int = 5, wait: float = 0.01) -> None:
        for _ in range(n):
            self.loop.run_once(wait)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    harness.loop.close()


@pytest.fixture
def listener(h: Harness, tmp_path: Path) -> Iterator[StreamListener]:
    lst = StreamListener(h.loop, str(tmp_path / "vp.socket"), h.on_frames, on_exit=h.on_exit)
    yield lst
    lst.close()


def connect(path: str) -> socket.socket:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(3.0)
    c.connect(path)
    return c


def attached(h: Harness, listener: StreamListener, path: str | None = None) -> socket.socket:
    c = connect(path or listener.path)
    h.run_until(lambda: listener.link.connected)
    return c


def recv_exact(c: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = c.recv(n - len(out))
        assert chunk, "unexpected EOF"
        out += chunk
    return out


def recv_frames(c: socket.socket, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        (n,) = struct.unpack(">I", recv_exact(c, 4))
        out.append(recv_exact(c, n))
    return out


def sees_eof(c: socket.socket, timeout: float = 3.0) -> bool:
    c.settimeout(timeout)
    try:
        while True:
            data = c.recv(65536)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


# --- RX ----------------------------------------------------------------------------------
def test_frames_split_across_reads(h: Harness, listener: StreamListener) -> None:
    c = attached(h, listener)
    frames = [frame(i, 60 + 7 * i) for i in range(6)]
    data = b"".join(framed(f) for f in frames)
    # Byte by byte for the first frame (splits inside the prefix too), then odd chunks.
    pos = 0
    for pos in range(1, 70):
        c.sendall(data[pos - 1 : pos])
        h.loop.run_once(0.01)
    while pos < len(data):
        c.sendall(data[pos : pos + 37])
        pos += 37
        h.loop.run_once(0.01)
    h.run_until(lambda: len(h.frames) == len(frames))
    assert h.frames == frames
    c.close()


def test_frames_coalesced_in_one_read(h: Harness, listener: StreamListener) -> None:
    c = attached(h, listener)
    frames = [frame(i, 60 + i) for i in range(200)]
    c.sendall(b"".join(framed(f) for f in frames))
    h.run_until(lambda: len(h.frames) == len(frames))
    assert h.frames == frames
    assert max(h.batches) > 1  # several frames handed over in one call
    c.close()


def test_max_size_frames(h: Harness, listener: StreamListener) -> None:
    c = attached(h, listener)
    frames = [frame(1, ETH_MAX_FRAME), frame(2, 14), frame(3, 65535)]
    sender = threading.Thread(target=c.sendall, args=(b"".join(framed(f) for f in frames),))
    sender.start()
    h.run_until(lambda: len(h.frames) == 3)
    sender.join(5)
    assert h.frames == frames
    assert listener.link.connected
    c.close()


# --- TX ----------------------------------------------------------------------------------
def test_rx_buffers_commit_flush(h: Harness, listener: StreamListener) -> None:
    c = attached(h, listener)
    link = listener.link
    frames = [frame(i, 100 + i) for i in range(5)]
    bufs = link.rx_buffers(8)
    assert len(bufs) == 8
    assert all(len(b) >= ETH_MAX_FRAME for b in bufs)
    for buf, f in zip(bufs, frames, strict=False):
        buf[: len(f)] = f
    link.commit([len(f) for f in frames])
    assert link.send(frame(99, 64))
    h.loop.run_once(0.0)  # the flush hook writes everything out
    assert recv_frames(c, 6) == [*frames, frame(99, 64)]
    assert link.tx_frames == 6
    c.close()


def test_commit_more_than_handed_out_is_an_error(h: Harness, listener: StreamListener) -> None:
    c = attached(h, listener)
    link = listener.link
    link.rx_buffers(1)
    with pytest.raises(ValueError):
        link.commit([60, 60])
    link.rx_buffers(1)
    with pytest.raises(ValueError):
        link.commit([ETH_MAX_FRAME + 1])
    c.close()


def test_pool_full_flushes_early(h: Harness, tmp_path: Path) -> None:
    lst = StreamListener(h.loop, str(tmp_path / "s"), h.on_frames, on_exit=h.on_exit)
    lst.link.close()  # replace the link with one that has a tiny pool
    lst.link = StreamLink(h.loop, h.on_frames, on_disconnect=lst._peer_gone, tx_slots=4)
    c = attached(h, lst)
    for i in range(10):  # 10 single sends through a 4-slot pool, with no loop iteration
        assert lst.link.send(frame(i))
    lst.link.flush()
    assert recv_frames(c, 10) == [frame(i) for i in range(10)]
    c.close()
    lst.close()


def test_echo_from_inside_the_handler(h: Harness, listener: StreamListener) -> None:
    c = attached(h, listener)

    def echo(frames: Sequence[memoryview]) -> None:
        for f in frames:
            assert listener.link.send(f)

    h.handler = echo
    frames = [frame(i, 80) for i in range(20)]
    c.sendall(b"".join(framed(f) for f in frames))
    h.run_until(lambda: len(h.frames) == 20)
    h.loop.run_once(0.0)
    assert recv_frames(c, 20) == frames
    c.close()


def test_pcap_on_disk_after_each_iteration(h: Harness, tmp_path: Path) -> None:
    pcap = PcapWriter(str(tmp_path / "s.pcap"), flush_every=1000)  # no loop of its own
    lst = StreamListener(h.loop, str(tmp_path / "s"), h.on_frames, pcap=pcap)
    c = attached(h, lst)
    c.sendall(framed(frame(1, 64)))
    h.run_until(lambda: h.frames)
    lst.send(frame(2, 70))
    h.loop.run_once(0.0)
    assert recv_frames(c, 1) == [frame(2, 70)]
    assert (tmp_path / "s.pcap").stat().st_size == 24 + 16 + 64 + 16 + 70
    c.close()
    lst.close()
    pcap.close()


def test_listener_is_a_link_too(h: Harness, listener: StreamListener) -> None:
    assert not listener.connected
    assert not listener.send(frame(1))
    c = attached(h, listener)
    assert listener.connected
    bufs = listener.rx_buffers(2)
    bufs[0][:60] = frame(2)
    listener.commit([60])
    assert listener.send(frame(3))
    listener.flush()
    assert recv_frames(c, 2) == [frame(2), frame(3)]
    c.close()


def test_send_without_client(h: Harness, listener: StreamListener) -> None:
    assert not listener.link.connected
    assert not listener.link.send(frame(1))
    assert listener.link.rx_buffers(4) == []
    listener.link.flush()


def test_short_send_completes_partial_frame_and_drops_the_rest(
    h: Harness, listener: StreamListener, tmp_path: Path
) -> None:
    pcap = PcapWriter(str(tmp_path / "tx.pcap"))
    listener.link.pcap = pcap
    c = attached(h, listener)
    received = bytearray()

    def reader() -> None:
        time.sleep(0.2)  # let the first sendmsg come up short, then drain
        c.settimeout(5.0)
        while True:
            try:
                data = c.recv(1 << 20)
            except (TimeoutError, OSError):
                return
            if not data:
                return
            received.extend(data)

    t = threading.Thread(target=reader)
    t.start()
    link = listener.link
    committed = 0
    for rnd in range(3):
        bufs = link.rx_buffers(128)
        for j, buf in enumerate(bufs):
            buf[:60000] = frame(rnd * 128 + j, 60000)
        link.commit([60000] * len(bufs))
        committed += len(bufs)
        link.flush()
    assert link.connected
    assert link.tx_dropped > 0
    assert link.tx_frames + link.tx_dropped == committed
    listener.close()  # EOF for the reader
    t.join(10)
    frames, rest = parse_stream(bytes(received))
    assert rest == b""  # the stream is still in sync: no frame cut short
    assert len(frames) == link.tx_frames
    assert all(len(f) == 60000 and f[14:] == f[14:15] * (60000 - 14) for f in frames)
    pcap.close()
    assert (tmp_path / "tx.pcap").stat().st_size == 24 + len(frames) * (16 + 60000)
    c.close()


# --- clients coming and going ------------------------------------------------------------
def test_second_client_refused(
    h: Harness, listener: StreamListener, caplog: pytest.LogCaptureFixture
) -> None:
    c1 = attached(h, listener)
    with caplog.at_level(logging.INFO, logger="vhostpasst.link.stream"):
        c2 = connect(listener.path)
        h.spin()
    assert sees_eof(c2)
    assert any(f"pid {os.getpid()}" in r.getMessage() for r in caplog.records)
    c1.sendall(framed(frame(5)))
    h.run_until(lambda: h.frames == [frame(5)])
    c1.close()
    c2.close()


def test_reconnect_after_client_leaves(h: Harness, listener: StreamListener) -> None:
    c1 = attached(h, listener)
    c1.sendall(framed(frame(1)))
    h.run_until(lambda: len(h.frames) == 1)
    c1.close()
    h.run_until(lambda: not listener.link.connected)
    assert h.exits == 0
    c2 = attached(h, listener)
    c2.sendall(framed(frame(2)))
    h.run_until(lambda: len(h.frames) == 2)
    listener.link.send(frame(3))
    h.loop.run_once(0.0)
    assert recv_frames(c2, 1) == [frame(3)]
    c2.close()


def test_partial_frame_discarded_on_reconnect(h: Harness, listener: StreamListener) -> None:
    c1 = attached(h, listener)
    c1.sendall(framed(frame(1))[:30])  # half a frame, then gone
    h.spin()
    c1.close()
    h.run_until(lambda: not listener.link.connected)
    c2 = attached(h, listener)
    c2.sendall(framed(frame(2)))
    h.run_until(lambda: len(h.frames) == 1)
    assert h.frames == [frame(2)]
    c2.close()


def test_one_off_exits(h: Harness, tmp_path: Path) -> None:
    lst = StreamListener(
        h.loop, str(tmp_path / "one"), h.on_frames, one_off=True, on_exit=h.on_exit
    )
    c = attached(h, lst)
    c.close()
    h.run_until(lambda: h.exits == 1)
    lst.close()


def test_one_off_default_stops_the_loop(h: Harness, tmp_path: Path) -> None:
    lst = StreamListener(h.loop, str(tmp_path / "one"), h.on_frames, one_off=True)
    c = connect(lst.path)
    h.loop.call_later(0.05, c.close)
    safety = h.loop.call_later(3.0, h.loop.stop)
    start = time.monotonic()
    h.loop.run()
    assert time.monotonic() - start < 2.5
    safety.cancel()
    lst.close()


@pytest.mark.parametrize("bad_len", [0, 5, 13, ETH_MAX_FRAME + 1, 0xFFFFFFFF])
def test_bad_length_resets_connection(h: Harness, listener: StreamListener, bad_len: int) -> None:
    c = attached(h, listener)
    c.sendall(framed(frame(1)) + struct.pack(">I", bad_len) + b"\0" * 20)
    h.run_until(lambda: not listener.link.connected)
    assert h.frames == [frame(1)]  # what came before the bad length is still delivered
    assert sees_eof(c)
    assert h.exits == 0
    c2 = attached(h, listener)  # and the next client is served
    c2.sendall(framed(frame(2)))
    h.run_until(lambda: len(h.frames) == 2)
    c.close()
    c2.close()


def test_handler_exception_drops_that_client_and_serves_the_next(
        h: Harness, listener: StreamListener) -> None:
    """An exception out of the frame handler (a bug) does not leave the loop: the loop's last
    resort logs it and drops that client (vhostpasst/core/loop.py); the next one is served."""
    c = attached(h, listener)

    def boom(frames: Sequence[memoryview]) -> None:
        raise RuntimeError("handler bug")

    h.handler = boom
    c.sendall(framed(frame(1)) + framed(frame(2))[:10])
    h.run_until(lambda: not listener.link.connected)
    assert sees_eof(c) and h.loop.callback_errors == 1
    c.close()
    h.handler = None
    c2 = attached(h, listener)
    c2.sendall(framed(frame(2)))
    h.run_until(lambda: frame(2) in h.frames)
    c2.close()


# --- socket paths ------------------------------------------------------------------------
def stale_socket(path: str) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.close()  # the file stays, nobody listens: connect() gets ECONNREFUSED


def test_probe_takes_first_free_path(h: Harness, tmp_path: Path) -> None:
    pattern = str(tmp_path / "passt_{}.socket")
    busy = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    busy.bind(pattern.format(1))
    busy.listen(1)
    Path(pattern.format(2)).write_text("not a socket")
    stale_socket(pattern.format(3))
    lst = StreamListener(h.loop, None, h.on_frames, probe_pattern=pattern, probe_count=5)
    assert lst.path == pattern.format(3)
    c = attached(h, lst)
    c.close()
    lst.close()
    assert not os.path.exists(pattern.format(3))  # our socket is removed on close
    assert Path(pattern.format(2)).read_text() == "not a socket"
    busy.close()


def test_probe_free_path_when_nothing_exists(h: Harness, tmp_path: Path) -> None:
    pattern = str(tmp_path / "p{}.sock")
    first = StreamListener(h.loop, None, h.on_frames, probe_pattern=pattern)
    second = StreamListener(h.loop, None, h.on_frames, probe_pattern=pattern)
    assert (first.path, second.path) == (pattern.format(1), pattern.format(2))
    first.close()
    second.close()


def test_probe_all_busy(h: Harness, tmp_path: Path) -> None:
    pattern = str(tmp_path / "b{}.sock")
    taken = [StreamListener(h.loop, None, h.on_frames, probe_pattern=pattern, probe_count=3)
             for _ in range(3)]
    with pytest.raises(StreamSetupError, match="no free socket path"):
        StreamListener(h.loop, None, h.on_frames, probe_pattern=pattern, probe_count=3)
    for lst in taken:
        lst.close()


def test_explicit_path_in_use_is_refused(h: Harness, listener: StreamListener) -> None:
    with pytest.raises(StreamSetupError, match="another process is listening"):
        StreamListener(h.loop, listener.path, h.on_frames)
    assert os.path.exists(listener.path)  # and the other one's socket is left alone


def test_explicit_stale_path_is_reused(h: Harness, tmp_path: Path) -> None:
    path = str(tmp_path / "stale.sock")
    stale_socket(path)
    lst = StreamListener(h.loop, path, h.on_frames)
    c = attached(h, lst)
    c.close()
    lst.close()


def test_explicit_path_not_a_socket(h: Harness, tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("keep me")
    with pytest.raises(StreamSetupError, match="not a socket"):
        StreamListener(h.loop, str(path), h.on_frames)
    assert path.read_text() == "keep me"


# --- --fd --------------------------------------------------------------------------------
def test_from_fd_refuses_a_datagram_socket_and_leaves_it_open(h: Harness) -> None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises(StreamSetupError, match="not a stream socket"):
            stream_link_from_fd(h.loop, s.fileno(), h.on_frames, on_exit=h.on_exit)
        assert s.type == socket.SOCK_DGRAM and s.fileno() >= 0
        os.fstat(s.fileno())  # still open: the caller's to close
    finally:
        s.close()


def test_from_fd(h: Harness) -> None:
    a, b = socket.socketpair()
    link = stream_link_from_fd(h.loop, a.detach(), h.on_frames, on_exit=h.on_exit)
    assert link.connected
    b.sendall(framed(frame(7)))
    h.run_until(lambda: h.frames == [frame(7)])
    assert link.send(frame(8))
    h.loop.run_once(0.0)
    b.settimeout(3)
    assert recv_frames(b, 1) == [frame(8)]
    b.close()
    h.run_until(lambda: h.exits == 1)
    assert not link.connected
    link.close()


def test_from_fd_static_method(h: Harness) -> None:
    a, b = socket.socketpair()
    link = StreamListener.from_fd(h.loop, a.detach(), h.on_frames, on_exit=h.on_exit)
    assert isinstance(link, StreamLink) and link.connected
    b.close()
    h.run_until(lambda: h.exits == 1)
    link.close()


def test_from_fd_rejects_datagram_socket(h: Harness) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with pytest.raises(OSError):  # StreamSetupError is an OSError
        stream_link_from_fd(h.loop, a.fileno(), h.on_frames)
    a.close()
    b.close()


# --- garbage from the peer never crashes -------------------------------------------------
chunked_streams = st.lists(
    st.one_of(
        st.binary(max_size=300),
        # plausible frames, so the parser gets past the first prefix often
        st.integers(14, 400).map(lambda n: framed(frame(n, n))),
        st.integers(0, 0xFFFFFFFF).map(lambda n: struct.pack(">I", n)),
    ),
    max_size=12,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(chunks=chunked_streams)
def test_garbage_never_crashes(chunks: list[bytes]) -> None:
    h = Harness()
    a, b = socket.socketpair()
    link = stream_link_from_fd(h.loop, a.detach(), h.on_frames, on_exit=h.on_exit)

    def reply(frames: Sequence[memoryview]) -> None:
        link.send(frames[0])

    h.handler = reply
    try:
        data = b"".join(chunks)
        for chunk in chunks:
            try:
                b.sendall(chunk)
            except OSError:
                break  # we reset the connection: fine
            h.loop.run_once(0.0)
        h.spin(3, 0.0)
        expected, _ = parse_stream(data)
        # delivered: exactly the well-formed prefix of the stream
        good = []
        for f in expected:
            if not 14 <= len(f) <= ETH_MAX_FRAME:
                break
            good.append(f)
        assert h.frames == good[: len(h.frames)]
        if link.connected:
            assert h.frames == good
        else:
            assert h.exits == 1
    finally:
        b.close()
        h.spin(2, 0.0)
        link.close()
        h.loop.close()


def test_rx_ready_after_drops_once_the_socket_drains(h: Harness, listener: StreamListener) -> None:
    """Frames dropped on a full socket: the rx-ready callbacks run once it is writable again
    (through the listener, which forwards the callback list to its link)."""
    woken: list[int] = []
    listener.add_rx_ready_callback(lambda: woken.append(listener.link.tx_dropped))
    c = attached(h, listener)
    link = listener.link
    stop = threading.Event()

    def reader() -> None:  # late, as in the test above: the first flushes come up short
        time.sleep(0.2)
        c.settimeout(0.1)
        while not stop.is_set():
            try:
                if not c.recv(1 << 20):
                    return
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        for rnd in range(50):
            bufs = link.rx_buffers(128)
            for buf in bufs:
                buf[:60000] = frame(rnd, 60000)
            link.commit([60000] * len(bufs))
            link.flush()
            if link.tx_dropped:
                break
        assert link.tx_dropped > 0 and link.connected
        h.run_until(lambda: woken, 5)
        assert woken == [link.tx_dropped]
        h.spin(3)
        assert len(woken) == 1  # once per shortage
    finally:
        stop.set()
        t.join(5)
        c.close()


def test_rx_ready_after_a_short_hand_out(h: Harness, listener: StreamListener) -> None:
    woken: list[bool] = []
    listener.link.add_rx_ready_callback(lambda: woken.append(True))
    c = attached(h, listener)
    link = listener.link
    assert len(link.rx_buffers(1000)) < 1000  # more than the pool holds
    h.spin(2)
    assert woken == [True]
    listener.link.remove_rx_ready_callback(woken.clear)  # unknown: ignored
    c.close()
