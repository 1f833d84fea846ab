"""Measured unit times kept for the next compile of the same model: placement from measurements.

    key = model_key(graph)                         # the block-level graph's names, bytes, kinds (a digest)
    BOOK.record(plan, signature, measured_step)    # runtime/autotune.py, after every measured step
    sig = BOOK.apply(graph, key, compute)          # runtime/api.plan_model, before the passes: Unit.time_s
                                                   # from the most demanding signature measured, or None

Why.  The first compile of a model places its units from FLOP-rate estimates, and an estimate can be far
off in either direction (Flux-dev at 1024x1024 on an H200: 0.223 s estimated, 0.158 s measured).  The
placement then answers the wrong question: at 9 GiB offloaded the estimate saw a compute-bound step and
streamed every byte raw, while the measured step was link-bound (10.06 GB at the pinned rate, 0.193 s/it
against a 0.176 s floor) and compressing a third of those bytes would have hidden the link
(bench/results/comfy_vram_h200_r5.json, plan_detail).  The profiled step of every compile measures each
unit; this book keeps those times per model and compute device, per input signature, so that a later
compile of the same model in the process (ComfyUI loads it again after an unload, a new budget, another
LoRA) is placed, split into layers and compressed from measurements.  Its plan says so:
plan.predicted["basis"] = "learned" and ["learned_from"] = the signature; autotune still measures and
re-predicts it (only "measured" turns it off), and that measurement goes back into the book.

What is kept.  Times at the block level of the model (the graph compile traces first): a sub-unit's time
(a layer of a split block, passes/granularity.py) is added to its block's, so a plan split into layers and
one streaming whole blocks feed and read the same entries (the split shares a block's time out again by
parameter count).  The root unit keeps the step's time outside every unit (runtime/measured.py's root).
A unit streamed compressed (Plan.codec) was measured with its decoding, which the codec pass adds on its
own: such a block's time is kept only until a clean measurement (resident or raw) of it comes.  The
signature with the longest compute (its units' and root's times, without waits for the link) is the one a
placement uses (the largest image or video, where the link matters most); the others come with it as
ModuleGraph.time_scales (their compute over that one's, on the units both measured), and what decoding
compressed units cost beside the model's compute, against the codec pass's price for it, as
ModuleGraph.decode_scale (a block's time with decoding less its clean time for the same input; Flux-dev on
an H200 decoded at ~250 GB/s there, where compiler.cost prices the Triton decoder's ~470 alone),
so that the passes weigh a placement at every size measured (512x512 runs at ~0.35x the 1024x1024 step,
where a link-bound plan costs relatively more).  At most MAX_MODELS models are kept, least recently used first.  With
$DISTORCH_TIMEBOOK_DIR set, every entry is also written there as JSON (one file per model and device) and
read back by a later process; $DISTORCH_TIMEBOOK=0 turns the book off (placement from estimates alone).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from typing import TYPE_CHECKING

from ..compiler.graph import ROOT, ModuleGraph

if TYPE_CHECKING:
    from ..compiler.plan import Plan

__all__ = ["TimeBook", "BOOK", "model_key", "enabled", "block_of", "device_id"]

log = logging.getLogger("distorch.runtime.timebook")

MAX_MODELS = 8
ENV_OFF = "DISTORCH_TIMEBOOK"
ENV_DIR = "DISTORCH_TIMEBOOK_DIR"


def enabled() -> bool:
    return os.environ.get(ENV_OFF, "").strip().lower() not in ("0", "off", "false", "no")


def device_id(compute: str) -> str:
    """The compute device as the book keys it: a GPU with its name (a file read by another process may come
    from another card)."""
    if compute.startswith("cuda"):
        try:
            import torch
            return f"{compute} {torch.cuda.get_device_name(torch.device(compute))}"
        except Exception:       # no CUDA here: the plan came from elsewhere
            return compute
    return compute


def model_key(graph: ModuleGraph) -> str:
    """A digest of the block-level graph: unit names, bytes and kinds in order (the same model loaded
    again gives the same key; another dtype or quantization gives another)."""
    h = hashlib.sha1()
    for u in graph.units:
        h.update(f"{u.name}\0{u.bytes}\0{u.kind}\n".encode())
    return h.hexdigest()[:20]


def block_of(name: str, blocks: set[str]) -> str:
    """The block-level unit `name` belongs to: itself, the longest dotted prefix that is one, else ROOT."""
    if name in blocks:
        return name
    parts = name.split(".")
    for k in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:k])
        if p in blocks:
            return p
    return ROOT


class TimeBook:
    """model key + compute device -> {"blocks": [names], "sigs": {signature: {"step_s", "times", "coded"}}}."""

    def __init__(self, max_models: int = MAX_MODELS) -> None:
        self.max_models = max_models
        self.entries: OrderedDict[tuple[str, str], dict] = OrderedDict()

    # -- entries
    def _entry(self, key: str, device: str, blocks: list[str] | None = None) -> dict | None:
        k = (key, device)
        e = self.entries.get(k)
        if e is None:
            e = _read(key, device)
            if e is None and blocks is None:
                return None
            if e is None:
                e = {"blocks": list(blocks), "sigs": {}}
            self.entries[k] = e
            while len(self.entries) > self.max_models:
                self.entries.popitem(last=False)
        self.entries.move_to_end(k)
        return e

    def register(self, key: str, device: str, graph: ModuleGraph) -> None:
        """Make the entry of a block-level graph (its unit names are what later records map onto)."""
        e = self._entry(key, device, [u.name for u in graph.units])
        if e is not None and not e["blocks"]:
            e["blocks"] = [u.name for u in graph.units]

    def clear(self) -> None:
        self.entries.clear()

    # -- recording
    def record(self, plan: "Plan", signature: str | None, m: dict) -> bool:
        """Fold measured step `m` (runtime.stats.measured_step, profiler cost taken out: "times" per unit,
        "step_s", "stall_s") of `plan` into its model's entry for `signature`.  False when the plan carries
        no model key (a plan made elsewhere) or the book is off."""
        key = (plan.source or {}).get("model_key")
        if not key or not enabled() or not m.get("times"):
            return False
        e = self._entry(key, device_id(plan.compute))
        if e is None:
            return False
        blocks = set(e["blocks"])
        coded = set(plan.codec or {})
        times: dict[str, float] = {}
        dirty: set[str] = set()
        for n, t in m["times"].items():
            b = block_of(n, blocks)
            times[b] = times.get(b, 0.0) + float(t)
            if n in coded:
                dirty.add(b)
        root = max(0.0, float(m["step_s"]) - float(m.get("stall_s", 0.0)) - sum(m["times"].values()))
        times[ROOT] = times.get(ROOT, 0.0) + root
        sig = signature or "?"
        old = e["sigs"].get(sig) or {"times": {}, "coded": []}
        old_dirty = set(old["coded"])
        new_times, new_dirty = dict(old["times"]), set(old_dirty)
        for b, t in times.items():
            if b in dirty and b in old["times"] and b not in old_dirty:
                continue                  # a clean time is not replaced by one with decoding in it
            new_times[b] = t
            new_dirty.discard(b)
            if b in dirty:
                new_dirty.add(b)
        e["sigs"][sig] = {"step_s": float(m["step_s"]), "times": new_times, "coded": sorted(new_dirty)}
        ds = _decode_scale(plan, blocks, times, old, old_dirty)
        if ds is not None:
            e["decode_scale"] = ds
            log.debug("timebook: %s on %s: decoding took %.2fx compiler.cost.decode_seconds", key, plan.compute, ds)
        _write(key, device_id(plan.compute), e)
        log.debug("timebook: %s on %s, signature %s: %d unit times (%d with decoding)", key, plan.compute, sig,
                  len(new_times), len(new_dirty))
        return True

    # -- reading
    def lookup(self, key: str, device: str, graph: ModuleGraph) -> tuple[str, dict[str, float], list[float]] | None:
        """(signature, block-level unit -> seconds, time scales) of the longest compute that has a time for
        every unit of `graph`, or None; the scales are the other signatures' compute over that one's."""
        if not enabled():
            return None
        e = self._entry(key, device)
        if e is None:
            return None
        need = [u.name for u in graph.units if u.name != ROOT]
        best = None
        for sig, s in e["sigs"].items():
            if all(n in s["times"] for n in need) and (best is None or _compute(s) > _compute(best[1])):
                best = (sig, s)
        if best is None:
            return None
        scales = sorted({round(min(20.0, max(0.05, r)), 3) for k, s in e["sigs"].items() if k != best[0]
                         for r in [_ratio(s["times"], best[1]["times"])] if r is not None})
        return best[0], dict(best[1]["times"]), scales

    def apply(self, graph: ModuleGraph, key: str, device: str) -> str | None:
        """Set Unit.time_s of every unit of the block-level `graph` from the book (the root's too) and its
        time_scales; returns the signature used, or None (the graph untouched) when the book has no complete
        entry."""
        found = self.lookup(key, device, graph)
        if found is None:
            return None
        sig, times, graph.time_scales = found
        for u in graph.units:
            u.time_s = float(times.get(u.name, 0.0))
        e = self._entry(key, device)
        if e is not None and e.get("decode_scale"):
            graph.decode_scale = float(e["decode_scale"])
        return sig


DECODE_SCALE_MIN, DECODE_SCALE_MAX = 0.5, 4.0
DECODE_COVER = 0.25     # a decode scale needs clean times for blocks holding this share of the coded bytes


def _decode_scale(plan: "Plan", blocks: set, times: dict, old: dict, old_dirty: set) -> float | None:
    """What decoding cost in a step that streamed units compressed, over what the codec pass priced it at
    (plan.predicted["codec"]["decode_s_by_unit"] at its "decode_scale"): per block with a clean time of the
    same input from an earlier step, its time now less that one; None without such blocks for at least
    DECODE_COVER of the coded bytes, or when the pass left no prices.  Clamped to [DECODE_SCALE_MIN,
    DECODE_SCALE_MAX]."""
    pc = (plan.predicted or {}).get("codec") or {}
    priced = pc.get("decode_s_by_unit") or {}
    coded = set(plan.codec or {})
    if not coded or not priced:
        return None
    used = float(pc.get("decode_scale") or 1.0)
    size = {u.name: u.bytes for u in plan.units}
    per_block: dict[str, list] = {}
    for n in coded:
        per_block.setdefault(block_of(n, blocks), []).append(n)
    extra = model = covered = 0.0
    total = sum(size.get(n, 0) for n in coded)
    for b, names in per_block.items():
        if b == ROOT or b not in times or b not in old["times"] or b in old_dirty:
            continue
        extra += times[b] - old["times"][b]
        model += sum(float(priced.get(n, 0.0)) for n in names) / used
        covered += sum(size.get(n, 0) for n in names)
    if model <= 0 or not total or covered < DECODE_COVER * total:
        return None
    return min(DECODE_SCALE_MAX, max(DECODE_SCALE_MIN, extra / model))


def _compute(s: dict) -> float:
    """A signature's step as the units and the root computed it (no waits for the link): what decides
    which input is the largest and how much shorter the others run.  Its measured step_s may be link-bound
    (a streamed row's 512x512 step at 18 GiB off took 0.84x the 1024x1024 one; its compute took 0.35x)."""
    return float(sum(s["times"].values()))


def _ratio(times: dict, ref: dict) -> float | None:
    """Compute time of `times` over `ref`'s, on the units both have measured (None when none)."""
    common = [n for n in times if n in ref]
    a, b = sum(times[n] for n in common), sum(ref[n] for n in common)
    return a / b if common and a > 0 and b > 0 else None


def _path(key: str, device: str) -> str | None:
    d = os.environ.get(ENV_DIR, "").strip()
    if not d:
        return None
    dev = "".join(c if c.isalnum() else "_" for c in device)
    return os.path.join(d, f"{key}_{dev}.json")


def _read(key: str, device: str) -> dict | None:
    p = _path(key, device)
    if p is None or not os.path.exists(p):
        return None
    try:
        with open(p) as f:
            e = json.load(f)
        if isinstance(e, dict) and isinstance(e.get("blocks"), list) and isinstance(e.get("sigs"), dict):
            return e
        log.warning("distorch: %s is not a unit-time file; ignored", p)
    except (OSError, ValueError) as err:
        log.warning("distorch: could not read unit times from %s (%s); ignored", p, err)
    return None


def _write(key: str, device: str, e: dict) -> None:
    p = _path(key, device)
    if p is None:
        return
    try:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            json.dump(e, f)
        os.replace(tmp, p)
    except OSError as err:
        log.warning("distorch: could not write unit times to %s (%s)", p, err)


BOOK = TimeBook()
