"""The live forwarding tables and their listening sockets, replaced whole or not at all.

Each side that starts connections (a "pif": HOST for -t/-u, pasta's SPLICE for -T/-U) has a
table of rules (rules.py) and, per protocol, a `Binder` that opens and closes the listening
sockets (the protocol handlers and pasta's splice paths supply them). A socket is identified
by where it listens (family, address, interface, port); it remembers the port it forwards to.

`replace()` is a transaction:
1. every new table is checked (rules.check_table) before anything changes;
2. sockets for the listening places the new tables add are opened, old ones still open (a
   connection to a port that stays forwarded is never refused during the switch), except
   where one of our sockets that the new tables drop holds the port (a wildcard rule
   narrowed to one address): that one is closed first;
3. if a socket of a rule that is not best-effort fails to bind, the sockets opened in step 2
   are closed (those freed early are opened again) and the error is raised: the old tables
   and sockets stay as they were;
4. only then are the places no longer wanted closed, and a changed target port retargeted.

The sockets bound at start-up from the command line are adopted (`Binder.existing()`), so the
first replacement keeps or closes them like any others. "auto" rules (SCAN) are pasta's port
scanner's: its listeners are its own. A table may keep a protocol's auto rules, drop them all
(that direction of the scanner stops before the new sockets are bound, and resumes if the
update rolls back) or bring back the ones it started with; other changes to them are refused.
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from vhostpasst.ctl.protocol import Table
from vhostpasst.ctl.rules import (
    CAP_IPV4,
    CAP_IPV6,
    PROTO_NAMES,
    SCAN,
    WEAK,
    IPAddr,
    Rule,
    RuleError,
    check_table,
)

log = logging.getLogger(__name__)

# where a socket listens: (is IPv6, address or None for any, interface or None, port)
Place = tuple[bool, IPAddr | None, str | None, int]
Key = tuple[int, Place]  # (IP protocol, place)
# where a socket forwards to: (port, address or None for the usual one: the guest's, or the
# host's loopback for pasta's SPLICE side)
To = tuple[int, IPAddr | None]


class Scan(Protocol):
    """One direction of pasta's port scanner: its rules at start, and a switch."""

    rules: tuple[Rule, ...]

    def stop(self) -> None:
        """Close its listeners and scan no more."""
        ...

    def resume(self) -> None:
        """Scan again (listeners follow at the next scan)."""
        ...


class Binder(Protocol):
    """Listening sockets of one protocol on one side."""

    def bind(self, place: Place, to: To) -> object:
        """Listen at `place`, forwarding to `to`: a handle (OSError if it fails)."""
        ...

    def unbind(self, handle: object) -> None: ...

    def retarget(self, handle: object, to: To) -> None: ...

    def existing(self) -> Iterable[tuple[Place, To, object]]:
        """The sockets already listening: (place, where it forwards, handle) each."""
        ...


@dataclass
class Side:
    pif: int
    name: str
    caps: int
    binders: dict[int, Binder]  # by IP protocol number
    rules: tuple[Rule, ...] = ()
    scans: dict[int, Scan] = field(default_factory=dict)  # by IP protocol number
    targets: bool = True  # whether rules may name a target address
    # (protocol, place) -> (handle, where it forwards)
    sockets: dict[Key, tuple[object, To]] = field(default_factory=dict)

    def table(self) -> Table:
        return Table(self.pif, self.name, self.caps, self.rules)

    def places(self, rules: Iterable[Rule]) -> dict[Key, tuple[To, bool]]:
        """(protocol, place) -> (where to, best effort) for the rules that listen here."""
        out: dict[Key, tuple[To, bool]] = {}
        for rule in rules:
            if rule.flags & SCAN:
                continue
            if rule.six is None:
                sixes = [six for six, cap in ((False, CAP_IPV4), (True, CAP_IPV6))
                         if self.caps & cap]
            else:
                sixes = [rule.six]
            for port in range(rule.first, rule.last + 1):
                for six in sixes:
                    place = (six, rule.listen_addr, rule.ifname or None, port)
                    out[(rule.proto, place)] = ((rule.to + port - rule.first, rule.target),
                                                bool(rule.flags & WEAK))
        return out

    def adopt(self) -> None:
        for proto, binder in self.binders.items():
            for place, to, handle in binder.existing():
                self.sockets[(proto, place)] = (handle, to)


# a socket opened, or closed early, by a replacement in progress
Change = tuple[Side, Key, object, To]


class Forwarder:
    def __init__(self, sides: list[Side]) -> None:
        self.sides = {side.pif: side for side in sides}
        for side in sides:
            side.adopt()

    def tables(self) -> list[Table]:
        return [side.table() for side in self.sides.values()]

    def replace(self, new: dict[int, tuple[Rule, ...]]) -> str:
        """Replace the tables given (others stay); a summary line. RuleError for a table that
        does not pass the checks, OSError for a socket that could not be bound: nothing
        changed then."""
        checked = {pif: self._check(self.sides[pif], rules) for pif, rules in new.items()}
        wanted = {pif: self.sides[pif].places(rules) for pif, rules in checked.items()}
        stopped: list[Scan] = []
        resumed: list[Scan] = []
        for pif, rules in checked.items():
            for scan, on in _scan_changes(self.sides[pif], rules):
                (resumed if on else stopped).append(scan)
        opened: list[Change] = []
        evicted: list[Change] = []
        for scan in stopped:  # their listeners may hold ports the new rules want
            scan.stop()
        try:
            for pif, places in wanted.items():
                side = self.sides[pif]
                for key, (to, weak) in places.items():
                    if key not in side.sockets and key[0] in side.binders:
                        self._open(side, key, to, weak, places, opened, evicted)
        except BaseException:
            self._roll_back(opened, evicted)
            for scan in stopped:
                scan.resume()
            raise
        for side, key, handle, to in opened:
            side.sockets[key] = (handle, to)
        closed, retargeted = len(evicted), 0
        for pif, places in wanted.items():
            side = self.sides[pif]
            for key, (handle, to) in list(side.sockets.items()):
                if key not in places:
                    side.binders[key[0]].unbind(handle)
                    del side.sockets[key]
                    closed += 1
                elif places[key][0] != to:
                    side.binders[key[0]].retarget(handle, places[key][0])
                    side.sockets[key] = (handle, places[key][0])
                    retargeted += 1
            side.rules = checked[pif]
        for scan in resumed:
            scan.resume()
        scans = (f", {len(stopped)} auto directions stopped" if stopped else "") + (
            f", {len(resumed)} resumed" if resumed else "")
        return (f"{sum(len(r) for r in checked.values())} rules, {len(opened)} sockets opened, "
                f"{closed} closed, {retargeted} retargeted{scans}")

    @staticmethod
    def _check(side: Side, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        try:
            out = check_table(rules, side.caps)
            if not side.targets and any(r.target is not None for r in out):
                raise RuleError("target addresses are not supported on this side by vhostpasst")
        except RuleError as e:
            raise RuleError(f"{side.name}: {e}") from None
        _scan_changes(side, out)  # RuleError for a change we cannot make
        return out

    @staticmethod
    def _open(side: Side, key: Key, to: To, weak: bool,
              places: dict[Key, tuple[To, bool]], opened: list[Change],
              evicted: list[Change]) -> None:
        """Listen at `key`. A port held by a socket of ours that the new table drops (the same
        port on a wildcard instead of one address, say) is made free first: those sockets
        close early, and come back if the replacement is rolled back."""
        binder = side.binders[key[0]]
        for attempt in range(2):
            try:
                handle = binder.bind(key[1], to)
            except OSError as e:
                holders = [k for k in side.sockets if k not in places and k[0] == key[0]
                           and k[1][0] == key[1][0] and k[1][3] == key[1][3]]
                if e.errno == errno.EADDRINUSE and holders and not attempt:
                    for k in holders:
                        held, old_to = side.sockets.pop(k)
                        binder.unbind(held)
                        evicted.append((side, k, held, old_to))
                    continue
                if weak and e.errno not in (errno.EMFILE, errno.ENFILE):
                    return
                raise OSError(e.errno, f"{side.name}: cannot listen at {_where(key)}: "
                                       f"{e.strerror}") from None
            opened.append((side, key, handle, to))
            return

    @staticmethod
    def _roll_back(opened: list[Change], evicted: list[Change]) -> None:
        for side, key, handle, _ in opened:
            side.binders[key[0]].unbind(handle)
        for side, key, _, to in evicted:
            try:
                side.sockets[key] = (side.binders[key[0]].bind(key[1], to), to)
            except OSError as e:
                log.error("control: could not restore %s after a failed update: %s",
                          _where(key), e.strerror)


def _scan_rules(rules: Iterable[Rule], proto: int) -> list[Rule]:
    return [r for r in rules if r.flags & SCAN and r.proto == proto]


def _scan_changes(side: Side, rules: tuple[Rule, ...]) -> list[tuple[Scan, bool]]:
    """The scanner directions `rules` stop (False) or resume (True); RuleError for auto rules
    that are neither the current ones, none, nor those the side started with."""
    out: list[tuple[Scan, bool]] = []
    for proto in sorted({r.proto for r in (*side.rules, *rules) if r.flags & SCAN}):
        old, new = _scan_rules(side.rules, proto), _scan_rules(rules, proto)
        scan = side.scans.get(proto)
        if new == old:
            continue
        if scan is not None and not new:
            out.append((scan, False))
        elif scan is not None and not old and new == list(scan.rules):
            out.append((scan, True))
        else:
            raise RuleError(f"{side.name}: 'auto' rules can only be kept, removed or restored "
                            "to those given at start")
    return out


def _where(key: Key) -> str:
    proto, (six, addr, ifname, port) = key
    name = PROTO_NAMES.get(proto, str(proto))
    host = str(addr) if addr is not None else ("[::]" if six else "0.0.0.0")
    return f"{name} {host}{'%' + ifname if ifname else ''} port {port}"
