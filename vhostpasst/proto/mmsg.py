"""recvmmsg/sendmmsg for the UDP paths (proto/udp.py, pasta/udp_splice.py), through the
`_mmsg` C helper when it is built; without it (a plain source tree) `_mlib` is None and the
callers make one system call per datagram.
"""

from __future__ import annotations

import socket
from ipaddress import IPv4Address, IPv6Address

from vhostpasst.core.flow import RX_BATCH

try:
    from vhostpasst._mmsg import ffi as _mffi  # type: ignore[import-not-found,unused-ignore]
    from vhostpasst._mmsg import lib as _mlib  # type: ignore[import-not-found,unused-ignore]
except ImportError:  # not built (plain source tree): one system call per datagram
    _mffi = _mlib = None

MMSG_MAX = 64  # VP_MMSG_MAX in cffi_build/mmsg.c


class Mmsg:
    """Arrays for vp_recvmmsg/vp_sendmmsg, allocated once; buffers are passed per call."""

    def __init__(self, size: int = max(RX_BATCH, 1)) -> None:
        assert _mffi is not None
        self.size = min(size, MMSG_MAX)
        self._bufs = _mffi.new("uint8_t *[]", self.size)
        self._lens = _mffi.new("size_t[]", self.size)
        self._out_lens = _mffi.new("size_t[]", self.size)
        self._flags = _mffi.new("int[]", self.size)
        self._addrs = _mffi.new("struct vp_addr[]", self.size)
        self._dsts = _mffi.new("struct vp_addr[]", self.size)

    def _fill(self, views: list[memoryview], writable: bool) -> list[object]:
        keep = []  # the cdata must outlive the call
        for i, view in enumerate(views[:self.size]):
            c = _mffi.from_buffer("uint8_t[]", view, require_writable=writable)
            keep.append(c)
            self._bufs[i] = c
            self._lens[i] = len(view)
        return keep

    def recv(self, fd: int, views: list[memoryview], want_addr: bool,
             want_dst: bool = False) -> int:
        """Datagrams received into `views` (their count), or -errno. `want_dst`: keep each
        datagram's destination (the socket has IP_PKTINFO / IPV6_RECVPKTINFO) for
        destination()."""
        _keep = self._fill(views, True)
        n = min(len(views), self.size)
        addrs = self._addrs if want_addr else _mffi.NULL
        dsts = self._dsts if want_dst else _mffi.NULL
        return int(_mlib.vp_recvmmsg(fd, self._bufs, self._lens, n, self._out_lens,
                                     self._flags, addrs, dsts))

    def destination(self, i: int) -> tuple[IPv4Address | IPv6Address, int] | None:
        """(address, interface index) datagram i of the last recv(want_dst=True) was sent
        to, or None if the kernel did not say."""
        d = self._dsts[i]
        raw = bytes(_mffi.buffer(d.addr))
        if d.family == socket.AF_INET:
            return IPv4Address(raw[:4]), int(d.scope_id)
        if d.family == socket.AF_INET6:
            return IPv6Address(raw), int(d.scope_id)
        return None

    def result(self, i: int, want_addr: bool) -> tuple[int, int, tuple | None]:
        """(length, msg_flags, (host, port) or None) of datagram i of the last recv()."""
        addr: tuple | None = None
        if want_addr:
            a = self._addrs[i]
            raw = bytes(_mffi.buffer(a.addr))
            if a.family == socket.AF_INET:
                addr = (str(IPv4Address(raw[:4])), a.port)
            elif a.family == socket.AF_INET6:
                addr = (str(IPv6Address(raw)), a.port, 0, a.scope_id)
        return int(self._out_lens[i]), int(self._flags[i]), addr

    def send(self, fd: int, payloads: list[memoryview]) -> int:
        """Datagrams sent on connected socket `fd` (a prefix of `payloads`), or -errno."""
        _keep = self._fill(payloads, False)
        return int(_mlib.vp_sendmmsg(fd, self._bufs, self._lens, min(len(payloads),
                                                                     self.size)))
