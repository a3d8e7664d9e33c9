"""Two qemu guests, each with its own daemon in the same host namespace, talking through
forwarded host ports: guest 1 (stream socket) connects to the gateway address on PORT, which
its daemon maps to the host's loopback, where guest 2's daemon (vhost-user, -t PORT) listens
and forwards to guest 2. Data goes both ways on that one connection."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import _track, daemon_has_vhost_user
from harness import DAEMON, HOST_GW4, Daemon, Guest, GuestNet, HostNetns, dhcp_lease
from image import Image

PORT = 10005


def test_two_guests_through_forwarded_port(
    image: Image, host_netns: HostNetns, workdir: Path, request: pytest.FixtureRequest
) -> None:
    if not daemon_has_vhost_user():
        pytest.skip(f"{DAEMON[0]} --help says vhost-user is not supported yet")
    dirs = [workdir / "g1", workdir / "g2"]  # each daemon and guest keeps its own logs
    for d in dirs:
        d.mkdir()
        for log in ("daemon.log", "console.log", "qemu.log"):
            _track(request, f"{d.name} {log}", d / log)
    started: list[Daemon | Guest] = []
    try:
        d1 = Daemon(dirs[0], host_netns)
        started.append(d1)
        d2 = Daemon(dirs[1], host_netns, ("-t", str(PORT)), vhost_user=True)
        started.append(d2)
        g1 = Guest(image, d1.socket.parent, GuestNet("stream", d1.socket), host_netns)
        started.append(g1)
        g2 = Guest(image, d2.socket.parent, GuestNet("vhost-user", d2.socket), host_netns)
        started.append(g2)
        for g in (g1, g2):
            dhcp_lease(g)
        # Guest 2 answers with a line of its own after reading guest 1's (nc -l ends at EOF).
        g2.run(f"{{ echo from-guest-2 | nc -l -p {PORT} > /tmp/got & }}")
        g2.run(f"i=0; until netstat -ltn | grep -q ':{PORT} ' || [ $i -ge 100 ]; do "
               "i=$((i+1)); sleep 0.1; done")
        _, out = g1.run(f"echo from-guest-1 | nc -w 10 {HOST_GW4} {PORT}", timeout=60)
        assert "from-guest-2" in out, out
        g2.run("wait", timeout=30)
        _, got = g2.run("cat /tmp/got")
        assert got.strip() == "from-guest-1"
    finally:
        for obj in reversed(started):
            obj.close()
