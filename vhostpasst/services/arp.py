"""ARP proxy (RFC 826), sans-IO: answer the guest's requests with our MAC.

With no ARP table of our own, every IPv4 address the guest asks about is "on-link via us",
except its own: answering for that would make the guest's duplicate address detection
(RFC 5227) believe its address is taken. The reply goes to the sender's hardware address as
the request states it.

Unanswered: anything but an Ethernet/IPv4 ARP request (replies included), gratuitous
announcements (sender and target address equal), requests for the guest's own address, and
frames that do not parse. Guest input never makes `reply()` raise.
"""

from __future__ import annotations

import logging
from ipaddress import IPv4Address

from vhostpasst.wire.arp import ARPOP_REPLY, ARPOP_REQUEST, build_arp, parse_arp
from vhostpasst.wire.errors import Buffer, Malformed
from vhostpasst.wire.eth import ETH_P_ARP, build_eth, parse_eth

log = logging.getLogger(__name__)

_ZERO = bytes(4)


def reply(frame: Buffer, our_mac: bytes, guest_addr: IPv4Address | None) -> bytes | None:
    """The Ethernet frame answering ARP request `frame`, or None if it gets no answer.

    Never raises on guest input: anything that does not parse is simply not answered.
    """
    try:
        return _reply(frame, our_mac, guest_addr)
    except Malformed as e:
        log.debug("ARP: malformed frame ignored: %s", e)
        return None


def _reply(frame: Buffer, our_mac: bytes, guest_addr: IPv4Address | None) -> bytes | None:
    eth = parse_eth(frame)
    if eth.ethertype != ETH_P_ARP:
        return None
    req = parse_arp(eth.payload)
    if not req.is_eth_ipv4 or req.op != ARPOP_REQUEST:
        return None
    if req.spa == req.tpa and req.spa != _ZERO:
        return None  # a gratuitous announcement: nothing to answer
    if guest_addr is not None and req.tpa == guest_addr.packed:
        return None  # the guest's own address (including its DAD probes)
    arp = build_arp(ARPOP_REPLY, our_mac, req.tpa, req.sha, req.spa)
    # RFC 826: the reply goes to the requester's hardware address from the packet itself
    return build_eth(req.sha, our_mac, ETH_P_ARP, arp)
