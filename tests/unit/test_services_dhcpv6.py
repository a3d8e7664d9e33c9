"""services.dhcpv6: every message rule, the options of each reply, addressing, drops and
fuzzing. Requests are built and replies decoded with scapy's DHCPv6 layers, independently of
vhostpasst's own encoders."""

from __future__ import annotations

import struct
from ipaddress import IPv6Address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.dhcp6 import (
    DHCP6,
    DUID_LL,
    DHCP6_Advertise,
    DHCP6_Confirm,
    DHCP6_Decline,
    DHCP6_InfoRequest,
    DHCP6_Rebind,
    DHCP6_Release,
    DHCP6_Renew,
    DHCP6_Reply,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptClientId,
    DHCP6OptDNSDomains,
    DHCP6OptDNSServers,
    DHCP6OptElapsedTime,
    DHCP6OptIA_NA,
    DHCP6OptIA_PD,
    DHCP6OptIAAddress,
    DHCP6OptOptReq,
    DHCP6OptPref,
    DHCP6OptRapidCommit,
    DHCP6OptServerId,
    DHCP6OptStatusCode,
)
from scapy.layers.inet import UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import Packet, Raw

from vhostpasst.config.conf import Config, Ip6Conf
from vhostpasst.services import dhcpv6
from vhostpasst.services.dhcpv6 import Dhcpv6Server

OUR_MAC = "9a:55:9a:55:9a:55"
GUEST_MAC = "52:54:00:12:34:56"
GUEST_LL = "fe80::5054:ff:fe12:3456"
OUR_LL = "fe80::1"
ADDR = IPv6Address("2001:db8::2")
OTHER = "2001:db8::99"
DNS = (IPv6Address("2001:db8::53"), IPv6Address("2001:db8::54"))
SEARCH = ("example.org", "test.example")
TRID = 0xABCDEF
IAID = 0x1234

OUR_DUID = DUID_LL(lladdr=OUR_MAC)
CLIENT_DUID = DUID_LL(lladdr=GUEST_MAC)
FOREIGN_DUID = DUID_LL(lladdr="02:00:00:00:00:99")


def cfg(ip6: dict[str, Any] | None = None, **kw: Any) -> Config:
    kw.setdefault("search", SEARCH)
    base: dict[str, Any] = dict(addr=ADDR, our_tap_ll=IPv6Address(OUR_LL), dns=DNS)
    return Config(ip6=Ip6Conf(**{**base, **(ip6 or {})}), **kw)


def request(msg: Packet, *options: Packet, client: bool = True, server: Any = None,
            src: str = GUEST_LL, dst: str = "ff02::1:2", dport: int = 547) -> bytes:
    msg.trid = TRID
    pkt = msg
    if client:
        pkt = pkt / DHCP6OptClientId(duid=CLIENT_DUID)
    if server is not None:
        pkt = pkt / DHCP6OptServerId(duid=server)
    pkt = pkt / DHCP6OptElapsedTime()
    for o in options:
        pkt = pkt / o
    return bytes(Ether(src=GUEST_MAC, dst="33:33:00:01:00:02") / IPv6(src=src, dst=dst)
                 / UDP(sport=546, dport=dport) / pkt)


def ia_na(*addrs: str, iaid: int = IAID) -> Packet:
    return DHCP6OptIA_NA(iaid=iaid, T1=0, T2=0,
                         ianaopts=[DHCP6OptIAAddress(addr=a, preflft=0, validlft=0)
                                   for a in addrs])


def answer(server: Dhcpv6Server, data: bytes) -> Packet:
    out = server.handle(memoryview(data))
    assert out is not None, server.last_error
    pkt = Ether(out)
    # addressing: from us to the client, link-local to link-local, 547 -> 546
    assert (pkt.src, pkt.dst) == (OUR_MAC, GUEST_MAC)
    assert (pkt[IPv6].src, pkt[IPv6].dst) == (OUR_LL, GUEST_LL)
    assert (pkt[UDP].sport, pkt[UDP].dport) == (547, 546)
    assert pkt[IPv6].plen == len(out) - 54 == pkt[UDP].len
    ours = pkt[UDP].chksum
    fresh = pkt.copy()
    del fresh[UDP].chksum
    assert Ether(bytes(fresh))[UDP].chksum == ours
    assert pkt[UDP].payload.trid == TRID
    assert bytes(pkt[DHCP6OptServerId].duid) == bytes(OUR_DUID)
    return pkt


def ias(pkt: Packet) -> list[Packet]:
    found = []
    layer = pkt[UDP].payload
    while layer and not isinstance(layer, Raw):
        if isinstance(layer, DHCP6OptIA_NA):
            found.append(layer)
        layer = layer.payload
    return found


def status(opt: Packet) -> int | None:
    """The status code directly in `opt` (a message or an IA), None if there is none."""
    if isinstance(opt, (DHCP6OptIA_NA, DHCP6OptIA_PD)):
        for o in opt.ianaopts if isinstance(opt, DHCP6OptIA_NA) else opt.iapdopt:
            if isinstance(o, DHCP6OptStatusCode):
                return int(o.statuscode)
        return None
    return int(opt[DHCP6OptStatusCode].statuscode) if opt.haslayer(DHCP6OptStatusCode) else None


def check_lease(pkt: Packet, iaid: int = IAID) -> None:
    (ia,) = ias(pkt)
    assert ia.iaid == iaid
    assert ia.T1 == ia.T2 == 0xFFFFFFFF
    (addr,) = [o for o in ia.ianaopts if isinstance(o, DHCP6OptIAAddress)]
    assert addr.addr == str(ADDR)
    assert addr.preflft == addr.validlft == 0xFFFFFFFF


def check_info(pkt: Packet) -> None:
    assert pkt[DHCP6OptDNSServers].dnsservers == [str(a) for a in DNS]
    assert pkt[DHCP6OptDNSDomains].dnsdomains == ["example.org.", "test.example."]
    assert bytes(pkt[DHCP6OptClientId].duid) == bytes(CLIENT_DUID)


# --- the message rules ----------------------------------------------------------------------


def test_solicit_gets_advertise_with_lease_and_preference() -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(DHCP6_Solicit(), ia_na(),
                                              DHCP6OptOptReq(reqopts=[23, 24])))
    assert pkt.haslayer(DHCP6_Advertise)
    assert pkt[DHCP6OptPref].prefval == 255
    assert not pkt.haslayer(DHCP6OptRapidCommit)
    check_lease(pkt)
    check_info(pkt)


def test_solicit_with_rapid_commit_gets_reply_with_rapid_commit() -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(DHCP6_Solicit(), ia_na(), DHCP6OptRapidCommit()))
    assert pkt.haslayer(DHCP6_Reply) and pkt.haslayer(DHCP6OptRapidCommit)
    assert not pkt.haslayer(DHCP6OptPref)
    check_lease(pkt)
    check_info(pkt)


@pytest.mark.parametrize("msg", [DHCP6_Request, DHCP6_Renew])
def test_request_and_renew_with_our_server_id_get_reply(msg: type[Packet]) -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(msg(), ia_na(str(ADDR)), server=OUR_DUID))
    assert pkt.haslayer(DHCP6_Reply)
    check_lease(pkt)
    check_info(pkt)


@pytest.mark.parametrize("server", [None, OUR_DUID])
def test_rebind_gets_reply(server: Any) -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(DHCP6_Rebind(), ia_na(str(ADDR)), server=server))
    assert pkt.haslayer(DHCP6_Reply)
    check_lease(pkt)


@pytest.mark.parametrize("msg", [DHCP6_Renew, DHCP6_Rebind])
def test_renewing_another_address_returns_it_with_zero_lifetimes(msg: type[Packet]) -> None:
    server = OUR_DUID if msg is DHCP6_Renew else None
    pkt = answer(Dhcpv6Server(cfg()), request(msg(), ia_na(OTHER), server=server))
    (ia,) = ias(pkt)
    lifetimes = {o.addr: (o.preflft, o.validlft) for o in ia.ianaopts
                 if isinstance(o, DHCP6OptIAAddress)}
    assert lifetimes == {str(ADDR): (0xFFFFFFFF, 0xFFFFFFFF), OTHER: (0, 0)}


def test_iaid_is_copied() -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(DHCP6_Solicit(), ia_na(iaid=0xDEADBEEF)))
    check_lease(pkt, iaid=0xDEADBEEF)


def test_address_goes_to_the_first_ia_only() -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(DHCP6_Solicit(), ia_na(iaid=1), ia_na(iaid=2)))
    first, second = ias(pkt)
    assert first.iaid == 1 and status(first) is None
    assert second.iaid == 2 and status(second) == dhcpv6.STATUS_NO_ADDRS_AVAIL
    assert not any(isinstance(o, DHCP6OptIAAddress) for o in second.ianaopts)


def test_ia_pd_gets_no_prefix_avail() -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(DHCP6_Solicit(), ia_na(), DHCP6OptIA_PD(iaid=5)))
    assert pkt[DHCP6OptIA_PD].iaid == 5
    assert status(pkt[DHCP6OptIA_PD]) == dhcpv6.STATUS_NO_PREFIX_AVAIL
    check_lease(pkt)


def test_no_address_configured_gives_no_addrs_avail() -> None:
    pkt = answer(Dhcpv6Server(cfg(ip6=dict(addr=None))), request(DHCP6_Solicit(), ia_na()))
    (ia,) = ias(pkt)
    assert status(ia) == dhcpv6.STATUS_NO_ADDRS_AVAIL


@pytest.mark.parametrize("addrs, code", [
    ([str(ADDR)], dhcpv6.STATUS_SUCCESS),
    ([OTHER], dhcpv6.STATUS_NOT_ON_LINK),
    ([str(ADDR), OTHER], dhcpv6.STATUS_NOT_ON_LINK),
])
def test_confirm(addrs: list[str], code: int) -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(DHCP6_Confirm(), ia_na(*addrs)))
    assert pkt.haslayer(DHCP6_Reply)
    assert status(pkt[UDP].payload) == code
    assert ias(pkt) == []


def test_information_request_gets_dns_and_search_but_no_ia() -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(DHCP6_InfoRequest()))
    assert pkt.haslayer(DHCP6_Reply)
    assert ias(pkt) == []
    check_info(pkt)


def test_information_request_without_client_id() -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(DHCP6_InfoRequest(), client=False))
    assert not pkt.haslayer(DHCP6OptClientId)
    assert pkt.haslayer(DHCP6OptDNSServers)


@pytest.mark.parametrize("msg", [DHCP6_Release, DHCP6_Decline])
def test_release_and_decline_get_success(msg: type[Packet]) -> None:
    pkt = answer(Dhcpv6Server(cfg()), request(msg(), ia_na(str(ADDR)), server=OUR_DUID))
    assert pkt.haslayer(DHCP6_Reply)
    assert status(pkt[UDP].payload) == dhcpv6.STATUS_SUCCESS
    assert bytes(pkt[DHCP6OptClientId].duid) == bytes(CLIENT_DUID)


DROPS = {
    "solicit-with-server-id": request(DHCP6_Solicit(), ia_na(), server=OUR_DUID),
    "solicit-without-client-id": request(DHCP6_Solicit(), ia_na(), client=False),
    "request-without-server-id": request(DHCP6_Request(), ia_na()),
    "request-foreign-server-id": request(DHCP6_Request(), ia_na(), server=FOREIGN_DUID),
    "request-without-client-id": request(DHCP6_Request(), ia_na(), client=False,
                                         server=OUR_DUID),
    "renew-foreign-server-id": request(DHCP6_Renew(), ia_na(), server=FOREIGN_DUID),
    "rebind-foreign-server-id": request(DHCP6_Rebind(), ia_na(), server=FOREIGN_DUID),
    "confirm-with-server-id": request(DHCP6_Confirm(), ia_na(str(ADDR)), server=OUR_DUID),
    "confirm-without-addresses": request(DHCP6_Confirm(), ia_na()),
    "info-request-with-ia": request(DHCP6_InfoRequest(), ia_na()),
    "info-request-foreign-server": request(DHCP6_InfoRequest(), server=FOREIGN_DUID),
    "release-foreign-server": request(DHCP6_Release(), ia_na(), server=FOREIGN_DUID),
    "advertise": request(DHCP6_Advertise(), server=OUR_DUID),
    "reply": request(DHCP6_Reply(), server=OUR_DUID),
    "reconfigure": request(DHCP6(msgtype=10), server=OUR_DUID),
    "relay-forw": bytes(Ether(src=GUEST_MAC) / IPv6(src=GUEST_LL, dst="ff02::1:2")
                        / UDP(sport=547, dport=547) / Raw(bytes([12, 0]) + bytes(32))),
    "unicast": request(DHCP6_Solicit(), ia_na(), dst=OUR_LL),
    "wrong-port": request(DHCP6_Solicit(), ia_na(), dport=548),
    "unspecified-source": request(DHCP6_Solicit(), ia_na(), src="::"),
    "truncated-option": bytes(Ether(src=GUEST_MAC) / IPv6(src=GUEST_LL, dst="ff02::1:2")
                              / UDP(sport=546, dport=547)
                              / Raw(bytes([1, 0xAB, 0xCD, 0xEF, 0, 1, 0, 20, 0, 3]))),
    "short-ia-na": request(DHCP6_Solicit(), Raw(struct.pack("!HHI", 3, 4, 1))),
    "short-message": bytes(Ether(src=GUEST_MAC) / IPv6(src=GUEST_LL, dst="ff02::1:2")
                           / UDP(sport=546, dport=547) / Raw(b"\x01\x00")),
}


@pytest.mark.parametrize("name", list(DROPS))
def test_dropped(name: str) -> None:
    server = Dhcpv6Server(cfg())
    assert server.handle(memoryview(DROPS[name])) is None
    assert server.last_error


@pytest.mark.parametrize("config", [cfg(no_dhcpv6=True), Config(ip6=None)],
                         ids=["no-dhcpv6", "no-ipv6"])
def test_disabled(config: Config) -> None:
    assert Dhcpv6Server(config).handle(memoryview(request(DHCP6_Solicit(), ia_na()))) is None


# --- options --------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, dns, search", [
    (dict(), True, True),
    (dict(no_dhcp_dns=True), False, True),
    (dict(no_dhcp_search=True), True, False),
    (dict(search=()), True, False),
    (dict(ip6=dict(dns=())), False, True),
])
def test_dns_and_search_follow_the_configuration(kw: dict[str, Any], dns: bool,
                                                 search: bool) -> None:
    for msg in (request(DHCP6_Solicit(), ia_na()), request(DHCP6_InfoRequest())):
        pkt = answer(Dhcpv6Server(cfg(**kw)), msg)
        assert pkt.haslayer(DHCP6OptDNSServers) == dns
        assert pkt.haslayer(DHCP6OptDNSDomains) == search


def test_domain_list_is_uncompressed_labels() -> None:
    server = Dhcpv6Server(cfg(search=("a.example", "b.example", "bad..name")))
    out = server.handle(memoryview(request(DHCP6_InfoRequest())))
    assert out is not None
    wire = b"\x01a\x07example\x00\x01b\x07example\x00"
    assert struct.pack("!HH", 24, len(wire)) + wire in out


def test_server_id_is_a_stable_duid_ll_of_our_mac() -> None:
    a, b = Dhcpv6Server(cfg()), Dhcpv6Server(cfg())
    assert a.server_id == b.server_id == bytes.fromhex("00030001") + bytes.fromhex(
        OUR_MAC.replace(":", ""))
    other = Dhcpv6Server(cfg(our_mac=bytes.fromhex("020000000001")))
    assert other.server_id.endswith(bytes.fromhex("020000000001"))


# --- fuzzing --------------------------------------------------------------------------------

VALID = [request(DHCP6_Solicit(), ia_na()), request(DHCP6_Renew(), ia_na(OTHER),
                                                    server=OUR_DUID),
         request(DHCP6_Confirm(), ia_na(str(ADDR))), request(DHCP6_InfoRequest())]


def _udp_frame(payload: bytes) -> bytes:
    return bytes(Ether(src=GUEST_MAC, dst="33:33:00:01:00:02")
                 / IPv6(src=GUEST_LL, dst="ff02::1:2") / UDP(sport=546, dport=547) / payload)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=300))
def test_garbage_never_raises(data: bytes) -> None:
    server = Dhcpv6Server(cfg())
    server.handle(memoryview(data))
    out = server.handle(memoryview(_udp_frame(data)))
    assert out is None or Ether(out)[UDP].payload.msgtype in (2, 7)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(54, 200), st.integers(0, 255)),
                                        max_size=6), st.integers(0, 120))
def test_mutated_requests_never_raise(base: bytes, flips: list[tuple[int, int]],
                                      cut: int) -> None:
    data = bytearray(base)
    for pos, value in flips:
        if pos < len(data):
            data[pos] = value
    Dhcpv6Server(cfg()).handle(memoryview(bytes(data[:max(len(data) - cut, 0)])))
