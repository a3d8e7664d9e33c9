#!/usr/bin/env python3
"""pasta-mode TCP throughput: vhostpasta side by side with Debian's pasta and slirp4netns.

    python bench/pasta_tcp.py [--size MIB] [--mtu 65520 --mtu 1500] [--tool vhostpasta ...]

Each run builds a fresh sandbox (tests/netns/sandbox.py: world and host namespaces, documentation
addresses only) and a network namespace made with `ip netns add`; the tool runs in the host
namespace attached to it. Paths:
  tap ns->host    namespace client -> gateway:5201 (mapped to the host's loopback) -> sink
  tap host->ns    host client -> 192.0.2.2:5202 (the host's own address, so not spliced;
                  slirp4netns: 127.0.0.1:5202, a hostfwd added through its API socket)
                  -> source in the namespace
  splice ns->host namespace client -> 127.0.0.1:5203 (-T) -> sink on the host's loopback
  splice host->ns host client -> 127.0.0.1:5202 (-t, splice) -> source in the namespace
Reported: MB/s of the transfer (byte count / sha256 checked by tests/netns/tcp_tool.py).
Set-up and readiness: bench/pasta_common.py (the tool is used as soon as its pid file is
written). Every wait is bounded (a transfer: 300 s); everything started is killed with the
sandbox.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pasta_common import ROOT, SetupError, endpoints, start, wait  # noqa: E402

TOOL = str(ROOT / "tests" / "netns" / "tcp_tool.py")
MIB = 1 << 20
PATHS = ("tap ns->host", "tap host->ns", "splice ns->host", "splice host->ns")


def run_one(tool: str, mtu: int, path: str, size: int) -> dict:
    if tool == "slirp4netns" and path.startswith("splice"):
        return {"skip": "no splice path"}
    try:
        # ready = pid file written (vhostpasta: after its listeners are bound), no extra wait
        setup = start(tool, mtu, hostfwd=(path == "tap host->ns"))
    except SetupError as e:
        return {"error": str(e)}
    box = setup.box
    try:
        srv_ns, srv_addr, port, cli_ns, dst = endpoints(setup, tool, path)
        ready = box.dir / "srv"
        if path.endswith("ns->host"):
            srv = ["serve", srv_addr, str(port), "sink", str(ready)]
            cli = ["connect", dst, str(port), "send", str(size)]
        else:
            srv = ["serve", srv_addr, str(port), "source", str(ready), str(size)]
            cli = ["connect", dst, str(port), "recv"]
        box.popen_in(srv_ns, sys.executable, TOOL, *srv, stdout=subprocess.DEVNULL,
                     stderr=subprocess.DEVNULL)
        if not wait(ready.exists, 10):
            return {"error": "server did not start"}
        r = box.run_in(cli_ns, sys.executable, TOOL, *cli, timeout=300)
        if r.returncode != 0:
            return {"error": (r.stderr or r.stdout)[-300:]}
        rep = json.loads(r.stdout)
        ok = (rep.get("answer", [None])[0] == str(size)) if "send" in cli \
            else rep.get("bytes") == size
        setup.stop()
        return {"MB/s": round(size / rep["seconds"] / 1e6, 1), "ok": ok}
    except subprocess.TimeoutExpired:
        return {"error": "transfer not done in 300 s"}
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
