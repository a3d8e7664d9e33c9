"""Refusing to stay root, as passt and pasta do (reference 2.1 and 7).

Started as root in the initial user namespace, the daemon switches to `nobody` (or to the
`--runas` user) once everything that needs root is done: supplementary groups dropped, then
setgid, then setuid. Capabilities are then reduced: nothing for passt, CAP_NET_BIND_SERVICE
for pasta (low ports bound later in the namespace by automatic forwarding).

Capabilities, the bounding set and the keep-capabilities flag are per thread in Linux, while
glibc's setuid()/setgid()/setgroups() change every thread of the process. So a thread that
must keep a capability (pasta's namespace helper, netns.NsThread) sets its own flag and
capability sets, through `for_threads`; this module only knows the calling thread.
"""

from __future__ import annotations

import ctypes
import grp
import os
import pwd
from collections.abc import Callable, Iterable
from dataclasses import dataclass

NOBODY = 65534  # passt's fallback when there is no "nobody" entry (static builds)

CAP_NET_BIND_SERVICE = 10
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


class RunasError(ValueError):
    """--runas names no such user or group."""


def close_inherited_fds(keep: Iterable[int] = ()) -> None:
    """Close every descriptor above stderr but `keep` (--fd), as passt does first thing: a
    caller's leaked socket or pipe must not stay open, and reachable, for the daemon's
    lifetime (nor keep the caller's pipe readers from seeing EOF)."""
    start = 3
    for fd in sorted(k for k in set(keep) if k >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 20)  # os.closerange uses close_range(2) where it can


@dataclass(frozen=True)
class Ids:
    uid: int
    gid: int


def _check(ret: int, what: str) -> None:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def resolve_runas(spec: str) -> Ids:
    """UID[:GID] or LOGIN[:GROUP]; without a group, the user's primary group (or GID = UID
    for a number with no passwd entry, as passt does)."""
    user, sep, group = spec.partition(":")
    if user.isdigit():
        uid = int(user)
        try:
            default_gid = pwd.getpwuid(uid).pw_gid
        except KeyError:
            default_gid = uid
    else:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise RunasError(f"no such user '{user}'") from None
        uid, default_gid = pw.pw_uid, pw.pw_gid
    if not sep:
        gid = default_gid
    elif group.isdigit():
        gid = int(group)
    else:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise RunasError(f"no such group '{group}'") from None
    if uid > 0xFFFFFFFE or gid > 0xFFFFFFFE:
        raise RunasError(f"'{spec}' is out of range")
    return Ids(uid, gid)


def in_initial_userns() -> bool:
    try:
        with open("/proc/self/uid_map") as f:
            return f.read().split() == ["0", "0", "4294967295"]
    except OSError:
        return True


def target_ids(runas: str | None) -> Ids | None:
    """Who to become: the --runas user, `nobody` for root in the initial user namespace,
    or None (stay as we are)."""
    if runas:
        return resolve_runas(runas)
    if os.geteuid() != 0 or not in_initial_userns():
        return None
    try:
        pw = pwd.getpwnam("nobody")
        return Ids(pw.pw_uid, pw.pw_gid)
    except KeyError:
        return Ids(NOBODY, NOBODY)


def _map_id(path: str, kid: int) -> int | None:
    """The id that kernel id `kid` is in our user namespace (/proc/self/[ug]id_map)."""
    with open(path) as f:
        for line in f:
            inside, outside, count = (int(x) for x in line.split())
            if outside <= kid < outside + count:
                return inside + kid - outside
    return None


def map_ids(ids: Ids) -> Ids | None:
    """`ids` (initial user namespace ids) as seen from the user namespace we are in now
    (we may have joined one), or None if they are not mapped there."""
    uid = _map_id("/proc/self/uid_map", ids.uid)
    gid = _map_id("/proc/self/gid_map", ids.gid)
    return None if uid is None or gid is None else Ids(uid, gid)


def needs_switch(ids: Ids | None) -> bool:
    return ids is not None and (ids.uid, ids.gid) != (os.geteuid(), os.getegid())


def _last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError):
        return 40


def _capget() -> tuple[int, int]:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_libc.capget(ctypes.byref(hdr), data), "capget")
    return (data[0].effective | data[1].effective << 32,
            data[0].permitted | data[1].permitted << 32)


def _capset(keep: int) -> None:
    """This thread's effective and permitted sets to `keep` (masked by what it has);
    nothing inheritable."""
    _eff, perm = _capget()
    keep &= perm
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    for i in range(2):
        word = (keep >> (32 * i)) & 0xFFFFFFFF
        data[i].effective = data[i].permitted = word
        data[i].inheritable = 0
    _check(_libc.capset(ctypes.byref(hdr), data), "capset")


def prepare_thread(keep: Iterable[int], switching: bool) -> None:
    """Before the switch, in every thread: shrink the bounding set (while we still may) and,
    if some capability is to survive setuid(), ask the kernel to keep the sets."""
    keep = set(keep)
    for cap in range(_last_cap() + 1):
        if cap not in keep:
            # EINVAL for capabilities this kernel lacks, EPERM without CAP_SETPCAP: fine
            _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    if switching and keep:
        _check(_libc.prctl(PR_SET_KEEPCAPS, 1, 0, 0, 0), "prctl(PR_SET_KEEPCAPS)")


def finish_thread(keep: Iterable[int]) -> None:
    """After the switch, in every thread: only `keep` stays effective and permitted."""
    mask = 0
    for cap in keep:
        mask |= 1 << cap
    _capset(mask)
    _libc.prctl(PR_SET_KEEPCAPS, 0, 0, 0, 0)


def switch_ids(ids: Ids) -> None:
    """No supplementary groups, then the group, then the user (all threads: glibc)."""
    try:
        os.setgroups([])
    except PermissionError:
        pass  # not privileged: the switch below tells whether we may
    os.setgid(ids.gid)
    os.setuid(ids.uid)


def set_dumpable(on: bool) -> None:
    """A uid change makes the process non-dumpable, which leaves /proc/self owned by root:
    pasta's spawn mode must write its own uid_map afterwards."""
    _check(_libc.prctl(PR_SET_DUMPABLE, int(on), 0, 0, 0), "prctl(PR_SET_DUMPABLE)")


def set_no_new_privs() -> None:
    """No exec() can ever give this process (and its threads) more privileges."""
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


ThreadRunner = Callable[[Callable[[], None]], None]


def drop(ids: Ids | None, keep: Iterable[int], threads: Iterable[ThreadRunner] = ()) -> None:
    """Become `ids` (if that is a change) and keep only `keep` capabilities, in this thread
    and in each helper thread (`threads`: functions running a callable in that thread)."""
    keep = tuple(keep)
    threads = tuple(threads)
    switching = needs_switch(ids)
    prepare_thread(keep, switching)
    for run in threads:
        run(lambda: prepare_thread(keep, switching))
    if switching:
        assert ids is not None
        switch_ids(ids)
    finish_thread(keep)
    for run in threads:
        run(lambda: finish_thread(keep))


def status_ids(pid: int | str = "self") -> dict[str, str]:
    """Uid, Gid, Groups, CapEff, CapPrm and CapBnd lines of /proc/PID/status (for tests)."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups", "CapEff", "CapPrm", "CapBnd"):
                out[key] = value.strip()
    return out
