"""distorch.compile: trace -> partition -> granularity -> codec_choice -> quant_choice -> schedule -> verify -> apply,
and its Handle.

    handle = distorch.compile(model, compute="cuda:0", offload_gb=8, donors=["cpu"])
    out = model(x)                       # the same module, now streaming its offloaded units
    handle.stats                         # bytes per link, copy/stall time, measured vs predicted step
    handle.timeline()                    # per-unit copy/compute events (compile(..., profile=True))
    handle.undo()                        # everything resident on `compute` again, nothing leaked

The budget is one of (passes.partition): offload_gb = GiB (2^30 bytes) of the model kept OFF the
compute device (the nodes' virtual_vram_gb; what the compiled model then holds there -- resident weights,
ring slots, dequant scratch, runtime buffers -- is at most model - offload_gb), or max_vram_gb = GiB the
compiled model may hold on the compute device; neither keeps it all resident.  donors = where offloaded
weights live, expert = an allocation string that overrides the budget.  `plan=` skips tracing and
placement.  (`vram_gb=` is refused: it named neither of the two.)

On a machine without CUDA, `compute="cpu", donors=["cpu"]` runs the same machinery synchronously.
The plan then names the compute device "cpu:0" and the host home "cpu" (two names for one memory),
so offloaded units still get homes, slots and the ring.

The passes run one after the other, each a function of plain data (compiler/trace.py, passes/*.py);
the plan is verified (passes/verify.py) before the module is changed, and a pass that fails re-raises
its error with its name and the passes that ran before it.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Iterable

import torch

from ..compiler import inventory as _inv
from ..compiler.graph import ModuleGraph
from ..compiler.plan import Plan
from ..compiler.trace import trace
from ..errors import DisTorchError
from ..passes.granularity import place as granularity_place
from ..passes.partition import partition
from ..passes.codec_choice import MODES as CODEC_MODES, choose_codec_with_room
from ..passes.quant_choice import MODES as QUANT_MODES, choose_quant, quant_info
from ..passes.schedule import schedule
from ..passes.verify import verify
from . import stats as _stats
from . import timebook as _timebook
from .apply import Runtime, apply

__all__ = ["compile", "plan_model", "Handle", "placement_table", "norm_compute", "inventory_for", "HOST_COMPUTE"]

log = logging.getLogger("distorch.runtime.api")

HOST_COMPUTE = "cpu:0"   # the compute device's name when computing on the host with host donors


def norm_compute(compute: str | torch.device) -> str:
    """'cuda' -> 'cuda:0', 'cpu' / 'cpu:0' -> HOST_COMPUTE; DisTorchError for what cannot compute here."""
    s = str(compute)
    if s == "cuda":
        s = "cuda:0"
    if s.startswith("cuda") and not torch.cuda.is_available():
        raise DisTorchError(f"compute={compute!r} but this torch sees no CUDA device; use compute='cpu'")
    if s in ("cpu", "cpu:0"):
        return HOST_COMPUTE
    if not (s.startswith("cuda:") or s.startswith("cpu")):
        raise DisTorchError(f"compute={compute!r}: expected 'cuda:N' or 'cpu'")
    return s


def inventory_for(compute: str, donors: Iterable[str] | str | None) -> "_inv.Inventory":
    """The devices to plan over for `compute` (a norm_compute name): probed, or for HOST_COMPUTE the host
    declared under both its names (no link to measure)."""
    if compute == HOST_COMPUTE:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 16 << 30
        inv = _inv.declare(f"cpu={total}b")
        inv.devices[HOST_COMPUTE] = _inv.Device(HOST_COMPUTE, total, total)
        inv.compute_rate[HOST_COMPUTE] = _inv.host_rate()     # the host at the host's rate
        return inv
    inv = _inv.probe()
    from .pinning import budget
    inv.pinned_limit = budget()        # host homes past it stay pageable; compiler.cost prices them so
    return inv



class Handle:
    """What compile() returns: the Plan, statistics, timeline, undo."""

    def __init__(self, runtime: Runtime, plan: Plan, graph: ModuleGraph | None = None) -> None:
        self.runtime: Runtime | None = runtime
        self.plan = plan
        self.graph = graph
        self._last_stats: dict | None = None      # stats as they were when undo() ran

    def _live(self, what: str) -> Runtime:
        """The runtime, or a DisTorchError naming `what` after undo()."""
        if self.runtime is None:
            raise DisTorchError(f"{what} is not available after undo(): the model is no longer compiled "
                                "(handle.stats still gives the statistics as they were at undo())")
        return self.runtime

    @property
    def stats(self) -> dict:
        """Per-step statistics (synchronizes the device: call between steps), and under "load" how the
        homes were made (fill and pin seconds, whether an earlier load's host homes were reused).  After
        undo(): the last statistics, taken when undo() ran."""
        if self.runtime is None and self._last_stats is not None:
            return dict(self._last_stats)
        return _summary(self._live("stats"))

    def stats_text(self) -> str:
        return _stats.format_stats(self.stats)

    def step_times(self) -> list[float]:
        return _stats.step_times(self._live("step_times()"))

    def timeline(self, steps: int | None = 1) -> list[dict]:
        """Copy and compute events per unit of the latest `steps` steps (needs profile=True)."""
        rt = self._live("timeline()")
        if not rt.profile:
            raise DisTorchError("timeline() needs compile(..., profile=True) (per-unit events cost host time)")
        return _stats.timeline(rt, steps)

    def unit_times(self) -> dict[str, float]:
        """Measured compute seconds per unit call (profile=True)."""
        return _stats.unit_times(self._live("unit_times()"))

    def feedback(self, graph: ModuleGraph | None = None) -> int:
        """Write measured per-unit times into the graph's Unit.time_s (per forward = per call x calls);
        returns how many units got a time. Re-run passes.partition on the graph to re-plan with them."""
        graph = graph or self.graph
        if graph is None:
            raise DisTorchError("feedback() needs the ModuleGraph (compile() kept none: pass graph=)")
        times = self.unit_times()
        k = 0
        for u in graph.units:
            if u.name in times:
                u.time_s = times[u.name] * max(u.calls, 1)
                k += 1
        return k

    def placement_table(self) -> str:
        return placement_table(self.plan)

    def undo(self, device: str | torch.device | None = None, host: dict | None = None) -> None:
        """All weights back resident on the compute device (or on `device`, e.g. "cpu"), hooks removed,
        homes and slots freed.  Back to the host, weights homed in host memory stay where they are (their
        unpinned arena, freed with the model): the next compile of this module with the same plan adopts
        them without a copy (runtime/home_reuse.py; stats["load"]["reused"]).  `host`: id(resident
        parameter) -> a tensor on `device` to bind it to instead of copying its bytes back (Runtime.undo)."""
        if self.runtime is not None:
            try:
                last = _summary(self.runtime)
            except Exception:      # statistics never stop an undo
                log.debug("stats before undo failed", exc_info=True)
                last = None
            self.runtime.undo(device, host)
            self._last_stats = last
            self.runtime = None

    def __repr__(self):
        p = self.plan
        return (f"<distorch.Handle compute={p.compute} units={len(p.units)} offloaded="
                f"{p.offloaded_bytes() / 2**30:.2f} GiB active={self.runtime is not None}>")


def _summary(rt: Runtime) -> dict:
    """runtime.stats.summarize plus "load": how the homes were made (HomeStore.load_times: fill and pin
    seconds, whether an earlier load's host homes were reused, else why not)."""
    d = _stats.summarize(rt)
    d["load"] = dict(getattr(rt.store, "load_times", None) or {})
    return d


def placement_table(plan: Plan) -> str:
    """One row per unit (full names: never cut, so no two rows look alike), then the bytes per device
    (GiB = 2^30 bytes, MiB = 2^20), the prediction and the expert string."""
    units = sorted(plan.units, key=lambda u: u.order)
    wn = max([4] + [len(u.name) for u in units])
    wt = max([4] + [len(u.type) for u in units])
    rows = [f"{'unit':<{wn}} {'type':<{wt}} {'MiB':>9}  home"]
    for u in units:
        mark = "" if u.device == plan.compute else "  (streamed)"
        rows.append(f"{u.name:<{wn}} {u.type:<{wt}} {u.bytes / 2**20:9.2f}  {u.device}{mark}")
    tot = plan.model_bytes or 1
    per: dict[str, int] = {}
    for u in plan.units:
        per[u.device] = per.get(u.device, 0) + u.bytes
    rows.append("per device: " + ", ".join(f"{d} {b / 2**30:.3f} GiB ({100 * b / tot:.0f}%)" for d, b in per.items()))
    pr = plan.predicted or {}
    if pr.get("step_s"):
        rows.append(f"predicted step {pr['step_s'] * 1e3:.2f} ms (compute {pr.get('compute_s', 0) * 1e3:.2f} ms), "
                    f"window {plan.window_bytes / 2**20:.1f} MiB")
    if plan.expert_string:
        rows.append(f"expert string: {plan.expert_string}")
    return "\n".join(rows)


def compile(model: torch.nn.Module, compute: str | torch.device = "cuda:0", *,  # noqa: A001
            offload_gb: float | None = None, max_vram_gb: float | None = None,
            donors: Iterable[str] | str | None = ("cpu",), expert: str | None = None, plan: Plan | None = None,
            example_args: Any = None, example_kwargs: dict[str, Any] | None = None,
            window_units: int | None = None, profile: bool = False, granularity: str = "auto",
            inventory: "_inv.Inventory | None" = None, progress: bool = True, quant: str = "auto",
            quant_budget_gb: float | None = None, clamp_offload: bool = False, compress: str = "auto",
            **legacy: Any) -> Handle:
    """Rewrite `model` in place to stream its weights under a Plan; returns a Handle (module docstring).

    Without `plan=`: trace the model (on `example_args` / `example_kwargs`), place its units over the
    inventory (`offload_gb` or `max_vram_gb`, `donors`, or `expert`; the inventory is probed unless given;
    `clamp_offload`: an offload_gb the model cannot meet streams everything, as the nodes want), choose how GGUF
    units are kept, build and verify the schedule, and only then change the module.  GGUF weights
    (formats.gguf_tensor): `quant` = "auto" | "quantized" | "dequantized" picks, for the resident units of
    a traced plan, per-call dequantization or a dense copy within the VRAM left (passes/quant_choice.py;
    `quant_budget_gb` caps the extra GiB); offloaded units always stream quantized.  `granularity`: "auto"
    streams whole blocks or, where the simulated step is faster (or as fast in less VRAM), the layers
    inside them (passes/granularity.py); "block" / "sub" fix the choice; "leaf" makes every weight-owning
    leaf module a unit.  `compress`: "auto" streams an offloaded unit's bf16/fp16 weights losslessly
    compressed where the simulated step is faster (decoded on the compute device after the copy,
    passes/codec_choice.py, runtime/codec_stream.py); "on" every offloaded unit that has such weights;
    "off" none.  A given `plan=` is used as it is (its `quant` and `codec` fields), without the passes."""
    if not isinstance(model, torch.nn.Module):
        raise DisTorchError(f"compile() needs a torch.nn.Module, got {type(model).__name__}")
    if "vram_gb" in legacy:
        from ..passes.partition import VRAM_GB_GONE
        raise DisTorchError(VRAM_GB_GONE)
    if legacy:
        raise TypeError(f"compile() got unexpected keyword argument(s) {', '.join(map(repr, legacy))}")
    if quant not in QUANT_MODES:
        raise DisTorchError(f"quant={quant!r}: expected one of {', '.join(QUANT_MODES)}")
    graph = None
    t_start = time.perf_counter()
    if plan is None:
        comp = norm_compute(compute)
        donors = _donor_list(donors)
        if example_args is not None and not isinstance(example_args, (tuple, list)):
            example_args = (example_args,)
        ran: list[str] = []
        if granularity not in GRANULARITY_MODES:
            raise DisTorchError(f"granularity={granularity!r}: expected one of {', '.join(GRANULARITY_MODES)}")
        inv = inventory if inventory is not None else inventory_for(comp, donors)
        graph, plan = plan_model(model, comp, offload_gb=offload_gb, max_vram_gb=max_vram_gb, donors=donors,
                                 expert=expert, example_args=example_args, example_kwargs=example_kwargs,
                                 granularity=granularity, inventory=inv, clamp_offload=clamp_offload,
                                 compress=compress, ran=ran)
        for w in (plan.predicted or {}).get("warnings", ()):
            log.warning("distorch: %s", w)
        learned = (plan.predicted or {}).get("learned_from")
        plan = _run(ran, "quant_choice", _quant_choice, plan, graph, inv, quant, quant_budget_gb)
        plan = mark_learned(plan, None, learned)
        sched = _run(ran, "schedule", schedule, plan, graph)
        _run(ran, "verify", verify, plan, sched)
        log.debug("passes ran: %s", " -> ".join(ran))
    elif not isinstance(plan, Plan):
        raise DisTorchError(f"plan= must be a distorch Plan, got {type(plan).__name__}")
    rt = apply(model, plan, graph, window_units=window_units, profile=profile, progress=progress)
    log.log(logging.INFO if progress else logging.DEBUG,
            "distorch: compiled %s for %s in %.1f s: %d units, %.2f GiB of %.2f GiB offloaded",
            type(model).__name__, plan.compute, time.perf_counter() - t_start, len(plan.units),
            plan.offloaded_bytes() / 2**30, (plan.model_bytes or 0) / 2**30)
    return Handle(rt, plan, graph)


GRANULARITY_MODES = ("auto", "block", "sub", "leaf")


def plan_model(model: torch.nn.Module, compute: str | torch.device = "cuda:0", *,
               offload_gb: float | None = None, max_vram_gb: float | None = None,
               donors: Iterable[str] | str | None = ("cpu",), expert: str | None = None,
               example_args: Any = None, example_kwargs: dict[str, Any] | None = None, granularity: str = "auto",
               inventory: "_inv.Inventory | None" = None, clamp_offload: bool = False, compress: str = "auto",
               ran: list[str] | None = None) -> tuple[ModuleGraph, Plan]:
    """trace -> partition -> granularity -> codec_choice: the graph and the Plan compile() starts from (same
    arguments), without changing the module.  `ran` collects the names of the passes that finished."""
    ran = [] if ran is None else ran
    if granularity not in GRANULARITY_MODES:
        raise DisTorchError(f"granularity={granularity!r}: expected one of {', '.join(GRANULARITY_MODES)}")
    if compress not in CODEC_MODES:
        raise DisTorchError(f"compress={compress!r}: expected one of {', '.join(CODEC_MODES)}")
    comp = norm_compute(compute)
    donors = _donor_list(donors)
    if example_args is not None and not isinstance(example_args, (tuple, list)):
        example_args = (example_args,)
    graph = _run(ran, "trace", _trace_unchanged, model, tuple(example_args or ()), example_kwargs,
                 granularity="block" if granularity in ("auto", "sub") else granularity)
    # unit times measured by an earlier compile of this model on this device (runtime/timebook.py)
    key, dev_id = _timebook.model_key(graph), _timebook.device_id(comp)
    learned = None
    if _timebook.enabled():
        _timebook.BOOK.register(key, dev_id, graph)
        learned = _timebook.BOOK.apply(graph, key, dev_id)
    inv = inventory if inventory is not None else inventory_for(comp, donors)
    budget = dict(offload_gb=offload_gb, max_vram_gb=max_vram_gb, donors=donors or None, expert=expert,
                  clamp=clamp_offload)
    if granularity not in ("auto", "sub") or expert:
        plan = _run(ran, "partition", partition, graph, inv, comp, **budget)
    else:
        def leaves() -> ModuleGraph:
            # traced on the example inputs when there are any: the layers then come in call order, which the
            # ring expects from its first step on (else registration order, learned in the first step)
            return _trace_unchanged(model, tuple(example_args or ()), example_kwargs, granularity="leaf")
        graph, plan = granularity_place(graph, leaves, inv, comp, budget, granularity,
                                        run=lambda name, fn, *a, **k: _run(ran, name, fn, *a, **k))
    # per offloaded unit: its bf16/fp16 weights streamed raw or losslessly compressed (passes/codec_choice.py);
    # on a budget with no room for the decode scratch, also the placement with that room made
    def room(cap: int) -> Plan:
        return partition(graph, inv, comp, max_vram_gb=cap / 2**30, donors=donors or None)
    plan = _run(ran, "codec_choice", choose_codec_with_room, plan, graph, inv, mode=compress,
                repartition=None if expert else room)
    return graph, mark_learned(plan, key, learned)


def mark_learned(plan: Plan, key: str | None, learned: str | None) -> Plan:
    """The plan names its model (plan.source["model_key"]: its measured steps go back to the time book) and,
    when its unit times came from the book, says so: basis "learned" (autotune still measures it) and
    "learned_from", the signature whose times placed it."""
    if key:
        plan.source = dict(plan.source or {}, model_key=key)
    if learned is not None:
        plan.predicted = dict(plan.predicted or {}, basis="learned", learned_from=learned)
    return plan


def _run(ran: list[str], name: str, fn, *args, **kw):
    """fn(*args, **kw) as the pass `name`; its error re-raised (same type) with the pass named and the ones
    that ran before it, like torch.fx's PassManager.  `ran` collects the passes that finished."""
    t0 = time.perf_counter()
    try:
        out = fn(*args, **kw)
    except Exception as e:
        if e.args and isinstance(e.args[0], str):
            before = ", ".join(ran) if ran else "none"
            e.args = (f"{name} pass failed (passes run before it: {before}): {e.args[0]}",) + e.args[1:]
        raise
    ran.append(name)
    log.debug("pass %s done in %.2f s", name, time.perf_counter() - t0)
    return out


def _trace_unchanged(model, args, kwargs, **kw):
    """trace() leaving the module as it was: the example call runs in eval mode under no_grad (BatchNorm
    does not update its running statistics, dropout is off), each submodule's training flag is restored,
    and so is every buffer a forward wrote."""
    modes = [(m, m.training) for m in model.modules()]
    saved = [(b, b.detach().clone()) for b in model.buffers() if not b.is_meta]
    try:
        model.eval()
        with torch.no_grad():
            return trace(model, args, kwargs, **kw)
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, v in saved:
                if b.shape == v.shape and b.dtype == v.dtype:
                    b.copy_(v)


def _donor_list(donors) -> list[str]:
    if isinstance(donors, str):
        return [d.strip() for d in donors.split(",") if d.strip()]
    return list(donors or [])


def _quant_choice(plan: Plan, graph, inv, quant: str, quant_budget_gb) -> Plan:
    """passes.quant_choice for a traced plan: the plan unchanged when the graph records no GGUF weights."""
    info = quant_info(plan, graph)
    if not info:
        return plan
    budget = None if quant_budget_gb is None else int(float(quant_budget_gb) * 2**30)
    return choose_quant(plan, graph, inv, info, budget_bytes=budget, mode=quant)
