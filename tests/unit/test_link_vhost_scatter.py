"""The vhost-user link's lean paths to the guest (tests/unit/test_link_vhost.py's harness):
rx_scatter()'s lean path against the general one, rx_fill() (socket read, headers and commit
in one C call), the short-ring memo."""

from __future__ import annotations

import os
import socket
import struct
from ipaddress import IPv4Address as A4
from ipaddress import IPv6Address as A6
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhostpasst._tcpsg import ffi as sg_ffi
from vhostpasst._tcpsg import lib as sg_lib

from tests.unit.test_link_vhost import (
    ALL,
    BASE,
    GUEST_MAC,
    OUR_MAC,
    TSO,
    Guest,
    Harness,
    _fill,
    _guest_memory,
    _listener_guest,
    _payload,
)
from tests.virtio.frontend import SocketReader, frame_sizes
from vhostpasst.core.loop import Loop
from vhostpasst.link.base import Link, Tso
from vhostpasst.link.vhost import VhostUserListener
from vhostpasst.wire import checksum
from vhostpasst.wire import tcp as wtcp
from virtio import net


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


# --- the lean rx_scatter() path (net.rx_frames) against the general one ------------------------

def _scatter_run(lean: bool, features: int, sizes: list[int], rounds: list[tuple[int, int, int,
                 list[int], bool]], iov_max: int) -> list[object]:
    """Post RX buffers of `sizes`, then per round rx_scatter(count, frame_len, head), fill and
    commit `lengths` (or leave the frames uncommitted: rewound at flush); everything the
    guest and the link can see, for comparing the two paths."""
    import unittest.mock

    import vhostpasst.link.vhost_rx as vhost
    h = Harness(queue_size=64)
    patches = [unittest.mock.patch.object(vhost, "IOV_MAX", iov_max)]
    if not lean:
        patches.append(unittest.mock.patch.object(net, "rx_frames", lambda *a, **k: None))
    seen: list[object] = []
    try:
        for p in patches:
            p.start()
        h.guest.bring_up(features)
        for size in sizes:
            h.guest.rx.add([], [size])
        h.guest.rx.kick()
        for n, (count, frame_len, head, lengths, commit) in enumerate(rounds):
            frames = h.link.rx_scatter(count, frame_len, head)
            seen.append([[len(v) for v in f] for f in frames])
            seen.append(h.link._starved)
            if commit:
                lengths = [min(x, sum(map(len, f))) for x, f in zip(lengths, frames,
                                                                       strict=False)]
                for i, (f, x) in enumerate(zip(frames, lengths, strict=False)):
                    _fill(f, _payload(x, n * 16 + i)[:x] + bytes(sum(map(len, f)) - x))
                tso = None
                if features & TSO and frames:
                    from vhostpasst.link.base import Tso
                    tso = Tso(False, 34, 54, 1000)
                h.link.commit_scatter(lengths, tso)
            h.link.flush()
            used = h.guest.rx.get_used()
            seen.append(used)
            seen.append([h.guest.rx.written(head_, length) for head_, length in used])
        vq = h.link.backend.queues[0] if h.link.backend else None
        seen.append((h.link.tx_frames, h.link.tx_zero_copy, h.link.tx_scattered,
                     h.link.tx_gso, h.disconnects))
        seen.append(None if vq is None else (vq.last_avail_idx, vq.used_idx, vq.inflight))
    finally:
        for p in patches:
            p.stop()
        h.close()
    return seen


_round = st.tuples(st.integers(1, 12), st.integers(0, 20000), st.sampled_from([0, 54]),
                   st.lists(st.integers(0, 20000), max_size=12), st.booleans())


@settings(max_examples=80, deadline=None)
@given(features=st.sampled_from([BASE, ALL, ALL | TSO]),
       sizes=st.one_of(st.lists(st.sampled_from([1536, 4096]), min_size=1, max_size=64)
                       .map(lambda s: s[:1] * len(s)),
                       st.lists(st.integers(13, 5000), min_size=1, max_size=64)),
       rounds=st.lists(_round, min_size=1, max_size=4),
       iov_max=st.sampled_from([1024, 1024, 7]))
def test_rx_scatter_lean_path_same_as_general(features: int, sizes: list[int],
                                              rounds: list[tuple[int, int, int, list[int],
                                                                 bool]],
                                              iov_max: int) -> None:
    """Same frames handed out, same used entries, headers and bytes in the guest, same
    counters and ring indices, whatever the buffer sizes (Linux's equal ones, or any),
    frame lengths, counts, commits (partial, none: rewound) and view limit."""
    assert _scatter_run(True, features, sizes, rounds, iov_max) == \
        _scatter_run(False, features, sizes, rounds, iov_max)


def test_rx_scatter_lean_path_is_taken_for_linux_buffers() -> None:
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up()
        h.guest.post_rx(40, size=4096)
        frames = h.link.rx_scatter(2, 65534, head=54)
        assert h.link._batch is not None and not h.link._frames
        assert [[len(v) for v in f] for f in frames] == [[4084] + [4096] * 15 + [10]] * 2
        h.link.flush()  # not committed: all 34 chains back
        assert h.link.backend is not None and h.link.backend.queues[0].inflight == 0
        assert len(h.link.rx_scatter(3, 65534, head=54)) == 2
        assert h.link._starved  # the third frame did not fit: wait for the kick
        h.link.flush()
    finally:
        h.close()


def test_rx_scatter_lean_path_falls_back_for_other_chains(h: Harness) -> None:
    """A chain of two writable descriptors among Linux-like ones: the general path."""
    h.guest.bring_up()
    h.guest.rx.add([], [1536])
    h.guest.rx.add([], [1024, 1024])
    h.guest.post_rx(4, size=1536)
    frames = h.link.rx_scatter(2, 3000)
    assert h.link._batch is None and len(h.link._frames) == 2
    assert [[len(v) for v in f] for f in frames] == [[1524, 1024, 452], [1524, 1476]]
    h.link.flush()


@pytest.mark.parametrize("where", ["first", "later"])
def test_rx_scatter_lean_path_hostile_ring_disconnects(h: Harness, where: str) -> None:
    h.guest.bring_up()
    rx = h.guest.rx
    if where == "later":
        h.guest.post_rx(3, size=1536)
    i = rx.free.pop(0)
    rx.write_desc(i, 0xDEAD0000, 1536, 2, 0)  # writable, outside guest memory
    rx.publish(i)
    assert h.link.rx_scatter(4, 5000) == []
    assert h.disconnects == 1 and h.guest.fe.is_closed()


# --- rx_fill(): the socket read, the headers and the commit in the lean path's guest buffers ---
# The reference it must match is what tcp._from_sock() does without it: rx_scatter(), a
# recvmsg_into() over the views, the headers by _tcpsg's vp_tcp_frames_sg_tso() over the
# frames' first views without checksums (GUEST_CSUM, as out_buf.BufOutput._scattered_headers()),
# commit_scatter().

PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
FADDR4, GADDR4 = A4("198.51.100.7").packed, A4("10.0.2.15").packed
FADDR6, GADDR6 = A6("2001:db8::7").packed, A6("fd00::15").packed
FPORT, GPORT = 80, 40000
WRITER = int(sg_ffi.cast("uintptr_t", sg_ffi.addressof(sg_lib, "vp_tcp_fill_writer")))


def _refuse(arg: object, firsts: object, first_lens: object, sizes: object, n: int,
            lens: object) -> int:
    return -1


def link_rx_fill(link: Link, fd: int, count: int, frame_len: int, off: int, room: int,
                 flags: int, writer: int, writer_arg: int,
                 tso: Tso | None) -> tuple[int, int, int] | None:
    """Link.rx_fill() with TCP's reader of `fd` (vp_tcp_read: recvmsg with `flags`) and the
    frame writer `writer` with its argument `writer_arg`."""
    reader = SocketReader(fd, flags)
    return link.rx_fill(count, frame_len, off, room, reader.filler(writer, writer_arg), tso)


# a vr_frame_writer that refuses every frame (as vp_tcp_fill_writer does with buffers that
# can't hold the headers): read, nothing committed
_REFUSE_CB = sg_ffi.callback("int64_t(void *, uint8_t *const *, const uint32_t *, "
                             "const uint32_t *, unsigned int, uint32_t *)", _refuse)
REFUSER = int(sg_ffi.cast("uintptr_t", _REFUSE_CB))


def _template(six: bool = False) -> tuple[bytes, int]:
    """TcpConn.template() for a connection FADDR:FPORT -> GADDR:GPORT: headers with the
    per-segment fields zero, and the pseudo-header sum."""
    faddr, gaddr = (FADDR6, GADDR6) if six else (FADDR4, GADDR4)
    l3 = wtcp.TCP6_PAYLOAD_OFFSET - wtcp.TCP_HLEN if six else \
        wtcp.TCP4_PAYLOAD_OFFSET - wtcp.TCP_HLEN
    scratch = memoryview(bytearray(wtcp.TCP6_PAYLOAD_OFFSET))
    write = wtcp.write_eth_ipv6_tcp_headers if six else wtcp.write_eth_ipv4_tcp_headers
    write(scratch, GUEST_MAC, OUR_MAC, faddr, gaddr, FPORT, GPORT, 0, 0, 0, 0, 0)
    tmpl = bytearray(scratch[:l3 + wtcp.TCP_HLEN])
    if not six:
        tmpl[14 + 10:14 + 12] = b"\0\0"
    tmpl[l3 + 16:l3 + 18] = b"\0\0"
    return bytes(tmpl), checksum.partial(faddr + gaddr) + socket.IPPROTO_TCP


class Fill:
    """A struct vp_tcp_fill filled as out_vu.GuestFillOutput fills it."""

    def __init__(self, seq: int, ack: int, wnd: int, tso: Tso | None, six: bool = False) -> None:
        tmpl, pseudo = _template(six)
        self.f = sg_ffi.new("struct vp_tcp_fill *")
        self.f.flags, self.f.last_flags = wtcp.ACK, wtcp.ACK | wtcp.PSH
        self.f.tmpl = tmpl
        self.f.six = int(six)
        self.f.pseudo = pseudo
        self.f.seq, self.f.ack, self.f.wnd = seq, ack, wnd
        self.f.tso_mss = tso.mss if tso is not None else 0
        self.arg = int(sg_ffi.cast("uintptr_t", self.f))


def _scatter_fill(link: Link, fd: int, count: int, frame_len: int, off: int, room: int,
                  flags: int, fill: Fill, tso: Tso | None,
                  refuse: bool = False) -> tuple[int, int, int]:
    """rx_fill()'s reference, as tcp._from_sock() does it where the link has no rx_fill():
    rx_scatter(), recvmsg_into() over the views (frame bytes `off` on, `room` at most),
    vp_tcp_frames_sg_tso() over the frames' first views with no checksum, commit_scatter()
    (commit_scatter([]) when the headers don't fit, or with `refuse`: a writer that refuses).
    Returns what rx_fill() returns (bytes read, frames sent, the frames' payload room); the
    seq moves on in `fill` as the writer moves it. OSError from recvmsg_into() goes up."""
    frames = link.rx_scatter(count, frame_len, off)
    if not frames:
        return 0, 0, 0
    caps, left = [], max(room, 0)
    for frame in frames:
        caps.append(min(sum(map(len, frame)) - off, left))
        left -= caps[-1]
    iov = [v for f, cap in zip(frames, caps, strict=True) for v in _payload_iov(f, off, cap)]
    n = _recvmsg_into(fd, iov, flags)
    if n == 0:  # the end of the stream: nothing sent
        return 0, 0, sum(caps)
    sizes = frame_sizes(n, caps)
    k = len(sizes)
    firsts = [f[0] for f in frames[:k]]
    out = sg_ffi.new("uint32_t[]", k)
    fb = sg_ffi.from_buffer
    f = fill.f
    nxt = -1 if refuse else sg_lib.vp_tcp_frames_sg_tso(
        [fb(v, require_writable=True) for v in firsts], [len(v) for v in firsts], k,
        list(range(k + 1)), sizes, k, bytes(f.tmpl), f.six, f.pseudo, f.seq, f.ack, f.wnd,
        f.flags, f.last_flags, 0, f.tso_mss, out)
    if nxt < 0:
        link.commit_scatter([])
        return n, 0, sum(caps)
    link.commit_scatter(sg_ffi.unpack(out, k), tso)
    f.seq = nxt
    return n, k, sum(caps)


def _recvmsg_into(fd: int, iov: list[memoryview], flags: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as s:
        return s.recvmsg_into(iov, 0, flags)[0]




def _guest_ram(g: Guest) -> list[bytes]:
    return [g.dmem.read(r.desc.gpa, r.desc.size) for r in g.dmem.regions]


def _payload_iov(frame: list[memoryview], off: int, cap: int) -> list[memoryview]:
    """Frame bytes off .. off + cap - 1 of a frame laid over `frame`'s views."""
    out = []
    pos = 0
    for view in frame:
        lo, hi = max(off - pos, 0), min(off + cap - pos, len(view))
        if lo < hi:
            out.append(view[lo:hi])
        pos += len(view)
    return out


def _fill_round(link: Link, fill: bool, fd: int, count: int, frame_len: int, off: int,
                room: int, f: Fill, tso: Tso | None,
                commit: bool = True) -> tuple[tuple[int, int, int] | str, bool]:
    """What tcp._from_sock() does with the link: rx_fill() (or, without it or when it says
    None, the reference above); `commit` False: a writer that refuses the frames.
    (rx_fill()'s answer or "EAGAIN", whether rx_fill() did it)."""
    took = False
    try:
        got = None
        if fill:
            got = link_rx_fill(link, fd, count, frame_len, off, room, PEEK,
                               WRITER if commit else REFUSER, f.arg, tso)
            took = got is not None
        if got is None:
            got = _scatter_fill(link, fd, count, frame_len, off, room, PEEK, f, tso,
                                refuse=not commit)
    except BlockingIOError:
        return "EAGAIN", fill  # nothing queued (the caller stalls: nothing committed)
    return got, took


def _fill_run(fill: bool, features: int, mem: tuple[int, ...], sizes: list[int],
              rounds: list[tuple[int, int, int, int, bool, int | None]], data: bytes,
              queue_size: int = 64) -> tuple[list[object], list[bool]]:
    """Post RX buffers of `sizes`, queue `data` on a socket, then per round (count,
    frame_len, off (54: IPv4, 74: IPv6), room, commit, repost): read, write headers and
    commit with rx_fill() (`fill`) or the reference, or have the writer refuse them
    (`commit` False); consume what was sent (the guest's ACK), repost `repost` buffers (None:
    as many as were used). Everything the guest and the link show, and per round whether
    rx_fill() did it."""
    h = Harness(queue_size=queue_size)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    seen: list[object] = []
    took: list[bool] = []
    seq, ack, wnd = 0xFFFFF000, 0x12345678, 0xABCD  # seq wraps within the rounds
    try:
        _guest_memory(h, mem)
        h.guest.bring_up(features)
        for size in sizes:
            h.guest.rx.add([], [size])
        h.guest.rx.kick()
        a.sendall(data)
        for count, frame_len, off, room, commit, repost in rounds:
            six = off == wtcp.TCP6_PAYLOAD_OFFSET
            tso = Tso(six, off - wtcp.TCP_HLEN, off, 1448) if features & TSO else None
            f = Fill(seq, ack, wnd, tso, six)
            got, did = _fill_round(h.link, fill, b.fileno(), count, frame_len, off, room, f,
                                   tso, commit)
            took.append(did)
            nxt = f.f.seq
            seen.append((got, nxt, h.link._starved))
            sent = (nxt - seq) & 0xFFFFFFFF
            if sent:
                assert isinstance(got, tuple) and got[1]
                assert len(b.recv(sent)) == sent
            seq = nxt
            h.link.flush()
            used = h.guest.rx.get_used()
            seen.append(used)
            seen.append([h.guest.rx.written(head, length) for head, length in used])
            more = len(used) if repost is None else repost
            for _ in range(min(more, len(h.guest.rx.free))):
                h.guest.rx.add([], [sizes[0]])
            h.guest.rx.kick()
            h.pump(1)
        vq = h.link._queue(net.RX_QUEUE)
        seen.append((h.link.tx_frames, h.link.tx_zero_copy, h.link.tx_scattered,
                     h.link.tx_gso, h.link.tx_dropped, h.disconnects))
        seen.append(None if vq is None else (vq.last_avail_idx, vq.used_idx, vq.inflight))
        seen.append(_guest_ram(h.guest))
        try:  # what is still queued (peeked, not sent)
            seen.append(b.recv(len(data) + 1, socket.MSG_DONTWAIT))
        except BlockingIOError:
            seen.append(b"")
    finally:
        a.close()
        b.close()
        h.close()
    return seen, took


@pytest.mark.parametrize("sizes, frame_len, count, room", [
    ([4096] * 60, 54 + 65000, 4, 1 << 20),  # Linux's 4 KiB buffers, 17 per frame: 3 fit
    ([4096] * 60, 54 + 65000, 3, 100000),  # the window cuts the second frame short
    ([1536] * 40, 54 + 5000, 8, 1 << 20),  # 1.5 KiB ones: 4 per frame
    ([4096] * 20, 54 + 1460, 12, 1 << 20),  # frames that fit their first buffer
    ([1536] * 20, 54 + 1460, 12, 3000),  # ... and the window
    ([1536, 4096, 2000, 1536, 64, 3000] * 8, 54 + 9000, 8, 1 << 20),  # any sizes
], ids=["64k-4k", "64k-4k-window", "5000-1.5k", "1514-4k", "1514-1.5k-window", "mixed"])
@pytest.mark.parametrize("mem", [(1 << 20,), (40000, 1 << 20)], ids=["one-region", "two"])
def test_rx_fill_same_as_rx_scatter_and_recvmsg_into(sizes: list[int], frame_len: int,
                                                     count: int, room: int,
                                                     mem: tuple[int, ...]) -> None:
    """rx_fill() puts the same bytes in the guest's memory, says the same, moves the seq and
    leaves the same used entries, headers, counters and queue state as rx_scatter(), a
    recvmsg_into() over its views, the headers over the first views and commit_scatter();
    also where the writer refuses the frames (nothing sent); the socket keeps what was only
    peeked."""
    data = _payload(60000, 5) + _payload(60000, 9)
    rounds = [(count, frame_len, 54, room, True, 0), (count, frame_len, 54, room, False, 0),
              (count, frame_len, 54, room, True, 40)]
    ours, took = _fill_run(True, ALL | TSO, mem, sizes, rounds, data)
    theirs, _ = _fill_run(False, ALL | TSO, mem, sizes, rounds, data)
    assert ours == theirs
    assert took == [True] * 3  # rx_fill() did it, not the rx_scatter() fallback
    (n, sent, caps), _, _ = ours[0]  # type: ignore[misc]
    assert 0 < n <= room and 0 < sent and caps <= room
    assert ours[1], "nothing reached the guest"
    assert ours[4] == ours[5] == []  # type: ignore[index]  # the writer refused: none used


def test_rx_fill_frames_over_4k_buffers() -> None:
    """A worked example: two 64 KiB TCP frames over 4 KiB buffers, as the guest sees them."""
    h = Harness(queue_size=64)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL | TSO)
        h.guest.post_rx(40, size=4096)
        data = _payload(100000, 3)
        a.sendall(data)
        tso = Tso(False, 34, 54, 1448)
        f = Fill(1, 2, 3, tso)
        got = link_rx_fill(h.link, b.fileno(), 4, 54 + 64000, 54, 1 << 20, PEEK, WRITER, f.arg,
                           tso)
        assert got == (100000, 2, 128000)  # 2 frames laid out over 16 chains each
        assert f.f.seq == 1 + 100000
        vq = h.link._queue(net.RX_QUEUE)
        # the second frame's 36000 bytes took 9 of its 16 chains: the other 7 went back
        assert vq is not None and vq.inflight == 0 and vq.last_avail_idx == 16 + 9
        h.link.flush()
        (hdr, one), (hdr2, two) = h.guest.received()
        assert one[54:] == data[:64000] and two[54:] == data[64000:]
        assert (hdr.gso_type, hdr.num_buffers) == (net.GSO_TCPV4, 16)
        assert (hdr2.gso_type, hdr2.num_buffers) == (net.GSO_TCPV4, -(-(12 + 36054) // 4096))
        assert b.recv(200000) == data  # peeked: all still queued
    finally:
        a.close()
        b.close()
        h.close()


_fill_round_st = st.tuples(st.integers(1, 8), st.integers(1, 65000), st.sampled_from([54, 74]),
                           st.integers(-1, 200000), st.booleans(), st.integers(0, 24))


@settings(max_examples=40, deadline=None)
@given(features=st.sampled_from([ALL, ALL | TSO]),
       mem=st.sampled_from([(1 << 20,), (40000, 1 << 20)]),
       sizes=st.one_of(st.lists(st.sampled_from([1536, 4096]), min_size=1, max_size=64)
                       .map(lambda s: s[:1] * len(s)),
                       st.lists(st.integers(13, 5000), min_size=1, max_size=64)),
       rounds=st.lists(_fill_round_st, min_size=1, max_size=4),
       data_len=st.sampled_from([0, 1, 60000]) | st.integers(0, 60000))
def test_rx_fill_same_as_rx_scatter_any_ring(features: int, mem: tuple[int, ...],
                                             sizes: list[int],
                                             rounds: list[tuple[int, int, int, int, bool, int]],
                                             data_len: int) -> None:
    """Whatever the buffers (Linux's equal ones, or any: rx_fill() says None and the
    caller falls back), frame lengths, IPv4 or IPv6, windows, refusing writers and reposts,
    and the short-ring memo in between: the guest sees the same either way."""
    rounds = [(c, off + size, off, room, commit, repost)
              for c, size, off, room, commit, repost in rounds]
    data = _payload(data_len, 11)
    assert _fill_run(True, features, mem, sizes, rounds, data)[0] == \
        _fill_run(False, features, mem, sizes, rounds, data)[0]


def test_rx_fill_through_the_listener(tmp_path: Path) -> None:
    """The listener (what TCP holds) forwards rx_fill(); a Link without the path says None."""
    loop = Loop()
    lst = VhostUserListener(loop, str(tmp_path / "vu.sock"), lambda frames: None)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        g = _listener_guest(loop, lst.path)
        g.bring_up(ALL)
        g.post_rx(4, size=4096)
        a.sendall(_payload(3000))
        f = Fill(7, 0, 0, None)
        got = link_rx_fill(lst, b.fileno(), 4, 54 + 1460, 54, 1 << 20, PEEK, WRITER, f.arg,
                           None)
        assert got == (3000, 3, 4 * 1460)
        assert f.f.seq == 7 + 3000
        lst.flush()
        frames = [f for _, f in g.received()]
        assert [fr[54:] for fr in frames] == [_payload(3000)[k:k + 1460]
                                              for k in (0, 1460, 2920)]
        assert [struct.unpack("!I", fr[38:42])[0] for fr in frames] == [7, 1467, 2927]
        g.close()
    finally:
        a.close()
        b.close()
        lst.close()
        loop.close()
    assert Link.rx_fill(lst, 1, 1514, 54, 1, SocketReader(0, 0).filler(WRITER), None) is None


# --- the short-ring memo: a try that found too few chains for one frame ------------------------

def _count_pops(vq: object, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of either pop the link makes on `vq` (net.pop_rx_frames(): rx_scatter();
    net.fill_rx_frames(): rx_fill()), by the count asked."""
    calls: list[int] = []
    for name in ("pop_rx_frames", "fill_rx_frames"):
        real = getattr(net, name)

        def counted(q: object, count: int, *args: object, _real: object = real,
                    **kwargs: object) -> object:
            if q is vq:
                calls.append(count)
            return _real(q, count, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(net, name, counted)
    return calls


@pytest.mark.parametrize("fill", [True, False], ids=["rx_fill", "rx_scatter"])
def test_short_ring_is_not_popped_again_until_it_changes(
        h: Harness, monkeypatch: pytest.MonkeyPatch, fill: bool) -> None:
    """Half a frame's chains: the first try pops them and gives them back; tries with the
    ring unchanged pop nothing (not one pop call) and return nothing; a smaller frame, or
    buffers the guest posts (kicked or not), are tried again."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def get(frame_len: int) -> int:
        if fill:
            got = link_rx_fill(h.link, b.fileno(), 4, frame_len, 54, 1 << 20, PEEK, WRITER,
                               Fill(0, 0, 0, None).arg, None)
            assert got is not None
            return got[1]
        return len(h.link.rx_scatter(4, frame_len, 54))

    def give_back(frames: int) -> None:
        """The frames get() handed out back in the ring as they were: rx_scatter()'s
        rewound at the flush; rx_fill()'s used (the guest reposts as many buffers)."""
        h.link.flush()
        if fill:
            assert len(h.guest.rx.get_used()) == frames
            h.guest.post_rx(frames, size=1536)

    try:
        h.guest.bring_up(ALL)
        a.sendall(_payload(20000))
        h.guest.post_rx(2, size=1536)  # 3048 bytes of frame: half of one of 5054
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None
        calls = _count_pops(vq, monkeypatch)
        assert get(5054) == 0 and calls and h.link._starved
        assert (vq.last_avail_idx, vq.inflight) == (0, 0)
        assert h.link._short is not None
        calls.clear()
        for frame_len in (5054, 5054, 9000):  # the same or bigger: can't fit either
            assert get(frame_len) == 0
        assert calls == [] and (vq.last_avail_idx, vq.inflight) == (0, 0) and h.link._starved
        assert get(1514) == 2 and calls  # a smaller frame fits: popped and handed out
        give_back(2)
        calls.clear()
        assert get(5054) == 0 and calls  # the memo is gone, so this popped again...
        assert h.link._short is not None  # ... and set it again
        calls.clear()
        h.guest.rx.add([], [1536])  # posted, no kick yet: the ring changed all the same
        assert get(5054) == 0 and calls  # 3 of 4 chains: still short, but it looked
        calls.clear()
        assert get(5054) == 0 and calls == []
        h.guest.post_rx(1, size=1536)
        assert get(5054) == 1 and calls  # 4 chains: a frame
        h.link.flush()
        assert b.recv(30000) == _payload(20000)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("features", [BASE | net.F_GUEST_CSUM, ALL], ids=["plain", "event-idx"])
def test_rx_kick_wakes_after_a_starved_rx_fill(h: Harness, features: int) -> None:
    """A starved rx_fill() (and the memo's answer after it) leaves the link waiting for the
    RX kick: when the guest posts enough buffers, on_rx_ready callbacks run and get frames."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    woken: list[int] = []

    def fill(count: int) -> tuple[int, int, int] | None:
        return link_rx_fill(h.link, b.fileno(), count, 5054, 54, 1 << 20, PEEK, WRITER,
                            Fill(0, 0, 0, None).arg, None)

    def ready() -> None:
        got = fill(1)
        assert got is not None
        woken.append(got[1])

    try:
        h.guest.bring_up(features)
        h.link.on_rx_ready.append(ready)
        a.sendall(_payload(20000))
        h.guest.post_rx(2, size=1536)
        h.pump()
        assert fill(4) == (0, 0, 0)
        assert fill(4) == (0, 0, 0)  # memo
        h.pump()
        assert woken == []
        h.guest.post_rx(2, size=1536)  # now one whole frame; the kick
        h.pump()
        assert woken == [1]
        h.link.flush()
        assert len(h.guest.received()) == 1
        h.guest.post_rx(1, size=1536)  # not starved any more: no wake-up
        h.pump()
        assert woken == [1]
    finally:
        a.close()
        b.close()


def test_short_ring_memo_forgotten_on_reconnect(h: Harness) -> None:
    h.guest.bring_up(ALL)
    h.guest.post_rx(2, size=1536)
    assert h.link.rx_scatter(4, 5054, 54) == [] and h.link._short is not None
    h.guest.close()
    h.pump()
    assert h.link._short is None
    h.guest = h.connect()
    h.guest.bring_up(ALL)
    h.guest.post_rx(2, size=4096)  # the same indices, bigger buffers: a frame
    assert len(h.link.rx_scatter(4, 5054, 54)) == 1
    h.link.flush()
