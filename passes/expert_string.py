"""The expert allocation string: placing by one (`place_expert`) and printing one for a placement.

The expert string (passes/allocation.py, any form) gives each device a budget; the compute device's
decides how much stays resident, the other listed devices receive the offloaded units up to theirs
(fastest link first).

A budget of R bytes to offload takes the SHORTEST PREFIX of the priority order (passes/rank.py) holding
>= R bytes: the offloaded amount is R or more by less than one unit, and a larger budget always offloads
a superset.  That nesting is what makes the printed expert string reproduce the placement exactly: the
string gives each device a fraction of its total memory rounded UP (4 decimals, more only if 4 cannot reproduce it),
which, read back, moves the compute device's budget by less than the next unit in the order.
"""
from __future__ import annotations

from decimal import Decimal, ROUND_CEILING

from ..compiler.graph import ModuleGraph
from ..compiler.inventory import Inventory
from ..errors import AllocationError, PartitionError
from .allocation import budgets as alloc_budgets, parse_allocation
from .donors import gb, place, sort_donors


def _expert_donors(entries, bud: dict[str, int], inventory: Inventory, compute: str):
    devs = [e.device for e in entries if e.device != compute]
    return [(d, bud[d]) for d in sort_donors(devs, inventory, compute)]


def place_expert(graph: ModuleGraph, inventory: Inventory, compute: str, order: list[str],
                 expert: str) -> tuple[dict[str, str], dict[str, int]]:
    entries = parse_allocation(expert, inventory.names())
    if not entries:
        raise AllocationError("empty expert string")
    model = graph.total_bytes
    totals = {d: inventory.devices[d].total_bytes for d in inventory.devices}
    for e in entries:   # a byte amount larger than the device itself is a typo, not a budget
        if e.mode == "bytes" and e.value is not None and e.value > totals.get(e.device, 0):
            raise AllocationError(
                f"entry {e.text!r} asks for {gb(e.value)} but {e.device} has {gb(totals.get(e.device, 0))} in all: "
                f"lower it, or write {e.device},* to give it whatever is left")
    bud = alloc_budgets(entries, totals, model)
    have = sum(bud.values())
    if have < model:
        raise PartitionError(
            f"the allocation {expert!r} gives {gb(have)} in all but the model needs {gb(model)}: "
            f"{gb(model - have)} ({model - have} bytes) are missing; raise a budget or mark a device with '*'")
    target = max(0, model - bud.get(compute, 0))
    homes = place(graph, inventory, compute, order, target, _expert_donors(entries, bud, inventory, compute),
                   "budgets of the expert string", soft=True)
    return homes, bud


def _fraction_string(graph, homes, inventory, compute, decimals: int) -> str:
    per = {}
    for u in graph.units:
        d = homes.get(u.name, compute)
        per[d] = per.get(d, 0) + u.bytes
    devs = [compute] + sort_donors([d for d in per if d != compute and per[d] > 0], inventory, compute)
    q = Decimal(1).scaleb(-decimals)
    parts = []
    for d in devs:
        tot = inventory.devices[d].total_bytes
        f = (Decimal(per.get(d, 0)) / Decimal(tot)).quantize(q, rounding=ROUND_CEILING) if tot else Decimal(0)
        if f > 1:
            f = Decimal(1)
        parts.append(f"{d},{f:.{decimals}f}")
    return ";".join(parts)


def expert_string_for(graph: ModuleGraph, homes: dict[str, str], inventory: Inventory, compute: str,
                      order: list[str]) -> tuple[str, bool]:
    """The fraction-form string for a placement: 4 decimals, more when 4 do not reproduce it exactly.
    Returns (string, exact)."""
    s = ""
    for dec in range(4, 13):
        s = _fraction_string(graph, homes, inventory, compute, dec)
        try:
            again, _ = place_expert(graph, inventory, compute, order, s)
        except Exception:
            continue
        if again == homes:
            return s, True
    return _fraction_string(graph, homes, inventory, compute, 4), False

