"""Command line: getopt_long semantics over the whole passt and pasta option set.

`parse_args()` turns argv into `Options` (what the user said, validated, nothing looked up on
the host); `conf.build_config()` then adds what the host says. Parsing follows getopt_long
with a leading "+" in the optstring: bundled short options (`-fq`), attached values
(`-Pfile`, `--pid=file`), unambiguous long-option prefixes, `--`, and parsing stops at the
first non-option argument (pasta's PID or COMMAND).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address

from vhostpasst.config import fwd
from vhostpasst.config.errors import ConfigError
from vhostpasst.config.fwd import IFNAMSIZ, PortForwards
from vhostpasst.config.options import BOTH, MAXNS, PASST, PASTA, IPAddr, Options
from vhostpasst.wire.ip import BROADCAST4

MTU_MIN = 68
MTU_MAX = 65535
# Rotation needs room for a few pages of log, whatever the page size.
LOG_SIZE_MIN = 5 * max(8192, os.sysconf("SC_PAGE_SIZE"))
PATH_MAX = 4096
UNIX_PATH_MAX = 108  # sizeof(sun_path), including the NUL
MAXDNSRCH = 6  # search domains, as resolv(5)


@dataclass(frozen=True)
class _Opt:
    name: str  # canonical long name, used in messages
    short: str | None
    arg: bool
    modes: tuple[str, ...] = BOTH


_OPTS = [
    _Opt("debug", "d", False),
    _Opt("quiet", "q", False),
    _Opt("foreground", "f", False),
    _Opt("stderr", "e", False),
    _Opt("log-file", "l", True),
    _Opt("log-size", None, True),
    _Opt("help", "h", False),
    _Opt("version", None, False),
    _Opt("trace", None, False),
    _Opt("stats", None, True),
    _Opt("runas", None, True),
    _Opt("socket", "s", True, (PASST,)),
    _Opt("fd", "F", True),
    _Opt("ns-ifname", "I", True, (PASTA,)),
    _Opt("pcap", "p", True),
    _Opt("pid", "P", True),
    _Opt("mtu", "m", True),
    _Opt("address", "a", True),
    _Opt("netmask", "n", True),
    _Opt("mac-addr", "M", True),
    _Opt("gateway", "g", True),
    _Opt("interface", "i", True),
    _Opt("outbound", "o", True),
    _Opt("outbound-if4", None, True),
    _Opt("outbound-if6", None, True),
    _Opt("dns", "D", True),
    _Opt("search", "S", True),
    _Opt("dns-forward", None, True),
    _Opt("dns-host", None, True),
    _Opt("no-dhcp-dns", None, False, (PASST,)),
    _Opt("no-dhcp-search", None, False, (PASST,)),
    _Opt("dhcp-dns", None, False, (PASTA,)),
    _Opt("dhcp-search", None, False, (PASTA,)),
    _Opt("hostname", "H", True),
    _Opt("fqdn", None, True),
    _Opt("no-dhcp", None, False),
    _Opt("no-ndp", None, False),
    _Opt("no-dhcpv6", None, False),
    _Opt("no-ra", None, False),
    _Opt("no-tcp", None, False),
    _Opt("no-udp", None, False),
    _Opt("no-icmp", None, False),
    _Opt("freebind", None, False),
    _Opt("chroot-fallback", None, False),
    _Opt("map-host-loopback", None, True),
    _Opt("map-guest-addr", None, True),
    _Opt("no-map-gw", None, False),
    _Opt("host-lo-to-ns-lo", None, False, (PASTA,)),
    _Opt("ipv4-only", "4", False),
    _Opt("ipv6-only", "6", False),
    _Opt("one-off", "1", False, (PASST,)),
    _Opt("tcp-ports", "t", True),
    _Opt("udp-ports", "u", True),
    _Opt("tcp-ns", "T", True, (PASTA,)),
    _Opt("udp-ns", "U", True, (PASTA,)),
    _Opt("vhost-user", None, False, (PASST,)),
    _Opt("print-capabilities", None, False, (PASST,)),
    _Opt("repair-path", None, True, (PASST,)),
    _Opt("migrate-exit", None, False, (PASST,)),
    _Opt("migrate-no-linger", None, False, (PASST,)),
    _Opt("conf-path", "c", True),
    _Opt("netns", None, True, (PASTA,)),
    _Opt("userns", None, True, (PASTA,)),
    _Opt("netns-only", None, False, (PASTA,)),
    _Opt("no-netns-quit", None, False, (PASTA,)),
    _Opt("ns-mac-addr", None, True, (PASTA,)),
    _Opt("config-net", None, False, (PASTA,)),
    _Opt("no-copy-routes", None, False, (PASTA,)),
    _Opt("no-copy-addrs", None, False, (PASTA,)),
    _Opt("no-splice", None, False, (PASTA,)),
    _Opt("splice-only", None, False, (PASTA,)),
]
_BY_NAME = {o.name: o for o in _OPTS}
_BY_SHORT = {o.short: o for o in _OPTS if o.short}
# Long spellings: every canonical name plus the aliases passt accepts.
_LONG = {o.name: o for o in _OPTS} | {"socket-path": _BY_NAME["socket"]}


def optstring(mode: str) -> str:
    """The short-option string of a mode, in getopt(3) notation."""
    shorts = (o for o in _OPTS if o.short and mode in o.modes)
    return "+" + "".join(f"{o.short}{':' if o.arg else ''}" for o in shorts)


def _flag(o: _Opt) -> str:
    return f"--{o.name}"


# -- value parsers -------------------------------------------------------------------------


def _int(option: str, text: str) -> int:
    """Decimal, or hexadecimal with 0x, as strtol(..., 0) reads them (but no octal surprise)."""
    t = text.strip()
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", t):
            return int(t, 16)
        if re.fullmatch(r"[0-9]+", t):
            return int(t, 10)
    except ValueError:
        pass
    raise ConfigError(option, f"'{text}' is not a non-negative integer")


def _path(option: str, text: str, limit: int = PATH_MAX) -> str:
    if not text:
        raise ConfigError(option, "empty path")
    if len(os.fsencode(text)) >= limit:
        raise ConfigError(option, f"path longer than {limit - 1} bytes")
    return text


def _ifname(option: str, text: str) -> str:
    # The kernel's dev_valid_name() rules.
    if not text or len(text.encode()) >= IFNAMSIZ:
        raise ConfigError(option, f"'{text}' is not a valid interface name")
    if text in (".", "..") or any(c in "/:" or c.isspace() for c in text):
        raise ConfigError(option, f"'{text}' is not a valid interface name")
    return text


def _ip(option: str, text: str) -> IPAddr:
    try:
        addr = ip_address(text)
    except ValueError:
        raise ConfigError(option, f"'{text}' is not an IPv4 or IPv6 address") from None
    if isinstance(addr, IPv6Address) and addr.scope_id:
        raise ConfigError(option, f"'{text}': a scope (%IFNAME) is not allowed here")
    return addr


def _is_v4_compat(addr: IPAddr) -> bool:
    # ::a.b.c.d (deprecated); :: and ::1 are not
    return isinstance(addr, IPv6Address) and int(addr) >> 32 == 0 and int(addr) > 1


def _unicast(option: str, text: str, *, loopback: bool = False) -> IPAddr:
    """An address usable as a host or router address."""
    addr = _ip(option, text)
    if addr.is_unspecified:
        raise ConfigError(option, f"{addr} is the unspecified address")
    if addr.is_multicast:
        raise ConfigError(option, f"{addr} is a multicast address")
    if addr == BROADCAST4:
        raise ConfigError(option, f"{addr} is the broadcast address")
    if not loopback and addr.is_loopback:
        raise ConfigError(option, f"{addr} is a loopback address")
    if isinstance(addr, IPv6Address) and (addr.ipv4_mapped or _is_v4_compat(addr)):
        raise ConfigError(option, f"{addr} is an IPv4-mapped or IPv4-compatible address")
    return addr


def _prefix_len(option: str, text: str, bits: int) -> int:
    if not re.fullmatch(r"[0-9]{1,3}", text) or int(text) > bits:
        raise ConfigError(option, f"'{text}' is not a prefix length 0..{bits}")
    return int(text)


def _netmask(option: str, text: str) -> int:
    """Dotted-quad mask (contiguous) or prefix length."""
    if "." not in text:
        return _prefix_len(option, text, 32)
    try:
        mask = int(IPv4Address(text))
    except ValueError:
        raise ConfigError(option, f"'{text}' is not a netmask") from None
    length = bin(mask).count("1")
    if mask != (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF:
        raise ConfigError(option, f"'{text}' is not a contiguous netmask")
    return length


_MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")


def _mac(option: str, text: str) -> bytes:
    if not _MAC_RE.fullmatch(text):
        raise ConfigError(option, f"'{text}' is not a MAC address (xx:xx:xx:xx:xx:xx)")
    mac = bytes.fromhex(text.replace(":", ""))
    if mac[0] & 1:
        raise ConfigError(option, f"{text} is a multicast or broadcast address")
    if not any(mac):
        raise ConfigError(option, f"{text} is the null address")
    return mac


_LABEL_RE = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _domain(option: str, text: str) -> str:
    name = text[:-1] if text.endswith(".") and text != "." else text
    if not name or len(name) > 253:
        raise ConfigError(option, f"'{text}' is not a valid domain name")
    if name != "." and not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ConfigError(option, f"'{text}' is not a valid domain name")
    return text


def _hostname(option: str, text: str) -> str:
    # DHCP option 12 is opaque to us, but keep it printable and one word.
    if not text or len(text) > 253 or not text.isprintable() or any(c.isspace() for c in text):
        raise ConfigError(option, f"'{text}' is not a valid host name")
    return text


_USER_RE = re.compile(r"[A-Za-z0-9_.][A-Za-z0-9_.-]*\$?")


def _runas(option: str, text: str) -> str:
    user, sep, group = text.partition(":")
    if not _USER_RE.fullmatch(user) or (sep and not _USER_RE.fullmatch(group)):
        raise ConfigError(option, f"'{text}' is not UID[:GID] or LOGIN[:GROUP]")
    from vhostpasst.system.isolation import RunasError, resolve_runas

    try:  # an unknown user or group is a configuration error, as in passt
        resolve_runas(text)
    except RunasError as e:
        raise ConfigError(option, str(e)) from None
    return text


# -- getopt_long ---------------------------------------------------------------------------


def _lookup_long(name: str) -> _Opt:
    if name in _LONG:
        return _LONG[name]
    if not name:
        raise ConfigError("--", "unrecognized option")
    matches = {o.name: o for key, o in _LONG.items() if key.startswith(name)}
    if len(matches) == 1:
        return next(iter(matches.values()))
    if not matches:
        raise ConfigError(f"--{name}", "unrecognized option")
    choices = ", ".join(f"--{n}" for n in sorted(matches))
    raise ConfigError(f"--{name}", f"ambiguous option (could be {choices})")


def _getopt(argv: list[str], mode: str, rest: list[str]) -> Iterator[tuple[_Opt, str | None]]:
    """Yield (option, value) pairs in order; the operands left over go into `rest`.

    A generator, so that an option acting at once (--help) stops before later errors.
    """
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg == "--":
            rest.extend(argv[i:])
            return
        if arg.startswith("--"):
            name, eq, value = arg[2:].partition("=")
            opt = _lookup_long(name)
            if opt.arg and not eq:
                if i >= len(argv):
                    raise ConfigError(_flag(opt), "option requires an argument")
                value = argv[i]
                i += 1
            elif not opt.arg and eq:
                raise ConfigError(_flag(opt), "option does not take an argument")
            yield opt, (value if opt.arg else None)
            continue
        if not arg.startswith("-") or arg == "-":
            rest.extend(argv[i - 1 :])  # "+": stop at the first operand
            return
        pos = 1
        while pos < len(arg):
            ch = arg[pos]
            pos += 1
            short = _BY_SHORT.get(ch)
            if short is None or mode not in short.modes:
                if short is not None:
                    other = PASTA if mode == PASST else PASST
                    raise ConfigError(f"-{ch}", f"only valid in {other} mode")
                raise ConfigError(f"-{ch}", "invalid option")
            if not short.arg:
                yield short, None
                continue
            if pos < len(arg):
                yield short, arg[pos:]
            elif i < len(argv):
                i += 1
                yield short, argv[i - 1]
            else:
                raise ConfigError(f"-{ch}", "option requires an argument")
            break


# -- option handlers -----------------------------------------------------------------------


class _Parser:
    def __init__(self, mode: str) -> None:
        self.o = Options(mode=mode)
        self.mode = mode

    def handle(self, opt: _Opt, value: str | None) -> bool:
        """Apply one option; False means stop parsing (help, version, capabilities)."""
        name = _flag(opt)
        if self.mode not in opt.modes:
            other = PASTA if self.mode == PASST else PASST
            raise ConfigError(name, f"only valid in {other} mode")
        handler = getattr(self, "opt_" + opt.name.replace("-", "_"), None)
        if handler is None:  # a plain switch: the field is named after the option
            setattr(self.o, opt.name.replace("-", "_"), True)
            return True
        if opt.arg:
            assert value is not None
            return handler(name, value) is not False
        return handler(name) is not False

    # actions stop parsing where they appear, as getopt-driven C programs do
    def opt_help(self, _n: str) -> bool:
        self.o.action = "help"
        return False

    def opt_version(self, _n: str) -> bool:
        self.o.action = "version"
        return False

    def opt_print_capabilities(self, _n: str) -> bool:
        self.o.action = "capabilities"
        return False

    def opt_trace(self, _n: str) -> None:
        self.o.trace = self.o.debug = True

    def opt_stats(self, n: str, v: str) -> None:
        self.o.stats = _int(n, v)

    def opt_log_file(self, n: str, v: str) -> None:
        self.o.log_file = _path(n, v)

    def opt_log_size(self, n: str, v: str) -> None:
        size = _int(n, v)
        if size < LOG_SIZE_MIN:
            raise ConfigError(n, f"{size} is below the minimum {LOG_SIZE_MIN}")
        self.o.log_size = size

    def opt_runas(self, n: str, v: str) -> None:
        self.o.runas = _runas(n, v)

    def opt_socket(self, n: str, v: str) -> None:
        self.o.socket_path = _path(n, v, UNIX_PATH_MAX)

    def opt_fd(self, n: str, v: str) -> None:
        fd = _int(n, v)
        if fd > 2**31 - 1:
            raise ConfigError(n, f"{v} is not a file descriptor")
        self.o.fd = fd
        self.o.one_off = True  # the socket cannot be re-accepted

    def opt_pcap(self, n: str, v: str) -> None:
        self.o.pcap_file = _path(n, v)

    def opt_pid(self, n: str, v: str) -> None:
        self.o.pid_file = _path(n, v)

    def opt_repair_path(self, n: str, v: str) -> None:
        self.o.repair_path = _path(n, v, UNIX_PATH_MAX)

    def opt_conf_path(self, n: str, v: str) -> None:
        self.o.conf_path = _path(n, v, UNIX_PATH_MAX)

    def opt_mtu(self, n: str, v: str) -> None:
        mtu = _int(n, v)
        if mtu != 0 and not MTU_MIN <= mtu <= MTU_MAX:
            raise ConfigError(n, f"{v} is out of range {MTU_MIN}..{MTU_MAX}")
        self.o.mtu = mtu

    def opt_address(self, n: str, v: str) -> None:
        text, slash, plen = v.partition("/")
        addr = _unicast(n, text)
        if isinstance(addr, IPv4Address):
            self.o.addr4 = addr
            if slash:
                self.o.prefix_len4 = _prefix_len(n, plen, 32)
        else:
            if addr.is_link_local:
                raise ConfigError(n, f"{addr} is link-local: the guest picks its own")
            self.o.addr6 = addr
            if slash:
                self.o.prefix_len6 = _prefix_len(n, plen, 128)

    def opt_netmask(self, n: str, v: str) -> None:
        self.o.prefix_len4 = _netmask(n, v)

    def opt_mac_addr(self, n: str, v: str) -> None:
        self.o.mac = _mac(n, v)

    def opt_ns_mac_addr(self, n: str, v: str) -> None:
        self.o.ns_mac = _mac(n, v)

    def opt_gateway(self, n: str, v: str) -> None:
        addr = _unicast(n, v)
        if isinstance(addr, IPv4Address):
            self.o.gateway4 = addr
        else:
            self.o.gateway6 = addr

    def opt_interface(self, n: str, v: str) -> None:
        self.o.ifname = _ifname(n, v)

    def opt_ns_ifname(self, n: str, v: str) -> None:
        self.o.ns_ifname = _ifname(n, v)

    def opt_outbound(self, n: str, v: str) -> None:
        addr = _unicast(n, v)
        if isinstance(addr, IPv4Address):
            self.o.outbound4 = addr
        else:
            self.o.outbound6 = addr

    def opt_outbound_if4(self, n: str, v: str) -> None:
        self.o.outbound_if4 = _ifname(n, v)

    def opt_outbound_if6(self, n: str, v: str) -> None:
        self.o.outbound_if6 = _ifname(n, v)

    def opt_dns(self, n: str, v: str) -> None:
        if v == "none":
            if self.o.dns:
                raise ConfigError(n, "'none' conflicts with the addresses given before it")
            self.o.dns_none = True
            return
        if self.o.dns_none:
            raise ConfigError(n, f"'{v}' conflicts with an earlier '-D none'")
        addr = _ip(n, v)
        if addr.is_unspecified or addr.is_multicast or addr == BROADCAST4:
            raise ConfigError(n, f"{addr} cannot be a name server")
        if sum(a.version == addr.version for a in self.o.dns) >= MAXNS:
            raise ConfigError(n, f"too many IPv{addr.version} name servers (at most {MAXNS})")
        if addr not in self.o.dns:
            self.o.dns.append(addr)

    def opt_search(self, n: str, v: str) -> None:
        if v == "none":
            if self.o.search:
                raise ConfigError(n, "'none' conflicts with the domains given before it")
            self.o.search_none = True
            return
        if self.o.search_none:
            raise ConfigError(n, f"'{v}' conflicts with an earlier '-S none'")
        # qemu passes one -S "d1 d2": split, as the man page promises
        domains = v.split()
        if not domains:
            raise ConfigError(n, "empty search list")
        for d in domains:
            self.o.search.append(_domain(n, d))
        if len(self.o.search) > MAXDNSRCH:
            raise ConfigError(n, f"too many search domains (at most {MAXDNSRCH})")

    def opt_dns_forward(self, n: str, v: str) -> None:
        addr = _unicast(n, v)
        if isinstance(addr, IPv4Address):
            self.o.dns_forward4 = addr
        else:
            self.o.dns_forward6 = addr

    def opt_dns_host(self, n: str, v: str) -> None:
        addr = _unicast(n, v, loopback=True)  # 127.0.0.53 is the usual target
        if isinstance(addr, IPv4Address):
            self.o.dns_host4 = addr
        else:
            self.o.dns_host6 = addr

    def opt_hostname(self, n: str, v: str) -> None:
        self.o.hostname = _hostname(n, v)

    def opt_fqdn(self, n: str, v: str) -> None:
        self.o.fqdn = _domain(n, v)

    def opt_map_host_loopback(self, n: str, v: str) -> None:
        if v == "none":
            self.o.map_host_loopback_none = True
            self.o.map_host_loopback4 = self.o.map_host_loopback6 = None
            self.o.no_map_gw = True
            return
        addr = _unicast(n, v)
        self.o.map_host_loopback_none = False
        if isinstance(addr, IPv4Address):
            self.o.map_host_loopback4 = addr
        else:
            self.o.map_host_loopback6 = addr

    def opt_map_guest_addr(self, n: str, v: str) -> None:
        if v == "none":
            self.o.map_guest_addr_none = True
            self.o.map_guest_addr4 = self.o.map_guest_addr6 = None
            return
        addr = _unicast(n, v)
        self.o.map_guest_addr_none = False
        if isinstance(addr, IPv4Address):
            self.o.map_guest_addr4 = addr
        else:
            self.o.map_guest_addr6 = addr

    def _ports(self, n: str, v: str, attr: str, allow_prefix: bool) -> None:
        new = fwd.parse_spec(v, option=n, mode=self.mode, allow_prefix=allow_prefix)
        setattr(self.o, attr, fwd.merge(getattr(self.o, attr), new, option=n))

    def opt_tcp_ports(self, n: str, v: str) -> None:
        self._ports(n, v, "tcp_in", True)

    def opt_udp_ports(self, n: str, v: str) -> None:
        self._ports(n, v, "udp_in", True)

    def opt_tcp_ns(self, n: str, v: str) -> None:
        self._ports(n, v, "tcp_out", False)

    def opt_udp_ns(self, n: str, v: str) -> None:
        self._ports(n, v, "udp_out", False)

    def opt_netns(self, n: str, v: str) -> None:
        # A bare name is one of `ip netns`'s.
        self.o.netns = _path(n, v if "/" in v else f"/run/netns/{v}")

    def opt_userns(self, n: str, v: str) -> None:
        self.o.userns = _path(n, v)

    # -- after the last option ---------------------------------------------------------

    def operands(self, rest: list[str]) -> None:
        if not rest:
            return
        if self.mode == PASST:
            raise ConfigError(rest[0], "unexpected argument (passt takes no operands)")
        if len(rest) == 1 and rest[0].isascii() and rest[0].isdigit():
            pid = int(rest[0])
            if pid <= 0 or pid > 2**22:
                raise ConfigError("PID", f"{rest[0]} is not a process ID")
            self.o.target_pid = pid
        else:
            self.o.command = tuple(rest)

    def finish(self) -> Options:
        o = self.o
        if o.ipv4_only and o.ipv6_only:
            raise ConfigError("--ipv4-only", "conflicts with --ipv6-only")
        v4 = (("addr4", "--address"), ("gateway4", "--gateway"), ("outbound4", "--outbound"),
              ("dns_forward4", "--dns-forward"), ("dns_host4", "--dns-host"))
        v6 = tuple((a[:-1] + "6", f) for a, f in v4)
        for only, only_flag, attrs, other in (
            (o.ipv4_only, "--ipv4-only", v6, 6),
            (o.ipv6_only, "--ipv6-only", v4, 4),
        ):
            for attr, flag in attrs if only else ():
                if getattr(o, attr) is not None:
                    raise ConfigError(flag, f"an IPv{other} address conflicts with {only_flag}")
        for attr, flag, off, off_flag in (
            ("tcp_in", "--tcp-ports", o.no_tcp, "--no-tcp"),
            ("tcp_out", "--tcp-ns", o.no_tcp, "--no-tcp"),
            ("udp_in", "--udp-ports", o.no_udp, "--no-udp"),
            ("udp_out", "--udp-ns", o.no_udp, "--no-udp"),
        ):
            spec: PortForwards | None = getattr(o, attr)
            if off and spec is not None and spec.rules:
                raise ConfigError(flag, f"forwarding a protocol disabled by {off_flag}")
        if (o.no_copy_routes or o.no_copy_addrs) and not o.config_net:
            flag = "--no-copy-routes" if o.no_copy_routes else "--no-copy-addrs"
            raise ConfigError(flag, "needs --config-net")
        if o.host_lo_to_ns_lo and o.no_splice:  # only the splice path goes between loopbacks
            raise ConfigError("--host-lo-to-ns-lo", "incompatible with --no-splice")
        if o.splice_only and o.no_splice:
            raise ConfigError("--splice-only", "incompatible with --no-splice")
        for flag, given in (("--migrate-exit", o.migrate_exit),
                            ("--migrate-no-linger", o.migrate_no_linger)):
            if given and not o.vhost_user:
                raise ConfigError(flag, "is for vhost-user mode only")
        spawn = self.mode == PASTA and not o.netns and o.target_pid is None
        if o.stats is not None and not (o.foreground or spawn):
            # the table goes to standard error, as passt's
            raise ConfigError("--stats", "needs --foreground")
        if o.netns and (o.target_pid is not None or o.command):
            raise ConfigError("--netns", "cannot be combined with a PID or a command")
        if o.userns and not o.netns and o.target_pid is None:
            # with a PID it replaces /proc/PID/ns/user (reference 6.1); a spawned command's
            # user namespace is ours to make
            raise ConfigError("--userns", "needs --netns or a PID")
        if o.netns and not o.userns:
            o.netns_only = True  # nothing to join: stay in our own user namespace
        return o


def parse_args(argv: list[str], mode: str) -> Options:
    """Parse argv (without the program name) for mode "passt" or "pasta".

    Raises ConfigError naming the option at fault. Parsing stops at --help, --version
    and --print-capabilities, which leave `action` set.
    """
    if mode not in BOTH:
        raise ValueError(f"mode must be 'passt' or 'pasta', not {mode!r}")
    parser = _Parser(mode)
    rest: list[str] = []
    for opt, value in _getopt(argv, mode, rest):
        if not parser.handle(opt, value):
            return parser.o
    parser.operands(rest)
    return parser.finish()


def check_supported(o: Options) -> None:
    """Refuse, by name, what this version parses but does not implement yet."""
    # --repair-path outside --vhost-user is accepted and ignored (the daemon logs so)


# -- entry points --------------------------------------------------------------------------


def mode_from_name(prog: str, default: str = PASST) -> str:
    """passt picks its personality from its own name; so do we (symlinks work)."""
    base = os.path.basename(prog)
    if PASTA in base:
        return PASTA
    if PASST in base:
        return PASST
    return default


def display_name(prog: str, mode: str) -> str:
    base = os.path.basename(prog)
    if not base or base.startswith("__main__") or base.endswith(".py"):
        return "vhostpasta" if mode == PASTA else "vhostpasst"
    return base


_SPEC_HELP = """
SPEC: none | [LISTEN/]CHUNK,...   LISTEN: ADDR[%IFNAME] | [*][%IFNAME]
  N[-M][:[TOADDR/]P[-Q]] | N[-M]:TOADDR   ports (to TOADDR instead of the guest's)
  ~N[-M]                    exclude     all[:TOADDR]   every non-ephemeral port
"""


def usage(name: str, mode: str) -> str:
    common = f"""\
Usage: {name} [OPTION]...{" [COMMAND [ARG]... | PID]" if mode == PASTA else ""}

  -d, --debug               Print debugging messages
      --trace               Debugging plus per-packet traces
      --stats DELAY         Event counters on stderr, DELAY s apart at least (needs -f)
  -q, --quiet               Warnings and errors only
  -f, --foreground          Do not run in background
  -e, --stderr              Deprecated, no effect
  -l, --log-file PATH       Log to file
      --log-size BYTES      Maximum log file size (default 1 MiB, minimum {LOG_SIZE_MIN})
      --runas UID|UID:GID   Run as given user, default nobody when started as root
      --chroot-fallback     chroot() into an empty root if pivot_root() is impossible
  -p, --pcap FILE           Capture guest link traffic to FILE
  -P, --pid FILE            Write our PID to FILE
  -F, --fd FD               Use this descriptor: a connected socket (passt, implies
                            --one-off) or a tap device (pasta)
  -c, --conf-path PATH      Control socket for vhostpasst-pesto (pesto)
  -m, --mtu MTU             MTU for the guest, 0 or {MTU_MIN}..{MTU_MAX} (default 65520)
  -a, --address ADDR[/LEN]  Address assigned to the guest (default: the host's)
  -n, --netmask MASK        IPv4 netmask or prefix length
  -M, --mac-addr ADDR       Our MAC address on the guest link (default 9a:55:9a:55:9a:55)
  -g, --gateway ADDR        Gateway for the guest (default: the host's)
  -i, --interface NAME      Template interface for addresses and routes
  -o, --outbound ADDR       Bind outbound sockets to ADDR
      --outbound-if4 NAME   Bind outbound IPv4 sockets to interface NAME
      --outbound-if6 NAME   Bind outbound IPv6 sockets to interface NAME
  -D, --dns ADDR|none       DNS server for the guest (repeatable)
  -S, --search LIST|none    DNS search domains for the guest
      --dns-forward ADDR    Guest DNS queries to ADDR go to --dns-host
      --dns-host ADDR       Where forwarded DNS queries go (default: first resolver)
  -H, --hostname NAME       Host name for the guest (DHCP option 12)
      --fqdn NAME           FQDN for the guest (DHCP option 81, DHCPv6 39)
      --no-tcp, --no-udp, --no-icmp   Disable a protocol (--no-icmp implies --no-ndp)
      --no-dhcp, --no-ndp, --no-dhcpv6, --no-ra   Disable a service
      --freebind            Bind forwarded ports to non-local addresses
      --map-host-loopback ADDR|none   Guest address for the host's loopback (default: gateway)
      --map-guest-addr ADDR|none      Guest address for the host's own address
      --no-map-gw           Do not map the gateway to the host's loopback
  -4, --ipv4-only           IPv4 only
  -6, --ipv6-only           IPv6 only
  -t, --tcp-ports SPEC      Forward TCP ports from the host to the guest
  -u, --udp-ports SPEC      Forward UDP ports from the host to the guest
  -h, --help                Show this help
      --version             Show the version
"""
    if mode == PASST:
        return common + """\
  -s, --socket, --socket-path PATH   UNIX socket for qemu (default /tmp/passt_N.socket)
  -1, --one-off             Quit after the first client disconnects
      --vhost-user          Act as a vhost-user back end
      --print-capabilities  Print vhost-user back-end capabilities
      --repair-path PATH    TCP_REPAIR helper socket (vhost-user; "none": no socket)
                            default: the socket's PATH with '.repair' appended
      --migrate-exit, --migrate-no-linger   Deprecated (vhost-user only): parsed, no
                            effect yet (connections do not migrate)
      --no-dhcp-dns, --no-dhcp-search   Do not advertise DNS / search domains
""" + _SPEC_HELP
    return common + """\
  -T, --tcp-ns SPEC         Forward TCP ports from the namespace to the host
  -U, --udp-ns SPEC         Forward UDP ports from the namespace to the host
  -I, --ns-ifname NAME      Interface name in the namespace
      --ns-mac-addr ADDR    MAC address of the namespace interface
      --config-net          Configure the namespace interface
      --netns PATH|NAME     Target network namespace
      --userns PATH         Target user namespace
      --netns-only, --no-netns-quit, --no-splice, --dhcp-dns, --dhcp-search
      --host-lo-to-ns-lo    -t/-u connections to a host loopback address go to the same
                            loopback address in the namespace (default: its own address)
      --splice-only         No tap: forward loopback traffic only
      --no-copy-routes, --no-copy-addrs   Deprecated
""" + _SPEC_HELP + """\
  auto                      (pasta) only while bound on the other side; pasta's default
"""
