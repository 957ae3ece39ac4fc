"""The package's import graph has no cycle (lazy imports inside functions count too), and the policy layer is a
leaf: it imports nothing of the tiers, the data path or the cache."""

from __future__ import annotations

import ast
from pathlib import Path

import tiercache

ROOT = Path(tiercache.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each tiercache module and the tiercache modules it imports (a `from package import name` counts as an
    import of the submodule where `name` is one)."""
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                for alias in node.names:
                    sub = f"{source}.{alias.name}"
                    targets.add(sub if sub in modules else source)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_graph_covers_every_module() -> None:
    graph = import_graph()
    assert "tiercache.cache" in graph and "tiercache.tiers.nvme.layout" in graph and len(graph) > 30
    assert "tiercache.tiers.base" in graph["tiercache.tiers.hbm"]


def test_no_module_imports_itself_back() -> None:
    found = cycle(import_graph())
    assert found is None, "import cycle: " + " -> ".join(found or [])


def test_the_policy_layer_is_a_leaf() -> None:
    allowed = {"tiercache.errors", "tiercache.units", "tiercache.pathway"}
    for name, targets in import_graph().items():
        if name.startswith("tiercache.policy"):
            outside = {t for t in targets if not t.startswith("tiercache.policy")} - allowed
            assert not outside, f"{name} imports {sorted(outside)}"
