"""Back-end state transfer (DEVICE_STATE: SET_DEVICE_STATE_FD, CHECK_DEVICE_STATE), with the
Python front end over a socketpair and a pipe, as qemu does it: the state moves through the
loop without blocking it, a hostile front end's transfer never stalls the queues, and every
refusal is answered while the connection carries on."""

from __future__ import annotations

import os

import pytest

from virtio import message as m
from virtio import net
from virtio.devstate import CHUNK, REPLY_NOFD, Direction, StateError
from virtio.message import ProtocolFeature as PF
from virtio.message import Request as R

from .test_backend import EchoDevice, Harness

MAX_STATE = 1 << 20


class StatefulEcho(EchoDevice):
    """The echo device with a state: bytes it saves, and what it loaded."""

    max_state_size = MAX_STATE

    def __init__(self, state: bytes = b"") -> None:
        super().__init__()
        self.state = state
        self.loaded: list[bytes] = []

    def save_state(self) -> bytes:
        return self.state

    def load_state(self, data: bytes) -> None:
        if data.startswith(b"bad"):
            raise StateError("corrupt")
        self.loaded.append(data)


@pytest.fixture
def sh():
    harness = Harness(device=StatefulEcho(os.urandom(3 * CHUNK + 123)))
    harness.bring_up()
    yield harness
    harness.close()


def set_fd(h: Harness, direction: int, fd: int | None, phase: int = 0) -> int:
    """SET_DEVICE_STATE_FD; the reply's u64 (bit 8 must be set: no fd of ours comes back)."""
    reply = h.fe.request(R.SET_DEVICE_STATE_FD, m.DEVICE_STATE.pack(direction, phase),
                         [] if fd is None else [fd])
    assert reply is not None and reply.request == R.SET_DEVICE_STATE_FD
    assert not reply.fds
    value = reply.u64()
    assert value & REPLY_NOFD
    return value & 0xFF


def check(h: Harness) -> int:
    return h.fe.get_u64(R.CHECK_DEVICE_STATE)


def save(h: Harness) -> bytes:
    """What qemu's source does: a pipe, its write end to the back end, read until EOF."""
    r, w = os.pipe()
    assert set_fd(h, Direction.SAVE, w) == 0
    os.close(w)
    os.set_blocking(r, False)
    data = bytearray()
    for _ in range(1000):
        h.loop.run_once(0)
        try:
            chunk = os.read(r, 1 << 20)
        except BlockingIOError:
            continue
        if not chunk:
            break
        data += chunk
    else:
        raise AssertionError("no EOF on the state pipe")
    os.close(r)
    return bytes(data)


def load(h: Harness, state: bytes) -> None:
    """What qemu's destination does: its read end to the back end, write it all, close."""
    r, w = os.pipe()
    assert set_fd(h, Direction.LOAD, r) == 0
    os.close(r)
    os.set_blocking(w, False)
    view = memoryview(state)
    for _ in range(1000):
        if not view:
            break
        try:
            view = view[os.write(w, view):]
        except BlockingIOError:
            pass
        h.loop.run_once(0)
    else:
        raise AssertionError("the back end did not read the state")
    os.close(w)


def traffic_flows(h: Harness) -> None:
    """A frame the guest sends comes back on RX: the queues are served."""
    h.rx.add(in_sizes=[2048])
    h.rx.kick()
    frame = bytes(range(60))
    h.tx.add([bytes(net.HDR_LEN) + frame])
    h.tx.kick()
    h.fe.pump()
    assert h.tx.get_used(), "the TX queue was not served"
    (head, length), = h.rx.get_used()
    assert h.rx.written(head, length)[net.HDR_LEN:] == frame


def test_device_state_offered_only_by_a_device_with_state():
    plain = Harness()
    stateful = Harness(device=StatefulEcho())
    try:
        assert not plain.fe.get_u64(R.GET_PROTOCOL_FEATURES) & 1 << PF.DEVICE_STATE
        assert stateful.fe.get_u64(R.GET_PROTOCOL_FEATURES) & 1 << PF.DEVICE_STATE
        plain.bring_up()  # and a transfer with it is refused, the connection kept
        r, w = os.pipe()
        assert set_fd(plain, Direction.SAVE, w) != 0
        os.close(w)
        assert os.read(r, 1) == b""  # our copy of the fd was closed
        os.close(r)
        assert plain.alive()
    finally:
        plain.close()
        stateful.close()


def test_save_streams_the_whole_state_and_check_says_so(sh):
    assert save(sh) == sh.device.state  # several chunks: more than a pipe holds
    assert check(sh) == 0
    assert sh.backend.transfer is None
    traffic_flows(sh)


def test_load_hands_the_device_the_whole_state(sh):
    state = os.urandom(2 * CHUNK + 7)
    load(sh, state)
    assert check(sh) == 0
    assert sh.device.loaded == [state]
    traffic_flows(sh)


def test_check_drains_what_the_pipe_still_holds(sh):
    """qemu closes its end and checks at once: the rest is in the pipe and is read then."""
    r, w = os.pipe()
    assert set_fd(sh, Direction.LOAD, r) == 0
    os.close(r)
    os.write(w, b"state")
    os.close(w)
    assert check(sh) == 0
    assert sh.device.loaded == [b"state"]


def test_an_empty_state_loads(sh):
    load(sh, b"")
    assert check(sh) == 0
    assert sh.device.loaded == [b""]


def test_a_state_the_device_refuses_fails_the_check(sh):
    load(sh, b"bad state")
    assert check(sh) != 0
    assert sh.device.loaded == []
    assert sh.alive()


def test_an_oversized_state_is_not_read_past_the_cap(sh):
    """A front end that writes without end: the back end stops one byte past the device's
    cap, closes the pipe (the writer gets EPIPE) and the check fails."""
    r, w = os.pipe()
    assert set_fd(sh, Direction.LOAD, r) == 0
    os.close(r)
    os.set_blocking(w, False)
    written, broken = 0, False
    for _ in range(2000):
        try:
            written += os.write(w, bytes(CHUNK))
        except BlockingIOError:
            pass
        except BrokenPipeError:
            broken = True
            break
        sh.loop.run_once(0)
    os.close(w)
    assert broken and written <= MAX_STATE + 2 * CHUNK
    assert sh.backend.transfer is not None and sh.backend.transfer.moved == MAX_STATE + 1
    assert check(sh) != 0
    assert sh.device.loaded == []
    traffic_flows(sh)


@pytest.mark.parametrize("direction, phase, with_fd, why", [
    (Direction.SAVE, 1, True, "phase"),
    (2, 0, True, "direction"),
    (Direction.LOAD, 0, False, "no fd"),
])
def test_hostile_requests_refused_and_the_connection_kept(sh, direction, phase, with_fd, why):
    r, w = os.pipe()
    assert set_fd(sh, direction, w if with_fd else None, phase) != 0, why
    os.close(w)
    if with_fd:
        assert os.read(r, 1) == b""  # the refused fd was closed, not kept
    os.close(r)
    assert sh.alive()
    assert check(sh) != 0  # nothing to check
    assert save(sh) == sh.device.state  # and a proper transfer still works
    assert check(sh) == 0


def test_a_second_transfer_is_refused_the_first_goes_on(sh):
    r1, w1 = os.pipe()
    assert set_fd(sh, Direction.LOAD, r1) == 0
    os.close(r1)
    r2, w2 = os.pipe()
    assert set_fd(sh, Direction.SAVE, w2) != 0
    os.close(w2)
    assert os.read(r2, 1) == b""
    os.close(r2)
    os.write(w1, b"first")
    os.close(w1)
    assert check(sh) == 0
    assert sh.device.loaded == [b"first"]


def test_a_front_end_that_never_writes_stalls_nothing(sh):
    """LOAD with a writer that keeps its end open and silent: the queues are served
    meanwhile, and the check fails at once rather than waiting."""
    r, w = os.pipe()
    assert set_fd(sh, Direction.LOAD, r) == 0
    os.close(r)
    os.write(w, b"partial")
    for _ in range(3):
        traffic_flows(sh)
    assert check(sh) != 0
    assert sh.device.loaded == []
    os.close(w)
    assert sh.alive()


def test_a_front_end_that_never_reads_stalls_nothing(sh):
    """SAVE of more than a pipe holds, nobody reading: the queues are served meanwhile, and
    the check fails (the end was not reached)."""
    r, w = os.pipe()
    assert set_fd(sh, Direction.SAVE, w) == 0
    os.close(w)
    for _ in range(3):
        traffic_flows(sh)
    transfer = sh.backend.transfer
    assert transfer is not None and 0 < transfer.moved < len(sh.device.state)
    assert check(sh) != 0
    os.close(r)
    assert sh.alive()


def test_an_fd_open_the_wrong_way_is_refused(sh):
    r, w = os.pipe()
    assert set_fd(sh, Direction.SAVE, r) != 0  # a read end to write the state into
    assert check(sh) != 0
    os.close(r)
    os.close(w)
    assert sh.alive()


def test_a_reader_gone_fails_the_save(sh):
    r, w = os.pipe()
    assert set_fd(sh, Direction.SAVE, w) == 0
    os.close(w)
    os.close(r)
    for _ in range(5):
        sh.loop.run_once(0)
    assert check(sh) != 0
    assert sh.alive()


def test_disconnect_mid_transfer_closes_the_fd(sh):
    r, w = os.pipe()
    assert set_fd(sh, Direction.LOAD, r) == 0
    os.close(r)
    sh.backend.close("test")
    with pytest.raises(BrokenPipeError):  # the back end's read end is gone
        os.write(w, b"x")
    os.close(w)


def test_reset_device_cuts_a_transfer_short(sh):
    r, w = os.pipe()
    assert set_fd(sh, Direction.SAVE, w) == 0
    os.close(w)
    assert sh.fe.ack(R.RESET_DEVICE) == 0
    assert sh.backend.transfer is None
    os.set_blocking(r, False)
    data = b""
    while chunk := os.read(r, 1 << 20):  # what was written, then EOF: our end closed
        data += chunk
    os.close(r)
    assert len(data) < len(sh.device.state)
