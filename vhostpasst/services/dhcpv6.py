"""DHCPv6 server (RFC 8415), sans-IO: one client, one address (the host's), no leases.

`Dhcpv6Server.handle()` takes a whole Ethernet frame the guest multicast to UDP port 547 and
returns the Ethernet frame answering it, or None. The address is always `config.ip6.addr`, in
an IA_NA with infinite lifetimes (the guest uses it as a /128; the /64 comes from the RA).

    SOLICIT                      -> ADVERTISE (preference 255), or REPLY with Rapid Commit
    REQUEST, RENEW               -> REPLY   (our Server ID required)
    REBIND                       -> REPLY   (no Server ID, or ours)
    CONFIRM                      -> REPLY   Success, or NotOnLink if an address is not ours
    INFORMATION-REQUEST          -> REPLY   DNS, search and FQDN only
    RELEASE, DECLINE             -> REPLY   Success (RFC 8415 §18.3.7/8; passt ignores them)
    anything else                -> nothing

Every reply carries our Server ID (a DUID-LL of our MAC: the same across restarts, so a guest
renewing after one still finds its server), the client's Client ID, DNS servers (23) and the
domain search list (24) unless disabled, and with --fqdn the Client FQDN (39, RFC 4704: flag
N, as we never update DNS, where passt leaves it clear; O too if the client asked for updates
with S). Replies go from our_tap_ll:547 to the client's source address:546, and to its MAC.
Guest input never makes `handle()` raise.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from ipaddress import IPv6Address

from vhostpasst.config.conf import Config
from vhostpasst.services.common import INFINITE, Ignored, guarded, whole_ipv6
from vhostpasst.services.dnsname import dns_name, search_list
from vhostpasst.wire.errors import Buffer, Malformed, as_view
from vhostpasst.wire.eth import ETH_P_IPV6, build_eth
from vhostpasst.wire.ip import IPPROTO_UDP, build_ipv6
from vhostpasst.wire.udp import build_udp6, parse_udp

log = logging.getLogger(__name__)

SERVER_PORT = 547
CLIENT_PORT = 546

# Message types (RFC 8415 §7.3)
SOLICIT = 1
ADVERTISE = 2
REQUEST = 3
CONFIRM = 4
RENEW = 5
REBIND = 6
REPLY = 7
RELEASE = 8
DECLINE = 9
INFORMATION_REQUEST = 11

# Options (RFC 8415 §21, RFC 3646)
OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IAADDR = 5
OPT_PREFERENCE = 7
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_DNS_SERVERS = 23
OPT_DOMAIN_LIST = 24
OPT_IA_PD = 25
OPT_CLIENT_FQDN = 39  # RFC 4704

# Client FQDN flags (RFC 4704 §4.1)
FQDN_S = 0x01  # the server should update the AAAA record
FQDN_O = 0x02  # the server overrides the client's S
FQDN_N = 0x04  # no update at all

# Status codes (RFC 8415 §21.13)
STATUS_SUCCESS = 0
STATUS_NO_ADDRS_AVAIL = 2
STATUS_NOT_ON_LINK = 4
STATUS_NO_PREFIX_AVAIL = 6

DUID_LL = 3
HW_ETHERNET = 1
MAX_PREFERENCE = 255  # RFC 8415 §18.2.1: the client requests at once, no waiting for others

_OPT = struct.Struct("!HH")
_IA = struct.Struct("!III")  # IAID, T1, T2
_IA_SERVER_SCOPE = 12  # IA_NA / IA_PD: options start after IAID, T1, T2
_IAADDR = struct.Struct("!16sII")
_DNS_MAX = 0xFFFF // 16


def iter_options(buf: Buffer) -> Iterator[tuple[int, memoryview]]:
    """(code, value) of each option in order; a truncated one is Malformed."""
    view = as_view(buf)
    i = 0
    while i < len(view):
        if i + 4 > len(view):
            raise Malformed("DHCPv6 option header truncated")
        code, olen = _OPT.unpack_from(view, i)
        if i + 4 + olen > len(view):
            raise Malformed(f"DHCPv6 option {code} of length {olen} truncated")
        yield code, view[i + 4:i + 4 + olen]
        i += 4 + olen


def _opt(code: int, value: bytes = b"") -> bytes:
    return _OPT.pack(code, len(value)) + value


class Dhcpv6Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.last_error: str | None = None  # why the last handle() returned None
        self.server_id = struct.pack("!HH", DUID_LL, HW_ETHERNET) + config.our_mac
        # options every reply carries, after the IAs: computed once (Config is frozen)
        info = bytearray()
        ip6 = config.ip6
        if ip6 is not None and ip6.dns and not config.no_dhcp_dns:
            info += _opt(OPT_DNS_SERVERS, b"".join(a.packed for a in ip6.dns[:_DNS_MAX]))
        if config.search and not config.no_dhcp_search:
            names = search_list(config.search)
            if names and len(names) <= 0xFFFF:
                info += _opt(OPT_DOMAIN_LIST, names)
        self._info = bytes(info)
        self._fqdn = dns_name(config.fqdn) if config.fqdn else None

    def handle(self, frame: Buffer) -> bytes | None:
        """The reply frame for the DHCPv6 message in `frame`, or None (see `last_error`)."""
        reply, self.last_error = guarded("DHCPv6", lambda: self._handle(as_view(frame)), None)
        return reply

    def _handle(self, frame: memoryview) -> bytes:
        config = self.config
        ip6 = config.ip6
        if config.no_dhcpv6 or ip6 is None:
            raise Ignored("DHCPv6 disabled")
        eth, packet = whole_ipv6(frame, IPPROTO_UDP, "UDP datagram")
        if not packet.dst.is_multicast:
            # RFC 8415 §16: clients multicast unless we sent a Server Unicast option (never)
            raise Ignored(f"unicast to {packet.dst}")
        if packet.src.is_unspecified or packet.src.is_multicast:
            raise Ignored(f"no address to answer to ({packet.src})")
        if eth.src[0] & 1:
            raise Ignored("multicast source MAC")
        # The UDP checksum is not verified: with checksum offload a guest may leave it partial.
        datagram = parse_udp(packet.payload)
        if datagram.dport != SERVER_PORT:
            raise Ignored(f"UDP port {datagram.dport}, not {SERVER_PORT}")
        msg = datagram.payload
        if len(msg) < 4:
            raise Malformed(f"DHCPv6 message of {len(msg)} bytes")
        mtype = msg[0]
        xid = bytes(msg[1:4])

        client_id: bytes | None = None
        server_id: bytes | None = None
        ia_nas: list[memoryview] = []
        ia_pds: list[memoryview] = []
        rapid = False
        client_fqdn_flags = 0
        for code, value in iter_options(msg[4:]):
            if code == OPT_CLIENTID and client_id is None:
                client_id = bytes(value)
            elif code == OPT_SERVERID and server_id is None:
                server_id = bytes(value)
            elif code in (OPT_IA_NA, OPT_IA_PD):
                if len(value) < _IA_SERVER_SCOPE:
                    raise Malformed(f"IA option {code} of {len(value)} bytes")
                (ia_nas if code == OPT_IA_NA else ia_pds).append(value)
            elif code == OPT_RAPID_COMMIT:
                rapid = True
            elif code == OPT_CLIENT_FQDN and value:
                client_fqdn_flags = value[0]

        ours = server_id == self.server_id
        # RFC 8415 §16: which messages must (not) carry a Client/Server ID
        if mtype == SOLICIT:
            _need(client_id is not None and server_id is None, "SOLICIT needs a Client ID "
                  "and no Server ID")
            reply_type = REPLY if rapid else ADVERTISE
        elif mtype in (REQUEST, RENEW, RELEASE, DECLINE):
            _need(client_id is not None and ours, f"message {mtype} needs a Client ID and "
                  "our Server ID")
            reply_type = REPLY
        elif mtype == REBIND:
            # §16.7 says a REBIND with a Server ID is discarded; passt wants one. Take both
            # when the ID is ours: answering is harmless, and nobody else serves this link.
            _need(client_id is not None and (server_id is None or ours),
                  "REBIND needs a Client ID and no foreign Server ID")
            reply_type = REPLY
        elif mtype == CONFIRM:
            _need(client_id is not None and server_id is None,
                  "CONFIRM needs a Client ID and no Server ID")
            reply_type = REPLY
        elif mtype == INFORMATION_REQUEST:
            _need(server_id is None or ours, "INFORMATION-REQUEST for another server")
            _need(not ia_nas and not ia_pds, "INFORMATION-REQUEST with an IA")
            reply_type = REPLY
        else:
            raise Ignored(f"message type {mtype} ignored")

        body = bytearray((reply_type,)) + xid
        body += _opt(OPT_SERVERID, self.server_id)
        if client_id is not None:
            body += _opt(OPT_CLIENTID, client_id)
        addr = ip6.addr
        if mtype == CONFIRM:
            claimed = [a for ia in ia_nas for a in _ia_addresses(ia)]
            # §18.3.3: with no address to judge, no reply at all
            _need(bool(claimed), "CONFIRM without addresses")
            on_link = all(a == addr for a in claimed)
            body += _status(STATUS_SUCCESS if on_link else STATUS_NOT_ON_LINK,
                            "all addresses on link" if on_link else "not on link")
        elif mtype in (RELEASE, DECLINE):
            body += _status(STATUS_SUCCESS, "released" if mtype == RELEASE else "declined")
        elif mtype == INFORMATION_REQUEST:
            body += self._info + self._client_fqdn(client_fqdn_flags)
        else:
            if reply_type == ADVERTISE:
                body += _opt(OPT_PREFERENCE, bytes((MAX_PREFERENCE,)))
            if rapid and mtype == SOLICIT:
                body += _opt(OPT_RAPID_COMMIT)
            body += self._ias(ia_nas, ia_pds, addr, renewing=mtype in (RENEW, REBIND))
            body += self._info + self._client_fqdn(client_fqdn_flags)

        udp = build_udp6(ip6.our_tap_ll, packet.src, SERVER_PORT, CLIENT_PORT, body)
        return build_eth(eth.src, config.our_mac, ETH_P_IPV6,
                         build_ipv6(ip6.our_tap_ll, packet.src, IPPROTO_UDP, udp))

    def _client_fqdn(self, client_flags: int) -> bytes:
        """Option 39 with the --fqdn name, or nothing without one."""
        if self._fqdn is None:
            return b""
        flags = FQDN_N | (FQDN_O if client_flags & FQDN_S else 0)
        return _opt(OPT_CLIENT_FQDN, bytes((flags,)) + self._fqdn)

    def _ias(self, ia_nas: list[memoryview], ia_pds: list[memoryview],
             addr: IPv6Address | None, renewing: bool) -> bytes:
        """Our answer for each IA the client sent: the address goes to the first IA_NA (an
        address belongs to one IA only); the rest, and every IA_PD, get a status instead."""
        out = bytearray()
        given = False
        for ia in ia_nas:
            (iaid,) = struct.unpack_from("!I", ia)
            if addr is None or given:
                out += _opt(OPT_IA_NA, _IA.pack(iaid, 0, 0)
                            + _status(STATUS_NO_ADDRS_AVAIL, "no addresses available"))
                continue
            given = True
            inner = _opt(OPT_IAADDR, _IAADDR.pack(addr.packed, INFINITE, INFINITE))
            if renewing:
                # §18.3.4/5: addresses we no longer give are returned with lifetimes 0
                for old in _ia_addresses(ia):
                    if old != addr:
                        inner += _opt(OPT_IAADDR, _IAADDR.pack(old.packed, 0, 0))
            # T1/T2 infinite: the address never changes while we run (RFC 8415 §7.7)
            out += _opt(OPT_IA_NA, _IA.pack(iaid, INFINITE, INFINITE) + inner)
        for ia in ia_pds:
            (iaid,) = struct.unpack_from("!I", ia)
            out += _opt(OPT_IA_PD, _IA.pack(iaid, 0, 0)
                        + _status(STATUS_NO_PREFIX_AVAIL, "no prefixes available"))
        return bytes(out)


def _need(condition: bool, why: str) -> None:
    if not condition:
        raise Ignored(why)


def _status(code: int, message: str) -> bytes:
    return _opt(OPT_STATUS_CODE, struct.pack("!H", code) + message.encode())


def _ia_addresses(ia: memoryview) -> list[IPv6Address]:
    """The addresses in an IA_NA's IAADDR options (malformed ones are Malformed)."""
    out = []
    for code, value in iter_options(ia[_IA_SERVER_SCOPE:]):
        if code == OPT_IAADDR:
            if len(value) < _IAADDR.size:
                raise Malformed(f"IAADDR of {len(value)} bytes")
            out.append(IPv6Address(bytes(value[:16])))
    return out
