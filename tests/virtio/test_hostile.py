"""Hostile front ends (issue 17): each attack must leave the back end's loop running, that
front end disconnected (or refused), and the next front end on the same loop served.

Real sockets, real memfds and eventfds, the real loop; the Python front end plays qemu."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from vhostpasst.loop import Loop
from virtio import message as m
from virtio import net
from virtio.backend import F_PROTOCOL_FEATURES, F_VERSION_1, VhostUserBackend
from virtio.message import Request as R

from .frontend import Frontend
from .test_backend import Harness

FEATURES = F_VERSION_1 | F_PROTOCOL_FEATURES | net.F_MRG_RXBUF


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


def _unused(_: object) -> None:  # keep imports honest for later tests
    _ = (socket, VhostUserBackend, Frontend)
