"""Run a busybox guest under qemu, attached to the daemon, inside a throw-away network namespace.

Pieces (each one usable alone, all bounded in time and cleaned up on close):

* `HostNetns`: a "host" network namespace whose upstream interface is one end of a veth pair;
  the other end sits in a third, "world" namespace that holds the upstream gateway and a
  "remote" host (documentation addresses only). Nothing in either can reach the real network.
* `Daemon`: `vhostpasst -f -s SOCK ...` run inside that namespace.
* `Guest`: qemu (TCG unless told otherwise) booting the image from image.py, driven through its
  serial console on stdin/stdout: `guest.run("cmd")` sends a line and waits for a marker.

Names and paths carry the pytest-xdist worker id and the pid, so parallel workers never share
a namespace, socket or log.
"""

from __future__ import annotations

import ctypes
import hashlib
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from image import Image

QEMU = os.environ.get("VPT_QEMU", "qemu-system-x86_64")
# vhostpasst by default: the console script next to this interpreter (the checkout's venv), else
# `python -m vhostpasst`; VPT_DAEMON can name another passt-compatible command (e.g. "passt").
_OURS = shutil.which("vhostpasst", path=os.path.dirname(sys.executable))
DAEMON = (shlex.split(os.environ["VPT_DAEMON"]) if "VPT_DAEMON" in os.environ
          else [_OURS] if _OURS else [sys.executable, "-m", "vhostpasst"])
# KVM is opt-in (VPT_ACCEL=kvm): /dev/kvm may open yet hang (nested virtualisation), and CI
# runners rarely have it. TCG boots this image in about 5 s.
ACCEL = os.environ.get("VPT_ACCEL", "tcg")
BOOT_TIMEOUT = float(os.environ.get("VPT_BOOT_TIMEOUT", "120"))
NS_PREFIX = "vpt"

# The upstream the daemon copies: documentation addresses only (RFC 5737, RFC 3849).
HOST_ADDR4, HOST_PREFIX4, HOST_GW4 = "192.0.2.2", 24, "192.0.2.1"
HOST_ADDR6, HOST_PREFIX6, HOST_GW6 = "2001:db8::2", 64, "2001:db8::1"
# A "remote" host behind the upstream gateway, in the world namespace (RFC 5737, RFC 3849).
REMOTE4, REMOTE6 = "203.0.113.1", "2001:db8:1::1"
DNS4, DNS6, SEARCH = "198.51.100.53", "2001:db8::53", "test.example"
RESOLV_CONF = f"nameserver {DNS4}\nnameserver {DNS6}\nsearch {SEARCH}\n"

_counter = itertools.count()
_PR_SET_PDEATHSIG = 1


class HarnessError(AssertionError):
    """A setup step or a guest command failed; the message carries the relevant logs."""


def worker_tag() -> str:
    """A short name unique to this process: the xdist worker id (gw0...) plus the pid."""
    return f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}-{os.getpid()}"


def _die_with_parent() -> None:
    # Runs in the child before exec: if the test process dies (even SIGKILL), the kernel kills
    # qemu and the daemon too, so nothing outlives a crashed test run.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _sh(argv: Sequence[str], timeout: float = 20) -> str:
    res = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if res.returncode != 0:
        raise HarnessError(f"{shlex.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return res.stdout


def _stop(proc: subprocess.Popen[bytes] | None, grace: float = 5) -> int | None:
    """SIGTERM, then SIGKILL after `grace` seconds; returns the exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def _tail(path: Path | None, limit: int = 6000) -> str:
    if path is None or not path.exists():
        return "(no log)"
    data = path.read_bytes()[-limit:]
    return data.decode(errors="replace")


def process_failure(kind: str, what: str, argv: Sequence[str], log: Path | None) -> HarnessError:
    """The error for a helper process (the daemon, libvirtd) that failed: what went wrong, its
    command line and the end of its log."""
    return HarnessError(f"{kind} {what}\ncommand: {shlex.join(argv)}\n"
                        f"--- {kind} log ---\n{_tail(log)}")


class HostNetns:
    """A network namespace standing in for the host: one upstream interface with
    192.0.2.2/24 via 192.0.2.1 and 2001:db8::2/64 via 2001:db8::1, and a test resolv.conf
    (`ip netns exec` bind-mounts /etc/netns/<name>/resolv.conf over /etc/resolv.conf).

    The upstream is a veth pair whose far end lives in a "world" namespace (`world`, named
    `<name>w`) holding the gateway addresses and the "remote" REMOTE4/REMOTE6 on its loopback,
    so traffic routed "out" gets answers yet never leaves the two namespaces. Where veth is
    missing, a `dummy` (or `ifb`) device that drops everything stands in and `world` is None.
    """

    def __init__(self, resolv_conf: str = RESOLV_CONF, ifname: str = "eth0") -> None:
        self.name = f"{NS_PREFIX}-{worker_tag()}-{next(_counter)}"
        self.ifname = ifname
        self.etc = Path("/etc/netns") / self.name
        self.world: WorldNetns | None = None
        self._created = False
        try:
            self.etc.mkdir(parents=True, exist_ok=False)
            (self.etc / "resolv.conf").write_text(resolv_conf)
            _sh(["ip", "netns", "add", self.name])
            self._created = True
            self._setup()
        except BaseException:
            self.close()
            raise

    def _setup(self) -> None:
        ip = ["ip", "-n", self.name]
        _sh([*ip, "link", "set", "lo", "up"])
        try:
            self.world = WorldNetns(f"{self.name}w")
            _sh([*ip, "link", "add", self.ifname, "type", "veth",
                 "peer", "name", "up0", "netns", self.world.name])
            self.world.setup("up0")
        except HarnessError:
            if self.world:
                self.world.close()
                self.world = None
            try:
                _sh([*ip, "link", "add", self.ifname, "type", "dummy"])
            except HarnessError:
                _sh([*ip, "link", "add", self.ifname, "type", "ifb"])
        _sh([*ip, "link", "set", self.ifname, "up"])
        _sh([*ip, "addr", "add", f"{HOST_ADDR4}/{HOST_PREFIX4}", "dev", self.ifname])
        _sh([*ip, "route", "add", "default", "via", HOST_GW4, "dev", self.ifname])
        _sh([*ip, "-6", "addr", "add", f"{HOST_ADDR6}/{HOST_PREFIX6}", "dev", self.ifname, "nodad"])
        _sh([*ip, "-6", "route", "add", "default", "via", HOST_GW6, "dev", self.ifname])
        # Guest pings go out through ping sockets (as in passt): let root's group open them.
        self.run(["sysctl", "-qw", "net.ipv4.ping_group_range=0 2147483647"])

    def argv(self, argv: Sequence[str]) -> list[str]:
        """`argv` prefixed to run inside the namespace (exec'd, so the pid is the command's)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], timeout: float = 20) -> str:
        return _sh(self.argv(argv), timeout)

    def close(self) -> None:
        if self._created:
            subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)
            self._created = False
        if self.world:
            self.world.close()
            self.world = None
        shutil.rmtree(self.etc, ignore_errors=True)

    @staticmethod
    def reap_stale() -> None:
        """Delete namespaces and work directories left behind by dead test processes (their
        names embed the pid), e.g. after a SIGKILL: qemu and the daemon die with their parent
        (PR_SET_PDEATHSIG), these do not."""
        res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=20)
        for line in res.stdout.splitlines():
            name = line.split(" ", 1)[0]
            m = re.fullmatch(rf"{NS_PREFIX}-[^-]+-(\d+)-\d+w?", name)  # w: its world
            if m and not Path(f"/proc/{m.group(1)}").exists():
                subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=20)
                shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
        # Work directories (make_workdir) of dead processes too, unless asked to keep logs.
        if os.environ.get("VPT_KEEP"):
            return
        for d in Path("/tmp").glob(f"{NS_PREFIX}-*-*-*"):
            m = re.fullmatch(rf"{NS_PREFIX}-[^-]+-(\d+)-[^/]+", d.name)
            if m and d.is_dir() and not Path(f"/proc/{m.group(1)}").exists():
                shutil.rmtree(d, ignore_errors=True)


class WorldNetns:
    """The far side of the host's upstream link: the gateway (192.0.2.1, 2001:db8::1) and a
    "remote" host (REMOTE4, REMOTE6 on its loopback). Has no other interface."""

    def __init__(self, name: str) -> None:
        self.name = name
        _sh(["ip", "netns", "add", name])

    def setup(self, ifname: str) -> None:
        ip = ["ip", "-n", self.name]
        _sh([*ip, "link", "set", "lo", "up"])
        _sh([*ip, "link", "set", ifname, "up"])
        _sh([*ip, "addr", "add", f"{HOST_GW4}/{HOST_PREFIX4}", "dev", ifname])
        _sh([*ip, "-6", "addr", "add", f"{HOST_GW6}/{HOST_PREFIX6}", "dev", ifname, "nodad"])
        _sh([*ip, "addr", "add", f"{REMOTE4}/32", "dev", "lo"])
        _sh([*ip, "-6", "addr", "add", f"{REMOTE6}/128", "dev", "lo"])
        # Routes back to the host's addresses are on-link: nothing else needed.

    def argv(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(self, argv: Sequence[str], timeout: float = 20) -> str:
        return _sh(self.argv(argv), timeout)

    def close(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=20)


class Daemon:
    """The daemon under test, `DAEMON -f -s SOCK [args]`, optionally inside a namespace.

    Ready once the socket exists; a daemon that exits or never creates it fails with its log.
    """

    def __init__(
        self,
        workdir: Path,
        netns: HostNetns | None = None,
        args: Sequence[str] = (),
        vhost_user: bool = False,
        timeout: float = 20,
    ) -> None:
        self.socket = workdir / "passt.sock"
        self.log = workdir / "daemon.log"
        self.args = tuple(args)
        self.vhost_user = vhost_user
        # A killed daemon leaves its socket file behind: the new one would be "ready" at once.
        self.socket.unlink(missing_ok=True)
        argv = [*DAEMON, "-f", "-s", str(self.socket)]
        if vhost_user:
            argv.append("--vhost-user")
        argv += list(args)
        self.argv = netns.argv(argv) if netns else argv
        with open(self.log, "ab") as log:  # a restarted daemon appends
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not self.socket.exists():
            if self.proc.poll() is not None:
                self._fail(f"exited with status {self.proc.returncode} before creating the socket")
            if time.monotonic() > deadline:
                self._fail(f"no socket {self.socket} after {timeout:.0f}s")
            time.sleep(0.05)

    def _fail(self, what: str) -> None:
        self.close()
        raise process_failure("daemon", what, self.argv, self.log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        return _tail(self.log)

    def close(self) -> int | None:
        rc = _stop(self.proc)
        self.proc = None
        # the sandboxed daemon imported a module it had not imported before emptying its
        # root (vhostpasst/system/sandbox.py): that import fails in production; fail the test once
        if not getattr(self, "_late_checked", False):
            self._late_checked = True
            text = self.log.read_text(errors="replace") if self.log.exists() else ""
            late = [line for line in text.splitlines() if "late import of" in line]
            if late:
                raise HarnessError("late imports in the daemon:\n" + "\n".join(late))
        return rc


@dataclass
class GuestNet:
    """How the guest's virtio-net is attached: "stream" (qemu -netdev stream, passt's socket
    protocol) or "vhost-user" (needs the guest RAM in a shared memfd)."""

    kind: str
    socket: Path
    extra: list[str] = field(default_factory=list)
    reconnect_ms: int | None = None  # qemu reconnects to a restarted daemon
    queues: int = 1  # vhost-user queue pairs (multiqueue); the guest uses min(this, vCPUs)

    def qemu_args(self, mem: str) -> list[str]:
        if self.kind == "stream":
            return [
                "-netdev", f"stream,id=s,server=off,addr.type=unix,addr.path={self.socket}"
                + (f",reconnect-ms={self.reconnect_ms}" if self.reconnect_ms else ""),
                # romfile= skips the iPXE option ROM: we boot with -kernel, and it costs time.
                "-device", "virtio-net-pci,netdev=s,romfile=",
            ]
        if self.kind == "vhost-user":
            return [
                "-chardev", f"socket,id=c,path={self.socket}"
                + (f",reconnect-ms={self.reconnect_ms}" if self.reconnect_ms else ""),
                "-netdev", "vhost-user,id=v,chardev=c"
                + (f",queues={self.queues}" if self.queues > 1 else ""),
                # a vector per queue, the control queue's and the config's
                "-device", "virtio-net-pci,netdev=v,romfile="
                + (f",mq=on,vectors={2 * self.queues + 2}" if self.queues > 1 else ""),
                "-object", f"memory-backend-memfd,id=m,share=on,size={mem}",
                "-numa", "node,memdev=m",
            ]
        raise ValueError(f"unknown guest network kind {self.kind!r}")


class Guest:
    """qemu with the serial console on its stdin/stdout, which a reader thread copies into a
    buffer (and `console.log`). `run()` sends one shell line and waits for a unique marker the
    guest prints after it, with the command's exit status."""

    def __init__(
        self,
        image: Image,
        workdir: Path,
        net: GuestNet | None = None,
        netns: HostNetns | None = None,
        mem: str = "256M",
        boot_timeout: float = BOOT_TIMEOUT,
        append: str = "",
        smp: int = 1,
        qmp: Path | None = None,
        incoming: str | None = None,
    ) -> None:
        """`qmp`: a QMP socket to drive qemu with (Qmp). `incoming`: a migration URI to wait
        on (qemu -incoming) instead of booting: the guest arrives by live migration."""
        self.workdir = workdir
        self.console_log = workdir / "console.log"
        self.qemu_log = workdir / "qemu.log"
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._seq = itertools.count()
        # Several vCPUs under TCG: one host thread runs them all (thread=single). With a
        # thread each (MTTCG) on this loaded 2-core machine, an idle vCPU's timer once went
        # unserved for 20 s and the guest's boot stalled (RCU stall warnings, no prompt).
        accel = (["-accel", "kvm", "-cpu", "host"] if ACCEL == "kvm" else
                 ["-accel", "tcg,thread=single" if smp > 1 else "tcg"])
        argv = [
            QEMU, *accel, "-m", mem, "-smp", str(smp),
            "-nographic", "-no-reboot", "-monitor", "none", "-serial", "stdio",
            "-kernel", str(image.kernel), "-initrd", str(image.initramfs),
            "-append", f"console=ttyS0 panic=-1 vpt_noecho=1 {append}".strip(),
        ]
        argv += net.qemu_args(mem) if net else ["-nic", "none"]
        if qmp is not None:
            argv += ["-qmp", f"unix:{qmp},server=on,wait=off"]
        if incoming is not None:
            argv += ["-incoming", incoming]
        self.argv = netns.argv(argv) if netns else argv
        self._qemu_err = open(self.qemu_log, "wb")  # closed in close(), after qemu
        self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._qemu_err,
            preexec_fn=_die_with_parent,
        )
        self._reader = threading.Thread(target=self._read, name="guest-console", daemon=True)
        self._reader.start()
        t0 = time.monotonic()
        try:
            if incoming is None:
                self.wait_for(r"^VPT-READY\r?\n", boot_timeout, what="boot")
            elif qmp is not None:
                _wait_path(qmp, 30, self)
        except BaseException:
            self.close()
            raise
        self.boot_time = time.monotonic() - t0

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        out = self.proc.stdout
        with open(self.console_log, "wb") as log:
            while chunk := os.read(out.fileno(), 65536):
                log.write(chunk)
                log.flush()
                with self._cond:
                    self._buf += chunk
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def console(self) -> str:
        with self._cond:
            return self._buf.decode(errors="replace").replace("\r\n", "\n")

    def failure(self, what: str) -> HarnessError:
        rc = self.proc.poll() if self.proc else None
        state = "running" if rc is None else f"exited with status {rc}"
        return HarnessError(
            f"guest {what} (qemu {state})\ncommand: {shlex.join(self.argv)}\n"
            f"--- qemu stderr ---\n{_tail(self.qemu_log, 2000)}\n"
            f"--- console (last part) ---\n{self.console()[-6000:]}"
        )

    def wait_for(
        self, pattern: str, timeout: float, start: int = 0, what: str = ""
    ) -> re.Match[str]:
        """Wait until `pattern` (multiline regex) matches the console output from byte `start`."""
        rx = re.compile(pattern, re.M)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                m = rx.search(self._buf[start:].decode(errors="replace"))
                if m:
                    return m
                left = deadline - time.monotonic()
                if self._eof or left <= 0:
                    why = "console closed" if self._eof else f"timeout after {timeout:.0f}s"
                    raise self.failure(f"{what or 'wait'}: no match for {pattern!r} ({why})")
                self._cond.wait(min(left, 1.0))

    def send(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def run(self, cmd: str, timeout: float = 30, check: bool = True) -> tuple[int, str]:
        """Run one shell line in the guest; return (exit status, output with \\n line ends).

        The marker carries a sequence number, so output of an earlier command that timed out
        cannot be mistaken for this one's.
        """
        if "\n" in cmd:
            raise ValueError("one line at a time: the guest shell reads the console line by line")
        n = next(self._seq)
        with self._cond:
            start = len(self._buf)
        self.send(f"{cmd}; printf '\\n@@VPT-END-{n}-%d@@\\n' $?\n")
        m = self.wait_for(rf"^@@VPT-END-{n}-(\d+)@@\r?\n", timeout, start, what=f"command {cmd!r}")
        text = self._buf[start:].decode(errors="replace")[: m.start()].replace("\r\n", "\n")
        rc = int(m.group(1))
        if check and rc != 0:
            raise self.failure(f"command {cmd!r} exited with {rc}; output:\n{text}")
        return rc, text.removesuffix("\n")

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()  # nothing to save in a RAM-only guest
            self.proc.wait(timeout=10)
            if self.proc.stdin:
                self.proc.stdin.close()
            if self.proc.stdout:
                self._reader.join(timeout=5)  # it ends at EOF, now that qemu is gone
                self.proc.stdout.close()
            self.proc = None
        self._qemu_err.close()


def _wait_path(path: Path, timeout: float, guest: Guest) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if guest.proc is None or guest.proc.poll() is not None or time.monotonic() > deadline:
            raise guest.failure(f"no {path.name}")
        time.sleep(0.05)


class Qmp:
    """A minimal QMP client (qemu's JSON monitor) on a UNIX socket: commands and their
    replies (the events qemu sends between them are skipped)."""

    def __init__(self, path: Path, timeout: float = 30) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self._file = self.sock.makefile("rb")
        greeting = self._read()
        if "QMP" not in greeting:
            raise HarnessError(f"QMP: no greeting: {greeting}")
        self.command("qmp_capabilities")

    def _read(self) -> dict[str, Any]:
        line = self._file.readline()
        if not line:
            raise HarnessError("QMP: qemu closed the monitor")
        return json.loads(line)

    def command(self, name: str, **arguments: Any) -> Any:
        msg: dict[str, Any] = {"execute": name}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                continue
            if "error" in reply:
                raise HarnessError(f"QMP {name}: {reply['error']}")
            else:
                return reply.get("return")

    def close(self) -> None:
        self._file.close()
        self.sock.close()


HOSTSIDE = str(Path(__file__).with_name("hostside.py"))


def hostside(netns: HostNetns, *args: str, ready: bool = True) -> subprocess.Popen[str]:
    """Start hostside.py (a TCP or DNS peer) in the host namespace; wait for its "ready"
    when it is a server."""
    proc = subprocess.Popen(netns.argv([sys.executable, HOSTSIDE, *args]),
                            stdout=subprocess.PIPE, text=True)
    if ready:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        if line != "ready":
            stop_proc(proc)
            raise HarnessError(f"hostside.py {' '.join(args)}: {line!r} instead of ready")
    return proc


def stop_proc(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait(timeout=10)


def download_checked(guest: Guest, netns: HostNetns, data: Path, size: int, port: int,
                     server: str = "127.0.0.1", via: str = HOST_GW4, keep: str = "") -> str:
    """`size` random bytes written to `data`, served once by hostside.py on `server`:`port`
    in the host namespace, fetched by the guest from `via` (the gateway) with busybox nc and
    checked with sha256 (kept in the guest at `keep` if given). Returns the digest."""
    data.write_bytes(os.urandom(size))
    digest = hashlib.sha256(data.read_bytes()).hexdigest()
    proc = hostside(netns, "serve-send", server, str(port), str(data))
    try:
        tee = f" | tee {keep}" if keep else ""
        _, out = guest.run(f"nc {via} {port}{tee} | sha256sum", timeout=180)
    finally:
        stop_proc(proc)
    if out.split()[:1] != [digest]:
        raise AssertionError(f"download of {size} bytes: sha256 {out!r}, sent {digest}")
    return digest


def dhcp_lease(guest: Guest) -> dict[str, str]:
    """Bring eth0 up and run busybox udhcpc once; return the lease it printed (ip, mask,
    router, dns, mtu, search, serverid, lease...). The image's udhcpc script applies it."""
    guest.run("ip link set eth0 up")
    # -O mtu/-O search: udhcpc does not ask for options 26 and 119 unless told to.
    # -t 5 -T 2: five DISCOVERs two seconds apart at most, then give up (-n) instead of looping.
    cmd = "udhcpc -i eth0 -f -q -n -t 5 -T 2 -O mtu -O search -s /etc/udhcpc/default.script"
    _, out = guest.run(cmd, timeout=60)
    m = re.search(r"^VPT-DHCP (.*)$", out, re.M)
    if not m:
        raise guest.failure(f"no lease from udhcpc; output:\n{out}")
    return dict(kv.split("=", 1) for kv in m.group(1).split(" ") if "=" in kv)


def make_workdir() -> Path:
    """A short per-test directory: UNIX socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=f"vpt-{worker_tag()}-", dir="/tmp"))


@dataclass
class Setup:
    """What the `passt_setup` fixture starts: namespace, daemon and the guest attached to it."""

    netns: HostNetns
    daemon: Daemon
    guest: Guest


# passt_setup(kind="stream" | "vhost-user", args=(...extra daemon options...)) -> Setup
SetupFactory = Callable[..., Setup]
