"""Host-side peers for the guest cases, run inside the host namespace as
`python hostside.py MODE ...` (a separate process: the test process itself stays outside).

    serve-send  ADDR PORT FILE   accept one TCP connection, send FILE, close
    serve-send-paused ADDR PORT FILE GO   the same, but after the first half of FILE print
                                 "half" and wait (at most 120 s) until the path GO exists
    serve-recv  ADDR PORT [HALF] accept one TCP connection, read to EOF, print "size sha256"
                                 (and "half" once HALF bytes are in, if given)
    send        ADDR PORT FILE   connect, send FILE, close
    send-paused ADDR PORT FILE GO   connect, then as serve-send-paused
    dns         ADDR NAME A AAAA a tiny DNS responder: NAME -> A / AAAA, NXDOMAIN otherwise;
                                 prints "query NAME TYPE" for every question it gets

Each server prints "ready" once it listens, so the test never races its own peer.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import socket
import struct
import sys
import time


def _family(addr: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def _listen(addr: str, port: int) -> socket.socket:
    srv = socket.socket(_family(addr))
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((addr, port))
    srv.listen(1)
    srv.settimeout(120)  # bounded: the test kills us anyway, this covers a lost test process
    print("ready", flush=True)
    return srv


def serve_send(addr: str, port: int, path: str) -> None:
    conn, _ = _listen(addr, port).accept()
    with open(path, "rb") as f:
        conn.sendfile(f)
    conn.close()


def _send_paused(conn: socket.socket, path: str, go: str) -> None:
    """Half of the file at `path`, "half", a wait (bounded) for the path `go`, the rest."""
    with open(path, "rb") as f:
        data = f.read()
    conn.sendall(data[:len(data) // 2])
    print("half", flush=True)
    for _ in range(1200):
        if os.path.exists(go):
            break
        time.sleep(0.1)
    conn.sendall(data[len(data) // 2:])
    conn.close()


def serve_send_paused(addr: str, port: int, path: str, go: str) -> None:
    conn, _ = _listen(addr, port).accept()
    _send_paused(conn, path, go)


def send_paused(addr: str, port: int, path: str, go: str) -> None:
    _send_paused(socket.create_connection((addr, port), timeout=30), path, go)


def serve_recv(addr: str, port: int, half: int | None = None) -> None:
    conn, _ = _listen(addr, port).accept()
    conn.settimeout(120)
    h, got = hashlib.sha256(), 0
    while data := conn.recv(1 << 20):
        h.update(data)
        if half is not None and got < half <= got + len(data):
            print("half", flush=True)
        got += len(data)
    print(got, h.hexdigest(), flush=True)
    conn.close()


def send(addr: str, port: int, path: str) -> None:
    conn = socket.create_connection((addr, port), timeout=30)
    with open(path, "rb") as f:
        conn.sendfile(f)
    conn.close()  # the guest's nc ends at our FIN


def _qname(msg: bytes) -> tuple[str, int]:
    labels, i = [], 12
    while msg[i]:
        labels.append(msg[i + 1 : i + 1 + msg[i]].decode())
        i += 1 + msg[i]
    return ".".join(labels), i + 1


def dns(addr: str, name: str, a: str, aaaa: str) -> None:
    sock = socket.socket(_family(addr), socket.SOCK_DGRAM)
    sock.bind((addr, 53))
    print("ready", flush=True)
    while True:
        msg, peer = sock.recvfrom(512)
        if len(msg) < 17:
            continue
        qname, end = _qname(msg)
        qtype = struct.unpack("!H", msg[end : end + 2])[0]
        question = msg[12 : end + 4]
        print("query", qname, qtype, flush=True)
        answers = b""
        if qname.lower() == name.lower() and qtype in (1, 28):
            rdata = ipaddress.ip_address(a if qtype == 1 else aaaa).packed
            # Name as a pointer to the question (offset 12), class IN, TTL 60.
            answers = struct.pack("!HHHIH", 0xC00C, qtype, 1, 60, len(rdata)) + rdata
        rcode = 0 if qname.lower() == name.lower() else 3
        flags = 0x8180 | rcode  # response, recursion desired + available
        header = msg[:2] + struct.pack("!HHHHH", flags, 1, 1 if answers else 0, 0, 0)
        sock.sendto(header + question + answers, peer)


def main() -> None:
    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "serve-send":
        serve_send(args[0], int(args[1]), args[2])
    elif mode == "serve-send-paused":
        serve_send_paused(args[0], int(args[1]), args[2], args[3])
    elif mode == "serve-recv":
        serve_recv(args[0], int(args[1]), *(int(a) for a in args[2:3]))
    elif mode == "send":
        send(args[0], int(args[1]), args[2])
    elif mode == "send-paused":
        send_paused(args[0], int(args[1]), args[2], args[3])
    elif mode == "dns":
        dns(*args)
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
