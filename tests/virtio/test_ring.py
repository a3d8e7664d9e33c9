"""virtio.ring on plain buffers: the C chain pop and used batch against exact-size areas.

The areas here are bytearrays cut to the byte, so a build with -fsanitize=address (see
doc/performance.md, "Descriptor chains in C") reports any access past them.
"""

from __future__ import annotations

import errno
import os
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio.ring import (
    LAYOUT_COUNT,
    LAYOUT_END,
    LAYOUT_ODD,
    LAYOUT_SHORT,
    LAYOUT_VIEWS,
    POP_E_AVAIL_JUMP,
    POP_E_BUF_OUTSIDE,
    POP_E_HEAD,
    POP_E_INDIRECT_LEN,
    POP_E_INDIRECT_OUTSIDE,
    POP_E_LOOP,
    POP_E_NEXT,
    POP_OK,
    RegionTable,
    RingAccess,
    RingError,
    avail_size,
    ffi,
    read_frames,
    rx_commit,
    rx_layout,
    used_size,
)

from .frontend import SocketReader

DESC = struct.Struct("<QIHH")
NEXT, WRITE, INDIRECT = 1, 2, 4


class Ring:
    def __init__(self, num: int, regions: list[tuple[int, int]]) -> None:
        self.num = num
        self.desc = bytearray(16 * num)
        self.avail = bytearray(avail_size(num))
        self.used = bytearray(used_size(num))
        self.mem = [(gpa, bytearray(size)) for gpa, size in regions]
        self.table = RegionTable([(gpa, memoryview(b)) for gpa, b in self.mem])
        self.ra = RingAccess(memoryview(self.avail), memoryview(self.used), num,
                             memoryview(self.desc))

    def post(self, heads: list[int]) -> None:
        idx = struct.unpack_from("<H", self.avail, 2)[0]
        for h in heads:
            struct.pack_into("<H", self.avail, 4 + 2 * (idx % self.num), h)
            idx = (idx + 1) & 0xFFFF
        struct.pack_into("<H", self.avail, 2, idx)

    def close(self) -> None:
        self.ra.release()
        self.table.release()


@pytest.fixture
def r():
    ring = Ring(8, [(0x1000, 256), (0x2000, 64)])
    yield ring
    ring.close()


def test_buffers_as_region_offset_length(r):
    DESC.pack_into(r.desc, 0, 0x1000 + 10, 20, NEXT, 3)
    DESC.pack_into(r.desc, 48, 0x2000, 64, WRITE, 0)  # ends exactly at the region's end
    r.post([0])
    n, status, chains, bufs = r.ra.pop_chains(0, 4, False, r.table)
    assert (n, status[0]) == (1, POP_OK)
    assert chains == [0, 1, 1] and bufs == [0, 10, 20, 1, 0, 64]


@pytest.mark.parametrize("addr, length", [
    (0x2000, 65), (0x2000 + 64, 1), (0x1000 + 256 - 1, 2), (0xFFF, 1), (2**64 - 1, 2),
    (2**64 - 1, 2**32 - 1)])
def test_buffer_past_a_region_end(r, addr, length):
    DESC.pack_into(r.desc, 0, addr, length, 0, 0)
    r.post([0])
    n, status, _, _ = r.ra.pop_chains(0, 1, False, r.table)
    assert (n, status[0]) == (0, POP_E_BUF_OUTSIDE)


def test_indirect_table_at_region_end(r):
    DESC.pack_into(r.mem[1][1], 32, 0x1000, 8, 0, 0)
    DESC.pack_into(r.mem[1][1], 48, 0x1000, 8, WRITE, 0)
    for length, code in ((32, POP_OK), (48, POP_E_INDIRECT_OUTSIDE), (40, POP_E_INDIRECT_LEN)):
        DESC.pack_into(r.mem[1][1], 32, 0x1000, 8, NEXT, 1)
        DESC.pack_into(r.desc, 0, 0x2000 + 32, length, INDIRECT, 0)
        r.post([0])
        n, status, chains, bufs = r.ra.pop_chains(0, 1, True, r.table)
        assert status[0] == code
        if code == POP_OK:
            assert chains == [0, 1, 1] and bufs == [0, 0, 8, 0, 0, 8]
        struct.pack_into("<H", r.avail, 2, 0)


def test_walk_errors(r):
    DESC.pack_into(r.desc, 0, 0x1000, 8, NEXT, 1)
    DESC.pack_into(r.desc, 16, 0x1000, 8, NEXT, 0)  # loop
    DESC.pack_into(r.desc, 32, 0x1000, 8, NEXT, 8)  # next out of range
    r.post([2, 0, 9])
    assert r.ra.pop_chains(0, 3, False, r.table)[1][:3] == [POP_E_NEXT, 8, 8]
    assert r.ra.pop_chains(1, 3, False, r.table)[1][:2] == [POP_E_LOOP, 0]
    assert r.ra.pop_chains(2, 3, False, r.table)[1][:2] == [POP_E_HEAD, 9]
    struct.pack_into("<H", r.avail, 2, 9)
    assert r.ra.pop_chains(0, 3, False, r.table)[1][:2] == [POP_E_AVAIL_JUMP, 9]


def test_released_region_table_reaches_nothing(r):
    DESC.pack_into(r.desc, 0, 0x1000, 8, 0, 0)
    r.post([0])
    stale = RegionTable([(0x1000, memoryview(r.mem[0][1]))])
    stale.release()
    assert r.ra.pop_chains(0, 1, False, stale)[1][0] == POP_E_BUF_OUTSIDE


def test_areas_too_small_refused():
    with pytest.raises(RingError):
        RingAccess(memoryview(bytearray(avail_size(8))), memoryview(bytearray(used_size(8))), 8,
                   memoryview(bytearray(16 * 8 - 1)))


def test_used_put_many_wraps(r):
    r.ra.used_put_many(6, [1, 10, 2, 20, 3, 30, 4, 40])
    elems = struct.unpack_from("<16I", r.used, 4)
    assert elems[12:16] == (1, 10, 2, 20) and elems[0:4] == (3, 30, 4, 40)
    with pytest.raises(OverflowError):
        r.ra.used_put_many(0, [2**32, 0])


@settings(max_examples=200)
@given(descs=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
                      min_size=8, max_size=8),
       near=st.lists(st.integers(0, 300), min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 9), min_size=1, max_size=8),
       indirect=st.booleans())
def test_random_tables_stay_inside(descs, near, heads, indirect):
    """Any table: results only ever name bytes inside a region (and under ASan, nothing
    outside the exact-size buffers is touched)."""
    ring = Ring(8, [(0x1000, 256), (0x2000, 64)])
    try:
        for i, ((addr, length, flags, nxt), off) in enumerate(zip(descs, near, strict=True)):
            if i % 2:
                addr, length = 0x1000 + off, length % 300
            if i == 3:
                addr, length = 0x2000 + off % 64, 16 * (length % 6)  # indirect-table-like
            DESC.pack_into(ring.desc, 16 * i, addr, length, flags, nxt)
        ring.post(heads)
        n, status, chains, bufs = ring.ra.pop_chains(0, 8, indirect, ring.table)
        assert 0 <= n <= len(heads) and len(chains) == 3 * n
        assert sum(chains[1::3]) + sum(chains[2::3]) == len(bufs) // 3
        for region, off, length in zip(bufs[0::3], bufs[1::3], bufs[2::3], strict=True):
            assert off + length <= len(ring.mem[region][1])
    finally:
        ring.close()


# --- read_frames(): a reader straight into frames over (region, offset, length) records -------
# (the reader: vhostpasst's TCP one, recvmsg() of a socket; recv_frames() below gives it one)

PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def recv_frames(fd: int, flags: int, *args: object) -> tuple[int, list[int]]:
    """read_frames() with a reader of `fd` (recvmsg with `flags`)."""
    reader = SocketReader(fd, flags)
    return read_frames(reader.reader, reader.reader_arg, *args)  # type: ignore[arg-type]
REC = struct.Struct("=QQQ")  # RingAccess.pop()'s records: native u64 (little-endian hosts)


def records(recs: list[tuple[int, int, int]]) -> bytearray:
    return bytearray(b"".join(REC.pack(*r) for r in recs))


def fill_pattern(mems: list[bytearray], seed: int = 0) -> None:
    for k, mem in enumerate(mems):
        mem[:] = bytes((i * 13 + 5 * k + seed) & 0xFF for i in range(len(mem)))


def reference(sock: socket.socket, flags: int, mems: list[bytearray],
              recs: list[tuple[int, int, int]], starts: list[int], hdr: int, frame_len: int,
              off: int, room: int) -> tuple[int, list[int]]:
    """What recv_frames() promises, with memoryviews and recvmsg_into(): frame i is the
    bytes of its buffers (its first from byte `hdr` on) cut to `frame_len`; its payload is
    frame bytes off.., as much as is left of `room`. Only for layouts that hold."""
    iov: list[memoryview] = []
    caps: list[int] = []
    room = max(room, 0)
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(recs)
        frame: list[memoryview] = []
        for b in range(s, end):
            region, start, length = recs[b]
            view = memoryview(mems[region])[start:start + length]
            frame.append(view[hdr:] if b == s else view)
        cap = min(frame_len - off, room)
        room -= cap
        caps.append(cap)
        pos = 0  # frame byte where `view` starts
        for view in frame:
            lo, hi = max(off - pos, 0), min(off + cap - pos, len(view))
            if lo < hi:
                iov.append(view[lo:hi])
            pos += len(view)
    if len(iov) > 1024:
        raise ValueError("more iovecs than one recvmsg() takes")
    return sock.recvmsg_into(iov, 0, flags)[0], caps


def _outcome(call) -> object:  # type: ignore[no-untyped-def]
    try:
        return call()
    except OSError as e:
        return type(e), e.errno
    except ValueError:
        return ValueError


@st.composite
def _layouts(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, int, int]], list[int], int,
                                        int, int, int]:
    """Regions, records (anywhere in their region, overlapping or not, zero-length ones
    too), frames over consecutive runs of them that each hold frame_len bytes."""
    sizes = draw(st.lists(st.sampled_from([64, 1536, 4096, 6000]) | st.integers(16, 6000),
                          min_size=1, max_size=3))
    hdr = draw(st.sampled_from([0, 1, 12, 16]))
    nframes = draw(st.integers(1, 5))
    recs: list[tuple[int, int, int]] = []
    starts: list[int] = []
    holds: list[int] = []
    lead = draw(st.integers(0, 2))  # records before the first frame: not part of any
    for k in range(lead + nframes):
        if k >= lead:
            starts.append(len(recs))
        total = 0
        for j in range(draw(st.integers(1, 6))):
            region = draw(st.integers(0, len(sizes) - 1))
            size = sizes[region]
            low = hdr if j == 0 else 0
            how = draw(st.sampled_from(["whole", "big", "any"]))  # big ones as often as not
            length = size if how == "whole" else draw(st.integers(
                max(low, size // 2) if how == "big" else low, size))
            start = draw(st.integers(0, size - length))
            recs.append((region, start, length))
            total += length - (hdr if j == 0 else 0)
        if k >= lead:
            holds.append(total)
    most = min(holds)
    frame_len = draw(st.sampled_from([most, most // 2]) | st.integers(0, most))
    off = draw(st.sampled_from([0, min(54, frame_len), frame_len]) | st.integers(0, frame_len))
    room = draw(st.sampled_from([1 << 20, (frame_len - off) * nframes // 2])
                | st.integers(-1, (frame_len - off) * nframes + 100))
    return sizes, recs, starts, hdr, frame_len, off, room


@settings(max_examples=300)
@given(layout=_layouts(), data_len=st.sampled_from([0, 40000]) | st.integers(0, 40000),
       seed=st.integers(0, 255))
def test_recv_frames_same_as_recvmsg_into_views(
        layout: tuple[list[int], list[tuple[int, int, int]], list[int], int, int, int, int],
        data_len: int, seed: int) -> None:
    """Any layout that holds: the same bytes read, the same caps, the same guest memory
    afterwards as recvmsg_into() over memoryviews of the same buffers (both peek the same
    socket), in several regions, with overlapping buffers, frames cut by `room`."""
    sizes, recs, starts, hdr, frame_len, off, room = layout
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        data = bytes((i * 31 + seed) & 0xFF for i in range(data_len))
        a.sendall(data)
        ours = [bytearray(n) for n in sizes]
        theirs = [bytearray(n) for n in sizes]
        fill_pattern(ours, seed)
        fill_pattern(theirs, seed)
        table = RegionTable([(0x10000 * (k + 1), memoryview(m)) for k, m in enumerate(ours)])
        try:
            got = _outcome(lambda: recv_frames(b.fileno(), PEEK, table, records(recs), starts,
                                               hdr, frame_len, off, room))
        finally:
            table.release()
        want = _outcome(lambda: reference(b, PEEK, theirs, recs, starts, hdr, frame_len, off,
                                          room))
        assert got == want
        assert ours == theirs
        if isinstance(got, tuple) and isinstance(got[1], list):
            assert got[0] <= max(room, 0) and got[0] <= sum(got[1])
        if data:  # both peeked: all still there
            assert b.recv(data_len + 1, socket.MSG_DONTWAIT) == data
    finally:
        a.close()
        b.close()


def test_recv_frames_frame_over_two_regions_and_room(pair) -> None:
    """A worked example: two frames of 100 bytes (payload from byte 20) over buffers in two
    regions, 12 header bytes skipped in each first buffer; room cuts the second frame."""
    a, b = pair
    mems = [bytearray(256), bytearray(64)]
    table = RegionTable([(0x1000, memoryview(mems[0])), (0x9000, memoryview(mems[1]))])
    recs = [(0, 0, 62), (1, 4, 60), (0, 100, 112)]  # frame 0: 50 + 60 bytes; frame 1: 100
    a.sendall(bytes(range(200)))
    try:
        n, caps = recv_frames(b.fileno(), 0, table, records(recs), [0, 2], 12, 100, 20, 130)
    finally:
        table.release()
    assert (n, caps) == (130, [80, 50])
    assert mems[0][12 + 20:62] == bytes(range(30))  # frame 0, bytes 20..49
    assert mems[1][4:4 + 50] == bytes(range(30, 80))  # frame 0, bytes 50..99
    assert mems[1][54:] == bytes(10)  # frame 0's last 10 buffer bytes: past frame_len
    assert mems[0][100 + 12 + 20:100 + 12 + 70] == bytes(range(80, 130))
    assert mems[0][:32] == bytes(32) and mems[0][182:] == bytes(74)  # headers, the rest
    assert b.recv(100) == bytes(range(130, 200))  # not a peek: the bytes were consumed


def test_recv_frames_room_zero_and_past_the_room(pair) -> None:
    a, b = pair
    mem = bytearray(300)
    table = RegionTable([(0, memoryview(mem))])
    a.sendall(b"x" * 500)
    recs = records([(0, 0, 100), (0, 100, 100), (0, 200, 100)])
    try:
        assert recv_frames(b.fileno(), PEEK, table, recs, [0, 1, 2], 0, 100, 0, 250) == \
            (250, [100, 100, 50])
        assert recv_frames(b.fileno(), PEEK, table, recs, [0, 1, 2], 0, 100, 40, 100) == \
            (100, [60, 40, 0])
        # room 0 (or less): no iovec at all; recvmsg() of nothing reads nothing
        assert recv_frames(b.fileno(), PEEK, table, recs, [0, 1, 2], 0, 100, 0, -5) == \
            (0, [0, 0, 0])
        assert recv_frames(b.fileno(), PEEK, table, recs, [], 0, 100, 0, 100) == (0, [])
        # payload off == frame_len: frames of headers only, caps 0
        assert recv_frames(b.fileno(), PEEK, table, recs, [0, 1, 2], 0, 100, 100, 100) == \
            (0, [0, 0, 0])
    finally:
        table.release()
    assert b.recv(600) == b"x" * 500


def test_recv_frames_reads_what_is_there(pair) -> None:
    """Fewer bytes queued than the frames hold: n says so, caps are still the room."""
    a, b = pair
    mem = bytearray(4096)
    table = RegionTable([(0, memoryview(mem))])
    a.sendall(b"abc")
    try:
        n, caps = recv_frames(b.fileno(), socket.MSG_DONTWAIT, table,
                              records([(0, 0, 2048), (0, 2048, 2048)]), [0, 1], 12, 2000, 54,
                              10000)
    finally:
        table.release()
    assert (n, caps) == (3, [1946, 1946])
    assert mem[66:69] == b"abc" and mem[:66] == bytes(66) and mem[69:] == bytes(4096 - 69)


_SIZES = [256, 64]  # the regions of the bad layouts below


@pytest.mark.parametrize("recs, starts, hdr, frame_len, off", [
    ([(2, 0, 10)], [0], 0, 10, 0),  # region index out of range
    ([(2**64 - 1, 0, 10)], [0], 0, 10, 0),
    ([(0, 250, 7)], [0], 0, 7, 0),  # past its region's end by one byte
    ([(1, 0, 65)], [0], 0, 10, 0),  # longer than its region
    ([(1, 65, 0), (0, 0, 10)], [0], 0, 5, 0),  # starting past its region
    ([(0, 2**64 - 1, 2)], [0], 0, 1, 0),  # offset + length wraps around
    ([(0, 8, 2**64 - 4)], [0], 0, 1, 0),
    ([(0, 0, 11)], [0], 12, 1, 0),  # first buffer shorter than the header
    ([(0, 0, 11), (0, 20, 100)], [0], 12, 50, 0),
    ([(0, 0, 100), (1, 0, 50)], [0], 12, 139, 0),  # the frame doesn't hold frame_len bytes
    ([(0, 0, 100), (1, 0, 50)], [0, 1], 0, 60, 0),  # nor does the second one
    ([(0, 0, 100), (1, 0, 50)], [1, 0], 0, 20, 0),  # starts not increasing
    ([(0, 0, 100), (1, 0, 50)], [0, 0], 0, 20, 0),  # an empty frame
    ([(0, 0, 100), (1, 0, 50)], [0, 2], 0, 20, 0),  # a frame past the last record
    ([(0, 0, 100), (1, 0, 50)], [5], 0, 20, 0),
    ([(0, 0, 100), (1, 0, 50)], [0], 0, 20, 21),  # payload beyond the frame
    ([(0, 0, 100), (1, 70, 0), (1, 0, 64), (0, 90, 200)], [0, 2], 0, 150, 10),  # last bad
    ([(0, 0, 1)] * 1025, [0], 0, 1025, 0),  # 1025 iovecs
    ([(0, 0, 1)] * 1025, list(range(1025)), 0, 1, 0),
])
def test_recv_frames_bad_layout_reads_nothing(pair, recs: list[tuple[int, int, int]],
                                              starts: list[int], hdr: int, frame_len: int,
                                              off: int) -> None:
    """A layout that doesn't hold is refused before recvmsg(): not one byte taken from the
    socket (not a peek here), guest memory untouched."""
    a, b = pair
    mems = [bytearray(n) for n in _SIZES]
    fill_pattern(mems)
    before = [bytes(m) for m in mems]
    table = RegionTable([(0x1000 * (k + 1), memoryview(m)) for k, m in enumerate(mems)])
    a.sendall(b"d" * 5000)
    try:
        with pytest.raises(ValueError):
            recv_frames(b.fileno(), socket.MSG_DONTWAIT, table, records(recs), starts, hdr,
                        frame_len, off, 1 << 20)
    finally:
        table.release()
    assert [bytes(m) for m in mems] == before
    assert b.recv(6000, socket.MSG_DONTWAIT) == b"d" * 5000


def test_recv_frames_1024_iovecs_is_the_limit(pair) -> None:
    a, b = pair
    mem = bytearray(1024)
    table = RegionTable([(0, memoryview(mem))])
    a.sendall(bytes(range(256)) * 4)
    recs = records([(0, k, 1) for k in range(1024)])  # 1024 one-byte buffers, in order
    try:
        assert recv_frames(b.fileno(), 0, table, recs, [0], 0, 1024, 0, 4096) == (1024, [1024])
    finally:
        table.release()
    assert mem == bytearray(range(256)) * 4


def test_recv_frames_released_table_refuses(pair) -> None:
    a, b = pair
    mem = bytearray(100)
    table = RegionTable([(0, memoryview(mem))])
    table.release()
    a.sendall(b"z" * 10)
    with pytest.raises(ValueError):
        recv_frames(b.fileno(), 0, table, records([(0, 0, 100)]), [0], 0, 100, 0, 100)
    assert mem == bytearray(100) and b.recv(20) == b"z" * 10


def test_recv_frames_system_call_errors_are_oserror(pair) -> None:
    a, b = pair
    mem = bytearray(200)
    table = RegionTable([(0, memoryview(mem))])
    recs = records([(0, 0, 200)])
    args = (table, recs, [0], 12, 188, 54, 1000)
    try:
        with pytest.raises(BlockingIOError) as e:  # nothing queued, MSG_DONTWAIT
            recv_frames(b.fileno(), PEEK, *args)
        assert e.value.errno == errno.EAGAIN
        with pytest.raises(BlockingIOError):
            recv_frames(b.fileno(), socket.MSG_DONTWAIT, *args)
        r, w = os.pipe()
        try:
            with pytest.raises(OSError) as e:
                recv_frames(r, 0, *args)
            assert e.value.errno == errno.ENOTSOCK
        finally:
            os.close(r)
            os.close(w)
        c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fd = d.fileno()
        c.close()
        assert recv_frames(fd, 0, *args) == (0, [134])  # the peer is gone: end of stream
        d.close()
        with pytest.raises(OSError) as e:
            recv_frames(fd, 0, *args)  # closed
        assert e.value.errno == errno.EBADF
        with pytest.raises(OSError) as e:
            recv_frames(-1, 0, *args)
        assert e.value.errno == errno.EBADF
    finally:
        table.release()
    assert mem == bytearray(200)


# --- rx_layout() / rx_commit(): mergeable RX frames over one-buffer chains, in C ----------

HDR = 12  # the virtio-net header (mergeable: num_buffers at bytes 10-11)
CHAIN = struct.Struct("=III")  # RingAccess.pop()'s chain records: head, readable, writable


def chain_records(heads: list[int]) -> bytearray:
    return bytearray(b"".join(CHAIN.pack(h, 0, 1) for h in heads))


def layout_reference(lens: list[int], start: int, need: int, hdr: int, head: int, count: int,
                     views: int, dry: bool) -> tuple[list[int], tuple[int, int, int, int]]:
    """What rx_layout() documents, over the records' lengths: a frame takes its first chain,
    then ceil(missing / first's length) chains at a time until they hold `need` (dry: the
    last helping may be cut to what is left); its first buffer is > hdr and holds hdr + head;
    `views` counts the chains up to the one holding the frame's last byte."""
    nrecs = len(lens)
    s, used, why, short = start, 0, LAYOUT_COUNT, 0
    starts: list[int] = []
    views = max(views, 0)
    while len(starts) < max(count, 0):
        if s >= nrecs:
            why = LAYOUT_END
            break
        first = lens[s]
        room, b, missing = first, s + 1, 0
        while room < need:
            k = -(-(need - room) // max(first, 1))
            left = nrecs - b
            if left < k and (not dry or left == 0):
                missing = k - left
                break
            take = min(k, left)
            room += sum(lens[b:b + take])
            b += take
        if room < need:
            why, short = LAYOUT_SHORT, missing
            break
        if first <= hdr or first - hdr < head:
            why = LAYOUT_ODD
            break
        held, j = 0, s
        while held < need:
            held += lens[j]
            j += 1
        if used + (j - s) > views:
            why = LAYOUT_VIEWS
            break
        starts.append(s)
        used += j - s
        s = b
        if used >= views:
            why = LAYOUT_VIEWS
            break
    return starts, (s, used, why, short)


def _layout(lens: list[int], start: int, need: int, hdr: int, head: int, count: int,
            views: int, dry: bool) -> tuple[list[int], tuple[int, int, int, int]]:
    recs = records([(k % 3, 7 * k, n) for k, n in enumerate(lens)])  # only lengths matter
    starts: list[int] = []
    out = rx_layout(recs, start, need, hdr, head, count, views, dry, starts)
    return starts, out


_LENS = st.sampled_from([0, 1, 11, 12, 13, 50, 100, 4096]) | st.integers(0, 300)


@settings(max_examples=600)
@given(lens=st.lists(_LENS, max_size=40), start=st.integers(0, 42),
       need=st.sampled_from([0, 1, 12, 13, 100, 250, 1526]) | st.integers(0, 2000),
       hdr=st.sampled_from([0, 12]), head=st.sampled_from([0, 14, 54]) | st.integers(0, 120),
       count=st.integers(0, 10), views=st.sampled_from([0, 1, 1 << 30]) | st.integers(0, 40),
       dry=st.booleans(), equal=st.booleans())
def test_rx_layout_same_as_reference(lens: list[int], start: int, need: int, hdr: int,
                                     head: int, count: int, views: int, dry: bool,
                                     equal: bool) -> None:
    """Any record lengths (0-byte and tiny buffers too, or all equal as Linux posts them):
    the same frames, next record, views, stop reason and chains to pop as the reference."""
    if equal and lens:
        lens = [lens[0]] * len(lens)
    got = _layout(lens, start, need, hdr, head, count, views, dry)
    assert got == layout_reference(lens, start, need, hdr, head, count, views, dry)
    starts, (nxt, used, why, short) = got
    assert len(starts) <= count and used <= max(views, 0)
    assert all(a < b for a, b in zip(starts, [*starts[1:], nxt], strict=False))
    assert short == 0 or why == LAYOUT_SHORT


def test_rx_layout_appends_to_starts() -> None:
    starts = [99]
    out = rx_layout(records([(0, 0, 100)] * 4), 1, 150, HDR, 0, 5, 100, False, starts)
    assert starts == [99, 1] and out == (3, 2, LAYOUT_SHORT, 1)


@pytest.mark.parametrize("lens, start, need, head, count, views, dry, starts, out", [
    # equal buffers: the fewest that hold the frame; the ring ends inside the fourth one
    ([100] * 10, 0, 250, 0, 5, 100, False, [0, 3, 6], (9, 9, LAYOUT_SHORT, 2)),
    ([100] * 10, 0, 250, 0, 5, 100, True, [0, 3, 6], (9, 9, LAYOUT_SHORT, 2)),
    ([100] * 11, 0, 250, 0, 5, 100, False, [0, 3, 6], (9, 9, LAYOUT_SHORT, 1)),
    ([100] * 11, 0, 250, 0, 5, 100, True, [0, 3, 6], (9, 9, LAYOUT_SHORT, 1)),
    ([100] * 9, 0, 250, 0, 5, 100, False, [0, 3, 6], (9, 9, LAYOUT_END, 0)),
    ([100] * 9, 0, 250, 0, 2, 100, False, [0, 3], (6, 6, LAYOUT_COUNT, 0)),
    ([100] * 9, 3, 250, 0, 5, 100, False, [3, 6], (9, 6, LAYOUT_END, 0)),
    # dry: the second frame takes what is left of its helping (one chain of two)
    ([100, 100, 100, 100, 200], 0, 250, 0, 5, 100, False, [0], (3, 3, LAYOUT_SHORT, 1)),
    ([100, 100, 100, 100, 200], 0, 250, 0, 5, 100, True, [0, 3], (5, 5, LAYOUT_END, 0)),
    # unequal: the helping holds more than the frame; views count only the chains it needs
    ([60, 100, 100], 0, 150, 0, 5, 100, False, [0], (3, 2, LAYOUT_END, 0)),
    ([50, 200, 200, 10], 0, 120, 0, 5, 100, False, [0], (3, 2, LAYOUT_SHORT, 11)),
    ([100, 100, 1000], 0, 150, 0, 5, 100, False, [0, 2], (3, 3, LAYOUT_END, 0)),
    # odd first buffers: checked once the frame is whole
    ([100, 60, 100], 0, 50, 50, 5, 100, False, [0], (1, 1, LAYOUT_ODD, 0)),
    ([100, 60, 100], 0, 50, 48, 5, 100, False, [0, 1, 2], (3, 3, LAYOUT_END, 0)),
    ([12, 100], 0, 50, 0, 5, 100, False, [], (0, 0, LAYOUT_SHORT, 3)),
    ([12, 100], 0, 50, 0, 5, 100, True, [], (0, 0, LAYOUT_ODD, 0)),
    ([13, 100], 0, 50, 2, 5, 100, True, [], (0, 0, LAYOUT_ODD, 0)),
    ([13, 100], 0, 50, 1, 5, 100, True, [0], (2, 2, LAYOUT_END, 0)),
    ([13, 100], 0, 50, 0, 5, 100, True, [0], (2, 2, LAYOUT_END, 0)),
    # 0-byte buffers: no division by zero; one chain at a time
    ([0, 0, 100], 0, 50, 0, 5, 100, False, [], (0, 0, LAYOUT_SHORT, 48)),
    ([0, 0, 100], 0, 50, 0, 5, 100, True, [], (0, 0, LAYOUT_ODD, 0)),
    ([0], 0, 20, 0, 5, 100, True, [], (0, 0, LAYOUT_SHORT, 20)),
    ([100, 0, 0, 100], 0, 150, 0, 5, 100, False, [0], (4, 4, LAYOUT_END, 0)),
    ([100, 0, 0], 0, 150, 0, 5, 100, False, [], (0, 0, LAYOUT_SHORT, 1)),
    ([100, 0, 0], 0, 150, 0, 5, 100, True, [], (0, 0, LAYOUT_SHORT, 1)),
    ([100, 0, 100], 0, 150, 0, 5, 100, True, [0], (3, 3, LAYOUT_END, 0)),
    # the view budget: by the next frame, or reached by the last one
    ([100] * 6, 0, 250, 0, 5, 4, False, [0], (3, 3, LAYOUT_VIEWS, 0)),
    ([100] * 6, 0, 250, 0, 5, 3, False, [0], (3, 3, LAYOUT_VIEWS, 0)),
    ([100] * 6, 0, 250, 0, 2, 6, False, [0, 3], (6, 6, LAYOUT_VIEWS, 0)),
    ([100] * 6, 0, 250, 0, 5, 2, False, [], (0, 0, LAYOUT_VIEWS, 0)),
    ([100] * 6, 0, 250, 0, 5, 0, False, [], (0, 0, LAYOUT_VIEWS, 0)),
    # nothing to do
    ([100] * 3, 5, 50, 0, 5, 100, False, [], (5, 0, LAYOUT_END, 0)),
    ([], 0, 50, 0, 5, 100, True, [], (0, 0, LAYOUT_END, 0)),
    ([100] * 3, 0, 50, 0, 0, 100, False, [], (0, 0, LAYOUT_COUNT, 0)),
])
def test_rx_layout_worked_examples(lens: list[int], start: int, need: int, head: int,
                                   count: int, views: int, dry: bool, starts: list[int],
                                   out: tuple[int, int, int, int]) -> None:
    assert _layout(lens, start, need, HDR, head, count, views, dry) == (starts, out)
    assert layout_reference(lens, start, need, HDR, head, count, views, dry) == (starts, out)


def commit_reference(mems: list[bytearray], recs: list[tuple[int, int, int]],
                     heads: list[int], starts: list[int], lengths: list[int], plain: bytes,
                     gso: bytes, gso_from: int
                     ) -> tuple[list[int], int, tuple[int, int, int]] | type[ValueError]:
    """What rx_commit() documents, writing into `mems` only when the whole batch holds: each
    sent frame's chains in order (head, bytes of the frame in it), then (head, 0) for the
    unused chains before the last used one; the ones after are the tail to rewind."""
    nrecs = len(recs)
    if len(lengths) > len(starts):
        return ValueError
    plan: list[tuple[int, list[int], list[int], list[int]]] = []  # frame: used, takes, spare
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else nrecs
        if not s < end <= nrecs:
            return ValueError
        total = HDR + lengths[i] if i < len(lengths) and lengths[i] else 0
        room, takes = 0, []
        b = s
        while b < end and room < total:
            region, off, length = recs[b]
            if region >= len(mems) or off + length > len(mems[region]):
                return ValueError
            if b == s and length < HDR:
                return ValueError
            takes.append(min(total - room, length))
            room += takes[-1]
            b += 1
        if room < total:
            return ValueError
        plan.append((i, [heads[k] for k in range(s, b)], takes, heads[b:end]))
    elems: list[int] = []
    spare: list[int] = []
    after = 0
    counters = [0, 0, 0]
    for i, used, takes, rest in plan:
        if used:
            region, off, _ = recs[starts[i]]
            big = lengths[i] > gso_from
            mems[region][off:off + HDR] = (gso if big else plain)[:10] + \
                len(used).to_bytes(2, "little")
            for h, t in zip(used, takes, strict=True):
                elems += [h, t]
            counters[0] += 1
            counters[1] += len(used) > 1
            counters[2] += big
            after = 0
        spare += rest
        after += len(rest)
    for h in spare[:len(spare) - after]:
        elems += [h, 0]
    return elems, after, (counters[0], counters[1], counters[2])


def _commit_outcome(mems: list[bytearray], recs: list[tuple[int, int, int]],
                    heads: list[int], starts: list[int], lengths: list[int], plain: bytes,
                    gso: bytes, gso_from: int, hdr: int = HDR, table_count: int | None = None
                    ) -> tuple[list[int], int, tuple[int, int, int]] | type[ValueError]:
    table = RegionTable([(0x10000 * (k + 1), memoryview(m)) for k, m in enumerate(mems)])
    if table_count is not None:
        table.count = table_count
    try:
        elems, pairs, tail, counters = rx_commit(table, records(recs), chain_records(heads),
                                                 starts, lengths, plain, gso, gso_from, hdr)
        return ffi.unpack(elems, 2 * pairs), tail, counters
    except ValueError:
        return ValueError
    finally:
        table.release()


@st.composite
def _batches(draw: st.DrawFn) -> tuple[list[int], list[tuple[int, int, int]], list[int],
                                        list[int], list[int], int]:
    """Region sizes, records (overlapping or not) laid out into frames by rx_layout(),
    chain heads, lengths up to a little more than each frame holds, gso_from."""
    sizes = draw(st.lists(st.sampled_from([64, 512, 4096]) | st.integers(0, 4096),
                          min_size=1, max_size=3))
    lens = draw(st.lists(_LENS.filter(lambda n: n <= 4096), min_size=1, max_size=24))
    recs: list[tuple[int, int, int]] = []
    for n in lens:
        fits = [k for k, size in enumerate(sizes) if size >= n]
        if fits:
            region = draw(st.sampled_from(fits))
            recs.append((region, draw(st.integers(0, sizes[region] - n)), n))
        else:
            sizes.append(n)
            recs.append((len(sizes) - 1, 0, n))
    need = draw(st.sampled_from([13, 100, 250, 1526]) | st.integers(13, 3000))
    head = draw(st.sampled_from([0, 14]))
    starts: list[int] = []
    nxt, _, _, _ = rx_layout(records(recs), 0, need, HDR, head, draw(st.integers(1, 8)),
                             1 << 30, draw(st.booleans()), starts)
    if draw(st.booleans()):
        recs = recs[:nxt]  # as rx_frames() keeps them: the chains after the frames rewound
    heads = draw(st.lists(st.integers(0, 2**32 - 1), min_size=len(recs), max_size=len(recs)))
    lengths = []
    for i, s in enumerate(starts):
        end = starts[i + 1] if i + 1 < len(starts) else len(recs)
        holds = sum(r[2] for r in recs[s:end]) - HDR
        lengths.append(draw(st.sampled_from([0, 1, need - HDR, holds, holds + 1])
                            | st.integers(0, holds + 2)))
    lengths = lengths[:draw(st.integers(0, len(lengths)))]
    gso_from = draw(st.sampled_from([0, 1514, 2**32 - 1]) | st.integers(0, 3000))
    return sizes, recs, heads, starts, lengths, gso_from


@settings(max_examples=400)
@given(batch=_batches(), plain=st.binary(min_size=12, max_size=12),
       gso=st.binary(min_size=12, max_size=12), seed=st.integers(0, 255))
def test_rx_commit_same_as_reference(
        batch: tuple[list[int], list[tuple[int, int, int]], list[int], list[int], list[int],
                     int], plain: bytes, gso: bytes, seed: int) -> None:
    """Frames rx_layout() laid out, any lengths: the same used elements, tail, counters and
    guest memory afterwards as the reference; a batch that doesn't hold raises ValueError
    and leaves every byte as it was."""
    sizes, recs, heads, starts, lengths, gso_from = batch
    ours = [bytearray(n) for n in sizes]
    fill_pattern(ours, seed)
    theirs = [bytearray(m) for m in ours]
    before = [bytes(m) for m in ours]
    got = _commit_outcome(ours, recs, heads, starts, lengths, plain, gso, gso_from)
    want = commit_reference(theirs, recs, heads, starts, lengths, plain, gso, gso_from)
    assert got == want
    assert ours == theirs
    if want is ValueError:
        assert [bytes(m) for m in ours] == before


def test_rx_commit_worked_example() -> None:
    """Five 100-byte chains: frame 0 over the first three, frame 1 over the last two."""
    recs = [(0, 100 * k, 100) for k in range(5)]
    heads = [7, 3, 9, 4, 5]
    plain, gso = bytes(range(1, 13)), bytes(range(101, 113))
    mem = bytearray(b"\xee" * 512)
    # frame 0 sent over two chains (GSO past 100 bytes); chain 9 and frame 1's go back
    got = _commit_outcome([mem], recs, heads, [0, 3], [150], plain, gso, 100)
    assert got == ([7, 100, 3, 62], 3, (1, 1, 1))
    assert mem[:12] == gso[:10] + b"\x02\x00" and mem[12:] == b"\xee" * 500
    # both sent: chain 9 (unused, before frame 1's) pushed empty after them, chain 5 rewound
    mem[:] = b"\xee" * 512
    got = _commit_outcome([mem], recs, heads, [0, 3], [150, 10], plain, gso, 150)
    assert got == ([7, 100, 3, 62, 4, 22, 9, 0], 1, (2, 1, 0))
    assert mem[:12] == plain[:10] + b"\x02\x00" and mem[300:312] == plain[:10] + b"\x01\x00"
    assert mem[12:300] == b"\xee" * 288 and mem[312:] == b"\xee" * 200
    # frame 0 not sent: its chains go back empty after frame 1's
    mem[:] = b"\xee" * 512
    got = _commit_outcome([mem], recs, heads, [0, 3], [0, 188], plain, gso, 187)
    assert got == ([4, 100, 5, 100, 7, 0, 3, 0, 9, 0], 0, (1, 1, 1))
    assert mem[300:312] == gso[:10] + b"\x02\x00" and mem[:300] == b"\xee" * 300
    # nothing sent: nothing written, everything rewound
    mem[:] = b"\xee" * 512
    assert _commit_outcome([mem], recs, heads, [0, 3], [], plain, gso, 0) == ([], 5, (0, 0, 0))
    assert _commit_outcome([mem], recs, heads, [0, 3], [0, 0], plain, gso, 0) == \
        ([], 5, (0, 0, 0))
    assert _commit_outcome([mem], [], [], [], [], plain, gso, 0) == ([], 0, (0, 0, 0))
    assert mem == b"\xee" * 512


def test_rx_commit_short_first_buffer_of_an_unsent_frame_is_fine() -> None:
    mem = bytearray(256)
    recs = [(0, 0, 100), (0, 100, 5), (0, 110, 100)]
    assert _commit_outcome([mem], recs, [1, 2, 3], [0, 1, 2], [20, 0, 30], bytes(12),
                           bytes(12), 1000) == ([1, 32, 3, 42, 2, 0], 0, (2, 0, 0))


_PLAIN, _GSO = b"P" * 12, b"G" * 12


@pytest.mark.parametrize("recs, starts, lengths, hdr, table_count", [
    ([(0, 0, 100), (0, 100, 100)], [0], [189], 12, None),  # 12 + 189 > 200
    ([(0, 0, 100), (1, 0, 50)], [0, 1], [50, 39], 12, None),  # the second frame: 12 + 39 > 50
    ([(0, 0, 100), (1, 10, 60)], [0], [150], 12, None),  # a record past its region's end
    ([(0, 0, 100), (1, 10, 60)], [0, 1], [50, 10], 12, None),  # the same, in the second frame
    ([(0, 2**64 - 1, 20)], [0], [1], 12, None),  # offset + length wraps around
    ([(0, 0, 257)], [0], [1], 12, None),  # longer than its region
    ([(0, 0, 100), (2, 0, 50)], [0, 1], [10, 10], 12, None),  # region index out of range
    ([(0, 0, 100), (2**64 - 1, 0, 50)], [0, 1], [10, 10], 12, None),
    ([(0, 0, 100), (1, 0, 50)], [0, 1], [10, 10], 12, 1),  # a table of one region
    ([(0, 0, 100)], [0], [10], 12, 0),  # a released table
    ([(0, 0, 11), (0, 20, 100)], [0], [1], 12, None),  # first buffer shorter than the header
    ([(0, 0, 100), (0, 100, 11), (0, 120, 100)], [0, 1], [10, 5], 12, None),
    ([(0, 0, 0), (0, 20, 100)], [0], [1], 12, None),
    ([(0, 0, 100), (0, 100, 100)], [0], [10, 10], 12, None),  # nlengths > nframes
    ([(0, 0, 100), (0, 100, 100)], [], [10], 12, None),
    ([(0, 0, 100), (0, 100, 100)], [1, 0], [10, 10], 12, None),  # starts not increasing
    ([(0, 0, 100), (0, 100, 100)], [0, 0], [10, 10], 12, None),
    ([(0, 0, 100), (0, 100, 100)], [0, 0], [10], 12, None),
    ([(0, 0, 100), (0, 100, 100)], [0, 2], [10], 12, None),  # a frame past the last record
    ([(0, 0, 100), (0, 100, 100)], [2], [10], 12, None),
    ([(0, 0, 100), (0, 100, 100)], [0], [10], 16, None),  # a header that isn't 12 bytes
    ([(0, 0, 100), (0, 100, 100)], [0], [10], 10, None),
])
def test_rx_commit_bad_batch_writes_nothing(recs: list[tuple[int, int, int]],
                                            starts: list[int], lengths: list[int], hdr: int,
                                            table_count: int | None) -> None:
    mems = [bytearray(n) for n in _SIZES]
    fill_pattern(mems)
    before = [bytes(m) for m in mems]
    heads = list(range(10, 10 + len(recs)))
    assert _commit_outcome(mems, recs, heads, starts, lengths, _PLAIN, _GSO, 100, hdr,
                           table_count) is ValueError
    assert [bytes(m) for m in mems] == before
    if hdr == HDR and table_count is None:
        assert commit_reference([bytearray(m) for m in mems], recs, heads, starts, lengths,
                                _PLAIN, _GSO, 100) is ValueError


def test_rx_commit_exact_fit_and_the_bad_ones_next_to_it() -> None:
    """The largest lengths that fit, the end of a region to the byte, a 12-byte first
    buffer: all fine (the counterparts of the bad batches above)."""
    mems = [bytearray(n) for n in _SIZES]
    got = _commit_outcome(mems, [(0, 0, 100), (0, 100, 100)], [1, 2], [0], [188], _PLAIN,
                          _GSO, 188)
    assert got == ([1, 100, 2, 100], 0, (1, 1, 0))
    got = _commit_outcome(mems, [(0, 156, 100), (1, 4, 60)], [1, 2], [0, 1], [88, 48],
                          _PLAIN, _GSO, 87)
    assert got == ([1, 100, 2, 60], 0, (2, 0, 1))
    assert mems[0][156:168] == b"G" * 10 + b"\x01\x00"  # 88 > 87: GSO
    assert mems[1][4:16] == b"P" * 10 + b"\x01\x00"
    got = _commit_outcome(mems, [(1, 0, 12), (1, 12, 52)], [1, 2], [0], [52], _PLAIN, _GSO,
                          52)
    assert got == ([1, 12, 2, 52], 0, (1, 1, 0))
    assert mems[1][:12] == b"P" * 10 + b"\x02\x00"


def test_rx_commit_short_chain_records_refused() -> None:
    """Two buffer records, one chain record: refused, not a head read from past the array.
    (The array is a slice of a bigger buffer, so the read past it stays in memory we own.)"""
    mem = bytearray(256)
    table = RegionTable([(0, memoryview(mem))])
    backing = chain_records([1, 0xBAD])
    try:
        with pytest.raises(ValueError):
            rx_commit(table, records([(0, 0, 100), (0, 100, 100)]), memoryview(backing)[:12],
                      [0], [150], _PLAIN, _GSO, 1000, HDR)
    finally:
        table.release()
