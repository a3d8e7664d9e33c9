#!/usr/bin/env python3
"""vhost-user vs the stream socket: throughput, request/response latency, daemon CPU per GiB.

    python bench/vhost_throughput.py qemu   [--seconds 5] [--mtu 65520 --mtu 1500] [--passt PATH]
    python bench/vhost_throughput.py bridge [--seconds 5] [--mtu 65520 --mtu 1500]

`qemu`: a real TCG guest (qemu-tests/harness.py, imported) per back end: vhostpasst
--vhost-user (-netdev vhost-user), vhostpasst on the stream socket (-netdev stream), Debian's
passt on the stream socket (its 2023 build has no --vhost-user) and, with `--passt PATH` naming
a newer build (`python bench/fetch_passt.py` fetches Debian 13's), that passt with
--vhost-user and on the stream socket too. In the guest: iperf3 to / from (-R) an
iperf3 server on the host's loopback through the gateway address, and a 1-byte TCP ping-pong
from the host to `nc -e cat` in the guest through a -t forward (mean round trip).

`bridge`: no qemu. The sandbox of tests/netns/sandbox.py, the guest a namespace whose tap is
attached by tests/netns/vhost_relay.py (vhost-user rings) or tests/netns/relay.py (stream
socket); host iperf3 and the same ping-pong (a Python echo server in the guest namespace).

TCG guests are slow and noisy: compare the back ends measured in the same run (the ratio
columns), not absolute figures. CPU is the daemon's on-CPU time (schedstat, all threads) over each
transfer, divided by the bytes iperf3 counted, and over the ping-pong, divided by its round
trips (warm-up included). Every step is bounded in time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GW4 = "192.0.2.1"
RR_PORT = 5300
RR_WARMUP = 20  # round trips RR_CLIENT makes before it times any
IPERF_PORT = 5201
GIB = 1 << 30

RR_CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
n, times = int(sys.argv[3]), []
for _ in range(20):  # warm-up (RR_WARMUP)
    s.sendall(b"x"); s.recv(1)
for _ in range(n):
    t = time.perf_counter(); s.sendall(b"x")
    if s.recv(1) != b"x":
        sys.exit("short")
    times.append(time.perf_counter() - t)
times.sort()
print(f"{sum(times) / n * 1e6:.0f} {times[n // 2] * 1e6:.0f}")
"""

RR_SERVER = r"""
import socket, sys
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("0.0.0.0", int(sys.argv[1]))); srv.listen(1)
open(sys.argv[2], "w").close()
srv.settimeout(60)
c, _ = srv.accept(); c.settimeout(60)
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while (d := c.recv(4096)):
    c.sendall(d)
"""


def cpu_seconds(pid: int) -> float:
    """The process's CPU time: every thread's on-CPU nanoseconds from schedstat (utime+stime
    from /proc/PID/stat count 10 ms ticks: 31 µs steps over 300 ping-pongs), the ticks
    where schedstat is missing."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        pass
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    backend: str
    mtu: int
    results: dict[str, float] = field(default_factory=dict)


def iperf_mbps(text: str) -> tuple[float, float]:
    """(Mbit/s, bytes) of iperf3's receiver summary line."""
    for line in text.splitlines():
        if "receiver" in line:
            m = re.search(r"([\d.]+) ([KMG])Bytes\s+([\d.]+) ([KMG])bits/sec", line)
            if m:
                unit = {"K": 1e3, "M": 1e6, "G": 1e9}
                bunit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
                return (float(m.group(3)) * unit[m.group(4)] / 1e6,
                        float(m.group(1)) * bunit[m.group(2)])
    raise RuntimeError(f"no iperf3 receiver line in:\n{text[-2000:]}")


def measure(row: Row, daemon_pid: int, run_iperf: Callable[[bool], str],
            run_rr: Callable[[], str], rr_count: int) -> None:
    for reverse, key in ((False, "g2h"), (True, "h2g")):
        c0 = cpu_seconds(daemon_pid)
        out = run_iperf(reverse)
        cpu = cpu_seconds(daemon_pid) - c0
        mbps, nbytes = iperf_mbps(out)
        row.results[f"{key}_mbps"] = mbps
        row.results[f"{key}_cpu_gib"] = cpu / (nbytes / GIB) if nbytes else float("nan")
    c0 = cpu_seconds(daemon_pid)
    mean, median = map(float, run_rr().split()[:2])
    row.results["rr_cpu_us"] = (cpu_seconds(daemon_pid) - c0) / (rr_count + RR_WARMUP) * 1e6
    row.results["rr_us"] = median
    row.results["rr_mean_us"] = mean
    print(f"  {row.backend} mtu {row.mtu}: {json.dumps(row.results)}", flush=True)


# --- qemu guests ------------------------------------------------------------------------------

def qemu_rows(args: argparse.Namespace) -> list[Row]:
    sys.path.insert(0, str(ROOT / "qemu-tests"))
    import harness  # the other engineer's harness, used as is
    from image import build_image

    image = build_image()
    backends: list[tuple[str, list[str], str]] = [
        ("vhostpasst vhost-user", ["vhostpasst"], "vhost-user"),
        ("vhostpasst stream", ["vhostpasst"], "stream"),
    ]
    if shutil.which("passt"):
        backends.append(("passt (Debian) stream", [shutil.which("passt") or "passt"], "stream"))
    if args.passt:
        backends.append((f"passt {args.passt} vhost-user", [args.passt], "vhost-user"))
        backends.append((f"passt {args.passt} stream", [args.passt], "stream"))
    rows = []
    for mtu in args.mtu:
        for name, cmd, kind in backends:
            row = Row(name, mtu)
            try:
                qemu_one(harness, image, row, cmd, kind, args)
            except Exception as e:  # one back end failing must not lose the others' figures
                print(f"  {name} mtu {mtu}: FAILED {str(e)[:1500]}", flush=True)
            rows.append(row)
    return rows


def qemu_one(harness, image, row: Row, cmd: list[str], kind: str,  # type: ignore[no-untyped-def]
             args: argparse.Namespace) -> None:
    workdir = harness.make_workdir()
    os.chmod(workdir, 0o777)  # passt run as root switches to nobody, then binds its socket
    netns = harness.HostNetns()
    daemon = guest = iperf = None
    old = harness.DAEMON
    try:
        harness.DAEMON = cmd  # read when Daemon() builds its command line
        daemon = harness.Daemon(workdir, netns, ("--mtu", str(row.mtu), "-t", str(RR_PORT)),
                                vhost_user=kind == "vhost-user")
        assert daemon.proc is not None
        net = harness.GuestNet(kind, daemon.socket)
        guest = harness.Guest(image, workdir, net, netns, mem="512M")
        harness.dhcp_lease(guest)
        secs = args.seconds

        def run_iperf(reverse: bool) -> str:
            nonlocal iperf
            iperf = subprocess.Popen(netns.argv(["iperf3", "-s", "-1", "-B", "127.0.0.1",
                                                 "-p", str(IPERF_PORT)]),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(netns.argv, IPERF_PORT)
            _, out = guest.run(f"iperf3 -c {GW4} -p {IPERF_PORT} -t {secs} -f m"
                               + (" -R" if reverse else ""), timeout=secs + 60)
            iperf.wait(20)
            return out

        def run_rr() -> str:
            # a subshell: run() appends "; printf marker", and "&;" is a syntax error
            guest.run(f"(nc -l -p {RR_PORT} -e cat </dev/null >/dev/null 2>&1 &)")
            time.sleep(1)
            r = subprocess.run(netns.argv([sys.executable, "-c", RR_CLIENT, "127.0.0.1",
                                           str(RR_PORT), str(args.rr_count)]),
                               capture_output=True, text=True, timeout=120)
            if r.returncode:
                raise RuntimeError(f"ping-pong: {r.stderr}")
            return r.stdout

        measure(row, daemon.proc.pid, run_iperf, run_rr, args.rr_count)
    finally:
        harness.DAEMON = old
        if iperf is not None and iperf.poll() is None:
            iperf.kill()
            iperf.wait(5)
        if guest is not None:
            guest.close()
        if daemon is not None:
            if kind == "vhost-user":  # the RX path taken: frames written in place or bounced
                deadline = time.monotonic() + 3
                while time.monotonic() < deadline and "gone:" not in daemon.log_text():
                    time.sleep(0.1)
                gone = [ln for ln in daemon.log_text().splitlines() if "gone:" in ln]
                print(f"  {row.backend} mtu {row.mtu}: {gone[-1] if gone else 'no counters'}",
                      flush=True)
            daemon.close()
        netns.close()
        shutil.rmtree(workdir, ignore_errors=True)


# --- the namespace bridge -----------------------------------------------------------------------

@contextlib.contextmanager
def bridge_box(kind: str, mtu: int, passt: str | None) -> Iterator[tuple[object, int]]:
    sys.path.insert(0, str(ROOT))  # tests.netns
    from tests.netns.sandbox import Sandbox, SandboxConfig, wait_until
    from tests.netns.vhost_sandbox import start_vhost_daemon, start_vhost_relay

    box = Sandbox(SandboxConfig(ipv6=False)).setup()
    try:
        daemon_args = ("--mtu", str(mtu), "-t", str(RR_PORT))
        if passt:
            os.chmod(box.dir, 0o777)  # passt run as root switches to nobody, then binds
            p = box.popen_in(box.host_ns, passt, "-f", "-q", "-s", box.socket_path,
                             *daemon_args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(lambda: os.path.exists(box.socket_path), 10, "passt's socket")
            pid = p.pid
            box.start_relay()
        elif kind.startswith("vhost-user"):
            start_vhost_daemon(box, *daemon_args)
            # vhost-user-4k: Linux-sized mergeable RX buffers (bounced at MTU 65520)
            start_vhost_relay(box, *(["--rx-buf-size", "4096"] if kind.endswith("4k") else []))
            assert box.daemon_pid is not None
            pid = box.daemon_pid
        else:
            box.start_daemon(*daemon_args)
            box.start_relay()
            assert box.daemon_pid is not None
            pid = box.daemon_pid
        box.guest("ip", "link", "set", "tap0", "mtu", str(mtu), check=True)
        box.guest("ip", "addr", "add", "192.0.2.2/24", "dev", "tap0", check=True)
        box.guest("ip", "route", "add", "default", "via", GW4, check=True)
        yield box, pid
    finally:
        box.teardown()


def bridge_rows(args: argparse.Namespace) -> list[Row]:
    backends: list[tuple[str, str, str | None]] = [
        ("vhostpasst vhost-user (vhost_relay.py)", "vhost-user", None),
        ("vhostpasst vhost-user, 4 KiB RX buffers", "vhost-user-4k", None),
        ("vhostpasst stream (relay.py)", "stream", None),
    ]
    passt = args.passt or shutil.which("passt")
    if passt:
        backends.append((f"{passt} stream (relay.py)", "stream", passt))
    rows = []
    for mtu in args.mtu:
        for name, kind, binary in backends:
            row = Row(name, mtu)
            try:
                with bridge_box(kind, mtu, binary) as (box, pid):
                    measure(row, pid, lambda rev, box=box: _bridge_iperf(box, rev, args),
                            lambda box=box: _bridge_rr(box, args), args.rr_count)
            except Exception as e:
                print(f"  {name} mtu {mtu}: FAILED {str(e)[:1500]}", flush=True)
            rows.append(row)
    return rows


def wait_listening(argv: Callable[[list[str]], list[str]], port: int) -> None:
    """Until something listens on TCP `port` in the namespace argv() enters (10 s at most)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = subprocess.run(argv(["ss", "-ltnH", f"sport = :{port}"]), capture_output=True,
                           text=True, timeout=10)
        if r.stdout.strip():
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def _bridge_iperf(box, reverse: bool, args: argparse.Namespace) -> str:  # type: ignore[no-untyped-def]
    srv = box.popen_in(box.host_ns, "iperf3", "-s", "-1", "-B", "127.0.0.1", "-p",
                       str(IPERF_PORT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_listening(lambda a: ["ip", "netns", "exec", box.host_ns, *a], IPERF_PORT)
    r = box.guest("iperf3", "-c", GW4, "-p", str(IPERF_PORT), "-t", str(args.seconds), "-f",
                  "m", *(["-R"] if reverse else []), timeout=args.seconds + 60)
    srv.wait(20)  # a one-off server: gone before the next one binds the port
    return r.stdout + r.stderr  # type: ignore[no-any-return]


def _bridge_rr(box, args: argparse.Namespace) -> str:  # type: ignore[no-untyped-def]
    from tests.netns.sandbox import wait_until
    ready = box.dir / "rr-ready"
    box.popen_in(box.guest_ns, sys.executable, "-c", RR_SERVER, str(RR_PORT), str(ready),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(ready.exists, 10, "the echo server")
    r = box.host(sys.executable, "-c", RR_CLIENT, "127.0.0.1", str(RR_PORT),
                 str(args.rr_count), timeout=120)
    if r.returncode:
        raise RuntimeError(f"ping-pong: {r.stderr}")
    return r.stdout  # type: ignore[no-any-return]


# --- the table ----------------------------------------------------------------------------------

def table(rows: list[Row]) -> str:
    cols = [("g2h_mbps", "guest->host Mbit/s"), ("h2g_mbps", "host->guest Mbit/s"),
            ("rr_us", "ping-pong µs (median)"), ("g2h_cpu_gib", "CPU s/GiB g->h"),
            ("h2g_cpu_gib", "CPU s/GiB h->g"), ("rr_cpu_us", "CPU µs per ping-pong")]
    out = ["| back end | MTU | " + " | ".join(c[1] for c in cols) + " |",
           "|---|---|" + "---|" * len(cols)]
    for row in rows:
        ref = next((r for r in rows if r.mtu == row.mtu and r.results), None)
        cells = []
        for key, _ in cols:
            v = row.results.get(key)
            if v is None:
                cells.append("failed")
                continue
            rv = ref.results.get(key) if ref else None
            ratio = f" ({v / rv:.2f}×)" if rv and ref is not row else ""
            cells.append(f"{v:.0f}{ratio}" if v >= 10 else f"{v:.2f}{ratio}")
        out.append(f"| {row.backend} | {row.mtu} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("mode", choices=("qemu", "bridge"))
    p.add_argument("--seconds", type=int, default=5, help="iperf3 -t per direction")
    p.add_argument("--mtu", type=int, action="append", help="guest MTU (repeatable)")
    p.add_argument("--rr-count", type=int, default=500, help="ping-pong round trips")
    p.add_argument("--passt", help="a passt build to compare (one with --vhost-user for "
                                   "the vhost-user row; Debian 12's has none, "
                                   "bench/fetch_passt.py fetches Debian 13's)")
    p.add_argument("--json", help="also write the raw figures here")
    args = p.parse_args()
    args.mtu = args.mtu or [65520, 1500]
    t0 = time.monotonic()
    rows = qemu_rows(args) if args.mode == "qemu" else bridge_rows(args)
    print(f"\n{args.mode}: {time.monotonic() - t0:.0f} s; ratios against the first row of "
          "each MTU\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in rows], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
