"""vhost-user message codec: header, per-request payload layouts and validation, replies.

A message is a 12-byte header {request u32, flags u32, size u32} in host byte order (all
vhost-user users are little-endian hosts in practice), `size` payload bytes, and up to
MAX_FDS file descriptors passed with SCM_RIGHTS. Every front-end request has a rule saying
which payload sizes and how many fds it may carry; `validate()` enforces it before any handler
looks at the payload, so handlers can unpack without further checks. Nothing here does I/O
except `MessageReader` / `send_message`, which take a connected AF_UNIX stream socket.
"""

from __future__ import annotations

import array
import enum
import errno
import os
import socket
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

HEADER = struct.Struct("=III")
HEADER_SIZE = HEADER.size  # 12
MAX_FDS = 8  # VHOST_MEMORY_BASELINE_NREGIONS: qemu never sends more in one message
MAX_PAYLOAD = 4096  # bigger than any front-end request we know; larger sizes are hostile
MAX_REGIONS = 8  # regions in one SET_MEM_TABLE
MAX_CONFIG_SIZE = 256  # VHOST_USER_MAX_CONFIG_SIZE

VERSION = 0x1
VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8

VRING_INVALID_FD = 0x100  # bit 8 of the u64 of SET_VRING_KICK/CALL/ERR: no fd attached
VRING_INDEX_MASK = 0xFF

U64 = struct.Struct("=Q")
STATE = struct.Struct("=II")  # vhost_vring_state {index, num}
ADDR = struct.Struct("=IIQQQQ")  # vhost_vring_addr {index, flags, desc, used, avail, log}
REGION = struct.Struct("=QQQQ")  # {guest_phys_addr, memory_size, userspace_addr, mmap_offset}
MEM_HEADER = struct.Struct("=II")  # {nregions, padding}
MEM_REG = struct.Struct("=QQQQQ")  # {padding u64, region}
LOG = struct.Struct("=QQ")  # {mmap_size, mmap_offset}
CONFIG_HEADER = struct.Struct("=III")  # {offset, size, flags}
INFLIGHT = struct.Struct("=QQHH4x")  # {mmap_size, mmap_offset, num_queues, queue_size}
IOTLB = struct.Struct("=QQQBB6x")  # struct vhost_iotlb_msg, padded to 32 like the C struct
DEVICE_STATE = struct.Struct("=II")  # {transfer_direction, migration_phase}


class Request(enum.IntEnum):
    """Front-end → back-end request numbers (vhost-user.rst, "Front-end message types")."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(enum.IntEnum):
    """Bit numbers of the vhost-user protocol features."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    NET_MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16
    XEN_MMAP = 17
    SHARED_OBJECT = 18
    DEVICE_STATE = 19


# Requests whose reply carries a body; the others only reply when NEED_REPLY asks for an ack.
REPLY_REQUESTS = frozenset({
    Request.GET_FEATURES, Request.GET_PROTOCOL_FEATURES, Request.GET_VRING_BASE,
    Request.GET_QUEUE_NUM, Request.GET_CONFIG, Request.GET_MAX_MEM_SLOTS, Request.GET_STATUS,
    Request.GET_INFLIGHT_FD, Request.POSTCOPY_ADVISE, Request.POSTCOPY_END,
    Request.IOTLB_MSG, Request.CREATE_CRYPTO_SESSION, Request.GET_SHARED_OBJECT,
    Request.SET_DEVICE_STATE_FD, Request.CHECK_DEVICE_STATE,
})


class VhostUserError(Exception):
    """Base of every error this library raises about what the front end sent."""


class ProtocolError(VhostUserError):
    """The byte stream cannot be trusted any more (bad header, oversized payload): disconnect."""


class RequestError(VhostUserError):
    """A well-framed request that is malformed, unsupported or refused."""


class ConnectionClosed(Exception):
    """The front end closed the socket."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    def close_fds(self) -> None:
        """Close every fd this message still owns (handlers take the ones they keep)."""
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds.clear()

    def take_fd(self) -> int:
        """Hand the message's single fd over to the caller (who must close it)."""
        return self.fds.pop(0)

    # Payload views; `validate()` has already checked the sizes.
    def u64(self) -> int:
        return int(U64.unpack_from(self.payload)[0])

    def state(self) -> tuple[int, int]:
        index, num = STATE.unpack_from(self.payload)
        return index, num

    def vring_addr(self) -> VringAddr:
        return VringAddr(*ADDR.unpack_from(self.payload))

    def mem_table(self) -> list[RegionDesc]:
        nregions = MEM_HEADER.unpack_from(self.payload)[0]
        return [RegionDesc(*REGION.unpack_from(self.payload, MEM_HEADER.size + i * REGION.size))
                for i in range(nregions)]

    def mem_reg(self) -> RegionDesc:
        return RegionDesc(*MEM_REG.unpack_from(self.payload)[1:])

    def config(self) -> tuple[int, int, int, bytes]:
        offset, size, flags = CONFIG_HEADER.unpack_from(self.payload)
        return offset, size, flags, self.payload[CONFIG_HEADER.size:CONFIG_HEADER.size + size]


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc: int
    used: int
    avail: int
    log: int


@dataclass(frozen=True)
class RegionDesc:
    """One guest memory region as the front end describes it."""

    gpa: int
    size: int
    uaddr: int
    mmap_offset: int

    def pack(self) -> bytes:
        return REGION.pack(self.gpa, self.size, self.uaddr, self.mmap_offset)


# --- validation rules -------------------------------------------------------------------------

SizeRule = Callable[[bytes], bool]
FdRule = Callable[[Message], bool]


def _size(*sizes: int) -> SizeRule:
    return lambda payload: len(payload) in sizes


def _mem_table_size(payload: bytes) -> bool:
    if len(payload) < MEM_HEADER.size:
        return False
    nregions = MEM_HEADER.unpack_from(payload)[0]
    if not 1 <= nregions <= MAX_REGIONS:
        return False
    # qemu sends exactly the regions in use; some front ends send the full 8-slot struct.
    return len(payload) in (MEM_HEADER.size + nregions * REGION.size,
                            MEM_HEADER.size + MAX_REGIONS * REGION.size)


def _config_size(payload: bytes) -> bool:
    if len(payload) < CONFIG_HEADER.size:
        return False
    size = CONFIG_HEADER.unpack_from(payload)[1]
    return size <= MAX_CONFIG_SIZE and len(payload) == CONFIG_HEADER.size + size


def _any_size(payload: bytes) -> bool:
    return True  # only for requests we refuse anyway (bounded by MAX_PAYLOAD)


def _fds(count: int) -> FdRule:
    return lambda msg: len(msg.fds) == count


def _fds_upto(count: int) -> FdRule:
    return lambda msg: len(msg.fds) <= count


def _vring_fd(msg: Message) -> bool:
    # One fd, or none with the INVALID_FD bit set; the rest of the high bits must be zero.
    value = msg.u64()
    if value & ~(VRING_INDEX_MASK | VRING_INVALID_FD):
        return False
    return len(msg.fds) == (0 if value & VRING_INVALID_FD else 1)


def _mem_table_fds(msg: Message) -> bool:
    return len(msg.fds) == MEM_HEADER.unpack_from(msg.payload)[0]


_NONE = _size(0)
_U64 = _size(U64.size)
_STATE = _size(STATE.size)
_NOFD = _fds(0)

RULES: dict[Request, tuple[SizeRule, FdRule]] = {
    Request.GET_FEATURES: (_NONE, _NOFD),
    Request.SET_FEATURES: (_U64, _NOFD),
    Request.SET_OWNER: (_NONE, _NOFD),
    Request.RESET_OWNER: (_NONE, _NOFD),
    Request.SET_MEM_TABLE: (_mem_table_size, _mem_table_fds),
    Request.SET_LOG_BASE: (_size(U64.size, LOG.size), _fds_upto(1)),
    Request.SET_LOG_FD: (_NONE, _fds(1)),
    Request.SET_VRING_NUM: (_STATE, _NOFD),
    Request.SET_VRING_ADDR: (_size(ADDR.size), _NOFD),
    Request.SET_VRING_BASE: (_STATE, _NOFD),
    Request.GET_VRING_BASE: (_STATE, _NOFD),
    Request.SET_VRING_KICK: (_U64, _vring_fd),
    Request.SET_VRING_CALL: (_U64, _vring_fd),
    Request.SET_VRING_ERR: (_U64, _vring_fd),
    Request.GET_PROTOCOL_FEATURES: (_NONE, _NOFD),
    Request.SET_PROTOCOL_FEATURES: (_U64, _NOFD),
    Request.GET_QUEUE_NUM: (_NONE, _NOFD),
    Request.SET_VRING_ENABLE: (_STATE, _NOFD),
    Request.SEND_RARP: (_U64, _NOFD),
    Request.NET_SET_MTU: (_U64, _NOFD),
    Request.SET_BACKEND_REQ_FD: (_NONE, _fds(1)),
    Request.IOTLB_MSG: (_size(IOTLB.size), _NOFD),
    Request.SET_VRING_ENDIAN: (_STATE, _NOFD),
    Request.GET_CONFIG: (_config_size, _NOFD),
    Request.SET_CONFIG: (_config_size, _NOFD),
    Request.CREATE_CRYPTO_SESSION: (_any_size, _NOFD),
    Request.CLOSE_CRYPTO_SESSION: (_U64, _NOFD),
    Request.POSTCOPY_ADVISE: (_NONE, _NOFD),
    Request.POSTCOPY_LISTEN: (_NONE, _NOFD),
    Request.POSTCOPY_END: (_NONE, _NOFD),
    Request.GET_INFLIGHT_FD: (_size(INFLIGHT.size), _NOFD),
    Request.SET_INFLIGHT_FD: (_size(INFLIGHT.size), _fds(1)),
    Request.GPU_SET_SOCKET: (_NONE, _fds(1)),
    Request.RESET_DEVICE: (_NONE, _NOFD),
    Request.VRING_KICK: (_STATE, _NOFD),
    Request.GET_MAX_MEM_SLOTS: (_NONE, _NOFD),
    Request.ADD_MEM_REG: (_size(MEM_REG.size), _fds(1)),
    # The spec allows (and says to close) one stray fd on REM_MEM_REG for old front ends.
    Request.REM_MEM_REG: (_size(MEM_REG.size), _fds_upto(1)),
    Request.SET_STATUS: (_U64, _NOFD),
    Request.GET_STATUS: (_NONE, _NOFD),
    Request.GET_SHARED_OBJECT: (_size(16), _NOFD),
    # no fd is refused with an error reply (virtio/devstate.py), not a disconnect
    Request.SET_DEVICE_STATE_FD: (_size(DEVICE_STATE.size), _fds_upto(1)),
    Request.CHECK_DEVICE_STATE: (_NONE, _NOFD),
}


def validate(msg: Message) -> Request:
    """Check a received message against its request's rule; return the request.

    Raises RequestError for an unknown request, a reply flag from the front end, a payload
    size the request does not allow, or a wrong number of fds. The caller still owns (and
    must close) the fds on error.
    """
    try:
        request = Request(msg.request)
    except ValueError:
        raise RequestError(f"unknown request {msg.request}") from None
    if msg.flags & FLAG_REPLY:
        raise RequestError(f"{request.name}: reply flag set on a request")
    size_ok, fds_ok = RULES[request]
    if not size_ok(msg.payload):
        raise RequestError(f"{request.name}: bad payload size {len(msg.payload)}")
    if not fds_ok(msg):
        raise RequestError(f"{request.name}: unexpected number of fds ({len(msg.fds)})")
    return request


# --- encoding ---------------------------------------------------------------------------------

def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    return HEADER.pack(request, flags, len(payload)) + payload


def encode_reply(request: int, payload: bytes) -> bytes:
    return encode(request, payload, VERSION | FLAG_REPLY)


def encode_u64(value: int) -> bytes:
    return U64.pack(value)


def encode_state(index: int, num: int) -> bytes:
    return STATE.pack(index, num)


def encode_vring_addr(addr: VringAddr) -> bytes:
    return ADDR.pack(addr.index, addr.flags, addr.desc, addr.used, addr.avail, addr.log)


def encode_mem_table(regions: Sequence[RegionDesc]) -> bytes:
    return MEM_HEADER.pack(len(regions), 0) + b"".join(r.pack() for r in regions)


def encode_mem_reg(region: RegionDesc) -> bytes:
    return U64.pack(0) + region.pack()


def encode_config(offset: int, flags: int, data: bytes) -> bytes:
    return CONFIG_HEADER.pack(offset, len(data), flags) + data


def send_message(sock: socket.socket, data: bytes, fds: Sequence[int] = ()) -> None:
    """Send one whole message; fds travel with its first byte (as qemu does)."""
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    view = memoryview(data)
    while view:
        sent = sock.sendmsg([view], anc)
        anc = []
        view = view[sent:]


# --- receiving --------------------------------------------------------------------------------

_CMSG_SPACE = socket.CMSG_SPACE(MAX_FDS * array.array("i").itemsize)


class MessageReader:
    """Incremental, non-blocking reader of whole messages from a stream socket.

    Each recvmsg() asks for at most the rest of the current message, so fds sent with a message
    are never attributed to its neighbour. Received fds are close-on-exec (MSG_CMSG_CLOEXEC:
    no window where a fork+exec could inherit them). The reader never holds more than MAX_FDS:
    one more, even spread over a message sent a byte at a time, closes them all and breaks
    the stream (ProtocolError: the connection goes), so an unfinished message cannot pile up
    fds until the process runs out. Truncated fds (MSG_CTRUNC) refuse the message.
    """

    def __init__(self, sock: socket.socket, max_payload: int = MAX_PAYLOAD) -> None:
        self.sock = sock
        self.max_payload = max_payload
        self._buf = bytearray()
        self._fds: list[int] = []
        self._need = HEADER_SIZE
        self._header: tuple[int, int, int] | None = None
        self._bad_fds = False

    def read(self) -> Message | None:
        """Return one complete message, or None if the socket has no more data for now.

        Raises ConnectionClosed at EOF, ProtocolError when the stream is broken and
        RequestError (with the message's fds already closed) for a message carrying too many
        fds.
        """
        while True:
            want = self._need - len(self._buf)
            if want > 0:
                try:
                    data, anc, msg_flags, _ = self.sock.recvmsg(
                        want, _CMSG_SPACE, socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
                except (BlockingIOError, InterruptedError):
                    return None
                except OSError as e:
                    if e.errno in (errno.ECONNRESET, errno.EPIPE):
                        raise ConnectionClosed(str(e)) from None
                    raise
                if not self._collect_fds(anc, msg_flags):
                    held = len(self._fds)
                    self._drop_fds()
                    raise ProtocolError(f"more than {MAX_FDS} fds for one message ({held})")
                if not data:
                    self._drop_fds()
                    raise ConnectionClosed("EOF")
                self._buf += data
                if len(self._buf) < self._need:
                    continue
            if self._header is None:
                request, flags, size = HEADER.unpack(self._buf)
                if flags & VERSION_MASK != VERSION:
                    self._drop_fds()
                    raise ProtocolError(f"bad version in flags {flags:#x}")
                if size > self.max_payload:
                    self._drop_fds()
                    raise ProtocolError(f"payload size {size} exceeds {self.max_payload}")
                self._header = (request, flags, size)
                self._buf.clear()
                self._need = size
                if size:
                    continue
            request, flags, _ = self._header
            msg = Message(request, flags, bytes(self._buf), self._fds)
            bad = self._bad_fds
            self._buf.clear()
            self._fds = []
            self._header = None
            self._need = HEADER_SIZE
            self._bad_fds = False
            if bad:
                msg.close_fds()
                raise RequestError(f"{msg.name()}: too many or truncated fds")
            return msg

    def _collect_fds(self, anc: list[tuple[int, int, bytes]], msg_flags: int) -> bool:
        """Take the fds of one recvmsg(); False if the message now has more than MAX_FDS."""
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
                self._fds.extend(fds)
        if msg_flags & socket.MSG_CTRUNC:
            self._bad_fds = True
        return len(self._fds) <= MAX_FDS

    def _drop_fds(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []

    def close(self) -> None:
        self._drop_fds()
