"""The import graph of vae/ and pipeline/: no circle (imports inside functions included), and vae/
imports only torch, numpy and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vae", "pipeline")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Project modules NAME imports anywhere in its file (TYPE_CHECKING blocks aside)."""
    tree = ast.parse(path.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    out: set[str] = set()
    for node in ast.walk(tree):
        if _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}  # from pipeline import embed
    # a package's __init__ is imported with any of its modules, but imports none of them by that
    return {m for m in out if m in known and m != name and not (m in PACKAGES and name.startswith(m + "."))}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_anywhere():
    modules = _modules()
    graph = {name: _imports(name, path, set(modules)) for name, path in modules.items()}
    assert graph["pipeline.contract.model"] and graph["vae.elbo"]  # the walk sees imports at all
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def test_vae_imports_only_torch_numpy_and_the_standard_library():
    allowed = {"torch", "numpy", "vae", "__future__"} | set(sys.stdlib_module_names)
    for name, path in _modules().items():
        if not name.startswith("vae"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            roots = ([a.name.split(".")[0] for a in node.names] if isinstance(node, ast.Import) else
                     [node.module.split(".")[0]] if isinstance(node, ast.ImportFrom) and node.module else [])
            assert set(roots) <= allowed, f"{path.relative_to(ROOT)} imports {roots}"
