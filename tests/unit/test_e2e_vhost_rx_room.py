"""Bounce buffers are handed out only for frames the guest's posted buffers can hold.

At MTU 65520 a full frame takes 17 of Linux's 4 KiB mergeable buffers; handing out one bounce
buffer per posted chain (as before) made commit() drop most frames when the ring was low, and
TCP then waited for the guest's duplicate ACKs. The link now hands out what fits and asks for
a kick when the guest posts more (EVENT_IDX), which wakes the waiting sender.
(The 200 MiB transfers of tests/netns/test_e2e_vhost.py with 4 KiB buffers check "0 dropped".)
"""

from __future__ import annotations

from tests.unit.test_link_vhost import GUEST_MAC, OUR_MAC, Harness
from vhostpasst.wire import eth

FRAME_MAX = 14 + 65520


def test_bounce_slots_follow_room_and_a_repost_wakes_the_waiter() -> None:
    h = Harness(frame_max=FRAME_MAX, queue_size=64)
    try:
        h.guest.bring_up()  # EVENT_IDX included
        woken: list[int] = []
        h.link.on_rx_ready.append(lambda: woken.append(len(h.link.rx_buffers(8))))
        h.guest.post_rx(16, size=4096)  # 64 KiB: one byte short of a full frame and header
        h.pump()  # (its kick, before anyone waits)
        assert h.link.rx_buffers(8) == []  # nothing handed out that could not be delivered
        h.link.flush()
        h.pump()
        assert woken == []
        h.guest.post_rx(18, size=4096)  # 34 chains: two full frames; the guest must kick
        h.pump()
        assert woken == [2]
        h.link.flush()

        bufs = h.link.rx_buffers(8)
        assert len(bufs) == 2
        frame = eth.build_eth(GUEST_MAC, OUR_MAC, eth.ETH_P_IP, bytes(FRAME_MAX - 14))
        for b in bufs:
            b[:len(frame)] = frame
        h.link.commit([len(frame)] * 2)
        h.link.flush()
        got = h.guest.received()
        assert [len(f) for _, f in got] == [len(frame)] * 2
        assert [hdr.num_buffers for hdr, _ in got] == [17, 17]
        assert h.link.tx_dropped == 0
    finally:
        h.close()


def test_ring_too_small_for_any_full_frame_still_takes_small_ones() -> None:
    """A ring that can never hold a full frame gets one bounce slot per chain, as before."""
    h = Harness(frame_max=FRAME_MAX, queue_size=16)
    try:
        h.guest.bring_up()
        h.guest.post_rx(16, size=2048)
        assert len(h.link.rx_buffers(8)) == 8
    finally:
        h.close()
