"""Logging for the daemon: where messages go, the size-capped log file, rate limiting.

Destinations (passt's rules, simplified):
  * `log_file` given: the size-capped file (and stderr too while in the foreground);
  * else foreground or debug: stderr (with timestamps when debugging);
  * else syslog (LOG_DAEMON through /dev/log), or stderr if there is no syslog socket.
Levels: `quiet` -> WARNING, default INFO, `debug` -> DEBUG, `trace` -> TRACE (5, per packet).
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from vhostpasst import __version__

TRACE = 5
logging.addLevelName(TRACE, "TRACE")

LOG_SIZE_DEFAULT = 1024 * 1024
ROTATE_CUT = 0.30  # share of the cap dropped (oldest lines) when the file is full

# Handlers installed by setup_logging(), so calling it again replaces rather than adds.
_installed: list[logging.Handler] = []
_until_detached: list[logging.Handler] = []  # stderr of a daemon not in the background yet


def trace(logger: logging.Logger, msg: str, *args: object) -> None:
    """Per-packet message, only formatted when --trace is on."""
    if logger.isEnabledFor(TRACE):
        logger.log(TRACE, msg, *args)


class _ElapsedFormatter(logging.Formatter):
    """`<seconds since start>: message`, like passt's log file and debug output."""

    def __init__(self, start: float) -> None:
        super().__init__()
        self.start = start

    def format(self, record: logging.LogRecord) -> str:
        return f"{record.created - self.start:.4f}: {super().format(record)}"


class SizeCappedFileHandler(logging.Handler):
    """A log file truncated on open, starting with a header line, never larger than `size`.

    When a line would take the file past the cap, the oldest ~30% (after the header, cut at a
    line boundary) is dropped in place: the file keeps between ~60% and 100% of the cap and
    always holds the newest lines. Rewriting is fine at these sizes (1 MiB default).
    """

    def __init__(self, path: str, size: int, header: str) -> None:
        super().__init__()
        self.path = path
        self.size = max(size, 256)  # room for a header and a few lines, whatever we are given
        # read back through the same fd when cutting: the sandbox leaves no path to open
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        self._header = (header.rstrip("\n") + "\n").encode()[: self.size // 4]
        os.write(self._fd, self._header)
        self._len = len(self._header)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = (self.format(record) + "\n").encode(errors="replace")
            room = self.size - len(self._header)
            if len(line) > room // 2:  # one huge line must not wipe the whole history
                line = line[: room // 2 - 1] + b"\n"
            if self._len + len(line) > self.size:
                self._rotate()
            os.pwrite(self._fd, line, self._len)
            self._len += len(line)
        except Exception:
            self.handleError(record)

    def _rotate(self) -> None:
        """Drop the oldest lines after the header: about ROTATE_CUT of the cap."""
        data = os.pread(self._fd, self._len, 0)
        body = data[len(self._header) :]
        cut = int(self.size * ROTATE_CUT)
        newline = body.find(b"\n", cut - 1)
        keep = body[newline + 1 :] if newline >= 0 else b""
        os.pwrite(self._fd, keep, len(self._header))
        self._len = len(self._header) + len(keep)
        os.ftruncate(self._fd, self._len)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        super().close()


ENV_SYSLOG = "VHOSTPASST_SYSLOG"  # test hook: another socket than /dev/log


def _level(debug: bool, trace: bool, quiet: bool) -> int:
    if trace:
        return TRACE
    if debug:
        return logging.DEBUG
    if quiet:
        return logging.WARNING
    return logging.INFO


def setup_logging(
    prog: str,
    foreground: bool,
    debug: bool,
    trace: bool,
    quiet: bool,
    log_file: str | None,
    log_size: int = LOG_SIZE_DEFAULT,
) -> list[logging.Handler]:
    """Configure the root logger for the daemon; returns the handlers it installed."""
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()
    _until_detached.clear()

    start = time.time()
    plain = logging.Formatter(f"{prog}: %(message)s")
    handlers: list[logging.Handler] = []
    stderr_wanted = foreground or ((debug or trace) and log_file is None)
    if log_file is not None:
        header = f"{prog} {__version__}: {os.path.realpath(sys.argv[0])} ({os.getpid()})"
        fh = SizeCappedFileHandler(log_file, log_size, header)
        fh.setFormatter(_ElapsedFormatter(start))
        handlers.append(fh)
    if stderr_wanted:
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(_ElapsedFormatter(start) if (debug or trace) else logging.Formatter())
        handlers.append(sh)
    if not handlers:
        # connected now: the sandbox leaves no /dev/log to connect to later
        dev_log = os.environ.get(ENV_SYSLOG, "/dev/log")
        if os.path.exists(dev_log):
            try:
                syslog = logging.handlers.SysLogHandler(
                    address=dev_log, facility=logging.handlers.SysLogHandler.LOG_DAEMON
                )
                syslog.setFormatter(logging.Formatter(f"{prog}[{os.getpid()}]: %(message)s"))
                handlers.append(syslog)
            except OSError:
                pass  # no syslog daemon listening: fall back to stderr below
        if not handlers:
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(plain)
            handlers.append(sh)
            stderr_wanted = True
    if not stderr_wanted:
        # Until the daemon goes to the background its caller reads stderr, as passt's does:
        # podman and libvirt show it when we exit 1 ("cannot forward ports: ..."), a user at
        # a terminal sees the summary and the qemu command line. detached() removes it.
        sh = logging.StreamHandler(sys.stderr)
        sh.setFormatter(logging.Formatter())
        handlers.append(sh)
        _until_detached.append(sh)

    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(_level(debug, trace, quiet))
    _installed.extend(handlers)
    return handlers


def detached() -> None:
    """The daemon is in the background now (stdio on /dev/null): no more stderr."""
    root = logging.getLogger()
    for handler in _until_detached:
        root.removeHandler(handler)
        if handler in _installed:
            _installed.remove(handler)
    _until_detached.clear()


@dataclass
class _Slot:
    last: float  # when we last let a message through
    suppressed: int = 0


class RateLimitedLog:
    """Let one message per key through every `interval` seconds; count the rest.

    The next message let through for a key says how many were suppressed since the last one,
    so a flood of bad frames costs one line per interval, not one per frame.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1024,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self.max_keys = max_keys
        self._slots: dict[object, _Slot] = {}

    def log(self, level: int, key: object, msg: str, *args: object,
            exc_info: BaseException | None = None) -> bool:
        """Log `msg % args` at `level` unless `key` was logged less than `interval` ago
        (with `exc_info`'s traceback). Returns True if the message was emitted."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        slot = self._slots.get(key)
        if slot is not None and now - slot.last < self.interval:
            slot.suppressed += 1
            return False
        suppressed = slot.suppressed if slot is not None else 0
        if slot is None:
            if len(self._slots) >= self.max_keys:  # keys made from peer data must not grow us
                self._slots.clear()
            self._slots[key] = _Slot(now)
        else:
            slot.last = now
            slot.suppressed = 0
        if suppressed:
            msg += " (%d similar messages suppressed)"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args, exc_info=exc_info)
        return True

    def error(self, key: object, msg: str, *args: object,
              exc_info: BaseException | None = None) -> bool:
        return self.log(logging.ERROR, key, msg, *args, exc_info=exc_info)

    def warning(self, key: object, msg: str, *args: object) -> bool:
        return self.log(logging.WARNING, key, msg, *args)

    def debug(self, key: object, msg: str, *args: object) -> bool:
        return self.log(logging.DEBUG, key, msg, *args)

