"""virtio-net header and mergeable RX buffers."""

from __future__ import annotations

import pytest

from virtio import net
from virtio.virtqueue import Chain

from .test_virtqueue import Setup


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
