"""The package's imports, read with `ast`: no import circles, and no import from a lower layer
to a higher one. The layer order is the one docs/design.md draws ("Layers"); every import
counts, at module level, inside a function or under `TYPE_CHECKING`, since each is a
dependency a reader has to follow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "sortedrl"

# Each part of the package and its layer: a module imports only from its own part or from
# parts of a lower layer. Same-layer parts are independent of each other.
LAYERS: dict[str, int] = {
    "errors": 0,
    "io": 0,
    "trl_names": 0,
    "scheduling": 1,
    "workload": 1,
    "tasks": 1,
    "models": 1,
    "training": 2,
    "engines": 2,
    "cluster": 3,
    "config": 4,
    "commands": 5,
    "sim": 5,
    "cli": 6,
}

# The scheduling core stays pure: no torch, no Ray, no file or network I/O.
CORE_FORBIDDEN = ("torch", "ray", "transformers", "vllm", "numpy", "os", "pathlib", "io", "shutil")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module this file imports (absolute names), wherever the import statement is."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, node.module] if node.module else base)
            else:
                mod = node.module or ""
            found.add(mod)
            # `from sortedrl.tasks import math` imports the submodule sortedrl.tasks.math
            found.update(f"{mod}.{a.name}" for a in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        graph[name] = {m for m in _imports(path) if m in files and m != name}
    return graph


def _part(module: str) -> str:
    return module.split(".")[1] if "." in module else module


def test_every_part_of_the_package_has_a_layer():
    parts = {_part(m) for m in _graph() if m != "sortedrl"}
    assert parts <= set(LAYERS), f"no layer declared for {sorted(parts - set(LAYERS))}"


def test_no_import_runs_from_a_lower_layer_to_a_higher_one():
    wrong = []
    for module, targets in sorted(_graph().items()):
        if module == "sortedrl":
            continue
        for target in sorted(targets):
            if target == "sortedrl":
                continue
            a, b = _part(module), _part(target)
            if a != b and LAYERS[b] >= LAYERS[a]:
                wrong.append(f"{module} (layer {LAYERS[a]}) imports {target} (layer {LAYERS[b]})")
    assert not wrong, "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_there_are_no_import_circles():
    # A package's __init__ importing its own modules is how a package presents its names; a
    # module importing its package's __init__ back would close a circle and is counted.
    assert not _cycles(_graph())


def test_the_cycle_finder_finds_a_circle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


@pytest.mark.parametrize(
    "path", sorted((PACKAGE / "scheduling").glob("*.py")), ids=lambda p: p.name
)
def test_the_scheduling_core_stays_pure(path):
    heavy = {m for m in _imports(path) if m.split(".")[0] in CORE_FORBIDDEN}
    assert not heavy, f"{path.name} imports {sorted(heavy)}"
