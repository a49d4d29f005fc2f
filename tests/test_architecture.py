"""The layout's rules (docs/architecture.md), checked on the code itself: every import points down and no
module imports itself back, lazily or not; only the head rule decides what an output means."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("cxrscale", "preprocessing", "distributed", "optimize", "launch", "benchmarks")
# who may import whom (docs/architecture.md, "Import rules"); optimize.tune is a launcher
ALLOWED = {"cxrscale": set(), "preprocessing": {"cxrscale"}, "distributed": {"cxrscale", "preprocessing"},
           "optimize": {"cxrscale", "preprocessing", "distributed"},
           "launch": {"cxrscale", "preprocessing", "distributed"},
           "benchmarks": {"cxrscale", "preprocessing", "distributed", "optimize", "launch"}}


def toolkit_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in (REPO / package).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """Every toolkit module each module imports, wherever the import statement stands (lazy ones too)."""
    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {owner(alias.name) for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + [base]).strip(".")
                found |= {owner(f"{base}.{alias.name}") for alias in node.names}
        graph[name] = {m for m in found if m and m != name}
    return graph


def test_no_module_imports_itself_back():
    graph = imports(toolkit_modules())
    done, path, cycles = set(), [], []

    def visit(node: str) -> None:
        path.append(node)
        for nxt in sorted(graph[node]):
            if nxt in path:
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in done:
                visit(nxt)
        path.pop()
        done.add(node)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles[:5])


def test_every_import_points_down():
    graph = imports(toolkit_modules())
    upward = sorted(f"{a} -> {b}" for a, targets in graph.items() for b in targets
                    if b.split(".")[0] != a.split(".")[0] and b.split(".")[0] not in ALLOWED[a.split(".")[0]]
                    and not a.startswith("optimize.tune"))
    assert not upward, "imports against the layering: " + ", ".join(upward)
    # the subpackages of distributed: model at the bottom; training and evaluation never import each other
    for a, targets in graph.items():
        for b in targets:
            if a.startswith("distributed.model"):
                assert not b.startswith(("distributed.training", "distributed.evaluation")) and \
                    b not in ("distributed.train", "distributed.evaluate", "distributed.predict",
                              "distributed.ensemble"), f"{a} -> {b}"
            if a.startswith("distributed.training"):
                assert not b.startswith("distributed.evaluation"), f"{a} -> {b}"


def test_only_the_head_rule_reads_a_models_output_width():
    readers = sorted(str(path.relative_to(REPO)) for name, path in toolkit_modules().items()
                     if "output_shape[-1]" in path.read_text() and name != "distributed.model.heads")
    assert not readers, f"these decide a head from output_shape[-1], not from distributed.model.heads: {readers}"
