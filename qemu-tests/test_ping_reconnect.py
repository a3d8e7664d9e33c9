"""Ping through the daemon's ping sockets (stream and vhost-user), and a vhost-user daemon that
is killed and restarted under a running guest: qemu reconnects (chardev reconnect-ms) and the
guest's network comes back without a reboot or a new DHCP lease."""

from __future__ import annotations

import re
import time

import pytest
from harness import HOST_GW4, Guest, SetupFactory
from test_stream_dhcp import _lease

KINDS = pytest.mark.parametrize("kind", ["stream", "vhost-user"])


def _ping(guest: Guest, target: str = HOST_GW4, count: int = 3) -> float:
    """Ping from the guest; every echo must come back. Returns the average RTT in ms."""
    _, out = guest.run(f"ping -c {count} -W 5 {target}", timeout=30)
    assert f"{count} packets received" in out, out
    m = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", out)
    assert m, out
    return float(m.group(1))


@KINDS
def test_ping_gateway(passt_setup: SetupFactory, kind: str) -> None:
    # The gateway address maps to the host's loopback: the echo goes out of a ping socket
    # in the host namespace and the reply comes back from 127.0.0.1 as from the gateway.
    guest = passt_setup(kind).guest
    _lease(guest)
    rtt = _ping(guest, count=5)
    print(f"{kind}: ping gateway avg rtt {rtt:.3f} ms")


def test_vhost_user_reconnect(passt_setup: SetupFactory) -> None:
    setup = passt_setup("vhost-user", reconnect_ms=200)
    guest = setup.guest
    _lease(guest)
    _ping(guest, count=1)
    for _ in range(2):  # twice: the second daemon must be as good as the first
        passt_setup.restart(setup)  # type: ignore[attr-defined]
        # qemu retries every 200 ms; give the guest's link a moment to come back.
        deadline = time.monotonic() + 30
        while True:
            rc, out = guest.run(f"ping -c 1 -W 1 {HOST_GW4}", timeout=20, check=False)
            if rc == 0:
                break
            assert time.monotonic() < deadline, f"no network after the restart:\n{out}"
        _ping(guest, count=2)  # the same address, no new lease: the guest never noticed
        _, addr = guest.run("ip -4 addr show dev eth0")
        assert "inet 192.0.2.2/24" in addr
    assert "vhost-user device running" in setup.daemon.log_text()
