#!/usr/bin/env python3
"""Summarise a loop trace (VHOSTPASST_LOOP_TRACE=FILE, vhostpasst/core/looptrace.py): wake-ups
per second and, per kind (the fd callbacks that ran, "timers" when only timers did), how
many, their median and 90th-percentile duration and their share of the time awake.

    VHOSTPASST_LOOP_TRACE=/tmp/loop.tsv vhostpasst --vhost-user -f -s /tmp/vu.sock ...
    python bench/wakeups.py /tmp/loop.tsv [--from S] [--to S]

--from/--to keep the wake-ups that started S seconds after the first one (e.g. only the
measured iperf3 run). Durations are wall time from epoll's return to the end of the flush
hooks: the daemon's CPU, plus any time it was preempted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def kind(timers: int, callbacks: str) -> str:
    if callbacks != "-":
        return callbacks
    return "timers" if timers else "nothing (timeout)"


def read(path: Path) -> list[tuple[float, float, str]]:
    """(start s, duration µs, kind) per wake-up."""
    rows = []
    with open(path) as f:
        for line in f:
            if line.startswith(("start_s", "#")) or not line.strip():
                continue
            start, duration, timers, callbacks = line.rstrip("\n").split("\t")
            rows.append((float(start), float(duration), kind(int(timers), callbacks)))
    return rows


def summary(rows: list[tuple[float, float, str]]) -> list[str]:
    if not rows:
        return ["no wake-ups"]
    span = rows[-1][0] - rows[0][0]
    busy = sum(d for _, d, _ in rows)
    lines = [f"{len(rows)} wake-ups in {span:.2f} s ({len(rows) / span if span else 0:.0f}/s), "
             f"awake {busy / 1e6:.3f} s"]
    by_kind: dict[str, list[float]] = defaultdict(list)
    for _, duration, k in rows:
        by_kind[k].append(duration)
    lines.append(f"{'count':>8} {'median µs':>10} {'p90 µs':>8} {'share':>6}  kind")
    for k, durations in sorted(by_kind.items(), key=lambda kv: -sum(kv[1])):
        durations.sort()
        p90 = durations[min(len(durations) - 1, int(0.9 * len(durations)))]
        lines.append(f"{len(durations):>8} {statistics.median(durations):>10.1f} {p90:>8.1f} "
                     f"{sum(durations) / busy:>6.1%}  {k}")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", type=Path)
    p.add_argument("--from", dest="start", type=float, default=0.0, metavar="S")
    p.add_argument("--to", dest="end", type=float, default=float("inf"), metavar="S")
    args = p.parse_args()
    rows = read(args.trace)
    if rows:
        t0 = rows[0][0]
        rows = [r for r in rows if args.start <= r[0] - t0 < args.end]
    print("\n".join(summary(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
