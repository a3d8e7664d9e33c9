"""Address translation rules (reference §4.8, §4.9)."""

from __future__ import annotations

from ipaddress import IPv4Address as A4
from ipaddress import IPv6Address as A6

from vhostpasst.config.conf import Config, Ip4Conf, Ip6Conf
from vhostpasst.core import nat
from vhostpasst.core.nat import GuestAddrs

GW4, HOST4 = A4("192.0.2.1"), A4("192.0.2.2")
GW6, HOST6 = A6("2001:db8::1"), A6("2001:db8::2")


def config(**kw4: object) -> Config:
    ip4 = Ip4Conf(addr=HOST4, gateway=GW4, our_tap_addr=GW4, map_host_loopback=GW4,
                  dns_match=GW4, dns_host=A4("127.0.0.53"))
    ip6 = Ip6Conf(addr=HOST6, gateway=GW6, map_host_loopback=GW6, dns_match=A6("2001:db8::53"),
                  dns_host=A6("2001:db8:1::53"), addr_ll=A6("fe80::2"))
    if kw4:
        ip4 = Ip4Conf(**{**ip4.__dict__, **kw4})  # type: ignore[arg-type]
    return Config(ip4=ip4, ip6=ip6)


def test_dns_forwarding_applies_to_tcp_udp_ports_53_853_only() -> None:
    c = config()
    assert nat.from_tap(c, True, GW4, 53) == A4("127.0.0.53")
    assert nat.from_tap(c, True, GW4, 853) == A4("127.0.0.53")
    assert nat.from_tap(c, True, GW4, 54) == A4("127.0.0.1")  # then map-host-loopback
    assert nat.from_tap(c, False, GW4, 53) == A4("127.0.0.1")  # ping: no DNS rule
    assert nat.from_tap(c, True, A6("2001:db8::53"), 53) == A6("2001:db8:1::53")


def test_map_host_loopback_and_map_guest_addr() -> None:
    c = config(map_guest_addr=A4("192.0.2.99"))
    assert nat.from_tap(c, False, GW4, 0) == A4("127.0.0.1")
    assert nat.from_tap(c, True, A4("192.0.2.99"), 80) == HOST4
    assert nat.from_tap(c, True, GW6, 80) == A6("::1")
    assert nat.from_tap(c, True, A4("203.0.113.5"), 80) == A4("203.0.113.5")


def test_no_map_gw_leaves_the_gateway_alone() -> None:
    c = config(map_host_loopback=None, dns_match=None)
    assert nat.from_tap(c, True, GW4, 53) == GW4


def test_loopback_and_unspecified_destinations_are_dropped() -> None:
    c = config()
    assert nat.from_tap(c, True, A4("127.0.0.1"), 80) is None
    assert nat.from_tap(c, True, A4("0.0.0.0"), 80) is None
    assert nat.from_tap(c, True, A6("::1"), 80) is None
    assert nat.from_tap(Config(ip4=None), True, GW4, 80) is None


def test_guest_source_reverse_mapping() -> None:
    c = config(map_guest_addr=A4("192.0.2.99"))
    g = GuestAddrs(addr4_seen=HOST4)
    assert nat.guest_source(c, g, A4("127.0.0.1")) == GW4
    assert nat.guest_source(c, g, HOST4) == A4("192.0.2.99")
    assert nat.guest_source(c, g, A4("127.0.0.2")) == GW4  # not guest accessible: gateway
    assert nat.guest_source(c, g, A4("198.51.100.7")) == A4("198.51.100.7")
    assert nat.guest_source(c, g, A6("::ffff:127.0.0.1")) == GW4
    assert nat.guest_source(c, g, A6("::1")) == GW6
    assert nat.guest_source(c, g, HOST6) == A6("fe80::1")  # our link-local
    assert nat.guest_source(c, g, A6("2001:db8:5::1")) == A6("2001:db8:5::1")


def test_without_gateway_inaccessible_sources_are_dropped() -> None:
    c = config(our_tap_addr=None, map_host_loopback=None)
    assert nat.guest_source(c, GuestAddrs(), A4("127.0.0.1")) is None


def test_from_host_destination_is_the_seen_address_else_the_assigned_one() -> None:
    c = config()
    assert nat.from_host(c, GuestAddrs(), A4("127.0.0.1")) == (GW4, HOST4)
    g = GuestAddrs(addr4_seen=A4("192.0.2.50"), addr6_ll_seen=A6("fe80::50"))
    assert nat.from_host(c, g, A4("198.51.100.7")) == (A4("198.51.100.7"), A4("192.0.2.50"))
    assert nat.from_host(c, g, A6("::1")) == (GW6, HOST6)
    assert nat.from_host(c, g, HOST6) == (A6("fe80::1"), A6("fe80::50"))  # ll to ll
