"""Verify a Plan and its Schedule before anything runs.

Checks (each failure is one readable line):
  * bytes conserved: every unit has one home; per-device byte totals match the units; they add up to
    the model;
  * no device over its budget (expert budgets, when the plan was made from a string: the compute
    device's exactly, a donor's by less than one unit, since shares of discrete units cannot be exact),
    its free memory
    or its total memory; on the compute device, resident units + window count;
  * the window: n_slots * slot_bytes <= window_bytes and every offloaded unit fits its slot;
  * execution: replaying the schedule's ops for two consecutive steps (after its prologue), every
    offloaded unit's copy was issued into its slot before the unit is used, no copy lands in a slot
    still held by another unit, every slot is released after its unit's compute, and each offloaded unit
    is loaded exactly once per step.
`check` returns the list of problems; `verify` raises PlanVerificationError listing them.
"""
from __future__ import annotations

from ..compiler.plan import Plan
from ..errors import DisTorchError
from .schedule import Schedule


class PlanVerificationError(DisTorchError):
    """A Plan/Schedule breaks an invariant (memory, conservation, load-before-use)."""


def check(plan: Plan, sched: Schedule) -> list[str]:
    errs: list[str] = []
    names = [u.name for u in plan.units]
    if len(set(names)) != len(names):
        errs.append("a unit appears twice in the plan")
    per: dict[str, int] = {}
    for u in plan.units:
        per[u.device] = per.get(u.device, 0) + u.bytes
    for d, info in plan.devices.items():
        if info.get("bytes", 0) != per.get(d, 0):
            errs.append(f"device {d}: plan says {info.get('bytes')} bytes, its units add up to {per.get(d, 0)}")
    for d in per:
        if d not in plan.devices and per[d]:
            errs.append(f"units live on {d}, which is missing from plan.devices")
    if sum(per.values()) != plan.model_bytes:
        errs.append("per-device bytes do not add up to the model")
    budgets = plan.source.get("budgets") or {}
    for d, b in per.items():
        info = plan.devices.get(d, {})
        use = b + (plan.window_bytes if d == plan.compute else 0)
        if d in budgets and b > budgets[d]:
            # the compute budget is a hard cap; donor budgets are targets met to within one unit
            big = max(u.bytes for u in plan.units if u.device == d)
            if d == plan.compute or b - budgets[d] >= big:
                errs.append(f"device {d}: {b} bytes placed, over its budget of {budgets[d]}")
        if "free" in info and use > info["free"]:
            errs.append(f"device {d}: {use} bytes needed, over its {info['free']} free")
        if "total" in info and use > info["total"]:
            errs.append(f"device {d}: {use} bytes needed, over its {info['total']} total")
    off = [u for u in sorted(plan.units, key=lambda u: u.order) if u.device != plan.compute]
    if sched.n_slots * sched.slot_bytes > sched.window_bytes or sched.window_bytes != plan.window_bytes:
        errs.append(f"window exceeded: {sched.n_slots} slots x {sched.slot_bytes} bytes vs window "
                    f"{sched.window_bytes} (plan: {plan.window_bytes})")
    loads = {ld.unit: ld for ld in sched.loads}
    for u in off:
        if u.name not in loads:
            errs.append(f"offloaded unit {u.name} has no load")
        elif loads[u.name].bytes > sched.slot_bytes:
            errs.append(f"unit {u.name} ({loads[u.name].bytes} bytes) does not fit a slot of {sched.slot_bytes}")
        elif not (0 <= loads[u.name].slot < max(1, sched.n_slots)):
            errs.append(f"unit {u.name} uses slot {loads[u.name].slot} of {sched.n_slots}")
    for name in loads:
        if name not in {u.name for u in off}:
            errs.append(f"load of {name}, which is not offloaded")
    if errs:
        return errs
    # replay the program for n_slots + 1 consecutive calls (the ring's slot pattern repeats)
    kidx = {u.name: k for k, u in enumerate(off)}
    holder: dict[int, str | None] = {s: None for s in range(sched.n_slots)}
    loaded: dict[str, int] = {}   # unit -> slot its next use will read

    def do_load(unit: str, step: int, where: str):
        slot = sched.slot_for(kidx[unit], step)
        if holder[slot] is not None:
            errs.append(f"{where}: load of {unit} into slot {slot} while {holder[slot]} still holds it")
        holder[slot] = unit
        loaded[unit] = slot

    for unit in sched.prologue:
        do_load(unit, 0, "prologue")
    count = {u.name: 1 for u in off if u.name in sched.prologue}
    for step in range(max(2, sched.n_slots + 1)):
        nxt = {}
        for op in sched.ops:
            kind, unit = op["op"], op["unit"]
            if kind == "wait" or (kind == "compute" and unit in loads):
                if unit not in loaded or holder.get(loaded[unit]) != unit:
                    errs.append(f"step {step}: {unit} used before its copy was issued into its slot")
            elif kind == "release":
                slot = loaded.pop(unit, None)
                if slot is None or holder.get(slot) != unit:
                    errs.append(f"step {step}: release by {unit}, which holds no slot")
                else:
                    holder[slot] = None
            elif kind == "load":
                if op.get("next_step"):
                    do_load(unit, step + 1, f"step {step}")
                    nxt[unit] = nxt.get(unit, 0) + 1
                else:
                    do_load(unit, step, f"step {step}")
                    count[unit] = count.get(unit, 0) + 1
        for u in off:
            if count.get(u.name, 0) != 1:
                errs.append(f"step {step}: {u.name} loaded {count.get(u.name, 0)} times")
        count = nxt
        if errs:
            break
    return errs


def verify(plan: Plan, sched: Schedule) -> None:
    errs = check(plan, sched)
    if errs:
        raise PlanVerificationError("plan verification failed:\n  " + "\n  ".join(errs[:20]))
