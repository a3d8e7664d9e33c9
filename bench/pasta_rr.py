#!/usr/bin/env python3
"""pasta-mode TCP request/response latency and connection rate: vhostpasta side by side with
Debian's pasta (`--runas 0`) and slirp4netns, through the tap and the splice paths.

    python bench/pasta_rr.py [--seconds 3] [--tool vhostpasta ...] [--path 'splice host->ns' ...]

Each (tool, path) gets a fresh sandbox (bench/pasta_common.py). In it:
  RR   one connection (TCP_NODELAY), 64-byte request, 64-byte answer, repeated for SECONDS:
       microseconds per round trip (mean and median);
  CRR  connect, 1-byte request, 1-byte answer, close, repeated for SECONDS: connections/s.
The server is a threaded Python echo server, the client a Python loop: both add the same
cost to every tool, so compare columns, not absolute numbers with C benchmarks.
Also reported: how long the tool took to be ready (pid file written / default route).
Every wait is bounded (socket timeouts 5 s, each client run SECONDS + 60 s at most).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pasta_common import SetupError, endpoints, start, wait  # noqa: E402

PATHS = ("splice host->ns", "splice ns->host", "tap host->ns", "tap ns->host")

SERVER = r"""
import socket, sys, threading
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(128)
open(sys.argv[3], "w").close()
def serve(c):
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1); c.settimeout(30)
    try:
        while True:
            d = c.recv(64)
            if not d:
                break
            c.sendall(d)
    except OSError:
        pass
    c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"""

CLIENT = r"""
import json, socket, statistics, sys, time
addr, port, mode, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
def recv_n(c, n):
    got = b""
    while len(got) < n:
        d = c.recv(n - len(got))
        if not d:
            raise OSError("closed")
        got += d
    return got
end = time.monotonic() + secs
if mode == "rr":
    c = socket.create_connection((addr, port), timeout=5)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    for _ in range(50):  # warm-up
        c.sendall(msg); recv_n(c, 64)
    rtts = []
    while time.monotonic() < end and len(rtts) < 1000000:
        t = time.perf_counter(); c.sendall(msg); recv_n(c, 64)
        rtts.append(time.perf_counter() - t)
    c.close()
    print(json.dumps({"n": len(rtts), "mean_us": round(statistics.mean(rtts) * 1e6, 1),
                      "p50_us": round(statistics.median(rtts) * 1e6, 1)}))
else:
    n = errors = 0
    t0 = time.monotonic()
    while time.monotonic() < end and n < 1000000:
        try:
            c = socket.create_connection((addr, port), timeout=5)
            c.sendall(b"x"); recv_n(c, 1); c.close(); n += 1
        except OSError:
            errors += 1
            if errors > 100:
                break
    dt = time.monotonic() - t0
    print(json.dumps({"n": n, "errors": errors, "conn_per_s": round(n / dt)}))
"""


def run_one(tool: str, path: str, seconds: float) -> dict:
    if tool == "slirp4netns" and path.startswith("splice"):
        return {"skip": "no splice path"}
    try:
        setup = start(tool, hostfwd=(path == "tap host->ns"))
    except SetupError as e:
        return {"error": str(e)}
    box = setup.box
    try:
        srv_ns, srv_addr, port, cli_ns, dst = endpoints(setup, tool, path)
        ready = box.dir / "srv"
        box.popen_in(srv_ns, sys.executable, "-c", SERVER, srv_addr, str(port), str(ready),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait(ready.exists, 10):
            return {"error": "server did not start"}
        out: dict = {"ready_ms": round(setup.ready_s * 1000)}
        for mode in ("rr", "crr"):
            r = box.run_in(cli_ns, sys.executable, "-c", CLIENT, dst, str(port), mode,
                           str(seconds), timeout=seconds + 60)
            if r.returncode != 0:
                out[mode] = {"error": (r.stderr or r.stdout)[-200:]}
            else:
                out[mode] = json.loads(r.stdout)
        setup.stop()
        return out
    except subprocess.TimeoutExpired:
        return {"error": "client timed out"}
    finally:
        box.teardown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=3.0, help="per RR and per CRR run")
    ap.add_argument("--tool", action="append",
                    help="vhostpasta, pasta (a path) or slirp4netns (default: all found)")
    ap.add_argument("--path", action="append", choices=PATHS)
    args = ap.parse_args()
    tools = args.tool or ["vhostpasta"] + [t for t in ("pasta", "slirp4netns")
                                           if shutil.which(t)]
    paths = args.path or list(PATHS)
    rows = []
    for path in paths:
        for tool in tools:
            row = {"tool": tool, "path": path, **run_one(tool, path, args.seconds)}
            rows.append(row)
            print(json.dumps(row), flush=True)

    def cell(row: dict, mode: str, key: str) -> str:
        if "skip" in row or "error" in row:
            return str(row.get("skip", row.get("error")))[:40]
        res = row[mode]
        return str(res.get(key, res.get("error", "?")))[:40]

    for title, mode, key in (("RR, µs per round trip (mean)", "rr", "mean_us"),
                             ("RR, µs per round trip (median)", "rr", "p50_us"),
                             ("CRR, connections per second", "crr", "conn_per_s")):
        print(f"\n{title}\n\n| path | " + " | ".join(tools) + " |")
        print("|---|" + "---|" * len(tools))
        for path in paths:
            cells = [cell(next(r for r in rows if r["tool"] == t and r["path"] == path),
                          mode, key) for t in tools]
            print(f"| {path} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
