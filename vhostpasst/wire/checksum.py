"""Internet checksums (RFC 1071) with the byte loop in C (cffi module `vhostpasst._csum`).

Every function takes any buffer (bytes, bytearray, memoryview, at any offset or length).
`partial` results chain: partial(b, partial(a)) == partial(a + b) when len(a) is even.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import TypeVar

from vhostpasst._csum import ffi, lib

Buffer = bytes | bytearray | memoryview
# One address family: what pseudo4 or pseudo6 takes, so code for both can be written once.
AddrT = TypeVar("AddrT", IPv4Address | bytes, IPv6Address | bytes)
# pseudo4 or pseudo6: (src, dst, protocol, L4 length) -> the pseudo-header's partial sum
PseudoHeader = Callable[[AddrT, AddrT, int, int], int]

_PSEUDO4 = struct.Struct("!4s4sBBH")
_PSEUDO6_TAIL = struct.Struct("!IxxxB")


def partial(buf: Buffer, init: int = 0) -> int:
    """32-bit ones'-complement partial sum of `buf`, added to `init`."""
    n = len(buf) if not isinstance(buf, memoryview) else buf.nbytes
    if n == 0:
        return init
    return lib.vp_csum_partial(ffi.from_buffer("uint8_t[]", buf), n, init & 0xFFFFFFFF)


def fold(total: int) -> int:
    """Fold a partial sum to 16 bits and complement it: the value to put on the wire."""
    return lib.vp_csum_fold(total & 0xFFFFFFFF)


def checksum(buf: Buffer, init: int = 0) -> int:
    return fold(partial(buf, init))


def ipv4_header(header: Buffer) -> int:
    """Checksum of an IPv4 header whose checksum field (bytes 10-11) is zero."""
    return fold(partial(header))


def pseudo4(src: IPv4Address | bytes, dst: IPv4Address | bytes, proto: int, length: int) -> int:
    """Partial sum of the IPv4 pseudo-header (RFC 793/768)."""
    return partial(_PSEUDO4.pack(_packed(src), _packed(dst), 0, proto, length))


def pseudo6(src: IPv6Address | bytes, dst: IPv6Address | bytes, proto: int, length: int) -> int:
    """Partial sum of the IPv6 pseudo-header (RFC 8200 §8.1)."""
    return partial(_packed(src) + _packed(dst) + _PSEUDO6_TAIL.pack(length, proto))


def l4_ipv4(src: IPv4Address | bytes, dst: IPv4Address | bytes, proto: int,
            segment: Buffer) -> int:
    """TCP/UDP checksum over `segment` (its checksum field zeroed) with the IPv4 pseudo-header."""
    return fold(partial(segment, pseudo4(src, dst, proto, len(segment))))


def l4_ipv6(src: IPv6Address | bytes, dst: IPv6Address | bytes, proto: int,
            segment: Buffer) -> int:
    """TCP/UDP/ICMPv6 checksum over `segment` (checksum zeroed), IPv6 pseudo-header."""
    return fold(partial(segment, pseudo6(src, dst, proto, len(segment))))


def _packed(addr: IPv4Address | IPv6Address | bytes) -> bytes:
    return addr if isinstance(addr, bytes) else addr.packed
