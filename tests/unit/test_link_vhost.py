"""The vhost-user link driven by the Python front end (tests/virtio/frontend.py), as qemu would:
DHCP over the rings, zero-copy and bounced RX buffers, mergeable RX, RX kicks waking waiters,
TX batching, checksum offload flags, TSO both ways, reconnect, one-off / --fd, hostile front
ends."""

from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import sys
import time
from ipaddress import IPv4Address as A4
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.netns.sandbox import Sandbox, vhostpasst_command
from tests.virtio.frontend import DriverMemory, DriverRing, Frontend
from vhostpasst.config.conf import Config, Ip4Conf
from vhostpasst.core.loop import Loop
from vhostpasst.dispatch import Dispatcher
from vhostpasst.link import vhost as vhost_mod
from vhostpasst.link.base import ETH_MAX_FRAME, Tso
from vhostpasst.link.stream import StreamSetupError
from vhostpasst.link.vhost import VhostUserLink, VhostUserListener, vhost_link_from_fd
from vhostpasst.wire import eth, ip, udp
from virtio import message as m
from virtio import net
from virtio.backend import F_PROTOCOL_FEATURES, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1
from virtio.message import Request as R
from virtio.virtqueue import DESC_F_NEXT

GW4, HOST4 = A4("192.0.2.1"), A4("192.0.2.2")
GUEST_MAC = bytes.fromhex("020000000001")
OUR_MAC = bytes.fromhex("9a559a559a55")
BASE = F_VERSION_1 | F_PROTOCOL_FEATURES | net.F_MRG_RXBUF
ALL = BASE | F_RING_EVENT_IDX | F_RING_INDIRECT_DESC | net.F_CSUM | net.F_GUEST_CSUM
TSO = net.F_HOST_TSO4 | net.F_HOST_TSO6 | net.F_HOST_ECN | net.F_GUEST_TSO4 | net.F_GUEST_TSO6


def discover() -> bytes:
    zero, bcast = A4("0.0.0.0"), A4("255.255.255.255")
    bootp = struct.pack("!BBBBIHH4s4s4s4s16s64s128sI", 1, 1, 6, 0, 0x1234, 0, 0, zero.packed,
                        zero.packed, zero.packed, zero.packed, GUEST_MAC, b"", b"", 0x63825363)
    msg = bootp + b"\x35\x01\x01\xff"
    return eth.build_eth(eth.BROADCAST_MAC, GUEST_MAC, eth.ETH_P_IP, ip.build_ipv4(
        zero, bcast, ip.IPPROTO_UDP, udp.build_udp4(zero, bcast, 68, 67, msg)))


def is_offer(frame: bytes) -> bool:
    return (frame[12:14] == b"\x08\x00" and frame[14 + 9] == ip.IPPROTO_UDP
            and frame[14 + 20 + 2:14 + 20 + 4] == b"\x00\x44" and b"\x35\x01\x02" in frame)


class Guest:
    """The driver side: one front end connection, guest memory, RX and TX rings."""

    def __init__(self, sock: socket.socket, loop: Loop, queue_size: int = 16) -> None:
        self.fe = Frontend(sock, lambda: loop.run_once(0))
        self.dmem = DriverMemory((1 << 20,))
        self.rx = DriverRing(self.dmem, queue_size)
        self.tx = DriverRing(self.dmem, queue_size)

    def bring_up(self, features: int = ALL) -> None:
        offered = self.fe.get_u64(R.GET_FEATURES)
        assert features & offered == features
        self.fe.request(R.SET_OWNER)
        pf = self.fe.get_u64(R.GET_PROTOCOL_FEATURES)
        self.fe.request(R.SET_PROTOCOL_FEATURES, m.encode_u64(pf))
        assert self.fe.ack(R.SET_FEATURES, m.encode_u64(features)) == 0
        self.rx.event_idx = self.tx.event_idx = bool(features & F_RING_EVENT_IDX)
        assert self.fe.ack(R.SET_MEM_TABLE, m.encode_mem_table(self.dmem.table()),
                           self.dmem.fds()) == 0
        self.fe.setup_queue(0, self.rx)
        self.fe.setup_queue(1, self.tx)
        for i in (0, 1):
            assert self.fe.ack(R.SET_VRING_ENABLE, m.encode_state(i, 1)) == 0

    def transmit(self, frame: bytes, split: int | None = None) -> None:
        hdr = bytes(net.HDR_LEN)
        out = [hdr + frame] if split is None else [hdr + frame[:split], frame[split:]]
        self.tx.add(out)
        self.tx.kick()
        self.fe.pump()

    def post_rx(self, count: int, size: int = 2048) -> None:
        for _ in range(count):
            self.rx.add([], [size])
        self.rx.kick()

    def received(self) -> list[tuple[net.NetHeader, bytes]]:
        """Frames the device put on the RX ring (mergeable chains joined)."""
        out = []
        used = self.rx.get_used()
        i = 0
        while i < len(used):
            head, length = used[i]
            data = self.rx.written(head, length)
            hdr = net.NetHeader.unpack(data)
            for h2, l2 in used[i + 1:i + hdr.num_buffers]:
                data += self.rx.written(h2, l2)
            out.append((hdr, data[net.HDR_LEN:]))
            i += max(hdr.num_buffers, 1)
        return out

    def close(self) -> None:
        self.fe.sock.close()
        self.rx.close()
        self.tx.close()
        self.dmem.close()


class Harness:
    """A VhostUserLink feeding a Dispatcher (ARP and DHCP only: no loop for sockets)."""

    def __init__(self, frame_max: int = ETH_MAX_FRAME, queue_size: int = 16,
                 tx_batch: int = 256) -> None:
        self.loop = Loop()
        config = Config(ip4=Ip4Conf(addr=HOST4, gateway=GW4, our_tap_addr=GW4, dns=(GW4,)))
        self.dispatcher = Dispatcher(config)
        self.delivered: list[bytes] = []
        self.disconnects = 0
        self.link = VhostUserLink(self.loop, self._on_frames, on_disconnect=self._gone,
                                  frame_max=frame_max, tx_batch=tx_batch)
        self.dispatcher.link = self.link
        self.queue_size = queue_size
        self.guest = self.connect()

    def _on_frames(self, frames: list[memoryview]) -> None:
        self.delivered += [bytes(f) for f in frames]
        self.dispatcher.on_frames(frames)

    def _gone(self) -> None:
        self.disconnects += 1

    def connect(self) -> Guest:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.link.attach(b)
        return Guest(a, self.loop, self.queue_size)

    def pump(self, n: int = 3) -> None:
        for _ in range(n):
            self.loop.run_once(0)

    def close(self) -> None:
        self.link.close()
        self.guest.close()
        self.loop.close()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def _fill(frame: list[memoryview], data: bytes) -> None:
    """What recvmsg_into() over the frame's views does (plus headers in the first one)."""
    off = 0
    for view in frame:
        n = min(len(view), len(data) - off)
        view[:n] = data[off:off + n]
        off += n
    assert off == len(data)

def _payload(n: int, seed: int = 0) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(n))

def _guest_memory(h: Harness, sizes: tuple[int, ...]) -> None:
    """Guest RAM in regions of `sizes` instead of one MiB (before bring_up(): the rings go
    in the first region, buffers fill it and go on in the next ones)."""
    g = h.guest
    g.rx.close()
    g.tx.close()
    g.dmem.close()
    g.dmem = DriverMemory(sizes)
    g.rx = DriverRing(g.dmem, h.queue_size)
    g.tx = DriverRing(g.dmem, h.queue_size)


# --- features ---------------------------------------------------------------------------------

def test_features_offered(h: Harness) -> None:
    offered = h.guest.fe.get_u64(R.GET_FEATURES)
    for bit in (F_VERSION_1, net.F_MRG_RXBUF, F_RING_EVENT_IDX, F_RING_INDIRECT_DESC,
                net.F_CSUM, net.F_GUEST_CSUM, net.F_HOST_TSO4, net.F_HOST_TSO6, net.F_HOST_ECN,
                net.F_GUEST_TSO4, net.F_GUEST_TSO6):
        assert offered & bit, hex(bit)
    assert not h.link.connected


@pytest.mark.parametrize("features", [BASE, ALL], ids=["plain", "all"])
def test_connected_and_csum_offload_follow_negotiation(h: Harness, features: int) -> None:
    h.guest.bring_up(features)
    assert h.link.connected
    assert h.link.csum_offload == bool(features & net.F_GUEST_CSUM)
    # what TCP chooses its output path from (LinkCaps): no payload checksum and the one-call
    # fill only with GUEST_CSUM (and mergeable buffers for the fill)
    assert h.link.caps.l4_csum == (not features & net.F_GUEST_CSUM)
    assert h.link.caps.guest_fill == bool(features & net.F_GUEST_CSUM
                                          and features & net.F_MRG_RXBUF)


# --- TX and RX through the dispatcher ----------------------------------------------------------

@pytest.mark.parametrize("features", [BASE, ALL], ids=["plain", "all"])
def test_dhcp_discover_on_tx_gets_offer_on_rx(h: Harness, features: int) -> None:
    h.guest.bring_up(features)
    h.guest.post_rx(4)
    h.guest.transmit(discover())
    h.pump()
    assert h.delivered == [discover()]
    assert h.guest.tx.get_used() and h.guest.tx.calls() >= 1  # TX chain returned, guest told
    [(hdr, frame)] = h.guest.received()
    assert is_offer(frame)
    assert hdr.num_buffers == 1
    assert hdr.flags == (net.HDR_F_DATA_VALID if features & net.F_GUEST_CSUM else 0)
    assert h.guest.rx.calls() >= 1


def test_tx_frame_in_two_pieces_is_joined(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(2)
    h.guest.transmit(discover(), split=40)
    h.pump()
    assert h.delivered == [discover()]
    assert is_offer(h.guest.received()[0][1])


def test_tx_frame_with_needs_csum_is_accepted(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(2)
    hdr = net.NetHeader(flags=net.HDR_F_NEEDS_CSUM, csum_start=34, csum_offset=6).pack()
    h.guest.tx.add([hdr + discover()])
    h.guest.tx.kick()
    h.pump()
    assert h.delivered == [discover()]


def test_tx_gso_frame_and_runt_are_dropped(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.tx.add([net.NetHeader(gso_type=1).pack() + discover()])
    h.guest.tx.add([bytes(net.HDR_LEN) + b"short"])
    h.guest.tx.add([b"tiny"])  # not even a virtio-net header
    h.guest.tx.kick()
    h.pump()
    assert h.delivered == []
    assert len(h.guest.tx.get_used()) == 3 and h.link.connected


# --- TSO: GSO frames from the guest ---------------------------------------------------------

def tcp_frame(six: bool, payload: bytes, flags: int = 0x18) -> bytes:
    """A TCP segment from the guest, IP length fields covering it all (as in a GSO frame)."""
    tcp = struct.pack("!HHIIBBHHH", 40000, 80, 1000, 2000, 5 << 4, flags, 512, 0, 0) + payload
    if six:
        l3 = struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64,
                         bytes.fromhex("20010db8" + "0" * 22 + "02"),
                         bytes.fromhex("20010db8" + "0" * 22 + "01")) + tcp
        return eth.build_eth(OUR_MAC, GUEST_MAC, eth.ETH_P_IPV6, l3)
    return eth.build_eth(OUR_MAC, GUEST_MAC, eth.ETH_P_IP, ip.build_ipv4(
        HOST4, GW4, ip.IPPROTO_TCP, tcp))


def gso_header(six: bool, gso_size: int = 1448, **kw: int) -> bytes:
    l4 = 14 + (40 if six else 20)
    fields = dict(flags=net.HDR_F_NEEDS_CSUM, gso_type=net.GSO_TCPV6 if six else net.GSO_TCPV4,
                  hdr_len=l4 + 20, gso_size=gso_size, csum_start=l4, csum_offset=16)
    fields.update(kw)
    return net.NetHeader(**fields).pack()


@pytest.mark.parametrize("six", [False, True], ids=["tcpv4", "tcpv6"])
def test_tx_gso_frame_is_delivered_whole(h: Harness, six: bool) -> None:
    """A 60000-byte TCP frame (TSO: 42 segments of the guest's MTU), its payload in pieces as
    a Linux skb with page fragments comes, reaches the dispatcher as one frame; so does one
    with the ECN bit."""
    h.guest.bring_up(ALL | TSO)
    frame = tcp_frame(six, _payload(60000 - 54 - (20 if six else 0)))
    hdr = gso_header(six)
    h.guest.tx.add([hdr + frame[:200], frame[200:30000], frame[30000:]])
    kind = net.GSO_TCPV6 if six else net.GSO_TCPV4
    h.guest.tx.add([gso_header(six, gso_type=kind | net.GSO_ECN) + frame])
    h.guest.tx.kick()
    h.pump()
    assert h.delivered == [frame, frame]
    assert h.link.rx_gso == 2 and len(h.guest.tx.get_used()) == 2


def test_tx_gso_frames_with_nonsense_are_dropped(h: Harness) -> None:
    """Nonsense from the guest is dropped (a rate-limited debug line), never raised: GSO types
    not offered or unknown, sizes that disagree with the IP header, a hdr_len beyond the
    frame, no gso_size, TCPV6 on an IPv4 frame, truncated headers. The link stays up."""
    h.guest.bring_up(ALL | TSO)
    frame = tcp_frame(False, _payload(5000))
    bad = [
        gso_header(False, gso_type=net.GSO_UDP) + frame,
        gso_header(False, gso_type=net.GSO_UDP_L4) + frame,
        gso_header(False, gso_type=9) + frame,
        gso_header(False, hdr_len=len(frame) + 1) + frame,
        gso_header(False, gso_size=0) + frame,
        gso_header(False) + frame + b"trailing",  # IP total length short of the frame
        gso_header(False) + frame[:-1],  # ... or beyond it
        gso_header(True) + frame,  # TCPV6 for an IPv4 frame
        gso_header(False) + tcp_frame(True, b"x" * 100),  # and the other way round
        gso_header(False) + frame[:40],
        gso_header(True) + tcp_frame(True, b"")[:60],
        gso_header(False) + discover(),  # UDP in a TCPV4 frame
    ]
    for chain in bad:
        h.guest.tx.add([chain])
    h.guest.tx.kick()
    h.pump()
    assert h.delivered == [] and h.link.rx_gso == 0
    assert len(h.guest.tx.get_used()) == len(bad) and h.link.connected
    h.guest.tx.add([gso_header(False) + frame])  # a good one still goes
    h.guest.tx.kick()
    h.pump()
    assert h.delivered == [frame]


def test_tx_gso_frame_without_host_tso_is_dropped(h: Harness) -> None:
    h.guest.bring_up(ALL | net.F_HOST_TSO6)  # TSO6 only
    h.guest.tx.add([gso_header(False) + tcp_frame(False, _payload(5000))])
    h.guest.tx.add([gso_header(True) + tcp_frame(True, _payload(5000))])
    h.guest.tx.kick()
    h.pump()
    assert h.delivered == [tcp_frame(True, _payload(5000))]


@pytest.mark.parametrize("features, tso", [(ALL | TSO, True), (ALL, False),
                                           (ALL & ~net.F_GUEST_CSUM | TSO, False)],
                         ids=["tso", "no-tso", "tso-without-guest-csum"])
def test_tso_capability_follows_negotiation(h: Harness, features: int, tso: bool) -> None:
    """GUEST_TSO needs GUEST_CSUM (virtio 1.2, 5.1.3.1): without it no GSO frame goes out."""
    h.guest.bring_up(features)
    assert h.link.caps.tso4 == h.link.caps.tso6 == tso


# --- TSO: GSO frames to the guest ---------------------------------------------------------------

@pytest.mark.parametrize("six", [False, True], ids=["tcpv4", "tcpv6"])
def test_rx_gso_frame_header(six: bool) -> None:
    """commit_scatter() with a Tso: a frame with more payload than one MSS gets the GSO
    header (NEEDS_CSUM at the TCP header, checksum field at 16, gso_type, gso_size = the MSS,
    hdr_len = the headers) over the mergeable buffers it spans; one that fits one segment
    keeps DATA_VALID and no GSO."""
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up(ALL | TSO)
        h.guest.post_rx(40, size=4096)
        l4 = 14 + (40 if six else 20)
        tso = Tso(six, l4, l4 + 20, 1448)
        big, small = tcp_frame(six, _payload(40000)), tcp_frame(six, _payload(1448))
        frames = h.link.rx_scatter(2, len(big), head=l4 + 20)
        _fill(frames[0], big)
        _fill(frames[1], small)
        h.link.commit_scatter([len(big), len(small)], tso)
        h.link.flush()
        (hdr, got), (hdr2, got2) = h.guest.received()
        assert got == big and got2 == small
        assert hdr == net.NetHeader(net.HDR_F_NEEDS_CSUM,
                                    net.GSO_TCPV6 if six else net.GSO_TCPV4, l4 + 20, 1448,
                                    l4, 16, -(-(12 + len(big)) // 4096))
        assert hdr2 == net.NetHeader(net.HDR_F_DATA_VALID, num_buffers=1)
        assert (h.link.tx_gso, h.link.tx_scattered) == (1, 1)
    finally:
        h.close()


def test_rx_gso_frame_in_one_big_buffer_and_bounced() -> None:
    """The GSO header also on a frame that fits one (big) buffer, and on one that went
    through a bounce buffer (first buffers too small for the headers)."""
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up(ALL | TSO)
        tso = Tso(False, 34, 54, 1000)
        frame = tcp_frame(False, _payload(3000))
        h.guest.post_rx(1, size=8192)
        [views] = h.link.rx_scatter(1, len(frame), head=54)
        _fill(views, frame)
        h.link.commit_scatter([len(frame)], tso)
        h.guest.post_rx(40, size=48)  # < 12 + 54 bytes of headers: bounced
        small = tcp_frame(False, _payload(1500))
        [views] = h.link.rx_scatter(1, len(small), head=54)
        _fill(views, small)
        h.link.commit_scatter([len(small)], tso)
        h.link.flush()
        (one, got), (bounced, got2) = h.guest.received()
        assert got == frame and got2 == small
        gso = (net.HDR_F_NEEDS_CSUM, net.GSO_TCPV4, 54, 1000, 34, 16)
        assert (one.flags, one.gso_type, one.hdr_len, one.gso_size, one.csum_start,
                one.csum_offset, one.num_buffers) == (*gso, 1)
        assert (bounced.flags, bounced.gso_type, bounced.hdr_len, bounced.gso_size,
                bounced.csum_start, bounced.csum_offset) == gso
        assert bounced.num_buffers == -(-(12 + len(small)) // 48)
        assert h.link.tx_gso == 2
    finally:
        h.close()


def test_tx_batch_limit_comes_back_without_a_kick() -> None:
    h = Harness(tx_batch=4, queue_size=16)
    try:
        h.guest.bring_up()
        for _ in range(10):
            h.guest.tx.add([bytes(net.HDR_LEN) + discover()])
        h.guest.tx.kick()
        h.pump(1)  # the kick, then the zero-delay timer after the other fds: 4 + 4
        assert len(h.delivered) == 8
        h.pump(4)
        assert len(h.delivered) == 10
        assert len(h.guest.tx.get_used()) == 10
    finally:
        h.close()


def _bulk_frame(n: int) -> bytes:
    """An n-byte frame the dispatcher drops (an unknown EtherType): only its size counts."""
    return eth.build_eth(OUR_MAC, GUEST_MAC, 0x88B5, bytes(n - eth.ETH_HLEN))


def test_kick_after_a_bulk_tx_pass_is_coalesced(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a pass of TX_BULK_BYTES or more a kick waits TX_COALESCE: the kick stays
    disarmed meanwhile (the guest's next frames don't kick), and the one deferred pass takes
    them all and re-arms it. A small pass after that: the next kick is served at once."""
    monkeypatch.setattr(vhost_mod, "TX_COALESCE", 0.3)  # long enough not to race the test
    h = Harness(queue_size=16)
    try:
        h.guest.bring_up(ALL)
        for _ in range(2):
            h.guest.tx.add([bytes(net.HDR_LEN) + _bulk_frame(40000)])
        assert h.guest.tx.kick()
        h.pump(1)
        assert len(h.delivered) == 2 and h.link._tx_bulk  # 80000 bytes: a bulk pass
        h.guest.transmit(discover())  # kicks (the pass re-armed), but is held
        h.pump(2)
        assert len(h.delivered) == 2 and h.link._tx_scheduled and h.link.kicks_coalesced == 1
        h.guest.tx.add([bytes(net.HDR_LEN) + discover()])
        assert not h.guest.tx.kick()  # disarmed: nothing popped since
        deadline = time.monotonic() + 5
        while len(h.delivered) < 4 and time.monotonic() < deadline:
            h.loop.run_once(0.5)
        assert len(h.delivered) == 4 and not h.link._tx_bulk and not h.link._tx_scheduled
        assert len(h.guest.tx.get_used()) == 4
        h.guest.tx.add([bytes(net.HDR_LEN) + discover()])
        assert h.guest.tx.kick()  # the deferred pass re-armed the kick
        h.pump(1)
        assert len(h.delivered) == 5  # after a small pass: at once
    finally:
        h.close()


def test_small_tx_passes_are_never_held() -> None:
    """Frames under TX_BULK_BYTES a pass (requests, answers, ACKs): each kick served in
    the loop iteration that sees it, however many come."""
    h = Harness(queue_size=16)
    try:
        h.guest.bring_up(ALL)
        for i in range(1, 6):
            h.guest.tx.add([bytes(net.HDR_LEN) + _bulk_frame(vhost_mod.TX_BULK_BYTES - 100)])
            assert h.guest.tx.kick()
            h.pump(1)
            assert len(h.delivered) == i and not h.link._tx_scheduled
        assert h.link.kicks_coalesced == 0
    finally:
        h.close()


def test_a_new_front_end_is_not_coalesced(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bulk pass, then the front end goes: the next one's first kick is served at once
    (the pass run when it comes up judges afresh), not TX_COALESCE later."""
    monkeypatch.setattr(vhost_mod, "TX_COALESCE", 30.0)  # held would mean the test fails
    h = Harness(queue_size=16)
    try:
        h.guest.bring_up(ALL)
        for _ in range(2):
            h.guest.tx.add([bytes(net.HDR_LEN) + _bulk_frame(40000)])
        h.guest.tx.kick()
        h.pump(1)
        assert h.link._tx_bulk
        h.guest.close()
        h.pump()
        assert h.disconnects == 1
        h.guest = h.connect()
        h.guest.bring_up(ALL)
        h.guest.transmit(discover())
        h.pump(1)
        assert len(h.delivered) == 3 and h.link.kicks_coalesced == 0
    finally:
        h.close()


# --- connections -------------------------------------------------------------------------------

def test_reconnect_after_the_front_end_leaves(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.close()
    h.pump()
    assert h.disconnects == 1 and h.link.backend is None and not h.link.connected
    h.guest = h.connect()
    h.guest.bring_up(BASE)  # a fresh device: nothing of the old negotiation remains
    assert not h.link.csum_offload
    h.guest.post_rx(2)
    h.guest.transmit(discover())
    h.pump()
    assert is_offer(h.guest.received()[0][1])


def test_hostile_tx_descriptor_disconnects(h: Harness) -> None:
    h.guest.bring_up()
    tx = h.guest.tx
    tx.write_desc(0, 0xDEAD0000, 64, 0, 0)  # outside guest memory
    tx.publish(0)
    tx.kick()
    h.pump()
    assert h.disconnects == 1 and h.guest.fe.is_closed()


def test_hostile_rx_descriptor_loop_disconnects(h: Harness) -> None:
    h.guest.bring_up()
    rx = h.guest.rx
    buf = h.guest.dmem.alloc(64)
    rx.write_desc(0, buf, 64, DESC_F_NEXT | 2, 1)
    rx.write_desc(1, buf, 64, DESC_F_NEXT | 2, 0)
    rx.publish(0)
    assert h.link.rx_buffers(1) == []
    assert h.disconnects == 1


def test_hostile_rx_ring_under_a_waiting_frame_disconnects(h: Harness) -> None:
    """A frame waits for RX buffers (the ring was full); the guest then posts a looping
    chain: writing the waiting frame first breaks the queue, and the link disconnects the
    front end instead of raising into the caller of rx_buffers()/rx_scatter()."""
    h.guest.bring_up()
    h.pump()
    assert h.link.send(discover())  # no buffers yet: it waits
    rx = h.guest.rx
    buf = h.guest.dmem.alloc(64)
    rx.write_desc(0, buf, 64, DESC_F_NEXT | 2, 1)
    rx.write_desc(1, buf, 64, DESC_F_NEXT | 2, 0)
    rx.publish(0)
    assert h.link.rx_scatter(1, 1514) == []
    assert h.disconnects == 1


def _listener_guest(loop: Loop, path: str) -> Guest:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    loop.run_once(0)  # accept
    return Guest(sock, loop)


def test_listener_serves_the_next_front_end_after_a_hostile_one(tmp_path: Path) -> None:
    loop = Loop()
    config = Config(ip4=Ip4Conf(addr=HOST4, gateway=GW4, our_tap_addr=GW4, dns=(GW4,)))
    d = Dispatcher(config)
    exits: list[int] = []
    lst = VhostUserListener(loop, str(tmp_path / "vu.sock"), d.on_frames,
                            on_exit=lambda: exits.append(1))
    d.link = lst
    try:
        bad = _listener_guest(loop, lst.path)
        bad.bring_up()
        # A second front end while one is served is refused.
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.connect(lst.path)
        loop.run_once(0)
        assert other.recv(1) == b""
        other.close()
        bad.tx.write_desc(0, 0xDEAD0000, 64, 0, 0)
        bad.tx.publish(0)
        bad.tx.kick()
        loop.run_once(0)
        assert bad.fe.is_closed() and not lst.connected
        bad.close()
        good = _listener_guest(loop, lst.path)
        good.bring_up()
        assert lst.connected and lst.link.csum_offload
        good.post_rx(2)
        good.transmit(discover())
        loop.run_once(0)
        assert is_offer(good.received()[0][1])
        good.close()
        loop.run_once(0)
        assert exits == []  # not one-off: waiting for the next one
    finally:
        lst.close()
        loop.close()
    assert not os.path.exists(tmp_path / "vu.sock")


def test_listener_forwards_tso(tmp_path: Path) -> None:
    """The listener (what the dispatcher and TCP hold) forwards the TSO capability and the
    Tso given to commit_scatter() to its link."""
    loop = Loop()
    lst = VhostUserListener(loop, str(tmp_path / "vu.sock"), lambda frames: None)
    try:
        g = _listener_guest(loop, lst.path)
        g.bring_up(ALL | net.F_GUEST_TSO4)
        assert lst.caps.tso4 and not lst.caps.tso6
        g.post_rx(4, size=4096)
        frame = tcp_frame(False, _payload(5000))
        [views] = lst.rx_scatter(1, len(frame), head=54)
        _fill(views, frame)
        lst.commit_scatter([len(frame)], Tso(False, 34, 54, 1448))
        lst.flush()
        [(hdr, got)] = g.received()
        assert got == frame and (hdr.gso_type, hdr.gso_size) == (net.GSO_TCPV4, 1448)
        g.close()
    finally:
        lst.close()
        loop.close()


def test_listener_one_off_exits_when_the_front_end_leaves(tmp_path: Path) -> None:
    loop = Loop()
    exits: list[int] = []
    lst = VhostUserListener(loop, None, lambda frames: None, one_off=True,
                            on_exit=lambda: exits.append(1),
                            probe_pattern=str(tmp_path / "p_{}.sock"), probe_count=3)
    try:
        assert lst.path == str(tmp_path / "p_1.sock")
        g = _listener_guest(loop, lst.path)
        g.bring_up()
        g.close()
        loop.run_once(0)
        assert exits == [1]
    finally:
        lst.close()
        loop.close()


def test_from_fd_socketpair_and_exit() -> None:
    loop = Loop()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    exits: list[int] = []
    link = vhost_link_from_fd(loop, b.detach(), lambda frames: None,
                              on_exit=lambda: exits.append(1))
    g = Guest(a, loop)
    try:
        g.bring_up()
        assert link.connected
        g.close()
        loop.run_once(0)
        assert exits == [1]
    finally:
        link.close()
        loop.close()


def test_from_fd_refuses_what_is_not_a_unix_stream_socket(tmp_path: Path) -> None:
    loop = Loop()
    r, w = os.pipe()
    d = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        with pytest.raises(StreamSetupError):
            vhost_link_from_fd(loop, r, lambda frames: None)
        with pytest.raises(StreamSetupError):
            vhost_link_from_fd(loop, d.fileno(), lambda frames: None)
    finally:
        os.close(r)
        os.close(w)
        d.close()
        loop.close()


# --- the daemon itself (a sandbox namespace), with the Python front end as qemu -----------------

def _remote_guest(sock: socket.socket) -> Guest:
    g = Guest(sock, Loop())
    # the back end is another process, still starting up on a loaded machine: 20 tries of
    # up to 0.5 s each (select returns as soon as it answers)
    g.fe.pump = lambda: select.select([sock], [], [], 0.5)
    return g


def _dhcp_over(g: Guest) -> None:
    g.bring_up()
    g.post_rx(8)
    g.transmit(discover())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        select.select([g.rx.call_fd], [], [], 0.5)
        g.rx.calls()
        frames = [f for _, f in g.received()]
        if any(is_offer(f) for f in frames):
            return
        g.post_rx(len(frames))  # an RA or the like came first: give the buffers back
    raise AssertionError("no DHCP offer over vhost-user")


def test_daemon_vhost_user_fd(sandbox: Sandbox) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    daemon = sandbox.popen_in(
        sandbox.host_ns, *vhostpasst_command(), "-f", "-q", "--vhost-user",
        "--fd", str(theirs.fileno()), pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE)
    theirs.close()
    g = _remote_guest(ours)
    try:
        _dhcp_over(g)
        assert daemon.poll() is None
    finally:
        g.close()
    assert daemon.wait(10) == 0, daemon.stderr.read().decode() if daemon.stderr else ""


def _one_off_dhcp(sandbox: Sandbox, path: str,
                  env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`vhostpasst -f --vhost-user -1 -s path` in the host namespace, a front end that
    takes a DHCP lease through it and leaves; returns the daemon, exited."""
    daemon = sandbox.popen_in(
        sandbox.host_ns, *vhostpasst_command(), "-f", "--vhost-user", "-1", "-s", path,
        stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 20
    sock = None
    while sock is None:  # the path exists once bound, and accepts once listening
        assert daemon.poll() is None and time.monotonic() < deadline, "no listening socket"
        attempt = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            attempt.connect(path)
            sock = attempt
        except (FileNotFoundError, ConnectionRefusedError):
            attempt.close()
            time.sleep(0.05)
    g = _remote_guest(sock)
    try:
        _dhcp_over(g)
    finally:
        g.close()
    assert daemon.wait(10) == 0
    return daemon


def test_daemon_vhost_user_socket_one_off(sandbox: Sandbox, tmp_path: Path) -> None:
    path = str(tmp_path / "vu.sock")
    daemon = _one_off_dhcp(sandbox, path)
    err = daemon.stderr.read().decode() if daemon.stderr else ""
    assert f"-chardev socket,id=chr0,path={path} -netdev vhost-user" in err, err


def test_daemon_writes_its_loop_trace(sandbox: Sandbox, tmp_path: Path) -> None:
    """VHOSTPASST_LOOP_TRACE: the daemon records its wake-ups and writes them when it ends;
    the front end's requests and the guest's TX kicks (queue 1) are among them, and
    bench/wakeups.py reads the file."""
    trace = tmp_path / "loop.tsv"
    _one_off_dhcp(sandbox, str(tmp_path / "vu.sock"),
                  env={**os.environ, "VHOSTPASST_LOOP_TRACE": str(trace)})
    lines = trace.read_text().splitlines()
    assert lines[0] == "start_s\tduration_us\ttimers\tcallbacks"
    rows = [line.split("\t") for line in lines[1:]]
    assert rows and all(len(r) == 4 and float(r[1]) >= 0 for r in rows)
    kinds = {k for r in rows for k in r[3].split(",")}
    assert "VhostUserBackend._on_readable" in kinds, kinds
    assert "VhostUserBackend._on_kick[1]" in kinds, kinds
    out = subprocess.run([sys.executable, str(Path(__file__).parents[2] / "bench" / "wakeups.py"),
                          str(trace)], capture_output=True, text=True, check=True).stdout
    assert f"{len(rows)} wake-ups in" in out, out
    assert "VhostUserBackend._on_kick[1]" in out, out


@settings(max_examples=300, deadline=None)
@given(six=st.booleans(), cut=st.integers(0, 120), edits=st.lists(
    st.tuples(st.integers(0, 80), st.integers(0, 255)), max_size=4),
    gso_type=st.sampled_from([0, 1, 3, 4, 5, 6, 0x81, 0x84, 0xFF]),
    hdr_len=st.integers(0, 0xFFFF), gso_size=st.integers(0, 0xFFFF),
    host_tso=st.sampled_from([0, net.F_HOST_TSO4, net.F_HOST_TSO6,
                              net.F_HOST_TSO4 | net.F_HOST_TSO6]))
def test_gso_check_never_raises(six: bool, cut: int, edits: list[tuple[int, int]],
                                gso_type: int, hdr_len: int, gso_size: int,
                                host_tso: int) -> None:
    """Whatever the guest puts in a GSO frame's header and headers, the check answers (a
    reason or None) and never raises; what it lets through is TCP of the negotiated family
    with IP lengths covering the frame."""
    from vhostpasst.link.vhost import gso_error
    frame = bytearray(tcp_frame(six, _payload(3000)))
    for i, v in edits:
        frame[i] = v
    if cut:
        del frame[-cut:]
    hdr = net.NetHeader(net.HDR_F_NEEDS_CSUM, gso_type, hdr_len, gso_size, 34, 16)
    why = gso_error(memoryview(frame), hdr, host_tso)
    if why is None:
        kind = gso_type & ~net.GSO_ECN
        assert (kind, host_tso & (net.F_HOST_TSO6 if kind == net.GSO_TCPV6 else
                                  net.F_HOST_TSO4)) in ((net.GSO_TCPV4, net.F_HOST_TSO4),
                                                        (net.GSO_TCPV6, net.F_HOST_TSO6))
        assert gso_size and hdr_len <= len(frame)
        length = struct.unpack_from("!H", frame, 16 if kind == net.GSO_TCPV4 else 18)[0]
        assert 14 + length + (40 if kind == net.GSO_TCPV6 else 0) == len(frame)
