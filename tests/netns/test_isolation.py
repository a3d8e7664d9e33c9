"""Refusing to stay root (vhostpasst/system/isolation.py): started as root, passt and pasta
mode switch to nobody (or --runas) once set up, keeping CAP_NET_BIND_SERVICE in pasta mode only, and
everything still works afterwards: DHCP through the relay, ping, -t through the tap and through
the splice pool (refilled after the switch), UDP splice reply sockets, -T auto binding a low
port in a root-owned namespace. Also: readiness (a client may connect as soon as the pid file
is written or the parent exits) and pasta's --fd. Test-made namespaces and documentation
addresses only; every wait is bounded.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.isolation_checks import CAP_NET_BIND, CAP_NONE, _hello, _start_hello
from tests.netns.pasta_sandbox import (
    background_pid,
    kill_quietly,
    pasta_command,
    run_pasta,
    start_pasta,
)
from tests.netns.sandbox import Sandbox, terminate, wait_until
from tests.netns.tcp_guest import client, configure_guest, serve
from vhostpasst.system import isolation

NOBODY = "65534\t65534\t65534\t65534"

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
for _ in range(int(sys.argv[3])):
    d, peer = s.recvfrom(2048); s.sendto(b"echo:" + d, peer)
"""


def task_status(pid: int) -> list[dict[str, str]]:
    """The ids and capability lines of every thread of `pid`."""
    return [isolation.status_ids(f"{pid}/task/{tid}") for tid in os.listdir(f"/proc/{pid}/task")]


def wait_switched(pid: int, uid: str = "65534", cap: str = CAP_NONE) -> None:
    """The switch comes right after the socket starts listening: wait for it (bounded)."""
    wait_until(lambda: all(st["Uid"].split()[0] == uid and st["CapEff"] == cap
                           for st in task_status(pid)), 5, f"pid {pid} to become uid {uid}")


def assert_dropped(pid: int, ids: str = NOBODY, gid: str = NOBODY, cap: str = CAP_NONE) -> None:
    tasks = task_status(pid)
    assert tasks
    for st in tasks:
        assert st["Uid"] == ids and st["Gid"] == gid, st
        assert st["Groups"] == "", st
        assert st["CapEff"] == cap and st["CapPrm"] == cap, st
        assert int(st["CapBnd"], 16) & ~int(cap, 16) == 0, st


# -- the pieces ---------------------------------------------------------------------------------


def test_resolve_runas() -> None:
    assert isolation.resolve_runas("nobody") == isolation.Ids(65534, 65534)
    assert isolation.resolve_runas("daemon:nogroup") == isolation.Ids(1, 65534)
    assert isolation.resolve_runas("1") == isolation.Ids(1, 1)  # daemon's primary group
    assert isolation.resolve_runas("4242") == isolation.Ids(4242, 4242)  # no passwd entry
    assert isolation.resolve_runas("4242:7") == isolation.Ids(4242, 7)
    with pytest.raises(isolation.RunasError, match="no such user 'no-such-user-x'"):
        isolation.resolve_runas("no-such-user-x")
    with pytest.raises(isolation.RunasError, match="no such group 'no-such-group-x'"):
        isolation.resolve_runas("nobody:no-such-group-x")


def test_target_ids_as_root_in_the_initial_namespace() -> None:
    if os.geteuid() != 0 or not isolation.in_initial_userns():
        pytest.skip("needs root in the initial user namespace")
    assert isolation.target_ids(None) == isolation.Ids(65534, 65534)
    assert isolation.target_ids("0") == isolation.Ids(0, 0)
    assert not isolation.needs_switch(isolation.target_ids("0"))
    assert isolation.map_ids(isolation.Ids(65534, 65534)) == isolation.Ids(65534, 65534)


@pytest.mark.parametrize("prog, value, words", [
    ("vhostpasst", "no-such-user-x", "no such user 'no-such-user-x'"),
    ("vhostpasta", "nobody:no-such-group-x", "no such group 'no-such-group-x'"),
    ("vhostpasta", "a:b:c", "is not UID[:GID] or LOGIN[:GROUP]"),
])
def test_bad_runas_exits_1_naming_the_option(prog: str, value: str, words: str) -> None:
    from shutil import which

    exe = which(prog, path=str(Path(sys.executable).parent))
    if exe is None:
        pytest.skip(f"{prog} is not installed")
    r = subprocess.run([exe, "--runas", value], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stderr.startswith(f"{prog}: --runas: ") and words in r.stderr, r.stderr


# -- passt mode -----------------------------------------------------------------------------------


def test_passt_as_root_becomes_nobody_and_still_works(sandbox: Sandbox) -> None:
    sandbox.start_daemon("-t", "5311", pcap=True)
    pid = sandbox.daemon_pid
    assert pid is not None
    wait_switched(pid)
    assert_dropped(pid)  # passt keeps no capability
    sandbox.start_relay()  # the socket made as root is still usable by "qemu" (root)
    lease = sandbox.udhcpc()
    assert lease["ip"] == "192.0.2.2", lease
    configure_guest(sandbox, ipv6=False)
    r = sandbox.guest("busybox", "ping", "-c1", "-W3", "192.0.2.1")
    assert r.returncode == 0, r.stdout + r.stderr
    serve(sandbox, sandbox.guest_ns, "0.0.0.0", 5311, "sink")
    r2 = client(sandbox, sandbox.host_ns, "127.0.0.1", 5311, "send", 1 << 20)
    assert r2["answer"] == [str(1 << 20), r2["sha"]], r2
    assert sandbox.stop_daemon() == 0
    assert Path(sandbox.pcap_path).stat().st_size > 24  # opened as root, written as nobody


def test_passt_background_pid_file_with_runas_user(sandbox: Sandbox) -> None:
    sandbox.start_daemon("--runas", "daemon:nogroup", foreground=False)
    pid = sandbox.daemon_pid
    assert pid is not None
    assert_dropped(pid, "1\t1\t1\t1", NOBODY)  # the parent exited after the switch
    assert (sandbox.dir / "passt.pid").stat().st_uid == 0  # made before the switch
    sandbox.start_relay()
    assert sandbox.udhcpc()["ip"] == "192.0.2.2"


def test_passt_runas_0_stays_root(sandbox: Sandbox) -> None:
    sandbox.start_daemon("--runas", "0")
    pid = sandbox.daemon_pid
    assert pid is not None
    st = isolation.status_ids(pid)
    assert st["Uid"].split()[0] == "0"


def _max_open_files(pid: int) -> tuple[int, int]:
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no Max open files line")


def test_passt_raises_its_open_files_limit(sandbox: Sandbox,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """As passt at start: the soft limit goes up to the hard one (every flow holds a socket)."""
    from tests.netns import sandbox as sandbox_module

    plain = sandbox_module.vhostpasst_command
    monkeypatch.setattr(sandbox_module, "vhostpasst_command",
                        lambda: ["prlimit", "--nofile=256:8192", "--", *plain()])
    sandbox.start_daemon("-d")
    pid = sandbox.daemon_pid
    assert pid is not None
    assert _max_open_files(pid) == (8192, 8192)
    sandbox.start_relay()
    assert sandbox.udhcpc()["ip"] == "192.0.2.2"
    assert "open files limit raised from 256 to 8192" in sandbox.daemon_log()


# -- pasta mode -----------------------------------------------------------------------------------


def test_pasta_raises_its_open_files_limit_but_not_its_commands(sandbox: Sandbox) -> None:
    r = sandbox.host("prlimit", "--nofile=256:8192", "--", *pasta_command(), "-d",
                     "--config-net", "--", "sh", "-c", "ulimit -n", timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split() == ["256"], r.stdout
    assert "open files limit raised from 256 to 8192" in r.stderr


def test_pasta_attach_as_root_becomes_nobody_and_still_works(sandbox: Sandbox,
                                                              netns_name: str) -> None:
    box, name = sandbox, netns_name
    pid_file = box.dir / "pasta.pid"
    parent, err = start_pasta(box, "--config-net", "-t", "5320", "-u", "5322", "-T", "auto",
                              "-U", "none", "-P", str(pid_file), "--netns", name)
    pid = background_pid(box, parent, pid_file, err)
    try:
        # every thread, the namespace helper included: nobody, CAP_NET_BIND_SERVICE only
        assert_dropped(pid, cap=CAP_NET_BIND)
        assert len(task_status(pid)) == 2  # the main thread and the namespace helper
        r = box.run_in(name, "busybox", "ping", "-c1", "-W3", "192.0.2.1")
        assert r.returncode == 0, r.stdout + r.stderr + err.read_text()
        # 40 connections from the host's loopback: the splice pool (32) is refilled after
        # the switch, by the helper that entered the namespace while we were root
        _start_hello(box, name, "0.0.0.0", 5320, 41)
        got = _hello(box, box.host_ns, "127.0.0.1", 5320, 40)
        assert got == ["hi 192.0.2.2"] * 40, got  # spliced to the address the namespace uses
        # through the tap: from the host's own address, NATed to the gateway
        assert _hello(box, box.host_ns, "192.0.2.2", 5320) == ["hi 192.0.2.1"]
        # UDP splice: the reply socket is made in the namespace after the switch
        echo = box.popen_in(name, sys.executable, "-c", UDP_ECHO, "0.0.0.0", "5322", "2",
                            stdout=subprocess.PIPE)
        assert echo.stdout is not None and echo.stdout.readline() == b"ready\n"
        r = box.host(sys.executable, "-c",
                     "import socket\n"
                     "c = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); c.settimeout(5)\n"
                     "for m in (b'u1', b'u2'):\n"
                     "    c.sendto(m, ('127.0.0.1', 5322)); print(c.recvfrom(100)[0].decode())\n",
                     timeout=15)
        assert r.stdout.split() == ["echo:u1", "echo:u2"], r.stderr + err.read_text()
        # -T auto: a host listener on a low port appears; its namespace twin is bound on
        # the namespace's loopback by the helper, which kept CAP_NET_BIND_SERVICE
        _start_hello(box, box.host_ns, "127.0.0.1", 99, 1)
        wait_until(lambda: ":99 " in box.run_in(name, "ss", "-Htln").stdout, 5,
                   "the -T auto listener on port 99 in the namespace")
        assert _hello(box, name, "127.0.0.1", 99) == ["hi 127.0.0.1"]
    finally:
        kill_quietly(pid)


def test_pasta_attach_pid_with_runas_user(sandbox: Sandbox) -> None:
    box = sandbox
    holder = subprocess.Popen(["ip", "netns", "exec", box.guest_ns, "sleep", "60"])
    try:
        wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net")
                   != os.readlink("/proc/self/ns/net"), 5, "the holder's namespace")
        p, err = start_pasta(box, "-f", "--runas", "daemon", "-I", "up9", str(holder.pid))
        wait_until(lambda: box.guest("ip", "link", "show", "up9").returncode == 0
                   or p.poll() is not None, 15, "the tap in the namespace")
        assert p.poll() is None, err.read_text()
        wait_until(lambda: isolation.status_ids(p.pid)["Uid"].startswith("1\t"), 5,
                   "the switch to daemon")
        assert_dropped(p.pid, "1\t1\t1\t1", "1\t1\t1\t1", CAP_NET_BIND)
        holder.kill()
        holder.wait(5)
        assert p.wait(5) == 0, err.read_text()  # the PID's namespace went: still noticed
    finally:
        holder.kill()
        holder.wait(5)


def test_pasta_spawn_as_root_runs_the_command_as_nobody(sandbox: Sandbox) -> None:
    r = run_pasta(sandbox, "--config-net", "--", "sh", "-c",
                  "cat /proc/self/uid_map; id -u; busybox ping -c1 -W3 192.0.2.1 >/dev/null"
                  " && echo PING ok")
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.split("\n")
    assert lines[0].split() == ["0", "65534", "1"], r.stdout  # root inside is nobody
    assert lines[1] == "0"
    assert "PING ok" in r.stdout


def test_pasta_spawn_as_root_status(sandbox: Sandbox) -> None:
    p, err = start_pasta(sandbox, "--config-net", "--", "sleep", "20")
    try:
        wait_until(lambda: any(st["Uid"] == NOBODY for st in task_status(p.pid))
                   or p.poll() is not None, 15, "the switch")
        time.sleep(0.2)  # the main thread and the helper switch together, caps right after
        assert p.poll() is None, err.read_text()
        # the capability sets are those of our own user namespace: only NET_BIND_SERVICE
        wait_until(lambda: all(st["CapEff"] == CAP_NET_BIND for st in task_status(p.pid)), 5,
                   "capabilities dropped")
        assert_dropped(p.pid, cap=CAP_NET_BIND)
    finally:
        p.kill()
        p.wait(5)


# -- readiness ------------------------------------------------------------------------------------


@pytest.mark.parametrize("foreground", [False, True], ids=["background", "foreground"])
def test_pasta_ready_when_pid_file_written(sandbox: Sandbox, netns_name: str,
                                           foreground: bool) -> None:
    """Connecting right after the pid file has its pid (or the parent exited) works: the
    -t and -T listeners are bound before either."""
    box, name = sandbox, netns_name
    _start_hello(box, name, "0.0.0.0", 5330, 1)
    _start_hello(box, box.host_ns, "127.0.0.1", 5331, 1)
    pid_file = box.dir / "ready.pid"
    cmd = [*pasta_command(), *(["-f"] if foreground else []), "--config-net", "-t", "5330",
           "-T", "5331", "-u", "none", "-U", "none", "-P", str(pid_file), "--netns", name]
    client = (f"import os, socket, time\n"
              f"p = {str(pid_file)!r}\n"
              f"for _ in range(3000):\n"
              f"    if os.path.exists(p) and open(p).read().strip(): break\n"
              f"    time.sleep(0.002)\n"
              f"c = socket.create_connection(('127.0.0.1', 5330), timeout=5)\n"
              f"print(c.recv(100).decode() or 'closed')\n")
    # the client polls for the pid file in the host namespace, started before pasta
    waiter = box.popen_in(box.host_ns, sys.executable, "-c", client, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
    time.sleep(0.1)
    err = box.dir / "ready.stderr"
    with open(err, "wb") as f:
        p = box.popen_in(box.host_ns, *cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f)
    try:
        out, cerr = waiter.communicate(timeout=30)
        assert out.decode().startswith("hi "), cerr.decode() + err.read_text()
        if not foreground:
            assert p.wait(10) == 0
        # and the namespace side (-T) was there by then too
        assert _hello(box, name, "127.0.0.1", 5331) == ["hi 127.0.0.1"]
    finally:
        if pid_file.exists() and pid_file.read_text().strip():
            kill_quietly(int(pid_file.read_text()))
        p.kill()
        p.wait(5)


# -- --fd -----------------------------------------------------------------------------------------


FD_WRAPPER = """
import os, sys
from vhostpasst.system import netns
from vhostpasst.link.tuntap import open_tap
path, args = sys.argv[1], sys.argv[2:]
fd = os.open(path, os.O_RDONLY)
tap, name = netns.call_in_netns(fd, open_tap, "fdtap0")
os.set_inheritable(tap, True)
os.execvp(args[0], [*args, "--fd", str(tap)])
"""


def test_pasta_fd_uses_the_callers_tap(sandbox: Sandbox, netns_name: str) -> None:
    box, name = sandbox, netns_name
    p = box.popen_in(box.host_ns, sys.executable, "-c", FD_WRAPPER, f"/run/netns/{name}",
                     *pasta_command(), "-f", "--config-net", "-I", "ignored0", "--netns", name,
                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: "192.0.2.2/24" in box.run_in(name, "ip", "-o", "addr", "show",
                                                        "fdtap0").stdout
                   or p.poll() is not None, 15, "the caller's tap configured")
        assert p.poll() is None, p.communicate(timeout=5)
        assert box.run_in(name, "ip", "link", "show", "ignored0").returncode != 0
        r = box.run_in(name, "busybox", "ping", "-c1", "-W3", "192.0.2.1")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        terminate(p)


# -- the namespace helper thread --------------------------------------------------------------


def test_ns_thread_serves_calls_and_leaves_signals_to_the_main_thread() -> None:
    import signal

    from vhostpasst.system import netns

    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    helper = netns.NsThread(fd)
    try:
        import threading

        assert netns.call_in_netns(fd, lambda: threading.current_thread().name) == "netns-helper"
        with pytest.raises(ZeroDivisionError):
            netns.call_in_netns(fd, lambda: 1 // 0)
        # a SIGTERM for the process must not land in the helper, where it would not wake
        # the main thread's epoll_wait()
        blocked = netns.call_in_netns(fd, signal.pthread_sigmask, signal.SIG_BLOCK, [])
        assert signal.SIGTERM in blocked and signal.SIGCHLD in blocked
    finally:
        helper.close()
        os.close(fd)
    assert fd not in netns._helpers


# -- descriptors the caller left open -------------------------------------------------------------


def test_descriptors_the_caller_leaked_are_closed_but_fd_is_kept(sandbox: Sandbox) -> None:
    """As passt at start: a descriptor the caller let the daemon inherit is closed (here a
    pipe's write end, so the caller's reader sees EOF while the daemon runs), the one --fd
    names stays and serves the guest (covered end to end by tests/netns/test_e2e_fd.py)."""
    from tests.netns.sandbox import vhostpasst_command

    r, w = os.pipe()
    other_r, other_w = os.pipe()
    try:
        p = subprocess.Popen(["ip", "netns", "exec", sandbox.host_ns, *vhostpasst_command(),
                              "-f", "-s", sandbox.socket_path],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, pass_fds=(w, other_w))
        os.close(w)
        os.close(other_w)
        try:
            wait_until(lambda: os.path.exists(sandbox.socket_path) or p.poll() is not None, 15,
                       "the daemon's socket")
            fds = {int(n) for n in os.listdir(f"/proc/{p.pid}/fd")}
            assert w not in fds and other_w not in fds, sorted(fds)
            os.set_blocking(r, False)
            assert os.read(r, 1) == b""  # EOF: no writer is left
            assert p.poll() is None
        finally:
            p.terminate()
            assert p.wait(10) == 0, p.stderr.read() if p.stderr else ""
    finally:
        os.close(r)
        os.close(other_r)


def test_close_inherited_fds_keeps_what_it_is_told(tmp_path: Path) -> None:
    """In a child process (closing descriptors of the test runner would break it)."""
    code = (
        "import os, sys\n"
        "from vhostpasst.system import isolation\n"
        "fds = [os.open(os.devnull, os.O_RDONLY) for _ in range(4)]\n"
        "isolation.close_inherited_fds([fds[1], fds[3], 1])\n"
        "def is_open(fd):\n"
        "    try:\n"
        "        return os.fstat(fd) is not None\n"
        "    except OSError:\n"
        "        return False\n"
        "print([is_open(fd) for fd in [0, 1, 2, *fds]])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    assert r.stdout.strip() == "[True, True, True, False, True, False, True]", r.stdout + r.stderr
