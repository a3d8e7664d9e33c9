"""The control socket (-c/--conf-path): passt 2026-07's protocol (protocol.py), served from
the event loop without ever blocking it.

Theory of operation
-------------------
passt runs the exchange with a client synchronously: a client that connects and then sends
half an update stalls every guest connection until it goes away. Here each step is an event:

    accept --> SENDING hello+tables --> (client may write at any time) --> update complete
           --> apply (forwarder.py: checked, bound, switched, or rolled back) --> RESULT
           --> close                   read-only client: end of stream --> close
           --> QUERY_FLOWS byte --> one JSON document (flows.py) --> close

- One client at a time, as passt: while one is served, the listening socket is not watched,
  so further clients wait in its backlog (LISTEN_BACKLOG) and are served in turn.
- Bounded: what a client may send is bounded by the largest valid update (every table full);
  more is a protocol error. Every client has CLIENT_TIMEOUT seconds from accept to the end
  of its exchange; then it is dropped, logged once per interval (RateLimitedLog).
- Sockets are non-blocking and writes use MSG_NOSIGNAL: a client that went away (passt's pesto
  shuts down without reading our RESULT) costs nothing.
- An update that fails its checks or cannot bind changes nothing (forwarder.py) and the
  client gets the error in the RESULT; the daemon goes on serving either way.
- The socket path is refused if another process still listens on it, otherwise a stale
  socket file is replaced (as passt's sock_unix()).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from vhostpasst.core.log import RateLimitedLog
from vhostpasst.core.loop import EPOLLERR, EPOLLHUP, EPOLLIN, EPOLLOUT, EPOLLRDHUP, Loop, Timer
from vhostpasst.ctl import protocol
from vhostpasst.ctl.forwarder import Forwarder
from vhostpasst.ctl.rules import RuleError

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 4
CLIENT_TIMEOUT = 10.0  # seconds from accept to the end of the exchange
RECV_CHUNK = 65536


class ControlServer:
    def __init__(self, loop: Loop, path: str, forwarder: Forwarder,
                 flows: Callable[[], bytes], timeout: float = CLIENT_TIMEOUT) -> None:
        """Listen on `path`. `flows()` makes the JSON document of a flow query. OSError if
        the path is in use by a live server or cannot be bound."""
        self.loop = loop
        self.path = path
        self.forwarder = forwarder
        self.flows = flows
        self.timeout = timeout
        self.ratelimited = RateLimitedLog(log)  # what clients can cause, once per interval
        self.client: _Client | None = None
        self.sock = _listening_socket(path)
        loop.add_fd(self.sock.fileno(), EPOLLIN, self._on_listen)

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.loop.remove_fd(self.sock.fileno())
        self.sock.close()
        try:
            os.unlink(self.path)
        except OSError:
            pass  # gone already, or the sandbox's empty root hides it

    def _on_listen(self, _mask: int) -> None:
        if self.client is not None:
            return
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self.ratelimited.warning(("accept", e.errno), "control socket: accept: %s", e.strerror)
            return
        sock.setblocking(False)
        pid = _peer_pid(sock)
        self.ratelimited.log(logging.INFO, "connected", "control client connected (pid %s)",
                             pid if pid is not None else "unknown")
        self.loop.modify_fd(self.sock.fileno(), 0)  # the next client waits in the backlog
        self.client = _Client(self, sock)

    def client_done(self) -> None:
        self.client = None
        self.loop.modify_fd(self.sock.fileno(), EPOLLIN)

    def handle(self, data: bytes) -> bytes | None:
        """The reply to what a client sent so far, or None while it is incomplete.
        ProtocolError ends the connection."""
        if data[:1] == bytes([protocol.QUERY_FLOWS]):
            if len(data) > 1:
                raise protocol.ProtocolError("data after the flow query")
            return protocol.length_prefixed(self.flows())
        try:
            update = protocol.decode_update(data, set(self.forwarder.sides))
        except RuleError as e:
            return self._refused(errno.EINVAL, str(e))
        if update is None:
            return None
        if not update:
            return protocol.result(0, "nothing to change")
        try:
            summary = self.forwarder.replace(update)
        except RuleError as e:
            return self._refused(errno.EINVAL, str(e))
        except OSError as e:
            return self._refused(e.errno or errno.EIO, str(e.strerror or e))
        for pif in update:
            side = self.forwarder.sides[pif]
            log.info("New forwarding rules for %s:", side.name)
            for rule in side.rules:
                log.info("    %s", rule)
        log.info("control: forwarding updated (%s)", summary)
        return protocol.result(0, summary)

    def _refused(self, code: int, message: str) -> bytes:
        self.ratelimited.warning("refused", "control: update refused, nothing changed: %s",
                                 message)
        return protocol.result(code, message)


class _Client:
    def __init__(self, server: ControlServer, sock: socket.socket) -> None:
        self.server = server
        self.loop = server.loop
        self.sock = sock
        self.fd = sock.fileno()
        self.inbuf = bytearray()
        self.limit = protocol.update_max(len(server.forwarder.sides))
        self.out = bytearray(protocol.hello()
                             + protocol.encode_tables(server.forwarder.tables()))
        self.replied = False
        self.closed = False
        self.timer: Timer = self.loop.call_later(server.timeout, self._expired)
        # the hello goes out on the first EPOLLOUT (a close from here would precede the
        # server's note of this client)
        self.loop.add_fd(self.fd, self._events(), self._on_event, self._failed)

    def _events(self) -> int:
        if self.replied:
            return EPOLLOUT if self.out else 0
        return EPOLLIN | EPOLLRDHUP | (EPOLLOUT if self.out else 0)

    def _on_event(self, mask: int) -> None:
        if mask & EPOLLOUT:
            self._write()
        if not self.closed and not self.replied and mask & (EPOLLIN | EPOLLRDHUP | EPOLLHUP
                                                            | EPOLLERR):
            self._read()  # an error or hang-up shows there as one, or as the end of stream
        if not self.closed:
            if self.replied and not self.out:
                self.close()
            else:
                self.loop.modify_fd(self.fd, self._events())

    def _read(self) -> None:
        try:
            data = self.sock.recv(min(RECV_CHUNK, self.limit - len(self.inbuf) + 1))
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            self._end(f"receive failed: {e.strerror}")
            return
        if not data:  # end of stream
            if self.inbuf:
                self._end("the client closed in the middle of an update")
            else:
                log.debug("control client closed (read only)")
                self.close()
            return
        self.inbuf += data
        if len(self.inbuf) > self.limit:
            self._end("the client sent more than any valid update")
            return
        try:
            reply = self.server.handle(bytes(self.inbuf))
        except protocol.ProtocolError as e:
            self._end(str(e), protocol.result(errno.EPROTO, str(e)))
            return
        if reply is not None:
            self.out += reply
            self.replied = True
            self._write()

    def _write(self) -> None:
        while self.out:
            try:
                sent = self.sock.send(self.out, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno not in (errno.EPIPE, errno.ECONNRESET):
                    self.server.ratelimited.warning(("send", e.errno), "control socket: send: %s",
                                             e.strerror)
                self.out.clear()
                if not self.replied:
                    self.close()
                return
            del self.out[:sent]

    def _end(self, why: str, reply: bytes = b"") -> None:
        self.server.ratelimited.warning(("client", why), "control client dropped: %s", why)
        if reply:
            self.out = bytearray(reply)
            self.replied = True
            self._write()
            if self.out and not self.closed:
                self.loop.modify_fd(self.fd, self._events())
                return
        self.close()

    def _expired(self) -> None:
        if not self.closed:
            self._end(f"no complete exchange within {self.server.timeout:g} s")

    def _failed(self, e: Exception) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.timer.cancel()
        self.loop.remove_fd(self.fd)
        self.sock.close()
        self.server.client_done()


def _peer_pid(sock: socket.socket) -> int | None:
    try:
        cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
    except OSError:
        return None
    return int.from_bytes(cred[:4], "little")


def _listening_socket(path: str) -> socket.socket:
    """A listening UNIX socket at `path`: EADDRINUSE if a server still answers there; a stale
    socket file is replaced, anything else at the path is left alone (bind fails)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        probe.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    except BlockingIOError:  # a full backlog: someone listens
        raise OSError(errno.EADDRINUSE, f"{path} is in use") from None
    except OSError:
        pass
    else:
        raise OSError(errno.EADDRINUSE, f"{path} is in use")
    finally:
        probe.close()
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX,
                         socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock
