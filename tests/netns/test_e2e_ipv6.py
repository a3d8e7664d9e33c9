"""IPv6 end to end: the guest namespace's kernel and real DHCPv6 clients against vhostpasst.

The daemon runs in the sandbox's host namespace (2001:db8::2/64, default via 2001:db8::1, the
test resolv.conf with `nameserver 2001:db8::53`); tests/netns/relay.py attaches the guest's tap0.
What is checked is what the guest ends up with: a SLAAC address and a default route from our
Router Advertisements, the host's address and DNS from DHCPv6, our MAC for every neighbour.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import subprocess
from ipaddress import IPv6Address

import pytest

from tests.netns.sandbox import CLEAN_ENV, DEFAULT_MAC, Sandbox, wait_until

HOST_ADDR6 = "2001:db8::2"
PREFIX = ipaddress.IPv6Network("2001:db8::/64")
DNS6 = "2001:db8::53"  # the IPv6 nameserver of the sandbox's default resolv.conf
SEARCH = ["example.org", "test.example"]


def _has_udhcpc6() -> bool:
    if shutil.which("busybox") is None:
        return False
    r = subprocess.run(["busybox", "udhcpc6", "--help"], capture_output=True, text=True)
    return "applet not found" not in r.stderr + r.stdout


def guest_addrs6(sandbox: Sandbox, scope: str) -> list[dict[str, object]]:
    r = sandbox.guest("ip", "-j", "-6", "addr", "show", "dev", "tap0", "scope", scope,
                      check=True)
    info = json.loads(r.stdout or "[]")
    # `ip -j` lists an empty {} for a device with no address of that scope
    return [a for link in info for a in link.get("addr_info", []) if "local" in a]


def guest_ll_ready(sandbox: Sandbox) -> str | None:
    """The guest's link-local address once DAD is over (DHCPv6 clients need one to bind)."""
    for a in guest_addrs6(sandbox, "link"):
        if not a.get("tentative"):
            return str(a["local"])
    return None


def host_link_local(sandbox: Sandbox) -> str | None:
    r = sandbox.host("ip", "-j", "-6", "addr", "show", "dev", "up0", "scope", "link",
                     check=True)
    for link in json.loads(r.stdout or "[]"):
        for a in link.get("addr_info", []):
            if "local" in a:
                return str(a["local"])
    return None


def guest_neighbours6(sandbox: Sandbox) -> dict[str, str]:
    r = sandbox.guest("ip", "-6", "neigh", "show", "dev", "tap0", check=True)
    neigh = {}
    for line in r.stdout.splitlines():
        cols = line.split()
        if "lladdr" in cols:
            neigh[cols[0]] = cols[cols.index("lladdr") + 1]
    return neigh


def parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def start(sandbox: Sandbox, *args: str, accept_ra: bool = True) -> None:
    """Daemon and relay up; the guest accepts RAs (as a host, with forwarding ignored)."""
    if accept_ra:
        sandbox.guest("sysctl", "-w", "net.ipv6.conf.tap0.accept_ra=2", check=True)
    sandbox.start_daemon(*args)
    sandbox.start_relay()
    sandbox.guest("ip", "link", "set", "tap0", "up", check=True)


# --- SLAAC from our Router Advertisements ----------------------------------------------------


def test_guest_kernel_gets_slaac_address_and_default_route(sandbox: Sandbox) -> None:
    start(sandbox)

    def slaac() -> list[str]:
        return [str(a["local"]) for a in guest_addrs6(sandbox, "global")
                if ipaddress.IPv6Address(str(a["local"])) in PREFIX
                and not a.get("tentative")]

    try:
        addrs = wait_until(slaac, 15, "a SLAAC address in 2001:db8::/64")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{sandbox.daemon_log()}") from None
    assert addrs

    def default_route() -> list[dict[str, object]]:
        r = sandbox.guest("ip", "-j", "-6", "route", "show", "default", check=True)
        return [x for x in json.loads(r.stdout or "[]") if x.get("dev") == "tap0"]

    routes = wait_until(default_route, 10, "a default route via tap0")
    gateway = str(routes[0]["gateway"])
    assert ipaddress.IPv6Address(gateway).is_link_local
    assert gateway in {host_link_local(sandbox), "fe80::1"}, gateway
    assert routes[0].get("protocol") == "ra"

    # the /64 is on-link too
    r = sandbox.guest("ip", "-6", "route", "show", "2001:db8::/64", check=True)
    assert "tap0" in r.stdout


def test_ra_mtu_option_sets_the_guests_ipv6_mtu(sandbox: Sandbox) -> None:
    """(The kernel ignores an RA MTU above the link's, so a smaller one is what shows.)"""
    start(sandbox, "-m", "1400")

    def mtu() -> bool:
        r = sandbox.guest("sysctl", "-n", "net.ipv6.conf.tap0.mtu", check=True)
        return r.stdout.strip() == "1400"

    wait_until(mtu, 15, "the guest's IPv6 MTU to become 1400")


# --- DHCPv6 clients ----------------------------------------------------------------------


@pytest.mark.skipif(not _has_udhcpc6(), reason="this busybox has no udhcpc6 applet")
def test_udhcpc6_gets_the_hosts_address_and_dns(sandbox: Sandbox) -> None:
    start(sandbox, accept_ra=False)
    wait_until(lambda: guest_ll_ready(sandbox), 10, "the guest's link-local address")
    out = sandbox.dir / "udhcpc6.bound"
    script = sandbox.dir / "udhcpc6.sh"
    script.write_text(f'#!/bin/sh\n[ "$1" = bound ] && env > {out}.tmp && mv {out}.tmp {out}\n'
                      "exit 0\n")
    script.chmod(0o755)
    r = sandbox.guest(*CLEAN_ENV, "busybox", "udhcpc6", "-i", "tap0", "-f", "-q", "-n",
                      "-t", "5", "-T", "1", "-s", str(script), "-O", "dns", "-O", "search",
                      timeout=25)
    assert r.returncode == 0 and out.exists(), (r.stdout, r.stderr, sandbox.daemon_log())
    lease = parse_env(out.read_text())
    # as addresses: busybox 1.37 (Debian 13) writes them unabbreviated, 2001:0db8:0000:...
    assert IPv6Address(lease["ipv6"]) == IPv6Address(HOST_ADDR6)
    assert [IPv6Address(a) for a in lease["dns"].split()] == [IPv6Address(DNS6)]
    assert lease["search"].split() == SEARCH


def test_dhclient6_gets_the_hosts_address_and_dns(sandbox: Sandbox) -> None:
    start(sandbox, accept_ra=False)
    wait_until(lambda: guest_ll_ready(sandbox), 10, "the guest's link-local address")

    lease = sandbox.dhclient(family=6)

    assert lease["new_ip6_address"] == HOST_ADDR6
    assert lease["new_ip6_prefixlen"] == "128"
    assert lease["new_dhcp6_name_servers"].split() == [DNS6]
    search = [d.strip('"').rstrip(".") for d in lease["new_dhcp6_domain_search"].split()]
    assert search == SEARCH
    # our DUID-LL: type 3, hardware type 1, our MAC
    server_id = bytes(int(x, 16) for x in lease["new_dhcp6_server_id"].split(":"))
    assert server_id == bytes.fromhex("00030001" + DEFAULT_MAC.replace(":", ""))


# --- NDP ------------------------------------------------------------------------------------


def test_every_ipv6_neighbour_resolves_to_vhostpasst(sandbox: Sandbox) -> None:
    """The guest (addressed as DHCPv6 would) finds any address behind our MAC through NS/NA."""
    start(sandbox, accept_ra=False)
    sandbox.guest("ip", "-6", "addr", "add", f"{HOST_ADDR6}/64", "dev", "tap0", "nodad",
                  check=True)
    wait_until(lambda: guest_ll_ready(sandbox), 10, "the guest's link-local address")
    targets = ["2001:db8::1", "2001:db8::99", "fe80::99"]
    for target in targets:
        # the echo reply is not what we look at: the NS/NA exchange before it is
        dest = f"{target}%tap0" if target.startswith("fe80") else target
        sandbox.guest("busybox", "ping6", "-c1", "-W1", dest, timeout=10)

    def resolved() -> dict[str, str] | None:
        neigh = guest_neighbours6(sandbox)
        return neigh if all(neigh.get(t) == DEFAULT_MAC for t in targets) else None

    try:
        wait_until(resolved, 5, "neighbour entries with our MAC")
    except TimeoutError as e:
        raise AssertionError(f"{e}: {guest_neighbours6(sandbox)}\n{sandbox.daemon_log()}") \
            from None
