"""A Debian 13 (trixie) root with podman 5 in it, and a way to run podman there with our `pasta`.

Theory of operation
-------------------
Debian 12's podman (4.3) predates `--network pasta`; Debian 13's (5.4) has it. This module makes
a trixie root with debootstrap (minbase, plus `PACKAGES` and their dependencies, no
recommends: so no passt/pasta of Debian's), from the mirror apt already uses on this machine
(`mirror_of` in scripts/apt-mirror.sh: no package host is named here), and caches it under
`.cache/podman/` (gitignored; $VHOSTPASST_PODMAN_CACHE overrides). The cache key hashes the
package list, this builder's version and the `Date:` of the suite's InRelease file on that
mirror: the archive changes that file whenever any package version in the suite changes, so the
root is rebuilt exactly when the versions it would get change, and reused otherwise (one small
HTTP request per session). The versions installed are kept beside the root
(`<root>.versions.txt`). If the archive cannot be reached
the newest cached root is used; with none, `Unavailable` says why (tests skip on it).

What the build adds to the plain root, once:
  * a user `podman` (uid 1000, subordinate ids from useradd): podman refuses pasta to rootful
    containers ("pasta networking is only supported for rootless mode or when inside a nested
    userns"), so podman runs rootless, as pasta's users run it;
  * /etc/containers/containers.conf: cgroupfs and file events (no systemd in the root), and
    `helper_binaries_dir` with /usr/local/bin first, as doc/integration.md tells users; the
    user's storage.conf picks the vfs driver (no overlay mounts needed);
  * /opt/vhostpasst/venv: a venv made by the root's own python3, with
    python3-cffi-backend from the system and a .pth naming /opt/vhostpasst/lib, where the
    checkout's `vhostpasst` and `virtio` packages are bind-mounted read-only at run time (their
    cffi extensions are abi3, so trixie's python 3.13 loads the host's build); its
    `vhostpasta` console script, and `/usr/local/bin/pasta` linked to it;
  * /opt/busybox.tar: busybox-static and its applet links, the file system `podman import`
    makes the local image from (no registry is reachable here).

`PodmanRoot` runs podman there for one test: an overlay over the cached root (the cache stays
pristine; the writes go to the test's directory), in a mount namespace of its own held by a
keeper process that joined the test's host network namespace. The keeper's set-up, and why:
  * /sys is mounted from inside the network namespace (its net class is that namespace's), but
    the cgroup v1 hierarchies are bound from the original mount namespace (`ip netns exec`
    would have left /sys/fs/cgroup empty). The cgroup2 "unified" hierarchy is left out: on this
    hybrid host it holds a controller (hugetlb) and crun refuses ("cgroups in hybrid mode not
    supported, drop all controllers from cgroupv2");
  * /dev is a tmpfs of its own with the usual nodes and /dev/net/tun mode 0666, as udev makes
    it on a stock Debian (this machine's is 0600, which no rootless pasta can open);
  * the root becomes the namespace's root with pivot_root, not chroot: the kernel refuses a
    user namespace to a chrooted process (podman then fails with "cannot clone: Operation not
    permitted"), and rootless podman needs one.
Commands then run with `nsenter` into the keeper's mount and network namespaces and root, as the
podman user. Teardown kills every process left in that mount namespace (by pid), after which the
kernel drops its mounts.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# VHOSTPASST_PODMAN_CACHE: somewhere a CI keeps between runs (a fresh clone has no .cache/)
CACHE = Path(os.environ.get("VHOSTPASST_PODMAN_CACHE", REPO / ".cache" / "podman"))
SUITE = "trixie"
BUILDER_VERSION = "1"  # bump when the build below changes
PACKAGES = ("podman", "crun", "conmon", "netavark", "uidmap", "python3",
            "python3-cffi-backend", "busybox-static")
USER, UID = "podman", 1000
VENV = "/opt/vhostpasst/venv"
LIB = "/opt/vhostpasst/lib"
IMAGE_TAR = "/opt/busybox.tar"
ENV = ("/usr/bin/env", "-i", "PATH=/usr/local/bin:/usr/bin:/bin", f"HOME=/home/{USER}",
       f"USER={USER}", f"XDG_RUNTIME_DIR=/run/user/{UID}", "PODMAN_IGNORE_CGROUPSV1_WARNING=1")

CONTAINERS_CONF = """\
# written by tests/netns/podman_root.py
[containers]
log_driver = "k8s-file"

[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
# doc/integration.md: our pasta first; then Debian's own helper directories
helper_binaries_dir = ["/usr/local/bin", "/usr/libexec/podman", "/usr/lib/podman"]
"""
STORAGE_CONF = '[storage]\ndriver = "vfs"\n'
CONSOLE_SCRIPT = f"""#!{VENV}/bin/python3
import sys
from vhostpasst.main import main_pasta
sys.exit(main_pasta())
"""


class Unavailable(Exception):
    """The root cannot be had (no debootstrap, archive unreachable and nothing cached)."""


def mirror() -> str:
    """The mirror apt uses on this machine (scripts/apt-mirror.sh), for SUITE too."""
    script = f'. "{REPO}/scripts/apt-mirror.sh"; . /etc/os-release; mirror_of "$VERSION_CODENAME"'
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=10)
    if r.returncode != 0 or not r.stdout.strip():
        raise Unavailable("no apt source to take the Debian mirror from")
    return r.stdout.strip().split("|")[0].rstrip("/")


def release_date(uri: str, timeout: float = 20) -> str:
    """The Date: field of SUITE's InRelease on the mirror."""
    with urllib.request.urlopen(f"{uri}/dists/{SUITE}/InRelease", timeout=timeout) as f:
        for raw in f:
            line = raw.decode(errors="replace")
            if line.startswith("Date:"):
                return line.split(":", 1)[1].strip()
    raise Unavailable(f"{uri}/dists/{SUITE}/InRelease has no Date field")


def cache_key(date: str) -> str:
    text = "\n".join([BUILDER_VERSION, SUITE, " ".join(PACKAGES), date])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _complete(path: Path) -> bool:
    return (path / ".complete").exists()


def _cached() -> list[Path]:
    found = [p for p in CACHE.glob(f"{SUITE}-*") if p.is_dir() and _complete(p)]
    return sorted(found, key=lambda p: (p / ".complete").stat().st_mtime, reverse=True)


def ensure_root(log: Path | None = None) -> Path:
    """The cached root for the archive's current versions, built first if need be."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time (xdist workers)
        try:
            uri = mirror()
            key = cache_key(release_date(uri))
        except (OSError, Unavailable) as e:
            cached = _cached()
            if cached:
                return cached[0]
            raise Unavailable(f"Debian archive unreachable and no cached root: {e}") from None
        root = CACHE / f"{SUITE}-{key}"
        if _complete(root):
            return root
        if shutil.which("debootstrap") is None:
            raise Unavailable("needs debootstrap (scripts/setup-debian.sh installs it)")
        _build(root, uri, log or CACHE / "build.log")
        for old in CACHE.glob(f"{SUITE}-*"):
            if old != root:
                shutil.rmtree(old, ignore_errors=True)
        return root


def _build(root: Path, uri: str, log: Path) -> None:
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with open(log, "w") as out:
        r = subprocess.run(["nice", "-n", "10", "debootstrap", "--variant=minbase",
                            "--include=" + ",".join(PACKAGES), SUITE, str(tmp), uri],
                           stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    if r.returncode != 0:
        tail = log.read_text(errors="replace")[-2000:]
        shutil.rmtree(tmp, ignore_errors=True)
        raise Unavailable(f"debootstrap {SUITE} failed ({r.returncode}):\n{tail}")

    def chroot(*cmd: str) -> str:
        return subprocess.run(["chroot", str(tmp), *cmd], check=True, capture_output=True,
                              text=True, timeout=120).stdout

    chroot("useradd", "-m", "-u", str(UID), "-s", "/bin/sh", USER)
    (tmp / "etc/containers/containers.conf").write_text(CONTAINERS_CONF)
    conf = tmp / "home" / USER / ".config/containers"
    conf.mkdir(parents=True)
    (conf / "storage.conf").write_text(STORAGE_CONF)
    chroot("chown", "-R", f"{USER}:{USER}", f"/home/{USER}/.config")

    chroot("python3", "-m", "venv", "--system-site-packages", "--without-pip", VENV)
    for pkg in ("vhostpasst", "virtio"):
        (tmp / LIB.lstrip("/") / pkg).mkdir(parents=True)
    site = chroot(f"{VENV}/bin/python3", "-c", "import site; print(site.getsitepackages()[0])")
    (tmp / site.strip().lstrip("/") / "vhostpasst.pth").write_text(LIB + "\n")
    script = tmp / VENV.lstrip("/") / "bin/vhostpasta"
    script.write_text(CONSOLE_SCRIPT)
    script.chmod(0o755)
    (tmp / "usr/local/bin/pasta").symlink_to(f"{VENV}/bin/vhostpasta")

    # the image's file system: busybox-static and its applets, a passwd for root
    chroot("sh", "-euc", """
        d=$(mktemp -d); mkdir -p "$d/bin" "$d/etc" "$d/tmp" "$d/proc" "$d/sys" "$d/dev"
        cp /bin/busybox "$d/bin/busybox"
        for a in $(/bin/busybox --list); do [ -e "$d/bin/$a" ] || ln -s busybox "$d/bin/$a"; done
        echo root:x:0:0:root:/root:/bin/sh > "$d/etc/passwd"; echo root:x:0: > "$d/etc/group"
        tar -C "$d" -cf """ + IMAGE_TAR + """ . && rm -rf "$d"
    """)

    versions = chroot("dpkg-query", "-W", "-f", "${Package} ${Version}\n")
    (tmp / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
    for deb in (tmp / "var/cache/apt/archives").glob("*.deb"):
        deb.unlink()
    (root.parent / f"{root.name}.versions.txt").write_text(versions)
    (tmp / ".complete").write_text(f"{SUITE} {uri} {time.strftime('%F %T')}\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


# -- running podman in it ------------------------------------------------------------------------

KEEPER = r"""
set -eu
R=$1 LOWER=$2 WORK=$3 LIB=$4 UID_=$5
mount --make-rprivate /
mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$WORK/upper,workdir=$WORK/work" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs sys "$R/sys"
mount -t tmpfs -o mode=755 cgroup "$R/sys/fs/cgroup"
for c in /sys/fs/cgroup/*; do
	n=${c##*/}
	[ "$n" != unified ] || continue
	mountpoint -q "$c" || continue
	mkdir -p "$R/sys/fs/cgroup/$n"
	mount --bind "$c" "$R/sys/fs/cgroup/$n"
done
mount -t tmpfs -o mode=755 dev "$R/dev"
for d in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
	n=${d%%:*} mm=${d#*:}
	mknod -m 666 "$R/dev/$n" c "${mm%:*}" "${mm#*:}"
done
mkdir -p "$R/dev/net" "$R/dev/pts" "$R/dev/shm"
mknod -m 666 "$R/dev/net/tun" c 10 200
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777 shm "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
mount -t tmpfs -o mode=755 run "$R/run"
mount -t tmpfs -o mode=1777 tmp "$R/tmp"
mkdir -p "$R/run/user/$UID_"
chown "$UID_:$UID_" "$R/run/user/$UID_"
chmod 700 "$R/run/user/$UID_"
for pkg in vhostpasst virtio; do
	mount --bind -o ro "$LIB/$pkg" "$R/opt/vhostpasst/lib/$pkg"
done
mkdir -p "$R/.oldroot"
cd "$R"
pivot_root . .oldroot
umount -l /.oldroot
mount --make-rshared /
echo ready
exec sleep 900
"""


def _mnt_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _root_id(pid: int | str) -> tuple[int, int] | None:
    """(device, inode) of the root directory of process `pid`."""
    try:
        st = os.stat(f"/proc/{pid}/root")
    except OSError:
        return None
    return st.st_dev, st.st_ino


class PodmanRoot:
    """podman in `root`, in the network namespace `netns` (a name under /run/netns)."""

    def __init__(self, root: Path, netns: str, workdir: Path) -> None:
        self.root = root
        self.netns = netns
        self.work = workdir
        self.keeper: subprocess.Popen[str] | None = None
        self.mnt_ns: str | None = None
        self.root_id: tuple[int, int] | None = None

    def __enter__(self) -> PodmanRoot:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def upper(self) -> Path:
        """Where the test's writes to the root land (paths as seen inside the root)."""
        return self.work / "upper"

    def start(self, timeout: float = 30) -> None:
        import vhostpasst

        # the top-level packages beside vhostpasst (tests/ has a `virtio` of its own)
        lib = Path(vhostpasst.__file__).parent.parent
        if not (lib / "virtio" / "__init__.py").exists():
            raise RuntimeError(f"no virtio package beside vhostpasst in {lib}")
        for d in ("upper", "work", "merged"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        self.keeper_log = self.work / "keeper.log"
        with open(self.keeper_log, "w") as log:
            self.keeper = subprocess.Popen(
                ["unshare", "--mount", "nsenter", f"--net=/run/netns/{self.netns}",
                 "sh", "-c", KEEPER, "keeper", str(self.work / "merged"), str(self.root),
                 str(self.work), str(lib), str(UID)],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, text=True)
        assert self.keeper.stdout is not None
        line = _readline(self.keeper, timeout)
        if line.strip() != "ready":
            raise RuntimeError(f"the root's keeper failed:\n{self.keeper_log.read_text()}")
        self.mnt_ns = _mnt_ns(self.keeper.pid)
        self.root_id = _root_id(self.keeper.pid)

    def command(self, *cmd: str, user: bool = True) -> list[str]:
        """argv that runs `cmd` in the root (as the podman user unless user=False)."""
        assert self.keeper is not None
        who = (["/usr/bin/setpriv", f"--reuid={UID}", f"--regid={UID}", "--init-groups"]
               if user else [])
        return ["nsenter", "-t", str(self.keeper.pid), "-m", "-n", "-r", "-w",
                *who, *ENV, "sh", "-c", 'cd "$HOME" && exec "$@"', "sh", *cmd]

    def run(self, *cmd: str, timeout: float = 60, user: bool = True,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.command(*cmd, user=user), capture_output=True, text=True,
                              timeout=timeout, input=input)

    def popen(self, *cmd: str, **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.command(*cmd), **kw)  # type: ignore[call-overload]

    def processes(self) -> list[int]:
        """Pids of every process in the root: in its mount namespace (the keeper included) or
        in one cloned from it (rootless podman's, pasta's), which has the same root."""
        if self.mnt_ns is None or self.root_id is None:
            return []
        pids = {int(p) for p in os.listdir("/proc")
                if p.isdigit() and (_mnt_ns(p) == self.mnt_ns or _root_id(p) == self.root_id)}
        # and what runs in their user namespace (rootless podman's, not ours): a sandboxed
        # pasta (as passt's) has a mount namespace and an empty root of its own, and once in
        # the background it is nobody's child
        own = os.readlink("/proc/self/ns/user")
        userns = set()
        for p in pids:
            with contextlib.suppress(OSError):
                userns.add(os.readlink(f"/proc/{p}/ns/user"))
        userns.discard(own)
        for p in os.listdir("/proc"):
            if p.isdigit() and int(p) not in pids:
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{p}/ns/user") in userns:
                        pids.add(int(p))
        return sorted(pids)

    def _kill(self, pids: list[int]) -> None:
        """SIGKILL those of `pids` still in the root. Through pidfds opened before checking
        again: with pid_max at 32768 and the other xdist worker forking, a pid that exited
        after processes() may already name another test's process."""
        fds = {}
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                fds[pid] = os.pidfd_open(pid)
        try:
            still = set(self.processes())
            for pid, fd in fds.items():
                if pid in still:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            for fd in fds.values():
                os.close(fd)

    def stop(self, timeout: float = 10) -> None:
        if self.keeper is None:
            return
        if self.keeper.poll() is None:
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                self.run("podman", "rm", "--all", "--force", "--time", "0", timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            pids = self.processes()
            if not pids or time.monotonic() > deadline:
                break
            self._kill(pids)
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.keeper.wait(5)
        self.keeper = None


def _readline(proc: subprocess.Popen[str], timeout: float) -> str:
    """One line of proc's stdout within `timeout` seconds ('' if none)."""
    import selectors

    assert proc.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(timeout):
            return ""
    return proc.stdout.readline()


def podman_root_or_reason() -> tuple[Path | None, str]:
    """(root, "") or (None, why not): for tests to skip on."""
    if os.geteuid() != 0:
        return None, "needs root (debootstrap, namespaces)"
    for tool in ("unshare", "nsenter", "chroot"):
        if shutil.which(tool) is None:
            return None, f"needs {tool}"
    try:
        return ensure_root(), ""
    except Unavailable as e:
        return None, str(e)


def argv_of(pid: int) -> Sequence[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").decode().split("\0")
    except OSError:
        return ()


def comm_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def iter_named(pids: Sequence[int], name: str) -> Iterator[int]:
    return (pid for pid in pids if comm_of(pid) == name)
