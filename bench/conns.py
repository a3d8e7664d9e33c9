#!/usr/bin/env python3
"""Many idle TCP connections through pasta's tap path: the daemon's memory per connection, and
one bulk flow's rate with them open against its rate alone (issue 20).

    python bench/conns.py [--conns N] [--rounds R] [--size MIB] [--mtu MTU]
                          [--tool vhostpasta --tool /tmp/passt-2607/pasta]

Set-up (bench/pasta_common.py): a fresh sandbox and namespace per round and tool, the tool
attached to it from the host namespace. The namespace's kernel is the guest: its connections
to the gateway address are mapped to the host's loopback, so they take the tap path, not the
splice. Per round, after a warm-up transfer (64 MiB, not measured):
  1. bulk alone: SIZE MiB to a sink (tests/netns/tcp_tool.py), by default from the host to
     the namespace through -t from the host's own address (the tap path; --direction
     to-host: to the gateway address, mapped to a sink on the host's loopback);
  2. memory before: the daemon's /proc/PID/smaps_rollup (Rss, Pss, Private_Dirty);
  3. the namespace opens N connections to a holder on the host, which accepts and keeps them;
     all N established on both ends and idle, memory after (per connection = delta / N; the
     kernel's socket memory is not in the daemon's RSS, so this is what we add beyond it);
  4. bulk with the N idle ones open; then the sandbox is torn down.
Rounds alternate the tools; each tool's figures are medians over rounds (alone, with N, the
ratio per round). The holders raise their open files limit to the hard limit, as both daemons
do; N must stay below it. Every wait is bounded; everything started dies with the sandbox.
"""

from __future__ import annotations

import argparse
import json
import resource
import select
import selectors
import signal
import socket
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pasta_common import HOST_ADDR, PORT_IN, ROOT, Setup, SetupError, start, wait  # noqa: E402

TOOL = str(ROOT / "tests" / "netns" / "tcp_tool.py")
MIB = 1 << 20
PORT_IDLE = 5204  # namespace -> gateway:5204 -> holder on the host's loopback
PORT_BULK = 5205  # ns->host: namespace -> gateway:5205 -> sink on the host's loopback
HOLD_LIMIT_S = 900  # a holder exits on its own after this long
SMAPS_KEYS = ("Rss", "Pss", "Private_Dirty")
WARM_UP = 64 * MIB  # a transfer before the first measured one, in each fresh daemon


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


# --- the holders, run inside the namespaces --------------------------------------------------

def hold_server(addr: str, port: int, status: str, stop: str) -> None:
    """Accept and keep connections; `status` holds the count; exit once `stop` exists."""
    _raise_nofile()
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((addr, port))
    ls.listen(4096)
    ls.setblocking(False)
    held: list[socket.socket] = []
    Path(status).write_text("0")
    deadline = time.monotonic() + HOLD_LIMIT_S
    reported = 0
    while time.monotonic() < deadline and not Path(stop).exists():
        readable, _, _ = select.select([ls], [], [], 0.2)
        for _ in range(512 if readable else 0):
            try:
                c, _peer = ls.accept()
            except BlockingIOError:
                break
            held.append(c)
        if len(held) != reported:
            reported = len(held)
            Path(status).write_text(str(reported))


def hold_client(dst: str, port: int, count: int, status: str, stop: str) -> None:
    """Open `count` connections, at most 256 connecting at once, and keep them until `stop`
    exists; `status` gets a JSON report once all have connected or failed."""
    _raise_nofile()
    sel = selectors.DefaultSelector()
    held: list[socket.socket] = []
    failed = 0
    started = 0
    t0 = time.monotonic()
    deadline = t0 + 300
    while (started < count or sel.get_map()) and time.monotonic() < deadline:
        while started < count and len(sel.get_map()) < 256:
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex((dst, port))
            sel.register(s, selectors.EVENT_WRITE)
            started += 1
        for key, _ev in sel.select(1.0):
            s = key.fileobj  # type: ignore[assignment]
            sel.unregister(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                held.append(s)
            else:
                failed += 1
                s.close()
    Path(status).write_text(json.dumps({"established": len(held), "failed": failed,
                                        "seconds": round(time.monotonic() - t0, 2)}))
    wait(lambda: Path(stop).exists(), HOLD_LIMIT_S, interval=0.2)


# --- the measurement -------------------------------------------------------------------------

def smaps(pid: int) -> dict[str, int]:
    """The daemon's memory in bytes, from /proc/PID/smaps_rollup."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in SMAPS_KEYS:
            out[key] = int(rest.split()[0]) * 1024
    return out


def bulk_ends(setup: Setup, direction: str) -> tuple[str, str, str, str, int]:
    """(sink namespace, sink address, client namespace, client destination, port)."""
    if direction == "to-host":
        return setup.box.host_ns, "127.0.0.1", setup.ns, setup.gw, PORT_BULK
    # host -> namespace through -t, from the host's own address: the tap path, not the splice
    return setup.ns, "0.0.0.0", setup.box.host_ns, HOST_ADDR, PORT_IN


def bulk(setup: Setup, direction: str, size: int) -> float:
    """MB/s of one transfer of `size` bytes."""
    _sink_ns, _sink_addr, cli_ns, dst, port = bulk_ends(setup, direction)
    r = setup.box.run_in(cli_ns, sys.executable, TOOL, "connect", dst, str(port), "send",
                         str(size), timeout=300)
    if r.returncode != 0:
        raise SetupError("bulk transfer: " + (r.stderr or r.stdout)[-300:])
    rep = json.loads(r.stdout)
    if rep.get("answer", [None])[0] != str(size):
        raise SetupError(f"bulk transfer: sink answered {rep.get('answer')}")
    return size / rep["seconds"] / 1e6


def one_round(tool: str, mtu: int, direction: str, count: int, size: int,
              settle: float) -> dict:
    setup = start(tool, mtu)
    box = setup.box
    sink_ready, held, opened, stop = (box.dir / n for n in ("sink", "held", "opened", "stop"))
    me = str(Path(__file__).resolve())
    try:
        pid = int((box.dir / "tool.pid").read_text())
        sink_ns, sink_addr, _cli_ns, _dst, port = bulk_ends(setup, direction)
        box.popen_in(sink_ns, sys.executable, TOOL, "serve", sink_addr, str(port), "sink",
                     str(sink_ready))
        box.popen_in(box.host_ns, sys.executable, me, "_serve", "127.0.0.1", str(PORT_IDLE),
                     str(held), str(stop))
        if not wait(lambda: sink_ready.exists() and held.exists(), 10):
            raise SetupError("servers did not start")
        bulk(setup, direction, min(size, WARM_UP))  # first-use costs out of "alone"
        alone = bulk(setup, direction, size)
        before = smaps(pid)
        box.popen_in(setup.ns, sys.executable, me, "_open", setup.gw, str(PORT_IDLE),
                     str(count), str(opened), str(stop))
        if not wait(opened.exists, 320, interval=0.2):
            raise SetupError("connections not opened in 320 s")
        rep = json.loads(opened.read_text())
        wait(lambda: int(held.read_text() or 0) >= rep["established"], 30, interval=0.2)
        rep["accepted"] = int(held.read_text() or 0)
        time.sleep(settle)  # handshake timers fire (cancelled ones leave the heap then)
        after = smaps(pid)
        n = max(1, rep["accepted"])
        row = {**rep, "daemon fds": len(list(Path(f"/proc/{pid}/fd").iterdir())),
               **{f"{k} B/conn": round((after[k] - before[k]) / n) for k in SMAPS_KEYS},
               "Rss before MiB": round(before["Rss"] / MIB, 1), "alone MB/s": round(alone, 1)}
        try:
            loaded = bulk(setup, direction, size)
        except SetupError as e:  # the figures so far still count
            log = (box.dir / "tool.stderr").read_text(errors="replace")[-200:]
            return {**row, "error": f"with N: {str(e)[-200:]}; the daemon's log: {log}"}
        return {**row, "with N MB/s": round(loaded, 1), "ratio": round(loaded / alone, 3)}
    finally:
        stop.touch()
        setup.stop()
        box.teardown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conns", type=int, default=10000, help="idle connections (N)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per tool, alternated")
    ap.add_argument("--size", type=int, default=400, help="MiB per bulk transfer")
    ap.add_argument("--mtu", type=int, default=65520, help="the namespace's MTU")
    ap.add_argument("--direction", choices=("to-ns", "to-host"), default="to-ns",
                    help="of the bulk transfer: host -> namespace (default) or back")
    ap.add_argument("--settle", type=float, default=12.0,
                    help="seconds from the last connection to the memory reading (default "
                         "12: past the handshake timeout of 10 s)")
    ap.add_argument("--tool", action="append",
                    help="vhostpasta or a pasta binary (repeatable; default: vhostpasta)")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # tear the sandbox down
    tools = args.tool or ["vhostpasta"]
    rows: dict[str, list[dict]] = {t: [] for t in tools}
    for rnd in range(args.rounds):
        for tool in tools:
            try:
                row = one_round(tool, args.mtu, args.direction, args.conns, args.size * MIB,
                                args.settle)
            except (SetupError, OSError, ValueError) as e:
                row = {"error": str(e)[-300:]}
            rows[tool].append(row)
            print(json.dumps({"tool": tool, "round": rnd, **row}), flush=True)
    cols = ["accepted", "Rss B/conn", "Pss B/conn", "Private_Dirty B/conn", "alone MB/s",
            "with N MB/s", "ratio"]
    print(f"\nN={args.conns}, {args.size} MiB bulk {args.direction}, MTU {args.mtu}, medians of "
          f"{args.rounds} rounds\n\n| tool | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for tool in tools:
        cells = []
        for c in cols:
            vals = [r[c] for r in rows[tool] if c in r]
            cells.append(str(statistics.median(vals)) if vals else "error")
        print(f"| {tool} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["_serve"]:
        hold_server(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5])
    elif sys.argv[1:2] == ["_open"]:
        hold_client(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6])
    else:
        main()
