"""What the isolation tests (test_isolation, test_daemon_sandbox) share: the capability masks
/proc/PID/status shows, and a hello server and client (`python -c PROGRAM ADDR PORT COUNT`) to
check that a daemon which dropped its privileges still serves the namespace."""

from __future__ import annotations

import subprocess
import sys

from tests.netns.sandbox import Sandbox
from vhostpasst.system import isolation

CAP_NONE = "0000000000000000"
CAP_NET_BIND = f"{1 << isolation.CAP_NET_BIND_SERVICE:016x}"

HELLO_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(64); s.settimeout(30)
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    c, a = s.accept(); c.sendall(b"hi " + a[0].encode()); c.close()
"""

HELLO_CLIENT = """
import socket, sys
out = []
for _ in range(int(sys.argv[3])):
    try:
        c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
        out.append(c.recv(100).decode() or "closed"); c.close()
    except OSError as e:
        out.append(f"error-{e.errno}")
print("\\n".join(out))
"""


def _start_hello(box: Sandbox, ns: str, addr: str, port: int, count: int) -> None:
    srv = box.popen_in(ns, sys.executable, "-c", HELLO_SERVER, addr, str(port), str(count),
                       stdout=subprocess.PIPE)
    assert srv.stdout is not None and srv.stdout.readline() == b"ready\n"


def _hello(box: Sandbox, ns: str, addr: str, port: int, count: int = 1) -> list[str]:
    r = box.run_in(ns, sys.executable, "-c", HELLO_CLIENT, addr, str(port), str(count),
                   timeout=60)
    return r.stdout.split("\n")[:-1] if r.stdout else [r.stderr]
