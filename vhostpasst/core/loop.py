"""The single-threaded event loop: one select.epoll, a timer heap, end-of-iteration flush hooks.

Every wake-up runs the ready fd callbacks, then the expired timers, then every flush hook
(so links write out what the handlers queued in one syscall per iteration, not per packet).

Last resort: an exception escaping a callback never leaves the loop (it would end the daemon
and every guest connection with it). It is logged, rate-limited by callback, with its traceback
(it is a bug, or hostile input a handler failed to refuse), and then:
- an fd callback registered with `on_error` (its owner: a front-end connection) has that
  called with the exception, which closes that one connection; if `on_error` itself fails, or
  there is none, the fd is no longer watched (a level-triggered fd whose callback keeps
  failing would otherwise spin the loop);
- a timer's or flush hook's exception is logged; the timer is gone, the hook stays.
Only Exception is caught: the daemon's SIGTERM/SIGQUIT (a BaseException) still ends the loop.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import select
import time
from collections.abc import Callable
from typing import Protocol, TextIO

from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.looptrace import TRACE_LIMIT, WakeupTrace, label

log = logging.getLogger(__name__)
_ratelimited = RateLimitedLog(log)

FdCallback = Callable[[int], None]  # called with the epoll event mask
Callback = Callable[[], None]
ErrorHandler = Callable[[Exception], None]  # the owner of an fd: close that connection

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR
EPOLLHUP = select.EPOLLHUP
EPOLLRDHUP = select.EPOLLRDHUP
EPOLLET = select.EPOLLET


class TimerHandle(Protocol):
    """What a caller of `call_at()` keeps: a way to cancel it."""

    def cancel(self) -> None: ...


class EventLoop(Protocol):
    """What flows, protocols and links need of the loop: `Loop` below, or a test's fake."""

    def add_fd(self, fd: int, events: int, callback: FdCallback,
               on_error: ErrorHandler | None = None) -> None: ...

    def modify_fd(self, fd: int, events: int) -> None: ...

    def remove_fd(self, fd: int) -> None: ...

    def call_at(self, when: float, callback: Callback) -> TimerHandle: ...


class Timer:
    """A scheduled callback; `cancel()` makes it a no-op (it stays in the heap until due)."""

    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callback) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    def __init__(self) -> None:
        self._epoll = select.epoll()
        self._fds: dict[int, FdCallback] = {}
        self._on_error: dict[int, ErrorHandler] = {}
        self.callback_errors = 0  # exceptions the last-resort handler caught (tests, logs)
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._flush_hooks: list[Callback] = []
        self._running = False
        self.now = time.monotonic()
        self._trace: WakeupTrace | None = None

    def trace_to(self, out: TextIO, limit: int = TRACE_LIMIT) -> None:
        """Record every wake-up from now on and write them to `out` at close()
        (vhostpasst/core/looptrace.py)."""
        self._trace = WakeupTrace(out, limit)

    # fds
    def add_fd(self, fd: int, events: int, callback: FdCallback,
               on_error: ErrorHandler | None = None) -> None:
        """Watch `fd`; `on_error(exc)`: what to do when `callback` raises (close the
        connection the fd belongs to), see the module docstring."""
        self._epoll.register(fd, events)
        self._fds[fd] = callback
        if on_error is not None:
            self._on_error[fd] = on_error
        else:
            self._on_error.pop(fd, None)

    def modify_fd(self, fd: int, events: int) -> None:
        self._epoll.modify(fd, events)

    def remove_fd(self, fd: int) -> None:
        self._on_error.pop(fd, None)
        if self._fds.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except (OSError, ValueError):
                pass  # fd already closed: the kernel dropped it from the set

    # timers
    def call_later(self, delay: float, callback: Callback) -> Timer:
        return self.call_at(time.monotonic() + delay, callback)

    def call_at(self, when: float, callback: Callback) -> Timer:
        timer = Timer(when, callback)
        heapq.heappush(self._timers, (when, next(self._seq), timer))
        return timer

    # flush hooks
    def add_flush_hook(self, callback: Callback) -> None:
        self._flush_hooks.append(callback)

    def remove_flush_hook(self, callback: Callback) -> None:
        if callback in self._flush_hooks:
            self._flush_hooks.remove(callback)

    # running
    def stop(self) -> None:
        self._running = False

    def run(self) -> None:
        self._running = True
        while self._running:
            self.run_once()

    def run_once(self, max_wait: float = 1.0) -> None:
        timeout = max_wait
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - time.monotonic()))
        try:
            events = self._epoll.poll(timeout, 64)
        except InterruptedError:
            events = []
        self.now = time.monotonic()
        trace = self._trace
        labels = [label(self._fds.get(fd)) for fd, _ in events] if trace is not None else ()
        for fd, mask in events:
            callback = self._fds.get(fd)
            if callback is not None:
                try:
                    callback(mask)
                except Exception as e:  # the last resort: see the module docstring
                    self._fd_failed(fd, callback, e)
        fired = self._run_timers()
        for hook in list(self._flush_hooks):
            try:
                hook()
            except Exception as e:
                self._failed("flush hook", hook, e)
        if trace is not None:
            trace.add(self.now, time.monotonic(), fired, labels)

    def _run_timers(self) -> int:
        """Run the timers that are due; how many fired."""
        now = time.monotonic()
        fired = 0
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                fired += 1
                try:
                    timer.callback()
                except Exception as e:
                    self._failed("timer", timer.callback, e)
        return fired

    def _failed(self, what: str, callback: Callable[..., object], e: Exception) -> None:
        self.callback_errors += 1
        name = label(callback)
        _ratelimited.error((what, name), "%s %s failed: %s: %s", what, name,
                           type(e).__name__, e, exc_info=e)

    def _fd_failed(self, fd: int, callback: FdCallback, e: Exception) -> None:
        self._failed(f"fd {fd} callback", callback, e)
        on_error = self._on_error.get(fd)
        if on_error is not None:
            try:
                on_error(e)
            except Exception as e2:
                self._failed(f"fd {fd} error handler", on_error, e2)
            else:
                if self._fds.get(fd) is not callback:
                    return  # the owner closed it (or something else took the fd number)
        _ratelimited.error(("unwatched", label(callback)), "fd %d no longer watched", fd)
        self.remove_fd(fd)

    def close(self) -> None:
        self._epoll.close()
        if self._trace is not None:
            trace, self._trace = self._trace, None
            trace.write()
