"""Schedule pass: the transfer / prefetch / release operations that execute a Plan (plain data).

Ring ITEMS.  The offloaded units of a step, in execution order, are packed greedily into ring items
(`compiler.ring_layout.stream_groups`, as runtime/ring.py and compiler/cost.simulate do): a unit joins
the previous unit's item while it has the same home device, runs right after it (no resident unit
between them in the plan's order: `compiler.ring_layout.item_keys`) and the item's bytes, each unit's size
aligned up to 256 bytes (`compiler.ring_layout.align`, the arena's alignment), plus its own size still fit
one slot; otherwise it starts a new item.  Small units (embedders, a final norm) thus travel together
instead of taking a slot each.  One item = one copy (on the copy stream of link home>compute) into one
slot; its units sit back to back in the slot, unit j at byte `item_offset` = sum of the aligned sizes of
the item's units before it.  The item's copy is `LoadOp.item_offset + bytes` of its last unit long.

The window of `plan.window_bytes` on the compute device is a pool of `n_slots` equal slots of
`slot_bytes` (= the largest offloaded unit), slot s at byte offset s * slot_bytes, with
n_slots = min(n_slots_for(window_bytes, sizes), n_items), used as a RING over the items: the items of a
step repeat every step; item ordinal o = step * n_items + q (q-th of the n_items items of a step) runs
from slot o % n_slots (`item_slot(q, step)`; when n_items is a multiple of n_slots an item keeps its
slot every step, `LoadOp.slot` is the slot in the first step).  The copy of item o is issued right
after the LAST unit of item o - n_slots has computed (`issue_after`, `compiler.ring_layout.slot_gates`), which
for the first n_slots items of a step is an item of the PREVIOUS step (`next_step` loads: prefetch wraps
across the step boundary, since a denoising loop calls the same forward again).  The first unit of an
item waits for the item's copy; the slot is released after the item's last unit has computed.  Issue
points are increasing, so copies go onto each link's stream in execution order.  This is exactly what
compiler/cost.simulate predicts.  (The runtime may split an item further when its units' homes are not
adjacent in the host arena or a unit runs more than once per forward; a Plan cannot see either.)

`Schedule.ops` is the per-step program the runtime replays each forward:

    {"op": "compute", "unit": U}                       run unit U
    {"op": "wait",    "unit": U, "item": q}            before computing U, the FIRST unit of item q:
                                                       wait for item q's copy event
    {"op": "release", "unit": U, "item": q}            after computing U, the LAST unit of item q:
                                                       item q's slot is free
    {"op": "load",    "unit": V, "units": [V, ...], "item": q, "src": D, "bytes": B, "next_step": bool}
                                                       issue item q's copy (units V..., first unit V,
                                                       B bytes) D -> compute into slot item_slot(q, step)
                                                       on the copy stream of link D>compute; next_step:
                                                       the item is used in the next call of the forward
`Schedule.items` lists the units of each item (execution order).  `Schedule.prologue` lists the loads
to issue before the very first step, as the unit lists of their items (the `next_step` loads, items
0..n_slots-1, whose triggers have not run yet).  Each `LoadOp` in `Schedule.loads` carries the same
facts per offloaded unit.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import TYPE_CHECKING

from ..compiler.ring_layout import align, item_keys, n_slots_for, slot_gates, stream_groups
from ..compiler.plan import Plan

if TYPE_CHECKING:
    from ..compiler.graph import ModuleGraph


@dataclass
class LoadOp:
    unit: str            # offloaded unit
    src: str             # its home device
    dst: str             # the compute device
    link: str            # "src>dst": one copy stream per link
    bytes: int           # the unit's bytes
    item: int            # index of its ring item in the step (Schedule.items)
    item_offset: int     # byte offset of the unit inside its item's slot (aligned sizes of the units before it)
    slot: int            # slot of its item in the first step (item_slot(item, 0))
    slot_offset: int     # byte offset of the unit in the window: slot * slot_bytes + item_offset
    issue_after: str     # the item's copy is issued after this unit's compute (last unit of the gating item) ...
    next_step: bool      # ... of the previous call (True) or of the same call (False)
    use_order: int       # execution index of `unit`
    release_after: str   # the item's slot is released after this unit's compute (last unit of its item)


@dataclass
class Schedule:
    compute: str
    window_bytes: int
    slot_bytes: int
    n_slots: int
    loads: list[LoadOp] = field(default_factory=list)        # one per offloaded unit, execution order
    items: list[list[str]] = field(default_factory=list)     # ring items: units of each, execution order
    ops: list[dict] = field(default_factory=list)            # per-step program (see module docstring)
    prologue: list[list[str]] = field(default_factory=list)  # items (their units) to load before step 0
    slot_rule: str = "ring"                                  # item o = step * n_items + q uses slot o % n_slots

    def item_slot(self, q: int, step: int = 0) -> int:
        """Slot of ring item q (index in `items`) in call number `step` of the forward."""
        return (step * len(self.items) + q) % self.n_slots

    def slot_for(self, k: int, step: int = 0) -> int:
        """Slot holding the k-th offloaded UNIT (index in `loads`) in call number `step`: its item's slot."""
        return self.item_slot(self.loads[k].item, step)

    def item_bytes(self, q: int) -> int:
        """Bytes of item q's copy: its units back to back, each but the last aligned to 256 bytes."""
        last = self.loads[self._first_load(q) + len(self.items[q]) - 1]
        return last.item_offset + last.bytes

    def _first_load(self, q: int) -> int:
        return sum(len(it) for it in self.items[:q])

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Schedule":
        d = dict(d)
        d["loads"] = [LoadOp(**x) for x in d.get("loads", [])]
        return cls(**d)


def schedule(plan: Plan, graph: ModuleGraph | None = None) -> Schedule:
    """Build the Schedule of `plan` (graph is accepted for symmetry; the Plan carries all it needs)."""
    order = sorted(plan.units, key=lambda u: u.order)
    off = [u for u in order if u.device != plan.compute]
    streamed = plan.streamed_sizes()          # compressed units (Plan.codec) move their packed bytes
    sizes = [streamed[u.name] for u in off]
    slot_bytes = max(sizes) if sizes else 0
    n_slots = n_slots_for(plan.window_bytes, sizes) if sizes else 0
    if off and n_slots < 1:
        raise ValueError(f"plan window {plan.window_bytes} bytes cannot hold the largest offloaded unit "
                         f"({slot_bytes} bytes)")
    groups = stream_groups(sizes, slot_bytes, item_keys([u.device for u in off], [u.order for u in off])) if off else []
    n_items = len(groups)
    n_slots = min(n_slots, n_items)
    gates = slot_gates(n_items, n_slots)
    loads: list[LoadOp] = []
    for q, grp in enumerate(groups):
        ds, g = gates[q]
        trigger = off[groups[g][-1]].name
        last = off[grp[-1]].name
        slot = q % n_slots
        used = 0
        for k in grp:
            u = off[k]
            loads.append(LoadOp(unit=u.name, src=u.device, dst=plan.compute, link=f"{u.device}>{plan.compute}",
                                bytes=streamed[u.name], item=q, item_offset=used, slot=slot,
                                slot_offset=slot * slot_bytes + used, issue_after=trigger, next_step=ds < 0,
                                use_order=u.order, release_after=last))
            used = align(used + streamed[u.name])
    items = [[off[k].name for k in grp] for grp in groups]
    first_of = {grp[0]: q for q, grp in enumerate(groups)}
    last_of = {grp[-1]: q for q, grp in enumerate(groups)}
    pos = {u.name: k for k, u in enumerate(off)}

    def load_op(q: int) -> dict:
        head = loads[groups[q][0]]
        tail = loads[groups[q][-1]]
        return {"op": "load", "unit": head.unit, "units": list(items[q]), "item": q, "src": head.src,
                "bytes": tail.item_offset + tail.bytes, "next_step": head.next_step}

    by_trigger: dict[str, list[int]] = {}
    for q in range(n_items):
        by_trigger.setdefault(loads[groups[q][0]].issue_after, []).append(q)
    # within one trigger, same-call loads come first in execution order, then next-call loads
    ops: list[dict] = []
    for u in order:
        k = pos.get(u.name)
        if k is not None and k in first_of:
            ops.append({"op": "wait", "unit": u.name, "item": first_of[k]})
        ops.append({"op": "compute", "unit": u.name})
        if k is not None and k in last_of:
            ops.append({"op": "release", "unit": u.name, "item": last_of[k]})
            trig = sorted(by_trigger.get(u.name, []), key=lambda q: (loads[groups[q][0]].next_step, q))
            ops.extend(load_op(q) for q in trig)
    prologue = [list(items[q]) for q in range(n_items) if loads[groups[q][0]].next_step]
    return Schedule(compute=plan.compute, window_bytes=plan.window_bytes, slot_bytes=slot_bytes,
                    n_slots=n_slots, loads=loads, items=items, ops=ops, prologue=prologue)
