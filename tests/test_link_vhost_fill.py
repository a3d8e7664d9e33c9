"""VhostUserLink.rx_fill() (VirtQueue.fill_rx_frames() with tcpsg.c's vp_tcp_fill_writer, as
TcpHandler._fill_frames() calls it) against the path it replaces: rx_peek(), the headers by
vp_tcp_frames_sg_tso() and commit_scatter(); and where it declines, fails or disconnects."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address as A4
from pathlib import Path
from typing import Any

import pytest
from test_link_vhost import (
    ALL,
    BASE,
    GUEST_MAC,
    OUR_MAC,
    PEEK,
    TSO,
    Harness,
    _guest_memory,
    _guest_ram,
    _payload,
)
from vhostpasst._tcpsg import ffi as sg_ffi
from vhostpasst._tcpsg import lib as sg_lib

from vhostpasst.link.base import Tso
from vhostpasst.wire import checksum
from vhostpasst.wire import tcp as wtcp
from virtio import net

FADDR, GADDR = A4("198.51.100.7").packed, A4("10.0.2.15").packed
FPORT, GPORT = 80, 40000
OFF = wtcp.TCP4_PAYLOAD_OFFSET  # 54
TSO4 = Tso(False, OFF - wtcp.TCP_HLEN, OFF, 1448)
WRITER = int(sg_ffi.cast("uintptr_t", sg_ffi.addressof(sg_lib, "vp_tcp_fill_writer")))


def template() -> tuple[bytes, int]:
    """TcpHandler._template() for an IPv4 connection FADDR:FPORT -> GADDR:GPORT: headers with
    the per-segment fields zero, and the pseudo-header sum."""
    scratch = memoryview(bytearray(OFF))
    wtcp.write_eth_ipv4_tcp_headers(scratch, GUEST_MAC, OUR_MAC, FADDR, GADDR, FPORT, GPORT,
                                    0, 0, 0, 0, 0)
    tmpl = bytearray(scratch)
    tmpl[14 + 10:14 + 12] = b"\0\0"
    tmpl[OFF - wtcp.TCP_HLEN + 16:OFF - wtcp.TCP_HLEN + 18] = b"\0\0"
    return bytes(tmpl), checksum.partial(FADDR + GADDR) + socket.IPPROTO_TCP


class Fill:
    """A struct vp_tcp_fill filled as TcpHandler._fill_frames() fills it."""

    def __init__(self, seq: int, ack: int, wnd: int, tso: Tso | None) -> None:
        tmpl, pseudo = template()
        self.f = sg_ffi.new("struct vp_tcp_fill *")
        self.f.flags, self.f.last_flags = wtcp.ACK, wtcp.ACK | wtcp.PSH
        self.f.tmpl = tmpl
        self.f.six = 0
        self.f.pseudo = pseudo
        self.f.seq, self.f.ack, self.f.wnd = seq, ack, wnd
        self.f.tso_mss = tso.mss if tso is not None else 0
        self.arg = int(sg_ffi.cast("uintptr_t", self.f))


def rx_fill(h: Harness, fd: int, count: int, size: int, room: int, fill: Fill | None,
            tso: Tso | None = None, flags: int = PEEK) -> tuple[int, int, int] | None:
    if fill is None:
        fill = Fill(1, 2, 3, tso)
    return h.link.rx_fill(fd, count, OFF + size, OFF, room, flags, WRITER, fill.arg, tso)


def peek_path(h: Harness, fd: int, count: int, size: int, room: int, seq: int, ack: int,
              wnd: int, tso: Tso | None) -> tuple[tuple[int, int, int] | None, int]:
    """What TcpHandler._from_sock() does with rx_peek(): the read, the headers over the
    first buffers (no checksum: GUEST_CSUM), commit_scatter(). ((bytes, frames, caps' sum)
    as rx_fill() says it, the next seq)."""
    got = h.link.rx_peek(fd, count, OFF + size, OFF, room, PEEK)
    if got is None:
        return None, seq
    n, caps, firsts = got
    sizes: list[int] = []
    left = n
    for cap in caps:
        if left <= 0:
            break
        sizes.append(min(cap, left))
        left -= sizes[-1]
    k = len(sizes)
    if not k:
        h.link.commit_scatter([])
        return (n, 0, sum(caps)), seq
    tmpl, pseudo = template()
    out = sg_ffi.new("uint32_t[]", k)
    fb = sg_ffi.from_buffer
    nxt = sg_lib.vp_tcp_frames_sg_tso(
        [fb(v, require_writable=True) for v in firsts[:k]], [len(v) for v in firsts[:k]], k,
        list(range(k + 1)), sizes, k, tmpl, 0, pseudo, seq, ack, wnd, wtcp.ACK,
        wtcp.ACK | wtcp.PSH, 0, tso.mss if tso is not None else 0, out)
    assert nxt >= 0
    h.link.commit_scatter(sg_ffi.unpack(out, k), tso)
    return (n, k, sum(caps)), nxt


def run(fill: bool, features: int, sizes: list[int], rounds: list[tuple[int, int, int]],
        data: bytes, tso: Tso | None, mem: tuple[int, ...] = (1 << 20,)) -> list[object]:
    """Post RX buffers of `sizes`, queue `data`, then per round (count, payload per frame,
    room) read, write headers and commit one way or the other, consume what was sent (the
    guest's ACK). Everything the guest and the link show."""
    h = Harness(queue_size=64)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    seen: list[object] = []
    seq, ack, wnd = 0xFFFFF000, 0x12345678, 0xABCD  # seq wraps within the rounds
    try:
        _guest_memory(h, mem)
        h.guest.bring_up(features)
        for size in sizes:
            h.guest.rx.add([], [size])
        h.guest.rx.kick()
        a.sendall(data)
        for count, size, room in rounds:
            got: object
            try:
                if fill:
                    f = Fill(seq, ack, wnd, tso)
                    got = rx_fill(h, b.fileno(), count, size, room, f, tso)
                    nxt = f.f.seq
                else:
                    got, nxt = peek_path(h, b.fileno(), count, size, room, seq, ack, wnd, tso)
            except BlockingIOError:
                got, nxt = "EAGAIN", seq  # all of it sent: nothing queued
            seen.append((got, nxt))
            h.link.flush()
            used = h.guest.rx.get_used()
            seen.append(used)
            seen.append([h.guest.rx.written(head, length) for head, length in used])
            if isinstance(got, tuple) and got[1]:
                sent = (nxt - seq) & 0xFFFFFFFF
                assert len(b.recv(sent)) == sent
            seq = nxt
            for _ in range(min(len(used), len(h.guest.rx.free))):
                h.guest.rx.add([], [sizes[0]])
            h.guest.rx.kick()
            h.pump(1)
        vq = h.link._queue(net.RX_QUEUE)
        seen.append((h.link.tx_frames, h.link.tx_zero_copy, h.link.tx_scattered,
                     h.link.tx_gso, h.link.tx_dropped, h.disconnects))
        seen.append(None if vq is None else (vq.last_avail_idx, vq.used_idx, vq.inflight))
        seen.append(_guest_ram(h.guest))
    finally:
        a.close()
        b.close()
        h.close()
    return seen


@pytest.mark.parametrize("features, tso, sizes, size, count, room", [
    (ALL, None, [4096] * 40, 1460, 12, 1 << 20),  # a frame per 4 KiB buffer
    (ALL, None, [1536] * 40, 1460, 12, 5000),  # 1.5 KiB ones, two each; the window
    (ALL | TSO, TSO4, [4096] * 60, 65000, 4, 1 << 20),  # 64 KiB GSO frames over 17 buffers
    (ALL | TSO, TSO4, [1536] * 60, 1448 * 3, 8, 10000),  # GSO and a short last one
    (ALL | TSO, TSO4, [1536, 4096, 2000, 1536, 3000] * 8, 9000, 8, 1 << 20),  # any sizes
], ids=["1460-4k", "1460-1.5k-window", "64k-tso", "tso-window", "mixed"])
@pytest.mark.parametrize("mem", [(1 << 20,), (40000, 1 << 20)], ids=["one-region", "two"])
def test_rx_fill_same_as_rx_peek_headers_and_commit_scatter(
        features: int, tso: Tso | None, sizes: list[int], size: int, count: int, room: int,
        mem: tuple[int, ...]) -> None:
    """vp_tcp_fill_writer through rx_fill(): the guest sees the same frames (bytes, used
    entries, virtio-net headers), the link counts the same, the queue ends in the same
    state and the seq moves the same as rx_peek(), vp_tcp_frames_sg_tso() over the first
    buffers and commit_scatter(); an empty ring and the end of the data on the way."""
    data = _payload(150000, 4)
    rounds = [(count, size, room)] * 3 + [(count, size, 1 << 20)] * 2
    ours = run(True, features, sizes, rounds, data, tso, mem)
    theirs = run(False, features, sizes, rounds, data, tso, mem)
    assert ours == theirs
    assert ours[1], "nothing reached the guest"
    counters = ours[-3]
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
    """8 RX buffers, 3000 bytes queued: rx_fill() says None (as rx_peek()), nothing popped,
    nothing read, the writer's seq untouched."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(features)
        h.guest.post_rx(8, size=4096)
        a.sendall(b"q" * 3000)
        f = Fill(9, 0, 0, None)
        assert rx_fill(h, b.fileno(), 2, 1460, 10000, f, flags=socket.MSG_DONTWAIT) is None
        assert h.link.rx_peek(b.fileno(), 2, 1514, 54, 10000, PEEK) is None
        assert f.f.seq == 9
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None and (vq.last_avail_idx, vq.inflight) == (0, 0)
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
    from vhostpasst.pcap import PcapWriter
    h = Harness()
    pcap = PcapWriter(str(tmp_path / "x.pcap"))
    try:
        h.link.pcap = pcap
        _assert_fill_declined(h)
    finally:
        h.close()
        pcap.close()


def test_rx_fill_none_for_a_general_ring() -> None:
    """Chains of two buffers: None (rx_peek() says so too; rx_scatter() takes them)."""
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
        got = h.link.rx_fill(b.fileno(), 2, 20 + 50, 20, 10000, PEEK, WRITER, f.arg, None)
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
        assert fwd.rx_fill(b.fileno(), 2, OFF + 1460, OFF, 10000, PEEK, WRITER, f.arg, None) \
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
