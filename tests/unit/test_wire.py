"""wire/*: builder -> parser round trips, in-place writers, and fuzzing: only Malformed."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv6Address

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostpasst.wire import arp, checksum, eth, icmp, ip, tcp, udp
from vhostpasst.wire.errors import Malformed, as_view

MAC_A = bytes.fromhex("525400123456")
MAC_B = bytes.fromhex("9a559a559a55")
A4 = IPv4Address("10.0.2.15")
B4 = IPv4Address("93.184.216.34")
A6 = IPv6Address("2001:db8::15")
B6 = IPv6Address("fe80::1")

ports = st.integers(min_value=0, max_value=0xFFFF)
u32 = st.integers(min_value=0, max_value=0xFFFFFFFF)
payloads = st.binary(max_size=300)


def parse_all(frame: bytes | memoryview) -> object:
    """Parse a frame as the dispatcher would, down to L4: what the fuzz tests drive."""
    e = eth.parse_eth(frame)
    if e.ethertype == eth.ETH_P_ARP:
        return arp.parse_arp(e.payload)
    if e.ethertype == eth.ETH_P_IP:
        p4 = ip.parse_ipv4(e.payload)
        proto, l4 = p4.proto, p4.payload
    elif e.ethertype == eth.ETH_P_IPV6:
        p6 = ip.parse_ipv6(e.payload)
        proto, l4 = p6.proto, p6.l4
    else:
        return e
    if proto == ip.IPPROTO_UDP:
        return udp.parse_udp(l4)
    if proto == ip.IPPROTO_TCP:
        seg = tcp.parse_tcp(l4)
        return tcp.parse_tcp_options(seg.options)
    if proto in (ip.IPPROTO_ICMP, ip.IPPROTO_ICMPV6):
        return icmp.parse_icmp(l4)
    return proto


# --- Ethernet, ARP -------------------------------------------------------------------------

def test_eth_round_trip() -> None:
    frame = eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IPV6, b"xyz")
    assert len(frame) == 17
    e = eth.parse_eth(frame)
    assert (e.dst, e.src, e.ethertype, bytes(e.payload)) == (MAC_A, MAC_B, 0x86DD, b"xyz")
    assert isinstance(e.payload, memoryview)


def test_eth_short_and_bad_builder() -> None:
    with pytest.raises(Malformed):
        eth.parse_eth(b"\0" * 13)
    assert bytes(eth.parse_eth(b"\0" * 14).payload) == b""
    with pytest.raises(ValueError):
        eth.build_eth(b"\0" * 5, MAC_B, 0, b"")


def test_parsers_do_not_copy_payloads() -> None:
    buf = bytearray(eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IP,
                                  ip.build_ipv4(A4, B4, 17, udp.build_udp4(A4, B4, 1, 2, b"ab"))))
    d = udp.parse_udp(ip.parse_ipv4(eth.parse_eth(memoryview(buf)).payload).payload)
    buf[-1] = ord("Z")  # the view sees the change: it is a slice of the same memory
    assert bytes(d.payload) == b"aZ"


def test_as_view_casts_and_rejects() -> None:
    words = memoryview(bytearray(8)).cast("H")
    assert len(as_view(words)) == 8
    with pytest.raises(Malformed):
        as_view(12)  # type: ignore[arg-type]
    with pytest.raises(Malformed):
        as_view(memoryview(bytearray(16))[::2])


def test_arp_round_trip() -> None:
    pkt = arp.build_arp(arp.ARPOP_REQUEST, MAC_A, A4, b"\0" * 6, B4)
    a = arp.parse_arp(pkt + b"\0" * 18)  # Ethernet padding allowed
    assert a.is_eth_ipv4 and a.op == arp.ARPOP_REQUEST
    assert (a.sha, a.spa, a.tha, a.tpa) == (MAC_A, A4.packed, b"\0" * 6, B4.packed)


def test_arp_other_address_sizes_and_truncation() -> None:
    # hlen 8, plen 16: 8 + 2 * 24 bytes
    pkt = struct.pack("!HHBBH", 6, 0x86DD, 8, 16, 1) + bytes(range(48))
    a = arp.parse_arp(pkt)
    assert not a.is_eth_ipv4 and len(a.sha) == 8 and len(a.tpa) == 16
    for n in range(len(pkt)):
        with pytest.raises(Malformed):
            arp.parse_arp(pkt[:n])


# --- IPv4 ----------------------------------------------------------------------------------

def test_ipv4_round_trip_and_outgoing_fields() -> None:
    pkt = ip.build_ipv4(A4, B4, ip.IPPROTO_UDP, b"payload")
    h = ip.parse_ipv4(pkt)
    assert (h.src, h.dst, h.proto, h.ttl, h.tos, h.ident) == (A4, B4, 17, 255, 0, 0)
    assert h.tot_len == 27 and bytes(h.payload) == b"payload"
    assert not h.frag_off & ip.IP4_DF and not h.is_fragment
    assert checksum.checksum(h.header) == 0  # header checksum right
    assert ip.parse_ipv4(ip.build_ipv4(A4.packed, B4.packed, 6, b"", ttl=64)).ttl == 64


def test_ipv4_padding_trimmed_and_options() -> None:
    opts = b"\x01\x01\x01\x00"  # NOP NOP NOP EOL
    hdr = bytearray(struct.pack("!BBHHHBBH4s4s", 0x46, 0, 24 + 3, 0, 0, 64, 17, 0,
                                A4.packed, B4.packed) + opts)
    pkt = bytes(hdr) + b"abc" + b"\0" * 10
    h = ip.parse_ipv4(pkt)
    assert bytes(h.options) == opts and bytes(h.payload) == b"abc" and len(h.header) == 24


@pytest.mark.parametrize(("frag_off", "fragment", "more", "offset"), [
    (0x0000, False, False, 0),
    (0x4000, False, False, 0),  # DF only
    (0x2000, True, True, 0),  # first fragment
    (0x0001, True, False, 8),  # last fragment
    (0x2010, True, True, 128),
])
def test_ipv4_fragments(frag_off: int, fragment: bool, more: bool, offset: int) -> None:
    pkt = bytearray(ip.build_ipv4(A4, B4, 17, b"12345678"))
    struct.pack_into("!H", pkt, 6, frag_off)
    h = ip.parse_ipv4(pkt)
    assert (h.is_fragment, h.more_fragments, h.frag_offset) == (fragment, more, offset)


def _v4(vihl: int = 0x45, tot_len: int = 20, extra: int = 0) -> bytes:
    return struct.pack("!BBHHHBBH4s4s", vihl, 0, tot_len, 0, 0, 64, 17, 0, A4.packed,
                       B4.packed) + b"\0" * extra


@pytest.mark.parametrize("pkt", [
    b"", b"\x45" * 19,
    _v4(vihl=0x44),  # ihl < 5
    _v4(vihl=0x40),
    _v4(vihl=0x65),  # version 6
    _v4(tot_len=21),  # beyond what is present
    _v4(tot_len=19),  # below the header
    _v4(vihl=0x46, tot_len=24, extra=2),  # options run past the data
    _v4(vihl=0x4F, tot_len=60, extra=30),
], ids=lambda p: p[:4].hex())
def test_ipv4_malformed(pkt: bytes) -> None:
    with pytest.raises(Malformed):
        ip.parse_ipv4(pkt)


def test_ipv4_builder_limits() -> None:
    with pytest.raises(ValueError):
        ip.build_ipv4(A4, B4, 17, b"\0" * 65516)
    with pytest.raises(ValueError):
        ip.build_ipv4(b"\0" * 3, B4, 17, b"")


# --- IPv6 and extension headers -----------------------------------------------------------

def _ext(nh: int, length_units: int, fill: int = 0) -> bytes:
    """A generic extension header of (length_units + 1) * 8 bytes."""
    return bytes((nh, length_units)) + bytes([fill]) * (6 + 8 * length_units)


def test_ipv6_round_trip() -> None:
    pkt = ip.build_ipv6(A6, B6, ip.IPPROTO_UDP, b"data", hop_limit=7, flow_label=0xABCDE)
    h = ip.parse_ipv6(pkt)
    assert (h.src, h.dst, h.nexthdr, h.proto, h.hop_limit) == (A6, B6, 17, 17, 7)
    assert (h.flow_label, h.tclass, h.payload_len) == (0xABCDE, 0, 4)
    assert bytes(h.l4) == bytes(h.payload) == b"data"
    assert not h.is_fragment
    assert ip.parse_ipv6(ip.build_ipv6(A6, B6, 6, b"")).hop_limit == 255


def test_ipv6_padding_trimmed() -> None:
    h = ip.parse_ipv6(ip.build_ipv6(A6, B6, 17, b"abcd") + b"\0" * 6)
    assert bytes(h.payload) == b"abcd" and h.payload_len == 4


@pytest.mark.parametrize("chain", [
    [(ip.IPPROTO_HOPOPTS, 0)],
    [(ip.IPPROTO_HOPOPTS, 1), (ip.IPPROTO_ROUTING, 2), (ip.IPPROTO_DSTOPTS, 0)],
    [(ip.IPPROTO_MH, 0), (ip.IPPROTO_HIP, 1), (ip.IPPROTO_SHIM6, 0), (253, 0), (254, 3)],
])
def test_ipv6_extension_headers_walked(chain: list[tuple[int, int]]) -> None:
    body = b""
    nexts = [nh for nh, _ in chain[1:]] + [ip.IPPROTO_TCP]
    for (_, units), nxt in zip(chain, nexts, strict=True):
        body += _ext(nxt, units, fill=0xEE)
    seg = tcp.build_tcp6(A6, B6, 1, 2, 0, 0, tcp.SYN, 100)
    h = ip.parse_ipv6(ip.build_ipv6(A6, B6, chain[0][0], body + seg))
    assert h.nexthdr == chain[0][0] and h.proto == ip.IPPROTO_TCP
    assert bytes(h.l4) == seg and len(h.payload) == len(body) + len(seg)
    # every truncation inside the chain is Malformed (payload_len stays honest)
    for cut in range(len(body)):
        with pytest.raises(Malformed):
            ip.parse_ipv6(ip.build_ipv6(A6, B6, chain[0][0], body[:cut]))


def test_ipv6_ah_length_in_32_bit_words() -> None:
    # AH with payload length 4: (4 + 2) * 4 = 24 bytes
    ah = bytes((ip.IPPROTO_UDP, 4)) + b"\0" * 22
    h = ip.parse_ipv6(ip.build_ipv6(A6, B6, ip.IPPROTO_AH, ah + b"UDPDATA!"))
    assert h.proto == ip.IPPROTO_UDP and bytes(h.l4) == b"UDPDATA!"
    with pytest.raises(Malformed):
        ip.parse_ipv6(ip.build_ipv6(A6, B6, ip.IPPROTO_AH, ah[:20]))


def test_ipv6_esp_and_no_next_header_stop_the_walk() -> None:
    h = ip.parse_ipv6(ip.build_ipv6(A6, B6, ip.IPPROTO_ESP, b"\1" * 16))
    assert h.proto == ip.IPPROTO_ESP and len(h.l4) == 16
    h = ip.parse_ipv6(ip.build_ipv6(A6, B6, ip.IPPROTO_DSTOPTS,
                                    _ext(ip.IPPROTO_NONE, 0) + b"ignored"))
    assert h.proto == ip.IPPROTO_NONE


@pytest.mark.parametrize(("offmf", "fragment", "offset", "more"), [
    (0x0001, True, 0, True),  # first fragment
    (0x0010, True, 16, False),  # last fragment
    (0x0000, False, 0, False),  # atomic fragment (RFC 6946): a whole packet
])
def test_ipv6_fragment_header(offmf: int, fragment: bool, offset: int, more: bool) -> None:
    frag = struct.pack("!BxHI", ip.IPPROTO_UDP, offmf, 0xDEADBEEF)
    h = ip.parse_ipv6(ip.build_ipv6(A6, B6, ip.IPPROTO_FRAGMENT, frag + b"rest"))
    assert (h.is_fragment, h.frag_offset, h.more_fragments) == (fragment, offset, more)
    assert h.proto == ip.IPPROTO_UDP and bytes(h.l4) == b"rest"
    assert h.frag_id == (0xDEADBEEF if fragment else 0)


@pytest.mark.parametrize("pkt", [
    b"", b"\x60" + b"\0" * 38,
    b"\x40" + b"\0" * 39,  # version 4
    struct.pack("!IHBB", 6 << 28, 1, 59, 64) + b"\0" * 32,  # payload_len beyond data
    struct.pack("!IHBB", 6 << 28, 4, 0, 64) + b"\0" * 36,  # hop-by-hop in 4 bytes
    struct.pack("!IHBB", 6 << 28, 8, 44, 64) + b"\0" * 32 + b"\0" * 7 + b"\0",  # short frag
], ids=lambda p: str(len(p)))
def test_ipv6_malformed(pkt: bytes) -> None:
    with pytest.raises(Malformed):
        ip.parse_ipv6(pkt)


# --- UDP -----------------------------------------------------------------------------------

@given(ports, ports, payloads)
def test_udp4_round_trip(sport: int, dport: int, payload: bytes) -> None:
    seg = udp.build_udp4(A4, B4, sport, dport, payload)
    d = udp.parse_udp(seg)
    assert (d.sport, d.dport, d.length, bytes(d.payload)) == (sport, dport, 8 + len(payload),
                                                               payload)
    assert d.check != 0 and checksum.l4_ipv4(A4, B4, ip.IPPROTO_UDP, seg) == 0


@given(ports, ports, payloads)
def test_udp6_round_trip(sport: int, dport: int, payload: bytes) -> None:
    seg = udp.build_udp6(A6, B6, sport, dport, payload)
    d = udp.parse_udp(seg)
    assert bytes(d.payload) == payload and d.check != 0
    assert checksum.l4_ipv6(A6, B6, ip.IPPROTO_UDP, seg) == 0


def test_udp_zero_checksum_sent_as_ffff() -> None:
    # find a payload whose checksum folds to 0: pick the 2 bytes that make it so
    base = udp.build_udp4(A4, B4, 1, 2, b"\0\0")
    d = udp.parse_udp(base)
    want = d.check  # adding ~want's complement moves the sum to all-ones
    fix = struct.pack("!H", want)
    seg = udp.build_udp4(A4, B4, 1, 2, fix)
    assert udp.parse_udp(seg).check == 0xFFFF
    assert checksum.l4_ipv4(A4, B4, ip.IPPROTO_UDP, seg) == 0


@pytest.mark.parametrize("seg", [
    b"", b"\0" * 7,
    struct.pack("!HHHH", 1, 2, 7, 0),  # length < 8
    struct.pack("!HHHH", 1, 2, 9, 0),  # length > available
    struct.pack("!HHHH", 1, 2, 0, 0) + b"\0" * 100,  # 0 (jumbogram) is not supported
])
def test_udp_malformed(seg: bytes) -> None:
    with pytest.raises(Malformed):
        udp.parse_udp(seg)


def test_udp_length_trims() -> None:
    assert bytes(udp.parse_udp(struct.pack("!HHHH", 1, 2, 10, 0) + b"abcd").payload) == b"ab"


def test_udp_in_place_writers_match_builders() -> None:
    payload = b"hello, guest"
    buf = bytearray(2048)
    buf[udp.UDP4_PAYLOAD_OFFSET:udp.UDP4_PAYLOAD_OFFSET + len(payload)] = payload
    n = udp.write_eth_ipv4_udp_headers(memoryview(buf), MAC_A, MAC_B, B4, A4, 53, 40000,
                                       len(payload))
    expect = eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IP,
                           ip.build_ipv4(B4, A4, 17, udp.build_udp4(B4, A4, 53, 40000, payload)))
    assert bytes(buf[:n]) == expect

    buf6 = bytearray(2048)
    buf6[udp.UDP6_PAYLOAD_OFFSET:udp.UDP6_PAYLOAD_OFFSET + len(payload)] = payload
    n = udp.write_eth_ipv6_udp_headers(memoryview(buf6), MAC_A, MAC_B, B6, A6, 53, 40000,
                                       len(payload), flow_label=5)
    expect = eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IPV6, ip.build_ipv6(
        B6, A6, 17, udp.build_udp6(B6, A6, 53, 40000, payload), flow_label=5))
    assert bytes(buf6[:n]) == expect


# --- TCP -----------------------------------------------------------------------------------

@given(ports, ports, u32, u32, st.integers(min_value=0, max_value=0x1FF),
       st.integers(min_value=0, max_value=0xFFFF), payloads)
def test_tcp_round_trip(sport: int, dport: int, seq: int, ack: int, flags: int, window: int,
                        payload: bytes) -> None:
    seg4 = tcp.build_tcp4(A4, B4, sport, dport, seq, ack, flags, window, payload)
    seg6 = tcp.build_tcp6(A6, B6, sport, dport, seq, ack, flags, window, payload)
    assert checksum.l4_ipv4(A4, B4, ip.IPPROTO_TCP, seg4) == 0
    assert checksum.l4_ipv6(A6, B6, ip.IPPROTO_TCP, seg6) == 0
    for seg in (seg4, seg6):
        t = tcp.parse_tcp(seg)
        assert (t.sport, t.dport, t.seq, t.ack, t.flags, t.window, t.hlen) == \
            (sport, dport, seq, ack, flags, window, 20)
        assert bytes(t.payload) == payload


def test_tcp_syn_options() -> None:
    opts = tcp.build_tcp_options(mss=1460, wscale=7, sack_ok=True)
    assert len(opts) % 4 == 0
    t = tcp.parse_tcp(tcp.build_tcp4(A4, B4, 1, 2, 100, 0, tcp.SYN, 65535, b"", opts))
    assert (t.mss, t.wscale, t.hlen) == (1460, 7, 20 + len(opts))
    o = tcp.parse_tcp_options(t.options)
    assert o == tcp.TcpOptions(1460, 7, True, None)
    # not decoded for non-SYN segments: they may not carry MSS/WS
    t = tcp.parse_tcp(tcp.build_tcp4(A4, B4, 1, 2, 100, 0, tcp.ACK, 65535, b"x", opts))
    assert (t.mss, t.wscale, bytes(t.payload)) == (None, None, b"x")


def test_tcp_options_decoding() -> None:
    ts = bytes((8, 10)) + struct.pack("!II", 7, 9)
    raw = bytes((1, 1)) + ts + bytes((3, 3, 20)) + bytes((99, 4, 0, 0)) + bytes((2, 3, 5))
    o = tcp.parse_tcp_options(raw + b"\0\0\0")  # wrong-length MSS ignored, EOL stops
    assert o == tcp.TcpOptions(None, 14, False, (7, 9))  # WS clamped to 14
    for bad in (b"\x02", b"\x02\x01\x00\x00", b"\x05\x0a\x00", b"\x01\x03\x00"):
        with pytest.raises(Malformed):
            tcp.parse_tcp_options(bad)


@pytest.mark.parametrize("seg", [
    b"", b"\0" * 19,
    struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 4 << 4, 2, 0, 0, 0),  # data offset < 5
    struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 6 << 4, 2, 0, 0, 0),  # options beyond the segment
    struct.pack("!HHIIBBHHH", 1, 2, 0, 0, 6 << 4, 2, 0, 0, 0) + b"\x02\x08\0\0",  # SYN, bad len
])
def test_tcp_malformed(seg: bytes) -> None:
    with pytest.raises(Malformed):
        tcp.parse_tcp(seg)


def test_tcp_in_place_writers_match_builders() -> None:
    payload = b"\x42" * 1000
    opts = tcp.build_tcp_options(mss=65480, wscale=8)
    for v6 in (False, True):
        start = (tcp.TCP6_PAYLOAD_OFFSET if v6 else tcp.TCP4_PAYLOAD_OFFSET) + len(opts)
        buf = bytearray(4096)
        buf[start:start + len(payload)] = payload
        if v6:
            n = tcp.write_eth_ipv6_tcp_headers(memoryview(buf), MAC_A, MAC_B, B6, A6, 80, 5000,
                                               1, 2, tcp.ACK | tcp.PSH, 512, len(payload), opts)
            expect = eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IPV6, ip.build_ipv6(
                B6, A6, 6, tcp.build_tcp6(B6, A6, 80, 5000, 1, 2, tcp.ACK | tcp.PSH, 512,
                                          payload, opts)))
        else:
            n = tcp.write_eth_ipv4_tcp_headers(memoryview(buf), MAC_A, MAC_B, B4, A4, 80, 5000,
                                               1, 2, tcp.ACK | tcp.PSH, 512, len(payload), opts)
            expect = eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IP, ip.build_ipv4(
                B4, A4, 6, tcp.build_tcp4(B4, A4, 80, 5000, 1, 2, tcp.ACK | tcp.PSH, 512,
                                          payload, opts)))
        assert bytes(buf[:n]) == expect


def test_tcp_bad_options_length_rejected_by_builder() -> None:
    with pytest.raises(ValueError):
        tcp.build_tcp4(A4, B4, 1, 2, 0, 0, tcp.SYN, 0, b"", b"\x01")


# --- ICMP ----------------------------------------------------------------------------------

def test_icmp_echo_round_trip() -> None:
    msg = icmp.build_icmp_echo(icmp.ICMP_ECHO, 0x1234, 7, b"ping")
    m = icmp.parse_icmp(msg)
    assert (m.type, m.code, m.ident, m.seq, bytes(m.data)) == (8, 0, 0x1234, 7, b"ping")
    assert checksum.checksum(msg) == 0
    assert bytes(m.body) == msg[4:]


def test_icmpv6_round_trip() -> None:
    msg = icmp.build_icmpv6_echo(A6, B6, icmp.ICMPV6_ECHO_REPLY, 9, 10, b"pong")
    m = icmp.parse_icmp(msg)
    assert (m.type, m.ident, m.seq, bytes(m.data)) == (129, 9, 10, b"pong")
    assert checksum.l4_ipv6(A6, B6, ip.IPPROTO_ICMPV6, msg) == 0
    ns = icmp.build_icmpv6(B6, A6, icmp.ND_NEIGHBOR_SOLICIT, 0, b"\0" * 4 + A6.packed)
    assert icmp.parse_icmp(ns).type == 135 and len(icmp.parse_icmp(ns).data) == 16


def test_icmp_short() -> None:
    for n in range(8):
        with pytest.raises(Malformed):
            icmp.parse_icmp(b"\x08" * n)


def test_icmp_in_place_rewrites_id_and_checksum() -> None:
    # as from a ping socket: header + data, with the kernel's identifier
    msg = icmp.build_icmp_echo(icmp.ICMP_ECHOREPLY, 0x9999, 3, b"abc")
    buf = bytearray(256)
    buf[ip.ETH_IP4_HLEN:ip.ETH_IP4_HLEN + len(msg)] = msg
    n = icmp.write_eth_ipv4_icmp_headers(memoryview(buf), MAC_A, MAC_B, B4, A4, len(msg),
                                         ident=0x1234)
    expect = eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IP, ip.build_ipv4(
        B4, A4, 1, icmp.build_icmp_echo(icmp.ICMP_ECHOREPLY, 0x1234, 3, b"abc")))
    assert bytes(buf[:n]) == expect

    msg6 = icmp.build_icmpv6_echo(B6, A6, icmp.ICMPV6_ECHO_REPLY, 0x9999, 3, b"abc")
    buf[ip.ETH_IP6_HLEN:ip.ETH_IP6_HLEN + len(msg6)] = msg6
    n = icmp.write_eth_ipv6_icmp_headers(memoryview(buf), MAC_A, MAC_B, B6, A6, len(msg6),
                                         ident=0x1234)
    expect = eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IPV6, ip.build_ipv6(
        B6, A6, 58, icmp.build_icmpv6_echo(B6, A6, icmp.ICMPV6_ECHO_REPLY, 0x1234, 3, b"abc")))
    assert bytes(buf[:n]) == expect


# --- cross-check with an independent decoder (scapy) ---------------------------------------

def test_scapy_agrees_on_our_frames() -> None:
    scapy_all = pytest.importorskip("scapy.all")
    frames = [
        eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IP, ip.build_ipv4(
            A4, B4, 17, udp.build_udp4(A4, B4, 5353, 53, b"query"))),
        eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IPV6, ip.build_ipv6(
            A6, B6, 17, udp.build_udp6(A6, B6, 5353, 53, b"query"))),
        eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IP, ip.build_ipv4(A4, B4, 6, tcp.build_tcp4(
            A4, B4, 1000, 80, 5, 6, tcp.SYN | tcp.ACK, 1000, b"",
            tcp.build_tcp_options(mss=1460, wscale=3, sack_ok=True)))),
        eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IPV6, ip.build_ipv6(A6, B6, 6, tcp.build_tcp6(
            A6, B6, 1000, 80, 5, 6, tcp.ACK, 1000, b"data"))),
        eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IP, ip.build_ipv4(
            A4, B4, 1, icmp.build_icmp_echo(icmp.ICMP_ECHO, 1, 2, b"x" * 33))),
        eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IPV6, ip.build_ipv6(
            A6, B6, 58, icmp.build_icmpv6_echo(A6, B6, icmp.ICMPV6_ECHO_REQUEST, 1, 2, b"x"))),
    ]
    for frame in frames:
        # scapy recomputes every checksum it is asked to: ours must equal its
        pkt = scapy_all.Ether(frame)
        deleted = 0
        for lyr in (pkt.payload, pkt.payload.payload):
            for field in ("chksum", "cksum"):
                if field in lyr.fields:
                    del lyr.fields[field]
                    deleted += 1
        assert deleted >= 1
        assert bytes(pkt) == frame, pkt.summary()
    syn = scapy_all.Ether(frames[2])["TCP"]
    assert dict(syn.options)["MSS"] == 1460 and dict(syn.options)["WScale"] == 3


# --- fuzzing: nothing but Malformed ---------------------------------------------------------

PARSERS = [eth.parse_eth, arp.parse_arp, ip.parse_ipv4, ip.parse_ipv6, udp.parse_udp,
           tcp.parse_tcp, tcp.parse_tcp_options, icmp.parse_icmp]


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_garbage_only_malformed(data: bytes) -> None:
    for parser in PARSERS:
        try:
            parser(data)
            parser(memoryview(data))
        except Malformed:
            pass


def _valid_frames() -> list[bytes]:
    out = []
    for proto, seg4, seg6 in (
        (17, udp.build_udp4(A4, B4, 1, 2, b"u" * 20), udp.build_udp6(A6, B6, 1, 2, b"u" * 20)),
        (6, tcp.build_tcp4(A4, B4, 1, 2, 3, 4, tcp.SYN, 5, b"t",
                           tcp.build_tcp_options(mss=1, wscale=2, sack_ok=True)),
         tcp.build_tcp6(A6, B6, 1, 2, 3, 4, tcp.SYN, 5, b"t", tcp.build_tcp_options(mss=1))),
    ):
        out.append(eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IP, ip.build_ipv4(A4, B4, proto, seg4)))
        out.append(eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IPV6,
                                 ip.build_ipv6(A6, B6, ip.IPPROTO_HOPOPTS,
                                               _ext(proto, 1) + seg6)))
    out.append(eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IP,
                             ip.build_ipv4(A4, B4, 1, icmp.build_icmp_echo(8, 1, 1, b"p"))))
    out.append(eth.build_eth(MAC_A, MAC_B, eth.ETH_P_IPV6, ip.build_ipv6(
        A6, B6, 58, icmp.build_icmpv6_echo(A6, B6, 128, 1, 1, b"p"))))
    out.append(eth.build_eth(MAC_A, MAC_B, eth.ETH_P_ARP,
                             arp.build_arp(1, MAC_A, A4, b"\0" * 6, B4)))
    return out


VALID = _valid_frames()


def test_valid_frames_parse() -> None:
    for frame in VALID:
        parse_all(frame)


def test_every_truncation_only_malformed() -> None:
    for frame in VALID:
        for n in range(len(frame)):
            try:
                parse_all(frame[:n])
            except Malformed:
                pass


@settings(max_examples=1000)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(min_value=0, max_value=200),
                                                  st.integers(min_value=0, max_value=255)),
                                        min_size=1, max_size=6),
       st.integers(min_value=0, max_value=400))
def test_mutations_only_malformed(frame: bytes, edits: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(frame)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    try:
        parse_all(memoryview(buf)[:cut])
    except Malformed:
        pass
