#!/usr/bin/env python3
"""The layering rules of doc/design.md, checked from the source (`make lint` runs this).

1. No import cycle among our modules, counting every import: top-level, inside functions and
   under TYPE_CHECKING (a cycle that works only by import order breaks with the next move).
2. Imports point down the layers: a module imports only from its own layer or a lower one.
3. virtio/ is a library of its own: it imports nothing from vhostpasst.

Prints each violation and exits 1 if there is any; prints a one-line summary otherwise.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("vhostpasst", "virtio")

# Lowest first. A module's layer is that of the longest prefix listed here.
LAYERS: list[tuple[str, ...]] = [
    ("virtio",),
    ("vhostpasst", "vhostpasst.version", "vhostpasst.wire", "vhostpasst.system"),
    ("vhostpasst.config",),
    ("vhostpasst.core",),
    ("vhostpasst.services", "vhostpasst.link"),
    ("vhostpasst.proto",),
    ("vhostpasst.dispatch",),
    ("vhostpasst.ctl",),
    ("vhostpasst.pasta",),
    ("vhostpasst.daemon",),
    ("vhostpasst.main", "vhostpasst.__main__"),
]


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module of ours that `name` imports, wherever the import statement stands."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    out: set[str] = set()

    def closest(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = closest(alias.name)
                if target:
                    out.add(target)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                if full in known:
                    out.add(full)
                elif alias.name.startswith("_") and not alias.name.startswith("__"):
                    continue  # a compiled cffi module (vhostpasst._csum ...): a leaf
                else:
                    target = closest(base)
                    if target:
                        out.add(target)
    out.discard(name)
    return out


def layer(name: str) -> int:
    best, rank = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    if rank < 0:
        raise SystemExit(f"check_imports: {name} is in no layer (add it to LAYERS)")
    return rank


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def main(root: Path = ROOT) -> int:
    known = modules(root)
    graph = {name: imports(name, path, known) for name, path in known.items()}
    problems = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for name, targets in sorted(graph.items()):
        for target in sorted(targets):
            if name.startswith("virtio") and target.startswith("vhostpasst"):
                problems.append(f"virtio imports vhostpasst: {name} -> {target}")
            elif layer(target) > layer(name):
                problems.append(f"upward import: {name} -> {target}")
    for line in problems:
        print(line)
    if problems:
        return 1
    edges = sum(len(t) for t in graph.values())
    print(f"check_imports: {len(known)} modules, {edges} imports, no cycle, all pointing down")
    return 0


if __name__ == "__main__":
    sys.exit(main())
