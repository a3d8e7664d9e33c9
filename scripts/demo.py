#!/usr/bin/env python3
"""`make demo`: vhostpasst serving a guest, shown as a person would want to see it.

The guest here is a network namespace whose tap device is attached to vhostpasst's qemu stream
socket by a small relay that plays qemu's part (tests/relay.py); a later version boots a real
qemu guest. Everything runs in namespaces this script creates, with documentation addresses,
and is removed on exit.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from sandbox import Sandbox  # noqa: E402


def main() -> int:
    box = Sandbox()
    print("Setting up a sandbox: a 'host' namespace (192.0.2.2/24, 2001:db8::2/64, gateway "
          "192.0.2.1) and a 'guest' namespace with a tap device ...")
    box.setup()
    try:
        box.start_daemon()
        print(f"\nvhostpasst is listening on {box.socket_path}. Its start-up summary:\n")
        for line in box.daemon_stderr_text().splitlines():
            print(f"    {line}")
        box.start_relay()
        print("\nA guest attached through the stream socket. It asks for an address (udhcpc):")
        started = time.monotonic()
        lease = box.udhcpc()
        elapsed = time.monotonic() - started
        print(f"    address {lease.get('ip')}/{lease.get('mask') or lease.get('subnet')}, "
              f"router {lease.get('router')}, MTU {lease.get('mtu')}")
        print(f"    DNS {lease.get('dns')}, search {lease.get('search') or lease.get('domain')}")
        print(f"    (lease in {elapsed:.2f} s)")
        box.guest("ip", "addr", "add", f"{lease['ip']}/{lease.get('mask', '24')}", "dev",
                  box.config.tap)
        for addr in ("192.0.2.1", "192.0.2.77"):
            box.guest("busybox", "ping", "-c1", "-W1", addr)
        neigh = box.guest_neighbours()
        print("\nThe guest's neighbour table, filled by vhostpasst's ARP proxy:")
        for addr, mac in neigh.items():
            print(f"    {addr} is at {mac}")
        print("\nTo do the same with your own VM:\n"
              "    vhostpasst\n"
              "    qemu-system-x86_64 ... -device virtio-net-pci,netdev=s \\\n"
              "        -netdev stream,id=s,server=off,addr.type=unix,"
              "addr.path=/tmp/passt_1.socket\n"
              "libvirt: <interface type='user'><backend type='passt'/>"
              "<model type='virtio'/></interface>\n"
              "    with vhostpasst installed (or linked) as /usr/bin/passt.")
        status = box.stop_daemon()
        print(f"\nvhostpasst stopped with SIGTERM, exit status {status}.")
        return 0 if status == 0 else 1
    finally:
        with contextlib.redirect_stdout(io.StringIO()):  # its diagnostics are for tests
            box.teardown()


if __name__ == "__main__":
    sys.exit(main())
