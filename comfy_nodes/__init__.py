"""ComfyUI face of DisTorch: the node classes users' workflows name (see nodes.py).

Built when ComfyUI loads this folder from custom_nodes/. Wrappers of other packs' nodes need those
packs loaded first, and ComfyUI loads custom-node folders in directory order; so what exists now is
registered at once, and the rest when ComfyUI's node-loading task finishes (see _register_late).

Modules, by job (comfy_api.py is the only one that imports ComfyUI):
    nodes.py, registry.py   the node classes, declarative; they call the others through registry.backend()
    comfy_api.py            ComfyUI's modules, version and ModelPatcher path, node registry, patcher lookup
    devices.py              device lists and parsing, loading a core loader's outputs onto a device
    state.py                the compiled state of a model shared by its clones, planning, allocation table
    patcher.py              the DisTorch ModelPatcher mixin (load / unload / LoRA re-patching), sampling wrapper
    entry.py                distorch(), release(), eject(), state_of(): what the DisTorch2 nodes call
    gguf_ops.py             GGUF layers (over the library's GGUF ops), LoRA patches of GGUF weights
    gguf_loaders.py         .gguf model files, GGUF unet / text encoder loading through ComfyUI's loaders
"""
import importlib.util
import logging

from . import nodes as _nodes
from . import registry as _registry

log = logging.getLogger("distorch.comfy")

# Without ComfyUI (the node tests, which build with a fake backend) nothing is built at import.
try:
    _IN_COMFY = importlib.util.find_spec("comfy") is not None
except (ImportError, ValueError):
    _IN_COMFY = False
NODE_CLASS_MAPPINGS: dict = _nodes.build() if _IN_COMFY else {}
NODE_DISPLAY_NAME_MAPPINGS: dict = _nodes.display_names(NODE_CLASS_MAPPINGS)


def _pack_of(cls) -> str:
    """The custom-node pack a registered node class comes from (ComfyUI sets RELATIVE_PYTHON_MODULE to
    'custom_nodes.<folder>' when it loads a pack), else its module."""
    mod = str(getattr(cls, "RELATIVE_PYTHON_MODULE", None) or getattr(cls, "__module__", None) or "?")
    return mod.split(".", 2)[1] if mod.startswith("custom_nodes.") else mod


def _registered() -> dict:
    """ComfyUI's node registry (name -> class) through the backend; {} where the backend has none."""
    fn = getattr(_registry.backend(), "registered_nodes", None)
    return dict(fn()) if fn is not None else {}


def check_name_owners(registered: dict | None = None) -> dict:
    """After every pack has loaded: which of DisTorch's node names another pack holds in ComfyUI's registry.

    ComfyUI loads custom-node folders one after the other and the pack loaded last owns a node name both
    define (ComfyUI-MultiGPU defines the same names as DisTorch).  Nothing is changed here: one log line
    says which pack owns the shared names, so a workflow runs one pack's nodes consistently.  Returns
    {name: owning pack} for the names DisTorch does not own."""
    reg = _registered() if registered is None else registered
    ours = set(map(id, NODE_CLASS_MAPPINGS.values()))
    taken = {n: _pack_of(reg[n]) for n, cls in NODE_CLASS_MAPPINGS.items()
             if n in reg and reg[n] is not cls and id(reg[n]) not in ours}
    if taken:
        packs = ", ".join(sorted(set(taken.values())))
        shown = ", ".join(sorted(taken)[:4]) + (", ..." if len(taken) > 4 else "")
        log.warning("DisTorch: %s is installed too and owns %d node name(s) both packs define (%s): ComfyUI "
                    "loaded it after DisTorch, so workflows naming them run %s's nodes; DisTorch's other "
                    "nodes work as usual. To run DisTorch's, disable %s (rename its folder in custom_nodes/ "
                    "to end in .disabled) and restart ComfyUI.", packs, len(taken), shown, packs, packs)
        return taken
    others = sorted({_pack_of(c) for n, c in reg.items() if id(c) not in ours and n not in NODE_CLASS_MAPPINGS
                     and "multigpu" in _pack_of(c).lower()})
    if others:
        log.info("DisTorch: %s is installed too; DisTorch owns the node names both packs define (ComfyUI "
                 "loaded DisTorch after it), and %s's other nodes work as usual.", ", ".join(others),
                 ", ".join(others))
    return taken


def _register_late():
    """Register nodes whose base class appeared after this pack loaded (other packs, ComfyUI-GGUF), then
    check who owns DisTorch's node names (check_name_owners).

    ComfyUI's registry is written through the backend (comfy_api.register_nodes); a node is replaced
    only when its base class changed, and never when another pack owns its name."""
    added = {}
    reg = _registered()
    python_module = getattr(NODE_CLASS_MAPPINGS.get("DeviceSelectorMultiGPU"), "RELATIVE_PYTHON_MODULE", None)
    for name, cls in _nodes.build_late().items():
        old = NODE_CLASS_MAPPINGS.get(name)
        if old is not None and getattr(old, "BASE_CLASS", None) is getattr(cls, "BASE_CLASS", None):
            continue
        if name in reg and reg[name] is not old:      # another pack's node of that name: it keeps it
            continue
        if python_module:
            cls.RELATIVE_PYTHON_MODULE = python_module
        NODE_CLASS_MAPPINGS[name] = cls
        NODE_DISPLAY_NAME_MAPPINGS[name] = getattr(cls, "TITLE", name)
        added[name] = cls
    if added:
        _registry.backend().register_nodes(added, {k: NODE_DISPLAY_NAME_MAPPINGS[k] for k in added})
        log.info("DisTorch: registered %d nodes from other packs: %s", len(added), ", ".join(added))
    check_name_owners()


def _schedule_late():
    import asyncio
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no running loop: imported outside ComfyUI's loader
        return False
    if task is None:
        return False

    def done(_task):
        try:
            _register_late()
        except Exception:  # never break ComfyUI's start-up over an optional wrapper
            log.exception("DisTorch: registering wrappers of other packs failed")

    task.add_done_callback(done)
    return True


_schedule_late()
log.info("DisTorch: %d nodes registered", len(NODE_CLASS_MAPPINGS))
