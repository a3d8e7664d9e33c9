#!/usr/bin/env python3
"""Bulk TCP throughput through vhostpasst (and passt, if installed) in the test sandbox layout.

    python bench/tcp_throughput.py [--size MIB] [--mtu 65520 --mtu 1500] [--passt PATH]

For each daemon, MTU and direction, a fresh sandbox (tests/netns/sandbox.py: world, host and guest
network namespaces, documentation addresses only) is built; the guest (a namespace behind
tests/netns/relay.py, playing qemu on the stream socket) moves SIZE MiB to or from a server on the
host's loopback, reached through the gateway address (map-host-loopback), so the numbers
measure the daemon and not a veth. Reported: MB/s (wall clock of the transfer, sha256 checked)
and the daemon's CPU seconds per GiB (utime+stime from /proc/PID/stat).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.netns

import profiler  # noqa: E402

from tests.netns.sandbox import Sandbox, SandboxConfig  # noqa: E402

TOOL = str(ROOT / "tests" / "netns" / "tcp_tool.py")
GW4 = "192.0.2.1"
HOST4 = "192.0.2.2"
MIB = 1 << 20


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_guest(box: Sandbox, daemon: str, mtu: int, *args: str) -> None:
    """Start vhostpasst or passt (a path) with `args` in the host namespace, the relay, and
    configure the guest namespace (what DHCP would give it) at `mtu`."""
    if daemon == "vhostpasst":
        box.start_daemon(*args)
    else:  # passt speaks the same stream socket: start it the way start_daemon does
        # passt run as root switches to nobody: it must be able to create its socket
        os.chmod(box.dir, 0o777)
        cmd = [daemon, "-f", "-s", box.socket_path, *args]
        err = open(box.dir / "passt.stderr", "wb")
        box.daemon = box.popen_in(box.host_ns, *cmd, stdin=subprocess.DEVNULL,
                                  stdout=err, stderr=err)
        box.daemon_pid = box.daemon.pid
        deadline = time.monotonic() + 10
        while not os.path.exists(box.socket_path) and time.monotonic() < deadline:
            time.sleep(0.05)
    box.start_relay()
    box.guest("ip", "link", "set", "tap0", "mtu", str(mtu), check=True)
    box.guest("ip", "addr", "add", f"{HOST4}/24", "dev", "tap0", check=True)
    box.guest("ip", "route", "add", "default", "via", GW4, check=True)


def run_one(daemon: str, mtu: int, direction: str, size: int,
            profile: str | None = None) -> dict:
    box = Sandbox(SandboxConfig()).setup()
    try:
        start_guest(box, daemon, mtu)
        ready = box.dir / "srv"
        action = "sink" if direction == "guest->host" else "source"
        srv = [sys.executable, TOOL, "serve", "127.0.0.1", "5201", action, str(ready)]
        if action == "source":
            srv.append(str(size))
        box.popen_in(box.host_ns, *srv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        pid = box.daemon_pid
        assert pid is not None
        spy = None
        if profile and daemon == "vhostpasst":  # py-spy samples the daemon during the transfer
            out = f"{profile}-{mtu}-{direction.replace('->', '-to-')}.txt"
            spy = profiler.start(pid, out)
        cpu0 = cpu_seconds(pid)
        t0 = time.monotonic()
        cmd = [sys.executable, TOOL, "connect", GW4, "5201",
               *(["send", str(size)] if action == "sink" else ["recv"])]
        r = box.guest(*cmd, timeout=600)
        wall = time.monotonic() - t0
        cpu = cpu_seconds(pid) - cpu0
        if spy is not None:
            profiler.stop(spy)
        if r.returncode != 0:
            return {"error": r.stderr[-500:]}
        rep = json.loads(r.stdout)
        seconds = rep["seconds"]
        ok = (rep.get("answer", [None])[0] == str(size)) if action == "sink" \
            else rep.get("bytes") == size
        return {"MB/s": round(size / seconds / 1e6, 1), "seconds": round(seconds, 2),
                "cpu_s_per_GiB": round(cpu / (size / (1 << 30)), 2), "ok": ok,
                "wall": round(wall, 2)}
    finally:
        box.teardown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=200, help="MiB per transfer")
    ap.add_argument("--mtu", type=int, action="append", help="guest MTU (repeatable)")
    ap.add_argument("--passt", default=shutil.which("passt"), help="passt binary to compare")
    ap.add_argument("--no-passt", action="store_true")
    ap.add_argument("--profile", metavar="PREFIX",
                    help="py-spy the daemon: collapsed stacks in PREFIX-MTU-DIRECTION.txt")
    args = ap.parse_args()
    daemons = ["vhostpasst"]
    if args.passt and not args.no_passt:
        daemons.append(args.passt)
    rows = []
    for mtu in args.mtu or [65520, 1500]:
        for direction in ("guest->host", "host->guest"):
            for daemon in daemons:
                res = run_one(daemon, mtu, direction, args.size * MIB, args.profile)
                name = "vhostpasst" if daemon == "vhostpasst" else "passt"
                row = {"daemon": name, "mtu": mtu, "direction": direction, **res}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| MTU | direction | daemon | MB/s | CPU s/GiB | ratio (ours/passt) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        peer = [r for r in rows if r["mtu"] == row["mtu"] and r["direction"] ==
                row["direction"] and r["daemon"] != row["daemon"]]
        ratio = ""
        if row["daemon"] == "vhostpasst" and peer and "MB/s" in peer[0] and "MB/s" in row:
            ratio = f"{row['MB/s'] / peer[0]['MB/s']:.2f}"
        print(f"| {row['mtu']} | {row['direction']} | {row['daemon']} | {row.get('MB/s')} | "
              f"{row.get('cpu_s_per_GiB')} | {ratio} |")


if __name__ == "__main__":
    main()
