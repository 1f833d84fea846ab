"""Timing of a running Plan: the step clock (always on) and per-unit / per-copy events (profiling).

    StepClock   an event pair around every forward of the compiled module (16 pairs reused round robin),
                host seconds per forward, the step count
    Profiler    with profile=True, or while autotune measures: an event pair around every unit call --
                streamed units through their hook chains, the units the ring does not stream through
                torch hooks of their own (`hook_resident`) -- and, through the ring, around every copy

Both are parts (runtime/hooks.py) and only record; runtime/stats.py reads their public state (`trace`,
`step_events()`, `host_s`, `steps`) between steps.  On a machine without CUDA the events are host
timestamps (runtime.stream.HostEvent), so the same timeline comes out, synchronously.
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
    from .stream import Backend, HostEvent

__all__ = ["StepClock", "Profiler"]

TRACE_MAX = 20000      # compute events kept; the older half is dropped beyond this
HOST_KEEP = 64         # host times kept (the older half is dropped beyond this)


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


class Profiler(UnitPart):
    """trace: (lane, unit, start event, end event, step) tuples; lane "compute" or "copy:<home device>"."""

    def __init__(self, be: Backend, ring: Ring, clock: StepClock, units: list[str], unit_mods: dict,
                 on: bool) -> None:
        self.be = be
        self.ring = ring
        self.clock = clock
        self.units = units
        self.unit_mods = unit_mods         # unit name -> module, for hook_resident
        self.on = bool(on)
        self.trace: list[tuple] = []
        self.hooks: list = []              # hook_resident's, when profiling from the start
        self._e0 = None

    @property
    def enabled(self) -> bool:
        return self.on

    def attach(self, rt: Runtime) -> None:
        if self.on:
            self.hooks = self.hook_resident()

    def pre(self, i: int) -> None:
        self.unit_begin()

    def post(self, i: int) -> None:
        self.unit_end(self.units[i])

    def unit_begin(self) -> None:
        e = self.be.event(True)
        e.record(self.ring.cs)
        self._e0 = e

    def unit_end(self, name: str) -> None:
        e = self.be.event(True)
        e.record(self.ring.cs)
        self.trace.append(("compute", name, self._e0, e, self.clock.steps))
        if len(self.trace) > TRACE_MAX:
            del self.trace[:TRACE_MAX // 2]

    def copy(self, lane: str, name: str, e0: torch.cuda.Event | HostEvent, e1: torch.cuda.Event | HostEvent) -> None:
        """A copy the ring issued (its events on the link's stream)."""
        self.trace.append((lane, name, e0, e1, self.clock.steps))

    def hook_resident(self) -> list:
        """Event hooks on every unit the ring does not stream (inside the compiled forward only); returns
        the handles, for the caller to remove."""
        learn = self.ring.learn
        streamed = set(self.units)
        hooks = []
        for n, m in self.unit_mods.items():
            if n in streamed:
                continue

            def pre(mod, args):
                if learn.depth:
                    self.unit_begin()

            def post(mod, args, out, name=n):
                if learn.depth:
                    self.unit_end(name)
            hooks.append(m.register_forward_pre_hook(opaque(pre)))      # opaque: see compile_boundary
            hooks.append(m.register_forward_hook(opaque(post), always_call=True))
        return hooks

    def detach(self, rt: Runtime) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.trace = []
        self.unit_mods = {}
