"""The namespace's interface: the tap opened inside the namespace (or --fd's), `lo` up, its
MAC, and with --config-net the host's MTU, addresses and routes copied onto it (rtnl.py).

host_snapshot() reads, in the host's namespace, what --config-net copies (nothing for a family
given -a / -g); setup_ns_link() runs in the namespace (netns.call_in_netns) and applies it.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from typing import Any

from vhostpasst.config.conf import Config
from vhostpasst.core.nat import GuestAddrs
from vhostpasst.pasta.namespace import PastaError
from vhostpasst.system.rtnl import (
    IFA_F_DEPRECATED,
    IFA_F_NODAD,
    IFF_NOARP,
    IFF_UP,
    RT_SCOPE_LINK,
    RT_TABLE_MAIN,
    RTN_UNICAST,
    IPRoute,
)

log = logging.getLogger("vhostpasst")

LL_WAIT = 2.0  # how long --config-net waits for the tap's IPv6 link-local address
ROUTE_PASSES = 8  # routes are re-inserted until their dependencies (gateways) resolve
_ROUTE_RETRY = (errno.ENETUNREACH, errno.EHOSTUNREACH)


@dataclass
class HostSnapshot:
    """The template interfaces' addresses and routes, read in the host namespace."""

    addrs: list[tuple[str, int]] = field(default_factory=list)  # (address, prefix length)
    routes: list[dict[str, Any]] = field(default_factory=list)  # IPRoute.route() kwargs (rtnl.py)


def _route_kwargs(r: Any, family: int, ifindex: int) -> dict[str, Any] | None:
    """A host route on `ifindex` as arguments for adding it on the tap (oif set later);
    None for routes that are not (only) through the template interface."""
    if r["type"] != RTN_UNICAST or r.get_attr("RTA_TABLE") not in (None, RT_TABLE_MAIN):
        return None
    dst = r.get_attr("RTA_DST")
    kw: dict[str, Any] = {
        "family": family,
        "dst": f"{dst}/{r['dst_len']}" if dst else ("0.0.0.0/0" if family == socket.AF_INET
                                                     else "::/0"),
        "table": RT_TABLE_MAIN,
        "proto": r["proto"],
        "scope": r["scope"],
        "type": RTN_UNICAST,
    }
    prio = r.get_attr("RTA_PRIORITY")
    if prio is not None:
        kw["priority"] = prio
    hops = r.get_attr("RTA_MULTIPATH")
    if hops:
        if any(nh.get("oif") != ifindex for nh in hops):
            return None
        kw["multipath"] = [{"gateway": nh.get_attr("RTA_GATEWAY"), "hops": nh.get("hops", 0)}
                           for nh in hops]
        return kw
    if r.get_attr("RTA_OIF") != ifindex:
        return None
    gw = r.get_attr("RTA_GATEWAY")
    if gw:
        kw["gateway"] = gw
    return kw


def host_snapshot(config: Config) -> dict[int, HostSnapshot]:
    """Per family, what --config-net copies (nothing for a family given -a / -g)."""
    from vhostpasst.system.rtnl import IPRoute

    out: dict[int, HostSnapshot] = {}
    fams: list[tuple[int, Any]] = [(socket.AF_INET, config.ip4), (socket.AF_INET6, config.ip6)]
    with IPRoute() as ipr:
        for family, fam in fams:
            if fam is None or not fam.ifindex:
                continue
            snap = HostSnapshot()
            if not (config.no_copy_addrs or fam.no_copy_addrs):
                for m in ipr.get_addr(family=family, index=fam.ifindex):
                    flags = m.get_attr("IFA_FLAGS") or m["flags"]
                    if m["scope"] == RT_SCOPE_LINK or flags & IFA_F_DEPRECATED:
                        continue
                    text = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
                    if text:
                        snap.addrs.append((text, m["prefixlen"]))
            if not (config.no_copy_routes or fam.no_copy_routes):
                for r in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                    kw = _route_kwargs(r, family, fam.ifindex)
                    if kw is not None:
                        snap.routes.append(kw)
            out[family] = snap
    return out


# -- inside the namespace --------------------------------------------------------------------


@dataclass
class NsLink:
    fd: int
    ifname: str
    ifindex: int
    mac: bytes
    addr6_ll: IPv6Address | None = None


def _netlink_error(e: Exception) -> int:
    return int(getattr(e, "code", 0) or 0)


def _add_routes(ipr: Any, routes: list[dict[str, Any]], ifindex: int) -> None:
    """Insert routes in passes, so one via a gateway that another route makes reachable
    goes in once that one is there; existing routes are fine."""
    pending = []
    for kw in routes:
        kw = dict(kw)
        if "multipath" in kw:
            kw["multipath"] = [dict(nh, oif=ifindex) for nh in kw["multipath"]]
        else:
            kw["oif"] = ifindex
        pending.append(kw)
    for _ in range(ROUTE_PASSES):
        left = []
        for kw in pending:
            try:
                ipr.route("add", **kw)
            except Exception as e:
                code = _netlink_error(e)
                if code == errno.EEXIST:
                    continue
                if code in _ROUTE_RETRY:
                    left.append(kw)
                    continue
                raise PastaError(f"cannot add route {kw.get('dst')}: {e}") from None
        if not left or len(left) == len(pending):
            for kw in left:
                log.debug("route %s not added: unreachable gateway", kw.get("dst"))
            return
        pending = left


def _link_local(ipr: Any, ifindex: int, wait: float) -> IPv6Address | None:
    """The tap's IPv6 link-local address, as soon as the kernel has added it (at once, when
    the link comes up). It stays tentative until the kernel's link watch has seen the tap's
    carrier, which runs at most once a second for all interfaces: 0.3-0.9 s here, and waiting
    for that was half of a start with IPv6. pasta does not wait either; the global addresses
    (NODAD) work at once, and NDP takes them as source meanwhile."""
    deadline = time.monotonic() + wait
    while True:
        for m in ipr.get_addr(family=socket.AF_INET6, index=ifindex):
            if m["scope"] == RT_SCOPE_LINK:
                return IPv6Address(m.get_attr("IFA_ADDRESS"))
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def configure_net(ipr: Any, ifindex: int, config: Config,
                  host: dict[int, HostSnapshot]) -> IPv6Address | None:
    """--config-net: MTU, link up, addresses and routes; returns the link-local address."""
    if config.mtu:
        ipr.link("set", index=ifindex, mtu=config.mtu)
    ip4, ip6 = config.ip4, config.ip6
    # no DAD delay: accept_dad off, and IFF_NOARP while the link comes up (the kernel skips
    # DAD for NOARP links), so the addresses are usable at once
    if ip6 is not None:
        ifname = ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME")
        try:  # /proc/sys/net is the namespace of the thread that opens it: this one
            with open(f"/proc/sys/net/ipv6/conf/{ifname}/accept_dad", "w") as f:
                f.write("0")
        except OSError as e:
            log.debug("cannot disable DAD on %s: %s", ifname, e)
        ipr.link("set", index=ifindex, flags=IFF_UP | IFF_NOARP, change=IFF_UP | IFF_NOARP)
    else:
        ipr.link("set", index=ifindex, state="up")

    def add_addr(addr: str, prefix: int) -> None:
        try:
            ipr.addr("add", index=ifindex, address=addr, prefixlen=prefix, flags=IFA_F_NODAD)
        except Exception as e:
            if _netlink_error(e) != errno.EEXIST:
                raise PastaError(f"cannot add address {addr}/{prefix}: {e}") from None

    if ip4 is not None:
        snap = host.get(socket.AF_INET)
        if snap is not None and snap.addrs:
            for a, p in snap.addrs:
                add_addr(a, p)
        elif ip4.addr is not None:
            add_addr(str(ip4.addr), ip4.prefix_len)
        if snap is not None and snap.routes:
            _add_routes(ipr, snap.routes, ifindex)
        elif ip4.gateway is not None:
            _add_routes(ipr, [{"family": socket.AF_INET, "dst": "0.0.0.0/0",
                               "gateway": str(ip4.gateway), "table": RT_TABLE_MAIN}], ifindex)
    ll: IPv6Address | None = None
    if ip6 is not None:
        ll = _link_local(ipr, ifindex, LL_WAIT)
        if ll is not None:  # keep it out of DAD for good once IFF_NOARP goes
            try:
                ipr.addr("replace", index=ifindex, address=str(ll), prefixlen=64,
                         flags=IFA_F_NODAD)
            except Exception as e:
                log.debug("link-local %s: cannot set nodad: %s", ll, e)
        snap = host.get(socket.AF_INET6)
        if snap is not None and snap.addrs:
            for a, p in snap.addrs:
                add_addr(a, p)
        elif ip6.addr is not None:
            add_addr(str(ip6.addr), 64)
        if snap is not None and snap.routes:
            _add_routes(ipr, snap.routes, ifindex)
        elif ip6.gateway is not None:
            _add_routes(ipr, [{"family": socket.AF_INET6, "dst": "::/0",
                               "gateway": str(ip6.gateway), "table": RT_TABLE_MAIN}], ifindex)
        ipr.link("set", index=ifindex, flags=0, change=IFF_NOARP)
    return ll


def known_guest(guest: GuestAddrs, nslink: NsLink) -> None:
    """What the namespace's interface is known to use from the start: its MAC (frames to it
    need not be broadcast) and its link-local address (a host flow we show as coming from
    our link-local address has a destination before the namespace sent anything)."""
    guest.mac = nslink.mac
    if nslink.addr6_ll is not None:
        guest.addr6_ll_seen = nslink.addr6_ll


TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)


def tap_name(fd: int) -> str:
    """The interface behind a tap fd (--fd): TUNGETIFF."""
    import fcntl

    from vhostpasst.link.tuntap import _IFREQ

    ifr = fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0))
    return str(_IFREQ.unpack(ifr)[0].split(b"\0", 1)[0].decode())


def _loopback_up(ipr: IPRoute) -> None:
    lo = ipr.link_lookup(ifname="lo")
    if lo:
        ipr.link("set", index=lo[0], state="up")


def setup_ns_loopback() -> None:
    """Runs in the namespace: `lo` up and nothing else (--splice-only: no tap)."""
    with IPRoute() as ipr:
        _loopback_up(ipr)


def setup_ns_link(config: Config, host: dict[int, HostSnapshot]) -> NsLink:
    """Runs in the namespace: the tap (opened, or --fd's), `lo` up, the MAC, --config-net."""
    from vhostpasst.link.tuntap import open_tap
    from vhostpasst.system.rtnl import IPRoute

    assert config.ns_ifname is not None
    if config.fd is not None:  # the caller's tap: used as it is, only made non-blocking
        fd = config.fd
        os.set_blocking(fd, False)
        name = tap_name(fd)
    else:
        fd, name = open_tap(config.ns_ifname)
    try:
        with IPRoute() as ipr:
            _loopback_up(ipr)
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise PastaError(f"no interface {name} in the namespace")
            index = found[0]
            if config.ns_mac is not None:
                mac_text = ":".join(f"{b:02x}" for b in config.ns_mac)
                ipr.link("set", index=index, address=mac_text)
            link = ipr.get_links(index)[0]
            mac = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
            ll = configure_net(ipr, index, config, host) if config.config_net else None
    except BaseException:
        os.close(fd)
        raise
    return NsLink(fd, name, index, mac, ll)
