"""GGUF weights in the streaming runtime: quantized bytes in the homes, across the bus, in the slots.

How a GGUF parameter (formats.gguf_tensor.GGUFTensor: a wrapper whose only storage is `raw`, the
blocks as stored) goes through runtime/apply.py:

* streamed quantized ("streamed_q"): the unit's home holds `p.raw` (stored bytes, not numel x 2);
  one copy per unit moves those bytes into a slot, and binding the unit to the slot is `p.raw = view`
  (the same parameter object; ~0.1 us, like `param.data = view` for dense tensors).  The layer then
  dequantizes from the slot on the compute stream, after the copy event, on every call (the GGUF ops
  layer, `gguf_ops`, or GGUFTensor's dispatch fallback).  The runtime's per-unit parameter lists hold
  a `RawBinder` for such a parameter, so the hot path stays one `x.data = view` per tensor.
* resident quantized ("resident_q", the default for GGUF weights of a unit on the compute device):
  `p.raw` moves to the compute device once; dequantized on every call.
* resident dequantized ("resident_dq"): apply() replaces the parameter, at every site inside the unit,
  by a dense parameter (GGUFTensor.dtype, bfloat16 by default) on the compute device: more VRAM, no
  per-call work.  undo() puts the original GGUF parameter back.  Outputs equal the resident-quantized
  ones when the layer computes in that dtype (the GGUF ops dequantize into the input's dtype).

The choice per unit is `Plan.quant` (unit name -> one of CHOICES, defined in compiler/plan.py), made by
passes/quant_choice.py.
Units not named there: streamed when offloaded, resident quantized otherwise.

Dequantization is deterministic (formats/dequant.py), so a streamed unit computes bit-identical outputs
to the same unit resident-quantized on the same device.

`gguf_sites` walks a live module for its GGUF parameters (the runtime's view; the compiler records
the same facts per unit at trace time, compiler/trace.py).  Test and benchmark helpers that make
GGUF weights without a file live in formats/testing.py.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from ..compiler.graph import ROOT, owner_lookup
from ..compiler.plan import CHOICES, RESIDENT_DQ, RESIDENT_Q, STREAMED_Q
from ..compiler.ring_layout import align as align_up
from ..errors import DisTorchError
from ..formats.dequant import QUANTIZED_TYPES, dequantize_into
from ..formats.gguf_tensor import is_gguf, materialize

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable
    from ..compiler.plan import Plan

__all__ = ["RawBinder", "binder", "param_of", "set_raw", "home_bytes", "rebind", "to_device", "stored_bytes",
           "UnitDequant", "unit_dequant", "gguf_order", "gguf_sites", "Dequantized", "dequantize_units",
           "is_gguf", "CHOICES", "STREAMED_Q", "RESIDENT_Q", "RESIDENT_DQ"]


class RawBinder:
    """Stands in for a GGUF parameter in the runtime's per-unit lists: `b.data = view` rebinds the
    parameter's quantized bytes (`param.raw = view`), so the hot path needs no type test."""
    __slots__ = ("param",)

    def __init__(self, param: torch.Tensor) -> None:
        self.param = param

    @property
    def data(self) -> torch.Tensor:
        return self.param.raw

    @data.setter
    def data(self, v: torch.Tensor) -> None:
        self.param.raw = v


def binder(p: torch.Tensor) -> torch.Tensor | RawBinder:
    return RawBinder(p) if is_gguf(p) else p


def param_of(b: torch.Tensor | RawBinder) -> torch.Tensor:
    """The parameter behind a runtime list entry: itself, or the one a binder (RawBinder here, CodedBinder
    in runtime/codec_stream.py) stands in for."""
    return b if isinstance(b, torch.Tensor) else b.param


def retag_device(p: torch.Tensor, raw: torch.Tensor) -> None:
    """Make the wrapper report raw's device (p.device), keeping the same parameter object."""
    if p.device != raw.device:
        try:
            torch._C.TensorBase.data.__set__(p, p.with_raw(raw))
        except Exception:   # cosmetic: the bytes' device is what every GGUF op uses
            pass


def set_raw(p: torch.Tensor, raw: torch.Tensor) -> None:
    """Rebind GGUF parameter `p` to bytes `raw` (same count), device tag included."""
    retag_device(p, raw)
    p.raw = raw


def home_bytes(p: torch.Tensor) -> torch.Tensor:
    """What a home holds for parameter p: the stored blocks of a GGUF tensor, else its data."""
    return p.raw if is_gguf(p) else p.data


def rebind(p: torch.Tensor | RawBinder, v: torch.Tensor) -> None:
    """p.data = v, or p.raw = v (device tag too) for a GGUF parameter (or its RawBinder)."""
    q = param_of(p)
    if is_gguf(q):
        set_raw(q, v)
    else:
        q.data = v


def to_device(p: torch.Tensor, dev: torch.device) -> None:
    """Move a resident parameter's storage to `dev` (quantized bytes for GGUF)."""
    if is_gguf(p):
        if p.raw.device != dev:
            set_raw(p, p.raw.to(dev))
        else:
            retag_device(p, p.raw)
    elif p.device != dev:
        p.data = p.data.to(dev)


def stored_bytes(t: torch.Tensor) -> int:
    return int(t.raw.numel()) if is_gguf(t) else int(t.numel()) * int(t.element_size())


# ------------------------------------------------------------------------------------------------
# streamed units: one dequantization launch per run of same-type tensors (instead of one per layer)

class UnitDequant:
    """Batched dequantization of one streamed unit, straight from its slot.

    The unit's GGUF tensors sit back to back in its home layout (classify() orders them by type), so
    a *run* of same-type tensors with no padding between them is one sequence of whole blocks: one
    kernel launch dequantizes the run into a scratch buffer on the compute device, and each weight is
    a view of its part (`param._dq`, which formats.gguf_tensor.materialize / GGUFTensor.dequantize
    return instead of dequantizing again).  Same kernel, same per-weight arithmetic: the outputs are
    bit-identical to per-layer dequantization.  For Flux-dev Q8_0 that is 57 launches per step
    instead of 304 (~40-80 us of host time each).

    `run(s)` (pre-hook, compute stream, after the slot's copy event) launches the runs and sets the
    views; `clear()` (post-hook) unsets them, so nothing outside the unit's call sees scratch memory.
    A layer asking for another dtype than the weight's own (GGUFTensor.dtype) falls back to its
    per-call dequantization.  Plain-typed GGUF tensors (F16/BF16/F32) are left to the per-call path.
    """

    __slots__ = ("layout", "runs", "params", "nbytes", "slot_raw", "slot_raw0")

    def __init__(self, binders: list[torch.Tensor | RawBinder], entries: list) -> None:
        runs = []              # [qtype, byte start, byte end, dtype, [(param, numel, shape)]]
        for b, e in zip(binders, entries):
            p = param_of(b)
            if not is_gguf(p) or p.qtype not in QUANTIZED_TYPES or not p.dtype.is_floating_point:
                continue
            r = runs[-1] if runs else None
            if r is not None and r[0] == p.qtype and r[3] == p.dtype and r[2] == e.offset:
                r[2] = e.offset + e.nbytes
                r[4].append(p)
            else:
                runs.append([p.qtype, e.offset, e.offset + e.nbytes, p.dtype, [p]])
        self.runs = []
        self.params = []
        off = 0
        plan = []
        for qt, a, b, dt, ps in runs:
            n = sum(p.numel() for p in ps)
            isz = torch.empty((), dtype=dt).element_size()
            plan.append((qt, a, b, dt, ps, off, n))
            off = align_up(off + n * isz)
            self.params.extend(ps)
        self.nbytes = off          # scratch bytes this unit needs
        self.layout = plan         # (qtype, byte start, byte end, dtype, params, scratch offset, numel)
        self.slot_raw = None       # per slot: the runs' bytes where the ring puts the unit
        self.slot_raw0 = None      # per slot: the same at the slot's start (a fallback load)

    def bind(self, scratch: torch.Tensor, slot_flats: list[torch.Tensor], offset: int = 0) -> None:
        """Precompute every view: the runs' bytes in each slot (the unit at byte `offset` of the slot,
        where the ring places it, and at 0 for fallback loads) and the weights in `scratch`."""
        runs = []
        for qt, a, b, dt, ps, off, n in self.layout:
            out = scratch[off:off + n * torch.empty((), dtype=dt).element_size()].view(dt)
            dense, k = [], 0
            for p in ps:
                m = p.numel()
                dense.append((p, out[k:k + m].view(p.shape)))
                k += m
            runs.append((qt, a, b, out, dense))
        self.runs = runs
        self.slot_raw0 = [[f[a:b] for _, a, b, _, _ in runs] for f in slot_flats]
        self.rebase(slot_flats, offset)

    def rebase(self, slot_flats: list[torch.Tensor], offset: int) -> None:
        """The unit now sits at byte `offset` of its slot (the ring regrouped its items)."""
        self.slot_raw = [[f[offset + a:offset + b] for _, a, b, _, _ in self.runs] for f in slot_flats]

    def run(self, s: int, fallback: bool = False) -> None:
        for (qt, _a, _b, out, dense), raw in zip(self.runs, (self.slot_raw0 if fallback else self.slot_raw)[s]):
            dequantize_into(raw, qt, out)
            for p, v in dense:
                p._dq = v

    def clear(self) -> None:
        for p in self.params:
            p._dq = None


def unit_dequant(binders: list, entries: list) -> UnitDequant | None:
    """A UnitDequant for a streamed unit with quantized GGUF tensors, else None."""
    if not any(type(b) is RawBinder for b in binders):
        return None
    ud = UnitDequant(binders, entries)
    return ud if ud.layout else None


def gguf_order(item: tuple[str, torch.Tensor]) -> tuple:
    """Sort key for a unit's (name, parameter) list: dense tensors first, then GGUF ones grouped by
    type and dequantization dtype (stable), so same-type GGUF tensors sit back to back in the home."""
    p = item[1]
    if not is_gguf(p):
        return (0, 0, "")
    return (1, int(p.qtype), str(p.dtype))


# ------------------------------------------------------------------------------------------------
# resident dequantized units

def gguf_sites(module: nn.Module, unit_names: Iterable[str]) -> dict:
    """unit (ROOT for weights outside every unit) -> [(submodule, param name, GGUF parameter)]."""
    owner = owner_lookup([n for n in unit_names if n != ROOT])
    out: dict[str, list] = {}
    for mname, m in module.named_modules(remove_duplicate=False):
        for pn, p in m._parameters.items():
            if p is not None and is_gguf(p):
                out.setdefault(owner(mname) or ROOT, []).append((m, pn, p))
    return out


class Dequantized:
    """Record of the parameters apply() replaced by dense copies (restored by `restore`)."""

    def __init__(self) -> None:
        self.sites: list[tuple] = []       # (module, name, original GGUF parameter)
        self.units: list[str] = []
        self.dense_bytes = 0
        self.stored_bytes = 0

    def restore(self, device: str | torch.device | None) -> None:
        dev = None if device is None else torch.device(device)
        for m, pn, orig in self.sites:
            m._parameters[pn] = orig
            if dev is not None:
                to_device(orig, dev)
        self.sites = []


def dequantize_units(module: nn.Module, plan: Plan, device: str | torch.device) -> Dequantized:
    """Honour plan.quant == RESIDENT_DQ: dense copies on `device` for the GGUF parameters of those
    units (which must be resident).  Checks every choice in plan.quant."""
    rec = Dequantized()
    quant = dict(getattr(plan, "quant", None) or {})
    if not quant:
        return rec
    homes = {u.name: u.device for u in plan.units}
    for name, choice in quant.items():
        if choice not in CHOICES:
            raise DisTorchError(f"plan.quant[{name!r}] = {choice!r}: expected one of {', '.join(CHOICES)}")
        if name not in homes:
            raise DisTorchError(f"plan.quant names unit {name!r}, which is not in the plan")
        resident = homes[name] == plan.compute
        if choice == STREAMED_Q and resident:
            raise DisTorchError(f"plan.quant[{name!r}] = {STREAMED_Q!r} but the unit is placed on the compute "
                                f"device {plan.compute}; use {RESIDENT_Q!r} or {RESIDENT_DQ!r}")
        if choice != STREAMED_Q and not resident:
            raise DisTorchError(f"plan.quant[{name!r}] = {choice!r} but the unit is streamed from "
                                f"{homes[name]}; use {STREAMED_Q!r}")
    want = [n for n, c in quant.items() if c == RESIDENT_DQ]
    if not want:
        return rec
    sites = gguf_sites(module, [u.name for u in plan.units])
    dense_of: dict[int, nn.Parameter] = {}
    dev = torch.device(str(device)) if not str(device).startswith("cpu") else torch.device("cpu")
    with torch.no_grad():
        for name in want:
            for m, pn, p in sites.get(name, []):
                d = dense_of.get(id(p))
                if d is None:
                    d = nn.Parameter(materialize(p, dev, p.dtype), requires_grad=False)
                    dense_of[id(p)] = d
                    rec.dense_bytes += d.numel() * d.element_size()
                    rec.stored_bytes += p.raw.numel()
                    if p.raw.device.type == "cuda":     # the dense copy replaces them in VRAM
                        set_raw(p, p.raw.to("cpu"))
                m._parameters[pn] = d
                rec.sites.append((m, pn, p))
            rec.units.append(name)
    return rec
