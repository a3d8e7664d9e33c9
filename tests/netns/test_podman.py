"""podman 5 (Debian 13's) runs our `pasta` for `--network pasta`, as it runs passt's.

The root is tests/netns/podman_root.py's cached trixie root; podman runs there rootless (podman
refuses pasta to rootful containers) in the sandbox's host namespace, whose uplink is a veth
to the "world" namespace (documentation addresses only, nothing leaves the sandbox). The image
is made locally from busybox-static (`podman import`). podman finds `pasta` through
`helper_binaries_dir` (/usr/local/bin, linked to the venv of the root's python3 that holds the
checkout) and starts it with its own command line (callers.md 3.4): `--config-net --dns-forward
169.254.1.1 -t none ... --map-guest-addr 169.254.1.2 --netns /run/user/1000/netns/netns-...`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.podman_root import (
    PodmanRoot,
    _readline,
    argv_of,
    iter_named,
    podman_root_or_reason,
)
from tests.netns.sandbox import Sandbox, wait_until

IMAGE = "localhost/busybox:vhostpasst"
RESOLVER = "198.51.100.53"  # the root's /etc/resolv.conf: a responder in the world namespace
NAME, NAME_ADDR = "vhostpasst.test.example", "203.0.113.7"
DNS_FORWARD, HOST_MAPPED = "169.254.1.1", "169.254.1.2"  # podman's --dns-forward, --map-guest-addr

DNS_RESPONDER = r"""
import socket, struct, sys
addr, name, answer, log = sys.argv[1:5]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((addr, 53))
print("ready", flush=True)
while True:
    q, peer = s.recvfrom(1500)
    tid = struct.unpack("!H", q[:2])[0]
    i, labels = 12, []
    while q[i]:
        labels.append(q[i + 1:i + 1 + q[i]].decode())
        i += 1 + q[i]
    qtype = struct.unpack("!H", q[i + 1:i + 3])[0]
    question = q[12:i + 5]
    qname = ".".join(labels).lower()
    with open(log, "a") as f:
        print(qname, qtype, peer[0], file=f)
    an = b""
    if qname == name and qtype == 1:
        an = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(answer)
    rcode = 0 if qname == name else 3
    s.sendto(struct.pack("!HHHHHH", tid, 0x8180 | rcode, 1, 1 if an else 0, 0, 0)
             + question + an, peer)
"""

HTTP_SERVER = r"""
import http.server, sys
class H(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *a): pass
root = sys.argv[2]
srv = http.server.ThreadingHTTPServer(("0.0.0.0", int(sys.argv[1])),
                                      lambda *a: H(*a, directory=root))
print("ready", flush=True)
srv.serve_forever()
"""

# GET http://HOST:PORT/PATH (retried while the server is not there yet): its md5 and length
HTTP_GET = r"""
import hashlib, sys, time, urllib.request
url, deadline = sys.argv[1], time.monotonic() + float(sys.argv[2])
while True:
    try:
        with urllib.request.urlopen(url, timeout=5) as f:
            data = f.read()
        break
    except OSError as e:
        if time.monotonic() > deadline:
            sys.exit(f"{url}: {e}")
        time.sleep(0.2)
print(hashlib.md5(data).hexdigest(), len(data))
"""

# connect, send a line, close our side, wait for the peer's close
QUIT = r"""
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(b"quit\n")
s.shutdown(socket.SHUT_WR)
while s.recv(4096):
    pass
"""


@pytest.fixture(scope="session")
def podman_root() -> Path:
    root, reason = podman_root_or_reason()
    if root is None:
        pytest.skip(reason)
    return root


@pytest.fixture
def podman(podman_root: Path, sandbox: Sandbox) -> Iterator[PodmanRoot]:
    work = sandbox.dir / "podman"
    etc = work / "upper" / "etc"
    etc.mkdir(parents=True)
    (etc / "resolv.conf").write_text(f"nameserver {RESOLVER}\n")
    with PodmanRoot(podman_root, sandbox.host_ns, work) as pr:
        r = pr.run("podman", "import", "--change", 'CMD ["/bin/sh"]', "/opt/busybox.tar", IMAGE)
        assert r.returncode == 0, r.stdout + r.stderr
        yield pr


def start_server(box: Sandbox, ns: str, script: str, *args: str) -> subprocess.Popen[str]:
    p = box.popen_in(ns, sys.executable, "-c", script, *args, stdin=subprocess.DEVNULL,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    line = _readline(p, 15)  # type: ignore[arg-type]
    assert line.strip() == "ready", line
    return p  # type: ignore[return-value]


def run_container(pr: PodmanRoot, script: str, *opts: str,
                  timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return pr.run("podman", "run", "--rm", "--network", "pasta", *opts, IMAGE,
                  "sh", "-c", script, timeout=timeout)


def test_podman_runs_our_pasta_the_container_gets_host_addresses_routes_and_exit_status(
        podman: PodmanRoot) -> None:
    v = podman.run("pasta", "--version")
    assert v.returncode == 0 and "vhostpasst" in v.stdout, v.stdout + v.stderr
    pv = podman.run("podman", "--version")
    assert pv.stdout.startswith("podman version 5."), pv.stdout + pv.stderr

    r = run_container(podman, "ip -o addr show; echo ROUTES; ip route; ip -6 route;"
                      " echo RESOLV; cat /etc/resolv.conf; echo HOSTS; cat /etc/hosts; exit 3")
    assert r.returncode == 3, r.stdout + r.stderr  # the container's status, through podman
    out = r.stdout
    # pasta copies the host namespace's interface, addresses and routes (tests/netns/sandbox.py)
    assert "up0    inet 192.0.2.2/24" in out, out
    assert "up0    inet6 2001:db8::2/64" in out, out
    routes = out.split("ROUTES", 1)[1].split("RESOLV", 1)[0]
    assert "default via 192.0.2.1 dev up0" in routes, out
    assert "default via 2001:db8::1 dev up0" in routes, out
    # podman puts pasta's forwarder first, then the host's resolvers; the host as HOST_MAPPED
    resolv = out.split("RESOLV", 1)[1].split("HOSTS", 1)[0].split()
    assert resolv[:2] == ["nameserver", DNS_FORWARD], out
    hosts = out.split("HOSTS", 1)[1]
    assert any(line.split()[:2] == [HOST_MAPPED, "host.containers.internal"]
               for line in hosts.splitlines() if line.strip()), out


def test_podman_container_resolves_through_the_forwarder_and_downloads_from_the_host(
        podman: PodmanRoot, sandbox: Sandbox) -> None:
    queries = sandbox.dir / "dns-queries"
    sandbox.world("ip", "addr", "add", f"{RESOLVER}/32", "dev", "lo", check=True)
    start_server(sandbox, sandbox.world_ns, DNS_RESPONDER, RESOLVER, NAME, NAME_ADDR,
                 str(queries))
    www = sandbox.dir / "www"
    www.mkdir()
    blob = os.urandom(3 << 20)
    (www / "blob").write_bytes(blob)
    start_server(sandbox, sandbox.host_ns, HTTP_SERVER, "8080", str(www))

    # the resolver as podman configured it (169.254.1.1 first), then that address by name
    r = run_container(podman, f"nslookup {NAME}; echo VIA; nslookup {NAME} {DNS_FORWARD};"
                      f" echo GET; wget -q -O - http://host.containers.internal:8080/blob"
                      " | md5sum")
    assert r.returncode == 0, r.stdout + r.stderr
    via_conf, rest = r.stdout.split("VIA", 1)
    via_forwarder, got = rest.split("GET", 1)
    assert NAME_ADDR in via_conf and NAME_ADDR in via_forwarder, r.stdout
    assert DNS_FORWARD in via_forwarder, r.stdout  # busybox names the server it asked
    # the responder saw the queries, from the host namespace's address (pasta's socket)
    seen = queries.read_text().splitlines()
    assert f"{NAME} 1 192.0.2.2" in seen, seen
    # 3 MiB from the host's own address, which the container reaches as HOST_MAPPED
    assert got.split()[0] == hashlib.md5(blob).hexdigest(), r.stdout


def test_podman_publishes_a_port_with_p_and_pasta_is_ours(
        podman: PodmanRoot, sandbox: Sandbox) -> None:
    # the container serves a blob with busybox httpd on 80 (published as 8081) and waits for
    # a line on 81 (published as 8082) before it exits
    script = ("mkdir /www && head -c 2097152 /dev/urandom > /www/blob && md5sum /www/blob"
              " && httpd -p 80 -h /www && echo SERVING && nc -l -p 81 && exit 5")
    out_path = sandbox.dir / "container.out"
    with open(out_path, "wb") as out:
        proc = podman.popen("podman", "run", "--rm", "--network", "pasta", "-p", "8081:80",
                            "-p", "8082:81", IMAGE, "sh", "-c", script,
                            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        text = wait_until(lambda: (t := out_path.read_text()) and "SERVING" in t and t
                          or (proc.poll() is not None and (t or "(no output)")), 60,
                          "the container to serve")
        assert "SERVING" in text, text
        md5 = next(line.split()[0] for line in text.splitlines() if line.endswith("/www/blob"))

        # the pasta podman started is ours, with podman's command line
        pastas = list(iter_named(podman.processes(), "pasta"))
        assert len(pastas) == 1, pastas
        argv = argv_of(pastas[0])
        assert argv[0] == "/opt/vhostpasst/venv/bin/python3", argv
        assert argv[1] == "/usr/local/bin/pasta", argv
        for opt, value in (("--dns-forward", DNS_FORWARD), ("--map-guest-addr", HOST_MAPPED),
                           ("-t", "8081-8082:80-81")):  # podman merges the two -p
            assert any(a == opt and b == value for a, b in zip(argv, argv[1:], strict=False)), argv
        assert "--config-net" in argv and "--netns" in argv, argv

        # the host connects to the published port: at its own address and at loopback
        for host in ("192.0.2.2", "127.0.0.1"):
            g = sandbox.host(sys.executable, "-c", HTTP_GET, f"http://{host}:8081/blob", "20",
                             timeout=40)
            assert g.returncode == 0, g.stdout + g.stderr + out_path.read_text()
            assert g.stdout.split() == [md5, str(2 << 20)], g.stdout

        q = sandbox.host(sys.executable, "-c", QUIT, "192.0.2.2", "8082", timeout=20)
        assert q.returncode == 0, q.stdout + q.stderr
        assert proc.wait(30) == 5, out_path.read_text()  # the container's status, through podman
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # pasta goes when the container's namespace does
    wait_until(lambda: not list(iter_named(podman.processes(), "pasta")), 15, "pasta to exit")
