"""Verify a Plan and its Schedule before anything runs.

Checks (each failure is one readable line):
  * bytes conserved: every unit has one home; per-device byte totals match the units; they add up to
    the model;
  * no device over its budget (expert budgets, when the plan was made from a string: the compute
    device's exactly, a donor's by less than one unit, since shares of discrete units cannot be exact),
    its free memory
    or its total memory; on the compute device, resident units + window count;
  * the window: n_slots * slot_bytes <= window_bytes, 1 <= n_slots <= number of ring items;
  * the ring items (see passes/schedule.py): every offloaded unit is in exactly one item; an item is a
    run of consecutive offloaded units (execution order) from one home device; its units sit back to
    back in the slot (unit offset = sum of the 256-byte-aligned sizes of the units before it) and the
    item fits one slot; each LoadOp's item, offsets, slot and gating match;
  * execution: replaying the schedule's ops for n_slots + 1 consecutive steps (after its prologue), with
    the holder of each slot being an item (of a given step), every item's copy was issued into its ring
    slot before its first unit waits for it, every offloaded unit computes after its item's wait and
    while the item still holds its slot, no copy lands in a slot still held by another item, every slot
    is released after its item's last unit computed and before the step ends, and each item (so each
    offloaded unit) is loaded exactly once per step.
`check` returns the list of problems; `verify` raises PlanVerificationError listing them.
"""
from __future__ import annotations

from ..compiler.plan import Plan
from ..compiler.ring_layout import align, slot_gates
from ..errors import PlanVerificationError
from .schedule import Schedule

__all__ = ["check", "verify", "PlanVerificationError"]


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
    errs += _check_items(off, sched, plan.streamed_sizes())
    if errs:
        return errs
    if off:
        errs += _replay(sched)
    return errs


def _check_items(off, sched: Schedule, size: dict) -> list[str]:
    """Static facts of the ring items and the LoadOps."""
    errs: list[str] = []
    items = sched.items
    n_items = len(items)
    if off and not (1 <= sched.n_slots <= n_items):
        errs.append(f"{sched.n_slots} slots for {n_items} ring items (need 1 <= slots <= items)")
    flat = [n for it in items for n in it]
    if any(not it for it in items):
        errs.append("an empty ring item")
    if flat != [u.name for u in off]:
        offn = {u.name for u in off}
        missing = [u.name for u in off if u.name not in set(flat)]
        extra = [n for n in flat if n not in offn]
        if missing:
            errs.append(f"offloaded unit {missing[0]} is in no ring item" +
                        (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        if extra:
            errs.append(f"ring item holds {extra[0]}, which is not offloaded")
        if not missing and not extra:
            errs.append("ring items are not consecutive offloaded units in execution order, each once")
    loads = {}
    for ld in sched.loads:
        if ld.unit in loads:
            errs.append(f"unit {ld.unit} has two loads")
        loads[ld.unit] = ld
    offn = {u.name for u in off}
    for u in off:
        if u.name not in loads:
            errs.append(f"offloaded unit {u.name} has no load")
    for name in loads:
        if name not in offn:
            errs.append(f"load of {name}, which is not offloaded")
    if errs:
        return errs
    if [ld.unit for ld in sched.loads] != flat:
        errs.append("loads are not in the order of the ring items")
        return errs
    home = {u.name: u.device for u in off}
    gates = slot_gates(n_items, sched.n_slots)
    for q, it in enumerate(items):
        if len({home[n] for n in it}) > 1:
            errs.append(f"item {q} ({it[0]}..{it[-1]}) mixes home devices: one item is one copy on one link")
        used = 0
        for j, n in enumerate(it):
            ld = loads[n]
            if ld.bytes != size[n] or ld.src != home[n]:
                errs.append(f"load of {n}: {ld.bytes} bytes from {ld.src}, the plan says {size[n]} from {home[n]}")
            if ld.item != q or ld.item_offset != used:
                errs.append(f"unit {n}: item {ld.item} at offset {ld.item_offset}, expected item {q} at {used}")
            if not (0 <= ld.slot < sched.n_slots) or ld.slot != sched.item_slot(q, 0) or \
                    ld.slot_offset != ld.slot * sched.slot_bytes + ld.item_offset:
                errs.append(f"unit {n} uses slot {ld.slot} (offset {ld.slot_offset}) of {sched.n_slots}; its item "
                            f"{q} runs from slot {sched.item_slot(q, 0)}")
            if ld.release_after != it[-1]:
                errs.append(f"unit {n}: slot released after {ld.release_after}, not after its item's last unit {it[-1]}")
            ds, g = gates[q]
            if ld.issue_after != items[g][-1] or ld.next_step != (ds < 0):
                errs.append(f"unit {n}: copy issued after {ld.issue_after} (next_step={ld.next_step}), the ring "
                            f"issues item {q} after {items[g][-1]} (next_step={ds < 0})")
            end = used + size[n]
            used = align(end)
        if end > sched.slot_bytes:
            errs.append(f"item {q} ({it[0]}..{it[-1]}, {end} bytes) does not fit a slot of {sched.slot_bytes}")
    return errs


def _replay(sched: Schedule) -> list[str]:
    """Replay prologue + ops for n_slots + 1 consecutive calls (the ring's slot pattern repeats).
    holder[slot] = (step, item) whose bytes the slot holds (None: free)."""
    errs: list[str] = []
    items = sched.items
    n_items = len(items)
    item_of = {n: q for q, it in enumerate(items) for n in it}
    index = {tuple(it): q for q, it in enumerate(items)}
    holder: dict[int, tuple[int, int] | None] = {s: None for s in range(sched.n_slots)}
    where: dict[tuple[int, int], int] = {}     # (step, item) -> slot its copy went to
    count: dict[tuple[int, int], int] = {}     # (step, item) -> loads issued

    def name(q: int) -> str:
        it = items[q]
        return f"item {q} ({it[0]})" if len(it) == 1 else f"item {q} ({it[0]}..{it[-1]})"

    def do_load(q: int, step: int, at: str):
        slot = sched.item_slot(q, step)
        h = holder[slot]
        if h is not None:
            errs.append(f"{at}: load of {name(q)} into slot {slot} while {name(h[1])} of step {h[0]} still holds it")
        holder[slot] = (step, q)
        where[(step, q)] = slot
        count[(step, q)] = count.get((step, q), 0) + 1

    def held(step: int, q: int) -> bool:
        s = where.get((step, q))
        return s is not None and holder.get(s) == (step, q)

    for units in sched.prologue:
        q = index.get(tuple(units))
        if q is None:
            errs.append(f"prologue load of {list(units)}, which is no ring item")
        else:
            do_load(q, 0, "prologue")
    for step in range(max(2, sched.n_slots + 1)):
        waited: set[int] = set()
        computed: set[str] = set()
        for op in sched.ops:
            kind, unit = op["op"], op["unit"]
            if kind == "compute":
                computed.add(unit)
                q = item_of.get(unit)
                if q is None:
                    continue
                if not held(step, q):
                    errs.append(f"step {step}: {unit} used before its copy was issued into its slot "
                                f"({name(q)} not loaded or its slot already released)")
                elif q not in waited:
                    errs.append(f"step {step}: {unit} computed before waiting for {name(q)}'s copy")
                continue
            q = op.get("item")
            if not isinstance(q, int) or not (0 <= q < n_items):
                errs.append(f"step {step}: {kind} op for {unit} names no ring item ({q!r})")
                continue
            if kind == "wait":
                if not held(step, q):
                    errs.append(f"step {step}: wait for {name(q)} before {unit}: {name(q)} used before its copy "
                                f"was issued into its slot")
                waited.add(q)
            elif kind == "release":
                if not held(step, q):
                    errs.append(f"step {step}: release of {name(q)} by {unit}, which holds no slot")
                    continue
                left = [n for n in items[q] if n not in computed]
                if left:
                    errs.append(f"step {step}: {name(q)} released before {left[0]} computed")
                holder[where.pop((step, q))] = None
            elif kind == "load":
                if list(op.get("units", items[q])) != items[q]:
                    errs.append(f"step {step}: load of item {q} lists units {op.get('units')}, not {items[q]}")
                do_load(q, step + 1 if op.get("next_step") else step, f"step {step}")
            else:
                errs.append(f"step {step}: unknown op {kind!r}")
        for q in range(n_items):
            c = count.pop((step, q), 0)
            if c != 1:
                errs.append(f"step {step}: {name(q)} loaded {c} times")
        for s, h in holder.items():
            if h is not None and h[0] <= step:
                errs.append(f"step {step}: slot {s} never released by {name(h[1])}")
                holder[s] = None
        if errs:
            break
    return errs


def verify(plan: Plan, sched: Schedule) -> None:
    errs = check(plan, sched)
    if errs:
        raise PlanVerificationError("plan verification failed:\n  " + "\n  ".join(errs[:20]))
