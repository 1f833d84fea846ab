"""Schedule pass: the transfer / prefetch / release operations that execute a Plan (plain data).

The window of `plan.window_bytes` on the compute device is a pool of `n_slots` equal slots of
`slot_bytes` (= the largest offloaded unit), slot s at byte offset s * slot_bytes, used as a RING (as
runtime/apply.py does): the offloaded units of a step, in execution order, repeat every step; item
g = step * m + k (k-th of the m offloaded units) runs from slot g % n_slots.  When m is a multiple of
n_slots a unit keeps its slot every step (`LoadOp.slot`); otherwise `LoadOp.slot` is its slot in the
first step and `slot_for(k, step)` gives the rest.  The copy of item g is issued right after item
g - n_slots has computed (`issue_after`), which for the first n_slots units of a step is a unit of the
PREVIOUS step (`next_step` loads: prefetch wraps across the step boundary, since a denoising loop calls
the same forward again).  Issue points are increasing, so copies go onto each link's stream in
execution order.  This is exactly what compiler/cost.simulate predicts.

`Schedule.ops` is the per-step program the runtime replays each forward:

    {"op": "compute", "unit": U}                        run unit U
    {"op": "wait",    "unit": U}                       before computing an offloaded U: wait its copy event
    {"op": "release", "unit": U}                       after computing an offloaded U: its slot is free
    {"op": "load",    "unit": V, "src": D, "bytes": B, "next_step": bool}
                                                        issue V's copy D -> compute into slot s (on the
                                                        copy stream of link D>compute); next_step: V is
                                                        used in the next call of the forward
`Schedule.prologue` lists the loads (unit names) to issue before the very first step (the `next_step`
loads, whose trigger has not run yet).  Each `LoadOp` in `Schedule.loads` carries the same facts per unit.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict

from ..compiler.cost import n_slots_for, slot_gates
from ..compiler.plan import Plan


@dataclass
class LoadOp:
    unit: str            # offloaded unit
    src: str             # its home device
    dst: str             # the compute device
    link: str            # "src>dst": one copy stream per link
    bytes: int
    slot: int            # slot index in the window
    slot_offset: int     # byte offset of the slot in the window
    issue_after: str     # the copy is issued after this unit's compute ...
    next_step: bool      # ... of the previous call (True) or of the same call (False)
    use_order: int       # execution index of `unit`
    release_after: str   # the slot is released after this unit's compute (the unit itself)


@dataclass
class Schedule:
    compute: str
    window_bytes: int
    slot_bytes: int
    n_slots: int
    loads: list[LoadOp] = field(default_factory=list)   # one per offloaded unit, execution order
    ops: list[dict] = field(default_factory=list)       # per-step program (see module docstring)
    prologue: list[str] = field(default_factory=list)   # loads to issue before the first step
    slot_rule: str = "ring"                             # item g = step * m + k uses slot g % n_slots

    def slot_for(self, k: int, step: int = 0) -> int:
        """Slot of the k-th offloaded unit in call number `step` of the forward."""
        return (step * len(self.loads) + k) % self.n_slots

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        d = dict(d)
        d["loads"] = [LoadOp(**x) for x in d.get("loads", [])]
        return cls(**d)


def schedule(plan: Plan, graph=None) -> Schedule:
    """Build the Schedule of `plan` (graph is accepted for symmetry; the Plan carries all it needs)."""
    order = sorted(plan.units, key=lambda u: u.order)
    off = [u for u in order if u.device != plan.compute]
    sizes = [u.bytes for u in off]
    slot_bytes = max(sizes) if sizes else 0
    n_slots = n_slots_for(plan.window_bytes, sizes) if sizes else 0
    if off and n_slots < 1:
        raise ValueError(f"plan window {plan.window_bytes} bytes cannot hold the largest offloaded unit "
                         f"({slot_bytes} bytes)")
    gates = slot_gates(len(off), n_slots)
    loads = []
    for k, u in enumerate(off):
        ds, g = gates[k]
        slot = k % n_slots
        loads.append(LoadOp(unit=u.name, src=u.device, dst=plan.compute, link=f"{u.device}>{plan.compute}",
                            bytes=u.bytes, slot=slot, slot_offset=slot * slot_bytes,
                            issue_after=off[g].name, next_step=ds < 0, use_order=u.order,
                            release_after=u.name))
    by_trigger: dict[str, list[LoadOp]] = {}
    for ld in loads:
        by_trigger.setdefault(ld.issue_after, []).append(ld)
    # within one trigger, same-call loads come first in execution order, then next-call loads
    ops: list[dict] = []
    streamed = {ld.unit for ld in loads}
    for u in order:
        if u.name in streamed:
            ops.append({"op": "wait", "unit": u.name})
        ops.append({"op": "compute", "unit": u.name})
        if u.name in streamed:
            ops.append({"op": "release", "unit": u.name})
            trig = sorted(by_trigger.get(u.name, []), key=lambda ld: (ld.next_step, ld.use_order))
            for ld in trig:
                ops.append({"op": "load", "unit": ld.unit, "src": ld.src, "bytes": ld.bytes,
                            "next_step": ld.next_step})
    prologue = [ld.unit for ld in loads if ld.next_step]
    return Schedule(compute=plan.compute, window_bytes=plan.window_bytes, slot_bytes=slot_bytes,
                    n_slots=n_slots, loads=loads, ops=ops, prologue=prologue)
