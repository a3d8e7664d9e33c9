"""Build the guest image for the qemu tests: a Debian kernel plus a busybox initramfs.

Everything comes from Debian packages: the distribution's newest kernel package
(`linux-image-6.1.0-N-amd64` on Debian 12, `linux-image-6.12.N+deb13-amd64` on Debian 13;
not backports' kernels, so each release tests its own) (kernel and the
virtio-net modules with their dependencies), `busybox-static`, and, when the host has them
installed, `iperf3` and ISC `dhclient` (busybox in Debian 12 has no DHCPv6 client) with their
shared libraries. The result is cached under
`qemu-tests/.cache/image-<key>/`, where the key hashes the package versions and this file, so
the image is rebuilt only when an input changes.

    python qemu-tests/image.py          # prints the kernel and initramfs paths
    from image import build_image       # library use: build_image() -> Image
"""

from __future__ import annotations

import fcntl
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE_DIR = Path(os.environ.get("VPT_IMAGE_CACHE", HERE / ".cache"))

# The modules the guest needs; their dependencies are found from each module's modinfo.
WANTED_MODULES = ("virtio_pci", "virtio_net")
# Where in the kernel package to look for them (kept narrow so the unpack stays fast).
MODULE_DIRS = ("kernel/drivers/virtio/", "kernel/drivers/net/", "kernel/net/core/")
# linux-image-6.1.0-40-amd64 (Debian 12: version, then ABI), linux-image-6.12.57+deb13-amd64
# (Debian 13); not +bpo (backports) nor -rt/-cloud flavours
KERNEL_PKG_RE = re.compile(r"^linux-image-(\d+)\.(\d+)\.(\d+)(?:-(\d+)|\+deb\d+)-amd64$")

INIT_SCRIPT = r"""#!/bin/sh
# vhostpasst qemu-tests guest init (busybox). Kernel command line variables (passed to us in the
# environment): vpt_run=<base64 script> runs that script and powers off; vpt_noecho=1 gives the
# harness a plain console (no echo, no prompt, no line editing).
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
while read -r m; do
	insmod "/lib/modules/$m" || echo "VPT-WARN: insmod $m failed"
done </etc/modules
ip link set lo up
hostname guest
# From here on only emergencies reach the console, so kernel messages cannot split the lines
# the harness parses.
dmesg -n 1
if [ -n "$vpt_run" ]; then
	echo "$vpt_run" | base64 -d >/tmp/vpt_run.sh
	sh /tmp/vpt_run.sh
	echo "VPT-EXIT $?"
	poweroff -f
fi
if [ -n "$vpt_noecho" ]; then
	stty -echo
	echo "VPT-READY"
	# A read/eval loop instead of an interactive ash: no prompt, no line editing echo, and
	# each line runs as soon as its newline arrives.
	while IFS= read -r vpt_line; do eval "$vpt_line"; done
else
	echo "VPT-READY"
	setsid cttyhack sh -l
fi
poweroff -f
"""

# udhcpc calls this with $1 = deconfig|bound|renew|leasefail|nak and the lease in variables;
# it prints them on one line for the harness and configures eth0 like a normal client would.
UDHCPC_SCRIPT = r"""#!/bin/sh
case "$1" in
deconfig)
	ip addr flush dev "$interface"
	ip link set "$interface" up
	;;
bound|renew)
	echo "VPT-DHCP ip=$ip subnet=$subnet mask=$mask router=$router dns=$dns mtu=$mtu" \
		"domain=$domain search=$search serverid=$serverid lease=$lease"
	[ -n "$mtu" ] && ip link set "$interface" mtu "$mtu"
	ip addr flush dev "$interface"
	ip addr add "$ip/${mask:-24}" dev "$interface"
	for r in $router; do ip route add default via "$r" dev "$interface"; break; done
	;;
*)
	echo "VPT-DHCP-EVENT $1"
	;;
esac
exit 0
"""

# ISC dhclient -6 calls this with $reason (PREINIT6, BOUND6, ...) and the lease in new_*
# variables: one line for the harness, then the address on the interface as dhclient-script does.
DHCLIENT6_SCRIPT = r"""#!/bin/sh
case "$reason" in
PREINIT6)
	ip link set "$interface" up
	;;
BOUND6|RENEW6|REBIND6|REBOOT6)
	echo "VPT-DHCP6 reason=$reason ip6=$new_ip6_address plen=$new_ip6_prefixlen" \
		"dns6=$new_dhcp6_name_servers search6=$new_dhcp6_domain_search"
	ip -6 addr add "$new_ip6_address/$new_ip6_prefixlen" dev "$interface"
	;;
*)
	echo "VPT-DHCP6-EVENT $reason"
	;;
esac
exit 0
"""


@dataclass(frozen=True)
class Image:
    kernel: Path
    initramfs: Path
    manifest: dict[str, object]


class ImageError(RuntimeError):
    pass


def _run(argv: list[str], **kw: object) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, timeout=600, **kw)  # type: ignore[call-overload]
    if res.returncode != 0:
        raise ImageError(f"{' '.join(argv)} failed ({res.returncode}): {res.stderr.strip()}")
    return str(res.stdout)


def _candidates(pkgs: list[str]) -> dict[str, str]:
    """The versions apt would install (packages without a candidate are left out).

    One `apt-cache policy` for all of them: each apt-cache run costs ~0.5 s here."""
    out = _run(["apt-cache", "policy", *pkgs])
    found: dict[str, str] = {}
    for m in re.finditer(r"^(\S+):\n\s+Installed:.*\n\s+Candidate:\s*(\S+)", out, re.M):
        if m.group(2) != "(none)":
            found[m.group(1)] = m.group(2)
    return found


def _kernel_packages() -> list[str]:
    """The distribution's linux-image-*-amd64 names apt knows, newest first (or
    VPT_KERNEL_PKG)."""
    override = os.environ.get("VPT_KERNEL_PKG")
    if override:
        return [override]
    out = _run(["apt-cache", "pkgnames", "linux-image-"])
    # Debian 12's own 6.1 (ABI-numbered names) before the 6.12 it also carries for upgrades
    found = sorted(
        ((m.group(4) is not None, tuple(int(g or 0) for g in m.groups()), m.group(0))
         for n in out.split() if (m := KERNEL_PKG_RE.match(n))),
        reverse=True,
    )
    return [name for _, _, name in found[:5]]


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _host_tool_files(name: str) -> list[Path]:
    """A host program (from its Debian package) and the shared libraries it loads; [] if
    absent. Kept at their host paths in the image, so the dynamic loader finds them."""
    exe = shutil.which(name)
    if not exe:
        return []
    files = [Path(exe)]
    for line in _run(["ldd", exe]).splitlines():
        # "libfoo.so.1 => /lib/x86_64-linux-gnu/libfoo.so.1 (0x...)" or "/lib64/ld-linux... (0x..)"
        m = re.search(r"(/\S+)\s+\(0x", line)
        if m:
            files.append(Path(m.group(1)))
    return files


def _iperf3_files() -> list[Path]:
    if os.environ.get("VPT_NO_IPERF3"):
        return []
    files = [Path(p).resolve() if i == 0 else p for i, p in enumerate(_host_tool_files("iperf3"))]
    # iperf3 >= 3.16 (Debian 13) runs threads and cancels them: glibc then dlopen()s
    # libgcc_s, which ldd does not list ("libgcc_s.so.1 must be installed for pthread_cancel")
    libc_dirs = {p.parent for p in files[1:] if p.name.startswith("libc.so")}
    files += [d / "libgcc_s.so.1" for d in sorted(libc_dirs) if (d / "libgcc_s.so.1").exists()]
    return files


def image_inputs() -> dict[str, object]:
    kernels = _kernel_packages()
    versions = _candidates(["busybox-static", *kernels])
    # The newest kernel apt can actually fetch (a name may linger without a candidate).
    kpkg = next((k for k in kernels if k in versions), None)
    if kpkg is None:
        raise ImageError("no linux-image-*-amd64 package known to apt (run apt-get update)")
    if "busybox-static" not in versions:
        raise ImageError("apt does not know busybox-static (run apt-get update)")
    inputs: dict[str, object] = {
        "kernel_pkg": kpkg,
        "kernel_ver": versions[kpkg],
        "busybox_ver": versions["busybox-static"],
        "builder": _file_digest(Path(__file__)),
    }
    # Content hashes: cheap (a few MB) and exact for the host files copied into the image.
    inputs["iperf3"] = {str(p): _file_digest(p.resolve()) for p in _iperf3_files()}
    # dhclient as /sbin/dhclient: the guest calls it by that name (DHCPv6 cases).
    inputs["dhclient"] = {str(p): _file_digest(p.resolve()) for p in _host_tool_files("dhclient")}
    return inputs


def image_key(inputs: dict[str, object]) -> str:
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _download(pkg: str, version: str, debs: Path) -> Path:
    debs.mkdir(parents=True, exist_ok=True)
    name_ver = version.replace(":", "%3a")
    found = list(debs.glob(f"{pkg}_{name_ver}_*.deb"))
    if found:
        return found[0]
    _run(["apt-get", "download", f"{pkg}={version}"], cwd=debs)
    found = list(debs.glob(f"{pkg}_{name_ver}_*.deb"))
    if not found:
        raise ImageError(f"apt-get download {pkg}={version} produced no .deb in {debs}")
    return found[0]


def _deb_members(deb: Path, want: Iterable[str] | None = None) -> Iterable[tuple[str, bytes]]:
    """Stream (path, content) of the regular files in a .deb whose path passes `want`."""
    wanted = tuple(want) if want is not None else None
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    try:
        with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
            for member in tar:
                path = member.name.removeprefix("./")
                if not member.isfile():
                    continue
                if wanted is not None and not any(re.search(w, path) for w in wanted):
                    continue
                f = tar.extractfile(member)
                assert f is not None
                yield path, f.read()
    finally:
        proc.stdout.close()
        if proc.wait(timeout=120) != 0:
            raise ImageError(f"dpkg-deb --fsys-tarfile {deb} failed")


def _decompress_module(name: str, data: bytes) -> bytes:
    # busybox insmod wants a plain ELF; Debian 12 ships plain .ko but newer kernels compress.
    if name.endswith(".xz"):
        return lzma.decompress(data)
    if name.endswith(".gz"):
        return gzip.decompress(data)
    if name.endswith(".zst"):
        res = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, timeout=60)
        if res.returncode != 0:
            raise ImageError(f"zstd -d {name} failed")
        return res.stdout
    return data


def _modinfo_depends(ko: bytes) -> list[str]:
    m = re.search(rb"(?:^|\0)depends=([^\0]*)\0", ko)
    return [d for d in m.group(1).decode().split(",") if d] if m else []


def _mod_name(path: str) -> str:
    base = path.rsplit("/", 1)[-1]
    return base.split(".ko", 1)[0].replace("-", "_")


def _unpack_kernel(deb: Path) -> tuple[bytes, str, list[tuple[str, bytes]]]:
    """Return (vmlinuz, kernel release, [(module file name, plain ELF)] in load order)."""
    vmlinuz = b""
    release = ""
    builtin: set[str] = set()
    modules: dict[str, tuple[str, bytes]] = {}
    # /lib/modules on Debian 12, /usr/lib/modules on Debian 13 (merged /usr)
    patterns = [r"^boot/vmlinuz-", r"^(usr/)?lib/modules/[^/]+/modules\.builtin$"]
    patterns += [rf"^(usr/)?lib/modules/[^/]+/{re.escape(d)}[^/]+\.ko(\.[a-z]+)?$"
                 for d in MODULE_DIRS]
    for path, data in _deb_members(deb, patterns):
        if path.startswith("boot/vmlinuz-"):
            vmlinuz, release = data, path.removeprefix("boot/vmlinuz-")
        elif path.endswith("modules.builtin"):
            builtin = {_mod_name(line) for line in data.decode().split()}
        else:
            modules[_mod_name(path)] = (path, data)
    if not vmlinuz:
        raise ImageError(f"{deb} has no /boot/vmlinuz-*")

    order: list[tuple[str, bytes]] = []
    done: set[str] = set()

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in done or name in builtin:
            return
        if name not in modules:
            raise ImageError(f"module {name} (needed by {' <- '.join(chain)}) not in {MODULE_DIRS}")
        path, raw = modules[name]
        ko = _decompress_module(path, raw)
        for dep in _modinfo_depends(ko):
            add(dep, (name, *chain))
        done.add(name)
        order.append((f"{name}.ko", ko))

    for name in WANTED_MODULES:
        add(name, ("guest",))
    return vmlinuz, release, order


class Cpio:
    """A minimal newc (SVR4, no CRC) archive writer: lets an unprivileged builder add device
    nodes and keeps the output byte-for-byte reproducible (fixed mtime and owners)."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.dirs: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
        self.ino += 1
        self.buf.write(b"070701" + b"".join(b"%08X" % f for f in fields))
        self.buf.write(name.encode() + b"\0")
        self.buf.write(b"\0" * (-(110 + len(name) + 1) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.dirs:
                self.dirs.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        self.buf.write(b"\0" * (-self.buf.tell() % 512))
        return self.buf.getvalue()


def _busybox_applets(busybox: bytes, tmp: Path) -> list[str]:
    exe = tmp / "busybox"
    exe.write_bytes(busybox)
    exe.chmod(0o755)
    return [a for a in _run([str(exe), "--list"]).split() if a != "busybox"]


def _build(inputs: dict[str, object], out: Path, debs: Path) -> None:
    kpkg, kver = str(inputs["kernel_pkg"]), str(inputs["kernel_ver"])
    vmlinuz, release, modules = _unpack_kernel(_download(kpkg, kver, debs))
    bb_deb = _download("busybox-static", str(inputs["busybox_ver"]), debs)
    # /bin/busybox on Debian 12, /usr/bin/busybox on Debian 13 (merged /usr)
    found = dict(_deb_members(bb_deb, [r"^(usr/)?bin/busybox$"]))
    busybox = found.get("bin/busybox") or found.get("usr/bin/busybox")
    if not busybox:
        raise ImageError(f"{bb_deb} has no /bin/busybox or /usr/bin/busybox")

    cpio = Cpio()
    for d in ("dev", "proc", "sys", "tmp", "run", "root", "etc", "lib/modules"):
        cpio.dir(d)
    cpio.chardev("dev/console", 5, 1)
    cpio.chardev("dev/null", 1, 3)
    cpio.file("bin/busybox", busybox, 0o755)
    with tempfile.TemporaryDirectory() as tmp:
        applets = _busybox_applets(busybox, Path(tmp))
    for applet in applets:
        cpio.symlink(f"bin/{applet}", "busybox")
    cpio.symlink("sbin", "bin")
    cpio.symlink("usr/bin", "../bin")
    cpio.symlink("usr/sbin", "../bin")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    # Debian's busybox looks for /etc/udhcpc/default.script; upstream's default is under /usr.
    cpio.file("etc/udhcpc/default.script", UDHCPC_SCRIPT.encode(), 0o755)
    cpio.symlink("usr/share/udhcpc/default.script", "/etc/udhcpc/default.script")
    cpio.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    cpio.file("etc/group", b"root:x:0:\n")
    cpio.file("etc/hosts", b"127.0.0.1 localhost guest\n::1 localhost guest\n")
    for name, ko in modules:
        cpio.file(f"lib/modules/{name}", ko)
    cpio.file("etc/modules", "".join(f"{name}\n" for name, _ in modules).encode())

    written: set[str] = set()
    for tool in ("iperf3", "dhclient"):
        files = inputs.get(tool) or {}
        assert isinstance(files, dict)
        for path in sorted(set(files) - written):  # both need libc: once is enough
            written.add(path)
            # Libraries keep the path the dynamic loader looks for; the content is the real
            # file. /sbin and /usr/bin are symlinks to /bin in the image: write there.
            name = path.lstrip("/")
            name = re.sub(r"^(usr/)?s?bin/", "bin/", name)
            cpio.file(name, Path(path).resolve().read_bytes(), 0o755)
    cpio.file("etc/dhclient6.script", DHCLIENT6_SCRIPT.encode(), 0o755)
    cpio.file("etc/dhclient.conf", b"timeout 20;\nretry 5;\n")
    cpio.dir("var/lib/dhcp")

    (out / "vmlinuz").write_bytes(vmlinuz)
    (out / "initramfs.cpio").write_bytes(cpio.finish())
    manifest = dict(inputs, release=release, modules=[n for n, _ in modules])
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def build_image(cache_dir: Path = CACHE_DIR, verbose: bool = False) -> Image:
    """Return the cached image for the current inputs, building it first if needed.

    Safe to call from several processes at once (pytest-xdist workers): a lock file serialises
    builders and the finished directory appears atomically (rename).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    inputs = image_inputs()
    out = cache_dir / f"image-{image_key(inputs)}"
    with open(cache_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "manifest.json").exists():
            t0 = time.monotonic()
            tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=cache_dir))
            try:
                _build(inputs, tmp, cache_dir / "debs")
                tmp.rename(out)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            if verbose:
                print(f"built {out} in {time.monotonic() - t0:.1f}s", file=sys.stderr)
            # Old images and the .debs of other versions are dead weight now.
            for old in cache_dir.glob("image-*"):
                if old != out:
                    shutil.rmtree(old, ignore_errors=True)
            keep = (f"{inputs['kernel_pkg']}_", "busybox-static_")
            for deb in (cache_dir / "debs").glob("*.deb"):
                if not deb.name.startswith(keep):
                    deb.unlink()
    manifest = json.loads((out / "manifest.json").read_text())
    return Image(out / "vmlinuz", out / "initramfs.cpio", manifest)


def main() -> int:
    try:
        image = build_image(verbose=True)
    except ImageError as e:
        print(f"image.py: {e}", file=sys.stderr)
        return 1
    print(f"kernel={image.kernel}")
    print(f"initramfs={image.initramfs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
