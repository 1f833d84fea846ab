"""compiler: turn a module or a weights file into a ModuleGraph (trace, files, shapes), plus the
graph / plan / inventory types. Names are imported lazily, so planning from a file does not import torch.
The trace function lives in its submodule (same name): `from distorch.compiler.trace import trace`."""
from .graph import ROOT, ModuleGraph, Unit, register_nbytes, stored_nbytes

_LAZY = {
    "TensorInfo": ("files", "TensorInfo"),
    "read_header": ("files", "read_header"),
    "graph_from_tensors": ("files", "graph_from_tensors"),
    "graph_from_file": ("files", "graph_from_file"),
    "BUILTINS": ("shapes", "BUILTINS"),
    "builtin_infos": ("shapes", "builtin_infos"),
}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ROOT", "ModuleGraph", "Unit", "register_nbytes", "stored_nbytes", *_LAZY]
