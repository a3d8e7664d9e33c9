"""services.ndp: NS -> NA, RS -> RA contents per configuration, RFC 4861 validity drops,
learned guest addresses, the unsolicited RA schedule, and fuzzing. Requests are built and
replies decoded with scapy, an encoder/decoder independent of vhostpasst's own."""

from __future__ import annotations

import random
from ipaddress import IPv6Address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet6 import (
    ICMPv6EchoRequest,
    ICMPv6ND_NA,
    ICMPv6ND_NS,
    ICMPv6ND_RA,
    ICMPv6ND_RS,
    ICMPv6NDOptDNSSL,
    ICMPv6NDOptDstLLAddr,
    ICMPv6NDOptMTU,
    ICMPv6NDOptPrefixInfo,
    ICMPv6NDOptRDNSS,
    ICMPv6NDOptSrcLLAddr,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from vhostpasst.config.conf import Config, Ip6Conf
from vhostpasst.services import ndp
from vhostpasst.services.ndp import NdpService

OUR_MAC = "9a:55:9a:55:9a:55"
GUEST_MAC = "52:54:00:12:34:56"
OTHER_MAC = "52:54:00:ab:cd:ef"
GUEST_LL = "fe80::5054:ff:fe12:3456"
GUEST_GLOBAL = "2001:db8::5054:ff:fe12:3456"
OUR_LL = "fe80::1"
ADDR = IPv6Address("2001:db8::2")
DNS = (IPv6Address("2001:db8::53"), IPv6Address("2001:db8::54"))
SEARCH = ("example.org", "test.example")

BASE_IP6: dict[str, Any] = dict(addr=ADDR, prefix_len=64, gateway=IPv6Address("2001:db8::1"),
                                our_tap_ll=IPv6Address(OUR_LL), dns=DNS)


def cfg(ip6: dict[str, Any] | None = None, **kw: Any) -> Config:
    kw.setdefault("mtu", 65520)
    kw.setdefault("search", SEARCH)
    return Config(ip6=Ip6Conf(**{**BASE_IP6, **(ip6 or {})}), **kw)


def frame(l4: Packet, src: str = GUEST_LL, dst: str = "ff02::2", hlim: int = 255,
          mac: str = GUEST_MAC, dst_mac: str = "33:33:00:00:00:02") -> bytes:
    return bytes(Ether(src=mac, dst=dst_mac) / IPv6(src=src, dst=dst, hlim=hlim) / l4)


def rs(src: str = GUEST_LL, slla: str | None = GUEST_MAC, **kw: Any) -> bytes:
    l4: Packet = ICMPv6ND_RS()
    if slla:
        l4 = l4 / ICMPv6NDOptSrcLLAddr(lladdr=slla)
    return frame(l4, src=src, **kw)


def ns(target: str = OUR_LL, src: str = GUEST_LL, dst: str | None = None,
       slla: str | None = GUEST_MAC, **kw: Any) -> bytes:
    l4: Packet = ICMPv6ND_NS(tgt=target)
    if slla:
        l4 = l4 / ICMPv6NDOptSrcLLAddr(lladdr=slla)
    if dst is None:  # the solicited-node multicast address of the target
        dst = str(IPv6Address(int(IPv6Address("ff02::1:ff00:0")) | int(IPv6Address(target))
                              & 0xFFFFFF))
    return frame(l4, src=src, dst=dst, dst_mac="33:33:ff:00:00:01", **kw)


def checksum_ok(pkt: Packet) -> bool:
    """Recompute the ICMPv6 checksum with scapy and compare with ours."""
    icmp = pkt[IPv6].payload
    ours = icmp.cksum
    fresh = Ether(bytes(pkt))
    del fresh[IPv6].payload.cksum
    return bool(Ether(bytes(fresh))[IPv6].payload.cksum == ours)


def one(service: NdpService, data: bytes, now: float = 0.0) -> Packet:
    out = service.handle(memoryview(data), now)
    assert len(out) == 1, service.last_error
    pkt = Ether(out[0])
    assert pkt.src == OUR_MAC
    assert pkt[IPv6].hlim == 255 and pkt[IPv6].src == OUR_LL
    assert pkt[IPv6].plen == len(out[0]) - 54
    assert checksum_ok(pkt)
    return pkt


# --- Neighbor Solicitation ------------------------------------------------------------------


@pytest.mark.parametrize("target", [OUR_LL, "2001:db8::1", "2001:db8::99", "fe80::abcd",
                                    "2001:db8:ffff::1"])
def test_ns_for_any_target_gets_our_mac(target: str) -> None:
    pkt = one(NdpService(cfg()), ns(target))
    na = pkt[ICMPv6ND_NA]
    assert (na.R, na.S, na.O) == (1, 1, 1)
    assert na.tgt == target
    assert pkt[ICMPv6NDOptDstLLAddr].lladdr == OUR_MAC
    assert pkt[IPv6].dst == GUEST_LL and pkt.dst == GUEST_MAC


def test_ns_from_global_source_answered_there() -> None:
    pkt = one(NdpService(cfg()), ns("2001:db8::1", src=GUEST_GLOBAL))
    assert pkt[IPv6].dst == GUEST_GLOBAL


def test_ns_reply_goes_to_the_slla_mac_else_the_frame_source() -> None:
    assert one(NdpService(cfg()), ns(slla=OTHER_MAC)).dst == OTHER_MAC
    assert one(NdpService(cfg()), ns(slla=None)).dst == GUEST_MAC


def test_unicast_ns_for_nud_answered() -> None:
    pkt = one(NdpService(cfg()), ns(OUR_LL, dst=OUR_LL))
    assert pkt[ICMPv6ND_NA].tgt == OUR_LL


def _corrupt_checksum(data: bytes) -> bytes:
    b = bytearray(data)
    b[14 + 40 + 2] ^= 0xFF
    return bytes(b)


def _zero_length_option(data: bytes) -> bytes:
    b = bytearray(data)
    b[14 + 40 + 24 + 1] = 0  # the SLLA option's length
    return bytes(b)


NS_DROPS = {
    "dad-probe": ns("2001:db8::77", src="::", slla=None),
    "hop-limit-64": ns(hlim=64),
    "hop-limit-254": ns(hlim=254),
    "code-1": frame(ICMPv6ND_NS(tgt=OUR_LL, code=1), dst=OUR_LL),
    "bad-checksum": _corrupt_checksum(ns()),
    "truncated": frame(Raw(bytes([135, 0, 0, 0]) + bytes(12)), dst=OUR_LL),
    "option-length-0": _zero_length_option(ns()),
    "option-overrun": frame(ICMPv6ND_NS(tgt=OUR_LL) / Raw(b"\x01\x02" + bytes(6)),
                            dst=OUR_LL),
    "multicast-target": ns("ff02::1", dst=OUR_LL),
    "own-address": ns(GUEST_LL, src=GUEST_LL),
}


@pytest.mark.parametrize("name", list(NS_DROPS))
def test_invalid_or_dad_ns_dropped(name: str) -> None:
    service = NdpService(cfg())
    assert service.handle(memoryview(NS_DROPS[name]), 0.0) == []
    assert service.last_error


# --- Router Solicitation / Advertisement ----------------------------------------------------


def test_rs_gets_ra_with_everything() -> None:
    pkt = one(NdpService(cfg()), rs())
    assert pkt.dst == GUEST_MAC and pkt[IPv6].dst == GUEST_LL
    ra = pkt[ICMPv6ND_RA]
    assert (ra.M, ra.O) == (1, 1)
    assert ra.routerlifetime == ndp.ROUTER_LIFETIME == 9000
    assert (ra.chlim, ra.reachabletime, ra.retranstimer) == (0, 0, 0)
    pi = pkt[ICMPv6NDOptPrefixInfo]
    assert (pi.prefix, pi.prefixlen, pi.L, pi.A) == ("2001:db8::", 64, 1, 1)
    assert pi.validlifetime == pi.preferredlifetime == 0xFFFFFFFF
    assert pkt[ICMPv6NDOptMTU].mtu == 65520
    assert pkt[ICMPv6NDOptSrcLLAddr].lladdr == OUR_MAC
    rdnss = pkt[ICMPv6NDOptRDNSS]
    assert rdnss.dns == [str(a) for a in DNS] and rdnss.lifetime == 0xFFFFFFFF
    dnssl = pkt[ICMPv6NDOptDNSSL]
    assert dnssl.searchlist == ["example.org.", "test.example."]
    assert dnssl.lifetime == 0xFFFFFFFF
    # DNSSL (the last option) ends on an 8-octet boundary with zero padding
    raw = bytes(pkt[ICMPv6ND_RA])
    assert len(raw) % 8 == 0


def test_ra_prefix_is_the_addresss_64_whatever_the_host_prefix() -> None:
    pkt = one(NdpService(cfg(ip6=dict(addr=IPv6Address("2001:db8:1:2:3::4"), prefix_len=48))),
              rs())
    assert pkt[ICMPv6NDOptPrefixInfo].prefix == "2001:db8:1:2::"
    assert pkt[ICMPv6NDOptPrefixInfo].prefixlen == 64


def _has(pkt: Packet, layer: type[Packet]) -> bool:
    return bool(pkt.haslayer(layer))


@pytest.mark.parametrize("kw, mtu, rdnss, dnssl, flags", [
    (dict(), 65520, True, True, (1, 1)),
    (dict(mtu=0), None, True, True, (1, 1)),
    (dict(mtu=1280), 1280, True, True, (1, 1)),
    (dict(mtu=576), None, True, True, (1, 1)),  # below the IPv6 minimum: hosts ignore it
    (dict(no_dhcp_dns=True), 65520, False, False, (1, 1)),
    (dict(no_dhcp_search=True), 65520, True, False, (1, 1)),
    (dict(search=()), 65520, True, False, (1, 1)),
    (dict(search=("bad..name", "-" * 70)), 65520, True, False, (1, 1)),
    (dict(ip6=dict(dns=())), 65520, False, False, (1, 1)),
    (dict(no_dhcpv6=True), 65520, True, True, (0, 0)),
    (dict(ip6=dict(addr=None)), 65520, True, True, (0, 1)),
])
def test_ra_options_follow_the_configuration(kw: dict[str, Any], mtu: int | None,
                                             rdnss: bool, dnssl: bool,
                                             flags: tuple[int, int]) -> None:
    pkt = one(NdpService(cfg(**kw)), rs())
    assert (pkt[ICMPv6NDOptMTU].mtu if _has(pkt, ICMPv6NDOptMTU) else None) == mtu
    assert _has(pkt, ICMPv6NDOptRDNSS) == rdnss
    assert _has(pkt, ICMPv6NDOptDNSSL) == dnssl
    assert (pkt[ICMPv6ND_RA].M, pkt[ICMPv6ND_RA].O) == flags
    assert _has(pkt, ICMPv6NDOptPrefixInfo) == (kw.get("ip6", {}).get("addr", ADDR) is not None)


def test_dnssl_skips_invalid_names() -> None:
    pkt = one(NdpService(cfg(search=("ok.example", "bad..name", "also.example."))), rs())
    assert pkt[ICMPv6NDOptDNSSL].searchlist == ["ok.example.", "also.example."]


def test_rs_from_unspecified_gets_multicast_ra() -> None:
    pkt = one(NdpService(cfg()), rs(src="::", slla=None))
    assert pkt.dst == "33:33:00:00:00:01" and pkt[IPv6].dst == "ff02::1"


def test_rs_reply_goes_to_slla_mac() -> None:
    assert one(NdpService(cfg()), rs(slla=OTHER_MAC)).dst == OTHER_MAC


RS_DROPS = {
    "unspecified-with-slla": rs(src="::"),
    "hop-limit-1": rs(hlim=1),
    "code-3": frame(ICMPv6ND_RS(code=3)),
    "bad-checksum": _corrupt_checksum(rs()),
    "option-length-0": frame(ICMPv6ND_RS() / Raw(b"\x01\x00" + bytes(6))),
}


@pytest.mark.parametrize("name", list(RS_DROPS))
def test_invalid_rs_dropped(name: str) -> None:
    service = NdpService(cfg())
    assert service.handle(memoryview(RS_DROPS[name]), 0.0) == []
    assert service.last_error


@pytest.mark.parametrize("data", [
    frame(ICMPv6ND_RA(), dst="ff02::1"),
    frame(ICMPv6ND_NA(tgt=GUEST_LL, R=0, S=0, O=1), dst="ff02::1"),
    frame(ICMPv6EchoRequest(), dst=OUR_LL),
], ids=["ra", "na", "echo"])
def test_other_messages_consumed_silently(data: bytes) -> None:
    assert NdpService(cfg()).handle(memoryview(data), 0.0) == []


def test_no_ra_still_answers_ns() -> None:
    service = NdpService(cfg(no_ra=True))
    assert service.handle(memoryview(rs()), 0.0) == []
    assert one(service, ns())[ICMPv6ND_NA].tgt == OUR_LL
    service.guest_seen(0.0)
    assert service.next_deadline() is None and service.unsolicited(1e9) == []


@pytest.mark.parametrize("config", [cfg(no_ndp=True), Config(ip6=None)],
                         ids=["no-ndp", "no-ipv6"])
def test_disabled_does_nothing(config: Config) -> None:
    service = NdpService(config)
    for data in (rs(), ns()):
        assert service.handle(memoryview(data), 0.0) == []
    service.guest_seen(0.0)
    assert service.next_deadline() is None and service.unsolicited(1e9) == []


# --- unsolicited advertisements -------------------------------------------------------------


def check_unsolicited(out: list[bytes]) -> Packet:
    assert len(out) == 1
    pkt = Ether(out[0])
    assert pkt.dst == "33:33:00:00:00:01" and pkt.src == OUR_MAC
    assert pkt[IPv6].dst == "ff02::1" and pkt[IPv6].src == OUR_LL and pkt[IPv6].hlim == 255
    assert checksum_ok(pkt)
    assert pkt[ICMPv6ND_RA].routerlifetime == 9000
    assert pkt[ICMPv6NDOptPrefixInfo].prefix == "2001:db8::"
    return pkt


def test_unsolicited_schedule_burst_then_200_to_600s() -> None:
    service = NdpService(cfg(), rng=random.Random(1))
    assert service.next_deadline() is None
    assert service.unsolicited(1000.0) == []
    service.guest_seen(1000.0)
    assert service.next_deadline() == 1000.0
    assert service.unsolicited(999.0) == []
    check_unsolicited(service.unsolicited(1000.0))
    now = 1000.0
    gaps = []
    for _ in range(12):
        deadline = service.next_deadline()
        assert deadline is not None and deadline > now
        assert service.unsolicited(deadline - 0.001) == []
        now = deadline
        check_unsolicited(service.unsolicited(now))
        gaps.append(deadline)
    intervals = [b - a for a, b in zip([1000.0, *gaps], gaps, strict=False)]
    assert all(8 <= g <= 16 for g in intervals[:2]), intervals
    assert all(200 <= g < 600 for g in intervals[2:]), intervals
    assert len({round(g) for g in intervals[2:]}) > 1  # random, not fixed


def test_guest_seen_counts_once_until_reset() -> None:
    service = NdpService(cfg(), rng=random.Random(2))
    service.guest_seen(10.0)
    service.unsolicited(10.0)
    later = service.next_deadline()
    service.guest_seen(11.0)  # no new burst for the same guest
    assert service.next_deadline() == later
    service.reset()
    assert service.next_deadline() is None
    service.guest_seen(50.0)
    assert service.next_deadline() == 50.0


def test_handle_marks_the_guest_seen() -> None:
    service = NdpService(cfg())
    service.handle(memoryview(ns()), 42.0)
    assert service.next_deadline() == 42.0
    check_unsolicited(service.unsolicited(42.0))


def test_late_call_sends_one_ra_only() -> None:
    service = NdpService(cfg())
    service.guest_seen(0.0)
    assert len(service.unsolicited(1e6)) == 1
    deadline = service.next_deadline()
    assert deadline is not None and deadline > 1e6


# --- fuzzing --------------------------------------------------------------------------------

VALID = [rs(), ns(), ns("2001:db8::1", src=GUEST_GLOBAL)]


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_garbage_never_raises(data: bytes) -> None:
    service = NdpService(cfg())
    assert isinstance(service.handle(memoryview(data), 0.0), list)
    # and the same bytes behind a plausible Ethernet/IPv6/ICMPv6 header
    head = bytes(Ether(src=GUEST_MAC, dst="33:33:00:00:00:02")
                 / IPv6(src=GUEST_LL, dst="ff02::2", nh=58, plen=len(data)))
    assert isinstance(service.handle(memoryview(head + data), 0.0), list)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)),
                                        max_size=6), st.integers(0, 200))
def test_mutated_ndp_never_raises(base: bytes, flips: list[tuple[int, int]],
                                  cut: int) -> None:
    data = bytearray(base)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    service = NdpService(cfg())
    out = service.handle(memoryview(bytes(data[:len(data) - cut])), 0.0)
    for reply in out:
        assert checksum_ok(Ether(reply))
