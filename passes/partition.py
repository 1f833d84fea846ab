"""Partition pass: which units live where (ModuleGraph + Inventory + a budget -> Plan).

The budget is ONE of
  (a) `offload_gb` or `max_vram_gb`, + `donors`: what the compiled model holds on the compute device --
      resident weights + ring slots (`slot_bytes_of`: aligned views) + GGUF dequant scratch and transient
      copies (passes/quant_choice.working_bytes) + RUNTIME_BUFFERS_BYTES, predicted["compute_peak_bytes"]
      -- is at most model - offload_gb, or at most max_vram_gb (GiB = 2^30 bytes).  The offloaded units
      live on the donors (several donors: the fastest link to the compute device is filled first, within
      each donor's free memory; cpu comes last).  The shortest prefix of the priority order
      (passes/rank.py) that fits with one slot is taken, then up to MORE_OFFLOAD_TRIES longer ones with
      their best window inside the budget compete on the simulated step (passes/budget.py).  A budget
      below the minimum working set is an error naming it; neither budget keeps everything resident;
      `vram_gb=` is refused;
  (b) `expert`: an allocation string in any form of passes/allocation.py.  The compute device's budget
      decides how much stays resident; the other listed devices receive the offloaded units up to
      their budgets (fastest link first).

The order of units to offload is passes/rank.py; donor assignment passes/donors.py; the footprint on the
compute device and the budget placement passes/budget.py; the expert string passes/expert_string.py.
"""
from __future__ import annotations

import math
from typing import Iterable

from ..compiler.cost import simulate
from ..compiler.graph import ModuleGraph
from ..compiler.inventory import Inventory, InventoryError, normalize_device
from ..compiler.plan import GiB, Plan, PlacedUnit
from ..errors import PartitionError
from .allocation import parse_allocation
from .budget import ACTIVATION_RESERVE_BYTES, Footprint, place_budget, window_within, why
from .donors import gb, sort_donors
from .expert_string import expert_string_for, place_expert
from .quant_choice import gguf_facts
from .rank import priority_order


_UNSET = object()


def _gib_bytes(value, what: str) -> int:
    """A budget in GiB (2^30 bytes) -> bytes; PartitionError naming `what` and the value when it is not
    a finite number >= 0 (at most 1 EiB)."""
    if isinstance(value, bool):
        raise PartitionError(f"{what} {value!r} is a bool, not a number of GiB: give e.g. 4 or 12.5")
    try:
        v = float(value)
    except (TypeError, ValueError, OverflowError):
        raise PartitionError(f"{what} {value!r} is not a number: give GiB, e.g. 4 or 12.5")
    if math.isnan(v) or math.isinf(v):
        raise PartitionError(f"{what} {value!r} is not a finite number: give e.g. 4 or 12.5")
    if v < 0:
        raise PartitionError(f"{what} {value!r} is negative: give 0 or more GiB")
    if v > 2 ** 30:
        raise PartitionError(f"{what} {value!r} is more than 1 EiB (2^30 GiB): give GiB, e.g. 4 or 12.5")
    return int(math.ceil(v * GiB))


VRAM_GB_GONE = ("vram_gb= is gone (it did not bound what the model holds on the compute device): give "
                "offload_gb= (GiB of the model kept OFF the compute device, the nodes' virtual_vram_gb) or "
                "max_vram_gb= (GiB the compiled model may hold ON it: resident weights + slots + scratch)")


def partition(graph: ModuleGraph, inventory: Inventory, compute: str, *, offload_gb: float | None = None,
              max_vram_gb: float | None = None, donors: Iterable[str] | str | None = None,
              expert: str | None = None, window_bytes: int | None = None, clamp: bool = False,
              vram_gb: object = _UNSET) -> Plan:
    """Place every unit of `graph` (see module docstring).  Pure function: raises before building anything
    on bad input (DisTorchError subclasses naming the bad value).

    Budget, at most one of: `offload_gb` = X GiB of the model kept off the compute device, so that what
    the compiled model holds there (resident weights + ring slots + dequant scratch + runtime buffers,
    predicted["compute_peak_bytes"]) is at most model - X: more than X is offloaded when the slots need
    room; X at or above the model's size streams all of it in the planned window (autotune does not grow
    it: there is no model - X to grow into).  `max_vram_gb` = Y: that footprint is at most
    Y.  Neither: everything resident.  A budget below the minimum working set (one slot for the largest
    unit + scratch + what cannot move) is an error naming the minimum; with `clamp` (the ComfyUI nodes)
    an offload that cannot be met streams everything instead, with a warning in predicted["warnings"].
    `expert` overrides both (its compute-device budget is for weights, the window comes from free memory)."""
    if vram_gb is not _UNSET:
        raise PartitionError(VRAM_GB_GONE)
    try:
        compute = normalize_device(compute)
    except InventoryError as e:
        raise PartitionError(str(e))
    if compute not in inventory.devices:
        raise PartitionError(f"compute device {compute!r} is not in the inventory (known: "
                             f"{', '.join(inventory.devices) or 'none'}); pick one of those or declare it "
                             f"(e.g. --devices {compute}=24GiB,cpu=64GiB)")
    model = graph.total_bytes
    use_expert = expert is not None and str(expert).strip() != ""
    mode = "resident"
    offload = cap = 0
    if use_expert:
        # parse first so that its errors come before anything else
        parse_allocation(expert, inventory.names())
        donor_list = [e.device for e in parse_allocation(expert, inventory.names()) if e.device != compute]
        mode = "expert"
    else:
        if offload_gb is not None and max_vram_gb is not None:
            raise PartitionError(f"offload_gb={offload_gb!r} and max_vram_gb={max_vram_gb!r}: give one of them "
                                 f"(GiB kept off the compute device, or GiB the model may hold on it)")
        if offload_gb is not None:
            offload = _gib_bytes(offload_gb, "offload_gb")
            mode = "offload" if offload > 0 else "resident"
        elif max_vram_gb is not None:
            cap = _gib_bytes(max_vram_gb, "max_vram_gb")
            mode = "max_vram"
        moving = mode != "resident"
        if donors is None or (isinstance(donors, str) and not donors.strip()):
            donors = ["cpu"]
        if isinstance(donors, str):
            donors = [d for d in donors.split(",") if d.strip()]
        donor_list = []
        for d in donors:
            try:
                dn = normalize_device(d)
            except InventoryError as e:
                raise PartitionError(f"donor {d!r}: {e}")
            if dn not in inventory.devices:
                raise PartitionError(f"donor {d!r} is not in the inventory (known: {', '.join(inventory.devices)})")
            if dn == compute and moving:
                raise PartitionError(f"donor {d!r} is the compute device; donors hold what does NOT fit it "
                                     f"(e.g. --donor cpu or another GPU)")
            if dn == compute:
                continue
            if dn in donor_list:
                raise PartitionError(f"donor {d!r} is listed twice")
            if moving and inventory.devices[dn].free_bytes <= 0:
                raise PartitionError(f"donor {d!r} has no free memory; pick another donor")
            donor_list.append(dn)
    order = priority_order(graph, inventory, compute)
    cdev = inventory.devices[compute]
    free = int(cdev.free_bytes)
    facts = gguf_facts(graph)
    warnings: list[str] = []
    budget = None         # bytes the compiled model may hold on the compute device (None: free memory)
    if use_expert:
        homes, bud = place_expert(graph, inventory, compute, order, expert)
        source = {"mode": "expert", "expert": str(expert), "budgets": bud}
        fp = Footprint(graph, homes, compute, facts)
        window = window_within(graph, homes, compute, inventory, fp, free, window_bytes)
    else:
        donors_caps = [(d, inventory.devices[d].free_bytes) for d in sort_donors(donor_list, inventory, compute)]
        if mode == "offload" and offload < model:
            budget = model - offload
        elif mode == "max_vram":
            budget = cap
        homes, window, fp, budget, note = place_budget(graph, inventory, compute, order, mode, offload, budget,
                                                        donors_caps, facts, free, window_bytes, clamp)
        if note:
            warnings.append(note)
        source = {"mode": mode, "donors": donor_list}
        if mode in ("offload", "resident") and offload_gb is not None:
            source["offload_gb"] = float(offload_gb)
        if mode == "max_vram":
            source["max_vram_gb"] = float(max_vram_gb)
    source["inventory"] = inventory.source

    k = fp.slots_for(window)
    peak = fp.total(k)
    if window_bytes is not None and homes and fp.fixed + int(window_bytes) > free:
        raise PartitionError(
            f"window_bytes (--window) {window_bytes} plus {gb(fp.fixed)} of resident weights and buffers is more "
            f"than the {gb(free)} free on {compute}: give at most {max(0, free - fp.fixed)} bytes, or leave it out")
    if peak > free:
        raise PartitionError(
            f"the plan holds {gb(peak)} on {compute} ({why(fp).replace('one ', f'{k} x ')}), which has "
            f"{gb(free)} free: offload at least {gb(peak - free)} more (or cap it: --max-vram / max_vram_gb)")
    # donors within their free memory (expert budgets may exceed it)
    per = {}
    for n, d in homes.items():
        per[d] = per.get(d, 0) + graph[n].bytes
    for d, b in per.items():
        if b > inventory.devices[d].free_bytes:
            raise PartitionError(f"{gb(b)} of the model would live on {d}, which has "
                                 f"{gb(inventory.devices[d].free_bytes)} free: lower its share")
    if free - peak < ACTIVATION_RESERVE_BYTES and not compute.startswith("cpu"):
        warnings.append(f"the plan holds {gb(peak)} of the {gb(free)} free on {compute}, leaving "
                        f"{gb(free - peak)} for activations (less than {gb(ACTIVATION_RESERVE_BYTES)}): "
                        f"the step may run out of memory; offload more")

    expert_str, exact = expert_string_for(graph, homes, inventory, compute, order)
    source["expert_string_exact"] = exact
    pred = simulate(graph.units, homes, compute, inventory, window)
    pred.update(fp.parts(k))
    pred["compute_peak_bytes"] = peak
    pred["peak_bytes"] = peak                        # the same number, under its older name
    pred["budget_bytes"] = budget
    limit = free if budget is None else min(budget, free)
    # what autotune may give the ring: the budget (or free memory) less everything but the slots
    pred["window_max_bytes"] = max(k * fp.slot, int(limit - fp.fixed))
    if mode == "offload" and budget is None and homes:
        # everything streams (offload_gb at or above the model, or clamped): there is no model - X to grow
        # into, and the user asked for the least VRAM, so the ring stays the window planned and printed (an
        # H200 run at virtual_vram_gb 23 of a 22.17 GiB Flux grew it from 0.25 to 0.58 GiB: 1.16 GiB peak
        # against 0.83 predicted).  max_vram_gb gives a streamed model room to grow.
        pred["window_max_bytes"] = k * fp.slot
    pred["warnings"] = warnings
    pred["basis"] = ("measured" if all(u.time_s is not None for u in graph.units) else
                     "flops" if all(u.flops > 0 or u.time_s is not None for u in graph.units) else
                     "bytes-fallback")

    placed = [PlacedUnit(u.name, u.type, u.bytes, homes.get(u.name, compute), i, u.kind, u.parent)
              for i, u in enumerate(graph.units)]
    devs = {}
    listed = [compute] + [d for d in donor_list if d != compute]
    for p in placed:
        if p.device not in listed:
            listed.append(p.device)
    for d in listed:
        names = [p.name for p in placed if p.device == d]
        b = sum(graph[nm].bytes for nm in names)
        dv = inventory.devices[d]
        devs[d] = {"bytes": b, "units": len(names), "total": dv.total_bytes, "free": dv.free_bytes,
                   "fraction_of_model": (b / model if model else 0.0),
                   "types": graph.type_counts(names)}
    return Plan(compute=compute, units=placed, devices=devs, expert_string=expert_str, window_bytes=window,
                predicted=pred, source=source)

