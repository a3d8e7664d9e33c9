"""What keeps a hostile front end from stopping the back end through the memory and the
eventfds it shares with us (issue 17). The C half is cffi_build/virtio/guard.c.

Guest memory that shrinks under us. The front end keeps the files our guest mappings come
from; if it truncates one (ftruncate(memfd, 0)) after SET_MEM_TABLE (or SET_LOG_BASE), our
next access to a lost page raises SIGBUS, which would end the process, whether the access is
C's (ring.c) or a Python memoryview's. Sealing (F_SEAL_SHRINK) would prevent it, but only
for memfds, and not every front end seals (tests/virtio/frontend.py does not, and file-backed
guest memory cannot be sealed), so instead every guest mapping is registered here
(`Registration`, at most 256 at a time) and a SIGBUS handler in C covers them: a fault inside a
registered mapping gets anonymous zero pages mapped over the faulting page (MAP_FIXED), the
access completes (reads zeros; writes go nowhere), and the fault is counted for that
registration (`faults()`). `events()` moves with every such fault: the back end reads it after each
message, kick and flush (one C call) and, when it moved, drops the front end whose mapping
faulted, with one log line. A SIGBUS anywhere else restores the previous
action and returns, so the real crash (or faulthandler's report) happens. The handler is
(re)installed at each registration, so one installed later (faulthandler) is chained to.
Mappings are also refused at map time when the file is already smaller than they need.

Eventfds that block. Kick, call and error fds are the front end's eventfds; it shares their
file description with us, so it can clear O_NONBLOCK on them whenever it likes. `prepare()`
checks an fd is an eventfd (an anonymous inode like the one of our own eventfd: no /proc,
which the sandbox takes away) and sets O_NONBLOCK; then
- reads (`drain()`, the kick) use preadv2(RWF_NOWAIT): never blocking whatever the flags;
- writes (`signal()`, call and error fds) cannot use RWF_NOWAIT (eventfd has no write_iter:
  EOPNOTSUPP), and one blocks when the counter is full and the fd was made blocking again.
  A watchdog bounds them: a POSIX timer of the loop thread, armed lazily (when less than
  half of its 100 ms is left: at most two timer_settime() a period while notifying, none when
  idle, one spurious wake-up after a burst), whose real-time signal has a handler without
  SA_RESTART, so a write blocked for 50-100 ms returns EINTR. That counts as an event
  (`events()`), and `signal()` returns STALLED: the back end drops that front end.
  No extra system call per notification: the clock is read through the vDSO.
"""

from __future__ import annotations

import errno
import mmap
import os
import stat
import weakref

from ._guard import ffi, lib

OK = 0
FULL = 1  # an eventfd's counter is full: a notification is pending anyway
STALLED = -errno.EINTR  # a write blocked and the watchdog ended it


class GuardError(Exception):
    """A mapping cannot be guarded, or an fd is not an eventfd."""


def _address(mm: mmap.mmap) -> int:
    p = ffi.from_buffer("char[]", mm)
    try:
        return int(ffi.cast("uintptr_t", p))
    finally:
        ffi.release(p)


def page_size(st: os.stat_result) -> int:
    """The page size of a mapping of this file (hugetlbfs files say theirs in st_blksize)."""
    size = st.st_blksize
    if size > mmap.PAGESIZE and not size & (size - 1):
        return size
    return mmap.PAGESIZE


class Registration:
    """One guarded mapping: its slot in the C table, given back when close() is called or
    when the mmap object goes (a mapping dropped without close(): its address range may be
    reused, and a stale slot would take that mapping's faults)."""

    __slots__ = ("slot",)

    def __init__(self, mm: mmap.mmap, page: int = mmap.PAGESIZE) -> None:
        slot = lib.vg_register(_address(mm), len(mm), page)
        if slot < 0:
            raise GuardError(f"cannot guard the mapping: {os.strerror(-slot)}")
        self.slot = int(slot)
        weakref.finalize(mm, self.close)

    def faults(self) -> int:
        """SIGBUS faults in this mapping (pages replaced by zeros)."""
        return int(lib.vg_faults(self.slot)) if self.slot >= 0 else 0

    def close(self) -> None:
        if self.slot >= 0:
            lib.vg_unregister(self.slot)
            self.slot = -1


events = lib.vg_events  # () -> int: faults and stalled writes so far, every registration


def check_file(fd: int, end: int) -> os.stat_result:
    """fstat() of a memory fd that must hold `end` bytes; GuardError if it does not."""
    try:
        st = os.fstat(fd)
    except OSError as e:
        raise GuardError(f"fstat: {e.strerror}") from None
    if stat.S_ISREG(st.st_mode) and st.st_size < end:
        raise GuardError(f"the file holds {st.st_size} bytes, not {end}")
    return st


_eventfd_id: tuple[int, int] | None = None


def _eventfd_identity() -> tuple[int, int]:
    global _eventfd_id
    if _eventfd_id is None:
        fd = os.eventfd(0)
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        _eventfd_id = (st.st_dev, st.st_ino)
    return _eventfd_id


def prepare(fd: int) -> None:
    """Check that `fd` is an eventfd (an anonymous inode, as ours are) and make it
    non-blocking; GuardError if not. Also sets up the write watchdog for this thread."""
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != _eventfd_identity():
            raise GuardError("not an eventfd")
        os.set_blocking(fd, False)
    except OSError as e:
        raise GuardError(f"eventfd: {e.strerror}") from None
    lib.vg_watchdog_init()  # -EBUSY from another thread: writes there go unguarded


drain = lib.vg_eventfd_drain  # (fd) -> 1 read, 0 nothing to read, -errno
signal = lib.vg_eventfd_signal  # (fd) -> OK, FULL, STALLED or -errno
