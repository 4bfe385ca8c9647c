"""The imports inside ``kithara_ops`` form no cycle, and the lower floors import no upper one.

Every import counts: at module level, inside functions and classes, and under
``TYPE_CHECKING``. An import inside a function is a dependency all the same (it only runs
later), so the modules form a tree of floors: ``tracking/``, ``optim/``, ``models/`` and
``data/`` never import the package root, ``cli/``, ``build`` or ``trainer``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

PACKAGE = "kithara_ops"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / PACKAGE


# --------------------------------------------------------------------------- helpers


def module_names(package_dir: Path = PACKAGE_DIR) -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(package_dir.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _all_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement of a module, wherever it stands."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def imported_modules(module: str, is_package: bool, source: str, known: set[str]) -> set[str]:
    """The package's own modules that ``module`` imports, anywhere in its source."""
    targets = set()
    for node in _all_imports(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
            continue
        base = node.module or ""
        if node.level:
            # A relative import counts from the module's package (itself for an __init__).
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, base] if base else anchor)
        for alias in node.names:
            # ``from pkg import x`` imports the module pkg.x if there is one, else a name of pkg.
            submodule = f"{base}.{alias.name}"
            targets.add(submodule if submodule in known else base)
    return {t for t in targets if t in known}


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    known = set(modules)
    return {
        name: imported_modules(name, path.name == "__init__.py", path.read_text(), known)
        for name, path in modules.items()
    }


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or ``None`` if the graph has none."""
    done: set[str] = set()
    for root in sorted(graph):
        if root in done:
            continue
        path, on_path = [root], {root}
        stack = [iter(sorted(graph.get(root, ())))]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                stack.pop()
                done.add(path[-1])
                on_path.discard(path.pop())
            elif nxt in on_path:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


# --------------------------------------------------------------------------- the package


def test_package_imports_have_no_cycle():
    graph = import_graph(module_names())
    # The walk must actually see the package's imports, or "no cycle" would prove nothing.
    assert "kithara_ops.trainer" in graph["kithara_ops.build"]
    assert "kithara_ops.data" in graph["kithara_ops.build"]  # from kithara_ops import data
    assert "kithara_ops.optim.adapter" in graph["kithara_ops.optim"]
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# --------------------------------------------------------------------------- the checker


def test_find_cycle_reports_a_cycle():
    graph = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set()}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    # A diamond shares a module without looping back.
    assert find_cycle({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}) is None


def test_imported_modules_counts_every_import():
    known = {"pkg", "pkg.a", "pkg.b", "pkg.c", "pkg.d", "pkg.e", "pkg.g", "pkg.sub", "pkg.sub.f"}
    source = """
from typing import TYPE_CHECKING
import os
from pkg import a, helper
if TYPE_CHECKING:
    from pkg import b
else:
    from pkg import c
try:
    import pkg.d
except ImportError:
    pass
from .sub import f
from . import e
def later():
    import pkg.g
class Later:
    from pkg import b
"""
    assert imported_modules("pkg.x", False, source, known) == {
        "pkg.a",
        "pkg",  # helper is a name in pkg's __init__, not a module
        "pkg.b",
        "pkg.c",
        "pkg.d",
        "pkg.sub.f",
        "pkg.e",
        "pkg.g",
    }
    # In a package's __init__, "." is the package itself.
    assert imported_modules("pkg.sub", True, "from . import f", known) == {"pkg.sub.f"}


FLOORS = ("kithara_ops.tracking", "kithara_ops.optim", "kithara_ops.models", "kithara_ops.data")
ABOVE = ("kithara_ops", "kithara_ops.build", "kithara_ops.trainer")


def test_the_lower_floors_import_nothing_above_them():
    graph = import_graph(module_names())
    found = {
        (module, target)
        for module, targets in graph.items()
        if module.startswith(FLOORS)
        for target in targets
        if target in ABOVE or target == "kithara_ops.cli" or target.startswith("kithara_ops.cli.")
    }
    assert not found, sorted(found)
