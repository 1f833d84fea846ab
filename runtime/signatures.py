"""Input signatures of a compiled module's forward, and the tuning remembered per signature.

One compiled model is sampled at several input sizes (a 1024x1024 image, then 512x512; a video model's
frame count): its units compute for different times, so the ring's slot count and the measured
prediction that fit one size do not fit another (runtime/autotune.py measures and tunes per signature).

    signature(args, kwargs)   the forward's tensor arguments as a hashable key: (name, dtype, shape) per
                              tensor, nested lists / tuples / dicts walked a few levels deep (a bounded
                              walk: ComfyUI's transformer_options is a large dict), where only tensors of
                              _NESTED_NUMEL elements or more count; everything that is not a tensor is
                              ignored (a step counter must not make every forward new)
    text(key)                 the key as one readable string, the name under which a Plan keeps it
    Tunings                   what was measured per signature text, least recently used first, at most
                              `cap` of them; `plan_view()` is the JSON-able copy kept in
                              plan.predicted["by_signature"] (a later compile with the same plan re-applies
                              it without measuring)

No torch work here beyond reading `.dtype` / `.shape`: the key is computed on every outermost forward.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch

__all__ = ["signature", "text", "Tunings", "MAX_SIGNATURES"]

MAX_SIGNATURES = 8          # signatures remembered (LRU)
_DEPTH = 3                  # container levels walked below an argument
_ITEMS = 32                 # items walked per container
_TENSORS = 64               # tensors per key, at most
_VISITS = 256               # container items looked at per forward, at most (host time per forward)
_NESTED_NUMEL = 64          # a tensor inside a container counts from this many elements: a schedule or a
#                             per-sample scalar there (ComfyUI's transformer_options["sample_sigmas"] has
#                             steps + 1 of them) changes nothing the units compute

_DTYPES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
           torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
           torch.bool: "b"}


def _walk(obj: Any, name: str, out: list, depth: int, budget: list) -> None:
    if isinstance(obj, torch.Tensor):
        if depth == 0 or obj.numel() >= _NESTED_NUMEL:
            out.append((name, obj.dtype, tuple(obj.shape)))
        return
    if depth >= _DEPTH or len(out) >= _TENSORS or budget[0] <= 0:
        return
    if isinstance(obj, (list, tuple)):
        for v in obj[:_ITEMS]:
            budget[0] -= 1
            _walk(v, name, out, depth + 1, budget)
    elif isinstance(obj, dict):
        for j, (k, v) in enumerate(obj.items()):
            if j >= _ITEMS or budget[0] <= 0:
                break
            budget[0] -= 1
            if isinstance(v, (torch.Tensor, list, tuple, dict)):
                _walk(v, f"{name}.{k}", out, depth + 1, budget)


def signature(args: tuple, kwargs: dict | None = None) -> tuple:
    """The tensors among `args` and `kwargs` (nested containers a few levels deep, _VISITS items in all)
    as a hashable key of (argument name or position, dtype, shape) entries; () when the forward has no
    tensor argument."""
    out: list = []
    budget = [_VISITS]
    for i, a in enumerate(args):
        _walk(a, str(i), out, 0, budget)
    if kwargs:
        for k, v in kwargs.items():
            _walk(v, k, out, 0, budget)
    return tuple(out)


def text(key: tuple) -> str:
    """A signature key as one string: "0:f32[2,4,64,64] context:bf16[2,77,2048] ..." ("-" when empty)."""
    parts = [f"{n}:{_DTYPES.get(d, str(d).replace('torch.', ''))}[{','.join(map(str, s))}]" for n, d, s in key]
    return " ".join(parts) or "-"


class Tunings:
    """Per signature text: what its measurement gave (an entry dict), least recently used first.

    An entry holds "slots" (the ring's slot count for it), "tuned" (True: the count was chosen for it;
    False: measured for the prediction only, the ring left as it was) and "predicted" (the plan.predicted
    fields of its measured prediction); keys starting with "_" (the measured step, the autotune result)
    live on the runtime only and are not copied into the plan."""

    def __init__(self, cap: int = MAX_SIGNATURES) -> None:
        self.cap = max(1, int(cap))
        self.entries: OrderedDict[str, dict] = OrderedDict()

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, sig: object) -> bool:
        return sig in self.entries

    def get(self, sig: str) -> dict | None:
        """The entry of `sig` (now the most recently used), or None."""
        e = self.entries.get(sig)
        if e is not None:
            self.entries.move_to_end(sig)
        return e

    def put(self, sig: str, entry: dict) -> None:
        """Remember `entry` for `sig` as the most recently used; the least recently used beyond `cap` go."""
        self.entries[sig] = entry
        self.entries.move_to_end(sig)
        while len(self.entries) > self.cap:
            self.entries.popitem(last=False)

    def plan_view(self) -> dict:
        """{signature text: entry without its "_" keys}, least recently used first (JSON-able)."""
        return {s: {k: v for k, v in e.items() if not k.startswith("_")} for s, e in self.entries.items()}

    def load(self, view: dict | None) -> None:
        """Entries from a plan's plan_view() (a later compile with the same plan)."""
        for s, e in (view or {}).items():
            if isinstance(e, dict) and isinstance(e.get("predicted"), dict) and int(e.get("slots") or 0) >= 1:
                self.put(str(s), dict(e))
