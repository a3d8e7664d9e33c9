"""ICMP errors for UDP flows (proto/udp.py): what a flow's socket learns through its error
queue, relayed to the guest (reference 4.9).

Every UDP socket has IP_RECVERR / IPV6_RECVERR. On EPOLLERR the queue is drained: each
`struct sock_extended_err` that came from the network (port unreachable, fragmentation
needed, time exceeded, ...) becomes an ICMP/ICMPv6 error to the guest, quoting the datagram as
the guest sent it (addresses and ports of its side; checksum 0) within the RFC size limits,
from the far end itself if it was the host we talked to, else from the offender as the guest
may see it. A token bucket bounds them (ICMP_ERR_RATE a second, bursts of ICMP_ERR_BURST).
Local errors (EMSGSIZE, ...) are not relayed. passt only logged these until 2025-03; a guest
that is told gets ECONNREFUSED at once instead of waiting for a timeout.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address
from typing import Protocol

from vhostpasst.core import nat
from vhostpasst.core.flow import RX_BATCH
from vhostpasst.core.log import RateLimitedLog
from vhostpasst.proto.context import Context
from vhostpasst.wire import checksum, eth, icmp, ip, udp
from vhostpasst.wire.ip import IPV4_HLEN, IPV6_HLEN, IPV6_MIN_MTU

IPAddr = IPv4Address | IPv6Address


class UdpFlow(Protocol):
    """What an error needs of proto/udp.py's UdpFlow (which imports this module)."""

    @property
    def six(self) -> bool: ...
    @property
    def gaddr(self) -> IPAddr: ...
    @property
    def gport(self) -> int: ...
    @property
    def faddr(self) -> IPAddr: ...
    @property
    def fport(self) -> int: ...
    @property
    def target(self) -> IPAddr | None: ...
    @property
    def closed(self) -> bool: ...

IP_RECVERR = 11
IPV6_RECVERR = 25
SO_EE_ORIGIN_ICMP = 2
SO_EE_ORIGIN_ICMP6 = 3
_EE = struct.Struct("=IBBBBII")  # struct sock_extended_err
ICMP4_ERR_MAX = 576  # RFC 1812 4.3.2.3: an ICMP error packet stays within 576 bytes
ICMP6_ERR_MAX = IPV6_MIN_MTU  # RFC 4443 2.4(c): within the minimum IPv6 MTU
ICMP_ERR_RATE = 10.0  # errors per second to the guest (token bucket)
ICMP_ERR_BURST = 20.0


def set_recverr(sock: socket.socket, six: bool) -> None:
    """Queue the ICMP errors about `sock`'s datagrams (the kernel then reports them once)."""
    if six:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_RECVERR, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)


class ErrorRelay:
    """The error queues of one UdpHandler's sockets, to the guest, rate-limited."""

    def __init__(self, ctx: Context, clock: Callable[[], float], log: RateLimitedLog) -> None:
        self.ctx = ctx
        self.clock = clock
        self._log = log
        self._tokens = ICMP_ERR_BURST
        self._tokens_at = clock()

    def _allow_error(self) -> bool:
        now = self.clock()
        self._tokens = min(ICMP_ERR_BURST, self._tokens + (now - self._tokens_at) * ICMP_ERR_RATE)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True

    def drain(self, sock: socket.socket, six: bool,
              flow_for: Callable[[tuple], UdpFlow | None]) -> None:
        for _ in range(RX_BATCH):
            try:
                data, anc, _flags, addr = sock.recvmsg(ICMP6_ERR_MAX, 512, socket.MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._log.debug(("udp-errq", e.errno), "UDP error queue: %s", e)
                return
            for level, ctype, cdata in anc:
                if (level, ctype) not in ((socket.IPPROTO_IP, IP_RECVERR),
                                          (socket.IPPROTO_IPV6, IPV6_RECVERR)):
                    continue
                flow = flow_for(addr)
                if flow is None or flow.closed:
                    continue
                self.relay(flow, cdata, data)

    def relay(self, flow: UdpFlow, ee_data: bytes, payload: bytes) -> None:
        """Turn one `struct sock_extended_err` (+ offender) about a datagram of `flow` into
        an ICMP error for the guest, quoting the datagram as the guest sent it."""
        if len(ee_data) < _EE.size:
            return
        _errno, origin, type_, code, _pad, info, _data = _EE.unpack_from(ee_data)
        if origin not in (SO_EE_ORIGIN_ICMP, SO_EE_ORIGIN_ICMP6):
            return  # a local error (e.g. EMSGSIZE): nothing was received from the network
        if (origin == SO_EE_ORIGIN_ICMP6) != flow.six:
            return
        src = self._source(flow, ee_data[_EE.size:])
        if src is None or not self._allow_error():
            if src is not None:
                self._log.debug("icmp-err-rate", "ICMP error to the guest rate-limited")
            return
        frame = build_error_frame(self.ctx, flow, type_, code, info, payload, src)
        if frame is not None and self.ctx.link is not None:
            self.ctx.link.send(frame)

    def _source(self, flow: UdpFlow, offender: bytes) -> IPAddr | None:
        """Who the guest is told sent the error: the far end itself if it was the
        destination we talked to, else the offender as the guest may see it."""
        off: IPAddr | None = None
        try:
            if not flow.six and len(offender) >= 8 and offender[0:2] == \
                    struct.pack("=H", socket.AF_INET):
                off = IPv4Address(offender[4:8])
            elif flow.six and len(offender) >= 24 and offender[0:2] == \
                    struct.pack("=H", socket.AF_INET6):
                off = IPv6Address(offender[8:24])
        except ValueError:
            off = None
        if off is None:
            return flow.faddr
        if off == flow.target:  # the host address the flow talks to
            return flow.faddr
        shown = nat.guest_source(self.ctx.config, self.ctx.guest, off)
        if shown is None or isinstance(shown, IPv6Address) != flow.six:
            return flow.faddr  # (an IPv4-mapped offender on an IPv6 flow, say)
        return shown


def build_error_frame(ctx: Context, flow: UdpFlow, type_: int, code: int, info: int,
                      payload: bytes, src: IPAddr) -> bytes | None:
    """An Ethernet frame carrying an ICMP(v6) error about the guest's datagram of `flow`."""
    mac, our = ctx.guest_mac(), ctx.config.our_mac
    ulen = udp.UDP_HLEN + len(payload)
    g, f, s = flow.gaddr.packed, flow.faddr.packed, src.packed  # one family, checked by caller
    # the datagram as the guest sent it (its checksum is not known any more: 0, "none")
    quoted_udp = struct.pack("!HHHH", flow.gport, flow.fport, ulen & 0xFFFF, 0) + payload
    if flow.six:
        limit = min(ICMP6_ERR_MAX, ctx.max_l3) - IPV6_HLEN - icmp.ICMP_HLEN
        quoted = ip.build_ipv6(g, f, ip.IPPROTO_UDP, b"")
        quoted = quoted[:4] + struct.pack("!H", min(ulen, 0xFFFF)) + quoted[6:] + quoted_udp
        quoted = quoted[:limit]
        rest = struct.pack("!I", info if type_ == icmp.ICMPV6_PKT_TOOBIG else 0)
        msg = icmp.build_icmpv6(s, g, type_, code, rest + quoted)
        return eth.build_eth(mac, our, eth.ETH_P_IPV6,
                             ip.build_ipv6(s, g, ip.IPPROTO_ICMPV6, msg))
    limit = min(ICMP4_ERR_MAX, ctx.max_l3) - IPV4_HLEN - icmp.ICMP_HLEN
    inner = bytearray(ip.build_ipv4(g, f, ip.IPPROTO_UDP, b"", ttl=64))
    struct.pack_into("!H", inner, 2, min(IPV4_HLEN + ulen, 0xFFFF))  # the original length
    struct.pack_into("!H", inner, 10, 0)
    struct.pack_into("!H", inner, 10, checksum.ipv4_header(bytes(inner)))
    quoted = (bytes(inner) + quoted_udp)[:limit]
    frag_needed = type_ == icmp.ICMP_DEST_UNREACH and code == icmp.ICMP_FRAG_NEEDED
    rest = struct.pack("!HH", 0, info & 0xFFFF if frag_needed else 0)
    msg = icmp.build_icmp(type_, code, rest + quoted)
    return eth.build_eth(mac, our, eth.ETH_P_IP, ip.build_ipv4(s, g, ip.IPPROTO_ICMP,
                                                               msg))
