"""The sandbox with vhost-user instead of the stream socket: tests/netns/vhost_relay.py plays
qemu and the guest's virtio-net driver, attaching the guest namespace's tap to the daemon's
rings.

    start_vhost_daemon(box)   vhostpasst -f -s <dir>/passt.socket --vhost-user ARGS (host ns)
    start_vhost_relay(box)    tests/netns/vhost_relay.py in the guest ns, connected when it returns

The relay reports in the status-file format of tests/netns/relay.py, and the helper sets the
Sandbox's relay attributes, so wait_relay(), relay_status(), stop_relay(), relay_log() and
teardown (which kills it) work as for the stream relay. Nothing in sandbox.py changes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.netns.sandbox import Sandbox

# The relay runs as a module from the repository root (it imports tests.virtio.frontend).
REPO_ROOT = Path(__file__).resolve().parents[2]
FULL_RX_BUF = 12 + 14 + 65520  # an RX buffer the daemon can write a 65520-MTU frame into


def start_vhost_daemon(box: Sandbox, *args: str, **kw: object) -> subprocess.Popen[bytes]:
    return box.start_daemon("--vhost-user", *args, **kw)  # type: ignore[arg-type]


def start_vhost_relay(box: Sandbox, *extra: str, wait: bool = True, timeout: float = 10,
                      socket_path: str | None = None) -> subprocess.Popen[bytes]:
    """Attach the guest's tap to the daemon over vhost-user; `extra` goes to vhost_relay.py
    (--rx-buf-size N, --queue-size N, --no-csum, --tso, --batch N)."""
    if box.relay is not None and box.relay.poll() is None:
        raise AssertionError("a relay is already running; stop_relay() first")
    box._relay_runs += 1
    box.relay_status_path = str(box.dir / f"vhost-relay-{box._relay_runs}.status")
    box.relay_stderr = box.dir / f"vhost-relay-{box._relay_runs}.stderr"
    cmd = [sys.executable, "-m", "tests.netns.vhost_relay",
           "--socket", socket_path or box.socket_path,
           "--tap", box.config.tap, "--status-file", box.relay_status_path,
           "--connect-timeout", str(timeout), "-v", *extra]
    with open(box.relay_stderr, "wb") as err:
        box.relay = box.popen_in(box.guest_ns, *cmd, stdin=subprocess.DEVNULL, stdout=err,
                                 stderr=err, cwd=REPO_ROOT)
    if wait:
        try:
            box.wait_relay("connected", timeout=timeout + 5)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{box.relay_log()}\n{box.daemon_log()}") from None
    return box.relay
