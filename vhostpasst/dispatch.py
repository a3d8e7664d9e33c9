"""Frames in from the guest link: parse, hand to the service or protocol that owns them.

Everything a guest sends passes through `Dispatcher.on_frames`. A frame that does not parse,
or that no handler wants, is dropped with a rate-limited log line; an exception raised while
handling one frame is caught here so that no guest input can stop the daemon.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable, Sequence
from ipaddress import IPv4Address, IPv6Address

from vhostpasst.config.conf import Config
from vhostpasst.core.flow import FlowTable
from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import EventLoop
from vhostpasst.core.loop import TimerHandle as Timer
from vhostpasst.core.nat import GuestAddrs
from vhostpasst.core.stats import Counter
from vhostpasst.link.base import Link
from vhostpasst.proto.context import Context
from vhostpasst.proto.icmp import IcmpHandler, PingFlow
from vhostpasst.proto.tcp import TcpHandler
from vhostpasst.proto.tcp.conn import TcpConn
from vhostpasst.proto.udp import UdpFlow, UdpHandler
from vhostpasst.services import arp, dhcp, dhcpv6
from vhostpasst.services.dhcp import DhcpServer
from vhostpasst.services.dhcpv6 import Dhcpv6Server
from vhostpasst.services.ndp import NdpService
from vhostpasst.wire import eth, icmp, ip, udp
from vhostpasst.wire import tcp as wtcp
from vhostpasst.wire.errors import Malformed

log = logging.getLogger(__name__)

# The common guest->host frame, parsed in one unpack (fast path): Ethernet, a 20-byte IPv4
# header and the TCP header up to the window; or Ethernet, the fixed IPv6 header and the same.
_ETH_IP4_TCP = struct.Struct("!6s6sHBxHxxHxBxxIIHHIIBBHHH")
_ETH_IP6_TCP = struct.Struct("!6s6sHIHBx16s16sHHIIBBHHH")
_IP4_FRAG = ip.IP4_MF | ip.IP4_OFFMASK
_FAST_TCP4_MIN = wtcp.TCP4_PAYLOAD_OFFSET
_FAST_TCP6_MIN = wtcp.TCP6_PAYLOAD_OFFSET
_NS_LEN = 24  # ICMPv6 header, 4 reserved bytes, the 16-byte target (RFC 4861 §4.3)
_SOLICITED_NODE = int(IPv6Address("ff02::1:ff00:0"))  # RFC 4291 §2.7.1, + the low 24 bits
_MLD_REPORT, _MLD2_REPORT = 131, 143  # ICMPv6 types (RFC 2710, RFC 3810)
_MLD2_JOINS = frozenset({2, 4})  # MODE_IS_EXCLUDE, CHANGE_TO_EXCLUDE_MODE (RFC 3810 §5.2.12)


class Dispatcher:
    """`loop` is needed for the socket protocols (ICMP, UDP); without one (service tests)
    only ARP and DHCP are answered."""

    def __init__(self, config: Config, loop: EventLoop | None = None,
                 flows: FlowTable | None = None) -> None:
        self.config = config
        ip4 = config.ip4
        self.dhcp = DhcpServer(config) if ip4 is not None and not config.no_dhcp else None
        self.guest_addr4: IPv4Address | None = ip4.addr if ip4 is not None else None
        ip6 = config.ip6
        self.ndp = NdpService(config) if ip6 is not None and not config.no_ndp else None
        self.dhcpv6 = (Dhcpv6Server(config) if ip6 is not None and not config.no_dhcpv6
                       else None)
        self._loop = loop
        self._ra_timer: Timer | None = None
        self._ra_when: float | None = None
        # what the guest has been seen using: kept here once, shared with the protocols
        # through the flow Context, and read by NAT
        self.guest = GuestAddrs()
        self.ctx: Context | None = None
        self.icmp: IcmpHandler | None = None
        self.udp: UdpHandler | None = None
        self.tcp: TcpHandler | None = None
        if loop is not None:
            self.ctx = Context(config, loop, flows if flows is not None else FlowTable(loop),
                               self.guest)
            if not config.no_icmp:
                self.icmp = IcmpHandler(self.ctx)
            if not config.no_udp:
                self.udp = UdpHandler(self.ctx)
            if not config.no_tcp:
                self.tcp = TcpHandler(self.ctx)
        self._link: Link | None = None
        # the last sources learned from, as ints (fast path: no address object per frame)
        self._seen4 = -1
        self._learned6 = -1
        self._drops = RateLimitedLog(log)
        self.dropped = 0

    def stat_counters(self) -> list[Counter]:
        """--stats columns: frames from and to the guest, frames dropped here, and flows
        open now per protocol (core/stats.py)."""
        def frames(attr: str) -> Callable[[], int]:
            def read() -> int:
                link = self._link.buffers_link if self._link is not None else None
                return int(getattr(link, attr, 0))
            return read

        def flows(kind: type) -> Callable[[], int]:
            def count() -> int:
                if self.ctx is None:
                    return 0
                return sum(isinstance(f, kind) for f in self.ctx.flows)
            return count

        return [("guest_rx", frames("rx_frames")), ("guest_tx", frames("tx_frames")),
                ("dropped", lambda: self.dropped), ("tcp", flows(TcpConn)),
                ("udp", flows(UdpFlow)), ("icmp", flows(PingFlow))]

    @property
    def link(self) -> Link | None:
        return self._link

    @link.setter
    def link(self, link: Link | None) -> None:
        # The protocols write frames straight to the link owning the buffers: no listener's
        # forwarding call per frame (a listener's link serves each of its peers in turn).
        old = self._link.buffers_link if self._link is not None else None
        self._link = link
        out = link.buffers_link if link is not None else None
        if self.ctx is not None:
            self.ctx.link = out
        consumer = self.tcp.tx_consumer if self.tcp is not None else None
        if old is not None and consumer is not None:
            old.set_tx_consumer(None)
        if out is not None and consumer is not None:
            out.set_tx_consumer(consumer)  # the data plane's C sees the guest's frames first
        if self.tcp is not None:  # TCP resumes at once when a short link has buffers again
            if old is not None:
                old.remove_rx_ready_callback(self.tcp.rx_ready)
            if out is not None:
                out.add_rx_ready_callback(self.tcp.rx_ready)

    def close(self) -> None:
        """Close every flow (and so every host socket)."""
        if self.ctx is not None:
            self.ctx.flows.close_all()
        if self.udp is not None:
            self.udp.close()
        if self.tcp is not None:
            self.tcp.close()

    def listen(self) -> None:
        """Bind the -u listening sockets (OSError if an explicit port cannot be bound)."""
        if self.udp is not None:
            self.udp.listen(self.config.udp_in)
        if self.tcp is not None:
            self.tcp.listen(self.config.tcp_in)

    def on_frames(self, frames: Sequence[memoryview]) -> None:
        fast = self._tcp_fast if self.tcp is not None else None
        for frame in frames:
            try:
                if fast is None or not fast(frame):
                    self._handle(frame)
            except Malformed as e:
                self._drop("malformed", f"malformed frame dropped: {e}")
            except Exception:  # a bug must not let a guest stop the daemon
                self.dropped += 1
                log.exception("error while handling a guest frame (dropped)")
        if self.tcp is not None:  # TCP acts per connection once the whole batch is in
            try:
                self.tcp.end_batch()
            except Exception:
                log.exception("error while handling guest TCP segments")
            dataplane = self.tcp.dataplane
            if dataplane is not None and self.guest.mac is not None:
                # the C takes only frames that would teach the dispatcher nothing new
                dataplane.learned(self.guest.mac, self._seen4, self._learned6)
        if self.udp is not None:  # queued datagrams, sent while the frames are still valid
            try:
                self.udp.flush_tap()
            except Exception:
                log.exception("error while sending guest datagrams (dropped)")
        if self.ndp is not None and frames:
            try:
                self.ndp.guest_seen(time.monotonic())  # starts the unsolicited RA burst
                self._schedule_ra()
            except Exception:
                log.exception("error while scheduling router advertisements")

    def _schedule_ra(self) -> None:
        """Keep one loop timer at the NDP service's next unsolicited RA."""
        if self.ndp is None or self._loop is None:
            return
        when = self.ndp.next_deadline()
        if when == self._ra_when:
            return
        if self._ra_timer is not None:
            self._ra_timer.cancel()
            self._ra_timer = None
        self._ra_when = when
        if when is not None:
            self._ra_timer = self._loop.call_at(when, self._ra_due)

    def _ra_due(self) -> None:
        self._ra_timer = None
        self._ra_when = None
        try:
            if self.ndp is not None:
                for frame in self.ndp.unsolicited(time.monotonic()):
                    self._reply(frame)
                self._schedule_ra()
        except Exception:  # a timer callback must not stop the loop
            log.exception("error sending a router advertisement")

    def _drop(self, key: str, message: str) -> None:
        self.dropped += 1
        self._drops.warning(key, message)

    def _reply(self, frame: bytes | None) -> None:
        if frame is not None and self.link is not None:
            self.link.send(frame)

    def _tcp_fast(self, frame: memoryview) -> bool:
        """The common case, IPv4 or IPv6 TCP without IP options or extension headers and
        not a SYN, in one struct unpack: TCP gets ints and a payload slice. Every length is
        checked as the parsers do; anything else (and anything odd) returns False for the
        full parsers in _handle, which decide as before."""
        if type(frame) is not memoryview or frame.format != "B" or frame.ndim != 1 \
                or not frame.c_contiguous:
            return False
        n = len(frame)
        if n < _FAST_TCP4_MIN or frame[12] != 0x08 and frame[12] != 0x86:
            return False
        config = self.config
        ctx = self.ctx
        if frame[12] == 0x08:
            if config.ip4 is None or ctx is None:
                return False
            (dmac, smac, ethertype, vihl, tot_len, frag, proto, src, dst, sport, dport, seq,
             ack, off, fl, window, check, urg) = _ETH_IP4_TCP.unpack_from(frame)
            if ethertype != eth.ETH_P_IP or vihl != 0x45 or proto != ip.IPPROTO_TCP \
                    or frag & _IP4_FRAG or src >> 24 == 127 or dst >> 24 == 127:
                return False
            l4 = ip.ETH_IP4_HLEN
            end = eth.ETH_HLEN + tot_len
            six = False
        else:
            if n < _FAST_TCP6_MIN or config.ip6 is None or ctx is None:
                return False
            (dmac, smac, ethertype, vtcfl, plen, nexthdr, src6, dst6, sport, dport, seq, ack,
             off, fl, window, check, urg) = _ETH_IP6_TCP.unpack_from(frame)
            if ethertype != eth.ETH_P_IPV6 or vtcfl >> 28 != 6 \
                    or nexthdr != ip.IPPROTO_TCP:
                return False
            src = int.from_bytes(src6, "big")
            dst = int.from_bytes(dst6, "big")
            if src == 1 or dst == 1:  # ::1: the full path drops it
                return False
            l4 = ip.ETH_IP6_HLEN
            end = l4 + plen
            six = True
        hlen = (off >> 4) * 4
        flags = (off & 1) << 8 | fl
        if end > n or hlen < wtcp.TCP_HLEN or l4 + hlen > end or flags & wtcp.SYN:
            return False
        # every field read above lies within the checked lengths (l4 + hlen <= end <= n)
        # learned as _handle does, but objects made only when something changed
        guest = self.guest
        if not smac[0] & 1 and smac != guest.mac:
            guest.mac = smac
        if six:
            if src != self._learned6:
                self._learn6(IPv6Address(src))
        elif src and src != self._seen4:
            self._seen4 = src
            guest.addr4_seen = IPv4Address(src)
        seg = tuple.__new__(wtcp.Tcp, (sport, dport, seq, ack, hlen, flags, window, check, urg,
                                       frame[l4 + wtcp.TCP_HLEN:l4 + hlen],
                                       frame[l4 + hlen:end], None, None))
        self.tcp.segment(six, src, dst, seg)  # type: ignore[union-attr]
        return True

    def _handle(self, frame: memoryview) -> None:
        header = eth.parse_eth(frame)
        if not header.src[0] & 1:  # multicast sources are bogus; don't learn them
            self.guest.mac = bytes(header.src)
        if header.ethertype == eth.ETH_P_ARP:
            if self.config.ip4 is not None:
                self._reply(arp.reply(frame, self.config.our_mac, self.guest_addr4))
        elif header.ethertype == eth.ETH_P_IP:
            self._handle_ipv4(frame, header.payload)
        elif header.ethertype == eth.ETH_P_IPV6:
            self._handle_ipv6(frame, header.payload)
        else:
            self._drop(f"ethertype-{header.ethertype:04x}",
                       f"frame with EtherType 0x{header.ethertype:04x} dropped")

    def _handle_ipv4(self, frame: memoryview, packet: memoryview) -> None:
        if self.config.ip4 is None:
            return
        header = ip.parse_ipv4(packet)
        # 127.0.0.0/8 and 0.0.0.0 tested on ints: the ipaddress properties are slow per frame
        src = int(header.src)
        if src >> 24 == 127 or int(header.dst) >> 24 == 127:
            self._drop("loopback4", "IPv4 packet with a loopback address dropped")
            return
        if src != 0:
            self._seen4 = src
            self.guest.addr4_seen = header.src
        if header.proto == ip.IPPROTO_UDP and not header.is_fragment:
            datagram = udp.parse_udp(header.payload)
            if datagram.dport == dhcp.SERVER_PORT:
                if self.dhcp is not None:
                    self._reply(self.dhcp.handle(frame))
                return
        if header.is_fragment:
            self._drop("frag4", "IPv4 fragment dropped: fragments are not reassembled")
            return
        if header.proto == ip.IPPROTO_ICMP:
            if self.icmp is not None:
                self.icmp.tap4(header)
            return
        if header.proto == ip.IPPROTO_UDP:
            if self.udp is not None:
                self.udp.tap4(header)
            return
        if header.proto == ip.IPPROTO_TCP:
            if self.tcp is not None:
                self.tcp.tap4(header)
            return
        self._drop(f"proto-{header.proto}",
                   f"IPv4 protocol {header.proto} dropped: not supported yet")

    def _handle_ipv6(self, frame: memoryview, packet: memoryview) -> None:
        if self.config.ip6 is None:
            return
        header = ip.parse_ipv6(packet)
        if header.src.is_loopback or header.dst.is_loopback:
            self._drop("loopback6", "IPv6 packet with a loopback address dropped")
            return
        self._learn6(header.src)
        if header.is_fragment:
            self._drop("frag6", "IPv6 fragment dropped: fragments are not reassembled")
            return
        if header.proto == ip.IPPROTO_ICMPV6:
            if len(header.l4) >= 1 and header.l4[0] in icmp.NDP_TYPES:
                if header.src.is_unspecified:
                    self._learn_dad(header.l4)
                if self.ndp is not None:
                    for reply in self.ndp.handle(frame, time.monotonic()):
                        self._reply(reply)
                    self._schedule_ra()
                return
            if len(header.l4) >= 1 and header.l4[0] in (_MLD_REPORT, _MLD2_REPORT):
                self._learn_mld(header.l4)
            if self.icmp is not None:
                self.icmp.tap6(header)
            return
        if header.proto == ip.IPPROTO_UDP:
            if header.dst.is_multicast and len(header.l4) >= 4 and \
                    int.from_bytes(header.l4[2:4], "big") == dhcpv6.SERVER_PORT:
                if self.dhcpv6 is not None:
                    self._reply(self.dhcpv6.handle(frame))
                return
            if self.udp is not None:
                self.udp.tap6(header)
            return
        if header.proto == ip.IPPROTO_TCP:
            if self.tcp is not None:
                self.tcp.tap6(header)
            return
        self._drop(f"proto6-{header.proto}",
                   f"IPv6 next header {header.proto} dropped: not supported yet")

    def _learn_dad(self, l4: memoryview) -> None:
        """Duplicate address detection (a Neighbour Solicitation from ::) names an address
        the guest is about to use: a guest configured by SLAAC alone may send nothing from
        it before an inbound connection must reach it, and never takes the assigned address
        (where passt sends). Which one inbound traffic uses: core/nat.py. Link-local targets
        are learned from the traffic that follows."""
        if len(l4) < _NS_LEN or l4[0] != icmp.ND_NEIGHBOR_SOLICIT:
            return
        target = IPv6Address(bytes(l4[8:_NS_LEN]))
        if target.is_link_local or target.is_multicast or target.is_unspecified \
                or target.is_loopback:
            return
        ip6 = self.config.ip6
        if ip6 is not None and target == ip6.addr:
            self.guest.holds_assigned6 = True
        else:
            self.guest.addr6_claimed = target

    def _learn_mld(self, l4: memoryview) -> None:
        """A multicast listener report (MLDv1, or MLDv2 joining: RFC 3810 §5.2) for the
        solicited-node group of the assigned address: the guest holds that address, even if
        it skipped duplicate address detection for it."""
        ip6 = self.config.ip6
        if ip6 is None or ip6.addr is None or self.guest.holds_assigned6:
            return
        group = (_SOLICITED_NODE | int(ip6.addr) & 0xFFFFFF).to_bytes(16, "big")
        if l4[0] == _MLD_REPORT:
            joined = len(l4) >= 24 and l4[8:24] == group
        else:
            joined = False
            off, records = 8, int.from_bytes(l4[6:8], "big") if len(l4) >= 8 else 0
            for _ in range(records):
                if off + 20 > len(l4):
                    break
                sources = int.from_bytes(l4[off + 2:off + 4], "big")
                if l4[off] in _MLD2_JOINS and l4[off + 4:off + 20] == group:
                    joined = True
                off += 20 + 16 * sources + 4 * l4[off + 1]
        if joined:
            self.guest.holds_assigned6 = True

    def _learn6(self, src: IPv6Address) -> None:
        """Reference 4.2: a link-local source is the guest's link-local address (and its
        address if it was given none and has shown no other); any other specified source is
        its address. (A link-local address there would send host traffic, pasta's splice
        to ::1 among it, to an address without a scope.)"""
        self._learned6 = int(src)
        if src.is_unspecified or src.is_multicast:
            return
        guest = self.guest
        if src.is_link_local:
            guest.addr6_ll_seen = src
            # the address the guest is given counts as seen (passt's addr_seen = addr)
            ip6 = self.config.ip6
            if guest.addr6_seen is None and (ip6 is None or ip6.addr is None):
                guest.addr6_seen = src
        else:
            guest.addr6_seen = src
