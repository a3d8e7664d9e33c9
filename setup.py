"""setup.py wires what pyproject.toml cannot say: the cffi build scripts, the man page, the
abi3 wheel tag (every extension is built against the stable ABI, Python 3.11 and later), and
the build's commit, written into vhostpasst/_buildinfo.py of the wheel or sdist when built
from a git checkout (vhostpasst/version.py reads it). All other metadata is in pyproject.toml.
"""

from __future__ import annotations

import os
import sys

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from vhostpasst.version import checkout_commit  # noqa: E402  (the package's own, no deps)

BUILDINFO = os.path.join("vhostpasst", "_buildinfo.py")


def _write_buildinfo(root: str) -> None:
    info = checkout_commit(HERE)
    if info is None:
        return  # an unpacked sdist already carries its _buildinfo.py
    path = os.path.join(root, BUILDINFO)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f'"""Written by setup.py at build time."""\nCOMMIT = "{info[0]}"\n'
                f'DATE = "{info[1]}"\n')


class BuildPyWithInfo(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # a checkout run in place asks git itself
            _write_buildinfo(self.build_lib)


class SdistWithInfo(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        _write_buildinfo(base_dir)


setup(
    cffi_modules=[
        "cffi_build/virtio/ring_build.py:ffibuilder",
        "cffi_build/virtio/net_build.py:ffibuilder",
        "cffi_build/virtio/guard_build.py:ffibuilder",
        "cffi_build/vhostpasst/checksum_build.py:ffibuilder",
        "cffi_build/vhostpasst/mmsg_build.py:ffibuilder",
        "cffi_build/vhostpasst/ns_build.py:ffibuilder",
        "cffi_build/vhostpasst/tcpseg_build.py:ffibuilder",
        "cffi_build/vhostpasst/tcpsg_build.py:ffibuilder",
        "cffi_build/vhostpasst/seccomp_build.py:ffibuilder",
        "cffi_build/vhostpasst/dataplane_build.py:ffibuilder",
    ],
    cmdclass={"build_py": BuildPyWithInfo, "sdist": SdistWithInfo},
    data_files=[("share/man/man1", ["doc/vhostpasst.1"])],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
