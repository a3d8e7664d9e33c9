"""Profile a running daemon for the benches' --profile options: py-spy (the Python stacks,
wall time, collapsed) or perf (CPU time, user and kernel, by symbol; works for passt too).

py-spy samples without stopping the daemon (--nonblocking), so the daemon's wait in epoll
counts as active: leave out the samples that end in Loop.run_once's poll line.
"""

from __future__ import annotations

import signal
import subprocess
import time


def start(pid: int, out: str, profiler: str = "py-spy", rate: int = 250
          ) -> subprocess.Popen[bytes]:
    """Attach `profiler` ("py-spy" or "perf") to `pid`, writing `out`, until stop()."""
    argv = (["perf", "record", "-e", "cpu-clock", "-F", str(rate), "-g", "-p", str(pid),
             "-o", out]
            if profiler == "perf" else
            ["py-spy", "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate),
             "--nonblocking", "-o", out])
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1)  # attached
    return proc


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT: the profiler writes its output and exits (killed after 30 s)."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
