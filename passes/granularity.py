"""Granularity pass: stream whole blocks, or the layers inside them (ModuleGraphs + Plans -> a choice).

A block (a Flux double block, 0.68 GB in bf16) streamed whole needs ring slots the size of a block; the
partition keeps two to eight of them on the compute device.  Split into its sub-units -- the modules
inside it that own weights (its Linear layers, its norms) -- the largest item is one layer (at most
0.13 GB for Flux), so the same budget holds several more GB of resident weights, fewer bytes cross the
link each step, and part of a block can stay while the rest streams.  Splitting costs a hook and an
event per streamed sub-unit, and small slots bank less copy time for stretches where compute outruns the
link.  So the choice is made per plan, by the same simulation that sizes the ring (when unit times are
estimates, at the estimate and at FAST_SCALE x it, as the window's slot count is):

    sub = sub_unit_graph(blocks, leaves)          # blocks: trace(granularity="block"), leaves: "leaf"
    i = choose([(blocks, plan_b), (sub, plan_s)])  # the plan with the lower predicted step (or, as fast,
                                                   # the one holding less VRAM)
    graph, plan = granularity(blocks, plan_b, leaves, inventory, compute, budget)   # both, as the pass

The leaf graph comes from the live module (compiler.trace) or from a weights file's keys
(compiler.files.leaf_graph_from_tensors), so `distorch plan` makes the same choice the nodes make.

`sub_unit_graph` is a pure function of the two graphs: every kind-"block" unit is replaced by the leaf
units under it (kind "sub", `parent` = the block), in the leaf graph's order; the block's FLOPs and
measured time are shared out by parameter count (a plan from a traced call keeps its per-block totals);
tensors the block module owns directly (a `modulation` Parameter) join ROOT, which stays resident unless
the budget needs it.  It returns None when the two graphs do not split cleanly (tied weights across
blocks, tensors the leaf graph does not own), and the caller keeps whole blocks.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from ..compiler.cost import simulate, unit_compute_s
from ..compiler.graph import ROOT, ModuleGraph, Unit
from ..compiler.inventory import Inventory
from ..compiler.plan import Plan
from ..errors import PartitionError
from .budget import primary_then_regret
from .partition import partition

__all__ = ["sub_unit_graph", "choose", "granularity", "below_blocks", "sub_only", "place", "HOOK_S", "MIN_GAIN",
           "VRAM_GAIN_BYTES"]

HOOK_S = 30e-6      # host time per streamed unit and step (pre + post hook, an event, the views): each
#                     streamed unit a plan adds over whole blocks adds this to its compute time (the host
#                     runs ahead of the device while copies are awaited, so only a compute-bound step pays)
MIN_GAIN = 0.01     # and it must predict a step at least this much faster than whole blocks, or be as
VRAM_GAIN_BYTES = 512 << 20   # fast within MIN_GAIN and hold this much less on the compute device


def sub_unit_graph(blocks: ModuleGraph, leaves: ModuleGraph) -> ModuleGraph | None:
    """`blocks` with each block unit replaced by its sub-units from `leaves` (module docstring); None when
    no block splits or the split would not own exactly the tensors `blocks` owns."""
    by_block: dict[str, list[Unit]] = {}
    block_names = {u.name for u in blocks.units if u.kind == "block"}
    for lu in leaves.units:
        if lu.name == ROOT:
            continue
        parts = lu.name.split(".")
        for k in range(len(parts) - 1, 0, -1):
            p = ".".join(parts[:k])
            if p in block_names:
                by_block.setdefault(p, []).append(lu)
                break
    if not by_block:
        return None
    out: list[Unit] = []
    to_root: list[str] = []
    root_param = root_buffer = root_params = 0
    for u in blocks.units:
        kids = by_block.get(u.name)
        if u.kind != "block" or not kids:
            out.append(u)
            continue
        own = set(u.tensors)
        kid_tensors = [t for k in kids for t in k.tensors]
        if len(set(kid_tensors)) != len(kid_tensors) or not set(kid_tensors) <= own:
            return None                   # a leaf owns something this block does not: tied weights
        rest = [t for t in u.tensors if t not in set(kid_tensors)]
        pb = sum(k.param_bytes for k in kids)
        bb = sum(k.buffer_bytes for k in kids)
        if pb > u.param_bytes or bb > u.buffer_bytes:
            return None
        to_root += rest
        root_param += u.param_bytes - pb
        root_buffer += u.buffer_bytes - bb
        root_params += max(0, u.params - sum(k.params for k in kids))
        total = sum(k.params for k in kids) or 1
        for j, k in enumerate(kids):
            share = k.params / total
            out.append(replace(k, kind="sub", parent=u.name, calls=u.calls, tensors=list(k.tensors),
                               flops=u.flops * share, time_s=None if u.time_s is None else u.time_s * share,
                               act_bytes=u.act_bytes if j == len(kids) - 1 else 0))
    if to_root or root_param or root_buffer:
        i = next((j for j, x in enumerate(out) if x.name == ROOT), None)
        if i is None:
            out.insert(0, Unit(name=ROOT, type=blocks.source or "root", kind="root"))
            i = 0
        r = out[i]
        out[i] = replace(r, tensors=list(r.tensors) + to_root, param_bytes=r.param_bytes + root_param,
                         buffer_bytes=r.buffer_bytes + root_buffer, params=r.params + root_params)
    if sorted(t for x in out for t in x.tensors) != sorted(t for x in blocks.units for t in x.tensors):
        return None
    g = ModuleGraph(out, source=blocks.source)
    for k in ModuleGraph.EXTRA:
        if hasattr(blocks, k):
            setattr(g, k, getattr(blocks, k))
    g.granularity = "sub"
    g.module_names = {x.name: ("" if x.name == ROOT else x.name) for x in out}
    return g


def choose(options: list[tuple[ModuleGraph, Plan]]) -> int:
    """Index of the plan to use: options[0] (whole blocks) unless another predicts a step faster by more
    than MIN_GAIN, after HOOK_S for each streamed unit it adds (the fastest such one); else one as fast
    within MIN_GAIN that holds VRAM_GAIN_BYTES less on the compute device."""
    pb = options[0][1].predicted or {}
    base, peak0 = pb.get("step_s"), pb.get("compute_peak_bytes")
    if base is None:
        return 0
    n0 = len(options[0][1].offloaded())
    best, best_cost = 0, base * (1 - MIN_GAIN)
    frees = None            # as fast within MIN_GAIN and holding VRAM_GAIN_BYTES less: the fallback choice
    for i, (_, p) in enumerate(options[1:], 1):
        pp = p.predicted or {}
        s, peak = pp.get("step_s"), pp.get("compute_peak_bytes")
        if s is None:
            continue
        # the hooks' host time overlaps the waits for copies: it lengthens the step only past them
        cost = max(s, pp.get("compute_s", 0.0) + HOOK_S * max(0, len(p.offloaded()) - n0))
        if cost < best_cost:
            best, best_cost = i, cost
        elif (frees is None and peak is not None and peak0 is not None and cost <= base * (1 + MIN_GAIN)
              and peak <= peak0 - VRAM_GAIN_BYTES):
            frees = i
    return best if best or frees is None else frees


FAST_SCALE = 0.3     # compute-time scale of the "estimate too slow" scenario the choice also weighs: a
#                      plan is compiled before the resolution is known; Flux-dev in ComfyUI on an H200 ran at
#                      0.23-0.3x its estimate at 512x512 (bench/results/comfy_vram_h200_r4/r5), where at 3 GiB
#                      off the blocks plan (4.48 GiB streamed, to fund two 0.63 GiB slots) ran at 1.5x the floor


def _measured(g: ModuleGraph) -> bool:
    return all(u.time_s is not None for u in g.units)


def _fast_scale(g: ModuleGraph) -> float | None:
    """The faster-compute scenario the choice also weighs: FAST_SCALE x an estimate, the shortest other input
    measured (ModuleGraph.time_scales) for measured times, else none."""
    if not _measured(g):
        return FAST_SCALE
    shorter = [s for s in getattr(g, "time_scales", ()) if s < 1.0]
    return min(shorter) if shorter else None


def _rescaled_step(g: ModuleGraph, plan: Plan, inventory: Inventory, scale: float) -> float | None:
    """The simulated step of `plan`'s placement and window with every unit's compute time x `scale`."""
    units = [replace(u, time_s=unit_compute_s(u, plan.compute, inventory) * scale) for u in g.units]
    homes = {u.name: u.device for u in plan.units if u.device != plan.compute}
    if not homes:
        return None
    return simulate(units, homes, plan.compute, inventory, plan.window_bytes)["step_s"]


def granularity(blocks: ModuleGraph, plan: Plan, leaves: ModuleGraph, inventory: Inventory, compute: str,
                budget: dict, force: bool = False) -> tuple[ModuleGraph, Plan]:
    """The pass: `plan` (whole blocks, from passes.partition with the keyword arguments `budget`) or the
    sub-unit graph's plan under the same budget, by `choose` (`force`: the sub-unit plan whenever the
    model splits and it fits).  The choice and both predictions go to plan.predicted["granularity"]."""
    sub = sub_unit_graph(blocks, leaves)
    info: dict = {"chosen": "block", "block_step_s": (plan.predicted or {}).get("step_s")}
    graph = blocks
    if sub is not None:
        try:
            sub_plan = partition(sub, inventory, compute, **budget)
        except PartitionError as e:           # e.g. a budget the blocks meet only by clamping
            info["sub_error"] = str(e)
        else:
            info["sub_step_s"] = (sub_plan.predicted or {}).get("step_s")
            info["sub_peak_bytes"] = (sub_plan.predicted or {}).get("compute_peak_bytes")
            pick = 1 if force else choose([(blocks, plan), (sub, sub_plan)])
            fast = _fast_scale(blocks)
            if pick == 0 and fast is not None:
                # estimated compute: also ask how each plan fares if compute is FAST_SCALE x the estimate (a
                # FLOP-rate estimate can be that far off; measured on an H200, Flux-dev ran in 0.68x its
                # estimate at 1024x1024 and in 0.3x at 512x512); measured compute with a shorter input also
                # measured (time_scales): at that input; the layers plan wins when the mean of its two steps
                # is more than MIN_GAIN below the blocks plan's
                fb = _rescaled_step(blocks, plan, inventory, fast)
                fs = _rescaled_step(sub, sub_plan, inventory, fast)
                info["block_step_fast_s"], info["sub_step_fast_s"] = fb, fs
                sb, ss = (plan.predicted or {}).get("step_s"), (sub_plan.predicted or {}).get("step_s")
                if fb and fs and sb and ss:
                    if _measured(blocks):       # measured inputs: the largest decides, the others break near-ties
                        pick = primary_then_regret([[sb, fb], [ss, fs]], MIN_GAIN)
                    elif (fs + ss) < (fb + sb) * (1 - MIN_GAIN):
                        pick = 1
            if pick == 1:
                graph, plan = sub, sub_plan
                info["chosen"] = "sub"
    plan.predicted["granularity"] = info
    return graph, plan


def below_blocks(error: PartitionError) -> bool:
    """The whole-blocks partition failed only because the budget is under its minimum working set (one
    block-sized slot + what cannot move): the layers inside the blocks, with layer-sized slots, may fit."""
    return "minimum working set" in str(error)


def sub_only(blocks: ModuleGraph, leaves: ModuleGraph, inventory: Inventory, compute: str, budget: dict,
             error: PartitionError) -> tuple[ModuleGraph, Plan]:
    """The sub-unit plan for a budget whole blocks cannot meet (`error`, from passes.partition on `blocks`):
    re-raises `error` when the model does not split, and the sub-unit partition's own PartitionError (which
    names the smaller, true minimum working set) when the layers do not fit either."""
    sub = sub_unit_graph(blocks, leaves)
    if sub is None:
        raise error
    plan = partition(sub, inventory, compute, **budget)
    plan.predicted["granularity"] = {"chosen": "sub", "block_error": str(error),
                                     "sub_step_s": (plan.predicted or {}).get("step_s")}
    return sub, plan


def _direct(name: str, fn: Callable, *args: Any, **kw: Any) -> Any:
    return fn(*args, **kw)


def place(blocks: ModuleGraph, leaves: Callable[[], ModuleGraph], inventory: Inventory, compute: str, budget: dict,
          mode: str = "auto", run: Callable = _direct) -> tuple[ModuleGraph, Plan]:
    """passes.partition of `blocks` under `budget`, then this pass (mode "auto" chooses, "sub" takes the
    sub-unit plan whenever the model splits); a budget under whole blocks' minimum working set goes to
    sub_only.  `leaves()` gives the leaf graph, called only when needed (tracing a module for it may cost a
    forward).  `run(name, fn, *args, **kw)` calls each pass (runtime.api names them in its errors)."""
    try:
        plan = run("partition", partition, blocks, inventory, compute, **budget)
    except PartitionError as e:
        if not below_blocks(e):
            raise
        return run("granularity", sub_only, blocks, leaves(), inventory, compute, budget, e)
    if plan.offloaded_bytes() > 0:
        return run("granularity", granularity, blocks, plan, leaves(), inventory, compute, budget,
                   force=mode == "sub")
    return blocks, plan
