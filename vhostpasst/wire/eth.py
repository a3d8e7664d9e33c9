"""Ethernet II frames (IEEE 802.3 with an EtherType): view and builders.

MAC addresses are returned as `bytes` (6 bytes: cheap to compare and hash); the payload is a
memoryview slice of the frame, so nothing past the header is copied.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from vhostpasst.wire.errors import Buffer, Malformed, as_view

ETH_ALEN = 6
ETH_HLEN = 14

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD

BROADCAST_MAC = b"\xff" * ETH_ALEN

_ETH = struct.Struct("!6s6sH")


class Eth(NamedTuple):
    dst: bytes
    src: bytes
    ethertype: int
    payload: memoryview  # everything after the 14-byte header, trailing padding included


def parse_eth(buf: Buffer) -> Eth:
    view = as_view(buf)
    if len(view) < ETH_HLEN:
        raise Malformed(f"Ethernet frame of {len(view)} bytes is shorter than its header")
    dst, src, ethertype = _ETH.unpack_from(view)
    return Eth(dst, src, ethertype, view[ETH_HLEN:])


def _mac(mac: bytes) -> bytes:
    if len(mac) != ETH_ALEN:
        raise ValueError(f"MAC address must be {ETH_ALEN} bytes, not {len(mac)}")
    return mac


def build_eth(dst: bytes, src: bytes, ethertype: int, payload: Buffer) -> bytes:
    return _ETH.pack(_mac(dst), _mac(src), ethertype) + bytes(payload)


def write_eth_header(buf: memoryview, dst: bytes, src: bytes, ethertype: int) -> None:
    """Write the 14-byte header at the start of `buf` (the payload is already after it)."""
    _ETH.pack_into(buf, 0, _mac(dst), _mac(src), ethertype)
