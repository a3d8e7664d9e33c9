"""Our TCP_REPAIR helper (vhostpasst-repair, a real process with root's CAP_NET_ADMIN), and
passt's passt-repair when installed, set and clear TCP_REPAIR on real TCP sockets connected
inside the sandbox's host namespace, that the daemon's side of the protocol
(vhostpasst/system/repair.py) hands them; the connection carries data again once repair mode
is off. And the daemon listens for a helper next to its vhost-user socket."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.sandbox import Sandbox, wait_until
from tests.netns.vhost_sandbox import start_vhost_daemon
from vhostpasst.core.loop import Loop
from vhostpasst.system.netns import NsThread
from vhostpasst.system.repair import TCP_REPAIR, Command, RepairServer

ROOT = Path(__file__).resolve().parents[2]
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_SEND_QUEUE = 2


def _connected_pair() -> tuple[socket.socket, socket.socket]:
    """A TCP connection to ourselves on the sandbox host's address (run in its namespace)."""
    with socket.create_server(("192.0.2.2", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=5)
        accepted, _ = listener.accept()
    return client, accepted


def _repair(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR)


def _passt_repair() -> str | None:
    """passt's helper (Debian 13's passt package has it), from VPT_PASST_REPAIR or PATH."""
    return os.environ.get("VPT_PASST_REPAIR") or shutil.which("passt-repair")


@pytest.fixture(params=["vhostpasst-repair", "passt-repair"])
def helper_command(request: pytest.FixtureRequest) -> list[str]:
    if request.param == "vhostpasst-repair":
        return [sys.executable, "-m", "vhostpasst.repair_helper"]
    found = _passt_repair()
    if found is None:
        pytest.skip("passt-repair not installed (or VPT_PASST_REPAIR not set)")
    return [found]


def test_a_helper_sets_and_clears_tcp_repair_on_real_sockets(
        sandbox: Sandbox, helper_command: list[str]) -> None:
    """Ours, and passt's (the same protocol): either serves the daemon's side."""
    loop = Loop()
    server = RepairServer(loop, str(sandbox.dir / "vm.socket.repair"))
    helper = subprocess.Popen([*helper_command, server.path], cwd=ROOT, stderr=subprocess.PIPE,
                              text=True)
    ns_fd = os.open(f"/run/netns/{sandbox.host_ns}", os.O_RDONLY)
    ns = NsThread(ns_fd)
    try:
        deadline = time.monotonic() + 10
        while not server.connected:
            assert time.monotonic() < deadline and helper.poll() is None, "no helper"
            loop.run_once(0.05)
        client, accepted = ns.call(_connected_pair)
        with client, accepted:
            assert (_repair(client), _repair(accepted)) == (0, 0)

            server.set([client.fileno(), accepted.fileno()], Command.ON)
            assert (_repair(client), _repair(accepted)) == (1, 1)
            # what only repair mode allows: choosing a queue and reading its sequence
            client.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
            client.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ)

            server.set([client.fileno()], Command.OFF_NO_WP)
            server.set([accepted.fileno()], Command.OFF)
            assert (_repair(client), _repair(accepted)) == (0, 0)
            client.sendall(b"still connected")
            accepted.settimeout(5)
            assert accepted.recv(100) == b"still connected"
        server.close()
        assert helper.wait(10) == 0, helper.stderr.read()  # type: ignore[union-attr]
    finally:
        helper.kill()
        helper.wait()
        ns.close()
        os.close(ns_fd)
        server.close()
        loop.close()


def _helper_connected(box: Sandbox) -> bool:
    return "TCP_REPAIR helper connected" in box.daemon_stderr_text()


def test_the_daemon_listens_for_a_helper_next_to_its_socket(sandbox: Sandbox) -> None:
    """`--vhost-user -s PATH`: the helper's socket is PATH.repair (passt's default); our
    helper connects once the daemon is sandboxed and is logged; it exits 0 with the
    daemon. `--repair-path none`: no socket."""
    start_vhost_daemon(sandbox, command=[sys.executable, "-m", "vhostpasst"])
    path = sandbox.socket_path + ".repair"
    helper = subprocess.Popen([sys.executable, "-m", "vhostpasst.repair_helper", path],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: _helper_connected(sandbox), 15, "the helper connected")
        assert f"TCP_REPAIR helper socket: {path}" in sandbox.daemon_stderr_text()
        assert sandbox.stop_daemon() == 0, sandbox.daemon_log()
        assert helper.wait(10) == 0, helper.stderr.read()  # type: ignore[union-attr]
    finally:
        helper.kill()
        helper.wait()
    Path(path).unlink()  # the first daemon, in its empty root by then, left it behind
    start_vhost_daemon(sandbox, "--repair-path", "none",
                       command=[sys.executable, "-m", "vhostpasst"])
    assert not Path(path).exists() and "TCP_REPAIR" not in sandbox.daemon_stderr_text()


def test_our_helper_connects_to_passt(sandbox: Sandbox) -> None:
    """passt (VPT_PASST names its command, e.g. Debian 13's) accepts vhostpasst-repair on its
    own .repair socket, and the helper exits 0 when passt goes."""
    passt = os.environ.get("VPT_PASST")
    if not passt:
        pytest.skip("VPT_PASST not set (the command of a passt with --repair-path)")
    sandbox.start_daemon("--vhost-user", command=[passt])
    path = sandbox.socket_path + ".repair"
    helper = subprocess.Popen([sys.executable, "-m", "vhostpasst.repair_helper", path],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: "Accepted TCP_REPAIR helper" in sandbox.daemon_stderr_text(), 15,
                   "passt accepting the helper")
        sandbox.stop_daemon()
        assert helper.wait(10) == 0, helper.stderr.read()  # type: ignore[union-attr]
    finally:
        helper.kill()
        helper.wait()
