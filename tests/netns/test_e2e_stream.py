"""vhostpasst end to end over qemu's stream socket, with a real guest TCP/IP stack.

The daemon runs in the sandbox's host namespace (uplink 192.0.2.2/24, gateway 192.0.2.1, the
test's resolv.conf); tests/netns/relay.py plays qemu and attaches the guest namespace's tap0 to the
daemon's socket. What each test checks is what a user would see from inside the guest.
"""

from __future__ import annotations

import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.netns.sandbox import (
    BROADCAST_MAC,
    DEFAULT_MAC,
    DhcpReply,
    Sandbox,
    StreamClient,
    dhcp_discover,
    dhcp_payload,
    frame_bytes,
    ipv4_udp_frame,
    mac_bytes,
    parse_dhcp_reply,
    vhostpasst_command,
    wait_until,
)

GUEST_MAC = mac_bytes("02:00:00:00:00:aa")  # for frames the tests craft by hand
EXPECTED_DNS = ["198.51.100.53", "198.51.100.54"]  # the IPv4 nameservers of the test resolv.conf
EXPECTED_SEARCH = ["example.org", "test.example"]


def configure_guest(sandbox: Sandbox, ip: str = "192.0.2.2", prefix: int = 24,
                    router: str = "192.0.2.1") -> None:
    """What a DHCP client script would do with the lease."""
    sandbox.guest("ip", "addr", "add", f"{ip}/{prefix}", "dev", "tap0", check=True)
    sandbox.guest("ip", "route", "add", "default", "via", router, check=True)


def offer_for(xid: int):  # noqa: ANN201 - a frames_until predicate
    def pred(frame: bytes) -> DhcpReply | None:
        reply = parse_dhcp_reply(frame)
        return reply if reply and reply.xid == xid else None

    return pred


def discover_and_wait(client: StreamClient, xid: int) -> DhcpReply | None:
    client.send_frame(dhcp_discover(GUEST_MAC, xid))
    return client.frames_until(offer_for(xid), timeout=5)  # type: ignore[no-any-return]


# --- DHCP -----------------------------------------------------------------------------------


def test_udhcpc_lease_carries_the_hosts_address_router_mtu_dns_and_search(
        sandbox: Sandbox) -> None:
    """busybox udhcpc in the guest is offered the host's own address and the host's view of
    the network: its gateway, the 65520-byte MTU, and the resolv.conf nameservers and search."""
    sandbox.start_daemon()
    sandbox.start_relay()

    lease = sandbox.udhcpc()

    assert lease["ip"] == "192.0.2.2"
    assert lease["subnet"] == "255.255.255.0"
    assert lease["router"].split() == ["192.0.2.1"]
    assert lease["serverid"] == "192.0.2.1"
    assert lease["mtu"] == "65520"
    assert lease["dns"].split() == EXPECTED_DNS
    assert lease["search"].split() == EXPECTED_SEARCH
    assert lease["lease"] == str(0xFFFFFFFF)  # infinite, like passt


def test_dhclient_lease_matches(sandbox: Sandbox) -> None:
    """ISC dhclient (DISCOVER, OFFER, REQUEST, ACK) binds the same lease as udhcpc."""
    sandbox.start_daemon()
    sandbox.start_relay()

    lease = sandbox.dhclient()

    assert lease["new_ip_address"] == "192.0.2.2"
    assert lease["new_subnet_mask"] == "255.255.255.0"
    assert lease["new_routers"].split() == ["192.0.2.1"]
    assert lease["new_interface_mtu"] == "65520"
    assert lease["new_domain_name_servers"].split() == EXPECTED_DNS
    # dhclient prints names quoted and fully qualified: "example.org." "test.example."
    search = [d.strip('"').rstrip(".") for d in lease["new_domain_search"].split()]
    assert search == EXPECTED_SEARCH


@pytest.mark.sandbox(resolv_conf="nameserver 198.51.100.7\nsearch only.example\n", ipv6=False)
def test_lease_follows_the_hosts_resolv_conf(sandbox: Sandbox) -> None:
    sandbox.start_daemon()
    sandbox.start_relay()
    lease = sandbox.udhcpc()
    assert lease["dns"].split() == ["198.51.100.7"]
    assert lease["search"].split() == ["only.example"]


# --- ARP ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mac_args, mac", [((), DEFAULT_MAC),
                                            (("-M", "02:00:00:00:00:01"), "02:00:00:00:00:01")])
def test_every_neighbour_resolves_to_vhostpasst(sandbox: Sandbox, mac_args: tuple[str, ...],
                                                mac: str) -> None:
    """Once configured, the guest finds its gateway and any other address of the subnet behind
    vhostpasst's MAC (9a:55:9a:55:9a:55, or the -M one)."""
    sandbox.start_daemon(*mac_args)
    sandbox.start_relay()
    configure_guest(sandbox)

    for addr in ("192.0.2.1", "192.0.2.99"):
        # the echo reply is not what we look at: the ARP exchange before it is
        sandbox.guest("busybox", "ping", "-c1", "-W1", addr)

    neighbours = sandbox.guest_neighbours()
    assert neighbours.get("192.0.2.1") == mac, neighbours
    assert neighbours.get("192.0.2.99") == mac, neighbours


# --- pcap -----------------------------------------------------------------------------------


def tshark_fields(path: str, display_filter: str, *fields: str) -> list[list[str]]:
    cmd = ["tshark", "-n", "-r", path, "-Y", display_filter, "-T", "fields"]
    for f in fields:
        cmd += ["-e", f]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return [line.split("\t") for line in r.stdout.splitlines()]


@pytest.mark.skipif(subprocess.run(["which", "tshark"], capture_output=True).returncode != 0,
                    reason="needs tshark")
def test_pcap_shows_the_dhcp_and_arp_exchanges_both_ways(sandbox: Sandbox) -> None:
    """--pcap FILE records the guest's DHCP and ARP requests and vhostpasst's replies."""
    sandbox.start_daemon(pcap=True)
    sandbox.start_relay()
    sandbox.udhcpc()
    configure_guest(sandbox)
    sandbox.guest("busybox", "ping", "-c1", "-W1", "192.0.2.1")
    guest_mac = sandbox.guest("cat", "/sys/class/net/tap0/address", check=True).stdout.strip()

    def exchanges() -> tuple[set[tuple[str, str]], set[tuple[str, str]]] | None:
        dhcp = {(src, kind) for src, kind in
                tshark_fields(sandbox.pcap_path, "dhcp", "eth.src", "dhcp.option.dhcp")}
        arp = {(src, op) for src, op in
               tshark_fields(sandbox.pcap_path, "arp", "eth.src", "arp.opcode")}
        want_dhcp = ({(guest_mac, "1"), (DEFAULT_MAC, "2"), (guest_mac, "3"), (DEFAULT_MAC, "5")},
                     {(guest_mac, "1"), (DEFAULT_MAC, "5")})  # full, or rapid commit
        want_arp = {(guest_mac, "1"), (DEFAULT_MAC, "2")}
        if any(w <= dhcp for w in want_dhcp) and want_arp <= arp:
            return dhcp, arp
        return None

    try:  # the writer flushes every loop iteration, but give it a moment
        wait_until(exchanges, 10, "DHCP and ARP in the pcap", interval=0.5)
    except TimeoutError:
        shown = subprocess.run(["tshark", "-n", "-r", sandbox.pcap_path], capture_output=True,
                               text=True, timeout=30).stdout
        raise AssertionError(f"pcap lacks the exchanges; it holds:\n{shown}") from None


# --- robustness -----------------------------------------------------------------------------


def malformed_frames() -> list[tuple[str, bytes]]:
    """Frames of valid stream length (>= 14) whose contents are broken at every layer."""
    eth4 = BROADCAST_MAC + GUEST_MAC + b"\x08\x00"
    good = dhcp_discover(GUEST_MAC, 0x1111)
    ip = bytearray(good[14:34])
    udp_dhcp = good[34:]

    def ip_hdr(**changes: int) -> bytes:
        h = bytearray(ip)
        if "ihl" in changes:
            h[0] = 0x40 | changes["ihl"]
        if "tot_len" in changes:
            struct.pack_into("!H", h, 2, changes["tot_len"])
        if "frag" in changes:
            struct.pack_into("!H", h, 6, changes["frag"])
        if "proto" in changes:
            h[9] = changes["proto"]
        return bytes(h)

    def dhcp_with(bootp: bytes) -> bytes:
        return ipv4_udp_frame(GUEST_MAC, BROADCAST_MAC, "0.0.0.0", "255.255.255.255", 68, 67,
                              bootp)

    full = dhcp_payload(1, GUEST_MAC, 0x2222)
    rng = random.Random(7)
    frames = [
        ("Ethernet header only", eth4),
        ("unknown EtherType", BROADCAST_MAC + GUEST_MAC + b"\x12\x34" + b"\0" * 46),
        ("VLAN tag", BROADCAST_MAC + GUEST_MAC + b"\x81\x00\x00\x01\x08\x00" + good[14:]),
        ("ARP, truncated", BROADCAST_MAC + GUEST_MAC + b"\x08\x06" + b"\x00\x01\x08\x00"),
        ("ARP, absurd address lengths",
         BROADCAST_MAC + GUEST_MAC + b"\x08\x06\x00\x01\x08\x00\xff\xff\x00\x01" + b"\0" * 18),
        ("IPv4, 10 bytes", eth4 + bytes(ip[:10])),
        ("IPv4, IHL 4", eth4 + ip_hdr(ihl=4) + udp_dhcp),
        ("IPv4, IHL 15 past the end", eth4 + ip_hdr(ihl=15) + udp_dhcp[:8]),
        ("IPv4, total length past the frame", eth4 + ip_hdr(tot_len=60000) + udp_dhcp),
        ("IPv4, total length below the header", eth4 + ip_hdr(tot_len=8) + udp_dhcp),
        ("IPv4, first fragment of a DHCP request", eth4 + ip_hdr(frag=0x2000) + udp_dhcp),
        ("IPv4, later fragment", eth4 + ip_hdr(frag=0x0010) + udp_dhcp),
        ("UDP header truncated", eth4 + ip_hdr(tot_len=24) + udp_dhcp[:4]),
        ("UDP length past the packet",
         eth4 + bytes(ip) + udp_dhcp[:4] + b"\xff\xff" + udp_dhcp[6:]),
        ("UDP length below 8", eth4 + bytes(ip) + udp_dhcp[:4] + b"\x00\x04" + udp_dhcp[6:]),
        ("DHCP, 10 bytes of BOOTP", dhcp_with(full[:10])),
        ("DHCP, no options at all", dhcp_with(full[:236])),
        ("DHCP, wrong magic cookie", dhcp_with(full[:236] + b"\xde\xad\xbe\xef" + full[240:])),
        ("DHCP, option running past the end", dhcp_with(full[:240] + bytes([53, 200, 1]))),
        ("DHCP, empty message type", dhcp_with(full[:240] + bytes([53, 0, 255]))),
        ("DHCP, no end option", dhcp_with(full[:240] + bytes([53, 1, 1, 55, 2, 1]))),
        ("DHCP, hlen 255", dhcp_with(full[:2] + b"\xff" + full[3:])),
        ("DHCP, BOOTREPLY from the guest", dhcp_with(b"\x02" + full[1:])),
        ("DHCP, unknown message type", dhcp_with(full[:240] + bytes([53, 1, 99, 255]))),
        ("IPv6, truncated", BROADCAST_MAC + GUEST_MAC + b"\x86\xdd" + b"\x60\0\0\0\0\x08\x11"),
        ("IPv6, payload length past the frame",
         BROADCAST_MAC + GUEST_MAC + b"\x86\xdd\x60\0\0\0\xff\xff\x11\x40" + b"\0" * 40),
        ("largest frame the stream allows", eth4 + b"\0" * (65535 - 14)),
    ]
    for i in range(40):
        junk = bytes(rng.randrange(256) for _ in range(rng.randrange(14, 600)))
        if i % 2:  # half of it dressed as IPv4 so it gets past the Ethernet switch
            junk = eth4 + junk[14:]
        frames.append((f"garbage {i}", junk))
    return frames


def test_malformed_frames_do_not_stop_dhcp(sandbox: Sandbox) -> None:
    """A guest sending broken frames at every layer does not take vhostpasst down: a valid
    DISCOVER on the same connection is still answered with the host's address."""
    sandbox.start_daemon()
    with StreamClient(sandbox.socket_path) as client:
        for _name, frame in malformed_frames():
            client.send_frame(frame)
        offer = discover_and_wait(client, 0xC0FFEE)
        assert offer is not None, ("no answer to a valid DISCOVER after malformed frames "
                                   f"(connection closed: {client.closed})\n{sandbox.daemon_log()}")
        assert offer.msg_type in ("OFFER", "ACK") and offer.yiaddr == "192.0.2.2"
    assert sandbox.daemon_alive()


BAD_STREAMS = {
    "zero length": b"\0\0\0\0" + b"\0" * 60,
    "13-byte frame": frame_bytes(b"\xff" * 13),
    "length above 65535": struct.pack("!I", 70000) + b"\0" * 1000,
    "frame cut short by the disconnect": struct.pack("!I", 100) + b"\xff" * 50,
    "half a length header": b"\0\0",
}


@pytest.mark.parametrize("name, data", [pytest.param(k, v, id=k) for k, v in BAD_STREAMS.items()])
def test_bad_stream_lengths_cost_at_most_the_connection(sandbox: Sandbox, name: str,
                                                        data: bytes) -> None:
    """A client that breaks the framing may be disconnected, but the daemon lives on and the
    next client gets its lease."""
    sandbox.start_daemon()
    with StreamClient(sandbox.socket_path) as bad:
        bad.send_raw(data)
        bad.wait_closed(0.5)  # passt resets such a connection; either way we leave
    wait_until(lambda: sandbox.daemon_clients() == 0, 5, "the daemon to drop the bad client")
    assert sandbox.daemon_alive(), sandbox.daemon_log()

    with StreamClient(sandbox.socket_path) as client:
        offer = discover_and_wait(client, 0xBEEF)
        assert offer is not None, f"no DHCP answer after: {name}\n{sandbox.daemon_log()}"
        assert offer.yiaddr == "192.0.2.2"


# --- one guest at a time ----------------------------------------------------------------------


def test_second_client_is_refused_and_a_new_guest_can_follow(sandbox: Sandbox) -> None:
    """While a guest is attached, another connection is closed at once and the guest keeps
    its service; after the guest leaves, the next one is served."""
    sandbox.start_daemon()
    sandbox.start_relay()

    with StreamClient(sandbox.socket_path) as intruder:
        assert intruder.wait_closed(5), "a second client was kept open"
    assert sandbox.relay_status()["state"] == "connected"
    assert sandbox.udhcpc()["ip"] == "192.0.2.2"

    sandbox.stop_relay()  # the guest goes away (waits until the daemon has let it go)
    sandbox.start_relay()
    assert sandbox.udhcpc()["ip"] == "192.0.2.2"
    assert sandbox.daemon_alive()


# --- process life -----------------------------------------------------------------------------


def test_sigterm_ends_the_daemon_with_status_0(sandbox: Sandbox) -> None:
    """SIGTERM with a guest attached: vhostpasst exits 0 and the guest sees its link go away."""
    sandbox.start_daemon()
    relay = sandbox.start_relay()
    sandbox.udhcpc()

    assert sandbox.stop_daemon() == 0, sandbox.daemon_log()
    assert relay.wait(5) == 0  # the relay exits when its socket closes


def test_repair_path_is_accepted_and_said_to_be_ignored(sandbox: Sandbox) -> None:
    """--repair-path outside --vhost-user: the daemon starts, serves, and says the option
    does nothing here (tests/netns/test_repair.py has it in vhost-user mode)."""
    sandbox.start_daemon("--repair-path", str(sandbox.dir / "passt.socket.repair"))
    sandbox.start_relay()
    assert sandbox.udhcpc()["ip"] == "192.0.2.2"
    log = sandbox.daemon_log()
    assert "--repair-path" in log and "ignored" in log, log
    assert not (sandbox.dir / "passt.socket.repair").exists()


def test_sigterm_ends_an_idle_daemon_with_status_0(sandbox: Sandbox) -> None:
    sandbox.start_daemon()
    assert sandbox.stop_daemon() == 0, sandbox.daemon_log()


def test_without_f_the_daemon_forks_and_records_the_childs_pid(sandbox: Sandbox) -> None:
    """Without -f the command returns 0 once the socket listens; the pid file names the
    background process, which serves guests and ends on SIGTERM."""
    pid_file = str(sandbox.dir / "vhostpasst.pid")
    parent = sandbox.start_daemon(foreground=False, pid_file=pid_file)

    assert parent.returncode == 0
    assert sandbox.listening(), "the parent exited before the socket was listening"
    child = int(Path(pid_file).read_text().split()[0])
    assert child != parent.pid and sandbox.daemon_pid == child
    cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
    assert b"vhostpasst" in cmdline
    # before going to the background it printed its summary, as passt does
    assert "UNIX domain socket bound at" in sandbox.daemon_stderr_text()

    sandbox.start_relay()
    assert sandbox.udhcpc()["ip"] == "192.0.2.2"

    sandbox.stop_daemon()  # SIGTERM, then waits for the pid to go (SIGKILL after 5 s)
    assert not sandbox.daemon_killed, "the background daemon ignored SIGTERM"


def test_without_f_a_start_up_error_reaches_stderr(sandbox: Sandbox) -> None:
    """Logging to a file (or to syslog), the caller (podman, libvirt) still reads stderr when
    we exit 1 before going to the background: here -t on a port something else holds (in the
    sandbox's host namespace), with --quiet as podman passes it."""
    hold = ("import socket, subprocess, sys\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 5321)); s.listen()\n"
            "sys.exit(subprocess.call(sys.argv[1:]))\n")
    log_file = sandbox.dir / "err.log"
    r = sandbox.host(sys.executable, "-c", hold, *vhostpasst_command(), "-q", "-s",
                     str(sandbox.dir / "err.socket"), "-l", str(log_file),
                     "-t", "127.0.0.1/5321", timeout=20)
    assert r.returncode == 1, r.stdout + r.stderr
    assert "cannot forward ports" in r.stderr, r.stderr
    assert "cannot forward ports" in log_file.read_text()
