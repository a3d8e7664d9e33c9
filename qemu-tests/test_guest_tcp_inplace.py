"""vhost-user at MTU 1500, where the daemon writes frames in place in the guest's RX buffers: a
TCP transfer each way between the guest and a server in the host namespace (reached through the
gateway address, which maps to the host's loopback), checked with sha256, and the daemon's
counters. The guest's virtio-net driver takes TCP segmentation offload both ways (the daemon's
log line says so), so TCP frames of up to 64 KiB go both ways whatever the MTU: the counters
show them. The 50 MiB transfers at the default MTU, for both back ends, are in
test_guest_net.py."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import HOST_GW4, HostNetns, SetupFactory, dhcp_lease

# vhost-user at MTU 1500: Linux posts ~1.5-4 KiB mergeable RX buffers, so every frame fits in
# one and is written in place (at 65520 they are bounced and copied over several buffers).
CASES = pytest.mark.parametrize("kind, mtu", [("vhost-user", 1500)], ids=["vhost-user-mtu1500"])
SIZE = 16 << 20  # TCG guests move a few tens of MB/s at best
PORT = 10001

# One connection: "send" writes the file and closes; "recv" reads exactly SIZE bytes and prints
# their sha256, then closes (busybox nc does not half-close, so the size decides the end).
SERVER = r"""
import hashlib, socket, sys
mode, port, size, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", port)); srv.listen(1)
print("listening", flush=True)
conn, _ = srv.accept()
if mode == "send":
    with open(path, "rb") as f:
        conn.sendfile(f)
else:
    h, got = hashlib.sha256(), 0
    while got < size:
        data = conn.recv(1 << 20)
        if not data:
            break
        h.update(data); got += len(data)
    print(got, h.hexdigest(), flush=True)
conn.close()
"""


def _server(netns: HostNetns, mode: str, path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        netns.argv([sys.executable, "-c", SERVER, mode, str(PORT), str(SIZE), str(path)]),
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening"
    return proc


@CASES
def test_tcp_transfer_both_ways(
    passt_setup: SetupFactory, kind: str, mtu: int | None, tmp_path: Path
) -> None:
    setup = passt_setup(kind, args=("--mtu", str(mtu)) if mtu else ())
    guest = setup.guest
    dhcp_lease(guest)

    # host -> guest
    data = os.urandom(SIZE)
    src = tmp_path / "data"
    src.write_bytes(data)
    server = _server(setup.netns, "send", src)
    try:
        t0 = time.monotonic()
        guest.run(f"nc {HOST_GW4} {PORT} > /tmp/in", timeout=120)
        down = time.monotonic() - t0
        _, out = guest.run("sha256sum /tmp/in; wc -c < /tmp/in; rm /tmp/in", timeout=60)
        assert hashlib.sha256(data).hexdigest() in out and str(SIZE) in out, out
    finally:
        server.kill()
        server.wait()

    # guest -> host
    guest.run(f"head -c {SIZE} /dev/urandom > /tmp/out", timeout=60)
    _, out = guest.run("sha256sum /tmp/out", timeout=60)
    digest = out.split()[0]
    server = _server(setup.netns, "recv", src)
    try:
        t0 = time.monotonic()
        guest.run(f"nc {HOST_GW4} {PORT} < /tmp/out", timeout=120)
        up = time.monotonic() - t0
        assert server.stdout is not None
        got = server.stdout.readline().split()
        assert got == [str(SIZE), digest]
    finally:
        server.kill()
        server.wait()
    if kind == "vhost-user":
        setup.daemon.close()  # it logs its frame counters when the front end goes
        log = setup.daemon.log_text()
        m = re.search(r"(\d+) to it \((\d+) written in place.*, (\d+) data frames bounced",
                      log)
        assert m, log
        to_guest, in_place, bounced = map(int, m.groups())
        assert to_guest > 100
        if mtu == 1500:
            # every data frame in place (ACKs and other small frames are copied by send())
            assert bounced == 0 and in_place >= SIZE // 65536, m.group(0)
        # Linux's virtio-net took every offload we offer: frames bigger than the MTU both ways
        assert "offloads from the guest: csum tso4 tso6 ecn; to the guest: csum tso4 tso6" \
            in log, log
        m = re.search(r"TSO frames (\d+) from the guest, (\d+) to it", log)
        assert m and int(m.group(1)) > SIZE // 65536 // 4 and \
            int(m.group(2)) > SIZE // 65536 // 4, log
    print(f"{kind} mtu {mtu or 65520}: {SIZE >> 20} MiB host->guest {SIZE / down / 1e6:.1f} MB/s, "
          f"guest->host {SIZE / up / 1e6:.1f} MB/s")


