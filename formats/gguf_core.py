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
This module is the tensor alone; formats/gguf_tensor.py re-exports it beside the op layer (GGUFLayer and
the thin GGUF op classes, `gguf_ops`): import from there.

Moving never dequantizes (in inference mode and out of it)
---------------------------------------------------------
Every op that moving, detaching, re-parenting or swapping a parameter produces has a handler below that
keeps the raw blocks: `_to_copy`, `to.dtype_layout` / `to.device` / `to.dtype` / `to.other` (what
`.to()` arrives as under torch.inference_mode(), where the composite `to` is not decomposed; a
no-op `.to()` returns the tensor itself, a dtype-only `.to()` shares the bytes), `detach`, `alias`,
`clone`, `copy_`, `_has_compatible_shallow_copy_type` (asked by `module._apply` and `param.data = ...`:
GGUF with GGUF only), `is_pinned`, `_pin_memory`, `empty_like`.  `param.data = other_gguf` re-points
the parameter's bytes (the `data` property below; torch's own setter would keep the old `raw`), and
`param.data = dense` raises.
Any other op falls back to computing on the dequantized values -- correct for a real compute op (an
unmodified nn.Linear's F.linear, `x + weight`), logged once per op -- with two exceptions that RAISE
GGUFError: an op that would write into a GGUF tensor (it would write into a temporary dense copy), and
every unhandled op in strict mode (`DISTORCH_GGUF_STRICT=1` or `with strict_gguf():`; the tests turn it
on around load / move / unload paths, so a new movement op shows up as an error, not as a silent
dequantization).

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

from typing import Iterator, Sequence

import contextlib
import logging
import os
import threading

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from ..errors import GGUFError
from .dequant import PLAIN_TYPES, check_supported, dequantize as _dequantize, quantized_nbytes

aten = torch.ops.aten

__all__ = ["GGUFTensor", "is_gguf", "materialize", "strict_gguf"]

log = logging.getLogger("distorch.formats.gguf_tensor")   # (the public module's name)
_DATA = torch._C.TensorBase.data          # torch's own .data descriptor (GGUFTensor.data wraps it)
_strict = threading.local()
_noted: set = set()


@contextlib.contextmanager
def strict_gguf(on: bool = True) -> Iterator[None]:
    """Within: an op on a GGUFTensor without a handler raises GGUFError instead of dequantizing (also on
    everywhere with DISTORCH_GGUF_STRICT=1).  Per thread."""
    prev = getattr(_strict, "on", None)
    _strict.on = on
    try:
        yield
    finally:
        _strict.on = prev


def _is_strict() -> bool:
    on = getattr(_strict, "on", None)
    return os.environ.get("DISTORCH_GGUF_STRICT", "") not in ("", "0") if on is None else on


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

    @property
    def data(self) -> torch.Tensor:
        return _DATA.__get__(self)

    @data.setter
    def data(self, new: torch.Tensor) -> None:
        # torch's setter swaps the wrapper's metadata but not the Python-side `raw`: carry the bytes over
        if not isinstance(new, GGUFTensor):
            raise GGUFError(f"cannot set .data of quantized tensor {self.gguf_name or ''} ({self.qtype.name}) "
                            f"to a {type(new).__name__}: assign a new Parameter instead")
        _DATA.__set__(self, new)
        self.raw, self.qtype, self.gguf_name, self.stored_shape = new.raw, new.qtype, new.gguf_name, new.stored_shape
        self._dq = None

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
        _fallback_allowed(func, args, kwargs)
        # a compute op: compute on dequantized values (correct, not fast), in the floating dtype of
        # the op's other tensor arguments when there are any (x @ W with x float32 -> W float32)
        dtype = None
        for x in list(args) + list(kwargs.values()):
            if isinstance(x, torch.Tensor) and not isinstance(x, GGUFTensor) and x.dtype.is_floating_point:
                dtype = x.dtype
                break

        def unwrap(x):
            return x.dequantize(dtype) if isinstance(x, GGUFTensor) else x
        return func(*tree_map(unwrap, args), **tree_map(unwrap, kwargs))


def _first_gguf(args, kwargs):
    for x in list(args) + list(kwargs.values()):
        if isinstance(x, GGUFTensor):
            return x
    return None


def _bind(func, args, kwargs) -> dict:
    """The op's arguments by schema name (defaults filled)."""
    out = {}
    for i, a in enumerate(func._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
    return out


def _fallback_allowed(func, args, kwargs):
    """Raise where dequantizing for `func` would be wrong (it writes into a GGUF argument) or is not
    allowed (strict mode); log the first dequantization per op."""
    t = _first_gguf(args, kwargs)
    name = f"{t.gguf_name or 'GGUF tensor'} ({t.qtype.name}, {list(t.shape)})" if t is not None else "GGUF tensor"
    bound = _bind(func, args, kwargs)
    for a in func._schema.arguments:
        if a.alias_info is not None and a.alias_info.is_write and isinstance(bound.get(a.name), GGUFTensor):
            raise GGUFError(f"{func} would write into quantized {name}: GGUF weights are read-only "
                            "(DisTorch does not quantize)")
    if _is_strict():
        raise GGUFError(f"{func} on {name} has no quantized handler and would dequantize it "
                        "(strict mode: DISTORCH_GGUF_STRICT / strict_gguf)")
    if func not in _noted:
        _noted.add(func)
        log.info("GGUF: %s has no quantized handler; %s dequantized for it (correct, not fast)", func, name)


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


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    if a.index is None and a.type == "cuda":
        a = torch.device("cuda", torch.cuda.current_device())
    return a.index is None or b.index is None or a.index == b.index


def _h_to(func, args, kwargs):
    """aten.to.* (reaches Python under inference mode): move the bytes / change the dequantization
    target; the tensor itself when nothing changes (as aten.to), the same bytes on a dtype-only change."""
    t = args[0]
    a = _bind(func, args, kwargs)
    device, dtype = a.get("device"), a.get("dtype")
    other = a.get("other")
    if not isinstance(t, GGUFTensor):           # dense.to(gguf): the GGUF tensor's device and dtype
        return t.to(device=other.device, dtype=other.dtype, non_blocking=bool(a.get("non_blocking")),
                    copy=bool(a.get("copy")))
    if other is not None:
        device, dtype = other.device, (other.dtype if other.dtype.is_floating_point else None)
    if a.get("layout") not in (None, torch.strided):
        raise GGUFError(f"GGUF tensor {t.gguf_name or ''}: layout {a.get('layout')} is not supported")
    if dtype is not None and not dtype.is_floating_point:
        raise GGUFError(f"cannot convert GGUF tensor {t.gguf_name or ''} ({t.qtype.name}) to {dtype}; "
                        "only floating dequantization targets exist")
    dev = t.raw.device if device is None else torch.device(device)
    same = _same_device(dev, t.raw.device)
    dt = dtype or t.dtype
    copy, pin = bool(a.get("copy", False)), bool(a.get("pin_memory") or False)
    if same and not copy and not pin:
        return t if dt == t.dtype else _same(t, t.raw, dt)
    raw = t.raw.clone() if same else t.raw.to(dev, non_blocking=bool(a.get("non_blocking", False)))
    if pin and raw.device.type == "cpu" and not raw.is_pinned():
        raw = raw.pin_memory()
    return _same(t, raw, dt)


def _h_shallow_copy_compatible(func, args, kwargs):
    # module._apply / `param.data = x` ask this: only GGUF over GGUF (our `data` setter moves the bytes)
    return isinstance(args[0], GGUFTensor) and isinstance(args[1], GGUFTensor)


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
    aten.to.dtype_layout: _h_to,
    aten.to.device: _h_to,
    aten.to.dtype: _h_to,
    aten.to.other: _h_to,
    aten._has_compatible_shallow_copy_type.default: _h_shallow_copy_compatible,
}



_PLAIN = (torch.Tensor, nn.Parameter)


def is_gguf(t: object) -> bool:
    """True for a GGUFTensor (parameter or not); cheap for plain tensors (the runtime asks per tensor)."""
    return type(t) not in _PLAIN and isinstance(t, GGUFTensor)


def materialize(t: torch.Tensor | None, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor | None:
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
