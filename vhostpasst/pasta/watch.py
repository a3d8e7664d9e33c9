"""Quitting when the namespace goes (attach mode, unless --no-netns-quit)."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

from vhostpasst.core.loop import EPOLLIN, Loop, Timer
from vhostpasst.system import netns

log = logging.getLogger("vhostpasst")

QUIT_POLL_INTERVAL = 1.0  # /proc paths: inotify does not report their removal


class NetnsWatch:
    """Calls `on_gone` once the namespace file disappears: inotify IN_DELETE on its directory,
    or (for /proc, /sys and devpts, where inotify says nothing) a check every second."""

    def __init__(self, loop: Loop, path: str, on_gone: Callable[[], None]) -> None:
        self.loop = loop
        self.path = path
        self.on_gone = on_gone
        self.dir, self.base = os.path.split(os.path.abspath(path))
        # held open: the sandbox empties our root, so the check goes relative to it
        self.dir_fd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fd: int | None = None
        self.timer: Timer | None = None
        fstype = _fs_type(self.dir)
        if fstype in ("proc", "sysfs", "devpts") or self.dir.startswith("/proc/"):
            self.timer = loop.call_later(QUIT_POLL_INTERVAL, self._poll)
        else:
            self.fd = netns.inotify_init()
            netns.inotify_add_watch(self.fd, self.dir, netns.IN_DELETE)
            loop.add_fd(self.fd, EPOLLIN, self._on_inotify)

    def _gone(self) -> bool:
        try:
            fd = os.open(self.base, os.O_PATH | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except PermissionError:
            return False
        except OSError:
            return True
        os.close(fd)
        return False

    def _poll(self) -> None:
        if self._gone():
            log.info("namespace %s is gone, exiting", self.path)
            self.on_gone()
        else:
            self.timer = self.loop.call_later(QUIT_POLL_INTERVAL, self._poll)

    def _on_inotify(self, _mask: int) -> None:
        assert self.fd is not None
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        for mask, name in netns.inotify_events(data):
            if mask & netns.IN_DELETE and name == self.base:
                log.info("namespace %s is gone, exiting", self.path)
                self.on_gone()
                return

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fd is not None:
            self.loop.remove_fd(self.fd)
            os.close(self.fd)
            self.fd = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _fs_type(path: str) -> str:
    """The filesystem type of the mount holding `path` (longest matching mount point)."""
    best, best_type = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                cols = line.split()
                if len(cols) < 3:
                    continue
                mnt = cols[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, best_type = mnt, cols[2]
    except OSError:
        pass
    return best_type
