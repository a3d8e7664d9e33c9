"""Split virtqueue (virtio 1.2, 2.7), device side.

Chains are popped in C, a batch per call (RingAccess.pop_chains: avail ring, descriptor table
and indirect tables walked with every index and address checked; it returns each buffer as a
region index, offset and length), and used elements are written in C a batch per flush; the
avail/used indices and event fields go through RingAccess too (C, with the barriers). Buffers
are returned as memoryviews into guest memory (zero copy): readable ones to parse, writable
ones to fill in place. `_walk_py` is the same walk in Python, the reference the tests compare
the C walk with.

Anything the driver gets wrong (a head or next index out of range, a descriptor loop, a buffer
outside guest memory, an avail index that jumps by more than the queue size) raises
VirtQueueError and marks the queue broken: it is not processed again until it is reset, as the
spec allows ("the device MAY ... stop processing"), and the error eventfd is signalled.

Notification rules for a device using this class: pop() until it returns None (an empty pop
re-arms the driver's kick with EVENT_IDX), or come back later on its own; push() each used
chain, then flush() once per batch, which publishes used->idx and signals the call eventfd if
the driver wants it (VRING_AVAIL_F_NO_INTERRUPT, or used_event with EVENT_IDX).
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import dataclass
from itertools import islice
from typing import Any

from . import guard
from .dirtylog import DirtyLog
from .memory import GuestMemory, GuestMemoryError
from .message import VringAddr
from .ring import (
    POP_E_AVAIL_JUMP,
    POP_E_BUF_OUTSIDE,
    POP_E_HEAD,
    POP_E_INDIRECT_FEATURE,
    POP_E_INDIRECT_LEN,
    POP_E_INDIRECT_OUTSIDE,
    POP_E_INDIRECT_PLACE,
    POP_E_LOOP,
    POP_E_NEXT,
    POP_E_READ_AFTER_WRITE,
    POP_FULL,
    RingAccess,
    RingError,
    avail_size,
    used_size,
)

log = logging.getLogger(__name__)

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
DESC_SIZE = DESC.size  # 16
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1
VRING_F_LOG = 1  # SET_VRING_ADDR flags: log writes to the used ring at addr.log
USED_ELEM = struct.Struct("<II")  # id, len

MAX_QUEUE_SIZE = 32768  # the split-ring limit (virtio 1.2, 2.7)
MAX_INDIRECT = 32768  # entries in one indirect table; bounds the walk


# What the C walk's error codes mean, worded as the reference Python walk words them.
_POP_ERRORS = {
    POP_E_AVAIL_JUMP: "avail idx moved by {value} > queue size {num}",
    POP_E_HEAD: "head {value} >= queue size {num}",
    POP_E_LOOP: "descriptor chain from head {value} loops or is too long",
    POP_E_INDIRECT_FEATURE: "indirect descriptor without INDIRECT_DESC",
    POP_E_INDIRECT_PLACE: "indirect descriptor must be a lone head of the main table",
    POP_E_INDIRECT_LEN: "bad indirect table length {value}",
    POP_E_INDIRECT_OUTSIDE: "indirect table outside guest memory: {value:#x}+{value2:#x}",
    POP_E_BUF_OUTSIDE: "descriptor buffer outside guest memory: {value:#x}+{value2:#x}",
    POP_E_READ_AFTER_WRITE: "device-readable descriptor after a device-writable one",
    POP_E_NEXT: "next index {value} out of range {value2}",
}


class VirtQueueError(Exception):
    """The driver broke the ring's rules, or the ring cannot be set up as asked."""


def need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """vring_need_event: did used idx move past `event_idx` going from old to new?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


@dataclass(slots=True)
class Chain:
    """One available descriptor chain: device-readable buffers, then device-writable ones."""

    head: int
    readable: list[memoryview]
    writable: list[memoryview]

    @property
    def write_len(self) -> int:
        return sum(len(b) for b in self.writable)


class VirtQueue:
    def __init__(self, index: int, memory: GuestMemory, max_size: int = 1024) -> None:
        if not 1 <= max_size <= MAX_QUEUE_SIZE:
            raise ValueError("max_size out of range")
        self.index = index
        self.memory = memory
        self.max_size = max_size
        self.event_idx = False  # VIRTIO_RING_F_EVENT_IDX negotiated
        self.indirect = False  # VIRTIO_RING_F_INDIRECT_DESC negotiated
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.started = False
        self.stalled = False  # a write to its call/err eventfd blocked: drop the front end
        self._ring: RingAccess | None = None
        self._desc: memoryview | None = None
        self._used_area: memoryview | None = None
        self.reset()

    # --- configuration (from the vhost-user messages) --------------------------------------
    def reset(self) -> None:
        """Back to the initial state (rings unmapped, indices 0); fds are the owner's to close."""
        self.unmap()
        self.num = 0
        self.addr: VringAddr | None = None
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self.inflight = 0
        self.broken = False
        self.started = False
        self.enabled = False
        self.stalled = False
        self._pending = 0
        self._used: list[int] = []  # pushed, not yet written: [head, length, head, ...]
        self._notify = True
        # Live migration: the front end's dirty log while it asks for one (VHOST_F_LOG_ALL),
        # and the used index up to which the writes of used chains were marked in it.
        self.dirty_log: DirtyLog | None = None
        self._logged_idx = 0
        self._popped_writes: dict[int, list[tuple[int, int]]] = {}  # while logging, by head
        self._budget_warned = False

    def set_num(self, num: int) -> None:
        if not 1 <= num <= self.max_size or num & (num - 1):
            raise VirtQueueError(f"queue {self.index}: size {num} is not a power of two "
                                 f"<= {self.max_size}")
        self.num = num
        self.unmap()

    def set_addr(self, addr: VringAddr) -> None:
        """Record the ring addresses (front-end virtual) and map them now."""
        if self.num == 0:
            raise VirtQueueError(f"queue {self.index}: ring address before ring size")
        if addr.desc % 16 or addr.avail % 2 or addr.used % 4:
            raise VirtQueueError(f"queue {self.index}: misaligned ring address")
        old, self.addr = self.addr, addr
        if self._ring is not None and old is not None and \
                (old.desc, old.avail, old.used) == (addr.desc, addr.avail, addr.used):
            return  # a running ring's logging turned on or off (migration): no remap
        self.map()

    def set_base(self, base: int) -> None:
        if base > 0xFFFF:
            raise VirtQueueError(f"queue {self.index}: base {base} out of range for a split ring")
        self.last_avail_idx = self.used_idx = self._logged_idx = base
        self.signalled_used_valid = False
        self.inflight = 0

    def map(self) -> None:
        """(Re)translate the ring addresses, e.g. after the memory table changed.

        On failure the queue stays unmapped (and cannot be processed) and VirtQueueError says
        why; the caller decides whether that is an error for the front end.
        """
        self.unmap()
        if self.addr is None or self.num == 0:
            return
        try:
            desc = self.memory.uva(self.addr.desc, DESC_SIZE * self.num)
            avail = self.memory.uva(self.addr.avail, avail_size(self.num))
            used = self.memory.uva(self.addr.used, used_size(self.num))
        except GuestMemoryError as e:
            raise VirtQueueError(f"queue {self.index}: ring not in guest memory: {e}") from None
        try:
            ring = RingAccess(avail, used, self.num, desc)
        except RingError as e:  # e.g. a region mapped at an odd offset: refused, not a bug
            for view in (desc, avail, used):
                view.release()
            raise VirtQueueError(f"queue {self.index}: {e}") from None
        self._desc = desc
        self._used_area = used
        self._ring = ring  # holds the avail view (exported) until released

    def unmap(self) -> None:
        """Release the ring's views: the C exports first, then the views they were made
        from. Never raises: a view still exported (a bug) is left to the garbage collector
        (its region's mapping goes with it)."""
        ring, self._ring = self._ring, None
        if ring is not None:
            ring.release()
        desc, self._desc = self._desc, None
        used, self._used_area = self._used_area, None
        for view in (desc, used):
            if view is not None:
                try:
                    view.release()
                except BufferError:
                    log.error("queue %d: a ring view is still exported", self.index)

    @property
    def mapped(self) -> bool:
        return self._ring is not None

    @property
    def ready(self) -> bool:
        """Started, mapped and not broken: the device may pop and push."""
        return self.started and self._ring is not None and not self.broken

    def start(self) -> None:
        self.started = True
        if self._ring is not None and self.event_idx and not self.broken:
            # After SET_VRING_BASE the avail_event in guest memory may be stale.
            self._ring.avail_event_set(self.last_avail_idx)

    def stop(self) -> int:
        """Stop processing (GET_VRING_BASE); returns the index to resume from. Entries
        pushed but not yet published are published first (and the driver told): the front
        end reads used->idx from guest memory as the ring stops, and a back end that resumes
        this ring (after a migration, another daemon) writes after it."""
        if self._pending and self._ring is not None and not self.broken:
            self.flush()
        self.started = False
        if self.dirty_log is not None:  # the last flags and avail_event written, for the copy
            self._log_used_ring()
        return self.last_avail_idx

    # --- driver → device --------------------------------------------------------------------
    def _fail(self, why: str) -> VirtQueueError:
        self.broken = True
        log.warning("virtqueue %d broken: %s", self.index, why)
        if self.err_fd is not None and guard.signal(self.err_fd) == guard.STALLED:
            self.stalled = True
        return VirtQueueError(f"queue {self.index}: {why}")

    def _ring_or_fail(self) -> RingAccess:
        ring = self._ring
        if ring is None or self.broken:
            raise VirtQueueError(f"queue {self.index} is not usable "
                                 f"({'broken' if self.broken else 'not mapped'})")
        return ring

    def ring_used_idx(self) -> int | None:
        """used->idx as guest memory holds it (None if the ring is not mapped): for logs."""
        return self._ring.used_idx() if self._ring is not None else None

    def ring_access(self) -> RingAccess:
        """The ring's C accessor (for virtio.net's C gathers); VirtQueueError if
        the queue is not usable."""
        return self._ring_or_fail()

    def available(self) -> int:
        """How many chains the driver has made available that we have not popped."""
        ring = self._ring_or_fail()
        pending = (ring.avail_idx() - self.last_avail_idx) & 0xFFFF
        if pending > self.num:
            raise self._fail(f"avail idx moved by {pending} > queue size {self.num}")
        return pending

    def pop(self) -> Chain | None:
        """The next available chain, or None if the ring is empty."""
        ring = self._ring
        if ring is None or self.broken:
            ring = self._ring_or_fail()  # raises
        # pop_many(1) inlined for the common case, one good chain: the TX path pops one chain
        # per frame, and each Python step here is a visible share of its cost.
        table = self.memory.table
        r = ring.pop(self.last_avail_idx, 1, self.indirect, table)
        if r == 1:
            head, nread, nwrite = ring.chains_mv[:3].tolist()
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
            self.inflight += 1
            if self.dirty_log is not None and nwrite:
                self._record_writes([head, nread, nwrite],
                                    ring.bufs_mv[:3 * (nread + nwrite)].tolist())
            if nread + nwrite == 1:
                ri, o, length = ring.bufs_mv[:3].tolist()
                view = table.views[ri][o:o + length]
                return Chain(head, [], [view]) if nwrite else Chain(head, [view], [])
            views = table.views
            b = ring.bufs_mv[:3 * (nread + nwrite)].tolist()
            bufs = [views[b[i]][b[i + 1]:b[i + 1] + b[i + 2]] for i in range(0, len(b), 3)]
            return Chain(head, bufs[:nread], bufs[nread:])
        chains = self._pop_c(ring, 1, r)
        if not chains and self.event_idx and self._notify:
            ring.avail_event_set(self.last_avail_idx)  # as pop_many() does
            chains = self._pop_c(ring, 1)
        return chains[0] if chains else None

    def pop_many(self, count: int) -> list[Chain]:
        """Up to `count` chains, as pop() would return them one by one, popped in C a batch per
        call (one avail index read). Fewer than `count` when the ring runs dry; none (and the
        kick re-armed with EVENT_IDX, as pop() does) when it is empty."""
        ring = self._ring_or_fail()
        out = self._pop_c(ring, count)
        if out or count <= 0 or not (self.event_idx and self._notify):
            return out
        # Empty: ask for a kick at the next entry, then look again: the driver may have added
        # one between our read and the event store (the fence in C orders the two).
        ring.avail_event_set(self.last_avail_idx)
        return self._pop_c(ring, count)

    def _pop_c(self, ring: RingAccess, count: int, r: int | None = None) -> list[Chain]:
        """Up to `count` chains through the C walk; `r`: what a ring.pop() for `count` chains
        from last_avail_idx just returned (its records are still in ring)."""
        out: list[Chain] = []
        table = self.memory.table
        views = table.views
        count = max(count, 0)
        while True:
            if r is None:
                r = ring.pop(self.last_avail_idx, count - len(out), self.indirect, table)
            n = r if r >= 0 else -1 - r
            if n:
                heads = ring.chains_mv[:3 * n].tolist()
                bufs = ring.bufs_mv[:3 * ring.status_mv[3]].tolist()
                if n == 1 and heads[1] + heads[2] == 1:  # one chain of one buffer (pop(), TX)
                    ri, o, length = bufs
                    view = views[ri][o:o + length]
                    out.append(Chain(heads[0], [], [view]) if heads[2]
                               else Chain(heads[0], [view], []))
                else:
                    self._chains_from(heads, bufs, views, out)
                if self.dirty_log is not None:
                    self._record_writes(heads, bufs)
                # The popped chains are ours even when the next one is bad (as the Python
                # walk).
                self.last_avail_idx = (self.last_avail_idx + n) & 0xFFFF
                self.inflight += n
            if r >= 0:
                return out
            r = None
            status = ring.status()
            code = status[0]
            if code != POP_FULL:
                raise self._fail(self._pop_error(code, status[1], status[2]))
            if len(out) >= count or (n == 0 and not ring.grow()):
                return out  # (n == 0 after growing cannot happen: room for any chain)

    @property
    def rearms_on_empty(self) -> bool:
        """An empty pop re-arms the kick with one store (EVENT_IDX, kicks wanted): what a C
        gather is told."""
        return self.event_idx and self._notify

    def took_records(self, kept: int, popped: bool = False) -> None:
        """A C gather popped `kept` chains and keeps them: last_avail moves on by them, they
        count in flight, and under live migration their buffers are marked dirty when they
        are used (from the ring's record arrays: its gather arrays after RingAccess.
        rx_gather(), rx_fill(), virtio.net's mergeable RX; its pop arrays, `popped`, after
        virtio.net's TX gather)."""
        self.last_avail_idx = (self.last_avail_idx + kept) & 0xFFFF
        self.inflight += kept
        if kept and self.dirty_log is not None:
            ring = self._ring_or_fail()
            self._record_writes(*(ring.popped_records(kept) if popped
                                  else ring.gather_records(kept)))

    def bad_records(self, seen: int) -> VirtQueueError:
        """A C gather met a bad chain or avail index after `seen` good chains: those are
        popped and lost with the queue, which breaks (the ring's status says why). Raise
        what this returns."""
        self.last_avail_idx = (self.last_avail_idx + seen) & 0xFFFF
        self.inflight += seen
        status = self._ring_or_fail().status()
        return self._fail(self._pop_error(status[0], status[1], status[2]))

    @staticmethod
    def _chains_from(heads: list[int], bufs: list[int], views: list[memoryview],
                     out: list[Chain]) -> None:
        """Chains from the C pop's records (see RingAccess.pop)."""
        bit = iter(bufs)
        b3 = zip(bit, bit, bit, strict=True)  # (region, offset, length) per buffer
        hit = iter(heads)
        for head, nread, nwrite in zip(hit, hit, hit, strict=True):
            if nread + nwrite == 1:  # Linux's mergeable RX buffers, most TX frames
                ri, o, length = next(b3)
                if nwrite:
                    out.append(Chain(head, [], [views[ri][o:o + length]]))
                else:
                    out.append(Chain(head, [views[ri][o:o + length]], []))
                continue
            pieces = [views[ri][o:o + length] for ri, o, length in islice(b3, nread + nwrite)]
            out.append(Chain(head, pieces[:nread], pieces[nread:]))

    def _pop_error(self, code: int, value: int, value2: int) -> str:
        """The reference walk's message for a C walk error code."""
        template = _POP_ERRORS.get(code, "chain walk error {code}")
        return template.format(code=code, value=value, value2=value2, num=self.num)

    def _walk_py(self, head: int) -> Chain:
        """The chain at `head` walked in Python: the reference for the C walk (tests)."""
        assert self._desc is not None
        if head >= self.num:
            raise self._fail(f"head {head} >= queue size {self.num}")
        table = self._desc
        table_len = self.num
        in_indirect = False
        readable: list[memoryview] = []
        writable: list[memoryview] = []
        idx = head
        count = 0
        while True:
            count += 1
            if count > table_len:
                raise self._fail(f"descriptor chain from head {head} loops or is too long")
            addr, length, flags, nxt = DESC.unpack_from(table, idx * DESC_SIZE)
            if flags & DESC_F_INDIRECT:
                if not self.indirect:
                    raise self._fail("indirect descriptor without INDIRECT_DESC")
                if in_indirect or count != 1 or flags & DESC_F_NEXT:
                    raise self._fail("indirect descriptor must be a lone head of the main table")
                entries = length // DESC_SIZE
                if length % DESC_SIZE or not 1 <= entries <= MAX_INDIRECT:
                    raise self._fail(f"bad indirect table length {length}")
                try:
                    table = self.memory.gpa(addr, length)
                except GuestMemoryError as e:
                    raise self._fail(f"indirect table outside guest memory: {e}") from None
                table_len = entries
                in_indirect = True
                idx = 0
                count = 0
                continue
            try:
                buf = self.memory.gpa(addr, length)
            except GuestMemoryError as e:
                raise self._fail(f"descriptor buffer outside guest memory: {e}") from None
            if flags & DESC_F_WRITE:
                writable.append(buf)
            elif writable:
                raise self._fail("device-readable descriptor after a device-writable one")
            else:
                readable.append(buf)
            if not flags & DESC_F_NEXT:
                return Chain(head, readable, writable)
            if nxt >= table_len:
                raise self._fail(f"next index {nxt} out of range {table_len}")
            idx = nxt

    def rewind(self, count: int) -> None:
        """Give back the last `count` popped chains unused (e.g. RX data did not come)."""
        if not 0 <= count <= self.inflight:
            raise ValueError("rewinding more chains than are in flight")
        self.last_avail_idx = (self.last_avail_idx - count) & 0xFFFF
        self.inflight -= count

    # --- device → driver --------------------------------------------------------------------
    def push(self, head: int, length: int) -> None:
        """Return a popped chain as used, `length` bytes written into its writable buffers.
        The element reaches the used ring at flush() (one C call per batch), before used->idx
        says it is there, so the driver sees the same thing as if it were written now."""
        self._ring_or_fail()
        if self.inflight <= 0:
            raise ValueError("push without a popped chain")
        if not 0 <= head <= 0xFFFFFFFF or not 0 <= length <= 0xFFFFFFFF:
            raise ValueError("used element out of range")
        self._used += (head, length)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.inflight -= 1
        self._pending += 1

    def push_many(self, entries: list[tuple[int, int]]) -> None:
        """push() for each (head, length), in order."""
        self._ring_or_fail()
        if len(entries) > self.inflight:
            raise ValueError("push without a popped chain")
        used = self._used
        for head, length in entries:
            if not 0 <= head <= 0xFFFFFFFF or not 0 <= length <= 0xFFFFFFFF:
                raise ValueError("used element out of range")
            used += (head, length)
            self.inflight -= 1
        n = len(entries)
        self.used_idx = (self.used_idx + n) & 0xFFFF
        self._pending += n

    def push_flat(self, elems: list[int]) -> None:
        """push() for [head, length, head, length, ...], in order, without a tuple per
        entry (the mergeable RX path pushes ~17-44 chains per 64 KiB frame)."""
        self._ring_or_fail()
        n = len(elems) // 2
        if n > self.inflight or len(elems) != 2 * n:
            raise ValueError("push without a popped chain")
        if n == 0:
            return
        if min(elems) < 0 or max(elems) > 0xFFFFFFFF:
            raise ValueError("used element out of range")
        self._used += elems
        self.inflight -= n
        self.used_idx = (self.used_idx + n) & 0xFFFF
        self._pending += n

    def push_written(self, elems: Any, n: int) -> None:
        """push_flat() for n (head, length) pairs in a C array (`uint32_t[]`, RingAccess.
        rx_commit()'s) without a Python int per value: written to the used ring now, after
        the entries pushed before; published, as every push, at flush()."""
        ring = self._ring_or_fail()
        if not 0 <= n <= self.inflight:
            raise ValueError("push without a popped chain")
        if n == 0:
            return
        if self._used:  # earlier pushes go first, where flush() would have put them
            ring.used_put_many((self.used_idx - len(self._used) // 2) & 0xFFFF, self._used)
            self._used = []
        ring.used_put_c(self.used_idx, elems, n)
        self.inflight -= n
        self.used_idx = (self.used_idx + n) & 0xFFFF
        self._pending += n

    def flush(self) -> bool:
        """Publish pushed entries (one used->idx store) and notify if needed; True if notified."""
        if self._pending == 0 or self._ring is None:
            return False
        used, self._used = self._used, []
        # the list holds the latest pushes (push_written() wrote those before it already)
        if used:
            self._ring.used_put_many((self.used_idx - len(used) // 2) & 0xFFFF, used)
        if self.dirty_log is not None:  # marked before the driver may reuse the chains
            self._log_writes()
        self._ring.used_publish(self.used_idx)
        self._pending = 0
        if self._should_notify():
            self.signal()
            return True
        return False

    # --- live migration: what the front end must copy again -----------------------------
    def set_dirty_log(self, dirty: DirtyLog | None) -> None:
        """Log writes into `dirty` from now on (None: stop). Marking starts at the entries
        not yet published: what the driver saw before was copied with the rest of memory."""
        if dirty is not None and self.dirty_log is None:
            self._logged_idx = (self.used_idx - self._pending) & 0xFFFF
        if dirty is None:
            self._popped_writes.clear()
        self.dirty_log = dirty

    def _record_writes(self, heads: list[int], bufs: list[int]) -> None:
        """While logging: the device-writable buffers of chains just popped ((head, readable,
        writable) triples and their (region, offset, length) records, as the C pop returns
        them), as guest-physical (address, length) by head, for _log_writes(): the log is
        written from what we popped, never from descriptor tables read again."""
        table = self.memory.table
        gpas = [table.cdata[i].gpa for i in range(table.count)]
        record = self._popped_writes
        b = 0
        for i in range(0, len(heads) - 2, 3):
            head, nread, nwrite = heads[i], heads[i + 1], heads[i + 2]
            b += 3 * nread
            if nwrite:
                record[head] = [(gpas[bufs[j]] + bufs[j + 1], bufs[j + 2])
                                for j in range(b, b + 3 * nwrite, 3) if bufs[j] < len(gpas)]
            b += 3 * nwrite

    def _log_writes(self) -> None:
        """Mark in the dirty log what the chains used since the last mark had written (their
        used lengths, over the device-writable buffers recorded when they were popped) and
        the used ring. A chain popped before logging began has no record: its descriptors
        are walked again, within a budget of one ring's worth of descriptors per flush (a
        driver that rewrote them into loops only misdirects its own log)."""
        used = self._used_area
        if used is None or self.num == 0:
            return
        mask = self.num - 1
        idx = self._logged_idx
        record = self._popped_writes
        dirty = self.dirty_log
        budget = self.num
        while idx != self.used_idx:
            head, length = USED_ELEM.unpack_from(used, 4 + 8 * (idx & mask))
            bufs = record.pop(head, None)
            if bufs is not None and dirty is not None:
                for gpa, size in bufs:
                    if length <= 0:
                        break
                    n = min(size, length)
                    dirty.mark(gpa, n)
                    length -= n
            elif length and budget > 0:
                budget = self._log_chain(head, length, budget)
            idx = (idx + 1) & 0xFFFF
        self._logged_idx = idx
        self._log_used_ring()

    def _log_chain(self, head: int, length: int, budget: int) -> int:
        """The walk for a chain popped before logging began; returns the budget left."""
        dirty, table = self.dirty_log, self._desc
        if dirty is None or table is None or head >= self.num:
            return budget
        entries, i = self.num, head
        while budget > 0:
            budget -= 1
            addr, size, flags, nxt = DESC.unpack_from(table, DESC_SIZE * i)
            if flags & DESC_F_INDIRECT and table is self._desc:
                try:
                    table = self.memory.gpa(addr, size - size % DESC_SIZE)
                except GuestMemoryError:
                    return budget
                entries, i = len(table) // DESC_SIZE, 0
                if not entries:
                    return budget
                continue
            if flags & DESC_F_WRITE:
                n = min(size, length)
                dirty.mark(addr, n)
                length -= n
                if length <= 0:
                    return budget
            if not flags & DESC_F_NEXT or nxt >= entries:
                return budget
            i = nxt
        if not self._budget_warned:
            self._budget_warned = True
            log.warning("queue %d: dirty log: descriptor walk budget spent in one flush",
                        self.index)
        return 0

    def _log_used_ring(self) -> None:
        dirty = self.dirty_log
        if dirty is not None and self.addr is not None and self.addr.flags & VRING_F_LOG:
            dirty.mark(self.addr.log, used_size(self.num))

    def _should_notify(self) -> bool:
        assert self._ring is not None
        if not self.event_idx:
            return not self._ring.avail_flags() & AVAIL_F_NO_INTERRUPT
        old, new = self.signalled_used, self.used_idx
        valid = self.signalled_used_valid
        self.signalled_used = new
        self.signalled_used_valid = True
        return not valid or need_event(self._ring.used_event(), new, old)

    def signal(self) -> None:
        """Notify the driver (the call eventfd): never blocks for long (virtio/guard.py). A
        write the front end made block sets `stalled` (the back end drops it); a full
        counter is a notification already pending."""
        if self.call_fd is not None:
            rc = guard.signal(self.call_fd)
            if rc < 0:
                if rc == guard.STALLED:
                    self.stalled = True
                else:
                    log.debug("queue %d: call eventfd: %s", self.index, os.strerror(-rc))

    # --- notification suppression (driver → device kicks) -----------------------------------
    def disable_notifications(self) -> None:
        """Tell the driver not to kick (we are polling / busy)."""
        self._notify = False
        if self._ring is not None and not self.event_idx:
            self._ring.used_flags_set(USED_F_NO_NOTIFY)

    def enable_notifications(self) -> bool:
        """Ask for kicks again; True if chains arrived meanwhile (process them, no kick comes)."""
        self._notify = True
        ring = self._ring_or_fail()
        if self.event_idx:
            ring.avail_event_set(self.last_avail_idx)
        else:
            ring.used_flags_set(0)
        return self.available() > 0

    def kick_when_more(self) -> bool:
        """Ask for a kick when the driver adds to what is available now (not at the next
        entry, as an empty pop() does): the chains there are too few for what we must write.
        True if more arrived meanwhile (no kick will say so: look again)."""
        ring = self._ring_or_fail()
        seen = self.available()
        if self.event_idx and self._notify:
            ring.avail_event_set((self.last_avail_idx + seen) & 0xFFFF)  # then a full fence
        return self.available() != seen

    def drain_kick(self) -> int:
        """Consume the kick eventfd's counter, never blocking (virtio/guard.py): 1 if the
        driver kicked, 0 if there was nothing to read (the front end read it first), -1 if
        the fd is broken or not an eventfd."""
        if self.kick_fd is None:
            return -1
        rc = guard.drain(self.kick_fd)
        return rc if rc >= 0 else -1
