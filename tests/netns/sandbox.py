"""A disposable network sandbox for end-to-end tests: host and guest namespaces, a relay, a daemon.

Layout (all names unique per test and per xdist worker, all removed at teardown):

    world ns                 host ns                           guest ns
    upw0 192.0.2.1/24  <--veth-->  up0 192.0.2.2/24             tap0 (the guest's NIC)
         2001:db8::1/64            2001:db8::2/64                  ^ relay.py (plays qemu)
                                   default via .1 / ::1            | 4-byte length framing
                                   /etc/resolv.conf = test's       v
                                   vhostpasst -f -s <tmp>/passt.socket

The upstream link is a veth pair (this kernel has no dummy links); its far end lives in a
"world" namespace so nothing the host namespace sends can leave the sandbox. Only documentation
addresses are used. The guest namespace's kernel is the guest's TCP/IP stack.

The module also carries the bits of wire knowledge tests need to talk to the daemon's socket
directly (stream framing, a DHCP DISCOVER builder and a reply parser), written independently of
vhostpasst's own code so that tests do not check the daemon against itself.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TESTS_DIR = Path(__file__).resolve().parent
RELAY = TESTS_DIR / "relay.py"
NS_PREFIX = "vpS-"

DEFAULT_RESOLV = (
    "nameserver 198.51.100.53\n"
    "nameserver 198.51.100.54\n"
    "nameserver 2001:db8::53\n"
    "search example.org test.example\n"
)
DEFAULT_MAC = "9a:55:9a:55:9a:55"
# DHCP client scripts report the lease as environment variables (ip, dns, ...): start the
# clients with an empty environment so that nothing of ours can be mistaken for the lease
CLEAN_ENV = ("env", "-i", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")

_counter = 0  # per process: with os.getpid() it makes namespace names unique across workers


def _next_id() -> str:
    global _counter
    _counter += 1
    return f"{os.getpid()}-{_counter}"


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    """Poll `pred` until it returns something truthy; raise TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def terminate(proc: subprocess.Popen[Any], grace: float = 5) -> None:
    """SIGTERM, then SIGKILL if it has not gone after `grace` seconds; reaped either way."""
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(grace)


def vhostpasst_command() -> list[str]:
    """The installed console script next to this interpreter, else `python -m vhostpasst`."""
    script = shutil.which("vhostpasst", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-m", "vhostpasst"]


def _pid_alive(pid: int) -> bool:
    """True if pid runs and is not a zombie (an orphaned daemon may sit unreaped as one)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def unix_sockets(pid: int, path: str) -> list[tuple[int, int]]:
    """(flags, state) of the UNIX sockets bound to `path` in the network namespace of `pid`.

    Read from /proc/PID/net/unix, so a test can see that the daemon listens (flags has
    __SO_ACCEPTCON) or holds a client, without connecting: a probe connection would take the
    daemon's single client slot.
    """
    try:
        with open(f"/proc/{pid}/net/unix") as f:
            lines = f.read().splitlines()[1:]
    except OSError:
        return []
    found = []
    for line in lines:
        cols = line.split()
        if len(cols) >= 8 and cols[7] == path:
            found.append((int(cols[3], 16), int(cols[5], 16)))
    return found


SO_ACCEPTCON = 0x10000


@dataclass
class SandboxConfig:
    """What a test may change; set per test with @pytest.mark.sandbox(**fields)."""

    mtu: int = 1500  # of the host's upstream link (the guest still gets 65520 from vhostpasst)
    resolv_conf: str = DEFAULT_RESOLV
    tap: str = "tap0"
    host_addr4: str = "192.0.2.2/24"
    gateway4: str = "192.0.2.1"
    host_addr6: str = "2001:db8::2/64"
    gateway6: str = "2001:db8::1"
    ipv6: bool = True


@dataclass
class Sandbox:
    config: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self) -> None:
        ident = _next_id()
        self.host_ns = f"{NS_PREFIX}{ident}-h"
        self.guest_ns = f"{NS_PREFIX}{ident}-g"
        self.world_ns = f"{NS_PREFIX}{ident}-w"
        # short path in /tmp: sun_path holds 107 bytes, pytest's tmp_path can be longer
        self.dir = Path(tempfile.mkdtemp(prefix=f"{NS_PREFIX}{ident}-"))
        self.socket_path = str(self.dir / "passt.socket")
        self.pcap_path = str(self.dir / "passt.pcap")
        self.etc_dir = Path("/etc/netns") / self.host_ns
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_pid: int | None = None  # the serving process (the child without -f)
        self.daemon_returncode: int | None = None  # set by stop_daemon() / teardown
        self.daemon_killed = False  # stop_daemon() had to use SIGKILL
        self.relay: subprocess.Popen[bytes] | None = None
        self._procs: list[subprocess.Popen[bytes]] = []
        self._daemon_runs = 0
        self._relay_runs = 0
        self.late_imports: list[str] = []  # the daemon's sandbox guard lines, found at teardown
        self._made: list[str] = []  # namespaces created, for teardown

    # --- namespaces ----------------------------------------------------------------------

    def setup(self) -> Sandbox:
        try:
            self._setup()
        except BaseException:
            self.teardown()
            raise
        return self

    def _ip(self, *args: str) -> None:
        subprocess.run(["ip", *args], check=True, timeout=10, capture_output=True, text=True)

    def _setup(self) -> None:
        cfg = self.config
        for ns in (self.world_ns, self.host_ns, self.guest_ns):
            self._ip("netns", "add", ns)
            self._made.append(ns)
            self._ip("-n", ns, "link", "set", "lo", "up")

        # upstream: veth up0 (host) <-> upw0 (world), both up so the host sees a carrier
        self._ip("-n", self.host_ns, "link", "add", "up0", "mtu", str(cfg.mtu),
                 "type", "veth", "peer", "name", "upw0", "mtu", str(cfg.mtu),
                 "netns", self.world_ns)
        gw4 = ipaddress.ip_interface(cfg.host_addr4).network.prefixlen
        self._ip("-n", self.world_ns, "addr", "add", f"{cfg.gateway4}/{gw4}", "dev", "upw0")
        self._ip("-n", self.host_ns, "addr", "add", cfg.host_addr4, "dev", "up0")
        if cfg.ipv6:
            gw6 = ipaddress.ip_interface(cfg.host_addr6).network.prefixlen
            self._ip("-n", self.world_ns, "addr", "add", f"{cfg.gateway6}/{gw6}", "dev", "upw0",
                     "nodad")
            self._ip("-n", self.host_ns, "addr", "add", cfg.host_addr6, "dev", "up0", "nodad")
        self._ip("-n", self.world_ns, "link", "set", "upw0", "up")
        self._ip("-n", self.host_ns, "link", "set", "up0", "up")
        self._ip("-n", self.host_ns, "route", "add", "default", "via", cfg.gateway4)
        if cfg.ipv6:
            self._ip("-n", self.host_ns, "-6", "route", "add", "default", "via", cfg.gateway6)
        # ICMP echo sockets for root too (passt uses them); a per-namespace sysctl
        self.host("sh", "-c", "echo '0 2147483647' > /proc/sys/net/ipv4/ping_group_range",
                  check=True)

        # `ip netns exec HOST` bind-mounts /etc/netns/HOST/* over /etc/* in a private mount ns
        self.etc_dir.mkdir(parents=True, exist_ok=True)
        (self.etc_dir / "resolv.conf").write_text(cfg.resolv_conf)

        # the guest's NIC: a persistent tap the relay attaches to (carrier comes with it)
        self._ip("-n", self.guest_ns, "tuntap", "add", "dev", cfg.tap, "mode", "tap")
        self._ip("-n", self.guest_ns, "link", "set", cfg.tap, "up")

    def run_in(self, ns: str, *cmd: str, timeout: float = 10, check: bool = False,
               input: str | None = None) -> subprocess.CompletedProcess[str]:
        """Run a command to completion in namespace `ns` (output captured as text)."""
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], timeout=timeout, check=check,
                              input=input, capture_output=True, text=True)

    def host(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run_in(self.host_ns, *cmd, **kw)

    def guest(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run_in(self.guest_ns, *cmd, **kw)

    def world(self, *cmd: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        return self.run_in(self.world_ns, *cmd, **kw)

    def popen_in(self, ns: str, *cmd: str, **kw: Any) -> subprocess.Popen[bytes]:
        """Start a background process in `ns`; it is killed at teardown."""
        p = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kw)
        self._procs.append(p)
        return p

    # --- the daemon ----------------------------------------------------------------------

    def start_daemon(self, *args: str, foreground: bool = True, pcap: bool | str = False,
                     pid_file: str | None = None, wait: bool = True,
                     timeout: float = 15, command: list[str] | None = None,
                     env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        """Start `vhostpasst [-f] -s <dir>/passt.socket [--pcap F] [-P F] ARGS` in the host ns.

        With wait (the default) return once the socket listens, or raise with the daemon's
        stderr. Without -f the daemon forks: we then wait for the parent to exit and take the
        serving pid from the pid file (one is made up in the sandbox dir if not given).
        `command` replaces the checkout's vhostpasst (e.g. an installed copy), `env` the
        environment it starts with.
        """
        assert self.daemon_pid is None or not _pid_alive(self.daemon_pid), "daemon running"
        self._daemon_runs += 1
        cmd = [*(command or vhostpasst_command()), *(["-f"] if foreground else []),
               "-s", self.socket_path]
        if pcap:
            cmd += ["--pcap", self.pcap_path if pcap is True else str(pcap)]
        if not foreground and pid_file is None:
            pid_file = str(self.dir / "passt.pid")
        if pid_file:
            cmd += ["-P", pid_file]
        cmd += list(args)
        self.daemon_cmd = cmd
        self.daemon_stderr = self.dir / f"daemon-{self._daemon_runs}.stderr"
        with open(self.daemon_stderr, "wb") as err:
            self.daemon = subprocess.Popen(["ip", "netns", "exec", self.host_ns, *cmd],
                                           stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                           env=env)
        self.daemon_returncode = None
        if foreground:
            self.daemon_pid = self.daemon.pid  # `ip netns exec` execs, so this is the daemon
        if not wait:
            return self.daemon
        if not foreground:
            try:
                rc = self.daemon.wait(timeout)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"parent did not exit within {timeout}s\n"
                                     + self.daemon_log()) from None
            assert pid_file is not None
            if rc != 0 or not os.path.exists(pid_file):
                raise AssertionError(f"background start failed (exit {rc})\n" + self.daemon_log())
            self.daemon_pid = int(Path(pid_file).read_text().split()[0])
            return self.daemon
        try:
            wait_until(lambda: self.listening() or self.daemon.poll() is not None, timeout,
                       "the daemon's socket to listen")  # type: ignore[union-attr]
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{self.daemon_log()}") from None
        if not self.listening():
            raise AssertionError(f"daemon exited ({self.daemon.returncode}) before listening\n"
                                 + self.daemon_log())
        return self.daemon

    def listening(self) -> bool:
        """The daemon process has a listening socket bound to our socket path."""
        pid = self.daemon_pid
        return pid is not None and any(
            flags & SO_ACCEPTCON for flags, _ in unix_sockets(pid, self.socket_path))

    def daemon_clients(self) -> int:
        """How many accepted (client) connections the daemon holds on our socket path."""
        pid = self.daemon_pid
        if pid is None:
            return 0
        return sum(1 for flags, _ in unix_sockets(pid, self.socket_path)
                   if not flags & SO_ACCEPTCON)

    def daemon_alive(self) -> bool:
        return self.daemon_pid is not None and _pid_alive(self.daemon_pid)

    def daemon_log(self) -> str:
        path = getattr(self, "daemon_stderr", None)
        text = path.read_text(errors="replace") if path and path.exists() else ""
        return f"--- daemon stderr ({' '.join(getattr(self, 'daemon_cmd', []))}) ---\n{text}"

    def stop_daemon(self, sig: int = signal.SIGTERM, timeout: float = 5) -> int | None:
        """Signal the daemon and wait for it to end (SIGKILL after `timeout`).

        Returns its exit status when it is our child (started with -f), else None once the
        (re-parented) background process is gone. Also kept in `daemon_returncode`.
        """
        pid = self.daemon_pid
        if pid is None:
            return self.daemon_returncode
        proc = self.daemon if self.daemon is not None and self.daemon.pid == pid else None
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        try:
            if proc is not None:
                proc.wait(timeout)
            else:
                wait_until(lambda: not _pid_alive(pid), timeout, f"daemon pid {pid} to exit")
        except (subprocess.TimeoutExpired, TimeoutError):
            self.daemon_killed = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            if proc is not None:
                proc.wait(5)
        self.daemon_returncode = proc.returncode if proc is not None else None
        self.daemon_pid = None
        return self.daemon_returncode

    # --- the relay (qemu's part) ---------------------------------------------------------

    def start_relay(self, reconnect: bool = False, wait: bool = True, timeout: float = 10,
                    socket_path: str | None = None) -> subprocess.Popen[bytes]:
        """Attach tap0 to the daemon's socket through tests/netns/relay.py in the guest namespace.

        With wait, return once the relay is connected; raise with its stderr otherwise.
        """
        if self.relay is not None and self.relay.poll() is None:
            raise AssertionError("a relay is already running; stop_relay() first")
        self._relay_runs += 1
        self.relay_status_path = str(self.dir / f"relay-{self._relay_runs}.status")
        self.relay_stderr = self.dir / f"relay-{self._relay_runs}.stderr"
        cmd = [sys.executable, str(RELAY), "--socket", socket_path or self.socket_path,
               "--tap", self.config.tap, "--status-file", self.relay_status_path,
               "--connect-timeout", str(timeout), "-v"]
        if reconnect:
            cmd.append("--reconnect")
        with open(self.relay_stderr, "wb") as err:
            self.relay = self.popen_in(self.guest_ns, *cmd, stdin=subprocess.DEVNULL,
                                       stdout=err, stderr=err)
        if wait:
            try:
                self.wait_relay("connected", timeout=timeout + 5)
            except TimeoutError as e:
                raise AssertionError(f"{e}\n{self.relay_log()}") from None
        return self.relay

    def relay_status(self) -> dict[str, str]:
        path = getattr(self, "relay_status_path", None)
        try:
            text = Path(path).read_text() if path else ""
        except FileNotFoundError:
            return {}
        return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)

    def wait_relay(self, state: str, connections: int = 1, timeout: float = 10) -> dict[str, str]:
        def ready() -> dict[str, str] | None:
            st = self.relay_status()
            if st.get("state") == state and int(st.get("connections", 0)) >= connections:
                return st
            if self.relay is not None and self.relay.poll() is not None and state != "exited":
                raise AssertionError(f"relay exited ({self.relay.returncode}) "
                                     f"before '{state}'\n{self.relay_log()}")
            return None

        return wait_until(ready, timeout, f"relay state {state!r}")  # type: ignore[no-any-return]

    def relay_log(self) -> str:
        path = getattr(self, "relay_stderr", None)
        text = path.read_text(errors="replace") if path and path.exists() else ""
        return f"--- relay stderr ---\n{text}"

    def stop_relay(self, timeout: float = 5) -> None:
        """Stop the relay (as if qemu quit) and wait until the daemon has dropped the client."""
        if self.relay is None:
            return
        if self.relay.poll() is None:
            self.relay.terminate()
            try:
                self.relay.wait(timeout)
            except subprocess.TimeoutExpired:
                self.relay.kill()
                self.relay.wait(5)
        self.relay = None
        if self.daemon_alive():
            wait_until(lambda: self.daemon_clients() == 0, timeout,
                       "the daemon to notice the client left")

    # --- guest-side helpers --------------------------------------------------------------

    def udhcpc(self, *extra: str, timeout: float = 20) -> dict[str, str]:
        """Run busybox udhcpc once on tap0; return the environment its script saw at 'bound'.

        The script only records the lease: the test decides what to configure.
        """
        out = self.dir / "udhcpc.bound"
        out.unlink(missing_ok=True)
        script = self._script("udhcpc.sh",
                              f'#!/bin/sh\n[ "$1" = bound ] && env > {out}.tmp && '
                              f"mv {out}.tmp {out}\nexit 0\n")
        r = self.guest(*CLEAN_ENV, "busybox", "udhcpc", "-i", self.config.tap, "-f", "-q", "-n",
                       "-t", "5", "-T", "1", "-s", script, "-O", "search", "-O", "mtu", *extra,
                       timeout=timeout)
        if r.returncode != 0 or not out.exists():
            raise AssertionError(f"udhcpc got no lease (exit {r.returncode})\n{r.stdout}"
                                 f"{r.stderr}\n{self.daemon_log()}")
        return _parse_env(out.read_text())

    def dhclient(self, timeout: float = 25, family: int = 4) -> dict[str, str]:
        """Run ISC dhclient -4 or -6 once on tap0; its script's environment at BOUND/BOUND6."""
        v = "" if family == 4 else "6"
        out = self.dir / f"dhclient{v}.bound"
        out.unlink(missing_ok=True)
        script = self._script(f"dhclient{v}.sh",
                              f'#!/bin/sh\n[ "$reason" = BOUND{v} ] && env > {out}.tmp && '
                              f"mv {out}.tmp {out}\nexit 0\n")
        conf = self.dir / f"dhclient{v}.conf"
        wanted = ("subnet-mask, broadcast-address, routers, domain-name,\n"
                  "        domain-name-servers, domain-search, interface-mtu, host-name"
                  if family == 4 else "dhcp6.name-servers, dhcp6.domain-search")
        conf.write_text(f"timeout 15;\nretry 1;\ninitial-interval 1;\nrequest {wanted};\n")
        pid_file = self.dir / f"dhclient{v}.pid"
        r = self.guest(*CLEAN_ENV, "timeout", str(int(timeout)), "dhclient", f"-{family}", "-1",
                       "-v", "-cf", str(conf), "-sf", script,
                       "-lf", str(self.dir / f"dhclient{v}.leases"),
                       "-pf", str(pid_file), self.config.tap, timeout=timeout + 5)
        # after BOUND dhclient forks to the background to renew, and the child writes the pid
        # file (so it may still be empty here): stop it so it cannot answer for the guest later
        # (teardown kills it otherwise)
        def bg_pid() -> int | None:
            with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
                pid = int(pid_file.read_text().split()[0])
                return pid if _pid_alive(pid) else None
            return None

        with contextlib.suppress(TimeoutError, ProcessLookupError):
            pid = wait_until(bg_pid, 2 if r.returncode == 0 else 0, "dhclient's pid file")
            os.kill(pid, signal.SIGTERM)
            wait_until(lambda: not _pid_alive(pid), 3, "dhclient to exit")
        if r.returncode != 0 or not out.exists():
            raise AssertionError(f"dhclient -{family} got no lease (exit {r.returncode})\n"
                                 f"{r.stdout}{r.stderr}\n{self.daemon_log()}")
        return _parse_env(out.read_text())

    def _script(self, name: str, text: str) -> str:
        path = self.dir / name
        path.write_text(text)
        path.chmod(0o755)
        return str(path)

    def guest_neighbours(self) -> dict[str, str]:
        """IPv4 neighbours of the guest's tap: address -> lladdr (entries with one only)."""
        r = self.guest("ip", "-4", "neigh", "show", "dev", self.config.tap, check=True)
        neigh = {}
        for line in r.stdout.splitlines():
            cols = line.split()
            if "lladdr" in cols:
                neigh[cols[0]] = cols[cols.index("lladdr") + 1]
        return neigh

    # --- teardown ------------------------------------------------------------------------

    def teardown(self) -> list[str]:
        """Stop everything we started and delete namespaces and files; never raises.

        Returns the problems met (also printed, so a failing test's report shows them).
        """
        problems: list[str] = []

        def attempt(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:  # keep tearing down whatever happens
                problems.append(f"{what}: {e!r}")

        if self.daemon_pid is not None:
            attempt("stop daemon", self.stop_daemon)
        if self.daemon is not None and self.daemon.poll() is None:  # a parent that never exited
            attempt("kill daemon parent", self.daemon.kill)
        for p in self._procs:
            if p.poll() is None:
                attempt(f"terminate {p.args!r}", p.terminate)
        for p in self._procs:
            try:
                p.wait(3)
            except subprocess.TimeoutExpired:
                attempt(f"kill {p.args!r}", p.kill)
                attempt(f"wait {p.args!r}", lambda p=p: p.wait(3))
        # anything still in our namespaces (a backgrounded dhclient, a forked daemon) goes too
        for ns in self._made:
            attempt(f"kill processes in {ns}", lambda ns=ns: _kill_netns_pids(ns))
        for ns in reversed(self._made):
            attempt(f"delete {ns}", lambda ns=ns: self._ip("netns", "delete", ns))
        self._made.clear()
        attempt("remove /etc/netns entry", lambda: shutil.rmtree(self.etc_dir, True))
        self.late_imports = late_imports(self.dir)
        logs = []  # read before the directory goes; printed last (pytest shows it on failure)
        if self.daemon_stderr_text():
            logs.append(self.daemon_log())
        if getattr(self, "relay_stderr", None):
            logs.append(self.relay_log())
        attempt("remove sandbox dir", lambda: shutil.rmtree(self.dir))
        with contextlib.suppress(OSError):  # a closed stdout must not undo the cleanup
            print("\n".join(logs + [f"sandbox teardown: {p}" for p in problems]))
        return problems

    def daemon_stderr_text(self) -> str:
        path = getattr(self, "daemon_stderr", None)
        return path.read_text(errors="replace") if path and path.exists() else ""


LATE_IMPORT = "late import of"  # vhostpasst/system/sandbox.py's guard, once the root is empty
PROBE_MODULE = "vhostpasst_sandbox_probe_late_import"  # the probe's, expected


def late_imports(directory: Path) -> list[str]:
    """Lines of any daemon log (*.stderr, *.log) in `directory` saying that the sandboxed
    daemon imported a module it had not imported before emptying its root: it works in the
    tests only by luck of the module being cached; in production the import fails."""
    found = []
    for path in sorted(directory.glob("*.stderr")) + sorted(directory.glob("*.log")):
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if LATE_IMPORT in line and PROBE_MODULE not in line:
                    found.append(f"{path.name}: {line}")
    return found


def _kill_netns_pids(ns: str) -> None:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=5)
    pids = [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(TimeoutError):
            wait_until(lambda pid=pid: not _pid_alive(pid), 3, f"pid {pid} to die")


def remove_stale_namespaces() -> None:
    """Delete vpS-PID-* namespaces (and /etc/netns entries) left by test processes now dead."""
    r = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=5)
    for line in r.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(NS_PREFIX):
            continue
        pid = name[len(NS_PREFIX):].split("-")[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            with contextlib.suppress(Exception):
                _kill_netns_pids(name)
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=5)
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)


def _parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# --- talking to the stream socket directly --------------------------------------------------

FRAME_HDR = struct.Struct("!I")


def frame_bytes(frame: bytes) -> bytes:
    """One frame as qemu's stream socket carries it: 4-byte big-endian length, then the frame."""
    return FRAME_HDR.pack(len(frame)) + frame


class FrameReader:
    """Reassembles length-prefixed frames from stream bytes that arrive in arbitrary pieces."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self.buf += data
        frames = []
        while len(self.buf) >= 4:
            (n,) = FRAME_HDR.unpack_from(self.buf)
            if len(self.buf) < 4 + n:
                break
            frames.append(bytes(self.buf[4 : 4 + n]))
            del self.buf[: 4 + n]
        return frames


class StreamClient:
    """A bare stream-socket client, standing in for qemu in tests that craft frames by hand."""

    def __init__(self, path: str | None, timeout: float = 5,
                 sock: socket.socket | None = None) -> None:
        if sock is None:  # connect to `path`; else wrap an accepted socket (fake servers)
            assert path is not None
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(path)
        self.sock = sock
        self.reader = FrameReader()
        self.pending: list[bytes] = []
        self.closed = False

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_frame(self, frame: bytes) -> None:
        self.sock.sendall(frame_bytes(frame))

    def recv_frame(self, timeout: float = 5) -> bytes | None:
        """Next frame, or None on end of stream or timeout (then `closed` tells which)."""
        deadline = time.monotonic() + timeout
        while not self.pending:
            left = deadline - time.monotonic()
            if left <= 0 or self.closed:
                return None
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 16)
            except TimeoutError:
                return None
            except (ConnectionResetError, BrokenPipeError):
                data = b""
            if not data:
                self.closed = True
                return None
            self.pending += self.reader.feed(data)
        return self.pending.pop(0)

    def frames_until(self, pred: Callable[[bytes], Any], timeout: float = 5) -> Any:
        """Read frames until pred(frame) is truthy; return that value (None on timeout/EOF)."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            frame = self.recv_frame(left)
            if frame is None:
                return None
            value = pred(frame)
            if value:
                return value
        return None

    def wait_closed(self, timeout: float = 5) -> bool:
        """True if the daemon closes the connection within timeout (frames are discarded)."""
        deadline = time.monotonic() + timeout
        while not self.closed and time.monotonic() < deadline:
            self.recv_frame(deadline - time.monotonic())
        return self.closed

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- just enough Ethernet/IPv4/UDP/DHCP to craft and read frames ----------------------------

BROADCAST_MAC = b"\xff" * 6
DHCP_MAGIC = b"\x63\x82\x53\x63"
DHCP_TYPES = {1: "DISCOVER", 2: "OFFER", 3: "REQUEST", 4: "DECLINE", 5: "ACK", 6: "NAK",
              7: "RELEASE", 8: "INFORM"}


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def mac_str(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ipv4_udp_frame(src_mac: bytes, dst_mac: bytes, src_ip: str, dst_ip: str, sport: int,
                   dport: int, payload: bytes) -> bytes:
    """An Ethernet/IPv4/UDP frame with correct lengths and checksums."""
    src, dst = ipaddress.IPv4Address(src_ip).packed, ipaddress.IPv4Address(dst_ip).packed
    udp_len = 8 + len(payload)
    pseudo = src + dst + struct.pack("!BBH", 0, 17, udp_len)
    udp = struct.pack("!HHHH", sport, dport, udp_len, 0) + payload
    csum = inet_checksum(pseudo + udp) or 0xFFFF
    udp = udp[:6] + struct.pack("!H", csum) + udp[8:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_len, 0, 0, 64, 17, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", inet_checksum(ip)) + ip[12:]
    return dst_mac + src_mac + b"\x08\x00" + ip + udp


def dhcp_payload(op_type: int, mac: bytes, xid: int, options: Iterable[tuple[int, bytes]] = (),
                 broadcast: bool = True) -> bytes:
    """A BOOTREQUEST carrying DHCP message type `op_type` and the given extra options."""
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128s", 1, 1, 6, 0, xid, 0,
                        0x8000 if broadcast else 0, b"\0" * 4, b"\0" * 4, b"\0" * 4, b"\0" * 4,
                        mac.ljust(16, b"\0"), b"", b"")
    opts = bytearray(DHCP_MAGIC)
    opts += bytes([53, 1, op_type])
    for code, value in options:
        opts += bytes([code, len(value)]) + value
    opts += b"\xff"
    return bootp + bytes(opts)


def dhcp_discover(mac: bytes, xid: int, params: Sequence[int] = (1, 3, 6, 15, 26, 119)) -> bytes:
    """A complete DHCPDISCOVER frame as a fresh guest would broadcast it."""
    payload = dhcp_payload(1, mac, xid, [(55, bytes(params))])
    return ipv4_udp_frame(mac, BROADCAST_MAC, "0.0.0.0", "255.255.255.255", 68, 67, payload)


@dataclass
class DhcpReply:
    msg_type: str
    xid: int
    yiaddr: str
    options: dict[int, bytes]
    eth_src: str
    eth_dst: str
    ip_src: str
    ip_dst: str


def parse_dhcp_reply(frame: bytes) -> DhcpReply | None:
    """A server-to-client DHCP message in `frame`, or None if it is anything else."""
    if len(frame) < 14 + 20 + 8 + 240 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14 + 9] != 17:
        return None
    udp = 14 + ihl
    sport, dport = struct.unpack_from("!HH", frame, udp)
    bootp = frame[udp + 8 :]
    if (sport, dport) != (67, 68) or len(bootp) < 240 or bootp[0] != 2:
        return None
    if bootp[236:240] != DHCP_MAGIC:
        return None
    options: dict[int, bytes] = {}
    i = 240
    while i < len(bootp) and bootp[i] != 255:
        if bootp[i] == 0:
            i += 1
            continue
        if i + 1 >= len(bootp):
            break
        code, n = bootp[i], bootp[i + 1]
        options[code] = options.get(code, b"") + bytes(bootp[i + 2 : i + 2 + n])
        i += 2 + n
    t = options.get(53, b"\0")[0]
    return DhcpReply(
        msg_type=DHCP_TYPES.get(t, str(t)),
        xid=struct.unpack_from("!I", bootp, 4)[0],
        yiaddr=str(ipaddress.IPv4Address(bytes(bootp[16:20]))),
        options=options,
        eth_src=mac_str(frame[6:12]),
        eth_dst=mac_str(frame[0:6]),
        ip_src=str(ipaddress.IPv4Address(bytes(frame[26:30]))),
        ip_dst=str(ipaddress.IPv4Address(bytes(frame[30:34]))),
    )
