"""UDP between loopbacks (pasta, reference 4.6 "spliced UDP"): datagrams between the host's
loopback and the namespace never go through the tap.

-u (host -> namespace): for each forwarded port, a socket bound to 127.0.0.1 / ::1 on the host
next to udp.py's wildcard one (both have SO_REUSEADDR; the kernel prefers the exact address, so
loopback datagrams land here and everything else stays on the tap path). A new source gets a
flow: a reply socket created inside the namespace, bound to the source's port where it is free
and connected to the namespace's address (as for TCP, reference 4.5), port + delta.

-U (namespace -> host): sockets bound to 127.0.0.1 / ::1 inside the namespace; a new source
gets a reply socket on the host, bound to 127.0.0.1 / ::1 and the source's port where free,
connected to the host's loopback, port + delta.

Either way, datagrams are read with recvmmsg and go out of the connected reply socket with
sendmmsg; what the reply socket receives goes back out of the listening socket to the source.
Flows end after UDP_TIMEOUT seconds without traffic.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from vhostpasst.config import fwd
from vhostpasst.core.loop import EPOLLIN, Loop
from vhostpasst.proto.udp import MMSG_MAX, Mmsg, flow_timeout
from vhostpasst.system import netns

log = logging.getLogger(__name__)

try:
    from vhostpasst import _mmsg as _mmsg_mod  # noqa: F401  (is the helper built?)
    HAVE_MMSG = True
except ImportError:
    HAVE_MMSG = False

DGRAM_MAX = 65535
BATCH = 32
SWEEP_INTERVAL = 5.0


def _loopback(family: int) -> str:
    return "::1" if family == socket.AF_INET6 else "127.0.0.1"


@dataclass(eq=False)
class SpliceListener:
    sock: socket.socket
    to_port: int
    to_ns: bool  # True: on the host, towards the namespace (-u); False: in it (-U)
    port: int = 0
    flows: dict[tuple, SpliceFlow] = field(default_factory=dict)


@dataclass(eq=False)
class SpliceFlow:
    lst: SpliceListener
    peer: tuple  # the source, as the listening socket saw it
    reply: socket.socket  # connected to the target
    last: float = 0.0


def _bound_socket(family: int, addr: str, port: int) -> socket.socket:
    """A UDP socket bound to addr:port, or to addr and any port when that one is taken."""
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((addr, port))
        except OSError:
            sock.bind((addr, 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _listener_socket(family: int, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((_loopback(family), port))
    except BaseException:
        sock.close()
        raise
    return sock


class UdpSplice:
    def __init__(self, loop: Loop, netns_fd: int, ns_target: Callable[[int, str], str],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.loop = loop
        self.netns_fd = netns_fd
        self.ns_target = ns_target
        self.clock = clock
        self.timeout = flow_timeout()
        self.listeners: dict[int, SpliceListener] = {}
        self.mmsg = Mmsg(BATCH) if HAVE_MMSG else None
        self._bufs = [bytearray(DGRAM_MAX) for _ in range(min(BATCH, MMSG_MAX))]
        self._views = [memoryview(b) for b in self._bufs]
        self._sweep = loop.call_later(SWEEP_INTERVAL, self._expire)

    # -- listening sockets ---------------------------------------------------------------

    def listen(self, forwards: fwd.PortForwards | None, families: Iterable[int],
               to_ns: bool) -> None:
        """Loopback sockets for explicit -u (to_ns) or -U ports; OSError if one fails."""
        fams = list(families)
        for m in fwd.mappings(forwards, fwd.ephemeral_range()):
            if (m.addr is not None and not m.addr.is_loopback) or m.target is not None:
                continue  # another address, or a target (no splice): not for this path
            for family in fams:
                try:
                    self.add_listener(family, m.host_port, m.guest_port, to_ns)
                except OSError:
                    if not m.tolerant:
                        raise

    def add_listener(self, family: int, port: int, to_port: int,
                     to_ns: bool) -> SpliceListener:
        if to_ns:
            sock = _listener_socket(family, port)
        else:
            sock = netns.call_in_netns(self.netns_fd, _listener_socket, family, port)
        lst = SpliceListener(sock, to_port, to_ns, port)
        self.listeners[sock.fileno()] = lst
        self.loop.add_fd(sock.fileno(), EPOLLIN, lambda _mask: self._on_listener(lst))
        return lst

    def remove_listener(self, lst: SpliceListener) -> None:
        if self.listeners.pop(lst.sock.fileno(), None) is None:
            return
        for flow in list(lst.flows.values()):
            self._close_flow(flow)
        self.loop.remove_fd(lst.sock.fileno())
        lst.sock.close()

    # -- datagrams ------------------------------------------------------------------------

    def _recv(self, sock: socket.socket, want_addr: bool) -> list[tuple[int, tuple | None]]:
        """(length, source) of up to BATCH datagrams read into self._views."""
        out: list[tuple[int, tuple | None]] = []
        if self.mmsg is not None:
            count = self.mmsg.recv(sock.fileno(), self._views, want_addr)
            for i in range(max(count, 0)):
                n, flags, addr = self.mmsg.result(i, want_addr)
                if not flags & socket.MSG_TRUNC:
                    out.append((n, addr))
            return out
        for view in self._views:
            try:
                n, addr = sock.recvfrom_into(view)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:
                if e.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH):
                    continue
                break
            out.append((n, addr))
        return out

    def _on_listener(self, lst: SpliceListener) -> None:
        got = self._recv(lst.sock, True)
        now = self.clock()
        run: list[memoryview] = []
        run_flow: SpliceFlow | None = None
        for i, (n, addr) in enumerate(got):
            if addr is None:
                continue
            flow = lst.flows.get(addr)
            if flow is None:
                flow = self._new_flow(lst, addr)
                if flow is None:
                    continue
            flow.last = now
            if flow is not run_flow and run_flow is not None:
                self._send(run_flow, run)
                run = []
            run_flow = flow
            run.append(self._views[i][:n])
        if run_flow is not None:
            self._send(run_flow, run)

    def _send(self, flow: SpliceFlow, payloads: list[memoryview]) -> None:
        """Consecutive datagrams of one flow in one sendmmsg; what does not fit is dropped,
        as a full socket buffer drops datagrams anyway."""
        fd = flow.reply.fileno()
        if self.mmsg is not None:
            sent = self.mmsg.send(fd, payloads)
            if sent < 0 and -sent not in (errno.EAGAIN, errno.ECONNREFUSED):
                log.debug("udp splice: sendmmsg: %s", os.strerror(-sent))
            return
        for p in payloads:
            try:
                flow.reply.send(p)
            except OSError:
                return

    def _new_flow(self, lst: SpliceListener, addr: tuple) -> SpliceFlow | None:
        family = lst.sock.family
        sport = int(addr[1])
        try:
            if lst.to_ns:  # host loopback -> the namespace's address, from inside it
                dst = self.ns_target(family, _loopback(family))  # the listener's address
                reply = netns.call_in_netns(self.netns_fd, _bound_socket, family,
                                            "::" if family == socket.AF_INET6 else "0.0.0.0",
                                            sport)
            else:  # namespace loopback -> the host's loopback
                dst = _loopback(family)
                reply = _bound_socket(family, dst, sport)
        except OSError as e:
            log.debug("udp splice: no socket for a flow from port %d: %s", sport, e)
            return None
        try:
            reply.connect((dst, lst.to_port))
        except OSError as e:
            log.debug("udp splice: connect to %s port %d: %s", dst, lst.to_port, e)
            reply.close()
            return None
        flow = SpliceFlow(lst, addr, reply, self.clock())
        lst.flows[addr] = flow
        self.loop.add_fd(reply.fileno(), EPOLLIN, lambda _mask: self._on_reply(flow))
        return flow

    def _on_reply(self, flow: SpliceFlow) -> None:
        got = self._recv(flow.reply, False)
        if got:
            flow.last = self.clock()
        for i, (n, _addr) in enumerate(got):
            try:  # the listening socket is not connected: one sendto per datagram
                flow.lst.sock.sendto(self._views[i][:n], flow.peer)
            except BlockingIOError:
                return
            except OSError as e:
                log.debug("udp splice: reply to %s: %s", flow.peer, e)
                return

    def _close_flow(self, flow: SpliceFlow) -> None:
        flow.lst.flows.pop(flow.peer, None)
        self.loop.remove_fd(flow.reply.fileno())
        flow.reply.close()

    def _expire(self) -> None:
        now = self.clock()
        for lst in list(self.listeners.values()):
            for flow in list(lst.flows.values()):
                if now - flow.last >= self.timeout:
                    self._close_flow(flow)
        self._sweep = self.loop.call_later(SWEEP_INTERVAL, self._expire)

    def close(self) -> None:
        self._sweep.cancel()
        for lst in list(self.listeners.values()):
            self.remove_listener(lst)
