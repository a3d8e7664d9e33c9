"""UDP destinations end to end (proto/udp.py, "Host -> guest"): a guest namespace behind
tests/netns/relay.py, vhostpasst in the host namespace, a "remote" world namespace behind the
host's uplink (tests/netns/sandbox.py).

- The guest's answers to a host peer leave from the address the peer sent to, when the host
  has two addresses and the `-u` listener is bound to the wildcard: the peer's connected socket
  takes nothing from another address.
- A datagram the host receives for a multicast group reaches the guest for that group: a guest
  socket bound to the group gets it.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.netns.sandbox import Sandbox, wait_until
from tests.netns.test_e2e_udp_icmp import GW4, GW6, HOST4, HOST6, run_client, start, start_server

SECOND4 = "192.0.2.3"
SECOND6 = "2001:db8::3"
GROUP4 = "239.1.2.3"
GROUP6 = "ff0e::1:2:3"  # global scope: routed out of the sender's interface

# mode "join IF GROUP": be a member of GROUP on interface IF until killed
# mode "recv IF GROUP PORT": join, bind to the group, print the first datagram's source
# mode "send IF GROUP PORT": send to the group out of interface IF until killed
MCAST_TOOL = r'''
import socket, struct, sys, time
mode, ifname, group = sys.argv[1], sys.argv[2], sys.argv[3]
six = ":" in group
s = socket.socket(socket.AF_INET6 if six else socket.AF_INET, socket.SOCK_DGRAM)
index = socket.if_nametoindex(ifname)
if mode == "send":
    if six:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    else:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF,
                     struct.pack("=4s4si", socket.inet_aton(group), bytes(4), index))
    for _ in range(200):  # until the receiver is up: 20 s at most
        s.sendto(b"to the group", (group, int(sys.argv[4])))
        time.sleep(0.1)
    sys.exit(0)
if six:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                 socket.inet_pton(socket.AF_INET6, group) + struct.pack("=I", index))
else:
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                 struct.pack("=4s4si", socket.inet_aton(group), bytes(4), index))
if mode == "join":
    print("joined", flush=True)
    time.sleep(30)
    sys.exit(0)
s.bind((group, int(sys.argv[4])))
s.settimeout(10)
print("ready", flush=True)
try:
    data, peer = s.recvfrom(2000)
    print(peer[0], data.decode(), flush=True)
except OSError as e:
    print("nothing:", e, flush=True)
'''

@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_udp_replies_leave_from_the_address_the_peer_contacted(sandbox: Sandbox,
                                                               six: bool) -> None:
    """The host has two addresses; a remote peer talks to each through a wildcard `-u 5040`
    listener and gets the guest's echoes: its connected socket would drop them if they left
    from the other address (the kernel's choice for an unbound reply)."""
    fam, second, primary, any_addr = ("6", SECOND6, HOST6, "::") if six else \
        ("4", SECOND4, HOST4, "0.0.0.0")
    start(sandbox, "-u", "5040", ipv6=six)  # (the host's first address is the guest's)
    if six:
        sandbox.host("ip", "-6", "addr", "add", f"{SECOND6}/64", "dev", "up0", "nodad",
                     check=True)
    else:
        sandbox.host("ip", "addr", "add", f"{SECOND4}/24", "dev", "up0", check=True)
    log = start_server(sandbox, sandbox.guest_ns, fam, any_addr, 5040, 2)
    for bind_port, host_addr in ((41040, second), (41041, primary)):
        report = run_client(sandbox, sandbox.world_ns, fam, bind_port, host_addr, 5040,
                            [300])
        assert report["got"] == report["sent"], (host_addr, sandbox.daemon_log())
    lines = log.read_text().splitlines()[1:]
    assert {line.split()[0] for line in lines} == {GW6 if six else GW4}


@pytest.mark.parametrize("six", [False, True], ids=["ipv4", "ipv6"])
def test_udp_inbound_multicast_keeps_its_group(sandbox: Sandbox, six: bool) -> None:
    """The host is a member of a group on its uplink and listens with `-u 5041` on the
    wildcard; a remote sender's datagrams to the group reach a guest socket bound to the group
    (so the guest saw the group as destination, not its own address)."""
    group, sender = (GROUP6, GW6) if six else (GROUP4, GW4)
    tool = sandbox.dir / "mcast_tool.py"
    tool.write_text(MCAST_TOOL)
    member = sandbox.popen_in(sandbox.host_ns, sys.executable, str(tool), "join", "up0",
                              group, stdout=subprocess.PIPE)
    assert member.stdout is not None and member.stdout.readline().strip() == b"joined"
    start(sandbox, "-u", "5041", ipv6=six)
    receiver = sandbox.popen_in(sandbox.guest_ns, sys.executable, str(tool), "recv", "tap0",
                                group, "5041", stdout=subprocess.PIPE)
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == b"ready"
    sandbox.popen_in(sandbox.world_ns, sys.executable, str(tool), "send", "upw0", group,
                     "5041", stdout=subprocess.DEVNULL)
    line = receiver.stdout.readline().decode().strip()
    wait_until(lambda: receiver.poll() is not None, 15, "the guest's receiver")
    assert line == f"{sender} to the group", line + sandbox.daemon_log()
