"""TCP data to the guest through link buffers: any link (stream socket, tap, vhost-user
without the guest-fill path), one output path of to_guest.py, chosen by the link's LinkCaps.

The link hands out frames (Link.rx_scatter(): per frame the buffers it spans, the first long
enough for the headers), one recvmsg_into() peeks the socket's bytes into them past the
headers, the headers (Ethernet, IP, TCP with its checksum) are written in place by C
(cffi_build/vhostpasst/tcpseg.c for frames in one buffer, tcpsg.c for frames over several or
frames the peer segments), and Link.commit_scatter() queues the frames. The connection's state
is not touched here: send() says what happened (Peeked) and to_guest.py acts on it.
"""

from __future__ import annotations

import time

from vhostpasst._tcpseg import ffi as _seg_ffi
from vhostpasst._tcpseg import lib as _seg_lib
from vhostpasst._tcpsg import ffi as _sg_ffi
from vhostpasst._tcpsg import lib as _sg_lib
from vhostpasst.link.base import Link, LinkCaps, Tso
from vhostpasst.proto.tcp.conn import _PEEK_FLAGS, TcpConn
from vhostpasst.proto.tcp.control import TcpControl
from vhostpasst.wire import tcp as wtcp

# What one output call did: (read, room, seq, ack, wnd): `read` bytes peeked (0: the end of
# the stream) into frames with `room` bytes of payload room in all; `seq`: the sequence number
# after the frames sent, None if they could not be sent (resent on the RTO); `ack` and `wnd`:
# what they carried. (A plain tuple: a NamedTuple's constructor is one more Python call per
# wake-up on the hot path.)
Peeked = tuple[int, int, int | None, int, int]
# send_c(): what the C left (dataplane.h's DP_FILL_* bits), and, where it left the fill's
# outcome to Python, rx_fill()'s answer and the room the guest's window had
CFilled = tuple[int, tuple[int, int, int] | None, int]


def scatter_iov(frames: list[list[memoryview]], off: int,
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



class BufOutput:
    """Data frames in link buffers, headers written in place (see the module docstring)."""

    def __init__(self, handler: TcpControl, caps: LinkCaps) -> None:
        self.h = handler
        self.l4_csum = caps.l4_csum
        self._our_mac = handler.ctx.config.our_mac  # the frames' source (TcpConn.template())

    def send_c(self, conn: TcpConn, link: Link) -> CFilled | None:
        """to_guest._from_sock() in the data plane's C, where the output can (out_vu.py's
        GuestFillOutput); None: not here, Python's path."""
        return None

    def send(self, conn: TcpConn, link: Link, count: int, seg: int, size: int, off: int,
             room: int, tso: Tso | None,
             acked: tuple[int, int] | None = None) -> Peeked | None:
        """Peek into up to `count` frames of `size` payload bytes (`seg`: a full segment's),
        headers in the first `off` bytes, `room` bytes at most; `acked`: the (ACK, window) to
        carry if already asked. None: no link buffers. OSError from the peek goes to the
        caller."""
        frames = link.rx_scatter(count, off + size, off)
        if not frames:
            return None
        # frames over several buffers, or in one that holds less than a segment (a guest
        # without mergeable buffers): per-frame room, and headers by _tcpsg
        full = off + seg
        # GSO frames need _tcpsg's partial checksum, whatever their buffers
        scattered = tso is not None or \
            any(len(frame) > 1 or len(frame[0]) < full for frame in frames)
        if scattered:
            iov, caps = scatter_iov(frames, off, room)
        else:
            bufs = [frame[0] for frame in frames]
            iov = [buf[off:full] for buf in bufs]
            caps = [seg] * len(bufs)
            last = room - (len(bufs) - 1) * seg  # the window may cut the last one short
            if last < seg:
                iov[-1] = bufs[-1][off:off + last]
                caps[-1] = last
        n = conn.sock.recvmsg_into(iov, 0, _PEEK_FLAGS)[0]
        if n == 0:
            return (0, sum(caps), None, 0, 0)
        conn.last_seen = now = time.monotonic()
        ack, wnd = acked if acked is not None else conn.data_ack_wnd(now)
        mac = self.h.ctx.guest_mac()
        sizes = []  # segments filled: all full but the last
        left = n
        for cap in caps:
            sizes.append(min(cap, left))
            left -= cap
            if left <= 0:
                break
        count = len(sizes)
        if scattered:
            written = self._scattered_headers(conn, frames[:count], sizes, mac, ack, wnd, tso)
            if written is None:  # the link's buffers broke its promises: resend on the RTO
                link.commit_scatter([])
                return (n, sum(caps), None, ack, wnd)
            seq, lengths = written
        else:
            tmpl = conn.template(mac, self._our_mac)
            fb = _seg_ffi.from_buffer
            ptrs = _seg_ffi.new("uint8_t *[]", [fb(b, require_writable=True)
                                                for b in bufs[:count]])
            out = _seg_ffi.new("uint32_t[]", count)
            seq = _seg_lib.vp_tcp_frames(ptrs, sizes, count, tmpl, conn.six, conn.pseudo,
                                         conn.seq_to_tap, ack, wnd, wtcp.ACK,
                                         wtcp.ACK | wtcp.PSH, out)
            lengths = _seg_ffi.unpack(out, count)
        link.commit_scatter(lengths, tso)
        return (n, sum(caps), seq, ack, wnd)

    def _scattered_headers(self, conn: TcpConn, frames: list[list[memoryview]],
                           sizes: list[int], mac: bytes, ack: int, wnd: int,
                           tso: Tso | None = None) -> tuple[int, list[int]] | None:
        """Headers (and the TCP checksum, unless the guest takes DATA_VALID) for frames whose
        payload spans several buffers, in one C call; the next seq and the frame lengths, or
        None if the buffers can't hold what they should (the C side checks every access).
        With `tso`, frames of more than one segment get the partial (pseudo-header) sum."""
        tmpl = conn.template(mac, self._our_mac)
        # LinkCaps.l4_csum False: the guest checks nothing (GUEST_CSUM) and no capture shows
        # the frames, so the payload need not be read again
        csum = self.l4_csum
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
            self.h._log.warning("tcp-sg", "%r: frame buffers too short for headers", conn)
            return None
        return seq, _sg_ffi.unpack(out, count)
