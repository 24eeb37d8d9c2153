"""No import cycle inside dattri_cli: every module's imports (lazy ones in functions too) form a DAG.

Imports are read with ``ast`` (nothing is executed). ``from dattri_cli import io`` names the
module ``dattri_cli.io``; ``from dattri_cli.io import save_scores`` names ``dattri_cli.io``.
A package's ``__init__`` is a module of its own (``dattri_cli.data``).
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import dattri_cli

PACKAGE = Path(dattri_cli.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> Dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, name: str, known: Set[str]) -> Set[str]:
    """The dattri_cli modules ``path`` imports anywhere in its body."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: Set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:  # ``dattri_cli.io.save_scores`` -> ``dattri_cli.io``
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("dattri_cli"):
                found.add(target)
    return found


def graph() -> Dict[str, Set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imported(path, name, known) - {"dattri_cli"} for name, path in mods.items()}


def find_cycle(edges: Dict[str, Set[str]]) -> List[str]:
    """One cycle as a list of modules (first == last), or [] when there is none."""
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(node: str) -> List[str]:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return []

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return []


def test_the_checker_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) == []


def test_the_graph_sees_lazy_imports():
    edges = graph()
    assert "dattri_cli.pipeline" in edges["dattri_cli.app"]  # imported inside a function
    assert "dattri_cli.builders" in edges["dattri_cli.groundtruth"]


def test_no_import_cycle_inside_the_package():
    cycle = find_cycle(graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)
