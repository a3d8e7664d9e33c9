"""UDP: guest datagrams to per-flow host sockets and back, `-u` inbound forwarding, and ICMP
errors relayed to the guest (reference §4.6, §4.8, §4.9).

Guest -> host: a flow per (guest address and port, destination and port) owns a socket bound
to the guest's source port where the host allows it (so servers see the port the guest used)
and connected to the translated destination; payloads go out with send(). Replies are read
with recvmsg_into straight into link buffers after the room for the headers, which are then
written in place: one copy from the socket to the guest. Broadcast and multicast destinations
go out too (with SO_BROADCAST where the host's routes call for it); as the socket is connected
to that address, the kernel filters out unicast answers, as with passt.

Host -> guest (`-u`): listening sockets per forwarded port, with IP_PKTINFO /
IPV6_RECVPKTINFO so that each datagram read (in recvmmsg batches) comes with the address it was
sent to. A datagram from a new host source makes a flow towards the guest's address and the
mapped port, and a reply socket for it, as passt: bound to the local address and port the
datagram was sent to (SO_REUSEADDR, beside the listener) and connected to the peer. The
kernel prefers a connected socket, so only a flow's first datagrams come through the listener;
the rest, and the guest's answers, use the reply socket like an outbound flow's, and answers
leave from the address the peer contacted even on a wildcard listener with several local
addresses. A flow per listener and peer: datagrams to another local address of the same
listener join it. If the reply socket cannot be made, answers go out of the listener (the
kernel picks the source address).

Multicast: a datagram the host received for a group (a listener bound to it, or one on a
wildcard address while the host is a member) reaches the guest with the group as destination
(and the group's Ethernet address), in a flow of its own per group; it has no reply socket (a
group is no source address) and its errors are not relayed.

Errors: every socket has IP_RECVERR / IPV6_RECVERR; what the kernel queues becomes an
ICMP/ICMPv6 error to the guest (udp_errors.py).

TTL and hop limit: the guest's go out with its datagrams (IP_TTL / IPV6_UNICAST_HOPS set on
the socket when they change, as passt), so a datagram with TTL 1 expires at the first router
and the time exceeded comes back as an error above: traceroute from a guest works.

Batching: the guest's datagrams of one wake-up are queued and sent at flush_tap(), a run for
one flow and TTL in one sendmmsg(); replies come in with recvmmsg() (both through the `_mmsg`
C helper when it is built, else one system call per datagram: mmsg.py).

Timeouts, as passt and the host's connection tracking: a flow ends after
nf_conntrack_udp_timeout (30 s) without a datagram either way, or, once it has seen an answer
and more than one datagram in a direction, nf_conntrack_udp_timeout_stream (120 s); both read
from the host's sysctls at start (VHOSTPASST_UDP_TIMEOUT sets both, for tests).

Refused, silently but for a rate-limited debug line: guest datagrams with port 0 on either
side, from an unspecified or multicast source, to an unspecified destination, or to one NAT
turns down; a new flow when the flow table is full or its socket cannot be set up; inbound
datagrams from port 0, a multicast or unspecified source, or a source NAT has no guest
address for; a datagram longer than the guest's MTU (it is not fragmented). With no guest
attached, what the host sends is read and dropped.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import struct
import time
import weakref
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

from vhostpasst.config import fwd
from vhostpasst.config.env import env_number
from vhostpasst.core import nat
from vhostpasst.core.flow import RX_BATCH, Flow
from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import EPOLLERR, EPOLLIN
from vhostpasst.proto import bind
from vhostpasst.proto.context import Context
from vhostpasst.proto.mmsg import MMSG_MAX, Mmsg, _mlib
from vhostpasst.proto.udp_errors import ErrorRelay, set_recverr
from vhostpasst.wire import ip, udp
from vhostpasst.wire.ip import BROADCAST4, IPV4_HLEN, IPV6_HLEN

log = logging.getLogger(__name__)

IPAddr = IPv4Address | IPv6Address

UDP_TIMEOUT = 30.0  # without the conntrack sysctls (nf_conntrack not loaded), as passt
UDP_TIMEOUT_STREAM = 120.0
CONNTRACK_SYSCTL = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"
# Test hook: a short flow timeout so an end-to-end test can watch a flow expire.
TIMEOUT_ENV = "VHOSTPASST_UDP_TIMEOUT"

IP_PKTINFO = 8  # (Python has IPV6_RECVPKTINFO and IPV6_PKTINFO, not always this one)
_IN_PKTINFO = struct.Struct("=i4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16si")  # struct in6_pktinfo: addr, ifindex
PKTINFO_ROOM = socket.CMSG_SPACE(_IN6_PKTINFO.size)

_SCRATCH = bytearray(65536)  # datagrams read while no guest is attached are discarded here
# errors a socket reports once for an earlier ICMP error: reading may go on after them
_SOFT_ERRNOS = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH,
                          errno.EMSGSIZE, errno.ETIMEDOUT, errno.EINTR})

def _sysctl_seconds(path: str, default: float) -> float:
    try:
        with open(path) as f:
            value = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return default
    return float(value) if value > 0 else default


def flow_timeouts() -> tuple[float, float]:
    """(timeout, stream timeout) of a UDP flow: the host's conntrack ones (module docstring).
    Read before the sandbox empties the root."""
    timeout = _sysctl_seconds(CONNTRACK_SYSCTL, UDP_TIMEOUT)
    stream = _sysctl_seconds(CONNTRACK_SYSCTL + "_stream", UDP_TIMEOUT_STREAM)
    return env_number(TIMEOUT_ENV, timeout), env_number(TIMEOUT_ENV, stream)


def flow_timeout() -> float:
    """The timeout of a flow that is a stream (pasta's spliced flows)."""
    return flow_timeouts()[1]


class UdpFlow(Flow):
    """One pseudo-connection. Guest side: (gaddr, gport) is the guest, (faddr, fport) the
    far end as the guest sees it. Host side: `sock`, connected (outbound flows, owned) or
    a shared listening socket with `peer` the host source (inbound flows)."""

    def __init__(self, ctx: Context, six: bool, gaddr: IPAddr, gport: int, faddr: IPAddr,
                 fport: int, sock: socket.socket, peer: tuple[object, ...] | None,
                 timeout: float, stream_timeout: float | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.six = six
        self.gaddr, self.gport, self.faddr, self.fport = gaddr, gport, faddr, fport
        self.sock = sock
        self.peer = peer  # None: `sock` is ours and connected
        self.target: IPAddr | None = None  # the host address `sock` is connected to
        self.listener: Listener | None = None  # inbound: the `-u` socket it came through
        self.group: IPAddr | None = None  # inbound multicast: the group, frames' destination
        self.timeout = timeout
        self.stream_timeout = timeout if stream_timeout is None else stream_timeout
        # datagrams each way until the flow counts as a stream (then no more counting)
        self.from_guest = self.from_host = 0
        self.stream = False

    def seen(self, from_guest: bool) -> None:
        """A datagram either way: activity, and the stream timeout once there was an answer
        and more than one datagram in a direction (passt's rule)."""
        self.touch()
        if self.stream:
            return
        if from_guest:
            self.from_guest += 1
        else:
            self.from_host += 1
        if self.from_guest and self.from_host and self.from_guest + self.from_host > 2:
            self.stream = True
            self.timeout = self.stream_timeout

    def __repr__(self) -> str:
        kind = "out" if self.listener is None else "in"
        return f"<udp {kind} {self.gaddr}:{self.gport} <-> {self.faddr}:{self.fport}>"

    def close(self) -> None:
        if self.peer is None:  # our own socket (outbound, or an inbound flow's reply socket)
            self.ctx.loop.remove_fd(self.sock.fileno())
            self.sock.close()


class Listener:
    """One `-u` listening socket: host port -> guest port (on `target`, if the rule names
    one, instead of the guest's address)."""

    def __init__(self, sock: socket.socket, six: bool, guest_port: int,
                 target: IPAddr | None = None) -> None:
        self.sock = sock
        self.six = six
        self.guest_port = guest_port
        self.target = target


def _tap_key(six: bool, gaddr: IPAddr, gport: int, faddr: IPAddr, fport: int) -> tuple:
    return ("udp", six, gaddr, gport, faddr, fport)


def _prepare_listener(sock: socket.socket, six: bool) -> None:
    """Errors, and the destination of each datagram (module docstring)."""
    set_recverr(sock, six)
    if six:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def _pktinfo_destination(anc: list[tuple[int, int, bytes]]) -> tuple[IPAddr, int] | None:
    """(destination, interface index) from recvmsg's ancillary data, as mmsg.destination()."""
    for level, ctype, data in anc:
        if (level, ctype) == (socket.IPPROTO_IP, IP_PKTINFO) and \
                len(data) >= _IN_PKTINFO.size:
            ifindex, _spec, addr = _IN_PKTINFO.unpack_from(data)
            return IPv4Address(addr), ifindex
        if (level, ctype) == (socket.IPPROTO_IPV6, socket.IPV6_PKTINFO) and \
                len(data) >= _IN6_PKTINFO.size:
            addr6, ifindex = _IN6_PKTINFO.unpack_from(data)
            return IPv6Address(addr6), ifindex
    return None


def multicast_mac(group: IPAddr) -> bytes:
    """The Ethernet address a multicast group maps to (RFC 1112 6.4, RFC 2464 7)."""
    if isinstance(group, IPv4Address):
        return b"\x01\x00\x5e" + bytes([group.packed[1] & 0x7F]) + group.packed[2:]
    return b"\x33\x33" + group.packed[12:]


class UdpHandler:
    def __init__(self, ctx: Context, clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx = ctx
        # tests substitute fake sockets here, so fuzzing never touches a real network
        self.socket_factory: Callable[..., socket.socket] = socket.socket
        self.timeout, self.stream_timeout = flow_timeouts()
        self.listeners: list[Listener] = []
        self._pending: list[tuple[UdpFlow, memoryview, int]] = []  # flow, payload, TTL
        # the TTL / hop limit last set on each socket (a listener's is shared by its flows)
        self._ttl_set: weakref.WeakKeyDictionary[socket.socket, int] = \
            weakref.WeakKeyDictionary()
        # recvmmsg/sendmmsg when the C helper is built; tests with fake sockets set None
        self.mmsg: Mmsg | None = Mmsg() if _mlib is not None else None
        self._log = RateLimitedLog(log)
        self.errors = ErrorRelay(ctx, clock, self._log)

    def close(self) -> None:
        for lst in self.listeners:
            self.ctx.loop.remove_fd(lst.sock.fileno())
            lst.sock.close()
        self.listeners.clear()

    # --- guest -> host ----------------------------------------------------------------------

    def tap4(self, packet: ip.Ipv4) -> None:
        self._tap(False, packet.src, packet.dst, packet.ttl, udp.parse_udp(packet.payload))

    def tap6(self, packet: ip.Ipv6) -> None:
        self._tap(True, packet.src, packet.dst, packet.hop_limit, udp.parse_udp(packet.l4))

    def _tap(self, six: bool, src: IPAddr, dst: IPAddr, ttl: int, dgram: udp.Udp) -> None:
        if dgram.sport == 0 or dgram.dport == 0:
            self._log.debug("udp-port0", "UDP datagram with port 0 from the guest dropped")
            return
        # Broadcast and multicast destinations go out like unicast ones (reference 4.6); a
        # multicast or unspecified source could never be answered, and 0.0.0.0/:: is no target.
        if src.is_unspecified or src.is_multicast or dst.is_unspecified:
            self._log.debug(("udp-addr", dst), "UDP from %s to %s dropped", src, dst)
            return
        key = _tap_key(six, src, dgram.sport, dst, dgram.dport)
        flow = self.ctx.flows.lookup(key)
        if not isinstance(flow, UdpFlow):
            flow = self._new_outbound(six, src, dgram.sport, dst, dgram.dport)
            if flow is None:
                return
            if not self.ctx.flows.add(flow, key):
                flow.close()
                return
        flow.seen(from_guest=True)
        # Queued, not sent: the dispatcher calls flush_tap() once per batch of guest frames,
        # so a run of datagrams for one flow goes out in one sendmmsg().
        self._pending.append((flow, dgram.payload, ttl))

    def flush_tap(self) -> None:
        """Send what the guest frames of this batch queued (before the frames go away)."""
        pending, self._pending = self._pending, []
        i = 0
        while i < len(pending):
            flow, _, ttl = pending[i]
            j = i + 1
            while j < len(pending) and pending[j][0] is flow and pending[j][2] == ttl \
                    and j - i < MMSG_MAX:
                j += 1
            if not flow.closed:
                self._set_ttl(flow, ttl)
                self._send_run(flow, [payload for _, payload, _ in pending[i:j]])
            i = j

    def _set_ttl(self, flow: UdpFlow, ttl: int) -> None:
        """The guest's TTL or hop limit on the socket the next datagrams of `flow` leave."""
        sock = flow.sock
        if self._ttl_set.get(sock) == ttl:
            return
        try:
            if flow.six:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, ttl)
            else:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, ttl)
        except OSError as e:  # TTL 0, which Linux refuses: the kernel's default stays
            self._log.debug(("udp-ttl", e.errno), "UDP TTL %d for %r: %s", ttl, flow, e)
        self._ttl_set[sock] = ttl

    def _send_run(self, flow: UdpFlow, payloads: list[memoryview]) -> None:
        if len(payloads) > 1 and flow.peer is None and self.mmsg is not None:
            sent = self.mmsg.send(flow.sock.fileno(), payloads)
            if sent < 0 and -sent not in (errno.EAGAIN, errno.ECONNREFUSED):
                self._log.debug(("udp-send", -sent), "UDP sendmmsg for %r: %s", flow,
                                os.strerror(-sent))
            if sent >= 0:
                payloads = payloads[sent:]  # the rest one by one (they may fail alone)
        for payload in payloads:
            try:
                if flow.peer is None:
                    flow.sock.send(payload)
                else:
                    flow.sock.sendto(payload, flow.peer)
            except BlockingIOError:
                self._log.debug("udp-send-full", "UDP socket buffer full: datagram dropped")
            except OSError as e:
                # ECONNREFUSED etc. report an earlier ICMP error (relayed from the error queue)
                self._log.debug(("udp-send", e.errno), "UDP send for %r: %s", flow, e)

    def _new_outbound(self, six: bool, src: IPAddr, sport: int, dst: IPAddr,
                      dport: int) -> UdpFlow | None:
        ctx = self.ctx
        if ctx.flows.full():
            self._log.warning("udp-full", "flow table full: UDP datagram dropped")
            return None
        target = nat.from_tap(ctx.config, True, dst, dport)
        if target is None:
            self._log.debug(("udp-nat", dst), "UDP to %s dropped", dst)
            return None
        conf = ctx.config.ip6 if six else ctx.config.ip4
        family = socket.AF_INET6 if six else socket.AF_INET
        sock = self.socket_factory(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            set_recverr(sock, six)
            if conf is not None and conf.outbound_if:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                conf.outbound_if.encode())
            local = str(conf.outbound) if conf is not None and conf.outbound else ""
            try:
                sock.bind((local, sport))  # keep the guest's source port (reference 4.6)
            except OSError as e:
                # taken (by a socket without SO_REUSEADDR) or privileged: any port will do
                self._log.debug(("udp-bind", sport), "UDP source port %d: %s", sport, e)
                sock.bind((local, 0))
            if target == BROADCAST4:  # Linux refuses broadcasts without it (EACCES)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            if six:
                scope = conf.ifindex if conf is not None and target.is_link_local else 0
                addr: tuple = (str(target), dport, 0, scope)
            else:
                addr = (str(target), dport)
            try:
                sock.connect(addr)
            except OSError as e:
                if e.errno != errno.EACCES:
                    raise
                # an address the host routes as a broadcast (say a subnet-directed one)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
                sock.connect(addr)
        except OSError as e:
            sock.close()
            self._log.debug(("udp-sock", e.errno), "UDP flow to %s:%d: %s", target, dport, e)
            return None
        flow = UdpFlow(ctx, six, src, sport, dst, dport, sock, None, self.timeout,
                       self.stream_timeout)
        flow.target = target
        # the loop's last resort (loop.py): a callback that raises ends its flow
        ctx.loop.add_fd(sock.fileno(), EPOLLIN, functools.partial(self._on_flow_sock, flow),
                        on_error=lambda _e: flow.remove())
        return flow

    # --- host -> guest ----------------------------------------------------------------------

    def _on_flow_sock(self, flow: UdpFlow, mask: int) -> None:
        try:
            if mask & EPOLLERR:
                self.errors.drain(flow.sock, flow.six, lambda _addr: flow)
            if not flow.closed:
                self._read(flow.sock, flow.six, lambda _addr, _dst: flow)  # one peer
        except Exception:  # a bug must not stop the loop
            log.exception("error reading a UDP flow socket")

    def _on_listener(self, lst: Listener, mask: int) -> None:
        try:
            if mask & EPOLLERR:
                self.errors.drain(lst.sock, lst.six, lambda addr: self._inbound_flow(
                    lst, addr, None, create=False))
            self._read(lst.sock, lst.six,
                       lambda addr, dst: self._inbound_flow(lst, addr, dst), need_addr=True)
        except Exception:
            log.exception("error reading a UDP listening socket")

    def _read(self, sock: socket.socket, six: bool,
              flow_for: Callable[[tuple | None, tuple[IPAddr, int] | None], UdpFlow | None],
              need_addr: bool = False) -> None:
        """Up to RX_BATCH datagrams, each straight into a link buffer after the header room;
        headers are written in place and all frames committed at once. `need_addr` (a
        listener): `flow_for` gets each datagram's source and destination."""
        ctx = self.ctx
        off = udp.UDP6_PAYLOAD_OFFSET if six else udp.UDP4_PAYLOAD_OFFSET
        room = ctx.max_l3 - (IPV6_HLEN if six else IPV4_HLEN) - udp.UDP_HLEN
        bufs = ctx.rx_buffers(RX_BATCH)
        if not bufs:
            self._discard(sock)
            return
        views = [b[off:off + room] for b in bufs]
        # (length, msg flags, source, destination)
        got: list[tuple[int, int, tuple | None, tuple[IPAddr, int] | None]] = []
        if self.mmsg is not None:
            for _ in range(2):  # a pending socket error (ECONNREFUSED) fails one call
                count = self.mmsg.recv(sock.fileno(), views, need_addr, need_addr)
                if count >= 0 or -count not in _SOFT_ERRNOS:
                    break
            if count < 0:
                if -count != errno.EAGAIN:
                    self._log.debug(("udp-recv", -count), "UDP recvmmsg: %s",
                                    os.strerror(-count))
                return
            got = [(*self.mmsg.result(i, need_addr),
                    self.mmsg.destination(i) if need_addr else None) for i in range(count)]
        else:
            anc_room = PKTINFO_ROOM if need_addr else 0
            for view in views:
                try:
                    n, anc, flags, addr = sock.recvmsg_into([view], anc_room)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as e:
                    self._log.debug(("udp-recv", e.errno), "UDP recv: %s", e)
                    if e.errno in _SOFT_ERRNOS:
                        continue
                    break
                got.append((n, flags, addr, _pktinfo_destination(anc) if need_addr else None))
        lengths: list[int] = []
        guest_mac, our = ctx.guest_mac(), ctx.config.our_mac
        for i, (n, flags, addr, dst) in enumerate(got):
            if flags & socket.MSG_TRUNC:
                self._log.debug("udp-trunc", "UDP datagram larger than the guest MTU dropped")
                continue
            flow = flow_for(addr, dst)
            if flow is None:
                continue
            flow.seen(from_guest=False)
            buf = bufs[i]
            to, mac = flow.gaddr, guest_mac
            if flow.group is not None:
                to, mac = flow.group, multicast_mac(flow.group)
            if six:
                length = udp.write_eth_ipv6_udp_headers(buf, mac, our, flow.faddr.packed,
                                                        to.packed, flow.fport, flow.gport, n)
            else:
                length = udp.write_eth_ipv4_udp_headers(buf, mac, our, flow.faddr.packed,
                                                        to.packed, flow.fport, flow.gport, n)
            j = len(lengths)
            if j != i:  # an earlier datagram was dropped: close the gap (rare, so a copy)
                bufs[j][:length] = buf[:length]
            lengths.append(length)
        if lengths:
            ctx.commit(lengths)

    def _discard(self, sock: socket.socket) -> None:
        """No guest attached (or no buffer): read and drop, so the socket stops polling."""
        for _ in range(RX_BATCH):
            try:
                sock.recvmsg_into([memoryview(_SCRATCH)])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in _SOFT_ERRNOS:
                    return

    def _inbound_flow(self, lst: Listener, addr: tuple | None, dst: tuple[IPAddr, int] | None,
                      create: bool = True) -> UdpFlow | None:
        """The flow of a datagram from `addr` to `dst` (address, interface index; None if
        unknown) through `lst`: found, or made if `create`."""
        if addr is None:
            return None
        try:
            host_src = ip_address(addr[0].split("%")[0])
            host_port = int(addr[1])
        except (ValueError, IndexError, TypeError, AttributeError):
            return None
        group = dst[0] if dst is not None and dst[0].is_multicast else None
        key = ("udpin", lst.sock.fileno(), group, host_src, host_port)
        flow = self.ctx.flows.lookup(key)
        if isinstance(flow, UdpFlow) or not create:
            return flow if isinstance(flow, UdpFlow) else None
        if host_port == 0 or host_src.is_multicast or host_src.is_unspecified:
            return None
        if self.ctx.config.splice_only:  # no tap: only the splice path forwards
            return None
        if self.ctx.flows.full():
            self._log.warning("udp-full", "flow table full: inbound UDP datagram dropped")
            return None
        sides = nat.from_host(self.ctx.config, self.ctx.guest, host_src, lst.target)
        if sides is None:
            self._log.debug(("udp-in-nat", host_src), "UDP from %s: no guest address to use",
                            host_src)
            return None
        shown, gdst = sides
        six = isinstance(gdst, IPv6Address)
        if six != lst.six:
            return None
        reply = None
        if group is None and dst is not None and dst[0] != BROADCAST4:
            reply = self._reply_socket(lst, dst, tuple(addr))
        flow = UdpFlow(self.ctx, six, gdst, lst.guest_port, shown, host_port,
                       lst.sock if reply is None else reply,
                       tuple(addr) if reply is None else None, self.timeout,
                       self.stream_timeout)
        flow.listener, flow.group, flow.target = lst, group, host_src
        tap_key = _tap_key(six, gdst, lst.guest_port, shown, host_port)
        # a group's flow answers through the peer's unicast flow if there is one
        if not self.ctx.flows.add(flow, key, tap_key) and \
                (group is None or not self.ctx.flows.add(flow, key)):
            if reply is not None:
                reply.close()
            return None
        if reply is not None:
            self.ctx.loop.add_fd(reply.fileno(), EPOLLIN,
                                 functools.partial(self._on_flow_sock, flow),
                                 on_error=lambda _e: flow.remove())
        return flow

    def _reply_socket(self, lst: Listener, dst: tuple[IPAddr, int],
                      peer: tuple) -> socket.socket | None:
        """A socket bound to the address and port a peer sent to through `lst`, connected to
        the peer (module docstring); None if the kernel refuses it."""
        address, ifindex = dst
        sock = self.socket_factory(socket.AF_INET6 if lst.six else socket.AF_INET,
                                   socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                   | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            set_recverr(sock, lst.six)
            port = lst.sock.getsockname()[1]
            if lst.six:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                scope = ifindex if address.is_link_local else 0
                sock.bind((str(address), port, 0, scope))
            else:
                sock.bind((str(address), port))
            sock.connect(peer)
        except OSError as e:
            sock.close()
            self._log.debug(("udp-reply", e.errno), "UDP reply socket on %s:%s: %s",
                            address, peer, e)
            return None
        return sock

    # --- -u: listening sockets ----------------------------------------------------------------

    def listen(self, forwards: fwd.PortForwards | None) -> None:
        """Bind every `-u` mapping. Raises OSError for a port that an explicit spec asked
        for; ports of "all" and exclusion-only specs may fail (but not all of them)."""
        config = self.ctx.config
        for m, six, sock in bind.bind_all(forwards, config.ip4 is not None,
                                         config.ip6 is not None, "UDP", self._listen_one):
            lst = Listener(sock, six, m.guest_port, m.target)
            self.listeners.append(lst)
            self.ctx.loop.add_fd(sock.fileno(), EPOLLIN, functools.partial(self._on_listener, lst))

    def add_listener(self, six: bool, port: int, guest_port: int, addr: IPAddr | None = None,
                     target: IPAddr | None = None, ifname: str | None = None) -> Listener:
        """One more listening port, on `addr` or any address (pasta's automatic ports, the
        control socket); OSError if it cannot be bound."""
        lst = Listener(self._listen_one(six, addr, ifname, port), six, guest_port, target)
        self.listeners.append(lst)
        self.ctx.loop.add_fd(lst.sock.fileno(), EPOLLIN, functools.partial(self._on_listener, lst))
        return lst

    def remove_listener(self, lst: Listener) -> None:
        """Stop listening, and end the inbound flows that answer through this socket."""
        if lst not in self.listeners:
            return
        for flow in list(self.ctx.flows):
            if isinstance(flow, UdpFlow) and flow.listener is lst:
                flow.remove()
        self.listeners.remove(lst)
        self.ctx.loop.remove_fd(lst.sock.fileno())
        lst.sock.close()

    def _listen_one(self, six: bool, addr: IPAddr | None, ifname: str | None,
                    port: int) -> socket.socket:
        return bind.bound_socket(self.socket_factory, socket.SOCK_DGRAM, six, addr, ifname,
                                 port, self.ctx.config.freebind,
                                 lambda sock: _prepare_listener(sock, six))
