"""ComfyUI face of DisTorch: the node classes users' workflows name (see nodes.py).

Built when ComfyUI loads this folder from custom_nodes/. Wrappers of other packs' nodes need those
packs loaded first, and ComfyUI loads custom-node folders in directory order; so what exists now is
registered at once, and the rest when ComfyUI's node-loading task finishes (see _register_late).
adapter.py is the only module that touches ComfyUI internals.
"""
import logging

from . import nodes as _nodes

log = logging.getLogger("distorch.nodes")

NODE_CLASS_MAPPINGS: dict = _nodes.build()
NODE_DISPLAY_NAME_MAPPINGS: dict = _nodes.display_names(NODE_CLASS_MAPPINGS)


def _register_late():
    """Register nodes whose base class appeared after this pack loaded (other packs, ComfyUI-GGUF).

    ComfyUI's registry is written through the adapter (adapter.register_nodes); a node is replaced
    only when its base class changed."""
    from . import adapter

    added = {}
    python_module = getattr(NODE_CLASS_MAPPINGS.get("DeviceSelectorMultiGPU"), "RELATIVE_PYTHON_MODULE", None)
    for name, cls in _nodes.build_late().items():
        old = NODE_CLASS_MAPPINGS.get(name)
        if old is not None and getattr(old, "BASE_CLASS", None) is getattr(cls, "BASE_CLASS", None):
            continue
        if python_module:
            cls.RELATIVE_PYTHON_MODULE = python_module
        NODE_CLASS_MAPPINGS[name] = cls
        NODE_DISPLAY_NAME_MAPPINGS[name] = getattr(cls, "TITLE", name)
        added[name] = cls
    if added:
        adapter.register_nodes(added, {k: NODE_DISPLAY_NAME_MAPPINGS[k] for k in added})
        log.info("DisTorch: registered %d nodes from other packs: %s", len(added), ", ".join(added))


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
