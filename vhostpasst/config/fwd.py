"""Port-forwarding specifications (-t/-u host to guest, pasta -T/-U namespace to host).

Grammar, one option argument at a time:

    none | auto (pasta) | all (passt) | [ADDR][%IFNAME]/SPEC | SPEC
    SPEC := item{,item}      item := [~]N[-M][:P[-Q]]

Repeated options accumulate into one `PortForwards`; mixing none/auto/all/explicit specs is a
"mode conflict". This module only parses and validates; proto/bind.py binds the sockets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Literal

from vhostpasst.config.errors import ConfigError
from vhostpasst.wire.ip import BROADCAST4

PORT_MIN = 1
PORT_MAX = 65535
IFNAMSIZ = 16  # including the terminating NUL, as the kernel counts it
EPHEMERAL_DEFAULT = (49152, 65535)

Mode = Literal["none", "auto", "all", "spec"]
IPAddr = IPv4Address | IPv6Address


@dataclass(frozen=True)
class PortRule:
    """Host ports first..last go to guest ports to_first.. (same size), on addr/ifname."""

    first: int
    last: int
    to_first: int
    addr: IPAddr | None = None  # listen only on this address (None: any)
    ifname: str | None = None  # listen only on this interface (SO_BINDTODEVICE)
    excluded: frozenset[int] = frozenset()  # `~N-M` items of the same option argument
    # "all" and exclusion-only specs: skip ephemeral ports and tolerate bind failures
    tolerant: bool = False

    @property
    def delta(self) -> int:
        return self.to_first - self.first


@dataclass(frozen=True)
class PortForwards:
    mode: Mode = "none"
    rules: tuple[PortRule, ...] = ()

    @property
    def excluded(self) -> frozenset[int]:
        """Every port some option argument excluded (each rule honours only its own)."""
        out: frozenset[int] = frozenset()
        for rule in self.rules:
            out |= rule.excluded
        return out


@dataclass(frozen=True)
class Mapping:
    host_port: int  # the listening port (host side for -t/-u, namespace side for -T/-U)
    guest_port: int
    addr: IPAddr | None = None
    ifname: str | None = None
    tolerant: bool = False


NONE = PortForwards("none")
AUTO = PortForwards("auto")


@dataclass
class _Item:
    first: int
    last: int
    to_first: int
    exclude: bool = False
    text: str = field(default="")


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


def _parse_item(option: str, item: str) -> _Item:
    if not item:
        raise ConfigError(option, "empty port specifier")
    exclude = item.startswith("~")
    body = item[1:] if exclude else item
    src, colon, dst = body.partition(":")
    first, last = _range(option, src, item)
    if not colon:
        return _Item(first, last, first, exclude, item)
    if exclude:
        raise ConfigError(option, f"an excluded range cannot be translated: '{item}'")
    to_first, to_last = _range(option, dst, item)
    if "-" not in dst:
        to_last = to_first + (last - first)  # `N-M:P` is shorthand for the same-size range
        if to_last > PORT_MAX:
            raise ConfigError(option, f"translated range ends past {PORT_MAX} in '{item}'")
    if to_last - to_first != last - first:
        raise ConfigError(option, f"ranges in '{item}' are not the same size")
    return _Item(first, last, to_first, False, item)


def _parse_prefix(option: str, prefix: str) -> tuple[IPAddr | None, str | None]:
    """`[ADDR][%IFNAME]` in front of the slash; ADDR may be a bracketed IPv6 address."""
    addr_text, pct, ifname = prefix.partition("%")
    if addr_text.startswith("["):
        if not addr_text.endswith("]"):
            raise ConfigError(option, f"unbalanced brackets in address '{addr_text}'")
        addr_text = addr_text[1:-1]
        if not addr_text:
            raise ConfigError(option, "empty address in brackets")
    addr: IPAddr | None = None
    if addr_text:
        try:
            addr = ip_address(addr_text)
        except ValueError:
            raise ConfigError(option, f"bad address '{addr_text}'") from None
        if isinstance(addr, IPv6Address) and addr.scope_id:
            raise ConfigError(option, f"use ADDR%IFNAME, not a scoped address: '{addr_text}'")
        if addr.is_multicast or addr == BROADCAST4:
            raise ConfigError(option, f"cannot listen on {addr}")
    if pct:
        if not ifname:
            raise ConfigError(option, "empty interface name after '%'")
        if len(ifname) >= IFNAMSIZ or "/" in ifname or any(c.isspace() for c in ifname):
            raise ConfigError(option, f"bad interface name '{ifname}'")
    if addr is None and not pct:
        raise ConfigError(option, "empty address before '/'")
    return addr, (ifname if pct else None)


def parse_spec(
    spec: str, *, option: str = "-t", mode: str = "passt", allow_prefix: bool = True
) -> PortForwards:
    """Parse one argument of -t/-u/-T/-U. `mode` is "passt" or "pasta"; `allow_prefix` is
    False for -T/-U, which bind inside the namespace where host addresses mean nothing."""
    if spec == "none":
        return NONE
    if spec == "auto":
        if mode != "pasta":
            raise ConfigError(option, "'auto' is only valid in pasta mode")
        return AUTO
    addr: IPAddr | None = None
    ifname: str | None = None
    body = spec
    slash = spec.rfind("/")
    if slash >= 0:
        if not allow_prefix:
            raise ConfigError(option, "an address or interface prefix is only allowed for -t/-u")
        addr, ifname = _parse_prefix(option, spec[:slash])
        body = spec[slash + 1 :]
    if body == "all":
        if mode != "passt":
            raise ConfigError(option, "'all' is only valid in passt mode")
        rule = PortRule(PORT_MIN, PORT_MAX, PORT_MIN, addr, ifname, tolerant=True)
        return PortForwards("all", (rule,))
    if body in ("none", "auto"):
        raise ConfigError(option, f"'{body}' cannot follow an address or interface")
    if not body:
        raise ConfigError(option, "empty port specification")
    items = [_parse_item(option, text) for text in body.split(",")]

    # Exclusions first, so an item may carve holes out of a range given before it.
    excluded: set[int] = set()
    for it in items:
        if it.exclude:
            excluded.update(range(it.first, it.last + 1))
    explicit = [it for it in items if not it.exclude]
    if not explicit:
        # Only exclusions: everything else (non-ephemeral) is forwarded, failures tolerated.
        rule = PortRule(PORT_MIN, PORT_MAX, PORT_MIN, addr, ifname, frozenset(excluded), True)
        return PortForwards("spec", (rule,))
    taken: set[int] = set()
    rules: list[PortRule] = []
    for it in explicit:
        ports = set(range(it.first, it.last + 1))
        if ports & taken:
            raise ConfigError(option, f"overlapping port specifier '{it.text}'")
        taken |= ports
        if ports <= excluded:
            raise ConfigError(option, f"'{it.text}' is entirely excluded")
        rules.append(PortRule(it.first, it.last, it.to_first, addr, ifname, frozenset(excluded)))
    return PortForwards("spec", tuple(rules))


def merge(current: PortForwards | None, new: PortForwards, *, option: str = "-t") -> PortForwards:
    """Accumulate a repeated option. Repeating the same keyword is harmless."""
    if current is None:
        return new
    if current.mode != new.mode:
        raise ConfigError(option, f"mode conflict: '{new.mode}' after '{current.mode}'")
    if new.mode in ("none", "auto"):
        return current
    for rule in new.rules:
        if rule.tolerant:
            continue
        for old in current.rules:
            if old.tolerant or (old.addr, old.ifname) != (rule.addr, rule.ifname):
                continue
            if rule.first <= old.last and old.first <= rule.last:
                raise ConfigError(
                    option, f"overlapping port specifier {rule.first}-{rule.last}"
                )
    return PortForwards(current.mode, current.rules + new.rules)


def parse_forwards(
    specs: Iterable[str], *, option: str = "-t", mode: str = "passt", allow_prefix: bool = True
) -> PortForwards | None:
    """All arguments of one option, in order; None if there were none."""
    out: PortForwards | None = None
    for spec in specs:
        new = parse_spec(spec, option=option, mode=mode, allow_prefix=allow_prefix)
        out = merge(out, new, option=option)
    return out


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
    """Listening port -> guest port pairs, exclusions applied, each (addr, if, port) once.

    Explicit rules come first so they win over an exclusion-only or "all" rule on the same
    address; "auto" yields nothing (its ports are discovered at run time).
    """
    if fwd is None or fwd.mode in ("none", "auto"):
        return
    seen: set[tuple[IPAddr | None, str | None, int]] = set()
    for rule in sorted(fwd.rules, key=lambda r: r.tolerant):
        for port in range(rule.first, rule.last + 1):
            if port in rule.excluded:
                continue
            if rule.tolerant and ephemeral[0] <= port <= ephemeral[1]:
                continue
            key = (rule.addr, rule.ifname, port)
            if key in seen:
                continue
            seen.add(key)
            guest = port + rule.delta
            yield Mapping(port, guest, rule.addr, rule.ifname, rule.tolerant)
