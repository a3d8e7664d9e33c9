"""TCP data from the host socket to the guest: how much, and when; and the events of each
connection's host socket (readable, writable again, hung up, in error; a connect() done).

_from_sock() runs when the socket has data (EPOLLIN), when the guest's ACK opens its window,
when the link has buffers again (rx_ready()), and on the persist and retransmission timers.
It works out how many bytes the guest's window takes (`room`), how many frames of how many
bytes (the guest's MSS, or up to 64 KiB where the link's peer segments: LinkCaps.tso4/6), and
how many frames the socket's queue can fill (SIOCINQ, skipped after a peek that filled all it
was given); then the output path chosen for the link does the read (a peek: the bytes stay
queued until the guest acknowledges them), the headers and the commit, and says what it did
(out_buf.Peeked), which this module turns into the connection's state: what was sent, a FIN
at the end of the stream, a stall when the window or the ring is full.

The output path is chosen once per LinkCaps (a link declares new ones when a peer attaches
or negotiates other features): out_vu.GuestFillOutput where the link's C fills the guest's
buffers itself, out_buf.BufOutput for any other link.
"""

from __future__ import annotations

import os
import socket
import time

from vhostpasst.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP
from vhostpasst.link.base import TSO_MAX_L3, LinkCaps
from vhostpasst.proto.tcp.conn import (
    CONNECTING,
    ESTABLISHED,
    M32,
    SEG_BATCH,
    TcpConn,
    seq_le,
    seq_lt,
    unread,
)
from vhostpasst.proto.tcp.control import log
from vhostpasst.proto.tcp.dataplane import FILL_ARM_ACK, FILL_ARM_RTO, FILL_EVENTS
from vhostpasst.proto.tcp.from_guest import FromGuest
from vhostpasst.proto.tcp.out_buf import BufOutput
from vhostpasst.proto.tcp.out_vu import GuestFillOutput
from vhostpasst.wire import tcp as wtcp
from vhostpasst.wire.ip import IPV4_HLEN, IPV6_HLEN


class ToGuest(FromGuest):
    """Host socket data to the guest (see the module docstring)."""

    _caps: LinkCaps | None = None  # what the output path was chosen for
    _out: BufOutput

    def _select_output(self, caps: LinkCaps) -> BufOutput:
        """The output path for a link with these capabilities, chosen again when they
        change (a new peer, other features)."""
        self._caps = caps
        self._out = GuestFillOutput(self, caps) if caps.guest_fill else BufOutput(self, caps)
        return self._out

    def rx_ready(self) -> None:
        """The link has buffers again (Link.add_rx_ready_callback): resume the connections
        that stopped for lack of them, rather than waiting for their RTO timers."""
        waiting, self._waiting = self._waiting, {}
        for conn in waiting:
            if conn.closed:
                continue
            try:
                self._from_sock(conn)  # at the end of the stream this sends the FIN
            except Exception:
                log.exception("error resuming %r", conn)
                self._reset(conn)

    def _from_sock(self, conn: TcpConn) -> None:
        """Peek what the guest's window allows into link buffers, headers in place."""
        if conn.state != ESTABLISHED or conn.closed:
            return
        if conn.r.in_table and self._from_sock_c(conn):
            return
        conn.discard_acked()
        if conn.fin_seq is not None:
            return
        in_flight = (conn.seq_to_tap - conn.seq_ack_from_tap) & M32
        room = conn.wnd_from_tap - in_flight
        if room <= 0:
            self._stall(conn, True)
            if not conn.rto_armed:
                self._arm_rto(conn)  # persist: probe a zero window
            return
        link = self.ctx.link
        connected = link is not None and link.connected
        caps = link.caps if link is not None else None
        # a guest that segments (TSO) takes frames of up to 64 KiB: far fewer of them
        tso = conn.tso_params() if connected and caps is not None and \
            (caps.tso6 if conn.six else caps.tso4) else None
        seg = conn.mss  # payload per frame
        if tso is not None:  # as many whole segments as fit 64 KiB: no runt at the end
            l3 = (IPV6_HLEN if conn.six else IPV4_HLEN) + wtcp.TCP_HLEN
            seg = max(seg, (TSO_MAX_L3 - l3) // seg * seg)
        count = min(SEG_BATCH, -(-room // seg))
        # After a peek that filled all it was given (a bulk transfer) there is more, or the
        # next peek finds nothing and says so: the socket's queue length tells nothing then.
        queued = None if conn.peek_full else unread(conn.fd)
        fresh = None  # bytes not peeked yet, if the socket says
        if queued is not None:
            # no more buffers than there are bytes to peek: a 1-byte answer takes one
            # buffer, not the window's worth (the unpeeked bytes follow what is in flight)
            fresh = queued - in_flight
            if fresh <= 0 and conn.drained and not conn.peer_closed:
                # Everything queued is peeked, the last peek came up short and the peer has
                # not closed: the socket is edge-triggered, so new data (or the end) raises
                # an event. (The guest's ACK of each short answer used to pop a buffer and
                # peek for nothing.)
                return
            count = min(count, max(1, -(-fresh // seg)))
        if not connected or link is None or caps is None:
            self._no_room(conn)
            return
        off = (wtcp.TCP6_PAYLOAD_OFFSET if conn.six else wtcp.TCP4_PAYLOAD_OFFSET)
        # per frame the buffers it spans: vhost-user's mergeable RX buffers are 1.5-4 KiB,
        # so the peek lands in guest memory instead of a bounce buffer (one copy)
        size = seg
        if count == 1 and fresh is not None and 0 < fresh < seg:
            # A short answer: the guest buffers its bytes need, not a whole segment's
            # (with TSO 64 KiB, some 17-44 mergeable buffers popped and given back per
            # 1-byte answer). One byte more, so a peek that fills them means more came.
            # Not when SIOCINQ saw nothing new: data landing between it and the peek
            # would go out one byte first (a whole segment's room costs nothing then).
            size = fresh + 1
        out = self._out if caps is self._caps else self._select_output(caps)
        try:
            peeked = out.send(conn, link, count, seg, size, off, room, tso)
        except OSError as e:
            self._peek_failed(conn, e)
            return
        if peeked is None:
            self._no_room(conn)
            return
        read, caps_room, seq, ack, wnd = peeked
        if not read:
            self._peeked_eof(conn)
            return
        self._peeked(conn, read, caps_room, room)
        if seq is not None:
            self._data_sent(conn, seq, ack, wnd)
        elif not conn.rto_armed:  # the link's buffers broke their promises: resend later
            self._arm_rto(conn)

    def _from_sock_c(self, conn: TcpConn) -> bool:
        """_from_sock() by the data plane's C (out_vu.GuestFillOutput.send_c()), and what it
        left: the socket's epoll mask, the ACK and retransmission timers, or the fill's
        outcome. False: nothing done, Python's path."""
        link = self.ctx.link
        if link is None:
            return False
        caps = link.caps
        if not caps.guest_fill:
            return False
        out = self._out if caps is self._caps else self._select_output(caps)
        try:
            filled = out.send_c(conn, link)
        except OSError as e:
            self._peek_failed(conn, e)
            return True
        if filled is None:
            return False
        follow, got, room = filled
        if follow:
            if follow & FILL_EVENTS:
                self._update_events(conn)
            if follow & FILL_ARM_ACK:
                self._arm_ack(conn)
            if follow & FILL_ARM_RTO:
                self._arm_rto(conn)
        if got is not None:
            n, _sent, caps_room = got  # the C took the rest when frames went
            if n == 0:
                if caps_room == 0:
                    self._no_room(conn)
                else:
                    self._peeked_eof(conn)
                return True
            conn.last_seen = time.monotonic()
            self._peeked(conn, n, caps_room, room)
            if not conn.rto_armed:  # read, not sent: resend later
                self._arm_rto(conn)
        return True

    def _stall(self, conn: TcpConn, stalled: bool, drained: bool = False) -> None:
        """The connection waits for the guest (its window or its RX ring is full), or not;
        everything queued is peeked (`drained`), or not: the socket's events follow."""
        if conn.stalled != stalled or conn.drained != drained:
            conn.stalled = stalled
            conn.drained = drained
            self._update_events(conn)

    def _no_room(self, conn: TcpConn) -> None:
        """No guest, or its RX ring is full: rx_ready() resumes, the RTO if it never comes."""
        self._stall(conn, True)
        self._waiting[conn] = None
        if not conn.rto_armed:
            self._arm_rto(conn)

    def _peeked_eof(self, conn: TcpConn) -> None:
        """The peek found the end of the stream, everything before it peeked: FIN."""
        conn.sock_eof = True
        conn.peek_full = False
        self._stall(conn, False, drained=True)
        self._send_fin(conn)

    def _peeked(self, conn: TcpConn, n: int, caps: int, room: int) -> None:
        """n bytes peeked into frames with `caps` bytes of room, `room` what the guest's
        window allowed: frames not filled mean nothing more to peek until new data arrives
        (an edge); a full window waits for the guest's ACK."""
        conn.peek_full = n >= caps
        self._stall(conn, n >= room, drained=not conn.peek_full)

    def _data_sent(self, conn: TcpConn, seq: int, ack: int, wnd: int) -> None:
        """Data frames up to `seq` went to the guest, carrying `ack` and `wnd`."""
        conn.acked_to_tap(ack, wnd)
        if conn.rtt_seq is None and seq_le(conn.seq_max, conn.seq_to_tap):
            conn.rtt_seq, conn.rtt_time = seq, time.monotonic()  # Karn: new data only
        conn.seq_to_tap = seq
        if seq_lt(conn.seq_max, seq):
            conn.seq_max = seq
        if not conn.rto_armed:
            self._arm_rto(conn)

    def _peek_failed(self, conn: TcpConn, e: OSError) -> None:
        """The peek's recvmsg() failed: nothing there after all (an edge raced us), or the
        socket is broken."""
        if isinstance(e, (BlockingIOError, InterruptedError)):
            conn.peek_full = False
            self._stall(conn, False, drained=True)
            return
        self._log.debug(("tcp-recv", e.errno), "%r: recv: %s", conn, e)
        self._reset(conn)

    # --- host socket events ---------------------------------------------------------------

    def _on_sock(self, conn: TcpConn, mask: int) -> None:
        try:
            self._sock_event(conn, mask)
        except Exception:
            log.exception("error on the host socket of %r", conn)
            self._reset(conn)

    def _sock_event(self, conn: TcpConn, mask: int) -> None:
        if conn.closed:
            return
        if conn.state == CONNECTING:
            if mask & (EPOLLOUT | EPOLLERR | EPOLLHUP):
                self._connected(conn)
            return
        if mask & EPOLLERR:
            err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._log.debug(("tcp-err", err), "%r: socket error %s", conn,
                            os.strerror(err) if err else "?")
            self._reset(conn)
            return
        if conn.state != ESTABLISHED:
            return
        if mask & EPOLLOUT and conn.want_out:
            conn.want_out = False
            self._update_events(conn)
            self._send_ack(conn, force=True)  # a window update: the guest resends
        if mask & (EPOLLRDHUP | EPOLLHUP):
            conn.peer_closed = True  # an edge that will not come again
        if mask & (EPOLLIN | EPOLLRDHUP | EPOLLHUP):
            self._from_sock(conn)
        if mask & EPOLLHUP and not conn.closed:
            conn.close_if_done()
