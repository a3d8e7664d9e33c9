"""Fixtures of the namespace tests beyond tests/conftest.py's `sandbox`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.netns.sandbox import Sandbox


@pytest.fixture
def netns_name(sandbox: Sandbox) -> str:
    name = f"{sandbox.host_ns}-i"
    subprocess.run(["ip", "netns", "add", name], check=True, timeout=10)
    sandbox._made.append(name)  # deleted at teardown
    return name


@pytest.fixture(params=["vhostpasst-repair", "passt-repair"])
def helper_command(request: pytest.FixtureRequest) -> list[str]:
    """A TCP_REPAIR helper's command: ours, and passt's (Debian 13's passt package has it)
    from VPT_PASST_REPAIR or PATH, where installed: the same protocol serves either daemon."""
    if request.param == "vhostpasst-repair":
        return [sys.executable, "-m", "vhostpasst.repair_helper"]
    found = os.environ.get("VPT_PASST_REPAIR") or shutil.which("passt-repair")
    if found is None:
        pytest.skip("passt-repair not installed (or VPT_PASST_REPAIR not set)")
    return [found]
