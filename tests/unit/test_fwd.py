"""Port-forwarding spec grammar: good specs, bad specs, accumulation and mappings."""

from __future__ import annotations

import errno
from ipaddress import IPv4Address, IPv6Address

import pytest

from vhostpasst.config import fwd
from vhostpasst.config.errors import ConfigError
from vhostpasst.proto import bind


def ports(spec: str, **kw: object) -> list[tuple[int, int]]:
    return [(m.host_port, m.guest_port) for m in fwd.mappings(fwd.parse_spec(spec, **kw))]


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("22", [(22, 22)]),
        ("1", [(1, 1)]),
        ("65535", [(65535, 65535)]),
        ("22,80", [(22, 22), (80, 80)]),
        ("80-82", [(80, 80), (81, 81), (82, 82)]),
        ("2022:22", [(2022, 22)]),
        ("8080-8082:80-82", [(8080, 80), (8081, 81), (8082, 82)]),
        ("8080-8082:80", [(8080, 80), (8081, 81), (8082, 82)]),  # N-M:P is a same-size range
        ("80-84,~81-82", [(80, 80), (83, 83), (84, 84)]),
        ("~81,80-82", [(80, 80), (82, 82)]),  # exclusions apply wherever they are written
        ("5000-5004:6000,~5001", [(5000, 6000), (5002, 6002), (5003, 6003), (5004, 6004)]),
        ("65535:1", [(65535, 1)]),
    ],
)
def test_good_specs(spec: str, expected: list[tuple[int, int]]) -> None:
    assert ports(spec) == expected


@pytest.mark.parametrize(
    "spec, addr, ifname",
    [
        ("192.0.2.1/22", IPv4Address("192.0.2.1"), None),
        ("[2001:db8::1]/22", IPv6Address("2001:db8::1"), None),
        ("2001:db8::1/22", IPv6Address("2001:db8::1"), None),
        ("192.0.2.1%eth0/22", IPv4Address("192.0.2.1"), "eth0"),
        ("[2001:db8::1]%eth0/22", IPv6Address("2001:db8::1"), "eth0"),
        ("%eth0/22", None, "eth0"),
        ("127.0.0.1/22", IPv4Address("127.0.0.1"), None),
    ],
)
def test_address_prefix(spec: str, addr: object, ifname: str | None) -> None:
    (rule,) = fwd.parse_spec(spec).rules
    assert (rule.first, rule.last, rule.addr, rule.ifname) == (22, 22, addr, ifname)


@pytest.mark.parametrize(
    "spec, why",
    [
        ("", "empty"),
        ("0", "out of range"),
        ("65536", "out of range"),
        ("-1", "bad port"),
        ("80,", "empty port specifier"),
        (",80", "empty port specifier"),
        ("80,,81", "empty port specifier"),
        ("80-", "bad port"),
        ("80-70", "reversed"),
        ("abc", "bad port"),
        ("+80", "bad port"),
        (" 80", "bad port"),
        ("80:", "bad port"),
        ("80:abc", "bad port"),
        ("80:192.0.2", "bad address"),
        ("80:224.0.0.1", "cannot forward to"),
        ("all:192.0.2.1.1", "bad address"),
        ("192.0.2.1/80:[2001:db8::5]/80", "IPv4 to IPv6"),
        ("192.0.2.1/all:2001:db8::5", "IPv4 to IPv6"),
        ("80-82:90-91", "not the same size"),
        ("80:90-91", "not the same size"),
        ("65534-65535:65535", "past 65535"),
        ("~80:90", "cannot be translated"),
        ("~~80", "bad port"),
        ("80,80", "overlapping"),
        ("80-90,85", "overlapping"),
        ("80,~80", "entirely excluded"),
        ("80:81:82", "bad address"),
        ("1.2.3/80", "bad address"),
        ("[2001:db8::1/80", "unbalanced"),
        ("[]/80", "empty address"),
        ("192.0.2.1%/80", "empty interface"),
        ("%abcdefghijklmnopq/80", "bad interface"),
        ("224.0.0.1/80", "cannot listen"),
        ("255.255.255.255/80", "cannot listen"),
        ("192.0.2.1/", "empty port specification"),
        ("192.0.2.1/none", "cannot be combined"),
        ("auto", "pasta mode"),
        ("80,auto", "pasta mode"),
        ("none,80", "cannot be combined"),
        ("allx", "bad port"),
    ],
)
def test_bad_specs(spec: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        fwd.parse_spec(spec, option="-t", mode="passt")
    assert err.value.option == "-t"
    assert why in err.value.reason


def test_keywords() -> None:
    assert fwd.parse_spec("none") == fwd.NONE and not fwd.NONE.rules
    (auto,) = fwd.parse_spec("auto", mode="pasta").rules
    assert auto.scan and auto.tolerant and (auto.first, auto.last) == (1, 65535)
    (every,) = fwd.parse_spec("all").rules
    assert every.tolerant and not every.scan
    assert fwd.parse_spec("all", mode="pasta") == fwd.parse_spec("all")  # pasta too (2026)
    assert list(fwd.mappings(fwd.parse_spec("none"))) == []
    assert list(fwd.mappings(fwd.parse_spec("auto", mode="pasta"))) == []
    assert list(fwd.mappings(None)) == []


def test_all_skips_ephemeral_ports() -> None:
    got = [m.host_port for m in fwd.mappings(fwd.parse_spec("all"), ephemeral=(40000, 65535))]
    assert got == list(range(1, 40000))
    assert all(m.tolerant for m in fwd.mappings(fwd.parse_spec("all")))
    # libvirt writes ADDR/all for a portForward element without ranges
    (rule,) = fwd.parse_spec("192.0.2.1/all").rules
    assert rule.addr == IPv4Address("192.0.2.1")


def test_exclusion_only_forwards_everything_else() -> None:
    parsed = fwd.parse_spec("~22,~8000-8999")
    (rule,) = parsed.rules
    assert rule.excluded == frozenset({22, *range(8000, 9000)})
    got = {m.host_port for m in fwd.mappings(parsed, ephemeral=(49152, 65535))}
    assert 22 not in got and 8500 not in got and 49152 not in got
    assert {21, 23, 7999, 9000, 49151} <= got
    assert len(got) == 49151 - 1 - 1000
    # all with exclusions is the same thing; all beside an include range adds nothing
    assert fwd.parse_spec("all,~22,~8000-8999") == parsed
    assert fwd.parse_spec("80,all") == fwd.parse_spec("80")


T = IPv4Address("192.0.2.5")
T6 = IPv6Address("2001:db8::5")


@pytest.mark.parametrize(
    "spec, listen, pairs, target",
    [  # every target form of passt.1 (2026-07)
        ("22:192.0.2.5", None, [(22, 22)], T),
        ("22-23:192.0.2.5", None, [(22, 22), (23, 23)], T),
        ("22:192.0.2.5/2022", None, [(22, 2022)], T),
        ("22-23:192.0.2.5/2022-2023", None, [(22, 2022), (23, 2023)], T),
        ("0.0.0.0/5000:192.0.2.5/6000", IPv4Address("0.0.0.0"), [(5000, 6000)], T),
        ("[::]/22:[2001:db8::5]/23", IPv6Address("::"), [(22, 23)], T6),
        ("::1/22:2001:db8::5", IPv6Address("::1"), [(22, 22)], T6),
        ("22:0.0.0.0", None, [(22, 22)], None),  # unspecified: the guest's own address
        ("*/22", None, [(22, 22)], None),
        ("/22", None, [(22, 22)], None),
        ("*%eth0/22:192.0.2.5", None, [(22, 22)], T),
    ],
)
def test_target_addresses(spec: str, listen: object, pairs: list[tuple[int, int]],
                          target: object) -> None:
    got = list(fwd.mappings(fwd.parse_spec(spec)))
    assert [(m.host_port, m.guest_port) for m in got] == pairs
    assert {(m.addr, m.target) for m in got} == {(listen, target)}


def test_all_with_a_target() -> None:
    (rule,) = fwd.parse_spec("127.0.0.6/all:192.0.2.6").rules
    assert (rule.addr, rule.target, rule.tolerant) == (
        IPv4Address("127.0.0.6"), IPv4Address("192.0.2.6"), True)
    # -T/-U: passt parses a target and never uses it; so do we, with a warning
    (rule,) = fwd.parse_spec("22:192.0.2.5", option="-T", mode="pasta",
                             allow_prefix=False).rules
    assert (rule.first, rule.target) == (22, None)
    (rule,) = fwd.parse_spec("all:192.0.2.6", option="-U", mode="pasta",
                             allow_prefix=False).rules
    assert rule.target is None and rule.tolerant


def test_auto_with_ranges_and_an_address() -> None:
    rules = fwd.parse_spec("8000-8010,~8005,auto", mode="pasta").rules
    assert [(r.first, r.last, r.scan) for r in rules] == [(8000, 8010, True)]
    assert list(fwd.mappings(fwd.PortForwards(rules))) == []  # found at run time
    eph = (49152, 65535)
    assert [p for p in range(7990, 8020) if rules[0].covers(p, eph)] == [
        *range(8000, 8005), *range(8006, 8011)]
    (rule,) = fwd.parse_spec("::1/auto", mode="pasta").rules
    assert rule.scan and rule.addr == IPv6Address("::1") and not rule.covers(50000, eph)


def test_check_families_needs_a_listening_address_for_a_target() -> None:
    spec = fwd.parse_spec("22:192.0.2.5")
    with pytest.raises(ConfigError, match="use 0.0.0.0/"):
        fwd.check_families(spec, True, True, "-t")
    fwd.check_families(spec, True, False, "-t")  # IPv4 alone: no ambiguity
    fwd.check_families(fwd.parse_spec("0.0.0.0/22:192.0.2.5"), True, True, "-t")


def test_prefix_not_allowed_for_namespace_side() -> None:
    with pytest.raises(ConfigError, match="only allowed for -t/-u"):
        fwd.parse_spec("192.0.2.1/80", option="-T", mode="pasta", allow_prefix=False)
    assert ports("80", option="-T", mode="pasta", allow_prefix=False) == [(80, 80)]


def test_accumulate_and_conflicts() -> None:
    acc = fwd.parse_forwards(["22", "80:8080", "198.51.100.1/8080", "[::1]/81"], option="-t")
    assert acc is not None
    assert [(m.host_port, m.guest_port, m.addr) for m in fwd.mappings(acc)] == [
        (22, 22, None),
        (80, 8080, None),
        (8080, 8080, IPv4Address("198.51.100.1")),
        (81, 81, IPv6Address("::1")),
    ]
    assert fwd.parse_forwards([], option="-t") is None
    assert fwd.parse_forwards(["none", "none"]) == fwd.NONE
    assert fwd.parse_forwards(["none", "22"]) == fwd.parse_spec("22")  # none first: harmless
    for specs in (["22", "none"], ["all", "none"]):
        with pytest.raises(ConfigError, match="conflicts with previous"):
            fwd.parse_forwards(specs, option="-t")
    # passt's conflict rule: no address (or an unspecified one of the family) meets any
    for specs in (["20-30", "25"], ["22", "all"], ["all", "192.0.2.1/22"],
                  ["0.0.0.0/22", "192.0.2.1/22"], ["~22", "80:8080"]):
        with pytest.raises(ConfigError, match="overlapping"):
            fwd.parse_forwards(specs, option="-t")
    for specs in (["0.0.0.0/22", "[::]/22"], ["192.0.2.1/all", "192.0.2.2/all"],
                  ["8000-8010,auto", "22"], ["::1/auto", "127.0.0.1/all"]):
        assert fwd.parse_forwards(specs, option="-t", mode="pasta") is not None, specs
    with pytest.raises(ConfigError, match="overlapping"):
        fwd.parse_forwards(["auto", "22"], option="-t", mode="pasta")


# --- bind_all: the binding policy -t and -u share ---------------------------------------------


class _FakeSock:
    def __init__(self, key: tuple[bool, object, int]) -> None:
        self.key = key
        self.closed = False

    def close(self) -> None:
        self.closed = True


def _binder(fail: set[int]) -> tuple[list[_FakeSock], bind.BindOne]:
    made: list[_FakeSock] = []

    def bind_one(six: bool, addr: object, ifname: object, port: int) -> _FakeSock:
        if port in fail:
            raise OSError(errno.EADDRINUSE, "Address in use")
        made.append(_FakeSock((six, addr, port)))
        return made[-1]

    return made, bind_one  # type: ignore[return-value]


def test_bind_all_binds_each_mapping_per_enabled_family() -> None:
    made, bind_one = _binder(set())
    spec = fwd.parse_spec("22,80:8080", option="-t")
    bound = bind.bind_all(spec, True, True, "TCP", bind_one)
    assert [(m.host_port, m.guest_port, six) for m, six, _ in bound] == [
        (22, 22, False), (22, 22, True), (80, 8080, False), (80, 8080, True)]
    only4 = bind.bind_all(fwd.parse_spec("198.51.100.1/5000", option="-u"), True, True, "UDP",
                          _binder(set())[1])
    assert [six for _, six, _ in only4] == [False]  # an address picks its family
    only6 = bind.bind_all(fwd.parse_spec("5000:[2001:db8::5]/5001", option="-u"), True, True,
                          "UDP", _binder(set())[1])
    assert [six for _, six, _ in only6] == [True]  # so does a target


def test_bind_all_explicit_failure_names_the_port_and_closes_the_rest() -> None:
    made, bind_one = _binder({80})
    with pytest.raises(OSError, match="TCP port 80 on 0.0.0.0"):
        bind.bind_all(fwd.parse_spec("22,80", option="-t"), True, False, "TCP", bind_one)
    assert made and all(s.closed for s in made)


def test_bind_all_tolerant_specs_skip_failures_but_not_all_of_them() -> None:
    spec = fwd.parse_spec("~3-65535", option="-u")  # exclusions only: ports 1 and 2
    _, bind_one = _binder({1})
    bound = bind.bind_all(spec, True, False, "UDP", bind_one)
    assert [m.host_port for m, _, _ in bound] == [2]
    _, bind_one = _binder({1, 2})
    with pytest.raises(OSError, match="no UDP port could be forwarded"):
        bind.bind_all(spec, True, False, "UDP", bind_one)
