"""One guest per back end (stream socket, vhost-user), booted once and shared by the checks of
this module, in order: DHCP lease with the search list, the ARP proxy, SLAAC and the default
route via our link-local, a DHCPv6 address (ISC dhclient in the image), ping of the gateway and
of a remote host (IPv4 and IPv6), TCP both ways (guest to the gateway, host to the guest
through -t), small and 50 MiB with sha256, UDP both ways (iperf3), DNS through the forwarded
resolver address, the daemon killed and restarted under the running guest, and its exit
status on SIGTERM (last: it ends the daemon).

The host namespace's resolv.conf names 127.0.0.53 and ::1 only (like systemd-resolved): the
daemon advertises the gateway addresses instead and forwards queries sent to them there, where
tiny DNS responders (hostside.py) answer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import daemon_has_vhost_user
from harness import (
    DAEMON,
    HOST_ADDR4,
    HOST_ADDR6,
    HOST_GW4,
    HOST_GW6,
    HOST_PREFIX4,
    REMOTE4,
    REMOTE6,
    Daemon,
    Guest,
    GuestNet,
    HostNetns,
    dhcp_lease,
    hostside,
    make_workdir,
    stop_proc,
)
from image import Image

SEARCH = "test.example"
RESOLV = f"nameserver 127.0.0.53\nnameserver ::1\nsearch {SEARCH}\n"
DNS_NAME, DNS_A, DNS_AAAA = f"vpt.{SEARCH}", "203.0.113.7", "2001:db8:1::7"
SRV_PORT = 10001  # host servers the guest connects to (through the gateway address)
FWD_PORT = 10002  # -t: host connects to it, the daemon forwards to the guest
IPERF_FWD = 5201  # -t and -u: iperf3 in the guest, the host as the client
IPERF_HOST = 5202  # iperf3 in the host namespace, the guest as the client
OUR_MAC = "9a:55:9a:55:9a:55"  # passt's default MAC on the guest link (no -M)
BIG = 50 << 20
SMALL = 4096 + 123  # several segments, not a round number

KINDS = [pytest.param(k, marks=pytest.mark.xdist_group(f"guest-{k}"))
         for k in ("stream", "vhost-user")]


@dataclass
class GuestEnv:
    """A host namespace with a world behind it, the daemon, its guest with a lease, and the
    DNS responder. `vpt_logs` lets conftest attach the logs to a failing test's report."""

    kind: str
    workdir: Path
    netns: HostNetns
    daemon: Daemon
    guest: Guest
    lease: dict[str, str]
    dns: list[subprocess.Popen[str]]
    tmp: Path
    lease6: dict[str, str] = field(default_factory=dict)  # once test_dhcpv6_address got one
    vpt_logs: list[tuple[str, Path]] = field(default_factory=list)

    def our_link_local(self) -> str:
        m = re.search(r"our link-local: (\S+)", self.daemon.log_text())
        assert m, self.daemon.log_text()
        return m.group(1)

    def restart_daemon(self) -> None:
        """A crash and a restart: SIGKILL, then the same command again."""
        assert self.daemon.proc is not None
        self.daemon.proc.kill()
        self.daemon.proc.wait(timeout=10)
        self.daemon.proc = None
        self.daemon = Daemon(self.workdir, self.netns, self.daemon.args,
                             vhost_user=self.daemon.vhost_user)


@pytest.fixture(scope="module", params=KINDS)
def env(request: pytest.FixtureRequest, image: Image) -> Iterator[GuestEnv]:
    kind: str = request.param
    if kind == "vhost-user" and not daemon_has_vhost_user():
        pytest.skip(f"{DAEMON[0]} --help says vhost-user is not supported yet")
    workdir = make_workdir()
    netns = HostNetns(resolv_conf=RESOLV)
    started: list[Daemon | Guest] = []
    dns: list[subprocess.Popen[str]] = []
    try:
        args = ("-t", f"{FWD_PORT},{IPERF_FWD}", "-u", str(IPERF_FWD))
        daemon = Daemon(workdir, netns, args, vhost_user=(kind == "vhost-user"))
        started.append(daemon)
        # 512 MiB: the 50 MiB upload is a file in the guest's tmpfs.
        guest = Guest(image, workdir, GuestNet(kind, daemon.socket, reconnect_ms=200), netns,
                      mem="512M")
        started.append(guest)
        for addr in ("127.0.0.53", "::1"):
            dns.append(hostside(netns, "dns", addr, DNS_NAME, DNS_A, DNS_AAAA))
        e = GuestEnv(kind, workdir, netns, daemon, guest, dhcp_lease(guest), dns, workdir / "host")
        e.vpt_logs = [("daemon log", workdir / "daemon.log"), ("console", workdir / "console.log"),
                      ("qemu stderr", workdir / "qemu.log")]
        e.tmp.mkdir()
        yield e
        started[0] = e.daemon  # restarted along the way
    finally:
        for obj in reversed(started):
            obj.close()
        for proc in dns:
            stop_proc(proc)
        netns.close()
        if not os.environ.get("VPT_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def _ping(guest: Guest, target: str, count: int = 3) -> float:
    """Ping from the guest; every echo must come back. Returns the average RTT in ms."""
    _, out = guest.run(f"ping -c {count} -W 5 {target}", timeout=30)
    assert f"{count} packets received" in out, out
    m = re.search(r"min/avg/max = [\d.]+/([\d.]+)/", out)
    assert m, out
    return float(m.group(1))


def _wait_guest(guest: Guest, cond: str, what: str, tries: int = 100) -> None:
    """Poll a shell condition in the guest, 0.1 s apart, at most `tries` times."""
    rc, _ = guest.run(f"i=0; ok=1; until {cond}; do i=$((i+1)); "
                      f"if [ $i -ge {tries} ]; then ok=0; break; fi; sleep 0.1; done; [ $ok = 1 ]",
                      timeout=tries * 0.1 + 60, check=False)
    if rc != 0:
        raise guest.failure(f"still waiting for {what} after {tries} tries of {cond!r}")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- addresses -----------------------------------------------------------------------------------


def test_dhcp_lease(env: GuestEnv) -> None:
    lease = env.lease
    assert lease["ip"] == HOST_ADDR4 and lease["mask"] == str(HOST_PREFIX4)
    assert lease["router"] == HOST_GW4 and lease["mtu"] == "65520"
    # The host's only resolver is on its loopback: the guest gets the gateway address instead.
    assert lease["dns"].split() == [HOST_GW4]
    assert lease["search"] == SEARCH  # option 119, from the resolv.conf search line
    assert lease["serverid"] == HOST_GW4
    assert lease["lease"] == "4294967295"  # passt leases are infinite
    # The udhcpc script applied it: address, MTU, default route.
    _, addr = env.guest.run("ip -4 addr show dev eth0")
    assert f"inet {HOST_ADDR4}/{HOST_PREFIX4}" in addr
    _, mtu = env.guest.run("cat /sys/class/net/eth0/mtu")
    assert mtu.strip() == "65520"
    _, route = env.guest.run("ip -4 route show default")
    assert f"default via {HOST_GW4} dev eth0" in route


def test_arp_proxy(env: GuestEnv) -> None:
    # The gateway and any other address on the link answer with our MAC.
    for target in (HOST_GW4, "192.0.2.77"):
        _, out = env.guest.run(f"arping -c 2 -w 5 -I eth0 {target}", timeout=20)
        assert re.search(rf"reply from {re.escape(target)} \[{OUR_MAC}\]", out, re.I), out
    # The kernel's own resolution (a ping, whose answer does not matter here) puts the
    # gateway in the neighbour table with our MAC.
    env.guest.run(f"ping -c 1 -W 2 {HOST_GW4}", timeout=20, check=False)
    _, neigh = env.guest.run(f"ip neigh show {HOST_GW4} dev eth0")
    assert f"lladdr {OUR_MAC}" in neigh.lower(), neigh
    assert "FAILED" not in neigh and "INCOMPLETE" not in neigh, neigh


def test_slaac_and_default_route(env: GuestEnv) -> None:
    # The kernel (accept_ra=1) configures itself from our router advertisement.
    # "scope global dynamic" once duplicate address detection is over ("tentative" before).
    _wait_guest(env.guest, "ip -6 addr show dev eth0 | grep -q '/64 scope global dynamic'",
                "SLAAC address")
    _, addr = env.guest.run("ip -6 addr show dev eth0")
    assert re.search(r"inet6 2001:db8::[0-9a-f:]+/64 scope global dynamic", addr), addr
    _wait_guest(env.guest, "ip -6 route show default | grep -q via", "IPv6 default route")
    _, route = env.guest.run("ip -6 route show default")
    assert f"default via {env.our_link_local()} dev eth0" in route, route


def _lease6(env: GuestEnv) -> dict[str, str]:
    """The guest's DHCPv6 lease (dhclient -6), taken once per guest and kept on `env`: the DNS
    case needs it too and must not depend on running after the DHCPv6 case on one worker."""
    if env.lease6:
        return env.lease6
    _need(env, "dhclient")
    # dhclient needs a usable (non-tentative) link-local address to send from; the link is
    # brought up here too so this does not depend on the cases before it.
    env.guest.run("ip link set eth0 up")
    _wait_guest(env.guest, "ip -6 addr show dev eth0 scope link | grep inet6 | grep -vq tentative",
                "a link-local address past DAD")
    # dhclient -1 gives up after its own timeout (20 s); a TCG guest on a loaded two-core CI
    # machine can be slower than that, so it gets three tries, as a person would retry.
    outputs = []
    for _ in range(3):
        rc, out = env.guest.run(
            "dhclient -6 -1 -cf /etc/dhclient.conf -sf /etc/dhclient6.script "
            "-lf /tmp/dhclient6.leases -pf /tmp/dhclient6.pid eth0", timeout=60, check=False)
        outputs.append(f"exit {rc}: {out}")
        if rc == 0:
            break
    m = re.search(r"^VPT-DHCP6 (.*)$", out, re.M)
    assert m, "\n".join(outputs)
    env.lease6 = dict(kv.split("=", 1) for kv in m.group(1).split(" ") if "=" in kv)
    _wait_guest(env.guest, f"ip -6 addr show dev eth0 | grep 'inet6 {HOST_ADDR6}/128' "
                "| grep -vq tentative", "DHCPv6 address past DAD")
    return env.lease6


def test_dhcpv6_address(env: GuestEnv) -> None:
    lease = _lease6(env)
    assert lease["ip6"] == HOST_ADDR6 and lease["plen"] == "128", lease
    assert lease["search6"].rstrip(".") == SEARCH, lease
    assert lease["dns6"].split() == [HOST_GW6], lease  # ::1 on the host: the mapped address


# -- ICMP ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [HOST_GW4, HOST_GW6, REMOTE4, REMOTE6],
                         ids=["gateway4", "gateway6", "remote4", "remote6"])
def test_ping(env: GuestEnv, target: str) -> None:
    # The gateway addresses map to the host's loopback; the remote sits in the world namespace
    # behind the host's upstream link. Echoes go out through ping sockets in the host namespace.
    if ":" in target:
        _wait_guest(env.guest, "ip -6 route show default | grep -q via", "IPv6 default route")
    rtt = _ping(env.guest, target)
    print(f"{env.kind}: ping {target} avg {rtt:.3f} ms")


# -- TCP -----------------------------------------------------------------------------------------

# 50 MiB once per back end (IPv4): TCG moves a few MB/s through sha256sum in the guest.
TCP_CASES = pytest.mark.parametrize("ip, size", [(4, SMALL), (6, SMALL), (4, BIG)],
                                    ids=["4-small", "6-small", "4-50MiB"])


@TCP_CASES
def test_tcp_guest_to_host(env: GuestEnv, ip: int, size: int) -> None:
    """The guest connects to the gateway address (the host's loopback): download, upload."""
    gw, loop = (HOST_GW4, "127.0.0.1") if ip == 4 else (HOST_GW6, "::1")
    g = env.guest
    src = env.tmp / "down"
    src.write_bytes(os.urandom(size))
    digest = _sha(src)
    server = hostside(env.netns, "serve-send", loop, str(SRV_PORT), str(src))
    try:
        t0 = time.monotonic()
        # Kept in the guest's tmpfs to go back up: cheaper than /dev/urandom under TCG.
        _, out = g.run(f"nc {gw} {SRV_PORT} | tee /tmp/up | sha256sum", timeout=180)
        down = time.monotonic() - t0
        assert out.split()[0] == digest
    finally:
        stop_proc(server)

    server = hostside(env.netns, "serve-recv", loop, str(SRV_PORT))
    try:
        t0 = time.monotonic()
        # busybox nc does not half-close: it exits when the file is sent and closes, and the
        # server prints what it got at that EOF.
        g.run(f"nc {gw} {SRV_PORT} < /tmp/up; rm /tmp/up", timeout=180)
        up = time.monotonic() - t0
        assert server.stdout is not None
        assert server.stdout.readline().split() == [str(size), digest]
    finally:
        stop_proc(server)
    print(f"{env.kind} IPv{ip} {size} B: down {size / down / 1e6:.1f} MB/s, "
          f"up {size / up / 1e6:.1f} MB/s")


@TCP_CASES
def test_tcp_host_to_guest(env: GuestEnv, ip: int, size: int) -> None:
    """The host connects to a -t port on its loopback; the daemon forwards it to the guest."""
    loop = "127.0.0.1" if ip == 4 else "::1"
    g = env.guest
    src = env.tmp / "fwd"
    src.write_bytes(os.urandom(size))
    # In braces: run() appends "; printf ...", and "&;" is a syntax error that ends the shell.
    g.run(f"{{ nc -l -p {FWD_PORT} | sha256sum > /tmp/fwd.sha & }}")
    _wait_guest(g, f"netstat -ltn | grep -q ':{FWD_PORT} '", "guest listener")
    t0 = time.monotonic()
    sender = hostside(env.netns, "send", loop, str(FWD_PORT), str(src), ready=False)
    try:
        assert sender.wait(timeout=180) == 0
        g.run("wait", timeout=180)  # nc ends at the host's FIN
        elapsed = time.monotonic() - t0
    finally:
        stop_proc(sender)
    _, out = g.run("cat /tmp/fwd.sha")
    assert out.split()[0] == _sha(src)
    print(f"{env.kind} IPv{ip} {size} B host->guest via -t: {size / elapsed / 1e6:.1f} MB/s")


# -- UDP -----------------------------------------------------------------------------------------


def _iperf_udp(out: str) -> tuple[int, int]:
    """(packets, lost) from iperf3 -J output (its sum at the receiving end)."""
    end = json.loads(out)["end"]["sum"]
    return int(end["packets"]), int(end["lost_packets"])


def _need(env: GuestEnv, tool: str) -> None:
    """Skip when the image lacks a host tool (not installed on the host when it was built)."""
    rc, _ = env.guest.run(f"[ -x /bin/{tool} ]", check=False)
    if rc != 0 or not shutil.which(tool):
        pytest.skip(f"{tool} is not installed on the host (and so not in the image)")


def test_udp_guest_to_host(env: GuestEnv) -> None:
    """iperf3 in the guest sends UDP to the gateway address, iperf3 -s on the host's loopback
    receives (its control connection is TCP, the data and its handshake datagrams UDP)."""
    _need(env, "iperf3")
    server = subprocess.Popen(
        env.netns.argv(["iperf3", "-s", "-1", "-J", "-B", "127.0.0.1", "-p", str(IPERF_HOST)]),
        stdout=subprocess.PIPE, text=True)
    try:
        _, out = env.guest.run(f"i=0; until iperf3 -c {HOST_GW4} -p {IPERF_HOST} -u -b 5M -t 1 "
                               f"-l 1200; do i=$((i+1)); [ $i -ge 20 ] && break; sleep 0.2; done",
                               timeout=60)
        srv_out, _ = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    packets, lost = _iperf_udp(srv_out)
    assert packets > 100 and lost <= packets // 10, (packets, lost, out)


def test_udp_host_to_guest(env: GuestEnv) -> None:
    """The host's iperf3 sends UDP to a -u port on its loopback; iperf3 -s in the guest. At
    5 Mbit/s: a TCG guest on a loaded runner drops what its socket buffer cannot take."""
    _need(env, "iperf3")
    env.guest.run(f"{{ iperf3 -s -1 -p {IPERF_FWD} > /tmp/iperf.log 2>&1 & }}")
    _wait_guest(env.guest, f"netstat -ltn | grep -q ':{IPERF_FWD} '", "guest iperf3")
    res = subprocess.run(
        env.netns.argv(["iperf3", "-c", "127.0.0.1", "-p", str(IPERF_FWD), "-u", "-b", "5M",
                        "-t", "1", "-l", "1200", "-J"]),
        capture_output=True, text=True, timeout=60)
    env.guest.run("wait", timeout=30)
    _, log = env.guest.run("cat /tmp/iperf.log")
    assert res.returncode == 0, f"{res.stdout[-2000:]}{res.stderr}\nguest iperf3:\n{log}"
    # The client's "end.sum" reports what the server (the guest) received.
    packets, lost = _iperf_udp(res.stdout)
    assert packets > 100 and lost <= packets // 10, (packets, lost, log)


# -- DNS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("ip", [4, 6])
def test_dns_through_forwarded_resolver(env: GuestEnv, ip: int) -> None:
    """The host's nameservers are on its loopback (127.0.0.53, ::1): the DHCP and DHCPv6
    leases advertise the gateway addresses, and the daemon forwards queries sent there."""
    if ip == 4:
        server = env.lease["dns"].split()[0]
    else:
        server = _lease6(env)["dns6"].split()[0]
        _wait_guest(env.guest, "ip -6 route show default | grep -q via", "IPv6 default route")
    _, out = env.guest.run(f"nslookup {DNS_NAME} {server}", timeout=30)
    assert f"Address: {DNS_A}" in out, out
    assert f"Address: {DNS_AAAA}" in out, out
    _, out = env.guest.run(f"nslookup nosuch.{SEARCH} {server}", timeout=30, check=False)
    assert "NXDOMAIN" in out, out


# -- daemon life cycle (last: they restart and then stop the daemon) ------------------------------


def test_daemon_restart_under_running_guest(env: GuestEnv) -> None:
    """qemu reconnects (reconnect-ms on the chardev / stream netdev); the guest keeps its
    addresses and its network comes back without a reboot or a new lease."""
    for _ in range(2):  # twice: the second daemon must be as good as the first
        env.restart_daemon()
        _wait_guest(env.guest, f"ping -c 1 -W 1 {HOST_GW4} >/dev/null", "network back", 30)
        _ping(env.guest, HOST_GW4, count=2)
        _ping(env.guest, REMOTE6, count=1)
        _, addr = env.guest.run("ip -4 addr show dev eth0")
        assert f"inet {HOST_ADDR4}/{HOST_PREFIX4}" in addr
    assert "connected" in env.daemon.log_text() or "running" in env.daemon.log_text()


def test_sigterm_exit_status(env: GuestEnv) -> None:
    assert env.daemon.alive()
    assert env.daemon.close() == 0, env.daemon.log_text()
