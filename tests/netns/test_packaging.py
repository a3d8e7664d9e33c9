"""The sdist is what gets published: it must build a working wheel on its own. Built from this
checkout with `python -m build --sdist`, installed with pip into a fresh venv made outside the
checkout, then the installed copy (not the checkout) answers --version, carries its man page and
licence, and serves a guest a DHCP lease in the test's own namespaces.

pip fetches the build requirements (setuptools, cffi) from the package index as it would for
any user; a machine that cannot reach one skips this test rather than fail it."""

from __future__ import annotations

import contextlib
import fcntl
import os
import subprocess
import sys
import tempfile
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns.sandbox import Sandbox

ROOT = Path(__file__).resolve().parents[2]
# a git checkout builds its commit into the version; an unpacked archive has none to tell
FROM_GIT = (ROOT / ".git").exists()


@contextlib.contextmanager
def _building() -> Iterator[None]:
    """One build from the checkout at a time: the sdist and `make install` both write the
    checkout's egg-info and build folders, and under `-n 2` they ran at once (a file one listed
    was gone when the other copied it: "No such file or directory")."""
    with open(Path(tempfile.gettempdir()) / "vhostpasst-tests-build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _run(*cmd: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv (outside the checkout) with the sdist of this checkout installed into it."""
    work = tmp_path_factory.mktemp("sdist")
    with _building():
        r = _run(sys.executable, "-m", "build", "--sdist", "--outdir", work / "dist", ROOT,
                 cwd=work)
    if r.returncode != 0 and "No module named build" in r.stderr:
        pytest.skip("the `build` package is not installed (the test extra has it)")
    assert r.returncode == 0, r.stdout + r.stderr
    (sdist,) = (work / "dist").glob("vhostpasst-*.tar.gz")
    venv.create(work / "venv", with_pip=True)
    r = _run(work / "venv/bin/python", "-m", "pip", "install", "--disable-pip-version-check",
             sdist, cwd=work)
    if r.returncode != 0 and ("Could not find a version" in r.stderr
                              or "NewConnectionError" in r.stderr):
        pytest.skip(f"pip cannot fetch the build requirements here:\n{r.stderr[-500:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    return work / "venv"


def test_sdist_installs_with_man_page_licence_and_version(installed: Path) -> None:
    r = _run(installed / "bin/vhostpasst", "--version", cwd=installed)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("vhostpasst 0."), r.stdout
    assert ("(git " in r.stdout) == FROM_GIT, r.stdout
    assert (installed / "share/man/man1/vhostpasst.1").read_text().startswith(".\\\"")
    site = next((installed / "lib").glob("python3*/site-packages"))
    (dist_info,) = site.glob("vhostpasst-*.dist-info")
    licence = next(dist_info.rglob("COPYING")).read_text()
    assert "GNU GENERAL PUBLIC LICENSE" in licence
    assert "License-Expression: GPL-2.0-or-later" in (dist_info / "METADATA").read_text()
    # the installed copy runs from site-packages, with its own compiled modules
    r = _run(installed / "bin/python", "-c",
             "import vhostpasst, virtio._ring; print(vhostpasst.__file__)", cwd=installed)
    assert r.returncode == 0 and str(site) in r.stdout, r.stdout + r.stderr


def test_installed_copy_serves_a_dhcp_lease(installed: Path, sandbox: Sandbox) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    sandbox.start_daemon(command=[str(installed / "bin/vhostpasst")], env=env)
    sandbox.start_relay()
    lease = sandbox.udhcpc()
    assert lease["ip"] == "192.0.2.2", lease
    assert lease["router"] == "192.0.2.1", lease


def test_make_install_puts_commands_links_and_man_page_under_prefix(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    with _building():
        r = subprocess.run(["make", "-s", "install", f"PREFIX={prefix}",
                            f"PYTHON={sys.executable}"], cwd=ROOT, capture_output=True,
                           text=True, timeout=300,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if r.returncode != 0 and "Could not find a version" in r.stderr:
        pytest.skip("pip cannot fetch the build requirements here")
    assert r.returncode == 0, r.stdout + r.stderr
    dated = "2" if FROM_GIT else "vhostpasst-"  # passt 2026_12_07.abc1234 (vhostpasst 0.1.0)
    for name, shape in (("passt", f"passt {dated}"), ("pasta", f"pasta {dated}"),
                        ("vhostpasst", "vhostpasst 0."), ("vhostpasta", "vhostpasta 0.")):
        out = _run(prefix / "bin" / name, "--version", cwd=tmp_path)
        assert out.returncode == 0 and out.stdout.startswith(shape), (name, out)
    out = _run(prefix / "bin/vhostpasst-repair", "--help", cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.startswith("Usage: vhostpasst-repair"), out
    assert (prefix / "share/man/man1/vhostpasst.1").is_file()
    assert (prefix / "share/man/man1/vhostpasta.1").resolve().name == "vhostpasst.1"
    r = subprocess.run(["make", "-s", "uninstall", f"PREFIX={prefix}"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert not list((prefix / "bin").iterdir()) and not (prefix / "lib/vhostpasst").exists()
