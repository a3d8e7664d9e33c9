"""DHCPv4 server (RFC 2131/2132), sans-IO: one client, one address, no leases to track.

`DhcpServer.handle()` takes a whole Ethernet frame the guest sent to UDP port 67 and returns
the whole Ethernet frame answering it, or None. Like passt we offer `config.ip4.addr` to
whoever asks, for an infinite lease; DISCOVER gets an OFFER (or, with Rapid Commit, RFC 4039,
an ACK), REQUEST and plain BOOTP get an ACK, everything else (RELEASE, DECLINE, INFORM) is
ignored; there is no NAK.

Guest input never makes `handle()` raise: a dropped request leaves its reason in
`last_error` and a debug log line, and the caller decides how loudly to complain.
"""

from __future__ import annotations

import logging
import struct
from ipaddress import IPv4Address, IPv4Network

from vhostpasst.config.conf import Config
from vhostpasst.services.common import INFINITE, Ignored, guarded
from vhostpasst.services.dnsname import compressed_search_list, dns_name
from vhostpasst.wire.errors import Buffer, Malformed, as_view
from vhostpasst.wire.eth import ETH_P_IP, parse_eth
from vhostpasst.wire.ip import BROADCAST4, IPPROTO_UDP, parse_ipv4
from vhostpasst.wire.udp import UDP4_PAYLOAD_OFFSET, parse_udp, write_eth_ipv4_udp_headers

log = logging.getLogger(__name__)

SERVER_PORT = 67
CLIENT_PORT = 68

BOOTREQUEST = 1
BOOTREPLY = 2
MAGIC_COOKIE = 0x63825363
FLAG_BROADCAST = 0x8000

# Message types (option 53)
DHCPDISCOVER = 1
DHCPOFFER = 2
DHCPREQUEST = 3
DHCPDECLINE = 4
DHCPACK = 5
DHCPNAK = 6
DHCPRELEASE = 7
DHCPINFORM = 8

# Options
OPT_PAD = 0
OPT_NETMASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_MTU = 26
OPT_LEASE = 51
OPT_OVERLOAD = 52
OPT_MSG_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_LIST = 55
OPT_RAPID_COMMIT = 80
OPT_FQDN = 81
OPT_SEARCH = 119
OPT_CLASSLESS_ROUTES = 121
OPT_END = 255

# RFC 4702 §2.1 flags
FQDN_S = 0x01  # server updates the A RR
FQDN_O = 0x02  # server overrode the client's S
FQDN_E = 0x04  # canonical wire format name (else deprecated ASCII)
FQDN_N = 0x08  # server does no DNS updates

BOOTP_MIN_LEN = 300  # RFC 951: the vendor area is at least 64 bytes; old clients insist

_BOOTP = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
_OPTS_OFFSET = _BOOTP.size  # 240
_ZERO4 = bytes(4)

# Options we add after those the client asked for, in this order
_DEFAULT_ORDER = (OPT_NETMASK, OPT_ROUTER, OPT_LEASE, OPT_SERVER_ID, OPT_MTU, OPT_DNS,
                  OPT_SEARCH, OPT_CLASSLESS_ROUTES, OPT_HOSTNAME, OPT_FQDN, OPT_RAPID_COMMIT)


class DhcpServer:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.last_error: str | None = None  # why the last handle() returned None
        # Config is frozen: every option but the per-request ones is computed once.
        self._static: dict[int, bytes] = {}
        self._server: IPv4Address | None = None
        ip4 = config.ip4
        if ip4 is None or ip4.addr is None:
            return
        self._server = ip4.our_tap_addr or ip4.gateway
        self._static = _static_options(config)

    def handle(self, frame: Buffer) -> bytes | None:
        """The reply frame for the DHCP request in `frame`, or None (see `last_error`)."""
        reply, self.last_error = guarded("DHCP", lambda: self._handle(as_view(frame)), None)
        return reply

    def _handle(self, frame: memoryview) -> bytes:
        ip4 = self.config.ip4
        if self.config.no_dhcp or ip4 is None or ip4.addr is None:
            raise Ignored("DHCP disabled or no IPv4 address to give")
        if self._server is None:
            raise Ignored("no server address (neither our_tap_addr nor gateway)")
        eth = parse_eth(frame)
        if eth.ethertype != ETH_P_IP:
            raise Ignored("not IPv4")
        packet = parse_ipv4(eth.payload)
        if packet.is_fragment:
            raise Ignored("fragmented request")
        if packet.proto != IPPROTO_UDP:
            raise Ignored("not UDP")
        datagram = parse_udp(packet.payload)
        if datagram.dport != SERVER_PORT:
            raise Ignored(f"UDP port {datagram.dport}, not {SERVER_PORT}")
        msg = datagram.payload
        if len(msg) < _OPTS_OFFSET:
            raise Malformed(f"BOOTP message of {len(msg)} bytes, need {_OPTS_OFFSET}")
        (op, htype, hlen, _hops, xid, _secs, flags, ciaddr, _yiaddr, _siaddr, giaddr, chaddr,
         _sname, _file, cookie) = _BOOTP.unpack_from(msg)
        if op != BOOTREQUEST:
            raise Ignored(f"BOOTP op {op} is not BOOTREQUEST")
        if cookie != MAGIC_COOKIE:
            raise Ignored(f"bad magic cookie 0x{cookie:08x}")
        opts = parse_options(msg[_OPTS_OFFSET:])
        if OPT_OVERLOAD in opts:  # options in sname/file: we never need them, don't guess
            raise Ignored("option overload (52) not supported")

        mtype = opts.get(OPT_MSG_TYPE)
        rapid = False
        if mtype is None:
            reply_type = DHCPACK  # plain BOOTP
        else:
            if len(mtype) != 1:
                raise Malformed(f"option 53 of length {len(mtype)}")
            if mtype[0] == DHCPDISCOVER:
                rapid = OPT_RAPID_COMMIT in opts
                reply_type = DHCPACK if rapid else DHCPOFFER
            elif mtype[0] == DHCPREQUEST:
                reply_type = DHCPACK
            else:
                raise Ignored(f"message type {mtype[0]} ignored")

        options = dict(self._static)
        if rapid:
            options[OPT_RAPID_COMMIT] = b""
        if OPT_FQDN in options and OPT_FQDN in opts:
            options[OPT_FQDN] = _fqdn_reply(self.config.fqdn or "", opts[OPT_FQDN])
        body = _encode_options(reply_type, options, opts.get(OPT_PARAM_LIST, b""))

        reply = bytearray(UDP4_PAYLOAD_OFFSET + max(_OPTS_OFFSET + len(body), BOOTP_MIN_LEN))
        # RFC 2131 table 3: ciaddr only echoed in an ACK; giaddr and flags always echoed
        _BOOTP.pack_into(reply, UDP4_PAYLOAD_OFFSET, BOOTREPLY, htype, hlen, 0, xid, 0, flags,
                         ciaddr if reply_type == DHCPACK else _ZERO4, ip4.addr.packed, _ZERO4,
                         giaddr, chaddr, b"", b"", MAGIC_COOKIE)
        start = UDP4_PAYLOAD_OFFSET + _OPTS_OFFSET
        reply[start:start + len(body)] = body  # what follows stays zero: pad options

        # RFC 2131 §4.1: broadcast if asked to; a client with an address (renewing) gets
        # unicast there. One without (ciaddr 0) also gets a broadcast rather than unicast to
        # yiaddr: clients on plain UDP sockets could not receive that, raw-socket ones
        # (dhclient, udhcpc, systemd-networkd) take either.
        if flags & FLAG_BROADCAST or ciaddr == _ZERO4:
            dst = BROADCAST4
        else:
            dst = IPv4Address(ciaddr)
        dst_mac = chaddr[:6] if htype == 1 and hlen == 6 else eth.src
        length = write_eth_ipv4_udp_headers(
            memoryview(reply), dst_mac, self.config.our_mac, self._server, dst, SERVER_PORT,
            CLIENT_PORT, len(reply) - UDP4_PAYLOAD_OFFSET)
        return bytes(reply[:length])


def parse_options(buf: Buffer) -> dict[int, bytes]:
    """Decode an options area: {code: value}; repeated options are concatenated
    (RFC 3396). A truncated option is Malformed; a missing END is tolerated."""
    view = as_view(buf)
    opts: dict[int, bytes] = {}
    i, n = 0, len(view)
    while i < n:
        code = view[i]
        if code == OPT_END:
            break
        if code == OPT_PAD:
            i += 1
            continue
        if i + 2 > n:
            raise Malformed(f"option {code} truncated (no length)")
        olen = view[i + 1]
        if i + 2 + olen > n:
            raise Malformed(f"option {code} of length {olen} truncated")
        value = bytes(view[i + 2:i + 2 + olen])
        opts[code] = opts[code] + value if code in opts else value
        i += 2 + olen
    return opts


def _encode_options(reply_type: int, options: dict[int, bytes], requested: bytes) -> bytes:
    """53 first unless the client put it in its list (55), then the client's order, then ours;
    values longer than 255 bytes are split into consecutive instances (RFC 3396)."""
    options = {OPT_MSG_TYPE: bytes((reply_type,)), **options}
    order: list[int] = [] if OPT_MSG_TYPE in requested else [OPT_MSG_TYPE]
    order += [c for c in requested if c in options]
    order += [c for c in (OPT_MSG_TYPE, *_DEFAULT_ORDER) if c in options]
    out = bytearray()
    done: set[int] = set()
    for code in order:
        if code in done:
            continue
        done.add(code)
        value = options[code]
        if not value:
            out += bytes((code, 0))
        for i in range(0, len(value), 255):
            chunk = value[i:i + 255]
            out += bytes((code, len(chunk))) + chunk
    out.append(OPT_END)
    return bytes(out)


def _static_options(config: Config) -> dict[int, bytes]:
    ip4 = config.ip4
    assert ip4 is not None and ip4.addr is not None
    opts: dict[int, bytes] = {}
    prefix = min(max(ip4.prefix_len, 0), 32)
    opts[OPT_NETMASK] = struct.pack("!I", (0xFFFFFFFF << (32 - prefix)) & 0xFFFFFFFF)
    if ip4.gateway is not None:
        opts[OPT_ROUTER] = ip4.gateway.packed
    opts[OPT_LEASE] = struct.pack("!I", INFINITE)
    server = ip4.our_tap_addr or ip4.gateway
    if server is not None:
        opts[OPT_SERVER_ID] = server.packed
    if config.mtu:
        opts[OPT_MTU] = struct.pack("!H", min(config.mtu, 0xFFFF))
    if ip4.dns and not config.no_dhcp_dns:
        opts[OPT_DNS] = b"".join(a.packed for a in ip4.dns)
    if config.search and not config.no_dhcp_search:
        search = compressed_search_list(config.search)
        if search:
            opts[OPT_SEARCH] = search
    gw = ip4.gateway
    if gw is not None and gw not in IPv4Network(f"{ip4.addr}/{prefix}", strict=False):
        # RFC 3442: the gateway is off-link, so first make it on-link (a /32 via 0.0.0.0),
        # then route everything through it. Option 3 stays for clients without 121.
        opts[OPT_CLASSLESS_ROUTES] = (_route(32, gw, IPv4Address(0))
                                      + _route(0, IPv4Address(0), gw))
    if config.hostname:
        # "replace": a name from argv may hold lone surrogates; never fail on it
        opts[OPT_HOSTNAME] = config.hostname.encode("utf-8", "replace")[:255]
    if config.fqdn:
        name = dns_name(config.fqdn)
        if name is not None:
            opts[OPT_FQDN] = bytes((FQDN_N | FQDN_E, 255, 255)) + name
    return opts


def _route(width: int, dest: IPv4Address, router: IPv4Address) -> bytes:
    """One RFC 3442 descriptor: width, the significant octets of dest, the router."""
    return bytes((width,)) + dest.packed[:(width + 7) // 8] + router.packed


def _fqdn_reply(fqdn: str, client: bytes) -> bytes:
    """Option 81 for a client that sent one (RFC 4702 §4): answer in its encoding, and say
    we override its S bit (we never update DNS)."""
    cflags = client[0] if client else FQDN_E
    flags = FQDN_N | (FQDN_O if cflags & FQDN_S else 0)
    if cflags & FQDN_E:
        name = dns_name(fqdn) or b""
        return bytes((flags | FQDN_E, 255, 255)) + name
    return bytes((flags, 255, 255)) + fqdn.encode("ascii", "ignore")
