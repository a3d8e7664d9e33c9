"""The daemon names its process after what it runs as (vhostpasst/system/procname.py): `pgrep passt`
and `ps -C pasta` find it when it was started through a `passt` or `pasta` link, `vhostpasst`
otherwise. Started in the test's own host namespace; bounded waits only."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.netns.sandbox import Sandbox, terminate, unix_sockets, vhostpasst_command, wait_until


def _comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


@pytest.mark.parametrize("name", ["passt", "vhostpasst"])
def test_process_is_named_after_its_personality(sandbox: Sandbox, tmp_path: Path,
                                                name: str) -> None:
    exe = vhostpasst_command()
    if len(exe) != 1:
        pytest.skip("the vhostpasst console script is not installed")
    link = tmp_path / name
    link.symlink_to(exe[0])
    sock = str(tmp_path / "s.socket")
    err = open(tmp_path / "stderr", "wb")
    proc = subprocess.Popen(["ip", "netns", "exec", sandbox.host_ns, str(link), "-f", "-s", sock],
                            stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    try:
        wait_until(lambda: unix_sockets(proc.pid, sock) or proc.poll() is not None, 15,
                   "the daemon's socket")
        assert proc.poll() is None, (tmp_path / "stderr").read_text()
        assert _comm(proc.pid) == name
        found = subprocess.run(["pgrep", "-x", name], capture_output=True, text=True,
                               timeout=10).stdout.split()
        assert str(proc.pid) in found
    finally:
        terminate(proc)
        err.close()
