"""Streamed GGUF units dequantized in their slot: one kernel launch per run of same-type tensors.

A part (runtime/hooks.py) covering the streamed units that hold quantized GGUF tensors.  `pre(i)` runs
unit i's UnitDequant (runtime.gguf_stream) on the compute stream right after the ring bound the unit to
its slot and waited for the slot's copy, reading the bytes where the ring put them (`bind` and `rebase`
follow the ring's slots and items); `post(i)` drops the dequantized views, so nothing outside the unit's
call sees scratch memory.  One scratch buffer on the compute device, as large as the largest unit's
dequantized tensors, serves every unit (units run one at a time).

Default on for CUDA (saves ~40-80 us of host time per layer, instead of one launch per layer); off on a
CPU, where the eager dequantizer is faster layer by layer (cache-sized pieces) and there is no launch
cost to save.
"""
from __future__ import annotations

from . import gguf_stream as _gs
from .hooks import UnitPart
from .store import alloc_flat

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .apply import Runtime
    import torch

__all__ = ["SlotDequant"]


class SlotDequant(UnitPart):
    """UD[i]: unit i's UnitDequant, or None (no quantized GGUF tensor, or `on` false)."""

    def __init__(self, params: list, homes: list, device: str | torch.device, on: bool) -> None:
        self.UD = [_gs.unit_dequant(P, h.layout.entries) if on else None for P, h in zip(params, homes)]
        self.nbytes = max((ud.nbytes for ud in self.UD if ud is not None), default=0)
        self.scratch = alloc_flat(self.nbytes, device, pin=False) if self.nbytes else None
        self.ring = None

    def covers(self, i: int) -> bool:
        return self.UD[i] is not None

    def bind(self, slot_flats: list[torch.Tensor]) -> None:
        """The ring has (new) slots: every view into them and into the scratch, units at the slot's start."""
        if self.scratch is not None:
            for ud in self.UD:
                if ud is not None:
                    ud.bind(self.scratch, slot_flats)

    def rebase(self, i: int, slot_flats: list[torch.Tensor], offset: int) -> None:
        """The ring placed unit i at byte `offset` of its item's slot."""
        ud = self.UD[i]
        if ud is not None:
            ud.rebase(slot_flats, offset)

    def attach(self, rt: Runtime) -> None:
        self.ring = rt.ring

    def pre(self, i: int) -> None:
        ring = self.ring
        self.UD[i].run(ring.cur_s, ring.cur_mode == ring.FALLBACK)

    def post(self, i: int) -> None:
        self.UD[i].clear()

    def detach(self, rt: Runtime) -> None:
        for ud in self.UD:
            if ud is not None:
                ud.clear()
        self.UD = []
        self.scratch = None
