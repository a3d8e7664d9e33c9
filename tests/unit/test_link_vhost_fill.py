"""VhostUserLink.rx_fill() (net.fill_rx_frames() with tcp_vu.c's reader and writer, as
out_vu.GuestFillOutput calls it) against the path tcp takes without it: rx_scatter(),
recvmsg_into() over its views, the headers by vp_tcp_frames_sg_tso() over the frames' first
views and commit_scatter() (test_link_vhost._scatter_fill()); and where it declines, fails or
disconnects."""

from __future__ import annotations

import logging
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from tests.unit.test_link_vhost import (
    ALL,
    BASE,
    GUEST_MAC,
    OUR_MAC,
    TSO,
    Harness,
    _payload,
)
from tests.unit.test_link_vhost_scatter import FADDR4 as FADDR
from tests.unit.test_link_vhost_scatter import (
    FPORT,
    GPORT,
    PEEK,
    WRITER,
    Fill,
    _fill_run,
    link_rx_fill,
)
from tests.unit.test_link_vhost_scatter import GADDR4 as GADDR
from vhostpasst.link.base import Tso
from vhostpasst.wire import checksum
from vhostpasst.wire import tcp as wtcp
from virtio import net
from virtio.ring import Fill as FillOutcome
from virtio.ring import RxFill
from virtio.virtqueue import VirtQueue

OFF = wtcp.TCP4_PAYLOAD_OFFSET  # 54
TSO4 = Tso(False, OFF - wtcp.TCP_HLEN, OFF, 1448)


def rx_fill(h: Harness, fd: int, count: int, size: int, room: int, fill: Fill | None,
            tso: Tso | None = None, flags: int = PEEK) -> tuple[int, int, int] | None:
    if fill is None:
        fill = Fill(1, 2, 3, tso)
    return link_rx_fill(h.link, fd, count, OFF + size, OFF, room, flags, WRITER, fill.arg, tso)


@pytest.mark.parametrize("features, tso, sizes, size, count, room", [
    (ALL, None, [4096] * 40, 1460, 12, 1 << 20),  # a frame per 4 KiB buffer
    (ALL, None, [1536] * 40, 1460, 12, 5000),  # 1.5 KiB ones, two each; the window
    (ALL | TSO, TSO4, [4096] * 60, 65000, 4, 1 << 20),  # 64 KiB GSO frames over 17 buffers
    (ALL | TSO, TSO4, [1536] * 60, 1448 * 3, 8, 10000),  # GSO and a short last one
    (ALL | TSO, TSO4, [1536, 4096, 2000, 1536, 3000] * 8, 9000, 8, 1 << 20),  # any sizes
], ids=["1460-4k", "1460-1.5k-window", "64k-tso", "tso-window", "mixed"])
@pytest.mark.parametrize("mem", [(1 << 20,), (40000, 1 << 20)], ids=["one-region", "two"])
def test_rx_fill_same_as_rx_scatter_headers_and_commit_scatter(
        features: int, tso: Tso | None, sizes: list[int], size: int, count: int, room: int,
        mem: tuple[int, ...]) -> None:
    """vp_tcp_fill_writer through rx_fill(): the guest sees the same frames (bytes, used
    entries, virtio-net headers), the link counts the same, the queue ends in the same
    state and the seq moves the same as rx_scatter(), recvmsg_into() over its views,
    vp_tcp_frames_sg_tso() over the first buffers and commit_scatter(); an empty ring and
    the end of the data on the way."""
    data = _payload(150000, 4)
    rounds: list[tuple[int, int, int, int, bool, int | None]] = \
        [(count, OFF + size, OFF, room, True, None)] * 3 + \
        [(count, OFF + size, OFF, 1 << 20, True, None)] * 2
    ours, took = _fill_run(True, features, mem, sizes, rounds, data)
    theirs, _ = _fill_run(False, features, mem, sizes, rounds, data)
    assert ours == theirs
    assert took[0], "rx_fill() declined: only the reference ran"
    assert ours[1], "nothing reached the guest"
    counters = ours[-4]
    assert counters[0] > 0  # type: ignore[index]
    if tso is not None and size > tso.mss:
        assert counters[3] > 0  # type: ignore[index]


def _frames(h: Harness) -> list[tuple[net.NetHeader, bytes]]:
    return h.guest.received()


def test_rx_fill_tcp_frames_as_the_guest_sees_them() -> None:
    """Three frames over 4 KiB buffers, 3000 bytes queued: IPv4/TCP with the seq moving by
    each payload, the ACK and window given, ACK on all, PSH on the last, DATA_VALID, a
    valid IPv4 header checksum; the writer's seq moves past them; the counters move."""
    h = Harness(queue_size=64)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL)
        h.guest.post_rx(8, size=4096)
        data = _payload(3000, 8)
        a.sendall(data)
        f = Fill(1000, 77, 4321, None)
        assert rx_fill(h, b.fileno(), 4, 1460, 1 << 20, f) == (3000, 3, 4 * 1460)
        assert f.f.seq == 4000
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None and (vq.last_avail_idx, vq.inflight) == (3, 0)
        assert (h.link.tx_frames, h.link.tx_zero_copy, h.link.tx_scattered, h.link.tx_gso) \
            == (3, 3, 0, 0)
        h.link.flush()
        got = _frames(h)
        assert len(got) == 3
        seq = 1000
        for i, (hdr, frame) in enumerate(got):
            want = data[1460 * i:1460 * (i + 1)]
            assert (hdr.flags, hdr.gso_type, hdr.num_buffers) == \
                (net.HDR_F_DATA_VALID, net.GSO_NONE, 1)
            assert frame[:6] == GUEST_MAC and frame[6:12] == OUR_MAC
            assert frame[12:14] == b"\x08\x00"
            iph = frame[14:34]
            assert struct.unpack("!H", iph[2:4])[0] == 20 + 20 + len(want)
            assert iph[12:16] == FADDR and iph[16:20] == GADDR
            assert _fold(iph) == 0  # the IPv4 header checksum holds
            tcph = frame[34:54]
            sport, dport, tseq, tack, _, tflags, twnd = struct.unpack("!HHIIBBH", tcph[:16])
            assert (sport, dport, tseq, tack, twnd) == (FPORT, GPORT, seq, 77, 4321)
            assert tflags == wtcp.ACK | (wtcp.PSH if i == 2 else 0)
            assert frame[54:] == want
            seq += len(want)
        assert b.recv(5000) == data  # peeked
    finally:
        a.close()
        b.close()
        h.close()


def _fold(buf: bytes) -> int:
    s = sum(struct.unpack(f"!{len(buf) // 2}H", buf))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return (~s) & 0xFFFF


def test_rx_fill_tso_frames_get_the_gso_header() -> None:
    """GUEST_TSO4: frames with more than mss bytes of payload are GSO_TCPV4 frames
    (NEEDS_CSUM, hdr_len 54, gso_size mss, csum_start 34, csum_offset 16) whose TCP checksum
    field is the pseudo-header sum; the short last one is a plain DATA_VALID frame."""
    h = Harness(queue_size=64)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL | TSO)
        h.guest.post_rx(40, size=4096)
        data = _payload(100000 + 1000, 2)
        a.sendall(data)
        f = Fill(5, 6, 7, TSO4)
        assert rx_fill(h, b.fileno(), 3, 50000, 1 << 20, f, TSO4) == (101000, 3, 150000)
        assert (h.link.tx_frames, h.link.tx_scattered, h.link.tx_gso) == (3, 2, 2)
        h.link.flush()
        got = _frames(h)
        assert [len(fr) - OFF for _, fr in got] == [50000, 50000, 1000]
        for i, (hdr, frame) in enumerate(got):
            assert frame[OFF:] == data[50000 * i:50000 * i + len(frame) - OFF]
            tcph = frame[34:54]
            assert struct.unpack("!I", tcph[4:8])[0] == 5 + 50000 * i
            if i < 2:
                assert (hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.gso_size, hdr.csum_start,
                        hdr.csum_offset) == (net.HDR_F_NEEDS_CSUM, net.GSO_TCPV4, OFF, 1448,
                                             34, 16)
                assert hdr.num_buffers == -(-(12 + OFF + 50000) // 4096)
                tcp_len = 20 + 50000
                want = checksum.partial(FADDR + GADDR) + socket.IPPROTO_TCP + tcp_len
                while want >> 16:
                    want = (want & 0xFFFF) + (want >> 16)
                assert struct.unpack("!H", tcph[16:18])[0] == want
            else:
                assert (hdr.flags, hdr.gso_type) == (net.HDR_F_DATA_VALID, net.GSO_NONE)
                assert tcph[13] == wtcp.ACK | wtcp.PSH
    finally:
        a.close()
        b.close()
        h.close()


# --- where it declines, finds nothing, fails ----------------------------------------------------

def _assert_fill_declined(h: Harness, features: int = ALL) -> None:
    """8 RX buffers, 3000 bytes queued: rx_fill() says None, nothing popped, no batch kept,
    nothing read, the writer's seq untouched."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(features)
        h.guest.post_rx(8, size=4096)
        a.sendall(b"q" * 3000)
        f = Fill(9, 0, 0, None)
        assert rx_fill(h, b.fileno(), 2, 1460, 10000, f, flags=socket.MSG_DONTWAIT) is None
        assert f.f.seq == 9
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None and (vq.last_avail_idx, vq.inflight) == (0, 0)
        assert h.link._batch is None
        assert h.link.tx_frames == 0
        assert b.recv(5000) == b"q" * 3000
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("features", [BASE, ALL & ~net.F_GUEST_CSUM, ALL & ~net.F_MRG_RXBUF],
                         ids=["plain", "no-guest-csum", "no-mergeable"])
def test_rx_fill_none_without_guest_csum_or_mergeable(features: int) -> None:
    h = Harness()
    try:
        _assert_fill_declined(h, features)
    finally:
        h.close()


def test_rx_fill_none_with_pcap(tmp_path: Path) -> None:
    from vhostpasst.core.pcap import PcapWriter
    h = Harness()
    pcap = PcapWriter(str(tmp_path / "x.pcap"))
    try:
        h.link.pcap = pcap
        _assert_fill_declined(h)
    finally:
        h.close()
        pcap.close()


def test_rx_fill_none_for_a_general_ring() -> None:
    """Chains of two buffers: None (the lean path doesn't apply; rx_scatter() takes them)."""
    h = Harness()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL)
        for _ in range(4):
            h.guest.rx.add([], [1000, 1000])
        h.guest.rx.kick()
        a.sendall(b"q" * 100)
        assert rx_fill(h, b.fileno(), 2, 1460, 10000, None) is None
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None and (vq.last_avail_idx, vq.inflight) == (0, 0)
        assert len(h.link.rx_scatter(2, 1514, 54)) == 2
        h.link.flush()
    finally:
        a.close()
        b.close()
        h.close()


@pytest.mark.parametrize("how", ["no-writer", "records"])
def test_rx_fill_layout_refused_falls_back(h: Any, monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture, how: str) -> None:
    """vr_rx_fill()'s Fill.LAYOUT (no writer given, or the records not holding the frames)
    is our bug, not the guest's: logged, None (rx_scatter() still works), nothing popped or
    read, the writer's seq untouched, the front end kept."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL)
        h.guest.post_rx(8, size=4096)
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None
        writer = WRITER
        if how == "no-writer":
            writer = 0  # vr_rx_fill() refuses it before it pops anything
        else:
            def refuse(q: VirtQueue, *args: object) -> tuple[int, RxFill]:
                return 0, RxFill(FillOutcome.LAYOUT, *[0] * 12)

            monkeypatch.setattr(net, "fill_rx_frames", refuse)
        a.sendall(b"q" * 3000)
        f = Fill(9, 0, 0, None)
        with caplog.at_level(logging.ERROR):
            got = link_rx_fill(h.link, b.fileno(), 2, OFF + 1460, OFF, 10000,
                               socket.MSG_DONTWAIT, writer, f.arg, None)
        assert got is None
        assert "frame records" in caplog.text
        assert f.f.seq == 9
        assert (vq.last_avail_idx, vq.inflight) == (0, 0)
        assert h.link._batch is None and h.link.tx_frames == 0
        assert h.link.connected and h.disconnects == 0 and not h.guest.fe.is_closed()
        assert len(h.link.rx_scatter(2, 1514, 54)) == 2
        h.link.flush()
        assert h.guest.rx.get_used() == []
        assert b.recv(5000) == b"q" * 3000
    finally:
        a.close()
        b.close()


def test_rx_fill_empty_ring_and_no_guest(h: Any) -> None:
    """No RX buffers (or no front end yet): (0, 0, 0), starved, nothing read."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.sendall(b"q" * 100)
        assert rx_fill(h, b.fileno(), 2, 1460, 10000, None) in (None, (0, 0, 0))
        h.guest.bring_up(ALL)
        assert rx_fill(h, b.fileno(), 2, 1460, 10000, None) == (0, 0, 0)
        assert rx_fill(h, b.fileno(), 0, 1460, 10000, None) == (0, 0, 0)
        assert h.link._starved
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None and vq.inflight == 0
        assert b.recv(200) == b"q" * 100
    finally:
        a.close()
        b.close()


def test_rx_fill_end_of_stream() -> None:
    """The peer closed, nothing queued: 0 bytes, no frame sent, the frames' room (not 0:
    the caller tells the end of the stream from a full ring by it), nothing used."""
    h = Harness()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL)
        h.guest.post_rx(8, size=4096)
        a.close()
        f = Fill(9, 0, 0, None)
        assert rx_fill(h, b.fileno(), 2, 1460, 10000, f) == (0, 0, 2 * 1460)
        assert f.f.seq == 9
        h.link.flush()
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None and (vq.last_avail_idx, vq.inflight) == (0, 0)
        assert h.guest.rx.get_used() == [] and h.link.tx_frames == 0
    finally:
        b.close()
        h.close()


def test_rx_fill_recvmsg_error_goes_to_the_caller(h: Any) -> None:
    """An empty socket (MSG_DONTWAIT): BlockingIOError to the caller, the chains given back,
    nothing used; the next call with data sends."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL)
        h.guest.post_rx(8, size=4096)
        with pytest.raises(BlockingIOError):
            rx_fill(h, b.fileno(), 2, 1460, 10000, None)
        h.link.flush()
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None and (vq.last_avail_idx, vq.inflight) == (0, 0)
        assert h.guest.rx.get_used() == []
        a.sendall(b"w" * 10)
        assert rx_fill(h, b.fileno(), 2, 1460, 10000, None) == (10, 1, 2 * 1460)
        h.link.flush()
        assert [fr[OFF:] for _, fr in h.guest.received()] == [b"w" * 10]
    finally:
        a.close()
        b.close()


def test_rx_fill_writer_refusal_sends_nothing(h: Any) -> None:
    """The writer refuses frames whose first buffer can't hold its 54 bytes of headers (a
    caller asking for `off` 20 over 40-byte buffers): the bytes read are reported with no
    frame sent and the caps' sum, the writer's seq untouched, the chains all given back,
    nothing used, the front end kept."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL)
        for _ in range(16):
            h.guest.rx.add([], [40])
        h.guest.rx.kick()
        a.sendall(b"r" * 100)
        f = Fill(9, 0, 0, None)
        got = link_rx_fill(h.link, b.fileno(), 2, 20 + 50, 20, 10000, PEEK, WRITER, f.arg, None)
        assert got == (100, 0, 100)
        assert f.f.seq == 9
        h.link.flush()
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None and (vq.last_avail_idx, vq.inflight) == (0, 0)
        assert h.guest.rx.get_used() == [] and h.link.tx_frames == 0
        assert h.disconnects == 0 and h.link.connected
    finally:
        a.close()
        b.close()


def test_rx_fill_hostile_ring_disconnects(h: Any) -> None:
    h.guest.bring_up(ALL)
    rx = h.guest.rx
    i = rx.free.pop(0)
    rx.write_desc(i, 0xDEAD0000, 4096, 2, 0)  # writable, outside guest memory
    rx.publish(i)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        a.sendall(b"q" * 100)
        f = Fill(9, 0, 0, None)
        assert rx_fill(h, b.fileno(), 2, 1460, 10000, f, flags=socket.MSG_DONTWAIT) == (0, 0, 0)
        assert h.disconnects == 1 and h.guest.fe.is_closed()
        assert f.f.seq == 9
        assert b.recv(200) == b"q" * 100
    finally:
        a.close()
        b.close()


def test_rx_fill_through_the_forwarding_link() -> None:
    """A ForwardingLink (what TCP holds with a listener) forwards rx_fill(); a Link without
    the path says None."""
    from vhostpasst.link.base import ForwardingLink
    h = Harness()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL)
        h.guest.post_rx(4, size=4096)
        a.sendall(b"e" * 50)
        fwd = ForwardingLink.__new__(ForwardingLink)
        fwd.link = h.link
        f = Fill(0, 0, 0, None)
        assert link_rx_fill(fwd, b.fileno(), 2, OFF + 1460, OFF, 10000, PEEK, WRITER, f.arg,
                            None) \
            == (50, 1, 2 * 1460)
        assert f.f.seq == 50
    finally:
        a.close()
        b.close()
        h.close()


@pytest.fixture
def h() -> Any:
    harness = Harness()
    yield harness
    harness.close()


def test_rx_fill_and_bounced_frames_are_marked_for_live_migration() -> None:
    """With VHOST_F_LOG_ALL and a dirty log (a migration running), the pages the link wrote
    (TCP data read in place by rx_fill(), a DHCP offer sent through the bounce path) are
    marked, and no others."""
    import mmap
    import os

    from tests.unit.test_link_vhost import discover, is_offer
    from virtio import message as m
    from virtio.backend import F_LOG_ALL
    from virtio.dirtylog import LOG_PAGE

    h = Harness(queue_size=64)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    log_size = 1 << 12  # 32768 pages: more than the 1 MiB of guest memory
    log_fd = os.memfd_create("dirty-log")
    os.ftruncate(log_fd, log_size)
    log = mmap.mmap(log_fd, log_size)

    def marked() -> set[int]:
        got = {i * 8 + bit for i, v in enumerate(log[:]) if v for bit in range(8) if v >> bit & 1}
        log[:] = bytes(log_size)
        return got

    def written(used: list[tuple[int, int]]) -> set[int]:
        pages: set[int] = set()
        for head, length in used:
            gpa, size, _ = h.guest.rx.buffers[head][0]
            n = min(size, length)
            pages |= set(range(gpa // LOG_PAGE, (gpa + n - 1) // LOG_PAGE + 1))
        return pages

    try:
        h.guest.bring_up(ALL | F_LOG_ALL)
        assert h.guest.fe.ack(m.Request.SET_LOG_BASE, m.LOG.pack(log_size, 0), [log_fd]) == 0
        h.guest.post_rx(8, size=4096)
        h.pump()
        marked()
        a.sendall(_payload(3000, 9))
        assert rx_fill(h, b.fileno(), 4, 1460, 1 << 20, None) is not None
        h.link.flush()
        used = h.guest.rx.get_used()
        assert len(used) == 3
        assert marked() == written(used) != set()

        h.guest.transmit(discover())
        h.pump()
        used = h.guest.rx.get_used()
        assert len(used) == 1 and is_offer(h.guest.rx.written(*used[0])[net.HDR_LEN:])
        assert marked() == written(used)
    finally:
        a.close()
        b.close()
        h.close()
        log.close()
        os.close(log_fd)
