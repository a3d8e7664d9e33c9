"""Forwarding in pasta mode besides the tap: where host-loopback traffic lands in the
namespace, the port scanner for the rules given with `auto` (pasta's default), and the
listeners of both tables as the control socket changes them (ctl/forwarder.py).

A scanned rule (config/fwd.py) limits what the scanner may forward: its port range less its
exclusions (and the ephemeral ports, for a rule without a range), its listening address, its
port translation and its target address all apply to the ports found bound."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from ipaddress import IPv6Address, ip_address
from typing import Any

from vhostpasst.config.conf import Config
from vhostpasst.config.fwd import PortForwards, PortRule, ephemeral_range
from vhostpasst.core.loop import Loop
from vhostpasst.core.nat import GuestAddrs
from vhostpasst.ctl import wiring
from vhostpasst.ctl.binders import UdpBinder, socket_place
from vhostpasst.ctl.forwarder import Binder, Place, Side, To
from vhostpasst.ctl.protocol import PIF_HOST, PIF_NAMES, PIF_SPLICE
from vhostpasst.ctl.rules import SCAN, Rule
from vhostpasst.dispatch import Dispatcher
from vhostpasst.pasta.portscan import AutoPorts, Direction, ProcNet
from vhostpasst.pasta.tcp_splice import TcpSplice
from vhostpasst.pasta.udp_splice import SpliceListener, UdpSplice
from vhostpasst.proto.udp import Listener as UdpListener

log = logging.getLogger("vhostpasst")


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


@dataclass(eq=False)
class _UdpPair:
    handle: object  # the handler's listener
    spliced: SpliceListener | None  # its mate on the host's loopback, if any


class _UdpHostBinder:
    """-u in pasta: the handler's listener and, for any or a loopback address without a
    target address, the splice listener on the host's loopback that takes loopback traffic
    past the tap (as auto_ports binds them)."""

    def __init__(self, udp: UdpBinder, usplice: UdpSplice) -> None:
        self.udp = udp
        self.usplice = usplice

    @staticmethod
    def _spliced(place: Place, to: To) -> bool:
        addr = place[1]
        return to[1] is None and (addr is None or addr.is_loopback)

    def bind(self, place: Place, to: To) -> object:
        pair = _UdpPair(self.udp.bind(place, to), None)
        if self._spliced(place, to):
            try:
                pair.spliced = self.usplice.add_listener(_family(place[0]), place[3], to[0],
                                                         to_ns=True)
            except OSError:
                self.udp.unbind(pair.handle)
                raise
        return pair

    def unbind(self, handle: object) -> None:
        assert isinstance(handle, _UdpPair)
        self.udp.unbind(handle.handle)
        if handle.spliced is not None:
            self.usplice.remove_listener(handle.spliced)

    def retarget(self, handle: object, to: To) -> None:
        assert isinstance(handle, _UdpPair)
        self.udp.retarget(handle.handle, to)
        assert isinstance(handle.handle, UdpListener)
        place = socket_place(handle.handle.sock, handle.handle.six)
        if handle.spliced is not None and not self._spliced(place, to):
            self.usplice.remove_listener(handle.spliced)
            handle.spliced = None
        elif handle.spliced is not None:
            handle.spliced.to_port = to[0]
        elif self._spliced(place, to):
            try:
                handle.spliced = self.usplice.add_listener(_family(place[0]), place[3], to[0],
                                                           to_ns=True)
            except OSError as e:  # loopback datagrams then take the tap, as with --no-splice
                log.warning("-u %d: no splice listener on the host's loopback: %s", place[3],
                            e.strerror)

    def existing(self) -> Iterable[tuple[Place, To, object]]:
        spliced = {(lst.sock.family == socket.AF_INET6, lst.port): lst
                   for lst in self.usplice.listeners.values() if lst.to_ns}
        out: list[tuple[Place, To, object]] = []
        for place, to, handle in self.udp.existing():
            mate = spliced.pop((place[0], place[3]), None) if self._spliced(place, to) else None
            out.append((place, to, _UdpPair(handle, mate)))
        return out


def _family(six: bool) -> int:
    return socket.AF_INET6 if six else socket.AF_INET


class _TcpNsBinder:
    """-T: listeners on the namespace's loopback (the address and interface of a rule do not
    matter: they are "lo" there)."""

    def __init__(self, splice: TcpSplice, netns_fd: int) -> None:
        self.splice = splice
        self.netns_fd = netns_fd

    def bind(self, place: Place, to: To) -> object:
        return self.splice.add_ns_listener(self.netns_fd, _family(place[0]), place[3], to[0])

    def unbind(self, handle: object) -> None:
        assert isinstance(handle, socket.socket)
        self.splice.remove_ns_listener(handle)

    def retarget(self, handle: object, to: To) -> None:
        assert isinstance(handle, socket.socket)
        self.splice.listeners[handle.fileno()] = (handle, to[0])

    def existing(self) -> Iterable[tuple[Place, To, object]]:
        return [(_ns_place(sock), (to_port, None), sock) for sock, to_port in
                self.splice.listeners.values()]


class _UdpNsBinder:
    """-U: splice listeners on the namespace's loopback."""

    def __init__(self, usplice: UdpSplice) -> None:
        self.usplice = usplice

    def bind(self, place: Place, to: To) -> object:
        return self.usplice.add_listener(_family(place[0]), place[3], to[0], to_ns=False)

    def unbind(self, handle: object) -> None:
        assert isinstance(handle, SpliceListener)
        self.usplice.remove_listener(handle)

    def retarget(self, handle: object, to: To) -> None:
        assert isinstance(handle, SpliceListener)
        handle.to_port = to[0]

    def existing(self) -> Iterable[tuple[Place, To, object]]:
        return [(_ns_place(lst.sock), (lst.to_port, None), lst)
                for lst in self.usplice.listeners.values() if not lst.to_ns]


def _ns_place(sock: socket.socket) -> Place:
    """A namespace loopback listener as the SPLICE table names it: any address, on "lo"."""
    return sock.family == socket.AF_INET6, None, "lo", int(sock.getsockname()[1])


def control_sides(config: Config, netns_fd: int, dispatcher: Dispatcher, splice: TcpSplice,
                  usplice: UdpSplice) -> list[Side]:
    """The HOST and SPLICE tables of pasta's control socket, over its listeners (to be made
    before the port scanner starts: its listeners are its own)."""
    host = wiring.host_side(config, dispatcher)
    if not config.no_splice and dispatcher.udp is not None:
        host.binders[socket.IPPROTO_UDP] = _UdpHostBinder(UdpBinder(dispatcher.udp), usplice)
    table_caps = wiring.caps(config)
    binders: dict[int, Binder] = {}
    if not config.no_tcp:
        binders[socket.IPPROTO_TCP] = _TcpNsBinder(splice, netns_fd)
    if not config.no_udp:
        binders[socket.IPPROTO_UDP] = _UdpNsBinder(usplice)
    rules = wiring.initial_rules(config.tcp_out, config.udp_out, table_caps, splice=True)
    # -T/-U go to the host's loopback: no target address there
    return [host, Side(PIF_SPLICE, PIF_NAMES[PIF_SPLICE], table_caps, binders, rules,
                       targets=False)]


class _ScanSwitch:
    """One direction of the port scanner, as the control socket stops and resumes it."""

    def __init__(self, auto: AutoPorts, attr: str, rules: tuple[Rule, ...]) -> None:
        self.auto = auto
        self.attr = attr  # the AutoPorts attribute holding the direction
        self.direction: Direction = getattr(auto, attr)
        self.rules = rules

    def stop(self) -> None:
        if getattr(self.auto, self.attr) is not None:
            self.direction.close()
            setattr(self.auto, self.attr, None)
            log.info("%s: stopped by the control socket", self.direction.name)

    def resume(self) -> None:
        if getattr(self.auto, self.attr) is None:
            setattr(self.auto, self.attr, self.direction)
            log.info("%s: resumed by the control socket", self.direction.name)


def attach_scans(sides: Iterable[Side], auto: AutoPorts | None) -> None:
    """Let the control socket stop and resume the scanner's directions (the tables' auto
    rules)."""
    if auto is None:
        return
    attrs = {(PIF_HOST, socket.IPPROTO_TCP): "tcp_in", (PIF_HOST, socket.IPPROTO_UDP): "udp_in",
             (PIF_SPLICE, socket.IPPROTO_TCP): "tcp_out",
             (PIF_SPLICE, socket.IPPROTO_UDP): "udp_out"}
    for side in sides:
        for proto in (socket.IPPROTO_TCP, socket.IPPROTO_UDP):
            attr = attrs[(side.pif, proto)]
            rules = tuple(r for r in side.rules if r.flags & SCAN and r.proto == proto)
            if getattr(auto, attr) is not None and rules:
                side.scans[proto] = _ScanSwitch(auto, attr, rules)
