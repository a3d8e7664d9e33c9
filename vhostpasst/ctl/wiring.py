"""The control socket of a daemon, built from its configuration and listeners: the tables'
capabilities and initial rules, the HOST side (pasta adds its own, pasta/forward.py), the
server and its flow query."""

from __future__ import annotations

import logging
import socket
import time

from vhostpasst.config.conf import Config
from vhostpasst.config.fwd import PortForwards, ephemeral_range
from vhostpasst.core.loop import Loop
from vhostpasst.ctl import flows
from vhostpasst.ctl.binders import TcpBinder, UdpBinder
from vhostpasst.ctl.forwarder import Binder, Forwarder, Side
from vhostpasst.ctl.protocol import PIF_HOST, PIF_NAMES
from vhostpasst.ctl.rules import (
    CAP_IFNAME,
    CAP_IPV4,
    CAP_IPV6,
    CAP_SCAN,
    CAP_TCP,
    CAP_UDP,
    Rule,
    rules_from_forwards,
)
from vhostpasst.ctl.server import ControlServer
from vhostpasst.dispatch import Dispatcher

log = logging.getLogger("vhostpasst")


def caps(config: Config) -> int:
    """What a table of this daemon can hold (passt: fwd_rule_init)."""
    out = CAP_IFNAME
    out |= CAP_IPV4 if config.ip4 is not None else 0
    out |= CAP_IPV6 if config.ip6 is not None else 0
    out |= CAP_TCP if not config.no_tcp else 0
    out |= CAP_UDP if not config.no_udp else 0
    out |= CAP_SCAN if config.mode == "pasta" else 0
    return out


def initial_rules(tcp: PortForwards | None, udp: PortForwards | None, table_caps: int,
                  splice: bool = False) -> tuple[Rule, ...]:
    """The table the command line made (-t and -u, or -T and -U)."""
    eph = ephemeral_range()
    return tuple(rules_from_forwards(tcp, socket.IPPROTO_TCP, table_caps, eph, splice)
                 + rules_from_forwards(udp, socket.IPPROTO_UDP, table_caps, eph, splice))


def host_side(config: Config, dispatcher: Dispatcher) -> Side:
    """The HOST table (-t/-u) over the protocol handlers' listeners."""
    binders: dict[int, Binder] = {}
    if dispatcher.tcp is not None:
        binders[socket.IPPROTO_TCP] = TcpBinder(dispatcher.tcp)
    if dispatcher.udp is not None:
        binders[socket.IPPROTO_UDP] = UdpBinder(dispatcher.udp)
    table_caps = caps(config)
    return Side(PIF_HOST, PIF_NAMES[PIF_HOST], table_caps, binders,
                initial_rules(config.tcp_in, config.udp_in, table_caps))


def start(config: Config, loop: Loop, dispatcher: Dispatcher, sides: list[Side]) -> ControlServer:
    """The control socket at config.conf_path for these tables (OSError if it cannot be
    made)."""
    assert config.conf_path is not None
    started = time.monotonic()
    server = ControlServer(loop, config.conf_path, Forwarder(sides),
                           lambda: flows.document(dispatcher, time.monotonic(), started))
    log.info("Control socket: %s (tables: %s)", config.conf_path,
             ", ".join(side.name for side in sides))
    return server
