"""The control socket (-c) end to end, with our client `vhostpasst-pesto` (and passt's own
`pesto` when one is built: VHOSTPASST_TEST_PESTO or /tmp/passt-src/pesto): list, add and
delete rules while the guest runs; listeners follow; a bad or unbindable update changes
nothing and the client is told; a client that sends nothing does not hold up guest traffic;
the flow query. The guest is the guest namespace's kernel behind the relay (tcp_guest.py);
test-made namespaces and documentation addresses only."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.pasta_sandbox import pasta_command
from tests.netns.sandbox import Sandbox, wait_until
from tests.netns.tcp_guest import GW4, HOST4, client, serve, start
from vhostpasst.ctl import protocol

PESTO = os.environ.get("VHOSTPASST_TEST_PESTO", "/tmp/passt-src/pesto")
ROOT = Path(__file__).resolve().parents[2]


def ctl_path(box: Sandbox) -> str:
    return str(box.dir / "ctl.sock")


def pesto(*args: str, command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Our client, as a separate process (it needs no namespace: the socket is a path)."""
    cmd = command or [sys.executable, "-m", "vhostpasst.ctl.client"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=30, cwd=ROOT)


def listed(path: str) -> list[str]:
    r = pesto(path)
    assert r.returncode == 0, r.stderr
    return [line.strip() for line in r.stdout.splitlines()[1:]]


def reachable(box: Sandbox, port: int) -> bool:
    """A remote client's connection to the host's `port` reaches the guest's echo server."""
    r = client(box, box.world_ns, HOST4, port, "refused", timeout=30)
    return not r["refused"]


def start_guest_echo(box: Sandbox, *ports: int) -> None:
    for port in ports:
        serve(box, box.guest_ns, "0.0.0.0", port, "echo")


def test_list_add_delete_and_listeners_follow(sandbox: Sandbox) -> None:
    path = ctl_path(sandbox)
    start(sandbox, "-c", path, "-t", "5100", "-u", "5300")
    start_guest_echo(sandbox, 5100, 5101)
    assert listed(path) == ["HOST", "TCP [*]:5100  =>  5100", "UDP [*]:5300  =>  5300"]
    assert reachable(sandbox, 5100)
    assert not reachable(sandbox, 5101)

    r = pesto("-A", "-t", "5101", path)
    assert r.returncode == 0, r.stderr
    assert listed(path) == ["HOST", "TCP [*]:5100  =>  5100", "UDP [*]:5300  =>  5300",
                            "TCP [*]:5101  =>  5101"]
    assert reachable(sandbox, 5101)
    echo = client(sandbox, sandbox.world_ns, HOST4, 5101, "both", 1 << 20)
    assert echo["echo_bytes"] == 1 << 20 and echo["echo_sha"] == echo["sha"], echo

    r = pesto("-D", "-t", "5100", "-D", "-u", "5300", path)
    assert r.returncode == 0, r.stderr
    assert listed(path) == ["HOST", "TCP [*]:5101  =>  5101"]
    assert not reachable(sandbox, 5100)
    assert reachable(sandbox, 5101)

    # without -A/-D the first -t replaces the table; a translated port follows too
    r = pesto("-t", "6100:5100", path)
    assert r.returncode == 0, r.stderr
    assert listed(path) == ["HOST", "TCP [*]:6100  =>  5100"]
    assert reachable(sandbox, 6100)
    assert not reachable(sandbox, 5101)
    # narrowed to one address: the wildcard listener gives its port up for it
    r = pesto("-t", f"{HOST4}/6100:5100", path)
    assert r.returncode == 0, r.stderr
    assert listed(path) == ["HOST", f"TCP [{HOST4}]:6100  =>  5100"]
    assert reachable(sandbox, 6100)
    assert "New forwarding rules for HOST" in sandbox.daemon_log()


def _raw_update(path: str, update: bytes) -> tuple[int, str]:
    """Send `update` as a client would; the server's RESULT."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        reader, data = protocol.TableReader(), b""
        while len(data) < protocol.HELLO_SIZE:
            data += s.recv(4096)
        pending = data[protocol.HELLO_SIZE:]
        while reader.feed(pending) is None:
            pending = s.recv(4096)
            assert pending
        s.sendall(update)
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
    result = protocol.decode_result(reply)
    assert result is not None, reply
    return result


def test_bad_update_changes_nothing(sandbox: Sandbox) -> None:
    path = ctl_path(sandbox)
    start(sandbox, "-c", path, "-t", "5110")
    start_guest_echo(sandbox, 5110)
    before = listed(path)
    # the client refuses what it cannot parse, and sends nothing
    r = pesto("-t", "70000", path)
    assert r.returncode == 1 and "out of range" in r.stderr, r
    # two rules in conflict, and one from port 0, sent raw: refused by the server
    tcp = socket.IPPROTO_TCP
    from vhostpasst.ctl.rules import DUAL_STACK_ANY, Rule
    conflict = (Rule(tcp, 5111, 5115, 5111, flags=DUAL_STACK_ANY),
                Rule(tcp, 5113, 5113, 5113, flags=DUAL_STACK_ANY))
    status, message = _raw_update(path, protocol.encode_update({protocol.PIF_HOST: conflict}))
    assert status == 22 and "conflict" in message, message
    zero = (Rule(tcp, 0, 0, 5111, flags=DUAL_STACK_ANY),)
    status, message = _raw_update(path, protocol.encode_update({protocol.PIF_HOST: zero}))
    assert status == 22 and "port 0" in message, message
    # a table the daemon does not have: a protocol error
    status, message = _raw_update(path, protocol.encode_update({protocol.PIF_SPLICE: ()}))
    assert status == 71 and "non-existent" in message, message
    assert listed(path) == before
    assert reachable(sandbox, 5110)
    assert not reachable(sandbox, 5111)


def test_bind_failure_rolls_back_and_is_reported(sandbox: Sandbox) -> None:
    path = ctl_path(sandbox)
    start(sandbox, "-c", path, "-t", "5120")
    start_guest_echo(sandbox, 5120, 5121, 5122)
    # another process of the host holds 5122
    holder = sandbox.popen_in(sandbox.host_ns, sys.executable, "-c",
                              "import socket, sys, time\n"
                              "s = socket.socket(); s.bind(('0.0.0.0', 5122)); s.listen()\n"
                              "print('ready', flush=True); time.sleep(60)\n",
                              stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
    r = pesto("-A", "-t", "5121", "-A", "-t", "5122", path)
    assert r.returncode == 1, r
    assert "5122" in r.stderr and "Address already in use" in r.stderr, r.stderr
    assert listed(path) == ["HOST", "TCP [*]:5120  =>  5120"]
    assert not reachable(sandbox, 5121)  # opened for the update, closed again
    assert reachable(sandbox, 5120)
    assert "update refused, nothing changed" in sandbox.daemon_log()
    holder.kill()
    holder.wait(5)


def test_silent_client_does_not_delay_traffic(sandbox: Sandbox) -> None:
    """passt's exchange is synchronous: a client that connects and sends nothing (or half an
    update) would stall the guest. Here traffic goes on, and the client is dropped later."""
    path = ctl_path(sandbox)
    start(sandbox, "-c", path, "-t", "5130")
    start_guest_echo(sandbox, 5130)
    serve(sandbox, sandbox.host_ns, "127.0.0.1", 5131, "echo")  # the gateway maps to it
    silent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    silent.connect(path)
    silent.sendall(bytes([protocol.PIF_HOST]) + b"\0\0")  # half an update, then nothing
    try:
        t0 = time.monotonic()
        inbound = client(sandbox, sandbox.world_ns, HOST4, 5130, "both", 4 << 20, timeout=30)
        outbound = client(sandbox, sandbox.guest_ns, GW4, 5131, "both", 4 << 20, timeout=30)
        assert inbound["echo_sha"] == inbound["sha"] and outbound["echo_sha"] == outbound["sha"]
        ping = sandbox.guest("busybox", "ping", "-c", "3", "-W", "3", GW4, timeout=30)
        assert ping.returncode == 0 and "3 packets received" in ping.stdout, ping
        assert time.monotonic() - t0 < 25  # generous: well before the client's timeout ends
        # the silent client is dropped after its timeout; then the next one is served
        silent.settimeout(30)
        assert silent.recv(65536 * 4) != b""  # hello and tables came at once
        wait_until(lambda: silent.recv(4096) == b"", 30, "the silent client to be dropped")
    finally:
        silent.close()
    assert listed(path) == ["HOST", "TCP [*]:5130  =>  5130"]
    assert "control client dropped" in sandbox.daemon_log()


def test_flow_query(sandbox: Sandbox) -> None:
    path = ctl_path(sandbox)
    start(sandbox, "-c", path, "-t", "5140")
    serve(sandbox, sandbox.host_ns, "127.0.0.1", 5141, "echo")  # the gateway maps to it
    client(sandbox, sandbox.guest_ns, GW4, 5141, "both", 1 << 20)  # something to count
    holder = sandbox.popen_in(sandbox.guest_ns, sys.executable, "-c",
                              "import socket, time\n"
                              f"c = socket.create_connection(({GW4!r}, 5141), timeout=10)\n"
                              "c.sendall(b'x' * 1000); print('ready', flush=True)\n"
                              "time.sleep(30)\n", stdout=subprocess.PIPE)
    assert holder.stdout is not None and holder.stdout.readline() == b"ready\n"
    time.sleep(0.5)  # the 1000 bytes reached the daemon
    r = pesto("--flows", path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    counters = doc["counters"]
    assert doc["version"] == 1 and counters["guest_rx"] > 0 and counters["guest_tx"] > 0
    assert counters["tcp"] == sum(f["protocol"] == "tcp" for f in doc["flows"])
    assert doc["link"] == {"connected": True}
    tcp = [f for f in doc["flows"] if f["protocol"] == "tcp" and f["remote_port"] == 5141]
    assert len(tcp) == 1, doc
    assert tcp[0]["state"] == "ESTABLISHED" and tcp[0]["remote"] == GW4
    assert tcp[0]["bytes_from_guest"] == 1000 and tcp[0]["age"] >= 0
    holder.kill()
    holder.wait(5)


def test_second_daemon_on_the_same_path_is_refused(sandbox: Sandbox) -> None:
    path = ctl_path(sandbox)
    start(sandbox, "-c", path)
    other = subprocess.run(["ip", "netns", "exec", sandbox.host_ns, *sandbox.daemon_cmd[:-2],
                            "-s", str(sandbox.dir / "other.socket"), "-c", path],
                           capture_output=True, text=True, timeout=30)
    assert other.returncode == 1
    assert "cannot open the control socket" in other.stderr and "in use" in other.stderr


@pytest.mark.skipif(not os.access(PESTO, os.X_OK), reason=f"no passt pesto at {PESTO}")
def test_passt_pesto_lists_adds_and_deletes(sandbox: Sandbox) -> None:
    path = ctl_path(sandbox)
    start(sandbox, "-c", path, "-t", "5150")
    start_guest_echo(sandbox, 5150, 5151)
    r = pesto(path, command=[PESTO])
    assert r.returncode == 0, r.stderr
    assert "HOST" in r.stdout and "TCP [*]:5150  =>  5150" in r.stdout, r.stdout
    r = pesto("-A", "-t", "5151", path, command=[PESTO])
    assert r.returncode == 0, r.stderr
    wait_until(lambda: "TCP [*]:5151  =>  5151" in listed(path), 10, "pesto's update")
    assert reachable(sandbox, 5151)
    r = pesto("-D", "-t", "5150", path, command=[PESTO])
    assert r.returncode == 0, r.stderr
    wait_until(lambda: listed(path) == ["HOST", "TCP [*]:5151  =>  5151"], 10,
               "pesto's delete")
    assert not reachable(sandbox, 5150)


# --- pasta: the HOST and SPLICE tables ------------------------------------------------------

NS_ECHO = """
import socket, sys, time
for port in (5160, 5161):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('0.0.0.0', port)); s.listen(8)
    globals()[f's{port}'] = s
print('ready', flush=True)
import selectors
sel = selectors.DefaultSelector()
sel.register(s5160, selectors.EVENT_READ); sel.register(s5161, selectors.EVENT_READ)
end = time.monotonic() + 60
while time.monotonic() < end:
    for key, _ in sel.select(1):
        c, _ = key.fileobj.accept(); c.sendall(b'port %d' % key.fileobj.getsockname()[1])
        c.close()
"""


def test_pasta_host_and_splice_tables(sandbox: Sandbox) -> None:
    path = ctl_path(sandbox)
    ns = sandbox.popen_in(sandbox.host_ns, *pasta_command(), "--runas", "0", "--config-net",
                          "-c", path, "-t", "5160", "-u", "none", "-T", "none", "-U", "none",
                          "--", sys.executable, "-c", NS_ECHO, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    try:
        assert ns.stdout is not None and ns.stdout.readline() == b"ready\n"
        assert listed(path) == ["HOST", "TCP [*]:5160  =>  5160", "SPLICE"]

        def get(port: int) -> str:
            r = sandbox.host(sys.executable, "-c",
                             "import socket\n"
                             "try:\n"
                             f"    c = socket.create_connection(('127.0.0.1', {port}), 3)\n"
                             "    print(c.recv(100).decode() or 'closed')\n"
                             "except OSError as e:\n"
                             "    print('error', e.errno)\n", timeout=10)
            return r.stdout.strip()

        assert get(5160) == "port 5160"
        assert get(5161) == "error 111"
        r = pesto("-A", "-t", "5161", "-T", "5170", path)
        assert r.returncode == 0, r.stderr
        assert listed(path) == ["HOST", "TCP [*]:5160  =>  5160", "TCP [*]:5161  =>  5161",
                                "SPLICE", "TCP [*]%lo:5170  =>  5170"]
        assert get(5161) == "port 5161"  # spliced from the host's loopback
        r = pesto("-D", "-t", "5160", path)
        assert r.returncode == 0, r.stderr
        assert get(5160) == "error 111"
    finally:
        ns.kill()
        ns.wait(5)


def test_update_message_is_bounded() -> None:
    """What a client may send is bounded by the largest valid update of the daemon's tables."""
    full = protocol.encode_update({protocol.PIF_HOST: ()})
    assert len(full) <= protocol.update_max(1)
    assert protocol.update_max(1) == 1 + 4 + 255 * 56 + 1
    assert struct.calcsize("!16s16s16sHHHBB") == 56


NS_PROBE = """
import socket, sys
print('ready', flush=True)
for line in sys.stdin:
    out = []
    for port in (5180, 5181):
        try:
            c = socket.create_connection(('127.0.0.1', port), timeout=3)
            out.append(c.recv(100).decode() or 'closed')
        except OSError as e:
            out.append(f'error {e.errno}')
    print(' | '.join(out), flush=True)
"""

HOST_SERVE = """
import socket, sys, time
ss = []
for port in (5180, 5181):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(('127.0.0.1', port)); s.listen(8); s.settimeout(0.1); ss.append(s)
print('ready', flush=True)
end = time.monotonic() + 90
while time.monotonic() < end:
    for s in ss:
        try:
            c, _ = s.accept()
        except OSError:
            continue
        c.sendall(b'host %d' % s.getsockname()[1]); c.close()
"""


@pytest.mark.parametrize("which", ["ours", "passt"])
def test_pasta_auto_direction_stops_and_resumes(sandbox: Sandbox, which: str) -> None:
    """pasta's default -T auto: replacing the SPLICE table stops that scanner direction (its
    ports no longer forwarded), `-T auto` brings it back; with our client or passt's."""
    if which == "passt" and not os.access(PESTO, os.X_OK):
        pytest.skip(f"no passt pesto at {PESTO}")
    command = [PESTO] if which == "passt" else None
    path = ctl_path(sandbox)
    host = sandbox.popen_in(sandbox.host_ns, sys.executable, "-c", HOST_SERVE,
                            stdout=subprocess.PIPE)
    assert host.stdout is not None and host.stdout.readline() == b"ready\n"
    log_file = sandbox.dir / "pasta.log"
    ns = sandbox.popen_in(sandbox.host_ns, *pasta_command(), "--runas", "0", "--config-net",
                          "-c", path, "-t", "none", "-u", "none", "-d", "-l", str(log_file), "--",
                          sys.executable, "-c", NS_PROBE, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert ns.stdin is not None and ns.stdout is not None

    def probe() -> str:
        ns.stdin.write(b"probe\n")  # type: ignore[union-attr]
        ns.stdin.flush()  # type: ignore[union-attr]
        return ns.stdout.readline().decode().strip()  # type: ignore[union-attr]

    try:
        assert ns.stdout.readline() == b"ready\n"
        wait_until(lambda: probe() == "host 5180 | host 5181", 15, "-T auto to follow")
        r = pesto("-T", "5181", path, command=command)
        assert r.returncode == 0, r.stderr
        assert listed(path)[-2:] == ["SPLICE", "TCP [*]%lo:5181  =>  5181"]
        assert probe() == "error 111 | host 5181"  # the scanner's 5180 is gone
        r = pesto("-T", "auto", "-U", "auto", path, command=command)
        assert r.returncode == 0, r.stderr
        wait_until(lambda: probe() == "host 5180 | host 5181", 15, "-T auto to resume")
        log = log_file.read_text()
        assert "-T auto: stopped by the control socket" in log, log
        assert "-T auto: resumed by the control socket" in log, log
    finally:
        ns.kill()
        ns.wait(5)
        host.kill()
        host.wait(5)


def test_vhost_user_mode_binds_under_its_sandbox(sandbox: Sandbox) -> None:
    """vhost-user mode has its own seccomp list: binding a new port at run time works there
    (no guest needed to see the listener)."""
    path = ctl_path(sandbox)
    sandbox.start_daemon("--vhost-user", "-c", path, "-t", "5190")
    r = pesto("-A", "-t", "5191", "-A", "-u", "5191", path)
    assert r.returncode == 0, r.stderr
    tcp = sandbox.host("ss", "-Hltn", "sport", "= :5191").stdout
    udp = sandbox.host("ss", "-Hlun", "sport", "= :5191").stdout
    assert tcp.count("5191") == 2 and udp.count("5191") == 2, (tcp, udp)  # IPv4 and IPv6
    assert sandbox.daemon_alive()
