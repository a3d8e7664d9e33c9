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
    parsed = fwd.parse_spec(spec)
    assert parsed.mode == "spec"
    (rule,) = parsed.rules
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
        ("80-82:90-91", "not the same size"),
        ("80:90-91", "not the same size"),
        ("65534-65535:65535", "past 65535"),
        ("~80:90", "cannot be translated"),
        ("~~80", "bad port"),
        ("80,80", "overlapping"),
        ("80-90,85", "overlapping"),
        ("80,~80", "entirely excluded"),
        ("80:81:82", "bad port"),
        ("1.2.3/80", "bad address"),
        ("[2001:db8::1/80", "unbalanced"),
        ("[]/80", "empty address"),
        ("/80", "empty address"),
        ("192.0.2.1%/80", "empty interface"),
        ("%abcdefghijklmnopq/80", "bad interface"),
        ("224.0.0.1/80", "cannot listen"),
        ("255.255.255.255/80", "cannot listen"),
        ("192.0.2.1/", "empty port specification"),
        ("192.0.2.1/none", "cannot follow"),
        ("auto", "pasta mode"),
        ("none,80", "bad port"),
        ("all,80", "bad port"),
    ],
)
def test_bad_specs(spec: str, why: str) -> None:
    with pytest.raises(ConfigError) as err:
        fwd.parse_spec(spec, option="-t", mode="passt")
    assert err.value.option == "-t"
    assert why in err.value.reason


def test_keywords() -> None:
    assert fwd.parse_spec("none").mode == "none"
    assert fwd.parse_spec("auto", mode="pasta").mode == "auto"
    assert fwd.parse_spec("all").mode == "all"
    with pytest.raises(ConfigError, match="passt mode"):
        fwd.parse_spec("all", mode="pasta")
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
    assert parsed.mode == "spec"
    assert parsed.excluded == frozenset({22, *range(8000, 9000)})
    got = {m.host_port for m in fwd.mappings(parsed, ephemeral=(49152, 65535))}
    assert 22 not in got and 8500 not in got and 49152 not in got
    assert {21, 23, 7999, 9000, 49151} <= got
    assert len(got) == 49151 - 1 - 1000


def test_prefix_not_allowed_for_namespace_side() -> None:
    with pytest.raises(ConfigError, match="only allowed for -t/-u"):
        fwd.parse_spec("192.0.2.1/80", option="-T", mode="pasta", allow_prefix=False)
    assert ports("80", option="-T", mode="pasta", allow_prefix=False) == [(80, 80)]


def test_accumulate_and_conflicts() -> None:
    acc = fwd.parse_forwards(["22", "80:8080", "192.0.2.1/80"], option="-t")
    assert acc is not None
    assert [(m.host_port, m.guest_port, m.addr) for m in fwd.mappings(acc)] == [
        (22, 22, None),
        (80, 8080, None),
        (80, 80, IPv4Address("192.0.2.1")),
    ]
    assert fwd.parse_forwards([], option="-t") is None
    assert fwd.parse_forwards(["none", "none"]) == fwd.NONE
    for specs in (["none", "22"], ["22", "all"], ["all", "none"], ["22", "none"]):
        with pytest.raises(ConfigError, match="mode conflict"):
            fwd.parse_forwards(specs, option="-t")
    with pytest.raises(ConfigError, match="mode conflict"):
        fwd.parse_forwards(["auto", "22"], option="-t", mode="pasta")
    with pytest.raises(ConfigError, match="overlapping"):
        fwd.parse_forwards(["20-30", "25"], option="-t")


def test_explicit_rule_wins_over_tolerant_rule() -> None:
    acc = fwd.parse_forwards(["~22", "80:8080"])
    assert acc is not None
    by_port = {m.host_port: m.guest_port for m in fwd.mappings(acc)}
    assert by_port[80] == 8080 and 22 not in by_port and by_port[81] == 81


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
