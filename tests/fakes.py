"""Test doubles shared by the unit tests: the event loop without epoll or a clock."""

from __future__ import annotations

from collections.abc import Callable


class FakeTimer:
    """What FakeLoop.call_at() hands out: the callback and its time, until fired or cancelled."""

    def __init__(self, when: float, cb: Callable[[], None]) -> None:
        self.when, self.cb, self.cancelled = when, cb, False

    def cancel(self) -> None:
        self.cancelled = True


class FakeLoop:
    """The loop interface flows, protocols and links use (core.loop.EventLoop), driven by the
    test: `fds` maps each registered fd to (events, callback) for the test to call, `on_error`
    keeps the error handlers given with them, and `timers` the call_at() entries, which fire
    only when the test says so: all at once whatever their time (fire_timers), or those due
    as `now` advances, in order of time (advance, as Loop.run_once does)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.fds: dict[int, tuple[int, Callable[[int], None]]] = {}
        self.on_error: dict[int, Callable[[Exception], None]] = {}
        self.timers: list[FakeTimer] = []

    def add_fd(self, fd: int, events: int, cb: Callable[[int], None],
               on_error: Callable[[Exception], None] | None = None) -> None:
        assert fd not in self.fds
        self.fds[fd] = (events, cb)
        if on_error is not None:
            self.on_error[fd] = on_error

    def modify_fd(self, fd: int, events: int) -> None:
        self.fds[fd] = (events, self.fds[fd][1])

    def remove_fd(self, fd: int) -> None:
        self.fds.pop(fd, None)

    def call_at(self, when: float, cb: Callable[[], None]) -> FakeTimer:
        t = FakeTimer(when, cb)
        self.timers.append(t)
        return t

    def due(self) -> list[FakeTimer]:
        """The timers neither fired nor cancelled, whatever their time."""
        return [t for t in self.timers if not t.cancelled]

    def fire_timers(self) -> None:
        due, self.timers = self.timers, []
        for t in due:
            if not t.cancelled:
                t.cb()

    def advance(self, dt: float) -> None:
        self.now += dt
        while True:
            due = sorted((t for t in self.timers if t.when <= self.now and not t.cancelled),
                         key=lambda t: t.when)
            if not due:
                return
            for t in due:
                self.timers.remove(t)
                t.cb()
