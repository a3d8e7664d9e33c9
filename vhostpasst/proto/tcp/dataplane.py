"""The TCP data plane's table: established connections whose guest segments, and whose reads
into the guest's buffers, the C makes.

cffi_build/vhostpasst/dataplane.c (its header says what it takes and what it leaves) reads
and writes each connection's fields in the connection's own record (TcpConn.r, a struct
dp_flow: there is no second copy to keep in step). This wrapper is all Python sees of the
table: a connection goes in when it is established (hand()) and out when it closes (drop());
the link offers the C the guest's TX frames (link.base.TxConsumer, between its gather and the
dispatcher) and, once the dispatcher had the rest, after_pass() hands what the C left to the
handler (FOLLOW_*: a new loop timer for the retransmission timeout, the discard of what the
guest acknowledged, a reset or an EPOLLOUT wait after the C's write of the guest's data, the
read that fills the window an ACK opened, our ACK; in FromGuest._tap_segments()'s order).
The read itself, dp_fill(), is called by out_vu.GuestFillOutput.send_c() (FILL_*: what it
left).

VHOSTPASST_DATAPLANE=python leaves the table empty and every frame and read to Python (the
path the C is held equal to by tests/unit/test_dataplane.py and
tests/netns/test_dataplane_fill.py).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from ipaddress import IPv6Address
from typing import Any

from vhostpasst._dataplane import ffi, lib
from vhostpasst.core.flow import FLOW_MAX
from vhostpasst.proto.tcp.conn import ESTABLISHED, RTO_MIN, TcpConn

log = logging.getLogger(__name__)

ENV_DATAPLANE = "VHOSTPASST_DATAPLANE"
TOUCHED_MAX = 1024  # connections with followups in one pass (more: the rest go to Python)
PAYLOADS_MAX = 1024  # guest payloads taken in one pass (a TX batch has at most 256 frames)

# what the C left for Python on a connection (dataplane.h), in the order Python does it
FOLLOW_ARM_RTO = lib.DP_ARM_RTO
FOLLOW_DISCARD = lib.DP_DISCARD
FOLLOW_RESET = lib.DP_RESET
FOLLOW_WANT_OUT = lib.DP_WANT_OUT
FOLLOW_KICK = lib.DP_KICK
FOLLOW_SEND_ACK = lib.DP_SEND_ACK
# what dp_fill() left (out_vu.GuestFillOutput.send_c())
FILL_EVENTS = lib.DP_FILL_EVENTS
FILL_ARM_ACK = lib.DP_FILL_ARM_ACK
FILL_ARM_RTO = lib.DP_FILL_ARM_RTO


def dataplane_enabled() -> bool:
    """VHOSTPASST_DATAPLANE: "c" (the default) or "python"."""
    value = os.environ.get(ENV_DATAPLANE, "c").strip().lower()
    if value in ("", "c"):
        return True
    if value != "python":
        log.warning("%s=%r: not c or python; using c", ENV_DATAPLANE, value)
        return True
    return False


def _address(cdata: Any) -> int:
    return int(ffi.cast("uintptr_t", cdata))


class DataPlane:
    """One table of connections, for one TCP handler (see the module docstring)."""

    def __init__(self, rto_max: float, max_flows: int = FLOW_MAX) -> None:
        cap = 1
        while cap < 2 * max_flows:
            cap <<= 1
        self._slots = ffi.new("struct dp_flow *[]", cap)
        self._touched = ffi.new("uint32_t[]", TOUCHED_MAX)
        self._touched_flows = ffi.new("struct dp_flow *[]", TOUCHED_MAX)
        self._payloads = ffi.new("struct dp_payload[]", PAYLOADS_MAX)
        self.table: Any = ffi.new("struct dp_table *")
        t = self.table
        t.slots = self._slots
        t.cap = cap
        t.touched = self._touched
        t.touched_flows = self._touched_flows
        t.touched_cap = TOUCHED_MAX
        t.payloads = self._payloads
        t.payloads_cap = PAYLOADS_MAX
        t.established = ESTABLISHED
        t.rto_min = RTO_MIN
        t.rto_max = rto_max
        self.conns: dict[int, TcpConn] = {}
        self._next_id = 0
        self._learned: tuple[bytes, int, int] | None = None
        # the link's TxConsumer: dp_take_tx(), dp_tx_end() and the table, as addresses
        self.take = _address(ffi.addressof(lib, "dp_take_tx"))
        self.end = _address(ffi.addressof(lib, "dp_tx_end"))
        self.arg = _address(t)

    def pass_begin(self) -> None:
        lib.dp_pass_begin(self.table)

    def hand(self, conn: TcpConn) -> bool:
        """Put an established connection in the table (False if it is full)."""
        ident = self._next_id
        self._next_id = (ident + 1) & 0xFFFFFFFF
        conn.r.id = ident
        if lib.dp_insert(self.table, conn.r) < 0:
            return False
        self.conns[ident] = conn
        return True

    def drop(self, conn: TcpConn) -> None:
        lib.dp_remove(self.table, conn.r)
        self.conns.pop(conn.r.id, None)

    def learned(self, mac: bytes, seen4: int, learned6: int) -> None:
        """What the dispatcher learned of the guest (its MAC, the IPv4 and IPv6 sources it saw
        last): the C takes only frames that would teach it nothing new."""
        key = (mac, seen4, learned6)
        if key == self._learned:
            return
        self._learned = key
        t = self.table
        t.guest_mac = mac[:6].ljust(6, b"\0")
        t.seen4 = seen4 if 0 <= seen4 <= 0xFFFFFFFF else 0
        t.learned6 = IPv6Address(learned6).packed if 0 <= learned6 < 1 << 128 else bytes(16)

    def after_pass(self, followups: Callable[[TcpConn, int], None]) -> None:
        """What the C left for Python on the connections it touched this pass:
        `followups(conn, FOLLOW_* bits)` for each that has any left."""
        t = self.table
        n = t.ntouched
        if not n:
            return
        ids = ffi.unpack(self._touched, n)
        t.ntouched = 0
        conns = self.conns
        for ident in ids:
            conn = conns.get(ident)
            if conn is None:
                continue
            r = conn.r
            follow, r.followups = r.followups, 0
            if follow & ~lib.DP_SEEN:
                followups(conn, follow)

    def close(self) -> None:
        for conn in list(self.conns.values()):
            self.drop(conn)
