"""TCP end to end: the guest namespace's kernel is the TCP peer, behind tests/netns/relay.py and
vhostpasst; "remote" servers run in the world namespace, local ones in the host namespace
(see tests/netns/sandbox.py). Programs in tests/netns/tcp_tool.py move pattern data and report
sha256.
"""

from __future__ import annotations

import json
import sys

import pytest

from tests.netns.sandbox import Sandbox
from tests.netns.tcp_guest import (
    GW4,
    GW6,
    HOST4,
    HOST6,
    MIB,
    OUR_MAC,
    TOOL,
    client,
    configure_guest,
    log_lines,
    serve,
    start,
)

# --- guest -> host ------------------------------------------------------------------------


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.parametrize("size", [1024, 200 * MIB], ids=["1KiB", "200MiB"])
def test_guest_to_remote(sandbox: Sandbox, six: bool, size: int) -> None:
    start(sandbox, "--no-map-gw")
    server = GW6 if six else GW4
    log = serve(sandbox, sandbox.world_ns, server, 5001, "sink")
    r = client(sandbox, sandbox.guest_ns, server, 5001, "send", size)
    assert r["answer"] == [str(size), r["sha"]], r
    line = log_lines(log)[0].split()
    assert line[0] == (HOST6 if six else HOST4)  # no NAT: the host's own address


def test_gateway_reaches_the_hosts_loopback(sandbox: Sandbox) -> None:
    """map-host-loopback (the default): the gateway address is the host's 127.0.0.1."""
    start(sandbox)
    log = serve(sandbox, sandbox.host_ns, "127.0.0.1", 5002, "sink")
    r = client(sandbox, sandbox.guest_ns, GW4, 5002, "send", 4 * MIB)
    assert r["answer"] == [str(4 * MIB), r["sha"]], r
    assert log_lines(log)[0].startswith("127.0.0.1 ")


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_remote_to_guest_download(sandbox: Sandbox, six: bool) -> None:
    """The guest reads a stream from a remote server: host -> guest through MSG_PEEK."""
    start(sandbox, "--no-map-gw")
    server = GW6 if six else GW4
    serve(sandbox, sandbox.world_ns, server, 5003, "source", str(200 * MIB))
    r = client(sandbox, sandbox.guest_ns, server, 5003, "recv")
    _, digest = _pattern_sha(200 * MIB)
    assert r == {"bytes": 200 * MIB, "sha": digest, "seconds": r["seconds"]}


def _pattern_sha(n: int) -> tuple[int, str]:
    from tests.netns import tcp_tool
    return n, tcp_tool.pattern(n)[1]


def test_both_directions_at_once(sandbox: Sandbox) -> None:
    start(sandbox, "--no-map-gw")
    serve(sandbox, sandbox.world_ns, GW4, 5004, "echo")
    r = client(sandbox, sandbox.guest_ns, GW4, 5004, "both", 16 * MIB)
    assert r["echo_bytes"] == 16 * MIB and r["echo_sha"] == r["sha"], r


def test_connect_to_closed_port_is_refused(sandbox: Sandbox) -> None:
    start(sandbox, "--no-map-gw")
    assert client(sandbox, sandbox.guest_ns, GW4, 5999, "refused") == {"refused": True}
    assert client(sandbox, sandbox.guest_ns, GW6, 5999, "refused") == {"refused": True}


def test_half_close_guest_first(sandbox: Sandbox) -> None:
    """The guest shuts down writing; the server still answers afterwards (sink mode)."""
    start(sandbox, "--no-map-gw")
    serve(sandbox, sandbox.world_ns, GW4, 5005, "sink")
    r = client(sandbox, sandbox.guest_ns, GW4, 5005, "shutrd", 3 * MIB)
    assert r["bytes"] > 0  # the answer came after our FIN


def test_half_close_remote_first(sandbox: Sandbox) -> None:
    """The server shuts down writing first; the guest sees EOF and keeps sending."""
    start(sandbox, "--no-map-gw")
    log = serve(sandbox, sandbox.world_ns, GW4, 5006, "shutwr")
    r = client(sandbox, sandbox.guest_ns, GW4, 5006, "halfserver", 2 * MIB)
    assert r["first"] == "server-data" and r["eof"], r
    _, n, digest = log_lines(log)[0].split()
    assert (int(n), digest) == (2 * MIB, r["sha"])


def test_guest_reset_resets_the_remote(sandbox: Sandbox) -> None:
    """passt closes the host socket gracefully on a guest RST; we reset it."""
    start(sandbox, "--no-map-gw")
    log = serve(sandbox, sandbox.world_ns, GW4, 5007, "hold")
    client(sandbox, sandbox.guest_ns, GW4, 5007, "rst")
    line = log_lines(log)[0]
    assert line.endswith("error 104"), line  # ECONNRESET, not EOF


def test_remote_reset_resets_the_guest(sandbox: Sandbox) -> None:
    start(sandbox, "--no-map-gw")
    serve(sandbox, sandbox.world_ns, GW4, 5008, "rst")
    assert client(sandbox, sandbox.guest_ns, GW4, 5008, "waitrst") == {"reset": True}


# --- host -> guest: -t ----------------------------------------------------------------------


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_forward_with_translation(sandbox: Sandbox, six: bool) -> None:
    """-t 10022:22: a remote client reaches the guest's port 22 (200 MiB)."""
    start(sandbox, "-t", "10022:22")
    log = serve(sandbox, sandbox.guest_ns, "::" if six else "0.0.0.0", 22, "sink")
    host = HOST6 if six else HOST4
    r = client(sandbox, sandbox.world_ns, host, 10022, "send", 200 * MIB)
    assert r["answer"] == [str(200 * MIB), r["sha"]], r
    assert log_lines(log)[0].split()[0] == (GW6 if six else GW4)  # the remote, unchanged


def test_forward_download_from_guest(sandbox: Sandbox) -> None:
    start(sandbox, "-t", "10080:80")
    serve(sandbox, sandbox.guest_ns, "0.0.0.0", 80, "source", str(20 * MIB))
    r = client(sandbox, sandbox.world_ns, HOST4, 10080, "recv")
    assert (r["bytes"], r["sha"]) == _pattern_sha(20 * MIB)


def test_forward_from_host_loopback_appears_as_gateway(sandbox: Sandbox) -> None:
    start(sandbox, "-t", "8080")
    log = serve(sandbox, sandbox.guest_ns, "0.0.0.0", 8080, "sink")
    r = client(sandbox, sandbox.host_ns, "127.0.0.1", 8080, "send", MIB)
    assert r["answer"] == [str(MIB), r["sha"]], r
    assert log_lines(log)[0].split()[0] == GW4


def test_forward_ranges_and_exclusions(sandbox: Sandbox) -> None:
    start(sandbox, "-t", "6000-6002:7000-7002", "-t", "6100-6103,~6101")
    logs = {port: serve(sandbox, sandbox.guest_ns, "0.0.0.0", port, "sink")
            for port in (7001, 6100, 6101, 6103)}
    for host_port, guest_port in ((6001, 7001), (6100, 6100), (6103, 6103)):
        r = client(sandbox, sandbox.world_ns, HOST4, host_port, "send", 1000)
        assert r["answer"] == ["1000", r["sha"]], (host_port, r)
        assert log_lines(logs[guest_port])
    # excluded: nothing listens on the host, so the remote is refused there
    assert client(sandbox, sandbox.world_ns, HOST4, 6101, "refused") == {"refused": True}
    assert not logs[6101].exists() or not logs[6101].read_text()


def test_forward_to_guest_without_listener_is_reset(sandbox: Sandbox) -> None:
    """The guest answers our SYN with a RST: the host client's connection is reset."""
    start(sandbox, "-t", "10023:23")
    r = client(sandbox, sandbox.world_ns, HOST4, 10023, "waitrst")
    assert r == {"reset": True}


# --- load, flow control, failures -----------------------------------------------------------


def test_many_concurrent_connections(sandbox: Sandbox) -> None:
    """500 connections at once, 1 MiB each, all intact (the issue's figure)."""
    start(sandbox, "--no-map-gw")
    serve(sandbox, sandbox.world_ns, GW4, 5011, "sink")
    count = 500
    r = client(sandbox, sandbox.guest_ns, GW4, 5011, "multi", count, MIB, timeout=240)
    assert r["ok"] == count, r


@pytest.mark.sandbox()
def test_slow_reader_window_closes_and_reopens(sandbox: Sandbox) -> None:
    """The guest application reads slowly from a small buffer: the guest's window goes to
    zero, we stop peeking, and the transfer completes intact once it reopens."""
    sandbox.start_daemon("-t", "10030:30", pcap=True)
    sandbox.start_relay()
    configure_guest(sandbox)
    log = serve(sandbox, sandbox.guest_ns, "0.0.0.0", 30, "slow", "32768")
    r = client(sandbox, sandbox.world_ns, HOST4, 10030, "send", MIB // 4)
    assert r["answer"] == [str(MIB // 4), r["sha"]], r
    assert log_lines(log)
    sandbox.stop_daemon()  # flushes the capture
    from scapy.all import TCP, rdpcap  # type: ignore[import-untyped]
    windows = [p[TCP].window for p in rdpcap(sandbox.pcap_path)
               if TCP in p and p[TCP].sport == 30]
    assert 0 in windows, "the guest never closed its window"
    assert windows[-1] > 0 or windows.count(0) < len(windows)


def test_vanished_guest_lets_the_host_socket_time_out(sandbox: Sandbox,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest goes away mid-transfer: retransmissions back off, then give up, and the
    host client is reset (timeouts shortened through the environment)."""
    monkeypatch.setenv("VHOSTPASST_TCP_MAX_RETRANS", "3")
    monkeypatch.setenv("VHOSTPASST_TCP_RTO_MAX", "1")
    start(sandbox, "-t", "10099:99")
    serve(sandbox, sandbox.guest_ns, "0.0.0.0", 99, "hold")
    out = sandbox.dir / "hold.json"
    with open(out, "w") as f:
        proc = sandbox.popen_in(sandbox.world_ns, sys.executable, TOOL, "connect", HOST4,
                                "10099", "hold", str(1 << 40), stdout=f)
    import time
    time.sleep(1.0)  # data flowing
    sandbox.stop_relay()
    proc.wait(30)
    r = json.loads(out.read_text())
    assert r["reset"] in ("ConnectionResetError", "BrokenPipeError"), r
    assert r["sent"] > 0


def test_syn_flood_is_capped(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections stuck in the handshake (an unreachable destination) are capped; an
    established connection keeps working meanwhile."""
    monkeypatch.setenv("VHOSTPASST_TCP_HALF_OPEN_MAX", "8")
    start(sandbox, "--no-map-gw")
    serve(sandbox, sandbox.world_ns, GW4, 5012, "echo")
    script = (
        "import socket, time\n"
        f"a = socket.create_connection(('{GW4}', 5012), 5)\n"
        "flood = []\n"
        "for i in range(40):\n"
        "    s = socket.socket(); s.setblocking(False)\n"
        "    s.connect_ex(('192.0.2.99', 80)); flood.append(s)\n"
        "time.sleep(0.5)\n"
        "a.sendall(b'x' * 100000); got = 0\n"
        "while got < 100000:\n"
        "    got += len(a.recv(65536))\n"
        "print('ok', got)\n")
    r = sandbox.guest(sys.executable, "-c", script, timeout=30)
    assert r.stdout.strip() == "ok 100000", r.stdout + r.stderr
    assert "connections in the handshake: SYN dropped" in sandbox.daemon_log()


def test_segment_for_unknown_connection_gets_rst(sandbox: Sandbox) -> None:
    """A raw frame over the stream socket: an ACK for no connection gets RST(seq=ACK)."""
    from scapy.layers.inet import IP, TCP  # type: ignore[import-untyped]
    from scapy.layers.l2 import Ether  # type: ignore[import-untyped]

    from tests.netns.sandbox import StreamClient
    sandbox.start_daemon()
    with StreamClient(sandbox.socket_path) as c:
        frame = Ether(src="02:00:00:00:00:02", dst=OUR_MAC) / IP(src=HOST4, dst=GW4) / TCP(
            sport=40000, dport=5555, flags="A", seq=1, ack=12345)
        c.send_frame(bytes(frame))

        def rst(raw: bytes) -> TCP | None:
            pkt = Ether(raw)
            return pkt[TCP] if TCP in pkt and pkt[TCP].flags.R else None

        seg = c.frames_until(rst, timeout=5)
        assert seg is not None and seg.seq == 12345 and (seg.sport, seg.dport) == (5555, 40000)
        assert Ether(bytes(Ether(src=OUR_MAC) / seg.underlayer))  # it parses


def test_no_tcp(sandbox: Sandbox) -> None:
    start(sandbox, "--no-map-gw", "--no-tcp")
    serve(sandbox, sandbox.world_ns, GW4, 5013, "sink")
    r = client(sandbox, sandbox.guest_ns, GW4, 5013, "refused", 2)
    assert r["refused"] is False and "timed out" in r.get("error", ""), r
