"""Established TCP connections across a live migration: frozen with TCP_REPAIR on the source,
rebuilt on the destination, one TCP section of the state stream (link/migrate.py) each.

Theory of operation. A connection is two halves: what the guest knows (its sequence numbers,
windows, scales and MSS: our TcpConn fields) and the host socket, whose kernel state only
TCP_REPAIR can read and write, and only with CAP_NET_ADMIN, which the privileged helper has
(system/repair.py; vhostpasst-repair or passt-repair). Only connections that are ESTABLISHED
both for us and in the kernel, with no FIN either way, move; the others stay on the source
and close as they would have.

Source (`TcpMover.save`, at SAVE, the guest stopped): for each such connection what the
guest acknowledged is dropped from the socket and SO_PEEK_OFF turned off (neither is
possible in repair mode), then the helper sets TCP_REPAIR on all of them, and for each the
kernel gives: window scales and options (TCP_INFO), the MSS clamp (TCP_MAXSEG), the RFC 7323
timestamp (TCP_TIMESTAMP, if in use), TCP_REPAIR_WINDOW, and per queue (TCP_REPAIR_QUEUE)
its sequence (TCP_QUEUE_SEQ, the queue's end: the start is stored) and its bytes (peeked;
SIOCOUTQ / SIOCOUTQNSD / SIOCINQ give the lengths, the send queue's not-yet-sent tail
apart). Then the connection leaves the flow table without a sound: a socket closed in repair
mode sends neither FIN nor RST. With --migrate-no-linger it is closed; by default it is kept
(repair mode on, no longer watched) until the daemon exits, so late segments of the far end
meet a socket rather than a RST (passt's behaviour). Without a helper nothing can be
frozen: the connections are reset, said in one log line, and the migration goes on.

Destination (`TcpMover.restore`, at LOAD, after the whole stream was checked): a socket per
connection (SO_REUSEADDR, TCP_NODELAY, the send buffer as for any connection), TCP_REPAIR on
all of them through the helper, then per socket in the order the kernel wants: bind to the
source's local address and port, the timestamp, each queue's sequence, connect (in repair
mode: no SYN, straight to ESTABLISHED), the receive queue's bytes, the send queue's bytes
already sent, TCP_REPAIR_OPTIONS (scales, MSS, SACK, timestamps), TCP_REPAIR_WINDOW; then
TCP_REPAIR off for all (the kernel sends a window probe), the unsent tail written as plain
data, SO_PEEK_OFF at what was in flight to the guest, and the TcpConn rebuilt (flow table,
epoll, timers). A connection that fails any step is closed in repair mode (silently) and
logged; the guest's next segment for it gets a RST.

The TCP section body, network byte order: `_FIXED` (addresses and ports of both sides, the
guest side's sequence numbers and windows, the kernel's) then the send queue's bytes, then
the receive queue's. `parse()` range-checks every field and refuses the section whole
(StateError) when one is out of range or the lengths disagree.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import socket
import struct
import sys
import termios
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import NamedTuple

from vhostpasst.proto.tcp.conn import (
    ESTABLISHED,
    M32,
    MAX_WINDOW,
    SO_PEEK_OFF,
    SYN_ACK_SENT,
    TCP_ESTABLISHED,
    IPAddr,
    TcpConn,
    established,
    seq_le,
    tap_key,
    tcp_info,
    tune,
)
from vhostpasst.proto.tcp.handler import TcpHandler
from vhostpasst.system.repair import Command, RepairError, RepairServer
from vhostpasst.system.syscalls import SIOCOUTQNSD, TIOCOUTQ
from virtio.devstate import StateError

log = logging.getLogger(__name__)

# linux/tcp.h
TCP_REPAIR_QUEUE = 20
TCP_QUEUE_SEQ = 21
TCP_REPAIR_OPTIONS = 22
TCP_TIMESTAMP = 24
TCP_REPAIR_WINDOW = 29
TCP_RECV_QUEUE = 1
TCP_SEND_QUEUE = 2
TCPOPT_MAXSEG = 2
TCPOPT_WINDOW = 3
TCPOPT_SACK_PERM = 4
TCPOPT_TIMESTAMP = 8
TCPI_OPT_TIMESTAMPS = 1
TCPI_OPT_SACK = 2
TCPI_OPT_ALL = 0x7F  # up to TCPI_OPT_USEC_TS
MAX_WSCALE = 14  # RFC 7323 §2.3
KERNEL_MAX_WINDOW = 65535 << MAX_WSCALE

MAX_QUEUE = 16 << 20  # bytes of one queue moved; a larger one resets its connection
MAX_QUEUES_TOTAL = 48 << 20  # of all queues in one stream (link/migrate.py caps it at 64 MiB)
RESTORE_CHUNK_MIN = 1024  # queue writes halve on ENOBUFS/ENOMEM down to this

_WINDOW = struct.Struct("=5I")  # struct tcp_repair_window
_OPT = struct.Struct("=II")  # struct tcp_repair_opt
_U32 = struct.Struct("=I")
_TCPI = struct.Struct("=BxxxxBB")  # tcpi_state, (ca_state..backoff), options, wscales

# family, flags, guest MSS; guest address, far end as the guest sees it, host socket's local
# and remote address (16 bytes each, IPv4 in the last 4); their ports; guest side: isn_tap,
# seq_from_tap, seq_ack_to_tap, wnd_to_tap, isn, seq_to_tap, seq_max, seq_ack_from_tap,
# wnd_from_tap, ws_to_tap, ws_from_tap; kernel: snd_ws, rcv_ws, tcpi_options, mss clamp,
# timestamp, snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup, send queue start, receive queue
# start, send queue length, of it not sent, receive queue length
_FIXED = struct.Struct("!BBH16s16s16s16sHHHH9I5Bxxx12I")
_PAD = struct.calcsize("!BBH16s16s16s16sHHHH9I5B")  # where its 3 zero bytes are

LOCAL = 1  # TcpConn.local
SNDBUF_FIXED = 2  # TcpConn.sndbuf_fixed
_FLAGS = LOCAL | SNDBUF_FIXED


class ConnState(NamedTuple):
    """One connection as it moves; the fields in _FIXED's order, then the queues."""

    family: int  # 4 or 6
    flags: int
    mss: int  # the guest's
    gaddr: bytes
    faddr: bytes
    laddr: bytes
    raddr: bytes
    gport: int
    fport: int
    lport: int
    rport: int
    isn_tap: int
    seq_from_tap: int
    seq_ack_to_tap: int
    wnd_to_tap: int
    isn: int
    seq_to_tap: int
    seq_max: int
    seq_ack_from_tap: int
    wnd_from_tap: int
    ws_to_tap: int
    ws_from_tap: int
    snd_ws: int
    rcv_ws: int
    tcpi_options: int
    sock_mss: int
    timestamp: int
    snd_wl1: int
    snd_wnd: int
    max_window: int
    rcv_wnd: int
    rcv_wup: int
    seq_snd: int
    seq_rcv: int
    sndq: int
    notsent: int
    rcvq: int
    sndq_data: bytes
    rcvq_data: bytes

    def pack(self) -> bytes:
        return _FIXED.pack(*self[:-2]) + self.sndq_data + self.rcvq_data

    def addr(self, raw: bytes) -> IPAddr:
        return IPv4Address(raw[12:]) if self.family == 4 else IPv6Address(raw)

    def __repr__(self) -> str:
        return (f"<tcp {self.addr(self.gaddr)}:{self.gport} <-> "
                f"{self.addr(self.faddr)}:{self.fport}>")


def _raw(addr: IPAddr) -> bytes:
    return bytes(12) + addr.packed if isinstance(addr, IPv4Address) else addr.packed


def parse(body: bytes) -> ConnState:
    """A TCP section's connection, every field range-checked; StateError if any is wrong."""
    if len(body) < _FIXED.size:
        raise StateError(f"TCP section of {len(body)} bytes, shorter than {_FIXED.size}")
    fixed = _FIXED.unpack_from(body)
    state = ConnState._make((*fixed, b"", b""))
    if state.family not in (4, 6):
        raise StateError(f"TCP connection of family {state.family}")
    if any(body[_PAD:_PAD + 3]):
        raise StateError("TCP section padding not zero")
    if state.flags & ~_FLAGS:
        raise StateError(f"TCP connection flags {state.flags:#x}")
    for name in ("gaddr", "faddr", "laddr", "raddr"):
        raw = getattr(state, name)
        if state.family == 4 and any(raw[:12]):
            raise StateError(f"TCP {name} is not an IPv4 address")
        addr = state.addr(raw)
        if addr.is_unspecified or addr.is_multicast or (name == "gaddr" and addr.is_loopback):
            raise StateError(f"TCP {name} {addr}")
    if 0 in (state.gport, state.fport, state.lport, state.rport):
        raise StateError("TCP port 0")
    if state.mss == 0 or not 0 < state.sock_mss <= 0xFFFF:
        raise StateError(f"TCP MSS {state.mss}, socket MSS {state.sock_mss}")
    if max(state.ws_to_tap, state.ws_from_tap, state.snd_ws, state.rcv_ws) > MAX_WSCALE:
        raise StateError("TCP window scale above 14")
    if max(state.wnd_to_tap, state.wnd_from_tap) > MAX_WINDOW or \
            max(state.snd_wnd, state.max_window, state.rcv_wnd) > KERNEL_MAX_WINDOW:
        raise StateError("TCP window out of range")
    if state.tcpi_options & ~TCPI_OPT_ALL:
        raise StateError(f"TCP options {state.tcpi_options:#x}")
    if not state.tcpi_options & TCPI_OPT_TIMESTAMPS and state.timestamp:
        raise StateError("TCP timestamp without the timestamp option")
    if not (seq_le(state.seq_ack_from_tap, state.seq_to_tap)
            and seq_le(state.seq_to_tap, state.seq_max)
            and seq_le(state.seq_ack_to_tap, state.seq_from_tap)):
        raise StateError("TCP guest-side sequence numbers out of order")
    if state.sndq > MAX_QUEUE or state.rcvq > MAX_QUEUE or state.notsent > state.sndq:
        raise StateError(f"TCP queues of {state.sndq} ({state.notsent} not sent) and "
                         f"{state.rcvq} bytes")
    if (state.seq_max - state.seq_ack_from_tap) & M32 > state.rcvq:
        raise StateError("TCP data in flight to the guest beyond the receive queue")
    if len(body) != _FIXED.size + state.sndq + state.rcvq:
        raise StateError(f"TCP section of {len(body)} bytes, its queues say "
                         f"{_FIXED.size + state.sndq + state.rcvq}")
    queues = body[_FIXED.size:]
    return state._replace(sndq_data=bytes(queues[:state.sndq]),
                          rcvq_data=bytes(queues[state.sndq:]))


def _ioctl_int(fd: int, request: int) -> int:
    buf = bytearray(4)
    fcntl.ioctl(fd, request, buf)
    return int.from_bytes(buf, sys.byteorder, signed=True)


def _peek(sock: socket.socket, length: int) -> bytes:
    """The selected queue's first `length` bytes (repair mode: MSG_PEEK reads it whole)."""
    if length == 0:
        return b""
    data = sock.recv(length, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    if len(data) != length:
        raise OSError(0, f"short read of a queue: {len(data)} of {length} bytes")
    return data


def _queue_seq(sock: socket.socket, queue: int) -> int:
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, queue)
    return int(_U32.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, 4))[0])


def dump(conn: TcpConn) -> ConnState:
    """`conn` as it moves: its socket is in repair mode (OSError if the kernel says no)."""
    sock = conn.sock
    info = tcp_info(sock)
    if info is None:
        raise OSError(0, "no TCP_INFO")
    tcpi_state, options, wscales = _TCPI.unpack_from(info)
    if tcpi_state != TCP_ESTABLISHED:
        raise OSError(0, f"kernel state {tcpi_state}")
    sock_mss = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG)
    timestamp = sock.getsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP) & M32 \
        if options & TCPI_OPT_TIMESTAMPS else 0
    window = _WINDOW.unpack(sock.getsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                                            _WINDOW.size))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    sndq = _ioctl_int(conn.fd, TIOCOUTQ)  # SIOCOUTQ
    notsent = _ioctl_int(conn.fd, SIOCOUTQNSD)
    if not 0 <= notsent <= sndq <= MAX_QUEUE:
        raise OSError(0, f"send queue of {sndq} bytes ({notsent} not sent)")
    sndq_data = _peek(sock, sndq)
    seq_snd = (_queue_seq(sock, TCP_SEND_QUEUE) - sndq) & M32
    rcvq = _ioctl_int(conn.fd, termios.FIONREAD)
    if not 0 <= rcvq <= MAX_QUEUE:
        raise OSError(0, f"receive queue of {rcvq} bytes")
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    rcvq_data = _peek(sock, rcvq)
    seq_rcv = (_queue_seq(sock, TCP_RECV_QUEUE) - rcvq) & M32
    local, remote = sock.getsockname(), sock.getpeername()
    return ConnState._make((
        6 if conn.six else 4, (LOCAL if conn.local else 0)
        | (SNDBUF_FIXED if conn.sndbuf_fixed else 0), conn.mss,
        _raw(conn.gaddr), _raw(conn.faddr), _raw(ip_address(local[0])),
        _raw(ip_address(remote[0])), conn.gport, conn.fport, local[1], remote[1],
        conn.isn_tap, conn.seq_from_tap, conn.seq_ack_to_tap, conn.wnd_to_tap, conn.isn,
        conn.seq_to_tap, conn.seq_max, conn.seq_ack_from_tap, conn.wnd_from_tap,
        conn.ws_to_tap, conn.ws_from_tap, wscales & 0xF, wscales >> 4, options, sock_mss,
        timestamp, *window, seq_snd, seq_rcv, sndq, notsent, rcvq, sndq_data, rcvq_data))


def _write_queue(sock: socket.socket, data: bytes) -> None:
    """All of `data` into the selected queue (repair mode) or out (not), in chunks that
    halve while the kernel is short of memory."""
    view, chunk = memoryview(data), len(data)
    while view:
        try:
            sent = sock.send(view[:chunk])
        except OSError as e:
            if e.errno in (errno.ENOBUFS, errno.ENOMEM) and chunk > RESTORE_CHUNK_MIN:
                chunk //= 2
                continue
            raise
        view = view[sent:]


def _rebuild(state: ConnState, sock: socket.socket) -> None:
    """The kernel half: `sock` is in repair mode, fresh."""
    sock.bind((str(state.addr(state.laddr)), state.lport))
    if state.tcpi_options & TCPI_OPT_TIMESTAMPS:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_TIMESTAMP, _U32.pack(state.timestamp))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, _U32.pack(state.seq_snd))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_QUEUE_SEQ, _U32.pack(state.seq_rcv))
    sock.connect((str(state.addr(state.raddr)), state.rport))
    _write_queue(sock, state.rcvq_data)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
    _write_queue(sock, state.sndq_data[:state.sndq - state.notsent])
    opts = [(TCPOPT_WINDOW, state.snd_ws | state.rcv_ws << 16),
            (TCPOPT_MAXSEG, state.sock_mss)]
    if state.tcpi_options & TCPI_OPT_SACK:
        opts.append((TCPOPT_SACK_PERM, 0))
    if state.tcpi_options & TCPI_OPT_TIMESTAMPS:
        opts.append((TCPOPT_TIMESTAMP, 0))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_OPTIONS,
                    b"".join(_OPT.pack(*opt) for opt in opts))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR_WINDOW,
                    _WINDOW.pack(state.snd_wl1, state.snd_wnd, state.max_window,
                                 state.rcv_wnd, state.rcv_wup))


def _movable(conn: TcpConn) -> bool:
    return (conn.state == ESTABLISHED and not conn.closed and not conn.tap_fin_rcvd
            and conn.fin_seq is None and not conn.sock_eof and not conn.peer_closed
            and established(tcp_info(conn.sock)))


class TcpMover:
    """What the vhost-user link asks of TCP in a migration (link.migrate.ConnMover)."""

    def __init__(self, handler: TcpHandler, repair: Callable[[], RepairServer | None],
                 no_linger: bool) -> None:
        self.handler = handler
        self.repair = repair
        self.no_linger = no_linger
        self.lingering: list[socket.socket] = []  # the source's sockets, after a migration

    def _conns(self) -> list[TcpConn]:
        return [f for f in self.handler.ctx.flows if isinstance(f, TcpConn)]

    # --- source -----------------------------------------------------------------------------

    def save(self) -> list[bytes]:
        """Freeze and dump every movable connection; they leave this daemon."""
        conns = [c for c in self._conns() if _movable(c)]
        if not conns:
            return []
        helper = self.repair()
        if helper is None or not helper.connected:
            log.warning("migration: no TCP_REPAIR helper connected, %d TCP connections "
                        "reset instead of moved", len(conns))
            for conn in conns:
                self.handler._reset(conn)
            return []
        for conn in conns:  # neither is possible in repair mode
            conn.discard_acked()
            conn.sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF, -1)
        try:
            helper.set([c.fd for c in conns], Command.ON)
        except RepairError as e:
            for conn in conns:
                self.handler._reset(conn)
            raise StateError(f"TCP_REPAIR on the connections to move: {e}") from None
        bodies, failed, budget = [], [], MAX_QUEUES_TOTAL
        for conn in conns:
            try:
                state = dump(conn)
                if state.sndq + state.rcvq > budget:
                    raise OSError(0, "the stream has no room left for its queues")
                parse(state.pack())  # what the destination would refuse fails this one only
            except (OSError, StateError) as e:
                log.warning("migration: %r not moved (reset): %s", conn,
                            getattr(e, "strerror", None) or e)
                failed.append(conn)
                continue
            log.debug("migration: %r: send queue %d bytes (%d not sent), receive queue %d",
                      conn, state.sndq, state.notsent, state.rcvq)
            budget -= state.sndq + state.rcvq
            bodies.append(state.pack())
            if not self.no_linger:  # the flow closes its descriptor, this one stays
                self.lingering.append(conn.sock.dup())
            conn.remove()  # in repair mode: no FIN, no RST
        self._reset_failed(helper, failed)
        log.info("migration: %d TCP connections saved, their sockets %s", len(bodies),
                 "closed" if self.no_linger else "kept until the daemon exits")
        return bodies

    def _reset_failed(self, helper: RepairServer, conns: list[TcpConn]) -> None:
        """Connections that could not be saved: out of repair mode, then reset both ways
        (in repair mode the RST would not go out)."""
        if not conns:
            return
        try:
            helper.set([c.fd for c in conns], Command.OFF_NO_WP)
        except RepairError as e:
            log.warning("migration: TCP_REPAIR off for the connections not moved: %s", e)
        for conn in conns:
            self.handler._reset(conn)

    # --- destination ------------------------------------------------------------------------

    parse = staticmethod(parse)

    def restore(self, states: list[ConnState]) -> None:
        """Rebuild every connection of `states` (already checked)."""
        if not states:
            return
        helper = self.repair()
        if helper is None or not helper.connected:
            log.warning("migration: no TCP_REPAIR helper connected, %d TCP connections from "
                        "the source not restored (the guest's segments get a RST)",
                        len(states))
            return
        socks = [self._socket(state) for state in states]
        try:
            helper.set([s.fileno() for s in socks], Command.ON)
        except RepairError as e:
            log.warning("migration: %d TCP connections not restored: %s", len(states), e)
            for sock in socks:
                sock.close()
            return
        ready: list[tuple[ConnState, socket.socket]] = []
        for state, sock in zip(states, socks, strict=True):
            try:
                _rebuild(state, sock)
            except OSError as e:
                log.warning("migration: %r not restored: %s", state, e.strerror or e)
                sock.close()  # in repair mode: silently
            else:
                ready.append((state, sock))
        try:
            helper.set([s.fileno() for _, s in ready], Command.OFF)
        except RepairError as e:
            log.warning("migration: %d TCP connections not restored: %s", len(ready), e)
            for _, sock in ready:
                sock.close()
            return
        restored = sum(self._conn(state, sock) for state, sock in ready)
        log.info("migration: %d of %d TCP connections restored", restored, len(states))

    def _socket(self, state: ConnState) -> socket.socket:
        sock = socket.socket(socket.AF_INET if state.family == 4 else socket.AF_INET6,
                             socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tune(sock)
        return sock

    def _conn(self, state: ConnState, sock: socket.socket) -> bool:
        """The guest half, on a socket out of repair mode; False if it failed (reset). Built
        as a connection whose handshake just ended, so that it is established the one way
        every connection is (from_guest.py's _establish: epoll, timers, the data plane)."""
        h = self.handler
        gaddr, faddr = state.addr(state.gaddr), state.addr(state.faddr)
        six = state.family == 6
        conn = TcpConn(h, sock, six, gaddr, state.gport, faddr, state.fport, SYN_ACK_SENT)
        conn.local = bool(state.flags & LOCAL)
        conn.sndbuf_fixed = bool(state.flags & SNDBUF_FIXED)
        conn.mss = state.mss
        conn.isn_tap, conn.seq_from_tap = state.isn_tap, state.seq_from_tap
        conn.seq_ack_to_tap, conn.wnd_to_tap = state.seq_ack_to_tap, state.wnd_to_tap
        conn.ws_to_tap, conn.ws_from_tap = state.ws_to_tap, state.ws_from_tap
        conn.isn, conn.seq_to_tap, conn.seq_max = state.isn, state.seq_to_tap, state.seq_max
        conn.seq_ack_from_tap, conn.wnd_from_tap = state.seq_ack_from_tap, state.wnd_from_tap
        # the far end acknowledged all but the send queue; this socket counts from zero
        conn.ack_base = (state.seq_from_tap - state.sndq) & M32
        if not h.ctx.flows.add(conn, tap_key(six, gaddr, state.gport, faddr, state.fport)):
            log.warning("migration: %r not restored: the flow table is full or has it", state)
            sock.close()
            return False
        h.half_open += 1  # as for any handshake: _establish() (or the close) counts it out
        try:
            sock.setblocking(True)
            _write_queue(sock, state.sndq_data[state.sndq - state.notsent:])
            sock.setblocking(False)
        except OSError as e:
            log.warning("migration: %r reset: %s", state, e.strerror or e)
            h._reset(conn)
            return False
        h._establish(conn)
        if conn.closed:
            return False
        try:  # what was in flight to the guest stays peeked (_establish() set 0)
            sock.setsockopt(socket.SOL_SOCKET, SO_PEEK_OFF,
                            (state.seq_to_tap - state.seq_ack_from_tap) & M32)
        except OSError as e:
            log.warning("migration: %r reset: %s", state, e.strerror or e)
            h._reset(conn)
            return False
        if conn.seq_to_tap != conn.seq_ack_from_tap:
            h._arm_rto(conn)
        h._send_ack(conn, force=True)
        return True

    def close(self) -> None:
        """The daemon exits: the sockets kept after a migration go (repair mode: silently)."""
        for sock in self.lingering:
            sock.close()
        self.lingering.clear()
