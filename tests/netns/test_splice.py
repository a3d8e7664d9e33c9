"""The loopback splice path (pasta -T): a connection to 127.0.0.1:P inside the namespace reaches
the host's 127.0.0.1:P through splice(2), 200 MiB each way, checked with sha256."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.netns.checked_stream import CLIENT, MIB, SERVER, SIZE_MIB, _expected
from tests.netns.pasta_sandbox import pasta_command
from tests.netns.sandbox import Sandbox


@pytest.mark.parametrize("family, addr", [("4", "127.0.0.1"), ("6", "::1")])
def test_tcp_ns_to_host_spliced(sandbox: Sandbox, family: str, addr: str) -> None:
    port = 5000 + int(family)
    server = sandbox.popen_in(sandbox.host_ns, sys.executable, "-c", SERVER, addr, str(port),
                              str(SIZE_MIB), stdout=subprocess.PIPE)
    assert server.stdout is not None and server.stdout.readline() == b"ready\n"
    # --runas 0: the command is Python under /root, out of nobody's reach
    r = sandbox.host(*pasta_command(), "--runas", "0", "--config-net", "-T", str(port), "--",
                     sys.executable, "-c", CLIENT, addr, str(port), str(SIZE_MIB), timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    sent, echoed, got, n = r.stdout.split()
    assert sent == echoed  # what the namespace sent arrived intact on the host
    assert got == _expected(2, SIZE_MIB) and int(n) == SIZE_MIB * MIB  # and back
    assert server.wait(10) == 0


def test_tcp_ns_port_translation_and_refused(sandbox: Sandbox) -> None:
    # -T 6001:6002: namespace port 6001 goes to host port 6002; nothing listens on 6002 at
    # first, so the namespace sees the connection closed, and pasta keeps running
    script = ("import socket, sys\n"
              "c = socket.create_connection(('127.0.0.1', 6001), timeout=5)\n"
              "print('closed' if c.recv(10) == b'' else 'data')\n")
    r = sandbox.host(*pasta_command(), "--runas", "0", "-T", "6001:6002", "--", sys.executable,
                     "-c", script, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "closed"
