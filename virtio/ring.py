"""Typed wrapper over the cffi ring helpers (cffi_build/virtio/ring.c): ordered index accesses,
descriptor chains popped a batch per call, used elements written a batch per call.

The C side re-checks every bound; a -1 from it means the ring areas given here were too small
or misaligned, which VirtQueue checks before building a RingAccess, so RingError here is a bug.
What the driver gets wrong in its descriptors comes back as an error code (POP_E_*), which
VirtQueue turns into a broken queue.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from ._ring import ffi, lib

# vr_pop_chains() status codes (cffi_build/virtio/ring_walk.h)
POP_OK = 0
POP_E_AVAIL_JUMP = 1
POP_E_HEAD = 2
POP_E_LOOP = 3
POP_E_INDIRECT_FEATURE = 4
POP_E_INDIRECT_PLACE = 5
POP_E_INDIRECT_LEN = 6
POP_E_INDIRECT_OUTSIDE = 7
POP_E_BUF_OUTSIDE = 8
POP_E_READ_AFTER_WRITE = 9
POP_E_NEXT = 10
POP_E_ARGS = 11
POP_FULL = 12  # not an error: the buffer array filled up; pop again

READ_E_LAYOUT = -4096  # vr_read_frames(): the records don't hold the frames (VR_E_LAYOUT)

MAX_CHAIN_BUFS = 32768  # a chain has at most max(queue size, indirect entries) <= 32768 buffers
_BUFS_START = 1024  # buffer records at first (24 bytes each); grown to MAX_CHAIN_BUFS if needed


class RingError(Exception):
    """A ring helper refused an access (area too small or misaligned)."""


def _cdata_address(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


def _address(view: memoryview) -> int:
    """The host address of a view's first byte (its export released at once)."""
    p = ffi.from_buffer("uint8_t[]", view)
    try:
        return int(ffi.cast("uintptr_t", p))
    finally:
        ffi.release(p)


def avail_size(num: int) -> int:
    return 6 + 2 * num


def used_size(num: int) -> int:
    return 6 + 8 * num


def _ok(value: int) -> int:
    if value < 0:
        raise RingError("ring access outside the mapped ring area")
    return value


class RegionTable:
    """Guest memory regions as the C chain walk sees them: (guest-physical start, size, host
    pointer) sorted by start, and each region's memoryview at the same index (buffers are
    slices of it). The pointers are buffer exports of the views: release() them before the
    regions are unmapped; a released table has no regions, so a stale one cannot be used to
    reach unmapped memory."""

    __slots__ = ("views", "count", "cdata", "_exports")

    def __init__(self, regions: Sequence[tuple[int, memoryview]] = ()) -> None:
        regions = sorted(regions, key=lambda r: r[0])
        self.views = [view for _, view in regions]
        self.count = len(regions)
        self.cdata = ffi.new("struct vr_region[]", max(self.count, 1))
        self._exports = []
        for i, (gpa, view) in enumerate(regions):
            host = ffi.from_buffer("uint8_t[]", view, require_writable=True)
            self._exports.append(host)
            self.cdata[i].gpa = gpa
            self.cdata[i].size = len(view)
            self.cdata[i].host = host

    def release(self) -> None:
        self.count = 0
        self.views = []
        for host in self._exports:
            ffi.release(host)
        self._exports = []


class _Scratch:
    """C arrays the helpers below fill and Python reads back at once: kept between calls
    (the daemon is one thread) instead of a cffi allocation each."""

    def __init__(self) -> None:
        self._arrays: dict[str, Any] = {}

    def get(self, name: str, ctype: str, n: int) -> Any:
        """The array `name` of at least n `ctype`s (contents left from its last use)."""
        array = self._arrays.get(name)
        if array is None or len(array) < n:
            array = self._arrays[name] = ffi.new(f"{ctype}[]", max(n, 64))
        return array


_scratch = _Scratch()


@dataclass(frozen=True, slots=True)
class RxFiller:
    """The C that fills RX frames laid out over guest buffers, for net.fill_rx_frames():
    `reader` (a vr_frame_reader: fills the frames' payload iovecs from wherever its user reads,
    returns the bytes read or -errno) and `writer` (a vr_frame_writer: the frames' headers in
    their first buffers, and their lengths), as function addresses, and their arguments'
    addresses. They get only pointers into buffers checked against the guest's memory."""

    reader: int
    reader_arg: int
    writer: int
    writer_arg: int


def read_frames(reader: int, reader_arg: int, regions: RegionTable, records: bytearray,
                starts: list[int], hdr: int, frame_len: int, off: int,
                room: int) -> tuple[int, list[int]]:
    """vr_read_frames() (cffi_build/virtio/ring.c) on its own, as vr_rx_fill() calls it (the
    daemon goes through RingAccess.rx_fill(); the tests check the read here): `reader` (see
    RxFiller) straight into frames laid out over guest buffers: frame i over the chains
    records[starts[i]:starts[i + 1]] ((region, offset, length) u64 triples as
    RingAccess.pop() writes them), `frame_len` bytes from byte `hdr` of its first buffer
    on; each frame's payload from frame byte `off` on, `room` bytes at most in all.
    Returns the bytes read and each frame's payload room. OSError with the reader's errno;
    ValueError if the records don't hold the frames (nothing is read then)."""
    caps = _scratch.get("caps", "uint32_t", len(starts))
    n = lib.vr_read_frames(reader, reader_arg, regions.cdata, regions.count,
                           ffi.from_buffer("uint64_t[]", records), len(records) // 24, starts,
                           len(starts), hdr, frame_len, off, max(room, 0), caps)
    if n < 0:
        if n == READ_E_LAYOUT:  # before the reader runs
            raise ValueError("frame layout outside the guest buffers given")
        raise OSError(-n, os.strerror(-n))
    return n, ffi.unpack(caps, len(starts))


# vr_rx_layout() stop reasons (cffi_build/virtio/ring.c)
LAYOUT_COUNT = 0  # as many frames as asked
LAYOUT_END = 1  # the records ended where a frame would start
LAYOUT_SHORT = 2  # they ended inside a frame
LAYOUT_ODD = 3  # a frame's first buffer is too short for the headers
LAYOUT_VIEWS = 4  # the view budget is reached

# vr_rx_gather() outcomes (cffi_build/virtio/ring.c)
GATHER_OK = 0  # frames laid out (none when the ring had too few chains)
GATHER_GENERAL = 1  # nothing kept: a ring shape for the Chain-based path
GATHER_ERROR = 2  # a bad chain or avail index (status() says which)

class Fill(enum.IntEnum):
    """vr_rx_fill() outcomes (cffi_build/virtio/ring.c)."""

    OK = 0  # frames sent (none, with 0 bytes read: the end of the data)
    EMPTY = 1  # no frame laid out: the ring has too few chains
    GENERAL = 2  # nothing kept: a ring shape for the Chain-based path
    ERROR = 3  # a bad chain or avail index (status() says which)
    READ = 4  # the reader failed
    LAYOUT = 5  # the records don't hold the frames, or no reader or writer: nothing read
    WRITER = 6  # the frame writer refused the frames: read, nothing committed
    COMMIT = 7  # the frames can't hold their lengths: nothing committed


FILL_MAX = 256  # frames per call


class RxFill(NamedTuple):
    """What one vr_rx_fill() call did: its out[] slots, in order."""

    outcome: int  # a Fill
    kept: int  # chains popped and kept (the caller moves last_avail on by them)
    popped: int  # chains popped in all
    dry: int  # 1 if the ring ran dry (the kick re-armed)
    laid: int  # frames laid out
    sent: int  # frames sent
    pairs: int  # (head, length) pairs to push
    give_back: int  # chains to give back after them
    committed: int  # vr_rx_commit()'s counters: frames, over several chains, GSO
    scattered: int
    gso: int
    room: int  # the payload room of all frames laid out
    buf_len: int  # the first frame's first buffer length (the guest's buffer size)


_FILL_OUT_LEN = len(RxFill._fields)


class FillSite(NamedTuple):
    """RingAccess.fill_site(): vr_rx_fill() and its fixed arguments on one ring, as addresses
    (for a device's C: cffi_build/vhostpasst/dataplane.c), and the region table they were
    taken from (the site is good while the ring and that table are)."""

    fill: int
    ctx: int
    regions: int
    nregions: int
    used: int
    used_len: int
    recs: int
    chrecs: int
    num: int
    elems: int
    spare: int
    out: int
    table: RegionTable


def rx_layout(records: bytearray, start: int, need: int, hdr: int, head: int, count: int,
              views: int, dry: bool, starts: list[int]) -> tuple[int, int, int, int]:
    """vr_rx_layout() (cffi_build/virtio/ring.c) on its own, as vr_rx_gather() calls it between
    pops (the daemon goes through RingAccess.rx_gather(); the tests check the grouping
    here). Mergeable RX frames of `need` bytes over chains of one buffer each, from buffer record
    `start` on (records as RingAccess.pop() writes them, one per chain), grouped as the
    Chain-based path does, each frame's first buffer
    at least `hdr` + `head` bytes; at most `count` frames and `views` chains; `dry`: the ring
    had no more to pop. Appends each frame's first record to `starts`; returns (the record
    after the frames, the chains they take, why it stopped: LAYOUT_*, with LAYOUT_SHORT the
    chains to pop for the unfinished frame)."""
    cap = max(count, 0)
    out = _scratch.get("layout_out", "uint32_t", 4)
    got = _scratch.get("starts", "uint32_t", cap)
    n = lib.vr_rx_layout(ffi.from_buffer("uint64_t[]", records), len(records) // 24, start,
                         need, hdr, head, cap, max(views, 0), dry, got, out)
    starts += ffi.unpack(got, n)
    return out[0], out[1], out[2], out[3]


def rx_commit(regions: RegionTable, records: bytes | bytearray,
              chain_records: bytes | bytearray, starts: list[int], lengths: Sequence[int],
              plain: bytes, gso: bytes, gso_from: int, hdr: int
              ) -> tuple[Any, int, int, tuple[int, int, int]]:
    """Headers and used elements of frames rx_layout() laid out and the caller filled (frame
    i `lengths[i]` bytes, 0 or missing: not sent): the 12-byte header at the start of each
    sent frame's first buffer, `plain`'s or, past `gso_from` bytes, `gso`'s first 10 bytes
    and num_buffers; returns (a C array of [head, length, ...] to push: VirtQueue.
    push_written(), valid until the next call; how many pairs; chains to rewind after them;
    (frames committed, of those over several chains, of those GSO)). ValueError if a frame
    can't hold its length (nothing written)."""
    nrecs = len(records) // 24
    if len(chain_records) < 12 * nrecs or len(plain) < 10 or len(gso) < 10:
        raise ValueError("chain records or header templates shorter than the buffer records")
    elems = _scratch.get("elems", "uint32_t", 2 * nrecs)
    spare = _scratch.get("spare", "uint32_t", nrecs)
    tail = _scratch.get("tail", "uint32_t", 1)
    counters = _scratch.get("counters", "uint32_t", 3)
    n = lib.vr_rx_commit(regions.cdata, regions.count, ffi.from_buffer("uint64_t[]", records),
                         ffi.from_buffer("uint32_t[]", chain_records), nrecs, starts,
                         len(starts), lengths, len(lengths), plain, gso, gso_from, hdr, elems,
                         spare, tail, counters)
    if n < 0:
        raise ValueError("frame lengths the buffers can't hold")
    return elems, n, tail[0], (counters[0], counters[1], counters[2])


class RingAccess:
    """Ordered loads/stores on one split ring's avail and used areas (views into guest memory),
    and chain pops from its descriptor table. `ctx` (the pop's C context: the areas and the
    record arrays), `used` and `used_len` are what virtio.net's C TX gather takes (its module
    includes this one's types)."""

    __slots__ = ("num", "_avail", "_avail_len", "used", "used_len", "_desc", "_desc_len",
                 "_chains", "chains_mv", "_bufs", "bufs_mv", "_buf_cap", "ctx", "status_mv",
                 "_elems", "_elems_cap", "_grecs", "_grecs_mv", "_gchains", "_gchains_mv",
                 "_gout", "_fout", "_felems", "_fspare")

    def __init__(self, avail: memoryview, used: memoryview, num: int,
                 desc: memoryview | None = None) -> None:
        if len(avail) < avail_size(num) or len(used) < used_size(num):
            raise RingError("ring areas too small for the queue size")
        if desc is not None and len(desc) < 16 * num:
            raise RingError("descriptor table too small for the queue size")
        # Alignment (avail 2, used 4, desc 16) of the host addresses, before any export is
        # made: a region mapped at an odd offset puts a well-aligned ring address at an odd
        # host address, and a refused ring must leave no export behind (it would keep the
        # views, and the region, from being released).
        if _address(avail) % 2 or _address(used) % 4 or \
                (desc is not None and _address(desc) % 16):
            raise RingError("misaligned ring area")
        self.num = num
        self._avail = ffi.from_buffer("uint8_t[]", avail)
        self._avail_len = len(avail)
        self.used = ffi.from_buffer("uint8_t[]", used, require_writable=True)
        self.used_len = len(used)
        self._desc = ffi.NULL if desc is None else ffi.from_buffer("uint8_t[]", desc)
        self._desc_len = 0 if desc is None else len(desc)
        # The pop's fixed arguments live in one C struct (fewer per-call conversions); its
        # outputs are read back through memoryviews, not per-field cdata.
        self.ctx = ffi.new("struct vr_pop_ctx *")
        self.ctx.desc = self._desc
        self.ctx.desc_len = self._desc_len
        self.ctx.avail = self._avail
        self.ctx.avail_len = self._avail_len
        self.ctx.num = num
        self._chains = ffi.new("uint32_t[]", 3 * num)
        self.ctx.chains = self._chains
        self.ctx.chain_cap = num
        self.chains_mv = memoryview(ffi.buffer(self._chains)).cast("I")
        self._buf_cap = 0
        self._bufs: Any = None
        self.bufs_mv = memoryview(b"")
        self._grow_bufs(min(_BUFS_START, MAX_CHAIN_BUFS))
        self.status_mv = memoryview(ffi.buffer(self.ctx.status)).cast("Q")
        self._elems_cap = 0
        self._elems: Any = None
        # rx_gather()'s records: one chain of one buffer each, at most the whole ring
        self._grecs = ffi.new("uint64_t[]", 3 * num)
        self._grecs_mv = memoryview(ffi.buffer(self._grecs))
        self._gchains = ffi.new("uint32_t[]", 3 * num)
        self._gchains_mv = memoryview(ffi.buffer(self._gchains))
        self._gout = ffi.new("uint32_t[]", 4)
        # rx_fill()'s outputs
        self._fout = ffi.new("uint64_t[]", _FILL_OUT_LEN)
        self._felems = ffi.new("uint32_t[]", 2 * num)
        self._fspare = ffi.new("uint32_t[]", num)
        # Alignment (avail 2, used 4) is checked by every C call; fail early instead.
        if lib.vr_avail_flags(self._avail, self._avail_len) < 0 or \
                lib.vr_used_idx(self.used, self.used_len) < 0:
            raise RingError("misaligned ring area")

    def avail_idx(self) -> int:
        """avail->idx with acquire ordering."""
        return _ok(lib.vr_avail_idx(self._avail, self._avail_len))

    def avail_flags(self) -> int:
        return _ok(lib.vr_avail_flags(self._avail, self._avail_len))

    def avail_head(self, idx: int) -> int:
        return _ok(lib.vr_avail_head(self._avail, self._avail_len, self.num, idx & 0xFFFF))

    def used_event(self) -> int:
        return _ok(lib.vr_used_event(self._avail, self._avail_len, self.num))

    def used_publish(self, idx: int) -> None:
        """used->idx with release ordering, then a full fence (before reading used_event)."""
        if lib.vr_used_publish(self.used, self.used_len, idx & 0xFFFF) < 0:  # _ok(), inline:
            raise RingError("ring access outside the mapped ring area")  # once per flush

    def used_idx(self) -> int:
        return _ok(lib.vr_used_idx(self.used, self.used_len))

    def used_flags_set(self, flags: int) -> None:
        _ok(lib.vr_used_flags_set(self.used, self.used_len, flags))

    def avail_event_set(self, value: int) -> None:
        _ok(lib.vr_avail_event_set(self.used, self.used_len, self.num, value & 0xFFFF))

    def _grow_bufs(self, cap: int) -> None:
        self._bufs = ffi.new("uint64_t[]", 3 * cap)
        self.bufs_mv = memoryview(ffi.buffer(self._bufs)).cast("Q")
        self._buf_cap = cap
        self.ctx.bufs = self._bufs
        self.ctx.buf_cap = cap

    def pop(self, last_avail: int, count: int, indirect: bool, regions: RegionTable) -> int:
        """Pop up to `count` (>= 0) chains from avail entry `last_avail` (C, one call; avail
        idx read with acquire). Returns n >= 0 when all went well, else -1 - n and status()
        says why. Chain i is chains_mv[3i:3i+3] = head, readable count, writable count; its
        buffers follow the previous chain's in bufs_mv, 3 values each: region index (into
        `regions`), offset in the region, length; readable ones first."""
        return lib.vr_pop(self.ctx, last_avail & 0xFFFF, count, indirect, regions.cdata,
                          regions.count)

    def status(self) -> list[int]:
        """After pop(): [code, value, value2, buffers written]: code POP_OK, POP_FULL (no room
        for the next chain's buffers: grow() if nothing was popped, then pop again) or the
        POP_E_* that stopped at the chain after those popped."""
        status = self.status_mv.tolist()
        if status[0] == POP_E_ARGS:
            raise RingError("chain pop refused its arguments")
        return status

    def grow(self) -> bool:
        """Room for the longest possible chain; False if there already was."""
        if self._buf_cap >= MAX_CHAIN_BUFS:
            return False
        self._grow_bufs(MAX_CHAIN_BUFS)
        return True

    def pop_chains(self, last_avail: int, count: int, indirect: bool,
                   regions: RegionTable) -> tuple[int, list[int], list[int], list[int]]:
        """pop() as lists: (popped, status, chains, bufs), growing the buffer array once if a
        lone chain does not fit it."""
        count = max(0, min(count, self.num))
        while True:
            r = self.pop(last_avail, count, indirect, regions)
            n = r if r >= 0 else -1 - r
            status = self.status()
            if n or status[0] != POP_FULL or not self.grow():
                break
        return n, status, self.chains_mv[:3 * n].tolist(), self.bufs_mv[:3 * status[3]].tolist()

    def rx_gather(self, last_avail: int, indirect: bool, regions: RegionTable, rearm: bool,
                  count: int, need: int, hdr: int, head: int, max_views: int, hint: int
                  ) -> tuple[int, list[int], int, int, bool, bytes, bytes]:
        """Mergeable RX frames over chains of one writable buffer each, popped and laid out
        in one C call (vr_rx_gather() in cffi_build/virtio/ring.c: net.rx_frames()'s pops and
        rx_layout() calls, the dry ring's kick re-armed with one store when `rearm`).
        Returns (GATHER_*, each frame's first record, chains kept, chains popped in all,
        starved, the kept chains' buffer records (region, offset, length) u64 and chain
        records (head, readable, writable) u32 as bytes). With GATHER_ERROR status() says
        what was wrong and "chains popped" counts the good ones before it."""
        count = max(0, min(count, self.num))
        out = self._gout
        starts = _scratch.get("gather_starts", "uint32_t", count)
        n = lib.vr_rx_gather(self.ctx, last_avail & 0xFFFF, indirect, regions.cdata,
                             regions.count, self.used, self.used_len, rearm, count, need,
                             hdr, head, min(max(max_views, 0), 0xFFFFFFFF),
                             min(max(hint, 0), 0xFFFFFFFF), self._grecs, self._gchains,
                             self.num, starts, out)
        kept = out[0]
        return (out[3], ffi.unpack(starts, n) if n > 0 else [], kept, out[1], bool(out[2]),
                self._grecs_mv[:24 * kept].tobytes(), self._gchains_mv[:12 * kept].tobytes())

    def gather_records(self, kept: int) -> tuple[list[int], list[int]]:
        """The chain records (head, readable, writable) and buffer records (region, offset,
        length) of the first `kept` chains the last rx_gather()/rx_fill() popped."""
        chains = memoryview(ffi.buffer(self._gchains, 12 * kept)).cast("I").tolist()
        bufs = memoryview(ffi.buffer(self._grecs, 24 * kept)).cast("Q").tolist()
        return chains, bufs

    def popped_records(self, kept: int) -> tuple[list[int], list[int]]:
        """The chain records and buffer records of the first `kept` chains of the last pop
        into the pop arrays (pop(), or virtio.net's TX gather, which leaves status_mv[3] their
        buffer count)."""
        return self.chains_mv[:3 * kept].tolist(), self.bufs_mv[:3 * self.status_mv[3]].tolist()

    def rx_fill(self, last_avail: int, indirect: bool, regions: RegionTable, rearm: bool,
                count: int, need: int, hdr: int, head: int, max_views: int, hint: int,
                filler: RxFiller, room: int, plain: bytes, gso: bytes,
                gso_from: int) -> tuple[int, RxFill, Any]:
        """rx_gather(), read_frames(), the frame writer and rx_commit() in one C call
        (vr_rx_fill() in cffi_build/virtio/ring.c) with `filler`'s reader and writer.
        Returns (bytes read or -errno, what it did, the (head, length) pairs to push:
        VirtQueue.push_written(), valid until the next call)."""
        # (vr_rx_fill() clamps count to the ring and FILL_MAX itself)
        out = self._fout
        n = lib.vr_rx_fill(self.ctx, last_avail & 0xFFFF, indirect, regions.cdata,
                           regions.count, self.used, self.used_len, rearm, max(count, 0),
                           need, hdr, head, max_views, hint, self._grecs, self._gchains,
                           self.num, filler.reader, filler.reader_arg, max(room, 0),
                           filler.writer, filler.writer_arg, plain, gso, gso_from,
                           self._felems, self._fspare, out)
        # (tuple.__new__: RxFill(...) would be one more Python call per fill)
        return n, tuple.__new__(RxFill, ffi.unpack(out, _FILL_OUT_LEN)), self._felems

    def fill_site(self, regions: RegionTable) -> FillSite:
        """What a device's own C needs to call vr_rx_fill() on this ring with `regions`, as
        addresses (rx_fill()'s fixed arguments and its output arrays): the caller passes
        last_avail, indirect, rearm and hint per call, and reads the outcome with
        fill_result() after it."""
        a = _cdata_address
        return FillSite(a(ffi.addressof(lib, "vr_rx_fill")), a(self.ctx), a(regions.cdata),
                        regions.count, a(self.used), self.used_len, a(self._grecs),
                        a(self._gchains), self.num, a(self._felems), a(self._fspare),
                        a(self._fout), regions)

    def fill_result(self) -> tuple[RxFill, Any]:
        """What the last vr_rx_fill() on this ring did, and its (head, length) pairs."""
        return tuple.__new__(RxFill, ffi.unpack(self._fout, _FILL_OUT_LEN)), self._felems

    def used_put_many(self, idx: int, elems: list[int]) -> None:
        """Used elements at idx, idx + 1, ...: `elems` is [head, length, head, length, ...]
        (each < 2**32). Not visible to the driver before used_publish()."""
        n = len(elems) // 2
        if n == 0:
            return
        if len(elems) > self._elems_cap:
            self._elems_cap = max(len(elems), 2 * self.num)
            self._elems = ffi.new("uint32_t[]", self._elems_cap)
        self._elems[0:len(elems)] = elems
        self.used_put_c(idx, self._elems, n)

    def used_put_c(self, idx: int, elems: Any, n: int) -> None:
        """used_put_many() from a C array of 2n u32 (head, length, ...): no list."""
        if n > 0:
            _ok(lib.vr_used_put_many(self.used, self.used_len, self.num, idx & 0xFFFF,
                                     elems, n))

    def release(self) -> None:
        """Drop the buffer exports now, so the guest memory mapping can be closed."""
        self.ctx.desc_len = self.ctx.avail_len = 0  # a pop after this is refused (VR_E_ARGS)
        self.used_len = 0  # and so is a store in the used ring by a gather
        ffi.release(self._avail)
        ffi.release(self.used)
        if self._desc_len:
            ffi.release(self._desc)
            self._desc_len = 0
