"""The TCP_REPAIR helper protocol (vhostpasst/system/repair.py) on the daemon's side, against
our helper (vhostpasst-repair, a real process) and against hostile helpers: each failure is a
RepairError, the helper dropped and the next one welcome. No root, no network: UNIX sockets
and non-TCP fds only (tests/netns/test_repair.py sets TCP_REPAIR on real TCP sockets)."""

from __future__ import annotations

import array
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vhostpasst.core.loop import Loop
from vhostpasst.system.repair import SCM_MAX_FD, Command, RepairError, RepairServer

ROOT = Path(__file__).resolve().parents[2]


def helper_command(path: str | Path) -> list[str]:
    return [sys.executable, "-m", "vhostpasst.repair_helper", str(path)]


def pump_until(loop: Loop, pred: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        loop.run_once(0.01)


@pytest.fixture
def loop() -> Iterator[Loop]:
    lp = Loop()
    yield lp
    lp.close()


@pytest.fixture
def server(loop: Loop, tmp_path: Path) -> Iterator[RepairServer]:
    srv = RepairServer(loop, str(tmp_path / "passt.socket.repair"), timeout=0.3)
    yield srv
    srv.close()


class FakeHelper:
    """A helper in a thread: receives one request and answers with `answer(byte, fds)`
    (None: stay silent) after closing the fds."""

    def __init__(self, loop: Loop, server: RepairServer,
                 answer: Callable[[bytes, list[int]], bytes | None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(5)
        self.sock.connect(server.path)
        pump_until(loop, lambda: server.connected)
        self.answer = answer
        self.requests: list[tuple[int, int]] = []  # (command, number of fds)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while True:
                data, anc, _, _ = self.sock.recvmsg(1, socket.CMSG_SPACE(4 * SCM_MAX_FD))
                if not data:
                    return
                fds = array.array("i")
                for _, _, payload in anc:
                    fds.frombytes(payload)
                for fd in fds:
                    os.close(fd)
                self.requests.append((int.from_bytes(data, "little", signed=True), len(fds)))
                reply = self.answer(data, list(fds))
                if reply is None:
                    return
                self.sock.sendall(reply)
        except OSError:
            return

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the thread's recvmsg()
        except OSError:
            pass
        self.thread.join(5)
        self.sock.close()


def test_our_helper_refuses_an_fd_that_is_not_a_socket(loop: Loop, server: RepairServer):
    helper = subprocess.Popen(helper_command(server.path), cwd=ROOT, stderr=subprocess.PIPE,
                              text=True)
    try:
        pump_until(loop, lambda: server.connected)
        r, w = os.pipe()
        with pytest.raises(RepairError, match="hung up"):
            server.set([r], Command.ON)
        os.close(r)
        os.close(w)
        assert helper.wait(10) == 1
        assert "fd" in helper.stderr.read()  # type: ignore[union-attr]
        assert not server.connected
    finally:
        helper.kill()
        helper.wait()


def test_our_helper_refuses_a_socket_that_is_not_tcp(loop: Loop, server: RepairServer):
    helper = subprocess.Popen(helper_command(server.path), cwd=ROOT, stderr=subprocess.PIPE)
    try:
        pump_until(loop, lambda: server.connected)
        a, b = socket.socketpair()
        with pytest.raises(RepairError):
            server.set([a.fileno()], Command.ON)
        a.close()
        b.close()
        assert helper.wait(10) == 1
    finally:
        helper.kill()
        helper.wait()


def test_our_helper_exits_0_when_the_daemon_closes(loop: Loop, tmp_path: Path):
    """...and, connected, it runs with no-new-privileges (as passt-repair)."""
    srv = RepairServer(loop, str(tmp_path / "x.repair"))
    helper = subprocess.Popen(helper_command(srv.path), cwd=ROOT)
    try:
        pump_until(loop, lambda: srv.connected)
        status = Path(f"/proc/{helper.pid}/status").read_text()
        assert "NoNewPrivs:\t1" in status
    finally:
        srv.close()
    assert helper.wait(10) == 0


def test_our_helper_waits_in_a_directory_for_a_repair_socket(loop: Loop, tmp_path: Path):
    helper = subprocess.Popen(helper_command(tmp_path), cwd=ROOT)
    try:
        time.sleep(0.5)  # let it watch the directory (a socket made before is not its)
        (tmp_path / "other.socket").touch()  # not a *.repair name: ignored
        srv = RepairServer(loop, str(tmp_path / "vm.socket.repair"))
        try:
            pump_until(loop, lambda: srv.connected)
        finally:
            srv.close()
        assert helper.wait(10) == 0
    finally:
        helper.kill()
        helper.wait()


@pytest.mark.parametrize("args, status", [([], 2), (["a", "b"], 2), (["/nonexistent"], 1),
                                          (["/etc/hostname"], 2)])
def test_helper_usage_errors(args: list[str], status: int):
    run = subprocess.run([sys.executable, "-m", "vhostpasst.repair_helper", *args], cwd=ROOT,
                         capture_output=True, timeout=30)
    assert run.returncode == status


def test_requests_of_at_most_253_fds_each_echoed(loop: Loop, server: RepairServer):
    fake = FakeHelper(loop, server, lambda byte, fds: byte)
    a, b = socket.socketpair()
    try:
        server.set([a.fileno()] * 300, Command.OFF_NO_WP)
        server.set([a.fileno()], Command.OFF)
        assert fake.requests == [(-1, SCM_MAX_FD), (-1, 300 - SCM_MAX_FD), (0, 1)]
        assert server.connected
    finally:
        fake.close()
        a.close()
        b.close()


@pytest.mark.parametrize("behaviour, why", [
    ("wrong echo", "answered 0 to 1"),
    ("hang up", "hung up|reset"),
    ("silence", "no reply in time"),
])
def test_a_hostile_helper_fails_the_request_and_is_dropped(loop, server, behaviour, why):
    def answer(byte: bytes, fds: list[int]) -> bytes | None:
        if behaviour == "wrong echo":
            return b"\x00"
        if behaviour == "hang up":
            fake.sock.shutdown(socket.SHUT_RDWR)
        return None

    fake = FakeHelper(loop, server, answer)
    a, b = socket.socketpair()
    try:
        with pytest.raises(RepairError, match=why):
            server.set([a.fileno()], Command.ON)
        assert not server.connected
        second = FakeHelper(loop, server, lambda byte, fds: byte)  # the next one is welcome
        server.set([a.fileno()], Command.ON)
        second.close()
    finally:
        fake.close()
        a.close()
        b.close()


def test_no_helper(server: RepairServer):
    with pytest.raises(RepairError, match="no TCP_REPAIR helper"):
        server.set([0], Command.ON)


def test_a_second_helper_is_turned_away(loop: Loop, server: RepairServer):
    first = FakeHelper(loop, server, lambda byte, fds: byte)
    extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    extra.connect(server.path)
    extra.setblocking(False)

    def turned_away() -> bool:
        try:
            return extra.recv(1) == b""
        except BlockingIOError:
            return False

    try:
        pump_until(loop, turned_away)  # closed by the daemon at once
        assert server.helper is not None and server.connected
        a, b = socket.socketpair()
        server.set([a.fileno()], Command.ON)  # the first one still serves
        a.close()
        b.close()
    finally:
        extra.close()
        first.close()


def test_a_helper_hanging_up_or_talking_unasked_is_dropped(loop: Loop, server: RepairServer):
    fake = FakeHelper(loop, server, lambda byte, fds: byte)
    fake.sock.sendall(b"\x01")
    pump_until(loop, lambda: not server.connected)
    fake.close()
    fake = FakeHelper(loop, server, lambda byte, fds: byte)
    fake.close()
    pump_until(loop, lambda: not server.connected)


def test_a_stale_socket_file_is_taken_over_a_live_one_is_not(loop: Loop, tmp_path: Path):
    path = str(tmp_path / "s.repair")
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(path)
    stale.close()  # the file stays, nobody listens
    srv = RepairServer(loop, path)
    try:
        with pytest.raises(OSError, match="another process listens"):
            RepairServer(loop, path)
    finally:
        srv.close()
    assert not os.path.exists(path)
