#!/usr/bin/env python3
"""TCP request/response latency and connection rate: vhostpasst, passt and slirp4netns.

    python bench/tcp_rr.py [--seconds S] [--mtu 65520 --mtu 1500] [--passt PATH]
                           [--no-passt] [--no-slirp] [--profile PREFIX]

Two measurements per daemon, MTU and direction, each running for S seconds (default 3):

* rr: one connection, 1-byte request, 1-byte answer, again (netperf TCP_RR): mean and
  median microseconds per round trip;
* crr: connect, 1-byte request, 1-byte answer, close, again (netperf TCP_CRR): connections
  per second.

guest->host: the client in the guest, the server on the host's loopback reached through the
gateway address (map-host-loopback). host->guest: the server in the guest behind `-t 5202`,
the client on the host connecting to 127.0.0.1:5202.

Layouts: vhostpasst and passt as in bench/tcp_throughput.py (a fresh tests/netns/sandbox.py sandbox
per cell; the guest is a network namespace behind tests/netns/relay.py, a Python program playing
qemu on the stream socket, so every frame crosses one more process and two more sockets).
slirp4netns has no stream-socket front end: it creates the tap in a namespace of its own
(`--configure --mtu=MTU`), with no relay in the path, and host->guest goes through a hostfwd
added on its API socket. So slirp4netns's figures are a reference for a namespace guest, not a
like-for-like comparison. Clients and servers are the same Python code everywhere.
"""

from __future__ import annotations

import argparse
import json
import shutil
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.netns
sys.path.insert(0, str(ROOT / "bench"))

import profiler  # noqa: E402
from tcp_throughput import GW4, start_guest  # noqa: E402

from tests.netns.sandbox import Sandbox, SandboxConfig  # noqa: E402

SLIRP_CIDR = "198.51.100.0/24"  # slirp4netns: gateway .2 (the host's loopback), guest .100
SLIRP_GW = "198.51.100.2"
PORT_OUT = 5201  # guest -> host
PORT_IN = 5202  # host -> guest (-t / hostfwd)


# --- the programs run inside the namespaces -------------------------------------------------

def serve(addr: str, port: int, ready: str, seconds: float) -> None:
    """rr on the first connection, crr on every further one; exits after `seconds` idle."""
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(512)
    ls.settimeout(seconds)
    Path(ready).write_text("ready\n")
    while True:
        try:
            c, _ = ls.accept()
        except TimeoutError:
            return
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.settimeout(seconds)
        try:
            while True:
                b = c.recv(1)
                if not b:
                    break
                c.send(b)
                if b == b"c":  # crr: one exchange, then close
                    break
        except OSError:
            pass
        c.close()


def client(addr: str, port: int, seconds: float) -> dict:
    """rr for `seconds`, then crr for `seconds`."""
    s = socket.create_connection((addr, port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times: list[float] = []
    end = time.monotonic() + seconds
    while True:
        t0 = time.perf_counter()
        s.send(b"r")
        if s.recv(1) != b"r":
            raise RuntimeError("rr: bad answer")
        t1 = time.perf_counter()
        times.append(t1 - t0)
        if t1 > end:  # perf_counter and monotonic share the clock on Linux
            break
    s.close()
    conns = 0
    t0 = time.monotonic()
    end = t0 + seconds
    while time.monotonic() < end:
        c = socket.create_connection((addr, port), timeout=10)
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        c.send(b"c")
        if c.recv(1) != b"c":
            raise RuntimeError("crr: bad answer")
        c.close()
        conns += 1
    elapsed = time.monotonic() - t0
    return {"rr_us_mean": round(statistics.fmean(times) * 1e6, 1),
            "rr_us_p50": round(statistics.median(times) * 1e6, 1),
            "round_trips": len(times), "crr_per_s": round(conns / elapsed), "conns": conns}


# --- the harness ---------------------------------------------------------------------------

def _wait(pred, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def _listening(box: Sandbox, ns: str, port: int) -> bool:
    r = box.run_in(ns, "ss", "-Hltn", f"sport = :{port}", timeout=5)
    return bool(r.stdout.strip())


def _measure(box: Sandbox, srv_ns: str, srv_addr: str, port: int, cli_ns: str, dst: str,
             seconds: float) -> dict:
    ready = box.dir / f"ready-{port}"
    me = str(Path(__file__).resolve())
    box.popen_in(srv_ns, sys.executable, me, "_serve", srv_addr, str(port), str(ready),
                 str(seconds + 10), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not _wait(ready.exists, 10):
        return {"error": "server did not start"}
    r = box.run_in(cli_ns, sys.executable, me, "_client", dst, str(port), str(seconds),
                   timeout=4 * seconds + 30)
    if r.returncode != 0:
        return {"error": (r.stderr or r.stdout)[-300:]}
    return json.loads(r.stdout)


def run_stream_daemon(daemon: str, mtu: int, direction: str, seconds: float,
                      profile: str | None = None) -> dict:
    box = Sandbox(SandboxConfig()).setup()
    spy = None
    try:
        start_guest(box, daemon, mtu, "-t", str(PORT_IN))
        if profile and daemon == "vhostpasst" and box.daemon_pid is not None:
            spy = profiler.start(box.daemon_pid,
                                 f"{profile}-{mtu}-{direction.replace('->', '-to-')}.txt",
                                 rate=500)
        if direction == "guest->host":
            return _measure(box, box.host_ns, "127.0.0.1", PORT_OUT, box.guest_ns, GW4,
                            seconds)
        if not _wait(lambda: _listening(box, box.host_ns, PORT_IN), 10):
            return {"error": "-t port not listening"}
        return _measure(box, box.guest_ns, "0.0.0.0", PORT_IN, box.host_ns, "127.0.0.1",
                        seconds)
    finally:
        if spy is not None:
            profiler.stop(spy)
        box.teardown()


def run_slirp(mtu: int, direction: str, seconds: float) -> dict:
    box = Sandbox(SandboxConfig()).setup()
    name = f"{box.host_ns}-s"
    try:
        subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
        box._made.append(name)  # removed (with what runs in it) at teardown
        api = str(box.dir / "slirp.sock")
        err = open(box.dir / "slirp.stderr", "wb")
        box.popen_in(box.host_ns, "slirp4netns", "--configure", f"--mtu={mtu}",
                     f"--cidr={SLIRP_CIDR}", f"--api-socket={api}", "--netns-type=path",
                     f"/run/netns/{name}", "tap0", stdin=subprocess.DEVNULL, stdout=err,
                     stderr=err)
        if not _wait(lambda: box.run_in(name, "ip", "-4", "route", "show", "default",
                                        timeout=5).stdout.strip() != "", 15):
            return {"error": "slirp4netns did not configure the namespace"}
        if direction == "guest->host":
            return _measure(box, box.host_ns, "127.0.0.1", PORT_OUT, name, SLIRP_GW, seconds)
        req = {"execute": "add_hostfwd", "arguments": {
            "proto": "tcp", "host_addr": "127.0.0.1", "host_port": PORT_IN,
            "guest_port": PORT_IN}}
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(api)
            s.sendall(json.dumps(req).encode())
            s.recv(4096)
        return _measure(box, name, "0.0.0.0", PORT_IN, box.host_ns, "127.0.0.1", seconds)
    finally:
        box.teardown()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_serve":
        serve(sys.argv[2], int(sys.argv[3]), sys.argv[4], float(sys.argv[5]))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "_client":
        print(json.dumps(client(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    ap.add_argument("--mtu", type=int, action="append", help="guest MTU (repeatable)")
    ap.add_argument("--passt", default=shutil.which("passt"), help="passt binary to compare")
    ap.add_argument("--no-passt", action="store_true")
    ap.add_argument("--no-slirp", action="store_true")
    ap.add_argument("--profile", metavar="PREFIX",
                    help="py-spy the daemon (rr then crr): PREFIX-MTU-DIRECTION.txt")
    args = ap.parse_args()
    daemons = ["vhostpasst"]
    if args.passt and not args.no_passt:
        daemons.append(args.passt)
    if shutil.which("slirp4netns") and not args.no_slirp:
        daemons.append("slirp4netns")
    rows = []
    for mtu in args.mtu or [65520, 1500]:
        for direction in ("guest->host", "host->guest"):
            for daemon in daemons:
                if daemon == "slirp4netns":
                    res, name = run_slirp(mtu, direction, args.seconds), "slirp4netns*"
                else:
                    res = run_stream_daemon(daemon, mtu, direction, args.seconds, args.profile)
                    name = "vhostpasst" if daemon == "vhostpasst" else "passt"
                row = {"daemon": name, "mtu": mtu, "direction": direction, **res}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("\n| MTU | direction | daemon | RR µs/round trip (mean / median) | CRR conn/s |")
    print("|---|---|---|---|---|")
    for row in rows:
        if "error" in row:
            cells = f"error: {row['error'][:60]} | |"
        else:
            cells = f"{row['rr_us_mean']} / {row['rr_us_p50']} | {row['crr_per_s']} |"
        print(f"| {row['mtu']} | {row['direction']} | {row['daemon']} | {cells}")
    print("\n* slirp4netns: its own tap in a namespace, no relay in the path (see above)")


if __name__ == "__main__":
    main()
