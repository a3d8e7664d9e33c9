"""Neighbour Discovery (RFC 4861) for the guest link, sans-IO: we are its only router.

`NdpService.handle()` takes a whole Ethernet frame carrying ICMPv6 types 133-136 and returns
the frames answering it:

* Neighbor Solicitation (source not ::) -> Neighbor Advertisement for *any* target, with our
  MAC: like ARP on IPv4, every address is "on-link via us". DAD probes (source ::) get no
  answer, or the guest would believe its address is taken.
* Router Solicitation -> Router Advertisement (unless --no-ra): the host's /64 for SLAAC, M and
  O so that DHCPv6 also runs (it hands out the host's own address as a /128), our MAC, the MTU,
  RDNSS and DNSSL (RFC 8106).
* RA and NA from the guest are consumed silently.

Unsolicited RAs go to ff02::1: a short burst (RFC 4861 §6.2.4 style) as soon as the guest is
first seen, so a guest that sent its RS before the link was up still configures, then one at
random intervals in [200, 600) s as passt does. The caller asks `next_deadline()` and calls
`unsolicited(now)` when it passes; `guest_seen(now)` starts the burst (handle() calls it too),
`reset()` forgets the guest when the link goes away.

Messages that fail the RFC 4861 §6.1.2/§7.1.1 validity checks are dropped (`last_error` says
why). Guest input never makes anything here raise.
"""

from __future__ import annotations

import logging
import random
import struct
from ipaddress import IPv6Address

from vhostpasst.config.conf import Config
from vhostpasst.services.common import INFINITE, Ignored, guarded, whole_ipv6
from vhostpasst.services.dnsname import search_list
from vhostpasst.wire.checksum import l4_ipv6
from vhostpasst.wire.errors import Buffer, Malformed, as_view
from vhostpasst.wire.eth import ETH_P_IPV6, build_eth
from vhostpasst.wire.icmp import (
    ND_NEIGHBOR_ADVERT,
    ND_NEIGHBOR_SOLICIT,
    ND_ROUTER_ADVERT,
    ND_ROUTER_SOLICIT,
    NDP_TYPES,
    build_icmpv6,
)
from vhostpasst.wire.ip import IPPROTO_ICMPV6, IPV6_MIN_MTU, build_ipv6

log = logging.getLogger(__name__)

# ND option types (RFC 4861 §4.6, RFC 8106)
OPT_SLLA = 1
OPT_TLLA = 2
OPT_PREFIX = 3
OPT_MTU = 5
OPT_RDNSS = 25
OPT_DNSSL = 31

# RA flags (RFC 4861 §4.2) and NA flags (§4.4)
RA_MANAGED = 0x80
RA_OTHER = 0x40
NA_ROUTER = 0x80000000
NA_SOLICITED = 0x40000000
NA_OVERRIDE = 0x20000000
# Prefix Information flags (§4.6.2)
PI_ONLINK = 0x80
PI_AUTONOMOUS = 0x40

# RFC 4861 §6.2.1 caps AdvDefaultLifetime at 9000 s (RFC 8319 later allows 65535, passt's
# value). 9000 is valid under both, and our unsolicited RAs refresh it every <= 600 s anyway.
ROUTER_LIFETIME = 9000

# Unsolicited RAs: a few quick ones (RFC 4861 §6.2.4: MAX_INITIAL_RTR_ADVERTISEMENTS = 3, at
# most MAX_INITIAL_RTR_ADVERT_INTERVAL = 16 s apart), then passt's [200, 600) s.
INITIAL_ADVERTS = 3
INITIAL_INTERVAL = 16.0
MIN_INTERVAL = 200.0
MAX_INTERVAL = 600.0

ALL_NODES = IPv6Address("ff02::1")
ALL_NODES_MAC = bytes.fromhex("333300000001")

_ND_HOP_LIMIT = 255  # RFC 4861: sent with 255, and only accepted with 255 (never forwarded)
_NS_LEN = 24  # ICMPv6 header + 4 reserved + 16 target
_RS_LEN = 8
_MAX_RDNSS = 127  # option length is 8 bits of 8-octet units: 1 + 2 * 127 = 255


def parse_nd_options(buf: Buffer) -> list[tuple[int, memoryview]]:
    """(type, data after type/length) for each ND option; a zero or overrunning length is
    Malformed (RFC 4861 §6.1/§7.1: such a message is invalid as a whole)."""
    view = as_view(buf)
    out: list[tuple[int, memoryview]] = []
    i = 0
    while i < len(view):
        if i + 2 > len(view):
            raise Malformed("ND option truncated")
        olen = view[i + 1] * 8
        if olen == 0:
            raise Malformed(f"ND option {view[i]} with length 0")
        if i + olen > len(view):
            raise Malformed(f"ND option {view[i]} of {olen} bytes truncated")
        out.append((view[i], view[i + 2:i + olen]))
        i += olen
    return out


def _pad8(option: bytes) -> bytes:
    return option + bytes(-len(option) % 8)


def _option(type_: int, data: bytes) -> bytes:
    """One ND option: data is padded to a whole number of 8-octet units (type/length incl.)."""
    body = _pad8(bytes(2) + data)[2:]
    return bytes((type_, (len(body) + 2) // 8)) + body


class NdpService:
    def __init__(self, config: Config, rng: random.Random | None = None) -> None:
        self.config = config
        self.rng = rng or random.Random()
        self.last_error: str | None = None  # why the last handle() answered nothing
        self._seen = False
        self._deadline: float | None = None
        self._initial_left = 0
        ip6 = config.ip6
        self._enabled = ip6 is not None and not config.no_ndp
        self._ra: bytes | None = None  # ICMPv6 RA body after the checksum: built once
        if self._enabled and not config.no_ra:
            self._ra = self._ra_body()

    # --- timers ------------------------------------------------------------------------

    def guest_seen(self, now: float) -> None:
        """The guest showed up (a frame, or a link connected): start advertising soon.

        Only the first call after construction or reset() counts."""
        if self._seen:
            return
        self._seen = True
        if self._ra is None:
            return
        self._initial_left = INITIAL_ADVERTS
        self._deadline = now

    def reset(self) -> None:
        """The link went away: the next guest gets its own initial burst."""
        self._seen = False
        self._deadline = None
        self._initial_left = 0

    def next_deadline(self) -> float | None:
        """When unsolicited() next has something to send (None: nothing scheduled)."""
        return self._deadline

    def unsolicited(self, now: float) -> list[bytes]:
        """The unsolicited RA to ff02::1 if one is due, scheduling the next one."""
        if self._ra is None or self._deadline is None or now < self._deadline:
            return []
        if self._initial_left > 1:
            self._initial_left -= 1
            # jittered like RFC 4861 §6.2.4 so that two routers never keep in step
            self._deadline = now + self.rng.uniform(INITIAL_INTERVAL / 2, INITIAL_INTERVAL)
        else:
            self._initial_left = 0
            self._deadline = now + self.rng.uniform(MIN_INTERVAL, MAX_INTERVAL)
        return [self._ra_frame(ALL_NODES, ALL_NODES_MAC)]

    # --- frames from the guest -----------------------------------------------------------

    def handle(self, frame: Buffer, now: float) -> list[bytes]:
        """The frames answering the NDP message in `frame` (often none; see `last_error`)."""
        empty: list[bytes] = []
        frames, self.last_error = guarded("NDP", lambda: self._handle(as_view(frame), now), empty)
        return frames

    def _handle(self, frame: memoryview, now: float) -> list[bytes]:
        if not self._enabled:
            raise Ignored("NDP disabled")
        eth, packet = whole_ipv6(frame, IPPROTO_ICMPV6, "ICMPv6 message")
        msg = packet.l4
        if len(msg) < 8:
            raise Malformed(f"ICMPv6 message of {len(msg)} bytes")
        type_, code = msg[0], msg[1]
        if type_ not in NDP_TYPES:
            raise Ignored(f"ICMPv6 type {type_} is not NDP")
        # RFC 4861 §6.1.1/§7.1.1 validity: from the link itself, code 0, checksum right
        if packet.hop_limit != _ND_HOP_LIMIT:
            raise Ignored(f"hop limit {packet.hop_limit}, not 255")
        if code != 0:
            raise Ignored(f"ICMPv6 code {code}")
        if l4_ipv6(packet.src, packet.dst, IPPROTO_ICMPV6, msg) != 0:  # sums to 0 when right
            raise Ignored("bad ICMPv6 checksum")
        self.guest_seen(now)
        if type_ == ND_NEIGHBOR_SOLICIT:
            return self._solicit(eth.src, packet.src, packet.dst, msg)
        if type_ == ND_ROUTER_SOLICIT:
            return self._router_solicit(eth.src, packet.src, msg)
        raise Ignored(f"ICMPv6 type {type_} from the guest consumed")

    def _solicit(self, mac: bytes, src: IPv6Address, dst: IPv6Address,
                 msg: memoryview) -> list[bytes]:
        if len(msg) < _NS_LEN:
            raise Malformed(f"Neighbor Solicitation of {len(msg)} bytes")
        target = IPv6Address(bytes(msg[8:24]))
        options = parse_nd_options(msg[_NS_LEN:])
        if target.is_multicast:
            raise Ignored(f"NS for multicast target {target}")
        if src.is_unspecified:
            raise Ignored(f"DAD probe for {target}: the address must stay free")
        if target == src:
            raise Ignored(f"NS for its own address {target}")
        if src.is_multicast:
            raise Ignored(f"NS from multicast source {src}")
        dst_mac = _lladdr(options, OPT_SLLA) or bytes(mac)
        if dst_mac[0] & 1:
            raise Ignored("NS from a multicast MAC without a usable SLLA option")
        ip6 = self.config.ip6
        assert ip6 is not None
        body = (struct.pack("!I", NA_ROUTER | NA_SOLICITED | NA_OVERRIDE) + target.packed
                + _option(OPT_TLLA, self.config.our_mac))
        icmp = build_icmpv6(ip6.our_tap_ll, src, ND_NEIGHBOR_ADVERT, 0, body)
        return [build_eth(dst_mac, self.config.our_mac, ETH_P_IPV6,
                          build_ipv6(ip6.our_tap_ll, src, IPPROTO_ICMPV6, icmp, _ND_HOP_LIMIT))]

    def _router_solicit(self, mac: bytes, src: IPv6Address, msg: memoryview) -> list[bytes]:
        if len(msg) < _RS_LEN:
            raise Malformed(f"Router Solicitation of {len(msg)} bytes")
        options = parse_nd_options(msg[_RS_LEN:])
        slla = _lladdr(options, OPT_SLLA)
        if src.is_unspecified and any(t == OPT_SLLA for t, _ in options):
            raise Ignored("RS from :: with an SLLA option (RFC 4861 §6.1.1)")
        if self._ra is None:
            raise Ignored("router advertisements disabled (--no-ra)")
        if src.is_unspecified or src.is_multicast:
            # §6.2.6: no address to answer to, so everyone gets it
            return [self._ra_frame(ALL_NODES, ALL_NODES_MAC)]
        dst_mac = slla or bytes(mac)
        if dst_mac[0] & 1:
            return [self._ra_frame(ALL_NODES, ALL_NODES_MAC)]
        return [self._ra_frame(src, dst_mac)]

    # --- the advertisement -----------------------------------------------------------------

    def _ra_body(self) -> bytes:
        """Everything after the ICMPv6 checksum: the same for every RA we send."""
        config = self.config
        ip6 = config.ip6
        assert ip6 is not None
        flags = 0
        if not config.no_dhcpv6:
            # M: DHCPv6 gives the host's own address (a /128 beside the SLAAC one); O: it
            # also gives DNS. Without a DHCPv6 server, a guest must not wait for one.
            flags = RA_OTHER | (RA_MANAGED if ip6.addr is not None else 0)
        # cur hop limit 0 (unspecified: the guest keeps its own), reachable/retrans 0 (ditto)
        body = bytearray(struct.pack("!BBHII", 0, flags, ROUTER_LIFETIME, 0, 0))
        if ip6.addr is not None:
            prefix = IPv6Address(int(ip6.addr) & ~((1 << 64) - 1))  # SLAAC needs a /64
            body += struct.pack("!BBBBIII16s", OPT_PREFIX, 4, 64, PI_ONLINK | PI_AUTONOMOUS,
                                INFINITE, INFINITE, 0, prefix.packed)
        if config.mtu >= IPV6_MIN_MTU:  # hosts ignore a smaller MTU option: send none
            body += struct.pack("!BBHI", OPT_MTU, 1, 0, min(config.mtu, INFINITE))
        body += _option(OPT_SLLA, config.our_mac)
        dns = ip6.dns[:_MAX_RDNSS] if not config.no_dhcp_dns else ()
        if dns:
            body += struct.pack("!BBHI", OPT_RDNSS, 1 + 2 * len(dns), 0, INFINITE)
            body += b"".join(a.packed for a in dns)
            # DNSSL only beside RDNSS: a search list without servers is useless
            names = search_list(config.search)
            if names and not config.no_dhcp_search:
                option = _pad8(struct.pack("!BBHI", OPT_DNSSL, 0, 0, INFINITE) + names)
                if len(option) <= 255 * 8:
                    body += bytes((OPT_DNSSL, len(option) // 8)) + option[2:]
        return bytes(body)

    def _ra_frame(self, dst: IPv6Address, dst_mac: bytes) -> bytes:
        ip6 = self.config.ip6
        assert ip6 is not None and self._ra is not None
        icmp = build_icmpv6(ip6.our_tap_ll, dst, ND_ROUTER_ADVERT, 0, self._ra)
        return build_eth(dst_mac, self.config.our_mac, ETH_P_IPV6,
                         build_ipv6(ip6.our_tap_ll, dst, IPPROTO_ICMPV6, icmp, _ND_HOP_LIMIT))


def _lladdr(options: list[tuple[int, memoryview]], type_: int) -> bytes | None:
    """The link-layer address in the first option of `type_`, if it is an Ethernet one."""
    for t, data in options:
        if t == type_ and len(data) >= 6:
            return bytes(data[:6])
    return None
