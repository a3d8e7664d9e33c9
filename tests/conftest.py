"""Shared fixtures. `sandbox`: host/guest network namespaces for end-to-end tests (see
tests/netns/sandbox.py); configure one per test with
@pytest.mark.sandbox(mtu=..., resolv_conf=...)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

from tests.netns.sandbox import Sandbox, SandboxConfig, remove_stale_namespaces

# CI runs the namespace and qemu suites beside the fuzzers on two cores: a per-example time
# limit there measures the machine's load, not our code, so it is off (runs stay bounded by
# max_examples and pytest-timeout).
settings.register_profile(
    "vhostpasst", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("vhostpasst")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "sandbox(**fields): SandboxConfig fields for the `sandbox` fixture")


def _can_sandbox() -> str | None:
    """Why namespaces cannot be built here, or None if they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, tap devices)"
    for tool in ("ip", "busybox"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    return None


@pytest.fixture(scope="session")
def _sandbox_host() -> None:
    reason = _can_sandbox()
    if reason:
        pytest.skip(reason)
    remove_stale_namespaces()  # from earlier runs that were killed before their teardown


@pytest.fixture
def sandbox(request: pytest.FixtureRequest, _sandbox_host: None) -> Iterator[Sandbox]:
    """A fresh world/host/guest namespace set (no daemon, no relay yet); torn down after."""
    marker = request.node.get_closest_marker("sandbox")
    config = SandboxConfig(**(marker.kwargs if marker else {}))
    box = Sandbox(config).setup()
    try:
        yield box
    finally:
        box.teardown()
    if box.late_imports:  # the sandboxed daemon imported late: fails in production
        pytest.fail("late imports in the daemon:\n" + "\n".join(box.late_imports))
