"""Live migration of a guest on vhost-user (what KubeVirt and libvirt do to move a VM): qemu
migrates it from one daemon to another while it pings through the first, with the daemon
marking what it writes into guest memory in qemu's dirty log (VHOST_F_LOG_ALL); on the
destination the guest carries on through the second daemon (ping, a TCP download checked with
sha256), and the addresses the first daemon saw it use reach the second through qemu's
migration stream (DEVICE_STATE). And three TCP connections open through the first daemon (a
download, an upload, an inbound one on a `-t` port) move with the guest, each daemon with a
TCP_REPAIR helper (ours, vhostpasst-repair, and passt's passt-repair where installed), and
finish through the second one; with no helper they are reset and the guest carries on."""

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
FWD_PORT = 10019  # the guest's port behind -t, and the source daemon's
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


@pytest.fixture(params=["vhostpasst-repair", "passt-repair", "no helper"])
def helper_command(request: pytest.FixtureRequest) -> list[str] | None:
    """The TCP_REPAIR helper each daemon gets: ours, passt's where installed, or none."""
    if request.param == "vhostpasst-repair":
        return [sys.executable, "-m", "vhostpasst.repair_helper"]
    if request.param == "no helper":
        return None
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


class _Transfers:
    """Three TCP connections through the source daemon, each stopped half-way so that nothing
    is in flight while the source has closed its sockets and the destination has not yet
    rebuilt them (both daemons are on one host): a download (host server, guest client), an
    upload (guest client, host server) and an inbound connection (the host connects to the
    source's `-t` port, the guest's nc listens). `resume()` lets all three carry on."""

    def __init__(self, guest: Guest, netns: HostNetns, workdir: Path) -> None:
        self.go = workdir / "go"
        self.down, self.inbound = workdir / "down", workdir / "in"
        self.down.write_bytes(bytes(range(256)) * (16 << 10))  # 4 MiB
        self.inbound.write_bytes(os.urandom(1 << 20))
        self.peers: list[subprocess.Popen[str]] = []
        # the download: nc's stdin a pipe that never ends (the console is the harness's);
        # sha256sum writes /tmp/dl once nc ends
        self.peers.append(hostside(netns, "serve-send-paused", "127.0.0.1", str(PORT + 1),
                                   str(self.down), str(self.go)))
        guest.run(f"(sleep 900 | nc {HOST_GW4} {PORT + 1} 2>/dev/null | sha256sum > /tmp/dl &)")
        # the upload: made in the guest (seq is cheap under TCG), its second half sent once
        # /tmp/go exists there; busybox nc closes at the end of its input
        guest.run("seq 1 150000 > /tmp/up1; seq 150001 300000 > /tmp/up2")
        _, out = guest.run("cat /tmp/up1 /tmp/up2 | sha256sum; wc -c < /tmp/up1; "
                           "cat /tmp/up1 /tmp/up2 | wc -c")
        self.up_digest, half, self.up_size = out.split()[0], out.split()[2], out.split()[3]
        self.peers.append(hostside(netns, "serve-recv", "127.0.0.1", str(PORT + 2), half))
        guest.run(f"{{ {{ cat /tmp/up1; for i in $(seq 900); do [ -e /tmp/go ] && break; "
                  f"sleep 0.2; done; cat /tmp/up2; }} | nc {HOST_GW4} {PORT + 2} "
                  f">/dev/null 2>&1 & }}")
        # the inbound connection, to the guest's nc on FWD_PORT (its stdin a pipe that never
        # ends as well: at the end of its input nc half-closes, and half-closed connections
        # do not move)
        guest.run(f"{{ sleep 900 | nc -l -p {FWD_PORT} 2>/dev/null | sha256sum > /tmp/in & }}")
        guest.run(f"for i in $(seq 100); do netstat -ltn | grep -q ':{FWD_PORT} ' && break; "
                  "sleep 0.1; done", timeout=30)
        self.peers.append(hostside(netns, "send-paused", "127.0.0.1", str(FWD_PORT),
                                   str(self.inbound), str(self.go), ready=False))
        for peer in self.peers:
            assert peer.stdout is not None and peer.stdout.readline().strip() == "half"
        time.sleep(1)  # the guest takes it in and acknowledges it

    def resume(self, guest: Guest) -> None:
        self.go.touch()
        guest.run("touch /tmp/go")

    def check_finished(self, guest: Guest) -> None:
        """Each transfer completed on its connection, sha256 as sent."""
        _, out = guest.run("for i in $(seq 300); do grep -q ' -' /tmp/dl && "
                           "grep -q ' -' /tmp/in && break; sleep 0.2; done; cat /tmp/dl /tmp/in",
                           timeout=90)
        digests = [line.split()[0] for line in out.splitlines() if line.endswith(" -")]
        assert digests == [hashlib.sha256(self.down.read_bytes()).hexdigest(),
                           hashlib.sha256(self.inbound.read_bytes()).hexdigest()], out
        upload, inbound = self.peers[1], self.peers[2]
        assert upload.stdout is not None
        assert upload.stdout.readline().split() == [self.up_size, self.up_digest]
        assert inbound.wait(timeout=30) == 0

    def check_reset(self) -> None:
        """The host's ends saw their connections go: none of them ends with what was sent."""
        for peer in self.peers:
            try:
                peer.wait(timeout=60)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{peer.args}: still running after the reset") from None
        upload = self.peers[1]
        assert upload.stdout is not None
        assert upload.stdout.read().split() != [self.up_size, self.up_digest]

    def close(self) -> None:
        for peer in self.peers:
            stop_proc(peer)


def test_connections_in_progress_move_with_the_guest(
    image: Image, host_netns: HostNetns, workdir: Path, request: pytest.FixtureRequest,
    helper_command: list[str] | None
) -> None:
    """A download, an upload and an inbound `-t` connection are half-way when the guest
    migrates; with a TCP_REPAIR helper on each daemon (ours, or passt's where installed) the
    rest comes through the second daemon on the same connections and every sha256 matches.
    The source has --migrate-no-linger, as two daemons on one host need; the second daemon
    forwards another host port to the guest's (the first one still holds the port), which a
    new connection then uses. With no helper, the connections are reset and the guest carries
    on: a new connection works."""
    if "vhostpasst" not in " ".join(DAEMON):
        pytest.skip(f"{DAEMON[0]}: not vhostpasst")
    src, dst = workdir / "src", workdir / "dst"
    src.mkdir()
    dst.mkdir()
    for side in (src, dst):
        for log in ("daemon.log", "console.log", "qemu.log"):
            _track(request, f"{side.name} {log}", side / log)
    first = Daemon(src, host_netns, ("-d", "--migrate-no-linger", "-t", str(FWD_PORT)),
                   vhost_user=True)
    second = Daemon(dst, host_netns, ("-d", "-t", f"{FWD_PORT + 1}:{FWD_PORT}"),
                    vhost_user=True)
    helpers = ([] if helper_command is None else
               [_repair_helper(host_netns, daemon, helper_command) for daemon in (first, second)])
    source = target = transfers = None
    qmps: list[Qmp] = []
    try:
        source = Guest(image, src, GuestNet("vhost-user", first.socket), host_netns,
                       qmp=src / "qmp.sock")
        dhcp_lease(source)
        target = Guest(image, dst, GuestNet("vhost-user", second.socket), host_netns,
                       qmp=dst / "qmp.sock", incoming="defer")
        transfers = _Transfers(source, host_netns, workdir)
        qmps += [Qmp(src / "qmp.sock"), Qmp(dst / "qmp.sock")]
        _move(qmps, workdir)
        source.close()
        transfers.resume(target)
        if helper_command is None:
            transfers.check_reset()
            target.run(f"ping -c 1 -W 5 {HOST_GW4}", timeout=30)
        else:
            transfers.check_finished(target)
        # a new inbound connection, through the second daemon's -t
        target.run(f"{{ nc -l -p {FWD_PORT} 2>/dev/null | sha256sum > /tmp/new & }}")
        target.run(f"for i in $(seq 100); do netstat -ltn | grep -q ':{FWD_PORT} ' && break; "
                   "sleep 0.1; done", timeout=30)
        new = workdir / "new"
        new.write_bytes(os.urandom(64 << 10))
        sender = hostside(host_netns, "send", "127.0.0.1", str(FWD_PORT + 1), str(new),
                          ready=False)
        try:
            assert sender.wait(timeout=60) == 0
        finally:
            stop_proc(sender)
        _, out = target.run("for i in $(seq 100); do grep -q ' -' /tmp/new && break; "
                            "sleep 0.2; done; cat /tmp/new", timeout=60)
        assert out.split()[:1] == [hashlib.sha256(new.read_bytes()).hexdigest()], out
    finally:
        if transfers is not None:
            transfers.close()
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
    source_log, target_log = (src / "daemon.log").read_text(), (dst / "daemon.log").read_text()
    if helper_command is None:
        assert ("no TCP_REPAIR helper connected, 3 TCP connections reset instead of moved"
                in source_log), source_log[-3000:]
    else:
        assert "3 TCP connections saved, their sockets closed" in source_log, source_log[-3000:]
        assert "3 of 3 TCP connections restored" in target_log, target_log[-3000:]
