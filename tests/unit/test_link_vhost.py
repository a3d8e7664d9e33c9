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
from ipaddress import IPv6Address as A6
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from vhostpasst._tcpsg import ffi as sg_ffi
from vhostpasst._tcpsg import lib as sg_lib

from tests.netns.sandbox import Sandbox, vhostpasst_command
from tests.virtio.frontend import DriverMemory, DriverRing, Frontend, SocketReader, frame_sizes
from vhostpasst.config.conf import Config, Ip4Conf
from vhostpasst.core.loop import Loop
from vhostpasst.dispatch import Dispatcher
from vhostpasst.link import vhost as vhost_mod
from vhostpasst.link.base import ETH_MAX_FRAME, Link, Tso
from vhostpasst.link.stream import StreamSetupError
from vhostpasst.link.vhost import VhostUserLink, VhostUserListener, vhost_link_from_fd
from vhostpasst.wire import checksum, eth, ip, udp
from vhostpasst.wire import tcp as wtcp
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
    from vhostpasst.link.base import Tso
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
    from vhostpasst.link.base import Tso
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


# --- RX buffers --------------------------------------------------------------------------------

def test_rx_buffers_point_into_guest_memory_when_big_enough() -> None:
    h = Harness(frame_max=1514)
    try:
        h.guest.bring_up()
        h.guest.post_rx(3, size=1536)  # what Linux posts with mergeable buffers
        bufs = h.link.rx_buffers(2)
        assert [len(b) for b in bufs] == [1536 - net.HDR_LEN] * 2
        frame = eth.build_eth(GUEST_MAC, OUR_MAC, eth.ETH_P_IP, bytes(range(100)))
        bufs[0][:len(frame)] = frame
        h.link.commit([len(frame)])  # the second buffer goes back to the ring
        h.link.flush()
        assert h.link.tx_zero_copy == 1 and h.link.tx_bounced == 0
        [(hdr, got)] = h.guest.received()
        assert got == frame and hdr.num_buffers == 1
        assert h.guest.rx.calls() >= 1
        # Both unused chains are still there: two more frames fit.
        assert len(h.link.rx_buffers(4)) == 2
        h.link.flush()  # uncommitted: rewound
        assert len(h.link.rx_buffers(4)) == 2
    finally:
        h.close()


def test_rx_chains_handed_out_go_back_when_the_ring_stops() -> None:
    """GET_VRING_BASE while chains are handed out for a socket read (not committed): the
    index it reports does not count them, so whoever resumes the ring (qemu after a stop, the
    daemon on a migration's destination) offers them again instead of losing them."""
    h = Harness(frame_max=1514)
    try:
        h.guest.bring_up()
        h.guest.post_rx(3, size=1536)
        assert len(h.link.rx_buffers(2)) == 2
        assert h.link.tx_bounced == 0 and h.link.backend.queues[net.RX_QUEUE].inflight == 2
        reply = h.guest.fe.request(R.GET_VRING_BASE, m.encode_state(net.RX_QUEUE, 0))
        assert reply is not None and reply.state() == (net.RX_QUEUE, 0)
        h.link.flush()  # nothing left to rewind or publish
        assert h.guest.rx.used_idx() == 0
    finally:
        h.close()


def test_frame_bigger_than_one_rx_buffer_uses_mergeable_buffers(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(12, size=256)
    frame = eth.build_eth(GUEST_MAC, OUR_MAC, eth.ETH_P_IP, bytes(i & 0xFF for i in range(1000)))
    assert h.link.send(frame)
    bufs = h.link.rx_buffers(1)  # 256-byte buffers can't hold a frame: a bounce buffer
    assert len(bufs) == 1 and len(bufs[0]) >= ETH_MAX_FRAME
    bufs[0][:len(frame)] = frame
    h.link.commit([len(frame)])
    h.link.flush()
    got = h.guest.received()
    assert [f for _, f in got] == [frame, frame]
    assert [hdr.num_buffers for hdr, _ in got] == [5, 5]  # 12 + 1014 bytes in 256-byte chains
    assert h.link.tx_zero_copy == 0 and h.link.tx_frames == 2
    assert h.link.tx_bounced == 1  # the committed frame; send()'s copy is not a bounce


@pytest.mark.parametrize("features", [BASE, ALL], ids=["plain", "event-idx"])
def test_small_frames_wait_for_buffers_when_the_ring_is_full(h: Harness, features: int) -> None:
    """send() on a full RX ring (a burst of TCP data took every buffer) keeps the frame (an
    ACK, ARP...) instead of dropping it; the guest is asked to kick, and when it posts
    buffers the frames go in the order they were sent, before anything sent later."""
    h.guest.bring_up(features)
    h.guest.post_rx(2)
    h.pump()
    frames = [bytes([i]) * 300 for i in range(1, 6)]
    assert all(h.link.send(f) for f in frames)
    h.link.flush()
    assert [f for _, f in h.guest.received()] == frames[:2]
    assert h.link.tx_dropped == 0 and h.link.tx_frames == 2
    h.guest.post_rx(2)  # room for two of the three waiting
    h.pump()
    assert h.link.send(b"\x09" * 300)  # after the waiting ones
    h.guest.post_rx(4)
    h.pump()
    assert [f for _, f in h.guest.received()] == frames[2:] + [b"\x09" * 300]
    assert h.link.tx_dropped == 0 and h.link.tx_frames == 6


def test_waiting_frames_are_bounded_and_unfittable_ones_dropped(h: Harness) -> None:
    """What waits for buffers is bounded (HOLD_BYTES), and a frame bigger than the whole ring
    can hold, every buffer posted, is dropped at once rather than blocking the rest."""
    from vhostpasst.link import vhost_rx as vhost
    h.guest.bring_up(ALL)
    h.guest.post_rx(h.queue_size, size=256)  # the whole ring: 16 x 256 bytes
    h.pump()
    assert not h.link.send(bytes(5000))  # 12 + 5000 > 4096: never fits
    assert h.link.tx_dropped == 1
    assert h.link.send(bytes(200))
    h.link.flush()
    assert [len(f) for _, f in h.guest.received()] == [200]
    h.guest.rx.get_used()
    big = bytes(1400)  # 6 of the 15 buffers left each: two fit, then the waiting room
    tries = 2 + vhost.HOLD_BYTES // len(big) + 10
    taken = [h.link.send(big) for _ in range(tries)]
    assert sum(taken) == 2 + vhost.HOLD_BYTES // len(big) and not any(taken[-10:])
    assert h.link.tx_dropped == 1 + 10


def test_frame_dropped_when_mergeable_buffers_not_negotiated(h: Harness) -> None:
    h.guest.bring_up(BASE & ~net.F_MRG_RXBUF)
    h.guest.post_rx(8, size=256)
    assert not h.link.send(bytes(1000))
    assert h.link.send(bytes(200))
    h.link.flush()
    [(hdr, _)] = h.guest.received()
    assert hdr.num_buffers == 1


def test_no_rx_buffers_then_rx_kick_wakes_the_waiter(h: Harness) -> None:
    h.guest.bring_up()
    woken: list[int] = []
    h.link.on_rx_ready.append(lambda: woken.append(len(h.link.rx_buffers(8))))
    assert h.link.rx_buffers(4) == []
    assert h.link.send(discover())  # kept for the guest's next buffers, not dropped
    h.pump()
    assert woken == []
    h.guest.post_rx(2)  # the kick: EVENT_IDX was re-armed by the empty pop
    h.pump()
    assert woken == [1]  # the waiting frame went first, into one of the two
    h.link.flush()
    assert [f for _, f in h.guest.received()] == [discover()]
    h.guest.post_rx(1)  # not starved any more: no wake-up
    h.pump()
    assert woken == [1] and h.link.tx_dropped == 0


# --- rx_scatter(): frames scattered in place over mergeable buffers ---------------------------

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


@pytest.mark.parametrize("features", [BASE, ALL], ids=["plain", "all"])
def test_rx_scatter_scatter_over_mergeable_buffers_in_place(features: int) -> None:
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up(features)
        h.guest.post_rx(20, size=1536)  # Linux's smallest mergeable buffers
        frames = h.link.rx_scatter(3, 5000, head=54)
        # 12 + 5000 bytes: 4 chains of 1536 (the first 1524 bytes past the header)
        assert [[len(v) for v in f] for f in frames] == [[1524, 1536, 1536, 404]] * 3
        datas = [_payload(5000, 1), _payload(5000, 2), _payload(100, 3)]
        for frame, data in zip(frames, datas, strict=True):
            _fill(frame, data)
        h.link.commit_scatter([len(d) for d in datas])  # the last needs one chain of its 4
        h.link.flush()
        got = h.guest.received()
        assert [f for _, f in got] == datas
        assert [hdr.num_buffers for hdr, _ in got] == [4, 4, 1]
        flags = net.HDR_F_DATA_VALID if features & net.F_GUEST_CSUM else 0
        assert all(hdr.flags == flags for hdr, _ in got)
        assert (h.link.tx_zero_copy, h.link.tx_scattered, h.link.tx_frames) == (3, 2, 3)
        # the 3 chains the short frame did not need went back: 20 - 9 = 11 left, 2 frames
        assert len(h.link.rx_scatter(8, 5000, head=54)) == 2
        h.link.flush()  # not committed: rewound
        assert len(h.link.rx_scatter(8, 5000, head=54)) == 2
    finally:
        h.close()


def test_rx_scatter_unneeded_chains_before_used_ones_go_back_empty() -> None:
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up()
        h.guest.post_rx(8, size=1536)
        frames = h.link.rx_scatter(2, 5000)
        _fill(frames[0], _payload(60))
        _fill(frames[1], _payload(5000))
        h.link.commit_scatter([60, 5000])
        h.link.flush()
        used = h.guest.rx.get_used()
        # frame 0 in one chain, frame 1 in 4 (a frame's chains must be consecutive in the
        # used ring: num_buffers), then frame 0's 3 spare chains returned empty
        assert [length for _, length in used] == [72, 1536, 1536, 1536, 404, 0, 0, 0]
        assert h.link.tx_dropped == 0 and h.link.tx_frames == 2
    finally:
        h.close()


def test_rx_scatter_wait_for_a_whole_frame_then_the_kick_wakes() -> None:
    h = Harness(queue_size=16)
    try:
        h.guest.bring_up()
        woken: list[int] = []
        h.link.on_rx_ready.append(lambda: woken.append(len(h.link.rx_scatter(4, 5000))))
        h.guest.post_rx(2, size=1536)  # half a frame
        assert h.link.rx_scatter(4, 5000) == []
        h.guest.post_rx(2, size=1536)  # now one whole frame
        h.pump()
        assert woken == [1]
        h.link.flush()
    finally:
        h.close()


def test_rx_scatter_ring_smaller_than_a_frame_gives_what_it_holds() -> None:
    h = Harness(queue_size=4)
    try:
        h.guest.bring_up()
        h.guest.post_rx(4, size=1024)
        [frame] = h.link.rx_scatter(2, 5000)
        assert sum(len(v) for v in frame) == 4 * 1024 - net.HDR_LEN
        _fill(frame, _payload(4000))
        h.link.commit_scatter([4000])
        h.link.flush()
        [(hdr, got)] = h.guest.received()
        assert got == _payload(4000) and hdr.num_buffers == 4
    finally:
        h.close()


def test_rx_scatter_without_mergeable_one_chain_per_frame(h: Harness) -> None:
    h.guest.bring_up(BASE & ~net.F_MRG_RXBUF)
    h.guest.post_rx(3, size=1536)
    frames = h.link.rx_scatter(4, 5000)
    assert [[len(v) for v in f] for f in frames] == [[1524]] * 3
    _fill(frames[0], _payload(1524))
    h.link.commit_scatter([1524])
    h.link.flush()
    [(hdr, got)] = h.guest.received()
    assert got == _payload(1524) and hdr.num_buffers == 1
    with pytest.raises(ValueError):  # more than the chain holds
        h.link.rx_scatter(1, 5000)
        h.link.commit_scatter([1525])
    assert len(h.link.rx_scatter(4, 5000)) == 2  # the chains went back


def test_rx_scatter_header_only_first_descriptor(h: Harness) -> None:
    """Linux without MRG_RXBUF ("big packets") puts the virtio-net header in a descriptor
    of its own: the frame starts in the next one and the header is written there."""
    h.guest.bring_up(BASE & ~net.F_MRG_RXBUF)
    h.guest.rx.add([], [net.HDR_LEN, 2048, 4096])
    h.guest.rx.kick()
    [frame] = h.link.rx_scatter(1, 5000, head=54)
    assert [len(v) for v in frame] == [2048, 2952]
    _fill(frame, _payload(3000))
    h.link.commit_scatter([3000])
    h.link.flush()
    [(hdr, got)] = h.guest.received()
    assert got == _payload(3000) and hdr.num_buffers == 1


def test_rx_scatter_bounce_when_headers_would_straddle(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(8, size=256)
    [frame] = h.link.rx_scatter(1, 1000, head=300)  # no first buffer holds 300 bytes
    assert len(frame) == 1 and len(frame[0]) == 1000  # a bounce buffer
    _fill(frame, _payload(1000))
    h.link.commit_scatter([1000])
    h.link.flush()
    [(hdr, got)] = h.guest.received()
    assert got == _payload(1000) and hdr.num_buffers == 4  # 12 + 1000 bytes
    assert h.link.tx_zero_copy == 0 and h.link.tx_bounced == 1


def test_rx_scatter_stay_within_iov_max(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    import vhostpasst.link.vhost_rx as vhost
    monkeypatch.setattr(vhost, "IOV_MAX", 10)
    h.guest.bring_up()
    h.guest.post_rx(16, size=1536)
    frames = h.link.rx_scatter(4, 5000)
    assert len(frames) == 2 and sum(map(len, frames)) == 8
    h.link.flush()
    assert len(h.guest.rx.get_used()) == 0


def test_pop_many_matches_pop(h: Harness) -> None:
    """VirtQueue.pop_many(): the short path (one writable descriptor) and the full walk
    (several descriptors) give what pop() gives; fewer when the ring runs dry; rewind works."""
    h.guest.bring_up()
    h.guest.post_rx(2, size=1536)
    h.guest.rx.add([], [100, 200])
    h.guest.rx.kick()
    vq = h.link._queue(net.RX_QUEUE)
    assert vq is not None
    chains = vq.pop_many(5)
    assert [[len(b) for b in c.writable] for c in chains] == [[1536], [1536], [100, 200]]
    assert vq.pop_many(1) == [] and vq.inflight == 3
    vq.rewind(3)
    assert [c.head for c in vq.pop_many(3)] == [c.head for c in chains]
    vq.rewind(3)


def test_pop_many_refuses_a_buffer_outside_guest_memory(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(1)
    ring = h.guest.rx
    head = ring.free.pop(0)
    ring.write_desc(head, 0xDEAD0000000, 1536, 2, 0)  # DESC_F_WRITE, far outside memory
    ring.publish(head)
    ring.kick()
    assert h.link.rx_scatter(2, 5000) == []
    h.pump()
    assert h.disconnects == 1


def test_send_while_frames_are_out_is_deferred(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(6, size=1536)
    [frame] = h.link.rx_scatter(1, 2000)
    assert h.link.send(b"A" * 60)
    _fill(frame, b"B" * 2000)
    h.link.commit_scatter([2000])
    h.link.flush()
    assert [f for _, f in h.guest.received()] == [b"B" * 2000, b"A" * 60]


def test_rx_scatter_default_wraps_rx_buffers() -> None:
    from vhostpasst.link.base import Link

    class Pool(Link):
        connected = True
        committed: list[int] = []

        def rx_buffers(self, count: int) -> list[memoryview]:
            return [memoryview(bytearray(ETH_MAX_FRAME)) for _ in range(min(count, 3))]

        def commit(self, lengths) -> None:  # type: ignore[no-untyped-def]
            self.committed += lengths

        def flush(self) -> None: ...
        def close(self) -> None: ...

    link = Pool(lambda frames: None)
    frames = link.rx_scatter(5, 1514)
    assert [[len(v) for v in f] for f in frames] == [[1514]] * 3
    link.commit_scatter([100, 200])
    assert link.committed == [100, 200]


def test_send_while_buffers_are_out_is_deferred(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(4)
    bufs = h.link.rx_buffers(2)
    assert h.link.send(b"A" * 60)
    bufs[0][:60] = b"B" * 60
    h.link.commit([60])
    h.link.flush()
    assert [f for _, f in h.guest.received()] == [b"B" * 60, b"A" * 60]


def test_commit_more_than_handed_out_is_an_error(h: Harness) -> None:
    h.guest.bring_up()
    h.guest.post_rx(2)
    h.link.rx_buffers(1)
    with pytest.raises(ValueError):
        h.link.commit([60, 60])
    assert len(h.link.rx_buffers(2)) == 2  # the chain went back


def test_nothing_handed_out_before_the_rings_run(h: Harness) -> None:
    assert h.link.rx_buffers(4) == [] and not h.link.send(b"x" * 60)


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
    from vhostpasst.link.base import Tso
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


# --- the lean rx_scatter() path (net.rx_frames) against the general one ------------------------

def _scatter_run(lean: bool, features: int, sizes: list[int], rounds: list[tuple[int, int, int,
                 list[int], bool]], iov_max: int) -> list[object]:
    """Post RX buffers of `sizes`, then per round rx_scatter(count, frame_len, head), fill and
    commit `lengths` (or leave the frames uncommitted: rewound at flush); everything the
    guest and the link can see, for comparing the two paths."""
    import unittest.mock

    import vhostpasst.link.vhost_rx as vhost
    h = Harness(queue_size=64)
    patches = [unittest.mock.patch.object(vhost, "IOV_MAX", iov_max)]
    if not lean:
        patches.append(unittest.mock.patch.object(net, "rx_frames", lambda *a, **k: None))
    seen: list[object] = []
    try:
        for p in patches:
            p.start()
        h.guest.bring_up(features)
        for size in sizes:
            h.guest.rx.add([], [size])
        h.guest.rx.kick()
        for n, (count, frame_len, head, lengths, commit) in enumerate(rounds):
            frames = h.link.rx_scatter(count, frame_len, head)
            seen.append([[len(v) for v in f] for f in frames])
            seen.append(h.link._starved)
            if commit:
                lengths = [min(x, sum(map(len, f))) for x, f in zip(lengths, frames,
                                                                       strict=False)]
                for i, (f, x) in enumerate(zip(frames, lengths, strict=False)):
                    _fill(f, _payload(x, n * 16 + i)[:x] + bytes(sum(map(len, f)) - x))
                tso = None
                if features & TSO and frames:
                    from vhostpasst.link.base import Tso
                    tso = Tso(False, 34, 54, 1000)
                h.link.commit_scatter(lengths, tso)
            h.link.flush()
            used = h.guest.rx.get_used()
            seen.append(used)
            seen.append([h.guest.rx.written(head_, length) for head_, length in used])
        vq = h.link.backend.queues[0] if h.link.backend else None
        seen.append((h.link.tx_frames, h.link.tx_zero_copy, h.link.tx_scattered,
                     h.link.tx_gso, h.disconnects))
        seen.append(None if vq is None else (vq.last_avail_idx, vq.used_idx, vq.inflight))
    finally:
        for p in patches:
            p.stop()
        h.close()
    return seen


_round = st.tuples(st.integers(1, 12), st.integers(0, 20000), st.sampled_from([0, 54]),
                   st.lists(st.integers(0, 20000), max_size=12), st.booleans())


@settings(max_examples=80, deadline=None)
@given(features=st.sampled_from([BASE, ALL, ALL | TSO]),
       sizes=st.one_of(st.lists(st.sampled_from([1536, 4096]), min_size=1, max_size=64)
                       .map(lambda s: s[:1] * len(s)),
                       st.lists(st.integers(13, 5000), min_size=1, max_size=64)),
       rounds=st.lists(_round, min_size=1, max_size=4),
       iov_max=st.sampled_from([1024, 1024, 7]))
def test_rx_scatter_lean_path_same_as_general(features: int, sizes: list[int],
                                              rounds: list[tuple[int, int, int, list[int],
                                                                 bool]],
                                              iov_max: int) -> None:
    """Same frames handed out, same used entries, headers and bytes in the guest, same
    counters and ring indices, whatever the buffer sizes (Linux's equal ones, or any),
    frame lengths, counts, commits (partial, none: rewound) and view limit."""
    assert _scatter_run(True, features, sizes, rounds, iov_max) == \
        _scatter_run(False, features, sizes, rounds, iov_max)


def test_rx_scatter_lean_path_is_taken_for_linux_buffers() -> None:
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up()
        h.guest.post_rx(40, size=4096)
        frames = h.link.rx_scatter(2, 65534, head=54)
        assert h.link._batch is not None and not h.link._frames
        assert [[len(v) for v in f] for f in frames] == [[4084] + [4096] * 15 + [10]] * 2
        h.link.flush()  # not committed: all 34 chains back
        assert h.link.backend is not None and h.link.backend.queues[0].inflight == 0
        assert len(h.link.rx_scatter(3, 65534, head=54)) == 2
        assert h.link._starved  # the third frame did not fit: wait for the kick
        h.link.flush()
    finally:
        h.close()


def test_rx_scatter_lean_path_falls_back_for_other_chains(h: Harness) -> None:
    """A chain of two writable descriptors among Linux-like ones: the general path."""
    h.guest.bring_up()
    h.guest.rx.add([], [1536])
    h.guest.rx.add([], [1024, 1024])
    h.guest.post_rx(4, size=1536)
    frames = h.link.rx_scatter(2, 3000)
    assert h.link._batch is None and len(h.link._frames) == 2
    assert [[len(v) for v in f] for f in frames] == [[1524, 1024, 452], [1524, 1476]]
    h.link.flush()


@pytest.mark.parametrize("where", ["first", "later"])
def test_rx_scatter_lean_path_hostile_ring_disconnects(h: Harness, where: str) -> None:
    h.guest.bring_up()
    rx = h.guest.rx
    if where == "later":
        h.guest.post_rx(3, size=1536)
    i = rx.free.pop(0)
    rx.write_desc(i, 0xDEAD0000, 1536, 2, 0)  # writable, outside guest memory
    rx.publish(i)
    assert h.link.rx_scatter(4, 5000) == []
    assert h.disconnects == 1 and h.guest.fe.is_closed()


# --- rx_fill(): the socket read, the headers and the commit in the lean path's guest buffers ---
# The reference it must match is what tcp._from_sock() does without it: rx_scatter(), a
# recvmsg_into() over the views, the headers by _tcpsg's vp_tcp_frames_sg_tso() over the
# frames' first views without checksums (GUEST_CSUM, as out_buf.BufOutput._scattered_headers()),
# commit_scatter().

PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
FADDR4, GADDR4 = A4("198.51.100.7").packed, A4("10.0.2.15").packed
FADDR6, GADDR6 = A6("2001:db8::7").packed, A6("fd00::15").packed
FPORT, GPORT = 80, 40000
WRITER = int(sg_ffi.cast("uintptr_t", sg_ffi.addressof(sg_lib, "vp_tcp_fill_writer")))


def _refuse(arg: object, firsts: object, first_lens: object, sizes: object, n: int,
            lens: object) -> int:
    return -1


def link_rx_fill(link: Link, fd: int, count: int, frame_len: int, off: int, room: int,
                 flags: int, writer: int, writer_arg: int,
                 tso: Tso | None) -> tuple[int, int, int] | None:
    """Link.rx_fill() with TCP's reader of `fd` (vp_tcp_read: recvmsg with `flags`) and the
    frame writer `writer` with its argument `writer_arg`."""
    reader = SocketReader(fd, flags)
    return link.rx_fill(count, frame_len, off, room, reader.filler(writer, writer_arg), tso)


# a vr_frame_writer that refuses every frame (as vp_tcp_fill_writer does with buffers that
# can't hold the headers): read, nothing committed
_REFUSE_CB = sg_ffi.callback("int64_t(void *, uint8_t *const *, const uint32_t *, "
                             "const uint32_t *, unsigned int, uint32_t *)", _refuse)
REFUSER = int(sg_ffi.cast("uintptr_t", _REFUSE_CB))


def _template(six: bool = False) -> tuple[bytes, int]:
    """TcpConn.template() for a connection FADDR:FPORT -> GADDR:GPORT: headers with the
    per-segment fields zero, and the pseudo-header sum."""
    faddr, gaddr = (FADDR6, GADDR6) if six else (FADDR4, GADDR4)
    l3 = wtcp.TCP6_PAYLOAD_OFFSET - wtcp.TCP_HLEN if six else \
        wtcp.TCP4_PAYLOAD_OFFSET - wtcp.TCP_HLEN
    scratch = memoryview(bytearray(wtcp.TCP6_PAYLOAD_OFFSET))
    write = wtcp.write_eth_ipv6_tcp_headers if six else wtcp.write_eth_ipv4_tcp_headers
    write(scratch, GUEST_MAC, OUR_MAC, faddr, gaddr, FPORT, GPORT, 0, 0, 0, 0, 0)
    tmpl = bytearray(scratch[:l3 + wtcp.TCP_HLEN])
    if not six:
        tmpl[14 + 10:14 + 12] = b"\0\0"
    tmpl[l3 + 16:l3 + 18] = b"\0\0"
    return bytes(tmpl), checksum.partial(faddr + gaddr) + socket.IPPROTO_TCP


class Fill:
    """A struct vp_tcp_fill filled as out_vu.GuestFillOutput fills it."""

    def __init__(self, seq: int, ack: int, wnd: int, tso: Tso | None, six: bool = False) -> None:
        tmpl, pseudo = _template(six)
        self.f = sg_ffi.new("struct vp_tcp_fill *")
        self.f.flags, self.f.last_flags = wtcp.ACK, wtcp.ACK | wtcp.PSH
        self.f.tmpl = tmpl
        self.f.six = int(six)
        self.f.pseudo = pseudo
        self.f.seq, self.f.ack, self.f.wnd = seq, ack, wnd
        self.f.tso_mss = tso.mss if tso is not None else 0
        self.arg = int(sg_ffi.cast("uintptr_t", self.f))


def _scatter_fill(link: Link, fd: int, count: int, frame_len: int, off: int, room: int,
                  flags: int, fill: Fill, tso: Tso | None,
                  refuse: bool = False) -> tuple[int, int, int]:
    """rx_fill()'s reference, as tcp._from_sock() does it where the link has no rx_fill():
    rx_scatter(), recvmsg_into() over the views (frame bytes `off` on, `room` at most),
    vp_tcp_frames_sg_tso() over the frames' first views with no checksum, commit_scatter()
    (commit_scatter([]) when the headers don't fit, or with `refuse`: a writer that refuses).
    Returns what rx_fill() returns (bytes read, frames sent, the frames' payload room); the
    seq moves on in `fill` as the writer moves it. OSError from recvmsg_into() goes up."""
    frames = link.rx_scatter(count, frame_len, off)
    if not frames:
        return 0, 0, 0
    caps, left = [], max(room, 0)
    for frame in frames:
        caps.append(min(sum(map(len, frame)) - off, left))
        left -= caps[-1]
    iov = [v for f, cap in zip(frames, caps, strict=True) for v in _payload_iov(f, off, cap)]
    n = _recvmsg_into(fd, iov, flags)
    if n == 0:  # the end of the stream: nothing sent
        return 0, 0, sum(caps)
    sizes = frame_sizes(n, caps)
    k = len(sizes)
    firsts = [f[0] for f in frames[:k]]
    out = sg_ffi.new("uint32_t[]", k)
    fb = sg_ffi.from_buffer
    f = fill.f
    nxt = -1 if refuse else sg_lib.vp_tcp_frames_sg_tso(
        [fb(v, require_writable=True) for v in firsts], [len(v) for v in firsts], k,
        list(range(k + 1)), sizes, k, bytes(f.tmpl), f.six, f.pseudo, f.seq, f.ack, f.wnd,
        f.flags, f.last_flags, 0, f.tso_mss, out)
    if nxt < 0:
        link.commit_scatter([])
        return n, 0, sum(caps)
    link.commit_scatter(sg_ffi.unpack(out, k), tso)
    f.seq = nxt
    return n, k, sum(caps)


def _recvmsg_into(fd: int, iov: list[memoryview], flags: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as s:
        return s.recvmsg_into(iov, 0, flags)[0]


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


def _guest_ram(g: Guest) -> list[bytes]:
    return [g.dmem.read(r.desc.gpa, r.desc.size) for r in g.dmem.regions]


def _payload_iov(frame: list[memoryview], off: int, cap: int) -> list[memoryview]:
    """Frame bytes off .. off + cap - 1 of a frame laid over `frame`'s views."""
    out = []
    pos = 0
    for view in frame:
        lo, hi = max(off - pos, 0), min(off + cap - pos, len(view))
        if lo < hi:
            out.append(view[lo:hi])
        pos += len(view)
    return out


def _fill_round(link: Link, fill: bool, fd: int, count: int, frame_len: int, off: int,
                room: int, f: Fill, tso: Tso | None,
                commit: bool = True) -> tuple[tuple[int, int, int] | str, bool]:
    """What tcp._from_sock() does with the link: rx_fill() (or, without it or when it says
    None, the reference above); `commit` False: a writer that refuses the frames.
    (rx_fill()'s answer or "EAGAIN", whether rx_fill() did it)."""
    took = False
    try:
        got = None
        if fill:
            got = link_rx_fill(link, fd, count, frame_len, off, room, PEEK,
                               WRITER if commit else REFUSER, f.arg, tso)
            took = got is not None
        if got is None:
            got = _scatter_fill(link, fd, count, frame_len, off, room, PEEK, f, tso,
                                refuse=not commit)
    except BlockingIOError:
        return "EAGAIN", fill  # nothing queued (the caller stalls: nothing committed)
    return got, took


def _fill_run(fill: bool, features: int, mem: tuple[int, ...], sizes: list[int],
              rounds: list[tuple[int, int, int, int, bool, int | None]], data: bytes,
              queue_size: int = 64) -> tuple[list[object], list[bool]]:
    """Post RX buffers of `sizes`, queue `data` on a socket, then per round (count,
    frame_len, off (54: IPv4, 74: IPv6), room, commit, repost): read, write headers and
    commit with rx_fill() (`fill`) or the reference, or have the writer refuse them
    (`commit` False); consume what was sent (the guest's ACK), repost `repost` buffers (None:
    as many as were used). Everything the guest and the link show, and per round whether
    rx_fill() did it."""
    h = Harness(queue_size=queue_size)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    seen: list[object] = []
    took: list[bool] = []
    seq, ack, wnd = 0xFFFFF000, 0x12345678, 0xABCD  # seq wraps within the rounds
    try:
        _guest_memory(h, mem)
        h.guest.bring_up(features)
        for size in sizes:
            h.guest.rx.add([], [size])
        h.guest.rx.kick()
        a.sendall(data)
        for count, frame_len, off, room, commit, repost in rounds:
            six = off == wtcp.TCP6_PAYLOAD_OFFSET
            tso = Tso(six, off - wtcp.TCP_HLEN, off, 1448) if features & TSO else None
            f = Fill(seq, ack, wnd, tso, six)
            got, did = _fill_round(h.link, fill, b.fileno(), count, frame_len, off, room, f,
                                   tso, commit)
            took.append(did)
            nxt = f.f.seq
            seen.append((got, nxt, h.link._starved))
            sent = (nxt - seq) & 0xFFFFFFFF
            if sent:
                assert isinstance(got, tuple) and got[1]
                assert len(b.recv(sent)) == sent
            seq = nxt
            h.link.flush()
            used = h.guest.rx.get_used()
            seen.append(used)
            seen.append([h.guest.rx.written(head, length) for head, length in used])
            more = len(used) if repost is None else repost
            for _ in range(min(more, len(h.guest.rx.free))):
                h.guest.rx.add([], [sizes[0]])
            h.guest.rx.kick()
            h.pump(1)
        vq = h.link._queue(net.RX_QUEUE)
        seen.append((h.link.tx_frames, h.link.tx_zero_copy, h.link.tx_scattered,
                     h.link.tx_gso, h.link.tx_dropped, h.disconnects))
        seen.append(None if vq is None else (vq.last_avail_idx, vq.used_idx, vq.inflight))
        seen.append(_guest_ram(h.guest))
        try:  # what is still queued (peeked, not sent)
            seen.append(b.recv(len(data) + 1, socket.MSG_DONTWAIT))
        except BlockingIOError:
            seen.append(b"")
    finally:
        a.close()
        b.close()
        h.close()
    return seen, took


@pytest.mark.parametrize("sizes, frame_len, count, room", [
    ([4096] * 60, 54 + 65000, 4, 1 << 20),  # Linux's 4 KiB buffers, 17 per frame: 3 fit
    ([4096] * 60, 54 + 65000, 3, 100000),  # the window cuts the second frame short
    ([1536] * 40, 54 + 5000, 8, 1 << 20),  # 1.5 KiB ones: 4 per frame
    ([4096] * 20, 54 + 1460, 12, 1 << 20),  # frames that fit their first buffer
    ([1536] * 20, 54 + 1460, 12, 3000),  # ... and the window
    ([1536, 4096, 2000, 1536, 64, 3000] * 8, 54 + 9000, 8, 1 << 20),  # any sizes
], ids=["64k-4k", "64k-4k-window", "5000-1.5k", "1514-4k", "1514-1.5k-window", "mixed"])
@pytest.mark.parametrize("mem", [(1 << 20,), (40000, 1 << 20)], ids=["one-region", "two"])
def test_rx_fill_same_as_rx_scatter_and_recvmsg_into(sizes: list[int], frame_len: int,
                                                     count: int, room: int,
                                                     mem: tuple[int, ...]) -> None:
    """rx_fill() puts the same bytes in the guest's memory, says the same, moves the seq and
    leaves the same used entries, headers, counters and queue state as rx_scatter(), a
    recvmsg_into() over its views, the headers over the first views and commit_scatter();
    also where the writer refuses the frames (nothing sent); the socket keeps what was only
    peeked."""
    data = _payload(60000, 5) + _payload(60000, 9)
    rounds = [(count, frame_len, 54, room, True, 0), (count, frame_len, 54, room, False, 0),
              (count, frame_len, 54, room, True, 40)]
    ours, took = _fill_run(True, ALL | TSO, mem, sizes, rounds, data)
    theirs, _ = _fill_run(False, ALL | TSO, mem, sizes, rounds, data)
    assert ours == theirs
    assert took == [True] * 3  # rx_fill() did it, not the rx_scatter() fallback
    (n, sent, caps), _, _ = ours[0]  # type: ignore[misc]
    assert 0 < n <= room and 0 < sent and caps <= room
    assert ours[1], "nothing reached the guest"
    assert ours[4] == ours[5] == []  # type: ignore[index]  # the writer refused: none used


def test_rx_fill_frames_over_4k_buffers() -> None:
    """A worked example: two 64 KiB TCP frames over 4 KiB buffers, as the guest sees them."""
    h = Harness(queue_size=64)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        h.guest.bring_up(ALL | TSO)
        h.guest.post_rx(40, size=4096)
        data = _payload(100000, 3)
        a.sendall(data)
        tso = Tso(False, 34, 54, 1448)
        f = Fill(1, 2, 3, tso)
        got = link_rx_fill(h.link, b.fileno(), 4, 54 + 64000, 54, 1 << 20, PEEK, WRITER, f.arg,
                           tso)
        assert got == (100000, 2, 128000)  # 2 frames laid out over 16 chains each
        assert f.f.seq == 1 + 100000
        vq = h.link._queue(net.RX_QUEUE)
        # the second frame's 36000 bytes took 9 of its 16 chains: the other 7 went back
        assert vq is not None and vq.inflight == 0 and vq.last_avail_idx == 16 + 9
        h.link.flush()
        (hdr, one), (hdr2, two) = h.guest.received()
        assert one[54:] == data[:64000] and two[54:] == data[64000:]
        assert (hdr.gso_type, hdr.num_buffers) == (net.GSO_TCPV4, 16)
        assert (hdr2.gso_type, hdr2.num_buffers) == (net.GSO_TCPV4, -(-(12 + 36054) // 4096))
        assert b.recv(200000) == data  # peeked: all still queued
    finally:
        a.close()
        b.close()
        h.close()


_fill_round_st = st.tuples(st.integers(1, 8), st.integers(1, 65000), st.sampled_from([54, 74]),
                           st.integers(-1, 200000), st.booleans(), st.integers(0, 24))


@settings(max_examples=40, deadline=None)
@given(features=st.sampled_from([ALL, ALL | TSO]),
       mem=st.sampled_from([(1 << 20,), (40000, 1 << 20)]),
       sizes=st.one_of(st.lists(st.sampled_from([1536, 4096]), min_size=1, max_size=64)
                       .map(lambda s: s[:1] * len(s)),
                       st.lists(st.integers(13, 5000), min_size=1, max_size=64)),
       rounds=st.lists(_fill_round_st, min_size=1, max_size=4),
       data_len=st.sampled_from([0, 1, 60000]) | st.integers(0, 60000))
def test_rx_fill_same_as_rx_scatter_any_ring(features: int, mem: tuple[int, ...],
                                             sizes: list[int],
                                             rounds: list[tuple[int, int, int, int, bool, int]],
                                             data_len: int) -> None:
    """Whatever the buffers (Linux's equal ones, or any: rx_fill() says None and the
    caller falls back), frame lengths, IPv4 or IPv6, windows, refusing writers and reposts,
    and the short-ring memo in between: the guest sees the same either way."""
    rounds = [(c, off + size, off, room, commit, repost)
              for c, size, off, room, commit, repost in rounds]
    data = _payload(data_len, 11)
    assert _fill_run(True, features, mem, sizes, rounds, data)[0] == \
        _fill_run(False, features, mem, sizes, rounds, data)[0]


def test_rx_fill_through_the_listener(tmp_path: Path) -> None:
    """The listener (what TCP holds) forwards rx_fill(); a Link without the path says None."""
    loop = Loop()
    lst = VhostUserListener(loop, str(tmp_path / "vu.sock"), lambda frames: None)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        g = _listener_guest(loop, lst.path)
        g.bring_up(ALL)
        g.post_rx(4, size=4096)
        a.sendall(_payload(3000))
        f = Fill(7, 0, 0, None)
        got = link_rx_fill(lst, b.fileno(), 4, 54 + 1460, 54, 1 << 20, PEEK, WRITER, f.arg,
                           None)
        assert got == (3000, 3, 4 * 1460)
        assert f.f.seq == 7 + 3000
        lst.flush()
        frames = [f for _, f in g.received()]
        assert [fr[54:] for fr in frames] == [_payload(3000)[k:k + 1460]
                                              for k in (0, 1460, 2920)]
        assert [struct.unpack("!I", fr[38:42])[0] for fr in frames] == [7, 1467, 2927]
        g.close()
    finally:
        a.close()
        b.close()
        lst.close()
        loop.close()
    assert Link.rx_fill(lst, 1, 1514, 54, 1, SocketReader(0, 0).filler(WRITER), None) is None


# --- the short-ring memo: a try that found too few chains for one frame ------------------------

def _count_pops(vq: object, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Calls of either pop the link makes on `vq` (net.pop_rx_frames(): rx_scatter();
    net.fill_rx_frames(): rx_fill()), by the count asked."""
    calls: list[int] = []
    for name in ("pop_rx_frames", "fill_rx_frames"):
        real = getattr(net, name)

        def counted(q: object, count: int, *args: object, _real: object = real,
                    **kwargs: object) -> object:
            if q is vq:
                calls.append(count)
            return _real(q, count, *args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(net, name, counted)
    return calls


@pytest.mark.parametrize("fill", [True, False], ids=["rx_fill", "rx_scatter"])
def test_short_ring_is_not_popped_again_until_it_changes(
        h: Harness, monkeypatch: pytest.MonkeyPatch, fill: bool) -> None:
    """Half a frame's chains: the first try pops them and gives them back; tries with the
    ring unchanged pop nothing (not one pop call) and return nothing; a smaller frame, or
    buffers the guest posts (kicked or not), are tried again."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)

    def get(frame_len: int) -> int:
        if fill:
            got = link_rx_fill(h.link, b.fileno(), 4, frame_len, 54, 1 << 20, PEEK, WRITER,
                               Fill(0, 0, 0, None).arg, None)
            assert got is not None
            return got[1]
        return len(h.link.rx_scatter(4, frame_len, 54))

    def give_back(frames: int) -> None:
        """The frames get() handed out back in the ring as they were: rx_scatter()'s
        rewound at the flush; rx_fill()'s used (the guest reposts as many buffers)."""
        h.link.flush()
        if fill:
            assert len(h.guest.rx.get_used()) == frames
            h.guest.post_rx(frames, size=1536)

    try:
        h.guest.bring_up(ALL)
        a.sendall(_payload(20000))
        h.guest.post_rx(2, size=1536)  # 3048 bytes of frame: half of one of 5054
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None
        calls = _count_pops(vq, monkeypatch)
        assert get(5054) == 0 and calls and h.link._starved
        assert (vq.last_avail_idx, vq.inflight) == (0, 0)
        assert h.link._short is not None
        calls.clear()
        for frame_len in (5054, 5054, 9000):  # the same or bigger: can't fit either
            assert get(frame_len) == 0
        assert calls == [] and (vq.last_avail_idx, vq.inflight) == (0, 0) and h.link._starved
        assert get(1514) == 2 and calls  # a smaller frame fits: popped and handed out
        give_back(2)
        calls.clear()
        assert get(5054) == 0 and calls  # the memo is gone, so this popped again...
        assert h.link._short is not None  # ... and set it again
        calls.clear()
        h.guest.rx.add([], [1536])  # posted, no kick yet: the ring changed all the same
        assert get(5054) == 0 and calls  # 3 of 4 chains: still short, but it looked
        calls.clear()
        assert get(5054) == 0 and calls == []
        h.guest.post_rx(1, size=1536)
        assert get(5054) == 1 and calls  # 4 chains: a frame
        h.link.flush()
        assert b.recv(30000) == _payload(20000)
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("features", [BASE | net.F_GUEST_CSUM, ALL], ids=["plain", "event-idx"])
def test_rx_kick_wakes_after_a_starved_rx_fill(h: Harness, features: int) -> None:
    """A starved rx_fill() (and the memo's answer after it) leaves the link waiting for the
    RX kick: when the guest posts enough buffers, on_rx_ready callbacks run and get frames."""
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    woken: list[int] = []

    def fill(count: int) -> tuple[int, int, int] | None:
        return link_rx_fill(h.link, b.fileno(), count, 5054, 54, 1 << 20, PEEK, WRITER,
                            Fill(0, 0, 0, None).arg, None)

    def ready() -> None:
        got = fill(1)
        assert got is not None
        woken.append(got[1])

    try:
        h.guest.bring_up(features)
        h.link.on_rx_ready.append(ready)
        a.sendall(_payload(20000))
        h.guest.post_rx(2, size=1536)
        h.pump()
        assert fill(4) == (0, 0, 0)
        assert fill(4) == (0, 0, 0)  # memo
        h.pump()
        assert woken == []
        h.guest.post_rx(2, size=1536)  # now one whole frame; the kick
        h.pump()
        assert woken == [1]
        h.link.flush()
        assert len(h.guest.received()) == 1
        h.guest.post_rx(1, size=1536)  # not starved any more: no wake-up
        h.pump()
        assert woken == [1]
    finally:
        a.close()
        b.close()


def test_short_ring_memo_forgotten_on_reconnect(h: Harness) -> None:
    h.guest.bring_up(ALL)
    h.guest.post_rx(2, size=1536)
    assert h.link.rx_scatter(4, 5054, 54) == [] and h.link._short is not None
    h.guest.close()
    h.pump()
    assert h.link._short is None
    h.guest = h.connect()
    h.guest.bring_up(ALL)
    h.guest.post_rx(2, size=4096)  # the same indices, bigger buffers: a frame
    assert len(h.link.rx_scatter(4, 5054, 54)) == 1
    h.link.flush()


# --- net.rx_frames(): the chains' records next to the views ---------------------------------------

def test_rx_frames_records_same_as_views() -> None:
    """The batch's raw records are those of exactly the chains kept (region, offset, length,
    as RxBatch.buf() reads them), and a second pop of the same chains lays them out the
    same."""
    h = Harness(queue_size=64)
    try:
        _guest_memory(h, (40000, 1 << 20))
        h.guest.bring_up(ALL)
        h.guest.post_rx(30, size=4096)
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None
        views = net.rx_frames(vq, 8, 20000, 54)  # 5 chains a frame: 6 frames, then dry
        assert views is not None and len(views.frames) == 6
        vq.rewind(len(views.heads))
        recs = net.rx_frames(vq, 8, 20000, 54)
        assert recs is not None and recs.records is not None
        assert (recs.heads, recs.lens, recs.regions, recs.offsets, recs.starts) == \
            (views.heads, views.lens, views.regions, views.offsets, views.starts)
        assert (recs.starved, recs.seen) == (views.starved, views.seen) == (True, 30)
        assert len(recs.heads) == 30 and recs.starts == [0, 5, 10, 15, 20, 25]
        assert set(recs.regions) == {0, 1}  # buffers in both regions
        triples = list(struct.iter_unpack("=QQQ", recs.records))
        assert triples == list(zip(recs.regions, recs.offsets, recs.lens, strict=True))
        mem = vq.memory.table.views
        for k, (region, start, length) in enumerate(triples):
            assert recs.buf(k) == mem[region][start:start + length]
        for frame, s in zip(views.frames, views.starts, strict=True):
            assert frame[0] == recs.buf(s)[net.HDR_LEN:net.HDR_LEN + len(frame[0])]
        assert vq.inflight == len(recs.heads)
        vq.rewind(vq.inflight)
    finally:
        h.close()


def test_rx_frames_records_trimmed_to_the_chains_kept() -> None:
    """Chains popped past the last frame go back, and their records go too."""
    h = Harness(queue_size=64)
    try:
        h.guest.bring_up(ALL)
        h.guest.post_rx(10, size=1536)
        vq = h.link._queue(net.RX_QUEUE)
        assert vq is not None
        batch = net.rx_frames(vq, 4, 5000, 54, hint=1536)  # 4 chains a frame
        assert batch is not None and batch.records is not None
        assert batch.starts == [0, 4] and len(batch.heads) == 8 and batch.seen == 10
        assert len(batch.records) == 24 * 8 and vq.inflight == 8
        vq.rewind(8)
    finally:
        h.close()

