"""The one link interface: how frames enter and leave vhostpasst, whatever carries them.

A link delivers received Ethernet frames (as memoryviews, valid only during the callback) to
the frame handler it was given, and hands out writable receive buffers for frames going to the
guest. Protocol code fills buffers from `rx_buffers()` in place (a socket `recvmsg_into`
straight into them) and then calls `commit()` with the length of each frame it wrote. For the
stream socket and tap those buffers come from a preallocated pool that the end-of-iteration
flush writes out; for vhost-user they are the guest's own RX descriptors.

When `rx_buffers()` came up short (the guest's ring empty, or the link's socket full), the
link later calls every callback added with `add_rx_ready_callback()` once buffers are
available again, so protocol code that stopped for lack of buffers resumes at once instead
of on a retransmission timer. Callbacks run from a loop callback, never from inside
`rx_buffers()`, `commit()` or `flush()`.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from vhostpasst.core.pcap import PcapWriter
from virtio.ring import FillSite, RxFiller

log = logging.getLogger(__name__)

FrameHandler = Callable[[Sequence[memoryview]], None]
RxReadyCallback = Callable[[], None]

ETH_MAX_FRAME = 65535 + 14  # largest frame: IP_MAX_MTU plus the Ethernet header
IOV_MAX = 1024  # UIO_MAXIOV: iovecs one recvmsg_into() takes; rx_scatter() stays within it
TSO_MAX_L3 = 65535  # IP bytes of the largest TCP frame a TSO peer takes (the IP length fields)


@dataclass(frozen=True, slots=True)
class Tso:
    """TCP frames of one connection that a peer with TCP segmentation offload (`LinkCaps.tso4`
    / `tso6`: virtio-net GUEST_TSO*) takes whole and cuts into `mss`-sized segments itself,
    given to `commit_scatter()`. Frames with more than `mss` bytes of payload go out as GSO
    frames; their TCP checksum field holds the pseudo-header sum (partial checksum)."""

    six: bool  # TCP over IPv6 (else IPv4)
    l4_off: int  # Ethernet + IP header length: where the TCP header (and checksum) starts
    hdr_len: int  # Ethernet + IP + TCP header length: where the payload starts
    mss: int  # segment size toward the peer


@dataclass(frozen=True, slots=True)
class LinkCaps:
    """What the peer attached to a link takes, declared by the link: a new LinkCaps object
    whenever a peer attaches or negotiates other features, so protocol code chooses its output
    path once per LinkCaps (an identity check) instead of probing the link per frame."""

    # The peer takes TCP/IPv4 (IPv6) frames of up to TSO_MAX_L3 IP bytes and segments them
    # itself (commit_scatter() with a Tso). Only vhost-user with GUEST_TSO4/6 says so.
    tso4: bool = False
    tso6: bool = False
    # Frames need their TCP/UDP checksum over the payload: False only where the peer checks
    # none (vhost-user's GUEST_CSUM: DATA_VALID) and no capture (--pcap) shows the frames.
    l4_csum: bool = True
    # rx_fill() has the caller's C read into the peer's buffers and commits them in one C call
    # (it may still decline a call: the general path then).
    guest_fill: bool = False


NO_CAPS = LinkCaps()  # a link without a peer, or one without any of these

FillArgs = tuple[int, bool, bool, int]  # Link.c_fill_site(): last_avail, indirect, rearm, hint


@dataclass(frozen=True, slots=True)
class TxConsumer:
    """A protocol's C that takes some of the guest's frames before the dispatcher sees them
    (the TCP data plane): virtio's vr_tx_offer() calls `take(arg, frame, len, vnet_hdr,
    offloads)` per frame, then `end(arg)` while the frames are still valid (the addresses of
    C functions and of their argument); `begin()` runs before each batch and `after()` once
    the dispatcher had the rest."""

    take: int
    end: int
    arg: int
    begin: Callable[[], None]
    after: Callable[[], None]


class Link(abc.ABC):
    """Base class: keeps the frame handler and the pcap hook common to every link."""

    # What the peer takes (see LinkCaps): links with offloads set a new one as peers come
    # and go. An attribute, not a property: TCP reads it on every socket wake-up.
    caps: LinkCaps = NO_CAPS

    def __init__(self, on_frames: FrameHandler, pcap: PcapWriter | None = None) -> None:
        self.on_frames = on_frames
        self.pcap = pcap
        self._on_rx_ready: list[RxReadyCallback] = []

    # The callback list is an attribute of its own so that a link may replace it (vhost's
    # `self.on_rx_ready = []`) and a forwarding listener may expose its link's list instead.
    @property
    def on_rx_ready(self) -> list[RxReadyCallback]:
        return self._on_rx_ready

    @on_rx_ready.setter
    def on_rx_ready(self, callbacks: list[RxReadyCallback]) -> None:
        self._on_rx_ready = callbacks

    def add_rx_ready_callback(self, callback: RxReadyCallback) -> None:
        """Call `callback()` whenever receive buffers are available again after a shortage."""
        self.on_rx_ready.append(callback)

    def remove_rx_ready_callback(self, callback: RxReadyCallback) -> None:
        if callback in self.on_rx_ready:
            self.on_rx_ready.remove(callback)

    def set_tx_consumer(self, consumer: TxConsumer | None) -> None:
        """Offer the guest's frames to `consumer` first, where the link can (vhost-user);
        elsewhere every frame goes to the dispatcher, as with None."""
        return None

    def _rx_ready(self) -> None:
        """Buffers are back: tell every waiter (one waiter's bug must not starve the rest)."""
        for callback in list(self.on_rx_ready):
            try:
                callback()
            except Exception:
                log.exception("rx-ready callback failed")

    @property
    def buffers_link(self) -> Link:
        """The link whose buffers frames to the guest go into: itself, or for a listener
        forwarding to one link (ForwardingLink) that link, so that protocol code holding it
        makes no forwarding call per frame. Fixed for the link's lifetime."""
        return self

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

    def rx_scatter(self, count: int, frame_len: int, head: int = 0) -> list[list[memoryview]]:
        """Up to `count` frames' buffers, for frames of up to `frame_len` bytes that may be
        scattered over several buffers (vhost-user's mergeable RX buffers; one socket read
        then fills the guest's buffers directly instead of a bounce buffer).

        Each frame is a list of writable views, in frame order, totalling `frame_len` bytes
        (less only when the peer's buffers can't hold that much: fill at most the total); the
        first view is at least `head` bytes long (for headers written in place). All views of
        one call together are at most IOV_MAX, so one recvmsg_into() can cover them. Commit
        with `commit_scatter()` (lengths in frame bytes). This default hands out one
        `rx_buffers()` buffer per frame.
        """
        return [[buf[:frame_len]] for buf in self.rx_buffers(min(count, IOV_MAX))]

    def rx_fill(self, count: int, frame_len: int, off: int, room: int, filler: RxFiller,
                tso: Tso | None) -> tuple[int, int, int] | None:
        """rx_scatter(), the filler's read into the frames' bytes from `off` on (at most `room`
        bytes), its writer's headers and commit_scatter() in one C call, for a link whose
        buffers C code can fill faster than recvmsg_into() over rx_scatter()'s views: only
        when nothing but headers is written into the frames (no checksum over the payload;
        `caps.guest_fill` says so). `filler` is the reader and the frame writer (see
        virtio.ring.RxFiller): the reader fills the frames' payloads, the writer each
        frame's headers given its first buffer and payload size. Returns (bytes read,
        frames sent, the payload room the frames had in all): 0 bytes with frames laid out
        is the end of the data (nothing sent); (0, 0, 0) when there is no room; bytes read
        and none sent when the writer refused them. None: no such path now, use
        rx_scatter() (this default). The reader's failure comes up as OSError."""
        return None

    def c_fill_site(self) -> tuple[FillSite, FillArgs] | None:
        """For a caller whose own C makes rx_fill()'s call (the TCP data plane): where, as
        addresses (virtio.ring.FillSite), and the call's own arguments (last_avail, indirect,
        rearm, hint), when the one-call fill applies now; None (this default): rx_fill() or
        rx_scatter()."""
        return None

    def c_fill_finish(self, frame_len: int, read: int) -> tuple[int, int, int] | None:
        """After that call: the queue's and the link's side of it, and what rx_fill() would
        have returned (`read`: the call's return value)."""
        raise NotImplementedError

    def commit_scatter(self, lengths: Sequence[int], tso: Tso | None = None) -> None:
        """`commit()` for the frames of the last `rx_scatter()`: the first len(lengths) frames,
        each `lengths[i]` bytes written from the start of its first view onwards. `tso`
        (only where `caps.tso4`/`tso6` say the peer segments): the frames are TCP segments of one
        connection, those longer than one `tso.mss` to be sent as GSO frames."""
        self.commit(lengths)

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


class _Closable(Protocol):
    def close(self) -> None: ...


class ForwardingLink(Link):
    """A listener serving one peer at a time that is itself a Link: every Link call goes to
    the one link that serves each peer in turn (`self.link`), so the dispatcher keeps one
    object across reconnections (the protocols hold `.link` itself: `buffers_link`). When
    the peer leaves, `one_off` ends the daemon through `on_exit`.

    Subclasses set `link`, `_listener` (anything with close()), `one_off` and `on_exit`, and
    hand `_peer_gone` to their link as its disconnect callback.
    """

    link: Link
    _listener: _Closable
    one_off: bool
    on_exit: Callable[[], None]
    peer_name = "client"  # for the log line when one_off ends the daemon

    @property
    def buffers_link(self) -> Link:
        return self.link  # created with the listener, it serves every peer in turn

    @property
    def connected(self) -> bool:
        return self.link.connected

    @property
    def on_rx_ready(self) -> list[RxReadyCallback]:
        return self.link.on_rx_ready

    @on_rx_ready.setter
    def on_rx_ready(self, callbacks: list[RxReadyCallback]) -> None:
        self.link.on_rx_ready = callbacks

    @property
    def caps(self) -> LinkCaps:
        return self.link.caps

    @caps.setter
    def caps(self, caps: LinkCaps) -> None:  # (Link.caps is a plain attribute)
        self.link.caps = caps

    def rx_buffers(self, count: int) -> list[memoryview]:
        return self.link.rx_buffers(count)

    def commit(self, lengths: Sequence[int]) -> None:
        self.link.commit(lengths)

    def rx_scatter(self, count: int, frame_len: int, head: int = 0) -> list[list[memoryview]]:
        return self.link.rx_scatter(count, frame_len, head)

    def rx_fill(self, count: int, frame_len: int, off: int, room: int, filler: RxFiller,
                tso: Tso | None) -> tuple[int, int, int] | None:
        return self.link.rx_fill(count, frame_len, off, room, filler, tso)

    def c_fill_site(self) -> tuple[FillSite, FillArgs] | None:
        return self.link.c_fill_site()

    def c_fill_finish(self, frame_len: int, read: int) -> tuple[int, int, int] | None:
        return self.link.c_fill_finish(frame_len, read)

    def commit_scatter(self, lengths: Sequence[int], tso: Tso | None = None) -> None:
        self.link.commit_scatter(lengths, tso)

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        return self.link.send(frame)

    def flush(self) -> None:
        self.link.flush()

    def _peer_gone(self) -> None:
        if self.one_off:
            log.info("%s gone and --one-off given: exiting", self.peer_name)
            self.on_exit()

    def close(self) -> None:
        self.link.close()
        self._listener.close()
