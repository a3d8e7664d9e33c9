"""The vhost-user link's buffers to the guest (tests/unit/test_link_vhost.py's harness): RX
buffers whole or bounced, rx_scatter() over mergeable buffers, net.rx_frames()'s records."""

from __future__ import annotations

import struct

import pytest

from tests.unit.test_link_vhost import (
    ALL,
    BASE,
    GUEST_MAC,
    OUR_MAC,
    Harness,
    _fill,
    _guest_memory,
    _payload,
    discover,
)
from vhostpasst.link.base import ETH_MAX_FRAME, Link
from vhostpasst.wire import eth
from virtio import message as m
from virtio import net
from virtio.message import Request as R


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


# --- RX buffers --------------------------------------------------------------------------------

def test_rx_buffers_point_into_guest_memory_when_big_enough() -> None:
    h = Harness(frame_max=1514)
    try:
        h.guest.bring_up()
        h.guest.post_rx(3, size=1536)  # what Linux posts with mergeable buffers
        bufs = h.link.rx_buffers(2)
        assert [len(b) for b in bufs] == [1536 - net.HDR_LEN] * 2
        frame = eth.build_eth(GUEST_MAC, OUR_MAC, eth.ETH_P_IP, bytes(range(100)))
        bufs[0][:len(frame)] = frame
        h.link.commit([len(frame)])  # the second buffer goes back to the ring
        h.link.flush()
        assert h.link.tx_zero_copy == 1 and h.link.tx_bounced == 0
        [(hdr, got)] = h.guest.received()
        assert got == frame and hdr.num_buffers == 1
        assert h.guest.rx.calls() >= 1
        # Both unused chains are still there: two more frames fit.
        assert len(h.link.rx_buffers(4)) == 2
        h.link.flush()  # uncommitted: rewound
        assert len(h.link.rx_buffers(4)) == 2
    finally:
        h.close()


def test_rx_chains_handed_out_go_back_when_the_ring_stops() -> None:
    """GET_VRING_BASE while chains are handed out for a socket read (not committed): the
    index it reports does not count them, so whoever resumes the ring (qemu after a stop, the
    daemon on a migration's destination) offers them again instead of losing them."""
    h = Harness(frame_max=1514)
    try:
        h.guest.bring_up()
        h.guest.post_rx(3, size=1536)
        assert len(h.link.rx_buffers(2)) == 2
        assert h.link.tx_bounced == 0 and h.link.backend.queues[net.RX_QUEUE].inflight == 2
        reply = h.guest.fe.request(R.GET_VRING_BASE, m.encode_state(net.RX_QUEUE, 0))
        assert reply is not None and reply.state() == (net.RX_QUEUE, 0)
        h.link.flush()  # nothing left to rewind or publish
        assert h.guest.rx.used_idx() == 0
    finally:
        h.close()


def test_frame_bigger_than_one_rx_buffer_uses_mergeable_buffers(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(12, size=256)
    frame = eth.build_eth(GUEST_MAC, OUR_MAC, eth.ETH_P_IP, bytes(i & 0xFF for i in range(1000)))
    assert h.link.send(frame)
    bufs = h.link.rx_buffers(1)  # 256-byte buffers can't hold a frame: a bounce buffer
    assert len(bufs) == 1 and len(bufs[0]) >= ETH_MAX_FRAME
    bufs[0][:len(frame)] = frame
    h.link.commit([len(frame)])
    h.link.flush()
    got = h.guest.received()
    assert [f for _, f in got] == [frame, frame]
    assert [hdr.num_buffers for hdr, _ in got] == [5, 5]  # 12 + 1014 bytes in 256-byte chains
    assert h.link.tx_zero_copy == 0 and h.link.tx_frames == 2
    assert h.link.tx_bounced == 1  # the committed frame; send()'s copy is not a bounce


@pytest.mark.parametrize("features", [BASE, ALL], ids=["plain", "event-idx"])
def test_small_frames_wait_for_buffers_when_the_ring_is_full(h: Harness, features: int) -> None:
    """send() on a full RX ring (a burst of TCP data took every buffer) keeps the frame (an
    ACK, ARP...) instead of dropping it; the guest is asked to kick, and when it posts
    buffers the frames go in the order they were sent, before anything sent later."""
    h.guest.bring_up(features)
    h.guest.post_rx(2)
    h.pump()
    frames = [bytes([i]) * 300 for i in range(1, 6)]
    assert all(h.link.send(f) for f in frames)
    h.link.flush()
    assert [f for _, f in h.guest.received()] == frames[:2]
    assert h.link.tx_dropped == 0 and h.link.tx_frames == 2
    h.guest.post_rx(2)  # room for two of the three waiting
    h.pump()
    assert h.link.send(b"\x09" * 300)  # after the waiting ones
    h.guest.post_rx(4)
    h.pump()
    assert [f for _, f in h.guest.received()] == frames[2:] + [b"\x09" * 300]
    assert h.link.tx_dropped == 0 and h.link.tx_frames == 6


def test_waiting_frames_are_bounded_and_unfittable_ones_dropped(h: Harness) -> None:
    """What waits for buffers is bounded (HOLD_BYTES), and a frame bigger than the whole ring
    can hold, every buffer posted, is dropped at once rather than blocking the rest."""
    from vhostpasst.link import vhost_rx as vhost
    h.guest.bring_up(ALL)
    h.guest.post_rx(h.queue_size, size=256)  # the whole ring: 16 x 256 bytes
    h.pump()
    assert not h.link.send(bytes(5000))  # 12 + 5000 > 4096: never fits
    assert h.link.tx_dropped == 1
    assert h.link.send(bytes(200))
    h.link.flush()
    assert [len(f) for _, f in h.guest.received()] == [200]
    h.guest.rx.get_used()
    big = bytes(1400)  # 6 of the 15 buffers left each: two fit, then the waiting room
    tries = 2 + vhost.HOLD_BYTES // len(big) + 10
    taken = [h.link.send(big) for _ in range(tries)]
    assert sum(taken) == 2 + vhost.HOLD_BYTES // len(big) and not any(taken[-10:])
    assert h.link.tx_dropped == 1 + 10


def test_frame_dropped_when_mergeable_buffers_not_negotiated(h: Harness) -> None:
    h.guest.bring_up(BASE & ~net.F_MRG_RXBUF)
    h.guest.post_rx(8, size=256)
    assert not h.link.send(bytes(1000))
    assert h.link.send(bytes(200))
    h.link.flush()
    [(hdr, _)] = h.guest.received()
    assert hdr.num_buffers == 1


def test_no_rx_buffers_then_rx_kick_wakes_the_waiter(h: Harness) -> None:
    h.guest.bring_up()
    woken: list[int] = []
    h.link.on_rx_ready.append(lambda: woken.append(len(h.link.rx_buffers(8))))
    assert h.link.rx_buffers(4) == []
    assert h.link.send(discover())  # kept for the guest's next buffers, not dropped
    h.pump()
    assert woken == []
    h.guest.post_rx(2)  # the kick: EVENT_IDX was re-armed by the empty pop
    h.pump()
    assert woken == [1]  # the waiting frame went first, into one of the two
    h.link.flush()
    assert [f for _, f in h.guest.received()] == [discover()]
    h.guest.post_rx(1)  # not starved any more: no wake-up
    h.pump()
    assert woken == [1] and h.link.tx_dropped == 0


# --- rx_scatter(): frames scattered in place over mergeable buffers ---------------------------





@pytest.mark.parametrize("features", [BASE, ALL], ids=["plain", "all"])
def test_rx_scatter_scatter_over_mergeable_buffers_in_place(features: int) -> None:
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up(features)
        h.guest.post_rx(20, size=1536)  # Linux's smallest mergeable buffers
        frames = h.link.rx_scatter(3, 5000, head=54)
        # 12 + 5000 bytes: 4 chains of 1536 (the first 1524 bytes past the header)
        assert [[len(v) for v in f] for f in frames] == [[1524, 1536, 1536, 404]] * 3
        datas = [_payload(5000, 1), _payload(5000, 2), _payload(100, 3)]
        for frame, data in zip(frames, datas, strict=True):
            _fill(frame, data)
        h.link.commit_scatter([len(d) for d in datas])  # the last needs one chain of its 4
        h.link.flush()
        got = h.guest.received()
        assert [f for _, f in got] == datas
        assert [hdr.num_buffers for hdr, _ in got] == [4, 4, 1]
        flags = net.HDR_F_DATA_VALID if features & net.F_GUEST_CSUM else 0
        assert all(hdr.flags == flags for hdr, _ in got)
        assert (h.link.tx_zero_copy, h.link.tx_scattered, h.link.tx_frames) == (3, 2, 3)
        # the 3 chains the short frame did not need went back: 20 - 9 = 11 left, 2 frames
        assert len(h.link.rx_scatter(8, 5000, head=54)) == 2
        h.link.flush()  # not committed: rewound
        assert len(h.link.rx_scatter(8, 5000, head=54)) == 2
    finally:
        h.close()


def test_rx_scatter_unneeded_chains_before_used_ones_go_back_empty() -> None:
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up()
        h.guest.post_rx(8, size=1536)
        frames = h.link.rx_scatter(2, 5000)
        _fill(frames[0], _payload(60))
        _fill(frames[1], _payload(5000))
        h.link.commit_scatter([60, 5000])
        h.link.flush()
        used = h.guest.rx.get_used()
        # frame 0 in one chain, frame 1 in 4 (a frame's chains must be consecutive in the
        # used ring: num_buffers), then frame 0's 3 spare chains returned empty
        assert [length for _, length in used] == [72, 1536, 1536, 1536, 404, 0, 0, 0]
        assert h.link.tx_dropped == 0 and h.link.tx_frames == 2
    finally:
        h.close()


def test_rx_scatter_wait_for_a_whole_frame_then_the_kick_wakes() -> None:
    h = Harness(queue_size=16)
    try:
        h.guest.bring_up()
        woken: list[int] = []
        h.link.on_rx_ready.append(lambda: woken.append(len(h.link.rx_scatter(4, 5000))))
        h.guest.post_rx(2, size=1536)  # half a frame
        assert h.link.rx_scatter(4, 5000) == []
        h.guest.post_rx(2, size=1536)  # now one whole frame
        h.pump()
        assert woken == [1]
        h.link.flush()
    finally:
        h.close()


def test_rx_scatter_ring_smaller_than_a_frame_gives_what_it_holds() -> None:
    h = Harness(queue_size=4)
    try:
        h.guest.bring_up()
        h.guest.post_rx(4, size=1024)
        [frame] = h.link.rx_scatter(2, 5000)
        assert sum(len(v) for v in frame) == 4 * 1024 - net.HDR_LEN
        _fill(frame, _payload(4000))
        h.link.commit_scatter([4000])
        h.link.flush()
        [(hdr, got)] = h.guest.received()
        assert got == _payload(4000) and hdr.num_buffers == 4
    finally:
        h.close()


def test_rx_scatter_without_mergeable_one_chain_per_frame(h: Harness) -> None:
    h.guest.bring_up(BASE & ~net.F_MRG_RXBUF)
    h.guest.post_rx(3, size=1536)
    frames = h.link.rx_scatter(4, 5000)
    assert [[len(v) for v in f] for f in frames] == [[1524]] * 3
    _fill(frames[0], _payload(1524))
    h.link.commit_scatter([1524])
    h.link.flush()
    [(hdr, got)] = h.guest.received()
    assert got == _payload(1524) and hdr.num_buffers == 1
    with pytest.raises(ValueError):  # more than the chain holds
        h.link.rx_scatter(1, 5000)
        h.link.commit_scatter([1525])
    assert len(h.link.rx_scatter(4, 5000)) == 2  # the chains went back


def test_rx_scatter_header_only_first_descriptor(h: Harness) -> None:
    """Linux without MRG_RXBUF ("big packets") puts the virtio-net header in a descriptor
    of its own: the frame starts in the next one and the header is written there."""
    h.guest.bring_up(BASE & ~net.F_MRG_RXBUF)
    h.guest.rx.add([], [net.HDR_LEN, 2048, 4096])
    h.guest.rx.kick()
    [frame] = h.link.rx_scatter(1, 5000, head=54)
    assert [len(v) for v in frame] == [2048, 2952]
    _fill(frame, _payload(3000))
    h.link.commit_scatter([3000])
    h.link.flush()
    [(hdr, got)] = h.guest.received()
    assert got == _payload(3000) and hdr.num_buffers == 1


def test_rx_scatter_bounce_when_headers_would_straddle(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(8, size=256)
    [frame] = h.link.rx_scatter(1, 1000, head=300)  # no first buffer holds 300 bytes
    assert len(frame) == 1 and len(frame[0]) == 1000  # a bounce buffer
    _fill(frame, _payload(1000))
    h.link.commit_scatter([1000])
    h.link.flush()
    [(hdr, got)] = h.guest.received()
    assert got == _payload(1000) and hdr.num_buffers == 4  # 12 + 1000 bytes
    assert h.link.tx_zero_copy == 0 and h.link.tx_bounced == 1


def test_rx_scatter_stay_within_iov_max(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    import vhostpasst.link.vhost_rx as vhost
    monkeypatch.setattr(vhost, "IOV_MAX", 10)
    h.guest.bring_up()
    h.guest.post_rx(16, size=1536)
    frames = h.link.rx_scatter(4, 5000)
    assert len(frames) == 2 and sum(map(len, frames)) == 8
    h.link.flush()
    assert len(h.guest.rx.get_used()) == 0


def test_pop_many_matches_pop(h: Harness) -> None:
    """VirtQueue.pop_many(): the short path (one writable descriptor) and the full walk
    (several descriptors) give what pop() gives; fewer when the ring runs dry; rewind works."""
    h.guest.bring_up()
    h.guest.post_rx(2, size=1536)
    h.guest.rx.add([], [100, 200])
    h.guest.rx.kick()
    vq = h.link._queue(net.RX_QUEUE)
    assert vq is not None
    chains = vq.pop_many(5)
    assert [[len(b) for b in c.writable] for c in chains] == [[1536], [1536], [100, 200]]
    assert vq.pop_many(1) == [] and vq.inflight == 3
    vq.rewind(3)
    assert [c.head for c in vq.pop_many(3)] == [c.head for c in chains]
    vq.rewind(3)


def test_pop_many_refuses_a_buffer_outside_guest_memory(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(1)
    ring = h.guest.rx
    head = ring.free.pop(0)
    ring.write_desc(head, 0xDEAD0000000, 1536, 2, 0)  # DESC_F_WRITE, far outside memory
    ring.publish(head)
    ring.kick()
    assert h.link.rx_scatter(2, 5000) == []
    h.pump()
    assert h.disconnects == 1


def test_send_while_frames_are_out_is_deferred(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(6, size=1536)
    [frame] = h.link.rx_scatter(1, 2000)
    assert h.link.send(b"A" * 60)
    _fill(frame, b"B" * 2000)
    h.link.commit_scatter([2000])
    h.link.flush()
    assert [f for _, f in h.guest.received()] == [b"B" * 2000, b"A" * 60]


def test_rx_scatter_default_wraps_rx_buffers() -> None:

    class Pool(Link):
        connected = True
        committed: list[int] = []

        def rx_buffers(self, count: int) -> list[memoryview]:
            return [memoryview(bytearray(ETH_MAX_FRAME)) for _ in range(min(count, 3))]

        def commit(self, lengths) -> None:  # type: ignore[no-untyped-def]
            self.committed += lengths

        def flush(self) -> None: ...
        def close(self) -> None: ...

    link = Pool(lambda frames: None)
    frames = link.rx_scatter(5, 1514)
    assert [[len(v) for v in f] for f in frames] == [[1514]] * 3
    link.commit_scatter([100, 200])
    assert link.committed == [100, 200]


def test_send_while_buffers_are_out_is_deferred(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(4)
    bufs = h.link.rx_buffers(2)
    assert h.link.send(b"A" * 60)
    bufs[0][:60] = b"B" * 60
    h.link.commit([60])
    h.link.flush()
    assert [f for _, f in h.guest.received()] == [b"B" * 60, b"A" * 60]


def test_commit_more_than_handed_out_is_an_error(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(2)
    h.link.rx_buffers(1)
    with pytest.raises(ValueError):
        h.link.commit([60, 60])
    assert len(h.link.rx_buffers(2)) == 2  # the chain went back


def test_nothing_handed_out_before_the_rings_run(h: Harness) -> None:
    assert h.link.rx_buffers(4) == [] and not h.link.send(b"x" * 60)


# --- net.rx_frames(): the chains' records next to the views ---------------------------------------

def test_rx_frames_records_same_as_views() -> None:
    """The batch's raw records are those of exactly the chains kept (region, offset, length,
    as RxBatch.buf() reads them), and a second pop of the same chains lays them out the
    same."""
    h = Harness(queue_size=64)
    try:
        _guest_memory(h, (40000, 1 << 20))
        h.guest.bring_up(ALL)
        h.guest.post_rx(30, size=4096)
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None
        views = net.rx_frames(vq, 8, 20000, 54)  # 5 chains a frame: 6 frames, then dry
        assert views is not None and len(views.frames) == 6
        vq.rewind(len(views.heads))
        recs = net.rx_frames(vq, 8, 20000, 54)
        assert recs is not None and recs.records is not None
        assert (recs.heads, recs.lens, recs.regions, recs.offsets, recs.starts) == \
            (views.heads, views.lens, views.regions, views.offsets, views.starts)
        assert (recs.starved, recs.seen) == (views.starved, views.seen) == (True, 30)
        assert len(recs.heads) == 30 and recs.starts == [0, 5, 10, 15, 20, 25]
        assert set(recs.regions) == {0, 1}  # buffers in both regions
        triples = list(struct.iter_unpack("=QQQ", recs.records))
        assert triples == list(zip(recs.regions, recs.offsets, recs.lens, strict=True))
        mem = vq.memory.table.views
        for k, (region, start, length) in enumerate(triples):
            assert recs.buf(k) == mem[region][start:start + length]
        for frame, s in zip(views.frames, views.starts, strict=True):
            assert frame[0] == recs.buf(s)[net.HDR_LEN:net.HDR_LEN + len(frame[0])]
        assert vq.inflight == len(recs.heads)
        vq.rewind(vq.inflight)
    finally:
        h.close()


def test_rx_frames_records_trimmed_to_the_chains_kept() -> None:
    """Chains popped past the last frame go back, and their records go too."""
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up(ALL)
        h.guest.post_rx(10, size=1536)
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None
        batch = net.rx_frames(vq, 4, 5000, 54, hint=1536)  # 4 chains a frame
        assert batch is not None and batch.records is not None
        assert batch.starts == [0, 4] and len(batch.heads) == 8 and batch.seen == 10
        assert len(batch.records) == 24 * 8 and vq.inflight == 8
        vq.rewind(8)
    finally:
        h.close()
