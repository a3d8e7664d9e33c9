"""services.dhcp: message handling, every option rule, addressing, drops, fuzzing, and a
cross-check of our replies with scapy's BOOTP/DHCP decoder."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vhostpasst.config.conf import Config, Ip4Conf
from vhostpasst.services import dhcp
from vhostpasst.services.dhcp import DhcpServer
from vhostpasst.wire import checksum, eth, ip, udp

OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST_MAC = bytes.fromhex("525400123456")
GUEST = IPv4Address("192.168.10.15")
GW = IPv4Address("192.168.10.1")
TAP = IPv4Address("192.168.10.2")
DNS1, DNS2 = IPv4Address("192.168.10.53"), IPv4Address("9.9.9.9")
ZERO = IPv4Address(0)
BCAST = IPv4Address("255.255.255.255")
XID = 0xCAFEF00D
MAGIC = 0x63825363
BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")

BASE_IP4: dict[str, Any] = dict(addr=GUEST, prefix_len=24, gateway=GW, our_tap_addr=TAP,
                                dns=(DNS1, DNS2))


def cfg(ip4: dict[str, Any] | None = None, **kw: Any) -> Config:
    kw.setdefault("mtu", 1500)
    kw.setdefault("our_mac", OUR_MAC)
    return Config(ip4=Ip4Conf(**{**BASE_IP4, **(ip4 or {})}), **kw)


def opt(code: int, value: bytes | int | list[int] = b"") -> bytes:
    if isinstance(value, int):
        value = bytes((value,))
    elif isinstance(value, list):
        value = bytes(value)
    return bytes((code, len(value))) + value


def request(*options: bytes, mtype: int | None = dhcp.DHCPDISCOVER, op: int = 1,
            flags: int = 0, ciaddr: IPv4Address = ZERO, giaddr: IPv4Address = ZERO,
            cookie: int = MAGIC, end: bytes = b"\xff", dport: int = 67, htype: int = 1,
            hlen: int = 6, raw_options: bytes | None = None, src: IPv4Address = ZERO,
            dst: IPv4Address = BCAST) -> bytes:
    msg = BOOTP.pack(op, htype, hlen, 0, XID, 17, flags, ciaddr.packed, ZERO.packed,
                     ZERO.packed, giaddr.packed, GUEST_MAC, b"", b"", cookie)
    if raw_options is not None:
        msg += raw_options
    else:
        msg += (opt(53, mtype) if mtype is not None else b"") + b"".join(options) + end
    return eth.build_eth(eth.BROADCAST_MAC, GUEST_MAC, eth.ETH_P_IP, ip.build_ipv4(
        src, dst, ip.IPPROTO_UDP, udp.build_udp4(src, dst, 68, dport, msg)))


# --- an independent decoder for our replies (struct only: no vhostpasst parsers) ----------

@dataclass
class Reply:
    eth_dst: bytes
    eth_src: bytes
    ip_src: IPv4Address
    ip_dst: IPv4Address
    sport: int
    dport: int
    fields: dict[str, Any]
    bootp_len: int
    options: list[tuple[int, bytes]] = field(default_factory=list)  # in order, not merged

    def get(self, code: int) -> bytes | None:
        values = [v for c, v in self.options if c == code]
        return b"".join(values) if values else None

    @property
    def codes(self) -> list[int]:
        return [c for c, _ in self.options]


def decode(frame: bytes) -> Reply:
    dst, src, ethertype = struct.unpack_from("!6s6sH", frame)
    assert ethertype == 0x0800
    iph = frame[14:34]
    vihl, _tos, tot_len, ident, frag, ttl, proto, _c, s, d = struct.unpack(
        "!BBHHHBBH4s4s", iph)
    assert (vihl, ident, frag, ttl, proto) == (0x45, 0, 0, 255, 17)
    assert tot_len == len(frame) - 14
    assert checksum.checksum(iph) == 0
    sport, dport, ulen, ucsum = struct.unpack_from("!HHHH", frame, 34)
    assert ulen == tot_len - 20
    pseudo = s + d + struct.pack("!BBH", 0, 17, ulen)
    assert ucsum != 0 and checksum.checksum(pseudo + frame[34:]) == 0
    msg = frame[42:]
    (op, htype, hlen, hops, xid, secs, flags, ciaddr, yiaddr, siaddr, giaddr, chaddr, sname,
     file_, cookie) = BOOTP.unpack_from(msg)
    assert cookie == MAGIC
    options: list[tuple[int, bytes]] = []
    i = 240
    while True:
        code = msg[i]
        if code == 255:
            break
        assert code != 0, "no pad before the end option"
        n = msg[i + 1]
        options.append((code, msg[i + 2:i + 2 + n]))
        i += 2 + n
    assert set(msg[i + 1:]) <= {0}, "only zero padding after the end option"
    return Reply(dst, src, IPv4Address(s), IPv4Address(d), sport, dport, dict(
        op=op, htype=htype, hlen=hlen, hops=hops, xid=xid, secs=secs, flags=flags,
        ciaddr=IPv4Address(ciaddr), yiaddr=IPv4Address(yiaddr), siaddr=IPv4Address(siaddr),
        giaddr=IPv4Address(giaddr), chaddr=chaddr, sname=sname, file=file_),
        len(msg), options)


def decode_names(data: bytes) -> list[str]:
    """RFC 1035 §4.1.4 names, following (backward-only) compression pointers."""
    names, i = [], 0
    while i < len(data):
        labels: list[str] = []
        j, end = i, None
        while True:
            n = data[j]
            if n & 0xC0 == 0xC0:
                ptr = (n & 0x3F) << 8 | data[j + 1]
                assert ptr < j
                end = j + 2 if end is None else end
                j = ptr
                continue
            if n == 0:
                end = j + 1 if end is None else end
                break
            labels.append(data[j + 1:j + 1 + n].decode())
            j += 1 + n
        names.append(".".join(labels))
        i = end
    return names


def serve(config: Config, frame: bytes) -> Reply:
    server = DhcpServer(config)
    out = server.handle(memoryview(frame))
    assert out is not None, server.last_error
    assert server.last_error is None
    return decode(out)


# --- message types --------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "mtype", "expect"), [
    ((), dhcp.DHCPDISCOVER, dhcp.DHCPOFFER),
    ((opt(80),), dhcp.DHCPDISCOVER, dhcp.DHCPACK),  # rapid commit
    ((), dhcp.DHCPREQUEST, dhcp.DHCPACK),
    ((opt(80),), dhcp.DHCPREQUEST, dhcp.DHCPACK),
    ((), None, dhcp.DHCPACK),  # plain BOOTP
    ((), dhcp.DHCPDECLINE, None),
    ((), dhcp.DHCPRELEASE, None),
    ((), dhcp.DHCPINFORM, None),
    ((), dhcp.DHCPOFFER, None),
    ((), dhcp.DHCPACK, None),
    ((), dhcp.DHCPNAK, None),
    ((), 200, None),
])
def test_message_types(options: tuple[bytes, ...], mtype: int | None,
                       expect: int | None) -> None:
    server = DhcpServer(cfg())
    out = server.handle(request(*options, mtype=mtype))
    if expect is None:
        assert out is None and server.last_error
        return
    assert out is not None
    r = decode(out)
    assert r.get(53) == bytes((expect,))
    rapid = mtype == dhcp.DHCPDISCOVER and options == (opt(80),)
    assert (r.get(80) == b"") == rapid


def test_fixed_fields() -> None:
    r = serve(cfg(), request(giaddr=IPv4Address("10.9.9.9"), flags=0x8000))
    f = r.fields
    assert (f["op"], f["htype"], f["hlen"], f["hops"], f["xid"], f["secs"]) == \
        (2, 1, 6, 0, XID, 0)
    assert f["yiaddr"] == GUEST and f["siaddr"] == ZERO and f["ciaddr"] == ZERO
    assert f["giaddr"] == IPv4Address("10.9.9.9") and f["flags"] == 0x8000
    assert f["chaddr"] == GUEST_MAC + bytes(10)
    assert f["sname"] == bytes(64) and f["file"] == bytes(128)


def test_ciaddr_echoed_in_ack_only() -> None:
    ci = IPv4Address("192.168.10.99")
    assert serve(cfg(), request(mtype=3, ciaddr=ci)).fields["ciaddr"] == ci
    assert serve(cfg(), request(mtype=1, ciaddr=ci)).fields["ciaddr"] == ZERO


# --- options ---------------------------------------------------------------------------------

def test_standard_options() -> None:
    r = serve(cfg(), request())
    assert r.get(1) == IPv4Address("255.255.255.0").packed
    assert r.get(3) == GW.packed
    assert r.get(51) == b"\xff\xff\xff\xff"
    assert r.get(54) == TAP.packed
    assert r.get(26) == struct.pack("!H", 1500)
    assert r.get(6) == DNS1.packed + DNS2.packed
    for absent in (12, 81, 119, 121, 80):
        assert r.get(absent) is None


@pytest.mark.parametrize(("prefix", "mask"), [
    (0, "0.0.0.0"), (8, "255.0.0.0"), (16, "255.255.0.0"), (20, "255.255.240.0"),
    (24, "255.255.255.0"), (30, "255.255.255.252"), (32, "255.255.255.255"),
])
def test_netmask_from_prefix(prefix: int, mask: str) -> None:
    r = serve(cfg({"prefix_len": prefix, "gateway": GW}), request())
    assert r.get(1) == IPv4Address(mask).packed


def test_server_id_falls_back_to_gateway() -> None:
    r = serve(cfg({"our_tap_addr": None}), request())
    assert r.get(54) == GW.packed and r.ip_src == GW


def test_no_server_address_at_all() -> None:
    server = DhcpServer(cfg({"our_tap_addr": None, "gateway": None}))
    assert server.handle(request()) is None and server.last_error


def test_no_router_without_gateway() -> None:
    r = serve(cfg({"gateway": None}), request())
    assert r.get(3) is None and r.get(121) is None and r.get(54) == TAP.packed


@pytest.mark.parametrize(("mtu", "expect"), [(0, None), (1500, 1500), (65520, 65520),
                                             (68, 68)])
def test_mtu(mtu: int, expect: int | None) -> None:
    r = serve(cfg(mtu=mtu), request())
    assert r.get(26) == (None if expect is None else struct.pack("!H", expect))


@pytest.mark.parametrize(("kw", "ip4", "present"), [
    ({}, {}, True),
    ({"no_dhcp_dns": True}, {}, False),
    ({}, {"dns": ()}, False),
])
def test_dns(kw: dict[str, Any], ip4: dict[str, Any], present: bool) -> None:
    assert (serve(cfg(ip4, **kw), request()).get(6) is not None) == present


def test_search_list_compressed() -> None:
    r = serve(cfg(search=("example.com", "sub.example.com", "example.org", "a.sub.example.com")),
              request())
    data = r.get(119)
    assert data is not None
    assert decode_names(data) == ["example.com", "sub.example.com", "example.org",
                                  "a.sub.example.com"]
    # example.com in full (13), "sub" + pointer (6), example.org shares no suffix (13),
    # "a" + pointer to sub.example.com (4)
    assert len(data) == 13 + 6 + 13 + 4


@pytest.mark.parametrize(("kw"), [{"no_dhcp_search": True, "search": ("a.b",)}, {}])
def test_search_list_absent(kw: dict[str, Any]) -> None:
    assert serve(cfg(**kw), request()).get(119) is None


def test_search_list_invalid_names_skipped() -> None:
    r = serve(cfg(search=("x" * 64 + ".com", "ok.example", ".", "")), request())
    data = r.get(119)
    assert data is not None and decode_names(data) == ["ok.example"]
    assert serve(cfg(search=("x" * 64 + ".com",)), request()).get(119) is None


def test_long_search_list_split_across_instances() -> None:
    # distinct top-level domains defeat compression: well over 255 bytes
    domains = tuple(f"domain{i:02d}.tld{i:02d}" for i in range(30))
    r = serve(cfg(search=domains), request())
    instances = [v for c, v in r.options if c == 119]
    assert len(instances) >= 2 and all(len(v) <= 255 for v in instances)
    assert [len(v) for v in instances[:-1]] == [255] * (len(instances) - 1)
    # RFC 3396: consecutive instances; the client concatenates them before decoding
    idx = [i for i, c in enumerate(r.codes) if c == 119]
    assert idx == list(range(idx[0], idx[0] + len(idx)))
    assert decode_names(b"".join(instances)) == list(domains)


def test_hostname_and_fqdn() -> None:
    r = serve(cfg(hostname="guest", fqdn="guest.example.com"), request())
    assert r.get(12) == b"guest"
    fq = r.get(81)
    assert fq is not None
    flags, rc1, rc2 = fq[:3]
    assert flags & dhcp.FQDN_E and flags & dhcp.FQDN_N and not flags & dhcp.FQDN_S
    assert (rc1, rc2) == (255, 255)
    assert decode_names(fq[3:]) == ["guest.example.com"]


def test_fqdn_follows_the_clients_encoding() -> None:
    # client: S=1 (asks us to update), ASCII encoding (E=0)
    r = serve(cfg(fqdn="guest.example.com"),
              request(opt(81, b"\x01\x00\x00guest")))
    fq = r.get(81)
    assert fq is not None and fq[0] == dhcp.FQDN_N | dhcp.FQDN_O and fq[3:] == \
        b"guest.example.com"
    r = serve(cfg(fqdn="guest.example.com."), request(opt(81, b"\x05\x00\x00\x05guest\x00")))
    fq = r.get(81)
    assert fq is not None and fq[0] == dhcp.FQDN_N | dhcp.FQDN_O | dhcp.FQDN_E
    assert decode_names(fq[3:]) == ["guest.example.com"]


def test_no_hostname_options_unless_configured() -> None:
    r = serve(cfg(), request(opt(81, b"\x04\x00\x00\x00")))
    assert r.get(12) is None and r.get(81) is None


@pytest.mark.parametrize(("addr", "prefix", "gw", "routes"), [
    (GUEST, 24, GW, False),
    (GUEST, 24, IPv4Address("192.168.11.1"), True),
    (GUEST, 32, GW, True),  # a /32: every gateway is off-link
    (IPv4Address("10.0.0.5"), 8, IPv4Address("10.255.255.254"), False),
])
def test_classless_routes_when_gateway_off_link(addr: IPv4Address, prefix: int,
                                                gw: IPv4Address, routes: bool) -> None:
    r = serve(cfg({"addr": addr, "prefix_len": prefix, "gateway": gw}), request())
    assert r.get(3) == gw.packed  # option 3 is always there
    value = r.get(121)
    if not routes:
        assert value is None
        return
    # RFC 3442: gw/32 via 0.0.0.0 (on-link), then 0/0 via gw
    assert value == bytes((32,)) + gw.packed + bytes(4) + bytes((0,)) + gw.packed


# --- option order -------------------------------------------------------------------------------

DEFAULT_ORDER = [53, 1, 3, 51, 54, 26, 6, 119, 12, 81]


@pytest.mark.parametrize(("prl", "expect_head"), [
    (None, [53]),
    ([1, 3, 6], [53, 1, 3, 6]),
    ([6, 99, 3, 250], [53, 6, 3]),  # unknown codes skipped
    ([1, 53, 3], [1, 53, 3]),  # 53 where the client asked for it
    ([3, 3, 1], [53, 3, 1]),  # duplicates once
    ([119, 12, 54], [53, 119, 12, 54]),
])
def test_option_order(prl: list[int] | None, expect_head: list[int]) -> None:
    opts = (opt(55, prl),) if prl is not None else ()
    r = serve(cfg(search=("example.com",), hostname="h", fqdn="h.example.com"),
              request(*opts))
    assert r.codes[:len(expect_head)] == expect_head
    rest = [c for c in DEFAULT_ORDER if c not in expect_head]
    assert r.codes[len(expect_head):] == rest
    assert sorted(r.codes) == sorted(DEFAULT_ORDER)


def test_split_parameter_list_is_concatenated() -> None:
    r = serve(cfg(), request(opt(55, [6]), opt(55, [3, 1])))  # RFC 3396 concatenation
    assert r.codes[:4] == [53, 6, 3, 1]


def test_pads_and_missing_end_tolerated() -> None:
    r = serve(cfg(), request(b"\0\0", opt(55, [6]), b"\0", end=b""))
    assert r.codes[:2] == [53, 6]


# --- size, addressing ---------------------------------------------------------------------

def test_minimum_bootp_size() -> None:
    r = serve(cfg({"dns": ()}, mtu=0), request())
    assert r.bootp_len >= 300


@pytest.mark.parametrize(("flags", "ciaddr", "dst"), [
    (0x8000, ZERO, BCAST),
    (0, ZERO, BCAST),
    (0, IPv4Address("192.168.10.15"), IPv4Address("192.168.10.15")),
    (0x8000, IPv4Address("192.168.10.15"), BCAST),
])
def test_destination(flags: int, ciaddr: IPv4Address, dst: IPv4Address) -> None:
    r = serve(cfg(), request(mtype=3, flags=flags, ciaddr=ciaddr))
    assert r.ip_dst == dst and r.ip_src == TAP
    assert (r.sport, r.dport) == (67, 68)
    assert (r.eth_dst, r.eth_src) == (GUEST_MAC, OUR_MAC)


def test_non_ethernet_chaddr_answered_to_frame_source() -> None:
    r = serve(cfg(), request(htype=6, hlen=16))
    assert r.eth_dst == GUEST_MAC


# --- drops ------------------------------------------------------------------------------------

def _fragment() -> bytes:
    f = bytearray(request())
    struct.pack_into("!H", f, 20, 0x2000)  # MF
    return bytes(f)


DROPS = [
    ("BOOTREPLY", request(op=2)),
    ("bad cookie", request(cookie=0x63825364)),
    ("truncated option", request(raw_options=opt(53, 1)[:2] + b"\x06\x08\x01\x02")),
    ("option without length", request(raw_options=opt(53, 1) + b"\x06")),
    ("option 53 of length 2", request(raw_options=opt(53, [1, 1]) + b"\xff")),
    ("overload", request(opt(52, 3))),
    ("short message", request()[:42 + 239]),
    ("not port 67", request(dport=68)),
    ("ARP frame", eth.build_eth(eth.BROADCAST_MAC, GUEST_MAC, eth.ETH_P_ARP, b"\0" * 28)),
    ("TCP", eth.build_eth(eth.BROADCAST_MAC, GUEST_MAC, eth.ETH_P_IP,
                          ip.build_ipv4(ZERO, BCAST, 6, b"\0" * 300))),
    ("fragment", _fragment()),
    ("empty", b""),
]


@pytest.mark.parametrize("frame", [d[1] for d in DROPS], ids=[d[0] for d in DROPS])
def test_drops(frame: bytes) -> None:
    server = DhcpServer(cfg())
    assert server.handle(frame) is None
    assert server.last_error


@pytest.mark.parametrize("config", [
    Config(ip4=None), Config(ip4=Ip4Conf()), cfg(no_dhcp=True),
], ids=["no IPv4", "no address", "no_dhcp"])
def test_nothing_to_offer(config: Config) -> None:
    server = DhcpServer(config)
    assert server.handle(request()) is None and server.last_error


# --- cross-check with scapy -----------------------------------------------------------------

def test_scapy_decodes_our_reply() -> None:
    scapy_all = pytest.importorskip("scapy.all")
    config = cfg({"gateway": IPv4Address("192.168.11.1")}, hostname="guest",
                 search=("example.com", "sub.example.com"), fqdn="guest.example.com")
    out = DhcpServer(config).handle(request(opt(55, [1, 3, 6, 15, 119, 121]), mtype=3))
    assert out is not None
    pkt = scapy_all.Ether(out)
    b = pkt[scapy_all.BOOTP]
    assert b.op == 2 and b.xid == XID and b.yiaddr == str(GUEST)
    assert b.chaddr[:6] == GUEST_MAC
    opts = {o[0]: o[1:] for o in pkt[scapy_all.DHCP].options if isinstance(o, tuple)}
    assert opts["message-type"] == (5,)
    assert opts["subnet_mask"] == ("255.255.255.0",)
    assert opts["router"] == ("192.168.11.1",)
    assert opts["name_server"] == (str(DNS1), str(DNS2))
    assert opts["lease_time"] == (0xFFFFFFFF,)
    assert opts["server_id"] == (str(TAP),)
    assert opts["interface-mtu"] == (1500,)
    assert opts["hostname"] == (b"guest",)
    assert "end" in pkt[scapy_all.DHCP].options
    # scapy recomputes the IP and UDP checksums to the same values
    for layer in (pkt[scapy_all.IP], pkt[scapy_all.UDP]):
        del layer.fields["chksum"]
    del pkt[scapy_all.IP].fields["len"]
    del pkt[scapy_all.UDP].fields["len"]
    assert bytes(pkt) == out


def test_scapy_built_requests() -> None:
    scapy_all = pytest.importorskip("scapy.all")
    req = (scapy_all.Ether(src="52:54:00:12:34:56", dst="ff:ff:ff:ff:ff:ff")
           / scapy_all.IP(src="0.0.0.0", dst="255.255.255.255")
           / scapy_all.UDP(sport=68, dport=67)
           / scapy_all.BOOTP(chaddr=GUEST_MAC, xid=7, flags=0x8000)
           / scapy_all.DHCP(options=[("message-type", "discover"), ("rapid_commit", b""),
                                     ("param_req_list", [1, 3, 6]), "end"]))
    out = DhcpServer(cfg()).handle(bytes(req))
    assert out is not None
    r = decode(out)
    assert r.get(53) == bytes((dhcp.DHCPACK,)) and r.get(80) == b""
    assert r.fields["xid"] == 7 and r.ip_dst == BCAST


# --- fuzzing --------------------------------------------------------------------------------

FUZZ = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
SERVER = DhcpServer(cfg(search=("example.com",), hostname="h", fqdn="h.example.com"))
VALID = request(opt(55, [1, 3, 6]), opt(80))
ANY_CHAR = st.characters(exclude_categories=())  # lone surrogates too, as argv may hold


@FUZZ
@given(st.binary(max_size=600))
def test_garbage_frames_never_raise(data: bytes) -> None:
    SERVER.handle(memoryview(data))


@FUZZ
@given(st.binary(max_size=400))
def test_garbage_options_never_raise(options: bytes) -> None:
    out = SERVER.handle(request(raw_options=options))
    if out is not None:
        decode(out)


@FUZZ
@given(st.lists(st.tuples(st.integers(min_value=0, max_value=len(VALID) - 1),
                          st.integers(min_value=0, max_value=255)), min_size=1, max_size=8),
       st.integers(min_value=0, max_value=len(VALID)))
def test_mutated_requests_never_raise(edits: list[tuple[int, int]], cut: int) -> None:
    buf = bytearray(VALID)
    for pos, value in edits:
        buf[pos] = value
    SERVER.handle(memoryview(buf)[:cut])


@FUZZ
@given(st.text(ANY_CHAR, max_size=80), st.lists(st.text(ANY_CHAR, max_size=70), max_size=8),
       st.integers(min_value=0, max_value=32))
def test_odd_configs_never_raise(name: str, search: list[str], prefix: int) -> None:
    server = DhcpServer(cfg({"prefix_len": prefix}, hostname=name or None, fqdn=name or None,
                            search=tuple(search)))
    out = server.handle(VALID)
    assert out is not None, server.last_error
    decode(out)
