"""Window autotune and the measured prediction: measure one step, re-predict it, size the ring.

Default on CUDA when the plan's unit times are estimates (plan.predicted["basis"] != "measured").  The
step after the warm-up runs profiled (runtime/profile.py: events around every unit, temporary hooks on
the units the ring does not stream, and around every copy); from those measured unit times and link
rates `compiler.cost.best_window` (the policy: compiler.cost.simulate over the plan for every slot
count) picks the slot count, and the ring grows between steps (runtime/ring.py `resize`) when more slots
shorten the step by more than 1 %.  The slots come only from the plan's window limit
(plan.predicted["window_max_bytes"]: the plan's budget -- offload_gb / max_vram_gb, passes/partition.py --
less everything it holds but the slots, so a grown ring stays inside the same budget) and the device's
free memory less TUNE_RESERVE_BYTES.  The measured
GPU time between steps (the sampler's own work, a preview's synchronize) is added to every prediction but
does not change the choice: the host issues no copy while it is away.  An irregular step (the call order
changed) is measured again, at most three times.  `result` records what was measured and chosen.

The measured prediction.  Whatever the slot count became (grown or not), the step is simulated again
(`measured_prediction`: compiler.cost.simulate over copies of the plan's units whose time_s are the
measured ones, the root unit taking the step's time outside every unit and outside stalls, at the
measured link rates, with the ring's slots) and replaces the estimate: plan.predicted["step_s"] /
["compute_s"] / ... with ["basis"] = "measured", the estimate kept as ["estimated_step_s"] (and
["estimated_compute_s"], ["estimated_basis"]), the gap before the step as ["gap_s"] (not in step_s:
measured_step_s is root pre to post hook too).  A later compile with the same plan then skips the
profiled step.  Without tuning (autotune off: CPU compute, autotune=False) a step is measured for the
prediction alone when the module is compiled with profile=True, or when `measure_next()` asks for it
(the ComfyUI nodes do on CPU compute); the ring is left as it is.
"""
from __future__ import annotations

import logging
import math

import torch

from ..compiler.cost import best_window, simulate
from ..compiler.graph import ROOT, Unit
from ..compiler.inventory import Inventory
from ..compiler.ring_layout import MAX_SLOTS
from . import stats as _stats
from .hooks import UnitPart
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..compiler.plan import Plan
    from .apply import Runtime

__all__ = ["Autotune", "TUNE_RESERVE_BYTES", "measured_prediction"]

log = logging.getLogger("distorch.runtime.autotune")

TUNE_RESERVE_BYTES = 2 << 30     # autotune leaves this much of the device free (activations)
MAX_TRIES = 3
OFF, WAIT, MEASURE = 0, 1, 2     # states: done (or off); waiting for the warm-up step; measuring a step


class Autotune(UnitPart):
    """on: measure a step, re-predict it and size the ring (tune); off: nothing, unless the module is
    profiled or `measure_next()` is called (measure and re-predict only)."""

    def __init__(self, on: bool) -> None:
        self.tune = bool(on)
        self.state = WAIT if on else OFF
        self.tries = 0
        self.hooks: list = []          # temporary profiling hooks on resident units while measuring
        self.result: dict | None = None
        self.measured: dict | None = None   # the measured step the prediction came from (stats.measured_step)
        self._was_profiling = False
        self.rt = None

    @property
    def enabled(self) -> bool:
        return self.state != OFF

    def attach(self, rt: Runtime) -> None:
        self.rt = rt
        if self.state == OFF and rt.profile:
            self.measure_next()        # profiled anyway: the prediction from the first measured step

    def measure_next(self) -> bool:
        """Measure the step after the warm-up (or the next one) for the prediction alone (the slot count
        stays), when the plan's unit times are estimates and nothing is being measured; True when armed."""
        rt = self.rt
        if rt is None or self.state != OFF or not rt.units or not rt.active or \
                (rt.plan.predicted or {}).get("basis") == "measured":
            return False
        self.state = WAIT
        self.tries = 0
        rt.compose()                   # begin / end join the chains (between steps)
        return True

    def begin(self) -> None:
        if self.state == WAIT and self.rt.clock.steps >= 1:
            self.start()

    def end(self) -> None:
        if self.state == MEASURE:
            self.finish(self.rt.learn.ok)

    def start(self) -> None:
        """Profile the next step: events around every unit (temporary hooks on resident units) and copy."""
        rt = self.rt
        self.state = MEASURE
        self._was_profiling = rt.profile
        rt.profile = True
        if not self._was_profiling:        # resident units have profiling hooks only with profile=True
            rt.profiler.trace.clear()
            self.hooks = rt.profiler.hook_resident()

    def finish(self, ok: bool) -> None:
        """The measured step ended (`ok`: in the expected order): choose the window from it (when tuning)
        and re-predict the step from it."""
        rt = self.rt
        self.tries += 1
        if not ok and self.tries < MAX_TRIES:
            if not self._was_profiling:
                rt.profiler.trace.clear()
            return                     # an irregular step: measure the next one
        m = None
        try:
            if ok:
                m = _stats.measured_step(rt)
        finally:
            self._stop()
        if m is None:
            return
        if self.tune:
            self.choose(m["times"], m["rates"], m["step_s"], m["gap_s"], stall_s=m["stall_s"])
        self.predict(m)

    def predict(self, m: dict) -> dict:
        """plan.predicted from measured step `m` (runtime.stats.measured_step) at the ring's slot count;
        the estimate is kept under estimated_*.  Returns the new predicted dict."""
        rt = self.rt
        plan = rt.plan
        old = dict(plan.predicted or {})
        sim = measured_prediction(plan, m["times"], m["rates"], m["step_s"], stall_s=m["stall_s"],
                                  window_bytes=rt.ring.W * rt.unit_bytes)
        new = dict(old)
        if "estimated_step_s" not in old:
            new["estimated_step_s"] = old.get("step_s")
            new["estimated_compute_s"] = old.get("compute_s")
            new["estimated_basis"] = old.get("basis")
        for k in ("step_s", "compute_s", "stall_s", "overhead_s", "floor_s", "per_link_s"):
            new[k] = sim[k]
        new["basis"] = "measured"
        new["measured_step_s"] = m["step_s"]
        new["gap_s"] = m["gap_s"]
        new["measured_link_rates"] = {k: v for k, v in m["rates"].items() if math.isfinite(v)}
        new["measured_slots"] = rt.ring.W
        plan.predicted = new           # a new dict: whoever holds the old one keeps the estimate
        self.measured = m
        est = new.get("estimated_step_s")
        log.info("distorch: predicted step from measured unit times %.1f ms (estimated %s, measured %.1f ms, "
                 "%d slots)", new["step_s"] * 1e3, f"{est * 1e3:.1f} ms" if est else "-", m["step_s"] * 1e3,
                 rt.ring.W)
        return new

    def _stop(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.state = OFF
        rt = self.rt
        rt.profile = self._was_profiling           # composes the chains again, without this part
        if not rt.profile:
            rt.profiler.trace.clear()

    def choose(self, times: dict, rates: dict, step_s: float, gap_s: float = 0.0, *, stall_s: float = 0.0) -> dict:
        """Measured unit times (name -> s per step), link rates (home -> bytes/s), the step, the gap
        before it and the stall in it -> the slot count (compiler.cost.best_window); the ring grows to it
        when larger.  The root unit gets the step less the units and the stall (the stall is what the
        simulation predicts, not a compute time)."""
        rt = self.rt
        ring = rt.ring
        slot = ring.pool.slot_bytes
        cap = (rt.plan.predicted or {}).get("window_max_bytes")
        if rt.be.cuda:
            free = torch.cuda.mem_get_info(rt.device)[0] - TUNE_RESERVE_BYTES
            cap = min(cap if cap is not None else float("inf"), ring.W * slot + max(0, free))
        limit = min(MAX_SLOTS, max(ring.ng, 1), int(cap // slot) if cap is not None else MAX_SLOTS)
        before = ring.W
        k, pred = best_window(rt.plan, times, rates, max(0.0, step_s - stall_s), unit_bytes=rt.unit_bytes,
                              current=before, limit=limit, gap_s=gap_s)
        res = {"measured_step_s": step_s, "gap_s": gap_s, "stall_s": stall_s, "slots_before": before, "slots": k,
               "cap_bytes": cap, "predicted_by_slots": pred, "link_rates": rates}
        if k > before:
            ring.resize(k)
            if rt.plan.window_bytes is not None:
                rt.plan.window_bytes = k * rt.unit_bytes
            log.info("distorch: ring grown from %d to %d slots from measured unit times (simulated step "
                     "%.1f -> %.1f ms)", before, k, pred[before] * 1e3, pred[k] * 1e3)
        self.result = res
        return res

    def detach(self, rt: Runtime) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.state = OFF


def measured_prediction(plan: Plan, times: dict, rates: dict, step_s: float, *, stall_s: float = 0.0,
                        window_bytes: int) -> dict:
    """compiler.cost.simulate of `plan` from measured times: copies of its units (the plan's own objects
    are not touched) with time_s = times[name] (0 for a unit that did not run), the root unit (one made
    when the plan has none) with the step's time outside every unit and outside the stall, links at the
    measured rates (home -> bytes/s; a link not measured at the rate the plan's own prediction implied),
    `window_bytes` of slots.  Returns simulate's dict."""
    placed = sorted(plan.units, key=lambda u: u.order)
    root_t = max(0.0, step_s - stall_s - sum(times.values()))
    units = [Unit(u.name, u.type, param_bytes=u.bytes, kind=u.kind,
                  time_s=root_t if u.name == ROOT else float(times.get(u.name, 0.0))) for u in placed]
    if root_t > 0 and not any(u.name == ROOT for u in placed):
        units.insert(0, Unit(ROOT, "root", kind="root", time_s=root_t))
    homes = {u.name: u.device for u in placed}
    inv = Inventory(source="measured")
    pr = plan.predicted or {}
    for key, b in (pr.get("per_link_bytes") or {}).items():     # the estimate's rates, for links not measured
        t = (pr.get("per_link_s") or {}).get(key)
        src, _, dst = key.partition(">")
        if t and b and dst == plan.compute:
            inv.links[(src, plan.compute)] = b / t
    for src, r in rates.items():
        inv.links[(src, plan.compute)] = r
    # units streamed compressed (Plan.codec) move their packed bytes; the window was sized for those
    return simulate(units, homes, plan.compute, inv, int(window_bytes), streamed=dict(plan.codec or {}) or None)
