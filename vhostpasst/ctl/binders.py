"""The HOST side's listening sockets (-t/-u) as forwarder.Binder: the TCP and UDP handlers'
listeners. pasta adds its splice listeners to these (pasta/forward.py)."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from ipaddress import ip_address

from vhostpasst.config.fwd import IFNAMSIZ
from vhostpasst.ctl.forwarder import Place, To
from vhostpasst.proto.tcp.conn import Listener as TcpListener
from vhostpasst.proto.tcp.handler import TcpHandler
from vhostpasst.proto.udp import Listener as UdpListener
from vhostpasst.proto.udp import UdpHandler


def socket_place(sock: socket.socket, six: bool) -> Place:
    """Where a bound socket listens (its address None if unspecified)."""
    host, port = sock.getsockname()[:2]
    addr = ip_address(str(host).split("%")[0])
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, IFNAMSIZ)
    ifname = raw.split(b"\0", 1)[0].decode("ascii", "replace") or None
    return six, (None if addr.is_unspecified else addr), ifname, int(port)


class TcpBinder:
    def __init__(self, tcp: TcpHandler) -> None:
        self.tcp = tcp

    def bind(self, place: Place, to: To) -> object:
        six, addr, ifname, port = place
        return self.tcp.add_listener(six, port, to[0], addr, to[1], ifname)

    def unbind(self, handle: object) -> None:
        assert isinstance(handle, TcpListener)
        self.tcp.remove_listener(handle)

    def retarget(self, handle: object, to: To) -> None:
        assert isinstance(handle, TcpListener)
        handle.guest_port, handle.target = to

    def existing(self) -> Iterable[tuple[Place, To, object]]:
        return [(socket_place(lst.sock, lst.six), (lst.guest_port, lst.target), lst)
                for lst in self.tcp.listeners]


class UdpBinder:
    def __init__(self, udp: UdpHandler) -> None:
        self.udp = udp

    def bind(self, place: Place, to: To) -> object:
        six, addr, ifname, port = place
        return self.udp.add_listener(six, port, to[0], addr, to[1], ifname)

    def unbind(self, handle: object) -> None:
        assert isinstance(handle, UdpListener)
        self.udp.remove_listener(handle)

    def retarget(self, handle: object, to: To) -> None:
        assert isinstance(handle, UdpListener)
        handle.guest_port, handle.target = to

    def existing(self) -> Iterable[tuple[Place, To, object]]:
        return [(socket_place(lst.sock, lst.six), (lst.guest_port, lst.target), lst)
                for lst in self.udp.listeners]
