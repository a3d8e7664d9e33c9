"""A guest with two vCPUs and two vhost-user queue pairs (`-netdev vhost-user,queues=2`, what
libvirt's <driver queues='2'/> and KubeVirt's multiqueue ask for): it starts (qemu refuses to,
against a back end without MQ), and with its transmit steering (XPS) sending everything on
its second TX queue, DHCP, ping and TCP both ways with sha256 still work; the daemon's log
counts the frames that came on that pair."""

from __future__ import annotations

import re
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
    dhcp_lease,
    download_checked,
    hostside,
    stop_proc,
)
from image import Image

PORT = 10007
SIZE = (4 << 20) + 321


def test_two_queue_pairs_second_tx_queue_carries_the_traffic(
    image: Image, host_netns: HostNetns, workdir: Path, request: pytest.FixtureRequest
) -> None:
    if "vhostpasst" not in " ".join(DAEMON):
        pytest.skip(f"{DAEMON[0]}: multiqueue is vhostpasst's (passt offers one queue pair)")
    for log in ("daemon.log", "console.log", "qemu.log"):
        _track(request, log, workdir / log)
    daemon = Daemon(workdir, host_netns, vhost_user=True)
    guest = None
    server = None
    try:
        guest = Guest(image, workdir, GuestNet("vhost-user", daemon.socket, queues=2),
                      host_netns, mem="512M", smp=2)
        _, queues = guest.run("ls /sys/class/net/eth0/queues")
        assert queues.split() == ["rx-0", "rx-1", "tx-0", "tx-1"], queues
        # Both CPUs transmit on tx-1, none on tx-0 (sockets opened from now on).
        guest.run("echo 0 > /sys/class/net/eth0/queues/tx-0/xps_cpus; "
                  "echo 3 > /sys/class/net/eth0/queues/tx-1/xps_cpus")
        lease = dhcp_lease(guest)
        assert lease["router"] == HOST_GW4
        guest.run(f"ping -c 2 -W 5 {HOST_GW4}", timeout=30)

        digest = download_checked(guest, host_netns, workdir / "down", SIZE, PORT, keep="/tmp/up")
        server = hostside(host_netns, "serve-recv", "127.0.0.1", str(PORT))
        guest.run(f"nc {HOST_GW4} {PORT} < /tmp/up", timeout=180)
        assert server.stdout is not None
        assert server.stdout.readline().split() == [str(SIZE), digest]
    finally:
        if server is not None:
            stop_proc(server)
        if guest is not None:
            guest.close()  # the front end goes: the daemon logs its counters
        daemon.close()  # (even when its SIGTERM comes while it unmaps the guest's memory)
    log = (workdir / "daemon.log").read_text()
    found = re.search(r"from queue pairs after the first: pair 1: (\d+)", log)
    assert found, log[-3000:]
    # the upload alone is over 4 MiB in at most 64 KiB frames: some 70 frames or more
    assert int(found.group(1)) >= 64, found.group(0)
