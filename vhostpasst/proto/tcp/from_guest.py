"""TCP segments from the guest: connections it opens, the handshake, its ACKs and data.

The dispatcher hands each guest segment to segment() (addresses as ints, no parsing beyond
the TCP header); segments are queued per connection until end_batch(), so one batch of guest
frames costs each connection one sendmsg() and at most one ACK.

Rules, per batch (_tap_segments): a RST is taken only with the exact next sequence number,
anything else gets a challenge ACK (RFC 5961); a SYN on a synchronized connection gets a
challenge ACK; an ACK moves what the guest acknowledged (_guest_ack: those bytes are dropped
from the socket before the next peek, the RTT is sampled, three duplicates rewind the peek);
in-order payload is gathered and written at once (_write: what the socket does not take is not
acknowledged, and EPOLLOUT later brings a window update) and acknowledged with the window the
socket leaves (_send_ack: a pure ACK, unless a data frame to the guest carried it);
out-of-order data is dropped with duplicate ACKs so the guest's fast retransmit fills the
hole; a FIN is passed on as shutdown(SHUT_WR) once the data before it went.

Connections the guest opens: a SYN for no connection becomes a non-blocking connect() to the
address NAT maps the destination to (_connect); when it completes the guest gets our SYN-ACK
(_connected) and its ACK establishes the connection (_handshake). A segment for no connection
gets a RST.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from ipaddress import IPv4Address, IPv6Address

from vhostpasst._tcpseg import ffi as _seg_ffi
from vhostpasst._tcpseg import lib as _seg_lib
from vhostpasst.core import nat
from vhostpasst.core.loop import EPOLLET, EPOLLOUT, EPOLLRDHUP
from vhostpasst.proto.context import Context
from vhostpasst.proto.tcp.conn import (
    _INFO,
    _SEND_FLAGS,
    CONNECTING,
    DUP_ACKS_MAX,
    ESTABLISHED,
    FIN_TIMEOUT,
    HANDSHAKE_TIMEOUT,
    M32,
    MAX_WINDOW,
    RTO_INIT,
    SO_PEEK_OFF,
    SYN_ACK_SENT,
    SYN_SENT,
    IPAddr,
    TcpConn,
    established,
    seq_le,
    seq_lt,
    tap_key,
    tcp_info,
    tune,
)
from vhostpasst.proto.tcp.control import log
from vhostpasst.proto.tcp.dataplane import (
    FOLLOW_ARM_RTO,
    FOLLOW_KICK,
    FOLLOW_RESET,
    FOLLOW_WANT_OUT,
)
from vhostpasst.proto.tcp.timers import TcpTimers
from vhostpasst.wire import tcp as wtcp
from vhostpasst.wire.ip import Ipv4, Ipv6


class FromGuest(TcpTimers):
    """Guest segments (see the module docstring)."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self._batch: dict[TcpConn, list[wtcp.Tcp]] = {}
        # a pure ACK is written here by _tcpseg and copied by the link's send()
        self._ack_buf = bytearray(wtcp.TCP6_PAYLOAD_OFFSET)
        self._ack_ptr = [_seg_ffi.from_buffer(self._ack_buf)]
        self._ack_len = _seg_ffi.new("uint32_t[1]")
        self._our_mac = ctx.config.our_mac  # its source (TcpConn.template())

    def tap4(self, packet: Ipv4) -> None:
        self.segment(False, int(packet.src), int(packet.dst), wtcp.parse_tcp(packet.payload))

    def tap6(self, packet: Ipv6) -> None:
        self.segment(True, int(packet.src), int(packet.dst), wtcp.parse_tcp(packet.l4))

    def segment(self, six: bool, src: int, dst: int, seg: wtcp.Tcp) -> None:
        """A guest segment, addresses as ints (the dispatcher's fast path makes no
        ipaddress objects): queued for its connection until end_batch()."""
        conn = self.ctx.flows.lookup(("tcp", six, src, seg.sport, dst, seg.dport))
        if isinstance(conn, TcpConn):
            batch = self._batch.get(conn)
            if batch is None:
                self._batch[conn] = [seg]
            else:
                batch.append(seg)
            return
        if six:
            self._no_conn(six, IPv6Address(src), IPv6Address(dst), seg)
        else:
            self._no_conn(six, IPv4Address(src), IPv4Address(dst), seg)

    def _no_conn(self, six: bool, src: IPAddr, dst: IPAddr, seg: wtcp.Tcp) -> None:
        flags = seg.flags
        if flags & wtcp.RST:
            return
        if flags & wtcp.SYN and not flags & wtcp.ACK:
            if not flags & wtcp.FIN:
                self._connect(six, src, dst, seg)
            return
        self._reset_unknown(six, src, dst, seg)

    def end_batch(self) -> None:
        """The dispatcher handed every frame of this read: act per connection (one sendmsg
        and at most one ACK each). Frames are still valid here."""
        batch, self._batch = self._batch, {}
        for conn, segs in batch.items():
            if conn.closed:
                continue
            try:
                self._tap_segments(conn, segs)
            except Exception:  # a bug must not stop the loop, nor spare the others
                log.exception("error handling guest segments for %r", conn)
                self._reset(conn)

    # --- guest-initiated connections ---------------------------------------------------------

    def _connect(self, six: bool, src: IPAddr, dst: IPAddr, seg: wtcp.Tcp) -> None:
        ctx = self.ctx
        if seg.sport == 0 or seg.dport == 0 or src.is_multicast or dst.is_multicast \
                or src.is_unspecified or dst.is_unspecified \
                or dst == IPv4Address("255.255.255.255"):
            return
        if self.half_open >= self.half_open_max:
            self._log.warning("tcp-half-open", "%d connections in the handshake: SYN dropped",
                              self.half_open)
            return
        if ctx.flows.full():
            self._log.warning("tcp-full", "flow table full: SYN dropped")
            return
        target = nat.from_tap(ctx.config, True, dst, seg.dport)
        if target is None:
            self._log.debug(("tcp-nat", dst), "TCP to %s dropped", dst)
            return
        conf = ctx.config.ip6 if six else ctx.config.ip4
        family = socket.AF_INET6 if six else socket.AF_INET
        try:
            sock = self.socket_factory(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                       | socket.SOCK_CLOEXEC)
        except OSError as e:
            self._log.warning(("tcp-socket", e.errno), "TCP socket: %s", e)
            return
        conn = TcpConn(self, sock, six, src, seg.sport, dst, seg.dport, CONNECTING)
        conn.local = target.is_loopback
        conn.isn_tap = seg.seq
        conn.seq_from_tap = conn.seq_ack_to_tap = (seg.seq + 1) & M32
        self._syn_options(conn, seg)
        conn.wnd_from_tap = seg.window  # never scaled in a SYN
        if not ctx.flows.add(conn, tap_key(six, src, seg.sport, dst, seg.dport)):
            sock.close()
            return
        self.half_open += 1
        try:
            conn.sndbuf_fixed = tune(sock)
            if conf is not None and conf.outbound_if:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                                conf.outbound_if.encode())
            if conf is not None and conf.outbound is not None:
                sock.bind((str(conf.outbound), 0))
            if six:
                scope = conf.ifindex if conf is not None and target.is_link_local else 0
                rc = sock.connect_ex((str(target), seg.dport, 0, scope))
            else:
                rc = sock.connect_ex((str(target), seg.dport))
        except OSError as e:
            rc = e.errno or errno.EINVAL
        if rc not in (0, errno.EINPROGRESS):
            self._log.debug(("tcp-connect", rc), "connect to %s:%d: %s", target, seg.dport,
                            os.strerror(rc))
            self._reset(conn)
            return
        if rc == errno.EINPROGRESS and conn.local and established(tcp_info(conn.sock)):
            # loopback: the handshake completed inside connect(), which still says
            # EINPROGRESS; the SYN-ACK goes now rather than after one more loop iteration
            rc = 0
        self._set_events(conn, EPOLLOUT | EPOLLRDHUP)
        if rc == 0:
            self._connected(conn)

    def _connected(self, conn: TcpConn) -> None:
        """connect() finished: SYN-ACK to the guest."""
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._log.debug(("tcp-connect", err), "%r: connect: %s", conn, os.strerror(err))
            self._reset(conn)
            return
        info = tcp_info(conn.sock)
        conn.ack_base = (conn.seq_from_tap - (_INFO.unpack_from(info, 120)[0] if info else 0)) \
            & M32
        conn.state = SYN_ACK_SENT
        conn.isn = self._isn(conn)
        conn.seq_to_tap = conn.seq_max = conn.seq_ack_from_tap = conn.isn
        self._set_events(conn, EPOLLRDHUP | EPOLLET)
        self._send_syn(conn)
        self._arm_idle(conn, HANDSHAKE_TIMEOUT)

    def _handshake(self, conn: TcpConn, segs: list[wtcp.Tcp]) -> list[wtcp.Tcp]:
        """Segments before ESTABLISHED; returns the rest, to be handled as data."""
        for i, seg in enumerate(segs):
            flags = seg.flags
            if flags & wtcp.RST:
                if conn.state == SYN_SENT:
                    ok = flags & wtcp.ACK and seg.ack == conn.seq_to_tap
                else:
                    ok = seg.seq == conn.seq_from_tap
                if ok:
                    self._guest_reset(conn)
                    return []
                continue
            if conn.state == CONNECTING:
                continue  # a resent SYN: we answer when connect() finishes
            if conn.state == SYN_ACK_SENT:
                if flags & wtcp.SYN:
                    if not flags & wtcp.ACK and seg.seq == conn.isn_tap:
                        self._send_syn(conn)  # our SYN-ACK was lost (passt resets here)
                    continue
                if not flags & wtcp.ACK:
                    continue
                if seg.ack != conn.seq_to_tap:
                    self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport,
                                seg.ack, 0, wtcp.RST, 0)
                    continue
                conn.wnd_from_tap = min(seg.window << conn.ws_from_tap, MAX_WINDOW)
                conn.seq_ack_from_tap = seg.ack
                self._establish(conn)
                if not conn.closed:
                    self._from_sock(conn)
                return segs[i:]  # the ACK may carry data (and a FIN)
            if conn.state == SYN_SENT:
                if not flags & wtcp.SYN or not flags & wtcp.ACK:
                    continue
                if seg.ack != conn.seq_to_tap:
                    self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport,
                                seg.ack, 0, wtcp.RST, 0)
                    continue
                self._syn_options(conn, seg)
                conn.isn_tap = seg.seq
                conn.seq_from_tap = conn.seq_ack_to_tap = (seg.seq + 1) & M32
                info = tcp_info(conn.sock)
                conn.ack_base = (conn.seq_from_tap - (_INFO.unpack_from(info, 120)[0]
                                                      if info else 0)) & M32
                conn.wnd_from_tap = seg.window  # unscaled in a SYN
                conn.seq_ack_from_tap = seg.ack
                self._establish(conn)
                if conn.closed:
                    return []
                self._send_ack(conn, force=True)
                self._from_sock(conn)  # data the client sent already
                return segs[i + 1:]
        return []

    def _establish(self, conn: TcpConn) -> None:
        conn.state = ESTABLISHED
        self.half_open -= 1
        self._cancel_rto(conn)
        conn.retrans = 0
        conn.rto = RTO_INIT if conn.srtt is None else conn.rto
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError as e:
            log.warning("SO_PEEK_OFF unsupported (%s): TCP cannot work", e)
            self._reset(conn)
            return
        self._update_events(conn)
        self._arm_idle(conn, self.idle_timeout)
        self._arm_keepalive()
        if self.dataplane is not None:
            self.dataplane.hand(conn)  # its pure ACKs from now on taken in C

    def _rst_acceptable(self, conn: TcpConn, seg: wtcp.Tcp) -> bool:
        """RFC 5961 §3.2: a RST is taken only if its seq is exactly the next expected one;
        anything else gets a challenge ACK, which a guest that really reset answers with an
        exact RST."""
        return seg.seq == conn.seq_from_tap

    # --- guest segments on a connection -----------------------------------------------------

    def _tap_segments(self, conn: TcpConn, segs: list[wtcp.Tcp]) -> None:
        conn.last_seen = time.monotonic()
        if conn.state != ESTABLISHED:
            segs = self._handshake(conn, segs)
            if not segs or conn.closed or conn.state != ESTABLISHED:
                return
        pending: list[memoryview] = []  # in-order payload, written at once
        expected = conn.seq_from_tap
        ooo: list[wtcp.Tcp] = []
        fin = False
        # the guest's window opened: read the socket once at the end (also when the data
        # plane's C took this batch's earlier ACKs: what it left is done here, as one batch)
        kick = self._dataplane_followups(conn) if conn.r.followups else False
        if conn.closed:
            return
        answer = False  # something calls for an ACK now (keepalive, old data, hole)
        for seg in segs:
            flags = seg.flags
            if flags & wtcp.RST:
                if self._rst_acceptable(conn, seg):
                    self._guest_reset(conn)
                    return
                answer = True  # RFC 5961 challenge ACK
                continue
            if flags & wtcp.SYN:
                answer = True  # a SYN in a synchronized state: challenge ACK
                continue
            if flags & wtcp.ACK:
                kick |= self._guest_ack(conn, seg)
                if conn.closed:
                    return
            if fin:
                continue  # nothing after the FIN
            length = len(seg.payload)
            if not length and not flags & wtcp.FIN:
                if seq_lt(seg.seq, expected):
                    answer = True  # keep-alive probe
                    self._mirror_keepalive(conn)
                continue
            got = self._accept_data(conn, seg, expected, pending, ooo)
            if got is None:
                answer = True
                if length == 1:  # a keep-alive probe with one byte of old data
                    self._mirror_keepalive(conn)
                continue
            expected, fin = got
        while ooo and not fin:  # a later segment of this batch may have filled the hole
            progress = False
            for seg in list(ooo):
                if seq_le(seg.seq, expected):
                    ooo.remove(seg)
                    got = self._accept_data(conn, seg, expected, pending, [])
                    if got is not None:
                        expected, fin = got
                        progress = True
            if not progress:
                break
        dups = 0
        if ooo and not fin:
            # a hole remains: the data is dropped, and each such segment gets a duplicate
            # ACK at once (RFC 5681 §4.2), so the guest's fast retransmit fills the hole
            # instead of its retransmission timer
            dups = min(len(ooo), DUP_ACKS_MAX)
        conn.discard_acked()
        if pending:
            if not self._write(conn, pending):
                fin = False  # the FIN comes after data the socket did not take
        if fin:
            self._guest_fin(conn)
        if conn.closed:
            return
        if kick:
            self._from_sock(conn)  # data segments carry the ACK too
        if conn.closed:
            return
        if answer or fin or conn.seq_from_tap != conn.seq_ack_to_tap:
            self._send_ack(conn, force=answer or fin)
        for _ in range(dups):
            self._send_ack(conn, force=True)
        conn.close_if_done()

    def _mirror_keepalive(self, conn: TcpConn) -> None:
        """The guest probes the connection: the host socket probes the far end too."""
        if conn.so_keepalive:
            return
        conn.so_keepalive = True
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        except OSError as e:
            self._log.debug(("tcp-keepalive", e.errno), "%r: SO_KEEPALIVE: %s", conn, e)

    def _dataplane_followups(self, conn: TcpConn) -> bool:
        """The data plane's C took segments of this connection earlier in the batch (and
        wrote their data), then left it a frame: its followups are this batch's
        (dataplane.py). True: read the socket."""
        r = conn.r
        follow, r.followups = r.followups, 0
        self._dataplane_write_result(conn, follow)
        return bool(follow & FOLLOW_KICK)

    def _dataplane_write_result(self, conn: TcpConn, follow: int) -> bool:
        """A new retransmission timer, and what the socket made of the guest's data the C
        wrote (as _write() would have: reset on an error, a window update after EPOLLOUT
        when it took only part). True if the connection was reset."""
        if follow & FOLLOW_ARM_RTO:
            self._arm_rto(conn, restart=True)
        if follow & FOLLOW_RESET:
            self._log.debug(("tcp-send", conn.r.write_errno), "%r: send: %s", conn,
                            os.strerror(conn.r.write_errno))
            self._reset(conn)
            return True
        if follow & FOLLOW_WANT_OUT:
            conn.want_out = True
            self._update_events(conn)
        return False

    def _accept_data(self, conn: TcpConn, seg: wtcp.Tcp, expected: int,
                     pending: list[memoryview], ooo: list[wtcp.Tcp]) -> tuple[int, bool] | None:
        """Trim `seg` to what is new; queue it if in order. Returns (next expected, FIN
        seen), or None for a segment entirely old; future segments go to `ooo`."""
        payload = seg.payload
        length = len(payload)
        if seq_lt(expected, seg.seq):
            ooo.append(seg)
            return expected, False
        skip = (expected - seg.seq) & M32
        has_fin = bool(seg.flags & wtcp.FIN)
        if skip > length or (skip == length and not has_fin):
            return None  # old (a retransmission we have)
        if skip < length:
            pending.append(payload[skip:])
        end = (seg.seq + length) & M32
        return end, has_fin

    def _write(self, conn: TcpConn, pending: list[memoryview]) -> bool:
        """One sendmsg for the batch. True if everything went."""
        total = sum(map(len, pending))
        sent = 0
        try:
            while pending:
                n = conn.sock.sendmsg(pending[:1024], (), _SEND_FLAGS)
                sent += n
                chunk = sum(map(len, pending[:1024]))
                if n < chunk:
                    break
                pending = pending[1024:]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError as e:
            self._log.debug(("tcp-send", e.errno), "%r: send: %s", conn, e)
            self._reset(conn)
            return False
        conn.seq_from_tap = (conn.seq_from_tap + sent) & M32
        if sent < total:
            # not acknowledged, so the guest resends; a window update follows EPOLLOUT
            conn.want_out = True
            self._update_events(conn)
            return False
        return True

    def _guest_fin(self, conn: TcpConn) -> None:
        if conn.tap_fin_rcvd:
            return
        conn.tap_fin_rcvd = True
        conn.seq_from_tap = (conn.seq_from_tap + 1) & M32
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError as e:
            self._log.debug(("tcp-shut", e.errno), "%r: shutdown: %s", conn, e)
        self._arm_idle(conn, FIN_TIMEOUT if conn.tap_fin_acked else self.idle_timeout)

    def _guest_ack(self, conn: TcpConn, seg: wtcp.Tcp) -> bool:
        """Returns True if the guest's window has room we may now fill."""
        ack = seg.ack
        wnd = min(seg.window << conn.ws_from_tap, MAX_WINDOW)
        if seq_lt(conn.seq_max, ack):
            return False  # acknowledges what we never sent
        if seq_lt(conn.seq_ack_from_tap, ack):
            data_end = conn.fin_seq if conn.fin_seq is not None and seq_lt(conn.fin_seq, ack) \
                else ack
            acked = (data_end - conn.seq_ack_from_tap) & M32
            conn.discard_due += acked  # one recv(MSG_TRUNC) per batch: discard_acked()
            if conn.fin_seq is not None and seq_lt(conn.fin_seq, ack):
                conn.tap_fin_acked = True
                if conn.tap_fin_rcvd:
                    self._arm_idle(conn, FIN_TIMEOUT)
            conn.seq_ack_from_tap = ack
            if seq_lt(conn.seq_to_tap, ack):
                conn.seq_to_tap = ack  # after a rewind the guest had more than we resent
            if conn.rtt_seq is not None and seq_le(conn.rtt_seq, ack):
                self._rtt_sample(conn, time.monotonic() - conn.rtt_time)
                conn.rtt_seq = None
            conn.retrans = 0
            conn.dup_acks = 0
            conn.wnd_from_tap = wnd
            if conn.seq_to_tap == ack:
                self._cancel_rto(conn)
            else:
                self._arm_rto(conn, restart=True)
            return True
        if ack != conn.seq_ack_from_tap:
            return False  # old
        window_changed = wnd != conn.wnd_from_tap
        conn.wnd_from_tap = wnd
        if conn.seq_max == ack:
            conn.retrans = 0  # nothing outstanding: an answer to a window probe
            return window_changed
        if seg.payload or seg.flags & (wtcp.FIN | wtcp.SYN) or window_changed:
            return window_changed
        # a duplicate ACK: three of them mean a lost segment (RFC 5681 §3.2)
        if seq_lt(ack, conn.recover):
            return False  # still resending after the last fast retransmit
        conn.dup_acks += 1
        if conn.dup_acks >= 3:
            conn.dup_acks = 0
            conn.recover = conn.seq_max
            self._rewind(conn)
        return False

    # --- ACKs and window updates to the guest ------------------------------------------------

    def _send_ack(self, conn: TcpConn, force: bool = False) -> None:
        if conn.closed or conn.state != ESTABLISHED:
            return
        ack, wnd = conn.ack_wnd()
        if not force and ack == conn.seq_ack_to_tap and wnd << conn.ws_to_tap == \
                conn.wnd_to_tap:
            if ack != conn.seq_from_tap or wnd == 0 or conn.wnd_short:
                self._arm_ack(conn)
            return
        if self._pure_ack(conn, ack, wnd):
            conn.acked_to_tap(ack, wnd)

    def _pure_ack(self, conn: TcpConn, ack: int, wnd: int) -> bool:
        """An ACK without data to the guest: the connection's template and C checksums
        (_tcpseg) in a scratch frame the link's send() copies, where _frame() takes a link
        buffer (a vhost-user guest's 4 KiB ones are bounced: it wants 17 of them free)."""
        link = self.ctx.link
        if link is None:
            return self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport,
                               conn.seq_to_tap, ack, wtcp.ACK, wnd)
        mac = self.ctx.guest_mac()
        tmpl = conn.template(mac, self._our_mac)
        _seg_lib.vp_tcp_frames(self._ack_ptr, [0], 1, tmpl, conn.six, conn.pseudo,
                               conn.seq_to_tap, ack, wnd, wtcp.ACK, wtcp.ACK, self._ack_len)
        return link.send(memoryview(self._ack_buf)[:self._ack_len[0]])

    def _rewind(self, conn: TcpConn) -> None:
        """Resend from the guest's ACK point: the peek offset goes back to the unacked
        start of the receive queue."""
        conn.discard_acked()
        conn.seq_to_tap = conn.seq_ack_from_tap
        conn.rtt_seq = None
        if conn.fin_seq is not None and not conn.tap_fin_acked:
            conn.fin_seq = None
        try:
            conn.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, 0)
        except OSError as e:
            self._log.debug(("tcp-peekoff", e.errno), "%r: SO_PEEK_OFF: %s", conn, e)
        conn.stalled = conn.drained = False  # the peek starts over
        self._update_events(conn)
        if conn.fin_seq is None and conn.sock_eof and \
                (conn.seq_max - conn.seq_ack_from_tap) & M32 == 1:
            self._send_fin(conn)  # only the FIN was outstanding
        else:
            self._from_sock(conn)
