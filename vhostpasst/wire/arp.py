"""ARP packets (RFC 826): view and builder.

The view handles any hardware/protocol address sizes (the fixed header says how long they
are); the builder makes only the Ethernet/IPv4 form, the one we ever send.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address
from typing import NamedTuple

from vhostpasst.wire.errors import Buffer, Malformed, as_view

ARPHRD_ETHER = 1
ARP_PTYPE_IP = 0x0800
ARPOP_REQUEST = 1
ARPOP_REPLY = 2

ARP_HLEN = 8  # fixed part, before the four addresses

_FIXED = struct.Struct("!HHBBH")
_ETH_IP = struct.Struct("!HHBBH6s4s6s4s")


class Arp(NamedTuple):
    htype: int
    ptype: int
    hlen: int
    plen: int
    op: int
    sha: bytes  # sender hardware address (hlen bytes)
    spa: bytes  # sender protocol address (plen bytes)
    tha: bytes
    tpa: bytes

    @property
    def is_eth_ipv4(self) -> bool:
        return (self.htype == ARPHRD_ETHER and self.ptype == ARP_PTYPE_IP
                and self.hlen == 6 and self.plen == 4)


def parse_arp(buf: Buffer) -> Arp:
    view = as_view(buf)
    if len(view) < ARP_HLEN:
        raise Malformed(f"ARP packet of {len(view)} bytes is shorter than its header")
    htype, ptype, hlen, plen, op = _FIXED.unpack_from(view)
    end = ARP_HLEN + 2 * (hlen + plen)
    if len(view) < end:  # trailing bytes are Ethernet padding: allowed
        raise Malformed(f"ARP packet of {len(view)} bytes, addresses need {end}")
    o = ARP_HLEN
    sha = bytes(view[o:o + hlen])
    o += hlen
    spa = bytes(view[o:o + plen])
    o += plen
    tha = bytes(view[o:o + hlen])
    o += hlen
    tpa = bytes(view[o:o + plen])
    return Arp(htype, ptype, hlen, plen, op, sha, spa, tha, tpa)


def build_arp(op: int, sha: bytes, spa: IPv4Address | bytes, tha: bytes,
              tpa: IPv4Address | bytes) -> bytes:
    """An Ethernet/IPv4 ARP packet (28 bytes)."""
    spa_b = spa.packed if isinstance(spa, IPv4Address) else spa
    tpa_b = tpa.packed if isinstance(tpa, IPv4Address) else tpa
    if len(sha) != 6 or len(tha) != 6 or len(spa_b) != 4 or len(tpa_b) != 4:
        raise ValueError("ARP for Ethernet/IPv4 needs 6-byte MACs and 4-byte addresses")
    return _ETH_IP.pack(ARPHRD_ETHER, ARP_PTYPE_IP, 6, 4, op, sha, spa_b, tha, tpa_b)
