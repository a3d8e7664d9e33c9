"""Forwarding rules of passt 2026-07 applied end to end in pasta: a target address
(`ADDR/N:TOADDR/P`: the connection goes to TOADDR in the namespace, through the tap, never
spliced), `auto` limited to a range, and --splice-only (no tap: loopback only). Test-made
namespaces and documentation addresses only."""

from __future__ import annotations

import shutil
import sys
import time

import pytest

from tests.netns.pasta_sandbox import start_pasta
from tests.netns.sandbox import Sandbox, wait_until

AS_ROOT = ("--runas", "0")  # the commands are Python under /root (see test_pasta_forward.py)

# In the namespace: optionally an extra local address on lo (the target), then a TCP server
# on each ADDR:PORT given, each answering once with the peer's address; "ready" on stdout.
SERVERS = """
import socket, subprocess, sys, threading
extra = sys.argv[1]
if extra != "-":
    subprocess.run(["ip", "addr", "add", extra + "/32", "dev", "lo"], check=True)
def serve(addr, port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, port)); s.listen(4); s.settimeout(30)
    try:
        c, a = s.accept()
    except OSError:
        return
    c.sendall(f"{addr}:{port} from {a[0]}".encode()); c.close()
ts = []
for spec in sys.argv[2:]:
    addr, port = spec.rsplit(":", 1)
    ts.append(threading.Thread(target=serve, args=(addr, int(port)), daemon=True))
for t in ts:
    t.start()
print("ready", flush=True)
for t in ts:
    t.join(30)
"""


@pytest.fixture
def box_(sandbox: Sandbox) -> Sandbox:
    if shutil.which("nsenter") is None or shutil.which("ip") is None:
        pytest.skip("needs nsenter and ip")
    return sandbox


def _get(box: Sandbox, addr: str, port: int) -> str:
    r = box.host(sys.executable, "-c",
                 "import socket\n"
                 "try:\n"
                 f"    c = socket.create_connection(({addr!r}, {port}), timeout=3)\n"
                 "    print(c.recv(100).decode() or 'closed')\n"
                 "except OSError as e:\n"
                 "    print('error', e.errno)\n", timeout=10)
    return r.stdout.strip()


def test_tcp_forward_to_a_target_address(box_: Sandbox) -> None:
    """-t 0.0.0.0/5105:192.0.2.77/5106: the host's port 5105 goes to 192.0.2.77 port 5106
    in the namespace, not to its own address; from the host's loopback too (a target is
    never spliced), the source then shown as the gateway."""
    box = box_
    p, err = start_pasta(box, *AS_ROOT, "--config-net", "-t", "0.0.0.0/5105:192.0.2.77/5106",
                         "-T", "none", "-u", "none", "-U", "none", "--",
                         sys.executable, "-c", SERVERS, "192.0.2.77", "192.0.2.77:5106",
                         "192.0.2.2:5105")
    try:
        wait_until(lambda: "ready" in err.read_text() or p.poll() is not None, 10,
                   "the namespace servers")
        out = wait_until(lambda: (o := _get(box, "127.0.0.1", 5105)) != "error 111" and o, 5,
                         "the forward", interval=0.2)
        assert out == "192.0.2.77:5106 from 192.0.2.1", out + err.read_text()
    finally:
        p.kill()
        p.wait(5)


def test_auto_limited_to_a_range_and_an_address(box_: Sandbox) -> None:
    """-t 127.0.0.1/8100-8110,auto: a namespace listener inside the range is forwarded, on
    127.0.0.1 only; one outside it is not (auto alone would forward both, on every
    address)."""
    box = box_
    p, err = start_pasta(box, *AS_ROOT, "--config-net", "-t", "127.0.0.1/8100-8110,auto",
                         "-T", "none",
                         "-u", "none", "-U", "none", "--", sys.executable, "-c", SERVERS, "-",
                         "0.0.0.0:8105", "0.0.0.0:8123")
    try:
        wait_until(lambda: "ready" in err.read_text() or p.poll() is not None, 10,
                   "the namespace servers")
        out = wait_until(lambda: (o := _get(box, "127.0.0.1", 8105)) != "error 111" and o, 5,
                         "the automatic forward", interval=0.2)
        assert out == "0.0.0.0:8105 from 192.0.2.2", out + err.read_text()
        assert _get(box, "192.0.2.2", 8105) == "error 111"  # not listening there
        time.sleep(1.5)  # more scans: 8123 stays unforwarded
        assert _get(box, "127.0.0.1", 8123) == "error 111"
    finally:
        p.kill()
        p.wait(5)


def test_splice_only_has_no_tap_and_forwards_loopback_only(box_: Sandbox) -> None:
    """--splice-only: the namespace gets no tap (lo alone); a connection from the host's
    loopback is spliced to the same loopback address (implied --host-lo-to-ns-lo), one from
    another address is reset."""
    box = box_
    script = ("import socket, sys\n"
              "print('ifs', ','.join(n for _, n in socket.if_nameindex()), flush=True)\n"
              f"exec({SERVERS!r})\n")
    p, err = start_pasta(box, *AS_ROOT, "--splice-only", "-t", "5107", "-T", "none", "-u",
                         "none", "-U", "none", "--", sys.executable, "-c", script, "-",
                         "0.0.0.0:5107")
    try:
        wait_until(lambda: "ready" in err.read_text() or p.poll() is not None, 10,
                   "the namespace server")
        assert "ifs lo\n" in err.read_text(), err.read_text()
        assert _get(box, "192.0.2.2", 5107) in ("error 104", "closed")
        out = _get(box, "127.0.0.1", 5107)
        assert out == "0.0.0.0:5107 from 127.0.0.1", out + err.read_text()
    finally:
        p.kill()
        p.wait(5)


UDP_ECHO = """
import socket, subprocess, sys
subprocess.run(["ip", "addr", "add", "192.0.2.77/32", "dev", "lo"], check=True)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("192.0.2.77", 5206)); s.settimeout(20)
print("ready", flush=True)
d, peer = s.recvfrom(100)
s.sendto(b"echo " + d + b" to 192.0.2.77 from " + peer[0].encode(), peer)
"""


def test_udp_forward_to_a_target_address(box_: Sandbox) -> None:
    """-u 0.0.0.0/5205:192.0.2.77/5206: a datagram to the host's port 5205 reaches
    192.0.2.77 port 5206 in the namespace, and the answer comes back."""
    box = box_
    p, err = start_pasta(box, *AS_ROOT, "--config-net", "-u", "0.0.0.0/5205:192.0.2.77/5206",
                         "-t", "none", "-T", "none", "-U", "none", "--", sys.executable, "-c",
                         UDP_ECHO)
    try:
        wait_until(lambda: "ready" in err.read_text() or p.poll() is not None, 10,
                   "the namespace server")
        r = box.host(sys.executable, "-c",
                     "import socket\n"
                     "c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(5)\n"
                     "c.sendto(b'x', ('127.0.0.1', 5205)); print(c.recvfrom(100)[0].decode())\n",
                     timeout=15)
        assert r.stdout.strip() == "echo x to 192.0.2.77 from 192.0.2.1", r.stderr + err.read_text()
    finally:
        p.kill()
        p.wait(5)
