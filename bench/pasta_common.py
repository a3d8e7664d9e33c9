"""What bench/pasta_tcp.py and bench/pasta_rr.py share: a sandbox with a namespace from
`ip netns add`, one tool (vhostpasta, Debian's pasta or slirp4netns) attached to it from the
host namespace, and readiness.

Readiness: vhostpasta and pasta are run with `-f -P FILE` and used as soon as FILE holds a
pid (vhostpasta writes it only once its -t/-T listeners are bound); slirp4netns once the
namespace has its default route. Every wait is bounded; the sandbox's teardown kills what
was started.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.netns

from tests.netns.sandbox import Sandbox, SandboxConfig  # noqa: E402

SLIRP_CIDR = "198.51.100.0/24"  # slirp4netns: gateway .2, namespace .100
HOST_ADDR = "192.0.2.2"  # the host namespace's own address (tests/netns/sandbox.py)
PORT_IN = 5202  # -t: host -> namespace
PORT_OUT = 5203  # -T: namespace -> host loopback
PORT_GW = 5201  # namespace -> gateway (mapped to the host's loopback), through the tap


def vhostpasta() -> list[str]:
    script = shutil.which("vhostpasta", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c",
                                    "import sys; from vhostpasst.main import main; "
                                    "sys.exit(main(prog='vhostpasta'))"]


def wait(pred, timeout: float, interval: float = 0.05) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(interval)
    return False


@dataclass
class Setup:
    box: Sandbox
    ns: str  # the namespace's name (ip netns)
    gw: str  # the gateway address as the namespace sees it
    proc: subprocess.Popen[bytes]
    ready_s: float  # from start to ready

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


class SetupError(Exception):
    pass


def start(tool: str, mtu: int = 65520, hostfwd: bool = False) -> Setup:
    """A fresh sandbox and `tool` serving a new namespace. The caller tears down setup.box
    (also on SetupError, through the box attribute of the exception's context: see run())."""
    box = Sandbox(SandboxConfig()).setup()
    try:
        return _start(box, tool, mtu, hostfwd)
    except BaseException:
        box.teardown()
        raise


def _start(box: Sandbox, tool: str, mtu: int, hostfwd: bool) -> Setup:
    name = f"{box.host_ns}-b"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    box._made.append(name)
    os.chmod(box.dir, 0o777)  # tools that switch to nobody write here
    nspath = f"/run/netns/{name}"
    pid_file = box.dir / "tool.pid"
    if tool == "slirp4netns":
        api = str(box.dir / "slirp.sock")
        cmd = ["slirp4netns", "--configure", f"--mtu={mtu}", f"--cidr={SLIRP_CIDR}",
               f"--api-socket={api}", "--netns-type=path", nspath, "tap0"]
        gw = "198.51.100.2"
    else:
        # Debian's pasta as root switches to nobody first, who cannot enter a root-owned
        # netns: --runas 0. vhostpasta switches after joining it: no option needed.
        cmd = vhostpasta() if tool == "vhostpasta" else [tool, "--runas", "0"]
        cmd = [*cmd, "-f", "--config-net", "-m", str(mtu), "-t", str(PORT_IN), "-T",
               str(PORT_OUT), "-u", "none", "-U", "none", "-P", str(pid_file), "--netns", nspath]
        gw = "192.0.2.1"
    err = open(box.dir / "tool.stderr", "wb")
    t0 = time.monotonic()
    proc = box.popen_in(box.host_ns, *cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    if tool == "slirp4netns":
        ok = wait(lambda: box.run_in(name, "ip", "-4", "route", "show", "default",
                                     timeout=5).stdout.strip() != "", 15)
    else:
        ok = wait(lambda: pid_file.exists() and pid_file.read_text().strip() != "", 15,
                  interval=0.005)
    ready_s = time.monotonic() - t0
    if not ok:
        raise SetupError("not ready: " + (box.dir / "tool.stderr").read_text()[-300:])
    if tool == "slirp4netns" and hostfwd:
        req = {"execute": "add_hostfwd", "arguments": {
            "proto": "tcp", "host_addr": "127.0.0.1", "host_port": PORT_IN,
            "guest_port": PORT_IN}}
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(api)
            s.sendall(json.dumps(req).encode())
            s.recv(4096)
    return Setup(box, name, gw, proc, ready_s)


def endpoints(setup: Setup, tool: str, path: str) -> tuple[str, str, int, str, str]:
    """(server namespace, server address, port, client namespace, client destination)."""
    box = setup.box
    if path == "tap ns->host":
        return box.host_ns, "127.0.0.1", PORT_GW, setup.ns, setup.gw
    if path == "splice ns->host":
        return box.host_ns, "127.0.0.1", PORT_OUT, setup.ns, "127.0.0.1"
    # host -> namespace: from the host's own address (not loopback) the tap path in
    # vhostpasta and pasta; slirp4netns has only its hostfwd on 127.0.0.1
    splice = path.startswith("splice")
    dst = "127.0.0.1" if splice or tool == "slirp4netns" else HOST_ADDR
    return setup.ns, "0.0.0.0", PORT_IN, box.host_ns, dst
