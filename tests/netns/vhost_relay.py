#!/usr/bin/env python3
"""Play qemu and a virtio-net driver at once: bridge a tap device to a vhost-user back end.

Run inside the guest network namespace, from the repository root (`ip netns exec GUEST python
-m tests.netns.vhost_relay --socket PATH --tap tap0`). The namespace's kernel is then the
guest's TCP/IP stack and the frames go over the vhost-user rings, as with a qemu guest, but
without qemu:

- the front end (tests/virtio/frontend.py) connects, negotiates VERSION_1, MRG_RXBUF,
  EVENT_IDX, CSUM and GUEST_CSUM (and with --tso HOST_TSO4/6, HOST_ECN, GUEST_TSO4/6), shares
  one memfd of "guest RAM" and sets up RX and TX rings with kick and call eventfds;
- TX: frames read from the tap land straight in TX buffers in guest memory, header included
  (the tap is opened with IFF_VNET_HDR and a 12-byte header, the size of
  virtio_net_hdr_mrg_rxbuf, and TUN_F_CSUM, so the kernel hands out partially checksummed
  frames exactly as a virtio guest with CSUM would; with --tso also TUN_F_TSO4/TSO6/TSO_ECN,
  so the kernel hands out TCP frames of up to 64 KiB whatever the MTU, their GSO fields in the
  header, as a virtio guest with HOST_TSO does: the tap's vnet header is virtio_net_hdr); a
  batch is published with one avail index store and at most one kick (EVENT_IDX decides);
- RX: every RX buffer is posted at start; used entries (several per frame with mergeable
  buffers) are written to the tap with one writev, header first (DATA_VALID goes through to
  the kernel, and GSO frames with their GSO fields: the kernel takes them whole, as a guest
  with GUEST_TSO does), and the buffers are posted again, one avail store and kick per batch.

Ring indices are read and written with struct on an mmap of the memfd; the fences come from
the cffi ring helpers (virtio._ring), because the back end is another process on another CPU.

With `--migrate-to PATH`, SIGUSR1 migrates the "guest" as qemu does: the rings stop on the
first back end (GET_VRING_BASE), its device state is saved (SET_DEVICE_STATE_FD SAVE, read to
EOF, CHECK_DEVICE_STATE), the connection closes (qemu's source quits), and the back end at
PATH gets the same memory, the state (LOAD, CHECK) and the rings from the saved bases; the
status then says `migrated=1` and `state_bytes`.

State goes to `--status-file` as `key=value` lines, in the format of tests/netns/relay.py (`state`,
`connections`, `pid`, frame counters `to_tap` / `to_guest`, of those the GSO frames `gso_to_tap`
/ `gso_to_guest`, and the notification counters), so the sandbox's wait_relay() works on it.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import mmap
import os
import select
import signal
import socket
import struct
import sys
import time

from virtio._ring import ffi, lib  # type: ignore[import-not-found]

from tests.virtio.frontend import DriverMemory, DriverRing, Frontend
from virtio import message as m
from virtio import net
from virtio.backend import (
    F_PROTOCOL_FEATURES,
    F_RING_EVENT_IDX,
    F_VERSION_1,
)
from virtio.message import Request as R
from virtio.virtqueue import DESC_F_WRITE, need_event

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04
TUN_F_TSO_ECN = 0x08
TSO_FEATURES = (net.F_HOST_TSO4 | net.F_HOST_TSO6 | net.F_HOST_ECN | net.F_GUEST_TSO4
                | net.F_GUEST_TSO6)
GSO_TYPE_OFFSET = 1  # of gso_type in virtio_net_hdr

HDR_LEN = net.HDR_LEN  # 12
TX_SLOT = HDR_LEN + 65536 + 16  # a whole frame of the largest MTU, after the header
FULL_RX = HDR_LEN + 14 + 65520  # what the back end needs to write a 65520-MTU frame in place
U16 = struct.Struct("<H")
TCP_CSUM_OFFSET = 16


def data_valid_to_partial(buf: memoryview, length: int) -> None:
    """A guest's virtio-net driver takes DATA_VALID as "checksum verified" (Linux:
    CHECKSUM_UNNECESSARY), so a back end with GUEST_CSUM may leave the TCP checksum out (passt
    does, vhostpasst does for frames over several buffers). A tap ignores DATA_VALID and
    verifies; its nearest equivalent is NEEDS_CSUM over the checksum field (CHECKSUM_PARTIAL,
    not verified on local delivery), so that is what such frames get on their way to the tap.
    Only TCP segments whose checksum field is 0 (left out): computed checksums are still
    verified by the kernel (and a computed 0 is valid either way); IPv4 unfragmented or IPv6
    without extension headers."""
    if buf[0] != net.HDR_F_DATA_VALID or length < HDR_LEN + 14 + 20 + 20:  # IPv4 + TCP
        return
    f = buf[HDR_LEN:length]
    if f[12:14] == b"\x08\x00" and not int.from_bytes(f[20:22], "big") & 0x3FFF:
        l4, proto = 14 + (f[14] & 15) * 4, f[23]
    elif f[12:14] == b"\x86\xdd":
        l4, proto = 14 + 40, f[20]
    else:
        return
    csum = l4 + TCP_CSUM_OFFSET
    if proto == 6 and csum + 2 <= len(f) and f[csum:csum + 2] == b"\0\0":
        net.HEADER.pack_into(buf, 0, net.HDR_F_NEEDS_CSUM, net.GSO_NONE, csum + 2, 0, l4,
                             TCP_CSUM_OFFSET, U16.unpack_from(buf, net.NUM_BUFFERS_OFFSET)[0])
U32 = struct.Struct("<I")
USED_ELEM = struct.Struct("<II")
FAR = 0x8000  # an event index half the index space away: "don't notify me"
_scratch = ffi.new("uint8_t[8]")


def fence() -> None:
    """A full memory barrier (the helper stores into scratch memory, then fences)."""
    lib.vr_used_flags_set(_scratch, 8, 0)


class Ring:
    """The driver side of one split ring, one fixed buffer per descriptor (head == slot)."""

    def __init__(self, mem: DriverMemory, mm: mmap.mmap, num: int, slot: int,
                 writable: bool) -> None:
        self.dr = DriverRing(mem, num, event_idx=True)  # ring areas, kick and call eventfds
        self.num = num
        self.slot = slot
        base = mem.regions[0].desc.gpa
        self.mm = mm
        self.view = memoryview(mm)
        # The indices the back end reads or writes concurrently go through a 'H' view: one
        # aligned 2-byte load/store each. struct's "<H" moves the two bytes one at a time, and
        # a torn index (0x12ff -> 0x1300 read as 0x1200) made both sides see 65000 entries.
        self.u16 = self.view.cast("H")
        self.desc = self.dr.desc - base
        self.avail = self.dr.avail - base
        self.used = self.dr.used - base
        self.used_event = self.avail + 4 + 2 * num
        self.avail_event = self.used + 4 + 8 * num
        assert self.avail % 2 == 0 and self.used % 4 == 0
        gpa = mem.alloc(slot * num, 64)
        flags = DESC_F_WRITE if writable else 0
        self.bufs: list[memoryview] = []
        for i in range(num):
            struct.pack_into("<QIHH", mm, self.desc + 16 * i, gpa + i * slot, slot, flags, 0)
            self.bufs.append(self.view[gpa - base + i * slot:gpa - base + (i + 1) * slot])
        self.avail_idx = 0
        self.kicked_at = 0
        self.last_used = 0
        self.kicks = 0

    def put(self, head: int, length: int | None = None) -> None:
        """Make `head` available (not yet visible: publish() does that)."""
        if length is not None:
            U32.pack_into(self.mm, self.desc + 16 * head + 8, length)
        U16.pack_into(self.mm, self.avail + 4 + 2 * (self.avail_idx % self.num), head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def publish(self) -> None:
        """One avail index store for the batch, then a kick if the device asked for one."""
        if self.avail_idx == self.kicked_at:
            return
        fence()  # entries and descriptors before the index
        self.u16[(self.avail + 2) // 2] = self.avail_idx
        fence()  # the index before reading avail_event (else a kick can be missed)
        event = self.u16[self.avail_event // 2]
        old, self.kicked_at = self.kicked_at, self.avail_idx
        if need_event(event, self.avail_idx, old):
            os.eventfd_write(self.dr.kick_fd, 1)
            self.kicks += 1

    def used_idx(self) -> int:
        idx = self.u16[(self.used + 2) // 2]
        fence()  # the index before the entries
        return int(idx)

    def pending(self) -> int:
        return (self.used_idx() - self.last_used) & 0xFFFF

    def take(self) -> tuple[int, int]:
        head, length = USED_ELEM.unpack_from(self.mm, self.used + 4 + 8 * (self.last_used
                                                                            % self.num))
        self.last_used = (self.last_used + 1) & 0xFFFF
        return head, length

    def want_call(self, soon: bool) -> None:
        """EVENT_IDX: a call at the next used entry, or none for a long while."""
        self.u16[self.used_event // 2] = (self.last_used if soon
                                          else (self.last_used + FAR) & 0xFFFF)
        fence()  # before the caller re-reads used idx


class VhostRelay:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tap = self._open_tap(args.tap)
        self.sock: socket.socket | None = None
        self.fe: Frontend | None = None
        self.connections = 0
        self.state = "connecting"
        self.stopping = False
        self.to_tap = 0
        self.to_guest = 0
        self.gso_to_tap = 0  # frames from the back end that the tap's kernel segments
        self.gso_to_guest = 0  # frames the tap's kernel did not segment (TSO): 64 KiB
        self.tap_errors = 0
        self.idle_work = 0  # timeouts that found work: a missed notification would show here
        q, rxb = args.queue_size, args.rx_buf_size
        self.mem = DriverMemory((self._mem_size(q, rxb),))
        self.mm = mmap.mmap(self.mem.regions[0].fd, self.mem.regions[0].desc.size)
        self.rx = Ring(self.mem, self.mm, q, rxb, writable=True)
        self.tx = Ring(self.mem, self.mm, q, TX_SLOT, writable=False)
        for i in range(q):  # the first TX_HDR bytes of each TX slot are rewritten by reads
            self.tx.bufs[i][:HDR_LEN] = bytes(HDR_LEN)
        self.tx_free = list(range(q))
        self.migrate_due = False
        self.migrated = 0
        self.state_bytes = 0

    @staticmethod
    def _mem_size(q: int, rxb: int) -> int:
        need = q * (rxb + TX_SLOT) + 2 * (16 * q + 8 * q + 64) + (1 << 16)
        return (need + (1 << 21) - 1) & ~((1 << 21) - 1)

    def _open_tap(self, name: str) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", HDR_LEN))
        # CSUM: the guest kernel leaves L4 checksums to the "device"; vhostpasst takes
        # partial checksums (it sends payloads on, not frames). Off with --no-csum.
        # TSO (needs CSUM): the kernel sends TCP frames of up to 64 KiB, the "device"
        # segments them (vhostpasst: the host socket does); as HOST_TSO* on virtio-net.
        offload = 0 if self.args.no_csum else TUN_F_CSUM
        if self.args.tso:
            offload |= TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN
        fcntl.ioctl(fd, TUNSETOFFLOAD, offload)
        return fd

    def log(self, msg: str) -> None:
        if self.args.verbose:
            print(f"vhost-relay: {msg}", file=sys.stderr, flush=True)

    def write_status(self) -> None:
        if not self.args.status_file:
            return
        tmp = self.args.status_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"state={self.state}\nconnections={self.connections}\npid={os.getpid()}\n"
                    f"to_tap={self.to_tap}\nto_guest={self.to_guest}\n"
                    f"gso_to_tap={self.gso_to_tap}\ngso_to_guest={self.gso_to_guest}\n"
                    f"tx_kicks={self.tx.kicks}\nrx_kicks={self.rx.kicks}\n"
                    f"tap_errors={self.tap_errors}\nidle_work={self.idle_work}\n"
                    f"migrated={self.migrated}\nstate_bytes={self.state_bytes}\n"
                    f"cpu={sum(os.times()[:2]):.3f}\n")
        os.replace(tmp, self.args.status_file)

    # --- vhost-user set-up -----------------------------------------------------------------

    def connect(self, deadline: float, path: str | None = None, state: bytes | None = None,
                bases: tuple[int, int] = (0, 0)) -> bool:
        """Connect to the back end at `path` (--socket) and start the rings; with `state`, as
        a migration's destination: the state loaded before the rings start at `bases`."""
        delay = 0.02
        while not self.stopping:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(path or self.args.socket)
                break
            except OSError as e:
                s.close()
                if time.monotonic() + delay > deadline:
                    self.log(f"connect {self.args.socket}: {e}; giving up")
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
        else:
            return False
        self.sock = s
        fe = Frontend(s, lambda: select.select([s], [], [], 0.1))
        self.fe = fe
        features = (F_VERSION_1 | F_PROTOCOL_FEATURES | F_RING_EVENT_IDX | net.F_MRG_RXBUF
                    | (0 if self.args.no_csum else net.F_CSUM | net.F_GUEST_CSUM)
                    | (TSO_FEATURES if self.args.tso else 0))
        offered = fe.get_u64(R.GET_FEATURES)
        if features & ~offered:
            raise RuntimeError(f"back end lacks features {features & ~offered:#x}")
        fe.request(R.SET_OWNER)
        pf = fe.get_u64(R.GET_PROTOCOL_FEATURES)
        fe.request(R.SET_PROTOCOL_FEATURES, m.encode_u64(pf))  # REPLY_ACK: ack() needs it
        self._ack(R.SET_FEATURES, m.encode_u64(features))
        self._ack(R.SET_MEM_TABLE, m.encode_mem_table(self.mem.table()), self.mem.fds())
        if state is not None:
            self._load(state)
        fe.setup_queue(net.RX_QUEUE, self.rx.dr, bases[0])
        fe.setup_queue(net.TX_QUEUE, self.tx.dr, bases[1])
        if state is None:  # every RX buffer to the device (after a migration: posted already)
            for i in range(self.rx.num):
                self.rx.put(i)
        # "call me" on both rings before enabling them
        self.rx.want_call(True)
        self.tx.want_call(False)
        fence()
        self.rx.u16[(self.rx.avail + 2) // 2] = self.rx.avail_idx
        for q in (net.RX_QUEUE, net.TX_QUEUE):
            self._ack(R.SET_VRING_ENABLE, m.encode_state(q, 1))
        os.eventfd_write(self.rx.dr.kick_fd, 1)  # the buffers are there
        os.eventfd_write(self.tx.dr.kick_fd, 1)  # (frames the last back end left, if any)
        self.rx.kicked_at = self.rx.avail_idx
        self.connections += 1
        self.state = "connected"
        self.write_status()
        self.log(f"connected, features {features:#x}")
        return True

    def _load(self, state: bytes) -> None:
        assert self.fe is not None
        r, w = os.pipe()
        try:
            reply = self.fe.request(R.SET_DEVICE_STATE_FD, m.DEVICE_STATE.pack(1, 0), [r])
        finally:
            os.close(r)
        assert reply is not None and reply.u64() == 0x100, "LOAD refused"
        with os.fdopen(w, "wb") as pipe:  # the back end reads as we write (its own loop)
            pipe.write(state)
        if self.fe.get_u64(R.CHECK_DEVICE_STATE) != 0:
            raise RuntimeError("the destination refused the device state")

    def _save(self) -> tuple[bytes, tuple[int, int]]:
        """Stop the rings and take the device state, as qemu's source does."""
        assert self.fe is not None
        bases = []
        for q in (net.RX_QUEUE, net.TX_QUEUE):
            reply = self.fe.request(R.GET_VRING_BASE, m.encode_state(q, 0))
            assert reply is not None, "no reply to GET_VRING_BASE"
            bases.append(reply.state()[1])
        r, w = os.pipe()
        try:
            reply = self.fe.request(R.SET_DEVICE_STATE_FD, m.DEVICE_STATE.pack(0, 0), [w])
        finally:
            os.close(w)
        assert reply is not None and reply.u64() == 0x100, "SAVE refused"
        chunks = []
        deadline = time.monotonic() + 20
        with os.fdopen(r, "rb") as pipe:
            while time.monotonic() < deadline:
                if not select.select([pipe], [], [], 1)[0]:
                    continue
                chunk = pipe.read1(1 << 20)
                if not chunk:
                    break
                chunks.append(chunk)
            else:
                raise RuntimeError("the source's device state did not end in time")
        if self.fe.get_u64(R.CHECK_DEVICE_STATE) != 0:
            raise RuntimeError("the source failed its device state")
        return b"".join(chunks), (bases[0], bases[1])

    def migrate(self) -> None:
        assert self.sock is not None
        state, bases = self._save()
        self.guest_to_tap()  # what the source wrote before its rings stopped
        self.sock.close()
        self.state_bytes = len(state)
        self.log(f"saved {len(state)} bytes of device state, ring bases {bases}")
        if not self.connect(time.monotonic() + 10, self.args.migrate_to, state, bases):
            raise RuntimeError("cannot connect to the destination")
        self.migrated = 1
        self.write_status()

    def _ack(self, request: int, payload: bytes, fds: list[int] | None = None) -> None:
        assert self.fe is not None
        value = self.fe.ack(request, payload, fds or [])
        if value != 0:
            raise RuntimeError(f"back end refused request {request} ({value})")

    # --- data path -------------------------------------------------------------------------

    def tap_to_guest(self) -> bool:
        """Tap frames into TX buffers; True if the tap may hold more (ring full or budget)."""
        self.reclaim_tx()
        tx, tap, bufs = self.tx, self.tap, self.tx.bufs
        more = False
        for _ in range(self.args.batch):
            if not self.tx_free:
                more = True
                break
            slot = self.tx_free.pop()
            try:
                n = os.readv(tap, [bufs[slot]])
            except BlockingIOError:
                self.tx_free.append(slot)
                break
            except OSError as e:
                self.tx_free.append(slot)
                if e.errno == errno.EINTR:
                    continue
                raise
            tx.put(slot, n)
            self.to_guest += 1
            if bufs[slot][GSO_TYPE_OFFSET]:
                self.gso_to_guest += 1
        else:
            more = True
        tx.publish()
        if not self.tx_free:
            tx.want_call(True)  # we need buffers back: tell us when they are
            self.reclaim_tx()
        return more and bool(self.tx_free)

    def reclaim_tx(self) -> None:
        tx = self.tx
        for _ in range(tx.pending()):
            head, _ = tx.take()
            self.tx_free.append(head)
        if self.tx_free:
            tx.want_call(False)

    def guest_to_tap(self) -> None:
        rx, tap, bufs = self.rx, self.tap, self.rx.bufs
        for _ in range(4):  # re-check after re-arming, bounded
            count = rx.pending()
            while count:
                head, length = rx.take()
                count -= 1
                (nbuf,) = U16.unpack_from(bufs[head], net.NUM_BUFFERS_OFFSET)
                data_valid_to_partial(bufs[head], length)
                if bufs[head][GSO_TYPE_OFFSET]:
                    self.gso_to_tap += 1
                iov = [bufs[head][:length]]
                heads = [head]
                for _ in range(min(max(nbuf, 1) - 1, count)):
                    h, ln = rx.take()
                    count -= 1
                    iov.append(bufs[h][:ln])
                    heads.append(h)
                try:
                    os.writev(tap, iov)
                    self.to_tap += 1
                except OSError as e:  # the kernel refused the frame (a runt...): so do we
                    self.tap_errors += 1
                    self.log(f"tap write ({sum(len(v) for v in iov)} bytes): {e}")
                for h in heads:
                    rx.put(h)
            rx.publish()
            rx.want_call(True)
            if not rx.pending():
                return

    def run(self) -> int:
        self.write_status()
        try:
            ok = self.connect(time.monotonic() + self.args.connect_timeout)
        except (RuntimeError, AssertionError, OSError) as e:
            self.log(f"set-up failed: {e!r}")
            ok = False
        if not ok:
            self.state = "exited"
            self.write_status()
            return 1
        assert self.sock is not None
        ep = select.epoll()
        ep.register(self.tap, select.EPOLLIN)
        ep.register(self.rx.dr.call_fd, select.EPOLLIN)
        ep.register(self.tx.dr.call_fd, select.EPOLLIN)
        ep.register(self.sock.fileno(), select.EPOLLIN)
        tap_on = True
        last_status = 0.0
        more = False
        while not self.stopping:
            if self.migrate_due:
                self.migrate_due = False
                ep.unregister(self.sock.fileno())
                try:
                    self.migrate()
                except (RuntimeError, AssertionError, OSError) as e:
                    self.log(f"migration failed: {e!r}")
                    break
                ep.register(self.sock.fileno(), select.EPOLLIN)
            events = ep.poll(0 if more else 0.1)
            fds = {fd for fd, _ in events}
            if self.sock.fileno() in fds:
                try:
                    data = self.sock.recv(4096, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    data = b"?"
                except OSError:
                    data = b""
                if not data:
                    self.log("back end closed the connection")
                    break
            for fd in (self.rx.dr.call_fd, self.tx.dr.call_fd):
                if fd in fds:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
            if not events and self.rx.pending():  # (TX used entries come back uncalled)
                self.idle_work += 1
            self.guest_to_tap()
            if tap_on or self.tx_free:
                more = self.tap_to_guest()
            else:
                self.reclaim_tx()
            want_tap = bool(self.tx_free)  # no TX buffer: leave frames in the tap's queue
            if want_tap != tap_on:
                ep.modify(self.tap, select.EPOLLIN if want_tap else 0)
                tap_on = want_tap
            now = time.monotonic()
            if now - last_status > 0.2:
                self.write_status()
                last_status = now
        self.sock.close()
        self.state = "exited"
        self.write_status()
        return 0

    def stop(self, *_: object) -> None:
        self.stopping = True

    def migrate_soon(self, *_: object) -> None:
        self.migrate_due = bool(self.args.migrate_to)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, help="vhost-user socket of the back end")
    p.add_argument("--tap", default="tap0", help="tap interface (in this network namespace)")
    p.add_argument("--status-file", help="where to report state and counters")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--queue-size", type=int, default=256, help="ring size (qemu's default)")
    p.add_argument("--rx-buf-size", type=int, default=FULL_RX,
                   help=f"bytes per RX buffer (default {FULL_RX}: a whole 65520-MTU frame, "
                        "written in place; Linux posts 1.5-4 KiB mergeable buffers)")
    p.add_argument("--batch", type=int, default=64, help="tap frames per TX publish")
    p.add_argument("--no-csum", action="store_true",
                   help="no checksum offload (CSUM/GUEST_CSUM, TUN_F_CSUM)")
    p.add_argument("--tso", action="store_true",
                   help="TCP segmentation offload both ways (TUN_F_TSO4/6, HOST_TSO4/6 and "
                        "GUEST_TSO4/6)")
    p.add_argument("--migrate-to", help="on SIGUSR1, migrate to the back end at this socket")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.tso and args.no_csum:
        p.error("--tso needs checksum offload (no --no-csum)")
    if args.queue_size & (args.queue_size - 1) or not 1 <= args.queue_size <= 32768:
        p.error("--queue-size: a power of two up to 32768")
    relay = VhostRelay(args)
    signal.signal(signal.SIGTERM, relay.stop)
    signal.signal(signal.SIGINT, relay.stop)
    signal.signal(signal.SIGUSR1, relay.migrate_soon)
    return relay.run()


if __name__ == "__main__":
    sys.exit(main())
