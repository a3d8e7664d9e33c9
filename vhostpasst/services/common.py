"""What every sans-IO service shares: how a guest message that gets no answer is reported.

A service raises `Ignored` for a well-formed message it does not answer, and the wire parsers
raise `Malformed`; `guarded()` turns either (and any bug) into "no answer" plus a reason that
the service keeps in `last_error` and logs at debug level. Guest input never raises out of a
service. Also shared: `whole_ipv6()`, the frame checks in front of DHCPv6 and NDP, and the
32-bit INFINITE lifetime.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from vhostpasst.wire.errors import Malformed
from vhostpasst.wire.eth import ETH_P_IPV6, Eth, parse_eth
from vhostpasst.wire.ip import Ipv6, parse_ipv6

log = logging.getLogger("vhostpasst.services")

T = TypeVar("T")

# A 32-bit lifetime meaning "forever": DHCP lease (RFC 2132 §9.2), DHCPv6 T1/T2 and
# lifetimes (RFC 8415 §7.7), NDP prefix, RDNSS and DNSSL lifetimes (RFC 4861, RFC 8106)
INFINITE = 0xFFFFFFFF


class Ignored(Exception):
    """A message the service does not answer (the message says why)."""


def guarded(service: str, answer: Callable[[], T], nothing: T) -> tuple[T, str | None]:
    """(answer(), None), or (nothing, why) when the message gets no answer."""
    try:
        return answer(), None
    except Ignored as e:
        reason = str(e)
    except Malformed as e:
        reason = f"malformed: {e}"
    except Exception as e:  # never let guest input raise; keep the cause for debugging
        log.debug("%s: unexpected error", service, exc_info=True)
        reason = f"internal error: {e!r}"
    log.debug("%s: message dropped: %s", service, reason)
    return nothing, reason


def whole_ipv6(frame: memoryview, proto: int, what: str) -> tuple[Eth, Ipv6]:
    """The Ethernet header and IPv6 packet of `frame`, which must carry one unfragmented
    `proto` message (`what` names it in the reason a frame that does not is Ignored)."""
    eth = parse_eth(frame)
    if eth.ethertype != ETH_P_IPV6:
        raise Ignored("not IPv6")
    packet = parse_ipv6(eth.payload)
    if packet.proto != proto or packet.is_fragment:
        raise Ignored(f"not a whole {what}")
    return eth, packet
