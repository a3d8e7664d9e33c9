"""The TCP sections of the migration state stream (proto/tcp/migrate.py inside
link/migrate.py): a connection round-trips; a truncated, oversized or out-of-range one is
refused whole, and so is the stream holding it (no socket involved: parsing only)."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpasst.core.nat import GuestAddrs
from vhostpasst.link import migrate as stream
from vhostpasst.proto.tcp import migrate
from vhostpasst.proto.tcp.migrate import ConnState, parse
from virtio.devstate import StateError

U32 = st.integers(0, 0xFFFFFFFF)


def _v4(addr: str) -> bytes:
    return bytes(12) + IPv4Address(addr).packed


@st.composite
def conn_states(draw: st.DrawFn) -> ConnState:
    sndq = draw(st.binary(max_size=64))
    rcvq = draw(st.binary(max_size=64))
    acked = draw(U32)
    to_tap = (acked + draw(st.integers(0, len(rcvq)))) & 0xFFFFFFFF
    seq_max = (to_tap + draw(st.integers(0, len(rcvq) - (to_tap - acked) % (1 << 32)))) \
        & 0xFFFFFFFF
    from_tap = draw(U32)
    options = draw(st.integers(0, migrate.TCPI_OPT_ALL))
    return ConnState(
        4, draw(st.integers(0, 3)), draw(st.integers(1, 0xFFFF)),
        _v4("192.0.2.2"), _v4("198.51.100.7"), _v4("198.51.100.1"), _v4("198.51.100.7"),
        draw(st.integers(1, 0xFFFF)), 80, draw(st.integers(1, 0xFFFF)), 80,
        draw(U32), from_tap, (from_tap - draw(st.integers(0, 1000))) & 0xFFFFFFFF,
        draw(st.integers(0, 65535 << 8)), draw(U32), to_tap, seq_max, acked,
        draw(st.integers(0, 65535 << 8)), draw(st.integers(0, 14)), draw(st.integers(0, 14)),
        draw(st.integers(0, 14)), draw(st.integers(0, 14)), options,
        draw(st.integers(1, 0xFFFF)), draw(U32) if options & migrate.TCPI_OPT_TIMESTAMPS else 0,
        draw(U32), draw(st.integers(0, 1 << 20)), draw(st.integers(0, 1 << 20)),
        draw(st.integers(0, 1 << 20)), draw(U32), draw(U32), draw(U32), len(sndq),
        draw(st.integers(0, len(sndq))), len(rcvq), sndq, rcvq)


class Collector:
    """A ConnMover for parsing alone: the real parse(), restore() keeps what it is given."""

    def __init__(self) -> None:
        self.restored: list[ConnState] | None = None

    def save(self) -> list[bytes]:
        return []

    def parse(self, body: bytes) -> ConnState:
        return parse(body)

    def restore(self, conns: list[ConnState]) -> None:
        self.restored = conns

    def close(self) -> None:
        pass


@given(st.lists(conn_states(), max_size=3))
def test_connections_round_trip_in_the_stream(states: list[ConnState]) -> None:
    guest = GuestAddrs()
    guest.addr4_seen = IPv4Address("192.0.2.2")
    data = stream.save(guest, [s.pack() for s in states])
    mover = Collector()
    loaded = GuestAddrs()
    stream.load(loaded, data, mover)
    assert mover.restored == states
    assert loaded.addr4_seen == guest.addr4_seen


@given(conn_states(), st.data())
def test_a_truncated_or_oversized_section_is_refused(state: ConnState,
                                                     data: st.DataObject) -> None:
    body = state.pack()
    cut = data.draw(st.integers(0, len(body) - 1))
    with pytest.raises(StateError):
        parse(body[:cut])
    with pytest.raises(StateError):
        parse(body + data.draw(st.binary(min_size=1, max_size=8)))


# (field, a value out of its range)
_BAD = [("family", 5), ("flags", 4), ("mss", 0), ("sock_mss", 0x10000), ("ws_to_tap", 15),
        ("ws_from_tap", 255), ("snd_ws", 15), ("rcv_ws", 15), ("gport", 0), ("lport", 0),
        ("wnd_to_tap", (65535 << 8) + 1), ("snd_wnd", (65535 << 14) + 1),
        ("tcpi_options", 0x80), ("gaddr", _v4("127.0.0.1")), ("faddr", _v4("224.0.0.1")),
        ("raddr", bytes(16)), ("laddr", b"\1" + bytes(11) + IPv4Address("192.0.2.9").packed),
        ("sndq", migrate.MAX_QUEUE + 1), ("rcvq", migrate.MAX_QUEUE + 1)]


@settings(max_examples=30)
@given(conn_states(), st.sampled_from(_BAD))
def test_a_field_out_of_range_is_refused(state: ConnState, bad: tuple[str, object]) -> None:
    with pytest.raises(StateError):
        parse(state._replace(**{bad[0]: bad[1]}).pack())


@given(conn_states())
def test_sequence_numbers_out_of_order_are_refused(state: ConnState) -> None:
    behind = state._replace(seq_to_tap=(state.seq_ack_from_tap - 1) & 0xFFFFFFFF)
    with pytest.raises(StateError):
        parse(behind.pack())
    with pytest.raises(StateError):
        parse(state._replace(notsent=state.sndq + 1).pack())
    with pytest.raises(StateError):  # in flight to the guest: more than the queue holds
        parse(state._replace(seq_max=(state.seq_ack_from_tap + state.rcvq + 1)
                             & 0xFFFFFFFF).pack())


@settings(max_examples=300)
@given(conn_states(), st.lists(st.tuples(st.integers(0, 167), st.integers(0, 255)),
                               min_size=1, max_size=4))
def test_corrupted_fields_are_refused_or_still_in_range(state: ConnState,
                                                        edits: list[tuple[int, int]]) -> None:
    body = bytearray(state.pack())
    for offset, value in edits:
        body[offset] = value
    try:
        loaded = parse(bytes(body))
    except StateError:
        return
    assert loaded.pack() == bytes(body)  # one spelling: what loads packs back the same
    assert loaded.family in (4, 6) and max(loaded.ws_to_tap, loaded.snd_ws) <= 14


def test_a_tcp_section_is_refused_by_a_link_that_moves_no_connections(
        ) -> None:
    data = stream.save(GuestAddrs(), [b"anything"])
    with pytest.raises(StateError, match="no TCP here"):
        stream.parse(data)


def test_a_tcp_section_before_the_guest_section_is_refused() -> None:
    body = b"x"
    data = (stream.HEADER.pack(stream.MAGIC, stream.VERSION, 2)
            + stream.SECTION.pack(stream.Section.TCP, 0, 1) + body
            + stream.save(GuestAddrs())[stream.HEADER.size:])
    with pytest.raises(StateError, match="before the GUEST"):
        stream.parse(data, Collector())


def test_the_fixed_part_is_as_documented() -> None:
    assert migrate._FIXED.size == 168
    assert struct.calcsize("!BBH") + 4 * 16 + 4 * 2 + 9 * 4 + 5 + 3 + 12 * 4 == 168
