"""vhostpasta in the sandbox, for the tests of pasta mode (test_pasta, test_pasta_forward,
test_splice, test_isolation, test_daemon_sandbox): its command, run to completion or started in
the host namespace, the child it leaves in the background, commands in the namespace it serves,
and a namespace file made as podman makes one."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

from tests.netns.sandbox import Sandbox, _pid_alive, wait_until

# podman's exact argument list (reference callers.md 3.4), before --pid FILE --netns PATH
PODMAN_ARGS = ["--config-net", "--dns-forward", "169.254.1.1", "-t", "none", "-u", "none",
               "-T", "none", "-U", "none", "--no-map-gw", "--quiet", "--map-guest-addr",
               "169.254.1.2"]
# rootlesskit's (callers.md 3.5), its 10.0.2.x values replaced by 198.51.100.x
ROOTLESSKIT_ARGS = ["--stderr", "--ns-ifname=tap0", "--mtu=65520", "--config-net",
                    "--address=198.51.100.100", "--netmask=24", "--gateway=198.51.100.2",
                    "--dns-forward=198.51.100.3", "--tcp-ports=auto", "--udp-ports=auto"]


def pasta_command() -> list[str]:
    script = shutil.which("vhostpasta", path=str(Path(sys.executable).parent))
    if script:
        return [script]
    return [sys.executable, "-c",
            "import sys; from vhostpasst.main import main; sys.exit(main(prog='vhostpasta'))"]


def run_pasta(box: Sandbox, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """vhostpasta ARGS run to completion in the host namespace (spawn mode)."""
    return box.host(*pasta_command(), *args, timeout=timeout)


def start_pasta(box: Sandbox, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """vhostpasta ARGS started in the host namespace; stderr goes to a file in the box."""
    err = box.dir / f"pasta-{uuid.uuid4().hex[:6]}.stderr"
    with open(err, "wb") as f:
        p = box.popen_in(box.host_ns, *pasta_command(), *args, stdin=subprocess.DEVNULL,
                         stdout=f, stderr=f)
    return p, err


def in_netns(path: str, *cmd: str, timeout: float = 10) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nsenter", f"--net={path}", *cmd], capture_output=True, text=True,
                          timeout=timeout)


def wait_gone(pid: int, timeout: float) -> None:
    wait_until(lambda: not _pid_alive(pid), timeout, f"pid {pid} to exit")


def background_pid(box: Sandbox, parent: subprocess.Popen[bytes], pid_file: Path,
                   err: Path) -> int:
    """The pasta that forked to the background: the parent exits 0 once the namespace is
    configured, and the pid file names the child."""
    try:
        rc = parent.wait(30)
    except subprocess.TimeoutExpired:
        raise AssertionError("pasta's parent did not exit\n" + err.read_text()) from None
    assert rc == 0, err.read_text()
    pid = int(pid_file.read_text().split()[0])
    assert _pid_alive(pid), err.read_text()
    return pid


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _podman_netns(box: Sandbox) -> tuple[Path, subprocess.Popen[bytes]]:
    """A namespace file as podman makes one: /proc/PID/ns/net of a process in a new network
    namespace, bind-mounted onto a file under a runtime directory."""
    rundir = box.dir / "run" / "netns"
    rundir.mkdir(parents=True)
    path = rundir / f"netns-{uuid.uuid4()}"
    path.touch()
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net")
               != os.readlink("/proc/self/ns/net"), 5, "the holder's namespace")
    subprocess.run(["mount", "--bind", f"/proc/{holder.pid}/ns/net", str(path)], check=True,
                   timeout=10)
    holder.kill()  # the bind mount alone keeps the namespace, as with podman
    holder.wait(5)
    return path, holder


def _remove_netns_file(path: Path) -> None:
    subprocess.run(["umount", str(path)], capture_output=True, timeout=10)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
