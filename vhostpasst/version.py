"""The version, in one place, and which build this is.

`VERSION` is the release; pyproject.toml reads it from here. A build from a git checkout also
knows its commit: setup.py writes it (hash and commit date) into `_buildinfo.py` of the wheel
or sdist it builds; a checkout run in place (an editable install) asks git, and only when the
version is asked for (`--version`), never on the daemon's start-up path.

passt prints dated versions (`passt 2025_05_03.587980c`) and tools that compare them parse that
form, so linked as passt or pasta we print the commit's date and hash in the same shape, with
our own release after it: `passt 2026_12_04.f89424c (vhostpasst 0.1.0)`.
"""

from __future__ import annotations

import os
import subprocess

VERSION = "0.1.0"


def build_info(ask_git: bool = False) -> tuple[str, str] | None:
    """(short commit hash, commit date YYYY-MM-DD) of this build, or None if unknown."""
    try:
        from vhostpasst import _buildinfo  # type: ignore[attr-defined]

        return str(_buildinfo.COMMIT), str(_buildinfo.DATE)
    except ImportError:
        pass
    if not ask_git:
        return None
    return checkout_commit(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def checkout_commit(root: str) -> tuple[str, str] | None:
    """(short hash, commit date) of HEAD of the git checkout at `root`, if it is one and git
    is installed (setup.py uses this at build time too)."""
    if not os.path.exists(os.path.join(root, ".git")):
        return None
    try:
        out = subprocess.run(["git", "-C", root, "log", "-1", "--format=%h %cs"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    parts = out.split()
    return (parts[0], parts[1]) if len(parts) == 2 else None


def version_line(name: str, ask_git: bool = True) -> str:
    """What `--version` prints for the program called `name`."""
    info = build_info(ask_git)
    if name in ("passt", "pasta"):
        if info is None:
            return f"{name} vhostpasst-{VERSION}"
        commit, date = info
        return f"{name} {date.replace('-', '_')}.{commit} (vhostpasst {VERSION})"
    if info is None:
        return f"{name} {VERSION}"
    return f"{name} {VERSION} (git {info[0]}, {info[1]})"
