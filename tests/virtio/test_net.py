"""virtio-net header and mergeable RX buffers."""

from __future__ import annotations

import struct
from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio import net
from virtio.virtqueue import DESC_F_NEXT, Chain, VirtQueueError

from .test_virtqueue import Setup, _twin


def test_header_roundtrip():
    hdr = net.NetHeader(1, 2, 3, 4, 5, 6, 7)
    raw = hdr.pack()
    assert len(raw) == net.HDR_LEN == 12
    assert raw[10:12] == b"\x07\x00"  # num_buffers, little-endian, last
    assert net.NetHeader.unpack(raw) == hdr
    with pytest.raises(ValueError):
        net.NetHeader.unpack(raw[:11])


def test_tx_frame_header_split_across_buffers():
    raw = net.NetHeader(flags=1).pack() + b"frame"
    chain = Chain(0, [memoryview(raw[:5]), memoryview(raw[5:14]), memoryview(raw[14:])], [])
    hdr, pieces = net.tx_frame(chain)
    assert hdr.flags == 1 and b"".join(bytes(p) for p in pieces) == b"frame"
    with pytest.raises(ValueError):
        net.tx_frame(Chain(0, [memoryview(raw[:8])], []))


@pytest.fixture
def s():
    setup = Setup(num=8)
    yield setup
    setup.close()


def test_rx_mergeable_spans_chains(s):
    heads = [s.ring.add([], [16]) for _ in range(4)]
    frame = bytes(range(30))  # 12 + 30 = 42 bytes: three 16-byte chains
    assert net.rx_put(s.vq, frame)
    s.vq.flush()
    used = s.ring.get_used()
    assert [h for h, _ in used] == heads[:3] and [n for _, n in used] == [16, 16, 10]
    data = b"".join(s.ring.written(h, n) for h, n in used)
    assert net.NetHeader.unpack(data).num_buffers == 3
    assert data[12:] == frame


def test_rx_no_room_rewinds(s):
    s.ring.add([], [16])
    assert not net.rx_put(s.vq, bytes(30))
    assert s.vq.inflight == 0 and s.vq.available() == 1


def test_rx_not_mergeable_needs_one_big_chain(s):
    s.ring.add([], [16])
    s.ring.add([], [64])
    assert not net.rx_put(s.vq, bytes(30), mergeable=False)
    assert s.vq.available() == 2


# --- TxGather: TX frames found in C (vr_tx_gather), against tx_frame() per Chain -------------

Got = tuple[bytes | None, net.NetHeader | None, bool]  # frame (None: dropped), GSO header, view


def _expected(chain: Chain) -> Got:
    """What TxGather should give for a chain, by tx_frame(): an empty frame or a short
    header is a drop (None); the header only when it says GSO; in guest memory when the
    frame is one piece."""
    try:
        hdr, pieces = net.tx_frame(chain)
    except ValueError:
        return None, None, False
    frame = b"".join(bytes(p) for p in pieces)
    if not frame:
        return None, None, False
    return frame, hdr if hdr.gso_type != net.GSO_NONE else None, len(pieces) == 1


def _gathered(g: net.TxGather, frames: list[memoryview | None],
              gso: dict[int, net.NetHeader]) -> list[Got]:
    """TxGather's answer as _expected() gives it (read now: valid until the next call)."""
    assert set(gso) <= {i for i, f in enumerate(frames) if f is not None}
    out: list[Got] = []
    for i, f in enumerate(frames):
        if f is None or len(f) == 0:
            out.append((None, None, False))
        else:
            out.append((bytes(f), gso.get(i), f.obj is not g.bounce))
    return out


def _avail_event(setup: Setup) -> int:
    ring = setup.ring
    return int(struct.unpack("<H", ring.mem.read(ring.used + 4 + 8 * ring.num, 2))[0])


_GSO_TYPES = [0, 0, 0, net.GSO_TCPV4, net.GSO_UDP, net.GSO_TCPV6, net.GSO_UDP_L4,
              net.GSO_TCPV4 | net.GSO_ECN, 0xFF]


@st.composite
def _tx_chain(draw: st.DrawFn) -> tuple[list[bytes], list[int], bool]:
    """(readable buffers, writable sizes, indirect): a header with a random gso_type and a
    payload, maybe cut short, split at random points (0-byte and < 12-byte buffers)."""
    hdr = bytearray(draw(st.binary(min_size=net.HDR_LEN, max_size=net.HDR_LEN)))
    hdr[net.GSO_TYPE_OFFSET] = draw(st.sampled_from(_GSO_TYPES))
    payload = draw(st.binary(max_size=200))
    raw = bytes(hdr) + payload
    length = draw(st.one_of(st.just(len(raw)), st.just(len(raw)),
                            st.integers(0, min(len(raw), 16)), st.integers(0, len(raw))))
    raw = raw[:length]
    nbufs = draw(st.integers(1, 6))
    cut = st.one_of(st.integers(0, min(len(raw), 14)), st.integers(0, len(raw)))
    cuts = sorted(draw(st.lists(cut, min_size=nbufs - 1, max_size=nbufs - 1)))
    readable = [raw[a:b] for a, b in pairwise([0, *cuts, len(raw)])]
    writable = draw(st.lists(st.integers(1, 64), max_size=2))
    return readable, writable, draw(st.booleans())


@settings(max_examples=200, deadline=None)
@given(chains=st.lists(_tx_chain(), min_size=1, max_size=16), base=st.integers(0, 0xFFFF),
       count=st.integers(1, 20), bounce_size=st.sampled_from([net.TX_BOUNCE, 1000, 200]))
def test_tx_frames_match_tx_frame(chains: list[tuple[list[bytes], list[int], bool]],
                                  base: int, count: int, bounce_size: int) -> None:
    """Random TX chains through TxGather (over as many calls as the bounce buffer needs) give
    the same heads, frames and GSO headers as tx_frame() on the reference's Chains; a frame
    in one piece is a view into guest memory, one in several a copy in the bounce buffer."""
    setup = Setup(num=16, indirect=True)
    try:
        setup.vq.set_base(base)
        setup.ring.set_avail_idx(base)
        setup.ring.kicked_at = base
        for readable, writable, indirect in chains:
            if (1 if indirect else len(readable) + len(writable)) > len(setup.ring.free):
                continue
            setup.ring.add(readable, writable, indirect=indirect)
        ref = _twin(setup)
        want = ref.pop_many(16)
        g = net.TxGather(count, bounce_size=bounce_size)
        heads: list[int] = []
        got: list[Got] = []
        for _ in range(40):
            h, frames, gso = g.tx_frames(setup.vq, count)
            assert len(h) == len(frames) <= count
            assert h or not g.full  # (no frame here is bigger than the bounce buffer)
            heads += h
            got += _gathered(g, frames, gso)
            assert setup.vq.last_avail_idx == (base + len(heads)) & 0xFFFF
            assert setup.vq.inflight == len(heads)
            if not h:
                break
        assert heads == [c.head for c in want]
        assert got == [_expected(c) for c in want]
        assert g.tx_frames(setup.vq, count) == ([], [], {})
        ref.reset()
    finally:
        setup.close()


@pytest.mark.parametrize("event_idx", [False, True], ids=["plain", "event_idx"])
def test_tx_frames_views_into_guest_memory_and_copies(event_idx: bool) -> None:
    setup = Setup(num=16, event_idx=event_idx)
    try:
        ring, vq = setup.ring, setup.vq
        hdr = net.NetHeader(flags=net.HDR_F_NEEDS_CSUM).pack()
        gso_hdr = net.NetHeader(gso_type=net.GSO_TCPV4, hdr_len=54, gso_size=1448)
        one = ring.add([hdr + b"A" * 20], [32])
        split_hdr = ring.add([hdr[:5], hdr[5:] + b"B" * 20])  # header over two, frame in one
        hdr_alone = ring.add([hdr, b"", b"C" * 20, b""])
        scattered = ring.add([gso_hdr.pack() + b"D" * 10, b"", b"E" * 10])
        short = ring.add([hdr[:8]])
        just_hdr = ring.add([hdr[:6], hdr[6:]])
        g = net.TxGather(8)
        heads, frames, gso = g.tx_frames(vq, 8)
        assert heads == [one, split_hdr, hdr_alone, scattered, short, just_hdr]
        assert frames[4] is None and frames[5] is None
        f0, f1, f2, f3 = (f for f in frames[:4] if f is not None)
        assert [bytes(f) for f in (f0, f1, f2, f3)] == \
            [b"A" * 20, b"B" * 20, b"C" * 20, b"D" * 10 + b"E" * 10]
        assert gso == {3: gso_hdr}
        # one piece: where it is in guest memory, so a guest write shows through
        ring.mem.write(ring.buffers[one][0][0] + 12, b"a")
        ring.mem.write(ring.buffers[split_hdr][1][0] + 7, b"b")
        ring.mem.write(ring.buffers[hdr_alone][2][0], b"c")
        assert bytes(f0[:2]) == b"aA" and bytes(f1[:2]) == b"bB" and bytes(f2[:2]) == b"cC"
        assert all(f.obj is not g.bounce for f in (f0, f1, f2))
        # several pieces: a copy, which the guest's later writes do not reach
        assert f3.obj is g.bounce
        ring.mem.write(ring.buffers[scattered][0][0] + 12, b"x")
        ring.mem.write(ring.buffers[scattered][2][0], b"y")
        assert bytes(f3) == b"D" * 10 + b"E" * 10
    finally:
        setup.close()


def test_tx_frames_bounce_full_stops_the_batch() -> None:
    setup = Setup(num=16)
    try:
        ring, vq = setup.ring, setup.vq
        hdr = net.NetHeader().pack()
        data = [bytes([0x10 + i]) * 40 for i in range(5)]
        heads = [ring.add([hdr + d[:15], d[15:]]) for d in data[:4]]
        heads.append(ring.add([hdr + data[4]]))  # one piece: needs no room, still waits
        g = net.TxGather(8, bounce_size=100)
        h1, f1, gso1 = g.tx_frames(vq, 8)
        assert g.full and h1 == heads[:2] and gso1 == {}
        assert vq.last_avail_idx == 2 and vq.inflight == 2 and vq.available() == 3
        kept = [bytes(f) for f in f1 if f is not None]
        assert kept == data[:2]
        vq.push_flat([x for h in h1 for x in (h, 0)])
        vq.flush()
        assert [h for h, _ in ring.get_used()] == heads[:2]
        assert [bytes(f) for f in f1 if f is not None] == kept  # intact until the next call
        h2, f2, _ = g.tx_frames(vq, 8)  # the rest: two copies (80 bytes) and a view
        assert not g.full and h2 == heads[2:]
        assert [bytes(f) for f in f2 if f is not None] == data[2:]
        assert vq.last_avail_idx == 5 and vq.inflight == 3 and vq.available() == 0
        assert g.tx_frames(vq, 8) == ([], [], {}) and not g.full
    finally:
        setup.close()


def test_tx_frames_over_several_pops_keep_their_bounce_offsets() -> None:
    """More buffer records than the C gather holds at first (1024), then a chain longer than
    that on its own: several pops in one call, each one's copies after the earlier ones',
    until a chain does not fit what is left of the records (the call stops there, `full`,
    and the records grow); the next call takes the rest, the long chain too."""
    setup = Setup(num=128, indirect=True)
    try:
        ring, vq = setup.ring, setup.vq
        ref_base = vq.last_avail_idx
        assert ref_base == 0
        for i in range(100):  # 12 readable buffers each (but one of 3): 1191 records
            pieces = 2 if i == 85 else 11  # 85 * 12 + 3 fill the first 1024 records but one
            ring.add([net.NetHeader(gso_type=i % 2).pack()] +
                     [bytes([i, k]) * 3 for k in range(pieces)], indirect=True)
        ring.add([net.NetHeader().pack()] + [bytes([k % 256]) for k in range(1500)],
                 indirect=True)
        ref = _twin(setup)
        want = ref.pop_many(128)
        assert len(want) == 101
        g = net.TxGather(128)
        heads, frames, gso = g.tx_frames(vq, 128)
        assert g.full and len(heads) == 86  # pops of 85 chains and of 1, the records full
        got = _gathered(g, frames, gso)
        gso_at = sorted(gso)
        h2, f2, gso2 = g.tx_frames(vq, 128)
        assert not g.full
        heads += h2
        got += _gathered(g, f2, gso2)
        gso_at += [86 + i for i in sorted(gso2)]
        assert heads == [c.head for c in want]
        assert got == [_expected(c) for c in want]
        assert gso_at == list(range(1, 100, 2))
        ref.reset()
    finally:
        setup.close()


def test_tx_frames_record_writable_buffers_for_the_dirty_log() -> None:
    """Under live migration the TX gather's chains' writable buffers are recorded from the
    records it leaves (VirtQueue.took_records(popped=True)), to be marked when pushed."""
    setup = Setup(num=8)
    try:
        ring, vq = setup.ring, setup.vq
        vq.set_dirty_log(object())  # (not written to before a push)
        a = ring.add([net.NetHeader().pack() + b"x" * 20], [64])
        b = ring.add([net.NetHeader().pack(), b"y" * 30], [])
        c = ring.add([net.NetHeader().pack() + b"z" * 20], [16, 32])
        g = net.TxGather(8)
        heads, frames, _ = g.tx_frames(vq, 8)
        assert heads == [a, b, c] and [bytes(f or b"") for f in frames] == \
            [b"x" * 20, b"y" * 30, b"z" * 20]
        writes = vq._popped_writes
        assert writes[a] == [(gpa, n) for gpa, n, w in ring.buffers[a] if w]
        assert b not in writes
        assert writes[c] == [(gpa, n) for gpa, n, w in ring.buffers[c] if w]
        assert len(writes[c]) == 2
    finally:
        setup.close()


def test_tx_frames_empty_ring_rearms_the_kick() -> None:
    setup = Setup(num=8, event_idx=True)
    try:
        ring, vq = setup.ring, setup.vq
        g = net.TxGather(4)
        hdr = net.NetHeader().pack()
        a = ring.add([hdr + b"a" * 20])
        b = ring.add([hdr + b"b" * 20])
        assert ring.kick()
        heads, _, _ = g.tx_frames(vq, 2)  # as many as asked: no empty pop
        assert heads == [a, b] and _avail_event(setup) == 0
        ring.add([hdr + b"c" * 20])
        assert not ring.kick()  # not re-armed: the device did not find the ring empty
        heads, frames, _ = g.tx_frames(vq, 4)  # takes c, then finds the ring empty
        assert len(heads) == 1 and [bytes(f) for f in frames if f] == [b"c" * 20]
        assert _avail_event(setup) == 3
        assert g.tx_frames(vq, 4) == ([], [], {}) and not g.full
        assert _avail_event(setup) == 3 and vq.inflight == 3
        ring.add([hdr + b"d" * 20])
        assert ring.kick()
    finally:
        setup.close()


def test_tx_frames_empty_ring_without_event_idx() -> None:
    setup = Setup(num=8)
    try:
        g = net.TxGather(4)
        assert g.tx_frames(setup.vq, 4) == ([], [], {}) and not g.full
        assert setup.vq.last_avail_idx == 0 and setup.vq.inflight == 0
    finally:
        setup.close()


@pytest.mark.parametrize("case", ["outside", "crosses_end", "huge_len", "after_good_ones"])
def test_tx_frames_hostile_chain_breaks_the_queue(case: str) -> None:
    setup = Setup(num=8)
    try:
        ring, vq = setup.ring, setup.vq
        r0 = setup.dmem.regions[0].desc
        hdr = net.NetHeader().pack()
        if case == "after_good_ones":
            ring.add([hdr + b"a" * 20])
            ring.add([hdr, b"b" * 20])
        bad = ring.free.pop()
        if case == "outside":
            ring.write_desc(bad, 0x10, 32, 0, 0)
        elif case == "crosses_end":
            ring.write_desc(bad, r0.gpa + r0.size - 8, 32, 0, 0)
        elif case == "huge_len":
            ring.write_desc(bad, r0.gpa, 0xFFFFFFFF, 0, 0)
        else:
            good = ring.mem.alloc(32)
            ring.write_desc(bad, good, 32, DESC_F_NEXT, bad - 1)
            ring.write_desc(bad - 1, 2**64 - 16, 32, 0, 0)
        ring.publish(bad)
        g = net.TxGather(8)
        with pytest.raises(VirtQueueError):
            g.tx_frames(vq, 8)
        assert vq.broken
        with pytest.raises(VirtQueueError):
            g.tx_frames(vq, 8)
    finally:
        setup.close()


def test_tx_frames_frame_bigger_than_the_bounce_buffer_is_not_stuck() -> None:
    setup = Setup(num=8)
    try:
        ring, vq = setup.ring, setup.vq
        hdr = net.NetHeader().pack()
        big = ring.add([hdr + b"a" * 100, b"b" * 100])
        after = ring.add([hdr + b"c" * 20])
        g = net.TxGather(8, bounce_size=64)
        heads: list[int] = []
        for _ in range(4):
            try:
                h, _, _ = g.tx_frames(vq, 8)
            except VirtQueueError:
                return  # refusing the chain (breaking the queue) would also be progress
            heads += h
        assert heads[:2] == [big, after]  # taken (even if dropped), and the ring moves on
    finally:
        setup.close()
