"""scripts/check_imports.py (in `make lint`) finds what it is there to find: a cycle closed
only inside a function, an upward import, virtio importing vhostpasst; and passes the tree."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("check_imports", ROOT / "scripts/check_imports.py")
assert _spec is not None and _spec.loader is not None
check_imports = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_imports)


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for name in ("vhostpasst/__init__.py", "vhostpasst/core/__init__.py",
                 "vhostpasst/wire/__init__.py", "virtio/__init__.py", *files):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files.get(name, ""))
    return tmp_path


def test_the_tree_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert check_imports.main(ROOT) == 0
    assert "no cycle" in capsys.readouterr().out


def test_a_cycle_closed_inside_a_function_is_found(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path, {
        "vhostpasst/core/a.py": "from vhostpasst.core import b\n",
        "vhostpasst/core/b.py": "def f():\n    from vhostpasst.core import a\n",
    })
    assert check_imports.main(root) == 1
    assert "import cycle: vhostpasst.core.a <-> vhostpasst.core.b" in capsys.readouterr().out


def test_an_upward_import_and_virtio_importing_vhostpasst_are_found(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(tmp_path, {
        "vhostpasst/wire/low.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                  "    from vhostpasst.core import high\n",
        "vhostpasst/core/high.py": "",
        "virtio/lib.py": "import vhostpasst.wire.low\n",
    })
    assert check_imports.main(root) == 1
    out = capsys.readouterr().out
    assert "upward import: vhostpasst.wire.low -> vhostpasst.core.high" in out
    assert "virtio imports vhostpasst: virtio.lib -> vhostpasst.wire.low" in out
