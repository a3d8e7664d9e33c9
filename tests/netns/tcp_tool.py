"""A small TCP client/server for the end-to-end tests, run inside the sandbox namespaces.

    serve ADDR PORT ACTION READY [ARG]     listen, then per connection (a thread each):
        sink      read to EOF, answer "<bytes> <sha256>\\n", close
        source N  send N pattern bytes, close
        echo      send back everything read, close after EOF
        slow N    read slowly (N bytes per 50 ms), then answer as sink
        shutwr    send a little, shut down writing, then read to EOF
        hold      read until EOF or an error, log which
        rst       reset the connection (SO_LINGER 0) after 0.3 s
    connect ADDR PORT ACTION [ARG]          one connection, prints a JSON report
        send N    send N bytes, shut down writing, read the answer
        recv      read to EOF: byte count and sha256
        both N    send N bytes and read at the same time (against echo)
        multi C N C connections at once, each as `send N`
        refused   expect ECONNREFUSED
        shutrd N  send N bytes and shut down writing, then read to EOF (half-close)
        halfserver N  read the server's data and its EOF, then send N bytes
        waitrst   connect and wait to be reset
        rst       connect, send a little, then reset (SO_LINGER 0)
        hold N    send N bytes (or until blocked for 5 s), then wait for a reset
Every blocking call has a timeout; the data is a fixed pseudo-random pattern.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import struct
import sys
import threading
import time

BLOCK = random.Random(4).randbytes(1 << 20)
TIMEOUT = 60


def pattern(n: int) -> tuple[list[memoryview], str]:
    view = memoryview(BLOCK)
    out = []
    h = hashlib.sha256()
    while n > 0:
        piece = view[: min(n, len(view))]
        out.append(piece)
        h.update(piece)
        n -= len(piece)
    return out, h.hexdigest()


def family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def read_all(s: socket.socket, delay: float = 0, chunk: int = 1 << 16) -> tuple[int, str]:
    h = hashlib.sha256()
    total = 0
    while True:
        data = s.recv(chunk)
        if not data:
            return total, h.hexdigest()
        h.update(data)
        total += len(data)
        if delay:
            time.sleep(delay)


def send_all(s: socket.socket, n: int) -> str:
    pieces, digest = pattern(n)
    for p in pieces:
        s.sendall(p)
    return digest


def serve(addr: str, port: int, action: str, ready: str, arg: str | None) -> None:
    ls = socket.socket(family(addr), socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if action == "slow":  # a small receive buffer: the window closes quickly
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
    ls.bind((addr, port))
    ls.listen(1024)
    ls.settimeout(TIMEOUT * 2)
    with open(ready + ".tmp", "w") as f:
        f.write("ready\n")
    os.rename(ready + ".tmp", ready)
    log = open(ready + ".log", "a")
    lock = threading.Lock()

    def handle(c: socket.socket, peer: tuple) -> None:
        c.settimeout(TIMEOUT)
        try:
            if action == "sink":
                n, digest = read_all(c)
                c.sendall(f"{n} {digest}\n".encode())
                result = f"{peer[0]} {n} {digest}"
            elif action == "slow":
                n, digest = read_all(c, delay=0.05, chunk=int(arg or 4096))
                c.sendall(f"{n} {digest}\n".encode())
                result = f"{peer[0]} {n} {digest}"
            elif action == "source":
                digest = send_all(c, int(arg or 0))
                result = f"{peer[0]} sent {digest}"
            elif action == "echo":
                total = 0
                while True:
                    data = c.recv(1 << 16)
                    if not data:
                        break
                    c.sendall(data)
                    total += len(data)
                result = f"{peer[0]} echoed {total}"
            elif action == "shutwr":  # half-close from this side, then keep reading
                c.sendall(b"server-data")
                c.shutdown(socket.SHUT_WR)
                n, digest = read_all(c)
                result = f"{peer[0]} {n} {digest}"
            elif action == "rst":  # reset the connection after a moment
                time.sleep(0.3)
                c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                result = f"{peer[0]} reset"
            elif action == "hold":
                try:
                    while c.recv(1 << 16):
                        pass
                    result = f"{peer[0]} eof"
                except OSError as e:
                    result = f"{peer[0]} error {e.errno}"
            else:
                result = f"unknown action {action}"
        except OSError as e:
            result = f"{peer[0]} error {e.errno} {e}"
        finally:
            c.close()
        with lock:
            log.write(result + "\n")
            log.flush()

    while True:
        try:
            c, peer = ls.accept()
        except TimeoutError:
            return
        threading.Thread(target=handle, args=(c, peer), daemon=True).start()


def connect(addr: str, port: int, timeout: float = TIMEOUT) -> socket.socket:
    s = socket.socket(family(addr), socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect((addr, port))
    return s


def client(addr: str, port: int, action: str, args: list[str]) -> dict:
    t0 = time.monotonic()
    if action == "send":
        s = connect(addr, port)
        digest = send_all(s, int(args[0]))
        s.shutdown(socket.SHUT_WR)
        answer = s.makefile().readline().split()
        return {"sha": digest, "answer": answer, "seconds": time.monotonic() - t0}
    if action == "recv":
        s = connect(addr, port)
        n, digest = read_all(s)
        return {"bytes": n, "sha": digest, "seconds": time.monotonic() - t0}
    if action == "both":
        s = connect(addr, port)
        got: dict = {}

        def reader() -> None:
            got["n"], got["sha"] = read_all(s)

        th = threading.Thread(target=reader)
        th.start()
        digest = send_all(s, int(args[0]))
        s.shutdown(socket.SHUT_WR)
        th.join(TIMEOUT)
        return {"sha": digest, "echo_bytes": got.get("n"), "echo_sha": got.get("sha"),
                "seconds": time.monotonic() - t0}
    if action == "multi":
        count, size = int(args[0]), int(args[1])
        results: list = [None] * count

        def one(i: int) -> None:
            try:
                s = connect(addr, port)
                digest = send_all(s, size)
                s.shutdown(socket.SHUT_WR)
                answer = s.makefile().readline().split()
                results[i] = answer == [str(size), digest]
                s.close()
            except OSError as e:
                results[i] = f"error {e}"

        threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(TIMEOUT * 2)
        ok = sum(1 for r in results if r is True)
        bad = [r for r in results if r is not True][:5]
        return {"ok": ok, "bad": bad, "seconds": time.monotonic() - t0}
    if action == "refused":
        try:
            connect(addr, port, float(args[0]) if args else 10)
        except ConnectionRefusedError:
            return {"refused": True}
        except OSError as e:
            return {"refused": False, "error": str(e)}
        return {"refused": False}
    if action == "shutrd":  # we stop writing first, then read what the server sends
        s = connect(addr, port)
        digest = send_all(s, int(args[0]))
        s.shutdown(socket.SHUT_WR)
        n, got = read_all(s)
        return {"sha": digest, "bytes": n, "read_sha": got}
    if action == "halfserver":  # the server stops writing first; we keep sending after
        s = connect(addr, port)
        first = s.recv(100)
        eof = s.recv(100)
        digest = send_all(s, int(args[0]))
        s.shutdown(socket.SHUT_WR)
        return {"first": first.decode(), "eof": eof == b"", "sha": digest}
    if action == "rst":
        s = connect(addr, port)
        s.sendall(b"hello")
        time.sleep(0.3)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
        return {"reset": True}
    if action == "waitrst":  # the other side resets: we must see ECONNRESET
        try:
            s = connect(addr, port)
            data = s.recv(100)
            return {"reset": False, "data": data.decode(errors="replace")}
        except ConnectionResetError:
            return {"reset": True}
    if action == "hold":  # push data at a peer that stops answering, until it is reset
        s = connect(addr, port, 120)
        chunk = memoryview(BLOCK)[:65536]
        sent = 0
        try:
            while sent < int(args[0]):
                sent += s.send(chunk)
            data = s.recv(100)
            return {"reset": False, "data": len(data), "seconds": time.monotonic() - t0}
        except (ConnectionResetError, BrokenPipeError, TimeoutError) as e:
            return {"reset": type(e).__name__, "sent": sent,
                    "seconds": time.monotonic() - t0}
    raise SystemExit(f"unknown action {action}")


def main() -> None:
    if sys.argv[1] == "serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5],
              sys.argv[6] if len(sys.argv) > 6 else None)
    else:
        print(json.dumps(client(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])))


if __name__ == "__main__":
    main()
