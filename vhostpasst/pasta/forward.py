"""Forwarding in pasta mode besides the tap: where host-loopback traffic lands in the
namespace, and the port scanner for the rules given with `auto` (pasta's default).

A scanned rule (config/fwd.py) limits what the scanner may forward: its port range less its
exclusions (and the ephemeral ports, for a rule without a range), its listening address, its
port translation and its target address all apply to the ports found bound."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import Any

from vhostpasst.config.conf import Config
from vhostpasst.config.fwd import PortForwards, PortRule, ephemeral_range
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


@dataclass
class _Scanned(Direction):
    """A direction served for its scanned rules only: ports no rule covers are left alone,
    and a port is bound once per rule covering it, on that rule's terms."""

    rules: tuple[PortRule, ...] = ()
    ephemeral: tuple[int, int] = (0, -1)

    def follow(self, want: set[int], families: Iterable[int]) -> None:
        super().follow({p for p in want if any(r.covers(p, self.ephemeral)
                                               for r in self.rules)}, families)


BindRule = Callable[[int, int, PortRule], Any]  # (family, port, rule) -> handle


def _scanned(name: str, spec: PortForwards | None, bind_rule: BindRule,
             unbind_one: Callable[[Any], None]) -> _Scanned | None:
    rules = spec.scanned if spec is not None else ()
    if not rules:
        return None
    ephemeral = ephemeral_range()

    def bind(family: int, port: int) -> list[Any]:
        six = family == socket.AF_INET6
        handles: list[Any] = []
        try:
            for rule in rules:
                addr = rule.addr or rule.target
                if rule.covers(port, ephemeral) and (
                    addr is None or isinstance(addr, IPv6Address) == six
                ):
                    handles.append(bind_rule(family, port, rule))
        except OSError:
            unbind(handles)
            raise
        if not handles:
            raise OSError(f"no {name} rule for port {port} in this family")
        return handles

    def unbind(handles: list[Any]) -> None:
        for handle in handles:
            unbind_one(handle)

    return _Scanned(name, bind, unbind, rules=rules, ephemeral=ephemeral)


def auto_ports(loop: Loop, config: Config, netns_fd: int, dispatcher: Dispatcher,
               splice: TcpSplice, usplice: UdpSplice, fams: Iterable[int]) -> AutoPorts | None:
    """The port scanner for the rules given with `auto` (pasta's default), or None."""
    tcp, udp = dispatcher.tcp, dispatcher.udp
    six = socket.AF_INET6
    tcp_in = udp_in = None
    if tcp is not None:
        tcp_in = _scanned("-t auto", config.tcp_in, lambda f, p, r: tcp.add_listener(
            f == six, p, p + r.delta, r.addr, r.target), tcp.remove_listener)
    if udp is not None:
        def bind_u(f: int, p: int, r: PortRule) -> tuple[Any, Any]:
            lst = udp.add_listener(f == six, p, p + r.delta, r.addr, r.target)
            if config.no_splice or r.target is not None or (
                r.addr is not None and not r.addr.is_loopback
            ):
                return lst, None
            try:
                return lst, usplice.add_listener(f, p, p + r.delta, to_ns=True)
            except OSError:
                udp.remove_listener(lst)
                raise

        def unbind_u(h: tuple[Any, Any]) -> None:
            udp.remove_listener(h[0])
            if h[1] is not None:
                usplice.remove_listener(h[1])

        udp_in = _scanned("-u auto", config.udp_in, bind_u, unbind_u)
    tcp_out = _scanned("-T auto", config.tcp_out, lambda f, p, r: splice.add_ns_listener(
        netns_fd, f, p, p + r.delta), splice.remove_ns_listener)
    udp_out = _scanned("-U auto", config.udp_out, lambda f, p, r: usplice.add_listener(
        f, p, p + r.delta, to_ns=False), usplice.remove_listener)
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
