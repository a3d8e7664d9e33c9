"""Forwarding in pasta mode besides the tap: where host-loopback traffic lands in the
namespace, and the port scanner for the directions given as `auto` (pasta's default)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from ipaddress import ip_address
from typing import Any

from vhostpasst.config.conf import Config
from vhostpasst.config.fwd import PortForwards
from vhostpasst.core.loop import Loop
from vhostpasst.core.nat import GuestAddrs
from vhostpasst.dispatch import Dispatcher
from vhostpasst.pasta.portscan import AutoPorts, Direction, ProcNet
from vhostpasst.pasta.tcp_splice import TcpSplice
from vhostpasst.pasta.udp_splice import UdpSplice


def ns_target(config: Config, guest: GuestAddrs) -> Callable[[int, str], str]:
    """Where a spliced connection from the host's loopback goes in the namespace, given its
    family and the host address it was made to (reference 4.5): the address the namespace
    was seen using (or was given), else its loopback. With --host-lo-to-ns-lo, one made to a
    host loopback address goes to the same loopback address in the namespace (passt's
    meaning since 2026: any of 127.0.0.0/8, not only 127.0.0.1)."""

    def target(family: int, host_dst: str) -> str:
        six = family == socket.AF_INET6
        if config.host_lo_to_ns_lo and _is_loopback(host_dst):
            return host_dst
        fam = config.ip6 if six else config.ip4
        seen = guest.addr6_seen if six else guest.addr4_seen
        addr = seen or (fam.addr if fam is not None else None)
        if addr is not None:
            return str(addr)
        return "::1" if six else "127.0.0.1"

    return target


def _is_loopback(text: str) -> bool:
    try:
        return ip_address(text).is_loopback
    except ValueError:
        return False


def auto_ports(loop: Loop, config: Config, netns_fd: int, dispatcher: Dispatcher,
               splice: TcpSplice, usplice: UdpSplice, fams: Iterable[int]) -> AutoPorts | None:
    """The port scanner for the directions given as `auto` (pasta's default), or None."""
    def is_auto(spec: PortForwards | None) -> bool:
        return spec is not None and spec.mode == "auto"

    tcp, udp = dispatcher.tcp, dispatcher.udp
    six = socket.AF_INET6
    tcp_in = udp_in = tcp_out = udp_out = None
    if is_auto(config.tcp_in) and tcp is not None:
        tcp_in = Direction("-t auto", lambda f, p: tcp.add_listener(f == six, p, p),
                           tcp.remove_listener)
    if is_auto(config.udp_in) and udp is not None:
        def bind_u(f: int, p: int) -> tuple[Any, Any]:
            lst = udp.add_listener(f == six, p, p)
            if config.no_splice:
                return lst, None
            try:
                return lst, usplice.add_listener(f, p, p, to_ns=True)
            except OSError:
                udp.remove_listener(lst)
                raise

        def unbind_u(h: tuple[Any, Any]) -> None:
            udp.remove_listener(h[0])
            if h[1] is not None:
                usplice.remove_listener(h[1])

        udp_in = Direction("-u auto", bind_u, unbind_u)
    if is_auto(config.tcp_out):
        tcp_out = Direction("-T auto", lambda f, p: splice.add_ns_listener(netns_fd, f, p, p),
                            splice.remove_ns_listener)
    if is_auto(config.udp_out):
        udp_out = Direction("-U auto", lambda f, p: usplice.add_listener(f, p, p, to_ns=False),
                            usplice.remove_listener)
    if not (tcp_in or udp_in or tcp_out or udp_out):
        return None

    def port_of(sock: socket.socket) -> int:
        return int(sock.getsockname()[1])

    def ours_host() -> tuple[set[int], set[int]]:
        t = {lst.port for lst in tcp.listeners} if tcp is not None else set()
        u = {port_of(lst.sock) for lst in udp.listeners} if udp is not None else set()
        u |= {lst.port for lst in usplice.listeners.values() if lst.to_ns}
        return t, u

    def ours_ns() -> tuple[set[int], set[int]]:
        t = {port_of(sock) for sock, _ in splice.listeners.values()}
        u = {lst.port for lst in usplice.listeners.values() if not lst.to_ns}
        return t, u

    return AutoPorts(loop, ProcNet.open("/proc/self/net"), ProcNet.open_in_netns(netns_fd),
                     fams, tcp_in, udp_in, tcp_out, udp_out, ours_host, ours_ns)
