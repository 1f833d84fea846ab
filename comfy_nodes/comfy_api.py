"""The one module of DisTorch that imports ComfyUI.

Every other module of comfy_nodes takes the ComfyUI modules it needs from here, at its top:

    from .comfy_api import comfy, folder_paths, mm, mp

Nothing outside comfy_nodes/ imports ComfyUI (`comfy`, `nodes`, `folder_paths`, ...). Nothing here
replaces a ComfyUI function: DisTorch integrates through ComfyUI's own extension points.

When ComfyUI is imported
------------------------
Importing this module imports ComfyUI, so it is only imported where ComfyUI runs: by ComfyUI loading
this pack (the package's __init__ builds the nodes only when ComfyUI can be imported), by the bench
scripts and by tests that boot ComfyUI first. The declarative modules (nodes.py, registry.py, the
package's __init__.py) never import it at their top: they reach the modules that do the work
(devices, entry, gguf_loaders, and this one) through `registry.backend()`, on first use, so that the
package and its registration tests import without ComfyUI (the tests hand in a fake backend). That is
the only lazy access to ComfyUI left.

Probed once here
----------------
VERSION          ComfyUI's version string (comfyui_version), "unknown" where it has none.
path()           "classic" (ModelPatcher, ComfyUI 0.3.x) or "dynamic" (ModelPatcherDynamic /
                 comfy-aimdo, 2026 releases): detected on first use (ComfyUI enables aimdo at start-up,
                 before it loads custom nodes) and logged once with the version.

ComfyUI's objects
-----------------
core_node_class(name) / register_nodes(classes, names)
                 ComfyUI's node registry (its top-level nodes.py), read and written.
patcher_slot(obj) / get_patcher(obj)
                 where a MODEL / CLIP / VAE / CONTROL_NET / CLIP_VISION keeps its ModelPatcher.
unload_models(match, first_only=False)
                 unload entries of ComfyUI's loaded-model list, as its memory manager does.

Progress
--------
ComfyProgressBar is installed, when this module is imported, as the reporter of distorch.progress: the
library's long stages (file loads, weights into their homes, compiles, link probes) show as the running
node's bar in the UI (comfy.utils.ProgressBar), and each ends with one INFO line in ComfyUI's log.
"""
from __future__ import annotations

import logging
from typing import Callable

import comfy.float  # noqa: F401  (comfy.float.stochastic_rounding: re-patching)
import comfy.lora  # noqa: F401  (comfy.lora.calculate_weight: weight patches)
import comfy.model_management as mm
import comfy.model_patcher as mp
import comfy.ops  # noqa: F401  (comfy.ops.manual_cast: the GGUF operations' base)
import comfy.sd  # noqa: F401  (comfy.sd loader entry points: GGUF unet / text encoders)
import comfy.utils  # noqa: F401
import folder_paths  # ComfyUI's model-file registry
import nodes as _registry  # ComfyUI's top-level nodes.py: NODE_CLASS_MAPPINGS
from comfy.patcher_extension import WrappersMP

from .. import progress as _progress
from ..errors import DisTorchError

try:
    import comfyui_version
    VERSION = str(comfyui_version.__version__)
except Exception:  # ComfyUI before comfyui_version.py existed
    VERSION = "unknown"

try:  # 2026 releases: comfy-aimdo pages weights through ModelPatcherDynamic
    import comfy.memory_management as _memory
except ImportError:
    _memory = None

__all__ = ["comfy", "folder_paths", "mm", "mp", "WrappersMP", "VERSION", "path", "core_node_class",
           "register_nodes", "registered_nodes", "patcher_slot", "get_patcher", "unload_models", "ComfyProgressBar"]

log = logging.getLogger("distorch.comfy.api")

_path: str | None = None  # path(), detected on first use


def path() -> str:
    """'dynamic' when this ComfyUI pages weights with ModelPatcherDynamic (aimdo enabled), else 'classic'."""
    global _path
    if _path is None:
        dyn = getattr(mp, "ModelPatcherDynamic", None)
        if dyn is None:
            _path = "classic"
        else:
            enabled = getattr(_memory, "aimdo_enabled", False) is True
            core = getattr(mp, "CoreModelPatcher", None)
            _path = "dynamic" if (enabled or (core is not None and core is dyn)) else "classic"
        log.info("DisTorch: ComfyUI %s, %s ModelPatcher path%s", VERSION, _path,
                 " (ModelPatcherDynamic available)" if dyn is not None and _path == "classic" else "")
    return _path


# ------------------------------------------------------------------------------------------------
# the node registry
# ------------------------------------------------------------------------------------------------
def core_node_class(name: str) -> type | None:
    """ComfyUI's node class registered as `name` (nodes.NODE_CLASS_MAPPINGS), or None."""
    return getattr(_registry, "NODE_CLASS_MAPPINGS", {}).get(name)


def registered_nodes() -> dict:
    """ComfyUI's node registry as it is now (nodes.NODE_CLASS_MAPPINGS: name -> class, every pack's)."""
    return getattr(_registry, "NODE_CLASS_MAPPINGS", {})


def register_nodes(classes: dict, display_names: dict) -> None:
    """Add node classes to ComfyUI's registry after start-up (wrappers of packs that loaded after ours):
    the same public dicts ComfyUI fills from a pack's NODE_CLASS_MAPPINGS."""
    _registry.NODE_CLASS_MAPPINGS.update(classes)
    _registry.NODE_DISPLAY_NAME_MAPPINGS.update(display_names)


# ------------------------------------------------------------------------------------------------
# patchers inside the objects ComfyUI passes around
# ------------------------------------------------------------------------------------------------
def _is_patcher(x) -> bool:
    return isinstance(x, mp.ModelPatcher)


def patcher_slot(obj: object) -> tuple[object | None, str | None]:
    """(holder, attribute) where obj keeps its ModelPatcher; holder None when obj IS the patcher."""
    if _is_patcher(obj):
        return None, None
    for attr in ("patcher", "control_model_wrapped"):
        p = getattr(obj, attr, None)
        if p is not None and _is_patcher(p):
            return obj, attr
    raise DisTorchError(f"cannot find a ComfyUI model inside a {type(obj).__name__}: expected a MODEL, CLIP, "
                        "VAE, CONTROL_NET or CLIP_VISION output of a loader")


def get_patcher(obj: object) -> object:
    holder, attr = patcher_slot(obj)
    return obj if holder is None else getattr(holder, attr)


def unload_models(match: "Callable[[object], bool]", first_only: bool = False) -> int:
    """Unload the entries of ComfyUI's loaded-model list for which match(LoadedModel) is true, and drop
    them from the list (what its memory manager does); returns how many."""
    n = 0
    for lm in list(mm.current_loaded_models):
        if match(lm):
            lm.model_unload()
            mm.current_loaded_models.remove(lm)
            n += 1
            if first_only:
                break
    return n


# ------------------------------------------------------------------------------------------------
# progress: the library's stages on ComfyUI's progress bar
# ------------------------------------------------------------------------------------------------
class ComfyProgressBar:
    """A distorch.progress bar over comfy.utils.ProgressBar (bytes counted in MiB for the UI).

    ComfyUI's bar hook raises InterruptProcessingException when the user cancels.  A stage is not cut
    in half (the runtime would be left half moved): the cancel is kept, and re-armed when the stage
    closes, so ComfyUI's next check (the sampler's next step) stops the prompt."""

    def __init__(self, label: str, total: int, unit: str) -> None:
        self.scale = 2**20 if unit == "B" else 1
        self.total = max(1, -(-int(total) // self.scale))
        self.bar = comfy.utils.ProgressBar(self.total)
        self.interrupted = False

    def _set(self, value: int) -> None:
        try:
            self.bar.update_absolute(min(value, self.total), self.total)
        except mm.InterruptProcessingException:
            self.interrupted = True

    def update(self, done: int) -> None:
        self._set(int(done) // self.scale)

    def close(self) -> None:
        self._set(self.total)
        if self.interrupted:
            mm.interrupt_current_processing(True)


_progress.set_reporter(ComfyProgressBar)
