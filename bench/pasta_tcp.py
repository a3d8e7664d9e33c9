#!/usr/bin/env python3
"""pasta-mode TCP throughput: vhostpasta side by side with Debian's pasta and slirp4netns.

    python bench/pasta_tcp.py [--size MIB] [--mtu 65520 --mtu 1500] [--tool vhostpasta ...]

Each run builds a fresh sandbox (tests/sandbox.py: world and host namespaces, documentation
addresses only) and a network namespace made with `ip netns add`; the tool runs in the host
namespace attached to it. Paths:
  tap ns->host    namespace client -> gateway:5201 (mapped to the host's loopback) -> sink
  tap host->ns    host client -> 192.0.2.2:5202 (the host's own address, so not spliced;
                  slirp4netns: 127.0.0.1:5202, a hostfwd added through its API socket)
                  -> source in the namespace
  splice ns->host namespace client -> 127.0.0.1:5203 (-T) -> sink on the host's loopback
  splice host->ns host client -> 127.0.0.1:5202 (-t, splice) -> source in the namespace
Reported: MB/s of the transfer (byte count / sha256 checked by tests/tcp_tool.py).
Every wait is bounded; everything started is killed with the sandbox.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from sandbox import Sandbox, SandboxConfig  # noqa: E402

TOOL = str(ROOT / "tests" / "tcp_tool.py")
MIB = 1 << 20
SLIRP_CIDR = "198.51.100.0/24"  # slirp4netns: gateway .2, namespace .100
PATHS = ("tap ns->host", "tap host->ns", "splice ns->host", "splice host->ns")


def vhostpasta() -> list[str]:
    script = shutil.which("vhostpasta", path=str(Path(sys.executable).parent))
    return [script] if script else [sys.executable, "-c",
                                    "import sys; from vhostpasst.cli import main; "
                                    "sys.exit(main(prog='vhostpasta'))"]


def _wait(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _listening(box: Sandbox, ns: str, port: int) -> bool:
    r = box.run_in(ns, "ss", "-Htln", f"sport = :{port}", timeout=5)
    return bool(r.stdout.strip())


def run_one(tool: str, mtu: int, path: str, size: int) -> dict:
    box = Sandbox(SandboxConfig()).setup()
    name = f"{box.host_ns}-b"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
        box._made.append(name)
        os.chmod(box.dir, 0o777)  # tools that switch to nobody write here
        nspath = f"/run/netns/{name}"
        splice = path.startswith("splice")
        if tool == "slirp4netns":
            if splice:
                return {"skip": "no splice path"}
            api = str(box.dir / "slirp.sock")
            cmd = ["slirp4netns", "--configure", f"--mtu={mtu}", f"--cidr={SLIRP_CIDR}",
                   f"--api-socket={api}", "--netns-type=path", nspath, "tap0"]
            gw = "198.51.100.2"
        else:
            # Debian's pasta as root switches to nobody, who cannot enter a root-owned netns
            cmd = vhostpasta() if tool == "vhostpasta" else [tool, "--runas", "0"]
            cmd = [*cmd, "-f", "--config-net", "-m", str(mtu), "-t", "5202", "-T", "5203",
                   "-u", "none", "-U", "none", "--netns", nspath]
            gw = "192.0.2.1"
        err = open(box.dir / "tool.stderr", "wb")
        proc = box.popen_in(box.host_ns, *cmd, stdin=subprocess.DEVNULL, stdout=err,
                            stderr=err)
        if not _wait(lambda: box.run_in(name, "ip", "-4", "route", "show", "default",
                                        timeout=5).stdout.strip() != "", 15):
            return {"error": "namespace not configured: "
                    + (box.dir / "tool.stderr").read_text()[-300:]}
        # the route shows up before the -t listeners are bound: wait for those too
        if tool != "slirp4netns" and not _wait(lambda: _listening(box, box.host_ns, 5202), 10):
            return {"error": "-t port not listening"}
        if tool == "slirp4netns" and path == "tap host->ns":
            req = {"execute": "add_hostfwd", "arguments": {
                "proto": "tcp", "host_addr": "127.0.0.1", "host_port": 5202,
                "guest_port": 5202}}
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(5)
                s.connect(api)
                s.sendall(json.dumps(req).encode())
                s.recv(4096)
        ready = box.dir / "srv"
        if path.endswith("ns->host"):
            port = 5201 if path.startswith("tap") else 5203
            srv_ns, srv = box.host_ns, ["serve", "127.0.0.1", str(port), "sink", str(ready)]
            cli_ns = name
            dst = gw if path.startswith("tap") else "127.0.0.1"
            cli = ["connect", dst, str(port), "send", str(size)]
        else:
            srv_ns, srv = name, ["serve", "0.0.0.0", "5202", "source", str(ready), str(size)]
            # from the host's own address (not loopback): the tap path, in every tool
            src = "127.0.0.1" if splice or tool == "slirp4netns" else "192.0.2.2"
            cli_ns, cli = box.host_ns, ["connect", src, "5202", "recv"]
        box.popen_in(srv_ns, sys.executable, TOOL, *srv, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        if not _wait(ready.exists, 10):
            return {"error": "server did not start"}
        time.sleep(0.3)
        r = box.run_in(cli_ns, sys.executable, TOOL, *cli, timeout=300)
        if r.returncode != 0:
            return {"error": (r.stderr or r.stdout)[-300:]}
        rep = json.loads(r.stdout)
        ok = (rep.get("answer", [None])[0] == str(size)) if "send" in cli \
            else rep.get("bytes") == size
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
        return {"MB/s": round(size / rep["seconds"] / 1e6, 1), "ok": ok}
    finally:
        box.teardown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=200, help="MiB per transfer")
    ap.add_argument("--mtu", type=int, action="append", help="namespace MTU (repeatable)")
    ap.add_argument("--tool", action="append",
                    help="vhostpasta, pasta (a path) or slirp4netns (default: all found)")
    args = ap.parse_args()
    tools = args.tool or ["vhostpasta"] + [t for t in ("pasta", "slirp4netns")
                                           if shutil.which(t)]
    rows = []
    for mtu in args.mtu or [65520, 1500]:
        for path in PATHS:
            if path.startswith("splice") and mtu != (args.mtu or [65520])[0]:
                continue  # the splice path does not see the MTU
            for tool in tools:
                res = run_one(tool, mtu, path, args.size * MIB)
                row = {"tool": tool, "mtu": mtu, "path": path, **res}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| path | MTU | " + " | ".join(tools) + " |")
    print("|---|---|" + "---|" * len(tools))
    for mtu in args.mtu or [65520, 1500]:
        for path in PATHS:
            cells = []
            for tool in tools:
                row = next((r for r in rows if r["tool"] == tool and r["mtu"] == mtu
                            and r["path"] == path), None)
                if row is None:
                    continue
                cells.append(str(row.get("MB/s", row.get("skip", row.get("error", "?"))))
                             [:40])
            if cells:
                print(f"| {path} | {mtu} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
