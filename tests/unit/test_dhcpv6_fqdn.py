"""DHCPv6 Client FQDN option (39, RFC 4704) for --fqdn, decoded by scapy (not by our code)."""

from __future__ import annotations

import pytest
from scapy.layers.dhcp6 import (
    DHCP6_InfoRequest,
    DHCP6_Reply,
    DHCP6_Request,
    DHCP6_Solicit,
    DHCP6OptClientFQDN,
)

from tests.unit.test_services_dhcpv6 import OUR_DUID, answer, cfg, ia_na, request
from vhostpasst.services.dhcpv6 import Dhcpv6Server


@pytest.mark.parametrize("msg, server", [(DHCP6_Solicit, None), (DHCP6_Request, OUR_DUID),
                                         (DHCP6_InfoRequest, None)],
                         ids=["solicit", "request", "information-request"])
def test_fqdn_goes_in_every_reply_with_configuration(msg: type, server: object) -> None:
    options = [] if msg is DHCP6_InfoRequest else [ia_na()]
    pkt = answer(Dhcpv6Server(cfg(fqdn="guest.example.org")),
                 request(msg(), *options, server=server))
    opt = pkt[DHCP6OptClientFQDN]
    assert opt.fqdn == b"guest.example.org."
    assert opt.flags == 0b100  # N: we update no DNS record, and override nothing unasked


def test_a_client_asking_for_dns_updates_is_told_we_override_it() -> None:
    pkt = answer(Dhcpv6Server(cfg(fqdn="guest.example.org")),
                 request(DHCP6_Request(), ia_na(), DHCP6OptClientFQDN(flags=0b001, fqdn="x."),
                         server=OUR_DUID))
    assert pkt.haslayer(DHCP6_Reply)
    assert pkt[DHCP6OptClientFQDN].flags == 0b110  # N and O (S refused)


@pytest.mark.parametrize("fqdn", [None, "bad..name"])
def test_no_fqdn_option_without_a_valid_name(fqdn: str | None) -> None:
    pkt = answer(Dhcpv6Server(cfg(fqdn=fqdn)), request(DHCP6_Solicit(), ia_na()))
    assert not pkt.haslayer(DHCP6OptClientFQDN)
