"""Timing of a running Plan: the step clock (always on) and per-unit / per-copy events (profiling).

    StepClock   an event pair around every forward of the compiled module (16 pairs reused round robin),
                host seconds per forward, the step count
    Profiler    with profile=True, or while autotune measures: an event pair around every streamed unit
                call (its hook chain), one around every stretch of consecutive units of one block the
                ring does not stream (`hook_resident`: torch hooks on a stretch's first and last unit
                only), and, through the ring, around every copy
    Closer      the part that ends a stretch left open before a streamed unit waits for its copy

Stretches, not resident units one by one.  A forward hook costs host time beyond the hook's own (torch
leaves its fast call path), which no event sees: at 512x512 a Flux plan streaming single Linear layers
has ~425 resident layers whose GPU work (~0.1 ms each) is shorter than that host work, and timing each
of them made the profiled unit times sum to 1.5-1.7x the real step (H200, bench/results/
comfy_vram_h200_r9.md), so the planner saw a host-bound step as compute-bound; whole blocks (~1 ms of
GPU work each) timed one by one summed to the real step.  What the simulation needs of resident work is
its time between two streamed units, and the time book (runtime/timebook.py) keeps times per block: one
span per stretch -- the resident units in a row, in the plan's order, of one block (PlacedUnit.parent;
a unit that is a block is a stretch of its own) -- gives both with two hooks.  `spread` shares a
stretch's time out over its units by their bytes (the time book's rule for a split block), so
measured_step, own_cost and unit_times still answer per unit.  A stretch whose last unit did not run is
closed by the next unit's start (the Closer runs before the ring's wait, so no stall is counted in it) or
by the forward's end.

Both are parts (runtime/hooks.py) and record; runtime/stats.py reads their public state (`trace`,
`step_events()`, `host_s`, `steps`) between steps.  On a machine without CUDA the events are host
timestamps (runtime.stream.HostEvent), so the same timeline comes out, synchronously.

The profiler's own cost.  Its host work per unit (making events, recording them, keeping the trace) is
timed (`stamps`: per unit call the host seconds it spent before the unit's start event and before its end
event were enqueued, and the host clock when they were), and so is its work around every copy.  That
work costs the step GPU time only where the stream waited for the host (a host-bound stretch: many small
units); `own_cost()` tells how much, from how far each event ran behind the host's record call
(runtime/autotune.py takes it out of the measured step).  Both events of a span are made before it
opens (torch creates the CUDA event itself at its first record: that part of the end event's record is
timed with it).
"""
from __future__ import annotations

import time

from .compile_boundary import opaque
from .hooks import UnitPart

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .apply import Runtime
    import torch
    from .ring import Ring
    from .stream import Backend, HostEvent, HostStream

__all__ = ["StepClock", "Profiler", "Closer", "LAG_JITTER_S", "LAG_TOL_S"]

TRACE_MAX = 20000      # compute events kept; the older half is dropped beyond this
HOST_KEEP = 64         # host times kept (the older half is dropped beyond this)
LAG_JITTER_S = 10e-6   # an event running up to this much later than the host recorded it (beyond the launch
#                        latency) ran when the host got there: the stream waited for the host
LAG_TOL_S = 50e-6      # ... and this much more later: it had work queued before it, the host's cost was hidden
_now = time.perf_counter


class StepClock(UnitPart):
    def __init__(self, be: Backend, ring: Ring, keep: int = 16) -> None:
        self.ring = ring                                   # its compute stream
        self.events = [(be.event(True), be.event(True)) for _ in range(keep)]
        self.steps = 0                                     # forwards finished
        self.host_s: list[float] = []                      # host seconds per recent forward
        self._t0 = 0.0

    def begin(self) -> None:
        self.events[self.steps % len(self.events)][0].record(self.ring.cs)
        self._t0 = time.perf_counter()

    def end(self) -> None:
        self.events[self.steps % len(self.events)][1].record(self.ring.cs)
        self.steps += 1
        self.host_s.append(time.perf_counter() - self._t0)
        if len(self.host_s) > HOST_KEEP:
            del self.host_s[:HOST_KEEP // 2]

    def step_events(self) -> list:
        """(start, end) event pairs of the most recent steps, oldest first."""
        k = len(self.events)
        n = min(self.steps, k)
        return [self.events[(self.steps - n + j) % k] for j in range(n)]

    def completed(self, k: int, of: int) -> tuple[list[float], list[float]] | None:
        """Seconds of the latest `k` steps that completed, among the latest `of` (the latest may still run:
        the host ahead of the device; then the k before it, when `of` > k), and the k - 1 gaps between
        them; None while they have not completed.  No synchronize: a query per event (callable in a
        forward).  Raises what the events raise (one never recorded)."""
        ev = self.step_events()[-of:] if of else []
        if len(ev) > k and not ev[-1][1].query():
            ev = ev[:-1]
        ev = ev[-k:]
        if len(ev) < k or not ev[-1][1].query():
            return None
        return ([e0.elapsed_time(e1) / 1e3 for e0, e1 in ev],
                [max(0.0, a[1].elapsed_time(b[0]) / 1e3) for a, b in zip(ev, ev[1:])])


class Profiler(UnitPart):
    """trace: (lane, unit, start event, end event, step) tuples; lane "compute" or "copy:<home device>".

    stamps: per unit call (step, start event, end event, host clock right before the start event's record
    call, host clock right before the end event's, profiler host seconds before the start event (since the
    previous unit's end event: its bookkeeping, the ring's copy events, this unit's start), profiler host
    seconds before the end event, unit); copy_stamps: per copy (step, lane, end event, host clock right
    before its record call, profiler host seconds before it); tail: the cost after the last unit of the
    latest step."""

    def __init__(self, be: Backend, ring: Ring, clock: StepClock, units: list[str], unit_mods: dict,
                 on: bool, weights: dict | None = None, groups: dict | None = None) -> None:
        self.be = be
        self.ring = ring
        self.clock = clock
        self.units = units
        self.unit_mods = unit_mods         # unit name -> module, in the plan's order, for hook_resident
        self.weights = dict(weights or {})  # unit name -> bytes: a stretch's time is shared out by them
        self.groups = dict(groups or {})    # unit name -> its block: a stretch never spans two
        self.stretches: dict[str, list[str]] = {}   # label of a stretch of 2+ resident units -> its units
        self.on = bool(on)
        self.trace: list[tuple] = []
        self.stamps: list[tuple] = []
        self.copy_stamps: list[tuple] = []
        self.hooks: list = []              # hook_resident's, when profiling from the start
        self._open = None                  # (start event, end event, host clock, cost, name, step): the open span
        self._cost = 0.0                   # profiler host seconds since the last compute event was recorded
        self._cost_step = -1
        self.tail = None                   # (step, the step's end event, host clock, cost after the last unit)

    @property
    def enabled(self) -> bool:
        return self.on

    def attach(self, rt: Runtime) -> None:
        if self.on:
            self.hooks = self.hook_resident()

    def pre(self, i: int) -> None:
        self.unit_begin(self.units[i])

    def post(self, i: int) -> None:
        self.unit_end(self.units[i])

    def unit_begin(self, name: str) -> None:
        """A span `name` (a unit or a stretch label) starts; one still open ends here first (one left open by
        an earlier step, which raised, is dropped)."""
        self.close_open()
        t = _now()
        if self._cost_step != self.clock.steps:        # the first unit of a step: no cost carried over
            self._cost_step = self.clock.steps
            self._cost = 0.0
        e0, e1 = self.be.event(True), self.be.event(True)
        hb = _now()
        e0.record(self.ring.cs)
        h = _now()
        self._open = (e0, e1, hb, self._cost + (h - t), name, self.clock.steps)
        self._cost = 0.0

    def close_open(self) -> None:
        """End the open span, if any (a stretch whose last unit did not run); one left open by an earlier
        step (a forward that raised) is dropped."""
        if self._open is not None:
            if self._open[5] == self.clock.steps:
                self.unit_end(self._open[4])
            else:
                self._open = None

    def unit_end(self, name: str) -> None:
        """The span `name` ends; nothing when it is not the open one (it was ended already)."""
        if self._open is None or self._open[4] != name:
            return
        t = _now()
        e0, e1, h0, c0, _, _ = self._open
        self._open = None
        hb = _now()
        e1.record(self.ring.cs)
        h1 = _now()
        step = self.clock.steps
        self.trace.append(("compute", name, e0, e1, step))
        self.stamps.append((step, e0, e1, h0, hb, c0, h1 - t, name))
        if len(self.trace) > TRACE_MAX:
            del self.trace[:TRACE_MAX // 2]
        if len(self.stamps) > TRACE_MAX:
            del self.stamps[:TRACE_MAX // 2]
        self._cost += _now() - h1

    def end(self) -> None:
        """The forward returns: a span still open ends; the cost since the last unit, against the step's
        end event (the clock records it next)."""
        self.close_open()
        k = self.clock.steps
        self.tail = (k, self.clock.events[k % len(self.clock.events)][1], _now(), self._cost)
        self._cost = 0.0

    def copy(self, lane: str, name: str, e0: torch.cuda.Event | HostEvent, e1: torch.cuda.Event | HostEvent) -> None:
        """A copy the ring issued (its events on the link's stream)."""
        self.trace.append((lane, name, e0, e1, self.clock.steps))

    def copy_start(self, stream: torch.cuda.Stream | HostStream) -> tuple:
        """Before the ring issues a copy on `stream`: both its events made, the start recorded; returns
        them for `copy_end`."""
        t = _now()
        e0, e1 = self.be.event(True), self.be.event(True)
        e0.record(stream)
        self._cost += _now() - t
        return e0, e1

    def copy_end(self, lane: str, name: str, events: tuple, stream: torch.cuda.Stream | HostStream) -> None:
        """After the ring issued the copy: its end recorded on `stream`, the pair kept in the trace."""
        t = _now()
        e0, e1 = events
        hb = _now()
        e1.record(stream)
        h = _now()
        self.copy(lane, name, e0, e1)
        self.copy_stamps.append((self.clock.steps, lane, e1, hb, h - t))
        if len(self.copy_stamps) > TRACE_MAX:
            del self.copy_stamps[:TRACE_MAX // 2]
        self._cost += _now() - t

    def own_cost(self) -> dict:
        """How much GPU time the profiler's own host work cost the latest profiled step (its events must
        have completed: call after runtime.stats.measured_step, which synchronizes):

            gap_s    seconds before the step's first unit and after its last: the root's time
            units    unit name -> seconds inside its spans (the host enqueued the end event late) and
                     between the previous unit's end and its start (runtime.stats.lead_gaps counts that
                     time as the unit's)
            copies   home device -> seconds inside its copies' spans

        An event's *lag* is how long after the host began its record call it ran, less the smallest lag
        of the step (the launch latency): about 0 when the stream had nothing queued and waited for the host,
        so the host seconds spent just before the record delayed it; a stream with work queued hid
        them.  Each cost counts in full up to LAG_JITTER_S of lag, not at all from LAG_JITTER_S +
        LAG_TOL_S, linearly between.  Host events (no CUDA) run at their record call: every cost counts,
        as it does on the host.  The host clock is read before the record call, not after it: a thread
        preempted between the two would otherwise give one event a lag far below the others, and that
        one, taken as the step's smallest, made every other event look late (no cost counted: seen once
        on a busy CI machine); read before, a preemption can only make its own event look late."""
        out: dict = {"gap_s": 0.0, "units": {}, "copies": {}}
        if not self.stamps:
            return out
        step = self.stamps[-1][0]
        rows = [r for r in self.stamps if r[0] == step]
        crow = [r for r in self.copy_stamps if r[0] == step]
        ref, href = rows[0][1], rows[0][3]
        try:
            lag = [(ref.elapsed_time(e0) / 1e3 - (h0 - href), ref.elapsed_time(e1) / 1e3 - (h1 - href))
                   for _, e0, e1, h0, h1, _, _, _ in rows]
            clag = [ref.elapsed_time(e) / 1e3 - (h - href) for _, _, e, h, _ in crow]
        except Exception:       # an event never recorded or not completed: no estimate
            return out
        base = min([min(a, b) for a, b in lag] + clag)

        def counted(c: float, lg: float) -> float:
            return c * min(1.0, max(0.0, 1.0 - (lg - base - LAG_JITTER_S) / LAG_TOL_S))
        units: dict = out["units"]
        for j, ((_, _, _, _, _, c0, c1, name), (l0, l1)) in enumerate(zip(rows, lag)):
            before = counted(c0, l0)
            if j == 0:            # before the step's first unit: the root's time
                out["gap_s"] += before
                before = 0.0
            #                       between two units: in this unit's measured time (stats.lead_gaps)
            units[name] = units.get(name, 0.0) + before + counted(c1, l1)
        out["units"] = self.spread(units)
        for (_, lane, _, _, c), lg in zip(crow, clag):
            src = lane[5:] if lane.startswith("copy:") else lane
            out["copies"][src] = out["copies"].get(src, 0.0) + counted(c, lg)
        tail = self.tail
        if tail is not None and tail[0] == step:        # after the last unit, before the step's end event
            try:
                out["gap_s"] += counted(tail[3], ref.elapsed_time(tail[1]) / 1e3 - (tail[2] - href))
            except Exception:
                pass
        return out

    def clear(self) -> None:
        """Forget the recorded events (trace, stamps) and any span left open."""
        self.trace.clear()
        self.stamps.clear()
        self.copy_stamps.clear()
        self.tail = None
        self._open = None

    def spread(self, per: dict) -> dict:
        """`per` (span name -> seconds) with every stretch's seconds shared out over its units by their
        bytes (evenly when none has any); units' own entries kept."""
        out: dict = {}
        for name, v in per.items():
            members = self.stretches.get(name)
            if not members:
                out[name] = out.get(name, 0.0) + v
                continue
            w = [max(0, int(self.weights.get(n, 0))) for n in members]
            tot = sum(w)
            for n, wi in zip(members, w):
                out[n] = out.get(n, 0.0) + v * (wi / tot if tot else 1.0 / len(members))
        return out

    def stretch_runs(self) -> list[list[str]]:
        """The units the ring does not stream, in the plan's order, cut where a streamed unit comes and
        where the block changes (`groups`; a unit not in it is a block of its own)."""
        streamed = set(self.units)
        runs: list[list[str]] = []
        cur: list[str] = []
        for n in self.unit_mods:
            if n in streamed or (cur and self.groups.get(n, n) != self.groups.get(cur[-1], cur[-1])):
                if cur:
                    runs.append(cur)
                cur = []
            if n not in streamed:
                cur.append(n)
        if cur:
            runs.append(cur)
        return runs

    def hook_resident(self) -> list:
        """Event hooks on every stretch of units the ring does not stream (a pre hook on its first unit, a
        post hook on its last; inside the compiled forward only); returns the handles, for the caller to
        remove.  A stretch of 2+ units is named "<first> .. <last>" (`stretches`, `spread`)."""
        learn = self.ring.learn
        hooks = []
        self.stretches = {}
        for run in self.stretch_runs():
            label = run[0] if len(run) == 1 else f"{run[0]} .. {run[-1]}"
            if len(run) > 1:
                self.stretches[label] = run

            def pre(mod, args, label=label):
                if learn.depth:
                    self.unit_begin(label)

            def post(mod, args, out, label=label):
                if learn.depth:
                    self.unit_end(label)
            # opaque: see compile_boundary
            hooks.append(self.unit_mods[run[0]].register_forward_pre_hook(opaque(pre)))
            hooks.append(self.unit_mods[run[-1]].register_forward_hook(opaque(post), always_call=True))
        return hooks

    def detach(self, rt: Runtime) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.trace = []
        self.stamps = []
        self.copy_stamps = []
        self._open = self.tail = None
        self.unit_mods = {}
        self.stretches = {}


class Closer(UnitPart):
    """Before a streamed unit's hooks reach the ring (which makes the compute stream wait for the unit's
    copy): the profiler's open span, a stretch whose last unit did not run, ends, so no stall is timed
    in it.  Enabled while the profiler is."""

    def __init__(self, profiler: Profiler) -> None:
        self.profiler = profiler

    @property
    def enabled(self) -> bool:
        return self.profiler.on

    def pre(self, i: int) -> None:
        self.profiler.close_open()
