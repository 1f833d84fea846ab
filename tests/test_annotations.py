"""Every public function and method of the package is type-annotated, and the package ships py.typed.

Read from the source with ast (nothing is imported: comfy_nodes needs ComfyUI).  The modules checked are
those the wheel ships: every .py file of every package named in pyproject.toml's [tool.setuptools]
`packages` (formats/, compiler/, passes/, runtime/, comfy_nodes/, and the top-level modules: cli.py,
demo.py, errors.py, progress.py, ...); the package's own __init__.py (ComfyUI's entry point) is exempt.

Public: a module-level function whose name does not start with "_", and every method of a public class
(nested public classes too) whose name does not start with "_", plus __init__ and __call__; other dunder
methods are exempt, and so are functions nested inside functions.  Such a function needs a return
annotation and an annotation on every parameter (*args and **kwargs included), except the first
parameter of a method when it is named self or cls.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = "distorch"
CHECKED_DUNDERS = {"__init__", "__call__"}

# "path:qualname" entries exempt from the check (none: every public function is annotated); an entry
# that gets annotated fails test_allow_list_is_not_stale, so the set can only shrink.
ALLOWED: set[str] = set()
ALLOWED_FILES = {"passes/partition.py", "passes/budget.py"}


def _setuptools_table() -> dict:
    try:
        import tomllib                                  # Python 3.11+
    except ModuleNotFoundError:                         # pragma: no cover - Python 3.10
        import pytest
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def _package_dirs() -> list[Path]:
    """The directory of each package the wheel ships (pyproject: package-dir maps distorch to the root)."""
    out = []
    for name in _setuptools_table()["packages"]:
        parts = name.split(".")
        assert parts[0] == PKG, f"pyproject packages: {name!r} is not under {PKG}"
        out.append(ROOT.joinpath(*parts[1:]))
    return out


def _modules() -> list[Path]:
    files = []
    for d in _package_dirs():
        for path in sorted(d.glob("*.py")):
            if path == ROOT / "__init__.py":
                continue                                # the top __init__: exempt (ComfyUI's entry point)
            files.append(path)
    return files


def _missing(fn: ast.FunctionDef | ast.AsyncFunctionDef, method: bool) -> list[str]:
    """What `fn` lacks: parameter names (with * / ** for varargs) and 'return'."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    is_static = any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in fn.decorator_list)
    if method and not is_static and positional and positional[0].arg in ("self", "cls"):
        positional = positional[1:]
    out = [p.arg for p in [*positional, *a.kwonlyargs] if p.annotation is None]
    if a.vararg is not None and a.vararg.annotation is None:
        out.append("*" + a.vararg.arg)
    if a.kwarg is not None and a.kwarg.annotation is None:
        out.append("**" + a.kwarg.arg)
    if fn.returns is None:
        out.append("return")
    return out


def _is_public_method(name: str) -> bool:
    if name.startswith("__") and name.endswith("__"):
        return name in CHECKED_DUNDERS
    return not name.startswith("_")


def _statements(body: list[ast.stmt]):
    """Module- or class-level statements, looking inside if / try / with blocks (not into functions)."""
    for node in body:
        if isinstance(node, ast.If):
            yield from _statements(node.body)
            yield from _statements(node.orelse)
        elif isinstance(node, ast.Try):
            for part in (node.body, *(h.body for h in node.handlers), node.orelse, node.finalbody):
                yield from _statements(part)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            yield from _statements(node.body)
        else:
            yield node


def _public_functions(tree: ast.Module):
    """(qualified name, function node, is a method) for every public function and method of a module."""
    def in_class(cls: ast.ClassDef, prefix: str):
        for node in _statements(cls.body):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _is_public_method(node.name):
                yield f"{prefix}{node.name}", node, True
            elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                yield from in_class(node, f"{prefix}{node.name}.")

    for node in _statements(tree.body):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            yield node.name, node, False
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            yield from in_class(node, f"{node.name}.")


def _unannotated() -> dict[str, tuple[int, list[str]]]:
    """'relative/path.py:Qual.name' -> (line, what is missing), over every checked module."""
    out = {}
    for path in _modules():
        rel = path.relative_to(ROOT).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for qual, fn, method in _public_functions(tree):
            miss = _missing(fn, method)
            if miss:
                out[f"{rel}:{qual}"] = (fn.lineno, miss)
    return out


def test_the_modules_are_found():
    rels = {p.relative_to(ROOT).as_posix() for p in _modules()}
    for must in ("cli.py", "demo.py", "errors.py", "progress.py", "formats/gguf_reader.py", "compiler/plan.py",
                 "passes/expert_string.py", "runtime/apply.py", "comfy_nodes/patcher.py", "comfy_nodes/nodes.py"):
        assert must in rels, f"{must} is not among the checked modules"
    assert "__init__.py" not in rels
    # every directory of the repository holding package code is a package the wheel ships
    shipped = {d.resolve() for d in _package_dirs()}
    for path in ROOT.glob("*/*.py"):
        top = path.relative_to(ROOT).parts[0]
        if top in {"tests", "bench", "build", "dist", "example_workflows"} or top.startswith("."):
            continue
        assert path.parent.resolve() in shipped, f"{path.relative_to(ROOT)} is in no package of pyproject.toml"


def test_public_functions_are_annotated():
    found = _unannotated()
    bad = [f"{key.split(':')[0]}:{line} {key.split(':')[1]}: missing {', '.join(miss)}"
           for key, (line, miss) in sorted(found.items()) if key not in ALLOWED]
    assert not bad, (f"{len(bad)} public functions/methods without full type annotations "
                     "(annotate every parameter but self/cls, and the return):\n  " + "\n  ".join(bad))


def test_allow_list_is_only_for_the_two_integrator_files():
    assert all(k.split(":")[0] in ALLOWED_FILES for k in ALLOWED), sorted(ALLOWED)


def test_allow_list_is_not_stale():
    found = _unannotated()
    stale = sorted(k for k in ALLOWED if k not in found)
    assert not stale, f"annotated now, remove from ALLOWED in tests/test_annotations.py: {stale}"


def test_checker_catches_what_it_should():
    src = '''
def ok(a: int, *b: str, c: int = 1, **d: float) -> None: ...
def no_ret(a: int): ...
def no_arg(a, b: int) -> int: ...
def star(*a, **k) -> None: ...
def _private(a): ...
class Pub:
    def __init__(self, x): ...
    def __repr__(self): ...
    def __call__(self, y: int): ...
    @classmethod
    def INPUT_TYPES(cls): ...
    @staticmethod
    def st(self) -> None: ...
    def _hidden(self, z): ...
    def fine(self, z: int) -> int:
        def nested(q): ...
        return z
    class Inner:
        def m(self, w) -> None: ...
class _Private:
    def m(self, w): ...
if True:
    def in_if(a): ...
'''
    got = {q: _missing(fn, m) for q, fn, m in _public_functions(ast.parse(src))}
    got = {q: miss for q, miss in got.items() if miss}
    assert got == {
        "no_ret": ["return"],
        "no_arg": ["a"],
        "star": ["*a", "**k"],
        "Pub.__init__": ["x", "return"],
        "Pub.__call__": ["return"],
        "Pub.INPUT_TYPES": ["return"],
        "Pub.st": ["self"],
        "Pub.Inner.m": ["w"],
        "in_if": ["a", "return"],
    }


def test_py_typed_ships():
    assert (ROOT / "py.typed").is_file(), "py.typed is missing at the package root"
    data = _setuptools_table().get("package-data", {})
    assert "py.typed" in data.get(PKG, []), f"pyproject.toml [tool.setuptools] package-data: {data!r}"
