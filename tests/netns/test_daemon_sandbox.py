"""The daemon's sandbox (vhostpasst/system/sandbox.py) in every mode: stream (foreground and in the
background, PID 1 of its own PID namespace), vhost-user (guest memory mapped), pasta spawning
a command and pasta attached to an existing namespace.

Each reads /proc/PID/status of every thread (Seccomp 2, NoNewPrivs 1, the capability sets:
none in passt mode, CAP_NET_BIND_SERVICE only in pasta mode), /proc/PID/task/TID/root (an
empty directory for every thread), and the probe's report (VHOSTPASST_SANDBOX_PROBE=1, read at
start-up): a host file cannot be opened, a call outside the allow-list fails with EPERM, and
an import after the pivot is reported by the guard. Then the daemon still serves.
Also: VHOSTPASST_SANDBOX=off, and --chroot-fallback where no namespace can be made. Test-made
namespaces and documentation addresses only; every wait is bounded.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.netns.isolation_checks import CAP_NET_BIND, CAP_NONE, _hello, _start_hello
from tests.netns.pasta_sandbox import background_pid, kill_quietly, start_pasta
from tests.netns.sandbox import PROBE_MODULE, Sandbox, vhostpasst_command, wait_until
from tests.netns.tcp_guest import configure_guest
from tests.netns.vhost_sandbox import start_vhost_daemon, start_vhost_relay

# the file open fails with EPERM where openat is not on the list (passt mode), with ENOENT
# (no such file in the empty root) where it is (pasta: the netns quit watch uses it)
# and socket() is allowed for AF_INET and AF_INET6 only
PROBE = "sandbox probe: open /etc/passwd: {}; personality: EPERM; netlink socket: EPERM"
KEYS = ("Seccomp", "NoNewPrivs", "CapEff", "CapPrm", "CapBnd", "CapInh", "CapAmb", "NSpid")


@pytest.fixture(autouse=True)
def _probe(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOSTPASST_SANDBOX_PROBE", "1")
    monkeypatch.delenv("VHOSTPASST_SANDBOX", raising=False)


def status(pid: int, tid: int | str | None = None) -> dict[str, str]:
    path = f"/proc/{pid}/status" if tid is None else f"/proc/{pid}/task/{tid}/status"
    out = {}
    with open(path) as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in KEYS:
                out[key] = value.strip()
    return out


def tids(pid: int) -> list[str]:
    return os.listdir(f"/proc/{pid}/task")


def wait_sandboxed(pid: int, what: str = "the daemon") -> None:
    """The filter is the last step, right before the loop runs: wait for it (bounded)."""
    wait_until(lambda: all(status(pid, t)["Seccomp"] == "2" for t in tids(pid)), 15,
               f"{what} ({pid}) to load its seccomp filter")


def assert_sandboxed(pid: int, cap: str = CAP_NONE, threads: int = 1) -> None:
    assert len(tids(pid)) == threads
    for t in tids(pid):
        st = status(pid, t)
        assert st["Seccomp"] == "2" and st["NoNewPrivs"] == "1", st
        assert st["CapEff"] == cap and st["CapPrm"] == cap and st["CapBnd"] == cap, st
        assert st["CapInh"] == CAP_NONE and st["CapAmb"] == CAP_NONE, st
        # every thread sees the empty root (none kept the host's through a shared fs_struct)
        assert os.listdir(f"/proc/{pid}/task/{t}/root") == [], t
        assert os.listdir(f"/proc/{pid}/task/{t}/cwd") == [], t
    assert os.listdir(f"/proc/{pid}/root") == []
    for ns in ("mnt", "ipc", "uts"):  # namespaces of its own
        assert os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}"), ns


def assert_probe(log: str, err: str = "EPERM") -> None:
    assert PROBE.format(err) in log, log
    assert f"late import of {PROBE_MODULE}" in log, log  # the guard reports a late import


def test_stream_foreground(sandbox: Sandbox) -> None:
    sandbox.start_daemon()
    pid = sandbox.daemon_pid
    assert pid is not None
    wait_sandboxed(pid)
    assert_sandboxed(pid)
    # a user namespace of its own (created as nobody, root in it mapped to nobody)
    assert os.readlink(f"/proc/{pid}/ns/user") != os.readlink("/proc/self/ns/user")
    sandbox.start_relay()
    lease = sandbox.udhcpc()
    assert lease["ip"] == "192.0.2.2", lease
    configure_guest(sandbox, ipv6=False)
    r = sandbox.guest("busybox", "ping", "-c1", "-W3", "192.0.2.1")
    assert r.returncode == 0, r.stdout + r.stderr
    assert sandbox.stop_daemon() == 0
    assert_probe(sandbox.daemon_stderr_text())


def test_stream_background_is_pid_1_of_its_own_pid_namespace(sandbox: Sandbox) -> None:
    log = sandbox.dir / "passt.log"
    sandbox.start_daemon("-l", str(log), foreground=False)
    pid = sandbox.daemon_pid
    assert pid is not None
    wait_sandboxed(pid)
    assert_sandboxed(pid)
    assert status(pid)["NSpid"].split() == [str(pid), "1"]
    sandbox.start_relay()
    assert sandbox.udhcpc()["ip"] == "192.0.2.2"
    sandbox.stop_daemon()
    assert_probe(log.read_text())


def test_syslog_still_reaches_the_socket_connected_before_the_pivot(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """In the background without -l, the daemon logs to syslog: a datagram socket of ours
    (VHOSTPASST_SYSLOG) receives the probe's report, sent once sandboxed."""
    path = str(sandbox.dir / "log.sock")
    got: list[str] = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(20)

        def read() -> None:  # as syslogd: read at once (a full queue would block the daemon)
            for _ in range(500):  # bounded: the start-up summary, then the probe's lines
                try:
                    msg = server.recv(4096).decode(errors="replace")
                except OSError:
                    return
                got.append(msg)
                if "sandbox probe" in msg:
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        monkeypatch.setenv("VHOSTPASST_SYSLOG", path)
        sandbox.start_daemon(foreground=False)
        pid = sandbox.daemon_pid
        assert pid is not None
        wait_sandboxed(pid)
        assert_sandboxed(pid)
        reader.join(25)
        text = "\n".join(got)
        assert PROBE.format("EPERM") in text and "passt[" in text, text
    sandbox.stop_daemon()


def test_vhost_user(sandbox: Sandbox) -> None:
    start_vhost_daemon(sandbox)
    pid = sandbox.daemon_pid
    assert pid is not None
    wait_sandboxed(pid)
    start_vhost_relay(sandbox)  # guest memory is mapped after the pivot, from received fds
    lease = sandbox.udhcpc()
    assert lease["ip"] == "192.0.2.2", lease
    assert_sandboxed(pid)
    assert sandbox.stop_daemon() == 0
    assert_probe(sandbox.daemon_stderr_text())


def test_pasta_spawn(sandbox: Sandbox) -> None:
    p, err = start_pasta(sandbox, "--config-net", "--", "sleep", "20")
    try:
        wait_until(lambda: p.poll() is not None or all(
            status(p.pid, t)["Seccomp"] == "2" for t in tids(p.pid)), 15, "pasta's filter")
        assert p.poll() is None, err.read_text()
        # the main thread and the namespace helper: only CAP_NET_BIND_SERVICE, empty root
        assert_sandboxed(p.pid, cap=CAP_NET_BIND, threads=2)
        assert_probe(err.read_text(), "ENOENT")
    finally:
        p.kill()
        p.wait(5)


def test_pasta_attach_to_a_netns(sandbox: Sandbox, netns_name: str) -> None:
    box, name = sandbox, netns_name
    pid_file = box.dir / "pasta.pid"
    log = box.dir / "pasta.log"
    parent, err = start_pasta(box, "--config-net", "-t", "5340", "-T", "auto", "-u", "none",
                              "-U", "none", "-l", str(log), "-P", str(pid_file), "--netns",
                              name)
    pid = background_pid(box, parent, pid_file, err)
    try:
        wait_sandboxed(pid, "pasta")
        assert_sandboxed(pid, cap=CAP_NET_BIND, threads=2)
        r = box.run_in(name, "busybox", "ping", "-c1", "-W3", "192.0.2.1")
        assert r.returncode == 0, r.stdout + r.stderr + log.read_text()
        # -t through the splice path, a socket made in the namespace after the pivot
        _start_hello(box, name, "0.0.0.0", 5340, 1)
        assert _hello(box, box.host_ns, "127.0.0.1", 5340) == ["hi 192.0.2.2"]
        # -T auto: /proc/net/tcp, opened before the pivot, is read again after it
        _start_hello(box, box.host_ns, "127.0.0.1", 5341, 1)
        wait_until(lambda: ":5341 " in box.run_in(name, "ss", "-Htln").stdout, 10,
                   "the -T auto listener in the namespace")
        assert _hello(box, name, "127.0.0.1", 5341) == ["hi 127.0.0.1"]
        assert_probe(log.read_text(), "ENOENT")
        # the netns directory watch (inotify, set up before the pivot) still ends us
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=10)
        box._made.remove(name)
        wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, "pasta to exit")
    finally:
        kill_quietly(pid)


def test_sandbox_off_for_debugging(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOSTPASST_SANDBOX", "off")
    sandbox.start_daemon()
    pid = sandbox.daemon_pid
    assert pid is not None
    wait_until(lambda: "sandbox probe" in sandbox.daemon_stderr_text()
               or "sandbox disabled" in sandbox.daemon_stderr_text(), 10, "the warning")
    assert status(pid)["Seccomp"] == "0"
    assert os.listdir(f"/proc/{pid}/root") != []
    assert "sandbox disabled" in sandbox.daemon_stderr_text()
    sandbox.stop_daemon()


NO_USERNS = ("echo 0 > /proc/sys/user/max_user_namespaces && exec \"$@\"")


@pytest.mark.parametrize("fallback", [False, True], ids=["fails", "chroot-fallback"])
def test_no_namespaces_fails_or_falls_back_to_chroot(sandbox: Sandbox, fallback: bool) -> None:
    """In a user namespace (made here) that may create no further user namespace, passt mode
    cannot make its own: it exits 1 as passt does, or with --chroot-fallback runs chroot()ed
    into an empty directory, capabilities and filter as usual."""
    log = sandbox.dir / "nons.log"
    cmd = [*vhostpasst_command(), "-f", "-s", str(sandbox.dir / "nons.sock"), "-l", str(log),
           *(["--chroot-fallback"] if fallback else [])]
    err = sandbox.dir / "nons.stderr"
    with open(err, "wb") as f:
        p = sandbox.popen_in(sandbox.host_ns, "unshare", "--user", "--map-root-user", "sh",
                             "-c", NO_USERNS, "sh", *cmd, stdin=subprocess.DEVNULL, stdout=f,
                             stderr=f)
    try:
        if not fallback:
            assert p.wait(30) == 1
            assert "cannot sandbox the process" in err.read_text(), err.read_text()
            return
        wait_until(lambda: p.poll() is not None or "sandbox probe" in _text(log), 15,
                   "the probe")
        assert p.poll() is None, err.read_text() + _text(log)
        assert "falling back to chroot()" in _text(log)
        wait_sandboxed(p.pid)
        assert_probe(_text(log))
        st = status(p.pid)
        assert st["CapEff"] == st["CapBnd"] == CAP_NONE and st["NoNewPrivs"] == "1", st
        assert os.listdir(f"/proc/{p.pid}/root") == []
    finally:
        p.kill()
        p.wait(5)


def _text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def test_every_mode_has_a_measured_list() -> None:
    from vhostpasst.system import syscalls

    for mode in ("stream", "vhost-user", "pasta"):
        names = syscalls.allowed(mode)
        assert len(names) > 20, mode
        assert not {"ptrace", "personality", "execve", "open_by_handle_at", "mount",
                    "pivot_root", "chroot", "unshare", "bpf"} & set(names), mode
    assert "setns" not in syscalls.allowed("stream")
    assert sys.platform == "linux"
