"""Multiqueue on the vhost-user link, driven by the Python front end as qemu drives it with
`-netdev vhost-user,queues=N`: MQ offered and GET_QUEUE_NUM in pairs, frames from any TX queue
served (its used ring, its call), everything to the guest on the first RX queue, a pair
enabled late served at once, and TX coalescing kept per queue."""

from __future__ import annotations

import pytest

from tests.unit.test_link_vhost import ALL, Harness, discover, is_offer
from tests.virtio.frontend import DriverRing
from vhostpasst.link import vhost as vhost_mod
from virtio import message as m
from virtio import net
from virtio.message import Request as R

MQ = ALL | net.F_MQ


class Pairs:
    """The Harness's guest with `extra` more queue pairs set up (queues 2.. of the device)."""

    def __init__(self, h: Harness, extra: int = 1, enable: bool = True) -> None:
        self.h = h
        h.guest.bring_up(MQ)
        self.rx: list[DriverRing] = []
        self.tx: list[DriverRing] = []
        for pair in range(1, extra + 1):
            rx = DriverRing(h.guest.dmem, h.queue_size)
            tx = DriverRing(h.guest.dmem, h.queue_size)
            rx.event_idx = tx.event_idx = True
            h.guest.fe.setup_queue(2 * pair, rx)
            h.guest.fe.setup_queue(2 * pair + 1, tx)
            self.rx.append(rx)
            self.tx.append(tx)
            if enable:
                self.enable(pair)

    def enable(self, pair: int) -> None:
        for index in (2 * pair, 2 * pair + 1):
            assert self.h.guest.fe.ack(R.SET_VRING_ENABLE, m.encode_state(index, 1)) == 0

    def transmit(self, pair: int, frame: bytes, kick: bool = True) -> None:
        ring = self.h.guest.tx if pair == 0 else self.tx[pair - 1]
        ring.add([bytes(net.HDR_LEN) + frame])
        if kick:
            ring.kick()
        self.h.guest.fe.pump()

    def close(self) -> None:
        for ring in self.rx + self.tx:
            ring.close()


@pytest.fixture
def h():
    harness = Harness()
    yield harness
    harness.close()


def test_mq_offered_and_queue_pairs_counted_in_pairs(h: Harness) -> None:
    assert h.guest.fe.get_u64(R.GET_FEATURES) & net.F_MQ
    pf = h.guest.fe.get_u64(R.GET_PROTOCOL_FEATURES)
    assert pf & (1 << m.ProtocolFeature.MQ)
    assert h.guest.fe.get_u64(R.GET_QUEUE_NUM) == vhost_mod.QUEUE_PAIRS_MAX


def test_frames_from_a_later_pair_served_answers_on_the_first_rx_queue(h: Harness) -> None:
    pairs = Pairs(h, extra=2)
    try:
        h.guest.post_rx(4)
        pairs.rx[0].add([], [2048])  # buffers on pair 1's RX queue: never used
        pairs.transmit(2, discover())
        h.pump()
        assert h.delivered == [discover()]
        assert pairs.tx[1].get_used() and pairs.tx[1].calls() >= 1  # its chain back, and told
        assert not pairs.tx[0].get_used() and not h.guest.tx.get_used()
        [(_, frame)] = h.guest.received()
        assert is_offer(frame)
        assert not pairs.rx[0].get_used()
        assert h.link.rx_frames_per_pair == {2: 1}
        pairs.transmit(0, discover())  # the first pair as before, not counted apart
        h.pump()
        assert len(h.delivered) == 2 and h.guest.tx.get_used()
        assert h.link.rx_frames_per_pair == {2: 1}
    finally:
        pairs.close()


def test_pair_enabled_late_serves_what_waits_in_it(h: Harness) -> None:
    """A frame queued and kicked before the front end enabled its pair (the guest switching to
    more pairs through its control queue) goes out when the pair is enabled."""
    pairs = Pairs(h, extra=1, enable=False)
    try:
        h.guest.post_rx(4)
        pairs.transmit(1, discover())
        h.pump()
        assert h.delivered == []
        pairs.enable(1)
        h.pump()
        assert h.delivered == [discover()]
        assert pairs.tx[0].get_used()
    finally:
        pairs.close()


def test_disabled_pair_is_not_served(h: Harness) -> None:
    pairs = Pairs(h, extra=1)
    try:
        assert h.guest.fe.ack(R.SET_VRING_ENABLE, m.encode_state(3, 0)) == 0
        pairs.transmit(1, discover())
        h.pump()
        assert h.delivered == [] and not pairs.tx[0].get_used()
        assert h.link.connected  # the first pair carries on
    finally:
        pairs.close()


def test_tx_coalescing_is_per_queue(h: Harness, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bulk pass on one TX queue holds that queue's next kick, not another queue's."""
    monkeypatch.setattr(vhost_mod, "TX_BULK_BYTES", 100)
    pairs = Pairs(h, extra=1)
    try:
        h.guest.post_rx(8)
        pairs.transmit(0, discover())  # > 100 bytes: a bulk pass on queue 1
        h.pump()
        assert h.link._tx_bulk == {1}
        pairs.transmit(1, discover())  # queue 3's kick is served at once
        h.pump(1)
        assert len(h.delivered) == 2 and h.link.kicks_coalesced == 0
        assert h.link._tx_bulk == {1, 3}
        pairs.transmit(0, discover())  # queue 1's next kick is held
        h.pump(1)
        assert len(h.delivered) == 2 and h.link.kicks_coalesced == 1
        assert h.link._tx_scheduled == {1}
    finally:
        pairs.close()


def test_vring_index_past_the_last_pair_refused(h: Harness) -> None:
    h.guest.bring_up(MQ)
    last = 2 * vhost_mod.QUEUE_PAIRS_MAX
    assert h.guest.fe.ack(R.SET_VRING_NUM, m.encode_state(last - 1, 16)) == 0
    assert h.guest.fe.ack(R.SET_VRING_NUM, m.encode_state(last, 16)) != 0
    assert h.link.connected


def test_hostile_descriptor_on_a_later_pair_disconnects(h: Harness) -> None:
    """A descriptor outside guest memory on pair 1's TX queue: the front end is dropped as on
    the first pair, and the next one is served."""
    pairs = Pairs(h, extra=1)
    try:
        tx = pairs.tx[0]
        tx.write_desc(0, 0xDEAD0000, 64, 0, 0)  # outside guest memory
        tx.publish(0)
        tx.kick()
        h.pump()
        assert h.disconnects == 1 and h.guest.fe.is_closed()
    finally:
        pairs.close()
    h.guest.close()
    h.guest = h.connect()
    h.guest.bring_up(MQ)
    h.guest.post_rx(4)
    h.guest.transmit(discover())
    h.pump()
    assert h.delivered == [discover()] and h.link.connected
