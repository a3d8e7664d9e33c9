#!/usr/bin/env python3
"""A/B of two vhostpasst source trees under a real qemu guest (TCG), vhost-user: the daemon's
CPU per GiB of iperf3 (user and sys apart), runs alternated so both see the same machine.

    git worktree add /tmp/base <commit> && (cd /tmp/base && python setup.py build_ext --inplace)
    cd /tmp && python /work/main/bench/vhost_ab.py /tmp/base /work/main --reverse --rounds 3

Either side may instead be a passt binary (`passt:PATH`, e.g. passt:bench/.cache/passt-trixie/
passt from bench/fetch_passt.py), run with --vhost-user: a single bench run swings by 20-30 %
with the TCG guest's speed, and alternated rounds with medians give a steadier ratio. The
medians and their ratio (second side over first) close the output.

CPU per byte falls as throughput rises (fuller batches per wake-up), and a TCG guest's
throughput swings from run to run: `--bitrate 2G` (iperf3 -b) makes both sides move the same
bytes per second, a steadier comparison of the cost per wake-up. `--pin` puts qemu on CPU 1
and the daemon and iperf3 on CPU 0. `--profile PREFIX` runs py-spy on each vhostpasst run's
measured part (collapsed stacks; it samples without stopping the daemon, so its wait in
epoll counts as active: leave out the samples that end in `Loop.run_once`'s poll line), or
with `--profiler perf`, `perf record` (CPU time only; `perf report --sort dso` splits the
interpreter from the kernel).

`--udp` runs iperf3 -u instead: datagrams of `--length` bytes (iperf3 -l; at most the MTU
less 28, as neither daemon reassembles IP fragments) at `--bitrate` (UDP_BITRATE unless
given: iperf3's own default for -u is 1 Mbit/s). Mbit/s, bytes and so CPU per GiB are the
receiver's (what the daemon delivered); the loss column is the receiver's share of datagrams
that never arrived, wherever they were dropped (the daemon, a socket buffer, the guest).

    cd /tmp && python /work/main/bench/vhost_ab.py passt:/tmp/passt-2607/passt /work/main \
        --udp --length 1400 --mtu 1500 [--reverse]

Each run boots a guest (qemu-tests/harness.py) with `python -m vhostpasst` from the tree
(PYTHONPATH), takes a DHCP lease, runs iperf3 for --warmup seconds, then for --seconds, and
reads the daemon's CPU (schedstat, ns), its user/sys split (/proc/PID/stat ticks) and its
loop's wake-ups (voluntary context switches, /proc/PID/status) around the second run.
Read the figures from an otherwise idle machine only: on a loaded one the daemon gets the
CPU less often, batches more, and its CPU per byte drops.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "qemu-tests"))
sys.path.insert(0, str(ROOT / "bench"))

import harness  # noqa: E402
import profiler  # noqa: E402
from image import build_image  # noqa: E402
from vhost_throughput import GIB, GW4, IPERF_PORT, cpu_seconds, iperf_mbps, wait_listening  # noqa: E402

# iperf3 -u -b when --bitrate is not given: a rate of the equal-rate grid at both
# MTUs, and more than a TCG guest moves in 1400-byte datagrams either way (full speed)
UDP_BITRATE = "1G"
UDP_IP4_OVERHEAD = 28  # IPv4 and UDP headers: a datagram fits one frame up to MTU - 28 bytes


def ticks(pid: int) -> tuple[int, int]:
    """utime and stime of `pid`, in clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def sleeps(pid: int) -> int:
    """Voluntary context switches of `pid` (single-threaded, as both daemons are): each is
    a wait in epoll that blocked, so their count is the loop's wake-ups."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("voluntary_ctxt_switches:"):
                return int(line.split()[1])
    return 0


def udp_loss_percent(text: str) -> float:
    """The share of datagrams lost in iperf3 -u's receiver summary line ("lost/total (x%)")."""
    for line in text.splitlines():
        if "receiver" in line:
            m = re.search(r"(\d+)/(\d+) \(", line)
            if m:
                lost, total = int(m.group(1)), int(m.group(2))
                return 100.0 * lost / total if total else 0.0
    raise RuntimeError(f"no iperf3 -u receiver line in:\n{text[-2000:]}")


def iperf_options(args: argparse.Namespace) -> str:
    """iperf3 client options after -t: direction, protocol, datagram size, rate."""
    bitrate = args.bitrate or (UDP_BITRATE if args.udp else None)
    return ((" -R" if args.reverse else "")
            + (" -u" if args.udp else "")
            + (f" -l {args.length}" if args.length else "")
            + (f" -b {bitrate}" if bitrate else ""))


def pin(pid: int, cpu: int) -> None:
    """Every thread of `pid` onto `cpu` alone."""
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            os.sched_setaffinity(int(task), {cpu})
        except ProcessLookupError:
            pass  # a thread that just ended


def is_passt(side: str) -> bool:
    return side.startswith("passt:")


def imported_from(tree: Path) -> None:
    """Make sure the daemon's command line imports vhostpasst and virtio from `tree` (with
    the environment one_run() sets), not from the working directory or an installed copy."""
    code = "import vhostpasst, virtio; print(vhostpasst.__file__); print(virtio.__file__)"
    out = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    for path in out:
        if not Path(path).resolve().is_relative_to(tree.resolve()):
            raise SystemExit(f"the daemon would import {path}, not from {tree}")


def one_run(side: str, image: Path, args: argparse.Namespace,
            profile_as: str = "") -> tuple[float, ...]:
    """(Mbit/s, CPU s/GiB, user s/GiB, sys s/GiB, wake-ups per GiB, UDP loss %) of one guest
    over the daemon from the source tree `side`, or the passt binary `passt:PATH`."""
    workdir = harness.make_workdir()
    netns = harness.HostNetns()
    old_daemon, old_path = harness.DAEMON, os.environ.get("PYTHONPATH")
    daemon = guest = None
    try:
        # -P: `-m` would put the working directory first on sys.path, so a run from a
        # checkout would import that checkout whatever PYTHONPATH says
        if is_passt(side):
            harness.DAEMON = [str(Path(side[6:]).resolve())]
            os.chmod(workdir, 0o777)  # passt run as root switches to nobody, then binds
        else:
            tree = Path(side).resolve()
            harness.DAEMON = [sys.executable, "-P", "-m", "vhostpasst"]
            os.environ["PYTHONPATH"] = str(tree)
            imported_from(tree)
        daemon = harness.Daemon(workdir, netns, ("--mtu", str(args.mtu)), vhost_user=True)
        assert daemon.proc is not None
        guest = harness.Guest(image, workdir, harness.GuestNet("vhost-user", daemon.socket),
                              netns, mem="512M")
        harness.dhcp_lease(guest)
        pid = daemon.proc.pid
        if args.pin:
            # qemu (its TCG vCPU and I/O threads) on one core, the daemon and iperf3 on the
            # other: neither preempts the other (the spread stays: it is the guest's)
            assert guest.proc is not None
            pin(guest.proc.pid, 1)
            pin(pid, 0)
        result: tuple[float, ...] = (0.0,) * 6
        for seconds in (args.warmup, args.seconds):
            server = subprocess.Popen(netns.argv([*(["taskset", "-c", "0"] if args.pin else []),
                                                  "iperf3", "-s", "-1", "-B", "127.0.0.1",
                                                  "-p", str(IPERF_PORT)]),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_listening(netns.argv, IPERF_PORT)
            spy = (profiler.start(pid, f"{args.profile}-{profile_as}"
                                  + (".data" if args.profiler == "perf" else ".txt"),
                                  args.profiler, 1000 if args.profiler == "perf" else 250)
                   if args.profile and seconds == args.seconds
                   and (args.profiler == "perf" or not is_passt(side)) else None)
            cpu0, (user0, sys0), sleeps0 = cpu_seconds(pid), ticks(pid), sleeps(pid)
            _, out = guest.run(f"iperf3 -c {GW4} -p {IPERF_PORT} -t {seconds} -f m"
                               + iperf_options(args), timeout=seconds + 60)
            cpu, (user1, sys1) = cpu_seconds(pid) - cpu0, ticks(pid)
            wakes = sleeps(pid) - sleeps0
            if spy is not None:
                profiler.stop(spy)
            server.wait(20)
            mbps, nbytes = iperf_mbps(out)
            gib = nbytes / GIB
            hz = os.sysconf("SC_CLK_TCK")
            result = (mbps, cpu / gib, (user1 - user0) / hz / gib, (sys1 - sys0) / hz / gib,
                      wakes / gib, udp_loss_percent(out) if args.udp else 0.0)
        return result
    finally:
        harness.DAEMON = old_daemon
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path
        if guest is not None:
            guest.close()
        if daemon is not None:
            daemon.close()
        netns.close()
        shutil.rmtree(workdir, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("sides", nargs=2, help="two source trees (built in place), or passt:PATH")
    p.add_argument("--reverse", action="store_true", help="host->guest (iperf3 -R)")
    p.add_argument("--mtu", type=int, default=65520)
    p.add_argument("--rounds", type=int, default=2, help="runs per tree, alternated")
    p.add_argument("--seconds", type=int, default=8, help="measured iperf3 -t")
    p.add_argument("--warmup", type=int, default=2, help="iperf3 -t before measuring")
    p.add_argument("--bitrate", metavar="RATE",
                   help="iperf3 -b RATE (e.g. 2G): both sides move the same bytes per second "
                        f"(with --udp: {UDP_BITRATE} unless given)")
    p.add_argument("--udp", action="store_true",
                   help="iperf3 -u: UDP datagrams, the receiver's rate and loss")
    p.add_argument("--length", type=int, metavar="BYTES",
                   help="iperf3 -l: the datagram size with --udp (e.g. 1400, or 65000 at MTU "
                        "65520), the write size for TCP")
    p.add_argument("--pin", action="store_true",
                   help="qemu on CPU 1, the daemon and the iperf3 server on CPU 0")
    p.add_argument("--profile", metavar="PREFIX",
                   help="profile each vhostpasst run's measured part (it costs the daemon some "
                        "CPU): PREFIX-SIDE-ROUND.txt (py-spy) or .data (perf), SIDE 0 or 1")
    p.add_argument("--profiler", choices=("py-spy", "perf"), default="py-spy",
                   help="py-spy: Python stacks, wall time; perf: CPU time, user and kernel")
    p.add_argument("--first-env", metavar="VAR=VALUE", action="append", default=[],
                   help="set in the first side's daemon environment only (repeatable): e.g. "
                        "one tree twice with VHOSTPASST_SANDBOX=off first, the sandbox's cost")
    args = p.parse_args()
    first_env = dict(item.split("=", 1) for item in args.first_env)
    if args.profile and not shutil.which(args.profiler):
        p.error(f"--profile needs {args.profiler}")
    if args.pin and not {0, 1} <= os.sched_getaffinity(0):
        p.error("--pin needs CPUs 0 and 1")
    if args.length is not None and args.length < 1:
        p.error(f"--length {args.length}: must be at least 1 byte")
    if args.udp and args.length and args.length > args.mtu - UDP_IP4_OVERHEAD:
        p.error(f"--length {args.length}: over {args.mtu - UDP_IP4_OVERHEAD} bytes (MTU "
                f"{args.mtu} less {UDP_IP4_OVERHEAD}) a datagram becomes IP fragments, which "
                "neither daemon reassembles")
    image = build_image()
    direction = ("host->guest" if args.reverse else "guest->host") + (
        f" UDP -l {args.length or 'default'} -b {args.bitrate or UDP_BITRATE}" if args.udp else "")
    results: dict[int, list[tuple[float, ...]]] = {0: [], 1: []}
    names = [f"{side}" + (f" ({' '.join(args.first_env)})" if n == 0 and first_env else "")
             for n, side in enumerate(args.sides)]
    for run_no in range(args.rounds):
        for side_no, side in enumerate(args.sides):  # (both sides may be one tree)
            saved = {k: os.environ.get(k) for k in first_env}
            if side_no == 0:
                os.environ.update(first_env)
            try:
                mbps, cpu, user, sys_, wakes, loss = one_run(side, image, args,
                                                             f"{side_no}-{run_no}")
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
            results[side_no].append((mbps, cpu, user, sys_, wakes, loss))
            print(f"{names[side_no]}: {direction} MTU {args.mtu}: {mbps:.0f} Mbit/s, "
                  + (f"loss {loss:.2f} %, " if args.udp else "")
                  + f"{cpu:.3f} CPU s/GiB (user {user:.3f}, sys {sys_:.3f}), "
                  f"{wakes:.0f} wake-ups/GiB", flush=True)
    medians = {n: [statistics.median(r[i] for r in runs) for i in range(6)]
               for n, runs in results.items()}
    for n, (mbps, cpu, user, sys_, wakes, loss) in medians.items():
        print(f"median {names[n]}: {mbps:.0f} Mbit/s, "
              + (f"loss {loss:.2f} %, " if args.udp else "")
              + f"{cpu:.3f} CPU s/GiB (user {user:.3f}, sys {sys_:.3f}), "
              f"{wakes:.0f} wake-ups/GiB")
    first, second = medians[0], medians[1]
    if first[0] and first[1]:
        print(f"second / first: throughput {second[0] / first[0]:.2f}x, "
              f"CPU per GiB {second[1] / first[1]:.2f}x"
              + (f", wake-ups per GiB {second[4] / first[4]:.2f}x" if first[4] else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
