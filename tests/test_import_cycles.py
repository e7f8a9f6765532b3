"""No import circle among the project's modules, counting imports inside functions (docs/design.md,
Layers): import-linter's layers allow a circle within one layer (``methods.structures`` importing
back the methods that import it, as it once did), so this follows every import statement itself."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("benchmark", "methods")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> nx.DiGraph:
    """Module -> each project module it imports anywhere in its text (a package's own ``__init__``
    that Python runs first is not counted: it is not what the module asked for)."""
    files = {_module_name(p): p for package in PACKAGES for p in (ROOT / package).rglob("*.py")}
    graph = nx.DiGraph()
    for module, path in files.items():
        graph.add_node(module)
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != module:
                    graph.add_edge(module, target)
    return graph


#: Circles allowed to stay: none (the last ones, page <-> report and runner <-> slurm, went with the
#: commands' move to cli/ and the pools' split out of the runner).
KNOWN_CIRCLES: set[frozenset] = set()


def test_no_module_imports_itself_back_through_others():
    graph = import_graph()
    assert "methods.structures" in graph and "benchmark.core.method" in graph
    circles = [cycle for cycle in nx.simple_cycles(graph) if frozenset(cycle) not in KNOWN_CIRCLES]
    assert not circles, "import circles: " + "; ".join(sorted(" -> ".join(c + [c[0]]) for c in circles))


def test_structures_imports_no_method_module():
    assert not [target for target in import_graph().successors("methods.structures") if target.startswith("methods")]
