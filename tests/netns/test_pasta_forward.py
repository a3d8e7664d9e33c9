"""pasta forwarding end to end: host loopback -> namespace through splice (TCP 200 MiB, UDP),
-U, automatic ports following listeners, the gateway reaching host loopback through the tap,
podman's command line with a published port, IPv6 ping. Test-made namespaces and
documentation addresses only."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from tests.netns.checked_stream import CLIENT, SERVER, SIZE_MIB, _expected
from tests.netns.pasta_sandbox import (
    PODMAN_ARGS,
    _podman_netns,
    _remove_netns_file,
    background_pid,
    in_netns,
    kill_quietly,
    pasta_command,
    run_pasta,
    start_pasta,
    wait_gone,
)
from tests.netns.sandbox import Sandbox, wait_until

MIB = 1 << 20
# spawn mode as root runs the command as nobody (mapped to root inside), as pasta does; these
# commands are Python under /root, which nobody cannot reach: stay root, as one would with
# pasta (test_isolation.py covers the switch)
AS_ROOT = ("--runas", "0")

TCP_ECHO_ONCE = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(4)
print("ready", flush=True)
c, a = s.accept()
c.sendall(b"hello from " + a[0].encode()); c.close(); s.close()
"""

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    d, peer = s.recvfrom(2048)
    s.sendto(b"echo:" + d, peer)
"""


@pytest.fixture
def box_(sandbox: Sandbox) -> Sandbox:
    if shutil.which("nsenter") is None or shutil.which("unshare") is None:
        pytest.skip("needs nsenter and unshare (util-linux)")
    return sandbox


def _host_tcp_get(box: Sandbox, addr: str, port: int) -> str:
    r = box.host(sys.executable, "-c",
                 "import socket, sys\n"
                 "try:\n"
                 f"    c = socket.create_connection(({addr!r}, {port}), timeout=3)\n"
                 "    print(c.recv(100).decode() or 'closed')\n"
                 "except OSError as e:\n"
                 "    print('error', e.errno)\n", timeout=10)
    return r.stdout.strip()


def test_tcp_host_to_ns_spliced_200mib(box_: Sandbox) -> None:
    box = box_
    port = 5100
    pcap = box.dir / "splice.pcap"
    ns = box.popen_in(box.host_ns, *pasta_command(), *AS_ROOT, "--config-net", "-t", str(port),
                      "-T", "none", "-u", "none", "-U", "none", "-p", str(pcap), "--",
                      sys.executable, "-c", SERVER, "0.0.0.0", str(port), str(SIZE_MIB),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert ns.stdout is not None and ns.stdout.readline() == b"ready\n"
        r = box.host(sys.executable, "-c", CLIENT, "127.0.0.1", str(port), str(SIZE_MIB),
                     timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        sent, echoed, got, n = r.stdout.split()
        assert sent == echoed
        assert got == _expected(2, SIZE_MIB) and int(n) == SIZE_MIB * MIB
        assert ns.wait(20) == 0
        # splice, not the tap: the capture holds only a few frames, not 400 MiB
        assert pcap.stat().st_size < MIB
    finally:
        ns.kill()
        ns.wait(5)


def test_tcp_host_ipv6_loopback_to_ns_after_link_local_frames(box_: Sandbox) -> None:
    """`curl localhost:PORT` tries ::1 first. The namespace's first IPv6 frames come from its
    link-local address (MLD reports, router solicitations); the spliced connection must still
    go to its assigned address, not to a link-local one without a scope."""
    box = box_
    ns = box.popen_in(box.host_ns, *pasta_command(), *AS_ROOT, "--config-net", "-t", "5103",
                      "-T", "none", "--", sys.executable, "-c", TCP_ECHO_ONCE, "::", "5103",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert ns.stdout is not None and ns.stdout.readline() == b"ready\n"
        time.sleep(2)  # the link's MLD reports and router solicitations have gone out
        out = _host_tcp_get(box, "::1", 5103)
        # spliced to the namespace's own address (copied from the host): it connects from it
        assert out == "hello from 2001:db8::2", out
        assert ns.wait(10) == 0
    finally:
        ns.kill()
        ns.wait(5)


@pytest.mark.parametrize("flag", [False, True], ids=["default", "host-lo-to-ns-lo"])
def test_tcp_host_loopback_address_to_ns(box_: Sandbox, flag: bool) -> None:
    """--host-lo-to-ns-lo: a connection to a host loopback address (here 127.0.0.2) goes to
    the same loopback address in the namespace; without it, to the namespace's address."""
    box = box_
    server = "127.0.0.2" if flag else "0.0.0.0"
    ns = box.popen_in(box.host_ns, *pasta_command(), *AS_ROOT, "--config-net", "-t", "5104",
                      "-T", "none", *(["--host-lo-to-ns-lo"] if flag else []), "--",
                      sys.executable, "-c", TCP_ECHO_ONCE, server, "5104",
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert ns.stdout is not None and ns.stdout.readline() == b"ready\n"
        out = _host_tcp_get(box, "127.0.0.2", 5104)
        # from the namespace's loopback, or from its own address (copied from the host)
        assert out == ("hello from 127.0.0.1" if flag else "hello from 192.0.2.2"), out
        assert ns.wait(10) == 0
    finally:
        ns.kill()
        ns.wait(5)


def test_tcp_host_to_ns_no_splice_goes_through_tap(box_: Sandbox) -> None:
    box = box_
    pcap = box.dir / "tap.pcap"
    ns = box.popen_in(box.host_ns, *pasta_command(), *AS_ROOT, "--config-net", "--no-splice", "-t",
                      "5101", "-T", "none", "-p", str(pcap), "--", sys.executable, "-c",
                      TCP_ECHO_ONCE, "0.0.0.0", "5101", stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    try:
        assert ns.stdout is not None and ns.stdout.readline() == b"ready\n"
        out = _host_tcp_get(box, "127.0.0.1", 5101)
        # through the tap the namespace sees the gateway as the source (loopback mapped)
        assert out == "hello from 192.0.2.1", out
        assert ns.wait(10) == 0
        assert pcap.stat().st_size > 0
    finally:
        ns.kill()
        ns.wait(5)


def test_udp_splice_both_ways(box_: Sandbox) -> None:
    box = box_
    echo = box.popen_in(box.host_ns, sys.executable, "-c", UDP_ECHO, "127.0.0.1", "5202", "2",
                        stdout=subprocess.PIPE)
    assert echo.stdout is not None and echo.stdout.readline() == b"ready\n"
    # the namespace: a UDP echo on 5201 for the host, and a client of the host's 5202 (-U)
    script = ("import socket, subprocess, sys, time\n"
              f"e = subprocess.Popen([sys.executable, '-c', {UDP_ECHO!r}, '0.0.0.0', '5201',"
              " '2'], stdout=subprocess.PIPE)\n"
              "e.stdout.readline(); print('ready', flush=True)\n"
              "c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(5)\n"
              "c.sendto(b'ns1', ('127.0.0.1', 5202)); print(c.recvfrom(100)[0].decode())\n"
              "c.sendto(b'ns2', ('127.0.0.1', 5202)); print(c.recvfrom(100)[0].decode())\n"
              "e.wait(20)\n")
    ns = box.popen_in(box.host_ns, *pasta_command(), *AS_ROOT, "--config-net", "-u", "5201", "-U",
                      "5202", "-t", "none", "-T", "none", "--", sys.executable, "-c", script,
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert ns.stdout is not None and ns.stdout.readline() == b"ready\n"
        r = box.host(sys.executable, "-c",
                     "import socket\n"
                     "c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(5)\n"
                     "for m in (b'h1', b'h2'):\n"
                     "    c.sendto(m, ('127.0.0.1', 5201)); print(c.recvfrom(100)[0].decode())\n",
                     timeout=15)
        assert r.stdout.split() == ["echo:h1", "echo:h2"], r.stderr
        # not communicate(): it reads the pipe itself, past what readline() above may have
        # buffered already ("echo:ns1" when the namespace was quick)
        assert ns.wait(20) == 0, ns.stderr.read() if ns.stderr else ""
        assert ns.stdout.read().decode().split() == ["echo:ns1", "echo:ns2"]
    finally:
        ns.kill()
        ns.wait(5)
        echo.kill()
        echo.wait(5)


AUTO_NS = """
import os, socket, sys, time
d = sys.argv[1]
def wait_for(name):
    for _ in range(300):
        if os.path.exists(os.path.join(d, name)):
            return
        time.sleep(0.05)
    sys.exit(9)
wait_for("go")
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8123)); s.listen(8); s.settimeout(15)
open(os.path.join(d, "listening"), "w").close()
for _ in range(2):
    c, a = s.accept(); c.sendall(b"auto " + a[0].encode()); c.close()
s.close()
open(os.path.join(d, "closed"), "w").close()
wait_for("done")
"""


def test_auto_ports_follow_a_namespace_listener(box_: Sandbox) -> None:
    box = box_
    d = box.dir / "auto"
    d.mkdir()
    d.chmod(0o777)
    p, err = start_pasta(box, *AS_ROOT, "--config-net", "--", sys.executable, "-c", AUTO_NS, str(d))
    try:
        time.sleep(1.5)  # the first scans: nothing listens on 8123 yet
        assert _host_tcp_get(box, "127.0.0.1", 8123) == "error 111"
        (d / "go").touch()
        wait_until(lambda: (d / "listening").exists(), 10, "the namespace listener")
        t0 = time.monotonic()
        out = wait_until(lambda: (o := _host_tcp_get(box, "127.0.0.1", 8123)) != "error 111"
                         and o, 5, "the automatic forward", interval=0.1)
        assert time.monotonic() - t0 < 2.0, "not forwarded within 2 s"
        # spliced: from inside, to the namespace's own address (reference 4.5)
        assert out == "auto 192.0.2.2", out + err.read_text()
        # a non-loopback source goes through the tap (the host's address shows as the gateway)
        assert _host_tcp_get(box, "192.0.2.2", 8123) == "auto 192.0.2.1"
        wait_until(lambda: (d / "closed").exists(), 10, "the listener to close")
        wait_until(lambda: _host_tcp_get(box, "127.0.0.1", 8123) == "error 111", 3,
                   "the forward to go", interval=0.2)
        (d / "done").touch()
        assert p.wait(10) == 0, err.read_text()
    finally:
        p.kill()
        p.wait(5)


def test_auto_T_follows_host_listener(box_: Sandbox) -> None:
    box = box_
    srv = box.popen_in(box.host_ns, sys.executable, "-c", TCP_ECHO_ONCE, "127.0.0.1", "8124",
                       stdout=subprocess.PIPE)
    assert srv.stdout is not None and srv.stdout.readline() == b"ready\n"
    script = ("import socket, time\n"
              "for _ in range(40):\n"
              "    try:\n"
              "        c = socket.create_connection(('127.0.0.1', 8124), timeout=2); break\n"
              "    except OSError:\n"
              "        time.sleep(0.1)\n"
              "print(c.recv(100).decode())\n")
    r = run_pasta(box, *AS_ROOT, "--config-net", "--", sys.executable, "-c", script)
    assert r.returncode == 0 and r.stdout.strip() == "hello from 127.0.0.1", r.stdout + r.stderr
    srv.wait(5)


def test_spawn_reaches_host_loopback_via_gateway(box_: Sandbox) -> None:
    box = box_
    srv = box.popen_in(box.host_ns, sys.executable, "-c", TCP_ECHO_ONCE, "127.0.0.1", "5301",
                       stdout=subprocess.PIPE)
    assert srv.stdout is not None and srv.stdout.readline() == b"ready\n"
    r = run_pasta(box, *AS_ROOT, "--config-net", "-T", "none", "--", sys.executable, "-c",
                  "import socket; c = socket.create_connection(('192.0.2.1', 5301), timeout=5);"
                  " print(c.recv(100).decode())")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.strip() == "hello from 127.0.0.1"  # through the tap, NATed to loopback
    srv.wait(5)


def test_spawn_ping6(box_: Sandbox) -> None:
    r = run_pasta(box_, "--config-net", "--", "sh", "-c",
                  "busybox ping -6 -c1 -W3 2001:db8::1 >/dev/null && echo PING6 ok")
    assert "PING6 ok" in r.stdout, r.stdout + r.stderr


def test_podman_published_port(box_: Sandbox) -> None:
    box = box_
    path, _ = _podman_netns(box)
    pid_file = box.dir / "pasta.pid"
    args = [a for a in PODMAN_ARGS]
    i = args.index("-t")
    del args[i:i + 2]  # podman passes "-t none" only when nothing is published
    try:
        parent, err = start_pasta(box, "--config-net", "-t", "8080-8080:80-80", *args[1:],
                                  "--pid", str(pid_file), "--netns", str(path))
        pid = background_pid(box, parent, pid_file, err)
        try:
            srv = subprocess.Popen(["nsenter", f"--net={path}", sys.executable, "-c",
                                    TCP_ECHO_ONCE, "0.0.0.0", "80"], stdout=subprocess.PIPE)
            try:
                assert srv.stdout is not None and srv.stdout.readline() == b"ready\n"
                out = _host_tcp_get(box, "192.0.2.2", 8080)
                # the host's own address shows as podman's --map-guest-addr
                assert out == "hello from 169.254.1.2", out + err.read_text()
                assert srv.wait(5) == 0
            finally:
                srv.kill()
                srv.wait(5)
            assert in_netns(str(path), "true").returncode == 0
            _remove_netns_file(path)
            wait_gone(pid, 5)
        finally:
            kill_quietly(pid)
    finally:
        _remove_netns_file(path)
