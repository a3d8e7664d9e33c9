"""Where host-initiated IPv6 goes in the guest (core/nat.py guest_destination), from what the
dispatcher learns of the guest's frames: duplicate address detection, multicast listener
reports, traffic. Frames are built with scapy, not with our own code."""

from __future__ import annotations

from ipaddress import IPv6Address

from scapy.layers.inet6 import (
    UDP,
    ICMPv6MLDMultAddrRec,
    ICMPv6MLReport,
    ICMPv6MLReport2,
    ICMPv6ND_NS,
    IPv6,
)
from scapy.layers.l2 import Ether
from scapy.packet import Packet

from vhostpasst.config.conf import Config, Ip6Conf
from vhostpasst.core import nat
from vhostpasst.dispatch import Dispatcher

ASSIGNED = IPv6Address("2001:db8::2")
SLAAC = IPv6Address("2001:db8::5054:ff:fe12:3456")
GUEST_LL = "fe80::5054:ff:fe12:3456"
GUEST_MAC = "52:54:00:12:34:56"


def dispatcher() -> Dispatcher:
    return Dispatcher(Config(ip6=Ip6Conf(addr=ASSIGNED, our_tap_ll=IPv6Address("fe80::1"))))


def send(d: Dispatcher, pkt: Packet) -> None:
    d.on_frames([memoryview(bytes(Ether(src=GUEST_MAC, dst="33:33:00:00:00:01") / pkt))])


def dad(target: IPv6Address | str) -> Packet:
    return IPv6(src="::", dst="ff02::1:ff00:1", hlim=255) / ICMPv6ND_NS(tgt=str(target))


def destination(d: Dispatcher) -> IPv6Address | None:
    got = nat.guest_destination(d.config, d.guest, True)
    assert got is None or isinstance(got, IPv6Address)
    return got


def test_slaac_alone_inbound_goes_to_the_address_it_announced() -> None:
    d = dispatcher()
    assert destination(d) == ASSIGNED  # nothing known yet: the assigned one, as passt
    send(d, dad(GUEST_LL))  # link-local: learned from traffic, not here
    assert destination(d) == ASSIGNED
    send(d, dad(SLAAC))
    assert destination(d) == SLAAC


def test_a_guest_that_announced_the_assigned_address_keeps_it() -> None:
    d = dispatcher()
    send(d, dad(ASSIGNED))
    send(d, dad(SLAAC))  # its SLAAC address as well: replies would come from the assigned
    assert destination(d) == ASSIGNED


def test_an_mld_join_of_the_assigned_solicited_node_group_shows_it_holds_it() -> None:
    """A static address without DAD (nodad) is still joined to its solicited-node group."""
    for report in (ICMPv6MLReport2(records=[
                       ICMPv6MLDMultAddrRec(rtype=4, dst="ff02::1:ff12:3456"),
                       ICMPv6MLDMultAddrRec(rtype=4, dst="ff02::1:ff00:2")]),
                   ICMPv6MLReport(mladdr="ff02::1:ff00:2")):
        d = dispatcher()
        send(d, dad(SLAAC))
        send(d, IPv6(src=GUEST_LL, dst="ff02::16", hlim=1) / report)
        assert destination(d) == ASSIGNED, report.summary()


def test_a_leave_or_another_group_is_not_a_claim() -> None:
    d = dispatcher()
    send(d, dad(SLAAC))
    send(d, IPv6(src=GUEST_LL, dst="ff02::16", hlim=1) / ICMPv6MLReport2(records=[
        ICMPv6MLDMultAddrRec(rtype=3, dst="ff02::1:ff00:2"),  # CHANGE_TO_INCLUDE: a leave
        ICMPv6MLDMultAddrRec(rtype=4, dst="ff02::1:ff00:3")]))
    assert destination(d) == SLAAC


def test_traffic_from_an_address_wins() -> None:
    d = dispatcher()
    send(d, dad(ASSIGNED))
    send(d, IPv6(src=str(SLAAC), dst="2001:db8::1") / UDP(sport=1000, dport=2000))
    assert destination(d) == SLAAC
