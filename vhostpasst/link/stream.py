"""The qemu stream-socket link (`-netdev stream` / `-netdev socket`, and `--fd`).

Every Ethernet frame on the socket is preceded by its length as a 4-byte big-endian integer;
there is no virtio-net header and no FCS. One client is served at a time: further
connections are accepted and closed at once.

RX: one `recv_into` per wake-up into a large buffer, split by the length prefixes; complete
frames go to the handler in one batch, a trailing partial frame is moved to the buffer start
and completed by the next read. A length below 14 (no Ethernet header) or above
ETH_MAX_FRAME (65535 + 14: what we would send ourselves; passt stops at 65535, but a guest
can't produce frames between the two with any MTU it can be given) means the stream is out of
sync: the connection is reset.

TX: `rx_buffers()` hands out slots of a preallocated pool with 4 bytes of headroom in front,
`commit()` writes the prefix there, and `flush()` (a loop flush hook) sends every queued frame
with one `sendmsg`. What the socket does not take is dropped (a partially sent frame is
completed first so the stream stays in sync); TCP re-sends from its own state later.
After such a drop, or when `rx_buffers()` handed out fewer buffers than asked, the link
watches the socket for EPOLLOUT (or, for a short hand-out, waits for the next loop pass) and
then calls the rx-ready callbacks (base.Link), so senders resume without a timer.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Callable, Sequence

from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Loop
from vhostpasst.core.pcap import PcapWriter
from vhostpasst.link.base import ETH_MAX_FRAME, ForwardingLink, FrameHandler, Link

log = logging.getLogger(__name__)
_ratelimited = RateLimitedLog(log)

ETH_HLEN = 14
LEN_PREFIX = 4  # the big-endian frame length in front of each frame
RX_BUF_SIZE = 8 * 1024 * 1024  # one recv can bring in this much: passt's pkt_buf size
TX_SLOTS = 128  # frames queued per flush before rx_buffers() forces an early flush
IOV_MAX = 1024  # Linux UIO_MAXIOV: iovecs per sendmsg
SOCK_BUF_SIZE = (2**31 - 1) // 2  # SO_RCVBUF/SO_SNDBUF ask, the kernel caps it (rmem_max)
COMPLETE_TIMEOUT = 1.0  # how long a partially sent frame may take to finish, in seconds
ACCEPT_BATCH = 16  # connections accepted per wake-up

DEFAULT_PROBE_PATTERN = "/tmp/passt_{}.socket"
DEFAULT_PROBE_COUNT = 99  # /tmp/passt_1.socket .. /tmp/passt_99.socket

_PREFIX = struct.Struct(">I")
_UCRED = struct.Struct("3i")  # pid, uid, gid
_SEND_FLAGS = socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL

ExitCallback = Callable[[], None]


class StreamSetupError(OSError):
    """The socket path or --fd can't be used (taken, not a socket, no free path...).
    An OSError, so callers handling socket errors at start-up catch it too."""


class FramePool:
    """Preallocated slots for frames going to the guest, each with `headroom` bytes in front.

    Slots are used in order: the first `queued` hold committed frames, `buffers()` hands out
    the ones after them. The headroom lets a link put a header (the stream length prefix)
    right before the frame so the frame goes out with no copy.
    """

    def __init__(self, slots: int, headroom: int, frame_size: int = ETH_MAX_FRAME) -> None:
        self.slots = slots
        self.headroom = headroom
        self.frame_size = frame_size
        self.stride = headroom + frame_size
        self.buf = bytearray(slots * self.stride)  # calloc'd: untouched slots cost no memory
        self.view = memoryview(self.buf)
        # every slot's frame view, made once: buffers() hands out slices of this list
        self._views = [self.view[i * self.stride + headroom:(i + 1) * self.stride]
                       for i in range(slots)]
        self.lengths: list[int] = []  # frame lengths of the queued slots (0: skip)
        self._handed = 0  # buffers handed out by the last buffers() call

    @property
    def queued(self) -> int:
        return len(self.lengths)

    @property
    def free(self) -> int:
        return self.slots - len(self.lengths)

    def buffers(self, count: int) -> list[memoryview]:
        first = len(self.lengths)
        n = max(0, min(count, self.slots - first))
        self._handed = n
        return self._views[first:first + n]

    def commit(self, lengths: Sequence[int]) -> int:
        """Queue the first len(lengths) handed-out buffers; returns the first slot index."""
        if len(lengths) > self._handed:
            raise ValueError(f"commit of {len(lengths)} buffers, {self._handed} handed out")
        for length in lengths:
            if not 0 <= length <= self.frame_size:
                raise ValueError(f"bad frame length {length}")
        first = len(self.lengths)
        self.lengths.extend(lengths)
        self._handed = 0
        return first

    def slot(self, index: int, with_headroom: bool = True) -> memoryview:
        """The queued frame in slot `index`, including its headroom or not."""
        start = index * self.stride
        end = start + self.headroom + self.lengths[index]
        return self.view[start if with_headroom else start + self.headroom : end]

    def clear(self) -> None:
        self.lengths.clear()
        self._handed = 0


class StreamLink(Link):
    """One connected stream-socket client (or none). The object outlives its clients: the
    listener attaches each new client to the same link, so the dispatcher keeps one Link."""

    def __init__(
        self,
        loop: Loop,
        on_frames: FrameHandler,
        pcap: PcapWriter | None = None,
        on_disconnect: Callable[[], None] | None = None,
        *,
        rx_size: int = RX_BUF_SIZE,
        tx_slots: int = TX_SLOTS,
    ) -> None:
        super().__init__(on_frames, pcap)
        self._loop = loop
        self.on_disconnect = on_disconnect
        self._sock: socket.socket | None = None
        self._generation = 0  # bumped on every disconnect: callbacks notice a reset
        # Room for a whole maximum-size frame behind any partial frame kept at the start.
        rx_size = max(rx_size, 2 * (LEN_PREFIX + ETH_MAX_FRAME))
        self._rx_buf = bytearray(rx_size)
        self._rx_view = memoryview(self._rx_buf)
        self._rx_len = 0
        self._pool = FramePool(tx_slots, LEN_PREFIX)
        self._starved = False  # rx_buffers() came up short: wake the rx-ready callbacks
        self._want_out = False  # frames were dropped on a full socket: wait for EPOLLOUT
        # counters, for logs and tests
        self.rx_frames = 0
        self.tx_frames = 0
        self.tx_dropped = 0
        self.resets = 0
        loop.add_flush_hook(self.flush)

    # --- client management ---------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._sock is not None

    @property
    def fileno(self) -> int:
        return self._sock.fileno() if self._sock is not None else -1

    def attach(self, sock: socket.socket) -> None:
        """Start serving `sock` (a connected stream socket; made non-blocking here)."""
        if self._sock is not None:
            raise RuntimeError("stream link already has a client")
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, SOCK_BUF_SIZE)
            except OSError as e:  # not fatal: only throughput suffers
                log.debug("setting socket buffer size: %s", e)
        self._sock = sock
        self._rx_len = 0
        self._pool.clear()
        self._starved = self._want_out = False
        self._loop.add_fd(sock.fileno(), EPOLLIN | EPOLLRDHUP, self._on_event,
                          on_error=lambda e: self.disconnect(f"internal error: {e!r}"))

    def disconnect(self, reason: str = "closed") -> None:
        """Drop the client (if any), then tell the owner (listener or --fd) it is gone."""
        sock = self._sock
        if sock is None:
            return
        log.info("client disconnected: %s", reason)
        self._loop.remove_fd(sock.fileno())
        sock.close()
        self._sock = None
        self._generation += 1
        self._rx_len = 0
        self._pool.clear()
        self.resets += 1
        if self.on_disconnect is not None:
            self.on_disconnect()

    def close(self) -> None:
        """Release the client socket without calling on_disconnect; unhook from the loop."""
        self.on_disconnect = None
        if self._sock is not None:
            self._loop.remove_fd(self._sock.fileno())
            self._sock.close()
            self._sock = None
            self._generation += 1
        self._pool.clear()
        self._loop.remove_flush_hook(self.flush)

    # --- RX ------------------------------------------------------------------------------
    def _on_event(self, mask: int) -> None:
        if self._sock is None:
            return
        if mask & EPOLLOUT and self._want_out:
            self._want_out = False
            self._loop.modify_fd(self._sock.fileno(), EPOLLIN | EPOLLRDHUP)
            self._rx_ready()
            if self._sock is None:
                return
        if mask & EPOLLIN:
            self._receive()  # reads what is left, then sees EOF or the error itself
        elif mask & (EPOLLHUP | EPOLLERR | EPOLLRDHUP):
            self.disconnect("hang-up")

    def _receive(self) -> None:
        sock = self._sock
        assert sock is not None
        try:
            n = sock.recv_into(self._rx_view[self._rx_len :])
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.disconnect(f"receive error: {e.strerror or e}")
            return
        if n == 0:
            self.disconnect("end of stream")
            return
        self._rx_len += n
        self._split()

    def _split(self) -> None:
        """Hand every complete frame in the buffer to the handler, keep the partial tail."""
        buf, view, end = self._rx_buf, self._rx_view, self._rx_len
        unpack = _PREFIX.unpack_from
        frames: list[memoryview] = []
        off = 0
        bad: int | None = None  # the offending length, if the stream is out of sync
        while end - off >= LEN_PREFIX:
            (length,) = unpack(buf, off)
            if length < ETH_HLEN or length > ETH_MAX_FRAME:
                bad = length
                break
            if off + LEN_PREFIX + length > end:
                break
            frames.append(view[off + LEN_PREFIX : off + LEN_PREFIX + length])
            off += LEN_PREFIX + length
        generation = self._generation
        try:
            if frames:
                self.rx_frames += len(frames)
                self._deliver(frames)
        finally:
            if generation == self._generation:  # not reset from inside the handler
                if bad is not None:
                    self.disconnect(f"bad frame size {bad}")
                else:
                    rest = end - off
                    if rest and off:
                        # Copy through bytes: slice assignment within one buffer may memcpy.
                        buf[:rest] = bytes(view[off:end])
                    self._rx_len = rest

    # --- TX ------------------------------------------------------------------------------
    def rx_buffers(self, count: int) -> list[memoryview]:
        if self._sock is None:
            return []
        if self._pool.free < count and self._pool.queued:
            self.flush()  # pool full: write out now rather than hand out fewer buffers
        buffers = self._pool.buffers(count)
        if len(buffers) < count:
            self._starved = True
        return buffers

    def commit(self, lengths: Sequence[int]) -> None:
        if self._sock is None:
            self._pool.clear()
            return
        first = self._pool.commit(lengths)
        stride, buf = self._pool.stride, self._pool.buf
        for i, length in enumerate(lengths):
            _PREFIX.pack_into(buf, (first + i) * stride, length)

    def flush(self) -> None:
        pool = self._pool
        if pool.queued:
            if self._sock is None:
                pool.clear()
            else:
                slots = [i for i, length in enumerate(pool.lengths) if length]
                try:
                    self._send_slots(slots)
                finally:
                    pool.clear()
        if self._starved and not self._want_out and self._sock is not None:
            # The pool has room again; wake from the loop, not from inside a flush that
            # rx_buffers() may be running
            self._starved = False
            generation = self._generation
            self._loop.call_later(0, lambda: self._wake_if(generation))
        if self.pcap is not None:
            self.pcap.flush()  # both directions on disk once per loop iteration

    def _send_slots(self, slots: list[int]) -> None:
        pool, sock = self._pool, self._sock
        assert sock is not None
        pos = 0
        while pos < len(slots):
            batch = slots[pos : pos + IOV_MAX]
            iov = [pool.slot(i) for i in batch]
            try:
                sent = sock.sendmsg(iov, (), _SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as e:
                self.disconnect(f"send error: {e.strerror or e}")
                return
            k = 0
            while k < len(iov) and sent >= len(iov[k]):
                sent -= len(iov[k])
                k += 1
            self._sent(batch[:k])
            pos += k
            if k == len(iov):
                continue
            if sent:  # a frame went out in part: finish it or the stream is out of sync
                if not self._write_remainder(iov[k][sent:]):
                    self.disconnect("could not complete a partially sent frame")
                    return
                self._sent(batch[k : k + 1])
                pos += 1
            dropped = len(slots) - pos
            if dropped:
                self.tx_dropped += dropped
                if not self._want_out:
                    self._want_out = True
                    self._starved = False  # EPOLLOUT wakes the callbacks
                    self._loop.modify_fd(sock.fileno(), EPOLLIN | EPOLLRDHUP | EPOLLOUT)
                # Normal back-pressure under load (TCP re-sends), so not above debug.
                _ratelimited.debug(
                    "tx-drop", "stream socket full: dropped %d of %d frames", dropped, len(slots)
                )
            return

    def _wake_if(self, generation: int) -> None:
        if generation == self._generation and self._sock is not None:
            self._rx_ready()

    def _sent(self, slots: list[int]) -> None:
        self.tx_frames += len(slots)
        if self.pcap is not None:
            for i in slots:
                self.pcap.write(self._pool.slot(i, with_headroom=False))

    def _write_remainder(self, data: memoryview) -> bool:
        """Blocking write of the rest of a frame, bounded by COMPLETE_TIMEOUT."""
        sock = self._sock
        assert sock is not None
        deadline = time.monotonic() + COMPLETE_TIMEOUT
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLOUT)
        while data:
            try:
                n = sock.send(data, _SEND_FLAGS)
                data = data[n:]
                continue
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            poller.poll(left * 1000)
        return True


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    except OSError:
        return None
    return _UCRED.unpack(cred)[0]


def _path_state(path: str) -> str:
    """'busy' if something accepts connections at `path`, 'stale' if a socket file is there
    that nobody listens on, 'absent' if nothing is there, 'other' if it is not a socket."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return "absent"
    except OSError:
        return "other"
    if not stat.S_ISSOCK(st.st_mode):
        return "other"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    probe.setblocking(False)  # a listener with a full backlog must not block us
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EACCES):
            return "stale"
        return "busy"  # EAGAIN (backlog full) and the like: someone is there
    finally:
        probe.close()
    return "busy"


def _bind(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(1)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def _take_path(path: str, explicit: bool) -> socket.socket | None:
    """Bind a listener at `path` if it is free (unlinking a stale socket). None if it is
    taken while probing; StreamSetupError for an explicit path that can't be used."""
    state = _path_state(path)
    if state in ("busy", "other"):
        if explicit:
            what = "another process is listening" if state == "busy" else "not a socket"
            raise StreamSetupError(f"socket path {path}: {what} there")
        return None
    if state == "stale":
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            if explicit:
                raise StreamSetupError(f"socket path {path}: can't remove stale socket: {e}") from e
            return None
    try:
        return _bind(path)
    except OSError as e:
        if explicit:
            raise StreamSetupError(f"socket path {path}: {e.strerror or e}") from e
        return None  # lost a race with another process probing the same path


class UnixListener:
    """A listening UNIX socket at `path` (or the first free probed path) that hands accepted
    connections to `on_accept(conn, pid)`, one client at a time: while `busy()` is true,
    further connections are accepted and closed at once. Shared by the stream-socket and the
    vhost-user listeners, which differ only in what they do with a connection.

    With `path` None the first free `probe_pattern.format(n)`, n = 1..probe_count, is taken
    (tests pass their own pattern so they never touch a real passt's /tmp/passt_N.socket).
    """

    def __init__(
        self,
        loop: Loop,
        path: str | None,
        on_accept: Callable[[socket.socket, int | None], None],
        busy: Callable[[], bool],
        *,
        probe_pattern: str = DEFAULT_PROBE_PATTERN,
        probe_count: int = DEFAULT_PROBE_COUNT,
    ) -> None:
        self._loop = loop
        self.on_accept = on_accept
        self.busy = busy
        sock: socket.socket | None = None
        if path is not None:
            sock = _take_path(path, explicit=True)
        else:
            for n in range(1, probe_count + 1):
                candidate = probe_pattern.format(n)
                sock = _take_path(candidate, explicit=False)
                if sock is not None:
                    path = candidate
                    break
            else:
                raise StreamSetupError(
                    f"no free socket path: {probe_pattern.format(1)} .. "
                    f"{probe_pattern.format(probe_count)} all in use"
                )
        assert sock is not None and path is not None
        self.path: str = path
        self._sock = sock
        self._ino = os.stat(path).st_ino  # so close() only unlinks our own socket
        loop.add_fd(sock.fileno(), EPOLLIN, self._on_listen)
        log.info("UNIX domain socket bound at %s", path)  # the qemu hint is the daemon's

    def _on_listen(self, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # ECONNABORTED, EMFILE...: keep listening
                _ratelimited.warning("accept", "accept() on %s failed: %s", self.path, e)
                return
            pid = _peer_pid(conn)
            if self.busy():
                log.info("another client connected (pid %s): refused, one client at a time", pid)
                conn.close()
                continue
            log.info("client connected (pid %s)", pid)
            self.on_accept(conn, pid)

    def close(self) -> None:
        self._loop.remove_fd(self._sock.fileno())
        self._sock.close()
        try:
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        except OSError:
            pass  # already gone, or not ours any more


class StreamListener(ForwardingLink):
    """A UNIX stream listener feeding one StreamLink (`.link`), one client at a time.

    The listener is itself a Link that forwards to `.link`, so either can be handed to the
    dispatcher. The socket path is probed and bound by UnixListener (see there). When the
    client goes away the link waits for the next one, or with `one_off` calls `on_exit`
    (default: stop the loop).
    """

    link: StreamLink

    def __init__(
        self,
        loop: Loop,
        path: str | None,
        on_frames: FrameHandler,
        pcap: PcapWriter | None = None,
        one_off: bool = False,
        on_exit: ExitCallback | None = None,
        *,
        probe_pattern: str = DEFAULT_PROBE_PATTERN,
        probe_count: int = DEFAULT_PROBE_COUNT,
    ) -> None:
        super().__init__(on_frames, pcap)
        self._loop = loop
        self.one_off = one_off
        self.on_exit: ExitCallback = on_exit if on_exit is not None else loop.stop
        self.link = StreamLink(loop, on_frames, pcap, on_disconnect=self._peer_gone)
        self._listener = listen_for(loop, path, lambda conn: self.link.attach(conn),
                                    lambda: self.link.connected, probe_pattern, probe_count,
                                    self.link.close)
        self.path: str = self._listener.path

    @staticmethod
    def from_fd(
        loop: Loop,
        fd: int,
        on_frames: FrameHandler,
        pcap: PcapWriter | None = None,
        on_exit: ExitCallback | None = None,
    ) -> StreamLink:
        """`--fd N`: no listener, the link of an already connected socket (see
        stream_link_from_fd)."""
        return stream_link_from_fd(loop, fd, on_frames, pcap, on_exit)


def connected_socket(fd: int, unix_only: bool) -> socket.socket:
    """`--fd N`: the caller's connected stream socket (a UNIX one if `unix_only`), not
    inherited by anything we run; StreamSetupError, with the fd left open, if it is not one."""
    try:
        sock = socket.socket(fileno=fd)
    except OSError as e:
        raise StreamSetupError(f"--fd {fd}: not a socket: {e.strerror or e}") from e
    if sock.type != socket.SOCK_STREAM or unix_only and sock.family != socket.AF_UNIX:
        sock.detach()
        kind = "a UNIX stream socket (vhost-user passes fds)" if unix_only else "a stream socket"
        raise StreamSetupError(f"--fd {fd}: not {kind}")
    sock.set_inheritable(False)
    return sock


def listen_for(loop: Loop, path: str | None, attach: Callable[[socket.socket], None],
               busy: Callable[[], bool], probe_pattern: str, probe_count: int,
               on_failure: Callable[[], None]) -> UnixListener:
    """The UNIX listener of a ForwardingLink: each accepted connection goes to `attach`
    (one at a time: `busy`); if the listener cannot be made, `on_failure` runs (closing the
    link) before the error goes on."""
    try:
        return UnixListener(loop, path, lambda conn, _pid: attach(conn), busy,
                            probe_pattern=probe_pattern, probe_count=probe_count)
    except BaseException:
        on_failure()
        raise


def stream_link_from_fd(
    loop: Loop,
    fd: int,
    on_frames: FrameHandler,
    pcap: PcapWriter | None = None,
    on_exit: ExitCallback | None = None,
) -> StreamLink:
    """`--fd N`: use an already connected stream socket; its disconnection calls `on_exit`
    (default: stop the loop), as --fd implies --one-off."""
    sock = connected_socket(fd, unix_only=False)
    link = StreamLink(loop, on_frames, pcap, on_disconnect=on_exit or loop.stop)
    link.attach(sock)
    return link
