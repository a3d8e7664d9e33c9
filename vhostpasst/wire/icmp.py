"""ICMP (RFC 792) and ICMPv6 (RFC 4443): view, builders, in-place writers.

Both share the 4-byte type/code/checksum header followed by 4 type-specific bytes (the
identifier and sequence for echo; reserved/flags for NDP), so one view serves both.
ICMPv6 checksums cover the IPv6 pseudo-header; ICMP ones do not.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from vhostpasst.wire import checksum
from vhostpasst.wire.errors import Buffer, Malformed, as_view
from vhostpasst.wire.ip import (
    ETH_IP4_HLEN,
    ETH_IP6_HLEN,
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    Addr4,
    Addr6,
    write_eth_ipv4_headers,
    write_eth_ipv6_headers,
)

ICMP_HLEN = 8  # type, code, checksum and the 4 type-specific bytes

ICMP_ECHOREPLY = 0
ICMP_DEST_UNREACH = 3
ICMP_FRAG_NEEDED = 4  # a code of ICMP_DEST_UNREACH (RFC 1191)
ICMP_ECHO = 8

ICMPV6_PKT_TOOBIG = 2
ICMPV6_ECHO_REQUEST = 128
ICMPV6_ECHO_REPLY = 129
ND_ROUTER_SOLICIT = 133
ND_ROUTER_ADVERT = 134
ND_NEIGHBOR_SOLICIT = 135
ND_NEIGHBOR_ADVERT = 136
NDP_TYPES = frozenset({ND_ROUTER_SOLICIT, ND_ROUTER_ADVERT, ND_NEIGHBOR_SOLICIT,
                       ND_NEIGHBOR_ADVERT})  # what the NDP service takes (RFC 4861)

_HDR = struct.Struct("!BBHHH")
_U16 = struct.Struct("!H")


class Icmp(NamedTuple):
    type: int
    code: int
    check: int
    ident: int  # bytes 4-5: the echo identifier (other types: their own meaning)
    seq: int  # bytes 6-7: the echo sequence number
    body: memoryview  # everything after the checksum (from byte 4)
    data: memoryview  # everything after the 8-byte header


def parse_icmp(buf: Buffer) -> Icmp:
    """An ICMP or ICMPv6 message: every one, NDP included, has at least 8 bytes (RFC 792,
    RFC 4443 §2.1, RFC 4861)."""
    view = as_view(buf)
    if len(view) < ICMP_HLEN:
        raise Malformed(f"ICMP message of {len(view)} bytes is shorter than 8")
    type_, code, check, ident, seq = _HDR.unpack_from(view)
    return Icmp(type_, code, check, ident, seq, view[4:], view[ICMP_HLEN:])


def _write_checksum(buf: memoryview, length: int, offset: int, ident: int | None,
                    pseudo: int) -> None:
    """(Re)compute the checksum of the `length`-byte message at `offset`, first replacing the
    echo identifier if `ident` is given (ping sockets pick their own). `pseudo`: the partial
    sum of the IPv6 pseudo-header for ICMPv6, 0 for ICMP (which has none)."""
    if ident is not None:
        _U16.pack_into(buf, offset + 4, ident)
    _U16.pack_into(buf, offset + 2, 0)
    _U16.pack_into(buf, offset + 2, checksum.checksum(buf[offset:offset + length], pseudo))


def _message(type_: int, code: int, body: Buffer) -> bytearray:
    out = bytearray(4 + len(body))
    out[0] = type_
    out[1] = code
    out[4:] = body
    return out


def build_icmp(type_: int, code: int, body: Buffer) -> bytes:
    """An ICMP message; `body` is everything after the checksum field."""
    out = _message(type_, code, body)
    _write_checksum(memoryview(out), len(out), 0, None, 0)
    return bytes(out)


def build_icmp_echo(type_: int, ident: int, seq: int, data: Buffer = b"") -> bytes:
    return build_icmp(type_, 0, struct.pack("!HH", ident, seq) + bytes(data))


def build_icmpv6(src: Addr6, dst: Addr6, type_: int, code: int, body: Buffer) -> bytes:
    out = _message(type_, code, body)
    _write_checksum(memoryview(out), len(out), 0, None,
                    checksum.pseudo6(src, dst, IPPROTO_ICMPV6, len(out)))
    return bytes(out)


def build_icmpv6_echo(src: Addr6, dst: Addr6, type_: int, ident: int, seq: int,
                      data: Buffer = b"") -> bytes:
    return build_icmpv6(src, dst, type_, 0, struct.pack("!HH", ident, seq) + bytes(data))


def write_eth_ipv4_icmp_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr4,
                                dst: Addr4, icmp_len: int, ident: int | None = None,
                                ttl: int = 255) -> int:
    """The whole ICMP message (header included, as a ping socket returns it) sits at
    `buf[ETH_IP4_HLEN:]`: fix its identifier and checksum, write Ethernet + IPv4 headers
    in front. Returns the frame length."""
    _write_checksum(buf, icmp_len, ETH_IP4_HLEN, ident, 0)
    return write_eth_ipv4_headers(buf, dst_mac, src_mac, src, dst, IPPROTO_ICMP, icmp_len, ttl)


def write_eth_ipv6_icmp_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr6,
                                dst: Addr6, icmp_len: int, ident: int | None = None,
                                hop_limit: int = 255) -> int:
    """As write_eth_ipv4_icmp_headers, message at `buf[ETH_IP6_HLEN:]`."""
    _write_checksum(buf, icmp_len, ETH_IP6_HLEN, ident,
                    checksum.pseudo6(src, dst, IPPROTO_ICMPV6, icmp_len))
    return write_eth_ipv6_headers(buf, dst_mac, src_mac, src, dst, IPPROTO_ICMPV6, icmp_len,
                                  hop_limit)
