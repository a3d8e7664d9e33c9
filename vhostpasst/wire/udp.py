"""UDP datagrams (RFC 768; RFC 8200 §8.1 for IPv6): view, builders, in-place writers."""

from __future__ import annotations

import struct
from typing import NamedTuple

from vhostpasst.wire import checksum
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


def _check_len(length: int) -> None:
    if length > 0xFFFF:
        raise ValueError(f"UDP datagram of {length} bytes is too long")


def write_udp4_header(buf: memoryview, src: Addr4, dst: Addr4, sport: int, dport: int,
                      payload_len: int, offset: int = 0) -> None:
    """Write the UDP header at `offset`, checksumming the payload that follows it."""
    length = UDP_HLEN + payload_len
    _check_len(length)
    _UDP.pack_into(buf, offset, sport, dport, length, 0)
    csum = checksum.l4_ipv4(src, dst, IPPROTO_UDP, buf[offset:offset + length])
    _CSUM.pack_into(buf, offset + 6, csum or 0xFFFF)  # 0 means "no checksum" (RFC 768)


def write_udp6_header(buf: memoryview, src: Addr6, dst: Addr6, sport: int, dport: int,
                      payload_len: int, offset: int = 0) -> None:
    length = UDP_HLEN + payload_len
    _check_len(length)
    _UDP.pack_into(buf, offset, sport, dport, length, 0)
    csum = checksum.l4_ipv6(src, dst, IPPROTO_UDP, buf[offset:offset + length])
    _CSUM.pack_into(buf, offset + 6, csum or 0xFFFF)  # mandatory over IPv6 (RFC 8200 §8.1)


def build_udp4(src: Addr4, dst: Addr4, sport: int, dport: int, payload: Buffer) -> bytes:
    out = bytearray(UDP_HLEN + len(payload))
    out[UDP_HLEN:] = payload
    write_udp4_header(memoryview(out), src, dst, sport, dport, len(payload))
    return bytes(out)


def build_udp6(src: Addr6, dst: Addr6, sport: int, dport: int, payload: Buffer) -> bytes:
    out = bytearray(UDP_HLEN + len(payload))
    out[UDP_HLEN:] = payload
    write_udp6_header(memoryview(out), src, dst, sport, dport, len(payload))
    return bytes(out)


def write_eth_ipv4_udp_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr4,
                               dst: Addr4, sport: int, dport: int, payload_len: int,
                               ttl: int = 255) -> int:
    """Fill Ethernet, IPv4 and UDP headers in front of a payload already at
    `buf[UDP4_PAYLOAD_OFFSET:]` (e.g. received there with recv_into); returns the frame
    length."""
    write_udp4_header(buf, src, dst, sport, dport, payload_len, offset=ETH_IP4_HLEN)
    return write_eth_ipv4_headers(buf, dst_mac, src_mac, src, dst, IPPROTO_UDP,
                                  UDP_HLEN + payload_len, ttl)


def write_eth_ipv6_udp_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr6,
                               dst: Addr6, sport: int, dport: int, payload_len: int,
                               hop_limit: int = 255, flow_label: int = 0) -> int:
    """As write_eth_ipv4_udp_headers, payload at `buf[UDP6_PAYLOAD_OFFSET:]`."""
    write_udp6_header(buf, src, dst, sport, dport, payload_len, offset=ETH_IP6_HLEN)
    return write_eth_ipv6_headers(buf, dst_mac, src_mac, src, dst, IPPROTO_UDP,
                                  UDP_HLEN + payload_len, hop_limit, flow_label)
