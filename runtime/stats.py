"""Step statistics and the timeline of a running Plan, read off the hot path.

Everything here synchronizes the compute device first (reading CUDA event times needs the events
to have completed), so call it between steps, never inside the model's forward.

It reads the runtime's parts (runtime/apply.py): `clock` and `profiler` (runtime/profile.py), `ring`
and its learner `learn` (runtime/ring.py, runtime/learn.py), `resident`, `autotune`.

`measured_step` condenses the latest profiled step into what the cost model takes (unit times, link
rates, the step, its stall, the gap before it); runtime/autotune.py re-predicts the step from it.
"""
from __future__ import annotations

import math
import statistics
from typing import Any


def _ms(e0, e1) -> float | None:
    try:
        return float(e0.elapsed_time(e1))
    except Exception:      # an event never recorded (e.g. a step still running)
        return None


def step_times(rt: Any) -> list[float]:
    """Seconds per step for the most recent steps (GPU time between the root's pre and post hooks)."""
    rt.be.synchronize()
    out = []
    for e0, e1 in rt.clock.step_events():
        ms = _ms(e0, e1)
        if ms is not None:
            out.append(ms / 1e3)
    return out


def timeline(rt: Any, steps: int | None = 1) -> list[dict]:
    """Profiled events as dicts {lane, unit, start_ms, end_ms, step}, times relative to the first event
    of the earliest step returned. Needs profile=True; `steps` = how many of the latest steps."""
    trace = rt.profiler.trace
    if not trace:
        return []
    rt.be.synchronize()
    last = max(t[4] for t in trace)
    first = last - (steps - 1) if steps else min(t[4] for t in trace)
    tr = [t for t in trace if t[4] >= first]
    # earliest event of the window as reference
    ref = tr[0][2]
    for t in tr:
        d = _ms(ref, t[2])
        if d is not None and d < 0:
            ref = t[2]
    # a copy moves one ring item, named after its first unit; "units" lists every unit it carries
    members = {rt.units[it[0]]: [rt.units[i] for i in it] for it in rt.ring.items if it}
    out = []
    for lane, unit, e0, e1, step in tr:
        a, b = _ms(ref, e0), _ms(ref, e1)
        if a is None or b is None:
            continue
        ev = {"lane": lane, "unit": unit, "start_ms": a, "end_ms": b, "step": step}
        if lane != "compute":
            ev["units"] = members.get(unit, [unit])
        out.append(ev)
    out.sort(key=lambda d: d["start_ms"])
    return out


def unit_times(rt: Any, steps: int | None = None) -> dict[str, float]:
    """Median measured compute seconds per unit call (profile mode), for feeding Unit.time_s (a stretch
    of resident units timed as one span shared out over them: runtime/profile.py `spread`)."""
    per: dict[str, list[float]] = {}
    for ev in timeline(rt, steps=steps):
        if ev["lane"] == "compute":
            per.setdefault(ev["unit"], []).append((ev["end_ms"] - ev["start_ms"]) / 1e3)
    return rt.profiler.spread({k: statistics.median(v) for k, v in per.items()})


def bytes_per_link(rt: Any) -> dict[str, int]:
    """Bytes one step moves over each link (the streamed units of the learned call order)."""
    ring, learn = rt.ring, rt.learn
    per_link: dict[str, int] = {}
    for i in learn.seq if learn.n else ():
        src = ring.link_of[i].src
        per_link[src] = per_link.get(src, 0) + ring.nbytes[i]
    return per_link


def lead_gaps(rt: Any, tl: list[dict]) -> list[tuple[str, float, float, float]]:
    """Per unit call of timeline `tl` (one step), in order: (unit, span, lead, stall) in seconds.  span: its
    own events; stall: the time before its start that a streamed unit waited for its copy after the
    previous unit finished; lead: the rest of the time between the previous unit's end and its start --
    work no unit's hooks enclose (attention, norms and activations between the Linear layers of a
    sub-unit plan), which the step does just before this unit.  The first call has no lead (the time
    before it is the root's)."""
    comp = sorted((e for e in tl if e["lane"] == "compute"), key=lambda e: e["start_ms"])
    copies: dict[str, list[dict]] = {}
    for e in tl:
        if e["lane"].startswith("copy"):
            copies.setdefault(e["unit"], []).append(e)
    out = []
    prev_end = None
    for e in comp:
        span = (e["end_ms"] - e["start_ms"]) / 1e3
        lead = stall = 0.0
        if prev_end is not None:
            gap = max(0.0, e["start_ms"] - prev_end)
            if e["unit"] in rt.index:
                cands = [c for c in copies.get(e["unit"], []) if c["end_ms"] <= e["start_ms"] + 1e-3]
                if cands:
                    c_end = max(c["end_ms"] for c in cands)
                    stall = min(gap, max(0.0, min(e["start_ms"], c_end) - prev_end))
            lead = (gap - stall) / 1e3
            stall /= 1e3
        out.append((e["unit"], span, lead, stall))
        prev_end = e["end_ms"]
    return out


def stall_seconds(rt: Any, tl: list[dict]) -> float:
    """Seconds in timeline `tl` (one step) that a streamed unit's compute started after the previous unit
    finished because its copy was still running."""
    return sum(g[3] for g in lead_gaps(rt, tl))


def measured_step(rt: Any) -> dict | None:
    """The latest profiled step as the cost model takes it, or None when there is none:

        times    unit name -> compute seconds in the step attributed to the unit (a unit called twice: both
                 calls): its own span and the work before it that no unit encloses (lead_gaps), so that a
                 re-simulation puts that work where it ran, not in one lump at the root (its own spans
                 alone: unit_times)
        rates    home device -> bytes/s of its link: the bytes one step moves over it / the time its
                 copies took; inf when the ring holds every item and no copy runs per step
        step_s   GPU time of the step (root pre to post hook)
        stall_s  time in it that compute waited for a copy (stall_seconds)
        gap_s    GPU time between the previous step's end and this step's start (the caller's own work)

    Synchronizes the device (reads events): call it between steps, once."""
    tl = timeline(rt, steps=1)
    steps = step_times(rt)
    if not tl or not steps:
        return None
    times: dict[str, float] = {}
    copy_s: dict[str, float] = {}
    gaps = lead_gaps(rt, tl)
    for name, span, lead, _ in gaps:
        times[name] = times.get(name, 0.0) + span + lead
    times = rt.profiler.spread(times)            # a stretch of resident units: its units' shares
    for e in tl:
        if e["lane"] != "compute":
            copy_s[e["lane"][5:]] = copy_s.get(e["lane"][5:], 0.0) + (e["end_ms"] - e["start_ms"]) / 1e3
    per_link = bytes_per_link(rt)
    rates = {k: per_link[k] / v for k, v in copy_s.items() if v > 0 and k in per_link}
    ring = rt.ring
    if ring.ng and ring.W >= ring.ng:           # every item stays in its slot: nothing moves per step
        rates.update({k: math.inf for k in per_link if k not in copy_s})
    gap = 0.0
    se = rt.clock.step_events()
    if len(se) >= 2:
        g = _ms(se[-2][1], se[-1][0])
        gap = max(0.0, g / 1e3) if g is not None else 0.0
    return {"times": times, "rates": rates, "step_s": steps[-1],
            "stall_s": sum(g[3] for g in gaps), "gap_s": gap}


def summarize(rt: Any, last: int = 5) -> dict:
    """Per-step statistics: bytes per link, copy and stall time, measured vs predicted step time."""
    times = step_times(rt)[-last:] if rt.active else []
    per_link = bytes_per_link(rt)
    pred = rt.plan.predicted or {}
    ring, clock, prof = rt.ring, rt.clock, rt.profiler
    d = {
        "steps": clock.steps,
        "streamed_units": len(rt.units),
        "window_slots": ring.W,
        "slot_bytes": ring.slot_bytes,
        "window_bytes": ring.W * ring.slot_bytes,
        "resident_bytes": rt.resident.nbytes,
        "home_bytes": {k: sum(b for b, link in zip(ring.nbytes, ring.link_of) if link.src == k)
                       for k in ring.links} if rt.active else {},
        "bytes_per_step": per_link,
        "bytes_moved_total": dict(ring.bytes_moved),
        "copies_total": ring.copies,
        "deviations": rt.learn.deviations,
        "fallback_loads": ring.fallback_loads,
        "measured_step_s": statistics.median(times) if times else None,
        "measured_host_s": statistics.median(clock.host_s[-last:]) if clock.host_s else None,
        "compute": rt.plan.compute,
        "predicted_step_s": pred.get("step_s"),
        "predicted_compute_s": pred.get("compute_s"),
        # "measured": re-simulated from a profiled step's unit times and link rates (runtime/autotune.py);
        # else how the plan estimated them ("flops", "bytes-fallback"); estimated_step_s: the plan's own
        "predicted_basis": pred.get("basis"),
        "estimated_step_s": pred.get("estimated_step_s", pred.get("step_s") if pred.get("basis") != "measured"
                                     else None),
        "measured_gap_s": pred.get("gap_s"),
        "autotune": rt.autotune.result,
        # units streamed compressed (runtime/codec_stream.py): tensors, raw and stored bytes, ratio, encode time
        "codec": dict(rt.codec.stats) if getattr(rt, "codec", None) is not None and rt.codec.stats else None,
    }
    if d["measured_step_s"] and d["predicted_step_s"]:
        d["measured_over_predicted"] = d["measured_step_s"] / d["predicted_step_s"]
    if prof.on and prof.trace:
        tl = timeline(rt, steps=1)
        copy_ms = sum(e["end_ms"] - e["start_ms"] for e in tl if e["lane"].startswith("copy"))
        busy = sum(e["end_ms"] - e["start_ms"] for e in tl if e["lane"] == "compute")
        d["copy_s"] = copy_ms / 1e3
        d["compute_busy_s"] = busy / 1e3
        d["stall_s"] = stall_seconds(rt, tl)
    return d


def basis_text(basis: str | None) -> str:
    """What a prediction's unit times are, in words: "from measured unit times" or "estimated (...)"."""
    if basis == "measured":
        return "from measured unit times"
    how = {"flops": "FLOPs at the rated speed", "bytes-fallback": "weight sizes"}.get(basis or "")
    return f"estimated ({how})" if how else "estimated"


def format_stats(d: dict) -> str:
    def gb(x: float) -> str:
        return f"{x / 2**30:.2f} GiB"
    lines = [f"steps {d['steps']}, streamed units {d['streamed_units']}, window {d['window_slots']} x "
             f"{gb(d['slot_bytes'])}, resident {gb(d['resident_bytes'])}"]
    for k, v in d["bytes_per_step"].items():
        lines.append(f"  {k} -> compute: {gb(v)} per step")
    m, p = d.get("measured_step_s"), d.get("predicted_step_s")
    lines.append("  step: measured " + (f"{m * 1e3:.1f} ms" if m else "-") +
                 ", predicted " + (f"{p * 1e3:.1f} ms" if p else "-") +
                 (f" {basis_text(d.get('predicted_basis'))}" if p else "") +
                 (f" (x{m / p:.2f})" if m and p else ""))
    if "stall_s" in d:
        lines.append(f"  copy {d['copy_s'] * 1e3:.1f} ms, stall {d['stall_s'] * 1e3:.1f} ms per step")
    c = d.get("codec")
    if c:
        lines.append(f"  compressed: {c['tensors']} tensors of {c['units']} units, {gb(c['raw_bytes'])} -> "
                     f"{gb(c['stored_bytes'])} (x{c['ratio']:.3f}), coded in {c['encode_s']:.1f} s on "
                     f"{c['encoded_on']}, decode scratch {gb(c.get('scratch_bytes', 0))}")
    if d["deviations"] or d["fallback_loads"]:
        lines.append(f"  order deviations {d['deviations']}, fallback loads {d['fallback_loads']}")
    return "\n".join(lines)
