"""The import graph of vae/ and pipeline/: no circle (imports inside functions included), pipeline's
sub-packages in layers, and vae/ imports only torch, numpy and the standard library."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("vae", "pipeline")
# pipeline/ bottom up: a module imports from its own layer and those below it, never from above
LAYERS = (
    ("pipeline.errors",),
    ("pipeline.config", "pipeline.stores", "pipeline.params_doc"),
    ("pipeline.io", "pipeline.contract"),  # files and tables; the table contract
    ("pipeline.registry", "pipeline.stages", "pipeline.pyfunc"),  # the registry's gate runs the stages' steps
    ("pipeline.orchestration",),  # flows, schedule, versioning, progress
    ("pipeline.cli", "pipeline.__main__"),
)


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


def _packages(modules: dict[str, Path]) -> set[str]:
    return {name for name, path in modules.items() if path.name == "__init__.py"}


def _imports(name: str, path: Path, known: set[str], packages: set[str] | None = None) -> set[str]:
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
    packages = set(PACKAGES) | (packages or set())
    return {m for m in out if m in known and m != name and not (m in packages and name.startswith(m + "."))}


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


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, set(modules), _packages(modules)) for name, path in modules.items()}


def test_no_import_circle_anywhere():
    graph = _graph()
    assert graph["pipeline.contract.model"] and graph["vae.elbo"]  # the walk sees imports at all
    assert {"pipeline.stages.train", "pipeline.registry.gate", "pipeline.io.prefetch",
            "pipeline.orchestration.flows"} <= set(graph)  # and every sub-package
    cycle = _cycle(graph)
    assert cycle is None, " -> ".join(cycle or [])


def _layer(name: str) -> int:
    found = [i for i, layer in enumerate(LAYERS) for top in layer if name == top or name.startswith(top + ".")]
    assert found, f"{name} is in no layer of tests/test_imports.py LAYERS: place it there"
    return found[0]


def test_pipeline_imports_only_from_its_own_layer_and_below():
    graph = _graph()
    pipeline = [name for name in graph if name.startswith("pipeline.")]
    upward = [f"{name} imports {dep}" for name in pipeline for dep in sorted(graph[name])
              if dep.startswith("pipeline.") and _layer(dep) > _layer(name)]
    assert not upward, "; ".join(upward)


def test_pipelines_package_inits_import_nothing_of_their_own():
    """What lets the walk above leave out a sub-package's __init__, imported with each of its modules
    (vae/__init__ re-exports the library: no module of vae imports the package vae)."""
    modules = _modules()
    for package in sorted(p for p in _packages(modules) if p.startswith("pipeline")):
        own = {m for m in _imports(package, modules[package], set(modules)) if m.startswith(package + ".")}
        assert not own, f"{package} imports {own}"


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
