"""Automatic port forwarding (pasta's `auto`, reference 2.6 and 6.4).

Every second the bound ports of the *other* side are read from /proc/net/{tcp,tcp6,udp,udp6}:
-t/-u (host -> namespace) follow the ports bound in the namespace, -T/-U (namespace -> host)
the ports bound on the host. A TCP port counts when a socket is in LISTEN (0x0A), a UDP port
when one is unconnected (0x07); UDP also follows the TCP ports. Our own forwarders are left
out (they show up in the other side's table), so the two directions do not chase each other.
Listeners follow: new ports are bound, vanished ones closed (connections and flows accepted
earlier on the tap path go on). A port that cannot be bound now is tried again next time.

The namespace's files are opened once by a helper thread inside it (/proc/thread-self/net/...,
which keeps pointing at that namespace) and re-read from the start each time, as pasta does.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vhostpasst.core.loop import Loop, Timer
from vhostpasst.system import netns

log = logging.getLogger(__name__)

SCAN_INTERVAL = 1.0
TCP_LISTEN = 0x0A
UDP_UNCONNECTED = 0x07
PROC_NET_FILES = ("tcp", "tcp6", "udp", "udp6")
READ_MAX = 64 << 20  # bound on one table read (a few hundred thousand sockets)


def parse_proc_net(text: bytes, state: int) -> set[int]:
    """Local ports of the sockets in `state` in one /proc/net/{tcp,udp}[6] table.

    Lines look like `  0: 0100007F:1F90 00000000:0000 0A ...` (local address:port in hex,
    remote, state); the first line is a header."""
    ports: set[int] = set()
    for line in text.splitlines()[1:]:
        cols = line.split(None, 4)
        if len(cols) < 4:
            continue
        try:
            port = int(cols[1].rsplit(b":", 1)[1], 16)
            st = int(cols[3], 16)
        except (IndexError, ValueError):
            continue
        if st == state and port:
            ports.add(port)
    return ports


def _read_all(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks = []
    total = 0
    while total < READ_MAX:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


class ProcNet:
    """The four tables of one namespace, opened once (missing ones, e.g. tcp6 without IPv6,
    read as empty)."""

    def __init__(self, fds: dict[str, int]) -> None:
        self.fds = fds

    @classmethod
    def open(cls, base: str) -> ProcNet:
        fds = {}
        for name in PROC_NET_FILES:
            try:
                fds[name] = os.open(f"{base}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                log.debug("cannot open %s/%s: %s", base, name, e)
        return cls(fds)

    @classmethod
    def open_in_netns(cls, netns_fd: int) -> ProcNet:
        return netns.call_in_netns(netns_fd, cls.open, "/proc/thread-self/net")

    def bound(self) -> tuple[set[int], set[int]]:
        """(TCP listening ports, UDP unconnected ports), both families together."""
        tcp: set[int] = set()
        udp: set[int] = set()
        for name, fd in self.fds.items():
            try:
                data = _read_all(fd)
            except OSError as e:
                log.debug("reading /proc/net/%s: %s", name, e)
                continue
            if name.startswith("tcp"):
                tcp |= parse_proc_net(data, TCP_LISTEN)
            else:
                udp |= parse_proc_net(data, UDP_UNCONNECTED)
        return tcp, udp

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


@dataclass
class Direction:
    """One auto direction: `bind(family, port)` returns a handle (OSError if it cannot),
    `unbind(handle)` closes it, `ours()` are the ports our forwarders of the *opposite*
    direction hold on the side scanned for this one."""

    name: str
    bind: Callable[[int, int], Any]
    unbind: Callable[[Any], None]
    bound: dict[int, list[Any]] = field(default_factory=dict)  # port -> handles

    def follow(self, want: set[int], families: Iterable[int]) -> None:
        for port in sorted(set(self.bound) - want):
            for handle in self.bound.pop(port):
                self.unbind(handle)
            log.info("%s: port %d no longer forwarded", self.name, port)
        fams = list(families)
        for port in sorted(want - set(self.bound)):
            handles = []
            for family in fams:
                try:
                    handles.append(self.bind(family, port))
                except OSError as e:
                    log.debug("%s: cannot bind port %d (%s): %s", self.name, port,
                              "IPv6" if family == socket.AF_INET6 else "IPv4", e)
            if handles:
                self.bound[port] = handles
                log.info("%s: forwarding port %d", self.name, port)

    def close(self) -> None:
        for handles in self.bound.values():
            for handle in handles:
                self.unbind(handle)
        self.bound.clear()


class AutoPorts:
    """The scan timer and up to four directions. `ours_*` give the ports all our forwarders
    (automatic and explicit) hold on each side, per protocol."""

    def __init__(self, loop: Loop, host: ProcNet, ns: ProcNet, families: Iterable[int],
                 tcp_in: Direction | None, udp_in: Direction | None,
                 tcp_out: Direction | None, udp_out: Direction | None,
                 ours_host: Callable[[], tuple[set[int], set[int]]],
                 ours_ns: Callable[[], tuple[set[int], set[int]]]) -> None:
        self.loop = loop
        self.host, self.ns = host, ns
        self.families = list(families)
        self.tcp_in, self.udp_in, self.tcp_out, self.udp_out = tcp_in, udp_in, tcp_out, udp_out
        self.ours_host, self.ours_ns = ours_host, ours_ns
        self.timer: Timer | None = None

    def start(self) -> None:
        self.scan()

    def scan(self) -> None:
        try:
            self._scan()
        except Exception:  # a bug here must not stop the loop; try again next time
            log.exception("automatic port scan failed")
        self.timer = self.loop.call_later(SCAN_INTERVAL, self.scan)

    def _scan(self) -> None:
        if self.tcp_in or self.udp_in:
            tcp, udp = self.ns.bound()
            our_tcp, our_udp = self.ours_ns()
            tcp -= our_tcp
            if self.tcp_in:
                self.tcp_in.follow(tcp, self.families)
            if self.udp_in:  # UDP follows TCP too (auto mode only)
                self.udp_in.follow((udp - our_udp) | tcp, self.families)
        if self.tcp_out or self.udp_out:
            tcp, udp = self.host.bound()
            our_tcp, our_udp = self.ours_host()
            tcp -= our_tcp
            if self.tcp_out:
                self.tcp_out.follow(tcp, self.families)
            if self.udp_out:
                self.udp_out.follow((udp - our_udp) | tcp, self.families)

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        for d in (self.tcp_in, self.udp_in, self.tcp_out, self.udp_out):
            if d is not None:
                d.close()
        self.host.close()
        self.ns.close()
