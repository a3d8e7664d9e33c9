#!/usr/bin/env python3
"""Micro-benchmark: popping and pushing descriptor chains (VirtQueue.pop_many / push / flush).

    python bench/virtqueue_pop.py [--chains 256] [--rounds 400]

The test front end (tests/virtio/frontend.py) posts `--chains` chains on a ring of that size
in memfd guest memory; the device side pops them all with one pop_many() and gives them back
(rewind) `--rounds` times, then pops, pushes and flushes them (the driver re-posts the same
heads by moving its avail index, not timed); pop() is also timed one chain per call (how the
TX path and the first chain of an RX frame are popped). Cases: one 4 KiB device-writable
descriptor (Linux's mergeable RX buffers), one 1526-byte device-readable descriptor (a TX frame
at MTU 1500), and an indirect table of two readable descriptors. Prints µs per chain (the best of
five repetitions: this measures the code, not the shared machine's load).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.virtio.frontend import DriverMemory, DriverRing  # noqa: E402
from virtio.memory import GuestMemory  # noqa: E402
from virtio.virtqueue import VirtQueue  # noqa: E402

CASES = {
    "rx: 1 writable 4 KiB": lambda ring: ring.add([], [4096]),
    "tx: 1 readable 1526 B": lambda ring: ring.add([bytes(1526)]),
    "tx: indirect, 2 readable": lambda ring: ring.add([bytes(12), bytes(1514)], indirect=True),
}


def run_case(name: str, chains: int, rounds: int) -> tuple[float, float, float]:
    dmem = DriverMemory((16 << 20,))
    mem = GuestMemory()
    for r in dmem.regions:
        mem.add(r.desc, os.dup(r.fd))
    ring = DriverRing(dmem, chains)
    vq = VirtQueue(0, mem, max_size=max(chains, 1024))
    vq.indirect = True
    vq.set_num(chains)
    vq.set_addr(ring.addr(0))
    vq.start()
    try:
        for _ in range(chains):
            CASES[name](ring)
        best_pop = best_one = best_push = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(rounds):
                got = vq.pop_many(chains)
                vq.rewind(len(got))
            best_pop = min(best_pop, (time.perf_counter() - t) / rounds / chains)
            assert len(got) == chains
            t = time.perf_counter()
            for _ in range(rounds // 4):
                for _ in range(chains):
                    vq.pop()
                vq.rewind(chains)
            best_one = min(best_one, (time.perf_counter() - t) / (rounds // 4) / chains)
            t_push = 0.0
            for _ in range(rounds // 4):
                got = vq.pop_many(chains)
                t = time.perf_counter()
                for c in got:
                    vq.push(c.head, 0)
                vq.flush()
                t_push += time.perf_counter() - t
                ring.set_avail_idx(ring.avail_idx + chains)  # same heads, same slots
            best_push = min(best_push, t_push / (rounds // 4) / chains)
        return best_pop * 1e6, best_one * 1e6, best_push * 1e6
    finally:
        vq.reset()
        mem.reset()
        ring.close()
        dmem.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--chains", type=int, default=256)
    p.add_argument("--rounds", type=int, default=400)
    args = p.parse_args()
    print(f"{'case':<28} {'pop_many µs/chain':>18} {'pop() µs/chain':>15} "
          f"{'push+flush µs/chain':>20}")
    for name in CASES:
        pop, one, push = run_case(name, args.chains, args.rounds)
        print(f"{name:<28} {pop:>18.3f} {one:>15.3f} {push:>20.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
