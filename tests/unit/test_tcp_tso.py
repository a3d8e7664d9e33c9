"""TCP with segmentation offload (the FakeSock/FakeLink harness of test_tcp.py): guest segments
bigger than the MSS, and 64 KiB frames to a link that segments them itself."""

from __future__ import annotations

import socket
import struct

import pytest
from scapy.layers.inet import IP, TCP  # type: ignore[import-untyped]
from scapy.layers.l2 import Ether  # type: ignore[import-untyped]
from vhostpasst._tcpseg import ffi as seg_ffi
from vhostpasst._tcpseg import lib as seg_lib
from vhostpasst._tcpsg import ffi as sg_ffi
from vhostpasst._tcpsg import lib as sg_lib

from tests.unit.test_tcp import (
    GUEST,
    GUEST_MAC,
    OUR_MAC,
    REMOTE,
    FakeLink,
    FakeSock,
    _fast_path_record,
    _handshake,
    _writer_conn,
    feed,
    guest_frame,
    make_env,
    parse,
)
from vhostpasst.core.loop import EPOLLIN, EPOLLRDHUP
from vhostpasst.link.base import LinkCaps
from vhostpasst.proto import tcp
from vhostpasst.proto.tcp import to_guest


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> tuple:
    return make_env(monkeypatch)


# --- TSO: guest segments bigger than the MSS, and 64 KiB frames to a link that segments --------

def test_guest_segments_bigger_than_the_mss(env: tuple) -> None:
    """A guest with TSO sends TCP frames of up to 64 KiB whatever the MSS it announced: their
    payload goes to the socket like any other, in order (also when the later one came first
    in the batch), a retransmission that overlaps what was taken is trimmed, and the ACK covers
    all of it."""
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    ack = synack.seq + 1
    a, b, c = (bytes([i]) * 60000 for i in (1, 2, 3))
    feed(d, guest_frame("PA", 1001 + 60000, ack=ack, payload=b),
         guest_frame("PA", 1001, ack=ack, payload=a))
    assert bytes(sock.sent) == a + b
    assert parse(link.frames[-1]).ack == 1001 + 120000
    # resent from the middle of b on, with c after it: only c is new
    feed(d, guest_frame("PA", 1001 + 90000, ack=ack, payload=b[30000:] + c[:30000]))
    assert bytes(sock.sent) == a + b + c[:30000]
    assert parse(link.frames[-1]).ack == 1001 + 150000


class FakeScatterLink(FakeLink):
    """A link with rx_scatter() over 4 KiB buffers, as vhost-user's mergeable RX buffers, that
    segments TCP frames itself (TSO) or not; frames are joined at commit."""

    def __init__(self, tso: bool) -> None:
        super().__init__()
        # GUEST_CSUM: no TCP checksum unless a GSO frame (partial)
        self.caps = LinkCaps(tso4=tso, tso6=tso, l4_csum=False)
        self.tsos: list[object] = []
        self.asked: list[tuple[int, int]] = []  # (count, frame_len) of every rx_scatter()
        self._scatter: list[list[memoryview]] = []

    def rx_scatter(self, count: int, frame_len: int, head: int = 0) -> list[list[memoryview]]:
        self.asked.append((count, frame_len))
        out = []
        for _ in range(count):
            views, left = [], frame_len
            while left > 0:
                views.append(memoryview(bytearray(min(4096, left))))
                left -= len(views[-1])
            out.append(views)
        self._scatter = out
        return out

    def rx_fill(self, *args: object) -> None:
        return None  # as Link's: this link has no faster read than rx_scatter()

    def commit_scatter(self, lengths: list[int], tso: object = None) -> None:
        self.tsos.append(tso)
        for views, n in zip(self._scatter, lengths, strict=False):
            self.frames.append(b"".join(bytes(v) for v in views)[:n])


def _pseudo_partial(frame: bytes) -> int:
    """The pseudo-header sum over the full TCP length, folded, not complemented (IPv4)."""
    total = sum(struct.unpack("!4H", frame[26:34])) + socket.IPPROTO_TCP + len(frame) - 34
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


@pytest.mark.parametrize("tso", [True, False], ids=["tso-link", "plain-link"])
def test_frames_to_the_guest_tso_sized_only_to_a_tso_link(tso: bool, env: tuple) -> None:
    """To a link whose peer segments (tso4), host data goes in frames of as many whole MSS
    segments as 64 KiB of IP bytes hold (44 x 1460), still within the guest's window
    (1000 << 7), each given to commit_scatter() with its Tso; those frames carry the partial
    checksum, a frame of one segment none (DATA_VALID). Any other link gets MSS-sized
    segments only, as before."""
    d, loop, _ = env
    link = FakeScatterLink(tso)
    d.link = link  # type: ignore[assignment]
    sock, synack = _handshake(d, loop, link)  # type: ignore[arg-type]
    window = 1000 << 7
    data = bytes(range(256)) * 500 + b"tail" * 250  # the window and 1000 bytes more
    sock.rx += data
    loop.fds[sock.fd][1](EPOLLIN)
    segs = [f for f in link.frames if parse(f).sport == 80 and bytes(parse(f).payload)]
    sizes = [len(bytes(parse(f).payload)) for f in segs]
    got = b"".join(bytes(parse(f).payload) for f in segs)
    if tso:
        assert got == data[:window]
        assert sizes == [44 * 1460, window - 44 * 1460]
        t = link.tsos[-1]
        assert (t.six, t.l4_off, t.hdr_len, t.mss) == (False, 34, 54, 1460)  # type: ignore
        for f in segs:
            assert len(f) - 14 == struct.unpack("!H", f[16:18])[0]  # IP length: all of it
            assert struct.unpack("!H", f[50:52])[0] == _pseudo_partial(f)
        # the guest acknowledges all; the rest (less than one segment) goes as a plain frame
        feed(d, guest_frame("A", 1001, ack=synack.seq + 1 + window, window=1000))
        last = link.frames[-1]
        assert bytes(parse(last).payload) == data[window:]
        assert last[50:52] == b"\0\0"  # DATA_VALID: no checksum
    else:  # (SEG_BATCH segments per wake-up)
        assert got == data[:tcp.SEG_BATCH * 1460] and max(sizes) == 1460
        assert all(t is None for t in link.tsos)


@pytest.mark.parametrize("tso", [True, False], ids=["tso-link", "plain-link"])
def test_short_answer_asks_for_its_bytes_buffers_only(tso: bool, env: tuple,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A 3-byte answer (SIOCINQ says what is queued) asks rx_scatter() for a frame of its
    bytes plus one, not of a whole segment (64 KiB with TSO: 17-44 mergeable buffers popped
    and given back per answer); the data still goes whole, and more data after it in as
    many frames as it needs."""
    d, loop, _ = env
    link = FakeScatterLink(tso)
    d.link = link  # type: ignore[assignment]
    asked = link.asked
    sock, synack = _handshake(d, loop, link)  # type: ignore[arg-type]
    monkeypatch.setattr(to_guest, "unread", lambda fd: len(sock.rx))
    off = 54  # Ethernet + IPv4 + TCP headers
    sock.rx += b"abc"
    loop.fds[sock.fd][1](EPOLLIN)
    assert asked[-1] == (1, off + 4)
    assert bytes(parse(link.frames[-1]).payload) == b"abc"
    feed(d, guest_frame("A", 1001, ack=synack.seq + 1 + 3, window=1000))
    sock.rx += b"z" * 5000
    loop.fds[sock.fd][1](EPOLLIN)
    # with TSO one frame holds all 5000 bytes: sized by them; else four full segments
    assert asked[-1] == ((1, off + 5001) if tso else (4, off + 1460))
    got = b"".join(bytes(parse(f).payload) for f in link.frames
                   if parse(f).sport == 80 and bytes(parse(f).payload))
    assert got == b"abc" + b"z" * 5000


def test_bulk_peeks_skip_siocinq_and_reuse_the_ack(env: tuple,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """After a peek that filled every frame it was given, the next one asks neither SIOCINQ
    (there is more, or the peek says there is not) nor TCP_INFO (nothing came from the
    guest, no ACK went out: the same ACK number and window for DATA_ACK_TTL, then asked
    again); guest data in between makes the next frames carry its ACK; a peek that finds
    nothing asks SIOCINQ again."""
    d, loop, _ = env
    link = FakeScatterLink(False)
    d.link = link  # type: ignore[assignment]
    monkeypatch.setattr(tcp.conn, "DATA_ACK_TTL", 60.0)  # the test must not race the clock
    sock, synack = _handshake(d, loop, link)  # type: ignore[arg-type]
    asked_inq: list[int] = []
    monkeypatch.setattr(to_guest, "unread", lambda fd: asked_inq.append(fd) or len(sock.rx))
    infos: list[int] = []
    real = sock.getsockopt

    def getsockopt(level: int, opt: int, size: int = 0) -> int | bytes:
        if opt == socket.TCP_INFO:
            infos.append(opt)
        return real(level, opt, size)

    sock.getsockopt = getsockopt  # type: ignore[method-assign]
    seg = 1460

    def data_frames() -> list[TCP]:
        return [parse(f) for f in link.frames if bytes(parse(f).payload)]

    # the peek after the handshake asked already (it found nothing): stale now, asked again
    monkeypatch.setattr(tcp.conn, "DATA_ACK_TTL", 0.0)
    sock.rx += b"a" * (2 * seg)
    loop.fds[sock.fd][1](EPOLLIN)
    assert len(asked_inq) == 1 and len(infos) == 1 and len(data_frames()) == 2
    monkeypatch.setattr(tcp.conn, "DATA_ACK_TTL", 60.0)
    sock.rx += b"b" * (3 * seg)  # lands after a full peek
    loop.fds[sock.fd][1](EPOLLIN)
    assert len(asked_inq) == 1 and len(infos) == 1  # neither asked again
    frames = data_frames()
    assert len(frames) == 5 and {f.ack for f in frames} == {1001}
    monkeypatch.setattr(tcp.conn, "DATA_ACK_TTL", 0.0)  # once it is stale: asked again
    sock.rx += b"b" * seg
    loop.fds[sock.fd][1](EPOLLIN)
    assert len(infos) == 2 and len(data_frames()) == 6
    feed(d, guest_frame("PA", 1001, ack=synack.seq + 1, payload=b"x" * 10, window=1000))
    sock.rx += b"c" * seg
    loop.fds[sock.fd][1](EPOLLIN)
    assert data_frames()[-1].ack == 1011  # the guest's data is acknowledged with ours
    got = b"".join(bytes(f.payload) for f in data_frames())
    assert got == b"a" * (2 * seg) + b"b" * (4 * seg) + b"c" * seg
    before = len(asked_inq)
    loop.fds[sock.fd][1](EPOLLIN)  # nothing new: the peek finds nothing
    loop.fds[sock.fd][1](EPOLLIN)
    assert len(asked_inq) > before  # SIOCINQ asked again after the empty peek


def test_data_landing_after_siocinq_saw_none_goes_whole(env: tuple,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """SIOCINQ said nothing is queued, but data landed before the peek (a race a loaded
    machine hits at the first peek after the handshake): the peek still has a whole
    segment's room, so the answer goes in one frame, not one byte and then the rest."""
    d, loop, _ = env
    link = FakeScatterLink(False)
    d.link = link  # type: ignore[assignment]

    def racy_unread(fd: int) -> int:
        sock = FakeSock.instances[-1]
        if not sock.rx and not sock.closed:
            sock.rx += b"server-data"  # lands just after the ioctl looked
        return 0

    monkeypatch.setattr(to_guest, "unread", racy_unread)
    _handshake(d, loop, link)  # type: ignore[arg-type]
    assert link.asked[-1] == (1, 54 + 1460)
    data = [bytes(parse(f).payload) for f in link.frames if bytes(parse(f).payload)]
    assert data == [b"server-data"]


def test_ack_of_a_drained_answer_peeks_nothing_until_an_event(
        env: tuple, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest's ACK of an answer that emptied the socket (the last peek came up short,
    the socket is edge-triggered) asks the link for no buffers; the next data, or the end
    of the stream, comes with an event and goes to the guest."""
    d, loop, _ = env
    link = FakeScatterLink(False)
    d.link = link  # type: ignore[assignment]
    asked = link.asked
    sock, synack = _handshake(d, loop, link)  # type: ignore[arg-type]
    monkeypatch.setattr(to_guest, "unread", lambda fd: len(sock.rx))
    asked.clear()  # (the handshake looked for data the client sent early)
    sock.rx += b"abc"
    loop.fds[sock.fd][1](EPOLLIN)
    assert len(asked) == 1
    feed(d, guest_frame("A", 1001, ack=synack.seq + 1 + 3))
    assert len(asked) == 1  # nothing new to peek, and an edge will say when there is
    sock.rx += b"de"
    sock.eof = True
    loop.fds[sock.fd][1](EPOLLIN | EPOLLRDHUP)
    ours = [parse(f) for f in link.frames if parse(f).sport == 80]
    assert bytes(ours[-1].payload) == b"de"
    feed(d, guest_frame("A", 1001, ack=synack.seq + 1 + 5))
    assert "F" in str(parse(link.frames[-1]).flags)  # the end: peeked after the ACK


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_dispatcher_takes_a_64k_guest_segment(six: bool) -> None:
    """A TSO frame (65535 IP bytes, far above any MTU) goes through the fast path whole, as
    the full parsers take it."""
    from scapy.layers.inet6 import IPv6  # type: ignore[import-untyped]
    payload = bytes(range(256)) * 255 + b"x" * (65535 - 40 - 255 * 256 - (20 if six else 0))
    l3 = IPv6(src="2001:db8::2", dst="2001:db8::9") if six else IP(src=str(GUEST),
                                                                   dst=str(REMOTE))
    frame = bytes(Ether(src=GUEST_MAC, dst=OUR_MAC) / l3 / TCP(sport=1, dport=2, flags="PA",
                                                              seq=7, ack=8) / payload)
    assert len(frame) == 14 + 65535
    fast = _fast_path_record(frame, True)
    assert fast == _fast_path_record(frame, False)
    [seg] = fast[0]
    assert seg[-3] == payload  # (the payload, then options and the two unused fields)


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_tso_frames_carry_the_partial_checksum(six: bool) -> None:
    """vp_tcp_frames_sg_tso: frames of more than tso_mss payload bytes get the pseudo-header
    sum over their full TCP length in the checksum field, and completing it as the guest does
    for NEEDS_CSUM (the ones' complement sum from the TCP header to the end, complemented,
    stored there) gives exactly the checksum _tcpseg computes for the same frame; the other
    frames are what vp_tcp_frames_sg writes. Headers (IP lengths of the whole frame) match."""
    import random

    from vhostpasst.wire import tcp as wtcp
    rng = random.Random(11)
    d, conn = _writer_conn(six)
    off = wtcp.TCP6_PAYLOAD_OFFSET if six else wtcp.TCP4_PAYLOAD_OFFSET
    l4 = off - wtcp.TCP_HLEN
    tmpl = conn.template(GUEST_MAC, d.config.our_mac)
    for _ in range(20):
        sizes = [rng.choice([1, 1447, 1448, 1449, 2897, 40000, 64240]) for _ in
                 range(rng.randint(1, 4))]
        seq, ack, wnd = rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(16)
        ref = [bytearray(off + s) for s in sizes]
        for buf in ref:
            buf[off:] = rng.randbytes(len(buf) - off)
        ours = [bytearray(b) for b in ref]
        plain = [bytearray(b) for b in ref]
        first = list(range(len(sizes) + 1))
        args = (len(sizes), first, sizes, len(sizes), tmpl, six, conn.pseudo, seq, ack, wnd,
                wtcp.ACK, wtcp.ACK | wtcp.PSH)
        out = sg_ffi.new("uint32_t[]", len(sizes))
        end = sg_lib.vp_tcp_frames_sg_tso([sg_ffi.from_buffer(b) for b in ours],
                                          [len(b) for b in ours], *args, 1, 1448, out)
        sg_lib.vp_tcp_frames_sg([sg_ffi.from_buffer(b) for b in plain],
                                [len(b) for b in plain], *args, 1, out)
        full = seg_ffi.new("uint32_t[]", len(sizes))
        assert end == seg_lib.vp_tcp_frames([seg_ffi.from_buffer(b) for b in ref], sizes,
                                            len(sizes), tmpl, six, conn.pseudo, seq, ack, wnd,
                                            wtcp.ACK, wtcp.ACK | wtcp.PSH, full)
        for size, mine, want, pl in zip(sizes, ours, ref, plain, strict=True):
            if size <= 1448:
                assert mine == pl
                continue
            assert mine[:l4 + 16] == want[:l4 + 16] and mine[l4 + 18:] == want[l4 + 18:]
            length = len(mine) - l4
            partial = sum(struct.unpack_from(f"!{len(conn.faddr_b + conn.gaddr_b) // 2}H",
                                             conn.faddr_b + conn.gaddr_b)) + 6 + length
            while partial >> 16:
                partial = (partial & 0xFFFF) + (partial >> 16)
            assert mine[l4 + 16:l4 + 18] == partial.to_bytes(2, "big")
            # the guest's (or a NIC's) completion: checksum from csum_start to the end
            done = bytearray(mine)
            words = done[l4:] + b"\0" * (length & 1)
            total = sum(struct.unpack(f"!{len(words) // 2}H", words))
            while total >> 16:
                total = (total & 0xFFFF) + (total >> 16)
            done[l4 + 16:l4 + 18] = (~total & 0xFFFF).to_bytes(2, "big")
            assert done == want


def test_no_epollin_while_the_guest_window_is_full(env: tuple) -> None:
    """Stalled on the guest's window, the host socket is watched for hang-ups only: every
    segment a busy sender queued used to wake us for a peek that could not happen. The
    guest's ACK that opens the window resumes the data, and EPOLLIN comes back with it."""
    d, loop, link = env
    sock, synack = _handshake(d, loop, link)
    feed(d, guest_frame("A", 1001, ack=synack.seq + 1, window=23))  # 23 << 7 = 2944 bytes
    sock.rx += b"d" * 10000
    loop.fds[sock.fd][1](EPOLLIN)
    sent = sum(len(bytes(parse(f).payload)) for f in link.frames if parse(f).sport == 80)
    assert sent == 2944
    assert not loop.fds[sock.fd][0] & EPOLLIN
    assert loop.fds[sock.fd][0] & EPOLLRDHUP
    feed(d, guest_frame("A", 1001, ack=synack.seq + 1 + 2944, window=1000))
    sent = sum(len(bytes(parse(f).payload)) for f in link.frames if parse(f).sport == 80)
    assert sent == 10000
    assert loop.fds[sock.fd][0] & EPOLLIN
