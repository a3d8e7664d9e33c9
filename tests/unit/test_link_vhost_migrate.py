"""A live migration's device state between two vhost-user links, each driven by the Python
front end as qemu drives them: what the source's dispatcher learned of the guest (MAC and
address) arrives in the destination's, through SET_DEVICE_STATE_FD on both sides; a corrupt
stream fails the destination's CHECK and changes nothing there."""

from __future__ import annotations

import os

from tests.unit.test_link_vhost import GUEST_MAC, GW4, HOST4, Harness, discover
from vhostpasst.core.nat import GuestAddrs
from vhostpasst.link.vhost import VhostUserLink
from vhostpasst.wire import eth, ip, udp
from virtio import message as m
from virtio.devstate import Direction
from virtio.message import ProtocolFeature as PF
from virtio.message import Request as R


class MigratingHarness(Harness):
    """The link given its dispatcher's guest addresses, as the daemon does."""

    def __init__(self) -> None:
        super().__init__()
        self.link.close()
        self.link = VhostUserLink(self.loop, self._on_frames, on_disconnect=self._gone,
                                  guest=self.dispatcher.guest)
        self.dispatcher.link = self.link
        self.guest.close()
        self.guest = self.connect()
        self.guest.bring_up()

    def transfer(self, direction: Direction, fd: int) -> None:
        reply = self.guest.fe.request(R.SET_DEVICE_STATE_FD,
                                      m.DEVICE_STATE.pack(direction, 0), [fd])
        assert reply is not None and reply.u64() == 0x100  # success, no fd of ours
        os.close(fd)

    def check(self) -> int:
        return self.guest.fe.get_u64(R.CHECK_DEVICE_STATE)


def save(source: MigratingHarness) -> bytes:
    r, w = os.pipe()
    source.transfer(Direction.SAVE, w)
    source.pump()
    data = os.read(r, 1 << 16)
    assert os.read(r, 1) == b""  # EOF: the whole state
    os.close(r)
    assert source.check() == 0
    return data


def load(destination: MigratingHarness, data: bytes) -> int:
    r, w = os.pipe()
    destination.transfer(Direction.LOAD, r)
    os.write(w, data)
    os.close(w)
    return destination.check()


def test_a_link_without_the_guests_addresses_offers_no_device_state() -> None:
    h = Harness()
    try:
        assert not h.guest.fe.get_u64(R.GET_PROTOCOL_FEATURES) & 1 << PF.DEVICE_STATE
    finally:
        h.close()


def test_the_guests_mac_and_address_move_to_the_destination() -> None:
    source, destination = MigratingHarness(), MigratingHarness()
    try:
        source.guest.transmit(discover())  # the MAC
        source.guest.transmit(eth.build_eth(b"\x9a\x55" * 3, GUEST_MAC, eth.ETH_P_IP,
                                            ip.build_ipv4(HOST4, GW4, ip.IPPROTO_UDP,
                                                          udp.build_udp4(HOST4, GW4, 9, 9,
                                                                         b"x"))))
        assert source.dispatcher.guest.mac == GUEST_MAC
        assert destination.dispatcher.guest == GuestAddrs()

        assert load(destination, save(source)) == 0
        assert destination.dispatcher.guest == GuestAddrs(mac=GUEST_MAC, addr4_seen=HOST4)
        assert destination.link.backend is not None and not destination.link.backend.closed
    finally:
        source.close()
        destination.close()


def test_a_corrupt_state_fails_the_check_and_changes_nothing() -> None:
    source, destination = MigratingHarness(), MigratingHarness()
    try:
        source.guest.transmit(discover())
        data = bytearray(save(source))
        data[4] = 9  # the version: 0x0901
        assert load(destination, bytes(data)) != 0
        assert destination.dispatcher.guest == GuestAddrs()
        assert load(destination, save(source)) == 0  # and a good one still loads after it
        assert destination.dispatcher.guest.mac == GUEST_MAC
    finally:
        source.close()
        destination.close()
