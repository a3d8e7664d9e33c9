"""The epoll loop: timers, fd callbacks, flush hooks, and their order within an iteration."""

from __future__ import annotations

import functools
import socket
import time
from collections.abc import Callable, Iterator

import pytest

from vhostpasst.core.loop import EPOLLIN, EPOLLOUT, Loop


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


def run_until(loop: Loop, cond: Callable[[], object], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        loop.run_once(0.05)


def test_timers_fire_in_deadline_order(loop: Loop) -> None:
    fired: list[str] = []
    base = time.monotonic()  # one base: a descheduled test must not reorder the deadlines
    loop.call_at(base + 0.03, lambda: fired.append("c"))
    loop.call_at(base + 0.01, lambda: fired.append("a"))
    loop.call_at(base + 0.02, lambda: fired.append("b"))
    run_until(loop, lambda: len(fired) == 3)
    assert fired == ["a", "b", "c"]


def test_same_deadline_keeps_insertion_order(loop: Loop) -> None:
    fired: list[int] = []
    when = time.monotonic() + 0.01
    for i in range(5):
        loop.call_at(when, functools.partial(fired.append, i))
    run_until(loop, lambda: len(fired) == 5)
    assert fired == [0, 1, 2, 3, 4]


def test_cancelled_timer_does_not_fire(loop: Loop) -> None:
    fired: list[str] = []
    t = loop.call_later(0.01, lambda: fired.append("cancelled"))
    loop.call_later(0.02, lambda: fired.append("kept"))
    t.cancel()
    run_until(loop, lambda: fired == ["kept"])
    loop.run_once(0.05)
    assert fired == ["kept"]


def test_timer_not_early(loop: Loop) -> None:
    fired: list[float] = []
    start = time.monotonic()
    loop.call_later(0.05, lambda: fired.append(time.monotonic()))
    run_until(loop, lambda: bool(fired))
    assert fired[0] - start >= 0.05


def test_run_once_waits_for_the_next_timer_not_max_wait(loop: Loop) -> None:
    fired: list[bool] = []
    loop.call_later(0.02, lambda: fired.append(True))
    start = time.monotonic()
    loop.run_once(5.0)  # would sleep 5 s if the timer did not shorten the wait
    assert time.monotonic() - start < 1.0
    assert fired == [True]


def test_fd_callback_with_socketpair(loop: Loop) -> None:
    a, b = socket.socketpair()
    got: list[tuple[int, bytes]] = []

    def on_read(mask: int) -> None:
        got.append((mask, a.recv(100)))

    loop.add_fd(a.fileno(), EPOLLIN, on_read)
    loop.run_once(0.01)
    assert got == []  # nothing to read yet
    b.send(b"hello")
    run_until(loop, lambda: bool(got))
    assert got[0][0] & EPOLLIN
    assert got[0][1] == b"hello"
    loop.remove_fd(a.fileno())
    b.send(b"again")
    loop.run_once(0.05)
    assert len(got) == 1  # removed: no more callbacks
    a.close()
    b.close()


def test_modify_fd_switches_events(loop: Loop) -> None:
    a, b = socket.socketpair()
    masks: list[int] = []
    loop.add_fd(a.fileno(), EPOLLIN, masks.append)
    loop.run_once(0.01)
    assert masks == []
    loop.modify_fd(a.fileno(), EPOLLOUT)  # writable at once
    loop.run_once(0.05)
    assert masks and masks[0] & EPOLLOUT
    loop.remove_fd(a.fileno())
    a.close()
    b.close()


def test_remove_fd_of_closed_fd_is_harmless(loop: Loop) -> None:
    a, b = socket.socketpair()
    fd = a.fileno()
    loop.add_fd(fd, EPOLLIN, lambda m: None)
    a.close()
    loop.remove_fd(fd)
    loop.remove_fd(fd)  # twice: still fine
    b.close()


def test_callback_removing_another_ready_fd_in_same_batch(loop: Loop) -> None:
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    calls: list[str] = []

    def first(mask: int) -> None:
        calls.append("first")
        a1.recv(10)
        loop.remove_fd(a2.fileno())
        loop.remove_fd(a1.fileno())

    def second(mask: int) -> None:
        calls.append("second")
        a2.recv(10)
        loop.remove_fd(a1.fileno())
        loop.remove_fd(a2.fileno())

    loop.add_fd(a1.fileno(), EPOLLIN, first)
    loop.add_fd(a2.fileno(), EPOLLIN, second)
    b1.send(b"x")
    b2.send(b"x")
    loop.run_once(0.05)
    assert len(calls) == 1  # whichever ran first removed the other before it was called
    for s in (a1, b1, a2, b2):
        s.close()


def test_flush_hooks_run_after_fd_callbacks_and_timers(loop: Loop) -> None:
    a, b = socket.socketpair()
    order: list[str] = []

    def on_read(mask: int) -> None:
        a.recv(10)
        order.append("fd")

    loop.add_fd(a.fileno(), EPOLLIN, on_read)
    loop.add_flush_hook(lambda: order.append("flush"))
    loop.call_later(0.0, lambda: order.append("timer"))
    b.send(b"x")
    time.sleep(0.005)
    loop.run_once(0.05)
    assert order == ["fd", "timer", "flush"]
    a.close()
    b.close()


def test_flush_hooks_run_every_iteration_and_can_be_removed(loop: Loop) -> None:
    count = [0]

    def hook() -> None:
        count[0] += 1

    loop.add_flush_hook(hook)
    loop.run_once(0.0)
    loop.run_once(0.0)
    assert count[0] == 2
    loop.remove_flush_hook(hook)
    loop.remove_flush_hook(hook)  # unknown hook: ignored
    loop.run_once(0.0)
    assert count[0] == 2


def test_hook_removing_itself_during_flush(loop: Loop) -> None:
    calls: list[str] = []

    def once() -> None:
        calls.append("once")
        loop.remove_flush_hook(once)

    loop.add_flush_hook(once)
    loop.add_flush_hook(lambda: calls.append("other"))
    loop.run_once(0.0)
    loop.run_once(0.0)
    assert calls == ["once", "other", "other"]


def test_run_and_stop(loop: Loop) -> None:
    ticks: list[int] = []

    def tick() -> None:
        ticks.append(1)
        if len(ticks) == 3:
            loop.stop()
        else:
            loop.call_later(0.001, tick)

    loop.call_later(0.001, tick)
    deadline = loop.call_later(2.0, loop.stop)  # safety net
    loop.run()
    deadline.cancel()
    assert len(ticks) == 3


def test_now_is_updated_each_iteration(loop: Loop) -> None:
    before = loop.now
    time.sleep(0.01)
    loop.run_once(0.0)
    assert loop.now > before


# --- the last-resort handler -------------------------------------------------------------------

def test_failing_fd_callback_closes_its_owner_and_the_loop_goes_on(loop: Loop) -> None:
    """A callback that raises: its owner's on_error closes that connection, the other fds
    and the timers are still served, run_once() never raises."""
    a1, b1 = socket.socketpair()
    a2, b2 = socket.socketpair()
    errors: list[Exception] = []
    served: list[bytes] = []

    def bad(_mask: int) -> None:
        raise RuntimeError("bug in a handler")

    def close_owner(e: Exception) -> None:
        errors.append(e)
        loop.remove_fd(a1.fileno())
        a1.close()

    try:
        loop.add_fd(a1.fileno(), EPOLLIN, bad, on_error=close_owner)
        loop.add_fd(a2.fileno(), EPOLLIN, lambda _m: served.append(a2.recv(16)))
        fired: list[int] = []
        loop.call_later(0, lambda: fired.append(1))
        b1.send(b"x")
        b2.send(b"y")
        loop.run_once(0.05)
        assert [type(e) for e in errors] == [RuntimeError] and loop.callback_errors == 1
        assert served == [b"y"] and fired == [1]
        with pytest.raises(ConnectionResetError):  # the owner closed it, data unread
            b1.recv(1)
        b2.send(b"z")
        run_until(loop, lambda: served == [b"y", b"z"])
    finally:
        loop.remove_fd(a2.fileno())
        for s in (a1, b1, a2, b2):
            s.close()


def test_failing_callback_without_owner_is_unwatched(loop: Loop) -> None:
    a, b = socket.socketpair()
    calls: list[int] = []

    def bad(_mask: int) -> None:
        calls.append(1)
        raise ValueError("oops")

    try:
        loop.add_fd(a.fileno(), EPOLLIN, bad)
        b.send(b"x")
        for _ in range(3):
            loop.run_once(0)
        assert calls == [1]  # not called again: no busy loop on a level-triggered fd
    finally:
        loop.remove_fd(a.fileno())
        a.close()
        b.close()


def test_failing_timer_and_flush_hook_do_not_end_the_loop(loop: Loop) -> None:
    hooks: list[int] = []

    def hook() -> None:
        hooks.append(1)
        raise KeyError("hook")

    loop.add_flush_hook(hook)
    loop.call_later(0, lambda: 1 / 0)
    loop.run_once(0)
    loop.run_once(0)
    assert hooks == [1, 1] and loop.callback_errors == 3
