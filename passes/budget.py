"""What a placement holds on the compute device (Footprint), its ring window, and the placement for an
offload_gb / max_vram_gb budget (`place_budget`; the budget itself: passes/partition.py).

What the compiled model holds on the compute device: resident weights + ring slots (`slot_bytes_of`:
aligned views) + GGUF dequant scratch and transient copies (passes/quant_choice.working_bytes) +
RUNTIME_BUFFERS_BYTES, predicted["compute_peak_bytes"].  The shortest prefix of the priority order
(passes/rank.py) that fits the budget with one slot is taken, then up to MORE_OFFLOAD_TRIES longer ones
with their best window inside the budget compete on the simulated step in every compute-time scenario
while unit times are estimates (`least_regret`).
"""
from __future__ import annotations

import copy
import math
from typing import Iterable

from ..compiler.cost import simulate, unit_compute_s
from ..compiler.graph import ModuleGraph, Unit
from ..compiler.inventory import Inventory
from ..compiler.plan import GiB
from ..compiler.ring_layout import ALIGN, DEFAULT_SLOTS, MAX_SLOTS, align
from ..errors import PartitionError
from .donors import assign, gb
from .quant_choice import working_bytes

# --- what the compiled model holds on the compute device -----------------------------------------------

RUNTIME_BUFFERS_BYTES = 2 << 20      # small device buffers of a streaming runtime (peer-access probes,
#                                      events, allocator rounding of 512 bytes per allocation): counted once,
#                                      on a GPU computing
ACTIVATION_RESERVE_BYTES = 2 << 30   # a plan leaving less than this free on the compute device gets a warning
MORE_OFFLOAD_TRIES = 8               # prefixes past the first that fits the budget tried for a better step
CANDIDATE_TIE = 0.001                # a longer prefix (more offload) must beat the shorter by this share


def slot_bytes_of(unit: Unit) -> int:
    """Upper bound of the ring slot the runtime allocates for `unit`: its bytes with every tensor's view
    aligned (compiler/ring_layout.ALIGN, runtime/store.py's home layout), the flat buffer aligned too."""
    return align(unit.bytes + ALIGN * max(1, len(unit.tensors or ())))


class Footprint:
    """The compute device's share of a placement: resident weights, slots, dequant scratch, transient
    dequantized copies, runtime buffers.  `fixed` = all of it but the slots; total(k) with k slots."""

    def __init__(self, graph: ModuleGraph, offloaded: Iterable[str], compute: str, facts: dict) -> None:
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


def why(fp: Footprint) -> str:
    bits = [f"{gb(fp.resident)} resident", f"one {gb(fp.slot)} slot for the largest streamed unit"]
    if fp.scratch:
        bits.append(f"{gb(fp.scratch)} dequant scratch")
    if fp.transient:
        bits.append(f"{gb(fp.transient)} transient dequantized copies")
    if fp.buffers:
        bits.append(f"{fp.buffers / 2**20:.0f} MiB runtime buffers")
    return " + ".join(bits)


WINDOW_SCENARIOS = (0.5, 0.7, 1.0, 1.5)   # compute-time scales the window must cover when times are estimated


def scenario_units(graph: ModuleGraph, compute: str, inventory: Inventory) -> list[list[Unit]]:
    """Copies of the graph's units for each compute-time scenario: WINDOW_SCENARIOS x the estimate while any
    unit's time is an estimate, the times themselves once all are measured, and x each of the graph's
    time_scales (other inputs measured: compiler/graph.py) (the graph is not touched).
    They depend on the graph alone: a caller placing several candidates makes them once."""
    scales = (1.0, *getattr(graph, "time_scales", ())) if all(u.time_s is not None for u in graph.units) \
        else WINDOW_SCENARIOS
    out = []
    for sc in scales:
        units = []
        for u in graph.units:
            v = copy.copy(u)
            v.time_s = unit_compute_s(u, compute, inventory) * sc
            units.append(v)
        out.append(units)
    return out


def scenario_steps(graph: ModuleGraph, homes: dict[str, str], compute: str, inventory: Inventory, window: int,
                   scenarios: list[list[Unit]] | None = None) -> list[float]:
    """The simulated step of a placement in each compute-time scenario (`scenario_units`, made here when
    not given)."""
    scenarios = scenario_units(graph, compute, inventory) if scenarios is None else scenarios
    if not homes:
        return [0.0] * len(scenarios)
    return [simulate(units, homes, compute, inventory, window)["step_s"] for units in scenarios]


def least_regret(steps: list[list[float]], tie: float) -> int:
    """Index of the candidate whose worst step, relative to the best candidate's in the same scenario, is
    smallest (the first, i.e. the least offload, of those within `tie` of it).  With estimated times the
    estimate alone ranks poorly: a FLOP-rate estimate that is too slow hides the stalls a small window
    causes (Flux-dev at 1024x1024 in ComfyUI on an H200: 0.223 s estimated, 0.158 s measured, so 2 slots at
    6 GiB off looked as good as 4-5 and ran ~4 % slower by the measured unit times of
    bench/results/comfy_vram_h200_r4.json), so each candidate is judged in every scenario."""
    best = [min(col) for col in zip(*steps)]
    regret = [max((s / b if b > 0 else 1.0) for s, b in zip(row, best)) for row in steps]
    least = min(regret)
    return next(i for i, r in enumerate(regret) if r <= least * (1 + tie))


PRIMARY_SLACK = 0.02       # measured inputs: a candidate may lose this much at the largest to help the others


def primary_then_regret(steps: list[list[float]], tie: float) -> int:
    """With measured unit times for several inputs (column 0: the input they were measured at, the largest;
    the others: ModuleGraph.time_scales): among the candidates within PRIMARY_SLACK of the best step at
    column 0, the least regret over every column.  The largest input decides, the smaller ones break what it
    leaves nearly tied (Flux-dev at 6 GiB off: streaming compressed makes 512x512 ~25 % faster and 1024x1024
    ~7 % slower; one placement serves both, and the mean or the worst ratio would give up the larger)."""
    best0 = min(row[0] for row in steps)
    ok = [i for i, row in enumerate(steps) if row[0] <= best0 * (1 + PRIMARY_SLACK)]
    return ok[least_regret([steps[i] for i in ok], tie)]


def pick(steps: list[list[float]], tie: float, measured: bool) -> int:
    """least_regret over compute-time scenarios of an estimate; primary_then_regret over measured inputs."""
    return primary_then_regret(steps, tie) if measured else least_regret(steps, tie)


def _default_window(graph, homes, compute, inventory, max_slots: int, scenarios: list | None = None) -> int:
    """Slots for the ring: for each compute-time scenario, the fewest slots whose simulated step is within
    1 % of the best any window (up to `max_slots`: MAX_SLOTS, or fewer when the budget / free memory
    holds fewer) gives; the most any scenario needs.  Scenarios (`scenario_units`, made here when not
    given): the estimate itself and, unless every unit's time is measured, compute from 2x faster to 1.5x
    slower (a FLOP-rate estimate can be that far off;
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
        raise PartitionError(f"no room on {compute} for one slot of the largest offloaded unit ({gb(slot)})")
    kmin = min(DEFAULT_SLOTS, kmax)
    need = kmin
    for units in scenario_units(graph, compute, inventory) if scenarios is None else scenarios:
        steps = {k: simulate(units, homes, compute, inventory, k * slot)["step_s"] for k in range(kmin, kmax + 1)}
        best = min(steps.values())
        need = max(need, min(k for k, st in steps.items() if st <= best * 1.01))
    return need * slot


def window_within(graph: ModuleGraph, homes: dict[str, str], compute: str, inventory: Inventory, fp: Footprint,
                  limit: int, window_bytes: int | None, scenarios: list | None = None) -> int:
    """The window for a placement within `limit` bytes on the compute device: the given one (checked),
    else _default_window with as many slots as the room holds (`scenarios`: scenario_units, when made)."""
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
            f"{compute} has {gb(max(0, limit - fp.fixed))} left after {gb(fp.fixed)} of resident weights and "
            f"buffers, less than one slot for the largest offloaded unit ({gb(fp.slot)}): offload more")
    return _default_window(graph, homes, compute, inventory, room, scenarios)


def place_budget(graph: ModuleGraph, inventory: Inventory, compute: str, order: list[str], mode: str, offload: int,
                 budget: int | None, donors_caps: list[tuple[str, int]], facts: dict, free: int,
                 window_bytes: int | None, clamp: bool
                 ) -> tuple[dict[str, str], int, Footprint, int | None, str | None]:
    """Offload/max-vram placement: the shortest prefix of `order` holding >= `offload` bytes whose
    footprint with one slot (or the given window) fits `budget`; then up to MORE_OFFLOAD_TRIES longer
    prefixes, each with its best window within the budget; the one whose simulated step is nearest the
    best in its worst compute-time scenario wins (`least_regret`; one scenario once times are measured;
    ties within CANDIDATE_TIE: the shorter prefix).  Returns (homes, window, Footprint, budget, warning or None)."""
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
            note = (f"offloading {gb(offload)} cannot leave the model at most {gb(model - offload)} on {compute}: "
                    f"the minimum working set is {gb(least)} ({why(lfp)}); streaming all of it instead")
        elif mode == "offload":
            raise PartitionError(
                f"offload_gb (--offload) {offload / GiB:.4g} would leave at most {gb(model - offload)} of the model on "
                f"{compute}, below its minimum working set of {gb(least)} ({least} bytes: {why(lfp)}): "
                f"offload at most {gb(max(0, model - least))}, or {gb(model)} (the whole model) to stream all of it")
        else:
            raise PartitionError(
                f"max_vram_gb (--max-vram) {budget / GiB:.4g} is below the minimum working set on {compute}: {gb(least)} "
                f"({least} bytes: {why(lfp)}); give at least {math.ceil(least / GiB * 1000) / 1000:.3f} GiB")
    limit = free if budget is None else min(budget, free)
    cands = []
    scenarios = scenario_units(graph, compute, inventory)
    for p in range(first, min(len(order), first + MORE_OFFLOAD_TRIES) + 1):
        fp, need, ok = fits(p, budget)
        if not ok or need > limit:
            if cands:
                break
            # the budget fits but the device does not: the caller names what is missing
            homes = assign(graph, set(order[:p]), donors_caps, what, None, order)
            return homes, (int(window_bytes) if window_bytes is not None and fp.n else
                           fp.largest if fp.n else 0), fp, budget, note
        homes = assign(graph, set(order[:p]), donors_caps, what, None, order)
        window = window_within(graph, homes, compute, inventory, fp, limit, window_bytes, scenarios)
        cands.append((scenario_steps(graph, homes, compute, inventory, window, scenarios), p, homes, window, fp))
        roomy = fp.slot and (limit - fp.fixed) // fp.slot > fp.slots_for(window)
        if window_bytes is not None or not homes or roomy or p == len(order):
            break                # more offload only adds copies: the window was not held back by the budget
    measured = all(u.time_s is not None for u in graph.units)
    _, p, homes, window, fp = cands[pick([c[0] for c in cands], CANDIDATE_TIE, measured)]
    return homes, window, fp, budget, note
