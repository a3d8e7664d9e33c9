"""TCP timers: retransmission (with the handshake's and the zero-window probe's), ACK, and
the one connection timer (handshake, FIN, inactivity).

All are loop timers (loop.call_at), at most three per connection:

* Retransmission (RFC 6298): RTO from the RTT estimate (_rtt_sample), RTO_MIN..rto_max,
  doubling per expiry. Every new ACK restarts it, and request/response traffic stops and
  starts it per answer, so rather than cancelling a loop timer and making a new one each
  time the deadline moves and the timer re-arms itself when it fires early (_rto_expired).
  On expiry (_on_rto): the handshake's SYN or SYN-ACK goes again; outstanding data is
  rewound and peeked again; with nothing outstanding but a zero window (or no link buffers)
  a probe with an old sequence number makes the guest tell its window. After max_retrans
  expiries without an answer the connection is reset.
* ACK (ACK_INTERVAL, ACK_POLL_FAST when much of what we showed is still unacknowledged by
  the far end): asks the socket again for the ACK number and window and sends them if they
  changed (_ack_timer).
* Connection (_arm_idle): whichever of the handshake timeout, the FIN timeout or the
  inactivity timeout was armed last; inactivity re-arms itself for the time left.
* Keepalive round (_arm_keepalive, one for all connections, while any is established): a
  keepalive probe to each connection with no traffic either way for a whole interval.
"""

from __future__ import annotations

import time

from vhostpasst.config.env import env_number
from vhostpasst.core.loop import TimerHandle
from vhostpasst.proto.context import Context
from vhostpasst.proto.tcp.conn import (
    ACK_INTERVAL,
    ACK_POLL_FAST,
    CONNECTING,
    ENV_KEEPALIVE,
    ESTABLISHED,
    FIN_TIMEOUT,
    KEEPALIVE_INTERVAL,
    M32,
    PERSIST_MAX,
    RTO_MIN,
    SYN_ACK_SENT,
    SYN_SENT,
    TcpConn,
)
from vhostpasst.proto.tcp.control import TcpControl, log
from vhostpasst.wire import tcp as wtcp


class TcpTimers(TcpControl):
    """The timers of every connection (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.keepalive_interval = env_number(ENV_KEEPALIVE, KEEPALIVE_INTERVAL)
        self._keepalive_timer: TimerHandle | None = None

    def _rtt_sample(self, conn: TcpConn, r: float) -> None:
        """RFC 6298 §2."""
        if conn.srtt is None:
            conn.srtt, conn.rttvar = r, r / 2
        else:
            conn.rttvar = 0.75 * conn.rttvar + 0.25 * abs(conn.srtt - r)
            conn.srtt = 0.875 * conn.srtt + 0.125 * r
        conn.rto = min(self.rto_max, max(RTO_MIN, conn.srtt + max(0.001, 4 * conn.rttvar)))

    def _arm_rto(self, conn: TcpConn, restart: bool = False) -> None:
        if conn.closed:
            return
        if conn.rto_armed and not restart:
            return
        when = time.monotonic() + conn.rto
        if conn.rto_timer is not None:
            if when >= conn.rto_when:
                # Every new ACK restarts the timer, and request/response traffic stops and
                # starts it per answer: rather than a cancel and a new loop timer each time,
                # move the deadline; the timer re-arms itself when it fires
                conn.rto_deadline = when
                conn.rto_armed = True
                return
            conn.rto_timer.cancel()
        conn.rto_armed = True
        conn.rto_when = conn.rto_deadline = when
        conn.rto_timer = self.loop.call_at(when, lambda: self._rto_expired(conn))

    def _cancel_rto(self, conn: TcpConn) -> None:
        """Stop the retransmission timer. The loop timer stays (parked) until it fires, as
        a no-op, unless _arm_rto() takes it up again first."""
        conn.rto_armed = False

    def _rto_expired(self, conn: TcpConn) -> None:
        conn.rto_timer = None
        if conn.closed or not conn.rto_armed:
            return
        if conn.rto_deadline > conn.rto_when:  # restarted since armed: not due yet
            conn.rto_when = conn.rto_deadline
            conn.rto_timer = self.loop.call_at(conn.rto_when, lambda: self._rto_expired(conn))
            return
        conn.rto_armed = False
        try:
            self._on_rto(conn)
        except Exception:
            log.exception("retransmission timer of %r", conn)
            self._reset(conn)

    def _on_rto(self, conn: TcpConn) -> None:
        outstanding = conn.seq_max != conn.seq_ack_from_tap
        if conn.state == CONNECTING:
            return
        conn.retrans += 1
        if conn.retrans > self.max_retrans:
            log.debug("%r: no answer from the guest after %d retransmissions", conn,
                      conn.retrans - 1)
            self._reset(conn)
            return
        conn.rto = min(self.rto_max, conn.rto * 2)  # RFC 6298 §5.5
        if conn.state in (SYN_SENT, SYN_ACK_SENT):
            self._send_syn(conn)
            return
        if outstanding:
            self._rewind(conn)
        elif conn.wnd_from_tap == 0 or conn.stalled:
            # zero window (persist) or no link buffers: probe with an old sequence
            # number, which makes the guest answer with its current window
            self._probe(conn)
            # a guest that answers probes is alive (retrans is reset then): keep probing
            # often, its window may reopen without it telling us (small buffer, large MSS)
            conn.rto = min(conn.rto, PERSIST_MAX)
            self._from_sock(conn)
        else:
            conn.retrans = 0
            return
        if not conn.rto_armed:
            self._arm_rto(conn)

    def _probe(self, conn: TcpConn) -> None:
        """An ACK with an old sequence number (a window or keepalive probe): the guest
        answers with its ACK point and window, or a RST if it has no such connection."""
        ack, wnd = conn.ack_wnd()
        self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport,
                    (conn.seq_ack_from_tap - 1) & M32, ack, wtcp.ACK, wnd)

    def _arm_keepalive(self) -> None:
        if self._keepalive_timer is None:
            self._keepalive_timer = self.loop.call_at(
                time.monotonic() + self.keepalive_interval, self._keepalive_round)

    def _keepalive_round(self) -> None:
        """A keepalive probe to each established connection with no traffic for a whole
        interval; the round goes on while any connection is established."""
        self._keepalive_timer = None
        now = time.monotonic()
        established = False
        for conn in list(self.ctx.flows):
            if not isinstance(conn, TcpConn) or conn.closed or conn.state != ESTABLISHED:
                continue
            established = True
            if now - conn.last_seen >= self.keepalive_interval:
                try:
                    self._probe(conn)
                except Exception:  # a timer callback must not stop the loop
                    log.exception("keepalive to %r", conn)
                    self._reset(conn)
        if established:
            self._arm_keepalive()

    def _arm_idle(self, conn: TcpConn, timeout: float | None) -> None:
        """The one connection timer (handshake, FIN, inactivity); None: no timer."""
        if conn.idle_timer is not None:
            conn.idle_timer.cancel()
            conn.idle_timer = None
        if timeout is None:
            return
        conn.idle_timer = self.loop.call_at(time.monotonic() + timeout,
                                            lambda: self._idle(conn, timeout))

    def _idle(self, conn: TcpConn, timeout: float) -> None:
        """Handshake timeout, FIN timeout, inactivity: whichever was armed last."""
        conn.idle_timer = None
        if conn.closed:
            return
        quiet = time.monotonic() - conn.last_seen
        if conn.state == ESTABLISHED and quiet < timeout and timeout != FIN_TIMEOUT:
            self._arm_idle(conn, timeout - quiet + 0.001)
            return
        log.debug("%r: timed out (%.0f s)", conn, timeout)
        self._reset(conn)

    def _arm_ack(self, conn: TcpConn) -> None:
        if conn.ack_timer is None and not conn.closed:
            delay = ACK_POLL_FAST if conn.poll_fast else ACK_INTERVAL
            conn.ack_timer = self.loop.call_at(time.monotonic() + delay,
                                               lambda: self._ack_timer(conn))

    def _ack_timer(self, conn: TcpConn) -> None:
        conn.ack_timer = None
        try:
            self._send_ack(conn)
            conn.close_if_done()
        except Exception:
            log.exception("ACK timer of %r", conn)
            self._reset(conn)
