"""TCP segments (RFC 9293, options per RFC 7323/2018): view, builders, in-place writers."""

from __future__ import annotations

import struct
from typing import NamedTuple

from vhostpasst.wire import checksum
from vhostpasst.wire.checksum import AddrT, PseudoHeader
from vhostpasst.wire.errors import Buffer, Malformed, as_view
from vhostpasst.wire.ip import (
    ETH_IP4_HLEN,
    ETH_IP6_HLEN,
    IPPROTO_TCP,
    Addr4,
    Addr6,
    write_eth_ipv4_headers,
    write_eth_ipv6_headers,
)

TCP_HLEN = 20
TCP_MAX_OPTLEN = 40
TCP4_PAYLOAD_OFFSET = ETH_IP4_HLEN + TCP_HLEN  # 54, plus the length of any options
TCP6_PAYLOAD_OFFSET = ETH_IP6_HLEN + TCP_HLEN  # 74, likewise

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
CWR = 0x80
AE = 0x100  # the former NS bit, in the low bit of the data offset byte

OPT_EOL = 0
OPT_NOP = 1
OPT_MSS = 2
OPT_WS = 3
OPT_SACK_PERM = 4
OPT_TS = 8

WS_MAX = 14  # RFC 7323 §2.3: larger shifts are treated as 14

_TCP = struct.Struct("!HHIIBBHHH")
_U16 = struct.Struct("!H")
_TS = struct.Struct("!II")


class TcpOptions(NamedTuple):
    mss: int | None = None
    wscale: int | None = None
    sack_ok: bool = False
    ts: tuple[int, int] | None = None  # (TSval, TSecr)


class Tcp(NamedTuple):
    sport: int
    dport: int
    seq: int
    ack: int
    hlen: int  # data offset in bytes
    flags: int  # FIN..CWR, and AE (0x100)
    window: int  # unscaled
    check: int
    urg_ptr: int
    options: memoryview
    payload: memoryview
    # Decoded only for SYN segments, the only ones allowed to carry them (RFC 9293 §3.7.1,
    # RFC 7323 §2.2); this keeps the per-segment cost of data segments low.
    mss: int | None
    wscale: int | None


def parse_tcp(buf: Buffer) -> Tcp:
    view = as_view(buf)
    if len(view) < TCP_HLEN:
        raise Malformed(f"TCP segment of {len(view)} bytes is shorter than its header")
    sport, dport, seq, ack, off, fl, window, check, urg = _TCP.unpack_from(view)
    hlen = (off >> 4) * 4
    if hlen < TCP_HLEN:
        raise Malformed(f"TCP data offset {hlen} below 20")
    if hlen > len(view):
        raise Malformed(f"TCP data offset {hlen} beyond the {len(view)}-byte segment")
    options = view[TCP_HLEN:hlen]
    flags = (off & 1) << 8 | fl
    mss = wscale = None
    if flags & SYN and hlen > TCP_HLEN:
        opts = parse_tcp_options(options)
        mss, wscale = opts.mss, opts.wscale
    return Tcp(sport, dport, seq, ack, hlen, flags, window, check, urg, options,
               view[hlen:], mss, wscale)


def parse_tcp_options(buf: Buffer) -> TcpOptions:
    """Decode MSS, window scale, SACK-permitted and timestamps.

    An option whose length is below 2 or runs past the header is Malformed (RFC 9293 asks
    us to survive it; dropping the segment does). A known option with the wrong length is
    skipped, as are unknown options.
    """
    view = as_view(buf)
    mss = wscale = ts = None
    sack_ok = False
    i, n = 0, len(view)
    while i < n:
        kind = view[i]
        if kind == OPT_EOL:
            break
        if kind == OPT_NOP:
            i += 1
            continue
        if i + 1 >= n:
            raise Malformed(f"TCP option {kind} truncated")
        olen = view[i + 1]
        if olen < 2 or i + olen > n:
            raise Malformed(f"TCP option {kind} with bad length {olen}")
        if kind == OPT_MSS and olen == 4:
            mss = _U16.unpack_from(view, i + 2)[0]
        elif kind == OPT_WS and olen == 3:
            wscale = min(view[i + 2], WS_MAX)
        elif kind == OPT_SACK_PERM and olen == 2:
            sack_ok = True
        elif kind == OPT_TS and olen == 10:
            ts = _TS.unpack_from(view, i + 2)
        i += olen
    return TcpOptions(mss, wscale, sack_ok, ts)


def build_tcp_options(mss: int | None = None, wscale: int | None = None,
                      sack_ok: bool = False) -> bytes:
    """SYN options, each kept 4-byte aligned with NOPs as common stacks do."""
    out = bytearray()
    if mss is not None:
        out += struct.pack("!BBH", OPT_MSS, 4, mss)
    if wscale is not None:
        out += bytes((OPT_NOP, OPT_WS, 3, min(wscale, WS_MAX)))
    if sack_ok:
        out += bytes((OPT_NOP, OPT_NOP, OPT_SACK_PERM, 2))
    return bytes(out)


def _hlen(options: Buffer) -> int:
    if len(options) % 4 or len(options) > TCP_MAX_OPTLEN:
        raise ValueError(f"TCP options must be a multiple of 4 up to 40 bytes, not "
                         f"{len(options)}")
    return TCP_HLEN + len(options)


def _write_header(buf: memoryview, offset: int, pseudo: PseudoHeader[AddrT], src: AddrT,
                  dst: AddrT, sport: int, dport: int, seq: int, ack: int, flags: int,
                  window: int, payload_len: int, options: Buffer) -> int:
    """Write the header (and options) at `offset`, checksummed with the payload that already
    follows the options under the pseudo-header `pseudo` makes; returns the header length."""
    hlen = _hlen(options)
    _TCP.pack_into(buf, offset, sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                   (hlen // 4) << 4 | (flags >> 8 & 1), flags & 0xFF, window, 0, 0)
    if options:
        buf[offset + TCP_HLEN:offset + hlen] = options
    length = hlen + payload_len
    _U16.pack_into(buf, offset + 16, checksum.checksum(buf[offset:offset + length],
                                                        pseudo(src, dst, IPPROTO_TCP, length)))
    return hlen


def _build(pseudo: PseudoHeader[AddrT], src: AddrT, dst: AddrT, sport: int, dport: int,
           seq: int, ack: int, flags: int, window: int, payload: Buffer,
           options: Buffer) -> bytes:
    hlen = _hlen(options)
    out = bytearray(hlen + len(payload))
    out[hlen:] = payload
    _write_header(memoryview(out), 0, pseudo, src, dst, sport, dport, seq, ack, flags, window,
                  len(payload), options)
    return bytes(out)


def build_tcp4(src: Addr4, dst: Addr4, sport: int, dport: int, seq: int, ack: int,
               flags: int, window: int, payload: Buffer = b"", options: Buffer = b"") -> bytes:
    return _build(checksum.pseudo4, src, dst, sport, dport, seq, ack, flags, window, payload,
                  options)


def build_tcp6(src: Addr6, dst: Addr6, sport: int, dport: int, seq: int, ack: int,
               flags: int, window: int, payload: Buffer = b"", options: Buffer = b"") -> bytes:
    return _build(checksum.pseudo6, src, dst, sport, dport, seq, ack, flags, window, payload,
                  options)


def write_eth_ipv4_tcp_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr4,
                               dst: Addr4, sport: int, dport: int, seq: int, ack: int,
                               flags: int, window: int, payload_len: int,
                               options: Buffer = b"", ttl: int = 255) -> int:
    """Fill Ethernet, IPv4 and TCP headers in front of a payload already at
    `buf[TCP4_PAYLOAD_OFFSET + len(options):]`; returns the frame length."""
    hlen = _write_header(buf, ETH_IP4_HLEN, checksum.pseudo4, src, dst, sport, dport, seq, ack,
                         flags, window, payload_len, options)
    return write_eth_ipv4_headers(buf, dst_mac, src_mac, src, dst, IPPROTO_TCP,
                                  hlen + payload_len, ttl)


def write_eth_ipv6_tcp_headers(buf: memoryview, dst_mac: bytes, src_mac: bytes, src: Addr6,
                               dst: Addr6, sport: int, dport: int, seq: int, ack: int,
                               flags: int, window: int, payload_len: int,
                               options: Buffer = b"", hop_limit: int = 255,
                               flow_label: int = 0) -> int:
    """As write_eth_ipv4_tcp_headers, payload at `buf[TCP6_PAYLOAD_OFFSET + len(options):]`."""
    hlen = _write_header(buf, ETH_IP6_HLEN, checksum.pseudo6, src, dst, sport, dport, seq, ack,
                         flags, window, payload_len, options)
    return write_eth_ipv6_headers(buf, dst_mac, src_mac, src, dst, IPPROTO_TCP,
                                  hlen + payload_len, hop_limit, flow_label)
