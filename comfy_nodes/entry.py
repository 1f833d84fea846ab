"""What the DisTorch2 nodes call: hand ComfyUI a model that runs under a DisTorch Plan.

distorch(obj, compute_device, virtual_vram_gb, donor_device, expert, eject_models)
                 turns obj (ModelPatcher, CLIP, VAE, ControlNet, CLIPVision) into one whose patcher is a
                 DisTorch patcher (patcher.py); returns obj (the same CLIP/VAE/ControlNet object with its
                 patcher swapped, or the ModelPatcher itself). The Plan is made here, so bad inputs
                 fail at the loader node; the model is compiled when ComfyUI loads it.
                 virtual_vram_gb is the library's offload_gb: what the model then holds on the compute
                 device (resident weights + ring slots + dequant scratch) is at most model - virtual_vram_gb;
                 a value the model cannot meet (or above its size) streams all of it, with a warning.
release(obj)     unloads obj from ComfyUI (model_unload), which frees its homes.
eject(device)    unloads every model ComfyUI holds on `device`.
state_of(obj)    the DisTorch state of obj's model (plan, handle, counters), or None.
"""
from __future__ import annotations

import logging
import math
from typing import Any

import torch

from ..errors import DisTorchError
from .comfy_api import WrappersMP, get_patcher, mm, mp, patcher_slot, path, unload_models
from .devices import parse_device, same_device
from .patcher import classic_copy, mixed_class, outer_sample_wrapper
from .state import Config, State, make_plan, model_state, new_state, target

log = logging.getLogger("distorch.comfy.entry")
# ComfyUI's objects (ModelPatcher, CLIP, VAE, ControlNet, CLIPVision) are typed Any: ComfyUI ships no types.


def eject(device: str | torch.device) -> int:
    """Unload every model ComfyUI holds on `device`; returns how many."""
    dev = parse_device(device, "compute_device")
    before = [lm for lm in mm.current_loaded_models if same_device(lm.device, dev)]
    mm.free_memory(1e30, dev)
    mm.soft_empty_cache()
    after = [lm for lm in mm.current_loaded_models if same_device(lm.device, dev)]
    n = len(before) - len(after)
    log.info("DisTorch: eject_models unloaded %d model(s) from %s", n, dev)
    return n


def _config(compute_device, virtual_vram_gb, donor_device, expert) -> Config:
    """The node's inputs checked (each error names the input and what would work)."""
    compute = parse_device(compute_device, "compute_device")
    expert = (expert or "").strip()
    try:
        vram_gb = float(virtual_vram_gb)
    except (TypeError, ValueError):
        raise DisTorchError(f"virtual_vram_gb={virtual_vram_gb!r} is not a number; give GB (2^30 bytes), "
                            "e.g. 4.0") from None
    if not math.isfinite(vram_gb) or vram_gb < 0:
        raise DisTorchError(f"virtual_vram_gb={virtual_vram_gb!r}: give 0 or more GB")
    if isinstance(donor_device, (list, tuple)):
        donors = [str(d).strip() for d in donor_device if str(d).strip()]
    else:
        donors = [d.strip() for d in str(donor_device or "cpu").split(",") if d.strip()]
    for d in donors:
        parse_device(d, "donor_device")
    if not expert and compute.type != "cpu" and any(same_device(parse_device(d), compute) for d in donors):
        raise DisTorchError(f"donor_device {donor_device!r} is the compute device; donors hold what does "
                            "NOT fit it (use cpu or another GPU)")
    return Config(compute, vram_gb, donors, expert)


def _distorch_patcher(p, sampling: bool):
    """p as a DisTorch patcher: its class swapped in place, or (ModelPatcherDynamic) a classic copy.
    `sampling`: p is a diffusion MODEL (not inside a CLIP/VAE/...): add the step-time wrapper."""
    dyn = getattr(mp, "ModelPatcherDynamic", None)
    if dyn is not None and isinstance(p, dyn):
        newp = classic_copy(p, mixed_class(mp.ModelPatcher))
        log.info("DisTorch: ModelPatcherDynamic replaced by a classic DisTorch patcher for this model")
    else:
        p.__class__ = mixed_class(type(p))
        newp = p
    if sampling:
        wt = WrappersMP.OUTER_SAMPLE
        if "distorch" not in newp.wrappers.get(wt, {}):
            newp.add_wrapper_with_key(wt, "distorch", outer_sample_wrapper)
    return newp


def distorch(obj: Any, compute_device: str | torch.device = "cuda:0", virtual_vram_gb: float | str = 4.0,
             donor_device: str | list[str] | tuple[str, ...] | None = "cpu", expert: str | None = "",
             eject_models: bool = True) -> Any:
    """Hand ComfyUI a version of obj whose model runs under a DisTorch Plan (module docstring)."""
    if obj is None:
        raise DisTorchError("distorch() got no model (the loader returned None)")
    cfg = _config(compute_device, virtual_vram_gb, donor_device, expert)
    compute = cfg.compute
    which = path()
    holder, attr = patcher_slot(obj)
    p = obj if holder is None else getattr(holder, attr)

    if eject_models:
        eject(compute)

    model = p.model
    # ComfyUI may hold this model loaded already (CLIP loaders load eagerly): unload it the usual way
    # first, so that the next load goes through the DisTorch patcher (and a previous compile is undone)
    unload_models(lambda lm: lm.model is not None and lm.model.model is model)
    old = model_state(model)
    if old is not None and old.handle is not None:
        old.undo(p.offload_device)

    newp = _distorch_patcher(p, sampling=holder is None)
    newp.load_device = compute
    if compute.type == "cpu":
        newp.offload_device = compute
    if holder is not None:
        setattr(holder, attr, newp)
        if hasattr(holder, "load_device"):
            holder.load_device = compute
        if hasattr(holder, "first_stage_model") and hasattr(holder, "device"):
            holder.device = compute

    st = new_state(model, cfg)
    try:
        st.plan = make_plan(target(model), cfg)
    except (ImportError, AttributeError) as e:   # planner API not available here: plan at load time
        log.info("DisTorch: planning deferred to load time (%s)", e)
    st.log_plan(f"{type(model).__name__} ({which} path, {cfg})")
    return newp if holder is None else obj


def release(obj: Any) -> bool:
    """Unload obj from ComfyUI now (as its memory manager would): frees homes, slots, donor memory."""
    p = get_patcher(obj)
    if unload_models(lambda lm: lm.model is not None and lm.model.is_clone(p), first_only=True):
        return True
    st = model_state(p.model)
    if st is not None and st.handle is not None:
        p.detach()
        return True
    return False


def state_of(obj: Any) -> State | None:
    """The DisTorch state of obj's model (plan, handle, counters), or None."""
    return model_state(get_patcher(obj).model)
