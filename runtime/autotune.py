"""Window autotune: measure one step, then let the cost model's policy choose the slot count.

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
"""
from __future__ import annotations

import logging

import torch

from ..compiler.cost import best_window
from ..compiler.ring_layout import MAX_SLOTS
from . import stats as _stats
from .hooks import UnitPart
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .apply import Runtime

__all__ = ["Autotune", "TUNE_RESERVE_BYTES"]

log = logging.getLogger("distorch.runtime.autotune")

TUNE_RESERVE_BYTES = 2 << 30     # autotune leaves this much of the device free (activations)
MAX_TRIES = 3
OFF, WAIT, MEASURE = 0, 1, 2     # states: done (or off); waiting for the warm-up step; measuring a step


class Autotune(UnitPart):
    def __init__(self, on: bool):
        self.state = WAIT if on else OFF
        self.tries = 0
        self.hooks: list = []          # temporary profiling hooks on resident units while measuring
        self.result: dict | None = None
        self._was_profiling = False
        self.rt = None

    @property
    def enabled(self) -> bool:
        return self.state != OFF

    def attach(self, rt: Runtime) -> None:
        self.rt = rt

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
        rt.profiler.trace.clear()
        if not self._was_profiling:        # resident units have profiling hooks only with profile=True
            self.hooks = rt.profiler.hook_resident()

    def finish(self, ok: bool) -> None:
        """The measured step ended (`ok`: in the expected order): choose the window from it."""
        rt = self.rt
        self.tries += 1
        if not ok and self.tries < MAX_TRIES:
            rt.profiler.trace.clear()
            return                     # an irregular step: measure the next one
        gap = 0.0
        ev, step = [], []
        try:
            if ok:
                ev = _stats.timeline(rt, steps=1)
                step = _stats.step_times(rt)[-1:]
                se = rt.clock.step_events()
                if len(se) >= 2:       # GPU time between the previous step's end and this one's start
                    try:
                        gap = max(0.0, se[-2][1].elapsed_time(se[-1][0]) / 1e3)
                    except Exception:
                        gap = 0.0
        finally:
            self._stop()
        if not ev or not step:
            return
        times: dict[str, float] = {}
        copy_s: dict[str, float] = {}
        for e in ev:
            d = (e["end_ms"] - e["start_ms"]) / 1e3
            if e["lane"] == "compute":
                times[e["unit"]] = times.get(e["unit"], 0.0) + d
            else:
                copy_s[e["lane"][5:]] = copy_s.get(e["lane"][5:], 0.0) + d
        per_link = _stats.bytes_per_link(rt)
        rates = {k: per_link[k] / v for k, v in copy_s.items() if v > 0 and k in per_link}
        self.choose(times, rates, step[0], gap)

    def _stop(self):
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.state = OFF
        rt = self.rt
        rt.profile = self._was_profiling           # composes the chains again, without this part
        if not rt.profile:
            rt.profiler.trace.clear()

    def choose(self, times: dict, rates: dict, step_s: float, gap_s: float = 0.0) -> dict:
        """Measured unit times (name -> s per step), link rates (home -> bytes/s), the step and the gap
        before it -> the slot count (compiler.cost.best_window); the ring grows to it when larger."""
        rt = self.rt
        ring = rt.ring
        slot = ring.pool.slot_bytes
        cap = (rt.plan.predicted or {}).get("window_max_bytes")
        if rt.be.cuda:
            free = torch.cuda.mem_get_info(rt.device)[0] - TUNE_RESERVE_BYTES
            cap = min(cap if cap is not None else float("inf"), ring.W * slot + max(0, free))
        limit = min(MAX_SLOTS, max(ring.ng, 1), int(cap // slot) if cap is not None else MAX_SLOTS)
        before = ring.W
        k, pred = best_window(rt.plan, times, rates, step_s, unit_bytes=rt.unit_bytes, current=before,
                              limit=limit, gap_s=gap_s)
        res = {"measured_step_s": step_s, "gap_s": gap_s, "slots_before": before, "slots": k, "cap_bytes": cap,
               "predicted_by_slots": pred, "link_rates": rates}
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
