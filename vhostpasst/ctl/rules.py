"""Forwarding rules as passt 2026-07 and its `pesto` client exchange them, and their checks.

A rule forwards a range of listening ports (`first`..`last`) of one protocol to `to`.. on the
other side, from one address (or every address of both families: DUAL_STACK_ANY), optionally
on one interface. Addresses travel as 16 bytes (IPv4 as an IPv4-mapped IPv6 address); the
target address `taddr` is all zero unless the rule names one. A table belongs to one "pif"
(passt's name for a side that starts connections: HOST for -t/-u, SPLICE for pasta's -T/-U)
and says what that side can do (`caps`).

Wire layout of one rule (56 bytes, as passt's struct fwd_rule: no padding): addr[16]
taddr[16] ifname[16] first last to (big-endian u16 each) proto (u8) flags (u8).

`check_table()` is passt's validation (fwd_rule_add), run on a whole table before anything
changes; `rules_from_forwards()` turns a parsed -t/-u/-T/-U option into the rules passt's own
parser makes of it, so a table looks the same from either daemon.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv6Address

from vhostpasst.config.fwd import IFNAMSIZ, PORT_MAX, PortForwards

IPAddr = IPv4Address | IPv6Address

# capability bits of a table (what its side can forward)
CAP_IPV4 = 1 << 0
CAP_IPV6 = 1 << 1
CAP_TCP = 1 << 2
CAP_UDP = 1 << 3
CAP_SCAN = 1 << 4  # "auto": forward only what the other side listens on (pasta)
CAP_IFNAME = 1 << 5  # ADDR%IFNAME (SO_BINDTODEVICE)

# rule flags
DUAL_STACK_ANY = 1 << 0  # every address of both families (addr is ::)
WEAK = 1 << 1  # ports that fail to bind are skipped ("all", exclusion-only specs)
SCAN = 1 << 2  # only ports the other side listens on ("auto")
FLAGS_ALLOWED = DUAL_STACK_ANY | WEAK | SCAN

MAX_RULES = 255  # per table (passt: 8 bits of rule index)
PROTO_NAMES = {socket.IPPROTO_TCP: "TCP", socket.IPPROTO_UDP: "UDP"}

_RULE = struct.Struct("!16s16s16sHHHBB")
RULE_SIZE = _RULE.size  # 56
ANY6 = IPv6Address("::")


class RuleError(ValueError):
    """A rule or table that must not be applied; the message says why, as passt's would."""


@dataclass(frozen=True)
class Rule:
    proto: int
    first: int
    last: int
    to: int
    addr: IPv6Address = ANY6  # IPv4 as IPv4-mapped
    taddr: IPv6Address = ANY6  # :: for "the usual target"
    ifname: str = ""
    flags: int = 0

    def pack(self) -> bytes:
        return _RULE.pack(self.addr.packed, self.taddr.packed, _ifname_bytes(self.ifname),
                          self.first, self.last, self.to, self.proto, self.flags)

    @classmethod
    def unpack(cls, data: bytes) -> Rule:
        addr, taddr, ifname, first, last, to, proto, flags = _RULE.unpack(data)
        if ifname[-1]:
            raise RuleError("interface name was not NUL terminated")
        name = ifname.split(b"\0", 1)[0]
        try:
            text = name.decode("ascii")
        except UnicodeDecodeError:
            raise RuleError(f"interface name {name!r} is not ASCII") from None
        return cls(proto, first, last, to, IPv6Address(addr), IPv6Address(taddr), text, flags)

    @property
    def listen_addr(self) -> IPAddr | None:
        """The address to listen on: None for any (of its family, or of both: `six`)."""
        if self.flags & DUAL_STACK_ANY:
            return None
        addr = v4_of(self.addr) or self.addr
        return None if addr.is_unspecified else addr

    @property
    def target(self) -> IPAddr | None:
        """Where connections go instead of the guest's address (None: the usual place)."""
        return None if self.taddr == ANY6 else (v4_of(self.taddr) or self.taddr)

    @property
    def six(self) -> bool | None:
        """The family of the listening address: None for both."""
        if self.flags & DUAL_STACK_ANY:
            return None
        return v4_of(self.addr) is None

    def __str__(self) -> str:
        """As passt and pesto print a rule (fwd_rule_fmt)."""
        addr = "*" if self.flags & DUAL_STACK_ANY else str(v4_of(self.addr) or self.addr)
        ifname = f"%{self.ifname}" if self.ifname else ""
        taddr = "" if self.taddr == ANY6 else f"{v4_of(self.taddr) or self.taddr}:"
        weak = " (best effort)" if self.flags & WEAK else ""
        scan = " (auto-scan)" if self.flags & SCAN else ""
        proto = PROTO_NAMES.get(self.proto, str(self.proto))
        if self.first == self.last:
            ports, tports = f"{self.first}", f"{self.to}"
        else:
            ports = f"{self.first}-{self.last}"
            tports = f"{self.to}-{self.to + self.last - self.first}"
        return f"{proto} [{addr}]{ifname}:{ports}  =>  {taddr}{tports} {weak}{scan}".rstrip()


def v4_of(addr: IPv6Address) -> IPv4Address | None:
    return addr.ipv4_mapped


def inany(addr: IPAddr) -> IPv6Address:
    """An address as it travels: IPv4 mapped into IPv6."""
    if isinstance(addr, IPv4Address):
        return IPv6Address(b"\0" * 10 + b"\xff\xff" + addr.packed)
    return addr


def _ifname_bytes(name: str) -> bytes:
    raw = name.encode("ascii")
    if len(raw) >= IFNAMSIZ:
        raise RuleError(f"interface name '{name}' too long")
    return raw.ljust(IFNAMSIZ, b"\0")


def check_rule(rule: Rule, caps: int) -> None:
    """passt's checks of one rule against the capabilities of its table (RuleError)."""
    if rule.first > rule.last:
        raise RuleError(f"rule has invalid port range {rule.first}-{rule.last}")
    if rule.first == 0:
        raise RuleError("forwarding rule attempts to map from port 0")
    if rule.to == 0 or rule.to + rule.last - rule.first > PORT_MAX:
        raise RuleError("forwarding rule attempts to map to port 0")
    if rule.flags & ~FLAGS_ALLOWED:
        raise RuleError(f"rule has invalid flags 0x{rule.flags & ~FLAGS_ALLOWED:x}")
    if rule.flags & DUAL_STACK_ANY:
        if rule.addr != ANY6:
            raise RuleError(f"dual stack rule has non-wildcard address {rule.addr}")
        for cap, name in ((CAP_IPV4, "IPv4"), (CAP_IPV6, "IPv6")):
            if not caps & cap:
                raise RuleError(f"dual stack forward, but {name} not enabled")
    elif rule.six and not caps & CAP_IPV6:
        raise RuleError("IPv6 forward, but IPv6 not enabled")
    elif not rule.six and not caps & CAP_IPV4:
        raise RuleError("IPv4 forward, but IPv4 not enabled")
    if rule.proto == socket.IPPROTO_TCP:
        if not caps & CAP_TCP:
            raise RuleError("can't add TCP forwarding rule, TCP not enabled")
    elif rule.proto == socket.IPPROTO_UDP:
        if not caps & CAP_UDP:
            raise RuleError("can't add UDP forwarding rule, UDP not enabled")
    else:
        raise RuleError(f"unsupported protocol {rule.proto} for forwarding rule")
    if rule.flags & SCAN and not caps & CAP_SCAN:
        raise RuleError("'auto' port forwarding is only allowed for pasta")
    if rule.ifname and not caps & CAP_IFNAME:
        raise RuleError("device binding unsupported (requires kernel 5.7+)")
    if rule.taddr != ANY6:
        target = rule.target
        assert target is not None
        if target.is_multicast:
            raise RuleError(f"multicast target address {target} for forwarding rule")
        if rule.flags & DUAL_STACK_ANY:
            hint = "0.0.0.0" if target.version == 4 else "[::]"
            raise RuleError(f"dual stack forward to IPv{target.version} address {target} "
                            f"unsupported (did you mean {hint}/... instead?)")
        if rule.six != (target.version == 6):
            raise RuleError(f"forward from {rule.listen_addr or 'any address'} to {target}: "
                            "the families differ")


def conflicts(a: Rule, b: Rule) -> bool:
    """Same protocol, overlapping addresses (an unspecified one covers its family) and
    overlapping port ranges."""
    if a.proto != b.proto:
        return False
    if a.six is not None and b.six is not None and a.six != b.six:
        return False
    la, lb = a.listen_addr, b.listen_addr
    if la is not None and lb is not None and la != lb:
        return False
    return not (a.last < b.first or b.last < a.first)


def check_table(rules: Iterable[Rule], caps: int) -> tuple[Rule, ...]:
    """Every rule checked and no two in conflict; the rules as a tuple (RuleError)."""
    out: list[Rule] = []
    for rule in rules:
        check_rule(rule, caps)
        for old in out:
            if conflicts(rule, old):
                raise RuleError(f"forwarding configuration conflict: {rule} versus {old}")
        out.append(rule)
        if len(out) > MAX_RULES:
            raise RuleError(f"too many rules (maximum {MAX_RULES})")
    return tuple(out)


def _runs(first: int, last: int, skip: frozenset[int] | set[int]) -> Iterator[tuple[int, int]]:
    """The ranges of first..last without the ports in `skip`."""
    start: int | None = None
    for port in range(first, last + 2):
        inside = port <= last and port not in skip
        if inside and start is None:
            start = port
        elif not inside and start is not None:
            yield start, port - 1
            start = None


def rules_from_forwards(forwards: PortForwards | None, proto: int, caps: int,
                        ephemeral: tuple[int, int], splice: bool = False) -> list[Rule]:
    """The rules of one parsed option (config/fwd.py), split as passt splits them: around
    excluded ports, and around the ephemeral range for rules without an include range.
    `splice`: -T/-U, which listen on the namespace's loopback (passt: interface "lo")."""
    if forwards is None:
        return []
    ephemeral_ports = set(range(ephemeral[0], ephemeral[1] + 1))
    base = Rule(proto, 0, 0, 0)
    if caps & CAP_IPV4 and caps & CAP_IPV6:
        base = replace(base, flags=DUAL_STACK_ANY)
    elif caps & CAP_IPV4:
        base = replace(base, addr=inany(IPv4Address(0)))
    if splice and caps & CAP_IFNAME:
        base = replace(base, ifname="lo")
    out: list[Rule] = []
    for pr in forwards.rules:
        rule = base
        if pr.addr is not None:
            rule = replace(rule, addr=inany(pr.addr), flags=rule.flags & ~DUAL_STACK_ANY)
        if pr.ifname:
            rule = replace(rule, ifname=pr.ifname)
        if pr.target is not None:
            rule = replace(rule, taddr=inany(pr.target))
        skip = set(pr.excluded)
        if pr.tolerant:
            skip |= ephemeral_ports
            rule = replace(rule, flags=rule.flags | WEAK)
        if pr.scan:
            rule = replace(rule, flags=rule.flags | SCAN)
        for a, b in _runs(pr.first, pr.last, skip):
            out.append(replace(rule, first=a, last=b, to=a + pr.delta))
    return out
