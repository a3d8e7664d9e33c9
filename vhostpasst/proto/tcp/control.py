"""TCP segments built from nothing, and what every other part of the handler stands on.

The bottom of the handler (see conn.py for the whole picture): the shared state, the
segments that carry no data but SYN and SYN-ACK, FIN and RST (pure ACKs and window updates,
which answer the guest's segments, are from_guest.py's), and the epoll mask of a
connection's socket. (The ACK number and window we show the guest, and
the header template data frames are written from, are the connection's: conn.py.) What the
layers above implement and this one calls (the timers, the host->guest data path, the socket
events) is declared here as abstract methods.
"""

from __future__ import annotations

import abc
import hashlib
import logging
import os
import socket
import struct
import time
from collections.abc import Callable

from vhostpasst.config.env import env_number
from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import EPOLLET, EPOLLIN, EPOLLOUT, EPOLLRDHUP
from vhostpasst.proto.context import Context
from vhostpasst.proto.tcp.conn import (
    _LINGER0,
    CONNECTING,
    DEFAULT_MSS4,
    DEFAULT_MSS6,
    ENV_HALF_OPEN,
    ENV_IDLE,
    ENV_MAX_RETRANS,
    ENV_RTO_MAX,
    ESTABLISHED,
    HALF_OPEN_MAX,
    IDLE_TIMEOUT,
    M32,
    MAX_RETRANS,
    RTO_MAX,
    SYN_ACK_SENT,
    SYN_SENT,
    SYN_WINDOW,
    WS_TO_TAP,
    IPAddr,
    TcpConn,
    seq_lt,
)
from vhostpasst.proto.tcp.dataplane import DataPlane, dataplane_enabled
from vhostpasst.wire import tcp as wtcp
from vhostpasst.wire.ip import IPV4_HLEN, IPV6_HLEN

log = logging.getLogger("vhostpasst.proto.tcp")


class TcpControl(abc.ABC):
    """The handler's shared state and its segments without data (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        # tests substitute fake sockets here, so fuzzing never touches a real network
        self.socket_factory: Callable[..., socket.socket] = socket.socket
        self.max_retrans = int(env_number(ENV_MAX_RETRANS, MAX_RETRANS))
        self.rto_max = env_number(ENV_RTO_MAX, RTO_MAX)
        idle = env_number(ENV_IDLE, 0.0)
        self.idle_timeout = idle if idle > 0 else IDLE_TIMEOUT
        self.half_open_max = int(env_number(ENV_HALF_OPEN, HALF_OPEN_MAX))
        self.half_open = 0
        self._secret = os.urandom(16)
        # connections that stopped for lack of link buffers, resumed by rx_ready()
        self._waiting: dict[TcpConn, None] = {}
        self._log = RateLimitedLog(log)
        self.resets_sent = 0  # RSTs for segments of no connection (tests read it)
        # the C that takes the guest's pure ACKs on established connections (dataplane.py)
        self.dataplane = DataPlane(self.rto_max, ctx.flows.max_flows) if dataplane_enabled() \
            else None

    def dp_drop(self, conn: TcpConn) -> None:
        """A connection leaves the data plane's table (TcpConn.close())."""
        if self.dataplane is not None:
            self.dataplane.drop(conn)

    # --- what the layers above do -----------------------------------------------------------

    @abc.abstractmethod
    def _arm_rto(self, conn: TcpConn, restart: bool = False) -> None:
        """Start the retransmission timer (timers.py); `restart`: from now, if it runs."""

    @abc.abstractmethod
    def _arm_ack(self, conn: TcpConn) -> None:
        """Ask the socket again soon for the ACK and window to show (timers.py)."""

    @abc.abstractmethod
    def _arm_idle(self, conn: TcpConn, timeout: float | None) -> None:
        """The connection timer: handshake, FIN or inactivity (timers.py)."""

    @abc.abstractmethod
    def _from_sock(self, conn: TcpConn) -> None:
        """Peek what the guest's window allows from the socket to the guest (to_guest.py)."""

    @abc.abstractmethod
    def _rewind(self, conn: TcpConn) -> None:
        """Resend from the guest's ACK point (from_guest.py)."""

    @abc.abstractmethod
    def _send_ack(self, conn: TcpConn, force: bool = False) -> None:
        """An ACK and window update to the guest if they changed, or if `force`
        (from_guest.py)."""

    @abc.abstractmethod
    def _on_sock(self, conn: TcpConn, mask: int) -> None:
        """An epoll event on the connection's socket (to_guest.py)."""

    # --- replies built from nothing -------------------------------------------------------

    def _frame(self, six: bool, src: bytes, dst: bytes, sport: int, dport: int, seq: int,
               ack: int, flags: int, window: int, options: bytes = b"") -> bool:
        bufs = self.ctx.rx_buffers(1)
        if not bufs:
            return False
        mac, our = self.ctx.guest_mac(), self.ctx.config.our_mac
        if six:
            n = wtcp.write_eth_ipv6_tcp_headers(bufs[0], mac, our, src, dst, sport, dport,
                                                seq, ack, flags, window, 0, options)
        else:
            n = wtcp.write_eth_ipv4_tcp_headers(bufs[0], mac, our, src, dst, sport, dport,
                                                seq, ack, flags, window, 0, options)
        self.ctx.commit([n])
        return True

    def _reset_unknown(self, six: bool, src: IPAddr, dst: IPAddr, seg: wtcp.Tcp) -> None:
        """RFC 9293 §3.10.7.1: a segment for no connection gets a RST (never for a RST)."""
        if seg.flags & wtcp.ACK:
            seq, ack, flags = seg.ack, 0, wtcp.RST
        else:
            length = len(seg.payload) + bool(seg.flags & wtcp.SYN) + bool(seg.flags & wtcp.FIN)
            seq, ack, flags = 0, (seg.seq + length) & M32, wtcp.RST | wtcp.ACK
        self._log.debug(("tcp-rst", dst), "segment for no connection %s:%d -> %s:%d: RST",
                        src, seg.sport, dst, seg.dport)
        if self._frame(six, dst.packed, src.packed, seg.dport, seg.sport, seq, ack, flags, 0):
            self.resets_sent += 1

    def _isn(self, conn: TcpConn) -> int:
        """RFC 6528: a keyed hash of the 4-tuple plus a 4 us clock."""
        h = hashlib.blake2b(conn.gaddr_b + conn.faddr_b + struct.pack("!HH", conn.gport,
                            conn.fport), digest_size=4, key=self._secret).digest()
        return (int.from_bytes(h, "big") + (time.monotonic_ns() >> 12)) & M32

    def _syn_options(self, conn: TcpConn, seg: wtcp.Tcp) -> None:
        """MSS and window scale from the guest's SYN (or SYN-ACK)."""
        limit = self.ctx.max_l3 - (IPV6_HLEN if conn.six else IPV4_HLEN) - wtcp.TCP_HLEN
        mss = seg.mss if seg.mss else (DEFAULT_MSS6 if conn.six else DEFAULT_MSS4)
        conn.mss = max(64, min(mss, limit))
        if seg.wscale is not None:
            conn.ws_from_tap = seg.wscale
            conn.ws_to_tap = WS_TO_TAP
        else:
            conn.ws_from_tap = conn.ws_to_tap = 0

    def _our_mss(self, six: bool) -> int:
        return min(65535, self.ctx.max_l3 - (IPV6_HLEN if six else IPV4_HLEN) - wtcp.TCP_HLEN)

    def _send_syn(self, conn: TcpConn) -> None:
        """SYN (inbound) or SYN-ACK (outbound), and the handshake retransmission timer."""
        options = wtcp.build_tcp_options(self._our_mss(conn.six),
                                         WS_TO_TAP if conn.ws_to_tap or conn.state == SYN_SENT
                                         else None)
        if conn.state == SYN_SENT:
            flags, ack = wtcp.SYN, 0
        else:
            flags, ack = wtcp.SYN | wtcp.ACK, conn.seq_from_tap
        self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport, conn.isn,
                    ack, flags, SYN_WINDOW, options)
        conn.seq_to_tap = conn.seq_max = (conn.isn + 1) & M32
        self._arm_rto(conn)

    def _send_fin(self, conn: TcpConn) -> None:
        ack, wnd = conn.ack_wnd()
        if not self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport,
                           conn.seq_to_tap, ack, wtcp.FIN | wtcp.ACK, wnd):
            self._waiting[conn] = None
            self._arm_rto(conn)
            return
        conn.acked_to_tap(ack, wnd)
        conn.fin_seq = conn.seq_to_tap
        conn.seq_to_tap = (conn.seq_to_tap + 1) & M32
        if seq_lt(conn.seq_max, conn.seq_to_tap):
            conn.seq_max = conn.seq_to_tap
        self._update_events(conn)
        if not conn.rto_armed:
            self._arm_rto(conn)

    # --- the socket's epoll mask ----------------------------------------------------------

    def _set_events(self, conn: TcpConn, events: int) -> None:
        if conn.closed or events == conn.events:
            return
        if conn.events:
            self.loop.modify_fd(conn.fd, events)
        else:
            # the loop's last resort (loop.py): a callback that raises resets its connection
            self.loop.add_fd(conn.fd, events, conn.on_sock_event, on_error=conn.on_sock_error)
        conn.events = events

    def _update_events(self, conn: TcpConn) -> None:
        if conn.state != ESTABLISHED:
            return
        if conn.fin_seq is not None:
            ev = EPOLLRDHUP | EPOLLET  # nothing more to read: errors and hang-ups only
        elif conn.stalled:
            # The guest's window or its RX ring is full: only the guest frees them (its ACK,
            # its RX kick, or the RTO's probe calls _from_sock), so new data need not wake
            # us: with a busy sender every segment it queued did, for nothing.
            ev = EPOLLRDHUP | EPOLLET
        elif conn.drained:
            ev = EPOLLIN | EPOLLRDHUP | EPOLLET
        else:
            ev = EPOLLIN | EPOLLRDHUP
        if conn.want_out:
            ev |= EPOLLOUT | EPOLLET
        self._set_events(conn, ev)

    # --- the end of a connection ------------------------------------------------------------

    def _guest_reset(self, conn: TcpConn) -> None:
        """The guest reset the connection: reset the host side too (SO_LINGER 0), where
        passt closes gracefully."""
        log.debug("%r: reset by the guest", conn)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
        conn.remove()

    def _reset(self, conn: TcpConn) -> None:
        """Give up on a connection: RST to the guest and to the host side."""
        if conn.closed:
            return
        if conn.state in (SYN_ACK_SENT, ESTABLISHED):
            seq = conn.seq_to_tap
            self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport, seq,
                        conn.seq_from_tap, wtcp.RST | wtcp.ACK, 0)
        elif conn.state == CONNECTING:
            self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport, 0,
                        conn.seq_from_tap, wtcp.RST | wtcp.ACK, 0)
        elif conn.state == SYN_SENT:
            self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport,
                        conn.seq_to_tap, 0, wtcp.RST, 0)
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
        except OSError:
            pass
        conn.remove()
