#!/usr/bin/env python3
"""Which system calls each sandboxed mode made: reads the strace files written with
VHOSTPASST_SANDBOX_STRACE=PREFIX and VHOSTPASST_SANDBOX_MARK=1 (doc/sandbox.md) and prints, per
mode, the calls every thread made after its "vhostpasst-sandboxed MODE" marker.

    scripts/syscalls-seen.py /tmp/st/trace.*        # one line per mode: count and names
    scripts/syscalls-seen.py --python /tmp/st/trace.*  # tuples for system/syscalls.py
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict

LINE = re.compile(r"^(\d+)\s+(?:<\.\.\. (\w+) resumed>|(\w+)\()")
CHILD = re.compile(r"\) = (\d+)$")
MARK = re.compile(r'write\(-1, "vhostpasst-sandboxed ([\w-]+)"')


def scan(paths: list[str]) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = defaultdict(set)
    for path in paths:
        mode_of: dict[str, str] = {}  # tid -> mode: marked, or made by a marked tid
        with open(path, errors="replace") as f:
            for line in f:
                tid = line.split(None, 1)[0] if line[:1].isdigit() else ""
                m = MARK.search(line)
                if m:
                    mode_of[tid] = m.group(1)
                    continue
                lm = LINE.match(line)
                if not lm or tid not in mode_of:
                    continue  # parents before the fork, spawned commands, not sandboxed yet
                name = lm.group(2) or lm.group(3)
                seen[mode_of[tid]].add(name)
                child = CHILD.search(line)
                if name in ("clone", "clone3", "fork", "vfork") and child:
                    mode_of[child.group(1)] = mode_of[tid]  # a thread started once filtered
    return seen


def main() -> int:
    args = sys.argv[1:]
    python = "--python" in args
    seen = scan([a for a in args if a != "--python"])
    for mode in sorted(seen):
        names = sorted(seen[mode])
        if python:
            print(f"{mode.upper().replace('-', '_')} = (")
            line = "   "
            for n in names:
                if len(line) + len(n) + 4 > 95:
                    print(line)
                    line = "   "
                line += f' "{n}",'
            print(line)
            print(")")
        else:
            print(f"{mode} ({len(names)}): {' '.join(names)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
