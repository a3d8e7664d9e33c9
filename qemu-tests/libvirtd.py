"""A private libvirtd for the libvirt tests: started inside the test's host network namespace,
with its own configuration, runtime, state, cache and log directories, and a guest console
driven over the UNIX socket libvirt gives the domain's serial port.

libvirtd running as root always uses the system paths (/etc/libvirt, /run/libvirt,
/var/lib/libvirt, /var/cache/libvirt, /var/log/libvirt); session mode does not exist for root.
So the daemon runs in a mount namespace of its own (`unshare`, inside `ip netns exec`),
where directories of the test's work directory are bind-mounted over those paths (and over
/run as a whole: /run/libvirt does not exist before a daemon creates it, and the system's /run
stays out of sight). The system's directories are never written; `virsh` reaches the daemon
at `<workdir>/run/libvirt/libvirt-sock`, the same socket seen from outside.

It also runs in a PID namespace of its own (`unshare --pid --kill-child`, with its own /proc)
under a tiny init (INIT) that reaps the orphans (libvirt detaches qemu from itself, and waits
for the processes it kills to be gone, zombies included) and forwards SIGTERM. When libvirtd
ends, the init ends, and the kernel kills what is left in the namespace (qemu, passt); the
whole tree dies with the test process (PR_SET_PDEATHSIG, as in harness.py), so nothing
outlives a crashed test run. The pids in libvirt's pid files are that namespace's;
`host_pid()` translates them.

`passt` is found in libvirtd's PATH: a directory of the work directory comes first, holding
`vhostpasst` (a console script bound to this checkout, as pip would write it) and a `passt`
symlink to it, so the daemon takes the passt personality from its name.
"""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from harness import Guest, HarnessError, HostNetns, _die_with_parent, _tail, process_failure

REPO = Path(__file__).resolve().parent.parent
LIBVIRTD = "libvirtd"
VIRSH = "virsh"
MIN_VERSION = (11, 1)  # <interface type='vhostuser'> with <backend type='passt'/>

# The system paths the private daemon would use, and the work directory's stand-ins.
MOUNTS = {"etc": "/etc/libvirt", "lib": "/var/lib/libvirt", "cache": "/var/cache/libvirt",
          "log": "/var/log/libvirt", "run": "/run"}

# TCG, root, no cgroups, no per-domain mount namespace, no security driver: this daemon only
# runs test guests of its own, inside the test's namespaces. Guest stdout goes to a plain file
# (no virtlogd).
QEMU_CONF = """\
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
namespaces = []
cgroup_controllers = []
stdio_handler = "file"
"""


# Process 1 of libvirtd's PID namespace: runs argv, reaps every child (adopted orphans too),
# forwards SIGTERM, and exits with argv's status.
INIT = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGTERM))
while True:
    child, status = os.waitpid(-1, 0)
    if child == pid:
        sys.exit(os.waitstatus_to_exitcode(status) & 0xff)
"""


def libvirt_version() -> tuple[int, ...] | None:
    """libvirtd's version, or None when it is not installed."""
    if not shutil.which(LIBVIRTD) or not shutil.which(VIRSH):
        return None
    res = subprocess.run([LIBVIRTD, "--version"], capture_output=True, text=True, timeout=20)
    m = re.search(r"(\d+)\.(\d+)(?:\.(\d+))?", res.stdout)
    return tuple(int(g or 0) for g in m.groups()) if m else None


def write_passt_bin(bindir: Path) -> None:
    """`bindir/vhostpasst`, a console script running this checkout (whatever else is
    installed), and `bindir/passt` linked to it."""
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / "vhostpasst"
    script.write_text(
        f"#!{sys.executable}\n"
        "# Written by qemu-tests/libvirtd.py: this checkout's daemon, as a console script.\n"
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from vhostpasst.main import main_passt\n"
        "sys.exit(main_passt())\n")
    script.chmod(0o755)
    (bindir / "passt").symlink_to("vhostpasst")


class Libvirtd:
    """libvirtd in `netns`, with everything of its own under `root` (see the module's
    docstring). `virsh(...)` runs a command against it. close() destroys the domains left,
    stops the daemon and kills what it started that would outlive it."""

    def __init__(self, root: Path, netns: HostNetns, timeout: float = 120) -> None:
        self.root = root
        self.log = root / "libvirtd.log"
        self.bindir = root / "bin"
        write_passt_bin(self.bindir)
        for sub in MOUNTS:
            (root / sub).mkdir()
        (root / "run" / "libvirt").mkdir()
        (root / "etc" / "qemu.conf").write_text(QEMU_CONF)
        (root / "etc" / "libvirtd.conf").write_text(
            f'log_filters = "1:qemu.qemu_passt 1:util.command"\n'
            f'log_outputs = "1:file:{root / "libvirtd-debug.log"}"\n')
        self.uri = f"qemu:///system?socket={root}/run/libvirt/libvirt-sock"
        mounts = " && ".join(f"mount --bind {shlex.quote(str(root / sub))} {path}"
                             for sub, path in MOUNTS.items())
        script = (f"{mounts} && exec {shlex.quote(sys.executable)} -c {shlex.quote(INIT)} "
                  f"{LIBVIRTD} --pid-file /run/libvirtd.pid")
        self.argv = netns.argv(["unshare", "--mount", "--propagation", "private", "--pid",
                                "--mount-proc", "--kill-child", "sh", "-c", script])
        env = dict(os.environ, PATH=f"{self.bindir}:{os.environ.get('PATH', '/usr/bin:/bin')}")
        with open(self.log, "wb") as log:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=env, preexec_fn=_die_with_parent)
        sock = root / "run" / "libvirt" / "libvirt-sock"
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                self._fail(f"exited with status {self.proc.returncode}")
            # The first connection waits for libvirt's probe of qemu's capabilities (~8 s).
            left = max(1.0, deadline - time.monotonic())
            try:
                if sock.exists() and self.virsh("version", check=False,
                                                timeout=left).returncode == 0:
                    break
            except subprocess.TimeoutExpired:
                self._fail(f"not answering on {sock} after {timeout:.0f}s")
            if time.monotonic() > deadline:
                self._fail(f"not answering on {sock} after {timeout:.0f}s")
            time.sleep(0.2)

    def _fail(self, what: str) -> None:
        self.close()
        raise process_failure("libvirtd", what, self.argv, self.log)

    def virsh(self, *args: str, check: bool = True,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [VIRSH, "-q", "-c", self.uri, *args]
        res = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and res.returncode != 0:
            raise HarnessError(f"{shlex.join(argv)} failed ({res.returncode}): "
                               f"{res.stderr.strip()}\n--- libvirtd log ---\n{_tail(self.log)}")
        return res

    def pid_files(self) -> list[Path]:
        """The pid files of the qemu and passt processes the daemon started."""
        return sorted((self.root / "run" / "libvirt" / "qemu").glob("**/*.pid"))

    def host_pid(self, ns_pid: int) -> int | None:
        """The pid, as this test sees it, of process `ns_pid` of the daemon's PID namespace
        (from the NSpid lines of /proc/*/status); None if there is no such process."""
        if self.proc is None:
            return None
        def status(pid: int | str) -> dict[str, list[str]]:
            return {k: v.split() for k, _, v in (line.partition(":") for line in
                    Path(f"/proc/{pid}/status").read_text().splitlines())}

        try:  # a process of libvirtd's namespace has one NSpid level more than unshare
            depth = len(status(self.proc.pid)["NSpid"]) + 1
        except (OSError, KeyError):
            return None
        for proc in Path("/proc").glob("[0-9]*"):
            try:
                st = status(proc.name)
                nspid = st["NSpid"]
                # its pid at libvirtd's level: a daemon in a PID namespace of its own below
                # (passt forking to the background, sandboxed) has more levels
                if len(nspid) < depth or int(nspid[depth - 1]) != ns_pid:
                    continue
                ppid, seen = int(st["PPid"][0]), 0
                while ppid > 1 and ppid != self.proc.pid and seen < 64:  # bounded walk up
                    ppid, seen = int(status(ppid)["PPid"][0]), seen + 1
                if ppid == self.proc.pid:
                    return int(nspid[0])
            except (OSError, KeyError, ValueError, IndexError):
                continue
        return None

    def close(self) -> None:
        """Destroy the domains left, then stop libvirtd: SIGTERM (through the namespace's
        init), then (after 15 s) SIGKILL for unshare, whose --kill-child takes the init and
        with it the whole PID namespace."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            res = self.virsh("list", "--name", check=False, timeout=30)
            for name in res.stdout.split():
                self.virsh("destroy", name, check=False, timeout=60)
            init = self.host_pid(1)
            if init is not None:
                os.kill(init, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None


def process_state(pid: int) -> str | None:
    """The state letter of process `pid` (R, S, Z...), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def wait_exited(pid: int, timeout: float) -> bool:
    """Wait until `pid` has exited (gone, or a zombie nobody reaped); False on timeout."""
    deadline = time.monotonic() + timeout
    while process_state(pid) not in (None, "Z", "X"):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


class ConsoleGuest(Guest):
    """A guest libvirt started, driven like harness.Guest (run, wait_for, failure) through
    its serial console: a UNIX socket qemu listens on (`<serial type='unix'>` in bind mode)."""

    def __init__(self, console: Path, workdir: Path, name: str, qemu_log: Path,
                 what: str) -> None:
        self.workdir = workdir
        self.console_log = workdir / f"{name}-console.log"
        self.qemu_log = qemu_log
        self._buf = bytearray()
        self._cond = threading.Condition()
        self._eof = False
        self._seq = itertools.count()
        self.argv = [what]
        self.proc = None  # libvirt's: `virsh destroy` ends it
        self.boot_time = 0.0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(console))
        self._reader = threading.Thread(target=self._read, name=f"console-{name}", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.console_log, "wb") as log:
            while True:
                try:
                    chunk = self.sock.recv(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                log.write(chunk)
                log.flush()
                with self._cond:
                    self._buf += chunk
                    self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def send(self, text: str) -> None:
        self.sock.sendall(text.encode())

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._reader.join(timeout=5)
        self.sock.close()
