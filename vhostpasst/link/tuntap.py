"""A tap device as the guest link (pasta): one Ethernet frame per read() and per write().

The tap is opened with IFF_TAP | IFF_NO_PI: no packet-information prefix, no vnet header, no
offloads, one queue. RX reads frames back to back into one buffer until EAGAIN (at most
`max_reads` per wake-up, so a busy tap can't starve the other fds) and hands them over in one
batch; frames shorter than an Ethernet header are ignored. EOF, a read error or EPOLLHUP mean
the device is gone: fatal, `on_exit` is called. TX writes each committed frame at the
end-of-iteration flush; EAGAIN/ENOBUFS/ENOSPC/EIO drop that frame (interface down, queue
full), other errors are fatal.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from collections.abc import Callable, Sequence

from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, Loop
from vhostpasst.core.pcap import PcapWriter
from vhostpasst.link.base import ETH_MAX_FRAME, FrameHandler, Link
from vhostpasst.link.stream import FramePool

log = logging.getLogger(__name__)
_ratelimited = RateLimitedLog(log)

ETH_HLEN = 14
TUN_PATH = "/dev/net/tun"
TUNSETIFF = 0x400454CA  # _IOW('T', 202, int)
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16
_IFREQ = struct.Struct(f"{IFNAMSIZ}sH22x")  # struct ifreq: name, ifr_flags, union padding

RX_BUF_SIZE = 8 * 1024 * 1024
MAX_READS = 256  # frames read per wake-up at most
TX_SLOTS = 128
_DROP_ERRNOS = (errno.EAGAIN, errno.ENOBUFS, errno.ENOSPC, errno.EIO)


def open_tap(ifname: str = "") -> tuple[int, str]:
    """Open (creating it if needed) tap interface `ifname` ("" lets the kernel pick tapN).
    Returns the non-blocking, close-on-exec fd and the interface name the kernel reports."""
    if len(ifname.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name too long: {ifname!r}")
    fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        ifr = fcntl.ioctl(fd, TUNSETIFF, _IFREQ.pack(ifname.encode(), IFF_TAP | IFF_NO_PI))
    except BaseException:
        os.close(fd)
        raise
    name = _IFREQ.unpack(ifr)[0].split(b"\0", 1)[0].decode()
    return fd, name


class TapLink(Link):
    """Frames to and from a tap fd (or anything with one-frame-per-read semantics)."""

    def __init__(
        self,
        loop: Loop,
        fd: int,
        on_frames: FrameHandler,
        pcap: PcapWriter | None = None,
        on_exit: Callable[[], None] | None = None,
        *,
        max_reads: int = MAX_READS,
        tx_slots: int = TX_SLOTS,
        rx_size: int = RX_BUF_SIZE,
    ) -> None:
        super().__init__(on_frames, pcap)
        self._loop = loop
        self.fd = fd
        self.on_exit: Callable[[], None] = on_exit if on_exit is not None else loop.stop
        self.max_reads = max_reads
        self._rx_buf = bytearray(max(rx_size, ETH_MAX_FRAME))
        self._rx_view = memoryview(self._rx_buf)
        self._pool = FramePool(tx_slots, 0)
        self._open = True
        # counters, for logs and tests
        self.rx_frames = 0
        self.rx_short = 0
        self.tx_frames = 0
        self.tx_dropped = 0
        os.set_blocking(fd, False)
        loop.add_fd(fd, EPOLLIN, self._on_event)
        loop.add_flush_hook(self.flush)

    @property
    def connected(self) -> bool:
        return self._open

    # --- RX ------------------------------------------------------------------------------
    def _on_event(self, mask: int) -> None:
        if not self._open:
            return
        if mask & EPOLLIN:
            self._receive()
        if self._open and mask & (EPOLLHUP | EPOLLERR) and not mask & EPOLLIN:
            self._fatal("tap device hang-up")

    def _receive(self) -> None:
        view, size = self._rx_view, len(self._rx_buf)
        frames: list[memoryview] = []
        off = 0
        failure = None
        for _ in range(self.max_reads):
            if size - off < ETH_MAX_FRAME:
                break  # buffer full: the rest waits for the next wake-up (level-triggered)
            try:
                n = os.readv(self.fd, [view[off : off + ETH_MAX_FRAME]])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                failure = f"tap read error: {e.strerror or e}"
                break
            if n == 0:
                failure = "end of file on tap device"
                break
            if n < ETH_HLEN:
                self.rx_short += 1
                continue
            frames.append(view[off : off + n])
            off += n
        try:
            if frames:
                self.rx_frames += len(frames)
                self._deliver(frames)
        finally:
            if failure is not None:
                self._fatal(failure)

    # --- TX ------------------------------------------------------------------------------
    def rx_buffers(self, count: int) -> list[memoryview]:
        if not self._open:
            return []
        if self._pool.free < count and self._pool.queued:
            self.flush()
        return self._pool.buffers(count)

    def commit(self, lengths: Sequence[int]) -> None:
        if not self._open:
            self._pool.clear()
            return
        self._pool.commit(lengths)

    def flush(self) -> None:
        pool = self._pool
        if pool.queued:
            try:
                for i, length in enumerate(pool.lengths):
                    if not self._open:
                        break
                    if length:
                        self._write(pool.slot(i))
            finally:
                pool.clear()
        if self.pcap is not None:
            self.pcap.flush()  # both directions on disk once per loop iteration

    def _write(self, frame: memoryview) -> None:
        while True:
            try:
                os.write(self.fd, frame)
            except InterruptedError:
                continue
            except OSError as e:
                if e.errno in _DROP_ERRNOS:
                    self.tx_dropped += 1
                    _ratelimited.debug("tx-drop", "tap write failed (%s): frame dropped", e)
                    return
                self._fatal(f"tap write error: {e.strerror or e}")
                return
            break
        self.tx_frames += 1
        if self.pcap is not None:
            self.pcap.write(frame)

    # --- teardown ------------------------------------------------------------------------
    def _fatal(self, reason: str) -> None:
        log.error("%s", reason)
        self.close()
        self.on_exit()

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._loop.remove_fd(self.fd)
        self._loop.remove_flush_hook(self.flush)
        self._pool.clear()
        try:
            os.close(self.fd)
        except OSError:
            pass  # nothing left to release
