"""A live TCP connection moves between two vhost-user daemons with the guest.

Both daemons run in the sandbox's host namespace, each with our TCP_REPAIR helper
(vhostpasst-repair, root's CAP_NET_ADMIN) on its `.repair` socket; the source has
--migrate-no-linger, since on one host the destination cannot bind and connect the moved
socket's address while the source still holds it. tests/netns/vhost_relay.py plays qemu and
the guest's driver: on SIGUSR1 it stops the rings on the source, saves its device state,
and starts the destination from that state on the same guest memory, as qemu's migration
does. The guest (the guest namespace's kernel) has a connection to an echo server in the
world namespace, used before the migration and idle during it (on one host a segment of the
far end reaching the host between the source's close and the destination's rebuild would
meet no socket and be answered with a RST); after it, a transfer both ways on the same
connection finishes on the destination, the sha256 of what came back equal to what was sent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.netns.sandbox import Sandbox, vhostpasst_command, wait_until
from tests.netns.test_e2e_vhost import GW4, _serve, configure_guest
from tests.netns.vhost_sandbox import REPO_ROOT, start_vhost_daemon, start_vhost_relay

MIB = 1 << 20

# The guest's client: one connection; SIZE bytes echoed, then READY made and GO awaited
# (the migration happens meanwhile), then SIZE2 bytes echoed; prints the sha256s as JSON.
CLIENT = """
import hashlib, json, os, socket, sys, threading, time
addr, port, size, size2, ready, go = sys.argv[1:]
block = bytes(range(256)) * 4096
s = socket.create_connection((addr, int(port)), timeout=60)
def echo(n):
    sent, got = hashlib.sha256(), hashlib.sha256()
    def reader():
        left = n
        while left:
            data = s.recv(min(left, 1 << 16))
            if not data:
                break
            got.update(data)
            left -= len(data)
    th = threading.Thread(target=reader)
    th.start()
    left = n
    while left:
        piece = block[:min(left, len(block))]
        s.sendall(piece)
        sent.update(piece)
        left -= len(piece)
    th.join(60)
    return sent.hexdigest(), got.hexdigest()
before = echo(int(size))
open(ready, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
after = echo(int(size2))
s.close()
print(json.dumps({"before": before, "after": after}))
"""


def _helper(box: Sandbox, path: str) -> subprocess.Popen[bytes]:
    return box.popen_in(box.host_ns, sys.executable, "-m", "vhostpasst.repair_helper", path,
                        cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _destination(box: Sandbox) -> tuple[str, Path]:
    """The second daemon, on its own socket; its socket path and its log."""
    path = str(box.dir / "dest.socket")
    log = box.dir / "dest.stderr"
    with open(log, "wb") as err:
        box.popen_in(box.host_ns, *vhostpasst_command(), "-f", "-s", path, "--vhost-user",
                     "--no-map-gw", stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    wait_until(lambda: os.path.exists(path), 15, "the destination's socket")
    return path, log


def test_an_established_connection_moves_with_the_guest(sandbox: Sandbox) -> None:
    box = sandbox
    start_vhost_daemon(box, "--no-map-gw", "--migrate-no-linger")
    dest_path, dest_log = _destination(box)
    _helper(box, box.socket_path + ".repair")
    _helper(box, dest_path + ".repair")
    wait_until(lambda: "TCP_REPAIR helper connected" in box.daemon_stderr_text()
               and "TCP_REPAIR helper connected" in dest_log.read_text(), 15,
               "both helpers connected")
    start_vhost_relay(box, "--migrate-to", dest_path)
    configure_guest(box)
    _serve(box, 7001, "echo")
    ready, go = box.dir / "ready", box.dir / "go"
    client = box.popen_in(box.guest_ns, sys.executable, "-c", CLIENT, GW4, "7001",
                          str(4 * MIB), str(32 * MIB), str(ready), str(go),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(ready.exists, 30, "the first transfer done")
    time.sleep(0.3)  # the last ACKs on their way
    assert box.relay is not None
    box.relay.send_signal(signal.SIGUSR1)
    status = box.wait_relay("connected", connections=2, timeout=20)
    go.touch()
    out, err = client.communicate(timeout=120)
    source_log, dest_text = box.daemon_stderr_text(), dest_log.read_text()
    logs = f"{out!r} {err!r}\n{source_log}\n--- destination ---\n{dest_text}\n{box.relay_log()}"
    assert status["migrated"] == "1", logs
    assert client.returncode == 0, logs
    report = json.loads(out)
    for sent, echoed in (report["before"], report["after"]):
        assert sent == echoed, logs
    assert "1 TCP connections saved, their sockets closed" in source_log, logs
    assert "1 of 1 TCP connections restored" in dest_text, logs
    assert "reset" not in dest_text, logs
