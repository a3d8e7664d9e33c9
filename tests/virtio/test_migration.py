"""Live migration support in the back end: VHOST_F_LOG_ALL with a shared dirty log
(LOG_SHMFD). While the front end asks for it, every page the device writes (the buffers of
used chains, as far as it wrote them, and the used rings) is marked in the log; pages it only
read are not; turning logging on and off does not disturb running rings."""

from __future__ import annotations

import mmap
import os

import pytest

from virtio import message as m
from virtio import net
from virtio.backend import F_LOG_ALL, F_PROTOCOL_FEATURES, F_RING_EVENT_IDX, F_VERSION_1
from virtio.dirtylog import LOG_PAGE, DirtyLog
from virtio.message import ProtocolFeature as PF
from virtio.message import Request as R
from virtio.virtqueue import VRING_F_LOG

from .frontend import GPA_BASE, DriverRing
from .test_backend import Harness

FEATURES = F_VERSION_1 | F_PROTOCOL_FEATURES | net.F_MRG_RXBUF | F_RING_EVENT_IDX


class MigrationHarness(Harness):
    """The test back end (an echo device) with the front end's dirty log."""

    def __init__(self) -> None:
        super().__init__()
        end = max(r.desc.gpa + r.desc.size for r in self.dmem.regions)
        self.log_size = (end // LOG_PAGE + 7) // 8
        self.log_fd = os.memfd_create("dirty-log")
        os.ftruncate(self.log_fd, self.log_size)
        self.log = mmap.mmap(self.log_fd, self.log_size)

    def set_log_base(self, size: int | None = None) -> int:
        return self.fe.ack(R.SET_LOG_BASE, m.LOG.pack(size or self.log_size, 0), [self.log_fd])

    def log_used_rings(self) -> None:
        """What qemu does when migration starts: the rings' used areas are logged too."""
        for index, ring in ((0, self.rx), (1, self.tx)):
            addr = ring.addr(index)
            addr = m.VringAddr(addr.index, VRING_F_LOG, addr.desc, addr.used, addr.avail,
                               ring.used)
            assert self.fe.ack(R.SET_VRING_ADDR, m.encode_vring_addr(addr)) == 0

    def dirty(self) -> set[int]:
        """The pages marked, as guest-physical page numbers; the log is cleared (as qemu
        does at each pass)."""
        pages = {byte * 8 + bit for byte, value in enumerate(self.log[:]) if value
                 for bit in range(8) if value >> bit & 1}
        self.log[:] = bytes(self.log_size)
        return pages

    def echo(self, frame: bytes) -> tuple[int, int]:
        """One frame out on TX, back on RX; returns the RX chain's (head, length)."""
        self.tx.add([bytes(net.HDR_LEN) + frame])
        self.tx.kick()
        self.fe.pump()
        assert len(self.tx.get_used()) == 1
        used = self.rx.get_used()
        assert len(used) == 1
        return used[0]

    def close(self) -> None:
        super().close()
        self.log.close()
        os.close(self.log_fd)


@pytest.fixture
def mh():
    harness = MigrationHarness()
    yield harness
    harness.close()


def pages(gpa: int, length: int) -> set[int]:
    return set(range(gpa // LOG_PAGE, (gpa + length - 1) // LOG_PAGE + 1))


def page_buffer(ring: DriverRing, size: int) -> int:
    """An RX buffer of `size` bytes starting on a page of its own."""
    mem = ring.mem
    mem.alloc(LOG_PAGE - mem._next % LOG_PAGE or LOG_PAGE, 1)  # pad to a page boundary
    return ring.add([], [size])


def test_log_all_and_log_shmfd_offered(mh):
    assert mh.fe.get_u64(R.GET_FEATURES) & F_LOG_ALL
    assert mh.fe.get_u64(R.GET_PROTOCOL_FEATURES) & 1 << PF.LOG_SHMFD


def test_written_buffers_and_used_rings_are_marked(mh):
    mh.bring_up(FEATURES)
    heads = [page_buffer(mh.rx, 3 * LOG_PAGE) for _ in range(2)]
    mh.rx.kick()
    mh.fe.pump()
    assert mh.set_log_base() == 0
    mh.log_used_rings()
    assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(FEATURES | F_LOG_ALL)) == 0
    mh.dirty()

    frame = b"\x5a" * (LOG_PAGE + 100)  # the header and frame reach into a second page
    head, length = mh.echo(frame)
    assert head == heads[0] and length == net.HDR_LEN + len(frame)
    gpa = mh.rx.buffers[head][0][0]
    want = pages(gpa, length) | pages(mh.rx.used, 6 + 8 * mh.rx.num) \
        | pages(mh.tx.used, 6 + 8 * mh.tx.num)
    got = mh.dirty()
    assert got == want
    assert not pages(gpa + 2 * LOG_PAGE, LOG_PAGE) & got  # the chain's unwritten page
    assert not pages(mh.rx.buffers[heads[1]][0][0], LOG_PAGE) & got  # a chain not used
    tx_buffer = next(iter(mh.tx.buffers.values()))[0][0]
    assert tx_buffer // LOG_PAGE not in got  # only read


def test_indirect_chains_are_marked(mh):
    mh.bring_up(FEATURES | 1 << 28)  # INDIRECT_DESC
    mh.rx.mem.alloc(LOG_PAGE - mh.rx.mem._next % LOG_PAGE, 1)
    head = mh.rx.add([], [LOG_PAGE, LOG_PAGE], indirect=True)
    mh.rx.kick()
    mh.fe.pump()
    assert mh.set_log_base() == 0
    assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(FEATURES | 1 << 28 | F_LOG_ALL)) == 0
    mh.dirty()
    assert mh.echo(b"\x01" * (LOG_PAGE + 8))[0] == head
    first, second = (gpa for gpa, _, _ in mh.rx.buffers[head])
    got = mh.dirty()
    assert pages(first, LOG_PAGE) | pages(second, 20) <= got  # 12-byte header + 4104 bytes


def test_nothing_is_marked_without_log_all(mh):
    mh.bring_up(FEATURES)
    page_buffer(mh.rx, LOG_PAGE)
    mh.rx.kick()
    assert mh.set_log_base() == 0
    mh.log_used_rings()
    mh.dirty()
    mh.echo(b"\x02" * 64)
    assert mh.dirty() == set()


def test_logging_toggles_while_the_rings_run(mh):
    mh.bring_up(FEATURES)
    for _ in range(6):
        page_buffer(mh.rx, LOG_PAGE)
    mh.rx.kick()
    assert mh.set_log_base() == 0
    for on in (True, False, True, False):
        assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(FEATURES | (F_LOG_ALL if on else 0))) == 0
        mh.log_used_rings()  # qemu re-sends the ring addresses: no remap, no lost state
        mh.dirty()
        head, _ = mh.echo(b"\x03" * 100)
        assert bool(mh.dirty()) == on
        assert mh.rx.written(head, net.HDR_LEN + 100)[net.HDR_LEN:] == b"\x03" * 100
    assert mh.alive()


def test_the_log_says_how_many_writes_were_marked(mh, caplog):
    """qemu's migration source stops without turning logging off: the count is said when the
    log goes (here, the front end closing), and when logging is turned off."""
    caplog.set_level("INFO", logger="virtio")
    mh.bring_up(FEATURES)
    for _ in range(4):
        page_buffer(mh.rx, LOG_PAGE)
    mh.rx.kick()
    assert mh.set_log_base() == 0
    assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(FEATURES | F_LOG_ALL)) == 0
    mh.echo(b"\x01" * 100)
    assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(FEATURES)) == 0
    assert "dirty page logging off (live migration), 1 writes marked so far" in caplog.text
    assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(FEATURES | F_LOG_ALL)) == 0
    mh.echo(b"\x02" * 100)
    mh.backend.close("front end gone")
    assert "dirty log released: 2 writes marked in it" in caplog.text


def test_stopping_a_ring_marks_its_used_ring(mh):
    mh.bring_up(FEATURES | F_LOG_ALL)
    assert mh.set_log_base() == 0
    mh.log_used_rings()
    mh.dirty()
    reply = mh.fe.request(R.GET_VRING_BASE, m.encode_state(1, 0))
    assert reply is not None and reply.state() == (1, 0)
    assert mh.dirty() == pages(mh.tx.used, 6 + 8 * mh.tx.num)


def test_bad_log_bases_are_refused_and_the_link_survives(mh):
    mh.bring_up(FEATURES)
    assert mh.fe.ack(R.SET_LOG_BASE, m.encode_u64(0)) != 0  # no shared memory: unsupported
    assert mh.set_log_base(size=(mh.log_size + 1) << 20) != 0  # beyond the memfd: no SIGBUS
    assert mh.fe.ack(R.SET_LOG_BASE, m.LOG.pack(0, 0), [mh.log_fd]) != 0
    assert mh.alive()
    assert mh.set_log_base() == 0  # and a good one still works after them


def test_a_log_too_small_for_the_writes_is_survived(mh):
    """A front end whose log does not cover guest memory: the pages beyond it go unmarked
    and are counted; nothing is written outside the log."""
    mh.bring_up(FEATURES | F_LOG_ALL)
    page_buffer(mh.rx, LOG_PAGE)
    mh.rx.kick()
    small = GPA_BASE // LOG_PAGE // 8  # covers the pages below guest memory only
    assert mh.fe.ack(R.SET_LOG_BASE, m.LOG.pack(small, 0), [mh.log_fd]) == 0
    mh.dirty()
    mh.echo(b"\x04" * 32)
    assert mh.dirty() == set()
    assert mh.backend.dirty_log is not None and mh.backend.dirty_log.outside > 0
    assert mh.alive()


def test_dirty_log_marks_within_bounds():
    fd = os.memfd_create("log")
    os.ftruncate(fd, 4096 + 2)
    check = os.dup(fd)
    log = DirtyLog(fd, 2, 4096)  # offset not at 0: bit 0 is the byte at 4096
    try:
        log.mark(0, 1)
        log.mark(9 * LOG_PAGE - 1, 2)  # pages 8 and 9
        log.mark(15 * LOG_PAGE, 10 * LOG_PAGE)  # page 15, then beyond the log
        log.mark(2**64 - 1, 2)  # wraps: refused
        assert os.pread(check, 4, 4095) == b"\x00\x01\x83"  # the file ends there
        assert log.outside == 2
    finally:
        log.close()
        os.close(check)


def test_marking_starts_where_logging_began(mh):
    """Chains used while no migration ran are not walked when one starts (after 65536 of
    them the index would have wrapped onto stale entries): only what follows is marked."""
    mh.bring_up(FEATURES)
    for _ in range(4):
        page_buffer(mh.rx, LOG_PAGE)
    mh.rx.kick()
    assert mh.set_log_base() == 0
    first, _ = mh.echo(b"\x05" * 40)
    assert mh.fe.ack(R.SET_FEATURES, m.encode_u64(FEATURES | F_LOG_ALL)) == 0
    mh.dirty()
    second, length = mh.echo(b"\x06" * 40)
    gpa = mh.rx.buffers[second][0][0]
    assert mh.dirty() == pages(gpa, length)
    assert mh.rx.buffers[first][0][0] // LOG_PAGE not in pages(gpa, length)
