"""vhostpasst's device state v1 (vhostpasst/link/migrate.py): it round-trips, and anything
else — truncated, oversized, another version, a stray byte, a field out of range — is refused
whole, the guest's addresses left as they were."""

from __future__ import annotations

import copy
import struct
from ipaddress import IPv4Address as A4
from ipaddress import IPv6Address as A6

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpasst.core.nat import GuestAddrs
from vhostpasst.link import migrate
from vhostpasst.link.migrate import GUEST, HEADER, SECTION
from virtio.devstate import StateError

FULL = GuestAddrs(mac=b"\x52\x54\x00\x12\x34\x56", addr4_seen=A4("192.0.2.2"),
                  addr6_seen=A6("2001:db8::2"), addr6_ll_seen=A6("fe80::5054:ff:fe12:3456"))


def stream(body: bytes, *, magic: bytes = migrate.MAGIC, version: int = migrate.VERSION,
           count: int = 1, kind: int = migrate.Section.GUEST, flags: int = 0,
           length: int | None = None) -> bytes:
    return (HEADER.pack(magic, version, count)
            + SECTION.pack(kind, flags, len(body) if length is None else length) + body)


def guest_body(present: int = 0, mac: bytes = bytes(6), raw4: bytes = bytes(4),
               raw6: bytes = bytes(16), raw6_ll: bytes = bytes(16)) -> bytes:
    return GUEST.pack(present, mac, raw4, raw6, raw6_ll)


def refused(data: bytes) -> str:
    """Loading `data` changes nothing and raises StateError; its message."""
    guest = copy.copy(FULL)
    with pytest.raises(StateError) as e:
        migrate.load(guest, data)
    assert guest == FULL
    return str(e.value)


def test_round_trip_of_a_full_guest() -> None:
    assert migrate.parse(migrate.save(FULL)) == FULL
    assert migrate.save(FULL)[:4] == b"VHPS"


def test_round_trip_of_a_guest_never_seen() -> None:
    assert migrate.parse(migrate.save(GuestAddrs())) == GuestAddrs()


def test_load_replaces_what_the_source_saw_and_keeps_the_rest() -> None:
    here = GuestAddrs(mac=b"\x02" * 6, addr4_seen=A4("198.51.100.7"))
    migrate.load(here, migrate.save(GuestAddrs(addr4_seen=A4("192.0.2.9"))))
    assert here == GuestAddrs(mac=b"\x02" * 6, addr4_seen=A4("192.0.2.9"))


macs = st.binary(min_size=6, max_size=6).filter(lambda b: not b[0] & 1 and any(b))
addrs4 = st.ip_addresses(v=4).filter(
    lambda a: not (a.is_unspecified or a.is_loopback or a.is_multicast
                   or a == A4("255.255.255.255")))
addrs6 = st.ip_addresses(v=6).filter(
    lambda a: not (a.is_unspecified or a.is_loopback or a.is_multicast))
lladdrs = st.integers(0, (1 << 64) - 1).map(lambda low: A6((0xFE80 << 112) | low))


@given(st.builds(GuestAddrs, mac=st.none() | macs, addr4_seen=st.none() | addrs4,
                 addr6_seen=st.none() | addrs6, addr6_ll_seen=st.none() | lladdrs))
def test_round_trip_of_any_guest(guest: GuestAddrs) -> None:
    assert migrate.parse(migrate.save(guest)) == guest


def test_every_truncation_is_refused() -> None:
    data = migrate.save(FULL)
    for n in range(len(data)):
        refused(data[:n])


def test_trailing_bytes_are_refused() -> None:
    assert "after the last section" in refused(migrate.save(FULL) + b"\0")


def test_oversized_is_refused_before_parsing() -> None:
    big = migrate.save(FULL) + bytes(migrate.MAX_STATE_SIZE)
    assert "more than" in refused(big)


def test_wrong_version_and_magic_are_refused() -> None:
    body = migrate.save(FULL)[HEADER.size + SECTION.size:]
    assert "version 2" in refused(stream(body, version=2))
    assert "version 0" in refused(stream(body, version=0))
    assert "not a vhostpasst state" in refused(stream(body, magic=b"PASS"))


@pytest.mark.parametrize("change, why", [
    ({"count": 0}, "0 sections"),
    ({"count": 2}, "2 sections"),
    ({"kind": 2}, "unknown section type 2"),
    ({"kind": 0}, "unknown section type 0"),
    ({"flags": 1}, "section flags"),
    ({"length": GUEST.size + 1}, "left"),
    ({"length": 0xFFFFFFFF}, "left"),
])
def test_bad_section_headers_are_refused(change: dict[str, int], why: str) -> None:
    body = migrate.save(FULL)[HEADER.size + SECTION.size:]
    assert why in refused(stream(body, **change))


def test_a_short_guest_section_is_refused() -> None:
    assert "GUEST section of" in refused(stream(guest_body()[:-1]))


def test_two_guest_sections_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    body = guest_body()
    data = (HEADER.pack(migrate.MAGIC, 1, 2) + (SECTION.pack(1, 0, len(body)) + body) * 2)
    monkeypatch.setattr(migrate, "MAX_SECTIONS", 2)  # as when connection sections come
    assert "two GUEST sections" in refused(data)


@pytest.mark.parametrize("body, why", [
    (guest_body(present=16), "presence bits"),
    (guest_body(present=1, mac=b"\x01\0\0\0\0\1"), "not a unicast"),
    (guest_body(present=1, mac=bytes(6)), "not a unicast"),
    (guest_body(present=2, raw4=bytes(4)), "guest address 0.0.0.0"),
    (guest_body(present=2, raw4=A4("127.0.0.1").packed), "127.0.0.1"),
    (guest_body(present=2, raw4=A4("224.0.0.1").packed), "224.0.0.1"),
    (guest_body(present=2, raw4=b"\xff" * 4), "255.255.255.255"),
    (guest_body(present=4, raw6=A6("::1").packed), "::1"),
    (guest_body(present=4, raw6=A6("ff02::1").packed), "ff02::1"),
    (guest_body(present=4), "guest address ::"),
    (guest_body(present=8, raw6_ll=A6("2001:db8::2").packed), "link-local"),
    (guest_body(present=0, raw4=A4("192.0.2.2").packed), "without its presence bit"),
    (guest_body(present=1, mac=b"\x02" * 6, raw6=A6("2001:db8::2").packed), "presence bit"),
])
def test_out_of_range_fields_are_refused(body: bytes, why: str) -> None:
    assert why in refused(stream(body))


def _check_value(guest: GuestAddrs) -> None:
    """What a parsed state may hold: nothing the dispatcher would not have learned."""
    if guest.mac is not None:
        assert len(guest.mac) == 6 and not guest.mac[0] & 1 and any(guest.mac)
    if guest.addr4_seen is not None:
        assert not (guest.addr4_seen.is_loopback or guest.addr4_seen.is_multicast
                    or guest.addr4_seen.is_unspecified)
    if guest.addr6_seen is not None:
        assert not (guest.addr6_seen.is_loopback or guest.addr6_seen.is_multicast
                    or guest.addr6_seen.is_unspecified)
    if guest.addr6_ll_seen is not None:
        assert guest.addr6_ll_seen.is_link_local


@settings(max_examples=500)
@given(st.data())
def test_fuzz_mutated_streams_load_whole_or_not_at_all(data: st.DataObject) -> None:
    """Bytes of a valid stream overwritten, cut or extended: either a state within range
    loads, or nothing changes."""
    raw = bytearray(migrate.save(FULL))
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(raw) - 1))
        raw[at] = data.draw(st.integers(0, 255))
    raw = raw[:data.draw(st.integers(0, len(raw)))] + data.draw(st.binary(max_size=4))
    guest = copy.copy(FULL)
    try:
        parsed = migrate.parse(bytes(raw))
    except StateError:
        with pytest.raises(StateError):
            migrate.load(guest, bytes(raw))
        assert guest == FULL
        return
    _check_value(parsed)
    assert migrate.save(parsed) == bytes(raw)  # one spelling per state
    migrate.load(guest, bytes(raw))


@given(st.binary(max_size=80))
def test_fuzz_random_bytes(raw: bytes) -> None:
    try:
        parsed = migrate.parse(raw)
    except StateError:
        return
    _check_value(parsed)


def test_header_layout_is_fixed() -> None:
    """The layout is a wire format: sizes pinned so a change is a new version."""
    assert (HEADER.size, SECTION.size, GUEST.size) == (8, 8, 43)
    assert migrate.save(GuestAddrs())[:8] == b"VHPS" + struct.pack("!HH", 1, 1)
