"""Tests of the virtio/ vhost-user back-end library (no networking: socketpairs only).

pytest imports this directory as a package named `virtio`, the library's own name; its
submodules are looked up here and then in the library of this checkout (not in whatever an
editable install elsewhere points at: a git worktree would otherwise test the main
checkout's library)."""

from pathlib import Path

__path__.append(str(Path(__file__).resolve().parents[2] / "virtio"))  # noqa: F821
