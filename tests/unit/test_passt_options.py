"""Every long option of passt 2026-07 parses, in the mode(s) it applies to.

The list is passt.1 as of passt commit 06fedeb3 (2026-07-24), its OPTIONS section taken
whole: the options before "passt-only options" apply to both modes (but --dhcp-dns and
--dhcp-search are pasta's and --no-dhcp-dns and --no-dhcp-search passt's, as the page says
and conf.c enforces), then the passt-only and the pasta-only ones. Extracted once, when this
test was written; it is data here, not read from a passt tree.
"""

from __future__ import annotations

import pytest

from vhostpasst.config.cli import parse_args

BOTH = ("passt", "pasta")
PASST = ("passt",)
PASTA = ("pasta",)

# (long option, modes, value or None, other options it needs to be valid)
PASST_2026_07: list[tuple[str, tuple[str, ...], str | None, tuple[str, ...]]] = [
    ("debug", BOTH, None, ()),
    ("trace", BOTH, None, ()),
    ("stats", BOTH, "2", ("--foreground",)),
    ("quiet", BOTH, None, ()),
    ("foreground", BOTH, None, ()),
    ("stderr", BOTH, None, ()),
    ("log-file", BOTH, "/tmp/x.log", ()),
    ("log-size", BOTH, "1048576", ()),
    ("runas", BOTH, "0", ()),
    ("conf-path", BOTH, "/tmp/x.conf", ()),
    ("help", BOTH, None, ()),
    ("version", BOTH, None, ()),
    ("pcap", BOTH, "/tmp/x.pcap", ()),
    ("pid", BOTH, "/tmp/x.pid", ()),
    ("mtu", BOTH, "1500", ()),
    ("address", BOTH, "192.0.2.5/24", ()),
    ("netmask", BOTH, "255.255.255.0", ()),
    ("mac-addr", BOTH, "02:00:00:00:00:01", ()),
    ("gateway", BOTH, "192.0.2.1", ()),
    ("interface", BOTH, "eth0", ()),
    ("outbound", BOTH, "192.0.2.7", ()),
    ("outbound-if4", BOTH, "eth0", ()),
    ("outbound-if6", BOTH, "eth0", ()),
    ("dns", BOTH, "198.51.100.53", ()),
    ("dns-forward", BOTH, "192.0.2.53", ()),
    ("dns-host", BOTH, "127.0.0.53", ()),
    ("search", BOTH, "example.org", ()),
    ("no-dhcp-dns", PASST, None, ()),
    ("dhcp-dns", PASTA, None, ()),
    ("no-dhcp-search", PASST, None, ()),
    ("dhcp-search", PASTA, None, ()),
    ("no-tcp", BOTH, None, ()),
    ("no-udp", BOTH, None, ()),
    ("no-icmp", BOTH, None, ()),
    ("no-dhcp", BOTH, None, ()),
    ("no-ndp", BOTH, None, ()),
    ("no-dhcpv6", BOTH, None, ()),
    ("no-ra", BOTH, None, ()),
    ("freebind", BOTH, None, ()),
    ("map-host-loopback", BOTH, "192.0.2.1", ()),
    ("no-map-gw", BOTH, None, ()),
    ("chroot-fallback", BOTH, None, ()),
    ("map-guest-addr", BOTH, "192.0.2.2", ()),
    ("ipv4-only", BOTH, None, ()),
    ("ipv6-only", BOTH, None, ()),
    ("hostname", BOTH, "guest", ()),
    ("fqdn", BOTH, "guest.example.org", ()),
    ("tcp-ports", BOTH, "22", ()),
    ("udp-ports", BOTH, "53", ()),
    # passt-only options
    ("socket-path", PASST, "/tmp/x.sock", ()),
    ("socket", PASST, "/tmp/x.sock", ()),
    ("vhost-user", PASST, None, ()),
    ("print-capabilities", PASST, None, ()),
    ("repair-path", PASST, "/tmp/x.repair", ()),
    ("migrate-exit", PASST, None, ("--vhost-user",)),
    ("migrate-no-linger", PASST, None, ("--vhost-user",)),
    ("fd", PASST, "5", ()),
    ("one-off", PASST, None, ()),
    # pasta-only options
    ("ns-ifname", PASTA, "tap0", ()),
    ("tcp-ns", PASTA, "8080", ()),
    ("udp-ns", PASTA, "5353", ()),
    ("host-lo-to-ns-lo", PASTA, None, ()),
    ("userns", PASTA, "/proc/1/ns/user", ("--netns", "/proc/1/ns/net")),
    ("netns", PASTA, "/proc/1/ns/net", ()),
    ("netns-only", PASTA, None, ()),
    ("no-netns-quit", PASTA, None, ()),
    ("config-net", PASTA, None, ()),
    ("no-copy-routes", PASTA, None, ("--config-net",)),
    ("no-copy-addrs", PASTA, None, ("--config-net",)),
    ("ns-mac-addr", PASTA, "02:00:00:00:00:02", ()),
    ("no-splice", PASTA, None, ()),
    ("splice-only", PASTA, None, ()),
]

CASES = [(name, mode, value, needs) for name, modes, value, needs in PASST_2026_07
         for mode in modes]


@pytest.mark.parametrize("name, mode, value, needs", CASES,
                         ids=[f"{c[1]}--{c[0]}" for c in CASES])
def test_every_passt_2026_07_option_parses(name: str, mode: str, value: str | None,
                                           needs: tuple[str, ...]) -> None:
    argv = [*needs, f"--{name}", *([value] if value is not None else [])]
    opts = parse_args(argv, mode)
    assert opts.mode == mode


def test_the_list_is_whole() -> None:
    # 72 long options in passt.1's OPTIONS (both spellings of -s counted)
    assert len(PASST_2026_07) == 72
    assert len({name for name, *_ in PASST_2026_07}) == 72
