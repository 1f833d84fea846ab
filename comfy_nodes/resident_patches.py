"""Weight patches (LoRA ...) of RESIDENT weights at load: the math on the compute device, the backup without a copy.

Why: ComfyUI's ModelPatcher.patch_weight_to_device, called with inplace_update=True on a weight compile has
already moved to the GPU, first copies the weight back to host RAM as its backup (`weight.to(offload_device,
copy=True)`), then casts it to float32 for the math.  Yet the unpatched bytes were in host RAM a moment before:
the tensor the parameter held until runtime/place.py uploaded it.  `patch_resident` keeps that tensor
(runtime.place.keep_host_originals) and makes it the backup with ComfyUI's inplace_update=False meaning:
unpatch_model puts it back as the parameter (comfy.utils.set_attr_param), exactly as after ComfyUI's own full
load, whose backups of the weights it patches are their host tensors, not copies.  The patched bytes are
computed on the compute device from the live weight (uploaded, unpatched) and written into it, so the runtime
keeps its parameter objects and storages.  On a host compute device nothing moved: the live tensor is the
original itself, so the parameter is rebound to the patched result instead (the original stays the backup).

After a release that kept the patches (a compile for another device), the live weights hold patched bytes and
the backups exist: those weights take the usual path (patch_weight_to_device), as does every weight without a
kept host tensor.

    lora_dtype(model_options, dtype)                        the dtype of the patch math (high_precision_loras)
    patched_weight(patcher, key, orig, set_func, convert_func, device)   ComfyUI's stored tensor for `key`
    patch_resident(patcher, key, device, before, kept) -> bool           the load-time patch described above
"""
from __future__ import annotations

import collections
import inspect
from typing import Any       # ComfyUI's objects are typed Any: it ships no types

import torch

from ..errors import DisTorchError
from .comfy_api import comfy, mm, mp
from .gguf_ops import LORA_FLOAT32           # model_options key: high_precision_loras

__all__ = ["Backup", "lora_dtype", "patched_weight", "patch_resident"]

_LOW = (torch.float16, torch.bfloat16)
Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])   # ComfyUI's backup entry


def lora_dtype(model_options: dict[str, Any] | None, weight_dtype: torch.dtype) -> torch.dtype:
    """dtype a weight patch is computed in (comfy_nodes/patcher.py: LoRA precision)."""
    if (model_options or {}).get(LORA_FLOAT32, True) or weight_dtype not in _LOW:
        return torch.float32
    return weight_dtype


def patched_weight(patcher: Any, key: str, orig: torch.Tensor, set_func: Any, convert_func: Any,
                   device: torch.device | None, dtype_rule: Any = lora_dtype) -> torch.Tensor | None:
    """The stored tensor ComfyUI's patch_weight_to_device makes for `key` from its unpatched weight `orig`, with
    the math on `device` (None: orig's): float32 math (the op's convert function first), then stochastic
    rounding seeded by string_to_seed(key), or the op's set function (return_weight); with high_precision_loras
    off, the math in a fp16/bf16 weight's own dtype (`dtype_rule`, default lora_dtype; None: always float32).
    None where a set function stored it itself (comfy_nodes/stream_patches.py uses it for streamed weights)."""
    dt = dtype_rule(patcher.model_options, orig.dtype) if dtype_rule is not None else torch.float32
    if dt != torch.float32 and set_func is None and convert_func is None:
        temp = mm.cast_to_device(orig, device, dt, copy=True)
        return comfy.lora.calculate_weight(patcher.patches[key], temp, key, intermediate_dtype=dt).to(orig.dtype)
    temp = mm.cast_to_device(orig, device, torch.float32, copy=True)
    if convert_func is not None:
        temp = convert_func(temp, inplace=True)
    out = comfy.lora.calculate_weight(patcher.patches[key], temp, key)
    if set_func is not None:
        return set_func(out, inplace_update=True, seed=mp.string_to_seed(key), return_weight=True)
    return comfy.float.stochastic_rounding(out, orig.dtype, seed=mp.string_to_seed(key))


def _returns_weight(set_func: Any) -> bool:
    """Whether an op's set function takes return_weight (hands the stored tensor back instead of storing it)."""
    if set_func is None:
        return True
    try:
        return "return_weight" in inspect.signature(set_func).parameters
    except (TypeError, ValueError):
        return False


def patch_resident(patcher: Any, key: str, device: torch.device | None, before: Any, kept: dict) -> bool:
    """Patch the resident plain weight `key` right after compile, its backup the host tensor it held before the
    move (module docstring).  `before`: the weight object get_key_weight gave before compile; `kept`: what
    runtime.place.keep_host_originals collected.  False, with nothing changed, where this does not apply (no
    kept host tensor, a backup already there, weight_inplace_update, a set function without return_weight,
    an offload device other than the host): the caller then takes patch_weight_to_device."""
    live, set_func, convert_func = mp.get_key_weight(patcher.model, key)
    host = kept.get(id(live)) if live is before else None
    if host is None or key in patcher.backup or patcher.weight_inplace_update or not _returns_weight(set_func) \
            or type(live) not in (torch.Tensor, torch.nn.Parameter) or host.device.type != "cpu" \
            or torch.device(patcher.offload_device).type != "cpu" \
            or tuple(host.shape) != tuple(live.shape) or host.dtype != live.dtype:
        return False
    shared = host.untyped_storage().data_ptr() == live.untyped_storage().data_ptr()    # a host compute device
    with torch.no_grad():
        out = patched_weight(patcher, key, live, set_func, convert_func, device if device is not None else live.device)
        if out is None:
            raise DisTorchError(f"weight {key!r}: its op's set function takes return_weight but returned nothing; "
                                "DisTorch cannot patch it (load this model without DisTorch)")
        patcher.backup[key] = Backup(host, False)
        if shared:
            live.data = out
        else:
            comfy.utils.copy_to_param(patcher.model, key, out)
    return True
