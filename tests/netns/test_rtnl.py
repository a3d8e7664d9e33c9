"""rtnl.py, the rtnetlink client host detection and pasta's --config-net use, against the real
kernel: in network namespaces each test builds (documentation addresses only), what it reads
agrees with iproute2's `ip -j`, and what it changes is what `ip -j` then shows."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.netns.test_conf import Netns, netns  # noqa: F401 (the fixture)
from vhostpasst.system import rtnl

READ = textwrap.dedent("""
    import json, socket
    from vhostpasst.system.rtnl import IPRoute
    with IPRoute() as ipr:
        out = {
            "links": [{"index": ln["index"], "flags": ln["flags"], **ln.attrs}
                      for ln in ipr.get_links()],
            "addrs": [{"index": a["index"], "prefixlen": a["prefixlen"], "scope": a["scope"],
                       **a.attrs} for f in (socket.AF_INET, socket.AF_INET6)
                      for a in ipr.get_addr(family=f)],
            "routes": [{"family": r["family"], "dst_len": r["dst_len"], **{
                           k: ([{"oif": h["oif"], "hops": h["hops"], **h.attrs} for h in v]
                               if k == "RTA_MULTIPATH" else v) for k, v in r.attrs.items()}}
                       for f in (socket.AF_INET, socket.AF_INET6)
                       for r in ipr.get_routes(family=f, table=254)],
        }
    print(json.dumps(out))
""")


def _in_ns(ns: Netns, code: str) -> Any:
    proc = subprocess.run(["ip", "netns", "exec", ns.name, sys.executable, "-c", code],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout) if proc.stdout.strip() else None


def _ip_json(ns: Netns, *args: str) -> Any:
    out = subprocess.run(["ip", "-j", "-n", ns.name, *args], check=True, capture_output=True,
                         text=True, timeout=10).stdout
    return json.loads(out)


def _host(netns: Callable[[], Netns]) -> Netns:  # noqa: F811
    ns = netns()
    ns.link("d0")
    ns.link("d1")
    ns.ip("link", "set", "d0", "mtu", "1400")
    ns.addr("d0", "192.0.2.2/24", "2001:db8::2/64")
    ns.addr("d1", "198.51.100.2/24")
    ns.ip("route", "add", "203.0.113.0/24", "via", "192.0.2.1", "metric", "7")
    ns.ip("route", "add", "default",
          "nexthop", "via", "192.0.2.1", "dev", "d0", "weight", "1",
          "nexthop", "via", "198.51.100.1", "dev", "d1", "weight", "5")
    ns.ip("-6", "route", "add", "default", "via", "2001:db8::1", "dev", "d0")
    return ns


def test_what_it_reads_agrees_with_iproute2(netns: Callable[[], Netns]) -> None:  # noqa: F811
    ns = _host(netns)
    got = _in_ns(ns, READ)
    links = {ln["ifname"]: ln for ln in _ip_json(ns, "link", "show")}
    assert {ln["IFLA_IFNAME"] for ln in got["links"]} == set(links)
    for ln in got["links"]:
        want = links[ln["IFLA_IFNAME"]]
        assert (ln["index"], ln["IFLA_MTU"], ln["IFLA_ADDRESS"]) == \
            (want["ifindex"], want["mtu"], want["address"])
        assert bool(ln["flags"] & 1) == ("UP" in want["flags"])
    names = {ln["index"]: ln["IFLA_IFNAME"] for ln in got["links"]}

    want_addrs = {(a["ifname"], info["local"], info["prefixlen"], info["scope"])
                  for a in _ip_json(ns, "addr", "show") for info in a["addr_info"]}
    scopes = {0: "global", 253: "link", 254: "host"}
    got_addrs = {(names[a["index"]], a.get("IFA_LOCAL") or a["IFA_ADDRESS"], a["prefixlen"],
                  scopes[a["scope"]]) for a in got["addrs"]}
    assert got_addrs == want_addrs

    routes = {(r["family"], r["dst_len"], r.get("RTA_DST")): r for r in got["routes"]}
    r = routes[(socket.AF_INET, 24, "203.0.113.0")]
    assert (r["RTA_GATEWAY"], r["RTA_PRIORITY"], names[r["RTA_OIF"]]) == ("192.0.2.1", 7, "d0")
    hops = routes[(socket.AF_INET, 0, None)]["RTA_MULTIPATH"]
    # the kernel stores weight - 1 in rtnh_hops, as iproute2 shows it plus one
    assert [(names[h["oif"]], h["RTA_GATEWAY"], h["hops"] + 1) for h in hops] == \
        [("d0", "192.0.2.1", 1), ("d1", "198.51.100.1", 5)]
    v6 = [r for r in got["routes"] if r.get("RTA_GATEWAY") == "2001:db8::1"]
    assert len(v6) == 1 and v6[0]["dst_len"] == 0 and names[v6[0]["RTA_OIF"]] == "d0"
    assert len(got["routes"]) == len(_ip_json(ns, "route", "show")) + \
        len(_ip_json(ns, "-6", "route", "show"))


CHANGE = textwrap.dedent("""
    import json, socket
    from vhostpasst.system.rtnl import IPRoute, NetlinkError
    out = {}
    with IPRoute() as ipr:
        [index] = ipr.link_lookup(ifname="d0")
        [other] = ipr.link_lookup(ifname="d1")
        ipr.link("set", index=index, mtu=1280)
        ipr.link("set", index=index, address="02:00:00:00:00:01")
        ipr.link("set", index=index, state="up")
        ipr.addr("add", index=index, address="192.0.2.9", prefixlen=24)
        ipr.addr("add", index=index, address="2001:db8::9", prefixlen=64, flags=0x02)
        try:
            ipr.addr("add", index=index, address="192.0.2.9", prefixlen=24)
        except NetlinkError as e:
            out["again"] = e.code
        ipr.addr("replace", index=index, address="192.0.2.9", prefixlen=24)
        ipr.route("add", family=socket.AF_INET, dst="203.0.113.0/24", table=254,
                  gateway="192.0.2.1", oif=index, priority=9)
        ipr.route("add", family=socket.AF_INET, dst="0.0.0.0/0", table=254, multipath=[
            {"gateway": "192.0.2.1", "hops": 0, "oif": index},
            {"gateway": "198.51.100.1", "hops": 2, "oif": other}])
        ipr.route("add", family=socket.AF_INET6, dst="::/0", table=254,
                  gateway="2001:db8::1", oif=index)
        try:
            ipr.route("add", family=socket.AF_INET, dst="203.0.113.0/24", table=254,
                      gateway="192.0.2.1", oif=index, priority=9)
        except NetlinkError as e:
            out["route_again"] = e.code
        try:
            ipr.route("add", family=socket.AF_INET, dst="192.0.2.128/25", table=254,
                      gateway="203.0.113.77", oif=index)
        except NetlinkError as e:
            out["unreachable"] = e.code
    print(json.dumps(out))
""")


def test_what_it_changes_is_what_iproute2_shows(netns: Callable[[], Netns]) -> None:  # noqa: F811
    ns = netns()
    ns.link("d0")
    ns.link("d1")
    ns.ip("link", "set", "d0", "down")
    ns.addr("d1", "198.51.100.2/24")
    out = _in_ns(ns, CHANGE)
    assert out == {"again": errno.EEXIST, "route_again": errno.EEXIST,
                   "unreachable": errno.ENETUNREACH}
    [link] = _ip_json(ns, "addr", "show", "dev", "d0")
    assert link["mtu"] == 1280 and link["address"] == "02:00:00:00:00:01"
    assert "UP" in link["flags"]
    addrs = {(a["local"], a["prefixlen"]): a for a in link["addr_info"]}
    assert ("192.0.2.9", 24) in addrs
    v6 = addrs[("2001:db8::9", 64)]
    assert v6.get("nodad") and not v6.get("tentative")
    routes = _ip_json(ns, "route", "show")
    r = next(r for r in routes if r["dst"] == "203.0.113.0/24")
    assert (r["gateway"], r["dev"], r["metric"]) == ("192.0.2.1", "d0", 9)
    default = next(r for r in routes if r["dst"] == "default")
    assert [(h["gateway"], h["dev"], h["weight"]) for h in default["nexthops"]] == \
        [("192.0.2.1", "d0", 1), ("198.51.100.1", "d1", 3)]
    [r6] = [r for r in _ip_json(ns, "-6", "route", "show") if r["dst"] == "default"]
    assert (r6["gateway"], r6["dev"]) == ("2001:db8::1", "d0")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200), st.sampled_from([socket.AF_INET, socket.AF_INET6]))
def test_attributes_from_any_bytes_never_raise(data: bytes, family: int) -> None:
    for table in (rtnl._IFLA, rtnl._IFA, rtnl._RTA):
        attrs = rtnl._attrs(data, table, family)
        assert set(attrs) <= {name for name, _ in table.values()}


def test_a_refused_request_says_why() -> None:
    e = rtnl.NetlinkError(17, "address 192.0.2.9/24")
    assert e.code == e.errno == 17 and "192.0.2.9/24" in str(e) and "exists" in str(e)
