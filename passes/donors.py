"""Donor assignment: offloaded units -> the devices that hold them (plain data in, plain data out).

A budget of R bytes to offload takes the SHORTEST PREFIX of the priority order (passes/rank.py) holding
>= R bytes (`place`); `assign` then gives each offloaded unit a donor: how much each donor holds by
filling the fastest link first within its room, which units by how well their copies hide.
"""
from __future__ import annotations

from ..compiler.graph import ModuleGraph
from ..compiler.inventory import Inventory
from ..compiler.plan import GiB
from ..errors import PartitionError


def _prefix(order: list[str], graph: ModuleGraph, target: int) -> set[str]:
    out, got = set(), 0
    if target <= 0:
        return out
    for name in order:
        out.add(name)
        got += graph[name].bytes
        if got >= target:
            break
    return out


def sort_donors(donors: list[str], inventory: Inventory, compute: str) -> list[str]:
    return sorted(donors, key=lambda d: (d == "cpu", -inventory.bandwidth(d, compute), donors.index(d)))


def assign(graph: ModuleGraph, offloaded: set[str], donors: list[tuple[str, int]], what: str,
            soft: dict[str, int] | None = None, order: list[str] | None = None) -> dict[str, str]:
    """Offloaded units -> donors.  HOW MUCH each donor holds: units in execution order, each to the first
    donor (fastest first) with room for it (`_split`).  WHICH units: with several donors and the hiding
    `order` (priority_order: best-hiding first), the slowest donor takes the best-hiding units up to its
    share, then the next slower one, and the fastest link gets the units whose copies hide worst -- its
    copies are the short ones.  (Filling in execution order put Flux's double blocks, the units that hide
    worst, on the slow link whenever the fast donor filled up with the first blocks.)"""
    homes = _split(graph, offloaded, donors, what, soft)
    if len(donors) < 2 or not order:
        return homes
    share: dict[str, int] = {}
    for n, d in homes.items():
        share[d] = share.get(d, 0) + graph[n].bytes
    free = dict(soft) if soft else {d: cap for d, cap in donors}
    left = dict(share)
    slow_first = [d for d, _ in reversed(donors)]
    out: dict[str, str] = {}
    rank = [n for n in order if n in offloaded] + [n for n in homes if n not in set(order)]
    for n in rank:
        b = graph[n].bytes
        pick = next((d for d in slow_first if left.get(d, 0) >= b and free[d] >= b), None)
        if pick is None:           # discrete units: the donor with the most share left that has memory
            fits = [d for d in slow_first if free[d] >= b]
            if not fits:
                return homes       # cannot improve within memory: keep the execution-order split
            pick = max(fits, key=lambda d: (left.get(d, 0), -slow_first.index(d)))
        out[n] = pick
        left[pick] = left.get(pick, 0) - b
        free[pick] -= b
    # faster donors hold as much as filling them first would: while a unit on a slower donor fits a faster
    # donor's room (capacity and free memory), the worst-hiding such unit moves up
    cap = {d: c for d, c in donors}
    used = {d: 0 for d, _ in donors}
    for n, d in out.items():
        used[d] += graph[n].bytes
    pos = {n: i for i, n in enumerate(rank)}
    fast = [d for d, _ in donors]
    for i, d in enumerate(fast[:-1]):
        slower = set(fast[i + 1:])
        while True:
            room = min(cap[d] - used[d], free[d])
            cand = [n for n, h in out.items() if h in slower and graph[n].bytes <= room]
            if not cand:
                break
            n = max(cand, key=lambda x: pos[x])
            b = graph[n].bytes
            src = out[n]
            out[n] = d
            used[d] += b
            used[src] -= b
            free[d] -= b
            free[src] += b
    return out


def _split(graph: ModuleGraph, offloaded: set[str], donors: list[tuple[str, int]], what: str,
           soft: dict[str, int] | None = None) -> dict[str, str]:
    """Offloaded units (execution order) -> the first donor (fastest first) with room for it.
    donors: (dev, capacity).  With `soft` (dev -> free memory; expert budgets are targets), a unit that
    fits no donor's budget goes to the donor with the most budget left that still has free memory, so
    a budget may be passed by less than one unit (shares of discrete units cannot be exact)."""
    room = {d: cap for d, cap in donors}
    free = dict(soft) if soft else None
    homes = {}
    for u in graph.units:
        if u.name not in offloaded:
            continue
        pick = None
        for d, _ in donors:
            if room[d] >= u.bytes and (free is None or free[d] >= u.bytes):
                pick = d
                break
        if pick is None and free is not None:
            fits = [d for d, _ in donors if free[d] >= u.bytes]
            if fits:
                pick = max(fits, key=lambda d: (room[d], -[x for x, _ in donors].index(d)))
        if pick is None:
            need = sum(graph[n].bytes for n in offloaded)
            have = sum(c for _, c in donors)
            raise PartitionError(
                f"the offloaded units ({gb(need)}) do not fit the {what} "
                f"({', '.join(f'{d} {gb(c)}' for d, c in donors) or 'none'}; {gb(have)} in all; unit "
                f"{u.name!r} of {gb(u.bytes)} has no room): add a donor, free memory, or offload less")
        room[pick] -= u.bytes
        if free is not None:
            free[pick] -= u.bytes
        homes[u.name] = pick
    return homes


def gb(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


def place(graph: ModuleGraph, inventory: Inventory, compute: str, order: list[str], target: int,
           donors: list[tuple[str, int]], what: str, soft: bool = False) -> dict[str, str]:
    offloaded = _prefix(order, graph, target)
    free = {d: inventory.devices[d].free_bytes for d, _ in donors} if soft else None
    return assign(graph, offloaded, donors, what, free, order)
