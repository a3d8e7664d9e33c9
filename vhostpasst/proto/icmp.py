"""ICMP/ICMPv6 echo through unprivileged ping sockets (reference §4.7).

A guest Echo Request opens (or reuses) a `socket(AF, SOCK_DGRAM, IPPROTO_ICMP[V6])` per
(guest source, guest destination, echo identifier) and is sent whole with sendto() to the
destination as NAT translates it (-o / --outbound-if bind the socket where they apply). The
socket is bound to the guest's echo identifier, as passt does, so requests leave with it; if
another ping socket holds it the kernel picks one, and replies get the guest's identifier back
(always written, a no-op when bound) before they are written, in place, into a link buffer,
from the address the guest pinged. Flows expire after
60 s without a request.

Only Echo Requests (code 0) are relayed: every other ICMP and ICMPv6 type from the guest is
dropped (NDP never gets here: the dispatcher hands it to services/ndp.py), as are requests NAT
turns down and new ones while the flow table is full. Only Echo Replies go back, and only from
the address the request went to: ping sockets match replies by identifier alone, and a reply
from anybody else must not look like an answer. If the host forbids ping sockets
(net.ipv4.ping_group_range), that is said once, at warning level, with the sysctl that allows
them. Replies read while no guest is attached are dropped.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address

from vhostpasst.core import nat
from vhostpasst.core.flow import RX_BATCH, Flow
from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import EPOLLIN
from vhostpasst.proto.context import Context
from vhostpasst.wire import icmp as wicmp
from vhostpasst.wire.ip import ETH_IP4_HLEN, ETH_IP6_HLEN, IPV4_HLEN, IPV6_HLEN, Ipv4, Ipv6

log = logging.getLogger(__name__)

PING_TIMEOUT = 60.0
_SCRATCH = bytearray(65536)  # replies read while no guest is attached are discarded here


class PingFlow(Flow):
    timeout = PING_TIMEOUT

    def __init__(self, ctx: Context, sock: socket.socket, six: bool, gsrc: IPv4Address |
                 IPv6Address, gdst: IPv4Address | IPv6Address, ident: int) -> None:
        super().__init__()
        self.ctx = ctx
        self.sock = sock
        self.six = six
        self.gsrc = gsrc  # the guest's address: replies go there
        self.gdst = gdst  # what the guest pinged: replies come from there
        self.ident = ident  # the guest's echo identifier, restored on replies
        self.target: IPv4Address | IPv6Address | None = None  # where requests really go

    def __repr__(self) -> str:
        return f"<ping {self.gsrc} -> {self.gdst} id {self.ident}>"

    def close(self) -> None:
        self.ctx.loop.remove_fd(self.sock.fileno())
        self.sock.close()


class IcmpHandler:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        # tests substitute fake sockets here, so fuzzing never touches a real network
        self.socket_factory: Callable[..., socket.socket] = socket.socket
        self._log = RateLimitedLog(log)
        self._warned_perm = False

    # guest -> host

    def tap4(self, packet: Ipv4) -> None:
        self._request(False, packet.src, packet.dst, packet.payload)

    def tap6(self, packet: Ipv6) -> None:
        self._request(True, packet.src, packet.dst, packet.l4)

    def _request(self, six: bool, src: IPv4Address | IPv6Address,
                 dst: IPv4Address | IPv6Address, message: memoryview) -> None:
        msg = wicmp.parse_icmp(message)
        if msg.type != (wicmp.ICMPV6_ECHO_REQUEST if six else wicmp.ICMP_ECHO) or msg.code:
            self._log.debug(("icmp-type", six), "%s type %d from the guest dropped",
                            "ICMPv6" if six else "ICMP", msg.type)
            return
        ident = msg.ident
        ctx = self.ctx
        key = ("ping6" if six else "ping4", src, dst, ident)
        flow = ctx.flows.lookup(key)
        if not isinstance(flow, PingFlow):
            flow = self._new_flow(six, src, dst, ident)
            if flow is None:
                return
            if not ctx.flows.add(flow, key):
                flow.close()
                return
        flow.touch()
        target = flow.target
        if target is None:
            return
        addr: tuple[str, int] | tuple[str, int, int, int]
        if six:
            scope = ctx.config.ip6.ifindex if ctx.config.ip6 is not None else 0
            addr = (str(target), 0, 0, scope if target.is_link_local else 0)
        else:
            addr = (str(target), 0)
        try:
            flow.sock.sendto(message, addr)
        except OSError as e:
            self._log.debug(("ping-send", e.errno), "ping to %s failed: %s", target, e)

    def _new_flow(self, six: bool, src: IPv4Address | IPv6Address,
                  dst: IPv4Address | IPv6Address, ident: int) -> PingFlow | None:
        ctx = self.ctx
        if ctx.flows.full():
            self._log.warning("ping-full", "flow table full: echo request dropped")
            return None
        target = nat.from_tap(ctx.config, False, dst, 0)
        if target is None:
            self._log.debug(("ping-nat", dst), "echo request to %s dropped", dst)
            return None
        family, proto = ((socket.AF_INET6, socket.IPPROTO_ICMPV6) if six
                         else (socket.AF_INET, socket.IPPROTO_ICMP))
        try:
            sock = self.socket_factory(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
                                 | socket.SOCK_CLOEXEC, proto)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM) and not self._warned_perm:
                self._warned_perm = True
                log.warning("cannot open ICMP echo (ping) sockets: %s. Allow them with: "
                            "sysctl -w net.ipv4.ping_group_range='0 2147483647'", e)
            else:
                self._log.warning(("ping-socket", e.errno), "ping socket: %s", e)
            return None
        self._bind(sock, six, ident)
        flow = PingFlow(ctx, sock, six, src, dst, ident)
        flow.target = target
        ctx.loop.add_fd(sock.fileno(), EPOLLIN, lambda _mask: self._on_reply(flow),
                        on_error=lambda _e: flow.remove())  # the loop's last resort
        return flow

    # host -> guest

    def _on_reply(self, flow: PingFlow) -> None:
        try:
            self._read_replies(flow)
        except Exception:  # a bug must not stop the loop
            log.exception("error reading a ping socket")

    def _read_replies(self, flow: PingFlow) -> None:
        ctx = self.ctx
        hlen = ETH_IP6_HLEN if flow.six else ETH_IP4_HLEN
        room = ctx.max_l3 - (IPV6_HLEN if flow.six else IPV4_HLEN)
        for _ in range(RX_BATCH):
            bufs = ctx.rx_buffers(1)
            if bufs:
                view = bufs[0][hlen:hlen + room]
            else:
                view = memoryview(_SCRATCH)
            try:
                n, _anc, flags, addr = flow.sock.recvmsg_into([view])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._log.debug(("ping-recv", e.errno), "ping socket: %s", e)
                return
            if not bufs or n < wicmp.ICMP_HLEN or flags & socket.MSG_TRUNC:
                continue
            if not _from_target(addr, flow.target):
                # ping sockets match replies by identifier only: never show the guest a
                # reply from somebody else as if it came from the address it pinged
                self._log.debug("ping-stray", "echo reply from an unexpected source dropped")
                continue
            buf = bufs[0]
            mac = ctx.guest_mac()
            our = ctx.config.our_mac
            if flow.six:
                if buf[hlen] != wicmp.ICMPV6_ECHO_REPLY:
                    continue
                length = wicmp.write_eth_ipv6_icmp_headers(buf, mac, our, flow.gdst.packed,
                                                           flow.gsrc.packed,
                                                           n, ident=flow.ident)
            else:
                if buf[hlen] != wicmp.ICMP_ECHOREPLY:
                    continue
                length = wicmp.write_eth_ipv4_icmp_headers(buf, mac, our, flow.gdst.packed,
                                                           flow.gsrc.packed,
                                                           n, ident=flow.ident)
            ctx.commit([length])


    def _bind(self, sock: socket.socket, six: bool, ident: int) -> None:
        """The guest's echo identifier (a ping socket's port), and -o / --outbound-if where
        they apply. Failures are tolerated: an identifier another ping socket holds leaves
        the kernel's choice (rewritten on replies), a bad -o address or interface the
        defaults (passt tolerates those too)."""
        conf = self.ctx.config.ip6 if six else self.ctx.config.ip4
        if conf is not None and conf.outbound_if:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                conf.outbound_if.encode())
            except OSError as e:
                log.debug("binding a ping socket to %s: %s", conf.outbound_if, e)
        local = str(conf.outbound) if conf is not None and conf.outbound is not None \
            else "::" if six else "0.0.0.0"
        for port in (ident, 0):
            try:
                sock.bind((local, port))
                return
            except OSError as e:
                self._log.debug(("ping-bind", e.errno), "ping socket on %s id %d: %s",
                                local, port, e)


def _from_target(addr: object, target: IPv4Address | IPv6Address | None) -> bool:
    if not isinstance(addr, tuple) or not addr or target is None:
        return False
    try:
        return ip_address(str(addr[0]).split("%")[0]) == target
    except ValueError:
        return False
