"""TCP connections: what each one is, its states, and the rules both directions follow.

Theory of operation. vhostpasst has no TCP stack of its own: each connection the guest makes
(or a `-t` port accepts) is one host socket, and the host kernel does reliability, congestion
control and retransmission towards the far end. Towards the guest we keep sequence numbers,
windows and timers, never data:

* host -> guest (to_guest.py, with out_buf.py / out_vu.py): bytes are peeked (MSG_PEEK with
  SO_PEEK_OFF) from the socket straight into link buffers, after room for the headers, which
  are then written in place. What the guest acknowledges is discarded from the socket with
  recv(MSG_TRUNC); a timeout or three duplicate ACKs rewind the peek offset to the ACK point
  and the same bytes are peeked again. The retransmission timeout comes from an RTT estimate
  (RFC 6298) and backs off.
* guest -> host (from_guest.py): in-order payloads of one batch go out in one sendmsg();
  out-of-order data is dropped with a duplicate ACK (the guest retransmits). What we
  acknowledge, and the window we show, come from the socket (TCP_INFO bytes_acked and
  snd_wnd, SO_SNDBUF: TcpConn.ack_wnd()), so the guest's congestion control sees the real
  path; on slow paths data is acknowledged to the guest only once the far end has
  acknowledged it to the host kernel.

ACK number and window: the guest's data is acknowledged once the far end acknowledged it to the
host kernel (tcpi_bytes_acked since establishment), except where waiting buys nothing (a far
end on this host, a tiny send buffer, a path faster than LOW_RTT): then as soon as the socket
took it. The window is what the far end's window and our send buffer leave once the bytes in
flight are counted, never less than what we showed before moved on by the ACK. A window below
one guest segment is, to the guest, a zero window (its sender avoids silly windows, RFC 813
§4, and waits for its persist timer): while a window below the largest segment a guest can
send will open (data in flight, or the far end's window below the largest it showed), the
socket is polled as for a zero window and the update sent once it opens (wnd_short). These,
and the header template data frames are written from, are TcpConn methods: both directions'
paths use them.

States (TcpConn.state): CONNECTING (guest SYN seen, host connect() in progress) ->
SYN_ACK_SENT (connected, SYN-ACK sent, waiting for the guest's ACK) -> ESTABLISHED; or, for a
connection accepted on a `-t` port, SYN_SENT (SYN sent to the guest) -> ESTABLISHED. There is
no closing state: each direction ends on its own (`tap_fin_rcvd`: the guest's FIN passed on
with shutdown(SHUT_WR); `fin_seq`/`tap_fin_acked`: our FIN sent and acknowledged), and the
connection goes once both have ended and the far end took everything
(TcpConn.close_if_done); a RST either way ends it at once.

Timers (timers.py), all loop timers (loop.call_at), at most three per connection: the
retransmission timer (also the handshake's and the zero-window probe's), the ACK timer (a
coalesced ACK, and polling the socket for the far end's ACK when we hold back the guest's), and
one connection timer (handshake timeout, FIN timeout, inactivity); plus one for them all, the
keepalive round.

Keepalives, as passt: a keepalive probe from the guest is answered and turns SO_KEEPALIVE on
for the host socket, so the far end is probed too; every KEEPALIVE_INTERVAL, a connection
with no traffic either way for that long (passt: from the guest; data we send the guest is
answered) gets a keepalive probe (an ACK one below the guest's ACK point), so a guest that
rebooted or forgot it answers with a RST and it ends.

Better than passt: a segment for no connection is answered with a RST (RFC 9293 §3.10.7.1);
a guest RST resets the host socket (SO_LINGER 0) instead of closing it gracefully; the
retransmission timeout is estimated and backs off; half-open connections are capped so a SYN
flood cannot fill the flow table.

The handler (TcpHandler, __init__.py) is one object built from one class per concern, each in
its own module and each on top of the one below: control.py (the shared state; segments built
from nothing: SYN, FIN, RST; the socket's epoll mask) -> timers.py -> from_guest.py (guest
segments, and the ACKs and window updates answering them) -> to_guest.py (host socket events,
data to the guest through out_buf.py or out_vu.py) -> handler.py (listening sockets). This
module is below them all; what every frame to the guest carries (ACK number, window, header
template) and a connection's end are TcpConn methods, so both paths use them from here.

The path of one frame each way, through this package (plus TcpConn's methods here, and
timers.py where a timer is armed):
  guest -> host: Dispatcher -> from_guest.segment(); end_batch() -> _tap_segments() ->
    _write(): one sendmsg() per connection and batch; then _send_ack() if one is due.
  host -> guest: the socket's EPOLLIN -> to_guest._on_sock() -> _from_sock() -> the chosen
    output's send() (out_vu: Link.rx_fill(), the read and headers in C; out_buf:
    Link.rx_scatter(), recvmsg_into(), headers in C, Link.commit_scatter()) -> _data_sent().
"""

from __future__ import annotations

import fcntl
import mmap
import operator
import socket
import struct
import sys
import termios
import time
from ipaddress import IPv4Address, IPv6Address
from typing import TYPE_CHECKING, Any, Protocol

from vhostpasst._dataplane import ffi as _dp_ffi
from vhostpasst.core.flow import Flow
from vhostpasst.core.loop import EventLoop, TimerHandle
from vhostpasst.link.base import Tso
from vhostpasst.wire import checksum
from vhostpasst.wire import tcp as wtcp

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
# As passt 2026: a connection with no activity either way for IDLE_TIMEOUT is reset, and one
# quiet for KEEPALIVE_INTERVAL gets a keepalive, which a live guest answers
# (so an idle SSH session lives on) and one that forgot the connection answers with a RST.
IDLE_TIMEOUT = 7200.0
KEEPALIVE_INTERVAL = 30.0
RTO_INIT = 1.0  # RFC 6298 §2.1
RTO_MIN = 0.2  # Linux's floor; the guest link is local, a 1 s floor makes losses expensive
RTO_MAX = 60.0
MAX_RETRANS = 8
PERSIST_MAX = 1.0  # longest interval between zero-window probes
# No guest segment carries more (an IP packet's length field): a window below it may be
# below the guest's next segment (64 KiB with TSO), see wnd_short. A bound, not the guest's
# MSS: the data plane's C writes the guest's data without Python seeing its segments.
GUEST_SEGMENT_MAX = 65535
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
ENV_KEEPALIVE = "VHOSTPASST_TCP_KEEPALIVE_INTERVAL"
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



def seq_lt(a: int, b: int) -> bool:
    return 0 < ((b - a) & M32) < 0x80000000


def seq_le(a: int, b: int) -> bool:
    return a == b or seq_lt(a, b)


class ConnOwner(Protocol):
    """What a connection needs of its handler when it closes."""

    loop: EventLoop
    half_open: int  # connections not yet ESTABLISHED

    def _arm_ack(self, conn: TcpConn) -> None:
        """Poll the socket for the far end's ACK or window soon (timers.py)."""

    def dp_drop(self, conn: TcpConn) -> None:
        """Take the connection out of the data plane's table (dataplane.py)."""

    def _on_sock(self, conn: TcpConn, mask: int) -> None:
        """An epoll event on the connection's socket (to_guest.py)."""

    def _reset(self, conn: TcpConn) -> None:
        """Reset the connection both ways (control.py)."""


def _shared(name: str) -> Any:
    """A TcpConn attribute stored in its data plane record (`r`, a struct dp_flow): read by
    a C getter, so reading it costs about what reading a plain attribute does."""

    def store(conn: TcpConn, value: object) -> None:
        setattr(conn.r, name, value)

    return property(operator.attrgetter("r." + name), store)


def _optional(name: str, flag: str) -> Any:
    """A shared attribute that may be None: `flag` in the record says whether it is set
    (`flag` may be the field itself where 0 never is a value)."""

    def load(conn: TcpConn) -> object:
        r = conn.r
        return getattr(r, name) if getattr(r, flag) else None

    def store(conn: TcpConn, value: object) -> None:
        r = conn.r
        setattr(r, flag, value is not None)
        if value is not None:
            setattr(r, name, value)

    return property(load, store)


# The fields the data plane's C (cffi_build/vhostpasst/dataplane.c) reads or writes: one
# copy, in the connection's struct dp_flow, seen from Python as attributes.
_SHARED = ("state", "tap_fin_rcvd", "seq_from_tap", "seq_ack_to_tap", "seq_to_tap", "seq_max",
           "seq_ack_from_tap", "wnd_from_tap", "ws_from_tap", "recover", "retrans",
           "dup_acks", "discard_due", "rtt_time", "rttvar", "rto", "rto_armed", "rto_when",
           "rto_deadline", "last_seen", "stalled", "drained", "peek_full", "peer_closed",
           "local", "sndbuf_fixed", "poll_fast", "ack_due", "mss", "ws_to_tap", "wnd_to_tap",
           "ack_base", "snd_wnd_max", "wnd_short")


class TcpConn(Flow):
    """One translated connection. Guest side: the guest at (gaddr, gport) talks to the far
    end it sees at (faddr, fport); host side: `sock`."""

    timeout = None  # our own timers decide
    if not TYPE_CHECKING:  # (the checker sees the shared fields below as attributes)
        # the Python-only fields; those the data plane's C shares are properties over `r`
        __slots__ = ("h", "sock", "fd", "six", "gaddr", "gport", "faddr", "fport", "gaddr_b",
                     "faddr_b", "events", "isn_tap", "want_out", "so_keepalive", "isn",
                     "sock_eof", "tap_fin_acked", "tso", "tmpl", "tmpl_mac", "pseudo",
                     "_rto_timer", "ack_timer", "idle_timer", "r")

    if TYPE_CHECKING:
        state: int
        tap_fin_rcvd: bool | int
        seq_from_tap: int
        seq_ack_to_tap: int
        seq_to_tap: int
        seq_max: int
        seq_ack_from_tap: int
        wnd_from_tap: int
        ws_from_tap: int
        recover: int
        retrans: int
        dup_acks: int
        discard_due: int
        rtt_time: float
        rttvar: float
        rto: float
        rto_armed: bool | int
        rto_when: float
        rto_deadline: float
        last_seen: float
        stalled: bool | int
        drained: bool | int
        peek_full: bool | int
        peer_closed: bool | int
        local: bool | int
        sndbuf_fixed: bool | int
        poll_fast: bool | int
        ack_due: bool | int
        mss: int
        ws_to_tap: int
        wnd_to_tap: int
        ack_base: int
        snd_wnd_max: int
        wnd_short: bool | int
        sndbuf: int | None
        fin_seq: int | None
        rtt_seq: int | None
        srtt: float | None
        rto_timer: TimerHandle | None
    else:
        fin_seq = _optional("fin_seq", "fin_sent")
        sndbuf = _optional("sndbuf", "sndbuf")  # 0: not known (a send buffer is never 0)
        rtt_seq = _optional("rtt_seq", "rtt_pending")

        @property
        def srtt(self) -> float | None:
            srtt = self.r.srtt
            return None if srtt < 0 else srtt

        @srtt.setter
        def srtt(self, value: float | None) -> None:
            self.r.srtt = -1.0 if value is None else value

        @property
        def rto_timer(self) -> TimerHandle | None:
            return self._rto_timer

        @rto_timer.setter
        def rto_timer(self, timer: TimerHandle | None) -> None:
            self._rto_timer = timer
            self.r.rto_timer_set = timer is not None

    def __init__(self, handler: ConnOwner, sock: socket.socket, six: bool, gaddr: IPAddr,
                 gport: int, faddr: IPAddr, fport: int, state: int) -> None:
        super().__init__()
        self.r: Any = _dp_ffi.new("struct dp_flow *")  # the shared fields (see _SHARED)
        r = self.r
        r.six = six
        r.gaddr = gaddr.packed.ljust(16, b"\0")
        r.faddr = faddr.packed.ljust(16, b"\0")
        r.gport, r.fport = gport, fport
        r.fd = sock.fileno()
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
        self.sndbuf = None
        # guest -> host
        self.isn_tap = 0  # the guest's ISN
        self.seq_from_tap = 0  # next byte expected from the guest
        self.seq_ack_to_tap = 0  # the last ACK we sent
        self.ack_base = 0  # seq_from_tap - tcpi_bytes_acked, fixed at establishment
        self.wnd_to_tap = 0  # the last window we advertised (bytes)
        self.ws_to_tap = 0
        self.tap_fin_rcvd = False  # and shutdown(SHUT_WR) done
        self.want_out = False  # the socket was full: EPOLLOUT then a window update
        self.so_keepalive = False  # the guest sent a keepalive: SO_KEEPALIVE is on, as passt
        self.ack_due = False
        self.poll_fast = False  # the far end holds much of what we acknowledged: poll soon
        self.snd_wnd_max = 0  # the largest window the far end showed the host kernel
        # the window shown is below one guest segment but will open (data in flight, or the
        # far end's window below its largest): the guest waits for more (sender SWS
        # avoidance), so the socket is polled as for a zero window
        self.wnd_short = False
        # the last ack_wnd() for data frames (r.data_ack_*: seq_from_tap, ACK number, window,
        # when), see data_ack_wnd()
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
        self.tmpl: bytes | None = None  # frame headers for data to the guest (see template())
        self.tmpl_mac = b""
        self.pseudo = 0
        self.tso: Tso | None = None  # for a link that segments (see tso_params())
        self.rto_timer: TimerHandle | None = None  # may outlive a cancel: see _cancel_rto
        self.rto_armed = False  # the retransmission timer runs
        self.rto_when = 0.0  # when rto_timer fires
        self.rto_deadline = 0.0  # when the RTO is really due (later after a restart)
        self.ack_timer: TimerHandle | None = None
        self.idle_timer: TimerHandle | None = None
        self.last_seen = time.monotonic()

    # --- what every frame to the guest carries: ACK number, window, headers ---------------
    # (TcpConn methods, not the handler's: both paths, the data to the guest and the ACKs
    # for the guest's data, use them; see "ACK number and window" in the module docstring)

    def ack_wnd(self) -> tuple[int, int]:
        """(ACK number, window field) for the guest, from the host socket."""
        if self.state != ESTABLISHED:
            return self.seq_from_tap, SYN_WINDOW
        info = tcp_info(self.sock)
        sndbuf = self.sndbuf
        if sndbuf is None:
            try:
                sndbuf = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
            except OSError:
                sndbuf = SNDBUF_SMALL
            else:
                if self.sndbuf_fixed:
                    self.sndbuf = sndbuf
        # SO_SNDBUF counts overhead too: roughly half holds payload once it is large
        eff = sndbuf * 3 // 4 if sndbuf < (4 << 20) else sndbuf // 2
        if info is None or len(info) < TCP_INFO_LEN:
            ack = self.seq_from_tap
            wnd = eff
        else:
            remote = (self.ack_base + _INFO.unpack_from(info, 120)[0]) & M32
            if seq_lt(self.seq_from_tap, remote):
                remote = self.seq_from_tap
            if self.tap_fin_rcvd and ((self.seq_from_tap - remote) & M32) <= 1:
                remote = self.seq_from_tap  # all data acked; the FIN may not be counted
            min_rtt = _U32.unpack_from(info, 148)[0] / 1e6
            immediate = self.local or sndbuf < SNDBUF_SMALL or (0 < min_rtt < LOW_RTT)
            ack = self.seq_from_tap if immediate else remote
            snd_wnd = _U32.unpack_from(info, 228)[0]
            unacked = (ack - remote) & M32
            wnd = min(snd_wnd, eff) - unacked
            self.poll_fast = unacked > eff // 4
            if snd_wnd > self.snd_wnd_max:
                self.snd_wnd_max = snd_wnd
            self.wnd_short = wnd < GUEST_SEGMENT_MAX and \
                (unacked > 0 or snd_wnd < self.snd_wnd_max)
        if seq_lt(ack, self.seq_ack_to_tap):
            ack = self.seq_ack_to_tap  # never backwards
        wnd = max(0, min(wnd, MAX_WINDOW))
        return ack, min(wnd >> self.ws_to_tap, 65535)

    def data_ack_wnd(self, now: float) -> tuple[int, int]:
        """ack_wnd() for data frames to the guest, the last answer again for DATA_ACK_TTL
        while nothing came from the guest and no ACK went out since: a host->guest transfer
        peeks at every guest ACK, and TCP_INFO each time was a system call and its parsing
        for the same answer. ACKs and window updates (_send_ack) always ask the socket."""
        r = self.r
        # its ACK number is still the last one sent (the data carried it, no ACK since)
        if r.data_ack_valid and r.data_ack_seq == r.seq_from_tap and \
                r.data_ack_ack == r.seq_ack_to_tap and now - r.data_ack_time < DATA_ACK_TTL:
            return r.data_ack_ack, r.data_ack_wnd
        ack, wnd = self.ack_wnd()
        r.data_ack_valid = True
        r.data_ack_seq, r.data_ack_ack, r.data_ack_wnd, r.data_ack_time = \
            r.seq_from_tap, ack, wnd, now
        return ack, wnd

    def acked_to_tap(self, ack: int, wnd: int) -> None:
        """A frame carrying `ack` and window field `wnd` went to the guest."""
        self.seq_ack_to_tap = ack
        self.wnd_to_tap = wnd << self.ws_to_tap
        self.ack_due = False
        if ack != self.seq_from_tap or wnd == 0 or self.wnd_short:
            self.h._arm_ack(self)  # poll the socket for the far end's ACK or window

    def tso_params(self) -> Tso:
        """How a link that segments sends this connection's frames as GSO frames (segments
        of `mss`, the MSS the guest announced, capped by the MTU)."""
        tso = self.tso
        if tso is None or tso.mss != self.mss:
            off = wtcp.TCP6_PAYLOAD_OFFSET if self.six else wtcp.TCP4_PAYLOAD_OFFSET
            tso = self.tso = Tso(self.six, off - wtcp.TCP_HLEN, off, self.mss)
        return tso

    def template(self, mac: bytes, our_mac: bytes) -> bytes:
        """Ethernet (from `our_mac` to the guest's `mac`), IP and TCP headers for data
        segments with the per-segment fields (lengths, seq, ack, flags, window, checksums)
        zero, and the pseudo-header sum (`pseudo`), for _tcpseg and _tcpsg: built with the
        same writers as every other frame, once per guest MAC (kept in `tmpl`)."""
        if self.tmpl is not None and self.tmpl_mac == mac:
            return self.tmpl
        six = self.six
        scratch = memoryview(bytearray(wtcp.TCP6_PAYLOAD_OFFSET))
        if six:
            wtcp.write_eth_ipv6_tcp_headers(scratch, mac, our_mac, self.faddr_b, self.gaddr_b,
                                            self.fport, self.gport, 0, 0, 0, 0, 0)
        else:
            wtcp.write_eth_ipv4_tcp_headers(scratch, mac, our_mac, self.faddr_b, self.gaddr_b,
                                            self.fport, self.gport, 0, 0, 0, 0, 0)
        l3 = wtcp.TCP6_PAYLOAD_OFFSET - wtcp.TCP_HLEN if six else \
            wtcp.TCP4_PAYLOAD_OFFSET - wtcp.TCP_HLEN
        tmpl = bytearray(scratch[:l3 + wtcp.TCP_HLEN])
        if not six:
            tmpl[14 + 10:14 + 12] = b"\0\0"  # IPv4 header checksum: computed per frame
        tmpl[l3 + 16:l3 + 18] = b"\0\0"
        self.tmpl, self.tmpl_mac = bytes(tmpl), mac
        self.pseudo = checksum.partial(self.faddr_b + self.gaddr_b) + socket.IPPROTO_TCP
        r = self.r  # the data plane's C fills data frames from the same template
        r.tmpl = self.tmpl.ljust(len(r.tmpl), b"\0")
        r.tmpl_mac = mac[:6].ljust(6, b"\0")
        r.pseudo = self.pseudo
        r.tmpl_valid = True
        return self.tmpl

    def discard_acked(self) -> None:
        """Drop what the guest acknowledged from the socket (before peeking again)."""
        if self.discard_due:
            discard(self.sock, self.discard_due)
            self.discard_due = 0

    def on_sock_event(self, mask: int) -> None:
        """The loop's callback for the socket (a bound method: lighter than a closure)."""
        self.h._on_sock(self, mask)

    def on_sock_error(self, _e: Exception) -> None:
        """The loop's last resort for that callback: the connection is reset (loop.py)."""
        self.h._reset(self)

    def close_if_done(self) -> None:
        """Remove the connection once both directions finished: the guest's FIN passed on
        and acknowledged by the far end, ours acknowledged by the guest."""
        if self.closed or self.state != ESTABLISHED:
            return
        if self.tap_fin_rcvd and self.tap_fin_acked and self.seq_ack_to_tap == \
                self.seq_from_tap:
            self.remove()

    def __repr__(self) -> str:
        return f"<tcp {self.gaddr}:{self.gport} <-> {self.faddr}:{self.fport} s{self.state}>"

    def close(self) -> None:
        if self.r.in_table:
            self.h.dp_drop(self)
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



for _name in _SHARED:
    setattr(TcpConn, _name, _shared(_name))
del _name


def tap_key(six: bool, gaddr: IPAddr, gport: int, faddr: IPAddr, fport: int) -> tuple:
    # addresses as ints: hashing and comparing ipaddress objects is Python code, and this
    # key is built and looked up for every guest segment
    return ("tcp", six, int(gaddr), gport, int(faddr), fport)



class Listener:
    """One `-t` listening socket: host port -> guest port (on `target`, if the rule names
    one, instead of the guest's address)."""

    def __init__(self, sock: socket.socket, six: bool, port: int, guest_port: int,
                 target: IPAddr | None = None) -> None:
        self.sock = sock
        self.six = six
        self.port = port
        self.guest_port = guest_port
        self.target = target



def tune(sock: socket.socket) -> bool:
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


def established(info: bytes | None) -> bool:
    """tcpi_state (the first byte of TCP_INFO) is TCP_ESTABLISHED."""
    return bool(info) and info[0] == TCP_ESTABLISHED  # type: ignore[index]


def reset_close(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER0)
    except OSError:
        pass
    sock.close()


def tcp_info(sock: socket.socket) -> bytes | None:
    """The socket's TCP_INFO (up to tcpi_snd_wnd), None if it cannot tell."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN)
    except OSError:
        return None
