"""Namespace helpers: setns/unshare/mount/inotify (through the small cffi module `_ns`), uid and
gid maps, and running a function inside another network namespace.

pasta's main process never switches network namespace after start-up; work that must happen in
the target namespace (opening the tap, netlink, sockets, /proc/net files) runs in a short-lived
helper thread that `setns()`es its own network namespace first (`call_in_netns`). File
descriptors are shared by all threads, so whatever the helper opens stays usable (and bound to
the namespace it was created in) after the thread has ended.
"""

from __future__ import annotations

import os
import queue
import signal
import struct
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from vhostpasst._ns import ffi, lib

T = TypeVar("T")

CLONE_FS = 0x00000200
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000

MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18

IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVED_FROM = 0x00000040
_INOTIFY_EVENT = struct.Struct("iIII")  # wd, mask, cookie, len; then len bytes of name

NETNS_RUN_DIR = "/run/netns"


def _check(ret: int, what: str, path: str | None = None) -> int:
    if ret < 0:
        err = ffi.errno
        raise OSError(err, f"{what}: {os.strerror(err)}", path)
    return ret


def setns(fd: int, nstype: int = 0) -> None:
    _check(lib.vp_setns(fd, nstype), "setns")


def unshare(flags: int) -> None:
    _check(lib.vp_unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    def c(s: str | None) -> Any:
        return ffi.NULL if s is None else s.encode()

    _check(lib.vp_mount(c(source), c(target), c(fstype), flags, c(data)), "mount", target)


def pivot_root(new_root: str, put_old: str) -> None:
    _check(lib.vp_pivot_root(new_root.encode(), put_old.encode()), "pivot_root", new_root)


def umount2(target: str, flags: int) -> None:
    _check(lib.vp_umount2(target.encode(), flags), "umount2", target)


def inotify_init(flags: int = IN_NONBLOCK | IN_CLOEXEC) -> int:
    return _check(lib.vp_inotify_init1(flags), "inotify_init1")


def inotify_add_watch(fd: int, path: str, mask: int) -> int:
    return _check(lib.vp_inotify_add_watch(fd, path.encode(), mask), "inotify_add_watch", path)


def inotify_events(data: bytes) -> list[tuple[int, str]]:
    """(mask, name) of each event in one read() of an inotify fd."""
    out = []
    off = 0
    while off + _INOTIFY_EVENT.size <= len(data):
        _wd, mask, _cookie, length = _INOTIFY_EVENT.unpack_from(data, off)
        off += _INOTIFY_EVENT.size
        name = data[off : off + length].split(b"\0", 1)[0].decode(errors="replace")
        off += length
        out.append((mask, name))
    return out


def netns_path(spec: str) -> str:
    """--netns PATH|NAME: a bare NAME is /run/netns/NAME (as `ip netns` names them)."""
    return spec if "/" in spec else os.path.join(NETNS_RUN_DIR, spec)


def same_ns(path_a: str, path_b: str) -> bool:
    a, b = os.stat(path_a), os.stat(path_b)
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def join_userns(path: str) -> bool:
    """setns() into the user namespace at `path` unless we are in it already (setns to our own
    user namespace is EINVAL). Must run while the process is single-threaded."""
    if same_ns(path, "/proc/self/ns/user"):
        return False
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns(fd, CLONE_NEWUSER)
    finally:
        os.close(fd)
    return True


def write_id_maps(uid: int, gid: int, pid: str = "self") -> None:
    """Map root in the (new) user namespace to uid/gid outside, as pasta does: setgroups must
    be denied before an unprivileged process may write gid_map."""
    with open(f"/proc/{pid}/uid_map", "w") as f:
        f.write(f"0 {uid} 1")
    try:
        with open(f"/proc/{pid}/setgroups", "w") as f:
            f.write("deny")
    except FileNotFoundError:
        pass  # kernels before 3.19 have no setgroups file
    with open(f"/proc/{pid}/gid_map", "w") as f:
        f.write(f"0 {gid} 1")


class NsThread:
    """A long-lived helper thread inside the network namespace `netns_fd`, serving calls.

    Once the daemon has given up root (isolation.py), it may no longer setns() into a
    namespace owned by the initial user namespace; a thread that entered before keeps that
    namespace, so later namespace sockets (the splice pool, UDP reply sockets, automatic -T/-U
    listeners) come from it. Registered per fd: call_in_netns(netns_fd, ...) uses it."""

    def __init__(self, netns_fd: int) -> None:
        self.netns_fd = netns_fd
        self._requests: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        first = _Request(lambda: setns(netns_fd, CLONE_NEWNET))
        self._thread = threading.Thread(target=self._serve, args=(first,), name="netns-helper",
                                        daemon=True)
        self._thread.start()
        first.result()  # raises if setns() failed (the thread has ended then)
        _helpers[netns_fd] = self

    def _serve(self, first: _Request) -> None:
        # process signals (SIGTERM, SIGCHLD...) must reach the main thread: one taken by
        # this thread would not wake the main thread's epoll_wait()
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        first.execute()
        if first.error is not None:
            return
        while (req := self._requests.get()) is not None:
            req.execute()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if threading.current_thread() is self._thread:
            return fn(*args, **kwargs)
        req = _Request(lambda: fn(*args, **kwargs))
        self._requests.put(req)
        return req.result()

    def run(self, fn: Callable[[], None]) -> None:
        """isolation.drop's thread runner."""
        self.call(fn)

    def close(self) -> None:
        if _helpers.get(self.netns_fd) is self:
            del _helpers[self.netns_fd]
        if self._thread.is_alive():
            self._requests.put(None)
            self._thread.join(5)


class _Request:
    def __init__(self, fn: Callable[[], Any]) -> None:
        self.fn = fn
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def execute(self) -> None:
        try:
            self.value = self.fn()
        except BaseException as e:  # handed to the caller
            self.error = e
        self.done.set()

    def result(self) -> Any:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value


_helpers: dict[int, NsThread] = {}


def call_in_netns(netns_fd: int, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run fn(*args, **kwargs) in a helper thread that has joined the network namespace
    `netns_fd` (the long-lived NsThread for that fd if there is one, else a short-lived
    thread); return its result or raise its exception. Paths that depend on the namespace
    must use /proc/thread-self (not /proc/self, which is the main thread's)."""
    helper = _helpers.get(netns_fd)
    if helper is not None:
        return helper.call(fn, *args, **kwargs)
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            setns(netns_fd, CLONE_NEWNET)
            result.append(fn(*args, **kwargs))
        except BaseException as e:  # handed to the caller below
            error.append(e)

    t = threading.Thread(target=body, name="netns-call", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]
