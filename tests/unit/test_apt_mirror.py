"""scripts/apt-mirror.sh's mirror_of, which .ci/install-qemu.sh and check-stock-debian.sh use to
take the package mirror from apt's own sources (no host name is written in the repository):
deb822 stanzas (disabled ones skipped, a suite among several), then one-line sources.list
entries with options, and a status of 1 when no source names the suite. Files only: nothing
is fetched."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "apt-mirror.sh"


def mirror_of(etc: Path, suite: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["sh", "-c", f'. "{SCRIPT}"; mirror_of "$1"', "sh", suite],
                          env={"APT_ETC": str(etc), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=10)


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "sources.list.d"
    d.mkdir()
    (d / "a.sources").write_text(
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\nComponents: main\n"
        "Enabled: no\n\n"
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main\nSigned-By: /usr/share/keyrings/k.gpg\n\n"
        "Types: deb\nURIs: http://security.example/debian-security\n"
        "Suites: bookworm-security\nComponents: main\n")
    (tmp_path / "sources.list").write_text(
        "# comment\ndeb [arch=amd64 signed-by=/k.gpg] http://old.example/debian trixie main\n")
    return tmp_path


def test_deb822_stanza_with_its_keyring_and_disabled_ones_skipped(etc: Path) -> None:
    r = mirror_of(etc, "bookworm")
    assert r.returncode == 0 and r.stdout == "http://mirror.example/debian|/usr/share/keyrings/k.gpg\n"
    r = mirror_of(etc, "bookworm-security")
    assert r.stdout == "http://security.example/debian-security|\n"


def test_one_line_sources_with_options(etc: Path) -> None:
    r = mirror_of(etc, "trixie")
    assert r.returncode == 0 and r.stdout == "http://old.example/debian|\n"


def test_no_source_for_the_suite(etc: Path) -> None:
    r = mirror_of(etc, "sid")
    assert r.returncode != 0 and r.stdout == ""
