"""The back-end state machine driven by the Python front end over a socketpair."""

from __future__ import annotations

import os
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostpasst.core.loop import Loop
from virtio import message as m
from virtio import net
from virtio.backend import (
    F_PROTOCOL_FEATURES,
    F_RING_EVENT_IDX,
    F_RING_INDIRECT_DESC,
    F_VERSION_1,
    VhostUserBackend,
)
from virtio.message import ProtocolFeature as PF
from virtio.message import Request as R
from virtio.virtqueue import VirtQueue, VirtQueueError

from .frontend import DriverMemory, DriverRing, Frontend


class EchoDevice(net.NetDevice):
    """TX frames come back on RX (a loopback cable), and every callback is recorded."""

    def __init__(self) -> None:
        self.events: list[tuple[str, int]] = []
        self.queues: dict[int, VirtQueue] = {}
        self.frames: list[bytes] = []

    def queue_started(self, vq: VirtQueue) -> None:
        self.events.append(("started", vq.index))
        self.queues[vq.index] = vq

    def queue_stopped(self, vq: VirtQueue) -> None:
        self.events.append(("stopped", vq.index))

    def queue_enabled(self, vq: VirtQueue, enabled: bool) -> None:
        self.events.append(("enabled" if enabled else "disabled", vq.index))

    def queue_kicked(self, vq: VirtQueue) -> None:
        self.events.append(("kicked", vq.index))
        if vq.index != net.TX_QUEUE or not vq.ready:
            return
        rx = self.queues.get(net.RX_QUEUE)
        while (chain := vq.pop()) is not None:
            _, pieces = net.tx_frame(chain)
            frame = b"".join(bytes(p) for p in pieces)
            self.frames.append(frame)
            vq.push(chain.head, 0)
            if rx is not None and rx.ready and rx.enabled:
                net.rx_put(rx, frame)
        vq.flush()
        if rx is not None and rx.ready:
            rx.flush()


class Harness:
    def __init__(self, queue_size: int = 16, loop: Loop | None = None,
                 device: EchoDevice | None = None) -> None:
        self.loop = Loop() if loop is None else loop
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.device = EchoDevice() if device is None else device
        self.closed: list[str] = []
        self.backend = VhostUserBackend(b, self.loop, self.device, self.closed.append)
        self.fe = Frontend(a, lambda: self.loop.run_once(0))
        self.dmem = DriverMemory((1 << 18, 1 << 18))
        self.rx = DriverRing(self.dmem, queue_size)
        self.tx = DriverRing(self.dmem, queue_size)

    def negotiate(self, features: int | None = None, protocol: int | None = None) -> None:
        offered = self.fe.get_u64(R.GET_FEATURES)
        self.fe.request(R.SET_OWNER)
        if features is None:
            features = offered
        pf = self.fe.get_u64(R.GET_PROTOCOL_FEATURES)
        self.fe.request(R.SET_PROTOCOL_FEATURES, m.encode_u64(pf if protocol is None else protocol))
        assert self.fe.ack(R.SET_FEATURES, m.encode_u64(features)) == 0
        self.rx.event_idx = self.tx.event_idx = bool(features & F_RING_EVENT_IDX)

    def bring_up(self, features: int | None = None) -> None:
        self.negotiate(features)
        assert self.fe.ack(R.SET_MEM_TABLE, m.encode_mem_table(self.dmem.table()),
                           self.dmem.fds()) == 0
        self.fe.setup_queue(0, self.rx)
        self.fe.setup_queue(1, self.tx)
        for i in (0, 1):
            assert self.fe.ack(R.SET_VRING_ENABLE, m.encode_state(i, 1)) == 0

    def alive(self) -> bool:
        return not self.fe.is_closed() and not self.backend.closed

    def close(self) -> None:
        self.backend.close()
        self.fe.sock.close()
        self.rx.close()
        self.tx.close()
        self.dmem.close()
        self.loop.close()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


# --- negotiation ------------------------------------------------------------------------------

def test_features_offered(h):
    features = h.fe.get_u64(R.GET_FEATURES)
    for bit in (F_VERSION_1, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_PROTOCOL_FEATURES,
                net.F_MRG_RXBUF):
        assert features & bit
    pf = h.fe.get_u64(R.GET_PROTOCOL_FEATURES)
    for bit in (PF.REPLY_ACK, PF.CONFIGURE_MEM_SLOTS, PF.MQ):
        assert pf & (1 << bit)
    assert not pf & (1 << PF.CONFIG)  # the echo device has no config space
    assert h.fe.get_u64(R.GET_QUEUE_NUM) == 1  # one queue pair
    assert h.fe.get_u64(R.GET_MAX_MEM_SLOTS) == 32


def test_unoffered_feature_nacked(h):
    assert h.fe.ack(R.SET_FEATURES, m.encode_u64(F_VERSION_1 | 1 << 50)) != 0
    assert h.fe.ack(R.SET_PROTOCOL_FEATURES, m.encode_u64(1 << 40)) != 0
    assert h.alive()


def test_legacy_driver_refused(h):
    assert h.fe.ack(R.SET_FEATURES, m.encode_u64(net.F_MRG_RXBUF)) != 0
    h.fe.request(R.SET_FEATURES, m.encode_u64(net.F_MRG_RXBUF))  # no NEED_REPLY: closes
    assert h.fe.is_closed() and h.backend.closed and "legacy" in h.closed[0]


def test_rings_enabled_without_protocol_features(h):
    h.fe.ack(R.SET_FEATURES, m.encode_u64(F_VERSION_1))
    assert ("enabled", 0) in h.device.events and ("enabled", 1) in h.device.events


# --- data path --------------------------------------------------------------------------------

@pytest.mark.parametrize("features", [
    F_VERSION_1 | F_PROTOCOL_FEATURES | net.F_MRG_RXBUF,
    F_VERSION_1 | F_PROTOCOL_FEATURES | net.F_MRG_RXBUF | F_RING_EVENT_IDX,
    F_VERSION_1 | F_PROTOCOL_FEATURES | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC,
], ids=["plain", "event_idx", "event_idx+indirect"])
def test_tx_rx_round_trip(h, features):
    h.bring_up(features)
    assert ("started", 0) in h.device.events and ("started", 1) in h.device.events
    indirect = bool(features & F_RING_INDIRECT_DESC)
    for _ in range(4):  # RX buffers: one 40-byte chain each, frames need several (mergeable)
        h.rx.add([], [40], indirect=indirect)
    h.rx.kick()
    frames = [bytes([i]) * (20 + i) for i in range(3)]
    sent = 0
    for _ in range(6):  # wraps the 16-entry TX ring
        for frame in frames:
            h.tx.add([bytes(net.HDR_LEN) + frame], indirect=indirect)
        h.tx.kick()
        h.fe.pump()
        used = h.tx.get_used()
        assert len(used) == len(frames)
        assert h.tx.calls() >= 1
        sent += len(frames)
        received = []
        for head, length in h.rx.get_used():
            received.append((head, length))
        # Replenish RX, then pick frames apart from what the device wrote.
        got = b"".join(h.rx.written(head, length) for head, length in received)
        for _ in received:
            h.rx.add([], [40], indirect=indirect)
        h.rx.kick()
        assert got  # at least the first frame fit
        hdr = net.NetHeader.unpack(got)
        assert hdr.flags == net.HDR_F_DATA_VALID and hdr.num_buffers >= 1
        assert got[net.HDR_LEN:net.HDR_LEN + len(frames[0])] == frames[0]
    assert h.device.frames[:3] == frames


def test_event_idx_kicks_and_calls_are_suppressed(h):
    h.bring_up(F_VERSION_1 | F_PROTOCOL_FEATURES | F_RING_EVENT_IDX)
    h.tx.rearm = False
    h.tx.set_used_event(0xFFFF)  # "do not call me for a long while" (after the first one)
    for _ in range(3):
        h.tx.add([bytes(net.HDR_LEN) + b"x" * 20])
        h.tx.kick()
        h.fe.pump()
    assert len(h.tx.get_used()) == 3
    assert h.tx.calls() == 1  # only the always-signal first flush


def test_get_vring_base_stops_and_set_base_resumes(h):
    h.bring_up()
    h.tx.add([bytes(net.HDR_LEN) + b"a" * 20])
    h.tx.kick()
    h.fe.pump()
    reply = h.fe.request(R.GET_VRING_BASE, m.encode_state(1, 0))
    assert reply is not None and reply.state() == (1, 1)
    assert ("stopped", 1) in h.device.events
    # Restart: qemu sends base, fresh kick/call fds.
    h.tx.kick_fd, h.tx.call_fd = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    h.fe.setup_queue(1, h.tx, base=1)
    h.tx.add([bytes(net.HDR_LEN) + b"b" * 20])
    h.tx.kick()
    h.fe.pump()
    assert h.device.frames == [b"a" * 20, b"b" * 20]


def test_get_vring_base_publishes_what_was_pushed_first(h):
    """A device pushes in one event and flushes at the end of the loop's pass: a
    GET_VRING_BASE in between must not report an index past used->idx in guest memory (the
    front end reads it as the ring stops; whoever resumes the ring writes after it)."""
    h.bring_up()
    h.tx.add([bytes(net.HDR_LEN) + b"a" * 20])
    vq = h.backend.queues[net.TX_QUEUE]
    chain = vq.pop()
    assert chain is not None
    vq.push(chain.head, 0)  # not flushed yet
    h.tx.calls()
    reply = h.fe.request(R.GET_VRING_BASE, m.encode_state(1, 0))
    assert reply is not None and reply.state() == (1, 1)
    assert h.tx.used_idx() == 1
    assert h.tx.get_used() == [(chain.head, 0)]
    assert h.tx.calls() == 1  # and the driver told


def test_set_vring_num_refused_while_running(h):
    h.bring_up()
    assert h.fe.ack(R.SET_VRING_NUM, m.encode_state(1, 8)) != 0


def test_broken_ring_does_not_kill_the_backend(h):
    h.bring_up()
    err = os.eventfd(0, os.EFD_NONBLOCK)
    assert h.fe.ack(R.SET_VRING_ERR, m.encode_u64(1), [err]) == 0
    h.tx.write_desc(0, 0x10, 64, 0, 0)  # outside guest memory
    h.tx.publish(0)
    h.tx.kick()
    h.fe.pump()
    assert h.backend.queues[1].broken
    assert os.eventfd_read(err) == 1
    assert h.alive()
    os.close(err)


def test_mem_slots_add_remove(h):
    h.negotiate()
    regions = h.dmem.regions
    for r in regions:
        assert h.fe.ack(R.ADD_MEM_REG, m.encode_mem_reg(r.desc), [r.fd]) == 0
    assert len(h.backend.memory) == 2
    h.fe.setup_queue(1, h.tx)
    assert h.backend.queues[1].mapped
    # Removing the region the rings live in unmaps them (until the front end sets them again).
    assert h.fe.ack(R.REM_MEM_REG, m.encode_mem_reg(regions[0].desc)) == 0
    assert len(h.backend.memory) == 1 and not h.backend.queues[1].mapped
    assert h.fe.ack(R.REM_MEM_REG, m.encode_mem_reg(regions[0].desc)) != 0  # gone already
    assert h.fe.ack(R.ADD_MEM_REG, m.encode_mem_reg(regions[0].desc), [regions[0].fd]) == 0
    assert h.backend.queues[1].mapped


def test_rem_mem_reg_with_stray_fd_closes_it(h):
    h.negotiate()
    r = h.dmem.regions[0]
    assert h.fe.ack(R.ADD_MEM_REG, m.encode_mem_reg(r.desc), [r.fd]) == 0
    before = _fd_count()
    stray = os.dup(r.fd)
    assert h.fe.ack(R.REM_MEM_REG, m.encode_mem_reg(r.desc), [stray]) == 0
    os.close(stray)
    # -1: the unmapped region's fd (CPython's mmap keeps a dup) is gone; the stray fd is
    # closed too, or the count would not have dropped.
    assert _fd_count() == before - 1


def test_reset_device_and_owner(h):
    h.bring_up()
    h.fe.request(R.RESET_OWNER)
    assert ("stopped", 0) in h.device.events and ("disabled", 0) in h.device.events
    assert h.fe.ack(R.RESET_DEVICE) == 0
    assert len(h.backend.memory) == 0 and h.backend.acked_features == 0
    assert all(not vq.mapped and vq.kick_fd is None for vq in h.backend.queues)
    assert h.alive()


def test_get_config_without_config_space_is_empty_reply(h):
    reply = h.fe.request(R.GET_CONFIG, m.encode_config(0, 0, bytes(6)))
    assert reply is not None and reply.payload == b""


def test_config_space():
    class WithConfig(EchoDevice):
        def config(self) -> bytes:
            return bytes(range(10))

    harness = Harness()
    loop = harness.loop
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    backend = VhostUserBackend(b, loop, WithConfig())
    fe = Frontend(a, lambda: loop.run_once(0))
    try:
        assert fe.get_u64(R.GET_PROTOCOL_FEATURES) & (1 << PF.CONFIG)
        reply = fe.request(R.GET_CONFIG, m.encode_config(2, 0, bytes(4)))
        assert reply is not None and reply.config() == (2, 4, 0, bytes([2, 3, 4, 5]))
        assert fe.ack(R.SET_CONFIG, m.encode_config(0, 0, b"\1")) != 0  # read-only
        reply = fe.request(R.GET_CONFIG, m.encode_config(8, 0, bytes(4)))  # beyond the end
        assert reply is not None and reply.payload == b""
    finally:
        backend.close()
        a.close()
        harness.close()


# --- malformed and hostile messages -----------------------------------------------------------

def test_unsupported_request_nack_or_close(h):
    assert h.fe.ack(R.SET_LOG_BASE, m.encode_u64(0)) != 0
    assert h.alive()
    h.fe.request(R.SEND_RARP, m.encode_u64(0))
    assert h.fe.is_closed() and "not supported" in h.closed[0]


def test_unknown_request_closes(h):
    h.fe.send(999)
    assert h.fe.is_closed()


def test_wrong_size_nacked(h):
    assert h.fe.ack(R.SET_VRING_NUM, b"\0" * 4) != 0
    assert h.alive()
    h.fe.send(R.SET_VRING_NUM, b"\0" * 12)
    assert h.fe.is_closed()


def test_get_with_bad_payload_closes(h):
    h.fe.send(R.GET_FEATURES, b"\0" * 8, flags=m.VERSION | m.FLAG_NEED_REPLY)
    assert h.fe.is_closed()


def test_oversized_and_bad_version_close(h):
    h.fe.sock.send(struct.pack("=III", R.SET_OWNER, m.VERSION, 1 << 30))
    assert h.fe.is_closed() and "exceeds" in h.closed[0]


def test_bad_version_closes(h):
    h.fe.sock.send(struct.pack("=III", R.SET_OWNER, 0, 0))
    assert h.fe.is_closed()


def test_unexpected_fds_closed(h):
    before = _fd_count()
    r, w = os.pipe()
    assert h.fe.ack(R.SET_OWNER, b"", [r]) != 0
    os.close(r)
    os.close(w)
    assert _fd_count() == before


def test_mem_table_with_bad_fd(h):
    h.negotiate()
    before = _fd_count()
    r, w = os.pipe()
    assert h.fe.ack(R.SET_MEM_TABLE, m.encode_mem_table(h.dmem.table()[:1]), [r]) != 0
    os.close(r)
    os.close(w)
    assert _fd_count() == before and len(h.backend.memory) == 0


def test_mem_table_region_beyond_file(h):
    h.negotiate()
    r = h.dmem.regions[0]
    big = m.RegionDesc(r.desc.gpa, r.desc.size * 4, r.desc.uaddr, 0)
    assert h.fe.ack(R.SET_MEM_TABLE, m.encode_mem_table([big]), [r.fd]) != 0


def test_ring_address_outside_memory(h):
    h.negotiate()
    assert h.fe.ack(R.SET_MEM_TABLE, m.encode_mem_table(h.dmem.table()), h.dmem.fds()) == 0
    assert h.fe.ack(R.SET_VRING_NUM, m.encode_state(0, 16)) == 0
    bad = m.VringAddr(0, 0, 0xDEAD0000, 0xDEAD1000, 0xDEAD2000, 0)
    assert h.fe.ack(R.SET_VRING_ADDR, m.encode_vring_addr(bad)) != 0


@pytest.mark.parametrize("request_, payload", [
    (R.SET_VRING_NUM, m.encode_state(5, 16)),  # queue index out of range
    (R.SET_VRING_NUM, m.encode_state(0, 3)),  # not a power of two
    (R.SET_VRING_NUM, m.encode_state(0, 2048)),  # above the maximum
    (R.SET_VRING_BASE, m.encode_state(0, 0x10000)),
    (R.SET_VRING_ENABLE, m.encode_state(0, 2)),
    (R.SET_VRING_ADDR, m.encode_vring_addr(m.VringAddr(0, 0, 0, 0, 0, 0))),  # before NUM
    (R.SET_VRING_KICK, m.encode_u64(0x1FF)),  # index 255, no fd
])
def test_bad_vring_requests(h, request_, payload):
    assert h.fe.ack(request_, payload) != 0
    assert h.alive()


def test_kick_fd_that_cannot_be_polled(h, tmp_path):
    path = tmp_path / "regular"
    path.write_bytes(b"")
    fd = os.open(path, os.O_RDONLY)
    assert h.fe.ack(R.SET_VRING_KICK, m.encode_u64(1), [fd]) != 0  # epoll refuses files
    os.close(fd)
    assert h.alive()


@pytest.mark.parametrize("request_", [R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR])
def test_vring_fd_that_is_not_an_eventfd_is_refused(h, request_):
    """A pipe (it could block us, or be at EOF) is not an eventfd: refused, fd closed."""
    h.bring_up()
    r, w = os.pipe()
    before = _fd_count()
    assert h.fe.ack(request_, m.encode_u64(1), [r]) != 0
    assert _fd_count() == before
    os.close(r)
    os.close(w)
    assert h.alive()


def test_peer_close_mid_message_and_cleanup(h):
    h.bring_up()
    h.fe.sock.send(struct.pack("=III", R.SET_VRING_NUM, m.VERSION, 8) + b"\0\0")
    h.fe.sock.close()
    for _ in range(3):
        h.loop.run_once(0)
    assert h.backend.closed and len(h.backend.memory) == 0
    assert ("stopped", 1) in h.device.events


def test_close_cut_short_still_tells_the_device(h, monkeypatch):
    """The daemon's SIGTERM raises wherever it lands, e.g. while a large guest is unmapped:
    the device still hears of the close (its closing counters are logged), and the exception
    goes on to the caller."""
    h.bring_up()

    class Terminate(BaseException):  # as the daemon's: not an Exception
        pass

    def reset() -> None:
        raise Terminate

    monkeypatch.setattr(h.backend.memory, "reset", reset)
    with pytest.raises(Terminate):
        h.backend.close("link closed")
    assert h.closed == ["link closed"] and h.backend.closed


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msgs=st.lists(st.tuples(st.sampled_from(list(R) + [0, 77]),
                               st.sampled_from([m.VERSION, m.VERSION | m.FLAG_NEED_REPLY]),
                               st.binary(max_size=80), st.integers(0, 2)),
                     min_size=1, max_size=6))
def test_hostile_message_sequences(msgs):
    harness = Harness()
    try:
        harness.bring_up()
        before = _fd_count()
        for request, flags, payload, nfds in msgs:
            if harness.backend.closed:
                break
            fds = [os.eventfd(0) for _ in range(nfds)]
            try:
                harness.fe.send(request, payload, fds, flags)
            except OSError:
                break
            finally:
                for fd in fds:
                    os.close(fd)
            for _ in range(3):
                harness.loop.run_once(0)  # must never raise
            while True:  # drain replies so the socket never fills
                try:
                    if harness.fe._reader.read() is None:
                        break
                except (m.ConnectionClosed, m.VhostUserError):
                    break
        harness.backend.close()
        assert _fd_count() <= before  # nothing the front end sent was leaked
    finally:
        harness.close()


def test_virtqueue_error_type_is_exported():
    assert issubclass(VirtQueueError, Exception)

