"""Host detection, resolv.conf and the start-up summary.

Host detection runs for real inside network namespaces each test builds (names `vpA-<pid>-<n>`,
removed at teardown) with documentation addresses only; a child process joins the namespace
with `ip netns exec`, calls build_config() and prints the result as JSON.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from vhostpasst.config.cli import parse_args
from vhostpasst.config.conf import Config, Ip4Conf, Ip6Conf, _dns_family, summary
from vhostpasst.config.host import ResolvConf, read_resolv_conf

_ids = itertools.count(1)

CHILD = r"""
import dataclasses, json, sys
from vhostpasst.config.cli import parse_args
from vhostpasst.config.conf import build_config, summary
from vhostpasst.config.errors import ConfigError

argv, mode, resolv = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]

def plain(v):
    if dataclasses.is_dataclass(v):
        return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple, frozenset, set)):
        return [plain(x) for x in v]
    if isinstance(v, bytes):
        return v.hex(":")
    if v is None or isinstance(v, (bool, int, str)):
        return v
    return str(v)

try:
    config = build_config(parse_args(argv, mode), resolv_conf=resolv)
except ConfigError as e:
    print(json.dumps({"error": str(e)}))
else:
    out = plain(config)
    out["summary"] = summary(config)
    print(json.dumps(out))
"""


def _have_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root for network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2"
    return None


class Netns:
    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.tmp = tmp

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def link(self, name: str) -> None:
        """An up interface with no addresses: a dummy link, or a veth pair (both ends here)
        on kernels without dummy support."""
        try:
            self.ip("link", "add", name, "type", "dummy")
        except subprocess.CalledProcessError:
            self.ip("link", "add", name, "type", "veth", "peer", "name", f"{name}p")
            self.ip("link", "set", f"{name}p", "up")
        self.ip("link", "set", name, "up")

    def addr(self, dev: str, *cidrs: str) -> None:
        for cidr in cidrs:
            extra = ["nodad"] if ":" in cidr else []  # no DAD wait for IPv6
            self.ip("addr", "add", cidr, "dev", dev, *extra)

    def conf(
        self, argv: list[str] | None = None, resolv: str = "", mode: str = "passt"
    ) -> dict[str, Any]:
        path = self.tmp / f"resolv.conf.{next(_ids)}"
        path.write_text(resolv)
        proc = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", CHILD,
             json.dumps(argv or []), mode, str(path)],
            capture_output=True, text=True, timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)


@pytest.fixture
def netns(tmp_path: Path) -> Iterator[Callable[[], Netns]]:
    reason = _have_netns()
    if reason:
        pytest.skip(reason)
    made: list[str] = []

    def make() -> Netns:
        name = f"vpA-{os.getpid()}-{next(_ids)}"
        subprocess.run(["ip", "netns", "add", name], check=True)
        made.append(name)
        ns = Netns(name, tmp_path)
        ns.ip("link", "set", "lo", "up")
        return ns

    yield make
    for name in made:
        subprocess.run(["ip", "netns", "del", name], check=False)


def standard(ns: Netns) -> None:
    """d0: 192.0.2.10/24 and 2001:db8::10/64, default routes via .1 and ::1."""
    ns.link("d0")
    ns.addr("d0", "192.0.2.10/24", "2001:db8::10/64")
    ns.ip("route", "add", "default", "via", "192.0.2.1")
    ns.ip("-6", "route", "add", "default", "via", "2001:db8::1")


RESOLV = "nameserver 198.51.100.53\nnameserver 2001:db8::53\nsearch example.org test.example\n"


def test_host_detection(netns: Callable[[], Netns]) -> None:
    ns = netns()
    standard(ns)
    c = ns.conf([], RESOLV)
    assert c["ifname"] == "d0" and not c["local_mode"]
    ip4, ip6 = c["ip4"], c["ip6"]
    assert ip4["addr"] == "192.0.2.10" and ip4["prefix_len"] == 24
    assert ip4["gateway"] == ip4["our_tap_addr"] == "192.0.2.1"
    assert ip4["map_host_loopback"] == "192.0.2.1"
    assert ip4["dns"] == ["198.51.100.53"] and ip4["dns_match"] is None
    assert ip4["ifname"] == "d0"
    assert ip6["addr"] == "2001:db8::10" and ip6["gateway"] == "2001:db8::1"
    # the gateway is global, so our link-local address is the host's own one on d0
    assert IPv6Address(ip6["our_tap_ll"]).is_link_local
    assert ip6["our_tap_ll"] == ip6["addr_ll"]
    assert ip6["dns"] == ["2001:db8::53"]
    assert c["search"] == ["example.org", "test.example"]
    assert c["mtu"] == 65520
    assert not c["no_dhcp"] and not c["no_dhcpv6"] and not c["no_ndp"]
    assert c["tcp_in"]["rules"] == [] and c["udp_in"]["rules"] == []
    s = c["summary"]
    assert s[0] == "Template interface: d0 (IPv4), d0 (IPv6)"
    assert s[1:3] == ["MAC:", "    host: 9a:55:9a:55:9a:55"]
    for line in ("DHCP:", "    assign: 192.0.2.10", "    mask: 255.255.255.0",
                 "    router: 192.0.2.1", "    198.51.100.53", "DNS search list:",
                 "    example.org", "NDP/DHCPv6:", "    assign: 2001:db8::10",
                 "    router: 2001:db8::1", f"    our link-local: {ip6['our_tap_ll']}",
                 "    2001:db8::53"):
        assert line in s


def test_longest_prefix_wins(netns: Callable[[], Netns]) -> None:
    ns = netns()
    standard(ns)
    ns.addr("d0", "198.51.100.7/25")
    c = ns.conf()
    assert (c["ip4"]["addr"], c["ip4"]["prefix_len"]) == ("198.51.100.7", 25)
    # -a naming another host address takes that address's own prefix
    c = ns.conf(["-a", "192.0.2.10"])
    assert (c["ip4"]["addr"], c["ip4"]["prefix_len"]) == ("192.0.2.10", 24)


def test_multipath_default_route(netns: Callable[[], Netns]) -> None:
    ns = netns()
    ns.link("d0")
    ns.link("d1")
    ns.addr("d0", "192.0.2.10/24")
    ns.addr("d1", "198.51.100.10/24")
    ns.ip("route", "add", "default",
          "nexthop", "via", "192.0.2.1", "dev", "d0", "weight", "1",
          "nexthop", "via", "198.51.100.1", "dev", "d1", "weight", "5")
    c = ns.conf(["-4"])
    assert c["ifname"] == "d1"
    assert c["ip4"]["gateway"] == "198.51.100.1" and c["ip4"]["addr"] == "198.51.100.10"
    assert c["ip6"] is None
    # -i picks the template; the gateway is then that interface's best nexthop
    c = ns.conf(["-4", "-i", "d0"])
    assert c["ifname"] == "d0" and c["ip4"]["gateway"] == "192.0.2.1"


def test_no_route_is_local_mode(netns: Callable[[], Netns]) -> None:
    ns = netns()
    ns.link("d0")
    c = ns.conf([], RESOLV)
    assert c["local_mode"] and c["ifname"] is None
    assert c["ip4"]["addr"] == "169.254.2.1" and c["ip4"]["prefix_len"] == 16
    assert c["ip4"]["gateway"] == c["ip4"]["our_tap_addr"] == "169.254.2.2"
    assert c["ip6"]["addr"] is None and c["ip6"]["our_tap_ll"] == "fe80::1"
    assert not c["no_dhcp"] and c["no_dhcpv6"]
    assert c["summary"][0] == "No routable interface: local mode"
    # naming an interface that has nothing usable is an error, not local mode
    c = ns.conf(["-i", "d0"])
    assert c["error"].startswith("--interface:")


def test_family_selection(netns: Callable[[], Netns]) -> None:
    ns = netns()
    standard(ns)
    c = ns.conf(["-4"])
    assert c["ip4"] is not None and c["ip6"] is None and c["no_ndp"] and c["no_ra"]
    c = ns.conf(["-6"])
    assert c["ip4"] is None and c["ip6"] is not None and c["no_dhcp"]
    assert c["summary"][0] == "Template interface: d0 (IPv6)"


def test_ipv4_only_host(netns: Callable[[], Netns]) -> None:
    ns = netns()
    ns.link("d0")
    ns.addr("d0", "192.0.2.10/24")
    ns.ip("route", "add", "default", "via", "192.0.2.1")
    c = ns.conf()
    assert c["ip4"]["addr"] == "192.0.2.10" and c["ip6"] is None and not c["local_mode"]


def test_no_gateway_disables_dhcp(netns: Callable[[], Netns]) -> None:
    ns = netns()
    ns.link("d0")
    ns.addr("d0", "192.0.2.10/24")  # only the prefix route
    c = ns.conf(["-4"])
    assert c["ip4"]["addr"] == "192.0.2.10" and c["ip4"]["gateway"] is None
    assert c["ip4"]["map_host_loopback"] is None and c["no_dhcp"]
    assert "DHCP:" not in c["summary"]


def test_link_local_ipv6_gateway(netns: Callable[[], Netns]) -> None:
    ns = netns()
    ns.link("d0")
    ns.addr("d0", "2001:db8::10/64")
    ns.ip("-6", "route", "add", "default", "via", "fe80::1", "dev", "d0")
    c = ns.conf(["-6"])
    assert c["ip6"]["gateway"] == "fe80::1" and c["ip6"]["our_tap_ll"] == "fe80::1"


def test_interface_options(netns: Callable[[], Netns]) -> None:
    ns = netns()
    standard(ns)
    ns.link("d1")
    ns.addr("d1", "198.51.100.10/24", "2001:db8:1::10/64")
    c = ns.conf(["-i", "d1"])
    assert c["ifname"] == "d1" and c["ip4"]["addr"] == "198.51.100.10"
    assert c["ip6"]["addr"] == "2001:db8:1::10" and c["ip4"]["gateway"] is None
    c = ns.conf(["--outbound-if4", "d1"])
    assert c["ip4"]["ifname"] == "d1" and c["ip6"]["ifname"] == "d0"
    assert c["ip4"]["outbound_if"] == "d1"
    assert "Template interface: d1 (IPv4), d0 (IPv6)" in c["summary"]
    assert "Outbound interface: d1 (IPv4)" in c["summary"]
    for argv, flag in ((["-i", "nope0"], "--interface"), (["--outbound-if6", "nope0"],
                                                           "--outbound-if6")):
        c = ns.conf(argv)
        assert c["error"] == f"{flag}: no such interface 'nope0'"


def test_overrides(netns: Callable[[], Netns]) -> None:
    ns = netns()
    standard(ns)
    c = ns.conf(["-a", "192.0.2.99", "-a", "2001:db8::99", "-g", "192.0.2.254",
                 "-m", "1500", "-M", "52:54:00:12:34:56", "-H", "vm1", "--fqdn", "vm1.example",
                 "--map-guest-addr", "192.0.2.100", "-o", "192.0.2.10"], RESOLV)
    assert c["ip4"]["addr"] == "192.0.2.99" and c["ip4"]["prefix_len"] == 24  # classful C
    assert c["ip4"]["gateway"] == c["ip4"]["map_host_loopback"] == "192.0.2.254"
    assert c["ip4"]["map_guest_addr"] == "192.0.2.100" and c["ip4"]["outbound"] == "192.0.2.10"
    assert c["ip6"]["addr"] == "2001:db8::99"
    assert c["mtu"] == 1500 and c["our_mac"] == "52:54:00:12:34:56"
    assert (c["hostname"], c["fqdn"]) == ("vm1", "vm1.example")
    c = ns.conf(["-a", "10.0.0.5"])
    assert c["ip4"]["prefix_len"] == 8
    c = ns.conf(["-a", "10.0.0.5", "-n", "255.255.0.0"])
    assert c["ip4"]["prefix_len"] == 16
    c = ns.conf(["-a", "10.0.0.5/20", "-m", "0"])
    assert c["ip4"]["prefix_len"] == 20 and c["mtu"] == 0
    c = ns.conf(["--map-host-loopback", "none"])
    assert c["ip4"]["map_host_loopback"] is None and c["ip6"]["map_host_loopback"] is None
    assert c["no_map_gw"]
    c = ns.conf(["--no-map-gw", "--map-host-loopback", "192.0.2.77"])
    assert c["ip4"]["map_host_loopback"] == "192.0.2.77" and c["ip6"]["map_host_loopback"] is None


def test_dns_sources(netns: Callable[[], Netns]) -> None:
    ns = netns()
    standard(ns)
    # loopback resolvers: the guest is told the gateway, which is redirected to them
    loop = "nameserver 127.0.0.53\nnameserver ::1\nnameserver 198.51.100.53\n"
    c = ns.conf([], loop)
    assert c["ip4"]["dns"] == ["192.0.2.1", "198.51.100.53"]
    assert (c["ip4"]["dns_match"], c["ip4"]["dns_host"]) == ("192.0.2.1", "127.0.0.53")
    assert c["ip6"]["dns"] == ["2001:db8::1"]
    assert (c["ip6"]["dns_match"], c["ip6"]["dns_host"]) == ("2001:db8::1", "::1")
    # nothing maps the host's loopback: a loopback resolver cannot be offered
    c = ns.conf(["--no-map-gw"], loop)
    assert c["ip4"]["dns"] == ["198.51.100.53"] and c["ip4"]["dns_match"] is None
    # ... but podman's --dns-forward address still reaches it (the first resolver, as passt)
    c = ns.conf(["--no-map-gw", "--dns-forward", "169.254.1.1"], loop)
    assert (c["ip4"]["dns_match"], c["ip4"]["dns_host"]) == ("169.254.1.1", "127.0.0.53")
    # the first resolver of the family is the target, loopback or not
    c = ns.conf(["--dns-forward", "192.0.2.3"], "nameserver 198.51.100.53\nnameserver 127.0.0.53\n")
    assert (c["ip4"]["dns_match"], c["ip4"]["dns_host"]) == ("192.0.2.3", "198.51.100.53")
    # -D replaces resolv.conf servers; -S the search list
    c = ns.conf(["-D", "192.0.2.53", "-S", "a.example"], RESOLV)
    assert c["ip4"]["dns"] == ["192.0.2.53"] and c["search"] == ["a.example"]
    assert c["ip6"]["dns"] == ["2001:db8::53"]  # no -D for IPv6: resolv.conf still counts
    c = ns.conf(["-D", "none", "-S", "none", "--dns-forward", "192.0.2.3"], RESOLV)
    assert c["ip4"]["dns"] == [] and c["ip6"]["dns"] == [] and c["search"] == []
    assert c["ip4"]["dns_match"] is None and c["ip4"]["dns_host"] is None
    # --dns-forward: queries to that address go to the first resolver, or --dns-host
    c = ns.conf(["--dns-forward", "192.0.2.3"], RESOLV)
    assert (c["ip4"]["dns_match"], c["ip4"]["dns_host"]) == ("192.0.2.3", "198.51.100.53")
    c = ns.conf(["--dns-forward", "192.0.2.3", "--dns-host", "192.0.2.4"], RESOLV)
    assert c["ip4"]["dns_host"] == "192.0.2.4"
    c = ns.conf(["--no-dhcp-dns", "--no-dhcp-search"], RESOLV)
    assert c["no_dhcp_dns"] and c["no_dhcp_search"]
    assert "DNS search list:" not in c["summary"] and "    198.51.100.53" not in c["summary"]


def test_pasta_defaults(netns: Callable[[], Netns]) -> None:
    ns = netns()
    standard(ns)
    c = ns.conf(["--config-net", "--dns-forward", "169.254.1.1", "-t", "none"], RESOLV, "pasta")
    assert c["mode"] == "pasta" and c["no_dhcp_dns"] and c["no_dhcp_search"] and c["no_ra"]
    assert c["tcp_in"]["rules"] == [] and c["udp_in"]["rules"][0]["scan"]
    assert c["tcp_out"]["rules"][0]["scan"] and c["ns_ifname"] == "d0"
    assert c["ip4"]["dns_match"] == "169.254.1.1" and c["ip4"]["dns_host"] == "198.51.100.53"


def test_implied_options_of_passt_2026(netns: Callable[[], Netns]) -> None:
    """--no-icmp implies --no-ndp (passt.1, conf.c); --splice-only implies
    --host-lo-to-ns-lo, --no-icmp and no DNS advertised; a target without a listening
    address needs its family alone."""
    ns = netns()
    standard(ns)
    c = ns.conf(["--no-icmp"], RESOLV)
    assert c["no_icmp"] and c["no_ndp"] and not c["no_dhcpv6"]
    c = ns.conf(["--splice-only", "--dhcp-dns"], RESOLV, "pasta")
    assert c["splice_only"] and c["host_lo_to_ns_lo"] and c["no_icmp"] and c["no_dhcp_dns"]
    c = ns.conf(["-4", "-t", "22:192.0.2.5"], RESOLV)
    assert c["tcp_in"]["rules"][0]["target"] == "192.0.2.5"
    assert "use 0.0.0.0/" in ns.conf(["-t", "22:192.0.2.5"], RESOLV)["error"]


# -- without namespaces -------------------------------------------------------------------------


def test_read_resolv_conf(tmp_path: Path) -> None:
    path = tmp_path / "resolv.conf"
    path.write_text(
        "# comment\n"
        "nameserver 192.0.2.1 # trailing\n"
        "nameserver fe80::1%eth0\n"
        "nameserver not-an-address\n"
        "nameserver 192.0.2.1\n"
        "search a.example b.example c.example d.example e.example f.example\n"
        "search ignored.example\n"
        "options ndots:2\n"
        "nameserver\n"
    )
    rc = read_resolv_conf(str(path))
    assert rc.nameservers == (IPv4Address("192.0.2.1"), IPv6Address("fe80::1"))
    assert rc.search == ("a.example", "b.example", "c.example", "d.example", "e.example")
    assert read_resolv_conf(str(tmp_path / "missing")) == ResolvConf()


def test_dns_family_limits() -> None:
    servers = [IPv4Address(f"192.0.2.{i}") for i in range(1, 6)]
    d = _dns_family(list(servers), None, None, None)
    assert d.advertised == tuple(servers[:3]) and d.match is None and d.host == servers[0]
    # two loopback resolvers collapse onto the one mapped address
    gw = IPv4Address("192.0.2.254")
    lo = [IPv4Address("127.0.0.53"), IPv4Address("127.0.0.1"), servers[0]]
    d = _dns_family(lo, gw, None, None)
    assert d.advertised == (gw, servers[0]) and d.match == gw and d.host == lo[0]
    # an explicit --dns-forward is kept even when a loopback resolver is present
    d = _dns_family(lo, gw, IPv4Address("192.0.2.3"), None)
    assert d.match == IPv4Address("192.0.2.3") and d.host == lo[0]


def test_summary_by_hand() -> None:
    config = Config(
        ifname="eth0",
        ip4=Ip4Conf(addr=IPv4Address("192.0.2.10"), prefix_len=20,
                    gateway=IPv4Address("192.0.2.1"), ifname="eth0"),
        ip6=None,
        search=("example.org",),
    )
    assert summary(config) == [
        "Template interface: eth0 (IPv4)",
        "MAC:",
        "    host: 9a:55:9a:55:9a:55",
        "DHCP:",
        "    assign: 192.0.2.10",
        "    mask: 255.255.240.0",
        "    router: 192.0.2.1",
        "DNS search list:",
        "    example.org",
    ]
    lines = summary(Config(local_mode=True, ip6=Ip6Conf(), no_dhcp=True))
    assert lines[0] == "No routable interface: local mode"
    assert "NDP/DHCPv6:" in lines and "    our link-local: fe80::1" in lines


def test_parse_args_is_host_independent() -> None:
    # parse_args never touches the host: -i names are checked by build_config
    assert parse_args(["-i", "nosuchif0"], "passt").ifname == "nosuchif0"
