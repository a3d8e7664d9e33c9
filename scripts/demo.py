#!/usr/bin/env python3
"""`make demo`: vhostpasst serving a real qemu guest over vhost-user, shown as a person would
want to see it.

Builds the guest image once (a Debian kernel + busybox initramfs, cached in
qemu-tests/.cache), starts vhostpasst --vhost-user inside a throw-away "host" network namespace
(documentation addresses only, with a "world" namespace behind its upstream link: nothing
leaves the sandbox), boots the guest under qemu, and shows its DHCP lease, a ping of the
gateway and a download from a server on the host's loopback. Then it stops everything and
prints the qemu and libvirt snippets to do the same with your own VM.

Every step is bounded in time; Ctrl-C (or SIGTERM) tears everything down too.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "qemu-tests"))

from harness import (  # noqa: E402
    HOST_GW4,
    QEMU,
    Daemon,
    Guest,
    GuestNet,
    HarnessError,
    HostNetns,
    dhcp_lease,
    make_workdir,
)
from image import ImageError, build_image  # noqa: E402

TOTAL_TIMEOUT = 300  # seconds for the whole demo, image build included
SIZE = 16 << 20  # the download: big enough for a speed, small enough for TCG
PORT = 8080
HOSTSIDE = ROOT / "qemu-tests" / "hostside.py"

QEMU_SNIPPET = """\
  vhost-user (fastest: the daemon reads and writes the guest's memory directly):
    vhostpasst --vhost-user -s /tmp/passt.sock
    qemu-system-x86_64 ... -m 1G \\
        -object memory-backend-memfd,id=mem,share=on,size=1G -numa node,memdev=mem \\
        -chardev socket,id=c,path=/tmp/passt.sock,reconnect-ms=1000 \\
        -netdev vhost-user,id=n,chardev=c -device virtio-net-pci,netdev=n

  stream socket (any qemu >= 7.2, no shared memory needed):
    vhostpasst -s /tmp/passt.sock
    qemu-system-x86_64 ... \\
        -netdev stream,id=n,server=off,addr.type=unix,addr.path=/tmp/passt.sock \\
        -device virtio-net-pci,netdev=n"""

LIBVIRT_SNIPPET = """\
  with vhostpasst installed (or linked) as /usr/bin/passt, libvirt starts it for you:

    <domain type='kvm'>
      ...
      <memoryBacking>
        <source type='memfd'/>
        <access mode='shared'/>
      </memoryBacking>
      <devices>
        <interface type='vhostuser'>
          <backend type='passt'/>
          <model type='virtio'/>
          <portForward proto='tcp'><range start='2222' to='22'/></portForward>
        </interface>
      </devices>
    </domain>

  or, over the stream socket (no shared memory):
        <interface type='user'>
          <backend type='passt'/>
          <model type='virtio'/>
        </interface>"""


class Timeout(Exception):
    pass


def _on_signal(signum: int, frame: FrameType | None) -> None:
    if signum == signal.SIGALRM:
        raise Timeout(f"the demo took longer than {TOTAL_TIMEOUT} s")
    raise KeyboardInterrupt  # SIGTERM: the same clean tear-down as Ctrl-C


def step(text: str) -> None:
    print(f"\n== {text}", flush=True)


def say(text: str = "") -> None:
    print(f"   {text}" if text else "", flush=True)


def run_demo(workdir: Path) -> int:
    step("Building the guest image (cached after the first run) ...")
    t0 = time.monotonic()
    image = build_image(verbose=False)
    say(f"kernel {image.manifest.get('release')} + busybox initramfs, ready in "
        f"{time.monotonic() - t0:.1f} s  ({image.kernel.parent})")

    step("Creating a sandbox: a 'host' network namespace with 192.0.2.2/24 via 192.0.2.1 and "
         "2001:db8::2/64,")
    say("its upstream a veth pair into a 'world' namespace. Nothing here reaches your network.")
    netns = HostNetns()
    daemon: Daemon | None = None
    guest: Guest | None = None
    server: subprocess.Popen[str] | None = None
    try:
        step("Starting vhostpasst --vhost-user in it:")
        daemon = Daemon(workdir, netns, vhost_user=True)
        for line in daemon.log_text().splitlines():
            if line.startswith("You can"):  # its qemu hint: ours, complete, comes at the end
                break
            if line.strip():
                say(f"  | {line}")

        step(f"Booting the guest under {Path(QEMU).name} (TCG: a few seconds) ...")
        guest = Guest(image, workdir, GuestNet("vhost-user", daemon.socket), netns)
        say(f"booted in {guest.boot_time:.1f} s")

        step("The guest asks for an address (busybox udhcpc):")
        t0 = time.monotonic()
        lease = dhcp_lease(guest)
        say(f"address {lease['ip']}/{lease['mask']}, router {lease['router']}, "
            f"MTU {lease['mtu']}, DNS {lease['dns']}, search {lease['search']}  "
            f"({time.monotonic() - t0:.2f} s)")
        say("(the same address as the host: passt-style, the guest looks like the host)")

        step(f"ping {HOST_GW4} (the gateway: vhostpasst answers it from the host's loopback):")
        _, out = guest.run(f"ping -c 3 -W 5 {HOST_GW4}", timeout=30)
        for line in out.splitlines():
            if "bytes from" in line or "packet loss" in line or "round-trip" in line:
                say(line.strip())

        step(f"Download: a {SIZE >> 20} MiB file from a server on the host's 127.0.0.1:{PORT}, "
             f"fetched by the guest from {HOST_GW4}:{PORT}:")
        data = os.urandom(SIZE)
        src = workdir / "download.bin"
        src.write_bytes(data)
        want = hashlib.sha256(data).hexdigest()
        server = subprocess.Popen(
            netns.argv([sys.executable, str(HOSTSIDE), "serve-send", "127.0.0.1", str(PORT),
                        str(src)]),
            stdout=subprocess.PIPE, text=True)
        assert server.stdout is not None
        if server.stdout.readline().strip() != "ready":
            raise HarnessError("the download server did not start")
        t0 = time.monotonic()
        guest.run(f"nc {HOST_GW4} {PORT} > /tmp/dl", timeout=120)  # into the guest's RAM
        elapsed = time.monotonic() - t0
        _, out = guest.run("wc -c < /tmp/dl; sha256sum /tmp/dl", timeout=120)
        got_size, got_sha = int(out.split()[0]), out.split()[1]
        match = "matches" if got_sha == want else "DOES NOT MATCH"
        say(f"received {got_size} bytes ({got_size / 2**20:.1f} MiB) in {elapsed:.2f} s: "
            f"{got_size / elapsed / 1e6:.1f} MB/s")
        say(f"sha256 {got_sha[:16]}... {match} the server's file")
        say("(the guest's CPU is emulated (TCG) here: with KVM expect far more)")
        ok = got_sha == want and got_size == SIZE

        step("Shutting down: the guest, then vhostpasst with SIGTERM ...")
        guest.close()
        guest = None
        before = len(daemon.log_text().splitlines())
        status = daemon.close()
        for line in daemon.log_text().splitlines()[before:]:  # what it said on the way out
            say(f"  | {line}")
        daemon = None
        say(f"vhostpasst exited with status {status}")
        ok = ok and status == 0

        step("To do the same with your own VM (qemu):")
        print(QEMU_SNIPPET)
        step("... or with libvirt (>= 11.1 for passt over vhost-user, >= 9.0 over the "
             "stream socket):")
        print(LIBVIRT_SNIPPET)
        print()
        return 0 if ok else 1
    finally:
        if server is not None:
            server.kill()
            server.wait(timeout=10)
            if server.stdout:
                server.stdout.close()
        if guest is not None:
            guest.close()
        if daemon is not None:
            daemon.close()
        netns.close()


def main() -> int:
    if os.geteuid() != 0:
        print("make demo needs root (it creates network namespaces)", file=sys.stderr)
        return 1
    if not shutil.which(QEMU):
        print(f"{QEMU} not found: run `make setup` (it installs qemu)", file=sys.stderr)
        return 1
    # Ctrl-C raises KeyboardInterrupt even where SIGINT was ignored when we started (a
    # background job of a script): the finally blocks then stop qemu and the daemon.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGALRM, _on_signal)
    signal.alarm(TOTAL_TIMEOUT)
    HostNetns.reap_stale()
    workdir = make_workdir()
    try:
        return run_demo(workdir)
    except KeyboardInterrupt:
        print("\ninterrupted: everything started has been stopped", file=sys.stderr)
        return 130
    except (HarnessError, ImageError, Timeout) as e:
        print(f"\ndemo failed: {e}\n(logs in {workdir}: daemon.log, console.log, qemu.log)",
              file=sys.stderr)
        os.environ["VPT_KEEP"] = "1"
        return 1
    finally:
        signal.alarm(0)
        if not os.environ.get("VPT_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
