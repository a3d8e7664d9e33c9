"""virtio.ring on plain buffers: the C chain pop and used batch against exact-size areas.

The areas here are bytearrays cut to the byte, so a build with -fsanitize=address (see
doc/performance.md, "Descriptor chains in C") reports any access past them.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio.ring import (
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
    used_size,
)

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
