"""--stats end to end: pasta (spawn mode) prints its counter table on standard error while
the namespace sends frames. Test-made namespaces and documentation addresses only."""

from __future__ import annotations

import shutil
import sys

import pytest

from tests.netns.pasta_sandbox import run_pasta
from tests.netns.sandbox import Sandbox

TRAFFIC = """
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(25):
    s.sendto(b"x", ("192.0.2.1", 9))
    time.sleep(0.1)
"""


def test_pasta_stats_table(sandbox: Sandbox) -> None:
    if shutil.which("nsenter") is None:
        pytest.skip("needs nsenter")
    r = run_pasta(sandbox, "--runas", "0", "--config-net", "--stats", "1", "-t", "none",
                  "-u", "none", "-T", "none", "-U", "none", "--", sys.executable, "-c", TRAFFIC)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    header = [i for i, line in enumerate(lines) if line.split()[:2] == ["wakeups", "guest_rx"]]
    assert header, r.stderr
    names = lines[header[0]].split()
    assert names == ["wakeups", "guest_rx", "guest_tx", "dropped", "tcp", "udp", "icmp",
                     "splice"]
    rows = [dict(zip(names, map(int, line.split()), strict=True))
            for line in lines[header[0] + 1:] if line.split() and line.split()[0].isdigit()]
    assert len(rows) >= 2, r.stderr  # about one a second over 2.5 s
    assert rows[-1]["guest_rx"] >= 20 and rows[-1]["udp"] >= 1, r.stderr
