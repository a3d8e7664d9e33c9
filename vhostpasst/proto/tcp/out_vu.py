"""TCP data to the guest read straight into its vhost-user RX buffers: the output path of
to_guest.py for a link whose LinkCaps say `guest_fill` (vhost-user with mergeable buffers and
GUEST_CSUM, no --pcap: only headers are written into the frames, no checksum over the payload).

One C call (Link.rx_fill()) pops the guest's buffers and checks them against the guest's
memory (virtio's ring.c), then calls our reader, cffi_build/vhostpasst/tcp_vu.c's vp_tcp_read
(a recvmsg with MSG_PEEK of the connection's socket into the frames' payload iovecs: the
`struct vp_tcp_read` below), and our writer, vp_tcp_fill_writer (each frame's headers from the
connection's template: the `struct vp_tcp_fill` below, template, seq, ack, window, MSS), and
puts the frames in the used ring; a memoryview per guest buffer and the Python between those
steps cost more than the steps. The ACK number and window go in before the read. Where
the ring's shape is not one the C handles (chains of several buffers), rx_fill() declines
and the frames go through link buffers as for any link (BufOutput).
"""

from __future__ import annotations

import time
from typing import Any

from vhostpasst._dataplane import ffi as _dp_ffi
from vhostpasst._dataplane import lib as _dp_lib
from vhostpasst._tcpsg import ffi as _sg_ffi
from vhostpasst._tcpsg import lib as _sg_lib
from vhostpasst.link.base import IOV_MAX, Link, LinkCaps, Tso
from vhostpasst.proto.tcp.conn import _PEEK_FLAGS, TcpConn
from vhostpasst.proto.tcp.control import TcpControl
from vhostpasst.proto.tcp.out_buf import BufOutput, CFilled, Peeked
from vhostpasst.wire import tcp as wtcp
from virtio.ring import FillSite, RxFiller


def _address(cdata: Any) -> int:
    return int(_sg_ffi.cast("uintptr_t", cdata))


class GuestFillOutput(BufOutput):
    """Data frames read and committed by the link's C in one call (see the module
    docstring); BufOutput's path where the link declines."""

    def __init__(self, handler: TcpControl, caps: LinkCaps) -> None:
        super().__init__(handler, caps)
        # Link.rx_fill()'s frame writer (cffi_build/vhostpasst/tcpsg.c) and its argument, as
        # addresses: the link's C calls it between the read and the commit. `_fill_for` is whose
        # template and addresses the argument holds.
        self._fill: Any = _sg_ffi.new("struct vp_tcp_fill *")
        self._fill.flags, self._fill.last_flags = wtcp.ACK, wtcp.ACK | wtcp.PSH
        self._fill_for: tuple[TcpConn, bytes] | None = None
        # vp_tcp_read's argument: the socket (set per call) and the peek's flags
        self._read: Any = _sg_ffi.new("struct vp_tcp_read *")
        self._read.flags = _PEEK_FLAGS
        self._filler = RxFiller(_address(_sg_ffi.addressof(_sg_lib, "vp_tcp_read")),
                                _address(self._read),
                                _address(_sg_ffi.addressof(_sg_lib, "vp_tcp_fill_writer")),
                                _address(self._fill))
        # the data plane's fill (send_c): its view of the link's RX queue, and its results
        rx = self._rx = _dp_ffi.new("struct dp_rx *")
        filler = self._filler
        rx.reader, rx.reader_arg = filler.reader, filler.reader_arg
        rx.writer, rx.writer_arg = filler.writer, filler.writer_arg
        rx.max_views = IOV_MAX
        self._res = _dp_ffi.new("uint64_t[]", 6)
        self._site: FillSite | None = None
        self._tso4, self._tso6 = caps.tso4, caps.tso6

    def send_c(self, conn: TcpConn, link: Link) -> CFilled | None:
        """to_guest._from_sock() for a connection in the data plane's table: the sizing, the
        ACK number and window, the read into the guest's buffers and what follows, in one C
        call (dataplane.c's dp_fill(), which calls the ring's vr_rx_fill() itself); the
        queue's bookkeeping stays the link's (c_fill_finish()). None: Python's path (nothing
        done but the discard). OSError: the read failed, as send()."""
        dataplane = self.h.dataplane
        if dataplane is None:
            return None
        got_site = link.c_fill_site()
        if got_site is None:
            return None
        site, args = got_site
        rx = self._rx
        if site is not self._site:
            self._site = site
            rx.fill, rx.ctx, rx.regions, rx.nregions = site.fill, site.ctx, site.regions, \
                site.nregions
            rx.used, rx.used_len, rx.recs, rx.chrecs = site.used, site.used_len, site.recs, \
                site.chrecs
            rx.num, rx.elems, rx.spare, rx.out = site.num, site.elems, site.spare, site.out
        rx.last_avail, rx.indirect, rx.rearm, rx.hint = args
        rx.tso4, rx.tso6 = self._tso4, self._tso6
        self._fill_for = None  # the C writes its template into the writer's argument
        res = self._res
        done = _dp_lib.dp_fill(dataplane.table, rx, conn.r, res)
        if not res[1]:  # no fill made
            return (0, None, 0) if done else None
        got = link.c_fill_finish(res[2], rx.read)
        if done:
            return res[0], None, 0
        if got is None:  # a ring shape for the general path: nothing was taken
            return None
        return 0, got, res[3]

    def send(self, conn: TcpConn, link: Link, count: int, seg: int, size: int, off: int,
             room: int, tso: Tso | None,
             acked: tuple[int, int] | None = None) -> Peeked | None:
        now = time.monotonic()
        ack, wnd = conn.data_ack_wnd(now)
        mac = self.h.ctx.guest_mac()
        fill = self._fill
        tmpl = conn.template(mac, self._our_mac)
        if self._fill_for != (conn, tmpl):
            fill.tmpl = tmpl
            fill.six = conn.six
            fill.pseudo = conn.pseudo
            self._fill_for = (conn, tmpl)
        fill.seq = conn.seq_to_tap
        fill.ack = ack
        fill.wnd = wnd
        fill.tso_mss = tso.mss if tso is not None else 0
        self._read.fd = conn.fd
        got = link.rx_fill(count, off + size, off, room, self._filler, tso)
        if got is None:  # a ring shape the C leaves to the general path
            return super().send(conn, link, count, seg, size, off, room, tso, (ack, wnd))
        n, sent, caps = got
        if n == 0 and caps == 0:
            return None
        if n == 0:
            return (0, caps, None, ack, wnd)
        conn.last_seen = now
        return (n, caps, fill.seq if sent else None, ack, wnd)
