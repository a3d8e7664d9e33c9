"""Guest memory map: mapping from fds, translation bounds, add/remove, reset."""

from __future__ import annotations

import os

import pytest

from virtio.memory import GuestMemory, OutOfRange, RegionError
from virtio.message import RegionDesc

PAGE = 4096


def memfd(size: int) -> int:
    fd = os.memfd_create("guest")
    os.ftruncate(fd, size)
    return fd


def test_translate_gpa_and_uva_with_mmap_offset():
    fd = memfd(4 * PAGE)
    os.pwrite(fd, b"hello", PAGE + 10)
    mem = GuestMemory()
    mem.add(RegionDesc(gpa=0x10000, size=3 * PAGE, uaddr=0x7F0000, mmap_offset=PAGE), os.dup(fd))
    assert bytes(mem.gpa(0x10000 + 10, 5)) == b"hello"
    assert bytes(mem.uva(0x7F0000 + 10, 5)) == b"hello"
    mem.gpa(0x10000 + 20, 3)[:] = b"abc"
    assert os.pread(fd, 3, PAGE + 20) == b"abc"  # MAP_SHARED: the front end sees our writes
    mem.reset()
    os.close(fd)


def test_passed_fd_is_closed():
    fd = memfd(PAGE)
    mem = GuestMemory()
    mem.add(RegionDesc(0, PAGE, 0x1000, 0), fd)
    with pytest.raises(OSError):
        os.fstat(fd)
    mem.reset()


@pytest.mark.parametrize("addr, length", [
    (0x10000 - 1, 2),  # starts before the region
    (0x10000 + PAGE - 1, 2),  # crosses the region end
    (0x10000 + PAGE, 1),  # just past the end
    (0, 1),
    (1 << 63, 16),
    (0x10000, -1),
])
def test_out_of_range_refused(addr, length):
    mem = GuestMemory()
    mem.add(RegionDesc(0x10000, PAGE, 0x50000, 0), memfd(PAGE))
    with pytest.raises(OutOfRange):
        mem.gpa(addr, length)
    mem.reset()


def test_adjacent_regions_do_not_stitch():
    mem = GuestMemory()
    mem.add(RegionDesc(0, PAGE, 0x100000, 0), memfd(PAGE))
    mem.add(RegionDesc(PAGE, PAGE, 0x200000, 0), memfd(PAGE))
    assert len(mem.gpa(PAGE - 8, 8)) == 8
    assert len(mem.gpa(PAGE, 8)) == 8
    with pytest.raises(OutOfRange):
        mem.gpa(PAGE - 8, 16)
    mem.reset()


@pytest.mark.parametrize("desc", [
    RegionDesc(0, 0, 0, 0),  # empty
    RegionDesc((1 << 64) - PAGE, 2 * PAGE, 0, 0),  # wraps
    RegionDesc(PAGE // 2, PAGE, 1 << 40, 0),  # overlaps the existing region (gpa)
    RegionDesc(1 << 40, PAGE, 0x100000 + 8, 0),  # overlaps the existing region (uaddr)
    RegionDesc(1 << 40, 2 * PAGE, 1 << 41, 0),  # longer than the file
])
def test_bad_regions_refused(desc):
    mem = GuestMemory()
    mem.add(RegionDesc(0, PAGE, 0x100000, 0), memfd(PAGE))
    with pytest.raises(RegionError):
        mem.add(desc, memfd(PAGE))
    assert len(mem) == 1
    mem.reset()


def test_bad_fd_refused():
    mem = GuestMemory()
    r, w = os.pipe()
    with pytest.raises(RegionError):
        mem.add(RegionDesc(0, PAGE, 0, 0), r)
    os.close(w)


def test_set_table_is_all_or_nothing():
    mem = GuestMemory()
    fds = [memfd(PAGE), memfd(PAGE)]
    with pytest.raises(RegionError):
        mem.set_table([RegionDesc(0, PAGE, 0, 0), RegionDesc(0, PAGE, PAGE, 0)], fds)
    assert len(mem) == 0


def test_remove_and_view_outlives_unmap():
    mem = GuestMemory()
    desc = RegionDesc(0, PAGE, 0x1000, 0)
    mem.add(desc, memfd(PAGE))
    view = mem.gpa(0, 4)
    mem.remove(desc)
    view[:] = b"safe"  # still mapped: the view holds the mapping
    with pytest.raises(OutOfRange):
        mem.gpa(0, 4)
    with pytest.raises(RegionError):
        mem.remove(desc)
    view.release()


def _table_rows(mem: GuestMemory) -> list[tuple[int, int, int]]:
    t = mem.table
    return [(t.cdata[i].gpa, t.cdata[i].size, len(t.views[i])) for i in range(t.count)]


def test_region_table_for_c_follows_the_regions():
    mem = GuestMemory()
    assert mem.table.count == 0
    mem.add(RegionDesc(4 * PAGE, PAGE, 0x100000, 0), memfd(PAGE))
    mem.add(RegionDesc(0, 2 * PAGE, 0x200000, 0), memfd(2 * PAGE))
    assert _table_rows(mem) == [(0, 2 * PAGE, 2 * PAGE), (4 * PAGE, PAGE, PAGE)]  # by gpa
    old = mem.table
    mem.remove(RegionDesc(0, 2 * PAGE, 0x200000, 0))
    assert old.count == 0 and old.views == []  # a stale table reaches nothing
    assert _table_rows(mem) == [(4 * PAGE, PAGE, PAGE)]
    mem.reset()
    assert mem.table.count == 0


def test_region_table_host_pointer_is_the_mapping():
    from virtio._ring import ffi
    fd = memfd(2 * PAGE)
    mem = GuestMemory()
    mem.add(RegionDesc(0x10000, PAGE, 0x7F0000, PAGE), os.dup(fd))  # mmap_offset skipped
    ffi.memmove(mem.table.cdata[0].host + 5, b"via C", 5)
    assert os.pread(fd, 5, PAGE + 5) == b"via C"
    assert bytes(mem.gpa(0x10005, 5)) == b"via C"
    mem.reset()
    os.close(fd)


def test_table_pointers_released_before_unmap():
    """Unmapping must really close the mapping: the table's buffer exports go first (else
    the memoryview cannot be released and the region would stay mapped)."""
    mem = GuestMemory()
    desc = RegionDesc(0, PAGE, 0x1000, 0)
    region = mem.add(desc, memfd(PAGE))
    mem.remove(desc)
    assert region.mm.closed
    region = mem.add(desc, memfd(PAGE))
    mem.reset()
    assert region.mm.closed
