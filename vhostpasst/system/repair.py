"""The TCP_REPAIR helper protocol: passt-repair's, so either helper serves either daemon.

Theory of operation. Setting TCP_REPAIR needs CAP_NET_ADMIN, which the sandboxed daemon
has not got; a small privileged helper does it for the sockets the daemon hands it. The
daemon listens on a UNIX stream socket (`--repair-path`, by default the vhost-user socket's
path with ".repair" appended) and the helper connects to it (`vhostpasst-repair PATH`, or
passt's `passt-repair PATH`). One helper at a time: another one is accepted and closed at
once. A request is one signed byte, the TCP_REPAIR value to set (ON 1, OFF 0, OFF_NO_WP
-1), sent in one message with 1 to SCM_MAX_FD socket fds as SCM_RIGHTS; the helper sets
the option on every socket, closes its copies, and echoes the byte. More sockets go as more
requests. EOF ends the helper (exit status 0).

Daemon side (`RepairServer`): each request waits for its echo at most REPLY_TIMEOUT (socket
timeouts: the sandbox allows no poll(2)); a helper that is gone, answers another byte, sends
unasked data or stays silent fails the request (RepairError) and is dropped, so a
migration fails cleanly and the next helper may connect. Helper side (`serve`): a message
without fds, with a command outside the three, or with fds that are not TCP sockets ends the
helper with status 1 and no echo (passt-repair's behaviour), which the daemon sees as EOF.

Nothing uses it for TCP yet: the daemon accepts a helper and logs it; moving connections
(issue 21's later step) will call `RepairServer.set()`.
"""

from __future__ import annotations

import array
import enum
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Callable, Sequence
from typing import Protocol

log = logging.getLogger(__name__)

SCM_MAX_FD = 253  # the kernel's limit of fds in one SCM_RIGHTS message (include/net/scm.h)
TCP_REPAIR = 19  # linux/tcp.h; not in the socket module
REPLY_TIMEOUT = 5.0  # seconds a helper may take to echo a request
SUFFIX = ".repair"
_TIMEVAL = struct.Struct("@ll")
_UCRED = struct.Struct("@iII")  # pid, uid, gid


class Command(enum.IntEnum):
    """The TCP_REPAIR values (linux/tcp.h), one signed byte on the wire."""

    ON = 1
    OFF = 0
    OFF_NO_WP = -1  # off, without sending a window probe


class RepairError(Exception):
    """A request the helper did not carry out (no helper, helper gone or misbehaving)."""


class EventLoop(Protocol):
    def add_fd(self, fd: int, events: int, callback: Callable[[int], None],
               on_error: Callable[[Exception], None] | None = None) -> None: ...

    def remove_fd(self, fd: int) -> None: ...


def default_path(socket_path: str) -> str:
    return socket_path + SUFFIX


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        pid, _, _ = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                  _UCRED.size))
    except OSError:
        return None
    return int(pid)


class RepairServer:
    """The daemon's end: the listening socket at `path` and the helper connected to it."""

    def __init__(self, loop: EventLoop, path: str, timeout: float = REPLY_TIMEOUT) -> None:
        self.loop = loop
        self.path = path
        self.timeout = timeout
        self.helper: socket.socket | None = None
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self._bind(path)
            self.listener.listen(1)
            self.listener.setblocking(False)
            loop.add_fd(self.listener.fileno(), select.EPOLLIN, self._accept)
        except OSError:
            self.listener.close()
            raise
        log.info("TCP_REPAIR helper socket: %s (not used for TCP connections yet)", path)

    def _bind(self, path: str) -> None:
        try:
            self.listener.bind(path)
            return
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
        # a socket file left behind by a daemon gone: take it over, unless one listens there
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
                self.listener.bind(path)
                return
        raise OSError(errno.EADDRINUSE, f"{path}: another process listens there")

    @property
    def connected(self) -> bool:
        return self.helper is not None

    def _accept(self, mask: int) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        pid = _peer_pid(conn)
        if self.helper is not None:
            log.info("TCP_REPAIR helper (pid %s) turned away: one is connected already", pid)
            conn.close()
            return
        conn.setblocking(True)
        tv = _TIMEVAL.pack(int(self.timeout), int(self.timeout % 1 * 1_000_000))
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self.helper = conn
        # readable between requests: the helper hung up, or sent what nobody asked for
        self.loop.add_fd(conn.fileno(), select.EPOLLIN | select.EPOLLRDHUP, self._unasked)
        log.info("TCP_REPAIR helper connected (pid %s)", pid)

    def _unasked(self, mask: int) -> None:
        self.drop("the helper hung up" if mask & (select.EPOLLRDHUP | select.EPOLLHUP)
                  else "the helper sent data unasked")

    def drop(self, reason: str) -> None:
        helper, self.helper = self.helper, None
        if helper is not None:
            self.loop.remove_fd(helper.fileno())
            helper.close()
            log.info("TCP_REPAIR helper dropped: %s", reason)

    def set(self, fds: Sequence[int], command: Command) -> None:
        """Have the helper set TCP_REPAIR to `command` on every socket of `fds`, in requests
        of at most SCM_MAX_FD; RepairError (the helper dropped) if any is not carried out."""
        for start in range(0, len(fds), SCM_MAX_FD):
            self._request(fds[start:start + SCM_MAX_FD], command)

    def _request(self, fds: Sequence[int], command: Command) -> None:
        helper = self.helper
        if helper is None:
            raise RepairError("no TCP_REPAIR helper connected")
        byte = struct.pack("b", command)
        try:
            helper.sendmsg([byte], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                     array.array("i", fds).tobytes())])
            reply = helper.recv(1)
        except OSError as e:
            reason = "no reply in time" if e.errno == errno.EAGAIN else os.strerror(e.errno or 0)
            self.drop(reason)
            raise RepairError(f"TCP_REPAIR helper: {reason}") from None
        if reply != byte:
            reason = ("it hung up" if not reply
                      else f"it answered {struct.unpack('b', reply)[0]} to {int(command)}")
            self.drop(reason)
            raise RepairError(f"TCP_REPAIR helper: {reason}")

    def close(self) -> None:
        self.drop("closing")
        self.loop.remove_fd(self.listener.fileno())
        self.listener.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass


# --- the helper's end -------------------------------------------------------------------------

_CMSG_SPACE = socket.CMSG_SPACE(SCM_MAX_FD * array.array("i").itemsize)


class HelperError(Exception):
    """What ends the helper with status 1."""


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def serve_one(sock: socket.socket) -> bool:
    """Carry out one request from the daemon; False at EOF. HelperError when the request
    is refused (its fds closed, nothing echoed)."""
    try:
        data, anc, flags, _ = sock.recvmsg(1, _CMSG_SPACE, socket.MSG_CMSG_CLOEXEC)
    except ConnectionResetError:
        return False
    fds = array.array("i")
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
    if not data:
        _close_all(fds)
        return False
    try:
        if flags & socket.MSG_CTRUNC or not fds:
            raise HelperError("no or bad ancillary data from the daemon")
        value = struct.unpack("b", data)[0]
        if value not in tuple(Command):
            raise HelperError(f"unsupported command {value}")
        for fd in fds:
            try:
                target = socket.socket(fileno=fd)  # ENOTSOCK for what is not a socket
                try:
                    target.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, value)
                finally:
                    target.detach()  # closed below, with the others
            except OSError as e:
                raise HelperError(f"setting TCP_REPAIR to {value} on fd {fd}: "
                                  f"{os.strerror(e.errno or 0)}") from None
    finally:
        _close_all(fds)
    sock.sendall(data)
    return True
