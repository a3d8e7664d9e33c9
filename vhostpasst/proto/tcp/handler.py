"""The TCP handler: listening sockets (`-t` forwards, pasta's automatic ports) and the
connections accepted on them.

TcpHandler is what the dispatcher, the daemon and pasta hold (vhostpasst.proto.tcp.TcpHandler);
it is the top of the classes the handler is built from (conn.py explains the whole). A
connection accepted on a `-t` port is first offered to `claim` (pasta's loopback splice); else
it gets a guest side from NAT and our SYN goes to the guest (SYN_SENT). The events of the
connections' own sockets are to_guest.py's.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import IPv6Address, ip_address

from vhostpasst.config import fwd
from vhostpasst.core import nat
from vhostpasst.core.loop import (
    EPOLLET,
    EPOLLIN,
    EPOLLRDHUP,
)
from vhostpasst.link.base import TxConsumer
from vhostpasst.proto import bind
from vhostpasst.proto.context import Context
from vhostpasst.proto.tcp.conn import (
    ACCEPT_BATCH,
    HANDSHAKE_TIMEOUT,
    LISTEN_BACKLOG,
    SYN_SENT,
    WS_TO_TAP,
    IPAddr,
    Listener,
    TcpConn,
    reset_close,
    tap_key,
    tune,
)
from vhostpasst.proto.tcp.control import log
from vhostpasst.proto.tcp.dataplane import FOLLOW_KICK, FOLLOW_SEND_ACK
from vhostpasst.proto.tcp.to_guest import ToGuest


class TcpHandler(ToGuest):
    """TCP between the guest and host sockets (see vhostpasst.proto.tcp.conn)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.listeners: list[Listener] = []
        # pasta: takes a just-accepted connection for the loopback splice path (True: taken),
        # so loopback-sourced connections never go through the tap (tcp_splice.py)
        self.claim: Callable[[Listener, socket.socket, tuple], bool] | None = None
        dp = self.dataplane
        # what a link that can offers the data plane's C first: the guest's TX frames
        self.tx_consumer = None if dp is None else \
            TxConsumer(dp.take, dp.end, dp.arg, dp.pass_begin, self._dataplane_after)

    # --- what the data plane's C left (dataplane.py) -------------------------------------

    def _dataplane_after(self) -> None:
        if self.dataplane is not None:
            self.dataplane.after_pass(self._dataplane_done)

    def _dataplane_done(self, conn: TcpConn, follow: int) -> None:
        """_tap_segments()'s end for the segments the C took: its timer, the discard, what
        the socket made of the guest's data, the read, our ACK."""
        if conn.closed:
            return
        try:
            if self._dataplane_write_result(conn, follow):
                return
            conn.discard_acked()
            if follow & FOLLOW_KICK:
                self._from_sock(conn)
            if follow & FOLLOW_SEND_ACK and not conn.closed:
                self._send_ack(conn)
        except Exception:  # a bug must not stop the loop, nor spare the others
            log.exception("error after guest segments for %r", conn)
            self._reset(conn)

    def close(self) -> None:
        if self.dataplane is not None:
            self.dataplane.close()
        for lst in self.listeners:
            self.loop.remove_fd(lst.sock.fileno())
            lst.sock.close()
        self.listeners.clear()

    # --- host-initiated connections (-t) --------------------------------------------------

    def listen(self, forwards: fwd.PortForwards | None) -> None:
        """Bind every `-t` mapping. Raises OSError for a port that an explicit spec asked
        for; ports of "all" and exclusion-only specs may fail (but not all of them)."""
        config = self.ctx.config
        for m, six, sock in bind.bind_all(forwards, config.ip4 is not None,
                                         config.ip6 is not None, "TCP", self._listen_one):
            self._add_listener(Listener(sock, six, m.host_port, m.guest_port, m.target))

    def _add_listener(self, lst: Listener) -> None:
        self.listeners.append(lst)
        self.loop.add_fd(lst.sock.fileno(), EPOLLIN, lambda _mask: self._on_listener(lst))

    def add_listener(self, six: bool, port: int, guest_port: int, addr: IPAddr | None = None,
                     target: IPAddr | None = None, ifname: str | None = None) -> Listener:
        """One more listening port, on `addr` or any address (pasta's automatic ports, the
        control socket); OSError if it cannot be bound."""
        lst = Listener(self._listen_one(six, addr, ifname, port), six, port, guest_port, target)
        self._add_listener(lst)
        return lst

    def remove_listener(self, lst: Listener) -> None:
        """Stop listening; connections accepted earlier go on."""
        if lst in self.listeners:
            self.listeners.remove(lst)
            self.loop.remove_fd(lst.sock.fileno())
            lst.sock.close()

    def _listen_one(self, six: bool, addr: IPAddr | None, ifname: str | None,
                    port: int) -> socket.socket:
        sock = bind.bound_socket(self.socket_factory, socket.SOCK_STREAM, six, addr, ifname,
                                 port, self.ctx.config.freebind)
        try:
            sock.listen(LISTEN_BACKLOG)
        except OSError:
            sock.close()
            raise
        return sock

    def _on_listener(self, lst: Listener) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = lst.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._log.warning(("tcp-accept", e.errno), "accept: %s", e)
                return
            try:
                # a rule with a target address never takes the splice path (passt neither)
                if lst.target is None and self.claim is not None and self.claim(lst, sock, peer):
                    continue
                if self.ctx.config.splice_only:  # no tap: only the splice path forwards
                    reset_close(sock)
                    continue
                self._accepted(lst, sock, peer)
            except Exception:
                log.exception("error accepting a TCP connection")
                sock.close()

    def _accepted(self, lst: Listener, sock: socket.socket, peer: tuple) -> None:
        ctx = self.ctx
        try:
            src = ip_address(str(peer[0]).split("%")[0])
            sport = int(peer[1])
        except (ValueError, IndexError, TypeError):
            sock.close()
            return
        if isinstance(src, IPv6Address) and src.ipv4_mapped is not None:
            src = src.ipv4_mapped
        sides = nat.from_host(ctx.config, ctx.guest, src, lst.target)
        if sides is None or self.half_open >= self.half_open_max or ctx.flows.full():
            self._log.debug(("tcp-in-drop", src), "connection from %s: no guest side", src)
            reset_close(sock)
            return
        shown, gdst = sides
        six = isinstance(gdst, IPv6Address)
        sock.setblocking(False)
        conn = TcpConn(self, sock, six, gdst, lst.guest_port, shown, sport, SYN_SENT)
        conn.local = src.is_loopback
        if not ctx.flows.add(conn, tap_key(six, gdst, lst.guest_port, shown, sport)):
            reset_close(sock)
            return
        self.half_open += 1
        conn.sndbuf_fixed = tune(sock)
        conn.isn = self._isn(conn)
        conn.seq_ack_from_tap = conn.isn
        conn.ws_to_tap = WS_TO_TAP
        self._set_events(conn, EPOLLRDHUP | EPOLLET)
        self._send_syn(conn)
        self._arm_idle(conn, HANDSHAKE_TIMEOUT)
