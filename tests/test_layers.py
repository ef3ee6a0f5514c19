"""The package's layers, enforced: a module imports only from its own layer or lower ones, and no
modules import each other in a loop.

The order, lowest first, is ``LAYERS`` below (docs/architecture.md draws it). Every import counts, also
the ones inside functions (kept lazy for start-up time, they are still dependencies) and module paths
written as strings (lazy registry entries, ``importlib.import_module``), so a lazy import cannot hide an
upward arrow. Not counted: imports under ``if TYPE_CHECKING:`` (type hints only, never run), and a string
naming an entry point (``r1_mm.cli``, ``r1_mm.train``): that starts a new process of the command line
(``python -m r1_mm.cli serve rollout``), it imports nothing. ``ALLOWED_UPWARD`` lists the exceptions the
layout accepts, each with its reason."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "r1_mm"

LAYERS = ["core", "config", "data", "models", "rewards", "tools", "rollout", "trainers", "run", "jobs", "testing"]
TOP = {"r1_mm", "r1_mm.cli", "r1_mm.train"}  # the faces: the Python API, the command line, -m r1_mm.train

ALLOWED_UPWARD: dict[tuple[str, str], str] = {
    ("r1_mm.trainers.base", "r1_mm.run.context"):
        "the Python API builds a trainer from a recipe alone (GRPOTrainer(recipe).train()), so the trainer "
        "opens its own run context; everything else of run/ reaches the trainers through that one object",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The r1_mm module a dotted name refers to (a module, or a name defined in one)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every r1_mm module ``module`` imports, at any depth of its code, or names as a string."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in _walk_runtime(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("r1_mm."):
            names = [node.value.split(":")[0]] if " " not in node.value else []
            names = [n for n in names if n not in TOP]  # a process started with -m: no import
        for name in names:
            target = resolve(name, modules) if name.startswith("r1_mm") else None
            if target and target != module:
                found.add(target)
    return found


def _walk_runtime(tree: ast.AST):
    """Every node of ``tree`` except the bodies of ``if TYPE_CHECKING:`` blocks."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                todo.extend(child.orelse)
                continue
            todo.append(child)


def layer_of(module: str) -> int:
    if module in TOP:
        return len(LAYERS)
    part = module.split(".")[1]
    if part not in LAYERS:
        raise AssertionError(f"{module} lies in no layer: put it in one of {LAYERS} (or make it a face: {TOP})")
    return LAYERS.index(part)


def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def upward_arrows(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    return sorted((a, b) for a, targets in edges.items() for b in targets
                  if layer_of(b) > layer_of(a) and not b.startswith(a + ".") and a != "r1_mm")


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (a package's ``__init__`` handing on
    its submodules' names is not a loop with them)."""
    edges = {a: {b for b in bs if not a.startswith(b + ".") and not b.startswith(a + ".")} for a, bs in edges.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_every_module_has_a_layer():
    for module in all_modules():
        layer_of(module)


def test_imports_point_downward_only():
    found = [arrow for arrow in upward_arrows(graph()) if arrow not in ALLOWED_UPWARD]
    assert not found, "imports that point up a layer (" + " < ".join(LAYERS) + "):\n" + "\n".join(
        f"  {a} -> {b}" for a, b in found)


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The premise: a lower layer importing a higher one is found, also when the import is lazy or a
    module path in a string."""
    modules = {"r1_mm.core.a": tmp_path / "a.py", "r1_mm.jobs.train": tmp_path / "t.py",
               "r1_mm.run.folder": tmp_path / "f.py"}
    (tmp_path / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import r1_mm.run.folder\n"
                                   "def f():\n    from r1_mm.jobs.train import main\n")
    (tmp_path / "f.py").write_text("LAZY = {'x': 'r1_mm.jobs.train', 'y': 'r1_mm.cli'}\n")
    (tmp_path / "t.py").write_text("from r1_mm.run import folder\n")
    edges = {m: imports_of(m, p, modules) for m, p in modules.items()}
    assert upward_arrows(edges) == [("r1_mm.core.a", "r1_mm.jobs.train"), ("r1_mm.run.folder", "r1_mm.jobs.train")]
    assert cycles(edges) == [["r1_mm.jobs.train", "r1_mm.run.folder"]]


@pytest.mark.parametrize("pair", sorted(ALLOWED_UPWARD))
def test_each_allowed_upward_arrow_still_exists(pair):
    """An exception that the code no longer needs is removed from the list, so the list stays honest."""
    assert pair[1] in graph()[pair[0]]
