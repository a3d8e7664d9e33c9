"""The process's name as `ps` and `pgrep` show it.

Started through a console script, the process is called `python3` (or `vhostpasst`, the
script's name is lost once the interpreter runs). Users and tools look for `passt` and
`pasta` (`pgrep passt`, `ps -C pasta`), so the daemon names itself after what it runs as:
prctl(PR_SET_NAME) sets the name the kernel reports in /proc/PID/comm (at most 15 bytes).
"""

from __future__ import annotations

import ctypes

PR_SET_NAME = 15
COMM_MAX = 15  # TASK_COMM_LEN less the terminating NUL


def set_process_name(name: str) -> bool:
    """Name the calling thread (the main thread names the process); False if refused."""
    raw = name.encode(errors="replace")[:COMM_MAX]
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.prctl(PR_SET_NAME, ctypes.c_char_p(raw), 0, 0, 0) == 0
