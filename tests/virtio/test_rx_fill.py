"""net.fill_rx_frames() (vr_rx_fill() in cffi_build/virtio/ring.c): the gather, a caller's C reader
filling the frames (here TCP's socket read), its C frame writer and the commit in one call,
against the steps it joins (pop_rx_frames(), ring.read_frames(), ring.rx_commit()) and its
outcomes."""

from __future__ import annotations

import errno
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from virtio._ring import ffi

from virtio import net
from virtio.ring import FILL_MAX, Fill, read_frames, rx_commit
from virtio.virtqueue import DESC_F_WRITE, VirtQueueError

from .frontend import SocketReader, frame_sizes
from .test_virtqueue import Setup

HDR = 12
PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
PLAIN = bytes(range(1, 11)) + b"\xee\xee"
GSO = bytes(range(101, 111)) + b"\xdd\xdd"
WRITER_T = "int64_t(*)(void *, uint8_t *const *, const uint32_t *, const uint32_t *, " \
    "unsigned int, uint32_t *)"


def marker(i: int, n: int) -> bytes:
    """The headers the test writers put in frame i (n bytes)."""
    return bytes([0xA0 + i % 32]) * n


class Writer:
    """A vr_frame_writer made with ffi.callback(): writes marker(i) over the first `head`
    bytes of each frame, sets its length to head + its payload size (or what `lens` says)
    and records what it was given."""

    def __init__(self, head: int, result: int = 0,
                 lens: Callable[[list[int]], list[int]] | None = None) -> None:
        self.head = head
        self.result = result
        self.lens = lens
        self.calls: list[tuple[list[int], list[int], list[int]]] = []  # firsts, lens, sizes
        self.cb = ffi.callback(WRITER_T, self._write, error=-2)
        self.addr = int(ffi.cast("uintptr_t", self.cb))

    def _write(self, arg: Any, firsts: Any, first_lens: Any, sizes: Any, n: int,
               lens: Any) -> int:
        got_firsts = [int(ffi.cast("uintptr_t", firsts[i])) for i in range(n)]
        got_lens = ffi.unpack(first_lens, n)
        got_sizes = ffi.unpack(sizes, n)
        self.calls.append((got_firsts, got_lens, got_sizes))
        for i in range(n):
            k = min(self.head, got_lens[i])
            ffi.buffer(firsts[i], k)[:] = marker(i, k)
        out = self.lens(got_sizes) if self.lens else [self.head + s for s in got_sizes]
        for i, length in enumerate(out):
            lens[i] = length
        return self.result


def fill(setup: Setup, writer: Writer, fd: int, count: int, frame_len: int, head: int,
         room: int = 1 << 20, flags: int = PEEK, gso_from: int = 1 << 30,
         need: int | None = None, addr: int | None = None) -> tuple[int, Any]:
    reader = SocketReader(fd, flags)
    return net.fill_rx_frames(setup.vq, count, HDR + frame_len if need is None else need, HDR, head,
                                   1024, 0, reader.filler(writer.addr if addr is None else addr),
                                   room, PLAIN, GSO, gso_from)


def payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed + (i >> 8)) & 0xFF for i in range(n))


def state(setup: Setup) -> tuple[int, int]:
    return setup.vq.last_avail_idx, setup.vq.inflight


def frames_seen(setup: Setup, used: list[tuple[int, int]] | None = None
                ) -> list[tuple[bytes, bytes]]:
    """(virtio-net header, frame) per frame on the used ring, mergeable chains joined."""
    if used is None:
        used = setup.ring.get_used()
    out = []
    i = 0
    while i < len(used):
        head, length = used[i]
        data = setup.ring.written(head, length)
        nbuf = struct.unpack_from("<H", data, 10)[0]
        for h2, l2 in used[i + 1:i + nbuf]:
            data += setup.ring.written(h2, l2)
        out.append((data[:HDR], data[HDR:]))
        i += max(nbuf, 1)
    return out


@pytest.fixture
def big() -> Any:
    setup = Setup(num=16)
    yield setup
    setup.close()


# --- frames sent --------------------------------------------------------------------------------

def test_rx_fill_frames_sent(big: Setup, pair: tuple[socket.socket, socket.socket]) -> None:
    """Four frames of 12 + 3054 bytes laid out over two 1536-byte chains each; 5000 bytes
    queued fill two: the guest sees them at the right offsets with their used entries and
    headers, the other four chains are given back, the socket keeps what was peeked."""
    a, b = pair
    heads = [big.ring.add([], [1536]) for _ in range(12)]
    data = payload(5000, 1)
    a.sendall(data)
    w = Writer(54)
    n, out = fill(big, w, b.fileno(), 4, 54 + 3000, 54, gso_from=2500)
    assert n == 5000
    assert out[0] == Fill.OK
    assert out[1:6] == (8, 8, 0, 4, 2)  # 8 kept of 8 popped, not dry, 4 laid out, 2 sent
    assert out[6:11] == (4, 4, 2, 2, 1)  # 4 pairs, 4 to give back; 2 frames, 2 merged, 1 GSO
    assert out[11:] == (12000, 1536)
    assert len(w.calls) == 1
    firsts, first_lens, sizes = w.calls[0]
    assert first_lens == [1536 - HDR] * 2 and sizes == [3000, 2000]
    assert firsts[1] != firsts[0]
    # chains 0-3 used, 4-7 given back: the next pop starts at 4
    assert state(big) == (4, 0)
    assert big.ring.get_used() == []  # published at flush
    assert big.vq.flush()
    used = big.ring.get_used()
    assert used == [(heads[0], 1536), (heads[1], HDR + 54 + 3000 - 1536), (heads[2], 1536),
                    (heads[3], HDR + 54 + 2000 - 1536)]
    (h0, f0), (h1, f1) = frames_seen(big, used)
    assert h0 == GSO[:10] + b"\x02\x00" and h1 == PLAIN[:10] + b"\x02\x00"
    assert f0 == marker(0, 54) + data[:3000] and f1 == marker(1, 54) + data[3000:]
    assert b.recv(10000) == data  # peeked: all still queued
    w2 = Writer(54)
    a.sendall(b"z" * 10)
    n, out = fill(big, w2, b.fileno(), 1, 54 + 3000, 54)
    assert (n, out[0], out[5]) == (10, Fill.OK, 1)
    big.vq.flush()
    assert big.ring.get_used() == [(heads[4], HDR + 54 + 10)]


def test_rx_fill_writer_gets_the_first_buffers(big: Setup,
                                               pair: tuple[socket.socket, socket.socket]) -> None:
    """The writer's firsts are the frames' first buffers past the virtio-net header (host
    addresses of the same bytes pop_rx_frames() records point at)."""
    a, b = pair
    for _ in range(6):
        big.ring.add([], [4096])
    a.sendall(payload(3000))
    ref = Setup(num=16)  # the same ring, laid out the same: where pop_rx_frames() puts them
    try:
        for _ in range(6):
            ref.ring.add([], [4096])
        got = net.pop_rx_frames(ref.vq, 3, HDR + 54 + 1460, HDR, 54, 1024, 0)
        assert got is not None
        w = Writer(54)
        n, out = fill(big, w, b.fileno(), 3, 54 + 1460, 54)
        assert (n, out[0], out[5]) == (3000, Fill.OK, 3)
        firsts, first_lens, sizes = w.calls[0]
        assert first_lens == [4096 - HDR] * 3 and sizes == [1460, 1460, 80]
        views = big.vq.memory.table.views
        recs = list(struct.iter_unpack("=QQQ", got[3]))
        want = []
        for s in got[0]:
            r, o, _ = recs[s]
            p = ffi.from_buffer(views[r])
            want.append(int(ffi.cast("uintptr_t", p)) + o + HDR)
            ffi.release(p)
        assert firsts == want
    finally:
        ref.close()


# --- the same as the steps it joins -------------------------------------------------------------

def reference(setup: Setup, fd: int, count: int, frame_len: int, head: int, room: int,
              flags: int, gso_from: int) -> tuple[int, list[int] | None]:
    """pop_rx_frames(), read_frames(), marker headers, rx_commit(), push_written(), rewind():
    (bytes read or -errno, sizes written), or (0, None) when nothing was laid out."""
    vq = setup.vq
    got = net.pop_rx_frames(vq, count, HDR + frame_len, HDR, head, 1024, 0)
    if got is None:
        return 0, None
    starts, _seen, _starved, recs, chains = got
    kept = len(recs) // 24
    if not starts:
        vq.rewind(kept)
        return 0, None
    try:
        reader = SocketReader(fd, flags)
        n, caps = read_frames(reader.reader, reader.reader_arg, vq.memory.table,
                              bytearray(recs), starts, HDR, frame_len, head, room)
    except OSError as e:
        vq.rewind(kept)
        return -e.errno, None
    sizes = frame_sizes(n, caps)
    if not sizes:
        vq.rewind(kept)
        return n, []
    views = vq.memory.table.views
    rec = list(struct.iter_unpack("=QQQ", recs))
    for i, s in enumerate(starts[:len(sizes)]):
        r, o, length = rec[s]
        k = min(head, length - HDR)
        views[r][o + HDR:o + HDR + k] = marker(i, k)
    elems, pairs, tail, _ = rx_commit(vq.memory.table, recs, chains, starts,
                                      [head + s for s in sizes], PLAIN, GSO, gso_from, HDR)
    vq.push_written(elems, pairs)
    vq.rewind(tail)
    return n, sizes


def ram(setup: Setup) -> list[bytes]:
    return [setup.dmem.read(r.desc.gpa, r.desc.size) for r in setup.dmem.regions]


@settings(max_examples=60, deadline=None)
@given(sizes=st.one_of(st.lists(st.sampled_from([1536, 4096]), min_size=1, max_size=16)
                       .map(lambda s: s[:1] * len(s)),
                       st.lists(st.integers(13, 5000), min_size=1, max_size=16)),
       rounds=st.lists(st.tuples(st.integers(0, 10), st.integers(1, 9000),
                                 st.sampled_from([0, 54, 74]), st.integers(-1, 40000),
                                 st.integers(0, 3000)),
                       min_size=1, max_size=3),
       data_len=st.sampled_from([0, 1, 20000]) | st.integers(0, 20000))
def test_rx_fill_same_as_pop_recv_commit(sizes: list[int],
                                         rounds: list[tuple[int, int, int, int, int]],
                                         data_len: int) -> None:
    """Any one-buffer chains, frame sizes, headers, windows and GSO thresholds: the same
    bytes read, the same guest memory, used ring and queue state as pop_rx_frames(),
    read_frames(), the headers and rx_commit() one after the other; a ring shape for the
    general path: Fill.GENERAL where pop_rx_frames() says None."""
    ours, theirs = Setup(num=16), Setup(num=16)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        for s in (ours, theirs):
            for size in sizes:
                s.ring.add([], [size])
        a.sendall(payload(data_len, 3))
        for count, size, head, room, gso_from in rounds:
            w = Writer(head)
            n, out = fill(ours, w, b.fileno(), count, head + size, head, room, PEEK, gso_from)
            want_n, want_sizes = reference(theirs, b.fileno(), count, head + size, head, room,
                                           PEEK, gso_from)
            if want_sizes:  # the guest took them (its ACK): both peek on from there
                assert len(b.recv(sum(want_sizes))) == sum(want_sizes)
            if want_sizes is None and want_n == 0:
                assert out[0] in (Fill.EMPTY, Fill.GENERAL)
                assert n == 0 and not w.calls
            elif want_n < 0:
                assert (out[0], n) == (Fill.READ, want_n) and not w.calls
            else:
                assert n == want_n and out[0] == Fill.OK
                assert out[5] == len(want_sizes or [])
                assert [c[2] for c in w.calls] == ([want_sizes] if want_sizes else [])
            assert state(ours) == state(theirs)
            ours.vq.flush()
            theirs.vq.flush()
            assert ours.ring.get_used() == theirs.ring.get_used()
            assert ram(ours) == ram(theirs)
    finally:
        a.close()
        b.close()
        ours.close()
        theirs.close()


# --- every other outcome gives back what was popped ---------------------------------------------

def _assert_nothing_kept(setup: Setup, before: tuple[int, int]) -> None:
    assert state(setup) == before
    assert not setup.vq.flush()
    assert setup.ring.get_used() == []


def test_rx_fill_empty_ring(big: Setup, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.sendall(b"q" * 100)
    w = Writer(54)
    n, out = fill(big, w, b.fileno(), 4, 1514, 54, flags=socket.MSG_DONTWAIT)
    assert (n, out[0], out[4]) == (0, Fill.EMPTY, 0) and not w.calls
    _assert_nothing_kept(big, (0, 0))
    assert b.recv(200) == b"q" * 100  # nothing read


def test_rx_fill_ring_too_short_for_a_frame(big: Setup,
                                            pair: tuple[socket.socket, socket.socket]) -> None:
    """Two 1536-byte chains, a frame needing three: popped, given back, Fill.EMPTY."""
    a, b = pair
    big.ring.add([], [1536])
    big.ring.add([], [1536])
    a.sendall(b"q" * 100)
    w = Writer(54)
    n, out = fill(big, w, b.fileno(), 1, 54 + 4000, 54, flags=socket.MSG_DONTWAIT)
    assert (n, out[0], out[2], out[3]) == (0, Fill.EMPTY, 2, 1) and not w.calls
    _assert_nothing_kept(big, (0, 0))
    assert b.recv(200) == b"q" * 100


@pytest.mark.parametrize("case", ["end", "recv", "writer", "commit", "general", "layout",
                                  "no-writer"])
def test_rx_fill_other_outcomes_give_back_everything(
        big: Setup, pair: tuple[socket.socket, socket.socket], case: str) -> None:
    """End of stream, recvmsg() failing, the writer refusing, lengths the frames can't hold,
    a ring for the general path, a layout that can't be: the chains all go back, no used
    entry; the next call sees the same chains."""
    a, b = pair
    if case == "general":
        heads = [big.ring.add([], [1536, 1536])] + [big.ring.add([], [1536]) for _ in range(4)]
    else:
        heads = [big.ring.add([], [1536]) for _ in range(6)]
    data = payload(4000, 7)
    if case not in ("recv", "end"):
        a.sendall(data)
    if case == "end":
        a.close()
    w = Writer(54, result=-1 if case == "writer" else 0,
               lens=(lambda s: [54 + 2 * 1536] + [54 + x for x in s[1:]])
               if case == "commit" else None)
    n, out = fill(big, w, b.fileno(), 3, 54 + 2000, 54, flags=PEEK,
                  need=HDR - 1 if case == "layout" else None,
                  addr=0 if case == "no-writer" else None)
    want = {"end": Fill.OK, "recv": Fill.READ, "writer": Fill.WRITER, "commit": Fill.COMMIT,
            "general": Fill.GENERAL, "layout": Fill.LAYOUT, "no-writer": Fill.LAYOUT}[case]
    assert out[0] == want
    assert out[5] == 0  # nothing sent
    if case == "end":
        assert n == 0 and out[4] == 3 and not w.calls  # 3 frames laid out, nothing read
    elif case == "recv":
        assert n == -errno.EAGAIN and not w.calls
    elif case in ("writer", "commit"):
        assert n == 4000 and len(w.calls) == 1 and w.calls[0][2] == [2000, 2000]
    else:
        assert n == 0 and not w.calls and out[2] == 0  # nothing popped
    _assert_nothing_kept(big, (0, 0))
    if case in ("end", "general", "layout", "no-writer", "recv"):
        return
    # the same chains again, now sent
    w2 = Writer(54)
    n, out = fill(big, w2, b.fileno(), 3, 54 + 2000, 54, flags=PEEK)
    assert (n, out[0], out[5]) == (4000, Fill.OK, 2)
    big.vq.flush()
    assert [h for h, _ in big.ring.get_used()] == heads[:4]


def test_rx_fill_general_ring_then_pop_many_takes_it(
        big: Setup, pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    head = big.ring.add([], [1536, 1536])
    a.sendall(b"x" * 10)
    n, out = fill(big, Writer(54), b.fileno(), 2, 1514, 54)
    assert (n, out[0]) == (0, Fill.GENERAL)
    assert [c.head for c in big.vq.pop_many(4)] == [head]


# --- hostile rings ------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["outside", "head", "jump", "mid_batch"])
def test_rx_fill_hostile_ring_breaks_the_queue(
        big: Setup, pair: tuple[socket.socket, socket.socket], case: str) -> None:
    a, b = pair
    ring = big.ring
    buf = big.dmem.alloc(1536)
    if case == "outside":
        ring.write_desc(0, 0xDEAD0000, 1536, DESC_F_WRITE, 0)
        ring.publish(0)
    elif case == "head":
        ring.publish(99)
    elif case == "jump":
        ring.set_avail_idx(100)
    else:
        ring.write_desc(0, buf, 1536, DESC_F_WRITE, 0)
        ring.publish(0)
        ring.publish(99)
    a.sendall(b"q" * 100)
    w = Writer(54)
    with pytest.raises(VirtQueueError):
        fill(big, w, b.fileno(), 8, 1514, 54, flags=socket.MSG_DONTWAIT)
    assert big.vq.broken and not w.calls
    with pytest.raises(VirtQueueError):
        fill(big, w, b.fileno(), 8, 1514, 54, flags=socket.MSG_DONTWAIT)
    assert b.recv(200) == b"q" * 100  # nothing read
    if case == "mid_batch":
        assert big.vq.inflight == 1


# --- room and count -----------------------------------------------------------------------------

def test_rx_fill_room_caps_the_read(big: Setup, pair: tuple[socket.socket, socket.socket]) -> None:
    """room 2100 with frames of 1460: 2100 bytes read (the socket keeps the rest), the
    second frame cut to 640, the caps' sum 2100 in out[11]."""
    a, b = pair
    for _ in range(8):
        big.ring.add([], [4096])
    data = payload(10000, 5)
    a.sendall(data)
    w = Writer(54)
    n, out = fill(big, w, b.fileno(), 4, 54 + 1460, 54, room=2100, flags=socket.MSG_DONTWAIT)
    assert (n, out[0], out[4], out[5], out[11]) == (2100, Fill.OK, 4, 2, 2100)
    assert w.calls[0][2] == [1460, 640]
    assert state(big) == (2, 0)
    big.vq.flush()
    frames = frames_seen(big)
    assert [f for _, f in frames] == [marker(0, 54) + data[:1460],
                                      marker(1, 54) + data[1460:2100]]
    assert b.recv(20000) == data[2100:]


def test_rx_fill_count_above_fill_max_is_clamped(
        pair: tuple[socket.socket, socket.socket]) -> None:
    """count 1000 on a 512-chain ring of one-frame chains: FILL_MAX (256) frames at most."""
    a, b = pair
    setup = Setup(num=512)
    try:
        for _ in range(300):
            setup.ring.add([], [64])
        data = payload(300 * 10, 9)
        a.sendall(data)
        w = Writer(0)
        n, out = fill(setup, w, b.fileno(), 1000, 10, 0, flags=socket.MSG_DONTWAIT)
        assert (n, out[0], out[4], out[5]) == (FILL_MAX * 10, Fill.OK, FILL_MAX, FILL_MAX)
        assert len(w.calls) == 1 and w.calls[0][2] == [10] * FILL_MAX
        assert state(setup) == (FILL_MAX, 0)
        setup.vq.flush()
        used = setup.ring.get_used()
        assert len(used) == FILL_MAX and all(length == HDR + 10 for _, length in used)
        assert b.recv(10000) == data[FILL_MAX * 10:]
    finally:
        setup.close()
