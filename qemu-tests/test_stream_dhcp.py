"""A real guest on the qemu stream socket (and vhost-user, once the daemon has it): DHCPv4
lease and the ARP proxy.

Mirrors passt's test/passt/dhcp (address == host address, route == host gateway, MTU == 65520,
DNS == host resolv.conf), with busybox udhcpc in place of dhclient.
"""

from __future__ import annotations

import re

import pytest
from harness import DNS4, HOST_ADDR4, HOST_GW4, HOST_PREFIX4, SEARCH, Guest, SetupFactory

OUR_MAC = "9a:55:9a:55:9a:55"  # passt's default MAC on the guest link (no -M)
KINDS = pytest.mark.parametrize("kind", ["stream", "vhost-user"])


def _lease(guest: Guest) -> dict[str, str]:
    guest.run("ip link set eth0 up")
    # -O mtu/-O search: udhcpc does not ask for options 26 and 119 unless told to.
    # -t 5 -T 2: five DISCOVERs two seconds apart at most, then give up (-n) instead of looping.
    cmd = "udhcpc -i eth0 -f -q -n -t 5 -T 2 -O mtu -O search -s /etc/udhcpc/default.script"
    _, out = guest.run(cmd, timeout=60)
    m = re.search(r"^VPT-DHCP (.*)$", out, re.M)
    assert m, f"no lease from udhcpc; output:\n{out}"
    return dict(kv.split("=", 1) for kv in m.group(1).split(" ") if "=" in kv)


@KINDS
def test_dhcp_lease(passt_setup: SetupFactory, kind: str) -> None:
    guest = passt_setup(kind).guest
    lease = _lease(guest)
    assert lease["ip"] == HOST_ADDR4
    assert lease["mask"] == str(HOST_PREFIX4)
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"] == HOST_GW4
    assert lease["mtu"] == "65520"
    assert lease["dns"].split() == [DNS4]  # the IPv4 nameserver of the test resolv.conf
    assert lease["serverid"] == HOST_GW4
    assert lease["search"] == SEARCH  # option 119, from the resolv.conf search line
    assert lease["lease"] == "4294967295"  # passt leases are infinite

    # The udhcpc script applied the lease: address, MTU, default route.
    _, addr = guest.run("ip -4 addr show dev eth0")
    assert f"inet {HOST_ADDR4}/{HOST_PREFIX4}" in addr
    _, mtu = guest.run("cat /sys/class/net/eth0/mtu")
    assert mtu.strip() == "65520"
    _, route = guest.run("ip -4 route show default")
    assert f"default via {HOST_GW4} dev eth0" in route


@KINDS
def test_arp_proxy(passt_setup: SetupFactory, kind: str) -> None:
    guest = passt_setup(kind).guest
    _lease(guest)
    # The gateway and any other address on the link answer with our MAC.
    for target in (HOST_GW4, "192.0.2.77"):
        _, out = guest.run(f"arping -c 2 -w 5 -I eth0 {target}", timeout=20)
        assert re.search(rf"reply from {re.escape(target)} \[{OUR_MAC}\]", out, re.I), out
    # The kernel's own resolution (triggered by a ping, whose answer does not matter here)
    # puts the gateway in the neighbour table with our MAC.
    guest.run(f"ping -c 1 -W 2 {HOST_GW4}", timeout=20, check=False)
    _, neigh = guest.run(f"ip neigh show {HOST_GW4} dev eth0")
    assert f"lladdr {OUR_MAC}" in neigh.lower(), neigh
    assert "FAILED" not in neigh and "INCOMPLETE" not in neigh, neigh
