"""--stats DELAY: event counters on standard error, as passt prints them.

passt counts its epoll events by kind and, after an event, when at least DELAY seconds went
by since the last line, prints one line of cumulative counts (a header of the counters' names
every 20 lines); with no event, nothing. We have no kinds of epoll events to count, so the
columns are what the daemon counts already: frames from and to the guest (the links'
counters), the event loop's wake-ups, and flows open now by kind (read only when a line may
be due). `Stats.tick()` is a flush hook of the loop: per wake-up it costs an increment and a
comparison; the counters are read at most once per DELAY, and a line is printed only if one
of them (wake-ups aside) changed since the last line.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TextIO

from vhostpasst.core.loop import Loop

log = logging.getLogger(__name__)

Counter = tuple[str, Callable[[], int]]  # (column name, current value)

HEADER_EVERY = 20  # lines, as passt
WIDTH = 9


class Stats:
    """Counters printed at most every `delay` seconds, after a change."""

    def __init__(self, delay: float, counters: Sequence[Counter], out: TextIO = sys.stderr,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.delay = delay
        self.counters = list(counters)
        self.out = out
        self.clock = clock
        self.wakeups = 0
        self.lines = 0
        self._checked = clock()
        self._last: list[int] | None = None

    def names(self) -> list[str]:
        return ["wakeups", *(name for name, _ in self.counters)]

    def tick(self) -> None:
        """Once per wake-up of the loop (a flush hook)."""
        self.wakeups += 1
        now = self.clock()
        if now - self._checked < self.delay:
            return
        self._checked = now
        values = [read() for _, read in self.counters]
        if values == self._last:
            return  # no event worth a line: nothing, as passt
        self._last = values
        if self.lines % HEADER_EVERY == 0:
            self.out.write("".join(f"{n:>{WIDTH}}" for n in self.names()) + "\n")
        self.out.write("".join(f"{v:>{WIDTH}}" for v in (self.wakeups, *values)) + "\n")
        self.out.flush()
        self.lines += 1


def watch(loop: Loop, delay: int | None, counters: Sequence[Counter]) -> Stats | None:
    """--stats: the counters printed from the loop's flush hook; None for no (or 0) DELAY."""
    if not delay:
        return None
    stats = Stats(delay, counters)
    loop.add_flush_hook(stats.tick)
    log.info("--stats: event counters on standard error, %d s apart at least", delay)
    return stats
