"""Address translation between the guest's view and the host's sockets (reference §4.8, §4.9).

passt does no NAT in the usual sense: the guest uses the host's own address, and only a few
well-known destinations are rewritten. Guest to host (`from_tap`), first match wins:

  1. TCP/UDP to port 53/853 at `dns_match`           -> `dns_host` (DNS forwarding)
  2. `map_host_loopback` (default: the gateway)      -> 127.0.0.1 / ::1
  3. `map_guest_addr`                                -> the host's own address (ip4/ip6.addr)
  4. anything else                                   -> unchanged

Host to guest (`from_host`): the source the guest sees is the reverse of the above, and the
destination is the address the guest was last seen using. Before it used one, IPv6 goes to the
assigned address if the guest showed it holds it (duplicate address detection for it, or a
multicast listener report joining its solicited-node group), else to the last address the guest
announced by duplicate address detection (a guest configured by SLAAC alone never takes the
assigned one), else still to the assigned one. TCP will reuse both functions.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from vhostpasst.config.conf import Config
from vhostpasst.config.fwd import IPAddr

DNS_PORTS = frozenset({53, 853})
LOOPBACK4 = IPv4Address("127.0.0.1")
LOOPBACK6 = IPv6Address("::1")
ANY4 = IPv4Address(0)
ANY6 = IPv6Address(0)


@dataclass
class GuestAddrs:
    """What the guest has been seen using (learned by the dispatcher from its frames)."""

    mac: bytes | None = None
    addr4_seen: IPv4Address | None = None
    addr6_seen: IPv6Address | None = None
    addr6_ll_seen: IPv6Address | None = None
    addr6_claimed: IPv6Address | None = None  # announced by DAD, not seen in use yet
    holds_assigned6: bool = False  # DAD or an MLD join showed it holds config.ip6.addr


def from_tap(config: Config, proto_is_stream_or_dgram: bool, dst: IPAddr,
             dport: int) -> IPAddr | None:
    """The host-side destination for guest traffic to `dst`:`dport`, or None to drop it.

    `proto_is_stream_or_dgram`: TCP or UDP (DNS forwarding applies only to those, not ping).
    """
    if isinstance(dst, IPv4Address):
        c4 = config.ip4
        if c4 is None:
            return None
        if proto_is_stream_or_dgram and dport in DNS_PORTS and dst == c4.dns_match \
                and c4.dns_host is not None:
            return c4.dns_host
        if c4.map_host_loopback is not None and dst == c4.map_host_loopback:
            return LOOPBACK4
        if c4.map_guest_addr is not None and dst == c4.map_guest_addr:
            return c4.addr  # None (no host address) drops it
        if dst.is_loopback or dst == ANY4:
            return None  # the guest must not reach the host's loopback except through mapping
        return dst
    c6 = config.ip6
    if c6 is None:
        return None
    if proto_is_stream_or_dgram and dport in DNS_PORTS and dst == c6.dns_match \
            and c6.dns_host is not None:
        return c6.dns_host
    if c6.map_host_loopback is not None and dst == c6.map_host_loopback:
        return LOOPBACK6
    if c6.map_guest_addr is not None and dst == c6.map_guest_addr:
        return c6.addr
    if dst.is_loopback or dst == ANY6:
        return None
    return dst


def _guest_accessible4(config: Config, guest: GuestAddrs, src: IPv4Address) -> bool:
    if src.is_loopback or src == ANY4 or src.is_multicast:
        return False
    c4 = config.ip4
    return not (c4 is not None and src in (c4.addr, guest.addr4_seen))


def _guest_accessible6(config: Config, guest: GuestAddrs, src: IPv6Address) -> bool:
    if src.is_loopback or src == ANY6 or src.is_multicast:
        return False
    c6 = config.ip6
    if c6 is not None and src in (c6.addr, c6.addr_ll):
        return False
    return src not in (guest.addr6_seen, guest.addr6_ll_seen)


def guest_source(config: Config, guest: GuestAddrs, src: IPAddr) -> IPAddr | None:
    """The source address the guest sees for host traffic from `src` (None: drop).

    Used for inbound flows and for the offender of an ICMP error."""
    if isinstance(src, IPv4Address):
        c4 = config.ip4
        if c4 is None:
            return None
        if src == LOOPBACK4 and c4.map_host_loopback is not None:
            return c4.map_host_loopback
        if c4.map_guest_addr is not None and c4.addr is not None and src == c4.addr:
            return c4.map_guest_addr
        if not _guest_accessible4(config, guest, src):
            return c4.our_tap_addr  # the gateway; without one the flow is dropped
        return src
    # An IPv4-mapped source (dual-stack socket) is the IPv4 address it carries
    if src.ipv4_mapped is not None:
        return guest_source(config, guest, src.ipv4_mapped)
    c6 = config.ip6
    if c6 is None:
        return None
    if src == LOOPBACK6 and c6.map_host_loopback is not None:
        return c6.map_host_loopback
    if c6.map_guest_addr is not None and c6.addr is not None and src == c6.addr:
        return c6.map_guest_addr
    if not _guest_accessible6(config, guest, src):
        return c6.our_tap_ll
    return src


def guest_destination(config: Config, guest: GuestAddrs, family6: bool,
                      source_is_ll: bool = False) -> IPAddr | None:
    """Where host-initiated traffic goes in the guest: the address it was seen using,
    else the one it was assigned (IPv6: link-local if the source we show is link-local)."""
    if not family6:
        if config.ip4 is None:
            return None
        return guest.addr4_seen or config.ip4.addr
    if config.ip6 is None:
        return None
    if source_is_ll:
        return guest.addr6_ll_seen
    if guest.addr6_seen is not None:
        return guest.addr6_seen
    assigned = config.ip6.addr
    if assigned is not None and (guest.holds_assigned6 or guest.addr6_claimed is None):
        return assigned
    return guest.addr6_claimed or guest.addr6_ll_seen


def from_host(config: Config, guest: GuestAddrs, src: IPAddr,
              target: IPAddr | None = None) -> tuple[IPAddr, IPAddr] | None:
    """(source the guest sees, guest destination) for a host-initiated flow from `src`;
    `target` (a forwarding rule's target address) replaces the guest's own address."""
    shown = guest_source(config, guest, src)
    if shown is None:
        return None
    six = isinstance(shown, IPv6Address)
    dst = target or guest_destination(config, guest, six, six and shown.is_link_local)
    if dst is None:
        return None
    return shown, dst
