"""From a measured step to the prediction: the profiler's own cost taken out, then the step simulated again.

    without_profiler_cost(m, own, per_link, min_share)   runtime.stats.measured_step's dict less the
                                  profiler's own host work the streams waited for (Profiler.own_cost)
    calibrated(m, unprofiled_s)   the measured step with its compute scaled to what the same input took
                                  unprofiled (the hooks' host cost no event times)
    measured_prediction(plan, times, rates, step_s, ...)  compiler.cost.simulate of the plan with the
                                  measured unit times and link rates

Pure functions over dicts and the Plan (runtime/autotune.py calls them between steps; the tests call them
with made-up measurements).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..compiler.cost import simulate
from ..compiler.graph import ROOT, Unit
from ..compiler.inventory import Inventory

if TYPE_CHECKING:
    from ..compiler.plan import Plan

__all__ = ["measured_prediction", "without_profiler_cost", "calibrated", "CALIB_TOL", "CALIB_MIN"]


def without_profiler_cost(m: dict, own: dict, per_link: dict, min_share: float = 0.0) -> dict:
    """Measured step `m` (times, rates, step_s, stall_s, gap_s) less the profiler's own cost `own`
    (Profiler.own_cost: gap_s, units, copies): the part before the step's first unit (and after its last)
    comes off the root's time (never below 0), a unit's part off that unit's time, a link's copy part off
    its busy time (per_link: home -> bytes one step moves; its rate rises; a copy keeps 1 % of its time).
    Returns a new dict with "profiled_step_s" (the step as measured) and "profiler_cost_s" (what came off
    the step), or `m` itself when all of it is below `min_share` of the step."""
    times = dict(m["times"])
    inside = 0.0
    for n, c in own.get("units", {}).items():
        if c > 0 and n in times:
            d = min(c, times[n])
            times[n] -= d
            inside += d
    root = m["step_s"] - m["stall_s"] - sum(m["times"].values())
    gap = min(own.get("gap_s", 0.0), max(0.0, root))
    rates = dict(m["rates"])
    copies = 0.0
    for src, c in own.get("copies", {}).items():
        r = rates.get(src)
        if c > 0 and r and math.isfinite(r) and per_link.get(src):
            busy = per_link[src] / r
            d = min(c, 0.99 * busy)
            rates[src] = per_link[src] / (busy - d)
            copies += d
    if inside + gap + copies < min_share * m["step_s"]:
        return m
    return dict(m, times=times, rates=rates, step_s=m["step_s"] - inside - gap,
                profiled_step_s=m["step_s"], profiler_cost_s=inside + gap)


CALIB_TOL = 0.03     # an unprofiled step this much (or more) below the profiled one scales the compute
CALIB_MIN = 0.5      # ... by at most this factor


def calibrated(m: dict, unprofiled_s: float) -> dict | None:
    """Measured step `m` (after without_profiler_cost) with its compute -- every unit's time and the
    root's -- scaled so that compute + the measured stall is `unprofiled_s`, the GPU step the same input
    took without profiling; None when that is not at least CALIB_TOL below m's step (a profile can only
    make a step slower: a faster profiled step is noise, left alone).

    Why: what a profiled step costs beyond the profiler's own timed host work -- torch's slower call path
    of every module carrying a hook -- shows only where the step is host-bound (many small units; Flux at
    512x512 on an H200: profiled 94 ms, unprofiled 82 ms, bench/results/comfy_vram_h200_r10.md), and no
    event can time it.  The unprofiled steps that follow can: their time is the truth the unit times must
    add up to.  The scale is one factor for every unit (the profile cannot tell which units lost the most);
    link rates and the stall stay as measured.  The result carries "unprofiled_step_s" and "calibration"
    (the factor, >= CALIB_MIN)."""
    comp = m["step_s"] - m["stall_s"]
    if comp <= 0 or not unprofiled_s > 0 or unprofiled_s >= m["step_s"] * (1 - CALIB_TOL):
        return None
    f = max(CALIB_MIN, (unprofiled_s - m["stall_s"]) / comp)
    return dict(m, times={k: v * f for k, v in m["times"].items()}, step_s=m["stall_s"] + comp * f,
                unprofiled_step_s=unprofiled_s, calibration=f)


def measured_prediction(plan: Plan, times: dict, rates: dict, step_s: float, *, stall_s: float = 0.0,
                        window_bytes: int) -> dict:
    """compiler.cost.simulate of `plan` from measured times: copies of its units (the plan's own objects
    are not touched) with time_s = times[name] (0 for a unit that did not run), the root unit (one made
    when the plan has none) with the step's time outside every unit's (stats.measured_step: the root's
    time before the first unit and after the last) and outside the stall, links at the
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
