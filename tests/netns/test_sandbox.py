"""The end-to-end sandbox itself, without vhostpasst: namespaces, resolv.conf, and the relay.

The relay is checked against a fake stream server in this process (a UNIX listener speaking
qemu's 4-byte length framing), with the guest namespace's kernel on the tap side.
"""

from __future__ import annotations

import os
import random
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.sandbox import (
    DEFAULT_RESOLV,
    NS_PREFIX,
    Sandbox,
    SandboxConfig,
    StreamClient,
    frame_bytes,
    mac_bytes,
    mac_str,
    wait_until,
)

SERVER_MAC = "9a:55:9a:55:9a:55"


class FakeServer:
    """Listens where the daemon would and hands out framed connections."""

    def __init__(self, path: str) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(1)

    def accept(self, timeout: float = 10) -> StreamClient:
        self.listener.settimeout(timeout)
        conn, _ = self.listener.accept()
        return StreamClient(None, sock=conn)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake_server(sandbox: Sandbox) -> Iterator[FakeServer]:
    server = FakeServer(sandbox.socket_path)
    yield server
    server.close()


def arp_frame(op: int, src_mac: str, dst_mac: str, sender_ip: str, target_ip: str,
              target_mac: str = "00:00:00:00:00:00") -> bytes:
    body = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, op, mac_bytes(src_mac),
                       socket.inet_aton(sender_ip), mac_bytes(target_mac),
                       socket.inet_aton(target_ip))
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + b"\x08\x06" + body


def parse_arp(frame: bytes) -> dict[str, object] | None:
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    op, smac, sip, tmac, tip = struct.unpack_from("!6xH6s4s6s4s", frame, 14)
    return {"op": op, "sender_mac": mac_str(smac), "sender_ip": socket.inet_ntoa(sip),
            "target_mac": mac_str(tmac), "target_ip": socket.inet_ntoa(tip),
            "eth_src": mac_str(frame[6:12]), "eth_dst": mac_str(frame[:6])}


def rx_packets(sandbox: Sandbox) -> int:
    stats = Path(f"/sys/class/net/{sandbox.config.tap}/statistics/rx_packets")
    # sysfs shows the reading process's namespace: read it from inside the guest
    return int(sandbox.guest("cat", str(stats), check=True).stdout)


def tap_mac(sandbox: Sandbox) -> str:
    r = sandbox.guest("cat", f"/sys/class/net/{sandbox.config.tap}/address", check=True)
    return r.stdout.strip()


# --- namespaces ---------------------------------------------------------------------------


def test_host_namespace_has_upstream_addresses_and_routes(sandbox: Sandbox) -> None:
    """In the host namespace, up0 looks like a real uplink: addresses, default routes, MTU."""
    addrs = sandbox.host("ip", "addr", "show", "dev", "up0", check=True).stdout
    assert "inet 192.0.2.2/24" in addrs
    assert "inet6 2001:db8::2/64" in addrs
    assert "mtu 1500" in addrs
    assert "default via 192.0.2.1 dev up0" in sandbox.host("ip", "-4", "route", check=True).stdout
    routes6 = sandbox.host("ip", "-6", "route", check=True).stdout
    assert "default via 2001:db8::1 dev up0" in routes6
    # the gateway exists (the veth's far end), so the host namespace is a working network
    assert sandbox.host("busybox", "ping", "-c1", "-W2", "192.0.2.1").returncode == 0


@pytest.mark.sandbox(mtu=9000, ipv6=False)
def test_host_namespace_follows_config(sandbox: Sandbox) -> None:
    addrs = sandbox.host("ip", "addr", "show", "dev", "up0", check=True).stdout
    assert "mtu 9000" in addrs
    assert "inet6 2001:db8" not in addrs


def test_host_namespace_sees_test_resolv_conf(sandbox: Sandbox) -> None:
    """Processes in the host namespace read the test's resolv.conf; the machine's is untouched."""
    assert sandbox.host("cat", "/etc/resolv.conf", check=True).stdout == DEFAULT_RESOLV
    assert Path("/etc/resolv.conf").read_text() != DEFAULT_RESOLV


@pytest.mark.sandbox(resolv_conf="nameserver 198.51.100.1\nsearch one.example\n")
def test_resolv_conf_is_configurable(sandbox: Sandbox) -> None:
    out = sandbox.host("cat", "/etc/resolv.conf", check=True).stdout
    assert out == "nameserver 198.51.100.1\nsearch one.example\n"


def test_guest_namespace_has_a_tap_without_carrier(sandbox: Sandbox) -> None:
    """The guest's NIC exists and is up, but has no carrier until something attaches to it."""
    link = sandbox.guest("ip", "link", "show", "dev", "tap0", check=True).stdout
    assert "UP" in link and "NO-CARRIER" in link
    # and the guest namespace has no route anywhere yet
    assert sandbox.guest("ip", "-4", "route", check=True).stdout.strip() == ""


def test_namespace_names_are_unique_and_removed_at_teardown() -> None:
    boxes = [Sandbox(SandboxConfig()).setup() for _ in range(2)]
    names = {ns for b in boxes for ns in (b.host_ns, b.guest_ns, b.world_ns)}
    assert len(names) == 6
    assert all(n.startswith(f"{NS_PREFIX}{os.getpid()}-") for n in names)
    sleeper = boxes[0].popen_in(boxes[0].guest_ns, "sleep", "60")
    for b in boxes:
        assert b.teardown() == []
    assert sleeper.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not names & {line.split()[0] for line in listed.splitlines() if line.split()}
    assert not any(Path("/etc/netns", n).exists() for n in names)
    assert not any(b.dir.exists() for b in boxes)


# --- the relay ----------------------------------------------------------------------------


def test_relay_delivers_server_frames_to_the_guest_kernel(sandbox: Sandbox,
                                                          fake_server: FakeServer) -> None:
    """An ARP request written to the socket reaches the guest's kernel, which answers it."""
    sandbox.guest("ip", "addr", "add", "192.0.2.2/24", "dev", "tap0", check=True)
    sandbox.start_relay()
    conn = fake_server.accept()
    wait_until(lambda: "NO-CARRIER" not in sandbox.guest("ip", "link", "show", "tap0").stdout,
               5, "tap0 carrier")
    before = rx_packets(sandbox)

    conn.send_frame(arp_frame(1, SERVER_MAC, "ff:ff:ff:ff:ff:ff", "192.0.2.1", "192.0.2.2"))
    reply = conn.frames_until(lambda f: (a := parse_arp(f)) and a["op"] == 2 and a, timeout=5)

    assert reply, "the guest never answered the ARP request"
    assert reply["sender_ip"] == "192.0.2.2" and reply["sender_mac"] == tap_mac(sandbox)
    assert reply["target_ip"] == "192.0.2.1" and reply["eth_dst"] == SERVER_MAC
    assert rx_packets(sandbox) == before + 1
    assert sandbox.guest_neighbours().get("192.0.2.1") == SERVER_MAC
    conn.close()


def test_relay_reassembles_frames_split_and_merged_on_the_stream(
        sandbox: Sandbox, fake_server: FakeServer) -> None:
    """However the stream cuts the bytes, each frame reaches the tap whole, exactly once."""
    sandbox.start_relay()
    conn = fake_server.accept()
    before = rx_packets(sandbox)
    rng = random.Random(1)
    frames = [mac_bytes("ff:ff:ff:ff:ff:ff") + mac_bytes(SERVER_MAC) + b"\x88\xb5"
              + bytes(rng.randrange(256) for _ in range(n)) for n in (46, 100, 1486, 3000, 46)]
    stream = b"".join(frame_bytes(f) for f in frames)
    # cut inside length headers, at frame boundaries and at random places
    cuts = sorted({0, 1, 2, 3, 5, 61, 62, 200, 1700, len(stream),
                   *rng.sample(range(len(stream)), 20)})
    for a, b in zip(cuts, cuts[1:], strict=False):
        conn.send_raw(stream[a:b])
    wait_until(lambda: rx_packets(sandbox) >= before + len(frames), 5, "frames on tap0")
    assert rx_packets(sandbox) == before + len(frames)
    assert int(sandbox.wait_relay("connected")["connections"]) == 1
    conn.close()


def test_relay_frames_what_the_guest_kernel_sends(sandbox: Sandbox,
                                                  fake_server: FakeServer) -> None:
    """A ping in the guest makes its kernel ask for the target's MAC: the server gets that ARP
    request, correctly framed."""
    sandbox.guest("ip", "addr", "add", "192.0.2.2/24", "dev", "tap0", check=True)
    sandbox.start_relay()
    conn = fake_server.accept()
    ping = sandbox.popen_in(sandbox.guest_ns, "busybox", "ping", "-c1", "-W1", "192.0.2.77",
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen: list[bytes] = []

    def arp_for_77(frame: bytes) -> dict[str, object] | None:
        seen.append(frame)
        a = parse_arp(frame)
        return a if a and a["op"] == 1 and a["target_ip"] == "192.0.2.77" else None

    request = conn.frames_until(arp_for_77, timeout=5)
    assert request, f"no ARP request among {len(seen)} frames"
    assert request["sender_ip"] == "192.0.2.2"
    assert request["eth_src"] == request["sender_mac"] == tap_mac(sandbox)
    assert request["eth_dst"] == "ff:ff:ff:ff:ff:ff"
    # every frame the relay framed is a plausible Ethernet frame (IPv6 chatter included)
    assert all(len(f) >= 42 and f[12:14] in (b"\x08\x06", b"\x08\x00", b"\x86\xdd")
               for f in seen)
    ping.wait(5)
    conn.close()


def test_relay_exits_when_the_socket_closes(sandbox: Sandbox, fake_server: FakeServer) -> None:
    relay = sandbox.start_relay()
    fake_server.accept().close()
    assert relay.wait(5) == 0
    assert sandbox.relay_status()["state"] == "exited"


def test_relay_reconnects_when_asked(sandbox: Sandbox, fake_server: FakeServer) -> None:
    """With --reconnect the relay dials again after the server drops it (a daemon restart)."""
    sandbox.guest("ip", "addr", "add", "192.0.2.2/24", "dev", "tap0", check=True)
    sandbox.start_relay(reconnect=True)
    fake_server.accept().close()
    conn = fake_server.accept()
    sandbox.wait_relay("connected", connections=2)
    conn.send_frame(arp_frame(1, SERVER_MAC, "ff:ff:ff:ff:ff:ff", "192.0.2.1", "192.0.2.2"))
    assert conn.frames_until(lambda f: (a := parse_arp(f)) and a["op"] == 2, timeout=5)
    conn.close()


def test_relay_gives_up_when_nobody_listens(sandbox: Sandbox) -> None:
    relay = sandbox.start_relay(wait=False, timeout=0.5)
    assert relay.wait(10) == 1
