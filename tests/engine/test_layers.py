"""The house: graphpeft's import graph, read from the source, has no circle and points one way.

    cli ──▶ export ──▶ runtime ──▶ engine ◀── passes (the rules)

Every import counts, also one inside a function (a lazy import hides a circle, it does not remove it);
only imports under ``if TYPE_CHECKING:`` are left out. The package root (``graphpeft/__init__.py``) is
the public face and may import every layer; no module imports it back except the command line and
export, which use the public API as a user does.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[2]

# layer -> the layers it may import (its own included)
ALLOWED = {
    "engine": {"engine"},
    "passes": {"engine", "passes"},
    "runtime": {"engine", "runtime"},
    "export": {"engine", "runtime", "export", "root"},
    "cli": {"engine", "runtime", "export", "cli", "root"},
    "root": {"engine", "runtime", "passes", "root"},
}


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "passes":                       # installed as graphpeft.passes
        parts = ["graphpeft"] + parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [p for p in (REPO / "graphpeft").rglob("*.py") if "passes" not in p.relative_to(REPO).parts]
    files += list((REPO / "passes").glob("*.py"))
    return {_module_name(p): p for p in files}


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    hidden: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            hidden |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return hidden


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The graphpeft modules ``name`` imports: ``from a import b`` counts as a.b when that is a module."""
    tree = ast.parse(path.read_text())
    hidden = _type_checking_nodes(tree)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in hidden:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules and m != name}


def _layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    if module == "graphpeft.__main__":
        return "cli"
    if parts[1] in ("engine", "runtime", "cli", "export", "passes"):
        return parts[1]
    return "root"            # datasets: data files of the package


@pytest.fixture(scope="module")
def graph() -> nx.DiGraph:
    sources = _sources()
    g = nx.DiGraph()
    g.add_nodes_from(sources)
    for name, path in sources.items():
        g.add_edges_from((name, dep) for dep in _imports(name, path, set(sources)))
    return g


def test_the_graph_is_read(graph):
    """The reader sees the imports that exist (a reader that found none would pass every check below)."""
    assert ("graphpeft.runtime.model", "graphpeft.engine.rewriter") in graph.edges
    assert ("graphpeft.passes.lora", "graphpeft.engine.rule") in graph.edges
    assert len(graph.edges) > 100


def test_no_import_circle(graph):
    cycles = list(nx.simple_cycles(graph.subgraph(n for n in graph if n != "graphpeft")))
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c + [c[0]]) for c in cycles[:5])


def test_imports_point_down(graph):
    wrong = [f"{a} -> {b}" for a, b in graph.edges if _layer(b) not in ALLOWED[_layer(a)]]
    assert not wrong, "imports against the layering (cli -> export -> runtime -> engine <- passes):\n" + "\n".join(wrong)


def test_rules_do_not_import_each_other(graph):
    """A rule may use its own family's helper modules (lora -> lora_sites), never another method's rule."""
    def family(module: str) -> str:
        return module.rsplit(".", 1)[1].split("_")[0] if module.count(".") == 2 else ""

    wrong = [f"{a} -> {b}" for a, b in graph.edges
             if _layer(a) == _layer(b) == "passes" and "graphpeft.passes" not in (a, b) and family(a) != family(b)]
    assert not wrong, "rules importing other rules:\n" + "\n".join(wrong)


def test_rule_files_are_small():
    long = {p.name: n for p in (REPO / "passes").glob("*.py") if (n := len(p.read_text().splitlines())) > 300}
    assert not long, f"rule files over 300 lines: {long}"
