"""virtio-net specifics (virtio 1.2, 5.1): the 12-byte header and mergeable RX buffers.

With VERSION_1 the header is always virtio_net_hdr_mrg_rxbuf (12 bytes, num_buffers included,
whether or not MRG_RXBUF is negotiated). On RX with MRG_RXBUF one frame may span several
descriptor chains; num_buffers in the first chain's header says how many.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from ._net import ffi, lib
from .backend import Device
from .ring import GATHER_ERROR, GATHER_GENERAL, Fill, RingError, RxFill, RxFiller
from .virtqueue import Chain, VirtQueue

F_CSUM = 1 << 0
F_GUEST_CSUM = 1 << 1
F_MTU = 1 << 3
F_MAC = 1 << 5
F_GUEST_TSO4 = 1 << 7  # the driver takes TCP/IPv4 frames bigger than its MTU (RX GSO)
F_GUEST_TSO6 = 1 << 8
F_GUEST_ECN = 1 << 9
F_HOST_TSO4 = 1 << 11  # the device takes them from the driver (TX GSO)
F_HOST_TSO6 = 1 << 12
F_HOST_ECN = 1 << 13  # ... with GSO_ECN set (CWR on the first segment only)
F_MRG_RXBUF = 1 << 15
F_STATUS = 1 << 16
# several RX/TX queue pairs; the driver picks how many through the control queue, which qemu
# serves itself (a vhost-user back end never sees it, nor offers CTRL_VQ)
F_MQ = 1 << 22

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP = 3
GSO_TCPV6 = 4
GSO_UDP_L4 = 5
GSO_ECN = 0x80
TCP_CSUM_OFFSET = 16  # of the checksum field in the TCP header (csum_offset)

HEADER = struct.Struct("<BBHHHHH")
HDR_LEN = HEADER.size  # 12
GSO_TYPE_OFFSET = 1
NUM_BUFFERS_OFFSET = 10

RX_QUEUE = 0  # even queue indices receive (device → driver), odd ones transmit
TX_QUEUE = 1  # queue pair n is RX 2n and TX 2n + 1


@dataclass(frozen=True, slots=True)
class NetHeader:
    flags: int = 0
    gso_type: int = GSO_NONE
    hdr_len: int = 0
    gso_size: int = 0
    csum_start: int = 0
    csum_offset: int = 0
    num_buffers: int = 0

    @classmethod
    def unpack(cls, buf: bytes | bytearray | memoryview) -> NetHeader:
        if len(buf) < HDR_LEN:
            raise ValueError("virtio-net header truncated")
        return cls(*HEADER.unpack_from(buf))

    def pack(self) -> bytes:
        return HEADER.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                           self.csum_start, self.csum_offset, self.num_buffers)

    def pack_into(self, buf: memoryview, offset: int = 0) -> None:
        HEADER.pack_into(buf, offset, self.flags, self.gso_type, self.hdr_len, self.gso_size,
                         self.csum_start, self.csum_offset, self.num_buffers)


def tx_frame(chain: Chain) -> tuple[NetHeader, list[memoryview]]:
    """Split a TX chain into its header and the frame's pieces (views, no copy)."""
    pieces: list[memoryview] = []
    need = HDR_LEN
    head = bytearray()
    for buf in chain.readable:
        if need:
            take = min(need, len(buf))
            head += buf[:take]
            need -= take
            buf = buf[take:]
        if len(buf):
            pieces.append(buf)
    if need:
        raise ValueError("TX chain shorter than the virtio-net header")
    return NetHeader.unpack(head), pieces


FRAME_MAX = 65535 + 14  # the longest frame: an IP packet of 64 KiB (GSO's too) + Ethernet
TX_BOUNCE = 64 * FRAME_MAX  # scattered guest frames copied per TX batch (~4 MiB)


# vr_tx_frames() frame kinds, out[4i] (cffi_build/virtio/net.c)
TX_GUEST = 0  # in one guest buffer: used where it is
TX_COPY = 1  # over several: copied to the bounce buffer
TX_SHORT = 2  # the chain holds no more than a header
TX_BIG = 3  # the frame is longer than allowed: dropped, never copied
TX_TAKEN = 4  # taken by the device's consumer (vr_tx_offer)

# vr_tx_gather() outcomes, res[0] (cffi_build/virtio/net.c)
TXG_DONE = 0  # as many chains as asked, or the ring ran dry (the kick re-armed)
TXG_ROOM = 1  # stopped for room (the bounce buffer, the records): the ring may hold more
TXG_GROW = 2  # the next chain has more buffers than the records hold: grow them
TXG_ERROR = 3  # a bad chain or avail index (the ring's status says which)


class TxGather:
    """Guest TX frames a batch at a time (tx_frames()): chains popped as records, each
    frame located (or, spread over several buffers, copied once to `bounce`) and the kick
    re-armed when the ring runs dry, in one C call (vr_tx_gather(), cffi_build/virtio/net.c),
    with no Chain or view per buffer. Frames are valid until the next call."""

    def __init__(self, max_chains: int, bounce_size: int = TX_BOUNCE) -> None:
        self.max_chains = max_chains
        self.bounce = bytearray(bounce_size)  # untouched pages cost nothing
        self._bounce_mv = memoryview(self.bounce)
        self._bounce_c = ffi.from_buffer("uint8_t[]", self.bounce)
        self._hdrs = ffi.new("uint8_t[]", HDR_LEN * max_chains)
        self._hdrs_mv = memoryview(ffi.buffer(self._hdrs))
        self._out = ffi.new("uint64_t[]", 4 * max_chains)
        self._out_mv = memoryview(ffi.buffer(self._out)).cast("Q")
        self._res = ffi.new("uint32_t[]", 1)
        self.full = False  # the last call stopped for room: the ring may hold more
        self.taken = 0  # frames the device's consumer took (tx_frames' `take`)
        self.taken_last = 0  # in the last call
        self.taken_bytes = 0  # and their bytes
        self.taken_gso = 0  # of them GSO frames, in all
        # longer frames are dropped: none is valid, and one the bounce can't hold would
        # otherwise stop the queue for good
        self.max_frame = min(FRAME_MAX, bounce_size)

    def tx_frames(self, vq: VirtQueue, count: int, take: int = 0, take_end: int = 0,
                  take_arg: int = 0, offloads: int = 0
                  ) -> tuple[list[int], list[memoryview | None], dict[int, NetHeader]]:
        """Up to `count` (<= max_chains) chains: their heads; per chain its frame (a view
        past the virtio-net header), or None when it holds no more than a header or a frame
        longer than `max_frame` (dropped: never copied); and the
        header of each frame whose header says GSO, by index. Fewer chains than `count`
        when the ring runs dry (the kick is re-armed) or the bounce buffer fills (the rest
        stay in the ring; `full` says so). A bad chain breaks the queue (VirtQueueError).
        `take`, `take_end`, `take_arg`: a device's C consumer (vr_tx_offer(), net.c) offered
        each frame first, told the negotiated `offloads`; the frames it takes are left out of
        the frames returned (their heads stay)."""
        self.taken_bytes = self.taken_last = 0
        ring = vq.ring_access()
        table = vq.memory.table
        limit = min(count, self.max_chains, ring.num)
        res = self._res
        while True:
            n = lib.vr_tx_gather(ring.ctx, vq.last_avail_idx, limit, vq.indirect, table.cdata,
                                 table.count, ring.used, ring.used_len, vq.rearms_on_empty,
                                 HDR_LEN, self.max_frame, self._hdrs, self._bounce_c,
                                 len(self.bounce), self._out, res)
            outcome = res[0]
            # the first chain is longer than the records hold: room for any chain, again
            if outcome != TXG_GROW or n or not ring.grow():
                break
        if n < 0:
            raise RingError("TX gather refused its arguments")
        if outcome == TXG_ERROR:
            raise vq.bad_records(n)
        vq.took_records(n, popped=True)  # (from the records: before they grow)
        # stopped for room, or at the ring's size short of `count`: the ring may hold more
        self.full = outcome == TXG_ROOM or n == limit < min(count, self.max_chains)
        if outcome == TXG_GROW and n:
            ring.grow()  # a later chain did not fit: the next call takes it
            self.full = True
        if not n:
            return [], [], {}
        if take:
            self.taken_last = lib.vr_tx_offer(take, take_end, take_arg, offloads, table.cdata,
                                              table.count, self._hdrs, HDR_LEN, self._bounce_c,
                                              len(self.bounce), self._out, n)
            self.taken += self.taken_last
        heads: list[int] = ring.chains_mv[:3 * n:3].tolist()
        frames: list[memoryview | None] = []
        gso: dict[int, NetHeader] = {}
        views = table.views
        hdrs = self._hdrs_mv
        bounce = self._bounce_mv
        out = self._out_mv[:4 * n].tolist()
        for i in range(n):
            kind, region, offset, length = out[4 * i:4 * i + 4]
            if kind == TX_GUEST:
                frame: memoryview | None = views[region][offset:offset + length]
            elif kind == TX_COPY:
                frame = bounce[offset:offset + length]
            elif kind == TX_TAKEN:
                self.taken_bytes += length
                if hdrs[HDR_LEN * i + 1]:  # gso_type
                    self.taken_gso += 1
                continue
            else:
                frame = None
            if frame is not None and hdrs[HDR_LEN * i + 1]:  # gso_type
                gso[len(frames)] = NetHeader.unpack(hdrs[HDR_LEN * i:HDR_LEN * (i + 1)])
            frames.append(frame)
        return heads, frames, gso


def rx_put(vq: VirtQueue, frame: bytes | bytearray | memoryview,
           header: NetHeader | None = None, mergeable: bool = True) -> bool:
    """Copy one frame, after a header, into the driver's RX buffers; False if there is no room.

    Pops chains until the header and frame fit (only one chain unless `mergeable`), pushes
    each with the bytes it got and sets num_buffers. On shortage the chains go back (rewind)
    and nothing is pushed. The caller flushes the queue once per batch. The frame is copied
    once, straight into guest memory (no intermediate header+frame buffer).
    """
    header = header or NetHeader(flags=HDR_F_DATA_VALID)
    total = HDR_LEN + len(frame)
    chain = vq.pop()
    if chain is None:
        return False
    writable = chain.writable
    if len(writable) == 1 and len(writable[0]) >= total:
        # one buffer holds it (every ACK, ARP or DHCP reply on Linux's buffers)
        buf = writable[0]
        HEADER.pack_into(buf, 0, header.flags, header.gso_type, header.hdr_len,
                         header.gso_size, header.csum_start, header.csum_offset, 1)
        buf[HDR_LEN:total] = frame
        vq.push(chain.head, total)
        return True
    chains: list[Chain] = [chain]
    room = chain.write_len
    while room < total:
        chain = vq.pop()
        if chain is None or (chains and not mergeable):
            if chain is not None:
                chains.append(chain)
            vq.rewind(len(chains))
            return False
        chains.append(chain)
        room += chain.write_len
    # packed directly: a NetHeader object per frame was a visible share of the RX cost
    head = HEADER.pack(header.flags, header.gso_type, header.hdr_len, header.gso_size,
                       header.csum_start, header.csum_offset, len(chains))
    sources = [memoryview(head), memoryview(frame)]
    si = so = 0  # source index and offset in it
    for chain in chains:
        written = 0
        for buf in chain.writable:
            bo = 0
            while bo < len(buf) and si < len(sources):
                src = sources[si]
                n = min(len(buf) - bo, len(src) - so)
                buf[bo:bo + n] = src[so:so + n]
                bo += n
                so += n
                written += n
                if so == len(src):
                    si += 1
                    so = 0
            if si == len(sources):
                break
        vq.push(chain.head, written)
    return True


def rx_pieces(chains: list[Chain], limit: int) -> list[memoryview]:
    """The writable buffers of `chains` past the virtio-net header, `limit` bytes in all (or
    what they hold): where a frame scattered over mergeable RX buffers is written in place."""
    out: list[memoryview] = []
    skip, left = HDR_LEN, limit
    for chain in chains:
        for buf in chain.writable:
            if skip:
                if len(buf) <= skip:  # a header-only descriptor (Linux's "big packets")
                    skip -= len(buf)
                    continue
                buf = buf[skip:]
                skip = 0
            if len(buf) >= left:
                if left:
                    out.append(buf[:left])
                return out
            out.append(buf)
            left -= len(buf)
    return out


def rx_push(vq: VirtQueue, chains: list[Chain], length: int, flags: int = 0,
            gso: tuple[int, int, int, int, int] | None = None) -> int:
    """A frame of `length` bytes was written in place over `chains` (as `rx_pieces()` laid it
    out): write its header (num_buffers: the chains it needed) and push those chains as used.
    `gso`: (gso_type, hdr_len, gso_size, csum_start, csum_offset) of a GSO frame (`flags`
    then NEEDS_CSUM). Returns how many it needed; the rest are the caller's (rewind or push
    them empty). The first chain must have room for the header."""
    total = HDR_LEN + length
    lens: list[int] = []
    for chain in chains:
        if total <= 0:
            break
        n = min(chain.write_len, total)
        lens.append(n)
        total -= n
    if total > 0:
        raise ValueError(f"frame of {length} bytes larger than its buffers")
    head = HEADER.pack(flags, *(gso or (GSO_NONE, 0, 0, 0, 0)), len(lens))
    done = 0
    for buf in chains[0].writable:  # the header may span descriptors (header-only first)
        n = min(len(buf), HDR_LEN - done)
        buf[:n] = head[done:done + n]
        done += n
        if done == HDR_LEN:
            break
    for chain, n in zip(chains, lens, strict=False):
        vq.push(chain.head, n)
    return len(lens)


class RxBatch:
    """Frames laid out in place over mergeable RX chains of one writable buffer each
    (`rx_frames()`): the chains' raw records, no Chain (nor a list entry) per buffer."""

    __slots__ = ("records", "chain_records", "views", "starts", "frames", "starved", "seen",
                 "count", "_q")

    def __init__(self, records: bytes, chain_records: bytes, views: list[memoryview],
                 starts: list[int], starved: bool, seen: int) -> None:
        self.records = records  # (region, offset, length) u64 per chain, as RingAccess.pop()
        self.chain_records = chain_records  # (head, readable, writable) u32 per chain
        self.views = views  # the guest memory regions (memory.table.views)
        self.starts = starts  # frame i holds chains starts[i]:starts[i + 1] (last: to the end)
        self.frames: list[list[memoryview]] = []  # per frame, views past the header
        self.starved = starved  # the ring ran dry before `count` frames (the kick re-armed)
        self.seen = seen  # chains popped before the rewind: all there were, when starved
        self.count = len(records) // 24  # chains the frames hold, in pop order
        self._q = memoryview(records).cast("Q")

    @classmethod
    def empty(cls) -> RxBatch:
        """No frames: the ring had too few chains (the kick is armed)."""
        return cls(b"", b"", [], [], True, 0)

    # per-chain lists, read from the records (for tests: the daemon reads the records)
    @property
    def heads(self) -> list[int]:
        return memoryview(self.chain_records).cast("I")[0::3].tolist()

    @property
    def regions(self) -> list[int]:
        return self._q[0::3].tolist()

    @property
    def offsets(self) -> list[int]:
        return self._q[1::3].tolist()

    @property
    def lens(self) -> list[int]:
        return self._q[2::3].tolist()

    def buf_len(self, k: int) -> int:
        return self._q[3 * k + 2]

    def buf(self, k: int) -> memoryview:
        """Chain k's whole buffer (a frame's header goes at the start of its first)."""
        q = self._q
        start = q[3 * k + 1]
        return self.views[q[3 * k]][start:start + q[3 * k + 2]]

    def frame_views(self, i: int, frame_len: int) -> list[memoryview]:
        """Frame i's bytes past its header, `frame_len` of them, as views of its buffers."""
        end = self.starts[i + 1] if i + 1 < len(self.starts) else self.count
        out: list[memoryview] = []
        left = HDR_LEN + frame_len
        for k in range(self.starts[i], end):
            if left <= 0:
                break
            buf = self.buf(k)
            out.append(buf[:left])
            left -= len(buf)
        out[0] = out[0][HDR_LEN:]
        return out


def pop_rx_frames(vq: VirtQueue, count: int, need: int, hdr: int, head: int, max_views: int,
                  hint: int) -> tuple[list[int], int, bool, bytes, bytes] | None:
    """Up to `count` mergeable RX frames of `need` bytes (a `hdr`-byte header included)
    over chains of one writable buffer each, popped and laid out in one C call
    (RingAccess.rx_gather()); see rx_frames() for the grouping. Returns (each frame's
    first chain, chains popped before those not needed went back, starved, the kept
    chains' buffer records and chain records), or None when the ring's shape is for the
    Chain-based path (nothing popped). A bad chain breaks the queue (VirtQueueError)."""
    ring = vq.ring_access()
    code, starts, kept, seen, starved, recs, chains = ring.rx_gather(
        vq.last_avail_idx, vq.indirect, vq.memory.table, vq.rearms_on_empty, count, need, hdr,
        head, max_views, hint)
    if code == GATHER_ERROR:
        raise vq.bad_records(seen)
    if code == GATHER_GENERAL:
        return None
    vq.took_records(kept)
    return starts, seen, starved, recs, chains


def fill_rx_frames(vq: VirtQueue, count: int, need: int, hdr: int, head: int, max_views: int,
                   hint: int, filler: RxFiller, room: int, plain: bytes, gso: bytes,
                   gso_from: int) -> tuple[int, RxFill]:
    """pop_rx_frames(), `filler`'s read into the frames (`room` payload bytes at most),
    their headers by its writer and their push, in one C call (RingAccess.rx_fill()):
    the frames are in the used ring when it returns (flush() publishes them). Returns
    (bytes read or -errno, what it did). Only Fill.OK with frames sent keeps chains;
    every other outcome gives back what was popped. A bad chain breaks the queue
    (VirtQueueError)."""
    ring = vq.ring_access()
    n, out, elems = ring.rx_fill(vq.last_avail_idx, vq.indirect, vq.memory.table,
                                 vq.rearms_on_empty, count, need, hdr, head, max_views, hint,
                                 filler, room, plain, gso, gso_from)
    return n, fill_taken(vq, out, elems)


def fill_taken(vq: VirtQueue, out: RxFill, elems: Any) -> RxFill:
    """The queue's side of a vr_rx_fill() (ours above, or a device's C through
    RingAccess.fill_site()): the chains it kept taken and pushed, those it did not need
    given back. A bad chain breaks the queue (VirtQueueError)."""
    if out.outcome == Fill.ERROR:
        raise vq.bad_records(out.popped)
    if out.outcome == Fill.OK and out.sent:
        vq.took_records(out.kept)
        vq.push_written(elems, out.pairs)
        vq.rewind(out.give_back)
    return out


def rx_frames(vq: VirtQueue, count: int, frame_len: int, head: int = 0,
              max_views: int = 1 << 30, hint: int = 0) -> RxBatch | None:
    """Up to `count` frames of `frame_len` bytes over chains of one writable buffer each,
    grouped exactly as VhostUserLink.rx_scatter()'s general path does with mergeable buffers
    (each frame takes the fewest chains that hold it), at most `max_views` views in all;
    popped and laid out in one C call (pop_rx_frames()) over the chains' raw
    records, and a view per buffer of each frame (`frames`). `hint`: the guest's buffer size
    seen last (how many chains to pop first). (fill_rx_frames() does the same
    without views, its caller's C reader filling the records.)

    The chains are popped as rx_layout() needs them: a frame takes its first chain, then
    ceil(missing / first's length) more at a time; a pop that finds the ring dry re-arms
    the kick with one store and looks again only if chains came. None, with nothing popped,
    when this is not that case: a chain of several buffers (or a readable one), a first
    frame whose header + `head` bytes don't fit its first buffer or that alone needs more
    than `max_views` views, or a ring smaller than one frame; the general path handles
    those. A later frame like that ends the batch before it (the next call starts there).
    Chains popped and not in a frame are given back."""
    got = pop_rx_frames(vq, count, HDR_LEN + frame_len, HDR_LEN, head, max_views, hint)
    if got is None:
        return None
    starts, seen, starved, recs, chains = got
    batch = RxBatch(recs, chains, vq.memory.table.views, starts, starved, seen)
    batch.frames = [batch.frame_views(k, frame_len) for k in range(len(starts))]
    return batch


class NetDevice(Device):
    """A virtio-net device: one RX/TX queue pair, mergeable RX buffers. A subclass that
    offers F_MQ sets num_queues to twice the queue pairs it takes."""

    features = F_MRG_RXBUF
    num_queues = 2

    def queue_num(self) -> int:
        return self.num_queues // 2  # qemu's vhost-user-net reads this as queue pairs
