"""Frames in from the guest link: parse, hand to the service or protocol that owns them.

Everything a guest sends passes through `Dispatcher.on_frames`. A frame that does not parse,
or that no handler wants, is dropped with a rate-limited log line; an exception raised while
handling one frame is caught here so that no guest input can stop the daemon.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from ipaddress import IPv4Address

from vhostpasst.conf import Config
from vhostpasst.link.base import Link
from vhostpasst.log import RateLimitedLog
from vhostpasst.services import arp
from vhostpasst.services.dhcp import DhcpServer
from vhostpasst.wire import eth, ip, udp
from vhostpasst.wire.errors import Malformed

log = logging.getLogger(__name__)

DHCP_SERVER_PORT = 67


class Dispatcher:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.link: Link | None = None
        ip4 = config.ip4
        self.dhcp = DhcpServer(config) if ip4 is not None and not config.no_dhcp else None
        self.guest_addr4: IPv4Address | None = ip4.addr if ip4 is not None else None
        self.guest_mac: bytes | None = None  # learned from the source of every guest frame
        self.addr4_seen: IPv4Address | None = None
        self._drops = RateLimitedLog(log)
        self.dropped = 0

    def on_frames(self, frames: Sequence[memoryview]) -> None:
        for frame in frames:
            try:
                self._handle(frame)
            except Malformed as e:
                self._drop("malformed", f"malformed frame dropped: {e}")
            except Exception:  # a bug must not let a guest stop the daemon
                self.dropped += 1
                log.exception("error while handling a guest frame (dropped)")

    def _drop(self, key: str, message: str) -> None:
        self.dropped += 1
        self._drops.warning(key, message)

    def _reply(self, frame: bytes | None) -> None:
        if frame is not None and self.link is not None:
            self.link.send(frame)

    def _handle(self, frame: memoryview) -> None:
        header = eth.parse_eth(frame)
        if not header.src[0] & 1:  # multicast sources are bogus; don't learn them
            self.guest_mac = bytes(header.src)
        if header.ethertype == eth.ETH_P_ARP:
            if self.config.ip4 is not None:
                self._reply(arp.reply(frame, self.config.our_mac, self.guest_addr4))
        elif header.ethertype == eth.ETH_P_IP:
            self._handle_ipv4(frame, header.payload)
        elif header.ethertype == eth.ETH_P_IPV6:
            self._drop("ipv6", "IPv6 frame dropped: IPv6 is not supported yet")
        else:
            self._drop(f"ethertype-{header.ethertype:04x}",
                       f"frame with EtherType 0x{header.ethertype:04x} dropped")

    def _handle_ipv4(self, frame: memoryview, packet: memoryview) -> None:
        if self.config.ip4 is None:
            return
        header = ip.parse_ipv4(packet)
        if header.src != IPv4Address(0) and not header.src.is_loopback:
            self.addr4_seen = header.src
        if header.proto == ip.IPPROTO_UDP:
            datagram = udp.parse_udp(header.payload)
            if datagram.dport == DHCP_SERVER_PORT:
                if self.dhcp is not None:
                    self._reply(self.dhcp.handle(frame))
                return
        self._drop(f"proto-{header.proto}",
                   f"IPv4 protocol {header.proto} dropped: not supported yet")
