"""The data plane's fill (dataplane.c's dp_fill(), out_vu.GuestFillOutput.send_c()) held equal
to the Python path it replaces (to_guest._from_sock() with out_vu.GuestFillOutput.send()).

A forked child in a network namespace of its own (loopback only: real TCP sockets, nothing
leaves it) runs the same seeded sequences twice, once per path: a vhost-user link with a test
driver on the guest side (tests/unit/test_link_vhost.py's Guest: guest memory, RX and TX
rings), a TCP connection the guest opens to the gateway (NAT: the host's loopback, where a
server accepts it), then random steps: the server sends, the guest acknowledges part of what
it got, posts RX buffers (sometimes too few: the ring runs dry) and changes its window, the
server closes. Every frame the guest received (virtio-net header included) and the
connection's fields after each step must be the same. The clock is fixed, so the ACK number
and window memo agrees too; loopback delivery is synchronous, so the socket queues agree.
"""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import time
import traceback
from typing import Any

import pytest

from tests.unit.test_link_vhost import ALL, GW4, HOST4, TSO, Guest
from tests.virtio.frontend import DriverMemory, DriverRing
from vhostpasst.config.conf import Config, Ip4Conf
from vhostpasst.core.loop import Loop
from vhostpasst.dispatch import Dispatcher
from vhostpasst.link.vhost import VhostUserLink
from vhostpasst.proto.tcp.conn import _SHARED, TcpConn, unread
from vhostpasst.proto.tcp.dataplane import ENV_DATAPLANE
from vhostpasst.system import netns
from vhostpasst.wire import eth, ip
from vhostpasst.wire import tcp as wtcp

NOW = 7000.0
ISN = 0x7FFFF000  # ours: the sequence numbers wrap during a run
GUEST_ISN = 1000
GUEST_MAC = bytes.fromhex("525400123456")
OUR_MAC = bytes.fromhex("9a559a559a55")
GPORT = 40000
SEEDS = 24
STEPS = 60


def _guest_segment(flags: int, seq: int, ack: int, window: int, port: int,
                   options: bytes = b"") -> bytes:
    segment = wtcp.build_tcp4(HOST4, GW4, GPORT, port, seq, ack, flags, window, b"", options)
    return eth.build_eth(OUR_MAC, GUEST_MAC, eth.ETH_P_IP,
                         ip.build_ipv4(HOST4, GW4, ip.IPPROTO_TCP, segment))


def _conn(d: Dispatcher) -> TcpConn:
    assert d.ctx is not None
    conns = [f for f in d.ctx.flows if isinstance(f, TcpConn)]
    assert len(conns) == 1, conns
    return conns[0]


def _state(conn: TcpConn) -> dict[str, Any]:
    return {name: getattr(conn, name) for name in
            (*_SHARED, "srtt", "rtt_seq", "fin_seq", "want_out", "sock_eof", "tap_fin_acked")}


def _arrived(conn: TcpConn, sent: int) -> None:
    """Wait (a bounded time) until what the server sent is in the connection's socket, or
    stops coming (its window is full): on loopback part of a large send may still be on its
    way, and both paths must see the same queue."""
    deadline = time.perf_counter() + 2
    last, still = -1, 0
    while time.perf_counter() < deadline and still < 20:
        dropped = ((conn.seq_ack_from_tap - ISN - 1) & 0xFFFFFFFF) - conn.discard_due
        queued = unread(conn.fd) or 0
        if queued + dropped >= sent:
            return
        still = still + 1 if queued == last else 0
        last = queued
        time.sleep(0.001)


def _run(dataplane: str, seed: int, port: int) -> dict[str, Any]:
    """One path through one seeded sequence: what the guest received, step by step."""
    os.environ[ENV_DATAPLANE] = dataplane
    rnd = random.Random(seed)
    features = ALL | (TSO if seed % 2 else 0)
    loop = Loop()
    config = Config(ip4=Ip4Conf(addr=HOST4, gateway=GW4, our_tap_addr=GW4, dns=(GW4,),
                                map_host_loopback=GW4), our_mac=OUR_MAC)
    d = Dispatcher(config, loop)
    assert d.tcp is not None and (d.tcp.dataplane is not None) == (dataplane == "c")
    d.tcp._isn = lambda conn: ISN  # type: ignore[method-assign]
    if d.tcp.dataplane is not None:
        d.tcp.dataplane.table.now = NOW
    link = VhostUserLink(loop, d.on_frames, frame_max=14 + 65520)
    d.link = link
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    link.attach(b)
    guest = Guest(a, loop, 256)
    # guest memory for every buffer a run posts (the test driver never reuses any)
    guest.rx.close()
    guest.tx.close()
    guest.dmem.close()
    guest.dmem = DriverMemory((48 << 20,))
    guest.rx, guest.tx = DriverRing(guest.dmem, 256), DriverRing(guest.dmem, 256)
    server = socket.create_server(("127.0.0.1", port))
    server.settimeout(5)
    record: list[Any] = []
    fills = 0

    def pump(n: int = 4) -> None:
        for _ in range(n):
            loop.run_once(0)
        guest.tx.get_used()  # the TX chains back to the driver
        frames.extend((h.pack() + f).hex() for h, f in guest.received())

    frames: list[str] = []

    try:
        guest.bring_up(features)
        guest.post_rx(120, 4096)
        guest.transmit(_guest_segment(wtcp.SYN, GUEST_ISN, 0, 64000, port,
                                      wtcp.build_tcp_options(1460, 7)))
        pump()
        peer, _ = server.accept()
        peer.setblocking(False)
        pump()
        guest.transmit(_guest_segment(wtcp.ACK, GUEST_ISN + 1, ISN + 1, 1000, port))
        pump()
        conn = _conn(d)
        acked = ISN + 1
        sent_to_guest = 0
        window = 1000
        shut = False
        for _ in range(STEPS):
            step = rnd.random()
            if step < 0.35 and not shut:
                n = rnd.choice([1, 100, 1448, 5000, 70000, 200000])
                try:
                    sent_to_guest += peer.send(bytes(rnd.randrange(256) for _ in range(16))
                                               * (n // 16) + b"x" * (n % 16))
                except BlockingIOError:
                    pass
                _arrived(conn, sent_to_guest)
            elif 0.35 <= step < 0.75:
                top = (conn.seq_to_tap - acked) & 0xFFFFFFFF
                acked = (acked + rnd.randint(0, top)) & 0xFFFFFFFF
                if rnd.random() < 0.2:
                    window = rnd.choice([0, 1, 16, 300, 1000, 4000])
                guest.transmit(_guest_segment(wtcp.ACK, GUEST_ISN + 1, acked, window, port))
            elif 0.75 <= step < 0.95:
                guest.post_rx(min(rnd.choice([1, 4, 20, 60]), len(guest.rx.free)),
                              rnd.choice([1536, 4096]))
            elif step >= 0.95 and not shut:
                peer.shutdown(socket.SHUT_WR)
                shut = True
            pump()
            if conn.closed:
                record.append("closed")
                break
            record.append(_state(conn))
        record.append(frames)
        peer.close()
        fills = d.tcp.dataplane.table.fills if d.tcp.dataplane is not None else 0
    finally:
        server.close()
        link.close()
        guest.close()
        loop.close()
    return {"record": record, "fills": fills, "frames": len(frames)}


def _child(write_fd: int) -> None:
    try:
        netns.unshare(netns.CLONE_NEWNET)
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=10)
        # room in every receive buffer for all a run sends (at most 14 sends of 200 KB): data
        # the kernel holds back for a window arrives later, whenever, and the two runs differ
        for name in ("tcp_rmem", "tcp_wmem"):
            with open(f"/proc/sys/net/ipv4/{name}", "w") as f:
                f.write("4096 8388608 16777216")
        time.monotonic = lambda: NOW  # type: ignore[assignment]  # both paths' clock
        results = []
        for seed in range(SEEDS):
            results.append((_run("c", seed, 20000 + seed), _run("python", seed, 20000 + seed)))
        out = json.dumps({"results": results}, default=repr)
    except BaseException:
        out = json.dumps({"error": traceback.format_exc()})
    with os.fdopen(write_fd, "w") as f:
        f.write(out)


@pytest.mark.timeout(300)
def test_the_c_fill_sends_the_guest_what_python_does() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root (a network namespace)")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a namespace of its own, never back into pytest
        os.close(r)
        try:
            _child(w)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        data = json.loads(f.read() or '{"error": "the child wrote nothing"}')
    os.waitpid(pid, 0)
    assert "error" not in data, data.get("error")
    for seed, (c, py) in enumerate(data["results"]):
        for i, (got_c, got_py) in enumerate(zip(c["record"], py["record"], strict=True)):
            assert got_c == got_py, f"seed {seed}, step {i}"
    # the C did fill the guest's buffers, most of the time
    fills = sum(c["fills"] for c, _py in data["results"])
    frames = sum(c["frames"] for c, _py in data["results"])
    assert fills > 20 and frames > 100, (fills, frames)
