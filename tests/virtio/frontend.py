"""A vhost-user FRONT END in Python, for tests: what qemu does, minus the guest.

- DriverMemory: guest RAM as memfds (one per region), with guest-physical and front-end
  virtual addresses, a bump allocator, and the fds to pass with SET_MEM_TABLE / ADD_MEM_REG.
- DriverRing: the driver side of a split ring in that memory (descriptor table, avail ring
  writer, used ring reader, kick decision with or without EVENT_IDX), plus raw writers for
  hostile descriptors.
- Frontend: speaks the vhost-user protocol over one end of a socketpair (SCM_RIGHTS for memory,
  kick and call eventfds) and pumps the back end's loop until replies arrive.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Sequence

from vhostpasst._tcpsg import ffi as _sg_ffi
from vhostpasst._tcpsg import lib as _sg_lib

from virtio import message as m
from virtio.ring import RxFiller
from virtio.virtqueue import DESC, DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, need_event

GPA_BASE = 0x100000
UVA_BASE = 0x7F0000000000
PAGE = 4096


class DriverRegion:
    def __init__(self, gpa: int, uaddr: int, size: int, mmap_offset: int = 0) -> None:
        self.fd = os.memfd_create("guest-ram")
        os.ftruncate(self.fd, size + mmap_offset)
        self.desc = m.RegionDesc(gpa, size, uaddr, mmap_offset)
        self.mmap_offset = mmap_offset

    def close(self) -> None:
        os.close(self.fd)


class DriverMemory:
    """Guest RAM: regions back to back in guest-physical space, at unrelated user addresses."""

    def __init__(self, sizes: Sequence[int] = (1 << 20,), mmap_offset: int = 0) -> None:
        self.regions: list[DriverRegion] = []
        gpa = GPA_BASE
        for i, size in enumerate(sizes):
            self.regions.append(DriverRegion(gpa, UVA_BASE + i * (1 << 32), size, mmap_offset))
            gpa += size
        self._next = GPA_BASE

    def _find(self, gpa: int, length: int) -> tuple[DriverRegion, int]:
        for r in self.regions:
            if r.desc.gpa <= gpa and gpa + length <= r.desc.gpa + r.desc.size:
                return r, r.mmap_offset + gpa - r.desc.gpa
        raise ValueError(f"driver: {gpa:#x}+{length} not in one region")

    def write(self, gpa: int, data: bytes) -> None:
        region, off = self._find(gpa, len(data))
        os.pwrite(region.fd, data, off)

    def read(self, gpa: int, length: int) -> bytes:
        region, off = self._find(gpa, length)
        return os.pread(region.fd, length, off)

    def uva(self, gpa: int) -> int:
        region, _ = self._find(gpa, 0)
        return region.desc.uaddr + gpa - region.desc.gpa

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = (self._next + align - 1) // align * align
        for r in self.regions:  # do not straddle a region end
            end = r.desc.gpa + r.desc.size
            if r.desc.gpa <= gpa < end < gpa + size:
                gpa = end
        self._find(gpa, size)
        self._next = gpa + size
        return gpa

    def table(self) -> list[m.RegionDesc]:
        return [r.desc for r in self.regions]

    def fds(self) -> list[int]:
        return [r.fd for r in self.regions]

    def close(self) -> None:
        for r in self.regions:
            r.close()


class DriverRing:
    """The driver side of one split ring."""

    def __init__(self, mem: DriverMemory, num: int, event_idx: bool = False) -> None:
        self.mem = mem
        self.num = num
        self.event_idx = event_idx
        self.desc = mem.alloc(16 * num, 16)
        self.avail = mem.alloc(6 + 2 * num, 2)
        self.used = mem.alloc(6 + 8 * num, 4)
        self.avail_idx = 0
        self.last_used = 0
        self.kicked_at = 0  # avail idx at the last kick decision
        self.rearm = True  # get_used() re-arms used_event, as a NAPI driver does
        self.free = list(range(num))
        self.kick_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.buffers: dict[int, list[tuple[int, int, bool]]] = {}  # head -> [(gpa, len, write)]
        self.ids: dict[int, list[int]] = {}  # head -> descriptor ids to free when used

    def addr(self, index: int) -> m.VringAddr:
        return m.VringAddr(index, 0, self.mem.uva(self.desc), self.mem.uva(self.used),
                           self.mem.uva(self.avail), 0)

    # raw writers (hostile tests use these directly)
    def write_desc(self, i: int, addr: int, length: int, flags: int, nxt: int,
                   table: int | None = None) -> None:
        base = self.desc if table is None else table
        self.mem.write(base + 16 * i, DESC.pack(addr, length, flags, nxt))

    def publish(self, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.num), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    # the normal driver
    def add(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (),
            indirect: bool = False) -> int:
        bufs: list[tuple[int, int, bool]] = []
        for data in out:
            gpa = self.mem.alloc(max(len(data), 1))
            self.mem.write(gpa, data)
            bufs.append((gpa, len(data), False))
        for size in in_sizes:
            bufs.append((self.mem.alloc(size), size, True))
        if indirect:
            head = self.free.pop(0)
            table = self.mem.alloc(16 * len(bufs), 16)
            for i, (gpa, length, write) in enumerate(bufs):
                flags = (DESC_F_WRITE if write else 0) | (DESC_F_NEXT if i + 1 < len(bufs) else 0)
                self.write_desc(i, gpa, length, flags, i + 1, table=table)
            self.write_desc(head, table, 16 * len(bufs), DESC_F_INDIRECT, 0)
            ids = [head]
        else:
            ids = [self.free.pop(0) for _ in bufs]
            head = ids[0]
            for i, (gpa, length, write) in enumerate(bufs):
                last = i + 1 == len(bufs)
                flags = (DESC_F_WRITE if write else 0) | (0 if last else DESC_F_NEXT)
                self.write_desc(ids[i], gpa, length, flags, 0 if last else ids[i + 1])
        self.buffers[head] = bufs
        self.ids[head] = ids
        self.publish(head)
        return head

    def kick(self) -> bool:
        """Kick if the device asked for it (always without EVENT_IDX unless NO_NOTIFY)."""
        old, new = self.kicked_at, self.avail_idx
        self.kicked_at = new
        if self.event_idx:
            event = struct.unpack("<H", self.mem.read(self.used + 4 + 8 * self.num, 2))[0]
            if not need_event(event, new, old):
                return False
        elif struct.unpack("<H", self.mem.read(self.used, 2))[0] & 1:
            return False
        os.eventfd_write(self.kick_fd, 1)
        return True

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used + 2, 2))[0])

    def get_used(self) -> list[tuple[int, int]]:
        out = []
        while self.last_used != self.used_idx():
            off = self.used + 4 + 8 * (self.last_used % self.num)
            head, length = struct.unpack("<II", self.mem.read(off, 8))
            out.append((head, length))
            self.last_used = (self.last_used + 1) & 0xFFFF
            self.free.extend(self.ids.pop(head, []))
        if self.event_idx and self.rearm:
            self.set_used_event(self.last_used)  # "call me for the next one" (Linux's enable_cb)
        return out

    def written(self, head: int, length: int) -> bytes:
        """The bytes the device wrote into a used chain's writable buffers."""
        out = b""
        for gpa, size, write in self.buffers.get(head, []):
            if write and len(out) < length:
                out += self.mem.read(gpa, min(size, length - len(out)))
        return out

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.num, struct.pack("<H", value & 0xFFFF))

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write(self.avail, struct.pack("<H", 1 if on else 0))

    def calls(self) -> int:
        """How many times the device signalled the call eventfd since the last look (0/1+)."""
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.kick_fd)
        os.close(self.call_fd)


class Frontend:
    """The front end's half of the control socket. `pump` runs the back end (same thread)."""

    def __init__(self, sock: socket.socket, pump: Callable[[], None]) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.pump = pump
        self._reader = m.MessageReader(sock)

    def send(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
             flags: int = m.VERSION) -> None:
        m.send_message(self.sock, m.encode(request, payload, flags), fds)

    def recv(self, tries: int = 20) -> m.Message | None:
        """The back end's next message, pumping its loop; None if it sent nothing."""
        for _ in range(tries):
            try:
                msg = self._reader.read()
            except m.ConnectionClosed:
                return None
            if msg is not None:
                return msg
            self.pump()
        return None

    def request(self, request: int, payload: bytes = b"", fds: Sequence[int] = (),
                need_reply: bool = False) -> m.Message | None:
        flags = m.VERSION | (m.FLAG_NEED_REPLY if need_reply else 0)
        self.send(request, payload, fds, flags)
        if request in m.REPLY_REQUESTS or need_reply:
            return self.recv()
        self.pump()
        return None

    def get_u64(self, request: int) -> int:
        reply = self.request(request)
        assert reply is not None, f"no reply to {request}"
        assert reply.request == request and reply.flags == m.VERSION | m.FLAG_REPLY
        return reply.u64()

    def ack(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int:
        """Send with NEED_REPLY; return the ack value (0 = success)."""
        reply = self.request(request, payload, fds, need_reply=True)
        assert reply is not None, f"no ack to {request}"
        assert reply.request == request
        return reply.u64()

    def is_closed(self) -> bool:
        self.pump()
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        except OSError:
            return True
        return data == b""

    # the qemu bring-up sequence for one queue
    def setup_queue(self, index: int, ring: DriverRing, base: int = 0) -> None:
        assert self.ack(m.Request.SET_VRING_NUM, m.encode_state(index, ring.num)) == 0
        assert self.ack(m.Request.SET_VRING_BASE, m.encode_state(index, base)) == 0
        assert self.ack(m.Request.SET_VRING_ADDR, m.encode_vring_addr(ring.addr(index))) == 0
        assert self.ack(m.Request.SET_VRING_CALL, m.encode_u64(index), [ring.call_fd]) == 0
        assert self.ack(m.Request.SET_VRING_KICK, m.encode_u64(index), [ring.kick_fd]) == 0


def frame_sizes(n: int, caps: list[int]) -> list[int]:
    """The payload bytes each frame holds after a read of n bytes into frames with room
    `caps` (in order; frames past the data get none): what vr_rx_fill() hands its writer."""
    sizes: list[int] = []
    left = n
    for cap in caps:
        if left <= 0:
            break
        sizes.append(min(cap, left))
        left -= sizes[-1]
    return sizes


class SocketReader:
    """A vr_frame_reader for the ring's one-call fill and read_frames(): vhostpasst's TCP
    reader (cffi_build/vhostpasst/tcp_vu.c's vp_tcp_read, recvmsg(fd, flags) into the
    frames), the C the daemon gives the ring library. Keep the object while the ring may
    call it."""

    def __init__(self, fd: int, flags: int) -> None:
        self._arg = _sg_ffi.new("struct vp_tcp_read *", {"fd": fd, "flags": flags})
        self.reader = int(_sg_ffi.cast("uintptr_t", _sg_ffi.addressof(_sg_lib, "vp_tcp_read")))
        self.reader_arg = int(_sg_ffi.cast("uintptr_t", self._arg))

    def filler(self, writer: int, writer_arg: int = 0) -> RxFiller:
        return RxFiller(self.reader, self.reader_arg, writer, writer_arg)
