"""ICMP echo and UDP end to end: a guest namespace behind tests/relay.py, vhostpasst in the host
namespace, a "remote" world namespace behind the host's uplink (see tests/sandbox.py).

What each test checks is what a program in the guest (or on the host) sees.
"""

from __future__ import annotations

import subprocess

from sandbox import Sandbox

GW4 = "192.0.2.1"
HOST4 = "192.0.2.2"
GW6 = "2001:db8::1"
HOST6 = "2001:db8::2"
OUR_MAC = "9a:55:9a:55:9a:55"


def configure_guest(sandbox: Sandbox, ipv6: bool = False) -> None:
    """What a DHCP client would do with the lease (IPv4), plus a static IPv6 set-up: the
    router's neighbour entry is static because NDP is somebody else's module."""
    sandbox.guest("ip", "addr", "add", f"{HOST4}/24", "dev", "tap0", check=True)
    sandbox.guest("ip", "route", "add", "default", "via", GW4, check=True)
    if ipv6:
        sandbox.guest("ip", "-6", "addr", "add", f"{HOST6}/64", "dev", "tap0", "nodad",
                      check=True)
        sandbox.guest("ip", "-6", "neigh", "replace", GW6, "lladdr", OUR_MAC, "dev", "tap0",
                      "nud", "permanent", check=True)
        sandbox.guest("ip", "-6", "route", "replace", "default", "via", GW6, check=True)


def start(sandbox: Sandbox, *args: str, ipv6: bool = False) -> None:
    sandbox.start_daemon(*args)
    sandbox.start_relay()
    configure_guest(sandbox, ipv6)


def ping(sandbox: Sandbox, addr: str, six: bool = False, count: int = 1,
         size: int = 56) -> subprocess.CompletedProcess[str]:
    cmd = ["busybox", "ping", *(["-6"] if six else []), "-c", str(count), "-W", "3",
           "-s", str(size), addr]
    return sandbox.guest(*cmd, timeout=15)


# --- ICMP echo -----------------------------------------------------------------------------


def test_ping_gateway_reaches_the_hosts_loopback(sandbox: Sandbox) -> None:
    """The gateway address is map-host-loopback: the host's 127.0.0.1 answers. Taking lo down
    in the host namespace makes the same ping fail, which shows it is the host that answers."""
    start(sandbox)
    r = ping(sandbox, GW4)
    assert r.returncode == 0, r.stdout + r.stderr + sandbox.daemon_log()
    assert "1 packets received" in r.stdout
    sandbox.host("ip", "link", "set", "lo", "down", check=True)
    r = ping(sandbox, GW4)
    assert r.returncode != 0, r.stdout


def test_ping_remote_host_and_large_payload(sandbox: Sandbox) -> None:
    """With --no-map-gw the gateway is the world namespace's 192.0.2.1 itself."""
    start(sandbox, "--no-map-gw")
    r = ping(sandbox, GW4, count=2)
    assert r.returncode == 0, r.stdout + r.stderr + sandbox.daemon_log()
    assert "2 packets received" in r.stdout
    r = ping(sandbox, GW4, size=1400)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_icmp_drops_echo_requests(sandbox: Sandbox) -> None:
    start(sandbox, "--no-icmp")
    r = ping(sandbox, GW4)
    assert r.returncode != 0


def test_ping6_gateway_and_remote(sandbox: Sandbox) -> None:
    start(sandbox, ipv6=True)
    r = ping(sandbox, GW6, six=True)  # map-host-loopback: the host's ::1
    assert r.returncode == 0, r.stdout + r.stderr + sandbox.daemon_log()
    sandbox.host("ip", "link", "set", "lo", "down", check=True)
    assert ping(sandbox, GW6, six=True).returncode != 0


def test_ping6_remote_with_no_map_gw(sandbox: Sandbox) -> None:
    start(sandbox, "--no-map-gw", ipv6=True)
    r = ping(sandbox, GW6, six=True, count=2)
    assert r.returncode == 0, r.stdout + r.stderr + sandbox.daemon_log()
