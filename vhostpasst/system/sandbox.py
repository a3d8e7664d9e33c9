"""The sandbox, as passt's isolation.c does it (reference 7), in two steps around the fork.

`prefork()`, once every socket, tap, pid/pcap/log/trace file is open and before the loop runs:
1. import everything the daemon will ever import (the files are gone afterwards) and put a
   guard on the import system that reports any import after this point ("late import");
2. passt mode: a user namespace of its own (after becoming nobody, isolation.py); pasta stays
   in the user namespace it runs in (it needs CAP_SYS_ADMIN there for nothing more once its
   helper thread is in the target namespace, but a new user namespace would cut it off);
3. new mount, IPC and UTS namespaces (and PID for a passt that forks to the background: the
   daemon is PID 1 of its own namespace), `/` made private, an empty read-only tmpfs mounted
   and `pivot_root()`ed into, the old root detached: no file of the host can be opened. Every
   helper thread joins the new mount namespace (unshare(CLONE_FS) + setns) so that no thread
   keeps the host's root. With --chroot-fallback a failure here chroot()s into an empty
   directory instead of ending the start (as passt 2026-07);
4. passt mode: every capability gone from every set, bounding set included.
`postfork()`: not dumpable, no new privileges, and the seccomp allow-list of the mode
(syscalls.py) loaded for every thread (TSYNC).

VHOSTPASST_SANDBOX=off skips all of it (debugging; logged as a warning), =noseccomp skips only
the filter (how the allow-lists are measured, doc/sandbox.md). VHOSTPASST_SANDBOX_PROBE=1
(read at start-up only, never from a guest) makes the daemon try, once sandboxed, to open a
host file and to make a syscall outside the list, and log both results: tests read them.
"""

from __future__ import annotations

import ctypes
import errno
import importlib
import logging
import os
import pkgutil
import platform
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from vhostpasst.system import isolation, netns, syscalls

log = logging.getLogger("vhostpasst")

ENV_SANDBOX = "VHOSTPASST_SANDBOX"  # "off": no sandbox; "noseccomp": no filter
ENV_PROBE = "VHOSTPASST_SANDBOX_PROBE"
ENV_MARK = "VHOSTPASST_SANDBOX_MARK"  # measurement: write(-1, "vhostpasst-sandboxed MODE")
ENV_STRACE = "VHOSTPASST_SANDBOX_STRACE"  # measurement: strace -f ourselves into PREFIX.PID
LATE_IMPORT = "late import of"  # the guard's message (tests look for it)
PROBE_FILE = "/etc/passwd"
PROBE_MODULE = "vhostpasst_sandbox_probe_late_import"

MS_RDONLY = 0x1
MNT_DETACH = 0x2
UMOUNT_NOFOLLOW = 0x8
CAP_SETPCAP = 8
CAP_SYS_CHROOT = 18
NEWROOT = "/tmp"  # as passt: the empty tmpfs goes over /tmp in our mount namespace

ThreadRunner = Callable[[Callable[[], None]], None]


class SandboxError(Exception):
    """The sandbox could not be set up: the daemon must not run (passt: "Failed to sandbox
    process, exiting")."""


def setting() -> str:
    value = os.environ.get(ENV_SANDBOX, "on").lower()
    return value if value in ("off", "noseccomp") else "on"


# -- imports --------------------------------------------------------------------------------

# standard library modules that code paths of ours, or of the standard library, import lazily
_STDLIB_LATE = (
    "encodings.idna", "encodings.ascii", "encodings.latin_1", "encodings.utf_8",
    "encodings.raw_unicode_escape", "encodings.unicode_escape", "stringprep", "unicodedata",
    "logging.handlers", "traceback", "linecache", "tokenize", "token", "ipaddress",
    "selectors", "queue", "struct", "copyreg", "weakref", "warnings", "_weakrefset",
)
_SKIP = ("vhostpasst.__main__",)
_VHOST_ONLY = ("virtio", "vhostpasst.link.vhost")  # imported by the vhost-user mode only


def preimport(vhost_user: bool = True) -> list[str]:
    """Import every module of vhostpasst (and virtio, for vhost-user) and the standard
    library modules above; warm what reads files on first use (time zone). Returns the
    modules that failed (an optional C module not built, say): logged, not fatal. The other
    modes never import the vhost-user modules (the late-import guard would say so); leaving
    them out keeps pasta's start-up short."""
    failed = []
    names = list(_STDLIB_LATE)
    for pkg_name in ("vhostpasst", "virtio") if vhost_user else ("vhostpasst",):
        try:
            pkg = importlib.import_module(pkg_name)
        except ImportError:
            failed.append(pkg_name)
            continue
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg_name + ".")
                  if m.name not in _SKIP
                  and (vhost_user or not m.name.startswith(_VHOST_ONLY))]
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - ImportError, or a module failing to initialise
            failed.append(f"{name} ({e})")
    time.tzset()
    time.localtime()  # glibc reads /etc/localtime on the first call
    for f in failed:
        log.debug("sandbox: could not import %s before the pivot", f)
    return failed


class _LateImportGuard:
    """First on sys.meta_path once the root is empty: an import that reaches the finders now
    (a module not imported before) would fail with the files gone; say so loudly."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> None:
        if name in sys.builtin_module_names:
            return None  # compiled into the interpreter (gc, ...): needs no file, works
        log.error("sandbox: %s %s (add it to vhostpasst/system/sandbox.py's preimport)",
                  LATE_IMPORT, name)
        return None

    def find_module(self, name: str, path: Any = None) -> None:  # the pre-3.4 protocol
        return None


def install_import_guard() -> None:
    if not any(isinstance(f, _LateImportGuard) for f in sys.meta_path):
        sys.meta_path.insert(0, _LateImportGuard())


# -- namespaces and the empty root ----------------------------------------------------------


def _lib() -> Any:
    try:
        from vhostpasst._seccomp import ffi, lib
    except ImportError as e:  # a source tree whose cffi modules were not built
        raise SandboxError(f"the seccomp module is missing ({e}): build the package "
                           f"(pip install .), or set {ENV_SANDBOX}=off") from None
    return ffi, lib


def _own_userns() -> None:
    """A user namespace of our own (passt mode), root in it mapped to who we are now."""
    uid, gid = os.geteuid(), os.getegid()
    isolation.set_dumpable(True)  # a uid change made /proc/self root's: the maps are ours again
    netns.unshare(netns.CLONE_NEWUSER)
    try:
        netns.write_id_maps(uid, gid)
    except OSError as e:  # passt only warns: root in it has every capability either way
        log.warning("sandbox: cannot configure user mappings: %s", e.strerror)


def _pivot(threads: Sequence[ThreadRunner], pid_ns: bool) -> None:
    flags = netns.CLONE_NEWNS | netns.CLONE_NEWIPC | netns.CLONE_NEWUTS
    if pid_ns:
        flags |= netns.CLONE_NEWPID
    netns.unshare(flags)
    mnt_fd = os.open("/proc/thread-self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    try:
        netns.mount(None, "/", None, netns.MS_REC | netns.MS_PRIVATE)
        netns.mount("tmpfs", NEWROOT, "tmpfs", MS_RDONLY | netns.MS_NODEV | netns.MS_NOEXEC
                    | netns.MS_NOSUID, "nr_inodes=2,nr_blocks=0")
        os.chdir(NEWROOT)
        netns.pivot_root(".", ".")
        netns.umount2(".", MNT_DETACH | UMOUNT_NOFOLLOW)
        os.chdir("/")
        for run in threads:
            run(lambda: _join_mount_ns(mnt_fd))
    finally:
        os.close(mnt_fd)


def _join_mount_ns(mnt_fd: int) -> None:
    """In a helper thread: its own fs_struct, then the sandbox's mount namespace (setns sets
    root and working directory to that namespace's root: the empty tmpfs)."""
    netns.unshare(netns.CLONE_FS)
    netns.setns(mnt_fd, netns.CLONE_NEWNS)
    os.chdir("/")


def _chroot_empty(threads: Sequence[ThreadRunner]) -> None:
    """--chroot-fallback: chroot() into a directory made empty and removed, so that nothing
    can ever be created in it. Helper threads share our fs_struct unless they unshared it."""
    import tempfile

    path = tempfile.mkdtemp(prefix="vhostpasst-empty-")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.rmdir(path)
        os.fchdir(fd)
        os.chroot(".")
        os.chdir("/")

        def follow() -> None:
            os.fchdir(fd)
            os.chroot(".")
            os.chdir("/")

        for run in threads:
            run(follow)
    finally:
        os.close(fd)


def drop_all_caps(threads: Iterable[ThreadRunner] = ()) -> None:
    """passt mode: no capability in any set, the bounding set included (the new user
    namespace gave them all back)."""
    def drop_here() -> None:
        isolation.prepare_thread((), False)
        isolation.finish_thread(())

    drop_here()
    for run in threads:
        run(drop_here)


@dataclass
class Sandbox:
    """One daemon's sandbox: `mode` is "stream", "vhost-user" or "pasta"."""

    mode: str
    chroot_fallback: bool = False
    state: str = "none"  # pivot_root, chroot, off
    probe: bool = field(default_factory=lambda: os.environ.get(ENV_PROBE) == "1")
    mark: bool = field(default_factory=lambda: os.environ.get(ENV_MARK) == "1")
    devnull: int = -1
    prepared: bool = False

    def __post_init__(self) -> None:
        self.setting = setting()
        # whatever runs after the pivot and needs /dev/null (daemonizing) takes this one
        self.devnull = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self.setting != "off"

    @property
    def keep_until_sandboxed(self) -> tuple[int, ...]:
        """passt mode: what the chroot fallback needs if no user namespace can be made (and
        CAP_SETPCAP to clear those from the bounding set); dropped at the end of prefork()."""
        return (CAP_SYS_CHROOT, CAP_SETPCAP) if self.enabled and self.chroot_fallback else ()

    def prepare(self) -> None:
        """The imports, while we may still read every file: before giving up root too (the
        interpreter itself may live where only root can read, e.g. under /root)."""
        if self.enabled and not self.prepared:
            preimport(vhost_user=self.mode == "vhost-user")
            _lib()  # the seccomp module, before its file goes
            self.prepared = True
            prefix = os.environ.get(ENV_STRACE)
            if prefix:
                _strace_self(prefix)

    def prefork(self, own_userns: bool, pid_ns: bool = False,
                threads: Sequence[ThreadRunner] = ()) -> None:
        """Steps 1-4 of the module's docstring; raises SandboxError."""
        if not self.enabled:
            log.warning("sandbox disabled (%s=off): the daemon keeps its view of the host",
                        ENV_SANDBOX)
            self.state = "off"
            return
        self.prepare()
        try:
            if own_userns:
                if threading.active_count() > 1 or len(os.listdir("/proc/self/task")) > 1:
                    raise OSError(errno.EINVAL, "more than one thread: no user namespace")
                _own_userns()
            _pivot(threads, pid_ns)
            self.state = "pivot_root"
        except OSError as e:
            if not self.chroot_fallback:
                raise SandboxError(f"cannot sandbox the process: {e}") from None
            log.warning("sandbox: %s: falling back to chroot() (--chroot-fallback)", e)
            try:
                _chroot_empty(threads)
            except OSError as e2:
                raise SandboxError(f"cannot chroot() either: {e2}") from None
            self.state = "chroot"
        install_import_guard()
        if own_userns:
            try:
                drop_all_caps(threads)
            except OSError as e:
                raise SandboxError(f"cannot drop capabilities: {e}") from None
        log.debug("sandbox: empty root (%s)", self.state)

    def postfork(self, threads: Sequence[ThreadRunner] = ()) -> None:
        """Not dumpable, no new privileges, the seccomp filter (all threads)."""
        if not self.enabled:
            return
        try:
            isolation.set_dumpable(False)
            isolation.set_no_new_privs()
        except OSError as e:
            raise SandboxError(str(e)) from None
        if self.setting == "on":
            load_filter(self.mode)
        if self.probe:
            self.run_probe()
        if self.mark:  # measurement (doc/sandbox.md): strace shows where the filter starts
            # (after loading it and after the probe: neither is the daemon's own work)
            marker = f"vhostpasst-sandboxed {self.mode}".encode()
            for run in threads:
                run(lambda: _mark(marker))
            _mark(marker)

    def run_probe(self) -> None:
        """Test-only (VHOSTPASST_SANDBOX_PROBE=1, read at start-up): logs what a compromised
        daemon would get."""
        try:
            os.close(os.open(PROBE_FILE, os.O_RDONLY))
            opened = "ok"
        except OSError as e:
            opened = errno.errorcode.get(e.errno or 0, str(e.errno))
        ret = isolation._libc.personality(0xFFFFFFFF)  # harmless query, not on any list
        call = "ok" if ret >= 0 else errno.errorcode.get(ctypes.get_errno(), "?")
        try:  # socket() is listed, but for AF_INET and AF_INET6 only
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()
            netlink = "ok"
        except OSError as e:
            netlink = errno.errorcode.get(e.errno or 0, str(e.errno))
        log.warning("sandbox probe: open %s: %s; personality: %s; netlink socket: %s",
                    PROBE_FILE, opened, call, netlink)
        try:  # the guard must report this one (tests ignore this name, and only this one)
            importlib.import_module(PROBE_MODULE)
        except ImportError:
            pass


def _strace_self(prefix: str) -> None:
    """Measurement only (doc/sandbox.md): an strace of this process and its threads and
    children, started before anything of the host is gone; wait (bounded) until attached."""
    import subprocess

    pid = os.getpid()
    subprocess.Popen(["strace", "-f", "-qq", "-o", f"{prefix}.{pid}", "-p", str(pid)],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL, start_new_session=True)
    for _ in range(500):
        with open(f"/proc/{pid}/status") as f:
            if any(line.startswith("TracerPid:") and line.split()[1] != "0" for line in f):
                return
        time.sleep(0.01)
    log.warning("sandbox: strace did not attach")


def _mark(marker: bytes) -> None:
    try:
        os.write(-1, marker)
    except OSError:
        pass


def load_filter(mode: str) -> None:
    """The allow-list of `mode`; a call outside it fails with EPERM (ENOSYS for the calls
    whose absence libc and the interpreter handle by falling back, syscalls.ENOSYS)."""
    if platform.machine() != "x86_64":
        log.warning("sandbox: no seccomp filter on %s (the lists are measured on x86_64)",
                    platform.machine())
        return
    ffi, lib = _lib()
    allowed = syscalls.allowed(mode)
    ctx = lib.vp_seccomp_init(lib.vp_act_errno(errno.EPERM))
    if ctx == ffi.NULL:
        raise SandboxError("seccomp_init failed")
    try:
        rc = lib.vp_seccomp_attr_set(ctx, lib.SCMP_FLTATR_CTL_TSYNC, 1)
        if rc < 0:
            raise SandboxError(f"seccomp TSYNC: {os.strerror(-rc)}")
        for name, action in [(n, lib.VP_ACT_ALLOW) for n in allowed] + [
                (n, lib.vp_act_errno(errno.ENOSYS)) for n in syscalls.enosys(mode)]:
            nr = lib.vp_seccomp_resolve(name.encode())
            if nr < 0:
                log.debug("sandbox: no syscall %s here", name)
                continue
            if name in syscalls.ARGS and action == lib.VP_ACT_ALLOW:
                arg, values = syscalls.ARGS[name]
                for value in values:
                    rc = lib.vp_seccomp_allow_arg(ctx, nr, action, arg, 0xFFFFFFFF, value)
                    if rc < 0:
                        break
            else:
                rc = lib.vp_seccomp_allow(ctx, nr, action)
            if rc < 0:
                raise SandboxError(f"seccomp rule for {name}: {os.strerror(-rc)}")
        rc = lib.vp_seccomp_load(ctx)
        if rc < 0:
            raise SandboxError(f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.vp_seccomp_release(ctx)
    log.debug("sandbox: seccomp filter for %s mode, %d system calls", mode, len(allowed))
