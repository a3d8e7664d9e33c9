"""Behaviours of passt that a guest notices, end to end with the guest namespace's kernel.

Each test is one behaviour found different from passt 2026-07 (issue 22): a guest configured
only by our Router Advertisements (SLAAC) is reachable through `-t`; a window below one guest
segment is updated as it opens, so an upload does not wait for the guest's persist timer;
DHCPv6 gives the --fqdn name (option 39) to ISC dhclient; a UDP datagram keeps the guest's TTL
(traceroute works); UDP flows time out after the host's conntrack timeouts; an echo request
leaves with the guest's identifier; TCP keepalives: the guest's turn SO_KEEPALIVE on, and ours
end a connection the guest forgot.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import time

import pytest

from tests.netns.sandbox import CLEAN_ENV, Sandbox, wait_until
from tests.netns.tcp_guest import (
    GW4,
    GW6,
    HOST6,
    MIB,
    client,
    configure_guest,
    log_lines,
    serve,
)
from tests.netns.tcp_guest import start as start_tcp_guest
from tests.netns.test_e2e_ipv6 import PREFIX, guest_addrs6, guest_ll_ready, parse_env, start
from tests.netns.test_e2e_udp_icmp import host_udp_ports, run_client, start_server
from tests.netns.test_e2e_udp_icmp import start as start_udp_guest
from tests.netns.vhost_sandbox import start_vhost_daemon, start_vhost_relay


def _slaac_address(sandbox: Sandbox) -> str:
    def slaac() -> str | None:
        for a in guest_addrs6(sandbox, "global"):
            addr = ipaddress.IPv6Address(str(a["local"]))
            if addr in PREFIX and not a.get("tentative"):
                return str(addr)
        return None
    try:
        return str(wait_until(slaac, 15, "a SLAAC address in 2001:db8::/64"))
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{sandbox.daemon_log()}") from None


def test_inbound_ipv6_reaches_a_guest_configured_by_slaac_alone(sandbox: Sandbox) -> None:
    """No DHCPv6 client: the guest never has the host's address, only the one it made from
    our prefix, and has sent nothing from it yet (its duplicate address detection is all we
    saw). A `-t` connection must reach that address, not the host's."""
    start(sandbox, "-t", "10022:22")
    addr = _slaac_address(sandbox)
    assert addr != HOST6
    log = serve(sandbox, sandbox.guest_ns, "::", 22, "sink")
    r = client(sandbox, sandbox.world_ns, HOST6, 10022, "send", MIB, timeout=30)
    assert r["answer"] == [str(MIB), r["sha"]], r
    assert log_lines(log)[0].split()[0] == GW6  # the remote, unchanged


# A far end that reads slowly (4 KiB per 2 ms) for its first half second, then at full speed,
# and answers with the byte count: its window to the host closes and reopens in steps.
SLOW_THEN_FAST = r"""
import socket, sys, time
ls = socket.socket()
ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
ls.bind((sys.argv[1], int(sys.argv[2])))
ls.listen(1)
open(sys.argv[3], "w").close()
ls.settimeout(30)
c, _ = ls.accept()
c.settimeout(30)
total, start = 0, time.monotonic()
while time.monotonic() - start < 0.5:
    data = c.recv(4096)
    if not data:
        break
    total += len(data)
    time.sleep(0.002)
while data:
    data = c.recv(1 << 20)
    total += len(data)
c.sendall(b"%d\n" % total)
c.close()
"""
PERSIST_WAIT = 0.15  # the guest's persist timer starts at its RTO, 200 ms at least


@pytest.mark.parametrize("link", ["stream", "vhost-tso"])
def test_window_below_one_guest_segment_is_updated_as_it_opens(sandbox: Sandbox,
                                                               link: str) -> None:
    """The guest (64 KiB segments: MTU 65520 on the stream link, TSO over vhost-user at MTU
    1500, the issue's case) uploads to a far end that reads slowly, then fast. Whenever the
    window we show is smaller than the guest's next segment, the guest sends nothing more until
    it sees a larger one: our update must come when the far end's window opens, not the
    guest's window probe after its persist timer."""
    # buffers as Linux's defaults, not what this machine's init namespace was tuned to (a new
    # namespace starts from those): the daemon's send buffer (net.core.wmem_max, a
    # namespace's own since Linux 6.8; older kernels keep the host's) and the far end's
    # receive buffer (tcp_rmem)
    sandbox.host("sysctl", "-w", "net.core.wmem_max=212992")
    sandbox.world("sysctl", "-w", "net.ipv4.tcp_rmem=4096 131072 6291456", check=True)
    if link == "stream":
        sandbox.start_daemon("--no-map-gw", pcap=True)
        sandbox.start_relay()
        configure_guest(sandbox)
    else:
        start_vhost_daemon(sandbox, "--no-map-gw", pcap=True)
        start_vhost_relay(sandbox, "--rx-buf-size", "4096", "--tso")
        configure_guest(sandbox, mtu=1500)
    server = sandbox.dir / "slow_then_fast.py"
    server.write_text(SLOW_THEN_FAST)
    ready = sandbox.dir / "slow_then_fast.ready"
    sandbox.popen_in(sandbox.world_ns, sys.executable, str(server), GW4, "5100", str(ready))
    wait_until(ready.exists, 10, "the slow-then-fast server")
    r = client(sandbox, sandbox.guest_ns, GW4, 5100, "send", 64 * MIB, timeout=60)
    assert r["answer"] == [str(64 * MIB)], r
    sandbox.stop_daemon()  # flushes the capture
    from scapy.all import TCP, rdpcap  # type: ignore[import-untyped]
    last_ours = None
    biggest = 0  # the largest segment the guest sent so far
    waits = []
    for p in rdpcap(sandbox.pcap_path):
        if TCP not in p:
            continue
        seg = p[TCP]
        if seg.sport == 5100:
            last_ours = p
        elif seg.dport == 5100 and len(seg.payload) and last_ours is not None:
            shown = last_ours[TCP].window << 8  # our window scale
            gap = float(p.time - last_ours.time)
            if shown < biggest and gap > PERSIST_WAIT:  # its probe fills the window we showed
                waits.append((round(gap, 3), shown, len(seg.payload)))
            biggest = max(biggest, len(seg.payload))
    assert not waits, f"the guest waited for its persist timer (s, window, segment): {waits}"


def test_dhcpv6_gives_the_fqdn(sandbox: Sandbox) -> None:
    """ISC dhclient -6 asking for dhcp6.fqdn decodes the name we were given with --fqdn."""
    start(sandbox, "--fqdn", "guest.example.org", accept_ra=False)
    wait_until(lambda: guest_ll_ready(sandbox), 10, "the guest's link-local address")
    out = sandbox.dir / "dhclient6.env"
    script = sandbox.dir / "dhclient6-fqdn.sh"
    script.write_text(f'#!/bin/sh\n[ "$reason" = BOUND6 ] && env > {out}\nexit 0\n')
    script.chmod(0o755)
    conf = sandbox.dir / "dhclient6-fqdn.conf"
    conf.write_text("timeout 15;\nretry 1;\ninitial-interval 1;\nrequest dhcp6.fqdn;\n")
    r = sandbox.guest(*CLEAN_ENV, "timeout", "20", "dhclient", "-6", "-1", "-cf", str(conf),
                      "-sf", str(script), "-lf", str(sandbox.dir / "dhclient6-fqdn.leases"),
                      "-pf", str(sandbox.dir / "dhclient6-fqdn.pid"), "tap0",
                      timeout=25)
    assert out.exists(), (r.stdout, r.stderr, sandbox.daemon_log())
    lease = parse_env(out.read_text())
    assert lease["new_fqdn_fqdn"] == "guest.example.org", lease


# The guest's traceroute probe: one UDP datagram with TTL (hop limit) 1, then the ICMP error
# its socket is told of (IP_RECVERR), printed as JSON: origin, type, offender.
TTL1_PROBE = r"""
import json, select, socket, struct, sys
six = ":" in sys.argv[1]
s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
if six:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, 1)
    s.setsockopt(socket.IPPROTO_IPV6, 25, 1)  # IPV6_RECVERR
else:
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
    s.setsockopt(socket.IPPROTO_IP, 11, 1)  # IP_RECVERR
s.sendto(b"probe", (sys.argv[1], 33434))
poller = select.poll()
poller.register(s, select.POLLERR)
if not poller.poll(5000):
    print(json.dumps(None))
    sys.exit()
_, anc, _, _ = s.recvmsg(512, 512, socket.MSG_ERRQUEUE)
for _level, _type, data in anc:
    _errno, origin, type_, code, _pad, _info, _data = struct.unpack_from("=IBBBBII", data)
    off = data[16:]
    who = socket.inet_ntop(socket.AF_INET6, off[8:24]) if six else socket.inet_ntoa(off[4:8])
    print(json.dumps({"origin": origin, "type": type_, "offender": who}))
"""


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_udp_keeps_the_guests_ttl_so_traceroute_works(sandbox: Sandbox, six: bool) -> None:
    """The world namespace routes a further network on (a router, forwarding on): the guest's
    datagram with TTL 1 must expire there, and the time exceeded reach the guest from it."""
    if six:
        sandbox.world("sysctl", "-w", "net.ipv6.conf.all.forwarding=1", check=True)
        sandbox.world("ip", "-6", "route", "add", "2001:db8:1::/64", "via", "2001:db8::3",
                      check=True)
    else:
        sandbox.world("sysctl", "-w", "net.ipv4.ip_forward=1", check=True)
        sandbox.world("ip", "route", "add", "198.51.100.0/24", "via", "192.0.2.3",
                      check=True)
    start_tcp_guest(sandbox, "--no-map-gw")
    far = "2001:db8:1::7" if six else "198.51.100.7"
    r = sandbox.guest(sys.executable, "-c", TTL1_PROBE, far, timeout=15)
    assert r.returncode == 0, (r.stdout, r.stderr)
    got = json.loads(r.stdout)
    assert got is not None, "no ICMP error reached the guest\n" + sandbox.daemon_log()
    # SO_EE_ORIGIN_ICMP6 3, ICMPV6_TIME_EXCEED 3; SO_EE_ORIGIN_ICMP 2, ICMP_TIME_EXCEEDED 11
    assert (got["origin"], got["type"]) == ((3, 3) if six else (2, 11)), got
    assert got["offender"] == (GW6 if six else GW4)


CONNTRACK_UDP = "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"


def test_udp_flows_time_out_as_the_hosts_conntrack(sandbox: Sandbox) -> None:
    """The host namespace's nf_conntrack_udp_timeout (2 s here) ends a flow with one datagram
    each way; one with more, a stream, lives nf_conntrack_udp_timeout_stream (6 s)."""
    if not os.path.exists(CONNTRACK_UDP):
        pytest.skip("no nf_conntrack here: its UDP timeouts are not there to follow")
    sandbox.host("sysctl", "-w", "net.netfilter.nf_conntrack_udp_timeout=2", check=True)
    sandbox.host("sysctl", "-w", "net.netfilter.nf_conntrack_udp_timeout_stream=6",
                 check=True)
    start_udp_guest(sandbox)
    start_server(sandbox, sandbox.host_ns, "4", "127.0.0.1", 5003, 1)
    start_server(sandbox, sandbox.host_ns, "4", "127.0.0.1", 5004, 2)
    single = run_client(sandbox, sandbox.guest_ns, "4", 40003, GW4, 5003, [10])
    stream = run_client(sandbox, sandbox.guest_ns, "4", 40004, GW4, 5004, [10, 10])
    last = time.monotonic()
    assert single["got"] == single["sent"] and stream["got"] == stream["sent"]
    assert {40003, 40004} <= host_udp_ports(sandbox)
    wait_until(lambda: 40003 not in host_udp_ports(sandbox), 5, "the single exchange to end")
    assert 40004 in host_udp_ports(sandbox), "the stream ended with the single exchange"
    wait_until(lambda: 40004 not in host_udp_ports(sandbox), 10, "the stream to end")
    assert time.monotonic() - last >= 5


# The far end: a raw socket that prints the identifier of the first echo request it sees.
ECHO_ID_SNIFFER = r"""
import socket, sys
six = ":" in sys.argv[1]
if six:
    s = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6)
else:
    s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
s.settimeout(10)
open(sys.argv[2], "w").close()
while True:
    data = s.recv(65536)
    icmp = data if six else data[(data[0] & 15) * 4:]
    if icmp[0] == (128 if six else 8):
        print(int.from_bytes(icmp[4:6], "big"))
        break
"""
# The guest: a ping socket bound to echo identifier 4242, one request, its reply's identifier.
PING_WITH_ID = r"""
import socket, sys
six = ":" in sys.argv[1]
s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM,
                  socket.IPPROTO_ICMPV6 if six else socket.IPPROTO_ICMP)
s.bind(("", 4242))
s.settimeout(5)
s.sendto(bytes((128 if six else 8, 0, 0, 0, 0, 0, 0, 1)) + b"vhostpasst", (sys.argv[1], 0))
reply = s.recv(1024)
print(int.from_bytes(reply[4:6], "big"))
"""


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_echo_request_leaves_with_the_guests_identifier(sandbox: Sandbox, six: bool) -> None:
    """The ping socket is bound to the guest's echo identifier, as passt's: the far end sees
    the identifier the guest chose, and the guest gets its reply."""
    start_tcp_guest(sandbox, "--no-map-gw")
    sandbox.guest("sysctl", "-w", "net.ipv4.ping_group_range=0 2147483647", check=True)
    far = GW6 if six else GW4
    ready = sandbox.dir / "sniffer.ready"
    sniffer = sandbox.popen_in(sandbox.world_ns, sys.executable, "-c", ECHO_ID_SNIFFER, far,
                               str(ready), stdout=subprocess.PIPE)
    wait_until(ready.exists, 10, "the echo request sniffer")
    r = sandbox.guest(sys.executable, "-c", PING_WITH_ID, far, timeout=15)
    assert r.returncode == 0 and r.stdout.split() == ["4242"], (r.stdout, r.stderr)
    out, _ = sniffer.communicate(timeout=15)
    assert out.split() == [b"4242"], out


# The guest's TCP client: connect, then "keepalive" (probe every second, for 3 s) or "forget"
# (drop the connection silently: closed in repair mode, nothing is sent).
GUEST_TCP_CLIENT = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
if sys.argv[3] == "keepalive":
    s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 1)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 1)
    time.sleep(3)
else:
    time.sleep(0.5)
    s.setsockopt(socket.IPPROTO_TCP, 19, 1)  # TCP_REPAIR
s.close()
"""


def test_guest_keepalives_turn_so_keepalive_on(sandbox: Sandbox) -> None:
    """The guest probes an idle connection: the daemon's host socket keeps it alive too (ss
    shows its keepalive timer), as passt."""
    start_tcp_guest(sandbox, "--no-map-gw")
    serve(sandbox, sandbox.world_ns, GW4, 5200, "hold")
    guest = sandbox.popen_in(sandbox.guest_ns, sys.executable, "-c", GUEST_TCP_CLIENT, GW4,
                             "5200", "keepalive")

    def daemon_timers() -> str | None:
        r = sandbox.host("ss", "-tnoH", "state", "established", "dst", f"{GW4}:5200")
        return r.stdout if "keepalive" in r.stdout else None

    try:
        wait_until(daemon_timers, 5, "a keepalive timer on the daemon's socket")
    finally:
        guest.wait(10)


def test_our_keepalive_ends_a_connection_the_guest_forgot(
        sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guest drops a connection without a word (a reboot, say): our keepalive after an
    interval of silence (1 s here) draws its RST, and the far end is reset."""
    monkeypatch.setenv("VHOSTPASST_TCP_KEEPALIVE_INTERVAL", "1")
    start_tcp_guest(sandbox, "--no-map-gw")
    log = serve(sandbox, sandbox.world_ns, GW4, 5201, "hold")
    r = sandbox.guest(sys.executable, "-c", GUEST_TCP_CLIENT, GW4, "5201", "forget",
                      timeout=15)
    assert r.returncode == 0, r.stderr
    assert log_lines(log, timeout=10)[0].split()[1:] == ["error", "104"]  # ECONNRESET
