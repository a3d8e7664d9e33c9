"""Listening sockets for the forwarded ports (-t/-u): the binding policy TCP and UDP share.

config/fwd.py says which ports map where; this module opens the sockets, through a
`bind_one` the protocol supplies, and decides which failures are fatal.

bound_socket() is the socket both protocols bind: non-blocking, close-on-exec, SO_REUSEADDR,
IPv6-only for IPv6 (the IPv4 socket of the same port is a separate one), IP_FREEBIND where
the configuration asks for it (an address the host does not have yet), SO_BINDTODEVICE for
`port%ifname` specs. They differ only in the socket type and in what they do before binding
(UDP turns on the error queue) and after (TCP listens).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable
from ipaddress import IPv6Address

from vhostpasst.config.fwd import IPAddr, Mapping, PortForwards, ephemeral_range, mappings

BindOne = Callable[[bool, IPAddr | None, str | None, int], socket.socket]


def bind_all(forwards: PortForwards | None, ipv4: bool, ipv6: bool, proto: str,
             bind_one: BindOne) -> list[tuple[Mapping, bool, socket.socket]]:
    """Bind a socket for every mapping (per enabled family unless the rule names an address):
    (mapping, is_ipv6, socket) for each. An explicit port that fails raises OSError naming
    it; ports of "all" and exclusion-only specs may fail, but not every one of them, and
    running out of fds (EMFILE/ENFILE) is fatal either way. `bind_one(six, addr, ifname,
    port)` makes one socket; `proto` ("TCP"/"UDP") is for the messages."""
    bound: list[tuple[Mapping, bool, socket.socket]] = []
    tolerant_tried = tolerant_ok = 0
    for m in mappings(forwards, ephemeral_range()):
        if m.addr is not None or m.target is not None:  # an address picks the family
            families = [isinstance(m.addr or m.target, IPv6Address)]
        else:
            families = [six for six, on in ((False, ipv4), (True, ipv6)) if on]
        for six in families:
            tolerant_tried += m.tolerant
            try:
                sock = bind_one(six, m.addr, m.ifname, m.host_port)
            except OSError as e:
                if m.tolerant and e.errno not in (errno.EMFILE, errno.ENFILE):
                    continue
                for _, _, s in bound:
                    s.close()
                where = f"{m.addr or ('[::]' if six else '0.0.0.0')}"
                raise OSError(e.errno, f"{proto} port {m.host_port} on {where}"
                                       f"{'%' + m.ifname if m.ifname else ''}: "
                                       f"{e.strerror}") from None
            tolerant_ok += m.tolerant
            bound.append((m, six, sock))
    if tolerant_tried and not tolerant_ok and not bound:
        raise OSError(errno.EADDRINUSE, f"no {proto} port could be forwarded")
    return bound


IP_FREEBIND = 15  # not in Python's socket module
IPV6_FREEBIND = 78


def set_freebind(sock: socket.socket, six: bool) -> None:
    """--freebind on a -t/-u listening socket: bind to an address the host does not have
    (yet), as passt does for both protocols."""
    if six:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)


SocketFactory = Callable[..., socket.socket]


def bound_socket(factory: SocketFactory, kind: int, six: bool, addr: IPAddr | None,
                 ifname: str | None, port: int, freebind: bool,
                 prepare: Callable[[socket.socket], None] | None = None) -> socket.socket:
    """A socket of `kind` (SOCK_STREAM, SOCK_DGRAM) bound to `addr` (None: any) and `port`,
    on `ifname` if given; `prepare(sock)` runs before the bind. OSError if any step fails
    (the socket is closed then)."""
    family = socket.AF_INET6 if six else socket.AF_INET
    sock = factory(family, kind | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if six:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        if prepare is not None:
            prepare(sock)
        if freebind:
            set_freebind(sock, six)
        if ifname:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.bind((str(addr) if addr is not None else "", port))
    except OSError:
        sock.close()
        raise
    return sock
