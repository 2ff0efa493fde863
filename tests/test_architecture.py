"""The layers of the package, as docs/architecture.md draws them: imports only ever run downwards.

Every ``import`` in ``mmpeft/`` counts, the ones inside functions too (a late import is still a
dependency; it only hides a circle from Python). The checks fail naming the module and the import.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmpeft"

# Lower layers first; a module may import its own layer and the ones before it, never a later one.
LAYERS: list[tuple[str, list[str]]] = [
    # `mmpeft` itself is its __init__ (the version), not every module under it.
    (
        "base",
        [
            "mmpeft",
            "mmpeft.errors",
            "mmpeft.files",
            "mmpeft.flags",
            "mmpeft.compat",
            "mmpeft.registry",
            "mmpeft.packing",
            "mmpeft.objective",
        ],
    ),
    ("adapters", ["mmpeft.adapters"]),
    ("models", ["mmpeft.models", "mmpeft.speed", "mmpeft.memory", "mmpeft.activations", "mmpeft.planner"]),
    ("evaluation", ["mmpeft.metrics", "mmpeft.generation", "mmpeft.plots", "mmpeft.report"]),
    ("data", ["mmpeft.data"]),
    ("training", ["mmpeft.checkpoint", "mmpeft.saving", "mmpeft.module", "mmpeft.monitor"]),
    ("tools", ["mmpeft.merge", "mmpeft.export", "mmpeft.estimate", "mmpeft.cli", "mmpeft.__main__"]),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in the file, ``TYPE_CHECKING`` blocks left out (types only)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from mmpeft import registry` imports the module mmpeft.registry; names that are not
            # modules are cut back to their module where the import is resolved.
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return found


def layer_of(module: str) -> int | None:
    best = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or (prefix != "mmpeft" and module.startswith(prefix + ".")):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    return None if best is None else best[0]


FILES = sorted(PACKAGE.rglob("*.py"))
MODULES = {module_name(p) for p in FILES}


def resolve(target: str) -> str:
    """The module an imported name lives in: ``mmpeft.data.encode.ChatEncoder`` -> ``mmpeft.data.encode``."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target


def test_every_module_has_a_layer():
    missing = [module_name(p) for p in FILES if layer_of(module_name(p)) is None]
    assert not missing, (
        f"modules in no layer of tests/test_architecture.py (add them, and to docs/architecture.md): {missing}"
    )


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_run_downwards(path: Path):
    name = module_name(path)
    own = layer_of(name)
    upward = []
    for line, target in imports_of(path):
        if target.split(".")[0] in ("data_recipes", "benchmarks", "tests", "mmpeft_dora", "mmpeft_masa"):
            upward.append(f"line {line}: {target} (a user of the library)")
            continue
        if not target.startswith("mmpeft"):
            continue
        target = resolve(target)
        layer = layer_of(target)
        if layer is not None and own is not None and layer > own:
            upward.append(f"line {line}: {target} ({LAYERS[layer][0]} layer, above {LAYERS[own][0]})")
    assert not upward, f"{name} imports upwards: " + "; ".join(upward)


def test_no_import_circles_between_modules():
    """Late imports included: a circle is a circle even when Python does not trip on it."""
    names = {module_name(p): p for p in FILES}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        targets = set()
        for _, target in imports_of(path):
            # `from mmpeft.data import x` depends on the package's __init__; a submodule import on the submodule.
            target = resolve(target)
            if target and target != name and not name.startswith(target + "."):
                targets.add(target)
        graph[name] = targets
    circles = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"
