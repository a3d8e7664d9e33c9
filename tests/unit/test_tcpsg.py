"""vhostpasst._tcpsg (cffi_build/vhostpasst/tcpsg.c): TCP frames whose payload is scattered over
several buffers (vhost-user mergeable RX) get byte for byte what _tcpseg writes for the same
frames laid out contiguously, whatever the piece boundaries (odd ones included); with csum off
the TCP checksum field stays as the template has it; bad piece tables are refused."""

from __future__ import annotations

import random

import pytest

from vhostpasst.wire import checksum
from vhostpasst.wire import tcp as wtcp

sg = pytest.importorskip("vhostpasst._tcpsg")
seg = pytest.importorskip("vhostpasst._tcpseg")

MAC, OUR = bytes.fromhex("020000000001"), bytes.fromhex("9a559a559a55")
ADDRS = {False: (bytes([203, 0, 113, 7]), bytes([192, 0, 2, 2])),
         True: (bytes.fromhex("20010db8000000000000000000000007"),
                bytes.fromhex("20010db8000000000000000000000002"))}


def template(six: bool) -> tuple[bytes, int, int]:
    """As TcpConn.template: headers with the per-segment fields zero, pseudo sum, offset."""
    faddr, gaddr = ADDRS[six]
    off = wtcp.TCP6_PAYLOAD_OFFSET if six else wtcp.TCP4_PAYLOAD_OFFSET
    write = wtcp.write_eth_ipv6_tcp_headers if six else wtcp.write_eth_ipv4_tcp_headers
    scratch = memoryview(bytearray(off))
    write(scratch, MAC, OUR, faddr, gaddr, 443, 40000, 0, 0, 0, 0, 0)
    tmpl = bytearray(scratch)
    if not six:
        tmpl[24:26] = b"\0\0"
    tmpl[off - 4:off - 2] = b"\0\0"
    return bytes(tmpl), checksum.partial(faddr + gaddr) + 6, off


def split(rng: random.Random, frame: bytearray, off: int) -> list[memoryview]:
    """The frame cut at random places after the headers (odd sizes, 1-byte pieces...)."""
    view = memoryview(frame)
    cuts = {off + rng.randint(0, len(frame) - off) for _ in range(rng.randint(0, 6))}
    bounds = [0, *sorted(cuts - {0}), len(frame)]  # a cut at the end: an empty last piece
    if bounds[1] < off:
        bounds.insert(1, off)  # the headers stay in the first piece
    return [view[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_scattered_frames_match_contiguous_ones(six: bool) -> None:
    rng = random.Random(7)
    tmpl, pseudo, off = template(six)
    for _ in range(60):
        sizes = [rng.choice([0, 1, 2, 3, 1459, 1460, 4083, 8191, 65000]) for _ in
                 range(rng.randint(1, 5))]
        seq, ack, wnd = rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(16)
        ref = [bytearray(off + s) for s in sizes]
        ours = []
        for buf in ref:
            buf[off:] = rng.randbytes(len(buf) - off)
            ours.append(bytearray(buf))
        out_ref = seg.ffi.new("uint32_t[]", len(sizes))
        end_ref = seg.lib.vp_tcp_frames([seg.ffi.from_buffer(b) for b in ref], sizes,
                                        len(sizes), tmpl, six, pseudo, seq, ack, wnd,
                                        wtcp.ACK, wtcp.ACK | wtcp.PSH, out_ref)
        views: list[memoryview] = []
        first = [0]
        for buf in ours:
            views += split(rng, buf, off)
            first.append(len(views))
        for csum in (1, 0):
            out = sg.ffi.new("uint32_t[]", len(sizes))
            end = sg.lib.vp_tcp_frames_sg(
                [sg.ffi.from_buffer(v) for v in views], [len(v) for v in views], len(views),
                first, sizes, len(sizes), tmpl, six, pseudo, seq, ack, wnd, wtcp.ACK,
                wtcp.ACK | wtcp.PSH, csum, out)
            assert end == end_ref
            assert list(out) == list(out_ref)
            for a, b in zip(ours, ref, strict=True):
                if csum:
                    assert a == b
                else:  # everything but the TCP checksum, which stays zero
                    assert a[:off - 4] + a[off - 2:] == b[:off - 4] + b[off - 2:]
                    assert a[off - 4:off - 2] == b"\0\0"


def test_bad_piece_tables_are_refused() -> None:
    tmpl, pseudo, off = template(False)
    frame = bytearray(off + 100)
    views = [memoryview(frame)[:off + 40], memoryview(frame)[off + 40:]]
    ptrs = [sg.ffi.from_buffer(v) for v in views]

    def call(lens: list[int], first: list[int], size: int, csum: int = 1) -> int:
        out = sg.ffi.new("uint32_t[]", 1)
        return int(sg.lib.vp_tcp_frames_sg(ptrs, lens, 2, first, [size], 1, tmpl, 0, pseudo,
                                           1, 2, 3, 0x10, 0x18, csum, out))

    lens = [len(v) for v in views]
    assert call(lens, [0, 2], 100) == 101
    assert call(lens, [0, 2], 101) == -1  # payload longer than the pieces
    assert call(lens, [0, 2], 101, csum=0) == 102  # not read without csum
    assert call(lens, [0, 3], 100) == -1  # past the piece table
    assert call(lens, [1, 1], 100) == -1  # no piece
    assert call([off - 1, 60], [0, 2], 10) == -1  # headers don't fit the first piece
    assert call(lens, [0, 2], 0xFFFF) == -1  # more than an IPv4 packet holds
