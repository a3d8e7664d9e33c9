"""A record of the event loop's wake-ups, for performance work (VHOSTPASST_LOOP_TRACE=FILE).

Per wake-up: when it started (after epoll returned), how long its callbacks, timers and flush
hooks took, how many timers fired, and which fd callbacks ran, by label. Written as TSV when
the loop closes; `bench/wakeups.py` summarises a file. The daemon's CPU per byte is its
wake-ups per byte times their cost: this tells the two apart, and which kind of wake-up
costs what.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TextIO

ENV_LOOP_TRACE = "VHOSTPASST_LOOP_TRACE"  # the daemon traces its loop into this file
TRACE_LIMIT = 500_000  # wake-ups kept (~60 MB at most); the rest are only counted
HEADER = "start_s\tduration_us\ttimers\tcallbacks\n"


def label(callback: Callable[..., object] | None) -> str:
    """A callback's name for the trace: its qualified name; for a functools.partial, its
    function's, with the integer `index` of any argument that has one (a virtqueue: which
    queue was kicked)."""
    if callback is None:
        return "?"  # its fd was removed by an earlier callback of the same wake-up
    if isinstance(callback, functools.partial):
        indexes = [str(arg.index) for arg in callback.args
                   if isinstance(getattr(arg, "index", None), int)]
        name = label(callback.func)
        return f"{name}[{','.join(indexes)}]" if indexes else name
    return getattr(callback, "__qualname__", type(callback).__name__)


class WakeupTrace:
    """Wake-ups recorded by Loop.run_once() (Loop.trace_to()), written out by write()."""

    def __init__(self, out: TextIO, limit: int = TRACE_LIMIT) -> None:
        self.out = out
        self.limit = limit
        self.rows: list[tuple[float, float, int, tuple[str, ...]]] = []
        self.dropped = 0

    def add(self, start: float, end: float, timers: int, labels: Sequence[str]) -> None:
        if len(self.rows) < self.limit:
            self.rows.append((start, end, timers, tuple(labels)))
        else:
            self.dropped += 1

    def write(self) -> None:
        """The rows as TSV (callbacks comma-separated, "-" for none), then the file closes."""
        out = self.out
        try:
            out.write(HEADER)
            for start, end, timers, labels in self.rows:
                out.write(f"{start:.6f}\t{(end - start) * 1e6:.1f}\t{timers}\t"
                          f"{','.join(labels) or '-'}\n")
            if self.dropped:
                out.write(f"# {self.dropped} more wake-ups not recorded (limit {self.limit})\n")
        finally:
            out.close()
        self.rows = []
