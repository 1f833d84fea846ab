"""GGUFTensor: a quantized weight that stays quantized until the moment it is used.

Design
------
`GGUFTensor` is a *wrapper* tensor subclass (`torch.Tensor._make_wrapper_subclass`): to the rest of
torch it looks like a tensor of its LOGICAL shape and dtype (e.g. [3072, 12288] bfloat16 — so shape
checks in `load_state_dict`, `nn.Linear.extra_repr`, tracing by shape all work), while the only
memory it owns is `raw`, a flat contiguous uint8 tensor holding the GGUF blocks exactly as stored.

- `t.raw`         uint8 [stored bytes], on `t.device`       (what the runtime copies)
- `t.qtype`       gguf.GGMLQuantizationType
- `t.shape`       logical torch shape (outermost first)
- `t.dtype`       dtype `dequantize()` produces by default (bfloat16 unless set)
- `t.stored_nbytes` = raw.numel(); compiler.graph.stored_nbytes reads it, so the cost model counts
  stored bytes, not numel * 2.
- `t.to(device, non_blocking=...)` / `.cuda()` / `.cpu()` / `.pin_memory()` move/pin the RAW BYTES
  (quantized bytes cross the bus); `.to(dtype)` only changes the dequantization target.
- `t.dequantize(dtype=None)` dequantizes on the device the bytes sit on (formats/dequant.py).
- `t.with_raw(buf)` is the SAME weight over other storage (e.g. a view into a GPU slot the runtime
  filled): no copy, checks the byte count.  The runtime streams a unit by
  `slot[a:b].copy_(t.raw, non_blocking=True)` and then either swaps the parameter for
  `t.with_raw(slot[a:b])` (GGUF ops below dequantize it on use) or calls
  `dequantize(slot[a:b], t.qtype, t.shape, dtype)` itself.

It survives `nn.Parameter(t, requires_grad=False)` (Parameter returns the GGUFTensor itself, flagged
as a parameter), `module.to(...)`, `module.state_dict()`, `load_state_dict(sd, assign=True)` and
`copy.deepcopy`.  Any other torch op applied to it (e.g. an unmodified nn.Linear's F.linear) falls
back to dequantizing on the fly, so results stay correct even where no GGUF op layer was installed;
`load_state_dict` without assign into a dense parameter copies the dequantized values.
Ops layer, in the shape of ComfyUI-GGUF's ops.py: one mixin, `GGUFLayer`, does "parameter -> dense
weight on the input's device (+ per-call patches)" (`gguf_weight`) and takes GGUF tensors from a
state dict as they are; each op (`GGUFLinear`, `GGUFConv1d/2d/3d`, `GGUFEmbedding`, `GGUFLayerNorm`,
`GGUFGroupNorm`) only writes its `forward_gguf` in a line or two.  They dequantize GGUF parameters
ON THE COMPUTE DEVICE (the input's) on every call: the per-call path ("resident quantized" or
"streamed quantized").  `gguf_ops(module)` switches the matching submodules of a built model to
these classes in place (class swap only; no tensor copied).  A host framework subclasses an op with
its own layer class (ComfyUI: `class Linear(GGUFLinear, comfy.ops.manual_cast.Linear)`) and may
override `forward` to take its own path when the layer holds no GGUF parameter.  Dequantization per
call can be overridden by setting `module.gguf_dequant_override = fn(module, name, tensor, device,
dtype) -> Tensor`.

For the runtime (moving GGUF weights)
- `raw` from `load_gguf` is a read-only view of the file mapping: copy it into the pinned host arena
  (`arena[a:b].copy_(t.raw)`) and re-home the parameter as `t.with_raw(arena[a:b])`.  Any byte
  offset works for the CUDA kernel; the CPU (eager) path copies odd-offset slices once.
- Streaming: `slot[a:b].copy_(t.raw, non_blocking=True)` on the copy stream, then on the compute
  stream after the copy event: `dequantize(slot[a:b], t.qtype, t.shape, dtype, check=False)`.  Size
  a slot by `t.stored_nbytes`; the dense result is a transient allocation of the compute stream
  unless the runtime keeps it (the "resident dequantized" choice).
- Parameters must keep requires_grad=False; `torch.load(weights_only=True)` cannot rebuild a
  GGUFTensor (pickling works with weights_only=False).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_map

from ..errors import GGUFError
from .dequant import PLAIN_TYPES, check_supported, dequantize as _dequantize, quantized_nbytes

aten = torch.ops.aten

__all__ = ["GGUFTensor", "is_gguf", "materialize", "GGUFLayer", "GGUFLinear", "GGUFConv1d", "GGUFConv2d",
           "GGUFConv3d", "GGUFEmbedding", "GGUFLayerNorm", "GGUFGroupNorm", "gguf_ops"]


class GGUFTensor(torch.Tensor):
    """Quantized GGUF weight; see the module docstring."""

    raw: torch.Tensor
    qtype: object
    gguf_name: str | None
    # set by the streaming runtime while the weight's unit runs: the weight already dequantized (by one
    # batched kernel per unit, runtime/gguf_stream.py's UnitDequant); None otherwise
    _dq: torch.Tensor | None = None

    __torch_function__ = torch._C._disabled_torch_function_impl

    @staticmethod
    def __new__(cls, raw: torch.Tensor, qtype, shape: Sequence[int], dtype: torch.dtype = torch.bfloat16,
                *, name: str | None = None, stored_shape: Sequence[int] | None = None, check: bool = True):
        shape = torch.Size(int(s) for s in shape)
        stored_shape = None if stored_shape is None else torch.Size(int(s) for s in stored_shape)
        if stored_shape == shape:
            stored_shape = None
        if check:
            qt = check_supported(qtype, name)
            if raw.dtype != torch.uint8:
                raise GGUFError(f"GGUFTensor {name or ''} needs uint8 raw blocks, got {raw.dtype}")
            if stored_shape is not None and stored_shape.numel() != shape.numel():
                raise GGUFError(f"tensor {name!r}: stored shape {list(stored_shape)} and shape "
                                f"{list(shape)} differ in element count")
            want = quantized_nbytes(qt, stored_shape or shape, name)
            if raw.numel() != want:
                raise GGUFError(f"tensor {name!r} of type {qt.name} and shape {list(shape)} needs {want} "
                                f"bytes, got {raw.numel()}")
            if not dtype.is_floating_point:
                raise GGUFError(f"GGUFTensor {name or ''}: dequantization dtype must be floating, got {dtype}")
        else:
            qt = qtype
        if raw.dim() != 1 or not raw.is_contiguous():
            raw = raw.contiguous().reshape(-1)
        self = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=raw.device,
                                                   requires_grad=False)
        self.raw = raw
        self.qtype = qt
        self.gguf_name = name
        self.stored_shape = stored_shape
        return self

    # -- plain data ---------------------------------------------------------------------------
    @property
    def stored_nbytes(self) -> int:
        return self.raw.numel()

    @property
    def is_quantized_gguf(self) -> bool:
        return self.qtype not in PLAIN_TYPES

    def __repr__(self, *, tensor_contents=None):
        return (f"GGUFTensor({self.qtype.name}, shape={list(self.shape)}, dtype={self.dtype}, "
                f"device={self.device}, stored={self.raw.numel()} B"
                + (f", name={self.gguf_name!r}" if self.gguf_name else "") + ")")

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense tensor of the logical shape, on the device the bytes sit on."""
        d = self._dq
        if d is not None and d.dtype == (dtype or self.dtype):
            return d
        return _dequantize(self.raw, self.qtype, self.shape, dtype or self.dtype, check=False)

    def with_raw(self, raw: torch.Tensor, dtype: torch.dtype | None = None) -> "GGUFTensor":
        """The same weight over other bytes (a slot view, pinned copy...): no copy, size checked."""
        if raw.dtype != torch.uint8 or raw.numel() != self.raw.numel():
            raise GGUFError(f"with_raw for {self.gguf_name or 'GGUF tensor'} ({self.qtype.name}) needs "
                            f"{self.raw.numel()} uint8 bytes, got {raw.numel()} {raw.dtype}")
        return GGUFTensor(raw, self.qtype, self.shape, dtype or self.dtype, name=self.gguf_name,
                          stored_shape=self.stored_shape, check=False)

    def as_parameter(self) -> nn.Parameter:
        return nn.Parameter(self, requires_grad=False)

    # -- torch integration ----------------------------------------------------------------------
    def __tensor_flatten__(self):
        return ["raw"], (self.qtype, tuple(self.shape), self.dtype, self.gguf_name, self.stored_shape)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        qtype, shape, dtype, name, stored_shape = meta
        return GGUFTensor(inner["raw"], qtype, shape, dtype, name=name, stored_shape=stored_shape,
                          check=False)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        out = _same(self, self.raw.clone())
        if getattr(self, "_is_param", False):
            out = nn.Parameter(out, requires_grad=False)
        memo[id(self)] = out
        return out

    def __reduce_ex__(self, proto):
        return (_rebuild, (self.raw.cpu(), int(self.qtype), tuple(self.shape), self.dtype, self.gguf_name,
                           None if self.stored_shape is None else tuple(self.stored_shape)))

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        handler = _HANDLERS.get(func)
        if handler is not None:
            return handler(func, args, kwargs)
        # anything else: compute on dequantized values (correct, not fast), in the floating dtype of
        # the op's other tensor arguments when there are any (x @ W with x float32 -> W float32)
        dtype = None
        for x in list(args) + list(kwargs.values()):
            if isinstance(x, torch.Tensor) and not isinstance(x, GGUFTensor) and x.dtype.is_floating_point:
                dtype = x.dtype
                break

        def unwrap(x):
            return x.dequantize(dtype) if isinstance(x, GGUFTensor) else x
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def _rebuild(raw, qtype, shape, dtype, name, stored_shape=None):
    return GGUFTensor(raw, qtype, shape, dtype, name=name, stored_shape=stored_shape)


def _same(t: GGUFTensor, raw: torch.Tensor | None = None, dtype=None) -> GGUFTensor:
    return GGUFTensor(t.raw if raw is None else raw, t.qtype, t.shape, dtype or t.dtype, name=t.gguf_name,
                      stored_shape=t.stored_shape, check=False)


def _h_alias(func, args, kwargs):
    return _same(args[0])


def _h_to_copy(func, args, kwargs):
    t = args[0]
    device = kwargs.get("device")
    dtype = kwargs.get("dtype")
    raw = t.raw
    if device is not None and torch.device(device) != raw.device:
        raw = raw.to(device, non_blocking=bool(kwargs.get("non_blocking", False)))
    else:
        raw = raw.clone()
    if kwargs.get("pin_memory") and raw.device.type == "cpu" and not raw.is_pinned():
        raw = raw.pin_memory()
    if dtype is not None and not dtype.is_floating_point:
        raise GGUFError(f"cannot convert GGUF tensor {t.gguf_name or ''} ({t.qtype.name}) to {dtype}; "
                        "only floating dequantization targets exist")
    return _same(t, raw, dtype)


def _h_clone(func, args, kwargs):
    return _same(args[0], args[0].raw.clone())


def _h_copy_(func, args, kwargs):
    dst, src = args[0], args[1]
    nb = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
    if isinstance(dst, GGUFTensor):
        if not isinstance(src, GGUFTensor):
            raise GGUFError(f"cannot copy a dense tensor into quantized {dst.qtype.name} tensor "
                            f"{dst.gguf_name or ''}: DisTorch does not quantize; load with assign=True")
        if src.qtype != dst.qtype or src.shape != dst.shape:
            raise GGUFError(f"copy between GGUF tensors of different type/shape: {src.qtype.name} "
                            f"{list(src.shape)} -> {dst.qtype.name} {list(dst.shape)}")
        dst.raw.copy_(src.raw, non_blocking=nb)
        return dst
    return dst.copy_(src.dequantize(dst.dtype), non_blocking=nb)


def _h_is_pinned(func, args, kwargs):
    return args[0].raw.is_pinned()


def _h_pin(func, args, kwargs):
    return _same(args[0], args[0].raw.pin_memory())


def _h_empty_like(func, args, kwargs):
    t = args[0]
    device = kwargs.get("device") or t.raw.device
    raw = torch.empty(t.raw.shape, dtype=torch.uint8, device=device,
                      pin_memory=bool(kwargs.get("pin_memory", False)))
    return _same(t, raw, kwargs.get("dtype"))


def _h_meta_only(func, args, kwargs):
    # shape / metadata queries answered from the wrapper alone
    if func is aten.is_same_size.default:
        return tuple(args[0].shape) == tuple(args[1].shape)
    raise AssertionError(func)


_HANDLERS = {
    aten.detach.default: _h_alias,
    aten.alias.default: _h_alias,
    aten._to_copy.default: _h_to_copy,
    aten.clone.default: _h_clone,
    aten.copy_.default: _h_copy_,
    aten.is_pinned.default: _h_is_pinned,
    aten._pin_memory.default: _h_pin,
    aten.empty_like.default: _h_empty_like,
    aten.is_same_size.default: _h_meta_only,
}



_PLAIN = (torch.Tensor, nn.Parameter)


def is_gguf(t) -> bool:
    """True for a GGUFTensor (parameter or not); cheap for plain tensors (the runtime asks per tensor)."""
    return type(t) not in _PLAIN and isinstance(t, GGUFTensor)


def materialize(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype | None = None):
    """Dense weight on `device` for compute: GGUF bytes move quantized, then dequantize there."""
    if t is None:
        return None
    if isinstance(t, GGUFTensor):
        d = t._dq
        if d is not None and d.dtype == (dtype or t.dtype) and d.device == device:
            return d           # dequantized with its whole unit this call (read-only: do not modify)
        raw = t.raw
        if raw.device != device:
            raw = raw.to(device, non_blocking=True)
        return _dequantize(raw, t.qtype, t.shape, dtype or t.dtype, check=False)
    if t.device != device or (dtype is not None and t.dtype != dtype):
        return t.to(device=device, dtype=dtype if dtype is not None else t.dtype, non_blocking=True)
    return t

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

    def gguf_weight(self, name: str, x: torch.Tensor, dtype: torch.dtype | None):
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

    def forward(self, *args, **kwargs):
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
    def forward_gguf(self, x):
        d = _float(x)
        return F.linear(x, self.gguf_weight("weight", x, d), self.gguf_weight("bias", x, d))


class _GGUFConv(GGUFLayer):
    def forward_gguf(self, x):
        d = _float(x)
        return self._conv_forward(x, self.gguf_weight("weight", x, d), self.gguf_weight("bias", x, d))


class GGUFConv1d(_GGUFConv, nn.Conv1d):
    pass


class GGUFConv2d(_GGUFConv, nn.Conv2d):
    pass


class GGUFConv3d(_GGUFConv, nn.Conv3d):
    pass


class GGUFEmbedding(GGUFLayer, nn.Embedding):
    def forward_gguf(self, x, out_dtype=None):
        w = self.gguf_weight("weight", x, out_dtype)     # dequantized straight into the dtype asked for
        return F.embedding(x, w, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)


class GGUFLayerNorm(GGUFLayer, nn.LayerNorm):
    def forward_gguf(self, x):
        d = _float(x)
        return F.layer_norm(x, self.normalized_shape, self.gguf_weight("weight", x, d),
                            self.gguf_weight("bias", x, d), self.eps)


class GGUFGroupNorm(GGUFLayer, nn.GroupNorm):
    def forward_gguf(self, x):
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
