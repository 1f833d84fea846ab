"""DisTorch: run a diffusion model on a GPU that cannot hold it.

Imported as the library `distorch`, and loaded by ComfyUI as a custom-node folder (then it exports
NODE_CLASS_MAPPINGS). The node classes are only built when ComfyUI is importable.
"""
__version__ = "0.1.0"

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .runtime.api import Handle

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:  # ComfyUI present (looked up, not imported: only comfy_nodes imports ComfyUI): register the nodes
    import importlib.util
    _IN_COMFY = importlib.util.find_spec("comfy") is not None
except (ImportError, ValueError):
    _IN_COMFY = False

# `__package__` is empty when this file is imported as a plain module (pytest imports the repository
# root's __init__.py as `__init__`): no relative import is possible then, and no nodes are wanted.
if _IN_COMFY and __package__:
    from .comfy_nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS  # noqa: F811


def compile(model: "torch.nn.Module", *args: Any, **kwargs: Any) -> "Handle":  # noqa: A001 - mirrors torch.compile's name
    """Rewrite `model` in place to run under a Plan; see runtime.api.compile."""
    from .runtime.api import compile as _compile
    return _compile(model, *args, **kwargs)


__all__ = ["compile", "NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "__version__"]
