"""What the protocol handlers (ICMP, UDP, TCP) share, built once by the dispatcher: the
configuration, the loop, the flow table, the guest's learned addresses (one copy, which NAT
reads) and the link frames to the guest go out on (None until one is attached)."""

from __future__ import annotations

from dataclasses import dataclass, field

from vhostpasst.config.conf import DEFAULT_MTU, Config
from vhostpasst.core.flow import FlowTable
from vhostpasst.core.loop import EventLoop
from vhostpasst.core.nat import GuestAddrs
from vhostpasst.link.base import Link
from vhostpasst.wire.eth import BROADCAST_MAC


@dataclass
class Context:
    """What protocol handlers share: configuration, loop, flow table, guest state, link."""

    config: Config
    loop: EventLoop
    flows: FlowTable
    guest: GuestAddrs = field(default_factory=GuestAddrs)
    link: Link | None = None

    def guest_mac(self) -> bytes:
        """Where frames to the guest go: its learned MAC, broadcast until we saw one."""
        return self.guest.mac or BROADCAST_MAC

    def rx_buffers(self, count: int) -> list[memoryview]:
        """Link buffers to fill in place; empty if no guest is attached."""
        link = self.link
        if link is None or not link.connected:
            return []
        return link.rx_buffers(count)

    def commit(self, lengths: list[int]) -> None:
        if self.link is not None:
            self.link.commit(lengths)

    @property
    def max_l3(self) -> int:
        """Largest IP packet the guest takes (its MTU; 0 means 'not advertised')."""
        return self.config.mtu or DEFAULT_MTU
