"""The package's layers, read from its source with ast (nothing is imported):

    errors, progress -> formats -> compiler -> passes -> runtime -> api / cli / demo / comfy_nodes

A module imports only from its own layer or the ones below (imports inside functions count too: a
lazy import still ties the layers together).  No import cycles between modules.  Only the package's
own __init__.py imports comfy_nodes (ComfyUI's entry point), and only comfy_nodes imports ComfyUI
(`comfy`, `comfy_extras`, `nodes`, `folder_paths`).
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "distorch"                         # the repository root is the package (pyproject: package-dir)
SKIP_DIRS = {"tests", "bench", "example_workflows", "build", "dist"}
LAYERS = {"errors": 0, "progress": 0, "formats": 1, "compiler": 2, "passes": 3, "runtime": 4,
          "api": 5, "cli": 5, "demo": 5, "comfy_nodes": 5, "__main__": 5}
TOP = 6                                  # the package's __init__.py: ComfyUI's entry point and the library face
COMFYUI = {"comfy", "comfy_extras", "nodes", "folder_paths"}


def _modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        top = rel.parts[0]
        if top in SKIP_DIRS or top.startswith(".") or top.endswith(".egg-info"):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join([PKG, *parts])] = path
    return out


MODULES = _modules()


def _layer(mod: str) -> int:
    parts = mod.split(".")
    return LAYERS.get(parts[1], TOP) if len(parts) > 1 else TOP


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under `if TYPE_CHECKING:` (they never run: annotations only)."""
    out: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                out.update(id(n) for n in ast.walk(sub))
    return out


def _imports(mod: str, run_time_only: bool = False) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement of `mod`, inside functions too; relative imports
    are resolved, and `from X import name` names the submodule X.name when that is a module here.
    run_time_only: leave out the imports under `if TYPE_CHECKING:`."""
    path = MODULES[mod]
    tree = ast.parse(path.read_text(), filename=str(path))
    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    skip = _type_checking_only(tree) if run_time_only else set()
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                target = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub if sub in MODULES else target, node.lineno))
    return out


def _edges(run_time_only: bool = False) -> dict[str, list[tuple[str, int]]]:
    return {m: [(t, ln) for t, ln in _imports(m, run_time_only) if t in MODULES and t != m] for m in MODULES}


def _where(mod: str, line: int) -> str:
    return f"{MODULES[mod].relative_to(ROOT)}:{line}"


def test_the_package_is_found():
    for m in ("distorch.errors", "distorch.compiler.cost", "distorch.passes.partition", "distorch.runtime.apply"):
        assert m in MODULES


def test_imports_go_down_the_layers():
    bad = [f"{_where(m, line)}: {m} (layer {_layer(m)}) imports {t} (layer {_layer(t)})"
           for m, targets in _edges().items() for t, line in targets if _layer(t) > _layer(m)]
    assert not bad, "imports that go up a layer:\n  " + "\n  ".join(bad)


def test_no_import_cycles():
    # imports that run; an annotation-only import under `if TYPE_CHECKING:` (e.g. a runtime part naming the
    # Runtime that holds it) still has to go down the layers (test above) but cannot form a cycle
    edges = {m: sorted({t for t, _ in ts}) for m, ts in _edges(run_time_only=True).items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v):                       # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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
                cycles.append(sorted(comp))

    for m in sorted(edges):
        if m not in index:
            visit(m)
    assert not cycles, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in cycles)


def test_only_comfy_nodes_touches_comfyui_and_only_the_entry_point_imports_comfy_nodes():
    bad = []
    for m in MODULES:
        inside = m == f"{PKG}.comfy_nodes" or m.startswith(f"{PKG}.comfy_nodes.")
        for t, line in _imports(m):
            if t.split(".")[0] in COMFYUI and not inside:
                bad.append(f"{_where(m, line)}: {m} imports ComfyUI's {t}")
            if (t == f"{PKG}.comfy_nodes" or t.startswith(f"{PKG}.comfy_nodes.")) and not inside and m != PKG:
                bad.append(f"{_where(m, line)}: {m} imports {t}")
    assert not bad, "ComfyUI boundary crossed:\n  " + "\n  ".join(bad)
