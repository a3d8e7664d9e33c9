"""pcap writer: file structure (parsed here with struct) and, if available, tshark's view."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from vhostpasst.core.loop import Loop
from vhostpasst.core.pcap import PCAP_SNAPLEN, PcapWriter


def parse_pcap(data: bytes) -> tuple[tuple[int, ...], list[tuple[int, int, int, bytes]]]:
    """(global header fields, [(ts_sec, ts_usec, orig_len, captured bytes)]); strict."""
    assert len(data) >= 24
    magic = struct.unpack_from("<I", data)[0]
    endian = "<" if magic == 0xA1B2C3D4 else ">"
    hdr = struct.unpack_from(endian + "IHHiIII", data)
    assert hdr[0] == 0xA1B2C3D4
    records = []
    off = 24
    while off < len(data):
        assert off + 16 <= len(data), "truncated record header"
        sec, usec, incl, orig = struct.unpack_from(endian + "IIII", data, off)
        off += 16
        assert off + incl <= len(data), "truncated record body"
        assert usec < 1_000_000
        assert incl <= orig
        records.append((sec, usec, orig, data[off : off + incl]))
        off += incl
    return hdr, records


def eth_frame(n: int, size: int = 60) -> bytes:
    payload = n.to_bytes(4, "big") + bytes(size - 18)
    return bytes.fromhex("ffffffffffff" "9a559a559a55" "88b5") + payload


def test_header_and_records(tmp_path: Path) -> None:
    path = tmp_path / "cap.pcap"
    frames = [eth_frame(i, 60 + i) for i in range(10)]
    before = time.time()
    with PcapWriter(str(path)) as pcap:
        pcap.write(frames[0])  # bytes
        pcap.write(bytearray(frames[1]))
        pcap.write(memoryview(frames[2]))
        big = bytearray(100) + bytearray(frames[3]) + bytearray(100)
        pcap.write(memoryview(big)[100 : 100 + len(frames[3])])  # a slice of a bigger buffer
        for f in frames[4:]:
            pcap.write(f)
        assert pcap.frames == 10
    hdr, records = parse_pcap(path.read_bytes())
    assert hdr == (0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)
    assert [r[3] for r in records] == frames
    assert all(r[2] == len(f) for r, f in zip(records, frames, strict=True))
    assert all(before - 1 <= r[0] <= time.time() + 1 for r in records)


def test_frames_over_snaplen_are_cut(tmp_path: Path) -> None:
    path = tmp_path / "big.pcap"
    frame = bytes(range(256)) * 300  # 76800 bytes
    with PcapWriter(str(path)) as pcap:
        pcap.write(frame)
    _, records = parse_pcap(path.read_bytes())
    assert records[0][2] == len(frame)
    assert records[0][3] == frame[:PCAP_SNAPLEN]


def test_readable_after_flush_while_open(tmp_path: Path) -> None:
    path = tmp_path / "live.pcap"
    pcap = PcapWriter(str(path), flush_every=1000)
    assert path.stat().st_size == 24  # the global header is there from the start
    for i in range(5):
        pcap.write(eth_frame(i))
    pcap.flush()
    _, records = parse_pcap(path.read_bytes())
    assert len(records) == 5
    pcap.close()
    pcap.write(eth_frame(9))  # after close: ignored, no exception
    pcap.close()


def test_flush_every_n_records(tmp_path: Path) -> None:
    path = tmp_path / "n.pcap"
    with PcapWriter(str(path), flush_every=4) as pcap:
        for i in range(9):
            pcap.write(eth_frame(i))
        _, records = parse_pcap(path.read_bytes())
        assert len(records) == 8  # two automatic flushes so far, the 9th still buffered
    _, records = parse_pcap(path.read_bytes())
    assert len(records) == 9


def test_loop_flush_hook(tmp_path: Path) -> None:
    path = tmp_path / "loop.pcap"
    loop = Loop()
    pcap = PcapWriter(str(path), loop=loop, flush_every=1000)
    pcap.write(eth_frame(1))
    loop.run_once(0.0)
    assert len(parse_pcap(path.read_bytes())[1]) == 1
    pcap.close()
    loop.run_once(0.0)  # hook removed on close
    loop.close()


def test_truncates_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "old.pcap"
    path.write_bytes(b"x" * 1000)
    PcapWriter(str(path)).close()
    assert path.stat().st_size == 24


@pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark not installed")
def test_tshark_reads_it(tmp_path: Path) -> None:
    path = tmp_path / "ts.pcap"
    with PcapWriter(str(path)) as pcap:
        for i in range(7):
            pcap.write(eth_frame(i, 64 + i))
    env = dict(os.environ, HOME=str(tmp_path))  # tshark wants a writable profile directory
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.len", "-e", "eth.type"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split()
    assert len(out.stdout.splitlines()) == 7
    assert lines[0::2] == [str(64 + i) for i in range(7)]
    assert set(lines[1::2]) == {"0x88b5"}
