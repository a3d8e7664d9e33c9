"""Fixtures of the namespace tests beyond tests/conftest.py's `sandbox`."""

from __future__ import annotations

import subprocess

import pytest

from tests.netns.sandbox import Sandbox


@pytest.fixture
def netns_name(sandbox: Sandbox) -> str:
    name = f"{sandbox.host_ns}-i"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    sandbox._made.append(name)  # deleted at teardown
    return name
