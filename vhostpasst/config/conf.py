"""The run-time configuration: one frozen `Config`, built from the command line and the host.

`cli.parse_args()` turns argv into `Options` (options.py); `build_config()` (below) adds what
the host says (host.py: template interface, addresses, routes, resolv.conf) the way passt
does. Services and protocols read only `Config`. Every field has a default so tests can build
one directly. The modules of config/ import one way: errors <- fwd <- options <- cli, and
host, options, fwd <- conf.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv6Address
from typing import Generic, TypeVar

from vhostpasst.config import fwd
from vhostpasst.config.errors import ConfigError
from vhostpasst.config.fwd import IPAddr, PortForwards
from vhostpasst.config.host import (
    RESOLV_CONF,
    HostFamily,
    HostNetlink,
    ResolvConf,
    read_resolv_conf,
)
from vhostpasst.config.options import MAXNS, Options

DEFAULT_MAC = bytes.fromhex("9a559a559a55")
DEFAULT_MTU = 65520


@dataclass(frozen=True)
class Ip4Conf:
    addr: IPv4Address | None = None  # address the guest is given (host's own, or -a)
    prefix_len: int = 24  # -n, else the host's prefix, else classful
    gateway: IPv4Address | None = None  # the guest's default router (-g or host default gw)
    our_tap_addr: IPv4Address | None = None  # our source address on the link (= gateway)
    dns: tuple[IPv4Address, ...] = ()  # advertised to the guest (DHCP option 6)
    dns_match: IPv4Address | None = None  # --dns-forward: guest DNS to this goes to dns_host
    dns_host: IPv4Address | None = None  # --dns-host
    map_host_loopback: IPv4Address | None = None  # guest -> this address reaches 127.0.0.1
    map_guest_addr: IPv4Address | None = None  # guest -> this address reaches the host's addr
    outbound: IPv4Address | None = None  # -o: bind outbound sockets to this source
    outbound_if: str | None = None  # --outbound-if4
    ifname: str | None = None  # template interface for IPv4 (None in local mode)
    ifindex: int = 0
    no_copy_addrs: bool = False  # pasta --config-net: -a given, set it instead of copying
    no_copy_routes: bool = False  # pasta --config-net: -g given, default route only


@dataclass(frozen=True)
class Ip6Conf:
    addr: IPv6Address | None = None  # the host's global address (given by DHCPv6)
    prefix_len: int = 64
    gateway: IPv6Address | None = None
    our_tap_ll: IPv6Address = IPv6Address("fe80::1")  # our link-local address (router address)
    dns: tuple[IPv6Address, ...] = ()
    dns_match: IPv6Address | None = None
    dns_host: IPv6Address | None = None
    map_host_loopback: IPv6Address | None = None
    map_guest_addr: IPv6Address | None = None
    outbound: IPv6Address | None = None
    outbound_if: str | None = None
    ifname: str | None = None  # template interface for IPv6 (None in local mode)
    ifindex: int = 0
    no_copy_addrs: bool = False  # pasta --config-net: -a given, set it instead of copying
    no_copy_routes: bool = False  # pasta --config-net: -g given, default route only
    addr_ll: IPv6Address | None = None  # the host's link-local address on it


@dataclass(frozen=True)
class Config:
    mode: str = "passt"  # "passt" or "pasta"
    vhost_user: bool = False
    # process and logging
    foreground: bool = False
    debug: bool = False
    trace: bool = False
    quiet: bool = False
    stats: int | None = None  # --stats DELAY: counters to stderr, DELAY s apart at least
    log_file: str | None = None
    log_size: int = 1024 * 1024
    pid_file: str | None = None
    pcap_file: str | None = None
    runas: str | None = None
    # back end
    socket_path: str | None = None  # None: probe /tmp/passt_N.socket
    fd: int | None = None  # --fd: pre-connected socket (implies one_off)
    one_off: bool = False
    repair_path: str | None = None  # TCP_REPAIR helper socket (None: next to the socket)
    migrate_exit: bool = False  # exit after a completed migration as source
    migrate_no_linger: bool = False  # close moved TCP sockets on the source at once
    conf_path: str | None = None  # -c: the control socket (vhostpasst/ctl/)
    # link and addresses
    mtu: int = DEFAULT_MTU  # 0: do not advertise an MTU
    our_mac: bytes = DEFAULT_MAC  # -M: our MAC on the guest link
    ifname: str | None = None  # template interface (None in local mode)
    ifindex: int = 0
    local_mode: bool = False  # no usable host interface: 169.254.2.0/16 addressing
    ip4: Ip4Conf | None = field(default_factory=Ip4Conf)  # None: IPv4 disabled
    ip6: Ip6Conf | None = field(default_factory=Ip6Conf)  # None: IPv6 disabled
    search: tuple[str, ...] = ()  # DNS search list advertised to the guest
    hostname: str | None = None  # -H: DHCP option 12
    fqdn: str | None = None  # --fqdn: DHCP option 81
    # switches
    no_dhcp: bool = False
    no_ndp: bool = False
    no_dhcpv6: bool = False
    no_ra: bool = False
    no_tcp: bool = False
    no_udp: bool = False
    no_icmp: bool = False
    no_dhcp_dns: bool = False
    no_dhcp_search: bool = False
    no_map_gw: bool = False
    freebind: bool = False
    chroot_fallback: bool = False
    # port forwarding (specs parsed and validated by fwd.py)
    tcp_in: PortForwards | None = None  # -t
    udp_in: PortForwards | None = None  # -u
    tcp_out: PortForwards | None = None  # -T (pasta)
    udp_out: PortForwards | None = None  # -U (pasta)
    # pasta only
    ns_ifname: str | None = None
    ns_mac: bytes | None = None
    config_net: bool = False
    netns: str | None = None
    userns: str | None = None
    netns_only: bool = False
    no_netns_quit: bool = False
    no_splice: bool = False
    splice_only: bool = False  # no tap: only the loopback splice paths
    target_pid: int | None = None
    command: tuple[str, ...] = ()
    no_copy_routes: bool = False  # pasta, deprecated
    no_copy_addrs: bool = False  # pasta, deprecated
    host_lo_to_ns_lo: bool = False  # pasta: host loopback to the same namespace loopback


LOCAL_ADDR4 = IPv4Address("169.254.2.1")
LOCAL_GW4 = IPv4Address("169.254.2.2")
LOCAL_PREFIX4 = 16
LOCAL_LL6 = IPv6Address("fe80::1")

# -- what the guest is told ---------------------------------------------------------------------
#
# How `build_config()` fills the dataclasses from the options and what the host says
# (host.py): the template interface per family, its address, prefix and default gateway, then
# DNS from resolv.conf, then the defaults that depend on what was found (DHCP off without a
# gateway, map-host-loopback = gateway, local mode when nothing routes at all).


def _classful_prefix(addr: IPv4Address) -> int:
    first = int(addr) >> 24
    if first < 128:
        return 8
    if first < 192:
        return 16
    return 24


AddrT = TypeVar("AddrT", IPv4Address, IPv6Address)  # one family at a time


@dataclass(frozen=True)
class _Dns(Generic[AddrT]):
    advertised: tuple[AddrT, ...] = ()
    match: AddrT | None = None
    host: AddrT | None = None


def _dns_family(
    servers: list[AddrT], map_host_loopback: AddrT | None, dns_forward: AddrT | None,
    dns_host: AddrT | None,
) -> _Dns[AddrT]:
    """What the guest is told, and the dns_match -> dns_host redirect, for one family.

    A loopback nameserver (say systemd-resolved's 127.0.0.53) is unreachable from the guest:
    the guest is told the map-host-loopback address instead, and queries to that address are
    redirected to the loopback nameserver itself (not to 127.0.0.1, which mapping alone gives).
    The redirect target is the family's first nameserver, loopback or not, as in passt: with
    --no-map-gw the loopback one is not advertised, but podman's --dns-forward address
    (169.254.1.1) must still reach it.
    """
    advertised: list[AddrT] = []
    match = dns_forward
    for ns in servers:
        if len(advertised) >= MAXNS:
            break
        if ns.is_loopback:
            if map_host_loopback is None:
                continue  # nothing the guest could reach it through
            match = match or map_host_loopback
            shown = map_host_loopback
        else:
            shown = ns
        if shown not in advertised:
            advertised.append(shown)
    return _Dns(tuple(advertised), match, dns_host or (servers[0] if servers else None))


# -- build_config -------------------------------------------------------------------------------


def _pick_template(
    nl: HostNetlink, family: int, opts: Options, out_if: str | None, out_flag: str
) -> tuple[int | None, bool]:
    """(ifindex, explicit): -i, else --outbound-if4/6, else what the routes say."""
    for name, flag in ((opts.ifname, "--interface"), (out_if, out_flag)):
        if name:
            index = nl.ifindex(name)
            if index is None:
                raise ConfigError(flag, f"no such interface '{name}'")
            return index, True
    return nl.template(family), False


def build_config(
    opts: Options, *, resolv_conf: str = RESOLV_CONF, netlink: HostNetlink | None = None
) -> Config:
    """Options plus what the host says, as passt's first parsing pass leaves them."""
    pasta = opts.mode == "pasta"
    want4 = not opts.ipv6_only
    want6 = not opts.ipv4_only
    nl = netlink or HostNetlink()
    try:
        host4: HostFamily | None = None
        host6: HostFamily | None = None
        explicit = False
        if want4:
            idx, explicit4 = _pick_template(
                nl, socket.AF_INET, opts, opts.outbound_if4, "--outbound-if4"
            )
            explicit |= explicit4
            if idx is not None and (explicit4 or nl.has_route(socket.AF_INET, idx)):
                host4 = nl.family(socket.AF_INET, idx)
                if host4.addr is None and opts.addr4 is None:
                    host4 = None  # nothing to give the guest
        if want6:
            idx, explicit6 = _pick_template(
                nl, socket.AF_INET6, opts, opts.outbound_if6, "--outbound-if6"
            )
            explicit |= explicit6
            routed = idx is not None and nl.has_route(socket.AF_INET6, idx)
            if idx is not None and (explicit6 or routed):
                host6 = nl.family(socket.AF_INET6, idx)
                # link-local alone is enough only where a route says IPv6 is in use
                if host6.addr is None and opts.addr6 is None:
                    if not (routed and host6.link_local is not None):
                        host6 = None
    finally:
        if netlink is None:
            nl.close()

    local_mode = host4 is None and host6 is None
    if local_mode and explicit:
        name = opts.ifname or opts.outbound_if4 or opts.outbound_if6
        raise ConfigError(
            "--interface" if opts.ifname else "--outbound-if4/6",
            f"'{name}' has no usable IPv4 or IPv6 address",
        )

    ip4: Ip4Conf | None = None
    if want4 and (host4 is not None or local_mode):
        ip4 = _ip4_conf(opts, host4)
    ip6: Ip6Conf | None = None
    if want6 and (host6 is not None or local_mode):
        ip6 = _ip6_conf(opts, host6)

    need_servers = not opts.dns_none
    need_search = not opts.search and not opts.search_none
    rc = read_resolv_conf(resolv_conf) if need_servers or need_search else ResolvConf()
    search = rc.search if need_search else tuple(opts.search)
    if opts.dns_none:  # no DNS at all, not even the redirect
        ip4 = replace(ip4, dns=(), dns_match=None, dns_host=None) if ip4 else None
        ip6 = replace(ip6, dns=(), dns_match=None, dns_host=None) if ip6 else None
    else:
        ip4, ip6 = _apply_dns(opts, ip4, ip6, rc)

    template = host4 or host6
    default_fwd = fwd.auto() if pasta else fwd.NONE
    for spec, flag in ((opts.tcp_in, "--tcp-ports"), (opts.udp_in, "--udp-ports")):
        fwd.check_families(spec, ip4 is not None, ip6 is not None, flag)
    splice_only = pasta and opts.splice_only
    return Config(
        mode=opts.mode,
        vhost_user=opts.vhost_user,
        foreground=opts.foreground or bool(pasta and opts.command),
        debug=opts.debug or opts.trace,
        trace=opts.trace,
        quiet=opts.quiet,
        stats=opts.stats,
        log_file=opts.log_file,
        log_size=opts.log_size if opts.log_size is not None else Config.log_size,
        pid_file=opts.pid_file,
        pcap_file=opts.pcap_file,
        runas=opts.runas,
        socket_path=opts.socket_path,
        fd=opts.fd,
        one_off=opts.one_off or opts.fd is not None,
        repair_path=opts.repair_path,
        migrate_exit=opts.migrate_exit,
        migrate_no_linger=opts.migrate_no_linger,
        conf_path=opts.conf_path,
        mtu=opts.mtu if opts.mtu is not None else DEFAULT_MTU,
        our_mac=opts.mac or DEFAULT_MAC,
        ifname=template.ifname if template else None,
        ifindex=template.ifindex if template else 0,
        local_mode=local_mode,
        ip4=ip4,
        ip6=ip6,
        search=search,
        hostname=opts.hostname,
        fqdn=opts.fqdn,
        no_dhcp=opts.no_dhcp or ip4 is None or ip4.gateway is None,
        no_ndp=opts.no_ndp or opts.no_icmp or ip6 is None,  # passt: --no-icmp implies it
        no_dhcpv6=opts.no_dhcpv6 or ip6 is None or ip6.addr is None,
        no_ra=opts.no_ra or ip6 is None or (pasta and opts.config_net),
        no_tcp=opts.no_tcp,
        no_udp=opts.no_udp,
        no_icmp=opts.no_icmp or splice_only,
        # pasta does not advertise DNS unless asked to; passt does unless told not to
        no_dhcp_dns=(not opts.dhcp_dns or splice_only) if pasta else opts.no_dhcp_dns,
        no_dhcp_search=(not opts.dhcp_search or splice_only) if pasta else opts.no_dhcp_search,
        no_map_gw=opts.no_map_gw,
        freebind=opts.freebind,
        chroot_fallback=opts.chroot_fallback,
        tcp_in=opts.tcp_in or default_fwd,
        udp_in=opts.udp_in or default_fwd,
        tcp_out=(opts.tcp_out or fwd.auto()) if pasta else None,
        udp_out=(opts.udp_out or fwd.auto()) if pasta else None,
        ns_ifname=(opts.ns_ifname or (template.ifname if template else "tap0")) if pasta else None,
        ns_mac=opts.ns_mac,
        config_net=opts.config_net,
        netns=opts.netns,
        userns=opts.userns,
        netns_only=opts.netns_only,
        no_netns_quit=opts.no_netns_quit,
        no_splice=opts.no_splice,
        splice_only=splice_only,
        target_pid=opts.target_pid,
        command=opts.command,
        no_copy_routes=opts.no_copy_routes,
        no_copy_addrs=opts.no_copy_addrs,
        # --splice-only: nothing but loopbacks, so loopback to the same loopback (passt)
        host_lo_to_ns_lo=opts.host_lo_to_ns_lo or splice_only,
    )


def _ip4_conf(opts: Options, host: HostFamily | None) -> Ip4Conf:
    addr: IPAddr | None
    gateway: IPAddr | None
    if host is None:  # local mode
        addr, prefix, gateway = LOCAL_ADDR4, LOCAL_PREFIX4, LOCAL_GW4
    else:
        addr = host.addr
        prefix = host.prefix_len
        gateway = host.gateway
    if opts.addr4 is not None:
        # the prefix of the host address -a names, if it is one, else classful
        known = dict(host.addrs) if host is not None else {}
        prefix = known.get(opts.addr4, _classful_prefix(opts.addr4))
        addr = opts.addr4
    if opts.prefix_len4 is not None:
        prefix = opts.prefix_len4
    gateway = opts.gateway4 or gateway
    assert gateway is None or isinstance(gateway, IPv4Address)
    assert addr is None or isinstance(addr, IPv4Address)
    mhl: IPv4Address | None = opts.map_host_loopback4
    if mhl is None and not opts.no_map_gw and not opts.map_host_loopback_none:
        mhl = gateway
    return Ip4Conf(
        addr=addr,
        prefix_len=prefix,
        gateway=gateway,
        our_tap_addr=gateway,
        map_host_loopback=mhl,
        map_guest_addr=opts.map_guest_addr4,
        outbound=opts.outbound4,
        outbound_if=opts.outbound_if4,
        ifname=host.ifname if host else None,
        ifindex=host.ifindex if host else 0,
        no_copy_addrs=opts.addr4 is not None,
        no_copy_routes=opts.gateway4 is not None,
    )


def _ip6_conf(opts: Options, host: HostFamily | None) -> Ip6Conf:
    addr = opts.addr6 or (host.addr if host else None)
    assert addr is None or isinstance(addr, IPv6Address)
    gateway = opts.gateway6 or (host.gateway if host else LOCAL_LL6)
    assert gateway is None or isinstance(gateway, IPv6Address)
    if gateway is not None and gateway.is_link_local:
        our_ll = gateway  # the guest's router answers from the address it expects
    elif host is not None and host.link_local is not None:
        our_ll = host.link_local
    else:
        our_ll = LOCAL_LL6
    mhl: IPv6Address | None = opts.map_host_loopback6
    if mhl is None and not opts.no_map_gw and not opts.map_host_loopback_none:
        mhl = gateway
    return Ip6Conf(
        addr=addr,
        prefix_len=opts.prefix_len6 if opts.prefix_len6 is not None else 64,
        gateway=gateway,
        our_tap_ll=our_ll,
        map_host_loopback=mhl,
        map_guest_addr=opts.map_guest_addr6,
        outbound=opts.outbound6,
        outbound_if=opts.outbound_if6,
        ifname=host.ifname if host else None,
        ifindex=host.ifindex if host else 0,
        addr_ll=host.link_local if host else None,
        no_copy_addrs=opts.addr6 is not None,
        no_copy_routes=opts.gateway6 is not None,
    )


def _apply_dns(
    opts: Options, ip4: Ip4Conf | None, ip6: Ip6Conf | None, rc: ResolvConf
) -> tuple[Ip4Conf | None, Ip6Conf | None]:
    """Per family: -D servers verbatim if any were given for it, else resolv.conf's."""
    if ip4 is not None:
        d4 = _dns_family(
            [a for a in rc.nameservers if isinstance(a, IPv4Address)],
            ip4.map_host_loopback, opts.dns_forward4, opts.dns_host4,
        )
        given4 = tuple(a for a in opts.dns if isinstance(a, IPv4Address))
        if given4:
            d4 = _Dns(given4, opts.dns_forward4, d4.host)
        ip4 = replace(ip4, dns=d4.advertised, dns_match=d4.match, dns_host=d4.host)
    if ip6 is not None:
        d6 = _dns_family(
            [a for a in rc.nameservers if isinstance(a, IPv6Address)],
            ip6.map_host_loopback, opts.dns_forward6, opts.dns_host6,
        )
        given6 = tuple(a for a in opts.dns if isinstance(a, IPv6Address))
        if given6:
            d6 = _Dns(given6, opts.dns_forward6, d6.host)
        ip6 = replace(ip6, dns=d6.advertised, dns_match=d6.match, dns_host=d6.host)
    return ip4, ip6


# -- start-up summary ---------------------------------------------------------------------------


def _mac_text(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def _mask_text(prefix_len: int) -> str:
    return str(IPv4Address((0xFFFFFFFF << (32 - prefix_len)) & 0xFFFFFFFF))


def summary(config: Config) -> list[str]:
    """The lines passt logs at start: what the guest will be told, per service."""
    lines: list[str] = []
    ip4, ip6 = config.ip4, config.ip6
    fams = ((ip4, "IPv4"), (ip6, "IPv6"))
    if config.local_mode:
        lines.append("No routable interface: local mode")
    else:
        parts = [f"{c.ifname} ({fam})" for c, fam in fams if c and c.ifname]
        lines.append("Template interface: " + ", ".join(parts))
    outs = [f"{c.outbound_if} ({fam})" for c, fam in fams if c and c.outbound_if]
    if outs:
        lines.append("Outbound interface: " + ", ".join(outs))
    if config.mode == "pasta" and config.ns_ifname:
        lines.append(f"Namespace interface: {config.ns_ifname}")
    lines += ["MAC:", f"    host: {_mac_text(config.our_mac)}"]
    search_shown = False

    def dns_lines(servers: tuple[IPAddr, ...]) -> None:
        nonlocal search_shown
        if servers and not config.no_dhcp_dns:
            lines.append("DNS:")
            lines.extend(f"    {a}" for a in servers)
        if config.search and not config.no_dhcp_search and not search_shown:
            lines.append("DNS search list:")
            lines.extend(f"    {d}" for d in config.search)
            search_shown = True

    if ip4 is not None and not config.no_dhcp and ip4.addr is not None:
        lines += ["DHCP:", f"    assign: {ip4.addr}", f"    mask: {_mask_text(ip4.prefix_len)}"]
        lines.append(f"    router: {ip4.gateway}")
        if ip4.map_host_loopback is not None:
            lines.append(f"    NAT to host 127.0.0.1: {ip4.map_host_loopback}")
        dns_lines(ip4.dns)
    if ip6 is not None and (not config.no_ndp or not config.no_dhcpv6):
        lines.append("NDP/DHCPv6:")
        if ip6.addr is not None:
            lines.append(f"    assign: {ip6.addr}")
        if ip6.gateway is not None:
            lines.append(f"    router: {ip6.gateway}")
        lines.append(f"    our link-local: {ip6.our_tap_ll}")
        if ip6.map_host_loopback is not None:
            lines.append(f"    NAT to host ::1: {ip6.map_host_loopback}")
        dns_lines(ip6.dns)
    return lines
