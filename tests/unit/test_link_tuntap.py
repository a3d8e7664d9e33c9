"""The tap link: unit tests over a SOCK_SEQPACKET pair (one frame per read, like a tap), and a
real tap device inside a private network namespace.

The namespace tests run their body in a child process under `unshare -n` (this file executed
as a script with the scenario's name), so the tap, its address and every frame exist only in
a namespace that dies with the child: nothing reaches the host's network.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from vhostpasst.core.loop import Loop
from vhostpasst.core.pcap import PcapWriter
from vhostpasst.link.base import ETH_MAX_FRAME
from vhostpasst.link.tuntap import TapLink, open_tap

TAP_MAC = bytes.fromhex("020000000001")  # the kernel side's MAC (set on the tap)
PEER_MAC = bytes.fromhex("020000000009")  # the "guest" we play through TapLink
TAP_IP = "192.0.2.1"
PEER_IP = "192.0.2.9"


def frame(i: int, size: int = 60) -> bytes:
    return bytes.fromhex("02000000000a" "9a559a559a55" "88b5") + bytes([i % 256]) * (size - 14)


class Harness:
    def __init__(self) -> None:
        self.loop = Loop()
        self.frames: list[bytes] = []
        self.batches: list[int] = []
        self.exits = 0

    def on_frames(self, frames: Sequence[memoryview]) -> None:
        self.batches.append(len(frames))
        self.frames.extend(bytes(f) for f in frames)

    def on_exit(self) -> None:
        self.exits += 1

    def run_until(self, cond: Callable[[], object], timeout: float = 3.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() >= deadline:
                raise AssertionError("condition not met in time")
            self.loop.run_once(0.02)


# --- unit tests over a SEQPACKET socketpair ----------------------------------------------
@pytest.fixture
def pair() -> Iterator[tuple[Harness, TapLink, socket.socket]]:
    h = Harness()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = TapLink(h.loop, a.detach(), h.on_frames, on_exit=h.on_exit)
    b.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)  # room for max-size frames
    b.settimeout(3.0)
    yield h, link, b
    link.close()
    b.close()
    h.loop.close()


def test_rx_frames_and_short_ones_ignored(pair: tuple[Harness, TapLink, socket.socket]) -> None:
    h, link, peer = pair
    peer.send(frame(1))
    peer.send(b"\x01" * 13)  # shorter than an Ethernet header
    peer.send(frame(2, ETH_MAX_FRAME - 14))
    peer.send(frame(3, 14))
    h.run_until(lambda: len(h.frames) == 3)
    assert h.frames == [frame(1), frame(2, ETH_MAX_FRAME - 14), frame(3, 14)]
    assert link.rx_short == 1
    assert h.batches == [3]  # all read in one wake-up, handed over together


def test_reads_per_wakeup_are_bounded() -> None:
    h = Harness()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    link = TapLink(h.loop, a.detach(), h.on_frames, max_reads=3)
    for i in range(10):
        b.send(frame(i))
    h.loop.run_once(0.1)
    assert h.batches == [3]
    h.run_until(lambda: len(h.frames) == 10)
    assert h.batches == [3, 3, 3, 1]
    assert h.frames == [frame(i) for i in range(10)]
    link.close()
    b.close()
    h.loop.close()


def test_tx_one_write_per_frame(pair: tuple[Harness, TapLink, socket.socket]) -> None:
    h, link, peer = pair
    bufs = link.rx_buffers(4)
    assert len(bufs) == 4
    for i, buf in enumerate(bufs[:3]):
        buf[:100] = frame(i, 100)
    link.commit([100, 100, 100])
    assert link.send(frame(9, 77))
    h.loop.run_once(0.0)
    got = [peer.recv(70000) for _ in range(4)]
    assert got == [frame(0, 100), frame(1, 100), frame(2, 100), frame(9, 77)]
    assert link.tx_frames == 4


def test_pcap_both_directions(tmp_path: Path) -> None:
    h = Harness()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pcap = PcapWriter(str(tmp_path / "tap.pcap"), flush_every=1000)  # no loop of its own
    link = TapLink(h.loop, a.detach(), h.on_frames, pcap=pcap)
    b.send(frame(1, 64))
    h.run_until(lambda: h.frames)
    link.send(frame(2, 70))
    h.loop.run_once(0.0)
    assert pcap.frames == 2
    # the link's flush hook put both on disk, before any close
    assert (tmp_path / "tap.pcap").stat().st_size == 24 + 16 + 64 + 16 + 70
    pcap.close()
    link.close()
    b.close()
    h.loop.close()


def test_tx_full_queue_drops_frames(pair: tuple[Harness, TapLink, socket.socket]) -> None:
    h, link, peer = pair
    for _ in range(4):  # the peer never reads: its queue fills, writes get EAGAIN
        bufs = link.rx_buffers(128)
        for buf in bufs:
            buf[:60000] = frame(1, 60000)
        link.commit([60000] * len(bufs))
        link.flush()
    assert link.tx_dropped > 0
    assert link.tx_frames + link.tx_dropped == 4 * 128
    assert link.connected and h.exits == 0


def test_eof_is_fatal(pair: tuple[Harness, TapLink, socket.socket]) -> None:
    h, link, peer = pair
    peer.send(frame(5))
    peer.close()
    h.run_until(lambda: h.exits == 1)
    assert h.frames == [frame(5)]  # frames read before the EOF are still delivered
    assert not link.connected
    assert not link.send(frame(1))
    assert link.rx_buffers(1) == []
    h.loop.run_once(0.0)
    assert h.exits == 1


def test_write_error_other_than_drop_is_fatal(pair: tuple[Harness, TapLink, socket.socket]) -> None:
    h, link, peer = pair
    peer.shutdown(socket.SHUT_RDWR)  # writes now fail with EPIPE, not a "drop" errno
    link.send(frame(1))
    link.flush()
    assert h.exits == 1
    assert not link.connected


def test_open_tap_rejects_long_name() -> None:
    with pytest.raises(ValueError):
        open_tap("x" * 16)


# --- a real tap device in a private network namespace ------------------------------------
def _can_netns() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    for tool in ("unshare", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    return None


def run_in_netns(scenario: str, timeout: float = 30) -> dict[str, Any]:
    """Run `scenario` (a function below) in a child under `unshare -n`; its JSON result."""
    reason = _can_netns()
    if reason:
        pytest.skip(reason)
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, __file__, scenario],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=dict(os.environ, VP_PARENT_NETNS=os.readlink("/proc/self/ns/net")),
    )
    assert proc.returncode == 0, f"scenario {scenario} failed:\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_tap_in_netns_arp_and_udp_both_ways() -> None:
    r = run_in_netns("scenario_arp_udp")
    assert r["arp_request"] == {"sender_ip": TAP_IP, "target_ip": PEER_IP, "src": TAP_MAC.hex()}
    assert r["neighbour"].startswith(PEER_IP) and PEER_MAC.hex(":") in r["neighbour"]
    assert r["udp_out"] == {"dst": PEER_IP, "dport": 9, "payload": "hello tap"}
    assert r["udp_in"] == ["from the guest", PEER_IP]
    assert r["rx_packets_delta"] >= 2  # our ARP reply and our UDP datagram
    assert r["tx_dropped_when_down"] == 1
    assert r["exits_after_delete"] == 1


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, timeout=10)


def _ipv4_udp(src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """Ethernet + IPv4 + UDP (checksum 0: none), written here independently of vhostpasst."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0x4000, 64, 17, 0,
        socket.inet_aton(src), socket.inet_aton(dst),
    )
    s = sum(struct.unpack("!10H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    hdr = hdr[:10] + struct.pack("!H", ~s & 0xFFFF) + hdr[12:]
    return TAP_MAC + PEER_MAC + b"\x08\x00" + hdr + udp


def _arp_reply() -> bytes:
    arp = struct.pack(
        "!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 2,
        PEER_MAC, socket.inet_aton(PEER_IP), TAP_MAC, socket.inet_aton(TAP_IP),
    )
    return TAP_MAC + PEER_MAC + b"\x08\x06" + arp + bytes(18)


def _rx_packets(ifname: str) -> int:
    """From /proc/net/dev, which follows our namespace (/sys shows the mounter's)."""
    for line in Path("/proc/net/dev").read_text().splitlines():
        name, _, stats = line.partition(":")
        if name.strip() == ifname:
            return int(stats.split()[1])
    raise LookupError(ifname)


def scenario_arp_udp() -> dict[str, object]:
    result: dict[str, object] = {}
    fd, name = open_tap("vptap0")
    assert name == "vptap0"
    ip("link", "set", name, "address", TAP_MAC.hex(":"), "up")
    ip("addr", "add", f"{TAP_IP}/24", "dev", name)
    h = Harness()
    link = TapLink(h.loop, fd, h.on_frames, on_exit=h.on_exit)

    peer_ip = socket.inet_aton(PEER_IP)

    def arp_request() -> bytes | None:
        for f in h.frames:
            if f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x01" and f[38:42] == peer_ip:
                return f
        return None

    def udp_out() -> bytes | None:
        for f in h.frames:
            if f[12:14] == b"\x08\x00" and f[23] == 17 and f[30:34] == peer_ip:
                return f
        return None

    # The kernel resolves 192.0.2.9 before sending: its ARP request comes out of the tap.
    out = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    out.sendto(b"hello tap", (PEER_IP, 9))
    h.run_until(arp_request)
    req = arp_request()
    assert req is not None
    result["arp_request"] = {
        "sender_ip": socket.inet_ntoa(req[28:32]),
        "target_ip": socket.inet_ntoa(req[38:42]),
        "src": req[6:12].hex(),
    }
    # Our reply, written through TapLink, fills the kernel's neighbour table...
    rx_before = _rx_packets(name)
    assert link.send(_arp_reply())
    h.loop.run_once(0.0)
    # ...so the queued datagram follows.
    h.run_until(udp_out)
    f = udp_out()
    assert f is not None
    ihl = (f[14] & 0xF) * 4
    udp = f[14 + ihl :]
    result["udp_out"] = {
        "dst": socket.inet_ntoa(f[30:34]),
        "dport": struct.unpack("!H", udp[2:4])[0],
        "payload": udp[8:].decode(),
    }
    result["neighbour"] = subprocess.run(
        ["ip", "neigh", "show", PEER_IP, "dev", name], capture_output=True, text=True, timeout=10
    ).stdout.strip()
    # A datagram the "guest" sends reaches a socket in the namespace.
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind((TAP_IP, 5555))
    sink.settimeout(3)
    assert link.send(_ipv4_udp(PEER_IP, TAP_IP, 4444, 5555, b"from the guest"))
    h.loop.run_once(0.0)
    data, addr = sink.recvfrom(100)
    result["udp_in"] = [data.decode(), addr[0]]
    result["rx_packets_delta"] = _rx_packets(name) - rx_before
    # Interface down: writes fail with EIO, the frame is dropped, the link lives on.
    ip("link", "set", name, "down")
    link.send(_arp_reply())
    link.flush()
    result["tx_dropped_when_down"] = link.tx_dropped
    assert link.connected and h.exits == 0
    # The device goes away: fatal.
    ip("link", "del", name)
    h.run_until(lambda: h.exits)
    result["exits_after_delete"] = h.exits
    h.loop.close()
    return result


if __name__ == "__main__":
    # Child side of run_in_netns(): refuse to run outside a fresh namespace, so a stray
    # invocation can't create taps or send frames on the host.
    parent_ns = os.environ.get("VP_PARENT_NETNS")
    if parent_ns is None or os.readlink("/proc/self/ns/net") == parent_ns:
        sys.exit("refusing to run a tap scenario outside a namespace of its own")
    print(json.dumps(globals()[sys.argv[1]]()))
