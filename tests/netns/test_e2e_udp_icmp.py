"""ICMP echo and UDP end to end: a guest namespace behind tests/netns/relay.py, vhostpasst in the
host namespace, a "remote" world namespace behind the host's uplink (see tests/netns/sandbox.py).

What each test checks is what a program in the guest (or on the host) sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns.sandbox import Sandbox, wait_until

GW4 = "192.0.2.1"
HOST4 = "192.0.2.2"
GW6 = "2001:db8::1"
HOST6 = "2001:db8::2"
OUR_MAC = "9a:55:9a:55:9a:55"


def configure_guest(sandbox: Sandbox, ipv6: bool = False) -> None:
    """What a DHCP client would do with the lease (IPv4), plus a static IPv6 set-up: the
    router's neighbour entry is static because NDP is somebody else's module."""
    sandbox.guest("ip", "addr", "add", f"{HOST4}/24", "dev", "tap0", check=True)
    sandbox.guest("ip", "route", "add", "default", "via", GW4, check=True)
    if ipv6:
        sandbox.guest("ip", "-6", "addr", "add", f"{HOST6}/64", "dev", "tap0", "nodad",
                      check=True)
        sandbox.guest("ip", "-6", "neigh", "replace", GW6, "lladdr", OUR_MAC, "dev", "tap0",
                      "nud", "permanent", check=True)
        sandbox.guest("ip", "-6", "route", "replace", "default", "via", GW6, check=True)


def start(sandbox: Sandbox, *args: str, ipv6: bool = False) -> None:
    sandbox.start_daemon(*args)
    sandbox.start_relay()
    configure_guest(sandbox, ipv6)


def ping(sandbox: Sandbox, addr: str, six: bool = False, count: int = 1,
         size: int = 56) -> subprocess.CompletedProcess[str]:
    cmd = ["busybox", "ping", *(["-6"] if six else []), "-c", str(count), "-W", "3",
           "-s", str(size), addr]
    return sandbox.guest(*cmd, timeout=15)


# --- ICMP echo -----------------------------------------------------------------------------


def test_ping_gateway_reaches_the_hosts_loopback(sandbox: Sandbox) -> None:
    """The gateway address is map-host-loopback: the host's 127.0.0.1 answers. Taking lo down
    in the host namespace makes the same ping fail, which shows it is the host that answers."""
    start(sandbox)
    r = ping(sandbox, GW4)
    assert r.returncode == 0, r.stdout + r.stderr + sandbox.daemon_log()
    assert "1 packets received" in r.stdout
    sandbox.host("ip", "link", "set", "lo", "down", check=True)
    r = ping(sandbox, GW4)
    assert r.returncode != 0, r.stdout


def test_ping_remote_host_and_large_payload(sandbox: Sandbox) -> None:
    """With --no-map-gw the gateway is the world namespace's 192.0.2.1 itself."""
    start(sandbox, "--no-map-gw")
    r = ping(sandbox, GW4, count=2)
    assert r.returncode == 0, r.stdout + r.stderr + sandbox.daemon_log()
    assert "2 packets received" in r.stdout
    r = ping(sandbox, GW4, size=1400)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_icmp_drops_echo_requests(sandbox: Sandbox) -> None:
    start(sandbox, "--no-icmp")
    r = ping(sandbox, GW4)
    assert r.returncode != 0


def test_ping6_gateway_and_remote(sandbox: Sandbox) -> None:
    start(sandbox, ipv6=True)
    r = ping(sandbox, GW6, six=True)  # map-host-loopback: the host's ::1
    assert r.returncode == 0, r.stdout + r.stderr + sandbox.daemon_log()
    sandbox.host("ip", "link", "set", "lo", "down", check=True)
    assert ping(sandbox, GW6, six=True).returncode != 0


def test_ping6_remote_with_no_map_gw(sandbox: Sandbox) -> None:
    start(sandbox, "--no-map-gw", ipv6=True)
    r = ping(sandbox, GW6, six=True, count=2)
    assert r.returncode == 0, r.stdout + r.stderr + sandbox.daemon_log()


# --- UDP -----------------------------------------------------------------------------------

SIZES = [1, 1400, 8000, 65000]

# One small UDP tool, run with the interpreter running the tests in whichever namespace:
#   server FAMILY ADDR PORT COUNT LOG   receive COUNT datagrams, log "addr port len sha", echo
#   client FAMILY BIND_PORT DST PORT SIZE...   send all, then read all echoes; print a report
UDP_TOOL = r'''
import hashlib, json, socket, sys
def payload(i, n):
    return bytes((i * 7 + k) & 0xFF for k in range(n))
mode, fam = sys.argv[1], socket.AF_INET6 if sys.argv[2] == "6" else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
if mode == "server":
    addr, port, count, logf = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), sys.argv[6]
    s.bind((addr, port))
    s.settimeout(20)
    with open(logf + ".tmp", "w") as log:
        log.write("ready\n")
        log.flush()
        import os; os.rename(logf + ".tmp", logf)
        for _ in range(count):
            data, peer = s.recvfrom(70000)
            log.write(f"{peer[0]} {peer[1]} {len(data)} {hashlib.sha1(data).hexdigest()}\n")
            log.flush()
            s.sendto(data, peer)
else:
    bind_port, dst, port = int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    sizes = [int(x) for x in sys.argv[6:]]
    s.bind(("", bind_port))
    s.connect((dst, port))
    s.settimeout(5)
    for i, n in enumerate(sizes):
        s.send(payload(i, n))
    got = []
    try:
        for _ in sizes:
            got.append(s.recv(70000))
    except OSError as e:
        got.append(repr(e))
    sent = [hashlib.sha1(payload(i, n)).hexdigest() for i, n in enumerate(sizes)]
    print(json.dumps({"sent": sent,
                      "got": [hashlib.sha1(g).hexdigest() if isinstance(g, bytes) else g
                              for g in got]}))
'''


def udp_tool(sandbox: Sandbox) -> str:
    path = sandbox.dir / "udp_tool.py"
    if not path.exists():
        path.write_text(UDP_TOOL)
    return str(path)


def start_server(sandbox: Sandbox, ns: str, fam: str, addr: str, port: int,
                 count: int) -> Path:
    log = sandbox.dir / f"server-{ns[-1]}-{port}.log"
    sandbox.popen_in(ns, sys.executable, udp_tool(sandbox), "server", fam, addr, str(port),
                     str(count), str(log), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_until(log.exists, 10, f"UDP server on {addr}:{port}")
    return log


def run_client(sandbox: Sandbox, ns: str, fam: str, bind_port: int, dst: str, port: int,
               sizes: list[int]) -> dict[str, list[str]]:
    r = sandbox.run_in(ns, sys.executable, udp_tool(sandbox), "client", fam, str(bind_port),
                       dst, str(port), *map(str, sizes), timeout=30)
    assert r.returncode == 0, r.stderr + sandbox.daemon_log()
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def server_lines(log: Path, count: int) -> list[list[str]]:
    wait_until(lambda: len(log.read_text().splitlines()) > count, 10, "server log")
    return [line.split() for line in log.read_text().splitlines()[1:]]


def big_mtu(sandbox: Sandbox) -> None:
    """The guest takes vhostpasst's 65520-byte MTU, as a DHCP client would."""
    sandbox.guest("ip", "link", "set", "tap0", "mtu", "65520", check=True)


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_udp_guest_to_host_sizes_order_and_source_port(sandbox: Sandbox, six: bool) -> None:
    """The guest talks to the gateway address, which is the host's loopback: 1..65000-byte
    datagrams arrive intact and in order both ways, and the server sees the guest's port."""
    start(sandbox, ipv6=six)
    big_mtu(sandbox)
    fam, loop_addr, gw = ("6", "::1", GW6) if six else ("4", "127.0.0.1", GW4)
    log = start_server(sandbox, sandbox.host_ns, fam, loop_addr, 5001, len(SIZES))
    report = run_client(sandbox, sandbox.guest_ns, fam, 40001, gw, 5001, SIZES)
    assert report["got"] == report["sent"]
    seen = server_lines(log, len(SIZES))
    assert [int(line[2]) for line in seen] == SIZES
    assert [line[3] for line in seen] == report["sent"]
    assert {line[1] for line in seen} == {"40001"}  # the guest's source port is kept


def test_udp_guest_to_remote_host(sandbox: Sandbox) -> None:
    """A "remote" server in the world namespace sees the host's address and the guest's port."""
    start(sandbox, "--no-map-gw")
    log = start_server(sandbox, sandbox.world_ns, "4", GW4, 5001, 2)
    report = run_client(sandbox, sandbox.guest_ns, "4", 40002, GW4, 5001, [1, 1400])
    assert report["got"] == report["sent"]
    assert [line[:2] for line in server_lines(log, 2)] == [[HOST4, "40002"]] * 2


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_udp_inbound_forwarding_with_port_translation(sandbox: Sandbox, six: bool) -> None:
    """-u 5002:6002: a host client's datagrams to port 5002 reach the guest's port 6002 from
    the gateway address and the client's own port, and the guest's answers get back."""
    start(sandbox, "-u", "5002:6002", ipv6=six)
    big_mtu(sandbox)
    fam, any_addr, loop_addr, gw = ("6", "::", "::1", GW6) if six else \
        ("4", "0.0.0.0", "127.0.0.1", GW4)
    log = start_server(sandbox, sandbox.guest_ns, fam, any_addr, 6002, len(SIZES))
    report = run_client(sandbox, sandbox.host_ns, fam, 41002, loop_addr, 5002, SIZES)
    assert report["got"] == report["sent"], sandbox.daemon_log()
    seen = server_lines(log, len(SIZES))
    assert [line[3] for line in seen] == report["sent"]
    assert {(line[0], line[1]) for line in seen} == {(gw, "41002")}


def test_udp_inbound_from_the_world(sandbox: Sandbox) -> None:
    """A remote client reaching the host's address: the guest sees the remote address."""
    start(sandbox, "-u", "5004")
    log = start_server(sandbox, sandbox.guest_ns, "4", "0.0.0.0", 5004, 1)
    report = run_client(sandbox, sandbox.world_ns, "4", 41004, HOST4, 5004, [1400])
    assert report["got"] == report["sent"]
    assert server_lines(log, 1)[0][:2] == [GW4, "41004"]


def host_udp_ports(sandbox: Sandbox) -> set[int]:
    """Local ports of the UDP sockets in the host namespace (the daemon's flow sockets)."""
    pid = sandbox.daemon_pid
    ports = set()
    for name in ("udp", "udp6"):
        text = Path(f"/proc/{pid}/net/{name}").read_text()
        for line in text.splitlines()[1:]:
            ports.add(int(line.split()[1].split(":")[1], 16))
    return ports


def test_udp_flow_expires_after_its_timeout(sandbox: Sandbox,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VHOSTPASST_UDP_TIMEOUT", "2")
    start(sandbox)
    start_server(sandbox, sandbox.host_ns, "4", "127.0.0.1", 5003, 1)
    t0 = time.monotonic()
    report = run_client(sandbox, sandbox.guest_ns, "4", 40003, GW4, 5003, [10])
    assert report["got"] == report["sent"]
    assert 40003 in host_udp_ports(sandbox)
    wait_until(lambda: 40003 not in host_udp_ports(sandbox), 10, "the flow to expire")
    assert time.monotonic() - t0 >= 1.5


DNS_RESPONDER = r'''
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.53", 53))
open(sys.argv[1], "w").close()
s.settimeout(20)
while True:
    q, peer = s.recvfrom(512)
    end = q.index(b"\0", 12) + 5
    ans = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + bytes([203, 0, 113, 7])
    s.sendto(q[:2] + b"\x81\x80" + q[4:6] + b"\x00\x01\x00\x00\x00\x00" + q[12:end] + ans, peer)
'''

DNS_CLIENT = r'''
import socket, struct, sys
q = struct.pack("!HHHHHH", 0x1234, 0x0100, 1, 0, 0, 0) + b"\x04test\x07example\x00" + \
    struct.pack("!HH", 1, 1)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(5)
s.sendto(q, (sys.argv[1], 53))
r, peer = s.recvfrom(512)
print(peer[0], peer[1], socket.inet_ntoa(r[-4:]), r[:2].hex())
'''


@pytest.mark.sandbox(resolv_conf="nameserver 127.0.0.53\n")
def test_dns_to_the_advertised_address_reaches_the_hosts_loopback_resolver(
        sandbox: Sandbox) -> None:
    sandbox.start_daemon()
    sandbox.start_relay()
    lease = sandbox.udhcpc()
    assert lease["dns"].split() == [GW4]
    configure_guest(sandbox)
    ready = sandbox.dir / "dns.ready"
    (sandbox.dir / "dns.py").write_text(DNS_RESPONDER)
    sandbox.popen_in(sandbox.host_ns, sys.executable, str(sandbox.dir / "dns.py"), str(ready))
    wait_until(ready.exists, 10, "the DNS responder")
    (sandbox.dir / "dnsq.py").write_text(DNS_CLIENT)
    r = sandbox.guest(sys.executable, str(sandbox.dir / "dnsq.py"), GW4, timeout=15)
    assert r.returncode == 0, r.stderr + sandbox.daemon_log()
    assert r.stdout.split() == [GW4, "53", "203.0.113.7", "1234"]  # from where it was asked
    r = sandbox.guest("busybox", "nslookup", "test.example", GW4, timeout=15)
    assert "203.0.113.7" in r.stdout, r.stdout + r.stderr


PORT_UNREACH_CLIENT = r'''
import socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(3)
s.send(b"anyone there?")
try:
    s.recv(100)
    print("answer")
except ConnectionRefusedError:
    print("refused")
except TimeoutError:
    print("timeout")
'''


@pytest.mark.parametrize("where", ["host", "world", "host6"])
def test_port_unreachable_reaches_the_guest_as_an_icmp_error(sandbox: Sandbox,
                                                             where: str) -> None:
    """A closed port on the host's loopback (through the gateway address), or on the remote
    host (with --no-map-gw): the guest's connected socket sees ECONNREFUSED."""
    start(sandbox, *(["--no-map-gw"] if where == "world" else []), ipv6=where == "host6")
    (sandbox.dir / "pu.py").write_text(PORT_UNREACH_CLIENT)
    dst = GW6 if where == "host6" else GW4
    r = sandbox.guest(sys.executable, str(sandbox.dir / "pu.py"), dst, "5999", timeout=15)
    assert r.stdout.strip() == "refused", r.stdout + r.stderr + sandbox.daemon_log()


# --- IPv6 with NDP (router advertisements, neighbour answers) -------------------------------


def guest_global6(sandbox: Sandbox) -> str | None:
    r = sandbox.guest("ip", "-6", "-o", "addr", "show", "dev", "tap0", "scope", "global")
    for line in r.stdout.splitlines():
        cols = line.split()
        if "inet6" in cols and "tentative" not in cols:
            return cols[cols.index("inet6") + 1].split("/")[0]
    return None


def test_slaac_from_our_router_advertisements_then_ping6_and_udp6(sandbox: Sandbox) -> None:
    """No static IPv6 set-up: the guest configures itself from our RAs (SLAAC on the host's
    /64), resolves the router through our neighbour advertisements, pings and talks UDP."""
    sandbox.guest("sysctl", "-qw", "net.ipv6.conf.tap0.accept_ra=2", check=True)
    sandbox.start_daemon()
    sandbox.start_relay()
    sandbox.guest("ip", "addr", "add", f"{HOST4}/24", "dev", "tap0", check=True)
    sandbox.guest("busybox", "ping", "-c1", "-W", "1", GW4, timeout=10)  # the guest shows up
    addr = wait_until(lambda: guest_global6(sandbox), 20, "a SLAAC address on tap0")
    assert addr.startswith("2001:db8::")
    r = sandbox.guest("ip", "-6", "route", "show", "default")
    assert "fe80::" in r.stdout, r.stdout
    assert ping(sandbox, GW6, six=True).returncode == 0, sandbox.daemon_log()
    log = start_server(sandbox, sandbox.host_ns, "6", "::1", 5005, 1)
    report = run_client(sandbox, sandbox.guest_ns, "6", 40005, GW6, 5005, [1400])
    assert report["got"] == report["sent"]
    assert server_lines(log, 1)[0][1] == "40005"


def test_udp_inbound_range_bound_to_an_address(sandbox: Sandbox) -> None:
    """-u 127.0.0.1/5010-5011:6010-6011: each port of the range maps to its own guest port,
    and only on the address given (the host's 192.0.2.2 has nothing listening)."""
    start(sandbox, "-u", "127.0.0.1/5010-5011:6010-6011")
    log = start_server(sandbox, sandbox.guest_ns, "4", "0.0.0.0", 6011, 1)
    report = run_client(sandbox, sandbox.host_ns, "4", 41011, "127.0.0.1", 5011, [100])
    assert report["got"] == report["sent"], sandbox.daemon_log()
    assert server_lines(log, 1)[0][:2] == [GW4, "41011"]
    (sandbox.dir / "pu.py").write_text(PORT_UNREACH_CLIENT)
    r = sandbox.host(sys.executable, str(sandbox.dir / "pu.py"), HOST4, "5010", timeout=15)
    assert r.stdout.strip() == "refused"


def test_explicit_udp_port_that_cannot_be_bound_is_fatal(sandbox: Sandbox) -> None:
    blocker = sandbox.popen_in(sandbox.host_ns, sys.executable, "-c",
                               "import socket,time; s=socket.socket(socket.AF_INET,"
                               "socket.SOCK_DGRAM); s.bind(('0.0.0.0', 5020)); print(1, "
                               "flush=True); time.sleep(30)", stdout=subprocess.PIPE)
    assert blocker.stdout is not None and blocker.stdout.readline().strip() == b"1"
    proc = sandbox.start_daemon("-u", "5020", wait=False)
    assert proc.wait(15) == 1
    assert "5020" in sandbox.daemon_log()
