"""distorch.compile: trace -> partition -> quant_choice -> schedule -> verify -> apply, and its Handle.

    handle = distorch.compile(model, compute="cuda:0", vram_gb=8, donors=["cpu"])
    out = model(x)                       # the same module, now streaming its offloaded units
    handle.stats                         # bytes per link, copy/stall time, measured vs predicted step
    handle.timeline()                    # per-unit copy/compute events (compile(..., profile=True))
    handle.undo()                        # everything resident on `compute` again, nothing leaked

`vram_gb`, `donors` and `expert` mean what they mean in the ComfyUI nodes (passes.partition):
vram_gb = GB (2^30 bytes) of the model to keep OFF the compute device, donors = where they live,
expert = an allocation string that overrides both. `plan=` skips tracing and placement.

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

import torch

from ..compiler import inventory as _inv
from ..compiler.plan import Plan
from ..compiler.trace import trace
from ..errors import DisTorchError
from ..passes.partition import partition
from ..passes.quant_choice import MODES as QUANT_MODES, choose_quant, quant_info
from ..passes.schedule import schedule
from ..passes.verify import verify
from . import stats as _stats
from .apply import Runtime, apply

__all__ = ["compile", "Handle", "placement_table", "norm_compute", "inventory_for", "HOST_COMPUTE"]

log = logging.getLogger("distorch.runtime.api")

HOST_COMPUTE = "cpu:0"   # the compute device's name when computing on the host with host donors


def norm_compute(compute) -> str:
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


def inventory_for(compute: str, donors) -> "_inv.Inventory":
    """The devices to plan over for `compute` (a norm_compute name): probed, or for HOST_COMPUTE the host
    declared under both its names (no link to measure)."""
    if compute == HOST_COMPUTE:
        try:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            total = 16 << 30
        inv = _inv.declare(f"cpu={total}b")
        inv.devices[HOST_COMPUTE] = _inv.Device(HOST_COMPUTE, total, total)
        return inv
    return _inv.probe()



class Handle:
    """What compile() returns: the Plan, statistics, timeline, undo."""

    def __init__(self, runtime: Runtime, plan: Plan, graph=None):
        self.runtime = runtime
        self.plan = plan
        self.graph = graph

    @property
    def stats(self) -> dict:
        """Per-step statistics (synchronizes the device: call between steps)."""
        return _stats.summarize(self.runtime)

    def stats_text(self) -> str:
        return _stats.format_stats(self.stats)

    def step_times(self) -> list[float]:
        return _stats.step_times(self.runtime)

    def timeline(self, steps: int | None = 1) -> list[dict]:
        """Copy and compute events per unit of the latest `steps` steps (needs profile=True)."""
        if not self.runtime.profile:
            raise DisTorchError("timeline() needs compile(..., profile=True) (per-unit events cost host time)")
        return _stats.timeline(self.runtime, steps)

    def unit_times(self) -> dict[str, float]:
        """Measured compute seconds per unit call (profile=True)."""
        return _stats.unit_times(self.runtime)

    def feedback(self, graph=None) -> int:
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

    def undo(self, device=None):
        """All weights back resident on the compute device (or on `device`, e.g. "cpu"), hooks removed,
        homes and slots freed."""
        if self.runtime is not None:
            self.runtime.undo(device)
            self.runtime = None

    def __repr__(self):
        p = self.plan
        return (f"<distorch.Handle compute={p.compute} units={len(p.units)} offloaded="
                f"{p.offloaded_bytes() / 2**30:.2f} GiB active={self.runtime is not None}>")


def placement_table(plan: Plan) -> str:
    rows = [f"{'unit':<34} {'type':<22} {'MiB':>9}  home"]
    for u in sorted(plan.units, key=lambda u: u.order):
        mark = "" if u.device == plan.compute else "  (streamed)"
        rows.append(f"{u.name[:34]:<34} {u.type[:22]:<22} {u.bytes / 2**20:9.2f}  {u.device}{mark}")
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


def compile(model, compute="cuda:0", vram_gb=None, donors=("cpu",), expert=None, plan=None,  # noqa: A001
            example_args=None, example_kwargs=None, window_units=None, *, profile: bool = False,
            granularity: str = "block", inventory=None, progress: bool = True, quant: str = "auto",
            quant_budget_gb=None) -> Handle:
    """Rewrite `model` in place to stream its weights under a Plan; returns a Handle (module docstring).

    Without `plan=`: trace the model (on `example_args` / `example_kwargs`), place its units over the
    inventory (`vram_gb`, `donors` or `expert`; the inventory is probed unless given), choose how GGUF
    units are kept, build and verify the schedule, and only then change the module.  GGUF weights
    (formats.gguf_tensor): `quant` = "auto" | "quantized" | "dequantized" picks, for the resident units of
    a traced plan, per-call dequantization or a dense copy within the VRAM left (passes/quant_choice.py;
    `quant_budget_gb` caps the extra GiB); offloaded units always stream quantized.  A given `plan=` is
    used as it is (its `quant` field, if any), without the passes."""
    if not isinstance(model, torch.nn.Module):
        raise DisTorchError(f"compile() needs a torch.nn.Module, got {type(model).__name__}")
    if quant not in QUANT_MODES:
        raise DisTorchError(f"quant={quant!r}: expected one of {', '.join(QUANT_MODES)}")
    graph = None
    if plan is None:
        comp = norm_compute(compute)
        donors = _donor_list(donors)
        if example_args is not None and not isinstance(example_args, (tuple, list)):
            example_args = (example_args,)
        ran: list[str] = []
        graph = _run(ran, "trace", trace, model, tuple(example_args or ()), example_kwargs,
                     granularity=granularity)
        inv = inventory if inventory is not None else inventory_for(comp, donors)
        plan = _run(ran, "partition", partition, graph, inv, comp, vram_gb=vram_gb, donors=donors or None,
                    expert=expert)
        plan = _run(ran, "quant_choice", _quant_choice, plan, graph, inv, quant, quant_budget_gb)
        sched = _run(ran, "schedule", schedule, plan, graph)
        _run(ran, "verify", verify, plan, sched)
        log.debug("passes ran: %s", " -> ".join(ran))
    elif not isinstance(plan, Plan):
        raise DisTorchError(f"plan= must be a distorch Plan, got {type(plan).__name__}")
    rt = apply(model, plan, graph, window_units=window_units, profile=profile, progress=progress)
    return Handle(rt, plan, graph)


def _run(ran: list[str], name: str, fn, *args, **kw):
    """fn(*args, **kw) as the pass `name`; its error re-raised (same type) with the pass named and the ones
    that ran before it, like torch.fx's PassManager.  `ran` collects the passes that finished."""
    try:
        out = fn(*args, **kw)
    except Exception as e:
        if e.args and isinstance(e.args[0], str):
            before = ", ".join(ran) if ran else "none"
            e.args = (f"{name} pass failed (passes run before it: {before}): {e.args[0]}",) + e.args[1:]
        raise
    ran.append(name)
    log.debug("pass %s done", name)
    return out


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
