"""Typed wrapper over the cffi ring helpers (cffi_build/ring.c): ordered index accesses.

The C side re-checks every bound; a -1 from it means the ring areas given here were too small
or misaligned, which VirtQueue checks before building a RingAccess, so RingError here is a bug.
"""

from __future__ import annotations

from ._ring import ffi, lib  # type: ignore[import-not-found]


class RingError(Exception):
    """A ring helper refused an access (area too small or misaligned)."""


def avail_size(num: int) -> int:
    return 6 + 2 * num


def used_size(num: int) -> int:
    return 6 + 8 * num


def _ok(value: int) -> int:
    if value < 0:
        raise RingError("ring access outside the mapped ring area")
    return value


class RingAccess:
    """Ordered loads/stores on one split ring's avail and used areas (views into guest memory)."""

    __slots__ = ("num", "_avail", "_avail_len", "_used", "_used_len")

    def __init__(self, avail: memoryview, used: memoryview, num: int) -> None:
        if len(avail) < avail_size(num) or len(used) < used_size(num):
            raise RingError("ring areas too small for the queue size")
        self.num = num
        self._avail = ffi.from_buffer("uint8_t[]", avail)
        self._avail_len = len(avail)
        self._used = ffi.from_buffer("uint8_t[]", used, require_writable=True)
        self._used_len = len(used)
        # Alignment (avail 2, used 4) is checked by every C call; fail early instead.
        if lib.vr_avail_flags(self._avail, self._avail_len) < 0 or \
                lib.vr_used_idx(self._used, self._used_len) < 0:
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

    def used_put(self, idx: int, head: int, length: int) -> None:
        _ok(lib.vr_used_put(self._used, self._used_len, self.num, idx & 0xFFFF, head, length))

    def used_publish(self, idx: int) -> None:
        """used->idx with release ordering, then a full fence (before reading used_event)."""
        _ok(lib.vr_used_publish(self._used, self._used_len, idx & 0xFFFF))

    def used_idx(self) -> int:
        return _ok(lib.vr_used_idx(self._used, self._used_len))

    def used_flags_set(self, flags: int) -> None:
        _ok(lib.vr_used_flags_set(self._used, self._used_len, flags))

    def avail_event_set(self, value: int) -> None:
        _ok(lib.vr_avail_event_set(self._used, self._used_len, self.num, value & 0xFFFF))

    def release(self) -> None:
        """Drop the buffer exports now, so the guest memory mapping can be closed."""
        ffi.release(self._avail)
        ffi.release(self._used)
