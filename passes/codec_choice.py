"""Codec-choice pass: which offloaded units stream their bf16/fp16 weights losslessly compressed.

    plan = choose_codec(plan, graph, inventory, mode="auto", budget_bytes=None)
    info = codec_info(plan, graph, inventory)   # per candidate: dense / packed bytes, link s saved, decode s
    sizes = streamed_sizes(plan)                # offloaded unit -> its bytes as streamed (slots, copies)

Plain data in and out: the facts come from the graph (`Unit.codec`, recorded by compiler/trace.py from
the weights or by compiler/files.py from a header: the codable tensors' dense bytes and their estimated
packed bytes), the decode cost from compiler/cost.py (`decode_seconds`); no live module, no runtime.
Plan.codec records the choice (unit name -> its predicted bytes as streamed: compressed codable tensors +
the rest raw); runtime/codec_stream.py carries it out.

Why.  A fully offloaded model is link-bound: each step moves every offloaded byte over PCIe.  Packed, a
trained bf16 tensor is ~0.68 of its bytes (fp16 ~0.86), so the copy is shorter -- but the GPU then decodes
it after the copy, on the compute stream, which lengthens the unit's compute.  Whether that pays depends on
how the step interleaves compute and copies, so the simulation that sizes the ring decides, per unit.

Candidates: offloaded units (`plan.offloaded()`) whose graph unit has codable tensors packing smaller than
they are (a GGUF or fp8 unit has none, so it is never one).  A compressed unit streams
`bytes - dense_bytes + est_bytes` and its compute per step grows by `decode_seconds(dense_bytes, tensors)`
x calls (a measured `Unit.time_s` is without decoding).  The ring keeps the plan's slot count; its slots
shrink to the largest offloaded unit as streamed.

Policy ("auto"): candidates in order of link seconds saved per decode second; the step is simulated
(compiler.cost.simulate, with the GGUF dequantization quant_choice counts) for every prefix of that order
-- O(n) simulations -- and the fastest prefix is kept only when its step is at least MIN_GAIN faster than
all raw, so a compute-bound step never gets slower.  With estimated unit times (no measured Unit.time_s)
a prefix is scored by the mean of its step at the estimate and at FAST_SCALE x the estimated compute: the
FLOP-rate estimate of a GPU's compute ran ~30 % high for Flux-dev on an H200, and on the estimate alone
the choice compressed 42 of 255 units at a 12 GiB offload (0.229 s/it measured) where all of them ran at
0.219 (bench/results/codec_stream_h200.md).  mode "on": every candidate; "off": none (the plan is
unchanged but for predicted["codec"]).

VRAM: the compute device's footprint changes by (new slots - old slots) + the decode scratch (ONE buffer
the size of the largest compressed unit's codable dense bytes, each tensor aligned; a host computing
decodes into host memory: 0 device bytes, like quant_choice.working_bytes).  It must stay within the
plan's budget (`budget_bytes`, else predicted["budget_bytes"], within the compute device's free bytes)
or, for a plan already over it, not grow: the unit with the largest dense bytes is dropped until it fits
(predicted["codec"]["dropped"] names them).

predicted: step_s, compute_s, stall_s, overhead_s, floor_s, per_link_bytes / per_link_s (as streamed),
n_slots, slot_bytes, window_footprint_bytes, compute_peak_bytes / peak_bytes, window_max_bytes, and
predicted["codec"] = {"mode", "units", "raw_bytes", "stored_bytes", "decode_s_per_step", "decode_s_by_unit",
"decode_scale", "scratch_bytes", "step_s_raw", "candidates", "limit_bytes", "dropped"}.  The decode cost is
compiler.cost.decode_seconds times the graph's `decode_scale` (1 until a measured step of this model that
streamed compressed showed otherwise: runtime/timebook.py; an H200 decoded Flux-dev's layers at ~250 GB/s
beside its compute where the Triton decoder alone runs at ~470).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from ..compiler.cost import StepModel, decode_seconds
from ..compiler.inventory import is_host
from ..compiler.plan import Plan
from ..compiler.ring_layout import ALIGN, MAX_SLOTS, align
from ..errors import DisTorchError
from .budget import primary_then_regret, slot_bytes_of
from .quant_choice import RESIDENT_DQ, _units_with_times, quant_info

if TYPE_CHECKING:
    from typing import Callable
    from ..compiler.graph import ModuleGraph
    from ..compiler.inventory import Inventory

__all__ = ["choose_codec", "choose_codec_with_room", "codec_info", "streamed_sizes", "scratch_bytes", "codec_table",
           "UnitCodec", "CodecChoiceError", "MODES", "MIN_GAIN"]

log = logging.getLogger("distorch.passes.codec_choice")

MODES = ("auto", "on", "off")
MIN_GAIN = 0.01      # "auto" compresses only for a simulated step at least 1 % faster than all raw
FAST_SCALE = 0.5     # with estimated unit times, also weigh compute at this x the estimate (passes/granularity.py)


class CodecChoiceError(DisTorchError):
    """The codec-choice pass cannot decide: a bad mode or budget, or a plan and graph that do not match."""


@dataclass
class UnitCodec:
    """Codec facts of one offloaded unit, and what streaming it compressed saves and costs per step."""
    name: str
    home: str
    bytes: int                  # the unit's bytes, raw
    tensors: int                # its codable tensors
    dense_bytes: int            # their bytes, raw
    est_bytes: int              # their packed bytes, estimated
    largest_dense: int = 0
    calls: int = 1
    decode_s: float = 0.0       # compute-stream seconds per step to decode them, x calls
    link_s_saved: float = 0.0   # link seconds per step the smaller copy saves

    @property
    def streamed(self) -> int:
        """Its bytes as streamed when compressed."""
        return self.bytes - self.dense_bytes + self.est_bytes

    @property
    def saved(self) -> int:
        return self.dense_bytes - self.est_bytes

    @property
    def value(self) -> float:
        """Link seconds saved per decode second (the order "auto" takes candidates in)."""
        return self.link_s_saved / self.decode_s if self.decode_s > 0 else float("inf")


def codec_info(plan: Plan, graph: ModuleGraph, inventory: Inventory) -> dict[str, UnitCodec]:
    """unit name -> UnitCodec for every offloaded unit of `plan` whose graph unit (`Unit.codec`) has codable
    tensors that pack smaller than they are, in execution order."""
    units = {u.name: u for u in graph.units}
    scale = float(getattr(graph, "decode_scale", 1.0) or 1.0)
    out: dict[str, UnitCodec] = {}
    for pu in sorted(plan.offloaded(), key=lambda u: u.order):
        u = units.get(pu.name)
        f = getattr(u, "codec", None)
        if not f or int(f.get("tensors", 0)) <= 0 or int(f["est_bytes"]) >= int(f["dense_bytes"]):
            continue
        calls = max(1, int(u.calls or 1))
        dense, est = int(f["dense_bytes"]), int(f["est_bytes"])
        out[pu.name] = UnitCodec(pu.name, pu.device, int(pu.bytes), int(f["tensors"]), dense, est,
                                 int(f.get("largest_dense", 0)), calls,
                                 decode_seconds(dense, int(f["tensors"]), plan.compute, scale) * calls,
                                 (dense - est) / inventory.bandwidth(pu.device, plan.compute))
    return out


def streamed_sizes(plan: Plan) -> dict[str, int]:
    """Offloaded unit name -> its bytes as streamed (`plan.codec`, else raw): what its copy moves and its
    share of a slot.  schedule / verify / the runtime size copies and slots with these."""
    return plan.streamed_sizes()


def scratch_bytes(info: dict[str, UnitCodec], chosen: set[str] | list[str], compute: str) -> int:
    """Device bytes of the runtime's one decode buffer (runtime/codec_stream.SlotDecode): the largest chosen
    unit's codable dense bytes, each tensor's place aligned (ALIGN); 0 when the host computes (its decode
    target is host memory)."""
    if is_host(compute):
        return 0
    return max((align(info[n].dense_bytes + ALIGN * info[n].tensors) for n in chosen), default=0)


class _Sim:
    """The step of `plan` for a set of compressed units (one simulation each), and its footprint."""

    def __init__(self, plan: Plan, graph: ModuleGraph, inventory: Inventory, info: dict[str, UnitCodec]) -> None:
        self.plan, self.info = plan, info
        qi = quant_info(plan, graph)
        dq = {n for n, c in (plan.quant or {}).items() if c == RESIDENT_DQ}
        base = _units_with_times(graph, plan.compute, inventory, qi, dq)     # with per-call dequantization
        homes = {u.name: u.device for u in plan.units}
        self.model = StepModel(base, homes, plan.compute, inventory)         # every unit raw
        self.pos = {u.name: i for i, u in enumerate(base) if u.name in info}
        self.ct0 = list(self.model.ct)                                       # compute per unit, raw
        self.raw_ct = {n: self.model.ct[i] for n, i in self.pos.items()}
        # estimated (not measured) unit times: choose_codec also weighs compute at FAST_SCALE x the estimate
        self.estimated = any(u.time_s is None for u in base)
        self.off = {u.name: u for u in graph.units if homes.get(u.name, plan.compute) != plan.compute}
        # one slot's footprint per unit (passes/budget.slot_bytes_of: aligned views), raw and compressed
        self.slot_raw = {n: slot_bytes_of(u) for n, u in self.off.items()}
        self.slot_dec = {n: slot_bytes_of(replace(u, param_bytes=u.param_bytes - info[n].saved))
                         for n, u in self.off.items() if n in info}
        pr = plan.predicted or {}
        k = pr.get("slots")
        if k is None:            # Footprint.slots_for: the runtime's window // largest, at most MAX_SLOTS
            sizes = streamed_sizes(plan)
            big = max(sizes.values(), default=0)
            k = min(MAX_SLOTS, len(sizes), int((plan.window_bytes or 0) // big)) if big else 0
        self.k = max(1, int(k)) if self.off else 0

    def sizes(self, chosen: set[str]) -> dict[str, int]:
        return {n: (self.info[n].streamed if n in chosen else u.bytes) for n, u in self.off.items()}

    def window(self, chosen: set[str]) -> int:
        return self.k * max(self.sizes(chosen).values(), default=0)

    def slot(self, chosen: set[str]) -> int:
        """One slot's footprint: the largest offloaded unit's as streamed."""
        return max((self.slot_dec[n] if n in chosen else b for n, b in self.slot_raw.items()), default=0)

    def rescale(self, f: float) -> None:
        """Every unit's compute at f x its (estimated or measured) time, every candidate raw."""
        for i, c in enumerate(self.ct0):
            self.model.set(i, compute_s=c * f)
        self.raw_ct = {n: self.ct0[i] * f for n, i in self.pos.items()}
        for n in self.pos:
            self.set(n, False)

    def set(self, name: str, compressed: bool) -> None:
        q = self.info[name]
        self.model.set(self.pos[name], compute_s=self.raw_ct[name] + (q.decode_s if compressed else 0.0),
                       nbytes=q.streamed if compressed else q.bytes)

    def run(self, chosen: set[str], window: int | None = None) -> dict:
        for n in self.pos:
            self.set(n, n in chosen)
        return self.step(chosen, window)

    def step(self, chosen: set[str], window: int | None = None) -> dict:
        """Simulate the units as they are set now (set() them first), `chosen` compressed."""
        return self.model.run(self.window(chosen) if window is None else window)


def _limit(plan: Plan, inventory: Inventory | None, budget_bytes: int | None) -> int | None:
    """Bytes the compiled model may hold on the compute device (None: unknown)."""
    if budget_bytes is not None:
        if isinstance(budget_bytes, bool) or int(budget_bytes) < 0:
            raise CodecChoiceError(f"budget_bytes {budget_bytes!r}: give the bytes (0 or more) the compiled "
                                   "model may hold on the compute device, or None for the plan's budget")
        return int(budget_bytes)
    cap = (plan.predicted or {}).get("budget_bytes")
    dev = inventory.devices.get(plan.compute) if inventory is not None else None
    free = int(dev.free_bytes) if dev is not None else None
    if cap is None:
        return free
    return int(cap) if free is None else min(int(cap), free)


def _check(plan: Plan, graph: ModuleGraph, mode: str) -> None:
    """CodecChoiceError for a bad mode, no graph, or plan units the graph lacks."""
    if mode not in MODES:
        raise CodecChoiceError(f"codec mode {mode!r}: expected one of {', '.join(MODES)}")
    if graph is None:
        raise CodecChoiceError("choose_codec needs the ModuleGraph the plan was made from")
    names = {u.name for u in graph.units}
    missing = [u.name for u in plan.units if u.name not in names]
    if missing:
        raise CodecChoiceError(f"plan units {missing[:4]} are not in the graph; pass the graph of this plan")


def choose_codec(plan: Plan, graph: ModuleGraph, inventory: Inventory, *, mode: str = "auto",
                 budget_bytes: int | None = None, info: dict[str, UnitCodec] | None = None) -> Plan:
    """A copy of `plan` with `codec` set (see the module docstring) and its predictions updated;
    predicted["codec"] says what was weighed.  `info`: codec_info(plan, graph, inventory) where the caller
    has it already (computed here when None)."""
    _check(plan, graph, mode)
    if info is None:
        info = codec_info(plan, graph, inventory)
    sim = _Sim(plan, graph, inventory, info)
    pr = dict(plan.predicted or {})
    prev = pr.get("codec") if plan.codec else None
    old_scratch = int((prev or {}).get("scratch_bytes", 0) or 0)
    raw_window = plan.window_bytes if not plan.codec else sim.window(set())
    raw = sim.run(set(), raw_window)
    cands = sorted(info, key=lambda n: (-info[n].value, sim.pos[n]))

    chosen: list[str] = []
    scored = None
    if mode == "on":
        chosen = list(cands)
    elif mode == "auto" and cands:
        # prefixes of the candidates (one unit more each, one simulation each), scored by the simulated step;
        # with estimated unit times by the mean of the step at the estimate and at FAST_SCALE x it (estimates
        # of a GPU's compute run high: passes/granularity.py weighs both the same way)
        # with measured times for several inputs (ModuleGraph.time_scales): the largest decides, the others
        # break near-ties (passes/budget.primary_then_regret)
        scales = (1.0, FAST_SCALE) if sim.estimated else (1.0, *getattr(graph, "time_scales", ()))
        steps = [[0.0] * len(scales) for _ in range(len(cands) + 1)]
        for j, f in enumerate(scales):
            sim.rescale(f)
            prefix: set[str] = set()
            steps[0][j] = sim.step(prefix)["step_s"]
            for p, n in enumerate(cands, 1):
                sim.set(n, True)
                prefix.add(n)
                steps[p][j] = sim.step(prefix)["step_s"]
        sim.rescale(1.0)
        if sim.estimated or len(scales) == 1:
            score = [sum(row) / len(scales) for row in steps]
            best_p = min(range(len(score)), key=lambda p: (score[p], p))
        else:
            best_p = primary_then_regret(steps, MIN_GAIN)
            score = [row[0] for row in steps]     # and the gate below is on the largest input's step: the
            #                                       smaller ones never buy compression that slows it
        if score[best_p] <= score[0] * (1 - MIN_GAIN):
            chosen = cands[:best_p]
        scored = {"scales": list(scales), "raw": score[0], "chosen": score[len(chosen)]}

    # VRAM: the footprint without any codec, then with the chosen set; shrink until it fits
    peak0 = pr.get("compute_peak_bytes", pr.get("peak_bytes"))
    wfp0 = pr.get("window_footprint_bytes")
    if wfp0 is None:
        wfp0 = sim.k * sim.slot(set(plan.codec or ()) & set(info))
    if peak0 is None:
        peak0 = sum(u.bytes for u in plan.units if u.device == plan.compute) + int(wfp0) + old_scratch
    fixed = int(peak0) - int(wfp0) - old_scratch           # everything but the slots and the decode scratch
    raw_peak = fixed + sim.k * sim.slot(set())
    limit = _limit(plan, inventory, budget_bytes)
    allowed = raw_peak if limit is None else max(limit, raw_peak)   # an over-budget plan may not grow

    def peak(c: set[str]) -> int:
        return fixed + sim.k * sim.slot(c) + scratch_bytes(info, c, plan.compute)
    dropped: list[str] = []
    while chosen and peak(set(chosen)) > allowed:
        big = max(chosen, key=lambda n: (info[n].dense_bytes, sim.pos[n]))
        chosen.remove(big)
        dropped.append(big)
    cset = set(chosen)
    pred = sim.run(cset) if cset else raw
    note = None
    if dropped and mode == "auto" and cset and pred["step_s"] > raw["step_s"] * (1 - MIN_GAIN):
        note = (f"what fits within {limit} bytes on {plan.compute} is not {MIN_GAIN:.0%} faster than all raw: "
                "nothing compressed")
        dropped += chosen
        chosen, cset, pred = [], set(), raw
    if dropped and note is None:
        note = (f"{len(dropped)} unit(s) left raw to keep the decode scratch and slots within "
                f"{limit} bytes on {plan.compute}")

    order = [n for n in sim.pos if n in cset]                # execution order
    scratch = scratch_bytes(info, cset, plan.compute)
    summary = {"mode": mode, "units": order, "candidates": len(cands),
               "raw_bytes": sum(info[n].bytes for n in order), "stored_bytes": sum(info[n].streamed for n in order),
               "decode_s_per_step": sum(info[n].decode_s for n in order), "scratch_bytes": scratch,
               "decode_s_by_unit": {n: info[n].decode_s for n in order},
               "decode_scale": float(getattr(graph, "decode_scale", 1.0) or 1.0),
               "step_s_raw": raw["step_s"], "limit_bytes": limit, "dropped": dropped, "note": note,
               "score": scored}
    log.debug("codec choice (%s): %d of %d candidates compressed, step %.4f s (all raw %.4f s)%s", mode,
              len(order), len(cands), pred["step_s"], raw["step_s"], f"; {note}" if note else "")
    if not cset and not plan.codec:
        pr["codec"] = summary              # nothing compressed before or now: the plan as it was
        return replace(plan, codec={}, predicted=pr)
    for k in ("step_s", "compute_s", "stall_s", "overhead_s", "floor_s", "per_link_bytes", "per_link_s", "n_slots"):
        pr[k] = pred[k]
    slot = sim.slot(cset)
    new_peak = peak(cset)
    pr["slot_bytes"] = slot
    pr["slots"] = sim.k
    pr["window_footprint_bytes"] = sim.k * slot
    pr["codec_scratch_bytes"] = scratch
    if "peak_bytes" in pr or "compute_peak_bytes" in pr:
        pr["peak_bytes"] = pr["compute_peak_bytes"] = new_peak
    if pr.get("window_max_bytes") is not None:
        # autotune's ring limit (budget or free memory, less all but the slots) less what the scratch grew by;
        # a plan whose ring may not grow (everything offloaded: passes/partition.py) keeps its new window
        fixed_ring = int(pr["window_max_bytes"]) <= int(wfp0)
        pr["window_max_bytes"] = sim.k * slot if fixed_ring else \
            max(sim.k * slot, int(pr["window_max_bytes"]) - (scratch - old_scratch))
    pr["codec"] = summary
    codec = {n: info[n].streamed for n in order}
    return replace(plan, codec=codec, window_bytes=sim.window(cset) if sim.off else plan.window_bytes, predicted=pr)


def choose_codec_with_room(plan: Plan, graph: ModuleGraph, inventory: Inventory, *, mode: str = "auto",
                           repartition: Callable[[int], Plan] | None = None) -> Plan:
    """choose_codec, and where the budget left units raw for want of room (the decode scratch and slots do
    not fit beside the resident weights: predicted["codec"]["dropped"]), also the plan with that room made:
    `repartition(cap_bytes)` places the same graph with at most `cap_bytes` on the compute device (e.g.
    passes.partition with max_vram_gb), the scratch of every candidate less; that plan, compressed within
    the ORIGINAL budget, is kept when its predicted step is at least MIN_GAIN faster.  Its predicted
    ["budget_bytes"] and source are the original plan's; predicted["codec"]["room_bytes"] says how much
    resident weight moved off.  Why: a budget is usually filled to its last layer, so on a tight one (the
    nodes' virtual_vram_gb near the model size) the scratch never fits, though streaming a few more layers
    compressed costs far less link time than the compression saves (Flux-dev, 20 of 22 GiB off on a 12 GiB
    H200: 0.12 GiB of scratch against 0.04 GiB of room)."""
    _check(plan, graph, mode)
    info = codec_info(plan, graph, inventory)        # the original plan's candidates, weighed once
    out = choose_codec(plan, graph, inventory, mode=mode, info=info)
    c = out.predicted.get("codec") or {}
    limit = c.get("limit_bytes")
    if repartition is None or mode == "off" or not c.get("dropped") or limit is None or is_host(plan.compute):
        return out
    everything = [n for n in info if n in set(c.get("units", ())) | set(c["dropped"])]
    need = scratch_bytes(info, everything, plan.compute)
    base = plan.predicted or {}
    cap = int(limit) - need          # placed within this, the scratch (and the slots as streamed) fit the limit
    if cap <= 0:
        return out
    try:
        alt = repartition(cap)
    except DisTorchError as e:           # no placement within that cap: keep what fits
        log.debug("codec choice: no plan with %d bytes of room (%s)", need, e)
        return out
    alt = choose_codec(alt, graph, inventory, mode=mode, budget_bytes=int(limit))
    ac = alt.predicted.get("codec") or {}
    peak = int(alt.predicted.get("compute_peak_bytes", 0) or 0)
    if not ac.get("units") or peak > int(limit) or alt.predicted["step_s"] > out.predicted["step_s"] * (1 - MIN_GAIN):
        return out
    pr = dict(alt.predicted)
    pr["budget_bytes"] = base.get("budget_bytes", pr.get("budget_bytes"))
    pr["codec"] = dict(ac, room_bytes=max(0, sum(u.bytes for u in plan.units if u.device == plan.compute) -
                                          sum(u.bytes for u in alt.units if u.device == alt.compute)),
                       step_s_without_room=out.predicted["step_s"])
    pr["warnings"] = list(base.get("warnings", ()))
    if "granularity" in base:                  # what the placement streams (whole blocks or their layers)
        pr["granularity"] = base["granularity"]
    log.debug("codec choice: %d bytes of resident weights moved off to make room for the decode scratch: "
              "step %.4f -> %.4f s", pr["codec"]["room_bytes"], out.predicted["step_s"], pr["step_s"])
    return replace(alt, predicted=pr, source=dict(plan.source or {}, codec_room_bytes=pr["codec"]["room_bytes"]))


def codec_table(plan: Plan, info: dict[str, UnitCodec]) -> str:
    """One row per candidate: raw / as-streamed MiB, decode ms per step, link ms saved, the choice."""
    rows = [f"{'unit':<30} {'choice':<10} {'raw MiB':>9} {'stream MiB':>10} {'decode ms':>9} {'link ms -':>9}"]
    for n, q in info.items():
        c = "packed" if n in (plan.codec or {}) else "raw"
        rows.append(f"{n[:30]:<30} {c:<10} {q.bytes / 2**20:9.2f} {q.streamed / 2**20:10.2f} "
                    f"{q.decode_s * 1e3:9.3f} {q.link_s_saved * 1e3:9.3f}")
    return "\n".join(rows)
