"""Listening sockets for `-t` / `-u` forwards (and pasta's automatic ports), shared by TCP and
UDP: one host port bound on one address (or all of them) and one interface (or any).

Both protocols want the same socket: non-blocking, close-on-exec, SO_REUSEADDR, IPv6-only for
IPv6 (the IPv4 socket of the same port is a separate one), IP_FREEBIND where the configuration
asks for it (an address the host does not have yet), SO_BINDTODEVICE for `port%ifname` specs.
They differ only in the socket type and in what they do before binding (UDP turns on the
error queue) and after (TCP listens).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from ipaddress import IPv4Address, IPv6Address

from vhostpasst.config import fwd

SocketFactory = Callable[..., socket.socket]


def bound_socket(factory: SocketFactory, kind: int, six: bool, addr: IPv4Address | IPv6Address
                 | None, ifname: str | None, port: int, freebind: bool,
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
            fwd.set_freebind(sock, six)
        if ifname:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, ifname.encode())
        sock.bind((str(addr) if addr is not None else "", port))
    except OSError:
        sock.close()
        raise
    return sock
