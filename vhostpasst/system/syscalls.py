"""The seccomp allow-lists (sandbox.py), one per mode, measured: doc/sandbox.md says how.

Names are x86_64 system calls as strace and libseccomp spell them. MEASURED_* are the calls
the daemon made once sandboxed, over the whole test suite (tests/ and qemu-tests/) under
strace (scripts/syscalls-seen.py prints them in this form). REASONED_* are the few added
without having been seen, each with its reason. A call outside the list of the mode fails with
EPERM; those in ENOSYS fail with ENOSYS instead, because glibc or the interpreter fall back to
an older call when a kernel lacks them.
"""

from __future__ import annotations

MEASURED_STREAM = (
    "accept4", "bind", "close", "connect", "epoll_ctl", "epoll_wait", "exit_group", "futex",
    "getpid", "getsockname", "getsockopt", "ioctl", "mmap", "munmap", "newfstatat", "poll",
    "recvfrom", "recvmmsg", "recvmsg", "rt_sigaction", "rt_sigreturn", "sendmmsg", "sendmsg",
    "sendto", "setsockopt", "shutdown", "socket", "write",
)
MEASURED_VHOST_USER = (
    "accept4", "bind", "close", "connect", "epoll_ctl", "epoll_wait", "exit_group", "fcntl",
    "futex", "getpeername", "getpid", "getsockname", "getsockopt", "ioctl", "mmap", "munmap",
    "newfstatat", "read", "recvfrom", "recvmmsg", "recvmsg", "rt_sigaction", "rt_sigreturn",
    "sendmmsg", "sendmsg", "sendto", "setsockopt", "shutdown", "socket", "write",
)
MEASURED_PASTA = (
    "accept4", "bind", "brk", "close", "connect", "dup2", "epoll_ctl", "epoll_wait", "exit",
    "exit_group", "fcntl", "futex", "getpid", "getsockname", "getsockopt", "ioctl", "listen",
    "lseek", "madvise", "munmap", "openat", "pipe2", "read", "readv", "recvfrom", "recvmmsg",
    "recvmsg", "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "sendmmsg", "sendmsg",
    "sendto", "setsockopt", "shutdown", "socket", "splice", "wait4", "write",
)

# measured the same way on this branch merged with main at 9516ac8, whose vhost-user
# back end checks and guards front ends' fds (virtio/guard.py, cffi_build/guard.c): eventfd2
# (our own eventfd, to recognise one), preadv2 (RWF_NOWAIT kick reads), timer_create and
# gettid (a watchdog timer signalling this thread), timer_settime (armed around a write);
# and newfstatat in pasta mode
MEASURED_MAIN_9516AC8_VHOST_USER = (
    "eventfd2", "gettid", "preadv2", "timer_create", "timer_settime",
)
MEASURED_MAIN_9516AC8_PASTA = ("newfstatat",)

# measured the same way in a stock Debian 13 root (scripts/check-stock-debian.sh trixie, then
# the namespace and qemu tests under strace there; doc/sandbox.md): its glibc (2.41) makes
# fstat(2) where Debian 12's (2.36) made newfstatat(fd, "", AT_EMPTY_PATH) for os.fstat(), as
# the vhost-user back end does on each eventfd a front end sends
MEASURED_DEBIAN13 = ("fstat",)

# every mode: the allocator (glibc's malloc grows, trims and moves the heap and large blocks
# with these, at moments the suite need not hit); the size-capped log file (pwrite at an
# offset, pread and ftruncate when it is cut: log.py); clock_gettime (the vDSO's fallback);
# rt_sigprocmask (the interpreter's signal handling)
REASONED_COMMON = (
    "brk", "mmap", "munmap", "mremap", "madvise", "mprotect",
    "pwrite64", "pread64", "ftruncate", "clock_gettime", "rt_sigprocmask",
)
# the control socket (-c) binds -t/-u listeners at run time, which passt and vhost-user modes
# otherwise only do before the sandbox (pasta mode measured listen through its port scanner)
REASONED_CONTROL = ("listen",)
REASONED_VHOST_USER: tuple[str, ...] = ()
# pasta: on exit, the spawned command's PID namespace is taken down (kill of its PID 1)
REASONED_PASTA = ("kill",)

# calls allowed with some values of one argument only: name -> (argument, allowed values);
# measured as well (doc/sandbox.md). ioctl: FIONBIO (Python's setblocking/settimeout),
# FIONREAD, and the send queue's lengths a migration moves (TIOCOUTQ alias SIOCOUTQ,
# SIOCOUTQNSD: proto/tcp/migrate.py); nothing else (the tap and netlink are set up
# before). socket: AF_INET and AF_INET6 only, so no netlink, packet or UNIX socket can be
# made once sandboxed.
FIONREAD = 0x541B
FIONBIO = 0x5421
TIOCOUTQ = 0x5411
SIOCOUTQNSD = 0x894B
AF_INET = 2
AF_INET6 = 10
ARGS: dict[str, tuple[int, tuple[int, ...]]] = {
    "ioctl": (1, (FIONBIO, FIONREAD, TIOCOUTQ, SIOCOUTQNSD)),
    "socket": (0, (AF_INET, AF_INET6)),
}

STREAM = MEASURED_STREAM + MEASURED_DEBIAN13 + REASONED_COMMON + REASONED_CONTROL
VHOST_USER = (MEASURED_VHOST_USER + MEASURED_MAIN_9516AC8_VHOST_USER + MEASURED_DEBIAN13
              + REASONED_COMMON + REASONED_CONTROL + REASONED_VHOST_USER)
PASTA = (MEASURED_PASTA + MEASURED_MAIN_9516AC8_PASTA + MEASURED_DEBIAN13 + REASONED_COMMON
         + REASONED_PASTA)

# newer calls with a fallback in glibc or CPython: "not implemented" makes them take it
ENOSYS = ("clone3", "faccessat2", "openat2", "statx", "close_range", "epoll_pwait2",
          "pidfd_send_signal", "rseq")

_BY_MODE = {"stream": STREAM, "vhost-user": VHOST_USER, "pasta": PASTA}


def allowed(mode: str) -> tuple[str, ...]:
    return tuple(sorted(set(_BY_MODE[mode])))


def enosys(mode: str) -> tuple[str, ...]:
    return tuple(sorted(set(ENOSYS) - set(_BY_MODE[mode])))
