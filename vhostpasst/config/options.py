"""What the user said on the command line: `Options`, parsed and validated by cli.py, with
nothing looked up on the host yet (conf.build_config() does that), and the limits the values
obey where more than one module checks them."""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from vhostpasst.config.fwd import IPAddr, PortForwards

PASST = "passt"
PASTA = "pasta"
BOTH = (PASST, PASTA)

MAXNS = 3  # nameservers per family, as resolv(5)


@dataclass
class Options:
    """The command line, parsed and validated. Treat as read-only after parse_args().

    None means "not given" wherever the host or the mode supplies a default.
    """

    mode: str = PASST
    action: str | None = None  # "help", "version", "capabilities": do that and exit
    # process and logging
    foreground: bool = False
    debug: bool = False
    trace: bool = False
    quiet: bool = False
    stats: int | None = None  # --stats DELAY: event counters every DELAY s (with events)
    stderr: bool = False  # -e: deprecated, no effect
    log_file: str | None = None
    log_size: int | None = None
    pid_file: str | None = None
    pcap_file: str | None = None
    runas: str | None = None
    # back end
    socket_path: str | None = None
    fd: int | None = None
    one_off: bool = False
    vhost_user: bool = False
    repair_path: str | None = None
    migrate_exit: bool = False  # parsed; the behaviour comes with migration
    migrate_no_linger: bool = False  # parsed; the behaviour comes with migration
    conf_path: str | None = None
    # link and addresses
    mtu: int | None = None
    addr4: IPv4Address | None = None
    addr6: IPv6Address | None = None
    prefix_len4: int | None = None  # -n, or -a ADDR/LEN
    prefix_len6: int | None = None  # -a ADDR/LEN
    mac: bytes | None = None
    gateway4: IPv4Address | None = None
    gateway6: IPv6Address | None = None
    ifname: str | None = None
    outbound4: IPv4Address | None = None
    outbound6: IPv6Address | None = None
    outbound_if4: str | None = None
    outbound_if6: str | None = None
    ipv4_only: bool = False
    ipv6_only: bool = False
    # DNS
    dns: list[IPAddr] = field(default_factory=list)
    dns_none: bool = False
    search: list[str] = field(default_factory=list)
    search_none: bool = False
    dns_forward4: IPv4Address | None = None
    dns_forward6: IPv6Address | None = None
    dns_host4: IPv4Address | None = None
    dns_host6: IPv6Address | None = None
    no_dhcp_dns: bool = False
    no_dhcp_search: bool = False
    dhcp_dns: bool = False  # pasta
    dhcp_search: bool = False  # pasta
    hostname: str | None = None
    fqdn: str | None = None
    # switches
    no_dhcp: bool = False
    no_ndp: bool = False
    no_dhcpv6: bool = False
    no_ra: bool = False
    no_tcp: bool = False
    no_udp: bool = False
    no_icmp: bool = False
    freebind: bool = False
    chroot_fallback: bool = False
    # address translation
    map_host_loopback4: IPv4Address | None = None
    map_host_loopback6: IPv6Address | None = None
    map_host_loopback_none: bool = False
    map_guest_addr4: IPv4Address | None = None
    map_guest_addr6: IPv6Address | None = None
    map_guest_addr_none: bool = False
    no_map_gw: bool = False
    host_lo_to_ns_lo: bool = False  # pasta: host loopback to the same namespace loopback
    # port forwarding: None = not given (mode default applies)
    tcp_in: PortForwards | None = None
    udp_in: PortForwards | None = None
    tcp_out: PortForwards | None = None
    udp_out: PortForwards | None = None
    # pasta
    ns_ifname: str | None = None
    ns_mac: bytes | None = None
    config_net: bool = False
    no_copy_routes: bool = False
    no_copy_addrs: bool = False
    netns: str | None = None
    userns: str | None = None
    netns_only: bool = False
    no_netns_quit: bool = False
    no_splice: bool = False
    splice_only: bool = False  # pasta: no tap, only the loopback splice paths
    target_pid: int | None = None
    command: tuple[str, ...] = ()
