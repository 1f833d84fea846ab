"""GGUFTensor (formats/gguf_core.py, re-exported here) and the GGUF op layer: one mixin, thin ops (in the
shape of ComfyUI-GGUF's ops.py).  Import both from this module.

What GGUFTensor is and how it moves (never dequantized by a move, in inference mode and out of it;
strict mode for unknown ops): see formats/gguf_core.py.

`GGUFLayer` does "parameter -> dense weight on the input's device (+ per-call patches)" (`gguf_weight`)
and takes GGUF tensors from a state dict as they are; each op (`GGUFLinear`, `GGUFConv1d/2d/3d`,
`GGUFEmbedding`, `GGUFLayerNorm`, `GGUFGroupNorm`) only writes its `forward_gguf` in a line or two.
They dequantize GGUF parameters ON THE COMPUTE DEVICE (the input's) on every call: the per-call path
("resident quantized" or "streamed quantized").  `gguf_ops(module)` switches the matching submodules of
a built model to these classes in place (class swap only; no tensor copied).  A host framework
subclasses an op with its own layer class (ComfyUI: `class Linear(GGUFLinear, comfy.ops.manual_cast.Linear)`)
and may override `forward` to take its own path when the layer holds no GGUF parameter.  Dequantization
per call can be overridden by setting `module.gguf_dequant_override = fn(module, name, tensor, device,
dtype) -> Tensor`.

`GGUFEmbedding` gathers only the rows its input asks for (`embedding_rows`: the selected rows' blocks
are indexed on the bytes and dequantized; bit-identical to dequantize-then-index, since every row is
whole blocks) instead of dequantizing the whole token table per call; it takes the whole-table path
only where that is needed (per-call patches, an override, the runtime's dequantized copy, max_norm).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dequant import dequantize as _dequantize
from .gguf_core import GGUFTensor, is_gguf, materialize, strict_gguf
from .gguf_core import _rebuild  # noqa: F401  (pickles written when GGUFTensor lived here)

__all__ = ["GGUFTensor", "is_gguf", "materialize", "strict_gguf", "GGUFLayer", "GGUFLinear", "GGUFConv1d", "GGUFConv2d", "GGUFConv3d", "GGUFEmbedding",
           "GGUFLayerNorm", "GGUFGroupNorm", "gguf_ops", "embedding_rows"]


def _row_bytes(t: GGUFTensor) -> int | None:
    """Bytes per row of a 2-D GGUF table whose rows are whole blocks, else None."""
    if t.dim() != 2 or t.shape[0] == 0:
        return None
    if t.stored_shape is not None and (len(t.stored_shape) != 2 or t.stored_shape[-1] != t.shape[-1]):
        return None
    n = t.raw.numel()
    return n // t.shape[0] if n % t.shape[0] == 0 else None


def embedding_rows(t: GGUFTensor, ids: torch.Tensor, device: torch.device,
                   dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """`dequantize(t)[ids]` on `device`, dequantizing only the selected rows' blocks (bit-identical:
    every row is whole blocks and blocks dequantize independently); None where `t` is not a table of
    whole-block rows (the caller takes the whole-table path)."""
    rb = _row_bytes(t)
    if rb is None:
        return None
    flat = ids.reshape(-1)
    if flat.device != t.raw.device:
        flat = flat.to(t.raw.device, non_blocking=True)
    rows = t.raw.view(t.shape[0], rb).index_select(0, flat.long())      # bounds-checked like F.embedding
    if rows.device != device:
        rows = rows.to(device, non_blocking=True)
    dense = _dequantize(rows.reshape(-1), t.qtype, (flat.numel(), t.shape[1]), dtype or t.dtype, check=False)
    return dense.reshape(*ids.shape, t.shape[1])

# ------------------------------------------------------------------------------------------------
# ops layer: one mixin, thin ops

class GGUFLayer:
    """Op mixin: parameter -> dense weight on the input's device (+ per-call patches).  See the module
    docstring; an op class only writes `forward_gguf`."""

    dequant_dtype: torch.dtype | None = None     # dequantize into this, then cast (None: straight)
    gguf_dequant_override: Callable | None = None
    gguf_params = ("weight", "bias")

    def has_gguf(self) -> bool:
        return any(is_gguf(self._parameters.get(n)) for n in self.gguf_params)

    def gguf_weight(self, name: str, x: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor | None:
        """Parameter `name` dense on x's device in `dtype` (None: its own), the layer's patch functions
        (`weight_function` / `bias_function`, ComfyUI's per-call LoRA patches) applied."""
        t = getattr(self, name)
        if t is None:
            return None
        ov = self.gguf_dequant_override
        if ov is not None:
            w = ov(self, name, t, x.device, dtype)
        elif self.dequant_dtype is not None and is_gguf(t):
            w = materialize(t, x.device, self.dequant_dtype)
            if dtype is not None and w.dtype != dtype:
                w = w.to(dtype)
        else:
            w = materialize(t, x.device, dtype)
        fns = getattr(self, "weight_function" if name == "weight" else "bias_function", None)
        if fns:
            if w is t or w is getattr(t, "_dq", None):
                w = w.clone()      # patches may work in place: never on the parameter (or the runtime's
                #                    shared dequantized copy of it) itself
            for f in fns:
                w = f(w)
        return w

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.forward_gguf(*args, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # a GGUF tensor becomes the parameter as it is (no dequantization) where the layer holds no GGUF
        # parameter yet; onto a GGUF parameter torch copies the bytes (the parameter object stays)
        taken = []
        for name in self.gguf_params:
            key = prefix + name
            v = state_dict.get(key)
            cur = self._parameters.get(name)
            if v is None or not is_gguf(v) or is_gguf(cur):
                continue
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


def _float(x: torch.Tensor):
    return x.dtype if x.dtype.is_floating_point else None


class GGUFLinear(GGUFLayer, nn.Linear):
    def forward_gguf(self, x: torch.Tensor) -> torch.Tensor:
        d = _float(x)
        return F.linear(x, self.gguf_weight("weight", x, d), self.gguf_weight("bias", x, d))


class _GGUFConv(GGUFLayer):
    def forward_gguf(self, x: torch.Tensor) -> torch.Tensor:
        d = _float(x)
        return self._conv_forward(x, self.gguf_weight("weight", x, d), self.gguf_weight("bias", x, d))


class GGUFConv1d(_GGUFConv, nn.Conv1d):
    pass


class GGUFConv2d(_GGUFConv, nn.Conv2d):
    pass


class GGUFConv3d(_GGUFConv, nn.Conv3d):
    pass


class GGUFEmbedding(GGUFLayer, nn.Embedding):
    def forward_gguf(self, x: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        t = self.weight
        if (is_gguf(t) and t._dq is None and self.gguf_dequant_override is None and self.max_norm is None
                and not getattr(self, "weight_function", None)):
            dd = self.dequant_dtype or out_dtype
            out = embedding_rows(t, x, x.device, dd)
            if out is not None:
                return out if out_dtype is None or out.dtype == out_dtype else out.to(out_dtype)
        w = self.gguf_weight("weight", x, out_dtype)     # dequantized straight into the dtype asked for
        return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)


class GGUFLayerNorm(GGUFLayer, nn.LayerNorm):
    def forward_gguf(self, x: torch.Tensor) -> torch.Tensor:
        d = _float(x)
        return F.layer_norm(x, self.normalized_shape, self.gguf_weight("weight", x, d),
                            self.gguf_weight("bias", x, d), self.eps)


class GGUFGroupNorm(GGUFLayer, nn.GroupNorm):
    def forward_gguf(self, x: torch.Tensor) -> torch.Tensor:
        d = _float(x)
        return F.group_norm(x, self.num_groups, self.gguf_weight("weight", x, d), self.gguf_weight("bias", x, d),
                            self.eps)


_SWAP = [(nn.Linear, GGUFLinear), (nn.Conv1d, GGUFConv1d), (nn.Conv2d, GGUFConv2d),
         (nn.Conv3d, GGUFConv3d), (nn.Embedding, GGUFEmbedding), (nn.LayerNorm, GGUFLayerNorm),
         (nn.GroupNorm, GGUFGroupNorm)]


def gguf_ops(module: nn.Module, *, only_with_gguf: bool = True) -> int:
    """Switch plain Linear/Conv/Embedding/Norm submodules of `module` to their GGUF op classes in
    place (exact class match only; subclasses with their own forward are left alone). With
    `only_with_gguf`, only modules that hold a GGUFTensor parameter are switched. Returns the count."""
    n = 0
    for m in module.modules():
        for base, gcls in _SWAP:
            if type(m) is base:
                if only_with_gguf and not any(isinstance(p, GGUFTensor)
                                              for p in m.parameters(recurse=False)):
                    break
                m.__class__ = gcls
                n += 1
                break
    return n
