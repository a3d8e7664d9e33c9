"""The pieces of proto/udp.py that carry an inbound datagram's destination: the packet-info
control message of the Python read path (the C one is tested end to end in
tests/netns/test_e2e_udp_dest.py) and the Ethernet address of a multicast group."""

from __future__ import annotations

import socket
import struct
from ipaddress import IPv4Address, IPv6Address

from vhostpasst.proto.udp import IP_PKTINFO, _pktinfo_destination, multicast_mac


def test_ipv4_pktinfo_gives_the_header_destination_not_the_routing_one() -> None:
    data = struct.pack("=i4s4s", 3, IPv4Address("192.0.2.2").packed,
                       IPv4Address("239.1.2.3").packed)
    anc = [(socket.IPPROTO_IP, IP_PKTINFO, data)]
    assert _pktinfo_destination(anc) == (IPv4Address("239.1.2.3"), 3)


def test_ipv6_pktinfo_and_nothing_usable() -> None:
    data = struct.pack("=16si", IPv6Address("2001:db8::3").packed, 7)
    assert _pktinfo_destination([(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, data)]) == \
        (IPv6Address("2001:db8::3"), 7)
    assert _pktinfo_destination([(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, data[:8])]) is None
    assert _pktinfo_destination([]) is None


def test_multicast_macs() -> None:
    assert multicast_mac(IPv4Address("239.1.2.3")) == bytes.fromhex("01005e010203")
    assert multicast_mac(IPv4Address("224.129.2.3")) == bytes.fromhex("01005e010203")
    assert multicast_mac(IPv6Address("ff02::1:ff00:1")) == bytes.fromhex("3333ff000001")
