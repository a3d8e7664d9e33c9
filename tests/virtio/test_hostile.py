"""Hostile front ends (issue 17): each attack must leave the back end's loop running, that
front end disconnected (or refused), and the next front end on the same loop served.

Real sockets, real memfds and eventfds, the real loop; the Python front end plays qemu."""

from __future__ import annotations

import fcntl
import os
import pathlib
import signal
import socket
import struct
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from vhostpasst.core.loop import Loop
from virtio import guard, net, virtqueue
from virtio import message as m
from virtio.backend import F_LOG_ALL, F_PROTOCOL_FEATURES, F_RING_EVENT_IDX, F_VERSION_1
from virtio.dirtylog import LOG_PAGE
from virtio.message import Request as R

from .frontend import DriverMemory, DriverRing
from .test_backend import Harness
from .test_migration import MigrationHarness

FEATURES = F_VERSION_1 | F_PROTOCOL_FEATURES | net.F_MRG_RXBUF
MIGRATION_FEATURES = FEATURES | F_RING_EVENT_IDX
REPO = pathlib.Path(__file__).resolve().parents[2]


def close_front_end(h: Harness) -> None:
    """Close one harness's connection and driver side, not the shared loop."""
    h.backend.close()
    h.fe.sock.close()
    h.rx.close()
    h.tx.close()
    h.dmem.close()


def served(loop: Loop) -> None:
    """A fresh front end on `loop` is brought up and its frame echoed back."""
    h = Harness(loop=loop)
    try:
        h.bring_up(FEATURES)
        h.rx.add([], [2048])
        h.rx.kick()
        h.tx.add([bytes(net.HDR_LEN) + b"hello"])
        h.tx.kick()
        h.fe.pump()
        assert h.alive()
        assert len(h.tx.get_used()) == 1
        [(head, length)] = h.rx.get_used()
        assert h.rx.written(head, length)[net.HDR_LEN:] == b"hello"
    finally:
        close_front_end(h)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness()
    yield harness
    close_front_end(harness)
    harness.loop.close()


# --- the loop's last resort ----------------------------------------------------------------

def test_loop_last_resort_closes_only_that_front_end(h: Harness,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception out of the back end's socket callback (a bug) reaches the loop's last
    resort: that connection is closed, the loop goes on, a fresh front end is served."""
    h.negotiate(FEATURES)

    def boom(msg: m.Message) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr(h.backend, "_dispatch", boom)
    h.fe.send(R.GET_FEATURES)
    h.loop.run_once(0)
    assert h.backend.closed and "internal error" in h.closed[0]
    assert h.fe.is_closed() and h.loop.callback_errors == 1
    served(h.loop)


def test_loop_last_resort_on_a_kick(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    h.bring_up(FEATURES)

    def boom() -> bool:
        raise RuntimeError("bug")

    monkeypatch.setattr(h.backend.queues[net.TX_QUEUE], "drain_kick", boom)
    h.tx.add([bytes(net.HDR_LEN) + b"x"])
    h.tx.kick()
    h.loop.run_once(0)
    assert h.backend.closed and h.fe.is_closed()
    served(h.loop)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- fds held by an unfinished message -------------------------------------------------------

def test_fds_a_byte_at_a_time_drop_the_connection(h: Harness) -> None:
    """A payload sent a byte at a time with 8 fds per byte: the second byte's fds are one
    more than a message may carry; all are closed and the connection dropped at once."""
    h.negotiate(FEATURES)
    before = _open_fds()
    r, w = os.pipe()
    try:
        h.fe.sock.send(m.HEADER.pack(R.GET_FEATURES, m.VERSION, 100))
        sent = 0
        for _ in range(100):  # bounded: the back end hangs up after the second byte
            try:
                m.send_message(h.fe.sock, b"x", [r] * m.MAX_FDS)
            except OSError:
                break
            sent += 1
            h.loop.run_once(0)
            if h.backend.closed:
                break
        assert h.backend.closed and sent == 2
        assert "fds" in h.closed[0]
        assert h.fe.is_closed()
    finally:
        os.close(r)
        os.close(w)
    assert _open_fds() <= before  # every fd we were sent is closed again
    served(h.loop)


# --- received fds are close-on-exec ----------------------------------------------------------

def test_received_fds_are_close_on_exec(h: Harness) -> None:
    kick = os.eventfd(0, 0)  # not close-on-exec on the sender's side
    try:
        h.bring_up(FEATURES)
        assert h.fe.ack(R.SET_VRING_KICK, m.encode_u64(net.TX_QUEUE), [kick]) == 0
        fd = h.backend.queues[net.TX_QUEUE].kick_fd
        assert fd is not None and fd != kick
        assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        call = h.backend.queues[net.TX_QUEUE].call_fd
        assert call is not None and fcntl.fcntl(call, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(kick)


def test_message_reader_fds_are_close_on_exec() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    r, w = os.pipe()
    os.set_inheritable(r, True)
    try:
        m.send_message(a, m.encode(R.SET_LOG_FD), [r])
        msg = m.MessageReader(b).read()
        assert msg is not None and len(msg.fds) == 1
        assert fcntl.fcntl(msg.fds[0], fcntl.F_GETFD) & fcntl.FD_CLOEXEC
        msg.close_fds()
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()


# --- a ring at a misaligned host address -----------------------------------------------------

@pytest.mark.parametrize("need_reply", [True, False], ids=["ack", "no-ack"])
def test_ring_in_a_region_at_an_odd_offset_is_refused(need_reply: bool) -> None:
    """A region mapped from an odd mmap_offset puts every ring at an odd host address: the
    ring is refused (a NAK, or without NEED_REPLY the connection closed), nothing raises."""
    h = Harness()
    try:
        h.dmem.close()
        h.rx.close()
        h.tx.close()
        h.dmem = DriverMemory((1 << 18,), mmap_offset=1)
        h.rx = DriverRing(h.dmem, 16)
        h.tx = DriverRing(h.dmem, 16)
        h.negotiate(FEATURES)
        assert h.fe.ack(R.SET_MEM_TABLE, m.encode_mem_table(h.dmem.table()),
                        h.dmem.fds()) == 0
        assert h.fe.ack(R.SET_VRING_NUM, m.encode_state(0, 16)) == 0
        payload = m.encode_vring_addr(h.rx.addr(0))
        if need_reply:
            assert h.fe.ack(R.SET_VRING_ADDR, payload) != 0
            assert h.alive()
        else:
            h.fe.request(R.SET_VRING_ADDR, payload)
            assert h.fe.is_closed() and "misaligned" in h.closed[0]
        served(h.loop)
    finally:
        close_front_end(h)
        h.loop.close()


def test_second_mem_table_at_an_odd_offset_under_live_rings(h: Harness) -> None:
    """A second SET_MEM_TABLE maps the live rings' memory at an odd offset: the rings are
    left unmapped (logged), a kick does nothing, closing raises nothing."""
    h.bring_up(FEATURES)
    odd = DriverMemory((1 << 18, 1 << 18), mmap_offset=1)
    try:
        assert h.fe.ack(R.SET_MEM_TABLE, m.encode_mem_table(odd.table()), odd.fds()) == 0
        assert not any(vq.mapped for vq in h.backend.queues)
        h.tx.kick()
        h.loop.run_once(0)
        assert h.alive()
        h.backend.close("test")
        assert h.fe.is_closed()
    finally:
        odd.close()
    served(h.loop)


# --- a memory file shrunk after it was mapped (SIGBUS) ---------------------------------------

def test_guest_memory_shrunk_after_mapping(h: Harness) -> None:
    """ftruncate(memfd, 0) after SET_MEM_TABLE, then a kick: our reads of the ring fault
    with SIGBUS; the guard maps zeros there, and the back end drops that front end."""
    h.bring_up(FEATURES)
    h.tx.add([bytes(net.HDR_LEN) + b"x"])
    os.ftruncate(h.dmem.regions[0].fd, 0)
    os.eventfd_write(h.tx.kick_fd, 1)  # (the driver's own kick() would read the lost ring)
    for _ in range(5):
        h.loop.run_once(0)
        if h.backend.closed:
            break
    vq = h.backend.queues[net.TX_QUEUE]
    assert h.backend.closed and "shrank" in h.closed[0], \
        (guard.events(), [r.guard.slot for r in h.backend.memory.regions], vq.ready, vq.broken,
         h.device.events[-3:])
    assert h.fe.is_closed()
    served(h.loop)


def test_guest_memory_shorter_than_the_region_is_refused(h: Harness) -> None:
    h.negotiate(FEATURES)
    os.ftruncate(h.dmem.regions[1].fd, 4096)
    assert h.fe.ack(R.SET_MEM_TABLE, m.encode_mem_table(h.dmem.table()), h.dmem.fds()) != 0
    assert h.alive() and len(h.backend.memory) == 0
    served(h.loop)


def test_dirty_log_shrunk_after_mapping() -> None:
    """The same with the dirty log's file: the next mark faults; that front end goes."""
    mh = MigrationHarness()
    try:
        mh.bring_up(MIGRATION_FEATURES)
        mh.rx.add([], [2048])
        mh.rx.kick()
        assert mh.set_log_base() == 0
        assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(MIGRATION_FEATURES | F_LOG_ALL)) == 0
        os.ftruncate(mh.log_fd, 0)
        mh.tx.add([bytes(net.HDR_LEN) + b"x" * 64])
        mh.tx.kick()
        mh.loop.run_once(0)
        assert mh.backend.closed and "dirty log" in mh.closed[0]
        served(mh.loop)
    finally:
        mh.close()


def test_sigbus_outside_guest_memory_still_kills(tmp_path: pathlib.Path) -> None:
    """The guard only covers registered guest mappings: a SIGBUS elsewhere in the process
    is the crash it always was (in a child process)."""
    code = textwrap.dedent("""
        import mmap, os
        from virtio import guard
        fd = os.memfd_create("g"); os.ftruncate(fd, 8192)
        guarded = mmap.mmap(fd, 8192)
        reg = guard.Registration(guarded)
        os.ftruncate(fd, 0)
        assert guarded[0] == 0 and reg.faults() == 1  # guarded: zeros, counted
        other = os.memfd_create("o"); os.ftruncate(other, 8192)
        mm = mmap.mmap(other, 8192)
        os.ftruncate(other, 0)
        print("before", flush=True)
        mm[0]
        print("survived", flush=True)
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == -signal.SIGBUS, proc.stderr
    assert "before" in proc.stdout and "survived" not in proc.stdout


# --- eventfds that would block the loop ------------------------------------------------------

def test_kick_fd_drained_by_the_front_end_does_not_block(h: Harness) -> None:
    """The front end makes its kick fd blocking again and reads the kick itself before we
    do: our read must not block (RWF_NOWAIT) and finds nothing to do."""
    h.bring_up(FEATURES)
    kick = h.tx.kick_fd
    os.set_blocking(kick, True)  # the file description is shared: ours is blocking too
    vq = h.backend.queues[net.TX_QUEUE]
    assert vq.kick_fd is not None and os.get_blocking(vq.kick_fd)
    assert vq.drain_kick() == 0  # nothing there: no wait
    h.backend._on_kick(vq)  # as if epoll had said it was readable
    assert h.alive()
    os.eventfd_write(kick, 1)
    assert vq.drain_kick() == 1
    served(h.loop)


def test_call_fd_at_its_maximum_counter(h: Harness) -> None:
    """A non-blocking call fd whose counter is full: the write fails with EAGAIN, which is
    a notification already pending; nothing blocks, the front end is still served."""
    h.bring_up(FEATURES)
    os.eventfd_write(h.tx.call_fd, 0xFFFFFFFFFFFFFFFE)
    h.tx.add([bytes(net.HDR_LEN) + b"x"])
    h.tx.kick()
    h.loop.run_once(0)
    assert h.alive() and len(h.tx.get_used()) == 1


def test_call_fd_made_blocking_at_its_maximum_is_cut_short(h: Harness) -> None:
    """The front end clears O_NONBLOCK on its call fd and fills the counter: our write
    blocks, the watchdog interrupts it (EINTR, within 100 ms) and the back end drops that
    front end; the loop goes on."""
    h.bring_up(FEATURES)
    os.set_blocking(h.tx.call_fd, True)
    os.eventfd_write(h.tx.call_fd, 0xFFFFFFFFFFFFFFFE)
    h.tx.add([bytes(net.HDR_LEN) + b"x"])
    h.tx.kick()
    h.loop.run_once(0)
    assert h.backend.closed and "blocked" in h.closed[0]
    served(h.loop)


def test_error_fd_made_blocking_at_its_maximum_is_cut_short(h: Harness) -> None:
    h.bring_up(FEATURES)
    err = os.eventfd(0, 0)
    try:
        assert h.fe.ack(R.SET_VRING_ERR, m.encode_u64(net.TX_QUEUE), [err]) == 0
        os.set_blocking(err, True)  # after we made it non-blocking
        os.eventfd_write(err, 0xFFFFFFFFFFFFFFFE)
        h.tx.write_desc(0, 0xDEAD0000, 64, 0, 0)  # outside guest memory: the queue breaks
        h.tx.publish(0)
        h.tx.kick()
        h.loop.run_once(0)
        assert h.backend.closed
    finally:
        os.close(err)
    served(h.loop)


# --- dirty logging from what was popped --------------------------------------------------------

class _CountingDesc:
    """virtqueue.DESC, counting the descriptor reads of the log's fallback walk."""

    def __init__(self, real: struct.Struct) -> None:
        self.real = real
        self.size = real.size
        self.reads = 0

    def unpack_from(self, buf: memoryview, offset: int = 0) -> tuple[int, ...]:
        self.reads += 1
        return self.real.unpack_from(buf, offset)


def _logging(mh: MigrationHarness) -> None:
    mh.bring_up(MIGRATION_FEATURES)
    assert mh.set_log_base() == 0
    assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(MIGRATION_FEATURES | F_LOG_ALL)) == 0
    mh.dirty()


def test_dirty_log_marks_what_was_popped_not_rewritten_descriptors(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The driver rewrites a popped chain into a 0-length self-loop elsewhere before we
    push it: the log is written from the buffers recorded at pop time, with no walk."""
    mh = MigrationHarness()
    try:
        _logging(mh)
        vq = mh.backend.queues[net.RX_QUEUE]
        heads = [mh.rx.add([], [64]) for _ in range(4)]
        counting = _CountingDesc(virtqueue.DESC)
        monkeypatch.setattr(virtqueue, "DESC", counting)
        chains = vq.pop_many(4)
        assert [c.head for c in chains] == heads
        elsewhere = mh.dmem.alloc(64)
        for head in heads:  # NEXT | WRITE, 0 bytes, next = itself
            mh.rx.write_desc(head, elsewhere, 0, 1 | 2, head)
        for c in chains:
            c.writable[0][:8] = b"written!"
            vq.push(c.head, 8)
        vq.flush()
        assert counting.reads == 0
        got = mh.dirty()
        for head in heads:
            gpa = mh.rx.buffers[head][0][0]
            assert gpa // LOG_PAGE in got
        assert mh.alive()
    finally:
        mh.close()


def test_dirty_log_walk_of_chains_popped_before_logging_is_bounded(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Chains popped before logging began have no record: their descriptors are walked
    again, within one ring's worth of descriptor reads per flush, self-loops or not."""
    mh = MigrationHarness()
    try:
        mh.bring_up(MIGRATION_FEATURES)
        vq = mh.backend.queues[net.RX_QUEUE]
        heads = [mh.rx.add([], [64]) for _ in range(8)]
        chains = vq.pop_many(8)
        assert mh.set_log_base() == 0
        assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(MIGRATION_FEATURES | F_LOG_ALL)) == 0
        for head in heads:
            mh.rx.write_desc(head, mh.rx.buffers[head][0][0], 0, 1 | 2, head)  # self-loops
        counting = _CountingDesc(virtqueue.DESC)
        monkeypatch.setattr(virtqueue, "DESC", counting)
        for c in chains:
            vq.push(c.head, 8)
        vq.flush()
        assert 0 < counting.reads <= vq.num
        assert mh.alive()
        served(mh.loop)
    finally:
        mh.close()
