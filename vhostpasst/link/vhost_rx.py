"""vhost-user, frames to the guest: the RX half of VhostUserLink (vhost.py), over the
guest's RX virtqueue (virtio.net: mergeable RX buffers, virtio-net headers).

RX (us -> guest): `rx_buffers(n)` pops RX chains and hands out the first writable buffer of
each, past the 12 bytes of header room, when it holds a whole frame of the guest's MTU (Linux
posts 1536-byte mergeable buffers: enough at MTU 1500, not at 65520). Otherwise it hands out
bounce buffers from a pool, and `commit()` copies each frame with `virtio.net.rx_put()` over as
many chains as it needs (mergeable RX). `commit()` writes the headers in place (DATA_VALID when
the guest negotiated GUEST_CSUM, num_buffers) and pushes used entries; chains handed out but not
committed go back to the ring (rewind). The loop's flush hook publishes the used index and
notifies the guest once per iteration.

When the guest has no RX buffer left, `rx_buffers()` returns fewer (or none) and the link
remembers it was starved; the guest's next RX kick (it posts buffers) calls every callback in
`on_rx_ready`, so data waiting in host sockets moves at once instead of on a timer. Frames
given to `send()` (ACKs, ARP, DHCP...) on a full ring wait for those buffers (HOLD_BYTES at
most, in order, ahead of later data) instead of being dropped; only a frame the whole ring
could never hold, or one past that budget, is dropped.

Frames come from protocol code four ways (the Link interface): rx_buffers()/commit() (one
buffer per frame, bounced when the guest's buffers are smaller), rx_scatter()/commit_scatter()
(frames over as many of the guest's mergeable buffers as they need, read in place), rx_fill()
(the caller's C reads and writes headers into the guest's buffers in one call: LinkCaps.
guest_fill) and send() (a frame copied in).
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Callable, Sequence

from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import Loop
from vhostpasst.core.pcap import PcapWriter
from vhostpasst.link.base import ETH_MAX_FRAME, IOV_MAX, FillArgs, FrameHandler, Link, Tso
from virtio import net
from virtio.backend import VhostUserBackend
from virtio.ring import Fill, FillSite, RingAccess, RxFill, RxFiller, rx_commit
from virtio.virtqueue import Chain, VirtQueue, VirtQueueError

log = logging.getLogger("vhostpasst.link.vhost")
# rx_fill()'s header for frames that are not GSO (it runs only with GUEST_CSUM)
_DATA_VALID_HDR = net.HEADER.pack(net.HDR_F_DATA_VALID, net.GSO_NONE, 0, 0, 0, 0, 0)
_ratelimited = RateLimitedLog(log)

BOUNCE_SLOTS = 64  # frames per rx_buffers() when the guest's buffers are too small
HOLD_BYTES = 256 * 1024  # send() frames kept while the guest's RX ring is full


def _room(chain: Chain) -> int:
    """Writable bytes of a chain; Linux's mergeable buffers are one descriptor each."""
    writable = chain.writable
    return len(writable[0]) if len(writable) == 1 else chain.write_len


class VhostRx(Link):
    """Frames to the guest over its RX queue (see the module docstring); VhostUserLink adds
    the front end, the features and the TX side."""

    def __init__(self, loop: Loop, on_frames: FrameHandler, pcap: PcapWriter | None,
                 frame_max: int, bounce_slots: int) -> None:
        super().__init__(on_frames, pcap)
        self._loop = loop
        self.on_rx_ready: list[Callable[[], None]] = []
        self.frame_max = frame_max  # Ethernet header + guest MTU: what a zero-copy buffer holds
        self.csum_offload = False  # GUEST_CSUM: frames to the guest need no L4 checksum
        self._mergeable = False
        self._rx_header = net.NetHeader()  # for rx_put(): DATA_VALID once GUEST_CSUM is acked
        self._starved = False
        self._handed: list[Chain] = []  # zero-copy chains of the last rx_buffers()
        self._frames: list[list[Chain]] = []  # chains per frame of the last rx_scatter()
        self._batch: net.RxBatch | None = None  # or its frames on the lean path
        self._rx_hint = 0  # the guest's RX buffer size seen last (how many chains to pop)
        # (frame_len, last_avail_idx, chains available) of an rx_scatter() that found too few
        # chains for one frame: the same ring can't do better until the guest posts more
        self._short: tuple[int, int, int] | None = None
        # c_fill_site()'s: the site of the ring and region table it was taken from, and the
        # queue of the call in progress
        self._fill_site: FillSite | None = None
        self._fill_ring: RingAccess | None = None
        self._fill_vq: VirtQueue | None = None
        # rx_fill()'s virtio-net headers (plain, GSO, GSO from) for the last Tso seen
        self._fill_tso: Tso | None = None
        self._fill_hdrs = (b"", b"", 0)
        self._bounced = 0  # bounce slots handed out after them
        self._bounce_buf = bytearray(bounce_slots * ETH_MAX_FRAME)  # untouched pages cost nothing
        self._bounce = memoryview(self._bounce_buf)
        self._bounce_slots = bounce_slots
        # send() while buffers are handed out, or while the guest's RX ring is full
        self._deferred: list[bytes] = []
        # counters, for logs and tests (tx: to the guest, as StreamLink)
        self.tx_frames = 0
        self.tx_dropped = 0
        self.tx_zero_copy = 0  # frames to the guest written in place (no bounce)
        self.tx_bounced = 0  # data frames read into a bounce buffer, then copied to the guest
        self.tx_scattered = 0  # of those, frames over several chains (mergeable, rx_scatter)
        self.tx_filled = 0  # of those, frames read and committed by rx_fill() in one C call
        self.tx_gso = 0  # GSO (TSO) frames to the guest

    # The front end's back end (vhost.py attaches and drops it): the queues are its.
    backend: VhostUserBackend | None = None

    def _queue(self, index: int) -> VirtQueue | None:
        """The queue `index` if the front end has it ready and enabled."""
        backend = self.backend
        if backend is None or backend.closed:
            return None
        vq = backend.queues[index]
        return vq if vq.ready and vq.enabled else None

    @property
    def connected(self) -> bool:
        # _queue() for both, spelled out: TCP asks this on every peek
        backend = self.backend
        if backend is None or backend.closed:
            return False
        rx, tx = backend.queues[net.RX_QUEUE], backend.queues[net.TX_QUEUE]
        return rx.ready and rx.enabled and tx.ready and tx.enabled

    @abc.abstractmethod
    def _broken(self, where: str, e: Exception) -> None:
        """The front end broke the ring rules: disconnect it (vhost.py)."""

    def _reset_rx(self) -> None:
        """No front end: nothing handed out or waiting, no features."""
        self._handed = []
        self._frames = []
        self._batch = None
        self._bounced = 0
        self._deferred.clear()
        self._starved = False
        self._short = None
        self._rx_features(0)

    def _rx_features(self, features: int) -> None:
        """The features the front end acked that RX follows."""
        self.csum_offload = bool(features & net.F_GUEST_CSUM)
        self._mergeable = bool(features & net.F_MRG_RXBUF)
        self._rx_header = self._header()  # rx_put() sets num_buffers itself

    def _header(self, num_buffers: int = 1) -> net.NetHeader:
        return net.NetHeader(flags=net.HDR_F_DATA_VALID if self.csum_offload else 0,
                             num_buffers=num_buffers)

    def _release(self, vq: VirtQueue | None = None) -> None:
        """Give back chains handed out by rx_buffers() / rx_scatter() and never committed,
        to `vq` if given (the RX queue as it stops: no longer `_queue()`'s)."""
        if not (self._handed or self._frames or self._batch is not None or self._bounced):
            return  # the usual case: every call that hands out chains commits them
        popped = len(self._handed) + sum(len(chains) for chains in self._frames)
        if self._batch is not None:
            popped += self._batch.count
        if popped:
            vq = vq or self._queue(net.RX_QUEUE)
            if vq is not None and not vq.broken:
                vq.rewind(popped)
        self._handed = []
        self._frames = []
        self._batch = None
        self._bounced = 0

    def _rx_queue(self, count: int) -> VirtQueue | None:
        """The RX queue for rx_buffers()/rx_scatter(): chains handed out before go back,
        and frames waiting to be sent go first; None if there is nothing to hand out."""
        self._release()
        vq = self._queue(net.RX_QUEUE)
        if vq is None or count <= 0:
            return None
        try:
            if self._deferred and not self._put_deferred(vq):
                return None
        except VirtQueueError as e:
            self._broken("RX queue", e)
            return None
        return vq

    def rx_buffers(self, count: int) -> list[memoryview]:
        vq = self._rx_queue(count)
        if vq is None:
            return []
        need = net.HDR_LEN + self.frame_max
        out: list[memoryview] = []
        too_small = False
        try:
            while len(out) < count:
                chain = vq.pop()
                if chain is None:
                    self._starved = True  # pop() re-armed the kick (EVENT_IDX)
                    break
                if not chain.writable or len(chain.writable[0]) < need:
                    vq.rewind(1)
                    too_small = True
                    break
                self._handed.append(chain)
                out.append(chain.writable[0][net.HDR_LEN:])
            if too_small:
                n = self._bounce_room(vq, count - len(out))
                out += [self._bounce[i * ETH_MAX_FRAME:(i + 1) * ETH_MAX_FRAME]
                        for i in range(n)]
                self._bounced = n
        except VirtQueueError as e:
            self._handed = []
            self._bounced = 0
            self._broken("RX queue", e)
            return []
        return out

    def rx_scatter(self, count: int, frame_len: int, head: int = 0) -> list[list[memoryview]]:
        """The guest's own RX chains, as many per frame as `frame_len` needs (mergeable RX:
        Linux posts 1.5-4 KiB buffers, a 64 KiB frame spans 16-17), so the caller's socket
        read lands in guest memory: one copy where rx_buffers() would bounce. Chains of one
        writable buffer (Linux's) go through net.rx_frames() (flat records, no Chain per
        buffer, committed by _commit_batch()); anything else through the Chain path below,
        with the same result."""
        vq = self._rx_queue(count)
        if vq is None:
            return []
        if self._mergeable:
            # Linux's buffers (one writable descriptor per chain): flat records, no Chains
            batch = self._lean_batch(vq, count, frame_len, head)
            if batch is not None:
                return batch.frames
            if not self.connected:
                return []
        need = net.HDR_LEN + frame_len
        out: list[list[memoryview]] = []
        frames: list[list[Chain]] = []
        views = 0
        try:
            while len(out) < count:
                chain = vq.pop()
                if chain is None:
                    self._starved = True  # pop() re-armed the kick (EVENT_IDX)
                    break
                first = chain.writable[0] if chain.writable else None
                if first is not None and len(first) >= need and len(first) >= net.HDR_LEN + head:
                    # the whole frame fits the first buffer (MTU 1500, or big buffers)
                    frames.append([chain])
                    out.append([first[net.HDR_LEN:need]])
                    views += 1
                    if views >= IOV_MAX:
                        break
                    continue
                chains = [chain]
                room = _room(chain)
                while room < need and self._mergeable:
                    # as many more as the frame needs if they are the size of the first
                    more = vq.pop_many(-(-(need - room) // max(_room(chains[0]), 1)))
                    if not more:
                        self._starved = True  # an empty pop re-armed the kick (EVENT_IDX)
                        break
                    chains += more
                    room += sum(_room(c) for c in more)
                if room < need and self._mergeable:
                    # The ring ran dry mid-frame: wait for more unless these chains are all
                    # the ring can ever hold (then a frame that holds less is all there is).
                    if out or vq.num > len(chains):
                        vq.rewind(len(chains))
                        break
                pieces = net.rx_pieces(chains, frame_len)
                if not chains or not pieces or len(pieces[0]) < head or \
                        views + len(pieces) > IOV_MAX:
                    vq.rewind(len(chains))
                    if not out and chains:
                        # headers would straddle buffers, or buffers too tiny for one read
                        # (never with Linux's >= 1518-byte buffers): bounce and copy instead
                        return [[b[:frame_len]] for b in self.rx_buffers(count)]
                    break
                frames.append(chains)
                out.append(pieces)
                views += len(pieces)
                if views >= IOV_MAX:
                    break
        except VirtQueueError as e:
            self._frames = []
            self._broken("RX queue", e)
            return []
        self._frames = frames
        return out

    def _short_ring(self, vq: VirtQueue, frame_len: int) -> bool:
        """The last try found too few chains for one frame this big and none came since (its
        empty pop asked for a kick at the next one): don't pop them all again. Socket events
        and guest ACKs call here between RX kicks."""
        short = self._short
        if short is not None and frame_len >= short[0] and \
                vq.last_avail_idx == short[1] and vq.available() == short[2]:
            self._starved = True
            return True
        return False

    def _gathered(self, vq: VirtQueue, frame_len: int, starved: bool, frames: int,
                  seen: int, first_len: int) -> None:
        """After a lean gather: remember a ring too short for one frame (_short_ring()), that
        the kick is re-armed, and the guest's buffer size (how many chains to pop next)."""
        self._short = None
        if starved:
            self._starved = True
            if not frames:
                self._short = (frame_len, vq.last_avail_idx, seen)
        if frames:
            self._rx_hint = first_len

    def _lean_batch(self, vq: VirtQueue, count: int, frame_len: int, head: int,
                    ) -> net.RxBatch | None:
        """net.rx_frames() for rx_scatter(), remembered for the commit; an empty
        batch when there is no room yet, None when the general path must do it (or the
        front end was just disconnected: then `connected` is False)."""
        try:
            if self._short_ring(vq, frame_len):
                return net.RxBatch.empty()
            batch = net.rx_frames(vq, count, frame_len, head, IOV_MAX, self._rx_hint)
        except VirtQueueError as e:
            self._broken("RX queue", e)
            return None
        if batch is None:
            return None
        self._gathered(vq, frame_len, batch.starved, len(batch.starts), batch.seen,
                       batch.buf_len(0) if batch.count else 0)
        self._batch = batch if batch.count else None
        return batch

    def rx_fill(self, count: int, frame_len: int, off: int, room: int, filler: RxFiller,
                tso: Tso | None) -> tuple[int, int, int] | None:
        """The lean path (mergeable buffers, GUEST_CSUM: only headers to write, no --pcap)
        with the caller's read, its writer's headers and the commit in one C call
        (net.fill_rx_frames()): the chains stay (region, offset, length) records and
        the filler's reader fills them straight, frame bytes `off` on, `room` bytes at
        most. A memoryview per guest buffer (17 per 64 KiB frame), and the Python between
        the steps, cost more than the steps. The frames are in the used ring when this
        returns; flush() tells the guest."""
        if not self._mergeable or not self.csum_offload or self.pcap is not None:
            return None
        vq = self._rx_queue(count)
        if vq is None:
            return 0, 0, 0
        if self._short_ring(vq, frame_len):
            return 0, 0, 0
        plain, gso, gso_from = self._fill_headers(tso)
        try:
            n, out = net.fill_rx_frames(vq, count, net.HDR_LEN + frame_len, net.HDR_LEN, off,
                                        IOV_MAX, self._rx_hint, filler, room, plain, gso,
                                        gso_from)
        except VirtQueueError as e:
            self._broken("RX queue", e)
            return 0, 0, 0
        return self._filled(vq, frame_len, n, out)

    def c_fill_site(self) -> tuple[FillSite, FillArgs] | None:
        """rx_fill()'s checks, then its ring's fill site and the call's own arguments; None
        when rx_fill() must decide (a ring found short, frames waiting, no queue...)."""
        if not self._mergeable or not self.csum_offload or self.pcap is not None or \
                self._short is not None:
            return None
        vq = self._rx_queue(1)
        if vq is None:
            return None
        ring = vq.ring_access()
        table = vq.memory.table
        site = self._fill_site
        if site is None or self._fill_ring is not ring or site.table is not table:
            site = self._fill_site = ring.fill_site(table)
            self._fill_ring = ring
        self._fill_vq = vq
        return site, (vq.last_avail_idx, vq.indirect, vq.rearms_on_empty, self._rx_hint)

    def c_fill_finish(self, frame_len: int, read: int) -> tuple[int, int, int] | None:
        vq = self._fill_vq
        assert vq is not None
        out, elems = vq.ring_access().fill_result()
        try:
            out = net.fill_taken(vq, out, elems)
        except VirtQueueError as e:
            self._broken("RX queue", e)
            return 0, 0, 0
        return self._filled(vq, frame_len, read, out)

    def _filled(self, vq: VirtQueue, frame_len: int, n: int,
                out: RxFill) -> tuple[int, int, int] | None:
        """rx_fill()'s outcome, whoever made the call (see rx_fill())."""
        outcome = out.outcome
        if outcome == Fill.GENERAL:
            return None
        self._gathered(vq, frame_len, bool(out.dry), out.laid, out.popped, out.buf_len)
        if outcome == Fill.OK:
            done = out.committed
            self.tx_frames += done
            self.tx_zero_copy += done
            self.tx_scattered += out.scattered
            self.tx_gso += out.gso
            self.tx_filled += done
            return n, out.sent, out.room
        if outcome == Fill.EMPTY:
            return 0, 0, 0
        if outcome == Fill.READ:
            raise OSError(-n, os.strerror(-n))
        if outcome == Fill.LAYOUT:  # our bug, not the guest's: the general path still works
            log.error("vhost-user RX: the one-call fill refused its reader, writer or the "
                      "frame records (%d frames): rx_scatter() instead", out.laid)
            return None
        _ratelimited.warning("vu-rx-fill", "vhost-user RX: %d frames read and not sent (%s)",
                             out.laid, "header writer refused them"
                             if outcome == Fill.WRITER else "frames too short for their lengths")
        return n, 0, out.room

    def _fill_headers(self, tso: Tso | None) -> tuple[bytes, bytes, int]:
        """rx_fill()'s virtio-net headers: DATA_VALID, or past gso_from bytes the GSO one
        (built once per Tso: a connection keeps its Tso while its MSS stays)."""
        if tso is None:
            return _DATA_VALID_HDR, _DATA_VALID_HDR, ETH_MAX_FRAME
        if tso is not self._fill_tso:
            gso = net.HEADER.pack(net.HDR_F_NEEDS_CSUM, *self._gso(tso), 0)
            self._fill_tso, self._fill_hdrs = tso, (_DATA_VALID_HDR, gso,
                                                    tso.hdr_len + tso.mss)
        return self._fill_hdrs

    def commit_scatter(self, lengths: Sequence[int], tso: Tso | None = None) -> None:
        self._commit(lengths, tso)

    @staticmethod
    def _gso(tso: Tso) -> tuple[int, int, int, int, int]:
        """A GSO frame's header fields (virtio 1.2, 5.1.6.4): gso_type, hdr_len, gso_size,
        csum_start, csum_offset; the flags are NEEDS_CSUM (the TCP checksum field holds the
        pseudo-header sum: _tcpsg wrote it)."""
        return (net.GSO_TCPV6 if tso.six else net.GSO_TCPV4, tso.hdr_len, tso.mss, tso.l4_off,
                net.TCP_CSUM_OFFSET)

    def _commit_scatter(self, vq: VirtQueue, frames: list[list[Chain]],
                        lengths: Sequence[int], tso: Tso | None) -> None:
        """Headers and used entries for frames written over rx_scatter() chains. Chains a
        frame didn't need (a short last segment) and frames not committed go back: rewound
        when nothing after them was used, else returned empty (the guest drops and reposts
        them, as Linux does with a short used buffer)."""
        popped = sum(len(chains) for chains in frames)
        if len(lengths) > len(frames):
            vq.rewind(popped)
            raise ValueError(f"commit of {len(lengths)} frames, {len(frames)} handed out")
        for chains, length in zip(frames, lengths, strict=False):
            room = sum(_room(chain) for chain in chains) - net.HDR_LEN
            if not 0 <= length <= min(room, ETH_MAX_FRAME):
                vq.rewind(popped)
                raise ValueError(f"bad frame length {length}")
        flags = net.HDR_F_DATA_VALID if self.csum_offload else 0
        spare: list[Chain] = []  # popped and unused, in pop order
        tail = 0  # how many of `spare` come after the last used chain
        hdr = self._header()
        # frames longer than one segment go as GSO frames, the others as before
        gso_from = tso.hdr_len + tso.mss if tso is not None else ETH_MAX_FRAME
        gso = self._gso(tso) if tso is not None else None
        try:
            for i, chains in enumerate(frames):
                length = lengths[i] if i < len(lengths) else 0
                buf = chains[0].writable[0] if length and chains[0].writable else None
                big = length > gso_from
                if buf is not None and len(buf) >= net.HDR_LEN + length:
                    used = 1  # all in the first buffer: the common case at MTU 1500
                    if big:
                        net.HEADER.pack_into(buf, 0, net.HDR_F_NEEDS_CSUM, *gso, 1)  # type: ignore[misc]
                    else:
                        hdr.pack_into(buf)
                    vq.push(chains[0].head, net.HDR_LEN + length)
                elif big:
                    used = net.rx_push(vq, chains, length, net.HDR_F_NEEDS_CSUM, gso)
                else:
                    used = net.rx_push(vq, chains, length, flags) if length else 0
                if used:
                    self.tx_gso += big
                    if self.pcap is not None:
                        self.pcap.write(b"".join(net.rx_pieces(chains, length)))
                    self.tx_frames += 1
                    self.tx_zero_copy += 1
                    if used > 1:
                        self.tx_scattered += 1
                    tail = 0
                spare += chains[used:]
                tail += len(chains) - used
            for chain in spare[:len(spare) - tail]:  # after the frames: theirs are consecutive
                vq.push(chain.head, 0)
            vq.rewind(tail)
        except VirtQueueError as e:
            self._broken("RX queue", e)

    def _commit_batch(self, vq: VirtQueue, batch: net.RxBatch, lengths: Sequence[int],
                      tso: Tso | None) -> None:
        """_commit_scatter() for frames of the lean path (net.rx_frames()): the same
        headers, used entries and rewinds, written in C (ring.rx_commit()) from the chains'
        records, and one push per commit."""
        popped = batch.count
        if len(lengths) > len(batch.starts) or lengths and \
                not 0 <= min(lengths) <= max(lengths) <= ETH_MAX_FRAME:
            vq.rewind(popped)
            raise ValueError(f"commit of frame lengths {list(lengths)[:8]}... over "
                             f"{len(batch.starts)} frames")
        flags = net.HDR_F_DATA_VALID if self.csum_offload else 0
        plain = net.HEADER.pack(flags, net.GSO_NONE, 0, 0, 0, 0, 0)
        if tso is not None:
            gso_from = tso.hdr_len + tso.mss
            gso = net.HEADER.pack(net.HDR_F_NEEDS_CSUM, *self._gso(tso), 0)
        else:
            gso_from, gso = ETH_MAX_FRAME, plain
        try:
            elems, pairs, tail, (done, scattered, big) = rx_commit(
                vq.memory.table, batch.records, batch.chain_records, batch.starts, lengths,
                plain, gso, gso_from, net.HDR_LEN)
        except ValueError:
            vq.rewind(popped)
            raise
        self.tx_frames += done
        self.tx_zero_copy += done
        self.tx_scattered += scattered
        self.tx_gso += big
        if self.pcap is not None:
            for i, length in enumerate(lengths):
                if length:
                    self.pcap.write(b"".join(batch.frame_views(i, length)))
        try:
            vq.push_written(elems, pairs)
            vq.rewind(tail)
        except VirtQueueError as e:
            self._broken("RX queue", e)

    def _bounce_room(self, vq: VirtQueue, want: int) -> int:
        """How many bounce slots to hand out: as many full-size frames as the available chains
        hold, judged by the next chain's size (guests post equal buffers). Handing out more
        would drop frames at commit() (a 64 KiB frame takes 17 of Linux's 4 KiB buffers)."""
        chains = vq.available()
        chain = vq.pop()
        if chain is None:
            return 0
        vq.rewind(1)
        per_frame = -(-(net.HDR_LEN + self.frame_max) // max(chain.write_len, 1))
        if not self._mergeable or per_frame > vq.num:
            # One chain per frame: without mergeable buffers rx_put() can use no more, and a
            # ring that can never hold a full frame is posted for small ones.
            per_frame = 1
        n = min(want, self._bounce_slots, chains // per_frame)
        if n == 0 and chains < vq.num:
            # Too little room for a full frame: wait for the guest to post more, and make
            # sure it kicks when it does (an empty pop() is not what happened here).
            self._starved = True
            if vq.kick_when_more():
                self._loop.call_later(0, self.rx_kicked)
        elif n == 0:
            n = 1  # the whole ring holds less than one full frame: hope this one is smaller
        return n

    def commit(self, lengths: Sequence[int]) -> None:
        self._commit(lengths, None)

    def _commit(self, lengths: Sequence[int], tso: Tso | None) -> None:
        handed, bounced, frames, batch = self._handed, self._bounced, self._frames, self._batch
        self._handed, self._bounced, self._frames, self._batch = [], 0, [], None
        vq = self._queue(net.RX_QUEUE)
        if vq is None:
            return
        if batch is not None:
            self._commit_batch(vq, batch, lengths, tso)
            return
        if frames:
            self._commit_scatter(vq, frames, lengths, tso)
            return
        if len(lengths) > len(handed) + bounced:
            vq.rewind(len(handed))
            raise ValueError(f"commit of {len(lengths)} buffers, "
                             f"{len(handed) + bounced} handed out")
        for length in lengths:
            if not 0 <= length <= ETH_MAX_FRAME:
                vq.rewind(len(handed))
                raise ValueError(f"bad frame length {length}")
        hdr = self._header()
        in_place = min(len(lengths), len(handed))
        # rx_scatter() fell back to these (tiny first buffers): GSO frames all the same
        gso_from = tso.hdr_len + tso.mss if tso is not None else ETH_MAX_FRAME
        gso_hdr = net.NetHeader(net.HDR_F_NEEDS_CSUM, *self._gso(tso), num_buffers=1) \
            if tso is not None else None  # rx_put() sets num_buffers itself
        try:
            for chain, length in zip(handed, lengths, strict=False):
                buf = chain.writable[0]
                if length:
                    if length > gso_from:
                        gso_hdr.pack_into(buf)  # type: ignore[union-attr]
                        self.tx_gso += 1
                    else:
                        hdr.pack_into(buf)
                    if self.pcap is not None:
                        self.pcap.write(buf[net.HDR_LEN:net.HDR_LEN + length])
                    vq.push(chain.head, net.HDR_LEN + length)
                    self.tx_frames += 1
                    self.tx_zero_copy += 1
                else:
                    # "Skip this one": not the last popped, so it can't be rewound; an empty
                    # used buffer, which the guest drops and reposts.
                    vq.push(chain.head, 0)
            vq.rewind(len(handed) - in_place)
            for i, length in enumerate(lengths[in_place:]):
                if length:
                    big = length > gso_from
                    if self._put(vq, self._bounce[i * ETH_MAX_FRAME:i * ETH_MAX_FRAME + length],
                                 gso_hdr if big else None):
                        self.tx_bounced += 1
                        self.tx_gso += big
        except VirtQueueError as e:
            self._broken("RX queue", e)

    def _put(self, vq: VirtQueue, frame: bytes | bytearray | memoryview,
             header: net.NetHeader | None = None) -> bool:
        """Copy one frame into the guest's RX chains (mergeable if negotiated)."""
        if not net.rx_put(vq, frame, header or self._rx_header, self._mergeable):
            self._starved = True
            self._dropped()
            return False
        self._sent(frame)
        return True

    def _put_deferred(self, vq: VirtQueue) -> bool:
        """Write frames queued by send(), in order; False if the ring filled. With mergeable
        buffers the ones that did not fit stay queued for the guest's next buffers (it is
        asked to kick), unless the ring holds every buffer it can and still has no room:
        such a frame can never fit and is dropped."""
        frames, self._deferred = self._deferred, []
        ok = True
        for i, frame in enumerate(frames):
            if net.rx_put(vq, frame, self._rx_header, self._mergeable):
                self._sent(frame)
                continue
            ok = False
            if self._mergeable and vq.available() < vq.num:
                self._deferred = frames[i:] + self._deferred
                self._wait_for_buffers(vq)
                return False
            self._dropped()
        return ok

    def _sent(self, frame: bytes | bytearray | memoryview) -> None:
        self.tx_frames += 1
        if self.pcap is not None:
            self.pcap.write(frame)

    def _dropped(self) -> None:
        self.tx_dropped += 1
        _ratelimited.debug("vu-rx-full", "guest RX ring full: frame dropped")

    def _wait_for_buffers(self, vq: VirtQueue) -> None:
        """Have the guest kick when it posts RX buffers (flush() then writes what waits)."""
        self._starved = True
        if vq.kick_when_more():
            self._loop.call_later(0, self.rx_kicked)  # some came meanwhile

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        """One frame (ARP, DHCP...) copied straight into the guest's RX chains."""
        vq = self._queue(net.RX_QUEUE)
        if vq is None:
            return False
        if len(frame) > ETH_MAX_FRAME:
            return False
        if self._handed or self._bounced or self._frames or self._batch is not None:
            # rx_buffers() chains are out: popping more now would make them impossible to
            # rewind. Written at the next commit()/flush().
            self._deferred.append(bytes(frame))
            return True
        try:
            if self._deferred:  # frames wait for buffers already: after them, in order
                self._put_deferred(vq)
            if not self._deferred and net.rx_put(vq, frame, self._rx_header, self._mergeable):
                self._sent(frame)
                return True
            if self._mergeable and vq.available() < vq.num and \
                    sum(map(len, self._deferred)) + len(frame) <= HOLD_BYTES:
                # The ring is full for now (a burst of TCP data took it): keep the frame
                # (an ACK, ARP, DHCP...) for the buffers the guest posts next.
                self._deferred.append(bytes(frame))
                self._wait_for_buffers(vq)
                return True
        except VirtQueueError as e:
            self._broken("RX queue", e)
            return False
        self._starved = True
        self._dropped()
        return False

    # --- the end of a loop iteration (the loop's flush hook) -----------------------------
    def flush(self) -> None:
        """Publish the frames put in the RX queue's used ring and call the guest, once."""
        vq = self._queue(net.RX_QUEUE)
        try:
            self._release()
            if vq is not None:
                if self._deferred:
                    self._put_deferred(vq)
                vq.flush()
        except VirtQueueError as e:
            self._broken("RX queue", e)
        if self.backend is not None:
            self.backend.check_guards()  # the guest memory faulted, a call write blocked
        if self.pcap is not None:
            self.pcap.flush()

    def rx_kicked(self) -> None:
        """The guest posted RX buffers: wake whoever found the ring empty."""
        if self._starved and self.connected:
            self._wake()

    def _wake(self) -> None:
        self._starved = False
        for callback in list(self.on_rx_ready):
            try:
                callback()
            except Exception:  # one waiter's bug must not starve the others
                log.exception("on_rx_ready callback failed")
