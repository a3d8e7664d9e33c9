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

import pytest

from tests.netns.sandbox import Sandbox, vhostpasst_command, wait_until
from tests.netns.tcp_guest import GW6
from tests.netns.tcp_guest import configure_guest as configure_both
from tests.netns.test_e2e_vhost import GW4, _serve, configure_guest
from tests.netns.test_repair import _passt_repair
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

# Either end of a connection with full queues at the migration: sends SEND bytes (a thread,
# from the start) and reads nothing until GO exists, then reads RECV bytes; writes its
# sha256s as JSON to OUT. As the server: "serve ADDR PORT READY"; as the client: "connect
# ADDR PORT READY" (READY made once listening, or 1 s after connecting: the queues filled).
PEER = """
import hashlib, json, os, socket, sys, threading, time
role, addr, port, ready, send_n, recv_n, go, out = sys.argv[1:]
block = bytes(range(251)) * 4177
if role == "serve":
    lst = socket.create_server((addr, int(port)))
    open(ready, "w").close()
    lst.settimeout(60)
    s, _ = lst.accept()
else:
    s = socket.create_connection((addr, int(port)), timeout=60)
s.settimeout(60)
sent = hashlib.sha256()
def sender():
    left = int(send_n)
    while left:
        piece = block[:min(left, len(block))]
        s.sendall(piece)
        sent.update(piece)
        left -= len(piece)
th = threading.Thread(target=sender)
th.start()
if role == "connect":
    time.sleep(1)
    open(ready, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
got, left = hashlib.sha256(), int(recv_n)
while left:
    data = s.recv(min(left, 1 << 16))
    if not data:
        break
    got.update(data)
    left -= len(data)
th.join(60)
with open(out, "w") as f:
    json.dump({"sent": sent.hexdigest(), "got": got.hexdigest(), "missing": left}, f)
"""


def _migrate(box: Sandbox) -> dict[str, str]:
    """Have the relay move the guest to the destination; its status once it has."""
    assert box.relay is not None
    box.relay.send_signal(signal.SIGUSR1)

    def moved() -> dict[str, str] | None:
        status = box.relay_status()
        assert box.relay is not None and box.relay.poll() is None, box.relay_log()
        return status if status.get("migrated") == "1" else None

    return wait_until(moved, 20, "the relay migrated")  # type: ignore[no-any-return]


def _helper(box: Sandbox, path: str, command: list[str] | None = None
            ) -> subprocess.Popen[bytes]:
    """A TCP_REPAIR helper (ours unless `command`) for the daemon socket's `path`."""
    argv = command or [sys.executable, "-m", "vhostpasst.repair_helper"]
    return box.popen_in(box.host_ns, *argv, path, cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL)


@pytest.fixture(params=["vhostpasst-repair", "passt-repair"])
def helper_command(request: pytest.FixtureRequest) -> list[str]:
    """Our helper, and passt's where installed (the same protocol serves either daemon)."""
    if request.param == "vhostpasst-repair":
        return [sys.executable, "-m", "vhostpasst.repair_helper"]
    found = _passt_repair()
    if found is None:
        pytest.skip("passt-repair not installed (or VPT_PASST_REPAIR not set)")
    return [found]


def _destination(box: Sandbox) -> tuple[str, Path]:
    """The second daemon, on its own socket; its socket path and its log."""
    path = str(box.dir / "dest.socket")
    log = box.dir / "dest.stderr"
    with open(log, "wb") as err:
        box.popen_in(box.host_ns, *vhostpasst_command(), "-f", "-s", path, "--vhost-user",
                     "--no-map-gw", stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    wait_until(lambda: os.path.exists(path), 15, "the destination's socket")
    return path, log


@pytest.mark.parametrize("far", [GW4, GW6], ids=["ipv4", "ipv6"])
def test_an_established_connection_moves_with_the_guest(sandbox: Sandbox, far: str,
                                                        helper_command: list[str]) -> None:
    box = sandbox
    start_vhost_daemon(box, "--no-map-gw", "--migrate-no-linger")
    dest_path, dest_log = _destination(box)
    _helper(box, box.socket_path + ".repair", helper_command)
    _helper(box, dest_path + ".repair", helper_command)
    wait_until(lambda: "TCP_REPAIR helper connected" in box.daemon_stderr_text()
               and "TCP_REPAIR helper connected" in dest_log.read_text(), 15,
               "both helpers connected")
    start_vhost_relay(box, "--migrate-to", dest_path)
    configure_both(box)  # IPv4 and IPv6
    _serve(box, 7001, "echo", addr=far)
    ready, go = box.dir / "ready", box.dir / "go"
    client = box.popen_in(box.guest_ns, sys.executable, "-c", CLIENT, far, "7001",
                          str(4 * MIB), str(32 * MIB), str(ready), str(go),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(ready.exists, 30, "the first transfer done")
    time.sleep(0.3)  # the last ACKs on their way
    _migrate(box)
    go.touch()
    out, err = client.communicate(timeout=120)
    source_log, dest_text = box.daemon_stderr_text(), dest_log.read_text()
    logs = f"{out!r} {err!r}\n{source_log}\n--- destination ---\n{dest_text}\n{box.relay_log()}"
    assert client.returncode == 0, logs
    report = json.loads(out)
    for sent, echoed in (report["before"], report["after"]):
        assert sent == echoed, logs
    assert "1 TCP connections saved, their sockets closed" in source_log, logs
    assert "1 of 1 TCP connections restored" in dest_text, logs
    assert "reset" not in dest_text, logs


def test_full_queues_move_both_ways_and_the_source_exits(sandbox: Sandbox) -> None:
    """Neither end reads while the connection moves: the source socket's send queue (guest
    data the far end has not taken) and its receive queue (far-end data the guest has not
    taken) are full; on the destination both are delivered, whole and in order. The source,
    with --migrate-exit, exits 0 once the migration completed."""
    box = sandbox
    daemon = start_vhost_daemon(box, "--no-map-gw", "--migrate-no-linger", "--migrate-exit")
    dest_path, dest_log = _destination(box)
    _helper(box, box.socket_path + ".repair")
    _helper(box, dest_path + ".repair")
    wait_until(lambda: "TCP_REPAIR helper connected" in box.daemon_stderr_text()
               and "TCP_REPAIR helper connected" in dest_log.read_text(), 15,
               "both helpers connected")
    start_vhost_relay(box, "--migrate-to", dest_path)
    configure_guest(box)
    go = box.dir / "go"
    size = 8 * MIB  # more than the windows on the way let through before GO
    server = [str(box.dir / n) for n in ("srv-ready", "srv-out")]
    box.popen_in(box.world_ns, sys.executable, "-c", PEER, "serve", GW4, "7002", server[0],
                 str(size), str(size), str(go), server[1])
    wait_until(Path(server[0]).exists, 10, "the server listening")
    client = [str(box.dir / n) for n in ("cli-ready", "cli-out")]
    box.popen_in(box.guest_ns, sys.executable, "-c", PEER, "connect", GW4, "7002", client[0],
                 str(size), str(size), str(go), client[1])
    wait_until(Path(client[0]).exists, 15, "the queues full")
    status = _migrate(box)
    go.touch()
    wait_until(lambda: all(Path(p).exists() for p in (server[1], client[1])), 60,
               "both ends done")
    srv, cli = (json.loads(Path(p[1]).read_text()) for p in (server, client))
    source_log, dest_text = box.daemon_stderr_text(), dest_log.read_text()
    logs = f"{srv} {cli}\n{source_log}\n--- destination ---\n{dest_text}\n{box.relay_log()}"
    assert int(status["state_bytes"]) > 16 << 10, logs  # queued data went with the state
    assert srv["missing"] == cli["missing"] == 0, logs
    assert srv["got"] == cli["sent"] and cli["got"] == srv["sent"], logs
    assert "1 of 1 TCP connections restored" in dest_text, logs
    assert daemon.wait(10) == 0, logs
    assert "migration complete, exiting (--migrate-exit)" in source_log, logs


def test_without_a_helper_the_guest_moves_and_its_connection_resets(sandbox: Sandbox) -> None:
    """No TCP_REPAIR helper: the migration completes, the source says once that it resets
    the connections, and the guest's connection is reset (not left hanging)."""
    box = sandbox
    start_vhost_daemon(box, "--no-map-gw", "--migrate-no-linger")
    dest_path, dest_log = _destination(box)
    start_vhost_relay(box, "--migrate-to", dest_path)
    configure_guest(box)
    _serve(box, 7003, "echo")
    ready, go = box.dir / "ready", box.dir / "go"
    client = box.popen_in(box.guest_ns, sys.executable, "-c", CLIENT, GW4, "7003",
                          str(MIB), str(MIB), str(ready), str(go),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    wait_until(ready.exists, 30, "the first transfer done")
    _migrate(box)
    go.touch()
    out, err = client.communicate(timeout=60)
    source_log = box.daemon_stderr_text()
    logs = f"{out!r} {err!r}\n{source_log}\n{dest_log.read_text()}\n{box.relay_log()}"
    # the reset reaches the reader thread (ECONNRESET) or the writer (EPIPE) first
    assert b"Connection reset by peer" in err or b"Broken pipe" in err, logs
    if client.returncode == 0:  # the writer had finished: the echo never came back
        sent, echoed = json.loads(out)["after"]
        assert sent != echoed, logs
    assert source_log.count("no TCP_REPAIR helper connected, 1 TCP connections reset") == 1, \
        logs


def _established_to(box: Sandbox, port: int) -> int:
    out = box.host("ss", "-Htn", "state", "established", f"dport = :{port}", check=True).stdout
    return len(out.splitlines())


def test_by_default_the_source_keeps_the_moved_sockets(sandbox: Sandbox) -> None:
    """Without --migrate-no-linger the source keeps the moved socket open (in repair mode):
    on one host the destination then cannot connect its copy (EADDRNOTAVAIL, logged), and
    the source's socket is still there, established, after the migration."""
    box = sandbox
    start_vhost_daemon(box, "--no-map-gw")
    dest_path, dest_log = _destination(box)
    _helper(box, box.socket_path + ".repair")
    _helper(box, dest_path + ".repair")
    wait_until(lambda: "TCP_REPAIR helper connected" in box.daemon_stderr_text()
               and "TCP_REPAIR helper connected" in dest_log.read_text(), 15,
               "both helpers connected")
    start_vhost_relay(box, "--migrate-to", dest_path)
    configure_guest(box)
    _serve(box, 7004, "echo")
    ready, go = box.dir / "ready", box.dir / "go"
    client = box.popen_in(box.guest_ns, sys.executable, "-c", CLIENT, GW4, "7004",
                          str(MIB), str(MIB), str(ready), str(go),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(ready.exists, 30, "the first transfer done")
    _migrate(box)
    source_log, dest_text = box.daemon_stderr_text(), dest_log.read_text()
    logs = f"{source_log}\n--- destination ---\n{dest_text}\n{box.relay_log()}"
    assert "1 TCP connections saved, their sockets kept until the daemon exits" in source_log, \
        logs
    assert "not restored: Cannot assign requested address" in dest_text, logs
    assert _established_to(box, 7004) == 1, logs  # the source's, in repair mode
    go.touch()
    client.kill()
    client.wait()
    assert box.stop_daemon() == 0, logs
    wait_until(lambda: _established_to(box, 7004) == 0, 10, "the kept socket gone with it")


# A hostile TCP_REPAIR helper: takes each request and answers a byte that is not its echo.
BAD_HELPER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
s.settimeout(60)
while True:
    data, anc, _, _ = s.recvmsg(1, socket.CMSG_SPACE(253 * 4))
    if not data:
        break
    s.sendall(bytes([(data[0] + 7) & 0xFF]))
"""


def test_a_helper_that_answers_wrong_fails_the_migration_cleanly(sandbox: Sandbox) -> None:
    """The helper answers another byte than the request's: the source's save fails (its
    CHECK_DEVICE_STATE says so, qemu would cancel the migration), the helper is dropped, the
    connection is reset rather than left frozen, and the daemon carries on."""
    box = sandbox
    start_vhost_daemon(box, "--no-map-gw", "--migrate-no-linger")
    dest_path, _ = _destination(box)
    box.popen_in(box.host_ns, sys.executable, "-c", BAD_HELPER, box.socket_path + ".repair")
    wait_until(lambda: "TCP_REPAIR helper connected" in box.daemon_stderr_text(), 15,
               "the helper connected")
    start_vhost_relay(box, "--migrate-to", dest_path)
    configure_guest(box)
    _serve(box, 7005, "echo")
    ready, go = box.dir / "ready", box.dir / "go"
    client = box.popen_in(box.guest_ns, sys.executable, "-c", CLIENT, GW4, "7005",
                          str(MIB), str(MIB), str(ready), str(go),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(ready.exists, 30, "the first transfer done")
    assert box.relay is not None
    box.relay.send_signal(signal.SIGUSR1)
    box.relay.wait(30)  # the relay gives up when the source fails its state
    go.touch()
    client.kill()
    client.wait()
    text = box.daemon_stderr_text()
    logs = f"{text}\n{box.relay_log()}"
    assert "migration failed" in box.relay_log(), logs
    assert "TCP_REPAIR helper dropped: it answered 8 to 1" in text, logs
    assert "device state: " in text and "TCP_REPAIR on the connections to move" in text, logs
    assert _established_to(box, 7005) == 0, logs  # reset, not left in repair mode
    assert box.daemon_alive(), logs
