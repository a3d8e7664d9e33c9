"""IPv4 (RFC 791) and IPv6 (RFC 8200) headers: views, builders and in-place writers.

Views decode the fixed header, check every length against the bytes actually present and
hand out memoryview slices (no copies). IPv4 frames may carry Ethernet padding after
`tot_len` (it is trimmed); IPv6 likewise after `payload_len`. The IPv4 header checksum is not
verified (passt does not either: the guest's kernel made it, and the link is memory).

Outgoing headers follow passt: IPv4 TTL 255, id 0, DF clear, TOS 0; IPv6 hop limit 255.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address
from typing import NamedTuple

from vhostpasst.wire import checksum
from vhostpasst.wire.errors import Buffer, Malformed, as_view
from vhostpasst.wire.eth import ETH_HLEN, ETH_P_IP, ETH_P_IPV6, write_eth_header

IPPROTO_HOPOPTS = 0
IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_IPV6 = 41
IPPROTO_ROUTING = 43
IPPROTO_FRAGMENT = 44
IPPROTO_ESP = 50
IPPROTO_AH = 51
IPPROTO_ICMPV6 = 58
IPPROTO_NONE = 59
IPPROTO_DSTOPTS = 60
IPPROTO_MH = 135
IPPROTO_HIP = 139
IPPROTO_SHIM6 = 140

IPV4_HLEN = 20
IPV6_HLEN = 40
IPV4_MAX_LEN = 0xFFFF
IPV6_MIN_MTU = 1280  # RFC 8200 §5: every IPv6 link carries packets this long
BROADCAST4 = IPv4Address("255.255.255.255")  # the limited broadcast address (RFC 919)

# Extension headers that start (next header, length): header -> (unit, bias), the header
# being (length + bias) * unit bytes long. Most count 8-octet units beyond the first 8:
# RFC 8200 §4.4-4.6, RFC 6275 (MH), RFC 7401 (HIP), RFC 5533 (Shim6), RFC 3692 (253/254);
# AH counts 4-octet units, minus 2 (RFC 4302 §2.2).
_EXT_LENGTH = {nh: (8, 1) for nh in (IPPROTO_HOPOPTS, IPPROTO_ROUTING, IPPROTO_DSTOPTS,
                                     IPPROTO_MH, IPPROTO_HIP, IPPROTO_SHIM6, 253, 254)}
_EXT_LENGTH[IPPROTO_AH] = (4, 2)

_IP4 = struct.Struct("!BBHHHBBH4s4s")
_IP6 = struct.Struct("!IHBB16s16s")
_FRAG6 = struct.Struct("!BxHI")

IP4_DF = 0x4000
IP4_MF = 0x2000
IP4_OFFMASK = 0x1FFF

Addr4 = IPv4Address | bytes
Addr6 = IPv6Address | bytes


class Ipv4(NamedTuple):
    header: memoryview  # the whole header, options included
    tos: int
    tot_len: int
    ident: int
    frag_off: int  # the raw 16-bit flags + offset field
    ttl: int
    proto: int
    check: int
    src: IPv4Address
    dst: IPv4Address
    options: memoryview
    payload: memoryview  # trimmed to tot_len
    is_fragment: bool  # MF set or offset != 0: the payload is not a whole L4 segment

    @property
    def more_fragments(self) -> bool:
        return bool(self.frag_off & IP4_MF)

    @property
    def frag_offset(self) -> int:
        """Fragment offset in bytes."""
        return (self.frag_off & IP4_OFFMASK) * 8


def parse_ipv4(buf: Buffer) -> Ipv4:
    view = as_view(buf)
    if len(view) < IPV4_HLEN:
        raise Malformed(f"IPv4 packet of {len(view)} bytes is shorter than its header")
    vihl, tos, tot_len, ident, frag_off, ttl, proto, check, src, dst = _IP4.unpack_from(view)
    if vihl >> 4 != 4:
        raise Malformed(f"IP version {vihl >> 4} in an IPv4 header")
    hlen = (vihl & 0xF) * 4
    if hlen < IPV4_HLEN:
        raise Malformed(f"IPv4 header length {hlen} below 20")
    if tot_len < hlen:
        raise Malformed(f"IPv4 total length {tot_len} below header length {hlen}")
    if tot_len > len(view):
        raise Malformed(f"IPv4 total length {tot_len} beyond the {len(view)} bytes present")
    return Ipv4(view[:hlen], tos, tot_len, ident, frag_off, ttl, proto, check,
                IPv4Address(src), IPv4Address(dst), view[IPV4_HLEN:hlen],
                view[hlen:tot_len], bool(frag_off & (IP4_MF | IP4_OFFMASK)))


class Ipv6(NamedTuple):
    header: memoryview  # the fixed 40-byte header
    tclass: int
    flow_label: int
    payload_len: int
    nexthdr: int  # the fixed header's Next Header
    hop_limit: int
    src: IPv6Address
    dst: IPv6Address
    proto: int  # the upper-layer protocol after extension headers (59: none)
    l4: memoryview  # from the upper-layer header to the end of the payload
    payload: memoryview  # everything after the fixed header, trimmed to payload_len
    is_fragment: bool  # a Fragment header that is not atomic: `l4` is fragment data
    frag_offset: int  # in bytes
    more_fragments: bool
    frag_id: int


def parse_ipv6(buf: Buffer) -> Ipv6:
    view = as_view(buf)
    if len(view) < IPV6_HLEN:
        raise Malformed(f"IPv6 packet of {len(view)} bytes is shorter than its header")
    vtcfl, plen, nexthdr, hop_limit, src, dst = _IP6.unpack_from(view)
    if vtcfl >> 28 != 6:
        raise Malformed(f"IP version {vtcfl >> 28} in an IPv6 header")
    end = IPV6_HLEN + plen
    if end > len(view):
        raise Malformed(f"IPv6 payload length {plen} beyond the {len(view) - IPV6_HLEN} "
                        "bytes present")
    proto, off, frag, foff, more, fid = _walk_ext(view, nexthdr, IPV6_HLEN, end)
    return Ipv6(view[:IPV6_HLEN], (vtcfl >> 20) & 0xFF, vtcfl & 0xFFFFF, plen, nexthdr,
                hop_limit, IPv6Address(src), IPv6Address(dst), proto, view[off:end],
                view[IPV6_HLEN:end], frag, foff, more, fid)


def _walk_ext(view: memoryview, nh: int, off: int,
              end: int) -> tuple[int, int, bool, int, bool, int]:
    """Skip extension headers: (protocol, its offset, fragment?, offset, MF, id).

    Every header consumes at least 8 bytes, so the loop is bounded by the packet length.
    """
    while True:
        if nh in _EXT_LENGTH:
            if off + 8 > end:
                raise Malformed(f"IPv6 extension header {nh} truncated")
            unit, bias = _EXT_LENGTH[nh]
            hlen = (view[off + 1] + bias) * unit
            if off + hlen > end:
                raise Malformed(f"IPv6 extension header {nh} of {hlen} bytes truncated")
            nh = view[off]
            off += hlen
        elif nh == IPPROTO_FRAGMENT:
            if off + 8 > end:
                raise Malformed("IPv6 fragment header truncated")
            nh, offmf, fid = _FRAG6.unpack_from(view, off)
            off += 8
            foff = offmf & 0xFFF8
            more = bool(offmf & 1)
            if foff or more:
                return nh, off, True, foff, more, fid
            # an atomic fragment (RFC 6946) is a whole packet: go on walking
        else:
            # L4, ESP (RFC 4303: its next header is in the encrypted trailer) or 59 (none)
            return nh, off, False, 0, False, 0


def _a4(addr: Addr4) -> bytes:
    b = addr.packed if isinstance(addr, IPv4Address) else addr
    if len(b) != 4:
        raise ValueError(f"IPv4 address must be 4 bytes, not {len(b)}")
    return b


def _a6(addr: Addr6) -> bytes:
    b = addr.packed if isinstance(addr, IPv6Address) else addr
    if len(b) != 16:
        raise ValueError(f"IPv6 address must be 16 bytes, not {len(b)}")
    return b


def write_ipv4_header(buf: memoryview, src: Addr4, dst: Addr4, proto: int, payload_len: int,
                      ttl: int = 255, offset: int = 0) -> None:
    """Write a 20-byte IPv4 header (checksum included) at `offset` in `buf`."""
    tot_len = IPV4_HLEN + payload_len
    if tot_len > IPV4_MAX_LEN:
        raise ValueError(f"IPv4 packet of {tot_len} bytes is too long")
    _IP4.pack_into(buf, offset, 0x45, 0, tot_len, 0, 0, ttl, proto, 0, _a4(src), _a4(dst))
    csum = checksum.ipv4_header(buf[offset:offset + IPV4_HLEN])
    struct.pack_into("!H", buf, offset + 10, csum)


def write_ipv6_header(buf: memoryview, src: Addr6, dst: Addr6, nh: int, payload_len: int,
                      hop_limit: int = 255, flow_label: int = 0, offset: int = 0) -> None:
    """Write the 40-byte IPv6 header at `offset` in `buf`."""
    if payload_len > 0xFFFF:
        raise ValueError(f"IPv6 payload of {payload_len} bytes needs a jumbogram")
    _IP6.pack_into(buf, offset, 6 << 28 | (flow_label & 0xFFFFF), payload_len, nh, hop_limit,
                   _a6(src), _a6(dst))


def build_ipv4(src: Addr4, dst: Addr4, proto: int, payload: Buffer, ttl: int = 255) -> bytes:
    out = bytearray(IPV4_HLEN + len(payload))
    out[IPV4_HLEN:] = payload
    write_ipv4_header(memoryview(out), src, dst, proto, len(payload), ttl)
    return bytes(out)


def build_ipv6(src: Addr6, dst: Addr6, nh: int, payload: Buffer, hop_limit: int = 255,
               flow_label: int = 0) -> bytes:
    out = bytearray(IPV6_HLEN + len(payload))
    out[IPV6_HLEN:] = payload
    write_ipv6_header(memoryview(out), src, dst, nh, len(payload), hop_limit, flow_label)
    return bytes(out)


# Frame-level writers: the L4 segment (header and payload) already sits at ETH_HLEN +
# IPV4_HLEN (or + IPV6_HLEN) in `buf`; these fill the headers in front of it.

ETH_IP4_HLEN = ETH_HLEN + IPV4_HLEN  # 34: where an IPv4 frame's L4 header starts
ETH_IP6_HLEN = ETH_HLEN + IPV6_HLEN  # 54


def write_eth_ipv4_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr4,
                           dst: Addr4, proto: int, l4_len: int, ttl: int = 255) -> int:
    """Write Ethernet + IPv4 headers before an `l4_len`-byte segment; returns the frame length."""
    write_eth_header(buf, dst_mac, src_mac, ETH_P_IP)
    write_ipv4_header(buf, src, dst, proto, l4_len, ttl, offset=ETH_HLEN)
    return ETH_IP4_HLEN + l4_len


def write_eth_ipv6_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr6,
                           dst: Addr6, nh: int, l4_len: int, hop_limit: int = 255,
                           flow_label: int = 0) -> int:
    """Write Ethernet + IPv6 headers before an `l4_len`-byte segment; returns the frame length."""
    write_eth_header(buf, dst_mac, src_mac, ETH_P_IPV6)
    write_ipv6_header(buf, src, dst, nh, l4_len, hop_limit, flow_label, offset=ETH_HLEN)
    return ETH_IP6_HLEN + l4_len

