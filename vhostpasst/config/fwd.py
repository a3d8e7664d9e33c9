"""Port-forwarding specifications (-t/-u host to guest, pasta -T/-U namespace to host).

Grammar, one option argument at a time, as passt 2026-07 reads it (passt.1, fwd_rule.c):

    none | [LISTEN/]CHUNK{,CHUNK}
    LISTEN := ADDR[%IFNAME] | [*][%IFNAME]        (no ADDR, or `*`: any address)
    CHUNK  := all[:TOADDR] | auto | ~N[-M] | N[-M][:TOSPEC]
    TOSPEC := TOADDR/P[-Q] | TOADDR | P[-Q]

Each option argument becomes forwarding rules: one per include range, with the argument's
exclusions carved out. An argument with no include range (only `all`, `auto`, exclusions, or
a mix of them) forwards every non-ephemeral port not excluded, best effort ("tolerant":
ports that cannot be bound are skipped, unless none can). `auto` (pasta) marks every rule of
its argument as scanned: a port is forwarded only while it is bound on the other side
(pasta/portscan.py), so `8000-8010,auto` follows the ports of that range and `::1/auto`
listens on ::1 only. A target address (TOADDR, `all:TOADDR`) replaces the guest's own
address as the destination (such a flow never takes pasta's splice path, as in passt).

Repeated options accumulate; a rule whose listening addresses and ports overlap an earlier
rule's is a conflict (passt's rule: no address, or an unspecified one of the same family,
overlaps every address), and `none` after a rule is one. This module only parses and
validates; proto/bind.py binds the sockets.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from vhostpasst.config.errors import ConfigError
from vhostpasst.wire.ip import BROADCAST4

log = logging.getLogger(__name__)

PORT_MIN = 1
PORT_MAX = 65535
IFNAMSIZ = 16  # including the terminating NUL, as the kernel counts it
EPHEMERAL_DEFAULT = (49152, 65535)

IPAddr = IPv4Address | IPv6Address


@dataclass(frozen=True)
class PortRule:
    """Listening ports first..last go to ports to_first.. (same size) on the guest's address
    or `target`, listening on addr/ifname."""

    first: int
    last: int
    to_first: int
    addr: IPAddr | None = None  # listen only on this address (None: any)
    ifname: str | None = None  # listen only on this interface (SO_BINDTODEVICE)
    excluded: frozenset[int] = frozenset()  # `~N-M` items of the same option argument
    # no include range: skip ephemeral ports and tolerate bind failures (passt's "weak")
    tolerant: bool = False
    target: IPAddr | None = None  # destination instead of the guest's address
    scan: bool = False  # `auto`: only while the port is bound on the other side

    @property
    def delta(self) -> int:
        return self.to_first - self.first

    def covers(self, port: int, ephemeral: tuple[int, int]) -> bool:
        """Whether this rule forwards listening port `port`."""
        if not self.first <= port <= self.last or port in self.excluded:
            return False
        return not (self.tolerant and ephemeral[0] <= port <= ephemeral[1])


@dataclass(frozen=True)
class PortForwards:
    """The rules of one option (-t, -u, -T or -U), in the order given; none: no forwarding."""

    rules: tuple[PortRule, ...] = ()

    @property
    def scanned(self) -> tuple[PortRule, ...]:
        """The rules pasta's port scanner serves (`auto`)."""
        return tuple(r for r in self.rules if r.scan)


@dataclass(frozen=True)
class Mapping:
    host_port: int  # the listening port (host side for -t/-u, namespace side for -T/-U)
    guest_port: int
    addr: IPAddr | None = None
    ifname: str | None = None
    tolerant: bool = False
    target: IPAddr | None = None


NONE = PortForwards()


def _port(option: str, text: str, item: str) -> int:
    # Digits only: int() would also take "+5", " 5" or "5_0".
    if not text or not text.isascii() or not text.isdigit():
        raise ConfigError(option, f"bad port '{text}' in '{item}'")
    value = int(text)
    if not PORT_MIN <= value <= PORT_MAX:
        raise ConfigError(option, f"port {value} out of range {PORT_MIN}..{PORT_MAX} in '{item}'")
    return value


def _range(option: str, text: str, item: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    first = _port(option, lo, item)
    last = _port(option, hi, item) if sep else first
    if last < first:
        raise ConfigError(option, f"range {first}-{last} is reversed in '{item}'")
    return first, last


def _address(option: str, text: str) -> IPAddr:
    """ADDR, or [ADDR] for IPv6; ValueError-free: ConfigError on anything else."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise ConfigError(option, f"unbalanced brackets in address '{text}'")
        text = text[1:-1]
        if not text:
            raise ConfigError(option, "empty address in brackets")
    try:
        addr = ip_address(text)
    except ValueError:
        raise ConfigError(option, f"bad address '{text}'") from None
    if isinstance(addr, IPv6Address) and addr.scope_id:
        raise ConfigError(option, f"use ADDR%IFNAME, not a scoped address: '{text}'")
    return addr


def _target(option: str, text: str) -> IPAddr | None:
    """A target address; the unspecified address means "the guest's", as no target."""
    addr = _address(option, text)
    if addr.is_multicast or addr == BROADCAST4:
        raise ConfigError(option, f"cannot forward to {addr}")
    return None if addr.is_unspecified else addr


@dataclass(frozen=True)
class _Include:
    first: int
    last: int
    to_first: int
    target: IPAddr | None
    text: str


def _parse_include(option: str, item: str) -> _Include:
    src, colon, dst = item.partition(":")
    first, last = _range(option, src, item)
    if not colon:
        return _Include(first, last, first, None, item)
    target: IPAddr | None = None
    if "/" in dst:  # TOADDR/P[-Q]
        addr_text, _, dst = dst.rpartition("/")
        target = _target(option, addr_text)
    elif any(c in dst for c in ".:["):  # TOADDR alone
        return _Include(first, last, first, _target(option, dst), item)
    to_first, to_last = _range(option, dst, item)
    if "-" not in dst:
        to_last = to_first + (last - first)  # `N-M:P` is shorthand for the same-size range
        if to_last > PORT_MAX:
            raise ConfigError(option, f"translated range ends past {PORT_MAX} in '{item}'")
    if to_last - to_first != last - first:
        raise ConfigError(option, f"ranges in '{item}' are not the same size")
    return _Include(first, last, to_first, target, item)


def _is_listen_prefix(text: str) -> bool:
    """Whether the text before the first '/' is LISTEN rather than part of a TOSPEC chunk
    (`22:192.0.2.5/23` has no LISTEN): what passt's parser accepts there."""
    addr_text = text.partition("%")[0]
    if addr_text in ("", "*") or addr_text.startswith("[") or "%" in text:
        return True
    try:
        ip_address(addr_text)
    except ValueError:
        return ":" not in text  # `1.2.3/80` is a bad address; `22:ADDR/P` a chunk
    return True


def _parse_listen(option: str, prefix: str) -> tuple[IPAddr | None, str | None]:
    """LISTEN in front of the slash: (address or None for any, interface or None)."""
    addr_text, pct, ifname = prefix.partition("%")
    addr: IPAddr | None = None
    if addr_text not in ("", "*"):
        addr = _address(option, addr_text)
        if addr.is_multicast or addr == BROADCAST4:
            raise ConfigError(option, f"cannot listen on {addr}")
    if pct:
        if not ifname:
            raise ConfigError(option, "empty interface name after '%'")
        if len(ifname) >= IFNAMSIZ or ifname in (".", "..") or any(
            c.isspace() for c in ifname
        ):
            raise ConfigError(option, f"bad interface name '{ifname}'")
    return addr, (ifname if pct else None)


def parse_spec(
    spec: str, *, option: str = "-t", mode: str = "passt", allow_prefix: bool = True
) -> PortForwards:
    """Parse one argument of -t/-u/-T/-U. `mode` is "passt" or "pasta"; `allow_prefix` is
    False for -T/-U, which bind inside the namespace where host addresses mean nothing."""
    if spec == "none":
        return NONE
    addr: IPAddr | None = None
    ifname: str | None = None
    body = spec
    prefix, slash, rest = spec.partition("/")
    if slash and _is_listen_prefix(prefix):
        if not allow_prefix:
            raise ConfigError(option, "an address or interface prefix is only allowed for -t/-u")
        addr, ifname = _parse_listen(option, prefix)
        body = rest
    if not body:
        raise ConfigError(option, "empty port specification")

    excluded: set[int] = set()
    includes: list[_Include] = []
    scan = False
    all_target: IPAddr | None = None
    for item in body.split(","):
        if not item:
            raise ConfigError(option, "empty port specifier")
        keyword, _, all_to = item.partition(":")
        if item == "auto":
            if mode != "pasta":
                raise ConfigError(option, "'auto' is only valid in pasta mode")
            scan = True
        elif keyword == "all":
            all_target = _target(option, all_to) if all_to else None
        elif item == "none":
            raise ConfigError(option, "'none' cannot be combined with other specifiers")
        elif item.startswith("~"):
            if ":" in item:
                raise ConfigError(option, f"an excluded range cannot be translated: '{item}'")
            first, last = _range(option, item[1:], item)
            excluded.update(range(first, last + 1))
        else:
            includes.append(_parse_include(option, item))

    if not allow_prefix and (all_target or any(inc.target for inc in includes)):
        # passt parses a target here and never uses it: parsed, ignored, and said so
        log.warning("%s %s: a target address has no effect on the namespace side: ignored",
                    option, spec)
        all_target = None
        includes = [_Include(inc.first, inc.last, inc.to_first, None, inc.text)
                    for inc in includes]
    frozen = frozenset(excluded)
    if not includes:
        # only all/auto/exclusions: every other (non-ephemeral) port, failures tolerated
        rule = PortRule(PORT_MIN, PORT_MAX, PORT_MIN, addr, ifname, frozen, True,
                        all_target, scan)
        return _checked(option, PortForwards((rule,)))
    rules: list[PortRule] = []
    for inc in includes:
        if set(range(inc.first, inc.last + 1)) <= excluded:
            raise ConfigError(option, f"'{inc.text}' is entirely excluded")
        rules.append(PortRule(inc.first, inc.last, inc.to_first, addr, ifname, frozen,
                              target=inc.target, scan=scan))
    return _checked(option, PortForwards(tuple(rules)))


def _overlap(a: PortRule, b: PortRule) -> bool:
    """passt's conflict: listening addresses that can meet, and port ranges that do."""
    if a.addr is not None and b.addr is not None:
        if a.addr.is_unspecified or b.addr.is_unspecified:
            if a.addr.version != b.addr.version:
                return False
        elif a.addr != b.addr:
            return False
    return a.first <= b.last and b.first <= a.last


def _checked(option: str, fwd: PortForwards, earlier: tuple[PortRule, ...] = ()) -> PortForwards:
    """Refuse a rule that overlaps another (of the same argument, or an earlier one), and a
    target of the other family than its listening address."""
    seen = list(earlier)
    for rule in fwd.rules:
        if rule.target is not None and rule.addr is not None and (
            rule.target.version != rule.addr.version
        ):
            raise ConfigError(option, f"forward from IPv{rule.addr.version} to "
                                      f"IPv{rule.target.version} ({rule.target}) unsupported")
        for old in seen:
            if _overlap(rule, old):
                raise ConfigError(option, f"overlapping port specifier {_text(rule)} "
                                          f"(conflicts with {_text(old)})")
        seen.append(rule)
    return fwd


def _text(rule: PortRule) -> str:
    where = f"{rule.addr if rule.addr is not None else '*'}"
    ports = f"{rule.first}" if rule.first == rule.last else f"{rule.first}-{rule.last}"
    return f"{where}/{ports}"


def merge(current: PortForwards | None, new: PortForwards, *, option: str = "-t") -> PortForwards:
    """Accumulate a repeated option: the rules add up unless they overlap; `none` after a
    rule is a conflict, `none` before rules harmless."""
    if current is None:
        return new
    if not new.rules and current.rules:
        raise ConfigError(option, "'none' conflicts with previous options")
    _checked(option, new, current.rules)
    return PortForwards(current.rules + new.rules)


def parse_forwards(
    specs: Iterable[str], *, option: str = "-t", mode: str = "passt", allow_prefix: bool = True
) -> PortForwards | None:
    """All arguments of one option, in order; None if there were none."""
    out: PortForwards | None = None
    for spec in specs:
        new = parse_spec(spec, option=option, mode=mode, allow_prefix=allow_prefix)
        out = merge(out, new, option=option)
    return out


def auto() -> PortForwards:
    """pasta's default for a direction not given: `auto`."""
    return parse_spec("auto", mode="pasta")


def check_families(fwd: PortForwards | None, ipv4: bool, ipv6: bool, option: str) -> None:
    """A target address with no listening address needs that family alone (passt: "Did you
    mean 0.0.0.0/... instead?"): a socket of the other family could not reach it."""
    for rule in fwd.rules if fwd is not None else ():
        if rule.target is None or rule.addr is not None:
            continue
        other = ipv6 if rule.target.version == 4 else ipv4
        if other:
            hint = "0.0.0.0" if rule.target.version == 4 else "[::]"
            raise ConfigError(option, f"forward to IPv{rule.target.version} address "
                                      f"{rule.target} from any address: use {hint}/...")


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    """The kernel's ephemeral port range; "all" leaves it alone so outbound still works."""
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
    except (OSError, ValueError):
        return EPHEMERAL_DEFAULT
    return lo, hi


def mappings(
    fwd: PortForwards | None, ephemeral: tuple[int, int] = EPHEMERAL_DEFAULT
) -> Iterator[Mapping]:
    """Listening port -> guest port pairs of the rules bound at start, exclusions applied.

    Scanned (`auto`) rules yield nothing: their ports are found at run time.
    """
    for rule in fwd.rules if fwd is not None else ():
        if rule.scan:
            continue
        for port in range(rule.first, rule.last + 1):
            if rule.covers(port, ephemeral):
                yield Mapping(port, port + rule.delta, rule.addr, rule.ifname, rule.tolerant,
                              rule.target)
