"""The process skeleton passt mode (daemon.py) and pasta mode (pasta/session.py) share.

Theory of operation, in the order a run uses it:

1. `Process()` first of all: SIGTERM and SIGQUIT are caught from the first line on. During
   set-up a signal is only recorded (raising in the middle of set-up would leave half-made
   state); `run()` arms them, and a signal recorded before raises then.
2. `open_pid_file()` while we may still create files (before giving up root, before the
   sandbox empties our root); the pid goes in at "ready".
3. `to_background()` (unless --foreground) forks while still single-threaded. The parent
   waits for the child to say it is ready, writes the child's pid into the pid file and exits
   0, or exits 1 if the child failed first. The child starts a session of its own.
4. `ready()` once every listener is bound and privileges are gone: in the background, detach
   (stdio on /dev/null, logging no more to stderr) and release the parent; in the
   foreground, write our own pid. Whoever waits on either may connect at once.
5. `run(loop)` until the loop stops or a terminate signal ends it; either way the caller
   tears down and exits 0, as passt does.

A terminate signal raises `Terminate`, a BaseException (as SystemExit): the loop's callbacks
catch Exception so a bug can't stop the daemon, and one of them once swallowed a SIGTERM that
came during it (the process kept running).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from vhostpasst.core.log import detached
from vhostpasst.core.loop import Loop

log = logging.getLogger("vhostpasst")

TERMINATE_SIGNALS = (signal.SIGTERM, signal.SIGQUIT)


class Terminate(BaseException):
    """Raised from the SIGTERM/SIGQUIT handler to leave the loop at once; args[0] is the
    signal number."""


class TerminateSignals:
    """SIGTERM/SIGQUIT handlers, recording until armed and raising `Terminate` after."""

    def __init__(self) -> None:
        self.pending: int | None = None
        self.armed = False
        for signum in TERMINATE_SIGNALS:
            signal.signal(signum, self._handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)

    def _handler(self, signum: int, _frame: object) -> None:
        if self.armed:
            raise Terminate(signum)
        self.pending = signum

    def arm(self) -> None:
        """From now on a signal raises; one that came during set-up raises now."""
        self.armed = True
        if self.pending is not None:
            raise Terminate(self.pending)


class Process:
    """Signals, pid file, background and readiness of one passt or pasta run."""

    def __init__(self) -> None:
        self.signals = TerminateSignals()
        self.pid_fd: int | None = None
        self.pid_path = ""
        self.ready_fd: int | None = None  # in the background: the pipe to the waiting parent

    def open_pid_file(self, path: str) -> None:
        """Create (truncate) the pid file now; OSError if we cannot."""
        self.pid_path = path
        self.pid_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                              0o644)

    def _write_pid(self, pid: int) -> None:
        if self.pid_fd is not None:
            fd, self.pid_fd = self.pid_fd, None
            try:
                os.write(fd, f"{pid}\n".encode())
            finally:
                os.close(fd)

    def to_background(self) -> None:
        """Fork: we go on as the child; the parent waits for `ready()` (see the module)."""
        r, w = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            os.close(w)
            for signum in TERMINATE_SIGNALS:  # the parent only waits: a signal ends it
                signal.signal(signum, signal.SIG_DFL)
            with os.fdopen(r, "rb") as f:
                ready = f.read(1) == b"r"
            if ready:
                try:
                    self._write_pid(pid)
                except OSError as e:
                    print(f"cannot write {self.pid_path}: {e.strerror}", file=sys.stderr)
                    os.kill(pid, signal.SIGTERM)
                    os._exit(1)
            os._exit(0 if ready else 1)
        os.close(r)
        os.set_inheritable(w, False)
        self.ready_fd = w
        if self.pid_fd is not None:  # the parent's to write
            os.close(self.pid_fd)
            self.pid_fd = None
        os.setsid()

    def ready(self, devnull: int) -> None:
        """Everything is in place. In the background: detach from the terminal (stdio on
        `devnull`, opened before the sandbox emptied the root) and release the parent; in the
        foreground: our pid into the pid file."""
        if self.ready_fd is None:
            self._write_pid(os.getpid())
            return
        detached()
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        os.close(devnull)
        os.write(self.ready_fd, b"r")
        os.close(self.ready_fd)
        self.ready_fd = None

    def run(self, loop: Loop) -> None:
        """Run the loop until it stops or a terminate signal (logged) ends it."""
        try:
            self.signals.arm()
            loop.run()
        except Terminate as e:
            log.info("exiting on signal %d", e.args[0])
