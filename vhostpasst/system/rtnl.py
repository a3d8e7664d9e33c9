"""A small rtnetlink client (RFC 3549, rtnetlink(7)): the link, address and route queries
host detection makes and the changes pasta's --config-net makes, nothing more.

It replaces pyroute2, whose import alone took ~0.18 s of a ~0.35 s pasta start (podman waits
for that on every container). The calls and the messages they return keep pyroute2's shape
(`msg["index"]`, `msg.get_attr("IFLA_IFNAME")`, `ipr.route("add", dst=..., gateway=...)`)
for the subset config/host.py and pasta/config_net.py use. Errors from the kernel raise
NetlinkError, an OSError whose `code` (and errno) is the kernel's error number.
"""

from __future__ import annotations

import errno
import itertools
import os
import socket
import struct
from collections.abc import Callable, Iterator
from ipaddress import ip_address
from typing import Any

NETLINK_ROUTE = 0

NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400

RTM_NEWLINK, RTM_GETLINK = 16, 18
RTM_NEWADDR, RTM_GETADDR = 20, 22
RTM_NEWROUTE, RTM_GETROUTE = 24, 26

REPLY_TIMEOUT = 10.0  # seconds

# the values callers compare messages with or pass in (host.py, pasta/config_net.py)
IFF_UP, IFF_LOOPBACK, IFF_NOARP = 0x1, 0x8, 0x80
IFA_F_NODAD, IFA_F_DADFAILED, IFA_F_DEPRECATED, IFA_F_TENTATIVE = 0x02, 0x08, 0x20, 0x40
RTPROT_STATIC = 4
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK = 0, 253
RT_TABLE_MAIN = 254
RTN_UNICAST = 1

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
RTATTR = struct.Struct("=HH")  # len, type
NLMSGERR = struct.Struct("=i")  # error (then the request's header)
RTNEXTHOP = struct.Struct("=HBBi")  # len, flags, hops, ifindex

_Decoder = Callable[[bytes, int], Any]


def _u32(data: bytes, _family: int) -> int:
    return int(struct.unpack_from("=I", data)[0])


def _str(data: bytes, _family: int) -> str:
    return data.split(b"\0", 1)[0].decode(errors="replace")


def _mac(data: bytes, _family: int) -> str:
    return ":".join(f"{b:02x}" for b in data)


def _addr(data: bytes, family: int) -> str:
    return socket.inet_ntop(family, data[:4 if family == socket.AF_INET else 16])


def _multipath(data: bytes, family: int) -> list[Message]:
    hops, off = [], 0
    while off + RTNEXTHOP.size <= len(data):
        length, flags, weight, ifindex = RTNEXTHOP.unpack_from(data, off)
        if length < RTNEXTHOP.size or off + length > len(data):
            break
        attrs = _attrs(data[off + RTNEXTHOP.size:off + length], _RTA, family)
        hops.append(Message({"flags": flags, "hops": weight, "oif": ifindex}, attrs))
        off += _align(length)
    return hops


_IFLA: dict[int, tuple[str, _Decoder]] = {
    1: ("IFLA_ADDRESS", _mac), 3: ("IFLA_IFNAME", _str), 4: ("IFLA_MTU", _u32),
}
_IFA: dict[int, tuple[str, _Decoder]] = {
    1: ("IFA_ADDRESS", _addr), 2: ("IFA_LOCAL", _addr), 3: ("IFA_LABEL", _str),
    8: ("IFA_FLAGS", _u32),
}
_RTA: dict[int, tuple[str, _Decoder]] = {
    1: ("RTA_DST", _addr), 2: ("RTA_SRC", _addr), 4: ("RTA_OIF", _u32),
    5: ("RTA_GATEWAY", _addr), 6: ("RTA_PRIORITY", _u32), 7: ("RTA_PREFSRC", _addr),
    9: ("RTA_MULTIPATH", _multipath), 15: ("RTA_TABLE", _u32),
}
_BY_NAME = {name: code for table in (_IFLA, _IFA, _RTA) for code, (name, _) in table.items()}

IFINFOMSG = struct.Struct("=BxHiII")
IFINFO_FIELDS = ("family", "ifi_type", "index", "flags", "change")
IFADDRMSG = struct.Struct("=BBBBI")
IFADDR_FIELDS = ("family", "prefixlen", "flags", "scope", "index")
RTMSG = struct.Struct("=BBBBBBBBI")
RT_FIELDS = ("family", "dst_len", "src_len", "tos", "table", "proto", "scope", "type", "flags")


class NetlinkError(OSError):
    """The kernel refused a request; `code` is its errno."""

    def __init__(self, code: int, what: str = "") -> None:
        super().__init__(code, f"{what}: {os.strerror(code)}" if what else os.strerror(code))
        self.code = code


class Message:
    """A decoded link, address or route message (or a multipath nexthop): header fields by
    name (`msg["index"]`, `msg.get("oif")`), attributes with `get_attr("RTA_GATEWAY")`."""

    __slots__ = ("fields", "attrs")

    def __init__(self, fields: dict[str, int], attrs: dict[str, Any]) -> None:
        self.fields = fields
        self.attrs = attrs

    def __getitem__(self, name: str) -> int:
        return self.fields[name]

    def get(self, name: str, default: Any = None) -> Any:
        return self.fields.get(name, default)

    def get_attr(self, name: str, default: Any = None) -> Any:
        return self.attrs.get(name, default)

    def __repr__(self) -> str:
        return f"Message({self.fields}, {self.attrs})"


def _align(n: int) -> int:
    return (n + 3) & ~3


def _attrs(data: bytes, table: dict[int, tuple[str, _Decoder]], family: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    off = 0
    while off + RTATTR.size <= len(data):
        length, kind = RTATTR.unpack_from(data, off)
        if length < RTATTR.size or off + length > len(data):
            break
        known = table.get(kind & 0x3FFF)  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
        if known is not None:
            name, decode = known
            try:
                out[name] = decode(data[off + RTATTR.size:off + length], family)
            except (ValueError, struct.error, OSError):
                pass  # a value we cannot read is one we do not use
        off += _align(length)
    return out


def _attr(name: str, payload: bytes) -> bytes:
    length = RTATTR.size + len(payload)
    return RTATTR.pack(length, _BY_NAME[name]) + payload + bytes(_align(length) - length)


def _pack_addr(text: str) -> tuple[int, bytes]:
    addr = ip_address(text)
    return (socket.AF_INET if addr.version == 4 else socket.AF_INET6), addr.packed


class IPRoute:
    """One NETLINK_ROUTE socket, in the network namespace of the thread that opens it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  NETLINK_ROUTE)
        self.sock.bind((0, 0))
        self.sock.settimeout(REPLY_TIMEOUT)  # a kernel that never answers is an error, not a hang
        self._seq = itertools.count(1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> IPRoute:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    # --- the exchange ---------------------------------------------------------------------
    def _request(self, kind: int, flags: int, body: bytes, what: str) -> Iterator[bytes]:
        """Send one request; yield the payloads of the messages answering it (a dump's,
        or none for an acknowledged change). NetlinkError if the kernel refuses it."""
        seq = next(self._seq)
        self.sock.send(NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, NLM_F_REQUEST | flags,
                                     seq, 0) + body)
        while True:
            data = self.sock.recv(1 << 17)  # dumps come in parts of at most 32 KiB
            off = 0
            while off + NLMSGHDR.size <= len(data):
                length, mtype, mflags, mseq, _ = NLMSGHDR.unpack_from(data, off)
                if length < NLMSGHDR.size or off + length > len(data):
                    raise NetlinkError(errno.EPROTO, f"{what}: truncated netlink message")
                payload = data[off + NLMSGHDR.size:off + length]
                off += _align(length)
                if mseq != seq:
                    continue  # an answer to an earlier request we gave up on
                if mtype == NLMSG_DONE:
                    return
                if mtype == NLMSG_ERROR:
                    error = -NLMSGERR.unpack_from(payload)[0]
                    if error:
                        raise NetlinkError(error, what)
                    return  # the acknowledgement
                yield payload
                if not mflags & NLM_F_MULTI:
                    return

    def _dump(self, kind: int, header: bytes, layout: struct.Struct, names: tuple[str, ...],
              table: dict[int, tuple[str, _Decoder]], what: str) -> list[Message]:
        out = []
        for payload in self._request(kind, NLM_F_DUMP, header, what):
            if len(payload) < layout.size:
                continue
            fields = dict(zip(names, layout.unpack_from(payload), strict=True))
            out.append(Message(fields, _attrs(payload[_align(layout.size):], table,
                                              fields["family"])))
        return out

    def _change(self, kind: int, flags: int, body: bytes, what: str) -> None:
        for _ in self._request(kind, flags | NLM_F_ACK, body, what):
            pass

    # --- queries --------------------------------------------------------------------------
    def get_links(self, index: int | None = None) -> list[Message]:
        links = self._dump(RTM_GETLINK, IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0),
                           IFINFOMSG, IFINFO_FIELDS, _IFLA, "links")
        return [ln for ln in links if index is None or ln["index"] == index]

    def link_lookup(self, ifname: str) -> list[int]:
        return [ln["index"] for ln in self.get_links() if ln.get_attr("IFLA_IFNAME") == ifname]

    def get_addr(self, family: int = socket.AF_UNSPEC, index: int | None = None) -> list[Message]:
        addrs = self._dump(RTM_GETADDR, IFADDRMSG.pack(family, 0, 0, 0, 0), IFADDRMSG,
                           IFADDR_FIELDS, _IFA, "addresses")
        return [a for a in addrs if index is None or a["index"] == index]

    def get_routes(self, family: int = socket.AF_UNSPEC,
                   table: int | None = None) -> list[Message]:
        routes = self._dump(RTM_GETROUTE, RTMSG.pack(family, 0, 0, 0, 0, 0, 0, 0, 0), RTMSG,
                            RT_FIELDS, _RTA, "routes")
        if table is None:
            return routes
        return [r for r in routes if r.get_attr("RTA_TABLE", r["table"]) == table]

    # --- changes --------------------------------------------------------------------------
    def link(self, command: str, index: int, *, mtu: int | None = None,
             flags: int | None = None, change: int | None = None, state: str | None = None,
             address: str | None = None) -> None:
        """`link("set", index, ...)`: the MTU, flags under a change mask, up, the MAC."""
        if command != "set":
            raise ValueError(f"link command {command!r} not supported")
        if state is not None:
            flags, change = (IFF_UP if state == "up" else 0), IFF_UP
        attrs = b""
        if mtu is not None:
            attrs += _attr("IFLA_MTU", struct.pack("=I", mtu))
        if address is not None:
            attrs += _attr("IFLA_ADDRESS", bytes.fromhex(address.replace(":", "")))
        body = IFINFOMSG.pack(socket.AF_UNSPEC, 0, index, flags or 0, change or 0) + attrs
        self._change(RTM_NEWLINK, 0, body, f"link {index}")

    def addr(self, command: str, index: int, address: str, prefixlen: int,
             flags: int = 0) -> None:
        """`addr("add" | "replace", index, address, prefixlen, flags)`."""
        mode = {"add": NLM_F_CREATE | NLM_F_EXCL, "replace": NLM_F_CREATE | NLM_F_REPLACE}
        if command not in mode:
            raise ValueError(f"address command {command!r} not supported")
        family, packed = _pack_addr(address)
        attrs = _attr("IFA_ADDRESS", packed) + _attr("IFA_FLAGS", struct.pack("=I", flags))
        if family == socket.AF_INET:
            attrs += _attr("IFA_LOCAL", packed)
        body = IFADDRMSG.pack(family, prefixlen, flags & 0xFF, RT_SCOPE_UNIVERSE, index)
        self._change(RTM_NEWADDR, mode[command], body + attrs, f"address {address}/{prefixlen}")

    def route(self, command: str, *, family: int, dst: str, table: int,
              proto: int = RTPROT_STATIC, scope: int = RT_SCOPE_UNIVERSE,
              type: int = RTN_UNICAST, priority: int | None = None,  # noqa: A002 (pyroute2's)
              gateway: str | None = None, oif: int | None = None,
              multipath: list[dict[str, Any]] | None = None) -> None:
        """`route("add", family=, dst="a/len", table=, ...)`: a unicast route via a gateway
        or out of an interface, or over several nexthops (`multipath`: gateway, hops, oif)."""
        if command != "add":
            raise ValueError(f"route command {command!r} not supported")
        net, _, plen = dst.partition("/")
        dst_len = int(plen) if plen else (32 if family == socket.AF_INET else 128)
        attrs = _attr("RTA_TABLE", struct.pack("=I", table))
        if dst_len:
            attrs += _attr("RTA_DST", _pack_addr(net)[1])
        if priority is not None:
            attrs += _attr("RTA_PRIORITY", struct.pack("=I", priority))
        if gateway:
            attrs += _attr("RTA_GATEWAY", _pack_addr(gateway)[1])
        if oif is not None:
            attrs += _attr("RTA_OIF", struct.pack("=I", oif))
        if multipath:
            hops = b""
            for nh in multipath:
                gw = _attr("RTA_GATEWAY", _pack_addr(nh["gateway"])[1]) if nh.get("gateway") \
                    else b""
                hops += RTNEXTHOP.pack(RTNEXTHOP.size + len(gw), 0, nh.get("hops", 0),
                                       nh.get("oif", 0)) + gw
            attrs += _attr("RTA_MULTIPATH", hops)
        body = RTMSG.pack(family, dst_len, 0, 0, table if table < 256 else 0, proto, scope,
                          type, 0)
        self._change(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body + attrs, f"route {dst}")
