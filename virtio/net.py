"""virtio-net specifics (virtio 1.2, 5.1): the 12-byte header and mergeable RX buffers.

With VERSION_1 the header is always virtio_net_hdr_mrg_rxbuf (12 bytes, num_buffers included,
whether or not MRG_RXBUF is negotiated). On RX with MRG_RXBUF one frame may span several
descriptor chains; num_buffers in the first chain's header says how many.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .backend import Device
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
NUM_BUFFERS_OFFSET = 10

RX_QUEUE = 0  # even queue indices receive (device → driver), odd ones transmit
TX_QUEUE = 1


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
    chains: list[Chain] = []
    room = 0
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


class NetDevice(Device):
    """A virtio-net device: one RX/TX queue pair, mergeable RX buffers."""

    features = F_MRG_RXBUF
    num_queues = 2

    def queue_num(self) -> int:
        return self.num_queues // 2  # qemu's vhost-user-net reads this as queue pairs
