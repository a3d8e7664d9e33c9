"""vhostpasst-repair: the privileged helper that sets and clears TCP_REPAIR on the sockets a
vhostpasst (or passt) daemon hands it during a live migration.

    vhostpasst-repair PATH

PATH is the daemon's repair socket (`--repair-path`, by default the vhost-user socket's path
with ".repair" appended), or a directory: then the helper waits there for the first "*.repair"
socket created after it started (as KubeVirt runs passt-repair) and connects to it once it
listens. The protocol is passt-repair's (vhostpasst/system/repair.py), so this helper serves
passt too and passt-repair serves vhostpasst. It needs CAP_NET_ADMIN (TCP_REPAIR) and nothing
else; as passt-repair, it makes itself non-dumpable (no ptrace, no core with the sockets it
holds) and sets no-new-privileges first. Exit status: 0 when the daemon closes the
connection, 1 on error, 2 on usage error.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import time

from vhostpasst.system import isolation, netns
from vhostpasst.system.repair import SUFFIX, HelperError, serve_one

IN_CREATE = 0x00000100
CONNECT_RETRY = 0.01  # seconds between attempts while a new socket is not listening yet
USAGE = "Usage: vhostpasst-repair PATH\n"


def _wait_for_socket(directory: str) -> str:
    """The path of the first "*.repair" entry created in `directory` from now on."""
    fd = netns.inotify_init(netns.IN_CLOEXEC)  # blocking: nothing else to do meanwhile
    try:
        netns.inotify_add_watch(fd, directory, IN_CREATE)
        while True:
            for _, name in netns.inotify_events(os.read(fd, 4096)):
                if name.endswith(SUFFIX):
                    return os.path.join(directory, name)
    finally:
        os.close(fd)


def _fail(message: str, status: int = 1) -> int:
    sys.stderr.write(f"vhostpasst-repair: {message}\n")
    return status


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args in (["-h"], ["--help"]):
        sys.stdout.write(USAGE)
        return 0
    if len(args) != 1:
        sys.stderr.write(USAGE)
        return 2
    path = args[0]
    try:
        isolation.set_dumpable(False)
        isolation.set_no_new_privs()
        waiting = stat.S_ISDIR(os.stat(path).st_mode)
        if waiting:
            path = _wait_for_socket(path)
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return _fail(f"{path} is not a socket", 2)
    except OSError as e:
        return _fail(f"{path}: {e.strerror}")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        while True:
            try:
                sock.connect(path)
                break
            except ConnectionRefusedError:
                if not waiting:  # a new socket is bound before it listens
                    return _fail(f"cannot connect to {path}: connection refused")
                time.sleep(CONNECT_RETRY)
            except OSError as e:
                return _fail(f"cannot connect to {path}: {e.strerror}")
        try:
            while serve_one(sock):
                pass
        except HelperError as e:
            return _fail(str(e))
        except OSError as e:
            return _fail(f"the daemon's socket: {e.strerror}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
