#!/usr/bin/env python3
"""Play qemu's part: copy Ethernet frames between a tap device and a passt-style stream socket.

Run inside the guest network namespace (`ip netns exec GUEST python tests/netns/relay.py --socket
PATH --tap tap0`). The namespace's kernel then acts as the guest's TCP/IP stack. On the socket
every frame is preceded by its length as a 4-byte big-endian integer (qemu `-netdev stream`);
on the tap each read()/write() is one frame (IFF_TAP | IFF_NO_PI).

The relay reports its state in `--status-file` (rewritten atomically) as `key=value` lines:
`state` (connecting, connected, disconnected, exited), `connections` (how many times it got
connected), `to_tap` / `to_socket` (frames copied each way). Tests wait on that file.

Standalone on purpose (no vhostpasst import): it stands for qemu, not for our code.
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import os
import selectors
import signal
import socket
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
MAX_FRAME = 65535 + 14  # a frame longer than this would not fit passt's 16-bit length checks
SOCK_QUEUE_LIMIT = 8 << 20  # stop reading the tap while this much is waiting for the socket
HDR = struct.Struct("!I")


class Relay:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.sel = selectors.DefaultSelector()
        self.tap = self._open_tap(args.tap)
        self.sock: socket.socket | None = None
        self.rx = bytearray()  # socket bytes not yet forming a whole frame
        self.tx = bytearray()  # framed bytes waiting to be written to the socket
        self.tap_queue: list[bytes] = []  # frames the tap refused (EAGAIN) for now
        self.connections = 0
        self.to_tap = 0
        self.to_socket = 0
        self.state = "connecting"
        self.stopping = False
        self.sel.register(self.tap, selectors.EVENT_READ, "tap")

    @staticmethod
    def _open_tap(name: str) -> int:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        ifr = struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        return fd

    def log(self, msg: str) -> None:
        if self.args.verbose:
            print(f"relay: {msg}", file=sys.stderr, flush=True)

    def write_status(self) -> None:
        if not self.args.status_file:
            return
        tmp = self.args.status_file + ".tmp"
        with open(tmp, "w") as f:
            f.write(
                f"state={self.state}\nconnections={self.connections}\n"
                f"to_tap={self.to_tap}\nto_socket={self.to_socket}\npid={os.getpid()}\n"
            )
        os.replace(tmp, self.args.status_file)

    # --- socket side ---------------------------------------------------------------------

    def connect(self, deadline: float) -> bool:
        """Connect to the stream socket, retrying (the daemon may not listen yet) until deadline."""
        delay = 0.02
        while not self.stopping:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
            try:
                s.connect(self.args.socket)
            except OSError as e:
                s.close()
                if time.monotonic() + delay > deadline:
                    self.log(f"connect {self.args.socket}: {e}; giving up")
                    return False
                time.sleep(delay)
                delay = min(delay * 2, 0.2)
                continue
            s.setblocking(False)
            self.sock = s
            self.rx.clear()
            self.tx.clear()
            self.connections += 1
            self.state = "connected"
            self.sel.register(s, selectors.EVENT_READ, "sock")
            self.write_status()
            self.log(f"connected ({self.connections})")
            return True
        return False

    def disconnect(self, why: str) -> None:
        if self.sock is None:
            return
        self.log(f"disconnected: {why}")
        self.sel.unregister(self.sock)
        self.sock.close()
        self.sock = None
        self.state = "disconnected"
        self.write_status()

    def update_sock_events(self) -> None:
        if self.sock is None:
            return
        events = selectors.EVENT_READ
        if self.tx:
            events |= selectors.EVENT_WRITE
        self.sel.modify(self.sock, events, "sock")

    def on_sock_readable(self) -> None:
        assert self.sock is not None
        for _ in range(64):  # bounded: let the tap side have a turn
            try:
                data = self.sock.recv(1 << 20)
            except BlockingIOError:
                break
            except OSError as e:
                self.disconnect(f"recv: {e}")
                return
            if not data:
                self.disconnect("end of stream")
                return
            self.rx += data
            self._frames_from_rx()
            if self.tap_queue:
                break  # the tap is full; wait for it before reading more

    def _frames_from_rx(self) -> None:
        """Cut whole frames off the front of rx (partial ones wait for more bytes)."""
        off = 0
        while len(self.rx) - off >= HDR.size:
            (length,) = HDR.unpack_from(self.rx, off)
            if len(self.rx) - off - HDR.size < length:
                break
            frame = bytes(self.rx[off + HDR.size : off + HDR.size + length])
            off += HDR.size + length
            if length == 0 or length > MAX_FRAME:
                self.log(f"dropping frame of length {length}")
                continue
            self.to_tap_frame(frame)
        del self.rx[:off]

    def on_sock_writable(self) -> None:
        assert self.sock is not None
        try:
            n = self.sock.send(self.tx)
        except BlockingIOError:
            return
        except OSError as e:
            self.disconnect(f"send: {e}")
            return
        del self.tx[:n]

    # --- tap side ------------------------------------------------------------------------

    def to_tap_frame(self, frame: bytes) -> None:
        if self.tap_queue:
            self.tap_queue.append(frame)
            return
        try:
            os.write(self.tap, frame)
            self.to_tap += 1
        except BlockingIOError:
            self.tap_queue.append(frame)
        except OSError as e:  # e.g. EINVAL for a runt: the kernel refuses it, so do we
            self.log(f"tap write ({len(frame)} bytes): {e}")

    def flush_tap_queue(self) -> None:
        while self.tap_queue:
            try:
                os.write(self.tap, self.tap_queue[0])
                self.to_tap += 1
            except BlockingIOError:
                return
            except OSError as e:
                self.log(f"tap write: {e}")
            self.tap_queue.pop(0)

    def on_tap_readable(self) -> None:
        for _ in range(256):  # bounded batch per wakeup
            if len(self.tx) > SOCK_QUEUE_LIMIT:
                return
            try:
                frame = os.read(self.tap, MAX_FRAME)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno.EINTR:
                    continue
                raise
            if self.sock is None:
                continue  # no peer: the cable is unplugged, frames are lost
            self.tx += HDR.pack(len(frame)) + frame
            self.to_socket += 1

    # --- main loop -----------------------------------------------------------------------

    def run(self) -> int:
        start_deadline = time.monotonic() + self.args.connect_timeout
        self.write_status()
        if not self.connect(start_deadline):
            self.state = "exited"
            self.write_status()
            return 1
        last_status = time.monotonic()
        while not self.stopping:
            if self.sock is None:
                if not self.args.reconnect:
                    break
                self.state = "connecting"
                self.write_status()
                if not self.connect(time.monotonic() + self.args.reconnect_timeout):
                    break
            self.update_sock_events()
            for key, mask in self.sel.select(timeout=0.2):
                if key.data == "tap":
                    self.on_tap_readable()
                elif self.sock is not None:
                    if mask & selectors.EVENT_WRITE:
                        self.on_sock_writable()
                    if self.sock is not None and mask & selectors.EVENT_READ:
                        self.on_sock_readable()
            if self.tap_queue:
                self.flush_tap_queue()
            if time.monotonic() - last_status > 0.2:  # counters for tests, cheaply
                self.write_status()
                last_status = time.monotonic()
        self.disconnect("exiting")
        self.state = "exited"
        self.write_status()
        return 0

    def stop(self, *_: object) -> None:
        self.stopping = True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--socket", required=True, help="UNIX stream socket of the daemon")
    p.add_argument("--tap", default="tap0", help="tap interface (in this network namespace)")
    p.add_argument("--status-file", help="where to report state and counters")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help="seconds to keep retrying the first connection")
    p.add_argument("--reconnect", action="store_true",
                   help="when the socket closes, connect again instead of exiting")
    p.add_argument("--reconnect-timeout", type=float, default=10.0,
                   help="seconds to keep retrying each reconnection")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    relay = Relay(args)
    signal.signal(signal.SIGTERM, relay.stop)
    signal.signal(signal.SIGINT, relay.stop)
    return relay.run()


if __name__ == "__main__":
    sys.exit(main())
