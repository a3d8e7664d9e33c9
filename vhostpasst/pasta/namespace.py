"""pasta's namespace: the one it serves, created for a command (spawn mode) or joined.

Spawn mode (no PID, no --netns): a new user namespace for us (root inside mapped to our
uid/gid), then a child in new network, mount, IPC, UTS and PID namespaces that runs the command
(default: a login shell), held until session.py says go. As root about to become another user,
the child creates the user namespace as that user instead, its root mapped to them, as pasta's
is. Attach mode: the network namespace of a PID (and its user namespace unless --userns or
--netns-only) or of --netns PATH|NAME.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import sys
from dataclasses import dataclass

from vhostpasst.config.conf import Config
from vhostpasst.core import flow
from vhostpasst.core.process import TERMINATE_SIGNALS
from vhostpasst.system import isolation, netns

SPAWN_NS_FLAGS = (netns.CLONE_NEWNET | netns.CLONE_NEWNS | netns.CLONE_NEWIPC
                  | netns.CLONE_NEWUTS | netns.CLONE_NEWPID)
HOSTNAME_MAX = 64


class PastaError(Exception):
    """Start-up failed; the message says where."""


@dataclass
class Spawned:
    """The command's namespaces: `pid` is our child (the intermediate process that waits for
    the command and exits with its status), `init_pid` the command itself (PID 1 inside)."""

    pid: int
    init_pid: int
    go_fd: int  # writing a byte (or closing it) lets the command start


def _exec_command(command: tuple[str, ...]) -> None:
    if command:
        argv = list(command)
        path = argv[0]
    else:  # a login shell, named "-<path>" as login(1) would
        path = os.environ.get("SHELL") or "/bin/sh"
        argv = [f"-{path}"]
    flow.restore_fd_limit()  # ours was raised for our sockets, not the command's
    # Python ignores SIGPIPE (and we ignore SIGINT): exec keeps ignored signals ignored
    for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(path, argv)
    except OSError as e:
        print(f"pasta: cannot start {path}: {e.strerror}", file=sys.stderr)
    os._exit(1)


def _ns_init(command: tuple[str, ...], go_r: int) -> None:
    """PID 1 of the new PID namespace: a fresh /proc, ping sockets, hostname, then the
    command once pasta says go."""
    try:
        try:
            # do not let our /proc mount propagate back to the parent mount namespace
            netns.mount(None, "/", None, netns.MS_REC | netns.MS_PRIVATE)
            netns.mount("proc", "/proc", "proc",
                        netns.MS_NOSUID | netns.MS_NODEV | netns.MS_NOEXEC)
        except OSError as e:
            print(f"pasta: cannot mount /proc: {e.strerror}", file=sys.stderr)
        try:  # root inside may then use ICMP echo sockets (ping) without raw sockets
            with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
                f.write("0 0")
        except OSError:
            pass
        try:
            socket.sethostname(f"pasta-{socket.gethostname()}"[:HOSTNAME_MAX])
        except OSError:
            pass
        if os.read(go_r, 1) != b"g":  # pasta went away before the namespace was ready
            os._exit(1)
        os.close(go_r)
        _exec_command(command)
    finally:
        os._exit(1)


def _close_cloexec(keep: tuple[int, ...]) -> None:
    """Close what the command would not get anyway (close-on-exec): we outlive the fork and
    must not hold pasta's sockets open (a port the control socket stops forwarding would
    still accept connections that nobody serves). Inheritable fds stay for the command."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd in keep or fd < 3:
            continue
        try:
            if fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                os.close(fd)
        except OSError:
            pass  # the listing's own fd, gone by now


def _intermediate(command: tuple[str, ...], ready_w: int, go_r: int,
                  as_ids: isolation.Ids | None) -> None:
    """Our child: unshare the namespaces, fork PID 1 of the new PID namespace, tell the
    parent its pid, then wait for it and exit with its status. With `as_ids` (we are root),
    first become that user and create the user namespace too, mapping its root to them."""
    try:
        _close_cloexec((ready_w, go_r))
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command decides about ^C
        for sig in TERMINATE_SIGNALS:  # not our parent's handlers: a signal ends us
            signal.signal(sig, signal.SIG_DFL)
        try:
            if as_ids is not None:
                isolation.drop(as_ids, ())
                isolation.set_dumpable(True)  # so /proc/self/uid_map is ours to write
                netns.unshare(netns.CLONE_NEWUSER | SPAWN_NS_FLAGS)
                netns.write_id_maps(as_ids.uid, as_ids.gid)
            else:
                netns.unshare(SPAWN_NS_FLAGS)
        except OSError as e:
            os.write(ready_w, f"error {e.strerror}\n".encode())
            os._exit(1)
        pid = os.fork()
        if pid == 0:
            os.close(ready_w)
            _ns_init(command, go_r)
        os.close(go_r)
        os.write(ready_w, f"ok {pid}\n".encode())
        os.close(ready_w)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    finally:
        os._exit(1)


def spawn(command: tuple[str, ...], as_ids: isolation.Ids | None = None) -> Spawned:
    """Create the namespaces and the (held) command; must run single-threaded.

    Unprivileged (pasta's way), we enter a new user namespace first, as root in it, so we
    may setns() into the command's network namespace. As root about to become `as_ids`, the
    child creates the user namespace as that user instead and we stay in ours: as root now we
    may enter it, and as its owner's uid later we keep every capability in it."""
    if as_ids is None:
        uid, gid = os.geteuid(), os.getegid()
        try:
            netns.unshare(netns.CLONE_NEWUSER)
            netns.write_id_maps(uid, gid)
        except OSError as e:
            raise PastaError(f"cannot create a user namespace: {e.strerror}") from None
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        _intermediate(command, ready_w, go_r, as_ids)
    os.close(ready_w)
    os.close(go_r)
    with os.fdopen(ready_r, "rb") as f:
        words = f.readline().decode(errors="replace").split(None, 1)
    if len(words) != 2 or words[0] != "ok":
        os.close(go_w)
        os.waitpid(pid, 0)
        reason = words[1].strip() if len(words) == 2 else "child exited"
        raise PastaError(f"cannot create namespaces: {reason}")
    return Spawned(pid, int(words[1]), go_w)


@dataclass
class Target:
    netns_fd: int
    watch_path: str | None = None  # exit when this goes away
    spawned: Spawned | None = None


def open_target(config: Config, as_ids: isolation.Ids | None = None) -> Target:
    """The namespace we serve, created (spawn mode) or joined (attach mode)."""
    if config.target_pid is None and config.netns is None:
        spawned = spawn(config.command, as_ids)
        path = f"/proc/{spawned.pid}/ns/net"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            os.close(spawned.go_fd)
            raise PastaError(f"cannot open {path}: {e.strerror}") from None
        return Target(fd, None, spawned)
    userns: str | None
    if config.target_pid is not None:
        path = f"/proc/{config.target_pid}/ns/net"
        userns = config.userns or f"/proc/{config.target_pid}/ns/user"
    else:
        assert config.netns is not None
        path = netns.netns_path(config.netns)
        userns = config.userns
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PastaError(f"cannot open network namespace {path}: {e.strerror}") from None
    if userns and not config.netns_only:
        try:
            netns.join_userns(userns)
        except OSError as e:
            os.close(fd)
            raise PastaError(f"cannot join user namespace {userns}: {e.strerror}") from None
    return Target(fd, None if config.no_netns_quit else path)
