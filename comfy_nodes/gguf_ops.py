"""GGUF weights inside ComfyUI's models: an operations class that keeps them quantized, and the patcher
that applies weight patches (LoRA) to them per call.

The layers
----------
`gguf_operations(dequant_dtype)` is a comfy.ops-style operations class (over comfy.ops.manual_cast)
that ComfyUI's loader entry points build their models with. Each of its layers is the library's GGUF
op (formats/gguf_tensor.py: GGUFLinear, GGUFConv*, GGUFEmbedding, GGUFLayerNorm, GGUFGroupNorm over
the one op mixin GGUFLayer) mixed over ComfyUI's layer of the same name. The library op does the work:
it takes a GGUFTensor from the state dict AS the parameter (ComfyUI's load_state_dict would otherwise
copy it into a dense weight), and at every call dequantizes it on the input's device (into
`dequant_dtype` first when set) and applies the layer's weight/bias functions (ComfyUI's lowvram LoRA
patches, GGUFPatch below). A layer without GGUF parameters runs ComfyUI's own forward (manual_cast).

Weight patches
--------------
`gguf_patcher_class(base)` is ComfyUI's ModelPatcher class `base` with two methods changed: a weight
patch (LoRA) of a GGUF weight is not written into the quantized weight but applied at every call to the
dequantized one (a `GGUFPatch` in the layer's weight_function, like ComfyUI's own lowvram patches), and
unpatching removes it. The DisTorch2 nodes place such a model like any other (streamed units move their
quantized bytes: runtime/gguf_stream.py); units whose layers carry patches stay quantized
(passes/quant_choice.py).
"""
from __future__ import annotations

import copy
from typing import Any

import torch

from ..errors import GGUFLoadError
from ..formats.gguf_tensor import (GGUFConv1d, GGUFConv2d, GGUFConv3d, GGUFEmbedding, GGUFGroupNorm,
                                   GGUFLayerNorm, GGUFLinear, is_gguf)
from .comfy_api import comfy, mp

LORA_FLOAT32 = "distorch_lora_float32"      # = patcher.LORA_FLOAT32 (high_precision_loras)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# ComfyUI's objects (patch lists, weight adapters, ModelPatcher classes) are typed Any: ComfyUI ships no types.


def dtype_option(value: str | torch.dtype | None, what: str) -> torch.dtype | None:
    """A loader's dtype option ('default' / 'target' / float32 / float16 / bfloat16) -> dtype or None."""
    if value in (None, "", "default", "target"):
        return None
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise GGUFLoadError(f"{what} {value!r}: expected one of default, target, {', '.join(DTYPES)}")
    return DTYPES[value]


# ------------------------------------------------------------------------------------------------
# the layers
# ------------------------------------------------------------------------------------------------
class _ComfyPath:
    """In front of (library GGUF op, comfy.ops layer): ComfyUI's own forward for a layer without GGUF
    parameters (most norms and biases of a GGUF file are plain F32), the library op's otherwise."""

    comfy_base: type          # the comfy.ops layer class

    def forward(self, *args, **kwargs):
        if self.has_gguf():
            return self.forward_gguf(*args, **kwargs)
        return self.comfy_base.forward(self, *args, **kwargs)


# layer name in comfy.ops -> the library's GGUF op of that kind
_OPS = {"Linear": GGUFLinear, "Conv1d": GGUFConv1d, "Conv2d": GGUFConv2d, "Conv3d": GGUFConv3d,
        "Embedding": GGUFEmbedding, "LayerNorm": GGUFLayerNorm, "GroupNorm": GGUFGroupNorm}
_OPS_CACHE: dict = {}


def gguf_operations(dequant_dtype: str | torch.dtype | None = None) -> type:
    """A comfy.ops-style operations class (over comfy.ops.manual_cast) whose layers keep GGUF weights
    quantized and dequantize them per call (see the module docstring)."""
    dd = dtype_option(dequant_dtype, "dequant_dtype")
    base = comfy.ops.manual_cast
    key = (id(base), dd)
    ops = _OPS_CACHE.get(key)
    if ops is not None:
        return ops
    attrs = {}
    for name, op in _OPS.items():
        bcls = getattr(base, name, None)
        if bcls is None:
            continue
        attrs[name] = type(name, (_ComfyPath, op, bcls), {"dequant_dtype": dd, "comfy_base": bcls,
                                                          "__module__": __name__,
                                                          "__qualname__": f"DisTorchGGUFOps.{name}"})
    ops = type("DisTorchGGUFOps", (base,), dict(attrs, __module__=__name__))
    _OPS_CACHE[key] = ops
    return ops


# ------------------------------------------------------------------------------------------------
# weight patches of GGUF weights
# ------------------------------------------------------------------------------------------------
def patches_to(obj: Any, device: str | torch.device) -> Any:
    """A copy of a ComfyUI patch list (tuples / lists / dicts of tensors, weight adapters holding their
    tensors in `.weights`) with every tensor on `device`; anything else is kept as it is."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(patches_to(x, device) for x in obj)
    if isinstance(obj, list):
        return [patches_to(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: patches_to(v, device) for k, v in obj.items()}
    w = getattr(obj, "weights", None)
    if isinstance(w, (tuple, list)) and any(isinstance(x, torch.Tensor) for x in w):
        c = copy.copy(obj)               # an adapter object: same class and fields, weights moved
        c.weights = patches_to(w, device)
        return c
    return obj


class GGUFPatch:
    """A weight patch (LoRA ...) of a GGUF weight, applied to the dequantized weight at every call
    (the layer's weight_function), computed in `patch_dtype` (default: the weight's float dtype).
    With `device` (the GGUF loaders' patch_on_device), the patch tensors are copied there once instead
    of being cast to the weight's device by every call."""

    def __init__(self, key: str, patches: dict[str, Any], patch_dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> None:
        self.key = key
        self.patches = patches
        self.patch_dtype = patch_dtype
        self.local = patches_to(patches[key], device) if device is not None else None

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        dt = self.patch_dtype or (weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                  else torch.float32)
        p = self.local if self.local is not None else self.patches[self.key]
        out = comfy.lora.calculate_weight(p, weight.to(dt), self.key, intermediate_dtype=dt)
        return out.to(weight.dtype)


_PATCHER_CLASSES: dict = {}


def gguf_patcher_class(base: type) -> type:
    """`base` (a ComfyUI ModelPatcher class) whose weight patches of GGUF weights are applied per call
    after dequantization instead of being written into the (quantized) weight."""
    cls = _PATCHER_CLASSES.get(base)
    if cls is not None:
        return cls

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return None
        w, _set_func, _convert = mp.get_key_weight(self.model, key)
        if not is_gguf(w):
            return base.patch_weight_to_device(self, key, device_to, inplace_update)
        mod_name, pname = key.rsplit(".", 1)
        m = comfy.utils.get_attr(self.model, mod_name)
        attr = "weight_function" if pname == "weight" else "bias_function"
        fns = [f for f in getattr(m, attr, []) if not (isinstance(f, GGUFPatch) and f.key == key)]
        opt = self.model_options.get("distorch_gguf") or {}
        pdt = opt.get("patch_dtype")
        if pdt is None and self.model_options.get(LORA_FLOAT32):
            pdt = torch.float32          # high_precision_loras (patcher.py): every patch in float32
        dev = None
        if opt.get("patch_on_device"):
            dev = torch.device(device_to) if device_to is not None else torch.device(self.load_device)
        # a new list: the class default is shared
        setattr(m, attr, fns + [GGUFPatch(key, self.patches, pdt, dev)])
        reg = self.model.__dict__.setdefault("_distorch_gguf_patched", [])
        reg.append((m, attr))
        return None

    def unpatch_model(self, device_to=None, unpatch_weights=True):
        if unpatch_weights:
            for m, attr in self.model.__dict__.pop("_distorch_gguf_patched", []):
                kept = [f for f in getattr(m, attr, []) if not isinstance(f, GGUFPatch)]
                setattr(m, attr, kept)
        return base.unpatch_model(self, device_to, unpatch_weights)

    cls = type(f"GGUF{base.__name__}", (base,), {"patch_weight_to_device": patch_weight_to_device,
                                                 "unpatch_model": unpatch_model, "__module__": __name__})
    _PATCHER_CLASSES[base] = cls
    return cls
