"""core/process.py's background start, in a child Python of its own (it forks and the parent
exits): the waiting parent writes the child's pid once the child is ready and exits 0, or
exits 1 with the pid file left empty when the child dies before being ready."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import os, sys
from vhostpasst.core.process import Process

pid_file, outcome, seen = sys.argv[1:4]
process = Process()
process.open_pid_file(pid_file)
process.to_background()
with open(seen, "w") as f:  # the child's own view of its pid
    f.write(str(os.getpid()))
if outcome == "ready":
    process.ready(os.open(os.devnull, os.O_RDWR))
os._exit(0 if outcome == "ready" else 3)
"""


def _start(tmp_path: Path, outcome: str) -> tuple[int, str, str]:
    pid_file, seen = tmp_path / "pid", tmp_path / "seen"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(pid_file), outcome, str(seen)],
                       capture_output=True, text=True, timeout=30)
    return r.returncode, pid_file.read_text(), seen.read_text()


def test_ready_child_s_pid_goes_into_the_pid_file_and_the_parent_exits_0(tmp_path: Path) -> None:
    status, pid_text, child_pid = _start(tmp_path, "ready")
    assert status == 0
    assert pid_text == f"{child_pid}\n"


def test_a_child_gone_before_ready_makes_the_parent_exit_1(tmp_path: Path) -> None:
    status, pid_text, child_pid = _start(tmp_path, "fail")
    assert status == 1
    assert child_pid  # the child ran
    assert pid_text == ""  # created at start, never filled
