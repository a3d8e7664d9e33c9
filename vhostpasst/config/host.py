"""What the host says: its template interface per address family (netlink: routes, addresses)
and its resolvers (resolv.conf). conf.build_config() turns this into what the guest is told.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address, ip_network
from typing import Any

from vhostpasst.config.fwd import IPAddr
from vhostpasst.system.rtnl import (
    IFA_F_DADFAILED,
    IFA_F_DEPRECATED,
    IFA_F_TENTATIVE,
    IFF_LOOPBACK,
    RT_SCOPE_LINK,
    RT_SCOPE_UNIVERSE,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    IPRoute,
)

MAX_SEARCH = 5  # domains taken from the first search line
RESOLV_CONF = "/etc/resolv.conf"


@dataclass(frozen=True)
class HostFamily:
    """What the host has for one address family on its template interface."""

    ifindex: int
    ifname: str
    addr: IPAddr | None = None  # IPv4: longest prefix; IPv6: global scope, longest prefix
    prefix_len: int = 0
    gateway: IPAddr | None = None  # default route via this interface (best multipath hop)
    link_local: IPv6Address | None = None  # IPv6 only
    # every (address, prefix length) of the family there, so -a can find its prefix
    addrs: tuple[tuple[IPAddr, int], ...] = ()


def _attr(msg: Any, name: str) -> Any:
    return msg.get_attr(name)


def _is_ll_dst(dst: str | None, dst_len: int) -> bool:
    if dst is None or dst_len == 0:
        return False
    net = ip_network(f"{dst}/{dst_len}", strict=False)
    return net.is_link_local


def _best_hop(route: Any, ifindex: int | None = None) -> tuple[int, str | None] | None:
    """(oif, gateway) of a route; for multipath, the nexthop with the most weight ("hops")."""
    hops = _attr(route, "RTA_MULTIPATH")
    if not hops:
        oif = _attr(route, "RTA_OIF")
        if oif is None or (ifindex is not None and oif != ifindex):
            return None
        return oif, _attr(route, "RTA_GATEWAY")
    best: tuple[int, str | None] | None = None
    best_weight = -1
    for nh in hops:
        oif = nh.get("oif")
        if ifindex is not None and oif != ifindex:
            continue
        if nh.get("hops", 0) > best_weight:  # ties: the first one listed
            best_weight = nh.get("hops", 0)
            best = (oif, nh.get_attr("RTA_GATEWAY"))
    return best


class HostNetlink:
    """The few netlink queries host detection needs, on one IPRoute socket."""

    def __init__(self) -> None:
        self.ipr = IPRoute()
        self.links = {ln["index"]: ln for ln in self.ipr.get_links()}

    def close(self) -> None:
        self.ipr.close()

    def __enter__(self) -> HostNetlink:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def ifindex(self, name: str) -> int | None:
        for index, link in self.links.items():
            if link.get_attr("IFLA_IFNAME") == name:
                return index
        return None

    def ifname(self, index: int) -> str:
        link = self.links.get(index)
        return str(link.get_attr("IFLA_IFNAME")) if link is not None else f"if{index}"

    def _loopback(self, index: int) -> bool:
        link = self.links.get(index)
        return link is not None and bool(link["flags"] & IFF_LOOPBACK)

    def routes(self, family: int) -> list[Any]:
        """Main-table unicast routes, minus link-local destinations and loopback devices."""
        out = []
        for r in self.ipr.get_routes(family=family, table=RT_TABLE_MAIN):
            if r["type"] != RTN_UNICAST or _attr(r, "RTA_TABLE") not in (None, RT_TABLE_MAIN):
                continue
            if _is_ll_dst(_attr(r, "RTA_DST"), r["dst_len"]):
                continue
            hop = _best_hop(r)
            if hop is None or self._loopback(hop[0]):
                continue
            out.append(r)
        return out

    def template(self, family: int) -> int | None:
        """The first default route's interface, else the first interface with any route."""
        routes = self.routes(family)
        for r in routes:
            if r["dst_len"] == 0:
                hop = _best_hop(r)
                assert hop is not None
                return hop[0]
        if routes:
            hop = _best_hop(routes[0])
            assert hop is not None
            return hop[0]
        return None

    def has_route(self, family: int, ifindex: int) -> bool:
        return any(_best_hop(r, ifindex) is not None for r in self.routes(family))

    def gateway(self, family: int, ifindex: int) -> IPAddr | None:
        for r in self.routes(family):
            if r["dst_len"] != 0:
                continue
            hop = _best_hop(r, ifindex)
            if hop is not None and hop[1]:
                return ip_address(hop[1])
        return None

    def family(self, family: int, ifindex: int) -> HostFamily:
        best: tuple[int, IPAddr] | None = None
        link_local: IPv6Address | None = None
        addrs: list[tuple[IPAddr, int]] = []
        # usable (not tentative/deprecated/failed) addresses first, so they win ties
        msgs = sorted(
            self.ipr.get_addr(family=family, index=ifindex),
            key=lambda m: bool(_addr_flags(m) & (IFA_F_DEPRECATED | IFA_F_TENTATIVE)),
        )
        for m in msgs:
            flags = _addr_flags(m)
            if flags & IFA_F_DADFAILED:
                continue
            text = _attr(m, "IFA_LOCAL") or _attr(m, "IFA_ADDRESS")
            if text is None:
                continue
            addr = ip_address(text)
            plen = m["prefixlen"]
            if isinstance(addr, IPv6Address):
                if m["scope"] == RT_SCOPE_LINK:
                    link_local = link_local or addr
                    continue
                if m["scope"] != RT_SCOPE_UNIVERSE:
                    continue
            addrs.append((addr, plen))
            if best is None or plen > best[0]:
                best = (plen, addr)
        return HostFamily(
            ifindex=ifindex,
            ifname=self.ifname(ifindex),
            addr=best[1] if best else None,
            prefix_len=best[0] if best else 0,
            gateway=self.gateway(family, ifindex),
            link_local=link_local,
            addrs=tuple(addrs),
        )


def _addr_flags(msg: Any) -> int:
    flags = _attr(msg, "IFA_FLAGS")
    return int(flags if flags is not None else msg["flags"])


# -- resolv.conf --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ResolvConf:
    nameservers: tuple[IPAddr, ...] = ()
    search: tuple[str, ...] = ()


def read_resolv_conf(path: str = RESOLV_CONF) -> ResolvConf:
    """`nameserver X[%if]` lines and the first `search` line; unreadable means empty."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        return ResolvConf()
    servers: list[IPAddr] = []
    search: tuple[str, ...] | None = None
    for line in lines:
        words = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(words) < 2:
            continue
        if words[0] == "nameserver":
            try:
                addr = ip_address(words[1].split("%", 1)[0])  # the scope is not ours to pass
            except ValueError:
                continue
            if addr not in servers:
                servers.append(addr)
        elif words[0] == "search" and search is None:
            search = tuple(words[1 : 1 + MAX_SEARCH])
    return ResolvConf(tuple(servers), search or ())
