"""Quant-choice pass: for every unit with GGUF weights, how they are kept on the compute device.

    plan = choose_quant(plan, graph, inventory, budget_bytes=None, mode="auto")
    info = quant_info(plan, graph)        # per unit: stored / dense bytes, dequant s (what choose_quant weighs)

Plain data in and out: the GGUF facts come from the graph (`Unit.gguf`, recorded by compiler/trace.py),
the dequantization cost per type from compiler/cost.py (`dequant_seconds`); no live module, no runtime.

Choices (compiler/plan.py names them; runtime/gguf_stream.py carries them out; Plan.quant records them):
  streamed_q   the unit is offloaded: its quantized bytes cross the bus, dequantized after the copy,
               every call (the only choice for an offloaded unit: moving bf16 would move 2-4x the bytes)
  resident_q   resident, quantized: dequantized on every call (stored bytes of VRAM)
  resident_dq  resident, dequantized once at apply(): dense bytes of VRAM, no per-call work

Policy ("auto"): the placement (passes/partition.py) is kept.  Resident GGUF units are dequantized
while the VRAM budget allows, biggest per-step dequantization cost first (a unit that does not fit is
skipped, smaller ones may still fit).  The budget is what the compute device has left after the plan's
resident weights and window (`plan.predicted["peak_bytes"]`), less `reserve_bytes` for activations
and less the transient dense copies of the per-call dequantization (two of the largest GGUF tensor) and
the dequantization scratch of streamed units (the dense size of the largest one, CUDA), and within
the plan's own budget (predicted["budget_bytes"]: offload_gb / max_vram_gb, passes/partition.py) when it
has one; `budget_bytes` overrides it.  `working_bytes` is the one count of that scratch and those
transient copies; the partition's footprint uses it too.  Each dequantized unit costs (dense - stored) bytes more: apply() sends
the quantized bytes of those units back to the host while the dense copy is in use.

Cost model: a unit's compute per step is its compute time (compiler/cost.py) plus, when it
dequantizes per call, `compiler.cost.dequant_seconds` for its GGUF bytes of each type x calls.  A
measured `Unit.time_s` is taken as measured with per-call dequantization (the default state of a
GGUF model), so dequantizing subtracts instead.  The step is simulated with compiler.cost.simulate
for the chosen set and for "everything quantized"; the choice is kept only when it is not slower
(less compute can never lengthen a simulated step, the check guards the rule).

mode "quantized" dequantizes nothing; mode "dequantized" dequantizes every resident unit that fits,
in the same order.  A unit whose layers apply per-call weight patches (`Unit.gguf["patched"]`: a
non-empty `weight_function` / `bias_function`, ComfyUI's LoRA on GGUF weights) is never dequantized:
the patch needs the per-call path.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from ..compiler.cost import dequant_seconds, simulate, unit_compute_s
from ..compiler.graph import ROOT
from ..compiler.plan import RESIDENT_DQ, RESIDENT_Q, STREAMED_Q, Plan
from ..errors import QuantChoiceError

if TYPE_CHECKING:
    from typing import Iterable

    from ..compiler.graph import ModuleGraph
    from ..compiler.inventory import Inventory

MODES = ("auto", "quantized", "dequantized")
GiB = 1 << 30
DEFAULT_RESERVE_BYTES = 2 * GiB      # activations etc. on the compute device
GPU_COPY_BW = 3.0e12                 # device-to-device copy, H100 (bench/results/dequant_h100.md)
HOST_COPY_BW = 2.0e10                # a CPU computing: memory bandwidth the eager dequantizer sees


@dataclass
class UnitQuant:
    """GGUF facts of one unit, and what dequantizing them per call costs per step."""
    name: str
    stored_bytes: int = 0          # their bytes as stored (blocks)
    dense_bytes: int = 0           # their dequantized size
    dequant_s: float = 0.0         # device seconds per step to dequantize them all, x calls
    tensors: int = 0
    largest_dense: int = 0         # the biggest one, dense bytes (transient per-call copy)
    calls: int = 1
    qtypes: dict = field(default_factory=dict)
    patched: bool = False          # a layer applies per-call weight patches (ComfyUI LoRA): keep quantized

    @property
    def extra_bytes(self) -> int:
        """VRAM a resident dequantized copy needs beyond the quantized bytes."""
        return max(0, self.dense_bytes - self.stored_bytes)


def _copy_bw(compute: str, copy_bw: float | None) -> float:
    if copy_bw:
        return float(copy_bw)
    return HOST_COPY_BW if str(compute).startswith("cpu") else GPU_COPY_BW


def quant_info(plan: Plan, graph: ModuleGraph | None, *, copy_bw: float | None = None) -> dict[str, UnitQuant]:
    """unit name -> UnitQuant for every unit of `plan` whose graph unit owns GGUF parameters (`Unit.gguf`;
    ROOT: weights outside every unit).  Dequantization seconds per step: compiler.cost.dequant_seconds
    per type at the compute device's copy bandwidth (`copy_bw` overrides it), x the unit's calls."""
    if graph is None:
        return {}
    bw = _copy_bw(plan.compute, copy_bw)
    units = {u.name: u for u in graph.units}
    out: dict[str, UnitQuant] = {}
    for pu in plan.units:
        u = units.get(pu.name)
        f = getattr(u, "gguf", None)
        if not f:
            continue
        calls = max(1, int(u.calls or 1))
        dq = sum(dequant_seconds(t, s, d, copy_bw=bw) for t, (s, d) in f["bytes_by_type"].items())
        out[pu.name] = UnitQuant(pu.name, stored_bytes=f["stored_bytes"], dense_bytes=f["dense_bytes"],
                                 dequant_s=dq * calls, tensors=f["tensors"], largest_dense=f["largest_dense"],
                                 calls=calls, qtypes=dict(f["qtypes"]), patched=bool(f["patched"]))
    return out


def _units_with_times(graph, compute: str, inventory, info: dict, dequantized: set) -> list:
    """Copies of graph units whose time_s includes per-call dequantization where it happens."""
    out = []
    for u in graph.units:
        q = info.get(u.name)
        if q is None:
            out.append(u)
            continue
        v = copy.copy(u)
        if u.time_s is not None:       # measured with per-call dequantization
            v.time_s = max(0.0, u.time_s - q.dequant_s) if u.name in dequantized else u.time_s
        else:
            v.time_s = unit_compute_s(u, compute, inventory) + (0.0 if u.name in dequantized else q.dequant_s)
        out.append(v)
    return out


def predict(plan: Plan, graph: ModuleGraph | None, inventory: Inventory, info: dict, dequantized: set) -> dict:
    homes = {u.name: u.device for u in plan.units}
    return simulate(_units_with_times(graph, plan.compute, inventory, info, dequantized), homes,
                    plan.compute, inventory, plan.window_bytes)


def gguf_facts(graph: ModuleGraph | None) -> dict[str, tuple[int, int]]:
    """unit name -> (dense bytes, largest dense tensor) of its GGUF weights, from the graph (Unit.gguf)."""
    out = {}
    for u in getattr(graph, "units", ()) or ():
        f = getattr(u, "gguf", None)
        if f:
            out[u.name] = (int(f.get("dense_bytes", 0)), int(f.get("largest_dense", 0)))
    return out


def working_bytes(facts: dict, offloaded: Iterable[str], compute: str) -> tuple[int, int]:
    """(scratch, transient) bytes GGUF weights need on the compute device beyond their own bytes.
    facts: unit name -> (dense bytes, largest dense tensor) (gguf_facts, or from quant_info).
    scratch: the runtime's one dequantization buffer for streamed units (runtime/slot_dequant.py, CUDA:
    the dense size of the largest streamed unit); transient: two of the largest dense tensor, the
    per-call dequantized copies of quantized weights while a layer runs.  Both (0, 0) when the host
    computes: its dequantization is per layer into host memory, which is no device budget."""
    if not facts:
        return 0, 0
    if str(compute).startswith("cpu"):
        return 0, 0     # the host computing: per-layer dequantization into host memory, like activations
    off = set(offloaded)
    scratch = max((d for n, (d, _) in facts.items() if n in off), default=0)
    transient = 2 * max((ld for _, ld in facts.values()), default=0)
    return scratch, transient


def _facts(info: dict) -> dict:
    return {n: (q.dense_bytes, q.largest_dense) for n, q in info.items()}


def _base_peak(plan: Plan, info: dict) -> int:
    """The plan's compute-device footprint with the GGUF working bytes of `info` (instead of those the
    partition counted from the graph, which `info` may differ from), nothing dequantized resident yet."""
    pr = plan.predicted or {}
    peak = pr.get("compute_peak_bytes", pr.get("peak_bytes"))
    if peak is None:
        peak = sum(u.bytes for u in plan.units if u.device == plan.compute) + int(plan.window_bytes or 0)
    counted = (int(pr.get("dequant_scratch_bytes", 0) or 0) + int(pr.get("dequant_transient_bytes", 0) or 0)
               if "dequant_transient_bytes" in pr else 0)
    homes = {u.name: u.device for u in plan.units}
    scratch, transient = working_bytes(_facts(info), [n for n in info if homes.get(n, plan.compute) != plan.compute],
                                       plan.compute)
    return int(peak) - counted + scratch + transient


def default_budget(plan: Plan, inventory: Inventory | None, info: dict, reserve_bytes: int | None = None) -> int:
    """VRAM left for dense copies: free on the compute device - plan footprint (with dequant scratch and
    transient copies) - reserve for activations; within the plan's budget (predicted["budget_bytes"],
    from offload_gb / max_vram_gb) when it has one."""
    dev = inventory.devices.get(plan.compute) if inventory is not None else None
    if dev is None:
        raise QuantChoiceError(f"the inventory does not list the compute device {plan.compute!r}; "
                               "give budget_bytes= instead")
    peak = _base_peak(plan, info)
    reserve = DEFAULT_RESERVE_BYTES if reserve_bytes is None else int(reserve_bytes)
    out = int(dev.free_bytes) - peak - reserve
    cap = (plan.predicted or {}).get("budget_bytes")
    if cap is not None:
        out = min(out, int(cap) - peak)
    return max(0, out)


def scratch_bytes(plan: Plan, info: dict) -> int:
    """VRAM of the runtime's per-unit dequantization scratch (runtime/gguf_stream.py's UnitDequant, on CUDA):
    the dense size of the largest streamed unit's GGUF tensors."""
    homes = {u.name: u.device for u in plan.units}
    return working_bytes(_facts(info), [n for n in info if homes.get(n, plan.compute) != plan.compute],
                         plan.compute)[0]


def choose_quant(plan: Plan, graph: ModuleGraph | None, inventory: Inventory | None, info: dict | None = None, *,
                 budget_bytes: int | None = None, reserve_bytes: int | None = None, mode: str = "auto") -> Plan:
    """A copy of `plan` with `quant` set for every unit in `info` (default: quant_info(plan, graph); see
    the module docstring), and predicted["step_s"] / ["peak_bytes"] updated; predicted["quant"] says
    what was weighed."""
    if mode not in MODES:
        raise QuantChoiceError(f"quant mode {mode!r}: expected one of {', '.join(MODES)}")
    if graph is None:
        raise QuantChoiceError("choose_quant needs the ModuleGraph the plan was made from")
    if info is None:
        info = quant_info(plan, graph)
    names = {u.name for u in graph.units}
    missing = [u.name for u in plan.units if u.name not in names]
    if missing:
        raise QuantChoiceError(f"plan units {missing[:4]} are not in the graph; pass the graph of this plan")
    if budget_bytes is None:
        budget = default_budget(plan, inventory, info, reserve_bytes)
    else:
        budget = int(budget_bytes)
        if budget < 0:
            raise QuantChoiceError(f"budget_bytes {budget_bytes!r} is negative: give 0 or more bytes")
    homes = {u.name: u.device for u in plan.units}
    resident = [n for n in info if homes.get(n) == plan.compute]
    order = sorted(resident, key=lambda n: (-info[n].dequant_s, info[n].extra_bytes, n))
    chosen: set[str] = set()
    used = 0
    if mode != "quantized":
        for n in order:
            q = info[n]
            if (q.dequant_s <= 0 and mode == "auto") or q.patched:
                continue
            if used + q.extra_bytes <= budget:
                chosen.add(n)
                used += q.extra_bytes
    base = predict(plan, graph, inventory, info, set())
    pred = predict(plan, graph, inventory, info, chosen)
    if pred["step_s"] > base["step_s"] * (1 + 1e-12) and mode == "auto":
        chosen, used, pred = set(), 0, base
    quant = {}
    for n in info:
        if homes.get(n) != plan.compute:
            quant[n] = STREAMED_Q
        else:
            quant[n] = RESIDENT_DQ if n in chosen else RESIDENT_Q
    predicted = dict(plan.predicted or {})
    predicted["step_s_before_quant"] = predicted.get("step_s")
    predicted["step_s"] = pred["step_s"]
    predicted["compute_s"] = pred["compute_s"]
    predicted["stall_s"] = pred["stall_s"]
    scratch = scratch_bytes(plan, info)
    if "peak_bytes" in predicted or "compute_peak_bytes" in predicted:
        before = _base_peak(plan, info)
        peak = before + used
        predicted["peak_bytes"] = predicted["compute_peak_bytes"] = peak
        predicted["dequant_scratch_bytes"] = scratch
        predicted["dequant_transient_bytes"] = working_bytes(_facts(info), (), plan.compute)[1]
        if predicted.get("window_max_bytes") is not None:
            # autotune's ring limit (the plan's budget or free memory) less what the footprint grew by
            old = int((plan.predicted or {}).get("compute_peak_bytes", (plan.predicted or {}).get("peak_bytes", 0)))
            wfp = int(predicted.get("window_footprint_bytes", 0) or 0)
            predicted["window_max_bytes"] = max(wfp, int(predicted["window_max_bytes"]) - max(0, peak - old))
    predicted["quant"] = {
        "mode": mode, "budget_bytes": budget, "extra_bytes": used, "dequant_scratch_bytes": scratch,
        "dequantized_units": sorted(chosen, key=lambda n: [u.name for u in plan.units].index(n)),
        "step_s_all_quantized": base["step_s"],
        "dequant_s_per_step": sum(q.dequant_s for n, q in info.items() if n not in chosen),
        "dequant_s_saved": sum(info[n].dequant_s for n in chosen),
    }
    return replace(plan, quant=quant, predicted=predicted)


def quant_table(plan: Plan, info: dict) -> str:
    rows = [f"{'unit':<30} {'choice':<12} {'stored MiB':>10} {'dense MiB':>10} {'dequant ms':>10}"]
    for u in sorted(plan.units, key=lambda u: u.order):
        q = info.get(u.name)
        if q is None:
            continue
        rows.append(f"{u.name[:30]:<30} {plan.quant.get(u.name, '-'):<12} {q.stored_bytes / 2**20:10.2f} "
                    f"{q.dense_bytes / 2**20:10.2f} {q.dequant_s * 1e3:10.3f}")
    return "\n".join(rows)


__all__ = ["quant_info", "choose_quant", "predict", "default_budget", "gguf_facts", "working_bytes", "quant_table", "UnitQuant",
           "QuantChoiceError", "STREAMED_Q", "RESIDENT_Q", "RESIDENT_DQ", "MODES", "ROOT"]
