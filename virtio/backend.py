"""The vhost-user back-end state machine: one connected front end, one device.

`VhostUserBackend(sock, loop, device)` registers the control socket in an epoll-style loop
(anything with `add_fd(fd, events, cb(mask))` and `remove_fd(fd)`), reads messages, validates
them (virtio.message), and applies them to guest memory and the virtqueues. The device object
(a `Device` subclass) supplies its feature bits and queue count and gets callbacks: queue
started / stopped / enabled, and kicked (its kick eventfd fired).

Error policy, in one place (`_dispatch`): a request that is malformed, unsupported or refused
gets a non-zero REPLY_ACK when the front end asked for one (NEED_REPLY), and otherwise closes
the connection, since the front end would carry on believing it succeeded. A broken byte stream
(bad header, oversized payload, too many fds) always closes. No exception reaches the loop.
SET_DEVICE_STATE_FD is the exception: its reply carries its own error code, so a refused
transfer is answered (and logged) and the connection stays (virtio/devstate.py).
"""

from __future__ import annotations

import functools
import logging
import os
import select
import socket
from collections.abc import Callable
from typing import Protocol

from . import guard
from . import message as m
from .devstate import REPLY_NOFD, Direction, Phase, StateError, StateTransfer
from .dirtylog import LOG_PAGE, DirtyLog, DirtyLogError
from .memory import GuestMemory, GuestMemoryError
from .message import Message, Request, RequestError
from .virtqueue import VirtQueue, VirtQueueError

log = logging.getLogger(__name__)

# virtio feature bits (virtio 1.2, 6) the transport/rings handle here, and vhost-user's own.
F_RING_INDIRECT_DESC = 1 << 28
F_RING_EVENT_IDX = 1 << 29
F_PROTOCOL_FEATURES = 1 << 30  # VHOST_USER_F_PROTOCOL_FEATURES
F_LOG_ALL = 1 << 26  # VHOST_F_LOG_ALL: log writes to guest memory (live migration)
F_VERSION_1 = 1 << 32
RING_FEATURES = F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX

PROTOCOL_FEATURES = (1 << m.ProtocolFeature.MQ | 1 << m.ProtocolFeature.REPLY_ACK
                     | 1 << m.ProtocolFeature.CONFIGURE_MEM_SLOTS
                     | 1 << m.ProtocolFeature.RESET_DEVICE
                     | 1 << m.ProtocolFeature.LOG_SHMFD)

MESSAGES_PER_WAKEUP = 64  # then yield to the loop; level-triggered epoll brings us back


class EventLoop(Protocol):
    def add_fd(self, fd: int, events: int, callback: Callable[[int], None],
               on_error: Callable[[Exception], None] | None = None) -> None: ...

    def remove_fd(self, fd: int) -> None: ...


class Device:
    """What a device type plugs into the back end. Override what you need."""

    features: int = 0  # device-specific feature bits; the back end adds RING_FEATURES
    num_queues: int = 2
    max_queue_size: int = 1024

    def queue_num(self) -> int:
        """The GET_QUEUE_NUM answer (virtio-net answers in queue *pairs*)."""
        return self.num_queues

    def config(self) -> bytes | None:
        """The device config space, or None to not offer GET/SET_CONFIG."""
        return None

    def set_config(self, offset: int, data: bytes, flags: int) -> None:
        raise RequestError("config space is read-only")

    def features_set(self, features: int) -> None:
        """SET_FEATURES accepted these (device and ring bits)."""

    def queue_started(self, vq: VirtQueue) -> None:
        """The front end started the ring (SET_VRING_KICK); it may still be unmapped."""

    def queue_stopped(self, vq: VirtQueue) -> None:
        """The ring stopped (GET_VRING_BASE, reset, disconnect): drop references to chains."""

    def queue_enabled(self, vq: VirtQueue, enabled: bool) -> None:
        """SET_VRING_ENABLE (or implicit enable without PROTOCOL_FEATURES)."""

    def queue_kicked(self, vq: VirtQueue) -> None:
        """The driver kicked: pop until empty (or come back later)."""

    # Live migration of the device's own state (virtio/devstate.py): a device with
    # max_state_size > 0 gets DEVICE_STATE offered and these two called, rings stopped.
    max_state_size: int = 0  # the largest state it saves or accepts, in bytes

    def save_state(self) -> bytes:
        """The device's state, opaque to the library (at most max_state_size bytes)."""
        raise StateError("this device has no state to migrate")

    def load_state(self, data: bytes) -> None:
        """Take a whole saved state, or raise StateError and change nothing."""
        raise StateError("this device has no state to migrate")


def _close(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


class VhostUserBackend:
    def __init__(self, sock: socket.socket, loop: EventLoop, device: Device,
                 on_close: Callable[[str], None] | None = None,
                 ring_features: int = RING_FEATURES, max_mem_slots: int = 32) -> None:
        self.sock = sock
        self.loop = loop
        self.device = device
        self.on_close = on_close
        # Every write the device makes to guest memory goes through a queue (used chains,
        # the used ring), which marks it in the dirty log: live migration comes for free.
        self.features = device.features | ring_features | F_PROTOCOL_FEATURES | F_LOG_ALL
        self.protocol_features = PROTOCOL_FEATURES
        if device.config() is not None:
            self.protocol_features |= 1 << m.ProtocolFeature.CONFIG
        if device.max_state_size > 0:
            self.protocol_features |= 1 << m.ProtocolFeature.DEVICE_STATE
        self.acked_features = 0
        self.acked_protocol_features = 0
        self.owner = False
        self.closed = False
        self.close_reason = ""
        self.memory = GuestMemory(max_mem_slots)
        self.dirty_log: DirtyLog | None = None  # SET_LOG_BASE's, used while LOG_ALL is on
        # from SET_DEVICE_STATE_FD to the CHECK_DEVICE_STATE that takes its result
        self.transfer: StateTransfer | None = None
        self.queues = [VirtQueue(i, self.memory, device.max_queue_size)
                       for i in range(device.num_queues)]
        self._reader = m.MessageReader(sock)
        self._guard_events = guard.events()
        self._handlers: dict[Request, Callable[[Message], bytes | None]] = {
            Request.GET_FEATURES: lambda msg: m.encode_u64(self.features),
            Request.SET_FEATURES: self._set_features,
            Request.GET_PROTOCOL_FEATURES: lambda msg: m.encode_u64(self.protocol_features),
            Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            Request.SET_OWNER: self._set_owner,
            Request.RESET_OWNER: self._reset_owner,
            Request.RESET_DEVICE: self._reset_device,
            Request.GET_QUEUE_NUM: lambda msg: m.encode_u64(self.device.queue_num()),
            Request.SET_MEM_TABLE: self._set_mem_table,
            Request.SET_LOG_BASE: self._set_log_base,
            Request.SET_LOG_FD: self._set_log_fd,
            Request.GET_MAX_MEM_SLOTS: lambda msg: m.encode_u64(self.memory.max_regions),
            Request.ADD_MEM_REG: self._add_mem_reg,
            Request.REM_MEM_REG: self._rem_mem_reg,
            Request.SET_VRING_NUM: self._set_vring_num,
            Request.SET_VRING_ADDR: self._set_vring_addr,
            Request.SET_VRING_BASE: self._set_vring_base,
            Request.GET_VRING_BASE: self._get_vring_base,
            Request.SET_VRING_KICK: self._set_vring_kick,
            Request.SET_VRING_CALL: self._set_vring_call,
            Request.SET_VRING_ERR: self._set_vring_err,
            Request.SET_VRING_ENABLE: self._set_vring_enable,
            Request.GET_CONFIG: self._get_config,
            Request.SET_CONFIG: self._set_config,
            Request.SET_DEVICE_STATE_FD: self._set_device_state_fd,
            Request.CHECK_DEVICE_STATE: self._check_device_state,
        }
        loop.add_fd(sock.fileno(), select.EPOLLIN, self._on_readable, on_error=self._loop_error)

    # --- connection -------------------------------------------------------------------------
    def _on_readable(self, mask: int) -> None:
        for _ in range(MESSAGES_PER_WAKEUP):
            if self.closed:
                return
            try:
                msg = self._reader.read()
            except m.ConnectionClosed:
                self.close("front end closed the connection")
                return
            except m.VhostUserError as e:
                self.close(str(e))
                return
            except OSError as e:
                self.close(f"control socket: {e}")
                return
            if msg is None:
                if mask & (select.EPOLLHUP | select.EPOLLERR):
                    self.close("control socket hung up")
                return
            self._dispatch(msg)
            self.check_guards()

    def check_guards(self) -> bool:
        """After a message, a kick or a flush: did this front end's memory file shrink under
        us (a SIGBUS turned into zero pages) or a write to its eventfds block? Then drop it
        (one log line, as every close). One C call when nothing happened; True if closed."""
        events = guard.events()
        if events == self._guard_events:
            return False
        self._guard_events = events
        reason = None
        for region in self.memory.regions:
            if region.faulted():
                reason = (f"the memory file of guest region {region.gpa:#x}+{region.size:#x} "
                          "shrank under us (SIGBUS)")
                break
        else:
            if self.dirty_log is not None and self.dirty_log.faulted():
                reason = "the dirty log's file shrank under us (SIGBUS)"
            else:
                for vq in self.queues:
                    if vq.stalled:
                        reason = f"queue {vq.index}: a write to its eventfd blocked"
                        break
        if reason is None or self.closed:
            return False
        self.close(reason)
        return True

    def _loop_error(self, e: Exception) -> None:
        """The loop's last resort (vhostpasst/core/loop.py): one of our callbacks raised."""
        self.close(f"internal error: {type(e).__name__}: {e}")

    def _dispatch(self, msg: Message) -> None:
        try:
            request = m.validate(msg)
            handler = self._handlers.get(request)
            if handler is None:
                raise RequestError(f"{request.name} is not supported")
            body = handler(msg)
        except (RequestError, VirtQueueError, GuestMemoryError) as e:
            msg.close_fds()
            log.warning("vhost-user %s refused: %s", msg.name(), e)
            if msg.need_reply and msg.request not in m.REPLY_REQUESTS:
                self._send(m.encode_reply(msg.request, m.encode_u64(1)))
            else:
                self.close(f"{msg.name()}: {e}")
            return
        except Exception:  # a bug here must not take the loop down with it
            msg.close_fds()
            log.exception("vhost-user %s: internal error", msg.name())
            self.close(f"{msg.name()}: internal error")
            return
        msg.close_fds()  # whatever the handler did not take
        if body is not None:
            self._send(m.encode_reply(msg.request, body))
        elif msg.need_reply:
            self._send(m.encode_reply(msg.request, m.encode_u64(0)))

    def _send(self, data: bytes) -> None:
        try:
            m.send_message(self.sock, data)
        except OSError as e:
            self.close(f"control socket: {e}")

    def close(self, reason: str = "closed") -> None:
        """Drop the connection: stop rings, close fds, unmap memory. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        log.info("vhost-user connection closed: %s", reason)
        try:
            # Each step whatever the one before did: a failing one (a bug) must not leave
            # the socket watched or the memory mapped.
            for step in (lambda: self.loop.remove_fd(self.sock.fileno()), self._reset_queues,
                         self._drop_log, self._drop_transfer,
                         self.memory.reset,  # a large guest takes a while: a signal may come
                         self._reader.close, self.sock.close):
                try:
                    step()
                except Exception:
                    log.exception("vhost-user: closing the connection")
        finally:
            # The device hears of it whatever cut the clean-up short (the daemon's SIGTERM
            # raises where it lands): its closing counters are not lost.
            if self.on_close is not None:
                self.on_close(reason)

    # --- helpers ----------------------------------------------------------------------------
    def _queue(self, index: int) -> VirtQueue:
        if not 0 <= index < len(self.queues):
            raise RequestError(f"queue index {index} out of range")
        return self.queues[index]

    def _stop(self, vq: VirtQueue) -> None:
        if vq.started:
            vq.stop()
            self._callback(self.device.queue_stopped, vq)
        if vq.kick_fd is not None:
            self.loop.remove_fd(vq.kick_fd)
            _close(vq.kick_fd)
            vq.kick_fd = None

    def _reset_queues(self) -> None:
        for vq in self.queues:
            self._stop(vq)
            for fd in (vq.call_fd, vq.err_fd):
                _close(fd)
            vq.call_fd = vq.err_fd = None
            vq.reset()

    def _callback(self, fn: Callable[..., None], *args: object) -> None:
        """Run a device callback; its failures are the device's, never the loop's."""
        try:
            fn(*args)
        except VirtQueueError as e:
            log.warning("device: %s", e)
        except Exception:
            log.exception("device callback %s failed", getattr(fn, "__name__", fn))

    def _remap(self) -> None:
        for vq in self.queues:
            try:
                vq.map()
            except VirtQueueError as e:
                log.info("%s (until the front end sets it again)", e)

    # --- handlers ---------------------------------------------------------------------------
    def _set_features(self, msg: Message) -> None:
        features = msg.u64()
        if features & ~self.features:
            raise RequestError(f"features {features & ~self.features:#x} were not offered")
        if not features & F_VERSION_1:
            raise RequestError("legacy (pre-VERSION_1) drivers are not supported")
        was_logging = bool(self.acked_features & F_LOG_ALL)
        self.acked_features = features
        for vq in self.queues:
            vq.event_idx = bool(features & F_RING_EVENT_IDX)
            vq.indirect = bool(features & F_RING_INDIRECT_DESC)
        self._attach_log()
        if bool(features & F_LOG_ALL) != was_logging:
            marked = f", {self.dirty_log.marks} writes marked so far" \
                if self.dirty_log is not None and was_logging else ""
            log.info("vhost-user: dirty page logging %s (live migration)%s",
                     "on" if features & F_LOG_ALL else "off", marked)
        self._callback(self.device.features_set, features)
        if not features & F_PROTOCOL_FEATURES:
            for vq in self.queues:  # without PROTOCOL_FEATURES rings start enabled
                if not vq.enabled:
                    vq.enabled = True
                    self._callback(self.device.queue_enabled, vq, True)

    def _set_protocol_features(self, msg: Message) -> None:
        features = msg.u64()
        if features & ~self.protocol_features:
            raise RequestError(f"protocol features {features & ~self.protocol_features:#x} "
                               "were not offered")
        self.acked_protocol_features = features

    def _set_owner(self, msg: Message) -> None:
        self.owner = True

    def _reset_owner(self, msg: Message) -> None:
        # Deprecated; the spec recommends treating it as "disable all rings".
        for vq in self.queues:
            self._stop(vq)
            if vq.enabled:
                vq.enabled = False
                self._callback(self.device.queue_enabled, vq, False)

    def _reset_device(self, msg: Message) -> None:
        self._reset_queues()
        self._drop_log()
        self._drop_transfer()
        self.memory.reset()
        self.acked_features = 0

    # --- live migration: the dirty log ---------------------------------------------------
    def _set_log_base(self, msg: Message) -> bytes:
        """The shared log (LOG_SHMFD): its fd, size and offset. Replaces the last one."""
        if len(msg.payload) != m.LOG.size or len(msg.fds) != 1:
            raise RequestError("a log base without a shared memory fd is not supported")
        size, offset = m.LOG.unpack_from(msg.payload)
        try:
            dirty = DirtyLog(msg.take_fd(), size, offset)
        except DirtyLogError as e:
            raise RequestError(str(e)) from None
        self._drop_log()
        self.dirty_log = dirty
        self._attach_log()
        log.debug("vhost-user: dirty log of %d bytes (%d MiB of guest memory)", size,
                  size * 8 * LOG_PAGE >> 20)
        return m.encode_u64(0)  # the front end waits for this reply (LOG_SHMFD)

    def _set_log_fd(self, msg: Message) -> None:
        """An eventfd to say the log changed: optional, and qemu reads the log anyway."""

    def _attach_log(self) -> None:
        dirty = self.dirty_log if self.acked_features & F_LOG_ALL else None
        for vq in self.queues:
            vq.set_dirty_log(dirty)

    def _drop_log(self) -> None:
        dirty, self.dirty_log = self.dirty_log, None
        self._attach_log()
        if dirty is not None:
            if dirty.outside:
                log.warning("vhost-user: %d writes fell outside the front end's dirty log",
                            dirty.outside)
            if dirty.marks:  # a migration's source: qemu stops without turning logging off
                log.info("vhost-user: dirty log released: %d writes marked in it", dirty.marks)
            dirty.close()

    # --- live migration: the device's state (virtio/devstate.py) ---------------------------
    def _set_device_state_fd(self, msg: Message) -> bytes:
        """Start a transfer; the reply's low byte is 0 or an error, and bit 8 always says we
        keep the front end's fd (no fd of ours comes back). A refusal is logged and answered:
        the front end fails its migration and the connection carries on."""
        direction, phase = m.DEVICE_STATE.unpack_from(msg.payload)
        error = None
        if not self.acked_protocol_features & 1 << m.ProtocolFeature.DEVICE_STATE:
            error = "DEVICE_STATE was not negotiated"
        elif phase != Phase.STOPPED:
            error = f"migration phase {phase} (only {Phase.STOPPED} is defined)"
        elif direction not in (Direction.SAVE, Direction.LOAD):
            error = f"transfer direction {direction}"
        elif not msg.fds:
            error = "no fd attached"
        elif self.transfer is not None:
            error = "a transfer is already under way"
        if error is not None:
            log.warning("vhost-user SET_DEVICE_STATE_FD refused: %s", error)
            return m.encode_u64(REPLY_NOFD | 1)
        self.transfer = StateTransfer(self.loop, msg.take_fd(), Direction(direction),
                                      self.device)
        return m.encode_u64(REPLY_NOFD | (1 if self.transfer.error is not None else 0))

    def _check_device_state(self, msg: Message) -> bytes:
        transfer, self.transfer = self.transfer, None
        if transfer is None:
            log.warning("vhost-user CHECK_DEVICE_STATE without a transfer")
            return m.encode_u64(1)
        return m.encode_u64(0 if transfer.result() is None else 1)

    def _drop_transfer(self) -> None:
        transfer, self.transfer = self.transfer, None
        if transfer is not None and not transfer.done:
            log.info("device state: %s cut short (%d bytes moved)",
                     transfer.direction.name.lower(), transfer.moved)
            transfer.close()

    def _set_mem_table(self, msg: Message) -> None:
        descs = msg.mem_table()
        fds, msg.fds = msg.fds, []
        for vq in self.queues:
            vq.unmap()  # release ring views before their regions go
        self.memory.set_table(descs, fds)
        self._remap()

    def _add_mem_reg(self, msg: Message) -> None:
        self.memory.add(msg.mem_reg(), msg.take_fd())
        self._remap()

    def _rem_mem_reg(self, msg: Message) -> None:
        msg.close_fds()  # tolerated for old front ends, never used
        for vq in self.queues:
            vq.unmap()
        try:
            self.memory.remove(msg.mem_reg())
        finally:
            self._remap()

    def _set_vring_num(self, msg: Message) -> None:
        index, num = msg.state()
        vq = self._queue(index)
        if vq.started:
            raise RequestError(f"queue {index} is running")
        vq.set_num(num)

    def _set_vring_addr(self, msg: Message) -> None:
        addr = msg.vring_addr()
        vq = self._queue(addr.index)
        vq.set_addr(addr)

    def _set_vring_base(self, msg: Message) -> None:
        index, base = msg.state()
        vq = self._queue(index)
        if vq.started:
            raise RequestError(f"queue {index} is running")
        vq.set_base(base)

    def _get_vring_base(self, msg: Message) -> bytes:
        index, _ = msg.state()
        vq = self._queue(index)
        self._stop(vq)
        base = vq.last_avail_idx
        log.debug("vhost-user: queue %d stopped at avail index %d (used index %d, used->idx "
                  "%s, %d in flight)", index, base, vq.used_idx, vq.ring_used_idx(), vq.inflight)
        for fd in (vq.call_fd, vq.err_fd):  # the front end sends fresh ones on restart
            _close(fd)
        vq.call_fd = vq.err_fd = None
        return m.encode_state(index, base)

    def _vring_fd(self, msg: Message) -> tuple[VirtQueue, int | None]:
        """The queue and the eventfd of SET_VRING_KICK/CALL/ERR: checked to be an eventfd
        and made non-blocking (virtio/guard.py), or refused."""
        value = msg.u64()
        vq = self._queue(value & m.VRING_INDEX_MASK)
        if value & m.VRING_INVALID_FD:
            return vq, None
        fd = msg.take_fd()
        try:
            guard.prepare(fd)
        except guard.GuardError as e:
            _close(fd)
            raise RequestError(f"queue {vq.index}: {e}") from None
        return vq, fd

    def _set_vring_kick(self, msg: Message) -> None:
        vq, fd = self._vring_fd(msg)
        if vq.kick_fd is not None:
            self.loop.remove_fd(vq.kick_fd)
            _close(vq.kick_fd)
            vq.kick_fd = None
        if fd is not None:
            try:
                self.loop.add_fd(fd, select.EPOLLIN, functools.partial(self._on_kick, vq),
                                 on_error=self._loop_error)
            except OSError as e:
                _close(fd)
                raise RequestError(f"kick fd cannot be polled: {e}") from None
            vq.kick_fd = fd
        if not vq.started:
            vq.start()
            log.debug("vhost-user: queue %d started at avail index %d (used->idx %s)", vq.index,
                      vq.last_avail_idx, vq.ring_used_idx())
            self._callback(self.device.queue_started, vq)

    def _on_kick(self, vq: VirtQueue, mask: int = 0) -> None:
        kicked = vq.drain_kick()
        if kicked < 0:
            log.warning("queue %d: kick fd at EOF or failing; no longer watched", vq.index)
            if vq.kick_fd is not None:
                self.loop.remove_fd(vq.kick_fd)
            return
        if kicked and vq.started:  # 0: the front end read its own kick: nothing to do
            self._callback(self.device.queue_kicked, vq)
        self.check_guards()

    def _set_vring_call(self, msg: Message) -> None:
        vq, fd = self._vring_fd(msg)
        _close(vq.call_fd)
        vq.call_fd = fd

    def _set_vring_err(self, msg: Message) -> None:
        vq, fd = self._vring_fd(msg)
        _close(vq.err_fd)
        vq.err_fd = fd

    def _set_vring_enable(self, msg: Message) -> None:
        index, num = msg.state()
        vq = self._queue(index)
        if num not in (0, 1):
            raise RequestError(f"SET_VRING_ENABLE with {num}")
        if vq.enabled != bool(num):
            vq.enabled = bool(num)
            self._callback(self.device.queue_enabled, vq, vq.enabled)

    def _get_config(self, msg: Message) -> bytes:
        offset, size, flags, _ = msg.config()
        config = self.device.config()
        if config is None or offset + size > len(config):
            # The spec's error answer is a reply without the config payload.
            return b""
        return m.encode_config(offset, flags, config[offset:offset + size])

    def _set_config(self, msg: Message) -> None:
        offset, size, flags, data = msg.config()
        config = self.device.config()
        if config is None or offset + size > len(config):
            raise RequestError(f"SET_CONFIG outside config space ({offset}+{size})")
        self.device.set_config(offset, data, flags)
