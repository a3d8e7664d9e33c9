"""UDP datagrams (RFC 768; RFC 8200 §8.1 for IPv6): view, builders, in-place writers."""

from __future__ import annotations

import struct
from typing import NamedTuple

from vhostpasst.wire import checksum
from vhostpasst.wire.checksum import AddrT, PseudoHeader
from vhostpasst.wire.errors import Buffer, Malformed, as_view
from vhostpasst.wire.ip import (
    ETH_IP4_HLEN,
    ETH_IP6_HLEN,
    IPPROTO_UDP,
    Addr4,
    Addr6,
    write_eth_ipv4_headers,
    write_eth_ipv6_headers,
)

UDP_HLEN = 8
UDP4_PAYLOAD_OFFSET = ETH_IP4_HLEN + UDP_HLEN  # 42: where a frame's UDP payload starts
UDP6_PAYLOAD_OFFSET = ETH_IP6_HLEN + UDP_HLEN  # 62

_UDP = struct.Struct("!HHHH")
_CSUM = struct.Struct("!H")


class Udp(NamedTuple):
    sport: int
    dport: int
    length: int
    check: int
    payload: memoryview  # trimmed to `length`


def parse_udp(buf: Buffer) -> Udp:
    view = as_view(buf)
    if len(view) < UDP_HLEN:
        raise Malformed(f"UDP datagram of {len(view)} bytes is shorter than its header")
    sport, dport, length, check = _UDP.unpack_from(view)
    if length < UDP_HLEN:
        raise Malformed(f"UDP length {length} below 8")
    if length > len(view):
        raise Malformed(f"UDP length {length} beyond the {len(view)} bytes present")
    return Udp(sport, dport, length, check, view[UDP_HLEN:length])


def _write_header(buf: memoryview, offset: int, pseudo: PseudoHeader[AddrT], src: AddrT,
                  dst: AddrT, sport: int, dport: int, payload_len: int) -> int:
    """Write the UDP header at `offset`, checksumming the payload that follows it under the
    pseudo-header `pseudo` (checksum.pseudo4 or pseudo6) makes; returns the datagram length."""
    length = UDP_HLEN + payload_len
    if length > 0xFFFF:
        raise ValueError(f"UDP datagram of {length} bytes is too long")
    _UDP.pack_into(buf, offset, sport, dport, length, 0)
    csum = checksum.checksum(buf[offset:offset + length], pseudo(src, dst, IPPROTO_UDP, length))
    # 0 means "no checksum": allowed over IPv4 (RFC 768), not over IPv6 (RFC 8200 §8.1)
    _CSUM.pack_into(buf, offset + 6, csum or 0xFFFF)
    return length


def _build(pseudo: PseudoHeader[AddrT], src: AddrT, dst: AddrT, sport: int, dport: int,
           payload: Buffer) -> bytes:
    out = bytearray(UDP_HLEN + len(payload))
    out[UDP_HLEN:] = payload
    _write_header(memoryview(out), 0, pseudo, src, dst, sport, dport, len(payload))
    return bytes(out)


def build_udp4(src: Addr4, dst: Addr4, sport: int, dport: int, payload: Buffer) -> bytes:
    return _build(checksum.pseudo4, src, dst, sport, dport, payload)


def build_udp6(src: Addr6, dst: Addr6, sport: int, dport: int, payload: Buffer) -> bytes:
    return _build(checksum.pseudo6, src, dst, sport, dport, payload)


def write_eth_ipv4_udp_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr4,
                               dst: Addr4, sport: int, dport: int, payload_len: int,
                               ttl: int = 255) -> int:
    """Fill Ethernet, IPv4 and UDP headers in front of a payload already at
    `buf[UDP4_PAYLOAD_OFFSET:]` (e.g. received there with recv_into); returns the frame
    length."""
    length = _write_header(buf, ETH_IP4_HLEN, checksum.pseudo4, src, dst, sport, dport,
                           payload_len)
    return write_eth_ipv4_headers(buf, dst_mac, src_mac, src, dst, IPPROTO_UDP, length, ttl)


def write_eth_ipv6_udp_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr6,
                               dst: Addr6, sport: int, dport: int, payload_len: int,
                               hop_limit: int = 255, flow_label: int = 0) -> int:
    """As write_eth_ipv4_udp_headers, payload at `buf[UDP6_PAYLOAD_OFFSET:]`."""
    length = _write_header(buf, ETH_IP6_HLEN, checksum.pseudo6, src, dst, sport, dport,
                           payload_len)
    return write_eth_ipv6_headers(buf, dst_mac, src_mac, src, dst, IPPROTO_UDP, length,
                                  hop_limit, flow_label)
