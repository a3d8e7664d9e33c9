"""services.arp: which requests get an answer, and what the answer looks like."""

from __future__ import annotations

import struct
from ipaddress import IPv4Address

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostpasst.services import arp as arp_service
from vhostpasst.wire import arp, eth

OUR_MAC = bytes.fromhex("9a559a559a55")
GUEST_MAC = bytes.fromhex("525400123456")
GUEST = IPv4Address("10.0.2.15")
GW = IPv4Address("10.0.2.2")
OTHER = IPv4Address("93.184.216.34")
ZERO = IPv4Address("0.0.0.0")


def request(spa: IPv4Address, tpa: IPv4Address, *, op: int = arp.ARPOP_REQUEST,
            htype: int = 1, ptype: int = 0x0800, hlen: int = 6, plen: int = 4,
            ethertype: int = eth.ETH_P_ARP, sha: bytes = GUEST_MAC,
            eth_src: bytes = GUEST_MAC) -> bytes:
    body = struct.pack("!HHBBH", htype, ptype, hlen, plen, op)
    body += sha[:hlen].ljust(hlen, b"\0") + spa.packed[:plen].ljust(plen, b"\0")
    body += b"\0" * hlen + tpa.packed[:plen].ljust(plen, b"\0")
    return eth.build_eth(eth.BROADCAST_MAC, eth_src, ethertype, body)


CASES = [
    # (description, frame, guest_addr, answered)
    ("gateway", request(GUEST, GW), GUEST, True),
    ("any other address", request(GUEST, OTHER), GUEST, True),
    ("guest's own address", request(GW, GUEST), GUEST, False),
    ("announcement", request(GUEST, GUEST), GUEST, False),
    ("announcement of another address", request(OTHER, OTHER), GUEST, False),
    ("probe (DAD) for another address", request(ZERO, OTHER), GUEST, True),
    ("probe for the guest's own address", request(ZERO, GUEST), GUEST, False),
    ("probe with no guest address known", request(ZERO, GUEST), None, True),
    ("request with no guest address known", request(GUEST, GW), None, True),
    ("reply, not request", request(GUEST, GW, op=arp.ARPOP_REPLY), GUEST, False),
    ("RARP opcode", request(GUEST, GW, op=3), GUEST, False),
    ("not Ethernet hardware", request(GUEST, GW, htype=6), GUEST, False),
    ("not IPv4 protocol", request(GUEST, GW, ptype=0x86DD), GUEST, False),
    ("hlen 8", request(GUEST, GW, hlen=8), GUEST, False),
    ("plen 16", request(GUEST, GW, plen=16), GUEST, False),
    ("not an ARP frame", request(GUEST, GW, ethertype=eth.ETH_P_IP), GUEST, False),
    ("truncated", request(GUEST, GW)[:40], GUEST, False),
    ("empty", b"", GUEST, False),
    ("padded to 60 bytes", request(GUEST, GW) + b"\0" * 18, GUEST, True),
]


@pytest.mark.parametrize(("frame", "guest", "answered"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_which_requests_are_answered(frame: bytes, guest: IPv4Address | None,
                                     answered: bool) -> None:
    out = arp_service.reply(memoryview(frame), OUR_MAC, guest)
    assert (out is not None) == answered


@pytest.mark.parametrize("spa", [GUEST, ZERO])
def test_reply_contents(spa: IPv4Address) -> None:
    sha = bytes.fromhex("020000000001")  # differs from the Ethernet source on purpose
    out = arp_service.reply(request(spa, OTHER, sha=sha), OUR_MAC, GUEST)
    assert out is not None and len(out) == 42
    e = eth.parse_eth(out)
    assert (e.dst, e.src, e.ethertype) == (sha, OUR_MAC, eth.ETH_P_ARP)  # to the requester
    a = arp.parse_arp(e.payload)
    assert a.is_eth_ipv4 and a.op == arp.ARPOP_REPLY
    assert (a.sha, a.spa) == (OUR_MAC, OTHER.packed)  # "OTHER is at our MAC"
    assert (a.tha, a.tpa) == (sha, spa.packed)


def test_scapy_reads_the_reply() -> None:
    scapy_all = pytest.importorskip("scapy.all")
    out = arp_service.reply(request(GUEST, GW), OUR_MAC, GUEST)
    assert out is not None
    pkt = scapy_all.Ether(out)
    a = pkt[scapy_all.ARP]
    assert a.op == 2 and a.hwsrc == "9a:55:9a:55:9a:55" and a.psrc == str(GW)
    assert a.hwdst == "52:54:00:12:34:56" and a.pdst == str(GUEST)
    assert pkt.dst == "52:54:00:12:34:56"


@settings(max_examples=500)
@given(st.binary(max_size=100), st.sampled_from([GUEST, None]))
def test_garbage_never_raises(data: bytes, guest: IPv4Address | None) -> None:
    arp_service.reply(memoryview(data), OUR_MAC, guest)


@settings(max_examples=500)
@given(st.binary(min_size=28, max_size=28), st.binary(max_size=20))
def test_any_arp_body_never_raises(body: bytes, tail: bytes) -> None:
    frame = eth.build_eth(eth.BROADCAST_MAC, GUEST_MAC, eth.ETH_P_ARP, body + tail)
    arp_service.reply(frame, OUR_MAC, GUEST)
