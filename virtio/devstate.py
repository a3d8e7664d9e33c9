"""Back-end state transfer (VHOST_USER_PROTOCOL_F_DEVICE_STATE), device-agnostic.

Theory of operation (vhost-user.rst, "Migrating back-end state"): with the rings stopped,
the front end sends SET_DEVICE_STATE_FD {direction, phase} with one fd, a pipe end. SAVE (the
migration's source): we write the device's state into it and close it, and the front end reads
until EOF. LOAD (the destination): the front end writes the state and closes its end, and we
read until EOF. Either side then sends CHECK_DEVICE_STATE and we answer 0 if the transfer (and,
on LOAD, the device's acceptance of the state) succeeded. The state is opaque here: the device
supplies it as bytes (`Device.save_state()`) and takes it back whole (`Device.load_state()`).

The transfer runs in the back end's event loop, never blocking it: the fd is made
non-blocking and watched (EPOLLOUT to save, EPOLLIN to load); each wake-up moves at most
CHUNK bytes, so a front end that never reads or never writes leaves the transfer pending and
every queue served. A LOAD never reads more than the device's `max_state_size` (one byte more
fails it). When CHECK comes, a LOAD still pending drains what the pipe holds (the front end
has closed its end by then, so the rest is there, and bounded by the cap); a transfer that
still has not reached its end fails.

`StateTransfer` is one transfer; the back end keeps at most one, from SET_DEVICE_STATE_FD to
the CHECK_DEVICE_STATE that takes its result.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import logging
import os
import select
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)

CHUNK = 64 * 1024  # bytes moved per wake-up: one pipe's default capacity
REPLY_NOFD = 0x100  # SET_DEVICE_STATE_FD's reply bit 8: we keep the front end's fd


class Direction(enum.IntEnum):
    SAVE = 0  # back end -> front end (the source)
    LOAD = 1  # front end -> back end (the destination)


class Phase(enum.IntEnum):
    STOPPED = 0  # the only phase the spec defines: the device is suspended


class StateError(Exception):
    """A device refused its state, or a transfer failed."""


class StateDevice(Protocol):
    """What a transfer needs of the device (virtio.backend.Device has it)."""

    max_state_size: int

    def save_state(self) -> bytes: ...

    def load_state(self, data: bytes) -> None: ...


class EventLoop(Protocol):
    def add_fd(self, fd: int, events: int, callback: Callable[[int], None],
               on_error: Callable[[Exception], None] | None = None) -> None: ...

    def remove_fd(self, fd: int) -> None: ...


class StateTransfer:
    """One SAVE or LOAD over `fd` (which this object owns from now on). `error` is None
    while it succeeds; `done` once the fd reached its end (or failed) and was closed."""

    def __init__(self, loop: EventLoop, fd: int, direction: Direction,
                 device: StateDevice) -> None:
        self.loop = loop
        self.direction = direction
        self.device = device
        self.fd: int | None = fd
        self.done = False
        self.error: str | None = None
        self.moved = 0  # bytes written (SAVE) or read (LOAD)
        self._data = bytearray()
        try:
            os.set_blocking(fd, False)
            saving = direction == Direction.SAVE
            if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == (
                    os.O_RDONLY if saving else os.O_WRONLY):
                raise StateError(f"the fd is not open for {'writing' if saving else 'reading'}")
            if direction == Direction.SAVE:
                data = device.save_state()
                if len(data) > device.max_state_size:
                    raise StateError(f"state of {len(data)} bytes exceeds the device's "
                                     f"{device.max_state_size}")
                self._data[:] = data
            events = select.EPOLLOUT if direction == Direction.SAVE else select.EPOLLIN
            loop.add_fd(fd, events, self._on_ready, on_error=self._on_error)
        except (OSError, StateError) as e:
            self._finish(str(e))
            return
        except Exception as e:  # the device's save_state() is not ours to trust
            log.exception("device state: saving failed")
            self._finish(f"the device failed to save its state: {type(e).__name__}")
            return
        log.info("device state: %s started (%s)", direction.name.lower(),
                 f"{len(self._data)} bytes" if direction == Direction.SAVE
                 else f"at most {device.max_state_size} bytes")

    def _on_ready(self, mask: int) -> None:
        if self.direction == Direction.SAVE:
            self._write()
        else:
            self._read(once=True)

    def _on_error(self, e: Exception) -> None:
        self._finish(f"internal error: {type(e).__name__}: {e}")

    def _write(self) -> None:
        assert self.fd is not None
        try:
            n = os.write(self.fd, self._data[self.moved:self.moved + CHUNK])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._finish(f"writing the state: {os.strerror(e.errno or errno.EIO)}")
            return
        self.moved += n
        if self.moved == len(self._data):
            self._finish(None)

    def _read(self, once: bool) -> None:
        """Read a chunk (`once`), or everything there is now; EOF loads the state."""
        cap = self.device.max_state_size
        while self.fd is not None:
            try:
                chunk = os.read(self.fd, min(CHUNK, cap + 1 - len(self._data)))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self._finish(f"reading the state: {os.strerror(e.errno or errno.EIO)}")
                return
            if not chunk:
                self._load()
                return
            self._data += chunk
            self.moved = len(self._data)
            if len(self._data) > cap:
                self._finish(f"state larger than the device's {cap} bytes")
                return
            if once:
                return

    def _load(self) -> None:
        try:
            self.device.load_state(bytes(self._data))
        except StateError as e:
            self._finish(f"the device refused its state: {e}")
            return
        except Exception as e:  # a bug in the device: the migration fails, we carry on
            log.exception("device state: loading failed")
            self._finish(f"the device failed to load its state: {type(e).__name__}")
            return
        self._finish(None)

    def _finish(self, error: str | None) -> None:
        if self.done:
            return
        self.done = True
        self.error = error
        self._data = bytearray()
        self.close()
        if error is None:
            log.info("device state: %s of %d bytes complete", self.direction.name.lower(),
                     self.moved)
        else:
            log.warning("device state: %s failed: %s", self.direction.name.lower(), error)

    def result(self) -> str | None:
        """CHECK_DEVICE_STATE: None if the transfer succeeded, else why not. A LOAD still
        pending drains the pipe first (the front end closed its end before asking)."""
        if not self.done and self.direction == Direction.LOAD:
            self._read(once=False)
        if not self.done:
            self._finish(f"{self.moved} bytes moved and the end not reached when the front "
                         "end checked")
        return self.error

    def close(self) -> None:
        """Stop watching and close the fd (a reset or disconnect cuts a transfer short)."""
        fd, self.fd = self.fd, None
        if fd is not None:
            self.loop.remove_fd(fd)
            try:
                os.close(fd)
            except OSError:
                pass
