"""pasta mode: give a network namespace the networking passt gives a VM, through a tap device.

Start-up, as pasta does it:
1. The namespace. Spawn mode (no PID, no --netns): a new user namespace for us (root inside
   mapped to our uid/gid), then a child in new network, mount, IPC, UTS and PID namespaces that
   runs the command (default: a login shell). Attach mode: the network namespace of a PID (and
   its user namespace unless --userns/--netns-only) or of --netns PATH|NAME.
2. Inside the namespace (a helper thread that setns()es, see netns.call_in_netns): open the
   tap, bring `lo` up, set or read the tap's MAC, and with --config-net give the tap the host's
   MTU, addresses and routes (rtnl.py).
3. The same Dispatcher and Loop as passt mode, with a TapLink as the guest link.
4. Started as root, give that up once all of the above is done (isolation.py): nobody or
   --runas; the namespace helper thread (netns.NsThread) entered the namespace before, so
   namespace sockets can still be made. Spawn mode as root: the command's user namespace is
   created by the child as the target user, its root mapped to that user, as pasta's is.
5. Spawn mode stays in the foreground and exits with the command's status (128+signal if it
   was killed). Attach mode forks to the background (unless -f) and the parent exits 0 once
   the child is ready; the child exits when the namespace file goes away (unless
   --no-netns-quit). --fd N: the caller's tap, already in the namespace, instead of opening one.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from typing import Any

from vhostpasst.config.conf import Config, summary
from vhostpasst.core import flow
from vhostpasst.core.log import setup_logging
from vhostpasst.core.loop import EPOLLIN
from vhostpasst.core.process import TERMINATE_SIGNALS, Process
from vhostpasst.pasta.portscan import AutoPorts, Direction, ProcNet
from vhostpasst.pasta.tcp_splice import TcpSplice
from vhostpasst.pasta.udp_splice import UdpSplice
from vhostpasst.system import isolation, netns
from vhostpasst.system.sandbox import Sandbox, SandboxError

log = logging.getLogger("vhostpasst")

SPAWN_NS_FLAGS = (netns.CLONE_NEWNET | netns.CLONE_NEWNS | netns.CLONE_NEWIPC
                  | netns.CLONE_NEWUTS | netns.CLONE_NEWPID)
HOSTNAME_MAX = 64
QUIT_POLL_INTERVAL = 1.0  # /proc paths: inotify does not report their removal
LL_WAIT = 2.0  # how long --config-net waits for the tap's IPv6 link-local address
ROUTE_PASSES = 8  # routes are re-inserted until their dependencies (gateways) resolve

RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RT_SCOPE_LINK = 253
IFA_F_NODAD = 0x02
IFA_F_DEPRECATED = 0x20
IFF_UP = 0x1
IFF_NOARP = 0x80
_ROUTE_RETRY = (errno.ENETUNREACH, errno.EHOSTUNREACH)


class PastaError(Exception):
    """Start-up failed; the message says where."""


# -- the namespace --------------------------------------------------------------------------


@dataclass
class Spawned:
    """The command's namespaces: `pid` is our child (the intermediate process that waits for
    the command and exits with its status), `init_pid` the command itself (PID 1 inside)."""

    pid: int
    init_pid: int
    go_fd: int  # writing a byte (or closing it) lets the command start


def _exec_command(command: tuple[str, ...]) -> None:
    if command:
        argv = list(command)
        path = argv[0]
    else:  # a login shell, named "-<path>" as login(1) would
        path = os.environ.get("SHELL") or "/bin/sh"
        argv = [f"-{path}"]
    flow.restore_fd_limit()  # ours was raised for our sockets, not the command's
    # Python ignores SIGPIPE (and we ignore SIGINT): exec keeps ignored signals ignored
    for sig in (signal.SIGPIPE, signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    try:
        os.execvp(path, argv)
    except OSError as e:
        print(f"pasta: cannot start {path}: {e.strerror}", file=sys.stderr)
    os._exit(1)


def _ns_init(command: tuple[str, ...], go_r: int) -> None:
    """PID 1 of the new PID namespace: a fresh /proc, ping sockets, hostname, then the
    command once pasta says go."""
    try:
        try:
            # do not let our /proc mount propagate back to the parent mount namespace
            netns.mount(None, "/", None, netns.MS_REC | netns.MS_PRIVATE)
            netns.mount("proc", "/proc", "proc",
                        netns.MS_NOSUID | netns.MS_NODEV | netns.MS_NOEXEC)
        except OSError as e:
            print(f"pasta: cannot mount /proc: {e.strerror}", file=sys.stderr)
        try:  # root inside may then use ICMP echo sockets (ping) without raw sockets
            with open("/proc/sys/net/ipv4/ping_group_range", "w") as f:
                f.write("0 0")
        except OSError:
            pass
        try:
            socket.sethostname(f"pasta-{socket.gethostname()}"[:HOSTNAME_MAX])
        except OSError:
            pass
        if os.read(go_r, 1) != b"g":  # pasta went away before the namespace was ready
            os._exit(1)
        os.close(go_r)
        _exec_command(command)
    finally:
        os._exit(1)


def _intermediate(command: tuple[str, ...], ready_w: int, go_r: int,
                  as_ids: isolation.Ids | None) -> None:
    """Our child: unshare the namespaces, fork PID 1 of the new PID namespace, tell the
    parent its pid, then wait for it and exit with its status. With `as_ids` (we are root),
    first become that user and create the user namespace too, mapping its root to them."""
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the command decides about ^C
        for sig in TERMINATE_SIGNALS:  # not our parent's handlers: a signal ends us
            signal.signal(sig, signal.SIG_DFL)
        try:
            if as_ids is not None:
                isolation.drop(as_ids, ())
                isolation.set_dumpable(True)  # so /proc/self/uid_map is ours to write
                netns.unshare(netns.CLONE_NEWUSER | SPAWN_NS_FLAGS)
                netns.write_id_maps(as_ids.uid, as_ids.gid)
            else:
                netns.unshare(SPAWN_NS_FLAGS)
        except OSError as e:
            os.write(ready_w, f"error {e.strerror}\n".encode())
            os._exit(1)
        pid = os.fork()
        if pid == 0:
            os.close(ready_w)
            _ns_init(command, go_r)
        os.close(go_r)
        os.write(ready_w, f"ok {pid}\n".encode())
        os.close(ready_w)
        _, status = os.waitpid(pid, 0)
        code = os.waitstatus_to_exitcode(status)
        os._exit(128 - code if code < 0 else code)
    finally:
        os._exit(1)


def spawn(command: tuple[str, ...], as_ids: isolation.Ids | None = None) -> Spawned:
    """Create the namespaces and the (held) command; must run single-threaded.

    Unprivileged (pasta's way), we enter a new user namespace first, as root in it, so we
    may setns() into the command's network namespace. As root about to become `as_ids`, the
    child creates the user namespace as that user instead and we stay in ours: as root now we
    may enter it, and as its owner's uid later we keep every capability in it."""
    if as_ids is None:
        uid, gid = os.geteuid(), os.getegid()
        try:
            netns.unshare(netns.CLONE_NEWUSER)
            netns.write_id_maps(uid, gid)
        except OSError as e:
            raise PastaError(f"cannot create a user namespace: {e.strerror}") from None
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        os.close(ready_r)
        os.close(go_w)
        _intermediate(command, ready_w, go_r, as_ids)
    os.close(ready_w)
    os.close(go_r)
    with os.fdopen(ready_r, "rb") as f:
        words = f.readline().decode(errors="replace").split(None, 1)
    if len(words) != 2 or words[0] != "ok":
        os.close(go_w)
        os.waitpid(pid, 0)
        reason = words[1].strip() if len(words) == 2 else "child exited"
        raise PastaError(f"cannot create namespaces: {reason}")
    return Spawned(pid, int(words[1]), go_w)


@dataclass
class Target:
    netns_fd: int
    watch_path: str | None = None  # exit when this goes away
    spawned: Spawned | None = None


def open_target(config: Config, as_ids: isolation.Ids | None = None) -> Target:
    """The namespace we serve, created (spawn mode) or joined (attach mode)."""
    if config.target_pid is None and config.netns is None:
        spawned = spawn(config.command, as_ids)
        path = f"/proc/{spawned.pid}/ns/net"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            os.close(spawned.go_fd)
            raise PastaError(f"cannot open {path}: {e.strerror}") from None
        return Target(fd, None, spawned)
    if config.target_pid is not None:
        path = f"/proc/{config.target_pid}/ns/net"
        userns = config.userns or f"/proc/{config.target_pid}/ns/user"
    else:
        assert config.netns is not None
        path = netns.netns_path(config.netns)
        userns = config.userns
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        raise PastaError(f"cannot open network namespace {path}: {e.strerror}") from None
    if userns and not config.netns_only:
        try:
            netns.join_userns(userns)
        except OSError as e:
            os.close(fd)
            raise PastaError(f"cannot join user namespace {userns}: {e.strerror}") from None
    return Target(fd, None if config.no_netns_quit else path)


# -- what --config-net copies from the host --------------------------------------------------


@dataclass
class HostSnapshot:
    """The template interfaces' addresses and routes, read in the host namespace."""

    addrs: list[tuple[str, int]] = field(default_factory=list)  # (address, prefix length)
    routes: list[dict[str, Any]] = field(default_factory=list)  # IPRoute.route() kwargs (rtnl.py)


def _route_kwargs(r: Any, family: int, ifindex: int) -> dict[str, Any] | None:
    """A host route on `ifindex` as arguments for adding it on the tap (oif set later);
    None for routes that are not (only) through the template interface."""
    if r["type"] != RTN_UNICAST or r.get_attr("RTA_TABLE") not in (None, RT_TABLE_MAIN):
        return None
    dst = r.get_attr("RTA_DST")
    kw: dict[str, Any] = {
        "family": family,
        "dst": f"{dst}/{r['dst_len']}" if dst else ("0.0.0.0/0" if family == socket.AF_INET
                                                     else "::/0"),
        "table": RT_TABLE_MAIN,
        "proto": r["proto"],
        "scope": r["scope"],
        "type": RTN_UNICAST,
    }
    prio = r.get_attr("RTA_PRIORITY")
    if prio is not None:
        kw["priority"] = prio
    hops = r.get_attr("RTA_MULTIPATH")
    if hops:
        if any(nh.get("oif") != ifindex for nh in hops):
            return None
        kw["multipath"] = [{"gateway": nh.get_attr("RTA_GATEWAY"), "hops": nh.get("hops", 0)}
                           for nh in hops]
        return kw
    if r.get_attr("RTA_OIF") != ifindex:
        return None
    gw = r.get_attr("RTA_GATEWAY")
    if gw:
        kw["gateway"] = gw
    return kw


def host_snapshot(config: Config) -> dict[int, HostSnapshot]:
    """Per family, what --config-net copies (nothing for a family given -a / -g)."""
    from vhostpasst.system.rtnl import IPRoute

    out: dict[int, HostSnapshot] = {}
    fams: list[tuple[int, Any]] = [(socket.AF_INET, config.ip4), (socket.AF_INET6, config.ip6)]
    with IPRoute() as ipr:
        for family, fam in fams:
            if fam is None or not fam.ifindex:
                continue
            snap = HostSnapshot()
            if not (config.no_copy_addrs or fam.no_copy_addrs):
                for m in ipr.get_addr(family=family, index=fam.ifindex):
                    flags = m.get_attr("IFA_FLAGS") or m["flags"]
                    if m["scope"] == RT_SCOPE_LINK or flags & IFA_F_DEPRECATED:
                        continue
                    text = m.get_attr("IFA_LOCAL") or m.get_attr("IFA_ADDRESS")
                    if text:
                        snap.addrs.append((text, m["prefixlen"]))
            if not (config.no_copy_routes or fam.no_copy_routes):
                for r in ipr.get_routes(family=family, table=RT_TABLE_MAIN):
                    kw = _route_kwargs(r, family, fam.ifindex)
                    if kw is not None:
                        snap.routes.append(kw)
            out[family] = snap
    return out


# -- inside the namespace --------------------------------------------------------------------


@dataclass
class NsLink:
    fd: int
    ifname: str
    ifindex: int
    mac: bytes
    addr6_ll: IPv6Address | None = None


def _netlink_error(e: Exception) -> int:
    return int(getattr(e, "code", 0) or 0)


def _add_routes(ipr: Any, routes: list[dict[str, Any]], ifindex: int) -> None:
    """Insert routes in passes, so one via a gateway that another route makes reachable
    goes in once that one is there; existing routes are fine."""
    pending = []
    for kw in routes:
        kw = dict(kw)
        if "multipath" in kw:
            kw["multipath"] = [dict(nh, oif=ifindex) for nh in kw["multipath"]]
        else:
            kw["oif"] = ifindex
        pending.append(kw)
    for _ in range(ROUTE_PASSES):
        left = []
        for kw in pending:
            try:
                ipr.route("add", **kw)
            except Exception as e:
                code = _netlink_error(e)
                if code == errno.EEXIST:
                    continue
                if code in _ROUTE_RETRY:
                    left.append(kw)
                    continue
                raise PastaError(f"cannot add route {kw.get('dst')}: {e}") from None
        if not left or len(left) == len(pending):
            for kw in left:
                log.debug("route %s not added: unreachable gateway", kw.get("dst"))
            return
        pending = left


def _link_local(ipr: Any, ifindex: int, wait: float) -> IPv6Address | None:
    """The tap's IPv6 link-local address, as soon as the kernel has added it (at once, when
    the link comes up). It stays tentative until the kernel's link watch has seen the tap's
    carrier, which runs at most once a second for all interfaces: 0.3-0.9 s here, and waiting
    for that was half of a start with IPv6. pasta does not wait either; the global addresses
    (NODAD) work at once, and NDP takes them as source meanwhile."""
    deadline = time.monotonic() + wait
    while True:
        for m in ipr.get_addr(family=socket.AF_INET6, index=ifindex):
            if m["scope"] == RT_SCOPE_LINK:
                return IPv6Address(m.get_attr("IFA_ADDRESS"))
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.02)


def configure_net(ipr: Any, ifindex: int, config: Config,
                  host: dict[int, HostSnapshot]) -> IPv6Address | None:
    """--config-net: MTU, link up, addresses and routes; returns the link-local address."""
    if config.mtu:
        ipr.link("set", index=ifindex, mtu=config.mtu)
    ip4, ip6 = config.ip4, config.ip6
    # no DAD delay: accept_dad off, and IFF_NOARP while the link comes up (the kernel skips
    # DAD for NOARP links), so the addresses are usable at once
    if ip6 is not None:
        ifname = ipr.get_links(ifindex)[0].get_attr("IFLA_IFNAME")
        try:  # /proc/sys/net is the namespace of the thread that opens it: this one
            with open(f"/proc/sys/net/ipv6/conf/{ifname}/accept_dad", "w") as f:
                f.write("0")
        except OSError as e:
            log.debug("cannot disable DAD on %s: %s", ifname, e)
        ipr.link("set", index=ifindex, flags=IFF_UP | IFF_NOARP, change=IFF_UP | IFF_NOARP)
    else:
        ipr.link("set", index=ifindex, state="up")

    def add_addr(addr: str, prefix: int) -> None:
        try:
            ipr.addr("add", index=ifindex, address=addr, prefixlen=prefix, flags=IFA_F_NODAD)
        except Exception as e:
            if _netlink_error(e) != errno.EEXIST:
                raise PastaError(f"cannot add address {addr}/{prefix}: {e}") from None

    if ip4 is not None:
        snap = host.get(socket.AF_INET)
        if snap is not None and snap.addrs:
            for a, p in snap.addrs:
                add_addr(a, p)
        elif ip4.addr is not None:
            add_addr(str(ip4.addr), ip4.prefix_len)
        if snap is not None and snap.routes:
            _add_routes(ipr, snap.routes, ifindex)
        elif ip4.gateway is not None:
            _add_routes(ipr, [{"family": socket.AF_INET, "dst": "0.0.0.0/0",
                               "gateway": str(ip4.gateway), "table": RT_TABLE_MAIN}], ifindex)
    ll: IPv6Address | None = None
    if ip6 is not None:
        ll = _link_local(ipr, ifindex, LL_WAIT)
        if ll is not None:  # keep it out of DAD for good once IFF_NOARP goes
            try:
                ipr.addr("replace", index=ifindex, address=str(ll), prefixlen=64,
                         flags=IFA_F_NODAD)
            except Exception as e:
                log.debug("link-local %s: cannot set nodad: %s", ll, e)
        snap = host.get(socket.AF_INET6)
        if snap is not None and snap.addrs:
            for a, p in snap.addrs:
                add_addr(a, p)
        elif ip6.addr is not None:
            add_addr(str(ip6.addr), 64)
        if snap is not None and snap.routes:
            _add_routes(ipr, snap.routes, ifindex)
        elif ip6.gateway is not None:
            _add_routes(ipr, [{"family": socket.AF_INET6, "dst": "::/0",
                               "gateway": str(ip6.gateway), "table": RT_TABLE_MAIN}], ifindex)
        ipr.link("set", index=ifindex, flags=0, change=IFF_NOARP)
    return ll


TUNGETIFF = 0x800454D2  # _IOR('T', 210, unsigned int)


def tap_name(fd: int) -> str:
    """The interface behind a tap fd (--fd): TUNGETIFF."""
    import fcntl

    from vhostpasst.link.tuntap import _IFREQ

    ifr = fcntl.ioctl(fd, TUNGETIFF, _IFREQ.pack(b"", 0))
    return str(_IFREQ.unpack(ifr)[0].split(b"\0", 1)[0].decode())


def setup_ns_link(config: Config, host: dict[int, HostSnapshot]) -> NsLink:
    """Runs in the namespace: the tap (opened, or --fd's), `lo` up, the MAC, --config-net."""
    from vhostpasst.link.tuntap import open_tap
    from vhostpasst.system.rtnl import IPRoute

    assert config.ns_ifname is not None
    if config.fd is not None:  # the caller's tap: used as it is, only made non-blocking
        fd = config.fd
        os.set_blocking(fd, False)
        name = tap_name(fd)
    else:
        fd, name = open_tap(config.ns_ifname)
    try:
        with IPRoute() as ipr:
            lo = ipr.link_lookup(ifname="lo")
            if lo:
                ipr.link("set", index=lo[0], state="up")
            found = ipr.link_lookup(ifname=name)
            if not found:
                raise PastaError(f"no interface {name} in the namespace")
            index = found[0]
            if config.ns_mac is not None:
                mac_text = ":".join(f"{b:02x}" for b in config.ns_mac)
                ipr.link("set", index=index, address=mac_text)
            link = ipr.get_links(index)[0]
            mac = bytes.fromhex(link.get_attr("IFLA_ADDRESS").replace(":", ""))
            ll = configure_net(ipr, index, config, host) if config.config_net else None
    except BaseException:
        os.close(fd)
        raise
    return NsLink(fd, name, index, mac, ll)


# -- quitting when the namespace goes ------------------------------------------------------


class NetnsWatch:
    """Calls `on_gone` once the namespace file disappears: inotify IN_DELETE on its directory,
    or (for /proc, /sys and devpts, where inotify says nothing) a check every second."""

    def __init__(self, loop: Any, path: str, on_gone: Callable[[], None]) -> None:
        self.loop = loop
        self.path = path
        self.on_gone = on_gone
        self.dir, self.base = os.path.split(os.path.abspath(path))
        # held open: the sandbox empties our root, so the check goes relative to it
        self.dir_fd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fd: int | None = None
        self.timer: Any = None
        fstype = _fs_type(self.dir)
        if fstype in ("proc", "sysfs", "devpts") or self.dir.startswith("/proc/"):
            self.timer = loop.call_later(QUIT_POLL_INTERVAL, self._poll)
        else:
            self.fd = netns.inotify_init()
            netns.inotify_add_watch(self.fd, self.dir, netns.IN_DELETE)
            loop.add_fd(self.fd, EPOLLIN, self._on_inotify)

    def _gone(self) -> bool:
        try:
            fd = os.open(self.base, os.O_PATH | os.O_CLOEXEC, dir_fd=self.dir_fd)
        except PermissionError:
            return False
        except OSError:
            return True
        os.close(fd)
        return False

    def _poll(self) -> None:
        if self._gone():
            log.info("namespace %s is gone, exiting", self.path)
            self.on_gone()
        else:
            self.timer = self.loop.call_later(QUIT_POLL_INTERVAL, self._poll)

    def _on_inotify(self, _mask: int) -> None:
        assert self.fd is not None
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        for mask, name in netns.inotify_events(data):
            if mask & netns.IN_DELETE and name == self.base:
                log.info("namespace %s is gone, exiting", self.path)
                self.on_gone()
                return

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.fd is not None:
            self.loop.remove_fd(self.fd)
            os.close(self.fd)
            self.fd = None
        if self.dir_fd >= 0:
            os.close(self.dir_fd)
            self.dir_fd = -1


def _fs_type(path: str) -> str:
    """The filesystem type of the mount holding `path` (longest matching mount point)."""
    best, best_type = "", ""
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                cols = line.split()
                if len(cols) < 3:
                    continue
                mnt = cols[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, best_type = mnt, cols[2]
    except OSError:
        pass
    return best_type


# -- forwarding -----------------------------------------------------------------------------


def _ns_target(config: Config, dispatcher: Any) -> Callable[[int], str]:
    """Where host-loopback traffic goes in the namespace (reference 4.5): the address the
    namespace was seen using (or was given), its loopback with --host-lo-to-ns-lo."""

    def target(family: int) -> str:
        six = family == socket.AF_INET6
        if not config.host_lo_to_ns_lo:
            fam = config.ip6 if six else config.ip4
            seen = dispatcher.addr6_seen if six else dispatcher.addr4_seen
            addr = seen or (fam.addr if fam is not None else None)
            if addr is not None:
                return str(addr)
        return "::1" if six else "127.0.0.1"

    return target


def _auto_ports(loop: Any, config: Config, netns_fd: int, dispatcher: Any, splice: TcpSplice,
                usplice: UdpSplice, fams: list[int]) -> AutoPorts | None:
    """The port scanner for the directions given as `auto` (pasta's default), or None."""
    def is_auto(spec: Any) -> bool:
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


# -- run ------------------------------------------------------------------------------------


def run(config: Config) -> int:
    """Start-up order (each step needs what the one before made):
    logging, files, host listeners (-t/-u, while root may bind low ports); the namespace
    (spawn: as the target user already, see below); fork to the background; the namespace
    helper thread; the tap and its configuration; namespace listeners (-T/-U) and the splice
    path; giving up root and capabilities; then "ready": the parent exits 0 / the pid file is
    written / the spawned command starts. A client may connect once any of those happened."""
    from vhostpasst.core.loop import Loop
    from vhostpasst.core.pcap import PcapWriter
    from vhostpasst.dispatch import Dispatcher
    from vhostpasst.link.tuntap import TapLink

    process = Process()  # SIGTERM/SIGQUIT held back from here on
    spawn_mode = config.target_pid is None and config.netns is None
    foreground = config.foreground or spawn_mode
    # spawn mode shares the terminal with the command: quiet unless debugging
    quiet = config.quiet or (spawn_mode and not (config.debug or config.trace))
    setup_logging("pasta", foreground, config.debug, config.trace, quiet,
                  config.log_file, config.log_size)
    box = Sandbox("pasta", config.chroot_fallback)
    try:
        box.prepare()  # every import, while we may read every file
    except SandboxError as e:
        log.error("%s", e)
        return 1
    try:
        ids = isolation.target_ids(config.runas)
    except isolation.RunasError as e:
        log.error("--runas: %s", e)
        return 1
    switching = isolation.needs_switch(ids)
    # files are opened while we may still create them (pasta: before setuid)
    pcap: PcapWriter | None = None
    try:
        if config.pid_file:  # written at "ready", inside the sandbox or by the parent
            process.open_pid_file(config.pid_file)
        pcap = PcapWriter(config.pcap_file) if config.pcap_file else None
    except OSError as e:
        log.error("cannot open %s: %s", e.filename, e.strerror)
        return 1

    flow.raise_fd_limit()  # before the flow table sizes itself by it (the command gets it back)
    loop = Loop()
    dispatcher = Dispatcher(config, loop)
    try:
        host = host_snapshot(config) if config.config_net else {}
        dispatcher.listen()  # host side -t/-u: bound before anything can report ready
    except OSError as e:
        log.error("cannot forward ports: %s", e)
        dispatcher.close()
        return 1
    try:
        # spawn mode as root: the command's user namespace maps its root to the target user
        # before any thread: unshare/setns(USER) need that
        target = open_target(config, ids if switching else None)
    except (PastaError, OSError) as e:
        log.error("%s", e)
        dispatcher.close()
        return 1
    spawned = target.spawned
    if switching and not spawn_mode and not isolation.in_initial_userns():
        # we joined the target's user namespace (PID, --userns): switch to the same user
        # there if it is mapped; otherwise the setuid() is impossible and we stay the
        # namespace's root -- with the capabilities reduced below, like pasta in a userns
        assert ids is not None
        mapped = isolation.map_ids(ids)
        if mapped is None:
            log.warning("uid %d is not mapped in the joined user namespace: not switching",
                        ids.uid)
            switching = False
        ids = mapped
    if spawn_mode:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C is for the command
    if not foreground:
        process.to_background()

    def abandon() -> None:
        if spawned is not None:
            os.close(spawned.go_fd)  # the held command exits without running
            os.waitpid(spawned.pid, 0)
        dispatcher.close()
        os.close(target.netns_fd)

    try:
        helper = netns.NsThread(target.netns_fd)
    except OSError as e:
        log.error("cannot enter the namespace: %s", e.strerror)
        abandon()
        return 1
    try:
        nslink = netns.call_in_netns(target.netns_fd, setup_ns_link, config, host)
    except Exception as e:  # PastaError, OSError (rtnl's NetlinkError)
        log.error("cannot set up the namespace interface: %s", e)
        helper.close()
        abandon()
        return 1
    log.debug("namespace interface %s (index %d), MAC %s", nslink.ifname, nslink.ifindex,
              nslink.mac.hex(":"))

    status = [0]

    def stop(code: int = 0) -> None:
        status[0] = code
        loop.stop()

    watch: NetnsWatch | None = None
    ns_target = _ns_target(config, dispatcher)
    splice = TcpSplice(loop, target.netns_fd, ns_target)
    usplice = UdpSplice(loop, target.netns_fd, ns_target)
    fams = [f for f, c in ((socket.AF_INET, config.ip4), (socket.AF_INET6, config.ip6)) if c]
    try:
        # -T/-U: listeners on the namespace's loopback, spliced to the host's
        splice.listen_ns(target.netns_fd, config.tcp_out, fams)
        usplice.listen(config.udp_out, fams, to_ns=False)
        if not config.no_splice:  # -t/-u from the host's loopback: not through the tap
            if dispatcher.tcp is not None:
                dispatcher.tcp.claim = splice.claim
            usplice.listen(config.udp_in, fams, to_ns=True)
        auto = _auto_ports(loop, config, target.netns_fd, dispatcher, splice, usplice, fams)
        # the watch is set up while its directory is still readable to us
        watch = NetnsWatch(loop, target.watch_path, stop) if target.watch_path else None
    except OSError as e:
        log.error("cannot forward ports from the namespace: %s", e)
        ok = False
    else:
        try:
            # mount, IPC and UTS namespaces and the empty root while we may still mount; then
            # the last thing that needs privileges; the helper thread stays in the namespace
            # and keeps CAP_NET_BIND_SERVICE there (reference 7: pasta keeps it for low ports)
            box.prefork(own_userns=False, threads=(helper.run,))
            isolation.drop(ids if switching else None, (isolation.CAP_NET_BIND_SERVICE,),
                           (helper.run,))
            ok = True
        except SandboxError as e:
            log.error("%s", e)
            ok = False
        except OSError as e:
            log.error("cannot drop privileges: %s", e)
            ok = False
    if not ok:
        if watch is not None:
            watch.close()
        usplice.close()
        splice.close()
        os.close(nslink.fd)
        helper.close()
        abandon()
        return 1
    if switching:
        assert ids is not None
        log.debug("now running as uid %d, gid %d", ids.uid, ids.gid)
    link = TapLink(loop, nslink.fd, dispatcher.on_frames, pcap=pcap, on_exit=lambda: stop(1))
    dispatcher.link = link
    # the namespace's MAC is known from the start: frames to it need not be broadcast
    dispatcher.guest_mac = nslink.mac
    if dispatcher.ctx is not None:
        dispatcher.ctx.guest.mac = nslink.mac
    if nslink.addr6_ll is not None:
        dispatcher.addr6_ll_seen = nslink.addr6_ll

    pidfd: int | None = None
    if spawned is not None:
        pidfd = os.pidfd_open(spawned.pid)

        def on_child(_mask: int) -> None:
            pid, wstatus = os.waitpid(spawned.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(wstatus)
                spawned.pid = 0
                stop(128 - code if code < 0 else code)

        loop.add_fd(pidfd, EPOLLIN, on_child)

    if auto is not None:
        auto.start()
    if not quiet:
        for line in summary(config):
            log.info("%s", line)
    # ready: every listener is bound, so whoever waits on one of these may connect at once
    try:  # every thread in the empty root, then the filter (reference 7: isolate_postfork)
        box.postfork((helper.run,))
    except SandboxError as e:
        log.error("%s", e)
        os._exit(1)  # nothing of the host is reachable any more to clean up with
    process.ready(box.devnull)
    if spawned is not None:
        os.write(spawned.go_fd, b"g")  # the namespace is ready: run the command
        os.close(spawned.go_fd)

    try:
        process.run(loop)
    finally:
        if spawned is not None and spawned.pid:
            # we are going: take the command's PID namespace down with us
            try:
                os.kill(spawned.init_pid, signal.SIGKILL)
                os.waitpid(spawned.pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass
        if watch is not None:
            watch.close()
        if pidfd is not None:
            loop.remove_fd(pidfd)
            os.close(pidfd)
        if auto is not None:
            auto.close()
        usplice.close()
        splice.close()
        dispatcher.close()
        link.close()
        if pcap is not None:
            pcap.close()
        helper.close()
        loop.close()
        os.close(target.netns_fd)
    return status[0]
