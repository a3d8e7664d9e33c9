"""The C-backed checksums against a pure-Python RFC 1071 reference."""

from __future__ import annotations

import os
import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostpasst.wire import checksum


def ref_sum(data: bytes) -> int:
    """RFC 1071 §4.1, literally: 16-bit big-endian words, odd byte padded, end-around carry."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for (word,) in struct.iter_unpack("!H", data):
        total += word
        total = (total & 0xFFFF) + (total >> 16)
    return total


def ref_checksum(data: bytes) -> int:
    return ~ref_sum(data) & 0xFFFF


@given(st.binary(max_size=2048))
def test_matches_reference(data: bytes) -> None:
    assert checksum.checksum(data) == ref_checksum(data)
    assert checksum.checksum(bytearray(data)) == ref_checksum(data)
    assert checksum.checksum(memoryview(data)) == ref_checksum(data)


@given(st.binary(min_size=0, max_size=600), st.integers(min_value=0, max_value=5))
def test_memoryview_slices_at_any_offset(data: bytes, start: int) -> None:
    buf = os.urandom(start) + data
    view = memoryview(buf)[start:]
    assert checksum.checksum(view) == ref_checksum(data)


@pytest.mark.parametrize("length", [0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 63, 65, 1499, 1501])
@pytest.mark.parametrize("offset", [0, 1, 3])
def test_odd_lengths_and_offsets(length: int, offset: int) -> None:
    buf = bytes(range(256)) * 8
    data = buf[offset:offset + length]
    assert checksum.checksum(memoryview(buf)[offset:offset + length]) == ref_checksum(data)


def test_all_ones_and_zeros() -> None:
    assert checksum.checksum(b"") == 0xFFFF
    assert checksum.checksum(b"\0" * 100) == 0xFFFF
    assert checksum.checksum(b"\xff" * 100) == ref_checksum(b"\xff" * 100) == 0
    assert checksum.checksum(b"\xff") == ref_checksum(b"\xff") == 0x00FF


@given(st.binary(max_size=300), st.binary(max_size=300), st.binary(max_size=300))
def test_chaining(a: bytes, b: bytes, c: bytes) -> None:
    if len(a) % 2:
        a = a[:-1]
    if len(b) % 2:
        b = b[:-1]
    chained = checksum.partial(c, checksum.partial(b, checksum.partial(a)))
    assert checksum.fold(chained) == ref_checksum(a + b + c)
    assert checksum.checksum(a + b + c) == checksum.fold(chained)


@given(st.integers(min_value=0, max_value=0xFFFFFFFF), st.binary(max_size=100))
def test_init_is_added(init: int, data: bytes) -> None:
    expect = ref_sum(data) + (init & 0xFFFF) + (init >> 16)
    while expect >> 16:
        expect = (expect & 0xFFFF) + (expect >> 16)
    assert checksum.fold(checksum.partial(data, init)) == ~expect & 0xFFFF


# The classic example headers, checksum fields zeroed, with their published checksums
KNOWN = [
    ("4500003c1c4640004006" "0000" "ac100a63ac100a0c", 0xB1E6),
    ("4500007300004000" "4011" "0000" "c0a80001c0a800c7", 0xB861),
]


@pytest.mark.parametrize(("hexhdr", "expect"), KNOWN)
def test_known_ipv4_headers(hexhdr: str, expect: int) -> None:
    header = bytes.fromhex(hexhdr)
    assert checksum.ipv4_header(header) == expect
    filled = header[:10] + struct.pack("!H", expect) + header[12:]
    assert checksum.checksum(filled) == 0  # a right header sums to zero
    assert ref_checksum(filled) == 0


def test_rfc1071_numerical_example() -> None:
    # RFC 1071 §3: bytes 00 01 f2 03 f4 f5 f6 f7 sum to ddf2 (before complement)
    data = bytes.fromhex("0001f203f4f5f6f7")
    assert checksum.fold(checksum.partial(data)) == ~0xDDF2 & 0xFFFF


@given(st.binary(min_size=4, max_size=4), st.binary(min_size=4, max_size=4),
       st.sampled_from([6, 17]), st.binary(max_size=200))
def test_pseudo4_resums_to_zero(src: bytes, dst: bytes, proto: int, payload: bytes) -> None:
    seg = bytearray(b"\0" * 8 + payload)
    csum = checksum.l4_ipv4(src, dst, proto, seg)
    pseudo = src + dst + struct.pack("!BBH", 0, proto, len(seg))
    assert csum == ref_checksum(pseudo + bytes(seg))
    struct.pack_into("!H", seg, 6, csum)
    assert ref_checksum(pseudo + bytes(seg)) == 0
    assert checksum.fold(checksum.partial(seg, checksum.pseudo4(src, dst, proto, len(seg)))) \
        == 0


@given(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16),
       st.sampled_from([6, 17, 58]), st.binary(max_size=200))
def test_pseudo6_resums_to_zero(src: bytes, dst: bytes, proto: int, payload: bytes) -> None:
    seg = bytearray(b"\0" * 8 + payload)
    csum = checksum.l4_ipv6(src, dst, proto, seg)
    pseudo = src + dst + struct.pack("!IxxxB", len(seg), proto)
    assert csum == ref_checksum(pseudo + bytes(seg))
    struct.pack_into("!H", seg, 6, csum)
    assert ref_checksum(pseudo + bytes(seg)) == 0


def test_pseudo_accepts_address_objects() -> None:
    a4, b4 = IPv4Address("10.0.0.1"), IPv4Address("10.0.0.2")
    assert checksum.pseudo4(a4, b4, 17, 8) == checksum.pseudo4(a4.packed, b4.packed, 17, 8)
    a6, b6 = IPv6Address("fe80::1"), IPv6Address("2001:db8::2")
    assert checksum.pseudo6(a6, b6, 6, 20) == checksum.pseudo6(a6.packed, b6.packed, 6, 20)
