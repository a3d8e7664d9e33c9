"""Live migration of a guest on vhost-user (what KubeVirt and libvirt do to move a VM): qemu
migrates it from one daemon to another while it pings through the first, with the daemon
marking what it writes into guest memory in qemu's dirty log (VHOST_F_LOG_ALL); on the
destination the guest carries on through the second daemon (ping, a TCP download checked with
sha256), and the addresses the first daemon saw it use reach the second through qemu's
migration stream (DEVICE_STATE). Connections open through the first daemon do not move yet
(that takes the TCP_REPAIR helper, issue 21's next step)."""

from __future__ import annotations

import re
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
)
from image import Image

PORT = 10009
SIZE = (1 << 20) + 77
MIGRATE_TIMEOUT = 180


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
