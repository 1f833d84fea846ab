"""Partition pass: which units live where (ModuleGraph + Inventory + a budget -> Plan).

The budget is ONE of
  (a) `offload_gb` or `max_vram_gb`, + `donors`: what the compiled model holds on the compute device --
      resident weights + ring slots (`slot_bytes_of`: aligned views) + GGUF dequant scratch and transient
      copies (passes/quant_choice.working_bytes) + RUNTIME_BUFFERS_BYTES, predicted["compute_peak_bytes"]
      -- is at most model - offload_gb, or at most max_vram_gb (GiB = 2^30 bytes).  The offloaded units
      live on the donors (several donors: the fastest link to the compute device is filled first, within
      each donor's free memory; cpu comes last).  The shortest prefix of the order below that fits with
      one slot is taken, then up to MORE_OFFLOAD_TRIES longer ones with their best window inside the
      budget compete on the simulated step.  A budget below the minimum working set is an error naming
      it; neither budget keeps everything resident; `vram_gb=` is refused;
  (b) `expert`: an allocation string in any form of passes/allocation.py.  The compute device's budget
      decides how much stays resident; the other listed devices receive the offloaded units up to
      their budgets (fastest link first).

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

A budget of R bytes to offload then takes the SHORTEST PREFIX of that order holding >= R bytes: the
offloaded amount is R or more by less than one unit, and a larger budget always offloads a superset.
That nesting is what makes the printed expert string reproduce the placement exactly: the string gives
each device a fraction of its total memory rounded UP (4 decimals, more only if 4 cannot reproduce it),
which, read back, moves the compute device's budget by less than the next unit in the order.

Large graphs: when more than POOL candidates remain, only the POOL farthest-spread ones are simulated per
round (fewer past 200 units), so ranking stays ~O(n^2 * POOL) cheap: Flux-dev's 63 units rank in ~0.04 s,
600 units in ~1.5 s on one CPU core.
"""
from __future__ import annotations

import bisect
import copy
import math
from decimal import Decimal, ROUND_CEILING

from ..compiler.cost import simulate, simulate_core, unit_compute_s, unit_transfer_s
from ..compiler.graph import ModuleGraph, Unit
from ..compiler.inventory import Inventory, InventoryError, normalize_device
from ..compiler.plan import GiB, Plan, PlacedUnit
from ..compiler.ring_layout import ALIGN, DEFAULT_SLOTS, MAX_SLOTS, align
from ..errors import AllocationError, PartitionError
from .allocation import budgets as alloc_budgets, parse_allocation
from .quant_choice import gguf_facts, working_bytes

POOL = 24


# --- ranking --------------------------------------------------------------------------------------

def _deferred(units: list[Unit]) -> set[int]:
    """Indices that stay resident unless needed: the root remainder, and leaf units outside the blocks."""
    blocks = [i for i, u in enumerate(units) if u.kind == "block"]
    out = set()
    for i, u in enumerate(units):
        if u.kind == "root":
            out.add(i)
        elif blocks and u.kind != "block" and (i < blocks[0] or i > blocks[-1]):
            out.add(i)
    return out


def priority_order(graph: ModuleGraph, inventory: Inventory, compute: str, src: str = "cpu") -> list[str]:
    """Unit names, best to offload first (see module docstring).  Zero-byte units are not listed."""
    units = graph.units
    n = len(units)
    ct = [unit_compute_s(u, compute, inventory) for u in units]
    tt = [unit_transfer_s(u.bytes, src if src != compute else "cpu", compute, inventory) for u in units]
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
        if len(remaining) > pool_n:
            pool = sorted(remaining, key=lambda c: (-gap(c), -units[c].bytes, c))[:pool_n]
        else:
            pool = remaining
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
        bisect.insort(chosen, best_c)
        order.append(best_c)
        remaining.remove(best_c)
        cur = best_step
        link_total += tt[best_c]
    rest = sorted((i for i in deferred if units[i].bytes > 0), key=lambda i: (-units[i].bytes, i))
    return [units[i].name for i in order + rest]


# --- placement ------------------------------------------------------------------------------------

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


def _sort_donors(donors: list[str], inventory: Inventory, compute: str) -> list[str]:
    return sorted(donors, key=lambda d: (d == "cpu", -inventory.bandwidth(d, compute), donors.index(d)))


def _assign(graph: ModuleGraph, offloaded: set[str], donors: list[tuple[str, int]], what: str,
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
                f"the offloaded units ({_gb(need)}) do not fit the {what} "
                f"({', '.join(f'{d} {_gb(c)}' for d, c in donors) or 'none'}; {_gb(have)} in all; unit "
                f"{u.name!r} of {_gb(u.bytes)} has no room): add a donor, free memory, or offload less")
        room[pick] -= u.bytes
        if free is not None:
            free[pick] -= u.bytes
        homes[u.name] = pick
    return homes


def _gb(b: float) -> str:
    return f"{b / GiB:.2f} GiB"


WINDOW_SCENARIOS = (0.5, 1.0, 1.5)   # compute-time scales the window must cover when times are estimated


def _default_window(graph, homes, compute, inventory, max_slots: int) -> int:
    """Slots for the ring: for each compute-time scenario, the fewest slots whose simulated step is within
    1 % of the best any window (up to `max_slots`: MAX_SLOTS, or fewer when the budget / free memory
    holds fewer) gives; the most any scenario needs.  Scenarios: the estimate itself and, unless every
    unit's time is measured, compute 2x faster and 1.5x slower (a FLOP-rate estimate can be that far off;
    how many slots a step needs depends on how compute and copy times interleave, e.g. Flux's double
    blocks copy longer than they compute and its single blocks the reverse, so the ring must bank copies
    during the singles).  Returns window bytes = slots x the largest offloaded unit (the runtime divides
    by that size again, runtime/apply.py)."""
    sizes = [graph[n].bytes for n in homes]
    if not sizes:
        return 0
    slot = max(sizes)
    m = len(sizes)
    kmax = min(MAX_SLOTS, m, int(max_slots))
    if kmax < 1:
        raise PartitionError(f"no room on {compute} for one slot of the largest offloaded unit ({_gb(slot)})")
    kmin = min(DEFAULT_SLOTS, kmax)
    measured = all(u.time_s is not None for u in graph.units)
    scales = (1.0,) if measured else WINDOW_SCENARIOS
    base = [unit_compute_s(u, compute, inventory) for u in graph.units]
    need = kmin
    for sc in scales:
        units = []
        for u, t in zip(graph.units, base):
            v = copy.copy(u)
            v.time_s = t * sc
            units.append(v)
        steps = {k: simulate(units, homes, compute, inventory, k * slot)["step_s"] for k in range(kmin, kmax + 1)}
        best = min(steps.values())
        need = max(need, min(k for k, st in steps.items() if st <= best * 1.01))
    return need * slot


# --- what the compiled model holds on the compute device -----------------------------------------------

RUNTIME_BUFFERS_BYTES = 2 << 20      # small device buffers of a streaming runtime (peer-access probes,
#                                      events, allocator rounding of 512 bytes per allocation): counted once,
#                                      on a GPU computing
ACTIVATION_RESERVE_BYTES = 2 << 30   # a plan leaving less than this free on the compute device gets a warning
MORE_OFFLOAD_TRIES = 8               # prefixes past the first that fits the budget tried for a better step


def slot_bytes_of(unit: Unit) -> int:
    """Upper bound of the ring slot the runtime allocates for `unit`: its bytes with every tensor's view
    aligned (compiler/ring_layout.ALIGN, runtime/store.py's home layout), the flat buffer aligned too."""
    return align(unit.bytes + ALIGN * max(1, len(unit.tensors or ())))


class Footprint:
    """The compute device's share of a placement: resident weights, slots, dequant scratch, transient
    dequantized copies, runtime buffers.  `fixed` = all of it but the slots; total(k) with k slots."""

    def __init__(self, graph: ModuleGraph, offloaded, compute: str, facts: dict):
        off = set(offloaded)
        self.resident = sum(u.bytes for u in graph.units if u.name not in off)
        self.largest = max((graph[n].bytes for n in off), default=0)
        self.slot = max((slot_bytes_of(graph[n]) for n in off), default=0)
        self.scratch, self.transient = working_bytes(facts, off, compute)
        self.buffers = RUNTIME_BUFFERS_BYTES if off and not compute.startswith("cpu") else 0
        self.fixed = self.resident + self.scratch + self.transient + self.buffers
        self.n = len(off)

    def slots_for(self, window: int) -> int:
        """Slots the runtime makes of a plan window (runtime/apply.py: window // largest, <= MAX_SLOTS)."""
        if not self.n or self.largest <= 0:
            return 0
        return min(MAX_SLOTS, self.n, int(window // self.largest))

    def total(self, k: int) -> int:
        return self.fixed + k * self.slot

    def minimum(self) -> int:
        return self.total(1 if self.n else 0)

    def parts(self, k: int) -> dict:
        return {"resident_bytes": self.resident, "slots": k, "slot_bytes": self.slot,
                "window_footprint_bytes": k * self.slot, "dequant_scratch_bytes": self.scratch,
                "dequant_transient_bytes": self.transient, "runtime_buffers_bytes": self.buffers}


def _why(fp: Footprint) -> str:
    bits = [f"{_gb(fp.resident)} resident", f"one {_gb(fp.slot)} slot for the largest streamed unit"]
    if fp.scratch:
        bits.append(f"{_gb(fp.scratch)} dequant scratch")
    if fp.transient:
        bits.append(f"{_gb(fp.transient)} transient dequantized copies")
    if fp.buffers:
        bits.append(f"{fp.buffers / 2**20:.0f} MiB runtime buffers")
    return " + ".join(bits)


def _place(graph: ModuleGraph, inventory: Inventory, compute: str, order: list[str], target: int,
           donors: list[tuple[str, int]], what: str, soft: bool = False) -> dict[str, str]:
    offloaded = _prefix(order, graph, target)
    free = {d: inventory.devices[d].free_bytes for d, _ in donors} if soft else None
    return _assign(graph, offloaded, donors, what, free, order)


def _expert_donors(entries, bud: dict[str, int], inventory: Inventory, compute: str):
    devs = [e.device for e in entries if e.device != compute]
    return [(d, bud[d]) for d in _sort_donors(devs, inventory, compute)]


def _place_expert(graph, inventory, compute, order, expert: str):
    entries = parse_allocation(expert, inventory.names())
    if not entries:
        raise AllocationError("empty expert string")
    model = graph.total_bytes
    totals = {d: inventory.devices[d].total_bytes for d in inventory.devices}
    for e in entries:   # a byte amount larger than the device itself is a typo, not a budget
        if e.mode == "bytes" and e.value is not None and e.value > totals.get(e.device, 0):
            raise AllocationError(
                f"entry {e.text!r} asks for {_gb(e.value)} but {e.device} has {_gb(totals.get(e.device, 0))} in all: "
                f"lower it, or write {e.device},* to give it whatever is left")
    bud = alloc_budgets(entries, totals, model)
    have = sum(bud.values())
    if have < model:
        raise PartitionError(
            f"the allocation {expert!r} gives {_gb(have)} in all but the model needs {_gb(model)}: "
            f"{_gb(model - have)} ({model - have} bytes) are missing; raise a budget or mark a device with '*'")
    target = max(0, model - bud.get(compute, 0))
    homes = _place(graph, inventory, compute, order, target, _expert_donors(entries, bud, inventory, compute),
                   "budgets of the expert string", soft=True)
    return homes, bud


def _fraction_string(graph, homes, inventory, compute, decimals: int) -> str:
    per = {}
    for u in graph.units:
        d = homes.get(u.name, compute)
        per[d] = per.get(d, 0) + u.bytes
    devs = [compute] + _sort_donors([d for d in per if d != compute and per[d] > 0], inventory, compute)
    q = Decimal(1).scaleb(-decimals)
    parts = []
    for d in devs:
        tot = inventory.devices[d].total_bytes
        f = (Decimal(per.get(d, 0)) / Decimal(tot)).quantize(q, rounding=ROUND_CEILING) if tot else Decimal(0)
        if f > 1:
            f = Decimal(1)
        parts.append(f"{d},{f:.{decimals}f}")
    return ";".join(parts)


def expert_string_for(graph, homes, inventory, compute, order) -> tuple[str, bool]:
    """The fraction-form string for a placement: 4 decimals, more when 4 do not reproduce it exactly.
    Returns (string, exact)."""
    s = ""
    for dec in range(4, 13):
        s = _fraction_string(graph, homes, inventory, compute, dec)
        try:
            again, _ = _place_expert(graph, inventory, compute, order, s)
        except Exception:
            continue
        if again == homes:
            return s, True
    return _fraction_string(graph, homes, inventory, compute, 4), False


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


def partition(graph: ModuleGraph, inventory: Inventory, compute: str, *, offload_gb=None, max_vram_gb=None,
              donors=None, expert: str | None = None, window_bytes: int | None = None, clamp: bool = False,
              vram_gb=_UNSET) -> Plan:
    """Place every unit of `graph` (see module docstring).  Pure function: raises before building anything
    on bad input (DisTorchError subclasses naming the bad value).

    Budget, at most one of: `offload_gb` = X GiB of the model kept off the compute device, so that what
    the compiled model holds there (resident weights + ring slots + dequant scratch + runtime buffers,
    predicted["compute_peak_bytes"]) is at most model - X: more than X is offloaded when the slots need
    room; X at or above the model's size streams all of it.  `max_vram_gb` = Y: that footprint is at most
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
        homes, bud = _place_expert(graph, inventory, compute, order, expert)
        source = {"mode": "expert", "expert": str(expert), "budgets": bud}
        fp = Footprint(graph, homes, compute, facts)
        window = _window_within(graph, homes, compute, inventory, fp, free, window_bytes)
    else:
        donors_caps = [(d, inventory.devices[d].free_bytes) for d in _sort_donors(donor_list, inventory, compute)]
        if mode == "offload" and offload < model:
            budget = model - offload
        elif mode == "max_vram":
            budget = cap
        homes, window, fp, budget, note = _place_budget(graph, inventory, compute, order, mode, offload, budget,
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
            f"window_bytes (--window) {window_bytes} plus {_gb(fp.fixed)} of resident weights and buffers is more "
            f"than the {_gb(free)} free on {compute}: give at most {max(0, free - fp.fixed)} bytes, or leave it out")
    if peak > free:
        raise PartitionError(
            f"the plan holds {_gb(peak)} on {compute} ({_why(fp).replace('one ', f'{k} x ')}), which has "
            f"{_gb(free)} free: offload at least {_gb(peak - free)} more (or cap it: --max-vram / max_vram_gb)")
    # donors within their free memory (expert budgets may exceed it)
    per = {}
    for n, d in homes.items():
        per[d] = per.get(d, 0) + graph[n].bytes
    for d, b in per.items():
        if b > inventory.devices[d].free_bytes:
            raise PartitionError(f"{_gb(b)} of the model would live on {d}, which has "
                                 f"{_gb(inventory.devices[d].free_bytes)} free: lower its share")
    if free - peak < ACTIVATION_RESERVE_BYTES and not compute.startswith("cpu"):
        warnings.append(f"the plan holds {_gb(peak)} of the {_gb(free)} free on {compute}, leaving "
                        f"{_gb(free - peak)} for activations (less than {_gb(ACTIVATION_RESERVE_BYTES)}): "
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
    pred["warnings"] = warnings
    pred["basis"] = ("measured" if all(u.time_s is not None for u in graph.units) else
                     "flops" if all(u.flops > 0 or u.time_s is not None for u in graph.units) else
                     "bytes-fallback")

    placed = [PlacedUnit(u.name, u.type, u.bytes, homes.get(u.name, compute), i, u.kind)
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


def _window_within(graph, homes, compute, inventory, fp: Footprint, limit: int, window_bytes) -> int:
    """The window for a placement within `limit` bytes on the compute device: the given one (checked),
    else _default_window with as many slots as the room holds."""
    if not homes:
        return 0
    if window_bytes is not None:
        window = int(window_bytes)
        if window < fp.largest:
            raise PartitionError(f"window_bytes {window_bytes} cannot hold the largest offloaded unit "
                                 f"({fp.largest} bytes); give at least that")
        return window
    room = (limit - fp.fixed) // fp.slot if fp.slot else 0
    if room < 1:
        raise PartitionError(
            f"{compute} has {_gb(max(0, limit - fp.fixed))} left after {_gb(fp.fixed)} of resident weights and "
            f"buffers, less than one slot for the largest offloaded unit ({_gb(fp.slot)}): offload more")
    return _default_window(graph, homes, compute, inventory, room)


def _place_budget(graph, inventory, compute, order, mode, offload, budget, donors_caps, facts, free,
                  window_bytes, clamp):
    """Offload/max-vram placement: the shortest prefix of `order` holding >= `offload` bytes whose
    footprint with one slot (or the given window) fits `budget`; then up to MORE_OFFLOAD_TRIES longer
    prefixes, each with its best window within the budget; the fastest simulated step wins (ties: the
    shorter prefix).  Returns (homes, window, Footprint, budget, warning or None)."""
    model = graph.total_bytes
    cum = [0]
    for n in order:
        cum.append(cum[-1] + graph[n].bytes)
    what = "donors' free memory"
    if mode == "resident":
        fp = Footprint(graph, (), compute, facts)
        return {}, 0, fp, None, None
    start = next((p for p in range(len(order) + 1) if cum[p] >= offload), len(order)) if mode == "offload" else 0
    if mode == "offload" and offload >= model:
        start = len(order)

    def fits(p, limit):
        fp = Footprint(graph, order[:p], compute, facts)
        if window_bytes is not None and fp.n:
            if int(window_bytes) < fp.largest:
                raise PartitionError(f"window_bytes {window_bytes} cannot hold the largest offloaded unit "
                                     f"({fp.largest} bytes); give at least that")
            need = fp.total(fp.slots_for(int(window_bytes)))
        else:
            need = fp.minimum()
        return fp, need, limit is None or need <= limit

    note = None
    first = None
    for p in range(start, len(order) + 1):
        fp, need, ok = fits(p, budget)
        if ok:
            first = p
            break
    if first is None:
        mins = [fits(p, None)[1] for p in range(len(order) + 1)]
        least = min(mins)
        best_p = mins.index(least)
        lfp = Footprint(graph, order[:best_p], compute, facts)
        if mode == "offload" and clamp:
            first, budget = len(order), None
            note = (f"offloading {_gb(offload)} cannot leave the model at most {_gb(model - offload)} on {compute}: "
                    f"the minimum working set is {_gb(least)} ({_why(lfp)}); streaming all of it instead")
        elif mode == "offload":
            raise PartitionError(
                f"offload_gb (--offload) {offload / GiB:.4g} would leave at most {_gb(model - offload)} of the model on "
                f"{compute}, below its minimum working set of {_gb(least)} ({least} bytes: {_why(lfp)}): "
                f"offload at most {_gb(max(0, model - least))}, or {_gb(model)} (the whole model) to stream all of it")
        else:
            raise PartitionError(
                f"max_vram_gb (--max-vram) {budget / GiB:.4g} is below the minimum working set on {compute}: {_gb(least)} "
                f"({least} bytes: {_why(lfp)}); give at least {math.ceil(least / GiB * 1000) / 1000:.3f} GiB")
    limit = free if budget is None else min(budget, free)
    cands = []
    for p in range(first, min(len(order), first + MORE_OFFLOAD_TRIES) + 1):
        fp, need, ok = fits(p, budget)
        if not ok or need > limit:
            if cands:
                break
            # the budget fits but the device does not: the caller names what is missing
            homes = _assign(graph, set(order[:p]), donors_caps, what, None, order)
            return homes, (int(window_bytes) if window_bytes is not None and fp.n else
                           fp.largest if fp.n else 0), fp, budget, note
        homes = _assign(graph, set(order[:p]), donors_caps, what, None, order)
        window = _window_within(graph, homes, compute, inventory, fp, limit, window_bytes)
        step = simulate(graph.units, homes, compute, inventory, window)["step_s"] if homes else 0.0
        cands.append((step, p, homes, window, fp))
        roomy = fp.slot and (limit - fp.fixed) // fp.slot > fp.slots_for(window)
        if window_bytes is not None or not homes or roomy or p == len(order):
            break                # more offload only adds copies: the window was not held back by the budget
    best = min(c[0] for c in cands)
    step, p, homes, window, fp = next(c for c in cands if c[0] <= best * 1.005)
    return homes, window, fp, budget, note
