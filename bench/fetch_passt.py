#!/usr/bin/env python3
"""Fetch a passt that has --vhost-user (Debian 13's package) for the benchmarks to compare.

Debian 12's passt (2023) predates passt's vhost-user back end, so `bench/vhost_throughput.py
--passt PATH` needs a newer build. This takes Debian 13 ("trixie")'s binary package, and its
C library (the binary wants glibc >= 2.38, Debian 12 has 2.36), from the same Debian mirror
apt uses, verified the way apt does it: InRelease signed by a key in Debian 12's
debian-archive-keyring (gpgv), Packages.xz by the SHA256 InRelease lists, each .deb by the
SHA256 Packages lists. Nothing is installed: both packages are unpacked under DIR and
DIR/passt is a wrapper that runs the binary through trixie's dynamic loader.

    python bench/fetch_passt.py [DIR]          # default bench/.cache/passt-trixie
    python bench/vhost_throughput.py qemu --passt bench/.cache/passt-trixie/passt

The binary is Debian's build of passt; none of its source is in this repository.
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

MIRROR = "http://deb.debian.org/debian"
SUITE = "trixie"
KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
PACKAGES = ("passt", "libc6")
DEFAULT_DIR = Path(__file__).resolve().parent / ".cache" / "passt-trixie"


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=120) as r:  # noqa: S310 (a fixed Debian mirror)
        return r.read()


def verified_release(tmp: Path) -> str:
    """The InRelease text, after gpgv checked its signature against Debian's keyring."""
    path = tmp / "InRelease"
    path.write_bytes(fetch(f"{MIRROR}/dists/{SUITE}/InRelease"))
    r = subprocess.run(["gpgv", "--keyring", KEYRING, str(path)], capture_output=True,
                       text=True)
    if r.returncode:
        sys.exit(f"fetch_passt: InRelease signature not good:\n{r.stderr}")
    return path.read_text()


def sha256_listed(release: str, name: str) -> str:
    in_sha = False
    for line in release.splitlines():
        if not line.startswith(" "):
            in_sha = line.startswith("SHA256:")
            continue
        fields = line.split()
        if in_sha and len(fields) == 3 and fields[2] == name:
            return fields[0]
    sys.exit(f"fetch_passt: {name} not listed in InRelease")


def stanzas(packages: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for block in packages.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            if line and not line[0].isspace() and ":" in line:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields.get("Package") in PACKAGES:
            out[fields["Package"]] = fields
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dir", nargs="?", type=Path, default=DEFAULT_DIR)
    args = p.parse_args()
    wrapper = args.dir / "passt"
    if wrapper.exists():
        print(wrapper)
        return 0
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        release = verified_release(tmp)
        name = "main/binary-amd64/Packages.xz"
        raw = fetch(f"{MIRROR}/dists/{SUITE}/{name}")
        if hashlib.sha256(raw).hexdigest() != sha256_listed(release, name):
            sys.exit("fetch_passt: Packages.xz does not match InRelease")
        found = stanzas(lzma.decompress(raw).decode())
        root = tmp / "root"
        for pkg in PACKAGES:
            if pkg not in found:
                sys.exit(f"fetch_passt: no {pkg} in {SUITE}")
            deb = fetch(f"{MIRROR}/{found[pkg]['Filename']}")
            if hashlib.sha256(deb).hexdigest() != found[pkg]["SHA256"]:
                sys.exit(f"fetch_passt: {pkg} .deb does not match Packages")
            (tmp / f"{pkg}.deb").write_bytes(deb)
            subprocess.run(["dpkg-deb", "-x", str(tmp / f"{pkg}.deb"), str(root)], check=True)
            print(f"{pkg} {found[pkg]['Version']}", file=sys.stderr)
        args.dir.mkdir(parents=True, exist_ok=True)
        dest = args.dir / "root"
        shutil.rmtree(dest, ignore_errors=True)
        shutil.move(str(root), dest)
    lib = dest / "usr/lib/x86_64-linux-gnu"
    # passt.avx2 is the build passt itself would pick on this CPU (it cannot re-exec
    # itself through the loader and says so once; it then runs as it is).
    wrapper.write_text("#!/bin/sh\n"
                       f'exec {lib}/ld-linux-x86-64.so.2 --library-path {lib} '
                       f'{dest}/usr/bin/passt.avx2 "$@"\n')
    wrapper.chmod(0o755)
    print(wrapper)
    return 0


if __name__ == "__main__":
    sys.exit(main())
