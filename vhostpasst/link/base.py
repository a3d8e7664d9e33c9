"""The one link interface: how frames enter and leave vhostpasst, whatever carries them.

A link delivers received Ethernet frames (as memoryviews, valid only during the callback) to
the frame handler it was given, and hands out writable receive buffers for frames going to the
guest. Protocol code fills buffers from `rx_buffers()` in place (a socket `recvmsg_into`
straight into them) and then calls `commit()` with the length of each frame it wrote. For the
stream socket and tap those buffers come from a preallocated pool that the end-of-iteration
flush writes out; for vhost-user they are the guest's own RX descriptors.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence

from vhostpasst.pcap import PcapWriter

FrameHandler = Callable[[Sequence[memoryview]], None]

ETH_MAX_FRAME = 65535 + 14  # largest frame: IP_MAX_MTU plus the Ethernet header


class Link(abc.ABC):
    """Base class: keeps the frame handler and the pcap hook common to every link."""

    def __init__(self, on_frames: FrameHandler, pcap: PcapWriter | None = None) -> None:
        self.on_frames = on_frames
        self.pcap = pcap

    @property
    @abc.abstractmethod
    def connected(self) -> bool:
        """True while a peer (guest) is attached and frames can be sent."""

    @abc.abstractmethod
    def rx_buffers(self, count: int) -> list[memoryview]:
        """Up to `count` writable buffers, each able to hold one frame of ETH_MAX_FRAME bytes.

        Fewer (possibly none) are returned when the pool or the guest's ring is short. The
        buffers stay reserved until the next `commit()`; buffers not committed are reused.
        """

    @abc.abstractmethod
    def commit(self, lengths: Sequence[int]) -> None:
        """Queue the first len(lengths) buffers of the last `rx_buffers()` as frames of those
        lengths. They are written out at the end of the loop iteration (or sooner if full)."""

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        """Copy one frame into a receive buffer and commit it (services: ARP, DHCP...).
        Returns False if the frame was dropped (no peer or no buffer)."""
        if not self.connected:
            return False
        buffers = self.rx_buffers(1)
        if not buffers or len(frame) > len(buffers[0]):
            return False
        buffers[0][: len(frame)] = frame
        self.commit([len(frame)])
        return True

    @abc.abstractmethod
    def flush(self) -> None:
        """Write out committed frames now (also registered as a loop flush hook)."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release fds and unregister from the loop."""

    def _deliver(self, frames: Sequence[memoryview]) -> None:
        """Hand received frames to the dispatcher, capturing them first if --pcap is on."""
        if self.pcap is not None:
            for frame in frames:
                self.pcap.write(frame)
        self.on_frames(frames)
