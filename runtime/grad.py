"""Exact gradients through streamed weights: autograd keeps its own copy of what it saves from a slot.

A streamed unit runs on views into a slot (runtime/ring.py) that the ring fills with other units'
bytes soon after; its parameters are rebound to other views too.  Autograd saves the tensors a
backward needs -- a weight (by reference, as a leaf), a view of one (`w.t()` inside F.linear) -- so
a backward after the slot was refilled would compute with someone else's bytes.  While a streamed unit
runs with grad enabled, this part installs torch.autograd.graph.saved_tensors_hooks whose pack hook
clones every saved tensor that lives in a slot (or in the GGUF dequantization or bf16 decode scratch) and leaves every
other tensor alone.  Backward then reads exactly the values the forward used: input and weight
gradients equal the uncompiled model's.  The cost is the usual one of training: the weights autograd
saved stay in memory (on the compute device) until backward frees the graph.  Under torch.no_grad /
inference_mode nothing is installed (one `is_grad_enabled()` per unit call).
"""
from __future__ import annotations

import torch

from .hooks import UnitPart
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .apply import Runtime
    from .ring import Ring

__all__ = ["SavedWeights"]


def _unpack(t):
    return t


class SavedWeights(UnitPart):
    """The part (runtime/hooks.py); composed after the ring and the dequantizer, so its pre runs once the
    unit's weights are bound and its post before the slot is handed on."""

    def __init__(self, ring: Ring, scratch_parts: list) -> None:
        self.ring = ring
        self.scratch_parts = scratch_parts      # parts with a `scratch` buffer units compute from (dequant, codec)
        self.ctx = None
        self._pool = None
        self.ptrs: frozenset = frozenset()
        self.copies = 0            # saved tensors cloned out of a slot (for tests and statistics)

    def _storages(self) -> frozenset:
        pool = self.ring.pool
        if pool is not self._pool:
            flats = list(pool.flats) if pool is not None else []
            for part in self.scratch_parts:
                scratch = getattr(part, "scratch", None)
                if scratch is not None:
                    flats.append(scratch)
            self.ptrs = frozenset(f.untyped_storage().data_ptr() for f in flats)
            self._pool = pool
        return self.ptrs

    def _pack(self, t):
        try:
            ptr = t.untyped_storage().data_ptr()
        except Exception:          # a tensor without a plain storage (a subclass, sparse): not a slot's
            return t
        if ptr in self.ptrs:
            self.copies += 1
            return t.detach().clone()
        return t

    def pre(self, i: int) -> None:
        if torch.is_grad_enabled():
            self._storages()
            ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            ctx.__enter__()
            self.ctx = ctx

    def post(self, i: int) -> None:
        ctx = self.ctx
        if ctx is not None:
            self.ctx = None
            ctx.__exit__(None, None, None)

    def detach(self, rt: Runtime) -> None:
        self.post(-1)
        self._pool = None
        self.ptrs = frozenset()
