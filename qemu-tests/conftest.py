"""pytest fixtures for the real-guest tests: image, host namespace, daemon, guest.

Run with `python -m pytest qemu-tests -n 2`. Needs root (network namespaces), qemu and apt
(see README.md). Every object is torn down by its fixture; on failure the console, qemu and
daemon logs are attached to the report.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest
from harness import (
    DAEMON,
    QEMU,
    Daemon,
    Guest,
    GuestNet,
    HostNetns,
    Setup,
    SetupFactory,
    make_workdir,
)
from image import Image, ImageError, build_image

QEMU_TEST_TIMEOUT = 300  # pyproject's 120 s is for unit tests; a TCG boot alone takes ~5 s
_LOGS = pytest.StashKey[list[tuple[str, Path]]]()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(QEMU_TEST_TIMEOUT))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    # Attach the logs of whatever this test started, so a failure explains itself.
    if report.failed and report.when in ("setup", "call"):
        logs = list(item.stash.get(_LOGS, []))
        # Module-scoped guests (shared by several tests) carry their own list.
        for value in getattr(item, "funcargs", {}).values():
            logs += getattr(value, "vpt_logs", [])
        for name, path in logs:
            if path.exists():
                text = path.read_bytes()[-20000:].decode(errors="replace").replace("\r\n", "\n")
                report.sections.append((f"vpt {name}", text))
    return report


def pytest_configure(config: pytest.Config) -> None:
    # A module-scoped guest is shared by the tests of one back end: with `-n 2` they must run
    # on one worker (xdist_group), or each worker would boot its own. xdist honours the mark
    # only with --dist loadgroup, which behaves like the default "load" for unmarked tests, so
    # switch to it here instead of asking everyone for an extra option.
    if getattr(config.option, "dist", None) == "load":
        config.option.dist = "loadgroup"
    workerinput = getattr(config, "workerinput", None)
    if workerinput and workerinput.get("vpt_loadgroup"):
        config.option.loadgroup = True  # workers tag node ids with the group from this


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: object) -> None:
    # Runs on the controller for each worker it starts (xdist): workers parse the command
    # line afresh and would not know about the switch above.
    config = getattr(node, "config", None)
    if config is not None and config.getvalue("dist") == "loadgroup":
        node.workerinput["vpt_loadgroup"] = True  # type: ignore[attr-defined]


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        HostNetns.reap_stale()


@pytest.fixture(scope="session")
def image() -> Image:
    if os.geteuid() != 0:
        pytest.skip("qemu tests need root (network namespaces)")
    if not shutil.which(QEMU):
        pytest.skip(f"{QEMU} not installed (run .ci/install-qemu.sh)")
    try:
        return build_image()
    except ImageError as e:
        pytest.fail(f"guest image build failed: {e}")


@pytest.fixture
def workdir(request: pytest.FixtureRequest) -> Iterator[Path]:
    path = make_workdir()
    request.node.stash[_LOGS] = []
    yield path
    if not os.environ.get("VPT_KEEP"):
        shutil.rmtree(path, ignore_errors=True)


def _track(request: pytest.FixtureRequest, name: str, path: Path) -> None:
    request.node.stash.setdefault(_LOGS, []).append((name, path))


@pytest.fixture
def host_netns() -> Iterator[HostNetns]:
    ns = HostNetns()
    yield ns
    ns.close()


@pytest.fixture
def guest(image: Image, workdir: Path, request: pytest.FixtureRequest) -> Iterator[Guest]:
    """A guest with no network at all (the smoke test)."""
    _track(request, "console", workdir / "console.log")
    g = Guest(image, workdir)
    yield g
    g.close()


def daemon_has_vhost_user() -> bool:
    """False while the daemon's --help marks --vhost-user "not supported yet": the vhost-user
    cases then skip, and start running by themselves once the back end lands."""
    try:
        res = subprocess.run([*DAEMON, "--help"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    lines = [ln for ln in (res.stdout + res.stderr).splitlines() if "--vhost-user" in ln]
    return bool(lines) and not any("not supported" in ln for ln in lines)


@pytest.fixture
def passt_setup(
    image: Image, workdir: Path, host_netns: HostNetns, request: pytest.FixtureRequest
) -> Iterator[SetupFactory]:
    """Factory: `passt_setup(kind="stream", args=[...])` starts the daemon in the host
    namespace and boots a guest attached to it. Torn down guest first, then the daemon."""
    started: list[Daemon | Guest] = []

    def restart(setup: Setup) -> Daemon:
        """Kill the daemon and start the same command again (a crash and a restart)."""
        assert setup.daemon.proc is not None
        setup.daemon.proc.kill()
        setup.daemon.proc.wait(timeout=10)
        setup.daemon.proc = None  # killed on purpose: not "died during the test"
        daemon = Daemon(workdir, host_netns, setup.daemon.args,
                        vhost_user=setup.daemon.vhost_user)
        started.append(daemon)
        setup.daemon = daemon
        return daemon

    def start(
        kind: str = "stream", args: tuple[str, ...] = (), reconnect_ms: int | None = None
    ) -> Setup:
        if kind == "vhost-user" and not daemon_has_vhost_user():
            pytest.skip(f"{DAEMON[0]} --help says vhost-user is not supported yet")
        _track(request, "daemon log", workdir / "daemon.log")
        _track(request, "console", workdir / "console.log")
        _track(request, "qemu stderr", workdir / "qemu.log")
        daemon = Daemon(workdir, host_netns, args, vhost_user=(kind == "vhost-user"))
        started.append(daemon)
        net = GuestNet(kind, daemon.socket, reconnect_ms=reconnect_ms)
        guest = Guest(image, workdir, net, host_netns)
        started.append(guest)
        return Setup(host_netns, daemon, guest)

    start.restart = restart  # type: ignore[attr-defined]

    yield start
    # A daemon that died during the test (a crash the test did not notice) is a failure too.
    dead = [
        f"daemon exited with status {o.proc.returncode} during the test\n{o.log_text()}"
        for o in started
        if isinstance(o, Daemon) and o.proc is not None and o.proc.poll() is not None
    ]
    for obj in reversed(started):
        obj.close()
    if dead:
        pytest.fail(dead[0])
