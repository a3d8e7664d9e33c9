"""`--fd N`: the way qemu's `-netdev passt` and libkrun/muvm start us, with one end of a
socketpair already connected. The daemon serves it at once and, since --fd implies --one-off,
exits 0 when the caller closes its end."""

from __future__ import annotations

import select
import socket
import subprocess
import time

from tests.netns.sandbox import (
    FrameReader,
    Sandbox,
    dhcp_discover,
    frame_bytes,
    mac_bytes,
    parse_dhcp_reply,
    vhostpasst_command,
)

GUEST_MAC = mac_bytes("52:54:00:12:34:56")


def _recv_offer(sock: socket.socket, timeout: float = 10) -> object:
    reader = FrameReader()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        data = sock.recv(65536)
        if not data:
            break
        for frame in reader.feed(data):
            reply = parse_dhcp_reply(frame)
            if reply is not None:
                return reply
    return None


def test_fd_socketpair_is_served_and_closing_it_ends_the_daemon(sandbox: Sandbox) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours:
        daemon = sandbox.popen_in(
            sandbox.host_ns, *vhostpasst_command(), "-f", "-q", "--fd", str(theirs.fileno()),
            pass_fds=(theirs.fileno(),), stderr=subprocess.PIPE)
        theirs.close()
        ours.sendall(frame_bytes(dhcp_discover(GUEST_MAC, 0x1234)))
        reply = _recv_offer(ours)
        assert reply is not None, "no DHCP reply over the --fd socket"
        assert reply.msg_type == "OFFER" and reply.yiaddr == "192.0.2.2"
        assert daemon.poll() is None
    # our end is closed now: one-off, so the daemon leaves with status 0
    assert daemon.wait(10) == 0, daemon.stderr.read().decode() if daemon.stderr else ""


def test_fd_that_is_not_a_socket_is_refused(sandbox: Sandbox) -> None:
    r = sandbox.host(*vhostpasst_command(), "-f", "--fd", "0", input="")
    assert r.returncode == 1
    assert "fd" in (r.stderr + r.stdout).lower()
