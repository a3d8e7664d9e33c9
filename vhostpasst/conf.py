"""The run-time configuration: one frozen `Config`, built from the command line and the host.

`cli.parse_args()` turns argv into options; `build_config()` (below) adds what the host says
(template interface, addresses, routes, MTU, resolv.conf) the way passt does. Services and
protocols read only `Config`. Every field has a default so tests can build one directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vhostpasst.fwd import PortForwards

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


@dataclass(frozen=True)
class Config:
    mode: str = "passt"  # "passt" or "pasta"
    vhost_user: bool = False
    # process and logging
    foreground: bool = False
    debug: bool = False
    trace: bool = False
    quiet: bool = False
    log_file: str | None = None
    log_size: int = 1024 * 1024
    pid_file: str | None = None
    pcap_file: str | None = None
    runas: str | None = None
    # back end
    socket_path: str | None = None  # None: probe /tmp/passt_N.socket
    fd: int | None = None  # --fd: pre-connected socket (implies one_off)
    one_off: bool = False
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
    target_pid: int | None = None
    command: tuple[str, ...] = ()


class ConfigError(Exception):
    """A bad option value or a configuration the host cannot satisfy.

    `option` names what the user typed (e.g. "--mtu"), so the message can point at it.
    """

    def __init__(self, option: str, reason: str) -> None:
        super().__init__(f"{option}: {reason}")
        self.option = option
        self.reason = reason
