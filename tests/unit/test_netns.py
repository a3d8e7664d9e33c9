"""netns.py: the cffi wrappers, inotify event parsing, and running code in another netns."""

from __future__ import annotations

import os
import struct
import subprocess
from pathlib import Path

import pytest

from vhostpasst.system import netns


def test_netns_path() -> None:
    assert netns.netns_path("pod1") == "/run/netns/pod1"
    assert netns.netns_path("/run/user/1000/netns/x") == "/run/user/1000/netns/x"
    assert netns.netns_path("./rel") == "./rel"


def test_inotify_events_parsing() -> None:
    name = b"netns-1\0\0\0\0\0\0\0\0\0"
    data = struct.pack("iIII", 1, netns.IN_DELETE, 0, len(name)) + name
    data += struct.pack("iIII", 1, 0x100, 0, 0)  # IN_CREATE without a name
    assert netns.inotify_events(data) == [(netns.IN_DELETE, "netns-1"), (0x100, "")]


def test_inotify_reports_a_deletion(tmp_path: Path) -> None:
    path = os.path.join(str(tmp_path), "ns")
    open(path, "w").close()
    fd = netns.inotify_init()
    try:
        netns.inotify_add_watch(fd, str(tmp_path), netns.IN_DELETE)
        os.unlink(path)
        assert (netns.IN_DELETE, "ns") in netns.inotify_events(os.read(fd, 4096))
    finally:
        os.close(fd)


def test_errors_are_oserrors() -> None:
    with pytest.raises(OSError) as e:
        netns.setns(-1, netns.CLONE_NEWNET)
    assert e.value.errno == 9  # EBADF
    with pytest.raises(FileNotFoundError):
        netns.inotify_add_watch(netns.inotify_init(), "/nonexistent/dir", netns.IN_DELETE)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create a namespace")
def test_call_in_netns_runs_in_the_target() -> None:
    name = f"vpN-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    try:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            target = os.stat(f"/run/netns/{name}").st_ino
            inside = netns.call_in_netns(fd, lambda: os.stat("/proc/thread-self/ns/net").st_ino)
            assert inside == target
            assert os.stat("/proc/self/ns/net").st_ino != target  # we did not move
            with pytest.raises(ZeroDivisionError):
                netns.call_in_netns(fd, lambda: 1 // 0)
        finally:
            os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "delete", name], timeout=10)
