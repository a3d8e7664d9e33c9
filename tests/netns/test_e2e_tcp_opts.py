"""TCP end to end, the options that change where a guest connection goes or comes from:
DNS forwarding (53/853), -o/--outbound, --outbound-if4, --freebind for -t listeners and
--map-guest-addr. Same layout and helpers as test_e2e_tcp.py (documentation addresses only,
everything inside the sandbox's namespaces).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.netns.sandbox import Sandbox, wait_until
from tests.netns.tcp_guest import GW4, GW6, HOST4, MIB, client, log_lines, serve, start


@pytest.mark.sandbox(resolv_conf="nameserver 127.0.0.53\n")
def test_dns_forward_reaches_the_loopback_resolver(sandbox: Sandbox) -> None:
    """The host's resolver is on its loopback (127.0.0.53, systemd-resolved style): the guest
    is told the gateway address, and TCP to it on port 53 reaches 127.0.0.53, not 127.0.0.1
    (where map-host-loopback alone would send it)."""
    start(sandbox)
    log = serve(sandbox, sandbox.host_ns, "127.0.0.53", 53, "sink")
    r = client(sandbox, sandbox.guest_ns, GW4, 53, "send", 4096)
    assert r["answer"] == ["4096", r["sha"]], r
    assert log_lines(log)[0].split()[0] == "127.0.0.1"  # the daemon's loopback socket
    # another port of the gateway is plain map-host-loopback: 127.0.0.1, nothing listens
    assert client(sandbox, sandbox.guest_ns, GW4, 54, "refused") == {"refused": True}


@pytest.mark.sandbox(resolv_conf="nameserver 127.0.0.53\n")
def test_dns_forward_explicit_address_and_port_853(sandbox: Sandbox) -> None:
    """--dns-forward ADDR: TCP to ADDR port 853 (DNS over TLS) goes to the resolver too."""
    start(sandbox, "--dns-forward", "192.0.2.53")
    log = serve(sandbox, sandbox.host_ns, "127.0.0.53", 853, "sink")
    r = client(sandbox, sandbox.guest_ns, "192.0.2.53", 853, "send", 1000)
    assert r["answer"] == ["1000", r["sha"]], r
    assert len(log_lines(log)) == 1


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_outbound_address_is_the_source_seen_remotely(sandbox: Sandbox, six: bool) -> None:
    """-o ADDR: the host socket is bound to ADDR, a secondary address of the host; the
    remote server sees it instead of the host's primary address."""
    extra = "2001:db8::3" if six else "192.0.2.3"
    sandbox.host("ip", "addr", "add", f"{extra}/{64 if six else 24}", "dev", "up0",
                 *(["nodad"] if six else []), check=True)
    start(sandbox, "--no-map-gw", "-o", extra)
    server = GW6 if six else GW4
    log = serve(sandbox, sandbox.world_ns, server, 5101, "sink")
    r = client(sandbox, sandbox.guest_ns, server, 5101, "send", MIB)
    assert r["answer"] == [str(MIB), r["sha"]], r
    assert log_lines(log)[0].split()[0] == extra


def test_outbound_if4_binds_to_the_interface(sandbox: Sandbox) -> None:
    """--outbound-if4 up1: a second upstream link; the remote address is routed through up0
    by default (lower metric) but the daemon's sockets are bound to up1, so the server sees
    up1's address as the source."""
    sandbox.host("ip", "link", "add", "up1", "type", "veth", "peer", "name", "upw1",
                 "netns", sandbox.world_ns, check=True)
    sandbox.world("ip", "addr", "add", "198.51.100.1/24", "dev", "upw1", check=True)
    sandbox.world("ip", "link", "set", "upw1", "up", check=True)
    sandbox.world("ip", "addr", "add", "203.0.113.1/32", "dev", "lo", check=True)
    sandbox.host("ip", "addr", "add", "198.51.100.2/24", "dev", "up1", check=True)
    sandbox.host("ip", "link", "set", "up1", "up", check=True)
    sandbox.host("ip", "route", "add", "203.0.113.1", "via", "192.0.2.1", "dev", "up0",
                 "metric", "10", check=True)
    sandbox.host("ip", "route", "add", "203.0.113.1", "via", "198.51.100.1", "dev", "up1",
                 "metric", "100", check=True)
    log = serve(sandbox, sandbox.world_ns, "0.0.0.0", 5102, "sink")
    # without the option the host's own route is taken: source 192.0.2.2 (up0)
    start(sandbox, "--no-map-gw", "-4")
    r = client(sandbox, sandbox.guest_ns, "203.0.113.1", 5102, "send", 1000)
    assert r["answer"] == ["1000", r["sha"]], r
    assert log_lines(log, 1)[0].split()[0] == HOST4
    sandbox.stop_relay()
    sandbox.stop_daemon()
    sandbox.guest("ip", "addr", "flush", "dev", "tap0", check=True)
    start(sandbox, "--no-map-gw", "-4", "--outbound-if4", "up1")
    r = client(sandbox, sandbox.guest_ns, "203.0.113.1", 5102, "send", 1000)
    assert r["answer"] == ["1000", r["sha"]], r
    assert log_lines(log, 2)[1].split()[0] == "198.51.100.2"


UDP_ECHO_ONCE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
d, peer = s.recvfrom(2048)
s.sendto(b"echo:" + d, peer)
"""


def test_freebind_listener_on_an_address_not_yet_configured(sandbox: Sandbox) -> None:
    """-t ADDR/PORT with ADDR not on the host: without --freebind the daemon cannot bind
    and exits; with it, it listens, and once ADDR appears connections to it are forwarded."""
    sandbox.start_daemon("-t", "192.0.2.77/5103", wait=False)
    wait_until(lambda: sandbox.daemon.poll() is not None, 10,  # type: ignore[union-attr]
               "the daemon to give up")
    assert sandbox.daemon.returncode != 0  # type: ignore[union-attr]
    assert "5103" in sandbox.daemon_log()
    sandbox.daemon_pid = None
    start(sandbox, "--freebind", "-t", "192.0.2.77/5103")
    log = serve(sandbox, sandbox.guest_ns, HOST4, 5103, "sink")
    sandbox.host("ip", "addr", "add", "192.0.2.77/24", "dev", "up0", check=True)
    r = client(sandbox, sandbox.world_ns, "192.0.2.77", 5103, "send", MIB)
    assert r["answer"] == [str(MIB), r["sha"]], r
    assert log_lines(log)[0].split()[0] == GW4  # the world's address, as the guest sees it


def test_freebind_udp_listener_on_an_address_not_yet_configured(sandbox: Sandbox) -> None:
    """--freebind holds for -u as for -t (reference 2.3): without it the daemon cannot
    bind the address and exits; with it, it starts and forwards once the address appears."""
    sandbox.start_daemon("-u", "192.0.2.78/5105", "-t", "none", wait=False)
    wait_until(lambda: sandbox.daemon.poll() is not None, 10,  # type: ignore[union-attr]
               "the daemon to give up")
    assert sandbox.daemon.returncode != 0  # type: ignore[union-attr]
    sandbox.daemon_pid = None
    start(sandbox, "--freebind", "-u", "192.0.2.78/5105", "-t", "none")
    echo = sandbox.popen_in(sandbox.guest_ns, sys.executable, "-c", UDP_ECHO_ONCE, HOST4,
                            "5105", stdout=subprocess.PIPE)
    assert echo.stdout is not None and echo.stdout.readline() == b"ready\n"
    sandbox.host("ip", "addr", "add", "192.0.2.78/24", "dev", "up0", check=True)
    r = sandbox.world(sys.executable, "-c",
                      "import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                      "s.settimeout(5); s.sendto(b'q', ('192.0.2.78', 5105));"
                      "print(s.recvfrom(100)[0].decode())", timeout=15)
    assert r.stdout.strip() == "echo:q", r.stderr + sandbox.daemon_log()


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_map_guest_addr_reaches_the_hosts_own_address(sandbox: Sandbox, six: bool) -> None:
    """--map-guest-addr ADDR: the guest connects to ADDR and reaches a server bound to the
    host's own address (which the guest cannot name: it is its own address too)."""
    mapped = "2001:db8::99" if six else "192.0.2.99"
    start(sandbox, "--map-guest-addr", mapped)
    own = "2001:db8::2" if six else HOST4
    log = serve(sandbox, sandbox.host_ns, own, 5104, "sink")
    if six:
        sandbox.guest("ip", "-6", "route", "replace", f"{mapped}/128", "via", GW6, check=True)
    r = client(sandbox, sandbox.guest_ns, mapped, 5104, "send", MIB)
    assert r["answer"] == [str(MIB), r["sha"]], r
    assert len(log_lines(log)) == 1
