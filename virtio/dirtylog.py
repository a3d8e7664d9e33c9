"""The dirty-page log of a live migration (vhost-user "Migration", VHOST_F_LOG_ALL).

While the guest's memory is copied to the destination, the front end must learn which pages
the back end wrote behind its back (the used rings, the buffers of RX chains), to copy them
again. It hands over a shared bitmap with SET_LOG_BASE (VHOST_USER_PROTOCOL_F_LOG_SHMFD): bit
`page % 8` of byte `page / 8` stands for guest-physical page `page` (4 KiB). The marking is
an atomic OR in C (cffi_build/virtio/ring.c, vr_log_mark): the front end clears bits while we set
them, and other back ends of the same guest may share the bitmap.
"""

from __future__ import annotations

import os

from ._ring import ffi, lib
from .memory import MapError, map_shared, unmap_shared

LOG_PAGE = 4096  # VHOST_LOG_PAGE
MAX_LOG_SIZE = 1 << 40  # one bit per 4 KiB page: covers 2^55 bytes of guest memory


class DirtyLogError(Exception):
    """The front end's log description cannot be mapped."""


class DirtyLog:
    __slots__ = ("size", "_map", "_view", "_guard", "_c", "outside", "marks")

    def __init__(self, fd: int, size: int, offset: int) -> None:
        """Map `size` bytes of log at `offset` in `fd`; the fd is closed (we own it)."""
        if not 0 < size <= MAX_LOG_SIZE or not 0 <= offset <= MAX_LOG_SIZE:
            os.close(fd)
            raise DirtyLogError(f"log size {size:#x} at offset {offset:#x} out of range")
        try:
            self._map, self._view, self._guard = map_shared(fd, offset, size)
        except MapError as e:
            raise DirtyLogError(f"cannot map the log: {e}") from None
        self.size = size
        self._c = ffi.from_buffer("uint8_t[]", self._view, require_writable=True)
        self.outside = 0  # marks that reached beyond the log (the front end's mistake)
        self.marks = 0  # writes marked: said in the log when the log goes

    def mark(self, gpa: int, length: int) -> None:
        """Guest-physical [gpa, gpa + length) was written."""
        if length <= 0 or self._c is None:
            return
        self.marks += 1
        if gpa < 0 or gpa > 0xFFFFFFFFFFFFFFFF or \
                lib.vr_log_mark(self._c, self.size, gpa, min(length, 1 << 63)) < 0:
            self.outside += 1

    def faulted(self) -> bool:
        """The front end shrank the log's file under us (SIGBUS, zero pages mapped)."""
        return self._guard.faults() > 0

    def close(self) -> None:
        if self._c is not None:
            ffi.release(self._c)
            self._c = None
            unmap_shared(self._map, self._view, self._guard)
