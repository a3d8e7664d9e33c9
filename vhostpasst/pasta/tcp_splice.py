"""TCP between loopbacks (pasta): bytes move socket -> pipe -> socket with splice(2), never
through the tap and never through Python buffers.

-T (namespace -> host): listeners bound to 127.0.0.1 / ::1 inside the namespace (created through
netns.call_in_netns); each accepted connection gets a non-blocking connect to the host's
loopback of the same family, port + delta.

-t (host -> namespace): TCP (proto/tcp/handler.py) accepts on the host's listening sockets and
offers each new connection to `claim`; one whose source is the host's loopback is taken here and
connected, from a socket created inside the namespace, to the namespace's own address (reference
4.5: the address it was seen using; with --host-lo-to-ns-lo the loopback address the host
connection was made to), port + delta. Namespace sockets come from a small pool refilled in one
helper-thread call, as a thread per connection would cost more than the connection. Each
direction has its own pipe: data is spliced from the source socket into the pipe, then from the
pipe into the other socket. When the other socket is full the direction waits for EPOLLOUT (and
stops reading meanwhile); at end of stream, once the pipe is empty, the other side is shut down
for writing. The connection closes when both directions are done, or on an error or hang-up."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import socket
from collections.abc import Callable, Iterable
from ipaddress import IPv6Address, ip_address
from typing import Any

from vhostpasst.config import fwd
from vhostpasst.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, Loop
from vhostpasst.system import netns

log = logging.getLogger(__name__)

SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2
SPLICE_F_MORE = 4
F_SETPIPE_SZ = 1031
F_GETPIPE_SZ = 1032
PIPE_SIZE_MAX = 8 << 20  # probed downwards: the limit for unprivileged users is 1 MiB
LISTEN_BACKLOG = 128
POOL_SIZE = 32  # namespace sockets kept ready per family (passt: 32, refilled at 16)
_GONE = (errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNREFUSED, errno.ETIMEDOUT)


def _pipe() -> tuple[int, int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    size = PIPE_SIZE_MAX
    while size >= 65536:
        try:
            return r, w, fcntl.fcntl(w, F_SETPIPE_SZ, size)
        except OSError:
            size //= 2
    return r, w, fcntl.fcntl(w, F_GETPIPE_SZ)


class _Direction:
    """One way of a connection: src -> pipe -> dst."""

    def __init__(self, src: socket.socket, dst: socket.socket) -> None:
        self.src, self.dst = src, dst
        self.r, self.w, self.size = _pipe()
        self.pending = 0  # bytes in the pipe
        self.eof = False  # src said end of stream
        self.shut = False  # dst was shut down for writing
        self.out_wait = False  # dst is full: wait for EPOLLOUT

    def move(self) -> None:
        """Splice as much as the sockets take now. OSError means the connection is broken."""
        while True:
            if self.pending:
                try:
                    more = SPLICE_F_MORE if self.pending >= self.size * 9 // 10 else 0
                    n = os.splice(self.r, self.dst.fileno(), self.pending,
                                  flags=SPLICE_F_MOVE | SPLICE_F_NONBLOCK | more)
                except BlockingIOError:
                    self.out_wait = True
                    return
                self.pending -= n
                if self.pending:
                    self.out_wait = True
                    return
            self.out_wait = False
            if self.eof:
                if not self.shut:
                    self.shut = True
                    try:
                        self.dst.shutdown(socket.SHUT_WR)
                    except OSError as e:
                        if e.errno != errno.ENOTCONN:
                            raise
                return
            try:
                n = os.splice(self.src.fileno(), self.w, self.size,
                              flags=SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
            except BlockingIOError:
                return
            if n == 0:
                self.eof = True
                continue
            self.pending += n
            if n < self.size // 10 and not self.pending:
                return

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


class SplicedConn:
    """An accepted socket `a` and the socket `b` we connect for it."""

    def __init__(self, loop: Loop, owner: TcpSplice, a: socket.socket,
                 b: socket.socket) -> None:
        self.loop, self.owner = loop, owner
        self.a, self.b = a, b
        self.connected = False
        self.closed = False
        self.ab = _Direction(a, b)
        self.ba = _Direction(b, a)
        # sockets taken out of epoll after a hang-up: EPOLLHUP cannot be masked, and while
        # the other socket is full the unread rest must wait without a busy loop
        self.parked: set[socket.socket] = set()
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        loop.add_fd(a.fileno(), 0, self._on_a)
        loop.add_fd(b.fileno(), EPOLLOUT, self._on_b)  # connect completes: writable

    def _events(self, sock: socket.socket) -> int:
        if not self.connected:
            return EPOLLOUT if sock is self.b else 0
        outgoing = self.ab if sock is self.a else self.ba  # reading sock feeds this one
        incoming = self.ba if sock is self.a else self.ab  # writing sock drains this one
        ev = 0
        if not outgoing.eof and not outgoing.out_wait:  # (EOF shows as EPOLLIN too)
            ev |= EPOLLIN
        if incoming.out_wait:
            ev |= EPOLLOUT
        return ev

    def _update(self) -> None:
        if self.closed:
            return
        if self.ab.shut and self.ba.shut:
            self.close()
            return
        for s in (self.a, self.b):
            if s in self.parked:
                outgoing = self.ab if s is self.a else self.ba
                if outgoing.eof or outgoing.out_wait:
                    continue  # nothing to read from it, or no room for it yet
                self.parked.discard(s)  # room again: the hang-up wakes us to read the rest
                self.loop.add_fd(s.fileno(), self._events(s),
                                 self._on_a if s is self.a else self._on_b)
                continue
            self.loop.modify_fd(s.fileno(), self._events(s))

    def _on_a(self, mask: int) -> None:
        self._on_event(mask, self.a)

    def _on_b(self, mask: int) -> None:
        if not self.connected and not self.closed:
            err = self.b.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err or mask & (EPOLLERR | EPOLLHUP):
                log.debug("splice: connect failed: %s", os.strerror(err) if err else "hang-up")
                self.close()
                return
            self.connected = True
        self._on_event(mask, self.b)

    def _on_event(self, mask: int, sock: socket.socket) -> None:
        if self.closed:
            return
        if not self.connected:  # only a hang-up or error can come before that
            if mask & (EPOLLERR | EPOLLHUP):
                self.close()
            return
        try:
            self.ab.move()
            self.ba.move()
        except OSError as e:
            if e.errno not in _GONE:
                log.debug("splice: %s", e)
            self.close()
            return
        if mask & EPOLLERR:
            self.close()
            return
        if mask & EPOLLHUP and not (self.ab.shut and self.ba.shut):
            # both ways shut for this socket, but what it received may still wait for room
            # on the other one (epoll reports no EPOLLIN while we do not ask for it): closing
            # now would lose that (the old test_tcp_ns_to_host_spliced[6-::1] flake)
            self.parked.add(sock)
            self.loop.remove_fd(sock.fileno())
        self._update()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for s in (self.a, self.b):
            if s not in self.parked:
                self.loop.remove_fd(s.fileno())
            s.close()
        self.parked.clear()
        self.ab.close()
        self.ba.close()
        self.owner.conns.discard(self)


class NsSocketPool:
    """Non-blocking TCP sockets created inside the namespace, per family, taken one per
    host -> namespace connection; refilled (one helper-thread call) when half are used."""

    def __init__(self, netns_fd: int, size: int = POOL_SIZE) -> None:
        self.netns_fd = netns_fd
        self.size = size
        self.free: dict[int, list[socket.socket]] = {socket.AF_INET: [], socket.AF_INET6: []}

    def take(self, family: int) -> socket.socket:
        free = self.free[family]
        if len(free) <= self.size // 2:
            free.extend(netns.call_in_netns(self.netns_fd, _new_sockets, family,
                                            self.size - len(free)))
        return free.pop()

    def close(self) -> None:
        for free in self.free.values():
            for sock in free:
                sock.close()
            free.clear()


def _new_sockets(family: int, count: int) -> list[socket.socket]:
    return [socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                          | socket.SOCK_CLOEXEC) for _ in range(count)]


class TcpSplice:
    """The -T listeners (inside the namespace), host -> namespace claims, and the spliced
    connections of both."""

    def __init__(self, loop: Loop, netns_fd: int | None = None,
                 ns_target: Callable[[int, str], str] | None = None) -> None:
        self.loop = loop
        self.netns_fd = netns_fd
        # (family, host address connected to) -> the namespace address a host-loopback
        # connection goes to
        self.ns_target = ns_target
        self.pool = NsSocketPool(netns_fd) if netns_fd is not None else None
        self.listeners: dict[int, tuple[socket.socket, int]] = {}  # fd -> (socket, to port)
        self.conns: set[SplicedConn] = set()

    def listen_ns(self, netns_fd: int, forwards: fwd.PortForwards | None,
                  families: Iterable[int]) -> None:
        """Bind the -T ports on the namespace's loopback (OSError if one cannot be bound)."""
        fams = list(families)
        for m in fwd.mappings(forwards, fwd.ephemeral_range()):
            for family in fams:
                self.add_ns_listener(netns_fd, family, m.host_port, m.guest_port)

    def add_ns_listener(self, netns_fd: int, family: int, port: int,
                        to_port: int) -> socket.socket:
        """One -T listener on the namespace's loopback (OSError if it cannot be bound)."""
        sock = netns.call_in_netns(netns_fd, _loopback_listener, family, port)
        self.listeners[sock.fileno()] = (sock, to_port)
        self.loop.add_fd(sock.fileno(), EPOLLIN, self._make_accept(sock))
        return sock

    def remove_ns_listener(self, sock: socket.socket) -> None:
        """Stop listening; spliced connections accepted earlier go on."""
        if self.listeners.pop(sock.fileno(), None) is not None:
            self.loop.remove_fd(sock.fileno())
            sock.close()

    def claim(self, lst: Any, sock: socket.socket, peer: tuple) -> bool:
        """TCP's hook for -t: take a connection from the host's loopback (True), leave
        anything else to the tap path (False). `lst` has `six` and `guest_port`."""
        if self.pool is None or self.ns_target is None:
            return False
        try:
            src = ip_address(str(peer[0]).split("%")[0])
        except (ValueError, IndexError):
            return False
        if isinstance(src, IPv6Address) and src.ipv4_mapped is not None:
            src = src.ipv4_mapped
        if not src.is_loopback:
            return False
        family = socket.AF_INET6 if lst.six else socket.AF_INET
        sock.setblocking(False)
        try:
            b = self.pool.take(family)
        except OSError as e:
            log.debug("splice: no namespace socket: %s", e)
            sock.close()
            return True
        dst = self.ns_target(family, str(sock.getsockname()[0]).split("%")[0])
        try:
            b.connect((dst, lst.guest_port))
        except BlockingIOError:
            pass
        except OSError as e:
            log.debug("splice: connect to %s port %d in the namespace: %s", dst,
                      lst.guest_port, e)
            sock.close()
            b.close()
            return True
        self.conns.add(SplicedConn(self.loop, self, sock, b))
        return True

    def _make_accept(self, sock: socket.socket) -> Callable[[int], None]:
        return lambda mask: self._accept(sock)

    def _accept(self, lsock: socket.socket) -> None:
        _, to_port = self.listeners[lsock.fileno()]
        while True:
            try:
                a, _peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                log.debug("splice: accept: %s", e)
                return
            a.setblocking(False)
            family = lsock.family
            b = socket.socket(family, socket.SOCK_STREAM)
            b.setblocking(False)
            dst = "::1" if family == socket.AF_INET6 else "127.0.0.1"
            try:
                b.connect((dst, to_port))
            except BlockingIOError:
                pass
            except OSError as e:
                log.debug("splice: connect to %s port %d: %s", dst, to_port, e)
                a.close()
                b.close()
                continue
            self.conns.add(SplicedConn(self.loop, self, a, b))

    def close(self) -> None:
        for conn in list(self.conns):
            conn.close()
        for fd, (sock, _) in list(self.listeners.items()):
            self.loop.remove_fd(fd)
            sock.close()
        self.listeners.clear()
        if self.pool is not None:
            self.pool.close()


def _loopback_listener(family: int, port: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


