"""Ranking pass: which units to offload first (ModuleGraph + Inventory + compute device -> unit names).

The placement model (which units to offload)
--------------------------------------------
Offloaded units are streamed into a window of slots on the compute device, each copy issued when the
unit that last used its slot has finished (compiler/cost.py).  A copy hides when the compute that runs
between that point and the unit's own turn lasts longer than the copy.  So what makes a set of offloaded
units good is how their transfers sit between compute, not their position in the model.

`priority_order` ranks the units once per (model, compute device) by a greedy that asks the
simulator.  Starting from "all resident", each round tries every remaining unit, simulates the
steady-state step with it offloaded too (double-buffered window, host link), and scores it by the share
of its copy that does NOT hide: (step time increase) / (its transfer time), in 1 % buckets.  The
lowest share wins; ties (typically "hides completely") go to the unit farthest, in compute time, from
every unit already offloaded (so offloaded units spread between resident ones and each copy gets the
longest stretch of compute to hide behind), then to the bigger unit (fewer fixed per-copy costs).
Ranking uses the host link as the reference (the usual slowest link, where hiding matters most), so the
order does not depend on which donors are chosen, which the expert-string round trip relies on.  The
root remainder and the small leaf units before the first / after the last block come last: they stay
resident unless the budget needs them.  Units of zero bytes never move.

Large graphs: when more than POOL candidates remain, only the POOL farthest-spread ones are candidates per
round (fewer past 200 units), tried in the score's own tie order, so the first one whose copy hides
completely wins the round without simulating the rest: a Wan-14B leaf graph (608 units) ranks in 0.43 s
on one CPU core (2.6 s when every pooled candidate was simulated; same order).
"""
from __future__ import annotations

import bisect
import collections

from ..compiler.cost import simulate_core, unit_compute_s, unit_transfer_s
from ..compiler.graph import ModuleGraph, Unit
from ..compiler.inventory import Inventory
from ..compiler.ring_layout import DEFAULT_SLOTS

POOL = 24


# --- ranking --------------------------------------------------------------------------------------

SMALL_SUB_BYTES = 1 << 20   # a sub-unit this small (a norm's scale) stays resident unless the budget needs it


def _deferred(units: list[Unit]) -> set[int]:
    """Indices that stay resident unless needed: the root remainder, leaf units outside the blocks, and
    sub-units (passes/granularity.py) under SMALL_SUB_BYTES, whose copies would cost more than they free."""
    blocks = [i for i, u in enumerate(units) if u.kind in ("block", "sub")]
    out = set()
    for i, u in enumerate(units):
        if u.kind == "root":
            out.add(i)
        elif u.kind == "sub" and u.bytes < SMALL_SUB_BYTES:
            out.add(i)
        elif blocks and u.kind not in ("block", "sub") and (i < blocks[0] or i > blocks[-1]):
            out.add(i)
    return out


_MEMO: "collections.OrderedDict[tuple, tuple[str, ...]]" = collections.OrderedDict()
MEMO_SIZE = 16


def priority_order(graph: ModuleGraph, inventory: Inventory, compute: str, src: str = "cpu") -> list[str]:
    """Unit names, best to offload first (see module docstring).  Zero-byte units are not listed.

    The greedy is a function of the units' names, kinds, bytes, compute and transfer times only, so its
    result is remembered for those (the last MEMO_SIZE inputs): the second expert of a two-expert workflow,
    a model loaded again, or the block and sub-unit plans of one model placed twice rank once (0.43 s for a
    608-unit Wan-14B leaf graph)."""
    units = graph.units
    ct = [unit_compute_s(u, compute, inventory) for u in units]
    tt = [unit_transfer_s(u.bytes, src if src != compute else "cpu", compute, inventory) for u in units]
    key = (tuple((u.name, u.kind, u.bytes) for u in units), tuple(ct), tuple(tt), POOL, DEFAULT_SLOTS)
    hit = _MEMO.get(key)
    if hit is None:
        hit = _MEMO[key] = tuple(_greedy(units, ct, tt))
        while len(_MEMO) > MEMO_SIZE:
            _MEMO.popitem(last=False)
    else:
        _MEMO.move_to_end(key)
    return list(hit)


def _greedy(units: list[Unit], ct: list[float], tt: list[float]) -> list[str]:
    n = len(units)
    link = ["L"] * n
    total_c = sum(ct)
    cum = [0.0]
    for c in ct:
        cum.append(cum[-1] + c)
    deferred = _deferred(units)
    cands = [i for i in range(n) if units[i].bytes > 0 and i not in deferred]
    chosen: list[int] = []  # sorted positions
    order: list[int] = []
    cur = total_c
    link_total = 0.0

    def between(a: int, b: int) -> float:  # compute strictly between positions a and b, cyclic
        if a < b:
            return cum[b] - cum[a + 1]
        return (total_c - cum[a + 1]) + cum[b]

    def gap(c: int) -> float:
        if not chosen:
            return total_c
        j = bisect.bisect_left(chosen, c)
        prev = chosen[j - 1] if j > 0 else chosen[-1]
        nxt = chosen[j] if j < len(chosen) else chosen[0]
        return min(between(prev, c), between(c, nxt))

    remaining = list(cands)
    pool_n = POOL if n <= 200 else max(6, POOL * 200 // n)
    while remaining:
        # in the key's own tie order, so the first candidate whose copy hides completely (0 % unhidden, the
        # least there is) is the round's winner and the rest need no simulation
        pool = sorted(remaining, key=lambda c: (-gap(c), -units[c].bytes, c))[:pool_n]
        best_key, best_c, best_step = None, None, None
        for c in pool:
            off = list(chosen)
            bisect.insort(off, c)
            step, _ = simulate_core(ct, tt, link, off, min(DEFAULT_SLOTS, len(off)))
            step = max(step, total_c, link_total + tt[c])
            # the share of this unit's copy that does not hide, in 1 % buckets
            unhidden = round(100 * max(0.0, step - cur) / tt[c]) if tt[c] > 0 else 0
            key = (unhidden, -gap(c), -units[c].bytes, c)
            if best_key is None or key < best_key:
                best_key, best_c, best_step = key, c, step
            if unhidden == 0:
                break
        bisect.insort(chosen, best_c)
        order.append(best_c)
        remaining.remove(best_c)
        cur = best_step
        link_total += tt[best_c]
    rest = sorted((i for i in deferred if units[i].bytes > 0), key=lambda i: (-units[i].bytes, i))
    return [units[i].name for i in order + rest]

