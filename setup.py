# setup.py only wires the cffi build scripts; all metadata lives in pyproject.toml.
from setuptools import setup

setup(
    cffi_modules=[
        "cffi_build/checksum_build.py:ffibuilder",
        "cffi_build/ring_build.py:ffibuilder",
        "cffi_build/mmsg_build.py:ffibuilder",
        "cffi_build/ns_build.py:ffibuilder",
        "cffi_build/tcpseg_build.py:ffibuilder",
        "cffi_build/tcpsg_build.py:ffibuilder",
        "cffi_build/seccomp_build.py:ffibuilder",
    ]
)
