"""pasta mode end to end: vhostpasta runs in the sandbox's host namespace and serves a namespace
it creates (spawn mode) or joins (attach mode: PID, --netns, podman's and rootlesskit's command
lines). Every namespace here is created by the test; only documentation addresses are used.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from ipaddress import IPv6Address
from pathlib import Path

import pytest

from tests.netns.pasta_sandbox import (
    PODMAN_ARGS,
    ROOTLESSKIT_ARGS,
    _podman_netns,
    _remove_netns_file,
    background_pid,
    in_netns,
    kill_quietly,
    run_pasta,
    start_pasta,
    wait_gone,
)
from tests.netns.sandbox import Sandbox, wait_until
from vhostpasst.pasta import config_net
from vhostpasst.system.rtnl import Message

UDHCPC_SCRIPT = """#!/bin/sh
[ "$1" = bound ] || exit 0
echo "LEASE ip=$ip router=$router mask=$mask"
ip addr add "$ip/$mask" dev "$interface"
ip route add default via "$router" dev "$interface"
"""

UDP_ECHO = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(2048)
    s.sendto(b"echo:" + data, peer)
"""


@pytest.fixture
def box(sandbox: Sandbox) -> Sandbox:
    if shutil.which("nsenter") is None or shutil.which("unshare") is None:
        pytest.skip("needs nsenter and unshare (util-linux)")
    return sandbox


def test_the_tap_link_local_address_is_taken_while_still_tentative() -> None:
    """The kernel keeps it tentative until its link watch has seen the tap's carrier (up to a
    second): --config-net takes it at once, as pasta does, instead of waiting for that."""

    class Tap:  # the one netlink query _link_local() makes, answered as the kernel does then
        def get_addr(self, family: int, index: int) -> list[Message]:
            assert (family, index) == (socket.AF_INET6, 7)
            return [Message({"family": family, "prefixlen": 64, "flags": 0x80 | 0x40,
                             "scope": 253, "index": index},
                            {"IFA_ADDRESS": "fe80::1:2ff:fe03:405", "IFA_FLAGS": 0xC0})]

    assert config_net._link_local(Tap(), 7, wait=0) == IPv6Address("fe80::1:2ff:fe03:405")


def test_the_namespace_link_local_address_is_known_to_nat_from_the_start() -> None:
    """pasta presets the namespace's MAC and link-local address: a host flow shown as coming
    from our link-local address has a destination before the namespace sent anything. (The
    preset once went to a copy of the guest state that NAT does not read.)"""
    from vhostpasst.config.conf import Config, Ip6Conf
    from vhostpasst.core import nat
    from vhostpasst.core.loop import Loop
    from vhostpasst.dispatch import Dispatcher

    ip6 = Ip6Conf(addr=IPv6Address("2001:db8::2"), gateway=IPv6Address("2001:db8::1"))
    config = Config(mode="pasta", ip4=None, ip6=ip6, no_tcp=True, no_udp=True, no_icmp=True)
    loop = Loop()
    try:
        d = Dispatcher(config, loop)
        assert d.ctx is not None
        mac, ll = bytes.fromhex("020304050607"), IPv6Address("fe80::1:2ff:fe03:405")
        config_net.known_guest(d.guest, config_net.NsLink(-1, "tap0", 2, mac, ll))
        assert d.ctx.guest_mac() == mac
        # the host's own address is not one the guest may see: shown as our link-local
        assert nat.from_host(config, d.ctx.guest, ip6.addr) == (ip6.our_tap_ll, ll)
    finally:
        loop.close()


# -- spawn mode ---------------------------------------------------------------------------------


def test_spawn_config_net_copies_host_addresses_and_routes(box: Sandbox) -> None:
    script = ("ip -o addr show; echo ROUTES; ip route; ip -6 route; echo MTU;"
              " ip -o link show up0; echo HOST $(hostname); echo PID $$;"
              " echo PGR $(cat /proc/sys/net/ipv4/ping_group_range); echo ID $(id -u);"
              " busybox ping -c1 -W3 192.0.2.1 >/dev/null && echo PING4 ok;"
              " busybox ping -6 -c1 -W3 2001:db8::1 >/dev/null && echo PING6 ok; exit 7")
    r = run_pasta(box, "--config-net", "--", "sh", "-c", script)
    assert r.returncode == 7, r.stdout + r.stderr
    out = r.stdout
    # the template interface's name, addresses (no DAD), routes and our default MTU
    assert "up0    inet 192.0.2.2/24" in out
    assert "up0    inet6 2001:db8::2/64 scope global nodad" in out
    # no DAD delay on the addresses given (the link-local one may still wait for the kernel's
    # link watch, at most a second, as with pasta): usable at once, PING6 below
    assert not [ln for ln in out.splitlines() if "tentative" in ln and "scope link" not in ln]
    assert "PING6 ok" in out
    assert "default via 192.0.2.1 dev up0" in out
    assert "default via 2001:db8::1 dev up0" in out
    assert "lo    inet 127.0.0.1/8" in out  # lo is up
    assert "mtu 65520" in out
    assert "HOST pasta-" in out
    assert "PID 1\n" in out  # a new PID namespace, and a fresh /proc that shows it
    assert "PGR 0 0" in out and "ID 0" in out
    assert "PING4 ok" in out  # ICMP through the tap and a host ping socket


def test_spawn_without_config_net_uses_dhcp(box: Sandbox) -> None:
    script_path = box.dir / "udhcpc.sh"
    script_path.write_text(UDHCPC_SCRIPT)
    script_path.chmod(0o755)
    box.dir.chmod(0o711)  # the command runs as nobody (root in its namespace): let it in
    r = run_pasta(box, "--", "sh", "-c",
                  "ip -o -4 addr show up0 | grep -c inet; ip link set up0 up;"
                  f" busybox udhcpc -i up0 -n -q -f -t 5 -T 1 -s {script_path};"
                  " ip -o -4 addr show up0; busybox ping -c1 -W3 192.0.2.1 >/dev/null"
                  " && echo PING4 ok")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("0\n")  # nothing configured before DHCP
    assert "LEASE ip=192.0.2.2 router=192.0.2.1 mask=24" in r.stdout
    assert "inet 192.0.2.2/24" in r.stdout
    assert "PING4 ok" in r.stdout


def test_spawn_options_ifname_mac_mtu_and_status(box: Sandbox) -> None:
    r = run_pasta(box, "--config-net", "-I", "eth7", "--ns-mac-addr", "02:00:00:00:00:42",
                  "-m", "1500", "-a", "192.0.2.77", "-g", "192.0.2.1", "-4", "--", "sh", "-c",
                  "ip -o link show eth7; ip -o addr show eth7; ip route; exit 3")
    assert r.returncode == 3, r.stdout + r.stderr
    assert "mtu 1500" in r.stdout and "link/ether 02:00:00:00:00:42" in r.stdout
    assert "inet 192.0.2.77/24" in r.stdout and "inet 192.0.2.2" not in r.stdout
    assert "default via 192.0.2.1 dev eth7" in r.stdout
    assert "inet6 2001:db8" not in r.stdout  # -4: no IPv6 configured


def test_spawn_command_killed_by_signal(box: Sandbox) -> None:
    p, err = start_pasta(box, "--", "sleep", "30")

    def command_pid() -> int | None:
        # pasta -> intermediate child -> the command (PID 1 in its namespace)
        for child in Path(f"/proc/{p.pid}/task/{p.pid}/children").read_text().split():
            grand = Path(f"/proc/{child}/task/{child}/children").read_text().split()
            for g in grand:
                if Path(f"/proc/{g}/cmdline").read_bytes().startswith(b"sleep"):
                    return int(g)
        return None

    pid = wait_until(command_pid, 15, "the command to start")
    os.kill(pid, signal.SIGKILL)
    assert p.wait(15) == 128 + signal.SIGKILL, err.read_text()


# -- attach mode --------------------------------------------------------------------------------


def test_attach_netns_name_backgrounds_and_quits_when_deleted(box: Sandbox) -> None:
    name = f"{box.host_ns}-t"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    box._made.append(name)  # deleted at teardown if the test does not get there
    pid_file = box.dir / "pasta.pid"
    parent, err = start_pasta(box, "--config-net", "-P", str(pid_file), "--netns", name)
    pid = background_pid(box, parent, pid_file, err)
    try:
        r = subprocess.run(["ip", "-n", name, "-o", "addr", "show", "up0"], capture_output=True,
                           text=True, timeout=10)
        assert "inet 192.0.2.2/24" in r.stdout, r.stderr
        r = subprocess.run(["ip", "netns", "exec", name, "busybox", "ping", "-c1", "-W3",
                            "192.0.2.1"], capture_output=True, text=True, timeout=10)
        assert r.returncode == 0, r.stdout + r.stderr + err.read_text()
        subprocess.run(["ip", "netns", "delete", name], check=True, timeout=10)
        box._made.remove(name)
        wait_gone(pid, 5)
    finally:
        kill_quietly(pid)


def test_attach_pid_quits_when_process_goes(box: Sandbox) -> None:
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net")
                   != os.readlink("/proc/self/ns/net"), 5, "the holder's namespace")
        p, err = start_pasta(box, "-f", "--config-net", str(holder.pid))
        path = f"/proc/{holder.pid}/ns/net"
        wait_until(lambda: "192.0.2.2/24" in in_netns(path, "ip", "-o", "addr").stdout
                   or p.poll() is not None, 15, "the namespace's address")
        assert p.poll() is None, err.read_text()
        holder.kill()
        holder.wait(5)
        assert p.wait(5) == 0, err.read_text()
    finally:
        holder.kill()
        holder.wait(5)


def test_no_netns_quit_stays(box: Sandbox) -> None:
    holder = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net")
                   != os.readlink("/proc/self/ns/net"), 5, "the holder's namespace")
        p, err = start_pasta(box, "-f", "--no-netns-quit", str(holder.pid))
        path = f"/proc/{holder.pid}/ns/net"
        wait_until(lambda: in_netns(path, "ip", "link", "show", "up0").returncode == 0
                   or p.poll() is not None, 15, "the tap in the namespace")
        assert p.poll() is None, err.read_text()
        holder.kill()
        holder.wait(5)
        time.sleep(2.5)
        assert p.poll() is None, err.read_text()  # still there: we were told to stay
        p.terminate()
        assert p.wait(5) == 0
    finally:
        holder.kill()
        holder.wait(5)


# -- the callers ------------------------------------------------------------------------------


# a query to podman's --dns-forward address, and where the answer came from
ASK_DNS_FORWARDER = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                     "s.settimeout(5); s.sendto(b'q', ('169.254.1.1', 53));"
                     "d, a = s.recvfrom(100); print(d, a[0])")


@pytest.mark.parametrize("resolver", [
    pytest.param("198.51.100.53", id="resolver-in-the-world"),
    # a systemd-resolved host: resolv.conf names only 127.0.0.53, and podman's --no-map-gw
    # must not stop --dns-forward reaching it (passt takes the first server, loopback or not)
    pytest.param("127.0.0.53", id="loopback-resolver",
                 marks=pytest.mark.sandbox(resolv_conf="nameserver 127.0.0.53\n")),
])
def test_podman_command_line(box: Sandbox, resolver: str) -> None:
    # the DNS server pasta forwards to: resolv.conf's first one, in the world namespace or on
    # the host's loopback
    if resolver.startswith("127."):
        ns = box.host_ns
    else:
        ns = box.world_ns
        box.world("ip", "addr", "add", f"{resolver}/32", "dev", "lo", check=True)
    echo = box.popen_in(ns, sys.executable, "-c", UDP_ECHO, resolver, "53",
                        stdout=subprocess.PIPE)
    assert echo.stdout is not None and echo.stdout.readline() == b"ready\n"
    path, _ = _podman_netns(box)
    pid_file = box.dir / "pasta.pid"
    try:
        parent, err = start_pasta(box, *PODMAN_ARGS, "--pid", str(pid_file), "--netns",
                                  str(path))
        pid = background_pid(box, parent, pid_file, err)
        try:
            r = in_netns(str(path), "ip", "-o", "addr", "show", "up0")
            assert "inet 192.0.2.2/24" in r.stdout and "2001:db8::2/64" in r.stdout
            r = in_netns(str(path), "ip", "route")
            assert "default via 192.0.2.1 dev up0" in r.stdout
            r = in_netns(str(path), "busybox", "ping", "-c1", "-W3", "192.0.2.1")
            assert r.returncode == 0, r.stdout + r.stderr
            # the DNS forwarder: 169.254.1.1:53 reaches the host's resolver, replies come back
            # from 169.254.1.1
            r = in_netns(str(path), sys.executable, "-c", ASK_DNS_FORWARDER)
            assert r.stdout.strip() == "b'echo:q' 169.254.1.1", r.stderr + err.read_text()
            _remove_netns_file(path)
            wait_gone(pid, 5)
        finally:
            kill_quietly(pid)
    finally:
        _remove_netns_file(path)


def test_attach_pid_with_an_explicit_userns(box: Sandbox) -> None:
    """PID plus --userns PATH (reference 6.1: the given user namespace instead of the
    process's own): the namespace is configured and reachable."""
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net", "sleep", "60"])
    try:
        wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/user")
                   != os.readlink("/proc/self/ns/user"), 5, "the holder's namespaces")
        p, err = start_pasta(box, "-f", "--config-net", "-a", "198.51.100.100", "-n", "24",
                             "-g", "198.51.100.2",
                             f"--userns=/proc/{holder.pid}/ns/user", str(holder.pid))
        try:
            netns_path = f"/proc/{holder.pid}/ns/net"
            wait_until(lambda: "198.51.100.100" in in_netns(netns_path, "ip", "-o", "addr").stdout,
                       10, "the namespace to be configured")
            r = in_netns(netns_path, "busybox", "ping", "-c1", "-W3", "192.0.2.1")
            assert r.returncode == 0, r.stdout + r.stderr + err.read_text()
        finally:
            p.kill()
            p.wait(5)
    finally:
        holder.kill()
        holder.wait(5)


def test_rootlesskit_command_line(box: Sandbox) -> None:
    # rootlesskit's child: new user and network namespaces; pasta joins both by path
    holder = subprocess.Popen(["unshare", "--user", "--map-root-user", "--net", "sleep", "60"])
    try:
        wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/user")
                   != os.readlink("/proc/self/ns/user"), 5, "the holder's namespaces")
        netns_path = f"/proc/{holder.pid}/ns/net"
        p, err = start_pasta(box, *ROOTLESSKIT_ARGS, f"--userns=/proc/{holder.pid}/ns/user",
                             f"--netns={netns_path}")
        assert p.wait(30) == 0, err.read_text()  # forked to the background, configured
        r = subprocess.run(["pgrep", "-f", "--", f"--netns={netns_path}$"], capture_output=True,
                           text=True, timeout=5)
        pids = [int(x) for x in r.stdout.split()]
        assert len(pids) == 1, r
        try:
            r = in_netns(netns_path, "ip", "-o", "addr", "show", "tap0")
            assert "inet 198.51.100.100/24" in r.stdout, r.stderr + err.read_text()
            r = in_netns(netns_path, "ip", "-o", "link", "show", "tap0")
            assert "mtu 65520" in r.stdout
            r = in_netns(netns_path, "ip", "route")
            assert "default via 198.51.100.2 dev tap0" in r.stdout
            r = in_netns(netns_path, "busybox", "ping", "-c1", "-W3", "192.0.2.1")
            assert r.returncode == 0, r.stdout + r.stderr
            # the namespace goes with its process: pasta follows (checked once a second)
            holder.kill()
            holder.wait(5)
            wait_gone(pids[0], 5)
        finally:
            kill_quietly(pids[0])
    finally:
        holder.kill()
        holder.wait(5)
