"""Command line: every option in both spellings, getopt_long forms, errors, callers' argv."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path
from typing import Any

import pytest

from vhostpasst.config import cli
from vhostpasst.config.cli import check_supported, mode_from_name, parse_args
from vhostpasst.config.conf import Config
from vhostpasst.config.errors import ConfigError
from vhostpasst.config.options import Options
from vhostpasst.main import main
from vhostpasst.version import VERSION, version_line

A4 = IPv4Address
A6 = IPv6Address


def _split_opt(optstring: str) -> set[str]:
    out, s = set(), optstring.lstrip("+")
    for i, ch in enumerate(s):
        if ch != ":":
            out.add(ch + (":" if i + 1 < len(s) and s[i + 1] == ":" else ""))
    return out


def test_optstrings_match_passt() -> None:
    # passt's own strings plus -H (hostname) and -c (conf-path)
    passt = _split_opt("+dqfel:hs:F:p:P:m:a:n:M:g:i:o:D:S:461t:u:") | {"H:", "c:"}
    pasta = _split_opt("+dqfel:hF:I:p:P:m:a:n:M:g:i:o:D:S:46t:u:T:U:") | {"H:", "c:"}
    assert _split_opt(cli.optstring("passt")) == passt
    assert _split_opt(cli.optstring("pasta")) == pasta
    assert cli.optstring("passt").startswith("+")


# (mode, short form, long form, attribute, expected value); value None = a switch
GOOD: list[tuple[str, str | None, str, str | None, str, Any]] = [
    ("passt", "-d", "--debug", None, "debug", True),
    ("passt", "-q", "--quiet", None, "quiet", True),
    ("passt", "-f", "--foreground", None, "foreground", True),
    ("passt", "-e", "--stderr", None, "stderr", True),
    ("passt", "-l", "--log-file", "/tmp/x.log", "log_file", "/tmp/x.log"),
    ("passt", None, "--log-size", "2097152", "log_size", 2097152),
    ("passt", None, "--trace", None, "trace", True),
    ("passt", None, "--runas", "1000:1000", "runas", "1000:1000"),
    ("passt", None, "--runas", "nobody", "runas", "nobody"),
    ("passt", "-s", "--socket", "/tmp/p.sock", "socket_path", "/tmp/p.sock"),
    ("passt", None, "--socket-path", "/tmp/p.sock", "socket_path", "/tmp/p.sock"),
    ("passt", "-F", "--fd", "3", "fd", 3),
    ("passt", "-p", "--pcap", "/tmp/x.pcap", "pcap_file", "/tmp/x.pcap"),
    ("passt", "-P", "--pid", "/tmp/x.pid", "pid_file", "/tmp/x.pid"),
    ("passt", "-m", "--mtu", "1500", "mtu", 1500),
    ("passt", "-m", "--mtu", "0", "mtu", 0),
    ("passt", "-m", "--mtu", "68", "mtu", 68),
    ("passt", "-m", "--mtu", "65535", "mtu", 65535),
    ("passt", "-a", "--address", "192.0.2.5", "addr4", A4("192.0.2.5")),
    ("passt", "-a", "--address", "2001:db8::5", "addr6", A6("2001:db8::5")),
    ("passt", "-a", "--address", "192.0.2.5/20", "prefix_len4", 20),
    ("passt", "-n", "--netmask", "255.255.255.0", "prefix_len4", 24),
    ("passt", "-n", "--netmask", "20", "prefix_len4", 20),
    ("passt", "-M", "--mac-addr", "52:54:00:AB:cd:01", "mac", bytes.fromhex("525400abcd01")),
    ("passt", "-g", "--gateway", "192.0.2.1", "gateway4", A4("192.0.2.1")),
    ("passt", "-g", "--gateway", "fe80::1", "gateway6", A6("fe80::1")),
    ("passt", "-i", "--interface", "eth0", "ifname", "eth0"),
    ("passt", "-o", "--outbound", "192.0.2.7", "outbound4", A4("192.0.2.7")),
    ("passt", "-o", "--outbound", "2001:db8::7", "outbound6", A6("2001:db8::7")),
    ("passt", None, "--outbound-if4", "eth1", "outbound_if4", "eth1"),
    ("passt", None, "--outbound-if6", "eth2", "outbound_if6", "eth2"),
    ("passt", "-D", "--dns", "192.0.2.53", "dns", [A4("192.0.2.53")]),
    ("passt", "-D", "--dns", "none", "dns_none", True),
    ("passt", "-S", "--search", "example.org", "search", ["example.org"]),
    ("passt", "-S", "--search", "a.example b.example", "search", ["a.example", "b.example"]),
    ("passt", "-S", "--search", "none", "search_none", True),
    ("passt", None, "--dns-forward", "192.0.2.3", "dns_forward4", A4("192.0.2.3")),
    ("passt", None, "--dns-forward", "2001:db8::3", "dns_forward6", A6("2001:db8::3")),
    ("passt", None, "--dns-host", "127.0.0.53", "dns_host4", A4("127.0.0.53")),
    ("passt", None, "--dns-host", "::1", "dns_host6", A6("::1")),
    ("passt", None, "--no-dhcp-dns", None, "no_dhcp_dns", True),
    ("passt", None, "--no-dhcp-search", None, "no_dhcp_search", True),
    ("pasta", None, "--dhcp-dns", None, "dhcp_dns", True),
    ("pasta", None, "--dhcp-search", None, "dhcp_search", True),
    ("passt", "-H", "--hostname", "vm1", "hostname", "vm1"),
    ("passt", None, "--fqdn", "vm1.example.org", "fqdn", "vm1.example.org"),
    ("passt", None, "--no-dhcp", None, "no_dhcp", True),
    ("passt", None, "--no-ndp", None, "no_ndp", True),
    ("passt", None, "--no-dhcpv6", None, "no_dhcpv6", True),
    ("passt", None, "--no-ra", None, "no_ra", True),
    ("passt", None, "--no-tcp", None, "no_tcp", True),
    ("passt", None, "--no-udp", None, "no_udp", True),
    ("passt", None, "--no-icmp", None, "no_icmp", True),
    ("passt", None, "--freebind", None, "freebind", True),
    ("passt", None, "--chroot-fallback", None, "chroot_fallback", True),
    ("pasta", None, "--chroot-fallback", None, "chroot_fallback", True),
    ("passt", None, "--map-host-loopback", "192.0.2.2", "map_host_loopback4", A4("192.0.2.2")),
    ("passt", None, "--map-host-loopback", "none", "map_host_loopback_none", True),
    ("passt", None, "--map-guest-addr", "2001:db8::2", "map_guest_addr6", A6("2001:db8::2")),
    ("passt", None, "--map-guest-addr", "none", "map_guest_addr_none", True),
    ("passt", None, "--no-map-gw", None, "no_map_gw", True),
    ("pasta", None, "--host-lo-to-ns-lo", None, "host_lo_to_ns_lo", True),
    ("passt", "-4", "--ipv4-only", None, "ipv4_only", True),
    ("passt", "-6", "--ipv6-only", None, "ipv6_only", True),
    ("passt", "-1", "--one-off", None, "one_off", True),
    ("passt", None, "--vhost-user", None, "vhost_user", True),
    ("passt", None, "--repair-path", "/tmp/repair.sock", "repair_path", "/tmp/repair.sock"),
    ("passt", "-c", "--conf-path", "/tmp/ctl.sock", "conf_path", "/tmp/ctl.sock"),
    ("pasta", "-c", "--conf-path", "/tmp/ctl.sock", "conf_path", "/tmp/ctl.sock"),
    ("pasta", "-I", "--ns-ifname", "tap0", "ns_ifname", "tap0"),
    ("pasta", None, "--ns-mac-addr", "02:00:00:00:00:01", "ns_mac", bytes.fromhex("020000000001")),
    ("pasta", None, "--config-net", None, "config_net", True),
    ("pasta", None, "--netns", "/run/netns/x", "netns", "/run/netns/x"),
    ("pasta", None, "--netns", "x", "netns", "/run/netns/x"),
    ("pasta", None, "--netns-only", None, "netns_only", True),
    ("pasta", None, "--no-netns-quit", None, "no_netns_quit", True),
    ("pasta", None, "--no-splice", None, "no_splice", True),
]


def _ids(row: tuple[Any, ...]) -> str:
    return f"{row[0]}:{row[2]}={row[3]}"


@pytest.mark.parametrize("row", GOOD, ids=_ids)
def test_every_option_parses(row: tuple[str, str | None, str, str | None, str, Any]) -> None:
    mode, short, long, value, attr, expected = row
    forms = [[long]] if value is None else [[long, value], [f"{long}={value}"]]
    if short:
        forms += [[short]] if value is None else [[short, value], [short + value]]
    for argv in forms:
        opts = parse_args(argv, mode)
        assert getattr(opts, attr) == expected, argv


def test_pasta_only_deprecated_copy_options() -> None:
    o = parse_args(["--config-net", "--no-copy-routes", "--no-copy-addrs"], "pasta")
    assert o.no_copy_routes and o.no_copy_addrs


def test_port_options() -> None:
    o = parse_args(["-t", "22", "--tcp-ports=80:8080", "-u", "53", "--udp-ports", "54"], "passt")
    assert o.tcp_in is not None and [r.first for r in o.tcp_in.rules] == [22, 80]
    with pytest.raises(ConfigError, match="conflicts with previous options"):
        parse_args(["-u", "53", "-u", "none"], "passt")
    o = parse_args(["-T", "auto", "--udp-ns", "5353", "-t", "auto", "-u", "none"], "pasta")
    assert o.tcp_out is not None and o.tcp_out.scanned == o.tcp_out.rules
    assert o.udp_out is not None and o.udp_out.rules[0].first == 5353
    assert o.tcp_in is not None and o.tcp_in.rules[0].scan
    o = parse_args(["--tcp-ns", "none", "-U", "none"], "pasta")
    assert o.tcp_out is not None and not o.tcp_out.rules
    # passt 2026-07: all in pasta, auto with ranges or an address, and the combinations
    o = parse_args(["-t", "all", "-u", "127.0.0.1/8000-8010,auto", "-u", "::1/auto",
                    "-T", "~22,auto"], "pasta")
    assert o.tcp_in is not None and o.tcp_in.rules[0].tolerant
    assert o.udp_in is not None and [(r.first, r.addr) for r in o.udp_in.scanned] == [
        (8000, A4("127.0.0.1")), (1, A6("::1"))]
    o = parse_args(["-t", "[::1]/5000:[2001:db8::5]/6000", "-t", "127.0.0.6/all:192.0.2.6"],
                   "passt")
    assert o.tcp_in is not None
    assert [(r.to_first, r.target) for r in o.tcp_in.rules] == [
        (6000, A6("2001:db8::5")), (1, A4("192.0.2.6"))]


def test_getopt_forms() -> None:
    o = parse_args(["-fq", "-Ppid", "-dem1500", "-1"], "passt")
    assert (o.foreground, o.quiet, o.debug, o.stderr, o.mtu, o.one_off) == (
        True, True, True, True, 1500, True)
    assert o.pid_file == "pid"
    o = parse_args(["-fP", "pidfile"], "passt")
    assert o.pid_file == "pidfile" and o.foreground
    # a required argument is taken even if it looks like an option
    assert parse_args(["--log-file", "-q"], "passt").log_file == "-q"
    assert parse_args(["-l", "-q"], "passt").log_file == "-q"
    # unambiguous prefixes, aliases sharing one option are not ambiguous
    o = parse_args(["--fore", "--mt", "1400", "--sock", "/tmp/s", "--print"], "passt")
    assert o.foreground and o.mtu == 1400 and o.socket_path == "/tmp/s"
    assert o.action == "capabilities"
    assert parse_args(["--socket-p=/tmp/y"], "passt").socket_path == "/tmp/y"
    # an exact name beats longer names it prefixes
    assert parse_args(["--dns", "192.0.2.1"], "passt").dns == [A4("192.0.2.1")]
    assert parse_args(["--no-dhcp"], "passt").no_dhcp
    assert parse_args(["--outbound", "192.0.2.1"], "passt").outbound4 == A4("192.0.2.1")
    # repeated options: the last one wins
    assert parse_args(["-m", "1500", "-m", "9000"], "passt").mtu == 9000
    # -- ends options
    assert parse_args(["-f", "--"], "passt").foreground
    # hex like strtol(, 0)
    assert parse_args(["--mtu", "0x5dc"], "passt").mtu == 1500


def test_actions_stop_parsing() -> None:
    assert parse_args(["--help", "--bogus"], "passt").action == "help"
    assert parse_args(["-h"], "pasta").action == "help"
    assert parse_args(["--version"], "pasta").action == "version"
    assert parse_args(["--print-capabilities"], "passt").action == "capabilities"
    with pytest.raises(ConfigError):  # errors before the action still count
        parse_args(["--bogus", "--help"], "passt")


def test_pasta_operands() -> None:
    o = parse_args(["-f", "1234"], "pasta")
    assert o.target_pid == 1234 and o.command == ()
    o = parse_args(["--config-net", "sh", "-c", "echo -q"], "pasta")
    assert o.command == ("sh", "-c", "echo -q") and not o.quiet  # stops at the operand
    o = parse_args(["--", "-weird", "arg"], "pasta")
    assert o.command == ("-weird", "arg")
    o = parse_args(["--", "1", "2"], "pasta")
    assert o.command == ("1", "2") and o.target_pid is None
    o = parse_args(["--netns", "/run/netns/x"], "pasta")
    assert o.netns_only  # implied without --userns
    o = parse_args(["--userns", "/proc/1/ns/user", "42"], "pasta")  # a PID, its userns given
    assert o.target_pid == 42 and o.userns == "/proc/1/ns/user" and not o.netns_only
    o = parse_args(["--userns", "/proc/1/ns/user", "--netns", "/proc/1/ns/net"], "pasta")
    assert not o.netns_only


# (mode, argv, option named in the message, words in the reason)
BAD: list[tuple[str, list[str], str, str]] = [
    ("passt", ["--mtu", "70000"], "--mtu", "70000 is out of range 68..65535"),
    ("passt", ["-m", "67"], "--mtu", "out of range"),
    ("passt", ["-m", "-1"], "--mtu", "not a non-negative integer"),
    ("passt", ["-m", "15x"], "--mtu", "not a non-negative integer"),
    ("passt", ["--mtu"], "--mtu", "requires an argument"),
    ("passt", ["-m"], "-m", "requires an argument"),
    ("passt", ["-a", "0.0.0.0"], "--address", "unspecified"),
    ("passt", ["-a", "::"], "--address", "unspecified"),
    ("passt", ["-a", "127.0.0.1"], "--address", "loopback"),
    ("passt", ["-a", "::1"], "--address", "loopback"),
    ("passt", ["-a", "224.0.0.1"], "--address", "multicast"),
    ("passt", ["-a", "ff02::1"], "--address", "multicast"),
    ("passt", ["-a", "255.255.255.255"], "--address", "broadcast"),
    ("passt", ["-a", "::ffff:192.0.2.1"], "--address", "IPv4-mapped"),
    ("passt", ["-a", "::192.0.2.1"], "--address", "IPv4-compatible"),
    ("passt", ["-a", "fe80::5"], "--address", "link-local"),
    ("passt", ["-a", "192.0.2.300"], "--address", "not an IPv4 or IPv6 address"),
    ("passt", ["-a", "192.0.2.1/33"], "--address", "prefix length"),
    ("passt", ["-n", "255.0.255.0"], "--netmask", "contiguous"),
    ("passt", ["-n", "33"], "--netmask", "prefix length"),
    ("passt", ["-n", "x"], "--netmask", "prefix length"),
    ("passt", ["-M", "9a:55:9a:55:9a"], "--mac-addr", "not a MAC address"),
    ("passt", ["-M", "9a-55-9a-55-9a-55"], "--mac-addr", "not a MAC address"),
    ("passt", ["-M", "ff:ff:ff:ff:ff:ff"], "--mac-addr", "multicast or broadcast"),
    ("passt", ["-M", "00:00:00:00:00:00"], "--mac-addr", "null"),
    ("passt", ["-g", "0.0.0.0"], "--gateway", "unspecified"),
    ("passt", ["-g", "gw"], "--gateway", "not an IPv4 or IPv6 address"),
    ("passt", ["-i", "abcdefghijklmnop"], "--interface", "not a valid interface name"),
    ("passt", ["-i", "a/b"], "--interface", "not a valid interface name"),
    ("passt", ["--outbound-if4", ""], "--outbound-if4", "not a valid interface name"),
    ("passt", ["-o", "224.0.0.1"], "--outbound", "multicast"),
    ("passt", ["-D", "0.0.0.0"], "--dns", "cannot be a name server"),
    ("passt", ["-D", "nameserver"], "--dns", "not an IPv4 or IPv6 address"),
    ("passt", ["-D", "none", "-D", "192.0.2.1"], "--dns", "conflicts"),
    ("passt", ["-D", "192.0.2.1", "-D", "none"], "--dns", "conflicts"),
    ("passt", ["-D", "192.0.2.1", "-D", "192.0.2.2", "-D", "192.0.2.3", "-D", "192.0.2.4"],
     "--dns", "too many IPv4 name servers"),
    ("passt", ["-S", "bad..example"], "--search", "not a valid domain name"),
    ("passt", ["-S", " "], "--search", "empty search list"),
    ("passt", ["-S", "none", "-S", "a.example"], "--search", "conflicts"),
    ("passt", ["-S", "a b c d e f g"], "--search", "too many search domains"),
    ("passt", ["--dns-forward", "127.0.0.1"], "--dns-forward", "loopback"),
    ("passt", ["--dns-host", "ff02::1"], "--dns-host", "multicast"),
    ("passt", ["--map-host-loopback", "127.0.0.1"], "--map-host-loopback", "loopback"),
    ("passt", ["--map-guest-addr", "x"], "--map-guest-addr", "not an IPv4 or IPv6"),
    ("passt", ["-H", "two words"], "--hostname", "not a valid host name"),
    ("passt", ["--fqdn", "-bad-.example"], "--fqdn", "not a valid domain name"),
    ("passt", ["--log-size", "1000"], "--log-size", "below the minimum"),
    ("passt", ["--log-size", "1M"], "--log-size", "not a non-negative integer"),
    ("passt", ["-l", ""], "--log-file", "empty path"),
    ("passt", ["-s", "/tmp/" + "x" * 120], "--socket", "path longer than 107 bytes"),
    ("passt", ["-F", "-1"], "--fd", "not a non-negative integer"),
    ("passt", ["-F", "three"], "--fd", "not a non-negative integer"),
    ("passt", ["--runas", "a:b:c"], "--runas", "UID[:GID]"),
    ("passt", ["--runas", "no-such-user-x"], "--runas", "no such user 'no-such-user-x'"),
    ("passt", ["--runas", "nobody:no-such-group-x"], "--runas", "no such group"),
    ("pasta", ["--runas", "no-such-user-x"], "--runas", "no such user"),
    ("passt", ["-4", "-6"], "--ipv4-only", "conflicts with --ipv6-only"),
    ("passt", ["-4", "-a", "2001:db8::1"], "--address", "conflicts with --ipv4-only"),
    ("passt", ["-6", "-g", "192.0.2.1"], "--gateway", "conflicts with --ipv6-only"),
    ("passt", ["-t", "0"], "--tcp-ports", "out of range"),
    ("passt", ["-t", "80-82:90-91"], "--tcp-ports", "same size"),
    ("passt", ["-t", "auto"], "--tcp-ports", "pasta mode"),
    ("passt", ["-u", "22", "-u", "all"], "--udp-ports", "overlapping"),
    ("passt", ["--migrate-exit"], "--migrate-exit", "vhost-user mode only"),
    ("passt", ["--migrate-no-linger"], "--migrate-no-linger", "vhost-user mode only"),
    ("passt", ["--stats", "1"], "--stats", "needs --foreground"),
    ("passt", ["-f", "--stats", "x"], "--stats", "not a non-negative integer"),
    ("pasta", ["--netns", "n", "--stats", "1"], "--stats", "needs --foreground"),
    ("passt", ["--splice-only"], "--splice-only", "only valid in pasta mode"),
    ("pasta", ["--splice-only", "--no-splice"], "--splice-only", "--no-splice"),
    ("passt", ["--no-tcp", "-t", "22"], "--tcp-ports", "--no-tcp"),
    ("passt", ["--no-udp", "-u", "all"], "--udp-ports", "--no-udp"),
    ("pasta", ["-T", "192.0.2.1/22"], "--tcp-ns", "only allowed for -t/-u"),
    ("pasta", ["--no-udp", "-U", "53"], "--udp-ns", "--no-udp"),
    ("passt", ["-I", "tap0"], "-I", "only valid in pasta mode"),
    ("passt", ["--netns", "x"], "--netns", "only valid in pasta mode"),
    ("passt", ["-T", "22"], "-T", "only valid in pasta mode"),
    ("passt", ["--dhcp-dns"], "--dhcp-dns", "only valid in pasta mode"),
    ("pasta", ["-s", "/tmp/s"], "-s", "only valid in passt mode"),
    ("pasta", ["-1"], "-1", "only valid in passt mode"),
    ("pasta", ["--vhost-user"], "--vhost-user", "only valid in passt mode"),
    ("pasta", ["--no-dhcp-dns"], "--no-dhcp-dns", "only valid in passt mode"),
    ("pasta", ["--print-capabilities"], "--print-capabilities", "only valid in passt mode"),
    ("pasta", ["--no-copy-routes"], "--no-copy-routes", "needs --config-net"),
    ("pasta", ["--host-lo-to-ns-lo", "--no-splice"], "--host-lo-to-ns-lo", "--no-splice"),
    ("pasta", ["--netns", "x", "1234"], "--netns", "cannot be combined"),
    ("pasta", ["--userns", "/proc/1/ns/user"], "--userns", "needs --netns or a PID"),
    ("pasta", ["--userns", "/proc/1/ns/user", "--", "sh"], "--userns", "needs --netns or a PID"),
    ("pasta", ["0"], "PID", "not a process ID"),
    ("passt", ["extra"], "extra", "unexpected argument"),
    ("passt", ["--bogus"], "--bogus", "unrecognized option"),
    ("passt", ["-z"], "-z", "invalid option"),
    ("passt", ["--no-d"], "--no-d", "ambiguous"),
    ("passt", ["--v"], "--v", "ambiguous"),
    ("passt", ["--=x"], "--", "unrecognized option"),
    ("passt", ["--foreground=yes"], "--foreground", "does not take an argument"),
]


@pytest.mark.parametrize("mode, argv, option, words", BAD, ids=lambda x: str(x))
def test_bad_input(
    mode: str, argv: list[str], option: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError) as err:
        parse_args(argv, mode)
    assert err.value.option == option
    assert words in err.value.reason
    # and through main(): status 1, one line on stderr naming the option
    prog = "vhostpasta" if mode == "pasta" else "vhostpasst"
    assert main(argv, prog=prog) == 1
    out, errtext = capsys.readouterr()
    assert out == ""
    assert errtext.startswith(f"{prog}: {option}: ") and words in errtext


def test_error_message_format(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--mtu", "70000"], prog="vhostpasst") == 1
    assert capsys.readouterr().err == "vhostpasst: --mtu: 70000 is out of range 68..65535\n"


# -- callers' exact command lines ----------------------------------------------------------

QEMU_NETDEV_PASST = [
    "--quiet", "--mtu", "1500", "--address", "192.0.2.10", "--netmask", "24",
    "--mac-addr", "52:54:00:12:34:56", "--gateway", "192.0.2.1", "--interface", "eth0",
    "--outbound", "192.0.2.10", "--outbound-if4", "eth0", "--outbound-if6", "eth0",
    "--dns", "192.0.2.53", "--fqdn", "vm.example.org", "--no-dhcp-dns", "--no-dhcp-search",
    "--map-host-loopback", "192.0.2.2", "--map-guest-addr", "192.0.2.3",
    "--dns-forward", "192.0.2.4", "--dns-host", "127.0.0.53", "--no-tcp", "--no-udp",
    "--no-icmp", "--no-dhcp", "--no-ndp", "--no-dhcpv6", "--no-ra", "--freebind",
    "--ipv4-only", "--search", "d1.example d2.example",
    "--pid", "/tmp/passt-AbC123.pid", "--fd", "3",
]
LIBVIRT = [
    "--one-off", "--socket", "/run/libvirt/qemu/passt/1-dom-net0.socket",
    "--pid", "/run/libvirt/qemu/passt/1-dom-net0-passt.pid", "--mtu", "9000",
    "--interface", "eth0", "--log-file", "/var/log/passt.log", "--hostname", "dom",
    "--fqdn", "dom.example.org", "--address", "192.0.2.1", "--netmask", "24",
    "--address", "2001:db8::c000:201", "--tcp-ports", "2022:22",
    "--udp-ports", "1.2.3.4/5000-5020:6000-6020,~5010-5015",
    "--tcp-ports", "192.0.2.1%eth0/8080",
]
KUBEVIRT = [
    "--one-off", "--socket", "/var/run/libvirt/qemu/run/passt/1-default_w10-vm-ua-passtnet.socket",
    "--mac-addr", "52:54:00:f8:03:a6", "--pid", "/var/run/libvirt/qemu/run/passt/x-passt.pid",
    "--interface", "eth0", "--log-file", "/var/run/kubevirt/passt.log", "--tcp-ports", "443",
]
PODMAN = [
    "--config-net", "-t", "127.0.0.1/8080-8081:80-81", "-u", "5353-5353:53-53",
    "--dns-forward", "169.254.1.1", "-T", "none", "-U", "none", "--no-map-gw", "--quiet",
    "--map-guest-addr", "169.254.1.2", "--pid", "/run/user/1000/pasta.pid",
    "--netns", "/run/user/1000/netns/netns-0a1b2c",
]
PODMAN_LIVE = (
    "--config-net --dns-forward 169.254.1.1 -t none -u none -T none -U none --no-map-gw "
    "--quiet --netns /run/user/1000/netns/netns-0a1b --map-guest-addr 169.254.1.2"
).split()
ROOTLESSKIT = [
    "--stderr", "--ns-ifname=tap0", "--mtu=65520", "--config-net", "--address=10.0.2.100",
    "--netmask=24", "--gateway=10.0.2.2", "--dns-forward=10.0.2.3", "--no-map-gw",
    "--ipv4-only", "--tcp-ports=auto", "--udp-ports=auto",
]


def test_qemu_netdev_passt() -> None:
    o = parse_args(QEMU_NETDEV_PASST, "passt")
    assert o.fd == 3 and o.one_off and o.quiet and o.pid_file == "/tmp/passt-AbC123.pid"
    assert o.search == ["d1.example", "d2.example"] and o.prefix_len4 == 24
    check_supported(o)
    # with vhost-user=on qemu adds --vhost-user next to --fd
    o = parse_args(["--vhost-user", *QEMU_NETDEV_PASST], "passt")
    assert o.vhost_user and o.fd == 3
    check_supported(o)


def test_qemu_netdev_passt_ipv6_and_ports() -> None:
    argv = ["--quiet", "--ipv6-only", "--tcp-ports", "2222:22,8080", "--udp-ports", "5353",
            "--pid", "/tmp/p.pid", "--fd", "4"]
    o = parse_args(argv, "passt")
    assert o.ipv6_only and o.tcp_in is not None and len(o.tcp_in.rules) == 2
    check_supported(o)  # -t and -u are both served (tcp.py, udp.py)


def test_libvirt_and_kubevirt() -> None:
    o = parse_args(LIBVIRT, "passt")
    assert o.addr4 == A4("192.0.2.1") and o.addr6 == A6("2001:db8::c000:201")
    assert o.hostname == "dom" and o.fqdn == "dom.example.org" and o.one_off
    assert o.udp_in is not None and o.udp_in.rules[0].excluded == frozenset(range(5010, 5016))
    assert o.tcp_in is not None and [r.addr for r in o.tcp_in.rules] == [None, A4("192.0.2.1")]
    o = parse_args(["--vhost-user", *KUBEVIRT], "passt")
    assert o.mac == bytes.fromhex("525400f803a6") and o.tcp_in is not None
    o = parse_args(KUBEVIRT[:-2], "passt")
    check_supported(o)


def test_libvirt_all_form() -> None:
    # a portForward element without ranges becomes ADDR[%DEV]/all
    o = parse_args(["--one-off", "--tcp-ports", "192.0.2.1%eth0/all", "--udp-ports", "all"],
                   "passt")
    assert o.tcp_in is not None and o.tcp_in.rules[0].tolerant
    assert o.tcp_in.rules[0].ifname == "eth0"


def test_podman_and_rootlesskit() -> None:
    for argv in (PODMAN, PODMAN_LIVE, ["-PFILE", *PODMAN_LIVE], ["--pid=F", *PODMAN_LIVE]):
        o = parse_args(argv, "pasta")
        assert o.config_net and o.netns and o.netns_only
        assert o.map_guest_addr4 == A4("169.254.1.2")
        check_supported(o)  # pasta mode runs these; -t is served (tcp.py)
    o = parse_args([*ROOTLESSKIT, "4242"], "pasta")
    assert o.target_pid == 4242 and o.ns_ifname == "tap0" and o.stderr
    assert o.tcp_in is not None and o.tcp_in.rules[0].scan
    check_supported(o)  # 'auto' is accepted (it forwards nothing until the port scanner)
    o = parse_args([*ROOTLESSKIT[:-1], "--udp-ports=none", "--userns=/proc/42/ns/user",
                    "--netns=/proc/42/ns/net"], "pasta")
    assert o.userns == "/proc/42/ns/user" and not o.netns_only
    # muvm / krun and other VM managers
    o = parse_args(["-q", "-f", "--fd", "5", "-t", "192.0.2.1/8000-8010:9000-9010"], "passt")
    assert o.fd == 5
    o = parse_args(["--foreground", "--vhost-user", "--socket-path", "/tmp/x",
                    "--tcp-ports", "2222:22"], "passt")
    assert o.vhost_user and o.socket_path == "/tmp/x"


# -- main() ------------------------------------------------------------------------------------


def test_main_actions(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"], prog="vhostpasst") == 0
    out = capsys.readouterr().out
    assert out.startswith("Usage: vhostpasst") and "--vhost-user" in out
    assert main(["-h"], prog="/usr/bin/pasta") == 0
    assert "--ns-ifname" in capsys.readouterr().out
    assert main(["--version"], prog="vhostpasst") == 0
    assert capsys.readouterr().out == version_line("vhostpasst") + "\n"
    assert main(["--print-capabilities"], prog="vhostpasst") == 0
    assert capsys.readouterr().out == '{"type": "net"}\n'


def test_main_runs_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    import vhostpasst.config.conf
    import vhostpasst.daemon

    seen: dict[str, Any] = {}

    def fake_build(o: Options) -> Config:
        seen["options"] = o
        return Config(mtu=o.mtu or 65520)

    def fake_run(config: Config) -> int:
        seen["config"] = config
        return 7

    monkeypatch.setattr(vhostpasst.config.conf, "build_config", fake_build)
    monkeypatch.setattr(vhostpasst.daemon, "run", fake_run)
    assert main(["-f", "-m", "1500", "-t", "none"], prog="vhostpasst") == 7
    assert seen["config"].mtu == 1500 and seen["options"].foreground


def test_mode_from_name() -> None:
    assert mode_from_name("/usr/bin/passt") == "passt"
    assert mode_from_name("/usr/bin/pasta") == "pasta"
    assert mode_from_name("vhostpasta") == "pasta"
    assert mode_from_name("/x/passt.avx2") == "passt"
    assert mode_from_name("/x/__main__.py") == "passt"
    assert mode_from_name("/x/whatever", default="pasta") == "pasta"
    with pytest.raises(ValueError):
        parse_args([], "slirp")


# -- the installed console scripts ---------------------------------------------------------------


def _script(name: str) -> str:
    path = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def test_console_scripts(tmp_path: Path) -> None:
    exe = _script("vhostpasst")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.startswith("Usage: vhostpasst")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == version_line("vhostpasst") + "\n"
    assert r.stdout.startswith(f"vhostpasst {VERSION}")
    r = subprocess.run([exe, "--no-such-option"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == "vhostpasst: --no-such-option: unrecognized option\n"
    r = subprocess.run([_script("vhostpasta"), "--runas", "no-such-user-x"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 1
    assert "--runas" in r.stderr and "no such user 'no-such-user-x'" in r.stderr
    # a symlink named pasta picks the pasta personality from its name
    link = tmp_path / "pasta"
    link.symlink_to(exe)
    r = subprocess.run([str(link), "-I", "tap0", "--version"], capture_output=True, text=True,
                       timeout=60)
    # passt's dated shape, which tools comparing passt versions parse
    assert r.returncode == 0 and r.stdout == version_line("pasta") + "\n"
    assert re.fullmatch(r"pasta (\d{4}_\d\d_\d\d\.[0-9a-f]+ \(vhostpasst [^)]+\)"
                        r"|vhostpasst-[^ ]+)\n", r.stdout), r.stdout
    r = subprocess.run([sys.executable, "-m", "vhostpasst", "--version"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and r.stdout == version_line("vhostpasst") + "\n"


def test_man_page_lists_every_option() -> None:
    page = (Path(__file__).resolve().parents[2] / "doc" / "vhostpasst.1").read_text()
    text = page.replace("\\-", "-")
    for long in cli._LONG:
        assert f"--{long}" in text, long
    for short in cli._BY_SHORT:
        assert f"-{short}" in text, short


def test_sigterm_inside_a_guarded_callback_still_stops_the_daemon() -> None:
    """The loop's callbacks catch Exception (a bug must not stop the daemon); a SIGTERM that
    lands inside one must still end the run (a qemu test once saw the daemon log 'device
    callback queue_kicked failed' for it and keep running)."""
    import signal

    from vhostpasst.core import process

    assert not issubclass(process.Terminate, Exception)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGQUIT, signal.SIGPIPE)}
    try:
        signals = process.TerminateSignals()
        signals.arm()
        with pytest.raises(process.Terminate):
            try:
                signal.raise_signal(signal.SIGTERM)
            except Exception:  # what backend._callback and the dispatcher do
                pass
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def test_a_terminate_signal_during_set_up_waits_for_the_loop() -> None:
    """Both modes: a SIGTERM before the loop runs is recorded, not raised mid-set-up, and
    ends the run as soon as the loop would start."""
    import signal

    from vhostpasst.core import process

    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGQUIT, signal.SIGPIPE)}
    try:
        signals = process.TerminateSignals()
        signal.raise_signal(signal.SIGQUIT)
        assert signals.pending == signal.SIGQUIT
        with pytest.raises(process.Terminate):
            signals.arm()
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
