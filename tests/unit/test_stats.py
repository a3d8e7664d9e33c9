"""--stats: the counter table (core/stats.py) printed as passt prints its own."""

from __future__ import annotations

import io

from vhostpasst.core.stats import HEADER_EVERY, Stats


def test_lines_only_after_delay_and_a_change() -> None:
    now = [100.0]
    frames = [0]
    out = io.StringIO()
    stats = Stats(2, [("guest_rx", lambda: frames[0])], out, clock=lambda: now[0])
    stats.tick()
    assert out.getvalue() == ""  # the delay has not passed
    now[0] += 2
    frames[0] = 5
    stats.tick()
    header, line = out.getvalue().splitlines()
    assert header.split() == ["wakeups", "guest_rx"] and line.split() == ["2", "5"]
    now[0] += 5
    stats.tick()  # nothing changed: no line, as passt with no event
    assert len(out.getvalue().splitlines()) == 2
    frames[0] = 6
    stats.tick()  # changed, but checked less than DELAY ago
    now[0] += 2
    stats.tick()
    assert out.getvalue().splitlines()[-1].split() == ["5", "6"]


def test_header_every_twenty_lines() -> None:
    now = [0.0]
    out = io.StringIO()
    stats = Stats(1, [("n", lambda: int(now[0]))], out, clock=lambda: now[0])
    for _ in range(HEADER_EVERY + 1):
        now[0] += 1
        stats.tick()
    lines = out.getvalue().splitlines()
    assert len(lines) == HEADER_EVERY + 1 + 2
    assert lines[0] == lines[HEADER_EVERY + 1] and lines[0].split() == ["wakeups", "n"]
