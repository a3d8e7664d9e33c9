"""Live migration of a guest on vhost-user (what KubeVirt and libvirt do to move a VM): qemu
migrates it from one daemon to another while it pings through the first, with the daemon
marking what it writes into guest memory in qemu's dirty log (VHOST_F_LOG_ALL); on the
destination the guest carries on through the second daemon (ping, a TCP download checked with
sha256), and the addresses the first daemon saw it use reach the second through qemu's
migration stream (DEVICE_STATE). And a TCP download open through the first daemon moves with
the guest, each daemon with a TCP_REPAIR helper (ours, vhostpasst-repair, and passt's
passt-repair where installed), and finishes through the second one."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import _track
from harness import (
    DAEMON,
    HOST_GW4,
    Daemon,
    Guest,
    GuestNet,
    HostNetns,
    Qmp,
    dhcp_lease,
    download_checked,
    hostside,
    stop_proc,
)
from image import Image

PORT = 10009
SIZE = (1 << 20) + 77
MIGRATE_TIMEOUT = 180
REPO_ROOT = Path(__file__).resolve().parents[1]


def _migrate(qmp: Qmp, uri: str) -> dict:
    # no bandwidth cap on a local socket, and room for a TCG guest's last pass
    qmp.command("migrate-set-parameters", **{"max-bandwidth": 4 << 30,
                                             "downtime-limit": 2000})
    qmp.command("migrate", uri=uri)
    deadline = time.monotonic() + MIGRATE_TIMEOUT
    while time.monotonic() < deadline:
        info = qmp.command("query-migrate")
        if info.get("status") in ("completed", "failed", "cancelled"):
            return info
        time.sleep(0.5)
    raise AssertionError(f"migration did not end in {MIGRATE_TIMEOUT} s: {info}")


def _move(qmps: list[Qmp], workdir: Path) -> None:
    """Migrate from the guest of qmps[0] to the one of qmps[1] (started with -incoming
    defer); returns once the destination runs."""
    qmps[1].command("migrate-incoming", uri=f"unix:{workdir}/migrate.sock")  # listening
    info = _migrate(qmps[0], f"unix:{workdir}/migrate.sock")
    assert info["status"] == "completed", info
    ram = info.get("ram", {})
    print(f"migration: {info.get('total-time')} ms, downtime {info.get('downtime')} ms, "
          f"{ram.get('transferred', 0) >> 20} MiB sent, {ram.get('dirty-sync-count')} passes")
    for _ in range(100):
        if qmps[1].command("query-status")["status"] == "running":
            break
        time.sleep(0.1)
    assert qmps[1].command("query-status")["status"] == "running"


def test_guest_migrates_to_another_daemon_and_keeps_its_network(
    image: Image, host_netns: HostNetns, workdir: Path, request: pytest.FixtureRequest
) -> None:
    if "vhostpasst" not in " ".join(DAEMON):
        pytest.skip(f"{DAEMON[0]}: this passt build offers no dirty logging")
    src, dst = workdir / "src", workdir / "dst"
    src.mkdir()
    dst.mkdir()
    for side in (src, dst):
        for log in ("daemon.log", "console.log", "qemu.log"):
            _track(request, f"{side.name} {log}", side / log)
    first = Daemon(src, host_netns, ("-d",), vhost_user=True)
    second = Daemon(dst, host_netns, ("-d",), vhost_user=True)
    source = target = None
    qmps: list[Qmp] = []
    try:
        source = Guest(image, src, GuestNet("vhost-user", first.socket), host_netns,
                       qmp=src / "qmp.sock")
        lease = dhcp_lease(source)
        source.run(f"ping -c 1 -W 5 {HOST_GW4}", timeout=30)
        target = Guest(image, dst, GuestNet("vhost-user", second.socket), host_netns,
                       qmp=dst / "qmp.sock", incoming="defer")
        # frames to and from the guest while its memory is copied
        source.run(f"(ping -q -i 0.05 -c 400 {HOST_GW4} > /dev/null 2>&1 &)")
        qmps += [Qmp(src / "qmp.sock"), Qmp(dst / "qmp.sock")]
        _move(qmps, workdir)
        source.close()  # the first daemon's front end goes

        # The guest now runs behind the second daemon, with the lease it had.
        _, addr = target.run("ip -4 -o addr show dev eth0", timeout=30)
        assert lease["ip"] in addr, addr
        target.run(f"ping -c 2 -W 5 {HOST_GW4}", timeout=60)
        download_checked(target, host_netns, workdir / "down", SIZE, PORT)
    finally:
        for qmp in qmps:
            qmp.close()
        for guest in (source, target):
            if guest is not None:
                guest.close()
        first.close()
        second.close()
    log = (src / "daemon.log").read_text()
    assert "dirty page logging on" in log
    # what the first daemon wrote while qemu copied memory was marked (said as the log went,
    # when the source qemu quit)
    found = re.search(r"dirty log released: (\d+) writes marked", log)
    assert found and int(found.group(1)) > 0, log[-3000:]
    print(f"first daemon: {found.group(0)}")
    # the device state (DEVICE_STATE): the guest's MAC and address went through qemu's stream
    assert "device state: save of" in log, log[-3000:]
    restored = [line for line in (dst / "daemon.log").read_text().splitlines()
                if "device state restored: guest MAC" in line]
    assert restored and lease["ip"] in restored[0], (dst / "daemon.log").read_text()[-3000:]
    print(f"second daemon: {restored[0]}")


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


def _repair_helper(netns: HostNetns, daemon: Daemon, command: list[str]
                   ) -> subprocess.Popen[bytes]:
    """A TCP_REPAIR helper on the daemon's .repair socket (root in the namespace: it has
    CAP_NET_ADMIN), once the daemon logs it connected."""
    helper = subprocess.Popen(netns.argv([*command, f"{daemon.socket}.repair"]),
                              cwd=REPO_ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while "TCP_REPAIR helper connected" not in daemon.log.read_text(errors="replace"):
        assert time.monotonic() < deadline and helper.poll() is None, daemon.log_text()
        time.sleep(0.1)
    return helper


def test_a_download_in_progress_moves_with_the_guest(
    image: Image, host_netns: HostNetns, workdir: Path, request: pytest.FixtureRequest,
    helper_command: list[str]
) -> None:
    """The guest downloads a file; half-way (the server pausing, so that nothing is in flight
    while the source has closed its socket and the destination has not yet rebuilt it, both
    daemons being on one host) it migrates; the rest comes through the second daemon on the
    same connection and the sha256 matches. The source has --migrate-no-linger, as two
    daemons on one host need. With our helper, and with passt's where installed."""
    if "vhostpasst" not in " ".join(DAEMON):
        pytest.skip(f"{DAEMON[0]}: not vhostpasst")
    src, dst = workdir / "src", workdir / "dst"
    src.mkdir()
    dst.mkdir()
    for side in (src, dst):
        for log in ("daemon.log", "console.log", "qemu.log"):
            _track(request, f"{side.name} {log}", side / log)
    first = Daemon(src, host_netns, ("-d", "--migrate-no-linger"), vhost_user=True)
    second = Daemon(dst, host_netns, ("-d",), vhost_user=True)
    helpers = [_repair_helper(host_netns, daemon, helper_command)
               for daemon in (first, second)]
    source = target = server = None
    qmps: list[Qmp] = []
    data, go = workdir / "down", workdir / "go"
    data.write_bytes(bytes(range(256)) * (16 << 10))  # 4 MiB
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    try:
        source = Guest(image, src, GuestNet("vhost-user", first.socket), host_netns,
                       qmp=src / "qmp.sock")
        dhcp_lease(source)
        target = Guest(image, dst, GuestNet("vhost-user", second.socket), host_netns,
                       qmp=dst / "qmp.sock", incoming="defer")
        server = hostside(host_netns, "serve-send-paused", "127.0.0.1", str(PORT + 1),
                          str(data), str(go))
        # nc's stdin a pipe that never ends (the console is the harness's); sha256sum writes
        # /tmp/dl once nc ends
        source.run(f"(sleep 900 | nc {HOST_GW4} {PORT + 1} 2>/dev/null | sha256sum > /tmp/dl &)")
        assert server.stdout is not None and server.stdout.readline().strip() == "half"
        time.sleep(1)  # the guest takes it in and acknowledges it
        qmps += [Qmp(src / "qmp.sock"), Qmp(dst / "qmp.sock")]
        _move(qmps, workdir)
        source.close()
        go.touch()
        _, out = target.run("for i in $(seq 600); do grep -q ' -' /tmp/dl && break; "
                            "sleep 0.2; done; cat /tmp/dl", timeout=150)
        assert out.split()[:1] == [digest], out
    finally:
        if server is not None:
            stop_proc(server)
        for qmp in qmps:
            qmp.close()
        for guest in (source, target):
            if guest is not None:
                guest.close()
        first.close()
        second.close()
        for helper in helpers:
            helper.kill()
            helper.wait()
    assert "1 TCP connections saved, their sockets closed" in (src / "daemon.log").read_text()
    assert "1 of 1 TCP connections restored" in (dst / "daemon.log").read_text()
