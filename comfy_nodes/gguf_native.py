"""GGUF models in ComfyUI without ComfyUI-GGUF: DisTorch's own reader + ComfyUI's own loaders.

Part of the adapter (comfy_nodes/adapter.py imports it lazily; it touches ComfyUI internals the same
way): adapter.load_gguf_unet / load_gguf_clip call the functions here.

How a .gguf diffusion model becomes a ComfyUI MODEL
---------------------------------------------------
1. runtime.gguf_loader.load_gguf memory-maps the file: quantized tensors are GGUFTensors (their bytes a
   view of the mapping, never dequantized on the host), F32/F16/BF16 tensors plain tensors.
2. ComfyUI's own entry point `comfy.sd.load_diffusion_model_state_dict(sd, model_options=
   {"custom_operations": ops})` detects the architecture from the keys and builds its model with our
   operations class (below) instead of comfy.ops.
3. The layers of that class take a GGUFTensor from the state dict AS their parameter
   (`_load_from_state_dict`; ComfyUI's load_state_dict would otherwise copy it into a dense weight) and
   dequantize it on the compute device at every call, into the input's dtype (or `dequant_dtype` first),
   then apply ComfyUI's weight/bias functions (lowvram LoRA patches).  Plain weights take ComfyUI's
   own path (manual_cast).
The result is ComfyUI's ModelPatcher with two methods changed (gguf_patcher_class): a weight patch
(LoRA) of a GGUF weight is not written into the quantized weight but applied at every call to the
dequantized one (the layer's weight_function, like ComfyUI's own lowvram patches), and unpatching
removes it.  The DisTorch2 nodes place it like any model (streamed units move their quantized bytes:
runtime/gguf_stream.py); units whose layers carry such patches stay quantized (passes/quant_choice.py).

Text encoders: .safetensors files and .gguf files whose tensors keep their original (transformers)
names load through `comfy.sd.load_text_encoder_state_dicts` with the same operations class.  GGUF
text encoders in llama.cpp naming (`enc.blk.0.attn_q.weight`, `token_embd.weight`...) would need a key
map that this reader does not have: they are refused with a clear error.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DisTorchError

log = logging.getLogger("distorch")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LLAMA_CPP_KEYS = ("enc.blk.", "blk.", "token_embd.", "output_norm.", "dec.blk.")


class GGUFLoadError(DisTorchError):
    pass


def _is_gguf(t) -> bool:
    from ..runtime.gguf_stream import is_gguf
    return is_gguf(t)


def _dtype_option(value, what: str):
    if value in (None, "", "default", "target"):
        return None
    if isinstance(value, torch.dtype):
        return value
    if value not in DTYPES:
        raise GGUFLoadError(f"{what} {value!r}: expected one of default, target, {', '.join(DTYPES)}")
    return DTYPES[value]


class _GGUFLayer:
    """Mixin over a comfy.ops layer class: GGUF parameters kept quantized, dequantized per call."""

    dequant_dtype: torch.dtype | None = None
    _gguf_params = ("weight", "bias")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        taken = []
        for name in self._gguf_params:
            key = prefix + name
            v = state_dict.get(key)
            if v is None or not _is_gguf(v):
                continue
            cur = self._parameters.get(name)
            if cur is not None and tuple(cur.shape) != tuple(v.shape):
                error_msgs.append(f"size mismatch for {key}: GGUF tensor of shape {list(v.shape)}, the model "
                                  f"expects {list(cur.shape)}")
                continue
            self._parameters[name] = nn.Parameter(v, requires_grad=False)
            taken.append(key)
        rest = {k: v for k, v in state_dict.items() if k not in taken} if taken else state_dict
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in taken:
            if key in missing_keys:
                missing_keys.remove(key)

    def _has_gguf(self) -> bool:
        return any(_is_gguf(self._parameters.get(n)) for n in self._gguf_params)

    def _gw(self, name: str, x: torch.Tensor, dtype: torch.dtype | None):
        """Parameter `name` dense on x's device in `dtype` (None: its own), patch functions applied."""
        from ..runtime.gguf_tensor import materialize
        t = getattr(self, name)
        if t is None:
            return None
        if _is_gguf(t):
            w = materialize(t, x.device, self.dequant_dtype or dtype or t.dtype)
            if dtype is not None and w.dtype != dtype:
                w = w.to(dtype)
        elif t.device != x.device or (dtype is not None and t.dtype != dtype):
            w = t.to(device=x.device, dtype=dtype or t.dtype, non_blocking=True)
        else:
            w = t
        fns = self.weight_function if name == "weight" else self.bias_function
        if fns and w is t:
            w = t.clone()         # patch functions may work in place: never on the parameter itself
        for f in fns:
            w = f(w)
        return w

    def forward(self, *args, **kwargs):
        if self._has_gguf():
            return self._gguf_forward(*args, **kwargs)
        return super().forward(*args, **kwargs)


def _float(x):
    return x.dtype if x.dtype.is_floating_point else None


def _linear(self, x):
    d = _float(x)
    return F.linear(x, self._gw("weight", x, d), self._gw("bias", x, d))


def _conv(self, x):
    d = _float(x)
    return self._conv_forward(x, self._gw("weight", x, d), self._gw("bias", x, d))


def _embedding(self, x, out_dtype=None):
    w = self._gw("weight", x, out_dtype)     # dequantized straight into the dtype asked for
    return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse)


def _layer_norm(self, x):
    d = _float(x)
    return F.layer_norm(x, self.normalized_shape, self._gw("weight", x, d), self._gw("bias", x, d), self.eps)


def _group_norm(self, x):
    d = _float(x)
    return F.group_norm(x, self.num_groups, self._gw("weight", x, d), self._gw("bias", x, d), self.eps)


_FORWARDS = {"Linear": _linear, "Conv1d": _conv, "Conv2d": _conv, "Conv3d": _conv, "Embedding": _embedding,
             "LayerNorm": _layer_norm, "GroupNorm": _group_norm}
_OPS_CACHE: dict = {}


def gguf_operations(dequant_dtype=None):
    """A comfy.ops-style operations class (over comfy.ops.manual_cast) whose layers keep GGUF weights
    quantized and dequantize them per call (see the module docstring)."""
    import comfy.ops
    dd = _dtype_option(dequant_dtype, "dequant_dtype")
    key = (id(comfy.ops.manual_cast), dd)
    ops = _OPS_CACHE.get(key)
    if ops is not None:
        return ops
    base = comfy.ops.manual_cast
    attrs = {}
    for name, fwd in _FORWARDS.items():
        bcls = getattr(base, name, None)
        if bcls is None:
            continue
        attrs[name] = type(name, (_GGUFLayer, bcls), {"dequant_dtype": dd, "_gguf_forward": fwd,
                                                      "__module__": __name__,
                                                      "__qualname__": f"DisTorchGGUFOps.{name}"})
    ops = type("DisTorchGGUFOps", (base,), dict(attrs, __module__=__name__))
    _OPS_CACHE[key] = ops
    return ops


class GGUFPatch:
    """A weight patch (LoRA ...) of a GGUF weight, applied to the dequantized weight at every call
    (the layer's weight_function), computed in `patch_dtype` (default: the weight's float dtype)."""

    def __init__(self, key, patches, patch_dtype=None):
        self.key = key
        self.patches = patches
        self.patch_dtype = patch_dtype

    def __call__(self, weight):
        import comfy.lora
        dt = self.patch_dtype or (weight.dtype if weight.dtype in (torch.float32, torch.float16, torch.bfloat16)
                                  else torch.float32)
        out = comfy.lora.calculate_weight(self.patches[self.key], weight.to(dt), self.key, intermediate_dtype=dt)
        return out.to(weight.dtype)


_PATCHER_CLASSES: dict = {}


def gguf_patcher_class(base):
    """`base` (a ComfyUI ModelPatcher class) whose weight patches of GGUF weights are applied per call
    after dequantization instead of being written into the (quantized) weight."""
    cls = _PATCHER_CLASSES.get(base)
    if cls is not None:
        return cls

    def patch_weight_to_device(self, key, device_to=None, inplace_update=False):
        if key not in self.patches:
            return None
        import comfy.model_patcher as mp
        import comfy.utils
        w, _set_func, _convert = mp.get_key_weight(self.model, key)
        if not _is_gguf(w):
            return base.patch_weight_to_device(self, key, device_to, inplace_update)
        mod_name, pname = key.rsplit(".", 1)
        m = comfy.utils.get_attr(self.model, mod_name)
        attr = "weight_function" if pname == "weight" else "bias_function"
        fns = [f for f in getattr(m, attr, []) if not (isinstance(f, GGUFPatch) and f.key == key)]
        pt = (self.model_options.get("distorch_gguf") or {}).get("patch_dtype")
        setattr(m, attr, fns + [GGUFPatch(key, self.patches, pt)])   # a new list: the class default is shared
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


def load_unet(path, dequant_dtype=None, patch_dtype=None, patch_on_device=None):
    """A .gguf diffusion model -> ComfyUI ModelPatcher, through comfy.sd.load_diffusion_model_state_dict."""
    import comfy.sd
    from ..runtime.gguf_loader import load_gguf
    ops = gguf_operations(dequant_dtype)
    _dtype_option(patch_dtype, "patch_dtype")
    sd, meta = load_gguf(path)
    n_q = sum(1 for v in sd.values() if _is_gguf(v))
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops})
    if model is None:
        raise GGUFLoadError(f"{path}: ComfyUI could not detect the model type from its {len(sd)} tensors "
                            f"(GGUF architecture {meta.get('architecture')!r}); is it a diffusion model "
                            f"converted for ComfyUI?")
    pt = _dtype_option(patch_dtype, "patch_dtype")
    if pt is not None:
        model.model_options.setdefault("distorch_gguf", {})["patch_dtype"] = pt
    if patch_on_device:
        model.model_options.setdefault("distorch_gguf", {})["patch_on_device"] = True
    model.__class__ = gguf_patcher_class(type(model))
    log.info("DisTorch: %s loaded natively (%d quantized tensors: %s; %.2f GiB stored)", path, n_q,
             ", ".join(f"{k} {v}" for k, v in sorted(meta["qtypes"].items())), meta["stored_bytes"] / 2**30)
    return model


def load_clip(paths, clip_type="stable_diffusion", dequant_dtype=None):
    """Text encoder(s) from .gguf (original key names) and/or .safetensors files -> ComfyUI CLIP."""
    import comfy.sd
    import comfy.utils
    import folder_paths
    from ..runtime.gguf_loader import load_gguf
    ops = gguf_operations(dequant_dtype)
    ct = getattr(comfy.sd.CLIPType, str(clip_type).upper(), None)
    if ct is None:
        raise GGUFLoadError(f"clip type {clip_type!r} is not one of ComfyUI's "
                            f"({', '.join(t.name.lower() for t in comfy.sd.CLIPType)})")
    sds = []
    for p in paths:
        if str(p).lower().endswith(".gguf"):
            sd, _meta = load_gguf(p, prefix=None)
            odd = [k for k in sd if k.startswith(LLAMA_CPP_KEYS)]
            if odd:
                raise GGUFLoadError(f"{p}: tensors in llama.cpp naming (e.g. {odd[0]!r}); DisTorch's native GGUF "
                                    "reader loads text encoders whose tensors keep their original names. Install "
                                    "ComfyUI-GGUF for this file, or use a .safetensors text encoder")
        else:
            sd = comfy.utils.load_torch_file(p, safe_load=True)
        sds.append(sd)
    clip = comfy.sd.load_text_encoder_state_dicts(sds, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                  clip_type=ct, model_options={"custom_operations": ops})
    return clip
