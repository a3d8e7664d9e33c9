"""Split virtqueue against a Python driver: pop/push, indirect, notifications, hostile rings."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio.memory import GuestMemory
from virtio.message import VringAddr
from virtio.virtqueue import (
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
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
