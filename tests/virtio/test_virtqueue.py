"""Split virtqueue against a Python driver: pop/push, indirect, notifications, hostile rings."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio import net
from virtio.memory import GuestMemory
from virtio.message import VringAddr
from virtio.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    Chain,
    VirtQueue,
    VirtQueueError,
    need_event,
)

from .frontend import DriverMemory, DriverRing


class Setup:
    def __init__(self, num: int = 8, event_idx: bool = False, indirect: bool = False) -> None:
        self.dmem = DriverMemory((1 << 18, 1 << 18))
        self.mem = GuestMemory()
        for r in self.dmem.regions:
            self.mem.add(r.desc, os.dup(r.fd))
        self.ring = DriverRing(self.dmem, num, event_idx)
        self.vq = VirtQueue(0, self.mem)
        self.vq.event_idx = event_idx
        self.vq.indirect = indirect
        self.vq.set_num(num)
        self.vq.set_addr(self.ring.addr(0))
        self.vq.call_fd = self.ring.call_fd
        self.vq.start()

    def close(self) -> None:
        self.vq.reset()
        self.mem.reset()
        self.ring.close()
        self.dmem.close()


@pytest.fixture(params=[False, True], ids=["plain", "event_idx"])
def s(request):
    setup = Setup(event_idx=request.param, indirect=True)
    yield setup
    setup.close()


def test_need_event():
    assert need_event(0, 1, 0)
    assert not need_event(5, 3, 0)
    assert need_event(0xFFFF, 0, 0xFFFE)  # across the wrap


def test_pop_readable_and_writable(s):
    head = s.ring.add([b"hello", b"world"], [100, 50])
    chain = s.vq.pop()
    assert chain is not None and chain.head == head
    assert [bytes(b) for b in chain.readable] == [b"hello", b"world"]
    assert [len(b) for b in chain.writable] == [100, 50]
    chain.writable[0][:5] = b"reply"
    s.vq.push(chain.head, 5)
    assert s.vq.pop() is None
    assert s.vq.flush()
    assert s.ring.calls() == 1
    assert s.ring.get_used() == [(head, 5)]
    assert s.ring.written(head, 5) == b"reply"


def test_indirect_chain(s):
    head = s.ring.add([b"abc"], [10], indirect=True)
    chain = s.vq.pop()
    assert chain is not None and chain.head == head
    assert [bytes(b) for b in chain.readable] == [b"abc"] and len(chain.writable) == 1


def test_indirect_refused_without_feature():
    setup = Setup(indirect=False)
    try:
        setup.ring.add([b"abc"], indirect=True)
        with pytest.raises(VirtQueueError):
            setup.vq.pop()
        assert setup.vq.broken
    finally:
        setup.close()


def test_batch_publishes_once_and_many_rounds_wrap(s):
    for round_ in range(40):  # 40 * 5 > queue size: indices wrap in the ring many times
        heads = [s.ring.add([bytes([round_, i])]) for i in range(5)]
        chains = []
        while (chain := s.vq.pop()) is not None:
            chains.append(chain)
        assert [c.head for c in chains] == heads
        for c in chains:
            s.vq.push(c.head, 0)
        assert s.ring.used_idx() == (round_ * 5) & 0xFFFF  # nothing visible before flush
        s.vq.flush()
        assert [h for h, _ in s.ring.get_used()] == heads


def test_no_interrupt_flag_without_event_idx():
    setup = Setup(event_idx=False)
    try:
        setup.ring.set_no_interrupt(True)
        setup.ring.add([b"x"])
        c = setup.vq.pop()
        assert c is not None
        setup.vq.push(c.head, 0)
        assert not setup.vq.flush()
        assert setup.ring.calls() == 0
    finally:
        setup.close()


def test_event_idx_suppresses_calls_until_used_event():
    setup = Setup(event_idx=True)
    try:
        ring, vq = setup.ring, setup.vq
        ring.rearm = False
        ring.set_used_event(2)  # "call me when used idx passes 2"
        for expected_call in (True, False, True, False):
            ring.add([b"x"])
            c = vq.pop()
            assert c is not None
            vq.push(c.head, 0)
            vq.flush()  # used idx becomes 1, 2, 3, 4
            ring.get_used()
            # First flush always signals; the next one that crosses used_event=2 does (3).
            assert bool(ring.calls()) == expected_call
    finally:
        setup.close()


def test_event_idx_kick_rearmed_when_empty():
    setup = Setup(event_idx=True)
    try:
        ring, vq = setup.ring, setup.vq
        ring.add([b"a"])
        assert ring.kick()  # avail_event 0: the first entry kicks
        ring.add([b"b"])
        assert not ring.kick()  # device has not consumed: no new kick
        assert vq.pop() is not None and vq.pop() is not None
        assert vq.pop() is None  # empty: re-arms avail_event = 2
        ring.add([b"c"])
        assert ring.kick()
    finally:
        setup.close()


def test_disable_enable_notifications(s):
    s.vq.disable_notifications()
    s.ring.add([b"a"])
    if not s.ring.event_idx:
        assert not s.ring.kick()
    assert s.vq.enable_notifications()  # a chain arrived meanwhile


def test_rewind(s):
    s.ring.add([], [64])
    c = s.vq.pop()
    assert c is not None
    s.vq.rewind(1)
    again = s.vq.pop()
    assert again is not None and again.head == c.head
    with pytest.raises(ValueError):
        s.vq.rewind(2)


def test_push_without_pop_is_a_device_bug(s):
    with pytest.raises(ValueError):
        s.vq.push(0, 0)


# --- configuration errors ---------------------------------------------------------------------

@pytest.mark.parametrize("num", [0, 3, 1000, 2048, 65536])
def test_bad_queue_size(num):
    vq = VirtQueue(0, GuestMemory())
    with pytest.raises(VirtQueueError):
        vq.set_num(num)


def test_ring_outside_memory_and_misaligned(s):
    good = s.ring.addr(0)
    with pytest.raises(VirtQueueError):
        s.vq.set_addr(VringAddr(0, 0, 0x1000, good.used, good.avail, 0))
    with pytest.raises(VirtQueueError):
        s.vq.set_addr(VringAddr(0, 0, good.desc + 8, good.used, good.avail, 0))
    end = s.dmem.regions[0].desc.uaddr + s.dmem.regions[0].desc.size
    with pytest.raises(VirtQueueError):  # used ring crossing the region end
        s.vq.set_addr(VringAddr(0, 0, good.desc, end - 8, good.avail, 0))
    assert not s.vq.mapped


def test_base_out_of_range(s):
    with pytest.raises(VirtQueueError):
        s.vq.set_base(0x10000)


# --- hostile rings ----------------------------------------------------------------------------

def _expect_broken(s) -> None:
    with pytest.raises(VirtQueueError):
        s.vq.pop()
    assert s.vq.broken
    with pytest.raises(VirtQueueError):  # stays broken until reset
        s.vq.pop()


def test_head_out_of_range(s):
    s.ring.publish(200)
    _expect_broken(s)


def test_avail_idx_jump(s):
    s.ring.set_avail_idx(1000)
    _expect_broken(s)


def test_descriptor_loop(s):
    buf = s.dmem.alloc(16)
    s.ring.write_desc(0, buf, 16, DESC_F_NEXT, 1)
    s.ring.write_desc(1, buf, 16, DESC_F_NEXT, 0)
    s.ring.publish(0)
    _expect_broken(s)


def test_self_loop_in_indirect_table(s):
    table = s.dmem.alloc(32, 16)
    buf = s.dmem.alloc(16)
    s.ring.write_desc(0, buf, 16, DESC_F_NEXT, 1, table=table)
    s.ring.write_desc(1, buf, 16, DESC_F_NEXT, 1, table=table)
    s.ring.write_desc(0, table, 32, DESC_F_INDIRECT, 0)
    s.ring.publish(0)
    _expect_broken(s)


@pytest.mark.parametrize("case", ["nested", "with_next", "bad_len", "outside", "not_head"])
def test_bad_indirect(s, case):
    table = s.dmem.alloc(32, 16)
    buf = s.dmem.alloc(16)
    s.ring.write_desc(0, buf, 16, 0, 0, table=table)
    if case == "nested":
        s.ring.write_desc(0, table, 32, DESC_F_INDIRECT, 0, table=table)
        s.ring.write_desc(0, table, 32, DESC_F_INDIRECT, 0)
    elif case == "with_next":
        s.ring.write_desc(0, table, 32, DESC_F_INDIRECT | DESC_F_NEXT, 1)
    elif case == "bad_len":
        s.ring.write_desc(0, table, 24, DESC_F_INDIRECT, 0)
    elif case == "outside":
        s.ring.write_desc(0, 0x10, 32, DESC_F_INDIRECT, 0)
    else:
        s.ring.write_desc(0, buf, 16, DESC_F_NEXT, 1)
        s.ring.write_desc(1, table, 32, DESC_F_INDIRECT, 0)
    s.ring.publish(0)
    _expect_broken(s)


@pytest.mark.parametrize("where", ["outside", "crosses_end", "huge_len", "next_oob"])
def test_bad_buffer(s, where):
    r0 = s.dmem.regions[0].desc
    if where == "outside":
        s.ring.write_desc(0, 0x10, 16, 0, 0)
    elif where == "crosses_end":
        s.ring.write_desc(0, r0.gpa + r0.size - 8, 16, 0, 0)
    elif where == "huge_len":
        s.ring.write_desc(0, r0.gpa, 0xFFFFFFFF, 0, 0)
    else:
        s.ring.write_desc(0, r0.gpa, 16, DESC_F_NEXT, 999)
    s.ring.publish(0)
    _expect_broken(s)


def test_readable_after_writable(s):
    buf = s.dmem.alloc(16)
    s.ring.write_desc(0, buf, 16, DESC_F_WRITE | DESC_F_NEXT, 1)
    s.ring.write_desc(1, buf, 16, 0, 0)
    s.ring.publish(0)
    _expect_broken(s)


def test_reset_clears_broken(s):
    s.ring.publish(200)
    _expect_broken(s)
    s.vq.reset()
    assert not s.vq.broken and not s.vq.mapped


@settings(max_examples=150, deadline=None)
@given(descs=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1),
                                st.integers(0, 0xFFFF), st.integers(0, 0xFFFF)),
                      min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=4),
       avail_idx=st.integers(0, 0xFFFF))
def test_random_rings_never_crash(descs, heads, avail_idx):
    setup = Setup(event_idx=True, indirect=True)
    try:
        r0 = setup.dmem.regions[0].desc
        for i, (addr, length, flags, nxt) in enumerate(descs):
            if i % 2:  # half the descriptors point somewhere plausible
                addr = r0.gpa + addr % r0.size
                length %= 4096
            setup.ring.write_desc(i, addr, length, flags, nxt)
        for h in heads:
            setup.ring.publish(h)
        if avail_idx % 3 == 0:
            setup.ring.set_avail_idx(avail_idx)
        for _ in range(10):
            try:
                chain = setup.vq.pop()
            except VirtQueueError:
                assert setup.vq.broken
                break
            if chain is None:
                break
            for b in chain.readable + chain.writable:
                assert len(b) <= 2**32
            setup.vq.push(chain.head, 0)
        setup.vq.flush()
    finally:
        setup.close()


def test_used_ring_layout(s):
    head = s.ring.add([b"q"])
    c = s.vq.pop()
    assert c is not None
    s.vq.push(c.head, 1234)
    s.vq.flush()
    raw = s.dmem.read(s.ring.used, 12)
    assert struct.unpack("<HHII", raw) == (0, 1, head, 1234)


# --- the C chain walk against the Python reference (_walk_py) ---------------------------------

def _addr(view: memoryview) -> int:
    """Where a view's bytes are (so two walks can be compared buffer by buffer)."""
    from virtio._ring import ffi
    p = ffi.from_buffer(view)
    try:
        return int(ffi.cast("uintptr_t", p))
    finally:
        ffi.release(p)


def _shape(chain: Chain) -> tuple[int, list[tuple[int, int]], list[tuple[int, int]]]:
    return (chain.head, [(_addr(b), len(b)) for b in chain.readable],
            [(_addr(b), len(b)) for b in chain.writable])


def _py_pop_many(vq: VirtQueue, count: int) -> list[Chain]:
    """pop_many() as it was before the C walk: the avail checks, then _walk_py per head."""
    ring = vq._ring
    assert ring is not None and not vq.broken
    pending = (ring.avail_idx() - vq.last_avail_idx) & 0xFFFF
    if pending > vq.num:
        raise vq._fail(f"avail idx moved by {pending}")
    out = []
    idx = vq.last_avail_idx
    try:
        for _ in range(min(count, pending)):
            out.append(vq._walk_py(ring.avail_head(idx)))
            idx = (idx + 1) & 0xFFFF
    finally:
        vq.last_avail_idx = idx
        vq.inflight += len(out)
    return out


def _twin(setup: Setup) -> VirtQueue:
    """A second device queue over the same ring (and the same base), for the reference walk."""
    vq = VirtQueue(1, setup.mem)
    vq.indirect = setup.vq.indirect
    vq.set_num(setup.vq.num)
    vq.set_addr(setup.ring.addr(0))
    vq.set_base(setup.vq.last_avail_idx)
    vq.start()
    return vq


def _outcome(fn, count):  # type: ignore[no-untyped-def]
    try:
        return [_shape(c) for c in fn(count)], None
    except VirtQueueError:
        return None, "broken"


_buf = st.tuples(st.booleans(), st.integers(0, 5000))  # (device-writable, length)
_chain = st.tuples(st.lists(_buf, min_size=1, max_size=6), st.booleans())  # (buffers, indirect)


@settings(max_examples=120, deadline=None)
@given(chains=st.lists(_chain, min_size=1, max_size=16), base=st.integers(0, 0xFFFF),
       batches=st.lists(st.integers(1, 20), min_size=1, max_size=8))
def test_c_walk_matches_python_on_valid_rings(chains, base, batches):
    setup = Setup(num=16, indirect=True)
    try:
        setup.vq.set_base(base)
        setup.ring.set_avail_idx(base)
        setup.ring.kicked_at = base
        for bufs, indirect in chains:
            bufs = sorted(bufs, key=lambda b: b[0])  # readable first, as a driver must
            out = [bytes([i % 251]) * n for i, (w, n) in enumerate(bufs) if not w]
            sizes = [max(n, 1) for w, n in bufs if w]
            if (1 if indirect else len(bufs)) > len(setup.ring.free):
                continue
            setup.ring.add(out, sizes, indirect=indirect)
        ref = _twin(setup)
        got: list[Chain] = []
        want: list[Chain] = []
        for count in batches:
            if count == 1:  # pop() has its own short path
                chain = setup.vq.pop()
                got += [] if chain is None else [chain]
            else:
                got += setup.vq.pop_many(count)
            want += _py_pop_many(ref, count)
        assert [_shape(c) for c in got] == [_shape(c) for c in want]
        assert setup.vq.last_avail_idx == ref.last_avail_idx
        assert setup.vq.inflight == ref.inflight
        for c in got:
            for b in c.readable:
                assert set(bytes(b)) <= set(range(251))
        ref.reset()
    finally:
        setup.close()


# Mostly plausible values (so chains get far enough to hit the later checks), some wild ones.
_ADDR_KINDS = st.sampled_from(["r0"] * 6 + ["any", "r0_end", "r1_end", "top", "table", "table"])


@st.composite
def _hostile_desc(draw):  # type: ignore[no-untyped-def]
    return (draw(_ADDR_KINDS), draw(st.integers(0, 2**64 - 1)),
            draw(st.one_of(st.integers(0, 64), st.integers(0, 64),
                           st.sampled_from([16, 32, 48, 128, 24, 16 * 32769]),
                           st.integers(0, 2**32 - 1))),
            draw(st.one_of(st.sampled_from([0, 0, 0, 1, 1, 2, 3, 4]), st.integers(0, 0xFFFF))),
            draw(st.one_of(st.integers(0, 8), st.integers(0, 8), st.integers(0, 0xFFFF))))


@settings(max_examples=300, deadline=None)
@given(main=st.lists(_hostile_desc(), min_size=8, max_size=8),
       table=st.lists(_hostile_desc(), min_size=8, max_size=8),
       heads=st.lists(st.one_of(st.integers(0, 7), st.integers(0, 8), st.integers(0, 0xFFFF)),
                      min_size=1, max_size=8),
       jump=st.one_of(st.none(), st.none(), st.none(), st.integers(0, 0xFFFF)),
       indirect=st.booleans(), count=st.integers(1, 10))
def test_c_walk_fails_as_python_on_hostile_rings(main, table, heads, jump, indirect, count):
    setup = Setup(num=8, indirect=indirect)
    try:
        r0, r1 = (r.desc for r in setup.dmem.regions)
        itable = setup.dmem.alloc(16 * 8, 16)

        def place(kind: str, raw: int, length: int) -> int:
            return {"any": raw, "r0": r0.gpa + raw % r0.size,
                    "r0_end": r0.gpa + r0.size - raw % 64,  # crosses into region 1
                    "r1_end": r1.gpa + r1.size - raw % 64,  # crosses out of memory
                    "top": 2**64 - 1 - raw % 64,  # addr + length overflows a u64
                    "table": itable}[kind]

        for i, (kind, raw, length, flags, nxt) in enumerate(table):
            setup.ring.write_desc(i, place(kind, raw, length), length, flags, nxt, table=itable)
        for i, (kind, raw, length, flags, nxt) in enumerate(main):
            setup.ring.write_desc(i, place(kind, raw, length), length, flags, nxt)
        for h in heads:
            setup.ring.publish(h)
        if jump is not None:
            setup.ring.set_avail_idx(jump)
        ref = _twin(setup)
        for _ in range(3):
            want = _outcome(lambda n: _py_pop_many(ref, n), count)
            got = _outcome(setup.vq.pop_many if count > 1 else
                           lambda _: [c for c in [setup.vq.pop()] if c is not None], count)
            assert got == want
            assert setup.vq.broken == ref.broken
            assert setup.vq.last_avail_idx == ref.last_avail_idx
            assert setup.vq.inflight == ref.inflight
            if setup.vq.broken:
                break
        ref.reset()
    finally:
        setup.close()


@pytest.mark.parametrize("case", [
    "u64_overflow", "crosses_into_next_region", "indirect_crosses_end", "indirect_too_long",
    "indirect_u64_overflow", "next_in_indirect_oob", "head_mid_batch"])
def test_hostile_chains_break_the_queue(s, case):
    r0, r1 = (r.desc for r in s.dmem.regions)
    buf = s.dmem.alloc(16)
    table = s.dmem.alloc(32, 16)
    s.ring.write_desc(0, buf, 16, 0, 0, table=table)
    s.ring.write_desc(1, buf, 16, 0, 0, table=table)
    head = 0
    if case == "u64_overflow":
        s.ring.write_desc(0, 2**64 - 8, 16, 0, 0)
    elif case == "crosses_into_next_region":  # adjacent in guest memory, not one mapping
        s.ring.write_desc(0, r0.gpa + r0.size - 8, 16, DESC_F_WRITE, 0)
    elif case == "indirect_crosses_end":
        s.ring.write_desc(0, r1.gpa + r1.size - 16, 32, DESC_F_INDIRECT, 0)
    elif case == "indirect_too_long":
        s.ring.write_desc(0, r0.gpa, 16 * 32769, DESC_F_INDIRECT, 0)
    elif case == "indirect_u64_overflow":
        s.ring.write_desc(0, 2**64 - 16, 32, DESC_F_INDIRECT, 0)
    elif case == "next_in_indirect_oob":
        s.ring.write_desc(0, buf, 16, DESC_F_NEXT, 2, table=table)  # the table has 2 entries
        s.ring.write_desc(0, table, 32, DESC_F_INDIRECT, 0)
    else:  # two good chains, then a bad head: the good ones are popped (in flight), then error
        s.ring.write_desc(0, buf, 16, 0, 0)
        s.ring.write_desc(1, buf, 16, 0, 0)
        s.ring.publish(0)
        s.ring.publish(1)
        head = 8
    s.ring.publish(head)
    with pytest.raises(VirtQueueError):
        s.vq.pop_many(8)
    assert s.vq.broken
    if case == "head_mid_batch":
        assert s.vq.inflight == 2 and s.vq.last_avail_idx == 2


def test_long_chains_fill_the_buffer_array_and_pop_again():
    """More buffers in a batch than RingAccess starts with (1024), and one indirect chain
    longer than that on its own: popped over several C calls, same as the reference."""
    setup = Setup(num=256, indirect=True)
    try:
        for i in range(100):  # 500 buffers
            indirect = bool(i % 2)
            setup.ring.add([bytes([i])] * (4 if indirect else 1), [8] * (4 if indirect else 1),
                           indirect=indirect)
        long_chain = setup.ring.add([b"x"] * 1500, [], indirect=True)
        ref = _twin(setup)
        got = setup.vq.pop_many(256)
        want = _py_pop_many(ref, 256)
        assert len(got) == 101 and got[-1].head == long_chain and len(got[-1].readable) == 1500
        assert [_shape(c) for c in got] == [_shape(c) for c in want]
        ref.reset()
    finally:
        setup.close()


def test_pop_many_empty_rearms_like_pop():
    setup = Setup(event_idx=True)
    try:
        ring, vq = setup.ring, setup.vq
        ring.add([b"a"])
        ring.kick()
        assert len(vq.pop_many(4)) == 1
        assert vq.pop_many(4) == []  # empty: avail_event = 1
        ring.add([b"b"])
        assert ring.kick()
        assert vq.pop_many(0) == []
    finally:
        setup.close()


def test_push_many_same_as_push(s):
    heads = [s.ring.add([], [32]) for _ in range(5)]
    chains = s.vq.pop_many(5)
    assert [c.head for c in chains] == heads
    s.vq.push(chains[0].head, 1)
    s.vq.push_many([(c.head, 10 + i) for i, c in enumerate(chains[1:])])
    assert s.ring.used_idx() == 0
    assert s.vq.flush()
    assert s.ring.get_used() == [(heads[0], 1)] + [(h, 10 + i) for i, h in enumerate(heads[1:])]
    with pytest.raises(ValueError):
        s.vq.push_many([(heads[0], 0)])  # nothing in flight


def test_push_refuses_out_of_range_elements(s):
    s.ring.add([], [32])
    c = s.vq.pop()
    assert c is not None
    for head, length in ((c.head, -1), (c.head, 2**32), (-1, 0)):
        with pytest.raises(ValueError):
            s.vq.push(head, length)
    assert s.vq.inflight == 1


def test_pop_after_memory_table_change(s):
    """The walk uses the memory's current region table: after a region goes, a chain that
    points into it breaks the queue instead of reaching freed memory."""
    head = s.ring.add([], [64])
    s.vq.unmap()
    s.mem.remove(s.dmem.regions[1].desc)  # the rings live in region 0
    s.vq.map()
    r1 = s.dmem.regions[1].desc
    s.ring.write_desc(head, r1.gpa, 64, DESC_F_WRITE, 0)
    with pytest.raises(VirtQueueError):
        s.vq.pop()
    assert s.vq.broken


# --- pop_rx_frames() / push_flat(): the mergeable RX path's flat records ----------------------

def _record_views(vq: VirtQueue, got) -> list[tuple[int, int, int]]:  # type: ignore[no-untyped-def]
    """(head, address, length) per chain kept, from pop_rx_frames()'s records."""
    recs, chains = got[3], got[4]
    views = vq.memory.table.views
    heads = [h for h, _, _ in struct.iter_unpack("=III", chains)]
    return [(h, _addr(views[r][o:o + n]), n)
            for h, (r, o, n) in zip(heads, struct.iter_unpack("=QQQ", recs), strict=True)]


@settings(max_examples=80, deadline=None)
@given(chains=st.lists(st.tuples(st.lists(_buf, min_size=1, max_size=3), st.booleans()),
                       min_size=1, max_size=16),
       counts=st.lists(st.integers(0, 20), min_size=1, max_size=6))
def test_pop_rx_frames_matches_pop_many(chains, counts):
    """Frames of one byte (one chain each): the same heads and buffers as pop_many(); a
    chain of another shape in the batch (one pop, `count` chains): None and nothing popped
    (pop_many() then pops them)."""
    setup = Setup(num=16, indirect=True)
    try:
        for bufs, indirect in chains:
            bufs = sorted(bufs, key=lambda b: b[0])
            out = [b"r" * max(n, 1) for w, n in bufs if not w]
            sizes = [max(n, 1) for w, n in bufs if w]
            if (1 if indirect else len(bufs)) > len(setup.ring.free):
                continue
            setup.ring.add(out, sizes, indirect=indirect)
        ref = _twin(setup)
        for count in counts:
            before = setup.vq.last_avail_idx, setup.vq.inflight
            got = net.pop_rx_frames(setup.vq, count, 1, 0, 0, 1 << 20, 0)
            want = ref.pop_many(count)
            simple = all(not c.readable and len(c.writable) == 1 for c in want)
            if got is None:
                assert not simple and (setup.vq.last_avail_idx, setup.vq.inflight) == before
                setup.vq.pop_many(count)  # keep the twins in step
            else:
                assert simple
                assert got[0] == list(range(len(want)))  # a frame per chain
                assert _record_views(setup.vq, got) == \
                    [(c.head, _addr(c.writable[0]), len(c.writable[0])) for c in want]
            assert (setup.vq.last_avail_idx, setup.vq.inflight) == \
                (ref.last_avail_idx, ref.inflight)
        ref.reset()
    finally:
        setup.close()


def test_pop_rx_frames_empty_rearms_and_rewinds():
    setup = Setup(event_idx=True)
    try:
        ring, vq = setup.ring, setup.vq
        for _ in range(3):
            ring.add([], [64])
        ring.kick()
        got = net.pop_rx_frames(vq, 8, 64, 12, 0, 100, 0)
        assert got is not None and got[0] == [0, 1, 2] and got[2]  # starved
        heads = [h for h, _, _ in struct.iter_unpack("=III", got[4])]
        got = net.pop_rx_frames(vq, 8, 64, 12, 0, 100, 0)
        assert got is not None and got[:3] == ([], 0, True)  # empty: avail_event = 3
        ring.add([], [64])
        assert ring.kick()
        vq.rewind(2)
        got = net.pop_rx_frames(vq, 8, 64, 12, 0, 100, 0)
        assert got is not None
        assert [h for h, _, _ in struct.iter_unpack("=III", got[4])] == heads[1:] + [3]
        got = net.pop_rx_frames(vq, 0, 64, 12, 0, 100, 0)
        assert got is not None and got[:2] == ([], 0)
    finally:
        setup.close()


def test_pop_rx_frames_gives_back_what_no_frame_takes():
    """Frames of 3 chains from 8: two frames, the last 2 chains go back (popped, not kept);
    a first frame whose buffer can't hold the header: None, nothing popped."""
    setup = Setup(num=8, event_idx=True)
    try:
        for _ in range(8):
            setup.ring.add([], [100])
        got = net.pop_rx_frames(setup.vq, 4, 300, 12, 0, 100, 100)
        assert got is not None
        starts, seen, starved, recs, chains = got
        assert starts == [0, 3] and seen == 8 and starved and len(recs) == 6 * 24
        assert (setup.vq.last_avail_idx, setup.vq.inflight) == (6, 6)
        setup.vq.rewind(6)
        assert net.pop_rx_frames(setup.vq, 4, 300, 12, 90, 100, 100) is None  # 12 + 90 > 100
        assert (setup.vq.last_avail_idx, setup.vq.inflight) == (0, 0)
    finally:
        setup.close()


@pytest.mark.parametrize("case", ["outside", "loop", "head", "jump", "mid_batch"])
def test_pop_rx_frames_hostile_ring_breaks_the_queue(s, case):
    buf = s.dmem.alloc(64)
    if case == "outside":
        s.ring.write_desc(0, 0xDEAD0000, 64, DESC_F_WRITE, 0)
        s.ring.publish(0)
    elif case == "loop":
        s.ring.write_desc(0, buf, 64, DESC_F_WRITE | DESC_F_NEXT, 0)
        s.ring.publish(0)
    elif case == "head":
        s.ring.publish(9)
    elif case == "jump":
        s.ring.set_avail_idx(100)
    else:
        s.ring.write_desc(0, buf, 64, DESC_F_WRITE, 0)
        s.ring.publish(0)
        s.ring.publish(8)
    with pytest.raises(VirtQueueError):
        net.pop_rx_frames(s.vq, 8, 64, 12, 0, 100, 64)
    assert s.vq.broken
    with pytest.raises(VirtQueueError):
        net.pop_rx_frames(s.vq, 8, 64, 12, 0, 100, 64)
    if case == "mid_batch":
        assert s.vq.inflight == 1


def test_push_written_keeps_push_order(s):
    """push(), push_written() (a C array), push_flat(), push() again: the used ring gets
    them in that order, published once at flush()."""
    from virtio._ring import ffi
    heads = [s.ring.add([], [32]) for _ in range(6)]
    assert [c.head for c in s.vq.pop_many(6)] == heads
    s.vq.push(heads[0], 1)
    s.vq.push_written(ffi.new("uint32_t[]", [heads[1], 2, heads[2], 3]), 2)
    s.vq.push_flat([heads[3], 4])
    s.vq.push_written(ffi.new("uint32_t[]", [heads[4], 5]), 1)
    s.vq.push(heads[5], 6)
    assert s.ring.used_idx() == 0 and s.vq.inflight == 0
    assert s.vq.flush()
    assert s.ring.get_used() == [(h, i + 1) for i, h in enumerate(heads)]
    with pytest.raises(ValueError):
        s.vq.push_written(ffi.new("uint32_t[]", [heads[0], 0]), 1)  # nothing in flight
    s.vq.push_written(ffi.NULL, 0)  # nothing: no-op


def test_push_flat_same_as_push(s):
    heads = [s.ring.add([], [32]) for _ in range(5)]
    assert [c.head for c in s.vq.pop_many(5)] == heads
    s.vq.push(heads[0], 1)
    s.vq.push_flat([x for i, h in enumerate(heads[1:]) for x in (h, 10 + i)])
    assert s.ring.used_idx() == 0
    assert s.vq.flush()
    assert s.ring.get_used() == [(heads[0], 1)] + [(h, 10 + i) for i, h in enumerate(heads[1:])]
    with pytest.raises(ValueError):
        s.vq.push_flat([heads[0], 0])  # nothing in flight
    s.ring.add([], [32])
    assert len(s.vq.pop_many(1)) == 1
    for bad in ([0, -1], [0, 2**32], [1]):
        with pytest.raises(ValueError):
            s.vq.push_flat(bad)
    assert s.vq.inflight == 1
