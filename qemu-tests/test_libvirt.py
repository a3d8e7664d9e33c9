"""libvirt as the caller: libvirt itself starts our `passt` for a domain's network interface.

Theory of operation. The test makes the usual host namespace with its world behind it
(harness.HostNetns: documentation addresses only, nothing leaves), and starts a private
libvirtd inside it (libvirtd.py: a mount namespace of its own puts the work directory's
directories over /etc/libvirt, /run, /var/lib/libvirt, ..., so the system's libvirt is never
touched; a PID namespace of its own ends whatever it started when it ends, crash or not).
libvirtd's PATH starts with a directory holding `passt`, a link to a console script running
this checkout: libvirt finds `passt` in PATH as it does on any system.

One transient domain per interface type, created with `virsh create --paused` from XML:
TCG, the qemu-tests image as `<kernel>`/`<initrd>`/`<cmdline>`, the serial console on a UNIX
socket the test connects to before `virsh resume` (so no boot output is missed) and drives like
harness.Guest, and either

* `<interface type='vhostuser'><backend type='passt'/>` (guest memory a shared memfd:
  `<memoryBacking><source type='memfd'/><access mode='shared'/>`), for which libvirt runs
  `passt --vhost-user --one-off --socket ... --pid ...` and hands qemu the socket; or
* `<interface type='user'><backend type='passt'/>`, the stream socket (`-netdev stream`).

Both carry a `<portForward>`, which libvirt turns into `--tcp-ports`. For each: the process in
libvirt's passt pid file is ours (its /proc comm is `passt`, its command line runs our script
with libvirt's options, it has this checkout's C extension mapped); the guest's DHCP lease
gives it the host's address; TCP checks out with sha256 both ways: a download from the "remote"
host in the world namespace, an upload to the host's loopback through the gateway address, and
the host connecting to the forwarded port on its loopback, which reaches a listener in the
guest; then `virsh destroy` ends the domain and our passt process exits (bounded waits).

Skips when libvirt >= 11.1 (vhostuser with the passt back end) is not installed; CI installs
it (.ci/install-qemu.sh).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
from harness import (
    HOST_ADDR4,
    HOST_GW4,
    HOST_PREFIX4,
    QEMU,
    REMOTE4,
    HostNetns,
    dhcp_lease,
    download_checked,
    hostside,
    make_workdir,
    stop_proc,
)
from image import Image
from libvirtd import (
    MIN_VERSION,
    ConsoleGuest,
    Libvirtd,
    libvirt_version,
    process_state,
    wait_exited,
)

SIZE = (1 << 20) + 321  # 1 MiB and a bit: several windows' worth, cheap under TCG
SRV_PORT = 10001  # the guest connects to servers on the host and in the world
FWD_PORT = 10002  # <portForward>: the host connects to it, passt forwards to the guest
MAC = "52:54:00:56:50:54"

# Both domains share one libvirtd: keep them on one xdist worker.
pytestmark = pytest.mark.xdist_group("libvirt")

KINDS = ("vhostuser", "user")
# libvirt turns the backend's logFile into --log-file and <portForward> into --tcp-ports.
INTERFACE = """
    <interface type='{kind}'>
      <backend type='passt' logFile='{log}'/>
      <mac address='{mac}'/>
      <portForward proto='tcp'><range start='{port}'/></portForward>
      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>"""


def domain_xml(name: str, kind: str, image: Image, console: Path, passt_log: Path) -> str:
    shared = ("<memoryBacking><source type='memfd'/><access mode='shared'/></memoryBacking>"
              if kind == "vhostuser" else "")
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>256</memory>
  {shared}
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(image.kernel))}</kernel>
    <initrd>{escape(str(image.initramfs))}</initrd>
    <cmdline>console=ttyS0 panic=-1 vpt_noecho=1</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{escape(shutil.which(QEMU) or QEMU)}</emulator>
    {INTERFACE.format(kind=kind, log=escape(str(passt_log)), mac=MAC, port=FWD_PORT)}
    <serial type='unix'>
      <source mode='bind' path='{escape(str(console))}'/>
      <target port='0'/>
    </serial>
    <controller type='usb' model='none'/>
    <memballoon model='none'/>
  </devices>
</domain>
"""


@dataclass
class LibvirtEnv:
    """The namespace, the private libvirtd in it and the work directory, shared by the
    module's tests. `vpt_logs`: what conftest attaches to a failing test's report."""

    daemon: Libvirtd
    netns: HostNetns
    workdir: Path
    vpt_logs: list[tuple[str, Path]] = field(default_factory=list)


@pytest.fixture(scope="module")
def libvirt_env(image: Image) -> Iterator[LibvirtEnv]:
    version = libvirt_version()
    if version is None:
        pytest.skip("libvirtd/virsh not installed (.ci/install-qemu.sh installs them)")
    if version < MIN_VERSION:
        pytest.skip(f"libvirt {'.'.join(map(str, version))} < "
                    f"{'.'.join(map(str, MIN_VERSION))}: no vhostuser with the passt back end")
    workdir = make_workdir()
    netns = HostNetns()
    daemon = None
    try:
        daemon = Libvirtd(workdir / "libvirt", netns)
        yield LibvirtEnv(daemon, netns, workdir)
    finally:
        if daemon is not None:
            daemon.close()
        netns.close()
        if not os.environ.get("VPT_KEEP"):
            shutil.rmtree(workdir, ignore_errors=True)


def _passt_pid(daemon: Libvirtd, name: str) -> int:
    """Our passt's pid (as the test sees it) from libvirt's pid file for the domain."""
    files = [p for p in daemon.pid_files()
             if p.parent.name == "passt" and p.name.endswith(f"-{name}-net0-passt.pid")]
    assert len(files) == 1, files
    ns_pid = int(files[0].read_text().strip())
    pid = daemon.host_pid(ns_pid)
    assert pid is not None, f"no process {ns_pid} ({files[0].name}) in libvirt's namespace"
    return pid


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("kind", KINDS)
def test_libvirt_starts_our_passt(
    libvirt_env: LibvirtEnv, image: Image, kind: str
) -> None:
    daemon, netns, workdir = libvirt_env.daemon, libvirt_env.netns, libvirt_env.workdir
    name = f"vpt-{kind}"
    console = workdir / f"{kind}.console"
    xml = workdir / f"{name}.xml"
    passt_log = workdir / f"{name}-passt.log"
    xml.write_text(domain_xml(name, kind, image, console, passt_log))
    qemu_log = daemon.root / "log" / "qemu" / f"{name}.log"
    libvirt_env.vpt_logs = [("libvirtd log", daemon.log),
                            ("libvirtd debug log", daemon.root / "libvirtd-debug.log"),
                            ("qemu log", qemu_log), ("passt log", passt_log),
                            ("console", workdir / f"{name}-console.log")]

    daemon.virsh("create", "--paused", str(xml))
    guest = None
    try:
        # libvirt started passt (and waited for its pid file) before qemu: it is ours.
        pid = _passt_pid(daemon, name)
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "passt"
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]
        print(f"{kind}: libvirt ran {' '.join(argv)}")
        assert argv[1] == str(daemon.bindir / "passt"), argv
        assert "--one-off" in argv and "--socket" in argv and "--pid" in argv, argv
        assert ("--vhost-user" in argv) == (kind == "vhostuser"), argv
        assert "--tcp-ports" in argv, argv
        maps = Path(f"/proc/{pid}/maps").read_text()
        assert str(Path(__file__).resolve().parent.parent / "vhostpasst") in maps

        guest = ConsoleGuest(console, workdir, name, qemu_log, f"virsh create {xml}")
        daemon.virsh("resume", name)
        guest.wait_for(r"^VPT-READY\r?\n", 120, what="boot")

        lease = dhcp_lease(guest)
        assert lease["ip"] == HOST_ADDR4 and lease["mask"] == str(HOST_PREFIX4), lease
        assert lease["router"] == HOST_GW4, lease

        # Download from the remote host in the world namespace, behind the host's upstream.
        assert netns.world is not None, "no veth: the world namespace is missing"
        download_checked(guest, netns.world, workdir / "down", SIZE, SRV_PORT,
                         server=REMOTE4, via=REMOTE4, keep="/tmp/up")
        # Upload to the host's loopback, through the gateway address.
        digest = _sha((workdir / "down").read_bytes())
        server = hostside(netns, "serve-recv", "127.0.0.1", str(SRV_PORT))
        try:
            guest.run(f"nc {HOST_GW4} {SRV_PORT} < /tmp/up", timeout=120)
            assert server.stdout is not None
            assert server.stdout.readline().split() == [str(SIZE), digest]
        finally:
            stop_proc(server)
        # The host connects to the <portForward> port on its loopback: passt's --tcp-ports.
        src = workdir / "fwd"
        src.write_bytes(os.urandom(SIZE))
        guest.run(f"{{ nc -l -p {FWD_PORT} | sha256sum > /tmp/fwd.sha & }}")
        guest.run(f"i=0; until netstat -ltn | grep -q ':{FWD_PORT} '; do i=$((i+1)); "
                  f"[ $i -ge 100 ] && break; sleep 0.1; done", timeout=60)
        sender = hostside(netns, "send", "127.0.0.1", str(FWD_PORT), str(src), ready=False)
        try:
            assert sender.wait(timeout=120) == 0
            guest.run("wait", timeout=120)
        finally:
            stop_proc(sender)
        _, out = guest.run("cat /tmp/fwd.sha")
        assert out.split()[:1] == [_sha(src.read_bytes())], out

        # virsh destroy: the domain goes, and libvirt stops our passt with it.
        assert process_state(pid) not in (None, "Z"), "passt died during the test"
        daemon.virsh("destroy", name)
        assert wait_exited(pid, 30), f"passt {pid} still running after virsh destroy"
        assert "Traceback" not in passt_log.read_text(), "passt crashed (see its log)"
        assert not re.search(rf"\b{re.escape(name)}\b", daemon.virsh("list", "--all").stdout)
    finally:
        if guest is not None:
            guest.close()
        daemon.virsh("destroy", name, check=False)
