"""pcap capture of every frame on the guest link, both directions (classic libpcap format).

The file is the classic (non-ng) format: a 24-byte global header, then per frame a 16-byte
record header (seconds, microseconds, captured length, original length) and the frame bytes,
all in host byte order (readers detect it from the magic). Writes are buffered; the buffer is
written out every `flush_every` records and at `flush()`, which the loop calls at the end of
every iteration when the writer was given a loop, so the file is readable while we run.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostpasst.core.loop import Loop

log = logging.getLogger(__name__)

PCAP_MAGIC = 0xA1B2C3D4
PCAP_VERSION = (2, 4)
PCAP_SNAPLEN = 65535
LINKTYPE_ETHERNET = 1

_GLOBAL_HDR = struct.Struct("=IHHiIII")  # magic, major, minor, thiszone, sigfigs, snaplen, net
_RECORD_HDR = struct.Struct("=IIII")  # ts_sec, ts_usec, incl_len, orig_len


class PcapWriter:
    """Append frames (any buffer type) to a pcap file created (truncated) at `path`."""

    def __init__(self, path: str, loop: Loop | None = None, flush_every: int = 64) -> None:
        self.path = path
        self.flush_every = flush_every
        self.frames = 0  # records written since open
        self._pending = 0  # records buffered since the last flush
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._file = os.fdopen(fd, "wb", buffering=1 << 16)
        self._file.write(
            _GLOBAL_HDR.pack(PCAP_MAGIC, *PCAP_VERSION, 0, 0, PCAP_SNAPLEN, LINKTYPE_ETHERNET)
        )
        self._file.flush()
        self._loop = loop
        if loop is not None:
            loop.add_flush_hook(self.flush)

    @property
    def closed(self) -> bool:
        return self._file.closed

    def write(self, frame: bytes | bytearray | memoryview) -> None:
        """Record one frame, timestamped now; frames longer than the snaplen are cut."""
        if self._file.closed:
            return
        view = memoryview(frame).cast("B") if not isinstance(frame, bytes) else frame
        length = len(view)
        caplen = min(length, PCAP_SNAPLEN)
        now = time.time_ns() // 1000
        try:
            self._file.write(_RECORD_HDR.pack(now // 1_000_000, now % 1_000_000, caplen, length))
            self._file.write(view[:caplen])
        except OSError as e:
            self._abandon(e)
            return
        self.frames += 1
        self._pending += 1
        if self._pending >= self.flush_every:
            self.flush()

    def flush(self) -> None:
        """Write buffered records out, so the file on disk is complete up to here."""
        if self._pending == 0 or self._file.closed:
            return
        self._pending = 0
        try:
            self._file.flush()
        except OSError as e:
            self._abandon(e)

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_flush_hook(self.flush)
            self._loop = None
        if not self._file.closed:
            try:
                self._file.close()
            except OSError as e:
                log.error("pcap: closing %s failed: %s", self.path, e)

    def _abandon(self, e: OSError) -> None:
        """A full disk must not take the data path down with it: stop capturing."""
        log.error("pcap: write to %s failed (%s), capture stopped", self.path, e)
        try:
            self._file.close()
        except OSError:
            pass  # the buffered tail is lost either way

    def __enter__(self) -> PcapWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
