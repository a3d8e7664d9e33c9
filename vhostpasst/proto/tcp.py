"""TCP: guest connections translated to host sockets, with no TCP stack of our own (ref. §4.4).

Each connection is one host socket. The host kernel does reliability and congestion control
towards the far end; towards the guest we only keep sequence numbers, never data:

* host -> guest: bytes are peeked (MSG_PEEK with SO_PEEK_OFF) from the socket straight into
  link buffers, after room for the headers, which are then written in place. What the guest
  acknowledges is discarded from the socket with recv(MSG_TRUNC); a timeout or three
  duplicate ACKs rewind the peek offset to the ACK point and the same bytes are peeked again.
  The retransmission timeout comes from an RTT estimate (RFC 6298) and backs off.
* guest -> host: in-order payloads of one batch go out in one sendmsg(); out-of-order data is
  dropped with a duplicate ACK (the guest retransmits). What we acknowledge, and the window we
  show, come from the socket (TCP_INFO bytes_acked and snd_wnd, SO_SNDBUF), so the guest's
  congestion control sees the real path; on slow paths data is acknowledged to the guest only
  once the far end has acknowledged it to the host kernel.

Better than passt: a segment for no connection is answered with a RST (RFC 9293 §3.10.7.1);
a guest RST resets the host socket (SO_LINGER 0) instead of closing it gracefully; the
retransmission timeout is estimated and backs off; half-open connections are capped so a SYN
flood cannot fill the flow table.

All timers are loop timers (loop.call_at), at most three per connection.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import TYPE_CHECKING, Any

from vhostpasst.config import fwd
from vhostpasst.core import nat
from vhostpasst.core.flow import Context, Flow
from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import (
    EPOLLERR,
    EPOLLET,
    EPOLLHUP,
    EPOLLIN,
    EPOLLOUT,
    EPOLLRDHUP,
    TimerHandle,
)
from vhostpasst.link.base import TSO_MAX_L3, Tso
from vhostpasst.proto import bind
from vhostpasst.wire import checksum
from vhostpasst.wire import tcp as wtcp
from vhostpasst.wire.ip import IPV4_HLEN, IPV6_HLEN, Ipv4, Ipv6

if TYPE_CHECKING:
    from vhostpasst.link.base import Link

try:  # headers and checksums of a whole batch of frames in one C call (cffi_build/tcpseg.c)
    from vhostpasst._tcpseg import ffi as _seg_ffi
    from vhostpasst._tcpseg import lib as _seg_lib
except ImportError:  # not built: the per-segment writers of wire/tcp.py do the same
    _seg_ffi = _seg_lib = None
try:  # the same for frames spread over several guest buffers (cffi_build/tcpsg.c)
    from vhostpasst._tcpsg import ffi as _sg_ffi
    from vhostpasst._tcpsg import lib as _sg_lib
except ImportError:  # not built: whole-frame buffers only (vhost-user then bounces)
    _sg_ffi = _sg_lib = None

log = logging.getLogger(__name__)

IPAddr = IPv4Address | IPv6Address

SO_PEEK_OFF = 42  # asm-generic/socket.h (x86, arm64)
TCP_INFO_LEN = 232  # up to tcpi_snd_wnd
_INFO = struct.Struct("=Q")  # tcpi_bytes_acked at 120
_U32 = struct.Struct("=I")  # tcpi_min_rtt at 148, tcpi_snd_wnd at 228

M32 = 0xFFFFFFFF
TCP_ESTABLISHED = 1  # tcpi_state
WS_TO_TAP = 8  # our window scale (passt: min(8, tcpi_snd_wscale))
MAX_WINDOW = 65535 << WS_TO_TAP
SYN_WINDOW = 65535  # window in our SYN / SYN-ACK (never scaled)
DEFAULT_MSS4 = 536  # RFC 9293 §3.7.1, when the guest sends no MSS option
DEFAULT_MSS6 = 1220
DUP_ACKS_MAX = 3  # duplicate ACKs per batch for out-of-order data
SEG_BATCH = 64  # frames peeked per socket wake-up: one busy socket can't starve the rest
ACK_INTERVAL = 0.01  # coalesced ACKs, and polling the far end's ACKs (ref: 10 ms)
HANDSHAKE_TIMEOUT = 10.0
FIN_TIMEOUT = 60.0
# No inactivity reset by default: passt means to reset after 7200 s, yet in practice only
# re-arms its timer (reference 4.4), so idle SSH sessions and connection pools live on;
# VHOSTPASST_TCP_IDLE_TIMEOUT sets one.
IDLE_TIMEOUT: float | None = None
RTO_INIT = 1.0  # RFC 6298 §2.1
RTO_MIN = 0.2  # Linux's floor; the guest link is local, a 1 s floor makes losses expensive
RTO_MAX = 60.0
MAX_RETRANS = 8
PERSIST_MAX = 1.0  # longest interval between zero-window probes
HALF_OPEN_MAX = 1024  # connections in the handshake at once (SYN flood cap)
LOW_RTT = 0.001  # far ends closer than this: acknowledge data once written (no ACK polling)
SNDBUF_SMALL = 128 * 1024
SNDBUF_WANT = 1 << 30  # capped by net.core.wmem_max
DATA_ACK_TTL = 0.001  # host->guest data reuses its ACK number and window this long
ACK_POLL_FAST = 0.001  # the window we showed was cut by bytes the far end has yet to ACK
LISTEN_BACKLOG = 128
ACCEPT_BATCH = 16

# Test hooks: shorter timeouts so end-to-end tests can watch them happen
ENV_MAX_RETRANS = "VHOSTPASST_TCP_MAX_RETRANS"
ENV_RTO_MAX = "VHOSTPASST_TCP_RTO_MAX"
ENV_IDLE = "VHOSTPASST_TCP_IDLE_TIMEOUT"
ENV_HALF_OPEN = "VHOSTPASST_TCP_HALF_OPEN_MAX"

# states
CONNECTING = 0  # guest SYN seen, host connect() in progress
SYN_ACK_SENT = 1  # host connected, SYN-ACK sent to the guest, waiting for its ACK
SYN_SENT = 2  # host client accepted (-t), SYN sent to the guest
ESTABLISHED = 3

_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_LINGER0 = struct.pack("ii", 1, 0)

# recv(MSG_TRUNC) on TCP drops the bytes without copying them: this never gets written,
# so its pages are never touched (Python's recv_into wants a buffer of the asked size)
_DISCARD_LEN = 1 << 24
_DISCARD_BUF = mmap.mmap(-1, _DISCARD_LEN)
_TRUNC_FLAGS = socket.MSG_TRUNC | socket.MSG_DONTWAIT
_INQ = bytearray(4)  # SIOCINQ result (fcntl.ioctl: ~3x cheaper than a ctypes call)


def unread(fd: int) -> int | None:
    """Bytes in a TCP socket's receive queue (SIOCINQ: peeked ones included), or None if
    it cannot tell."""
    try:
        fcntl.ioctl(fd, termios.FIONREAD, _INQ)
    except OSError:
        return None
    return int.from_bytes(_INQ, sys.byteorder)


def discard(sock: socket.socket, count: int) -> int:
    """Drop `count` bytes from a TCP socket's receive queue without copying them
    (MSG_TRUNC); returns how many went. (A socket method: ~3 us less than through ctypes.)"""
    done = 0
    while done < count:
        try:
            n = sock.recv_into(_DISCARD_BUF, min(count - done, _DISCARD_LEN), _TRUNC_FLAGS)
        except OSError:
            break
        if n <= 0:
            break
        done += n
    return done


def _scatter_iov(frames: list[list[memoryview]], off: int,
                 room: int) -> tuple[list[memoryview], list[int]]:
    """The payload iovecs of frames spread over several buffers (headers in the first `off`
    bytes of each frame's first buffer) and each frame's payload room, no more in all than
    the guest's window (`room`); frames past the window get no iovec."""
    iov: list[memoryview] = []
    caps: list[int] = []
    for frame in frames:
        if room <= 0:
            break
        views = [frame[0][off:], *frame[1:]]
        cap = sum(map(len, views))
        if cap > room:  # the window cuts this one short: trim its views
            cap, need = room, room
            for i, v in enumerate(views):
                if len(v) >= need:
                    views = [*views[:i], v[:need]]
                    break
                need -= len(v)
        iov += views
        caps.append(cap)
        room -= cap
    return iov, caps


def seq_lt(a: int, b: int) -> bool:
    return 0 < ((b - a) & M32) < 0x80000000


def seq_le(a: int, b: int) -> bool:
    return a == b or seq_lt(a, b)


def _env_number(name: str, default: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


class TcpConn(Flow):
    """One translated connection. Guest side: the guest at (gaddr, gport) talks to the far
    end it sees at (faddr, fport); host side: `sock`."""

    timeout = None  # our own timers decide

    def __init__(self, handler: TcpHandler, sock: socket.socket, six: bool, gaddr: IPAddr,
                 gport: int, faddr: IPAddr, fport: int, state: int) -> None:
        super().__init__()
        self.h = handler
        self.sock = sock
        self.fd = sock.fileno()
        self.six = six
        self.gaddr, self.gport, self.faddr, self.fport = gaddr, gport, faddr, fport
        self.gaddr_b, self.faddr_b = gaddr.packed, faddr.packed
        self.state = state
        self.events = 0  # the epoll mask registered (0: not registered)
        self.local = False  # the far end is on this host: no point waiting for its ACKs
        # SO_SNDBUF was set (_tune): the kernel no longer autotunes it, read it once
        self.sndbuf_fixed = False
        self.sndbuf: int | None = None
        # guest -> host
        self.isn_tap = 0  # the guest's ISN
        self.seq_from_tap = 0  # next byte expected from the guest
        self.seq_ack_to_tap = 0  # the last ACK we sent
        self.ack_base = 0  # seq_from_tap - tcpi_bytes_acked, fixed at establishment
        self.wnd_to_tap = 0  # the last window we advertised (bytes)
        self.ws_to_tap = 0
        self.tap_fin_rcvd = False  # and shutdown(SHUT_WR) done
        self.want_out = False  # the socket was full: EPOLLOUT then a window update
        self.ack_due = False
        self.poll_fast = False  # the far end holds much of what we acknowledged: poll soon
        # (seq_from_tap, ACK number, window, when) of the last _ack_wnd() for data frames:
        # see _data_ack_wnd()
        self.data_ack: tuple[int, int, int, float] | None = None
        # host -> guest
        self.isn = 0
        self.seq_to_tap = 0  # next byte we send
        self.seq_max = 0  # highest seq sent (after rewinds, seq_to_tap can be below)
        self.seq_ack_from_tap = 0
        self.wnd_from_tap = 0  # bytes
        self.ws_from_tap = 0
        self.mss = DEFAULT_MSS6 if six else DEFAULT_MSS4
        self.sock_eof = False  # the host socket reached end of stream
        self.fin_seq: int | None = None  # seq of the FIN we sent to the guest
        self.tap_fin_acked = False
        self.stalled = False  # guest window full: no point reading the socket
        # everything in the socket is peeked (it stays queued until the guest ACKs it):
        # edge-triggered, or level-triggered EPOLLIN wakes every iteration until that ACK
        self.drained = False
        self.peek_full = False  # the last peek filled every frame it was given
        self.peer_closed = False  # EPOLLRDHUP/HUP seen: the end of the stream may be queued
        self.dup_acks = 0
        self.recover = 0  # after a fast retransmit, no other until the ACK passes this
        self.retrans = 0
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.rto = RTO_INIT
        self.rtt_seq: int | None = None  # timing this segment end (Karn: not a resend)
        self.rtt_time = 0.0
        self.discard_due = 0  # bytes the guest acknowledged, dropped from the socket in one go
        self.tmpl: bytes | None = None  # frame headers for data to the guest (see _template)
        self.tmpl_mac = b""
        self.pseudo = 0
        self.tso: Tso | None = None  # for a link that segments (see _tso)
        self.rto_timer: TimerHandle | None = None  # may outlive a cancel: see _cancel_rto
        self.rto_armed = False  # the retransmission timer runs
        self.rto_when = 0.0  # when rto_timer fires
        self.rto_deadline = 0.0  # when the RTO is really due (later after a restart)
        self.ack_timer: TimerHandle | None = None
        self.idle_timer: TimerHandle | None = None
        self.last_seen = time.monotonic()

    def __repr__(self) -> str:
        return f"<tcp {self.gaddr}:{self.gport} <-> {self.faddr}:{self.fport} s{self.state}>"

    def close(self) -> None:
        for t in (self.rto_timer, self.ack_timer, self.idle_timer):
            if t is not None:
                t.cancel()
        self.rto_timer = self.ack_timer = self.idle_timer = None
        if self.events:
            self.h.loop.remove_fd(self.fd)
            self.events = 0
        if self.state != ESTABLISHED:
            self.h.half_open -= 1
            self.state = ESTABLISHED  # counted once
        self.sock.close()


def _tap_key(six: bool, gaddr: IPAddr, gport: int, faddr: IPAddr, fport: int) -> tuple:
    # addresses as ints: hashing and comparing ipaddress objects is Python code, and this
    # key is built and looked up for every guest segment
    return ("tcp", six, int(gaddr), gport, int(faddr), fport)


class Listener:
    """One `-t` listening socket: host port -> guest port."""

    def __init__(self, sock: socket.socket, six: bool, port: int, guest_port: int) -> None:
        self.sock = sock
        self.six = six
        self.port = port
        self.guest_port = guest_port


class TcpHandler:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.loop = ctx.loop
        # tests substitute fake sockets here, so fuzzing never touches a real network
        self.socket_factory: Callable[..., socket.socket] = socket.socket
        self.max_retrans = int(_env_number(ENV_MAX_RETRANS, MAX_RETRANS))
        self.rto_max = _env_number(ENV_RTO_MAX, RTO_MAX)
        idle = _env_number(ENV_IDLE, 0.0)
        self.idle_timeout = idle if idle > 0 else IDLE_TIMEOUT
        self.half_open_max = int(_env_number(ENV_HALF_OPEN, HALF_OPEN_MAX))
        self.half_open = 0
        self.listeners: list[Listener] = []
        # pasta: takes a just-accepted connection for the loopback splice path (True: taken),
        # so loopback-sourced connections never go through the tap (tcp_splice.py)
        self.claim: Callable[[Listener, socket.socket, tuple], bool] | None = None
        self._secret = os.urandom(16)
        self._batch: dict[TcpConn, list[wtcp.Tcp]] = {}
        # connections that stopped for lack of link buffers, resumed by rx_ready()
        self._waiting: dict[TcpConn, None] = {}
        self._log = RateLimitedLog(log)
        self.resets_sent = 0  # RSTs for segments of no connection (tests read it)
        # a pure ACK is written here by _tcpseg and copied by the link's send()
        self._ack_buf = bytearray(wtcp.TCP6_PAYLOAD_OFFSET)
        if _seg_ffi is not None:
            self._ack_ptr = [_seg_ffi.from_buffer(self._ack_buf)]
            self._ack_len = _seg_ffi.new("uint32_t[1]")
        # Link.rx_fill()'s frame writer (cffi_build/tcpsg.c) and its argument, as addresses:
        # the link's C calls it between the read and the commit. `_fill_for` is whose
        # template and addresses the argument holds.
        self._fill: Any = None
        self._fill_for: tuple[TcpConn, bytes] | None = None
        if _sg_ffi is not None:
            self._fill = _sg_ffi.new("struct vp_tcp_fill *")
            self._fill.flags, self._fill.last_flags = wtcp.ACK, wtcp.ACK | wtcp.PSH
            self._fill_arg = int(_sg_ffi.cast("uintptr_t", self._fill))
            self._fill_writer = int(_sg_ffi.cast(
                "uintptr_t", _sg_ffi.addressof(_sg_lib, "vp_tcp_fill_writer")))

    def close(self) -> None:
        for lst in self.listeners:
            self.loop.remove_fd(lst.sock.fileno())
            lst.sock.close()
        self.listeners.clear()

    # --- guest frames ----------------------------------------------------------------------

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

    # --- guest-initiated connections ---------------------------------------------------------

    def _isn(self, conn: TcpConn) -> int:
        """RFC 6528: a keyed hash of the 4-tuple plus a 4 us clock."""
        h = hashlib.blake2b(conn.gaddr_b + conn.faddr_b + struct.pack("!HH", conn.gport,
                            conn.fport), digest_size=4, key=self._secret).digest()
        return (int.from_bytes(h, "big") + (time.monotonic_ns() >> 12)) & M32

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
        if not ctx.flows.add(conn, _tap_key(six, src, seg.sport, dst, seg.dport)):
            sock.close()
            return
        self.half_open += 1
        try:
            conn.sndbuf_fixed = _tune(sock)
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
        if rc == errno.EINPROGRESS and conn.local and _established(self._info(conn)):
            # loopback: the handshake completed inside connect(), which still says
            # EINPROGRESS; the SYN-ACK goes now rather than after one more loop iteration
            rc = 0
        self._set_events(conn, EPOLLOUT | EPOLLRDHUP)
        if rc == 0:
            self._connected(conn)

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

    def _connected(self, conn: TcpConn) -> None:
        """connect() finished: SYN-ACK to the guest."""
        err = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._log.debug(("tcp-connect", err), "%r: connect: %s", conn, os.strerror(err))
            self._reset(conn)
            return
        info = self._info(conn)
        conn.ack_base = (conn.seq_from_tap - (_INFO.unpack_from(info, 120)[0] if info else 0)) \
            & M32
        conn.state = SYN_ACK_SENT
        conn.isn = self._isn(conn)
        conn.seq_to_tap = conn.seq_max = conn.seq_ack_from_tap = conn.isn
        self._set_events(conn, EPOLLRDHUP | EPOLLET)
        self._send_syn(conn)
        self._arm_idle(conn, HANDSHAKE_TIMEOUT)

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

    # --- host-initiated connections (-t) --------------------------------------------------

    def listen(self, forwards: fwd.PortForwards | None) -> None:
        """Bind every `-t` mapping. Raises OSError for a port that an explicit spec asked
        for; ports of "all" and exclusion-only specs may fail (but not all of them)."""
        config = self.ctx.config
        for m, six, sock in bind.bind_all(forwards, config.ip4 is not None,
                                         config.ip6 is not None, "TCP", self._listen_one):
            self._add_listener(Listener(sock, six, m.host_port, m.guest_port))

    def _add_listener(self, lst: Listener) -> None:
        self.listeners.append(lst)
        self.loop.add_fd(lst.sock.fileno(), EPOLLIN, lambda _mask: self._on_listener(lst))

    def add_listener(self, six: bool, port: int, guest_port: int) -> Listener:
        """One more listening port on any address (pasta's automatic ports); OSError if
        it cannot be bound."""
        lst = Listener(self._listen_one(six, None, None, port), six, port, guest_port)
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
        family = socket.AF_INET6 if six else socket.AF_INET
        sock = self.socket_factory(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                                   | socket.SOCK_CLOEXEC)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if six:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if self.ctx.config.freebind:
                bind.set_freebind(sock, six)
            if ifname:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
            sock.bind((str(addr) if addr is not None else "", port))
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
                if self.claim is not None and self.claim(lst, sock, peer):
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
        sides = nat.from_host(ctx.config, ctx.guest, src)
        if sides is None or self.half_open >= self.half_open_max or ctx.flows.full():
            self._log.debug(("tcp-in-drop", src), "connection from %s: no guest side", src)
            _reset_close(sock)
            return
        shown, gdst = sides
        six = isinstance(gdst, IPv6Address)
        sock.setblocking(False)
        conn = TcpConn(self, sock, six, gdst, lst.guest_port, shown, sport, SYN_SENT)
        conn.local = src.is_loopback
        if not ctx.flows.add(conn, _tap_key(six, gdst, lst.guest_port, shown, sport)):
            _reset_close(sock)
            return
        self.half_open += 1
        conn.sndbuf_fixed = _tune(sock)
        conn.isn = self._isn(conn)
        conn.seq_ack_from_tap = conn.isn
        conn.ws_to_tap = WS_TO_TAP
        self._set_events(conn, EPOLLRDHUP | EPOLLET)
        self._send_syn(conn)
        self._arm_idle(conn, HANDSHAKE_TIMEOUT)

    # --- host socket events ---------------------------------------------------------------

    def _set_events(self, conn: TcpConn, events: int) -> None:
        if conn.closed or events == conn.events:
            return
        if conn.events:
            self.loop.modify_fd(conn.fd, events)
        else:
            # the loop's last resort (loop.py): a callback that raises resets its connection
            self.loop.add_fd(conn.fd, events, functools.partial(self._on_sock, conn),
                             on_error=lambda _e: self._reset(conn))
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
            self._maybe_close(conn)

    # --- host -> guest data -------------------------------------------------------------------

    def _from_sock(self, conn: TcpConn) -> None:
        """Peek what the guest's window allows into link buffers, headers in place."""
        if conn.state != ESTABLISHED or conn.closed:
            return
        self._discard(conn)
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
        scatter = getattr(link, "rx_scatter", None)  # a Link has it; test doubles may not
        sg = _sg_lib is not None and scatter is not None and link.connected  # type: ignore
        # a guest that segments (TSO) takes frames of up to 64 KiB: far fewer of them
        tso = self._tso(conn) if sg and (link.tso6 if conn.six else link.tso4) else None
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
        off = (wtcp.TCP6_PAYLOAD_OFFSET if conn.six else wtcp.TCP4_PAYLOAD_OFFSET)
        frames: list[list[memoryview]] = []
        acked = None  # (ACK, window) _fill_frames() found before it fell back
        if sg:
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
            # the link reads the socket and commits in one call where it can (vhost-user
            # with GUEST_CSUM, no pcap); else its buffers, read and committed from here
            acked = self._fill_frames(conn, link, count, off + size, off, room, tso)
            if acked is None:
                return
            frames = scatter(count, off + size, off)  # type: ignore[misc]
            bufs = [frame[0] for frame in frames]
        else:
            bufs = self.ctx.rx_buffers(count)
        if not bufs:
            self._no_room(conn)
            return
        # frames over several buffers, or in one that holds less than a segment (a guest
        # without mergeable buffers): per-frame room, and headers by _tcpsg
        full = off + seg
        # GSO frames need _tcpsg's partial checksum, whatever their buffers
        scattered = tso is not None or \
            any(len(frame) > 1 or len(frame[0]) < full for frame in frames)
        if scattered:
            iov, caps = _scatter_iov(frames, off, room)
        else:
            iov = [buf[off:full] for buf in bufs]
            caps = [seg] * len(bufs)
            last = room - (len(bufs) - 1) * seg  # the window may cut the last one short
            if last < seg:
                iov[-1] = bufs[-1][off:off + last]
                caps[-1] = last
        try:
            n = conn.sock.recvmsg_into(iov, 0, _PEEK_FLAGS)[0]
        except OSError as e:
            self._peek_failed(conn, e)
            return
        if n == 0:
            self._peeked_eof(conn)
            return
        conn.last_seen = now = time.monotonic()
        self._peeked(conn, n, sum(caps), room)
        ack, wnd = acked if acked is not None else self._data_ack_wnd(conn, now)
        mac = self.ctx.guest_mac()
        sizes = []  # segments filled: all full but the last
        left = n
        for cap in caps:
            sizes.append(min(cap, left))
            left -= cap
            if left <= 0:
                break
        count = len(sizes)
        seq = conn.seq_to_tap
        if scattered:
            assert link is not None
            written = self._scattered_headers(conn, link, frames[:count], sizes, mac, ack, wnd,
                                              tso)
            if written is None:  # the link's buffers broke its promises: resend on the RTO
                link.commit_scatter([])
                if not conn.rto_armed:
                    self._arm_rto(conn)
                return
            seq, lengths = written
        elif _seg_lib is not None:
            tmpl = self._template(conn, mac)
            fb = _seg_ffi.from_buffer
            ptrs = _seg_ffi.new("uint8_t *[]", [fb(b, require_writable=True)
                                                for b in bufs[:count]])
            out = _seg_ffi.new("uint32_t[]", count)
            seq = _seg_lib.vp_tcp_frames(ptrs, sizes, count, tmpl, conn.six, conn.pseudo,
                                         seq, ack, wnd, wtcp.ACK, wtcp.ACK | wtcp.PSH, out)
            lengths = _seg_ffi.unpack(out, count)
        else:
            our = self.ctx.config.our_mac
            write = wtcp.write_eth_ipv6_tcp_headers if conn.six else \
                wtcp.write_eth_ipv4_tcp_headers
            lengths = []
            for i, size in enumerate(sizes):
                flags = wtcp.ACK | (wtcp.PSH if i == count - 1 else 0)
                lengths.append(write(bufs[i], mac, our, conn.faddr_b, conn.gaddr_b, conn.fport,
                                     conn.gport, seq, ack, flags, wnd, size))
                seq = (seq + size) & M32
        if frames:
            assert link is not None
            link.commit_scatter(lengths, tso)
        else:
            self.ctx.commit(lengths)
        self._data_sent(conn, seq, ack, wnd)

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
        self._acked_to_tap(conn, ack, wnd)
        if conn.rtt_seq is None and seq_le(conn.seq_max, conn.seq_to_tap):
            conn.rtt_seq, conn.rtt_time = seq, time.monotonic()  # Karn: new data only
        conn.seq_to_tap = seq
        if seq_lt(conn.seq_max, seq):
            conn.seq_max = seq
        if not conn.rto_armed:
            self._arm_rto(conn)

    def _fill_frames(self, conn: TcpConn, link: Link, count: int, frame_len: int, off: int,
                     room: int, tso: Tso | None) -> tuple[int, int] | None:
        """_from_sock()'s peek, headers and commit in one call where the link has it
        (Link.rx_fill(): vhost-user with GUEST_CSUM): the link's C reads the socket into
        the guest's buffers and calls vp_tcp_fill_writer for the headers. The ACK and
        window go in before the read. None when done; the (ACK, window) it found, for the
        other path, when the link has no such path now."""
        now = time.monotonic()
        ack, wnd = self._data_ack_wnd(conn, now)
        mac = self.ctx.guest_mac()
        fill = self._fill
        tmpl = self._template(conn, mac)
        if self._fill_for != (conn, tmpl):
            fill.tmpl = tmpl
            fill.six = conn.six
            fill.pseudo = conn.pseudo
            self._fill_for = (conn, tmpl)
        fill.seq = conn.seq_to_tap
        fill.ack = ack
        fill.wnd = wnd
        fill.tso_mss = tso.mss if tso is not None else 0
        try:
            got = link.rx_fill(conn.fd, count, frame_len, off, room, _PEEK_FLAGS,
                               self._fill_writer, self._fill_arg, tso)
        except OSError as e:
            self._peek_failed(conn, e)
            return None
        if got is None:
            return ack, wnd
        n, sent, caps = got
        if n == 0 and caps == 0:
            self._no_room(conn)
            return None
        if n == 0:
            self._peeked_eof(conn)
            return None
        conn.last_seen = now
        self._peeked(conn, n, caps, room)
        if not sent:  # the link's buffers broke their promises: resend on the RTO
            if not conn.rto_armed:
                self._arm_rto(conn)
            return None
        self._data_sent(conn, fill.seq, ack, wnd)
        return None

    def _peek_failed(self, conn: TcpConn, e: OSError) -> None:
        """The peek's recvmsg() failed: nothing there after all (an edge raced us), or the
        socket is broken."""
        if isinstance(e, (BlockingIOError, InterruptedError)):
            conn.peek_full = False
            self._stall(conn, False, drained=True)
            return
        self._log.debug(("tcp-recv", e.errno), "%r: recv: %s", conn, e)
        self._reset(conn)

    def _scattered_headers(self, conn: TcpConn, link: Link, frames: list[list[memoryview]],
                           sizes: list[int], mac: bytes, ack: int, wnd: int,
                           tso: Tso | None = None) -> tuple[int, list[int]] | None:
        """Headers (and the TCP checksum, unless the guest takes DATA_VALID) for frames whose
        payload spans several buffers, in one C call; the next seq and the frame lengths, or
        None if the buffers can't hold what they should (the C side checks every access).
        With `tso`, frames of more than one segment get the partial (pseudo-header) sum."""
        assert _sg_ffi is not None and _sg_lib is not None
        tmpl = self._template(conn, mac)
        # GUEST_CSUM: the guest checks nothing, so the payload need not be read again (summed
        # anyway with --pcap, which should show frames as a guest without offload sees them)
        csum = not (getattr(link, "csum_offload", False) and link.pcap is None)
        if csum:
            pieces = [v for frame in frames for v in frame]
            first = [0]
            for frame in frames:
                first.append(first[-1] + len(frame))
        else:  # only the first buffers are touched
            pieces = [frame[0] for frame in frames]
            first = list(range(len(frames) + 1))
        count = len(frames)
        fb = _sg_ffi.from_buffer
        out = _sg_ffi.new("uint32_t[]", count)
        seq = _sg_lib.vp_tcp_frames_sg_tso(
            [fb(v, require_writable=True) for v in pieces], [len(v) for v in pieces],
            len(pieces), first, sizes, count, tmpl, conn.six, conn.pseudo, conn.seq_to_tap,
            ack, wnd, wtcp.ACK, wtcp.ACK | wtcp.PSH, csum, tso.mss if tso else 0, out)
        if seq < 0:
            self._log.warning("tcp-sg", "%r: frame buffers too short for headers", conn)
            return None
        return seq, _sg_ffi.unpack(out, count)

    @staticmethod
    def _tso(conn: TcpConn) -> Tso:
        """How the link sends this connection's frames as GSO frames (segments of conn.mss,
        the MSS the guest announced, capped by the MTU)."""
        tso = conn.tso
        if tso is None or tso.mss != conn.mss:
            off = wtcp.TCP6_PAYLOAD_OFFSET if conn.six else wtcp.TCP4_PAYLOAD_OFFSET
            tso = conn.tso = Tso(conn.six, off - wtcp.TCP_HLEN, off, conn.mss)
        return tso

    def _template(self, conn: TcpConn, mac: bytes) -> bytes:
        """Ethernet, IP and TCP headers for data segments of `conn` with the per-segment
        fields (lengths, seq, ack, flags, window, checksums) zero, and the pseudo-header
        sum, for _tcpseg: built with the same writers as every other frame, once per guest
        MAC (kept in conn.tmpl)."""
        if conn.tmpl is not None and conn.tmpl_mac == mac:
            return conn.tmpl
        six = conn.six
        scratch = memoryview(bytearray(wtcp.TCP6_PAYLOAD_OFFSET))
        write = wtcp.write_eth_ipv6_tcp_headers if six else wtcp.write_eth_ipv4_tcp_headers
        write(scratch, mac, self.ctx.config.our_mac, conn.faddr_b, conn.gaddr_b, conn.fport,
              conn.gport, 0, 0, 0, 0, 0)
        l3 = wtcp.TCP6_PAYLOAD_OFFSET - wtcp.TCP_HLEN if six else \
            wtcp.TCP4_PAYLOAD_OFFSET - wtcp.TCP_HLEN
        tmpl = bytearray(scratch[:l3 + wtcp.TCP_HLEN])
        if not six:
            tmpl[14 + 10:14 + 12] = b"\0\0"  # IPv4 header checksum: computed per frame
        tmpl[l3 + 16:l3 + 18] = b"\0\0"
        conn.tmpl, conn.tmpl_mac = bytes(tmpl), mac
        conn.pseudo = checksum.partial(conn.faddr_b + conn.gaddr_b) + socket.IPPROTO_TCP
        return conn.tmpl

    def _stall(self, conn: TcpConn, stalled: bool, drained: bool = False) -> None:
        if conn.stalled != stalled or conn.drained != drained:
            conn.stalled = stalled
            conn.drained = drained
            self._update_events(conn)

    def _send_fin(self, conn: TcpConn) -> None:
        ack, wnd = self._ack_wnd(conn)
        if not self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport,
                           conn.seq_to_tap, ack, wtcp.FIN | wtcp.ACK, wnd):
            self._waiting[conn] = None
            self._arm_rto(conn)
            return
        self._acked_to_tap(conn, ack, wnd)
        conn.fin_seq = conn.seq_to_tap
        conn.seq_to_tap = (conn.seq_to_tap + 1) & M32
        if seq_lt(conn.seq_max, conn.seq_to_tap):
            conn.seq_max = conn.seq_to_tap
        self._update_events(conn)
        if not conn.rto_armed:
            self._arm_rto(conn)

    # --- ACKs and windows to the guest ------------------------------------------------------

    def _info(self, conn: TcpConn) -> bytes | None:
        try:
            return conn.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
        except OSError:
            return None

    def _ack_wnd(self, conn: TcpConn) -> tuple[int, int]:
        """(ACK number, window field) for the guest, from the host socket."""
        if conn.state != ESTABLISHED:
            return conn.seq_from_tap, SYN_WINDOW
        info = self._info(conn)
        sndbuf = conn.sndbuf
        if sndbuf is None:
            try:
                sndbuf = conn.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            except OSError:
                sndbuf = SNDBUF_SMALL
            else:
                if conn.sndbuf_fixed:
                    conn.sndbuf = sndbuf
        # SO_SNDBUF counts overhead too: roughly half holds payload once it is large
        eff = sndbuf * 3 // 4 if sndbuf < (4 << 20) else sndbuf // 2
        if info is None or len(info) < TCP_INFO_LEN:
            ack = conn.seq_from_tap
            wnd = eff
        else:
            remote = (conn.ack_base + _INFO.unpack_from(info, 120)[0]) & M32
            if seq_lt(conn.seq_from_tap, remote):
                remote = conn.seq_from_tap
            if conn.tap_fin_rcvd and ((conn.seq_from_tap - remote) & M32) <= 1:
                remote = conn.seq_from_tap  # all data acked; the FIN may not be counted
            min_rtt = _U32.unpack_from(info, 148)[0] / 1e6
            immediate = conn.local or sndbuf < SNDBUF_SMALL or (0 < min_rtt < LOW_RTT)
            ack = conn.seq_from_tap if immediate else remote
            snd_wnd = _U32.unpack_from(info, 228)[0]
            unacked = (ack - remote) & M32
            wnd = min(snd_wnd, eff) - unacked
            conn.poll_fast = unacked > eff // 4
        if seq_lt(ack, conn.seq_ack_to_tap):
            ack = conn.seq_ack_to_tap  # never backwards
        wnd = max(0, min(wnd, MAX_WINDOW))
        return ack, min(wnd >> conn.ws_to_tap, 65535)

    def _data_ack_wnd(self, conn: TcpConn, now: float) -> tuple[int, int]:
        """_ack_wnd() for data frames to the guest, the last answer again for DATA_ACK_TTL
        while nothing came from the guest and no ACK went out since: a host->guest transfer
        peeks at every guest ACK, and TCP_INFO each time was a system call and its parsing
        for the same answer. ACKs and window updates (_send_ack) always ask the socket."""
        memo = conn.data_ack
        # its ACK number is still the last one sent (the data carried it, no ACK since)
        if memo is not None and memo[0] == conn.seq_from_tap and \
                memo[1] == conn.seq_ack_to_tap and now - memo[3] < DATA_ACK_TTL:
            return memo[1], memo[2]
        ack, wnd = self._ack_wnd(conn)
        conn.data_ack = (conn.seq_from_tap, ack, wnd, now)
        return ack, wnd

    def _acked_to_tap(self, conn: TcpConn, ack: int, wnd: int) -> None:
        conn.seq_ack_to_tap = ack
        conn.wnd_to_tap = wnd << conn.ws_to_tap
        conn.ack_due = False
        if ack != conn.seq_from_tap or wnd == 0:
            self._arm_ack(conn)  # poll the socket for the far end's ACK or window

    def _send_ack(self, conn: TcpConn, force: bool = False) -> None:
        if conn.closed or conn.state != ESTABLISHED:
            return
        ack, wnd = self._ack_wnd(conn)
        if not force and ack == conn.seq_ack_to_tap and wnd << conn.ws_to_tap == \
                conn.wnd_to_tap:
            if ack != conn.seq_from_tap or wnd == 0:
                self._arm_ack(conn)
            return
        if self._pure_ack(conn, ack, wnd):
            self._acked_to_tap(conn, ack, wnd)

    def _pure_ack(self, conn: TcpConn, ack: int, wnd: int) -> bool:
        """An ACK without data to the guest: the connection's template and C checksums
        (_tcpseg) in a scratch frame the link's send() copies, where _frame() takes a link
        buffer (a vhost-user guest's 4 KiB ones are bounced: it wants 17 of them free)."""
        link = self.ctx.link
        if _seg_lib is None or link is None:
            return self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport,
                               conn.seq_to_tap, ack, wtcp.ACK, wnd)
        mac = self.ctx.guest_mac()
        tmpl = self._template(conn, mac)
        _seg_lib.vp_tcp_frames(self._ack_ptr, [0], 1, tmpl, conn.six, conn.pseudo,
                               conn.seq_to_tap, ack, wnd, wtcp.ACK, wtcp.ACK, self._ack_len)
        return link.send(memoryview(self._ack_buf)[:self._ack_len[0]])

    def _arm_ack(self, conn: TcpConn) -> None:
        if conn.ack_timer is None and not conn.closed:
            delay = ACK_POLL_FAST if conn.poll_fast else ACK_INTERVAL
            conn.ack_timer = self.loop.call_at(time.monotonic() + delay,
                                               lambda: self._ack_timer(conn))

    def _ack_timer(self, conn: TcpConn) -> None:
        conn.ack_timer = None
        try:
            self._send_ack(conn)
            self._maybe_close(conn)
        except Exception:
            log.exception("ACK timer of %r", conn)
            self._reset(conn)

    # --- guest segments --------------------------------------------------------------------

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
        kick = False  # the guest's window opened: read the socket once at the end
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
                continue
            got = self._accept_data(conn, seg, expected, pending, ooo)
            if got is None:
                answer = True
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
        self._discard(conn)
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
        self._maybe_close(conn)

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
            conn.discard_due += acked  # one recv(MSG_TRUNC) per batch: _discard()
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

    @staticmethod
    def _discard(conn: TcpConn) -> None:
        """Drop what the guest acknowledged from the socket (before peeking again)."""
        if conn.discard_due:
            discard(conn.sock, conn.discard_due)
            conn.discard_due = 0

    def _rewind(self, conn: TcpConn) -> None:
        """Resend from the guest's ACK point: the peek offset goes back to the unacked
        start of the receive queue."""
        self._discard(conn)
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

    def _rst_acceptable(self, conn: TcpConn, seg: wtcp.Tcp) -> bool:
        """RFC 5961 §3.2: a RST is taken only if its seq is exactly the next expected one;
        anything else gets a challenge ACK, which a guest that really reset answers with an
        exact RST."""
        return seg.seq == conn.seq_from_tap

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
                info = self._info(conn)
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

    def _maybe_close(self, conn: TcpConn) -> None:
        """Both directions finished: the guest's FIN passed on and acknowledged by the far
        end, ours acknowledged by the guest."""
        if conn.closed or conn.state != ESTABLISHED:
            return
        if conn.tap_fin_rcvd and conn.tap_fin_acked and conn.seq_ack_to_tap == \
                conn.seq_from_tap:
            conn.remove()

    # --- timers -----------------------------------------------------------------------------

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
            ack, wnd = self._ack_wnd(conn)
            self._frame(conn.six, conn.faddr_b, conn.gaddr_b, conn.fport, conn.gport,
                        (conn.seq_ack_from_tap - 1) & M32, ack, wtcp.ACK, wnd)
            # a guest that answers probes is alive (retrans is reset then): keep probing
            # often, its window may reopen without it telling us (small buffer, large MSS)
            conn.rto = min(conn.rto, PERSIST_MAX)
            self._from_sock(conn)
        else:
            conn.retrans = 0
            return
        if not conn.rto_armed:
            self._arm_rto(conn)

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


def _tune(sock: socket.socket) -> bool:
    """The guest already segmented (no Nagle here). A fixed, large send buffer (the kernel
    caps it at wmem_max), as passt does: the window we show the guest is bounded by it, and an
    autotuned buffer only grows after writes fail, which that window prevents. True if the
    send buffer is now fixed (SOCK_SNDBUF_LOCK: the kernel leaves its size alone)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF_WANT)
    except OSError:
        return False
    return True


def _established(info: bytes | None) -> bool:
    """tcpi_state (the first byte of TCP_INFO) is TCP_ESTABLISHED."""
    return bool(info) and info[0] == TCP_ESTABLISHED  # type: ignore[index]


def _reset_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()
