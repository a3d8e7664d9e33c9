"""Guest memory: the regions the front end shares, and address translation into them.

Each region is mmap'd MAP_SHARED from the fd the front end passed (then the fd is closed).
Descriptors carry guest-physical addresses (GPA), ring addresses are front-end virtual
addresses (user addresses, "QVA"); both translate to memoryviews that never reach outside one
region. A range that crosses a region end or lies outside every region is refused with
OutOfRange: we do not stitch regions together (qemu never splits a descriptor buffer across
RAM slots in practice, and refusing is the safe answer to a guest that tries).

A memoryview into a region keeps its mapping alive: unmapping a region whose views are still
referenced only drops our reference, and the kernel mapping goes when the last view does. So a
stale view can never point at unmapped memory.

`table` is the same map for the C chain walk (ring.RegionTable: start, size and host pointer
per region, sorted by guest address), rebuilt whenever the regions change; its pointers are
released before any region is unmapped.
"""

from __future__ import annotations

import bisect
import mmap
import os
from dataclasses import dataclass

from . import guard
from .message import RegionDesc
from .ring import RegionTable

U64_MAX = (1 << 64) - 1


class MapError(Exception):
    """The front end's fd cannot be mapped as it described it."""


def map_shared(fd: int, offset: int, size: int
               ) -> tuple[mmap.mmap, memoryview, guard.Registration]:
    """Map `size` bytes at `offset` of the front end's `fd` (guest memory, the dirty log),
    shared and writable; the fd is closed whatever happens (we own it). Mapped from offset 0
    with the offset skipped in the view: mmap's offset must be page-aligned and the front
    end's need not be. A file already shorter than offset + size is refused; one the front
    end shrinks later faults with SIGBUS, which the mapping's guard registration (its slot,
    returned third; virtio/guard.py) turns into zero pages and a fault count."""
    try:
        st = guard.check_file(fd, offset + size)
        mm = mmap.mmap(fd, offset + size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except (OSError, ValueError, OverflowError, guard.GuardError) as e:
        raise MapError(str(e)) from None
    finally:
        _close(fd)
    try:
        reg = guard.Registration(mm, guard.page_size(st))
    except guard.GuardError as e:
        mm.close()
        raise MapError(str(e)) from None
    return mm, memoryview(mm)[offset:offset + size], reg


def unmap_shared(mm: mmap.mmap, view: memoryview, reg: guard.Registration) -> None:
    """Undo map_shared(). A view still exported (a bug) keeps the mapping, and its guard,
    until it goes."""
    try:
        view.release()
        mm.close()
    except BufferError:
        return  # views handed out still export it; the mapping goes with the last one
    reg.close()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class GuestMemoryError(Exception):
    """Base for guest-memory errors."""


class OutOfRange(GuestMemoryError):
    """An address range that is not wholly inside one mapped region."""


class RegionError(GuestMemoryError):
    """A region description or fd that cannot be mapped (overlap, overflow, bad fd, ...)."""


@dataclass
class Region:
    desc: RegionDesc
    mm: mmap.mmap
    view: memoryview  # exactly the region's bytes: [mmap_offset, mmap_offset + size)
    guard: guard.Registration  # its SIGBUS guard (virtio/guard.py)

    @property
    def gpa(self) -> int:
        return self.desc.gpa

    @property
    def uaddr(self) -> int:
        return self.desc.uaddr

    @property
    def size(self) -> int:
        return self.desc.size

    def faulted(self) -> bool:
        """The front end shrank the file under this region (SIGBUS, zero pages mapped)."""
        return self.guard.faults() > 0

    def unmap(self) -> None:
        unmap_shared(self.mm, self.view, self.guard)


def _check_desc(desc: RegionDesc) -> None:
    if desc.size == 0:
        raise RegionError("empty region")
    for name, base in (("guest", desc.gpa), ("user", desc.uaddr)):
        if base + desc.size - 1 > U64_MAX:
            raise RegionError(f"{name} address range of region wraps around")
    if desc.mmap_offset + desc.size > U64_MAX or desc.mmap_offset + desc.size > 1 << 62:
        raise RegionError("mmap offset too large")


class _Index:
    """Regions sorted by one of their base addresses, for bisect lookups."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.regions: list[Region] = []

    def insert(self, start: int, region: Region) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.regions.insert(i, region)

    def remove(self, region: Region) -> None:
        i = self.regions.index(region)
        del self.starts[i]
        del self.regions[i]

    def overlaps(self, start: int, size: int, base_of: str) -> bool:
        end = start + size
        for region in self.regions:
            r_start = getattr(region, base_of)
            if start < r_start + region.size and r_start < end:
                return True
        return False

    def find(self, addr: int, length: int, base_of: str) -> tuple[Region, int]:
        i = bisect.bisect_right(self.starts, addr) - 1
        if i >= 0 and length >= 0:
            region = self.regions[i]
            offset = addr - getattr(region, base_of)
            if offset + length <= region.size:
                return region, offset
        raise OutOfRange(f"{base_of} range {addr:#x}+{length:#x} is not inside one region")


class GuestMemory:
    def __init__(self, max_regions: int = 32) -> None:
        self.max_regions = max_regions
        self._by_gpa = _Index()
        self._by_uaddr = _Index()
        self.table = RegionTable()

    def _rebuild_table(self) -> None:
        self.table.release()
        self.table = RegionTable([(r.gpa, r.view) for r in self._by_gpa.regions])

    @property
    def regions(self) -> list[Region]:
        return list(self._by_gpa.regions)

    def __len__(self) -> int:
        return len(self._by_gpa.regions)

    # --- mapping ---------------------------------------------------------------------------
    def add(self, desc: RegionDesc, fd: int) -> Region:
        """Map one region from `fd`; the fd is closed whatever happens (we own it)."""
        try:
            _check_desc(desc)
            if len(self) >= self.max_regions:
                raise RegionError(f"more than {self.max_regions} regions")
            if self._by_gpa.overlaps(desc.gpa, desc.size, "gpa"):
                raise RegionError(f"guest range {desc.gpa:#x}+{desc.size:#x} overlaps a region")
            if self._by_uaddr.overlaps(desc.uaddr, desc.size, "uaddr"):
                raise RegionError(f"user range {desc.uaddr:#x}+{desc.size:#x} overlaps a region")
        except BaseException:
            _close(fd)
            raise
        try:
            mm, view, reg = map_shared(fd, desc.mmap_offset, desc.size)
        except MapError as e:
            raise RegionError(f"cannot map region: {e}") from None
        region = Region(desc, mm, view, reg)
        self._by_gpa.insert(desc.gpa, region)
        self._by_uaddr.insert(desc.uaddr, region)
        self._rebuild_table()
        return region

    def set_table(self, descs: list[RegionDesc], fds: list[int]) -> None:
        """Replace every region (SET_MEM_TABLE). All-or-nothing: on error, no region is left."""
        self.reset()
        fds = list(fds)
        try:
            while descs:
                self.add(descs[0], fds.pop(0))
                descs = descs[1:]
        except RegionError:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.reset()
            raise

    def remove(self, desc: RegionDesc) -> None:
        """Unmap the region with this guest address, user address and size (REM_MEM_REG)."""
        for region in self._by_gpa.regions:
            if (region.gpa, region.uaddr, region.size) == (desc.gpa, desc.uaddr, desc.size):
                self.table.release()  # its pointer into the region must go first
                self._by_gpa.remove(region)
                self._by_uaddr.remove(region)
                region.unmap()
                self._rebuild_table()
                return
        raise RegionError(f"no region at guest {desc.gpa:#x} size {desc.size:#x}")

    def reset(self) -> None:
        """Unmap everything."""
        self.table.release()
        self.table = RegionTable()
        for region in self._by_gpa.regions:
            region.unmap()
        self._by_gpa = _Index()
        self._by_uaddr = _Index()

    # --- translation -----------------------------------------------------------------------
    def gpa(self, addr: int, length: int) -> memoryview:
        """A writable view of guest-physical [addr, addr+length), inside one region."""
        region, offset = self._by_gpa.find(addr, length, "gpa")
        return region.view[offset:offset + length]

    def uva(self, addr: int, length: int) -> memoryview:
        """A writable view of front-end virtual [addr, addr+length), inside one region."""
        region, offset = self._by_uaddr.find(addr, length, "uaddr")
        return region.view[offset:offset + length]
