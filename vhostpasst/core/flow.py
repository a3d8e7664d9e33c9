"""The flow table: every translated conversation (ping, UDP, later TCP), looked up by key.

A flow registers one or more hashable keys (the guest-side tuple it answers to, and for
host-initiated flows the host-side tuple) and is found by any of them. Expiry is driven by
loop timers, lazily: each flow has one timer set for `last_active + timeout`; when it fires
early activity has moved the deadline, so it is simply set again. That costs one timer per
flow per timeout period instead of one per packet, and nothing walks the table.

TCP subclasses `Flow` too, with no `timeout` (its own timers end it) and its own `close()`.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable, Hashable, Iterator

from vhostpasst.core.loop import EventLoop, TimerHandle

log = logging.getLogger(__name__)

FLOW_MAX = 65536  # a guest must not make us hold unbounded sockets
FD_RESERVE = 64  # descriptors kept for the link, listeners, logging and the like


_nofile_at_start: tuple[int, int] | None = None  # (soft, hard) before raise_fd_limit()


def raise_fd_limit() -> tuple[int, int] | None:
    """Raise the open files limit to the hard limit, as passt and pasta do at start: nearly
    every flow holds a socket, and a soft limit of 1024 (systemd's default) would cap a busy
    guest or container at some 960 connections. (before, after) when it was raised; None
    when it already was as high as allowed or the kernel refused."""
    global _nofile_at_start
    try:
        # (Linux never reports RLIM_INFINITY here: the hard limit is at most fs.nr_open)
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft >= hard:
            return None
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError) as e:
        log.debug("open files limit not raised: %s", e)
        return None
    _nofile_at_start = (soft, hard)
    log.debug("open files limit raised from %d to %d", soft, hard)
    return soft, hard


def restore_fd_limit() -> None:
    """For a command we start (pasta's): the open files limit it would have had without us
    (a program using select() may rely on 1024)."""
    if _nofile_at_start is not None:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, _nofile_at_start)
        except (OSError, ValueError):
            pass


def default_max_flows() -> int:
    """Most flows hold a socket: stay below the descriptor limit, so a guest opening flows
    gets its own new flows refused rather than starving the daemon of descriptors."""
    try:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return 1024
    if soft == resource.RLIM_INFINITY:
        return FLOW_MAX
    return max(16, min(FLOW_MAX, soft - FD_RESERVE))


# Frames a host socket may turn into per wake-up: bounded so one busy socket cannot starve
# the others (and the guest link's own reads) in a single loop iteration.
RX_BATCH = 32


class Flow:
    """Base class. Subclasses set `timeout` (seconds without activity; None: never expires)
    and override `close()` to release their sockets."""

    timeout: float | None = None
    # no per-instance dict: with ten thousand connections it was most of their memory
    # (subclasses that declare no __slots__ of their own still get one)
    __slots__ = ("keys", "last_active", "created", "closed", "_timer", "_table")

    def __init__(self) -> None:
        self.keys: list[Hashable] = []
        self.last_active = 0.0
        self.created = 0.0  # set when added to a table (its clock)
        self.closed = False
        self._timer: TimerHandle | None = None
        self._table: FlowTable | None = None

    def touch(self, now: float | None = None) -> None:
        """Note activity (either direction): pushes expiry back."""
        if now is None:
            now = self._table.clock() if self._table is not None else time.monotonic()
        self.last_active = now

    def close(self) -> None:
        """Release resources; called once, on removal."""

    def remove(self) -> None:
        if self._table is not None:
            self._table.remove(self)


class FlowTable:
    def __init__(self, loop: EventLoop, clock: Callable[[], float] = time.monotonic,
                 max_flows: int | None = None) -> None:
        self.loop = loop
        self.clock = clock
        self.max_flows = default_max_flows() if max_flows is None else max_flows
        self._by_key: dict[Hashable, Flow] = {}
        self._flows: set[Flow] = set()

    def __len__(self) -> int:
        return len(self._flows)

    def __iter__(self) -> Iterator[Flow]:
        return iter(list(self._flows))

    def full(self) -> bool:
        return len(self._flows) >= self.max_flows

    def lookup(self, key: Hashable) -> Flow | None:
        return self._by_key.get(key)

    def add(self, flow: Flow, *keys: Hashable) -> bool:
        """Insert `flow` under `keys` (existing keys: False, nothing inserted)."""
        if self.full() or any(k in self._by_key for k in keys):
            return False
        flow.keys = list(keys)
        flow._table = self
        for k in keys:
            self._by_key[k] = flow
        self._flows.add(flow)
        flow.created = self.clock()
        flow.touch(flow.created)
        self._arm(flow)
        return True

    def add_key(self, flow: Flow, key: Hashable) -> bool:
        if key in self._by_key or flow not in self._flows:
            return False
        self._by_key[key] = flow
        flow.keys.append(key)
        return True

    def remove(self, flow: Flow) -> None:
        if flow not in self._flows:
            return
        self._flows.discard(flow)
        for k in flow.keys:
            if self._by_key.get(k) is flow:
                del self._by_key[k]
        if flow._timer is not None:
            flow._timer.cancel()
            flow._timer = None
        flow._table = None
        if not flow.closed:
            flow.closed = True
            try:
                flow.close()
            except Exception:  # closing one flow must not stop the others or the loop
                log.exception("error closing a flow")

    def close_all(self) -> None:
        for flow in list(self._flows):
            self.remove(flow)

    def _arm(self, flow: Flow) -> None:
        if flow.timeout is None:
            return
        flow._timer = self.loop.call_at(flow.last_active + flow.timeout,
                                        lambda: self._expire(flow))

    def _expire(self, flow: Flow) -> None:
        flow._timer = None
        if flow not in self._flows or flow.timeout is None:
            return
        if self.clock() >= flow.last_active + flow.timeout:
            log.debug("flow %r expired", flow)
            self.remove(flow)
        else:
            self._arm(flow)  # activity since: wait for the new deadline
