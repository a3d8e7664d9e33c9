"""vhostpasst end to end over vhost-user, with the real Linux stack as the guest and no qemu.

tests/netns/vhost_relay.py (started by tests/netns/vhost_sandbox.py) is both qemu's front end
and the guest's virtio-net driver: it shares memfd "guest RAM" with `vhostpasst --vhost-user -f -s
PATH` in the host namespace and moves frames between the rings and the guest namespace's tap.
Each test runs twice: with RX buffers that hold a whole 65520-MTU frame (the daemon writes
frames in place) and with Linux-sized 4 KiB mergeable buffers (TCP reads a 64 KiB frame straight
into the 17 chains it spans; UDP and the rest copy from a bounce buffer). The TSO cases have
the bridge negotiate TCP segmentation offload both ways (the tap's kernel then sends and takes
TCP frames of up to 64 KiB whatever the MTU).
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.sandbox import Sandbox, wait_until
from tests.netns.vhost_sandbox import FULL_RX_BUF, start_vhost_daemon, start_vhost_relay

TOOL = str(Path(__file__).resolve().parent / "tcp_tool.py")
GW4 = "192.0.2.1"
HOST4 = "192.0.2.2"
GW6 = "2001:db8::1"
HOST6 = "2001:db8::2"
MIB = 1 << 20
RX_BUFS = {"inplace": FULL_RX_BUF, "mrg4k": 4096}


@pytest.fixture(params=list(RX_BUFS), ids=list(RX_BUFS))
def rx_buf(request: pytest.FixtureRequest) -> int:
    return RX_BUFS[request.param]


@pytest.fixture
def vbox(sandbox: Sandbox, rx_buf: int) -> Iterator[Sandbox]:
    """The sandbox with the daemon in vhost-user mode and the bridge attached."""
    start_vhost_daemon(sandbox, "--no-map-gw")
    start_vhost_relay(sandbox, "--rx-buf-size", str(rx_buf))
    sandbox.rx_buf = rx_buf  # type: ignore[attr-defined]
    yield sandbox
    st = sandbox.relay_status()
    assert st.get("tap_errors") == "0", st


def configure_guest(box: Sandbox, lease: dict[str, str] | None = None) -> None:
    """What udhcpc's script would do with the lease (the defaults are the lease's values)."""
    lease = lease or {"ip": HOST4, "mtu": "65520", "router": GW4}
    box.guest("ip", "link", "set", "tap0", "mtu", lease["mtu"], check=True)
    box.guest("ip", "addr", "add", f"{lease['ip']}/24", "dev", "tap0", check=True)
    box.guest("ip", "route", "add", "default", "via", lease["router"].split()[0], check=True)


def front_end_gone_line(box: Sandbox) -> str:
    """The daemon's closing counters for the front end (logged when the bridge leaves)."""
    box.stop_relay()
    text = wait_until(lambda: "front end gone" in box.daemon_stderr_text()
                      and box.daemon_stderr_text(), 10, "the daemon's front-end counters")
    return [ln for ln in text.splitlines() if "front end gone" in ln][-1]


def test_dhcp_and_ping_over_vhost_user(vbox: Sandbox) -> None:
    """udhcpc gets the usual lease over the rings; with it applied, the gateway answers."""
    lease = vbox.udhcpc()
    assert lease["ip"] == HOST4 and lease["router"].split() == [GW4]
    assert lease["mtu"] == "65520"
    configure_guest(vbox, lease)
    r = vbox.guest("busybox", "ping", "-c", "3", "-W", "3", GW4, timeout=20)
    assert "3 packets received" in r.stdout, r.stdout + r.stderr + vbox.daemon_log()
    r = vbox.guest("busybox", "ping", "-c", "1", "-W", "3", "-s", "30000", GW4, timeout=20)
    assert "1 packets received" in r.stdout, r.stdout + r.stderr  # fragments, 30 KB echo


UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
open(sys.argv[3], "w").close()
s.settimeout(30)
for _ in range(int(sys.argv[4])):
    data, peer = s.recvfrom(65535)
    s.sendto(data[::-1], peer)
"""

UDP_CLIENT = """
import hashlib, json, random, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
out = {"ok": 0, "peer": None}
for size in map(int, sys.argv[3:]):
    data = random.Random(size).randbytes(size)
    for attempt in range(3):  # UDP: a lost datagram is retried, a wrong one is a failure
        s.sendto(data, (sys.argv[1], int(sys.argv[2])))
        try:
            back, peer = s.recvfrom(65535)
        except TimeoutError:
            continue
        assert back == data[::-1], (size, len(back))
        out["ok"] += 1
        out["peer"] = peer[0]
        break
print(json.dumps(out))
"""


def test_udp_both_ways(vbox: Sandbox) -> None:
    """Datagrams from 1 byte to 60000 bytes (one 64 KiB frame: 15 RX buffers of 4 KiB) go to
    a remote echo server and come back reversed, source address and contents intact."""
    configure_guest(vbox)
    sizes = [1, 100, 1472, 1473, 9000, 32768, 60000]
    ready = vbox.dir / "udp-ready"
    vbox.popen_in(vbox.world_ns, sys.executable, "-c", UDP_ECHO, GW4, "6001", str(ready),
                  str(len(sizes)), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(ready.exists, 10, "the UDP echo server")
    r = vbox.guest(sys.executable, "-c", UDP_CLIENT, GW4, "6001", *map(str, sizes), timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr + vbox.daemon_log()
    assert json.loads(r.stdout) == {"ok": len(sizes), "peer": GW4}


def _serve(box: Sandbox, port: int, action: str, arg: str | None = None,
           addr: str = GW4) -> None:
    ready = box.dir / f"srv-{port}"
    cmd = [sys.executable, TOOL, "serve", addr, str(port), action, str(ready)]
    box.popen_in(box.world_ns, *cmd, *([arg] if arg else []), stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
    wait_until(ready.exists, 10, f"server on {addr}:{port}")


def _client(box: Sandbox, port: int, *args: object, addr: str = GW4) -> dict:
    r = box.guest(sys.executable, TOOL, "connect", addr, str(port), *map(str, args),
                  timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr + box.daemon_log() + box.relay_log()
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def test_tcp_200mib_each_way(vbox: Sandbox) -> None:
    """200 MiB guest -> remote and 200 MiB remote -> guest, sha256 checked at the far end;
    afterwards the daemon's counters show the RX path taken (in place, or bounced) and that
    not a frame was dropped for want of guest buffers."""
    configure_guest(vbox)
    size = 200 * MIB
    _serve(vbox, 5001, "sink")
    r = _client(vbox, 5001, "send", size)
    assert r["answer"] == [str(size), r["sha"]], r

    from tests.netns import tcp_tool
    _serve(vbox, 5003, "source", str(size))
    r = _client(vbox, 5003, "recv")
    assert (r["bytes"], r["sha"]) == (size, tcp_tool.pattern(size)[1]), r

    from_guest, to_guest, in_place, dropped, scattered = closing_counters(vbox)
    assert from_guest > size // 65536 and to_guest > size // 65536
    assert dropped == 0
    assert in_place > size // 65536  # the data frames went in place, not bounced
    # with GUEST_CSUM (the bridge takes it) TCP's frames went through rx_fill(): the read,
    # headers and commit in one C call, not rx_scatter() and a Python read
    filled = re.search(r"(\d+) frames read and committed in one call", front_end_gone_line(vbox))
    assert filled and int(filled.group(1)) > size // 65536, front_end_gone_line(vbox)
    if vbox.rx_buf == FULL_RX_BUF:  # type: ignore[attr-defined]
        assert scattered == 0
    else:  # each over several 4 KiB buffers: one copy, socket to guest memory
        assert scattered > size // 65536


def closing_counters(box: Sandbox, tso: bool = False) -> tuple[int, ...]:
    """Frames from the guest, to it, of those written in place and dropped, and in place
    over several buffers, from the daemon's closing line (and with `tso` the TSO frames
    from the guest and to it)."""
    gone = front_end_gone_line(box)
    m = re.search(r"(\d+) frames from the guest, (\d+) to it \((\d+) written in place, "
                  r"(\d+) dropped\), (\d+) in place over several buffers, "
                  r"TSO frames (\d+) from the guest, (\d+) to it", gone)
    assert m, gone
    return tuple(map(int, m.groups() if tso else m.groups()[:5]))


@pytest.mark.parametrize("family", [4, 6], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("mtu", [1500, 65520])
def test_tcp_tso_both_ways(sandbox: Sandbox, mtu: int, family: int) -> None:
    """TSO negotiated both ways (the tap's kernel is a guest with HOST_TSO and GUEST_TSO,
    Linux-sized 4 KiB RX buffers): 50 MiB guest -> remote and remote -> guest, sha256 checked.
    At MTU 1500 the daemon's and the bridge's counters show frames bigger than the MTU
    going both ways (the daemon's TSO frames to the guest written in place over the guest's
    buffers, with a partial checksum the guest's kernel completes when it segments); for
    IPv4 the pcap capture shows them too."""
    pcap = mtu == 1500 and family == 4
    start_vhost_daemon(sandbox, "--no-map-gw", pcap=pcap)
    start_vhost_relay(sandbox, "--rx-buf-size", "4096", "--tso")
    configure_guest(sandbox, {"ip": HOST4, "mtu": str(mtu), "router": GW4})
    addr = GW4
    if family == 6:
        sandbox.guest("ip", "-6", "addr", "add", f"{HOST6}/64", "dev", "tap0", "nodad",
                      check=True)
        addr = GW6
    running = [ln for ln in sandbox.daemon_stderr_text().splitlines()
               if "device running" in ln]
    assert running and "from the guest: csum tso4 tso6 ecn; to the guest: csum tso4 tso6" \
        in running[-1], running
    size = 50 * MIB
    _serve(sandbox, 5001, "sink", addr=addr)
    r = _client(sandbox, 5001, "send", size, addr=addr)
    assert r["answer"] == [str(size), r["sha"]], r
    from tests.netns import tcp_tool
    _serve(sandbox, 5003, "source", str(size), addr=addr)
    r = _client(sandbox, 5003, "recv", addr=addr)
    assert (r["bytes"], r["sha"]) == (size, tcp_tool.pattern(size)[1]), r
    from_guest, to_guest, in_place, dropped, scattered, gso_in, gso_out = \
        closing_counters(sandbox, tso=True)
    relay = sandbox.relay_status()  # its last, after it stopped
    assert dropped == 0 and relay.get("tap_errors") == "0", relay
    if mtu == 1500:  # 64 KiB frames each way: a few per 64 KiB, not 45
        assert gso_in > size // 65536 // 2 and gso_out > size // 65536 // 2
        assert int(relay["gso_to_guest"]) >= gso_in and int(relay["gso_to_tap"]) == gso_out
        assert from_guest < size // 1448 // 4 and to_guest < size // 1448 // 4
        assert scattered > gso_out // 2  # in place over several 4 KiB buffers
    else:  # one segment of 65480 bytes is already the biggest frame
        assert gso_out == 0
    if pcap:
        big = _pcap_big_frames(Path(sandbox.pcap_path), 14 + mtu)
        assert big[True] > size // 65536 // 2 and big[False] > size // 65536 // 2, big


def _pcap_big_frames(path: Path, limit: int) -> dict[bool, int]:
    """Frames longer than `limit` in a pcap file, counted by direction (True: from the guest,
    whose MAC is the source; the daemon's frames come from 9a:55:9a:55:9a:55)."""
    data = path.read_bytes()
    out = {True: 0, False: 0}
    off = 24
    while off + 16 <= len(data):
        incl, orig = struct.unpack_from("=II", data, off + 8)
        if orig > limit:
            out[data[off + 16 + 6:off + 16 + 12] != bytes.fromhex("9a559a559a55")] += 1
        off += 16 + incl
    return out


def test_tcp_scattered_frames_checksummed_without_offload(sandbox: Sandbox) -> None:
    """Without GUEST_CSUM the TCP checksum of a frame spread over 4 KiB buffers is computed
    over the pieces (odd boundaries included: --rx-buf-size 4093), and the guest's kernel,
    which checks it, takes 50 MiB intact."""
    start_vhost_daemon(sandbox, "--no-map-gw")
    start_vhost_relay(sandbox, "--rx-buf-size", "4093", "--no-csum")
    configure_guest(sandbox)
    size = 50 * MIB
    from tests.netns import tcp_tool
    _serve(sandbox, 5003, "source", str(size))
    r = _client(sandbox, 5003, "recv")
    assert (r["bytes"], r["sha"]) == (size, tcp_tool.pattern(size)[1]), r
    _, to_guest, in_place, dropped, scattered = closing_counters(sandbox)
    assert dropped == 0 and scattered > size // 65536


def test_tcp_at_mtu_1500_many_frames(vbox: Sandbox) -> None:
    """100 MiB each way at MTU 1500: some 75 000 frames per direction, so both rings' 16-bit
    indices wrap; a torn index read (the bridge once moved ring indices byte by byte) showed
    up here as a back end disconnecting on "avail idx moved by 7255"."""
    configure_guest(vbox, {"ip": HOST4, "mtu": "1500", "router": GW4})
    size = 100 * MIB
    _serve(vbox, 5001, "sink")
    r = _client(vbox, 5001, "send", size)
    assert r["answer"] == [str(size), r["sha"]], r
    _serve(vbox, 5003, "source", str(size))
    r = _client(vbox, 5003, "recv")
    assert r["bytes"] == size, r
    gone = front_end_gone_line(vbox)
    assert " 0 dropped" in gone and "disconnecting" not in vbox.daemon_log(), gone
