"""Window autotune and the measured prediction, per input signature: measure a step, re-predict it, size the ring.

Default on CUDA when the plan's unit times are estimates (plan.predicted["basis"] != "measured").  A step
runs profiled (runtime/profile.py: events around every streamed unit, around every stretch of units the
ring does not stream through temporary hooks on its ends, and around every copy); from those measured
unit times and link rates `compiler.cost.best_window` (the policy: compiler.cost.simulate over the plan
for every slot count) picks the slot count, and the ring
is resized between steps (runtime/ring.py `resize`, grown or shrunk) to the fewest slots within 1 % of
the best, never fewer than the plan's own count (`floor`).  The slots come only from the plan's window
limit (plan.predicted["window_max_bytes"]: the plan's budget -- offload_gb / max_vram_gb,
passes/partition.py -- less everything it holds but the slots, so a resized ring stays inside the same
budget) and the device's free memory (torch's cached blocks counted free) less TUNE_RESERVE_BYTES.  The
measured GPU time between steps (the sampler's own work, a preview's synchronize) is added to every
prediction but does not change the choice: the host issues no copy while it is away.  An irregular step
(the call order changed) is measured again, at most MAX_TRIES times.  `result` records what was measured
and chosen.

Per input signature.  One compiled model is sampled at several sizes (1024x1024, then 512x512; a video
model's frame count), and unit times scale with the activations.  A forward pre-hook on the module
(installed while tuning or measuring) keys every outermost forward by its tensor arguments' shapes and
dtypes (runtime/signatures.py).  A signature not seen yet is measured like the first one: its first
forward is its warm-up, a later one (the next forward of that signature that follows a forward without
any tuning action) is profiled; then it is re-predicted and, when tuning, the ring is resized for it.
Each signature's result (slot count, the measured prediction) is kept, least recently used first, at
most MAX_SIGNATURES of them, and copied into plan.predicted["by_signature"] (JSON-able; a later compile
with the same plan re-applies it without measuring, and keeps following signatures).  Switching back to a
known signature re-applies its prediction at once and its slot count without measuring: at once after a
run of two or more forwards of one signature, else (signatures alternating every forward, e.g. cond and
uncond of different shapes) only once the new one runs twice in a row, so the ring never resizes per
forward.  At most MAX_MEASURES signatures are measured per compile.  plan.predicted always holds the
prediction of the latest forward's signature (["signature"] names it), so the log after a sampling run
compares the measured step with the prediction for the input that ran.

The profiler's own cost.  A profiled step does host work per unit (making and recording events, the
resident units' temporary hooks, the copies' events); where the step is host-bound (many small units:
single Linear layers streamed one by one) the stream waits for that work, and a prediction from the
profiled step came out 4-20 % above the unprofiled step.  Of the two ways to take it out -- compare the
profiled step with an unprofiled one of the same signature, or time the profiler's host work and tell
how much of it the stream waited for -- the second is used: the first warm-up (cold slots, first
launches, a torch.compile recompiling for a new shape) is no fair reference, and waiting for a later
unprofiled step would delay the resize by a step.  runtime/profile.py times the profiler's host work per
unit and per copy, and `Profiler.own_cost` counts it where the event it preceded ran right when the host
recorded it (the stream had nothing queued: it waited for the host); runtime/measured.py
`without_profiler_cost` takes that out before predicting: the part before the step's first unit from the
root's time (never below 0), the part inside or just before a unit's span from that unit's time, the part
inside copies' spans from the links' busy time (their rates rise).  Corrections under OVERHEAD_MIN of
the step are left (measurement noise).  Not counted: torch's slower call path of a module while it
carries profiling hooks (outside any hook's own timing); only the two ends of each stretch of resident
units carry them (runtime/profile.py), not every resident unit.

Calibration (runtime/calibrate.py).  The unprofiled forwards after a measurement may scale its compute
down and give the typical gap between forwards; the step is then predicted again (plan.predicted, the
signature's entry, the time book: ["unprofiled_step_s"], ["calibration"], ["gap_s"]).  The slot count
chosen from the profiled step stays.

The measured prediction.  Whatever the slot count became, the step is simulated again
(runtime/measured.py `measured_prediction`: compiler.cost.simulate over copies of the plan's units whose
time_s are the measured ones -- a unit's span and the un-hooked work just before it, runtime/stats.py
`lead_gaps`, so the work between the Linear layers of a sub-unit plan stays where it ran -- the root unit
taking the step's time before the first unit and after the last, outside
stalls, at the measured link rates, with the ring's slots) and replaces the estimate: plan.predicted
["step_s"] / ["compute_s"] / ... with ["basis"] = "measured", the estimate kept as ["estimated_step_s"]
(and ["estimated_compute_s"], ["estimated_basis"]), the gap before the step as ["gap_s"] (not in step_s:
measured_step_s is root pre to post hook too), the profiled step and what came off it as
["profiled_step_s"] and ["profiler_cost_s"].  Without tuning (autotune off: CPU compute, autotune=False)
steps are measured for the prediction alone when the module is compiled with profile=True, or once
`measure_next()` asks for it (the ComfyUI nodes do on CPU compute); the ring is left as it is.
"""
from __future__ import annotations

import logging
import math

import torch

from ..compiler.cost import best_window
from ..compiler.ring_layout import MAX_SLOTS
from . import stats as _stats
from . import timebook as _timebook
from .compile_boundary import opaque
from .hooks import UnitPart
from .calibrate import Calibration
from .measured import measured_prediction, without_profiler_cost
from .signatures import MAX_SIGNATURES, Tunings, signature, text
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .apply import Runtime

__all__ = ["Autotune", "TUNE_RESERVE_BYTES", "measured_prediction"]

log = logging.getLogger("distorch.runtime.autotune")

TUNE_RESERVE_BYTES = 2 << 30     # autotune leaves this much of the device free (activations)
MAX_TRIES = 3
MAX_MEASURES = 16                # signatures measured per compile, at most
OVERHEAD_MIN = 0.002             # profiler cost corrections below this share of the step are left
OFF, WAIT, MEASURE = 0, 1, 2     # states: done (or off); waiting for a warm step; measuring a step
_FIELDS = ("step_s", "compute_s", "stall_s", "overhead_s", "floor_s", "per_link_s")
_OPTIONAL = ("profiled_step_s", "profiler_cost_s", "unprofiled_step_s", "calibration")   # only some have them


class Autotune(UnitPart):
    """on: measure a step per input signature, re-predict it and size the ring (tune); off: nothing,
    unless the module is profiled or `measure_next()` is called (measure and re-predict only)."""

    def __init__(self, on: bool, measure: bool = False) -> None:
        self.tune = bool(on)
        self.state = WAIT if on else OFF
        self.measure_first = bool(measure) and not on   # nothing to tune: measure for the prediction alone
        self.tries = 0
        self.hooks: list = []          # temporary profiling hooks on resident units while measuring
        self.result: dict | None = None
        self.measured: dict | None = None   # the measured step the prediction came from (stats.measured_step)
        self._was_profiling = False
        self.rt = None
        self.known = Tunings(MAX_SIGNATURES)   # signature text -> what its measurement gave
        self.sig: str | None = None    # signature of the latest outermost forward (None: not watched)
        self.wait_sig: str | None = None    # the signature a WAIT is for
        self.measures = 0              # signatures measured
        self.floor = 1                 # fewest slots tuning picks: the plan's own count
        self.watch = None              # the signature hook's handle
        self._key = None
        self._texts: dict = {}
        self._run = 0                  # consecutive forwards of this signature, this one included
        self._seen: set = set()        # signatures that ran before (warm)
        self._skipped: set = set()     # signatures whose measurement gave nothing (irregular steps)
        self._pending: int | None = None    # a known signature's slot count, applied at its second forward
        self._acted = False            # the ring or the profiler changed after the latest forward
        self._calm = True              # neither changed right before this forward: it may be measured
        self.calib = Calibration()     # the latest measurement, until unprofiled steps calibrate it

    @property
    def enabled(self) -> bool:
        return self.state != OFF

    def attach(self, rt: Runtime) -> None:
        self.rt = rt
        pr = rt.plan.predicted or {}
        self.floor = max(1, rt.ring.W)
        self.known.load(pr.get("by_signature"))
        if len(self.known) and rt.units:     # a plan measured per signature: keep following signatures
            # its window is the latest signature's count; the plan's own count is the floor
            self.floor = max(1, min(rt.ring.W, int(pr.get("slots") or rt.ring.W)))
            if not self.tune:
                self.tune = rt.be.cuda and any(e.get("tuned") for e in self.known.entries.values())
        if self.tune or (len(self.known) and rt.units):
            self._watch()
        if self.state == OFF and (rt.profile or self.measure_first):
            self.measure_next()        # profiled anyway, or nothing streams: the prediction from the first
            #                            measured step (a resident plan's step is its measured compute)

    def measure_next(self) -> bool:
        """Measure the step after the warm-up (or the next one) for the prediction alone (the slot count
        stays), when the plan's unit times are estimates and nothing is being measured, and from then on
        every input signature not seen yet; True when armed."""
        rt = self.rt
        if rt is None or self.state != OFF or not (rt.units or self.measure_first) or not rt.active or \
                (rt.plan.predicted or {}).get("basis") == "measured":
            return False
        self._watch()
        self._arm(None)
        return True

    # ------------------------------------------------------------------ signatures
    def _watch(self) -> None:
        """The signature hook on the module, before the runtime's own (once; undo() removes it)."""
        rt = self.rt
        m = rt._module_ref()
        if self.watch is not None or m is None or rt.hooks is None:
            return
        self.watch = m.register_forward_pre_hook(opaque(self._forward), prepend=True, with_kwargs=True)
        rt.hooks.append(self.watch)    # removed by undo(), left out of deepcopies (runtime/guard.py)

    def _forward(self, mod: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        rt = self.rt
        if rt is None or rt.learn.depth or rt.chains.stopped:
            return None                # a nested forward, or an undo() under way
        key = signature(args, kwargs)
        calm = not self._acted
        self._acted = False
        if key == self._key:
            self._run += 1
            if self._pending is not None and self._run >= 2:
                k, self._pending = self._fit(self._pending), None
                if k != rt.ring.W:
                    self._resize(k)
                    calm = False
        else:
            calm = not self._switch(key) and calm
            self._run = 1
        self._calm = calm
        got = self.calib.check(rt.clock, self.sig, rt.ring.W, self._run, self.state == MEASURE)
        if got is not None:
            self.predict(*got)
        return None

    def _switch(self, key: tuple) -> bool:
        """The forward's signature differs from the previous one's: apply what is known of it, or arm its
        measurement.  True when the ring or the profiler changed."""
        sig = self._texts.get(key)
        if sig is None:
            if len(self._texts) > 64:
                self._texts.clear()
            sig = self._texts[key] = text(key)
        if self.sig is not None:
            if len(self._seen) > 256:
                self._seen.clear()
            self._seen.add(self.sig)
        steady = self._run >= 2 or self.sig is None      # the previous signature ran twice in a row
        self._key, self.sig, self._pending = key, sig, None
        acted = False
        if self.state == MEASURE:      # another signature before its measurement finished: measured later
            self._stop()
            acted = True
        entry = self.known.get(sig)
        if entry is not None:
            return self._apply(sig, entry, resize=steady) or acted
        if self.state == WAIT:
            self.wait_sig = sig
        elif self.measures < MAX_MEASURES and sig not in self._skipped:
            self._arm(sig)
            acted = True
        return acted

    def _arm(self, sig: str | None) -> None:
        self.state = WAIT
        self.wait_sig = sig
        self.tries = 0
        self.rt.compose()              # begin / end join the chains (between steps)

    def _apply(self, sig: str, entry: dict, resize: bool) -> bool:
        """A known signature: its prediction now, its slot count now (`resize`) or at its second forward in
        a row.  True when the ring was resized."""
        rt = self.rt
        k = int(entry["slots"])
        acted = False
        if self.tune and entry.get("tuned") and k != rt.ring.W:
            if resize:
                k = self._fit(k)
                if k != rt.ring.W:
                    self._resize(k)
                    acted = True
            else:
                self._pending = k
        m = entry.get("_m")
        fields = entry["predicted"]
        if m is not None and self._pending is None and fields.get("measured_slots") != rt.ring.W:
            fields = entry["predicted"] = self._fields(m)   # the budget allowed another count this time
        new = {k: v for k, v in (rt.plan.predicted or {}).items() if k not in _OPTIONAL}
        new.update(fields)
        new["signature"] = sig
        rt.plan.predicted = new
        self.result = entry.get("_result")
        self.measured = m
        return acted

    def _fit(self, k: int) -> int:
        """Slot count k, a growth held to what the budget and free memory allow now."""
        ring = self.rt.ring
        return min(k, max(ring.W, self._limit()[1])) if k > ring.W else k

    # ------------------------------------------------------------------ measuring
    def begin(self) -> None:
        if self.state == WAIT and self.rt.clock.steps >= 1 and self._calm and self.sig == self.wait_sig and \
                (self.sig is None or self._run >= 2 or self.sig in self._seen):
            self.start()

    def end(self) -> None:
        if self.state == MEASURE:
            self.finish(self.rt.learn.ok)

    def start(self) -> None:
        """Profile the next step: events around every unit (temporary hooks on resident units) and copy."""
        rt = self.rt
        self.state = MEASURE
        if self.tries == 0:
            self.measures += 1
        self._was_profiling = rt.profile
        rt.profile = True
        if not self._was_profiling:        # resident units have profiling hooks only with profile=True
            rt.profiler.clear()
            self.hooks = rt.profiler.hook_resident()

    def finish(self, ok: bool) -> None:
        """The measured step ended (`ok`: in the expected order): choose the window from it (when tuning)
        and re-predict the step from it."""
        rt = self.rt
        self.tries += 1
        if not ok and self.tries < MAX_TRIES:
            if not self._was_profiling:
                rt.profiler.clear()
            return                     # an irregular step: measure the next one
        m = None
        try:
            if ok:
                m = _stats.measured_step(rt)
                if m is not None:
                    m = self.without_profiler_cost(m)
        finally:
            self._stop()
            self._acted = True
        if m is None:
            if self.sig is not None:
                self._skipped.add(self.sig)
            return
        res = None
        if self.tune:
            res = self.choose(m["times"], m["rates"], m["step_s"], m["gap_s"], stall_s=m["stall_s"],
                              floor=self.floor)
        self.predict(m, res)
        if not rt.profile:             # every later step unprofiled: they calibrate this one
            self.calib.arm(self.sig, m, rt.clock.steps, rt.ring.W, res)

    def without_profiler_cost(self, m: dict) -> dict:
        """Measured step `m` less the profiler's own host work the stream waited for (runtime/measured.py
        `without_profiler_cost`, from Profiler.own_cost)."""
        rt = self.rt
        out = without_profiler_cost(m, rt.profiler.own_cost(), _stats.bytes_per_link(rt), OVERHEAD_MIN)
        if out is not m:
            log.debug("distorch: the profiler's own cost taken out of the measured step: %.2f ms",
                      out["profiler_cost_s"] * 1e3)
        return out

    def _fields(self, m: dict) -> dict:
        """The plan.predicted fields of the measured prediction from step `m` at the ring's slot count."""
        rt = self.rt
        sim = measured_prediction(rt.plan, m["times"], m["rates"], m["step_s"], stall_s=m["stall_s"],
                                  window_bytes=rt.ring.W * rt.unit_bytes)
        f = {k: sim[k] for k in _FIELDS}
        f.update(basis="measured", measured_step_s=m["step_s"], gap_s=m["gap_s"], measured_slots=rt.ring.W,
                 measured_link_rates={k: v for k, v in m["rates"].items() if math.isfinite(v)},
                 measured_unit_times=dict(m["times"]))    # s per call of each unit that ran: a re-plan's input
        f.update({k: m[k] for k in _OPTIONAL if k in m})
        return f

    def predict(self, m: dict, result: dict | None = None) -> dict:
        """plan.predicted from measured step `m` (runtime.stats.measured_step) at the ring's slot count,
        remembered for the current signature (with the autotune `result` that chose the count); the
        estimate is kept under estimated_*.  Returns the new predicted dict."""
        rt = self.rt
        plan = rt.plan
        old = dict(plan.predicted or {})
        fields = self._fields(m)
        new = dict(old)
        if "estimated_step_s" not in old:
            new["estimated_step_s"] = old.get("step_s")
            new["estimated_compute_s"] = old.get("compute_s")
            new["estimated_basis"] = old.get("basis")
        for k in _OPTIONAL:
            new.pop(k, None)
        new.update(fields)
        if self.sig is not None:
            self.known.put(self.sig, {"slots": rt.ring.W, "tuned": result is not None, "predicted": fields,
                                      "_m": m, "_result": result})
            new["signature"] = self.sig
            new["by_signature"] = self.known.plan_view()
        plan.predicted = new           # a new dict: whoever holds the old one keeps the estimate
        self.measured = m
        _timebook.BOOK.record(plan, self.sig, m)     # for the next compile of this model (runtime/timebook.py)
        est = new.get("estimated_step_s")
        log.info("distorch: predicted step from measured unit times %.1f ms (estimated %s, measured %.1f ms, "
                 "%d slots%s)", new["step_s"] * 1e3, f"{est * 1e3:.1f} ms" if est else "-", m["step_s"] * 1e3,
                 rt.ring.W, f", input {self.sig}" if self.sig is not None else "")
        return new

    def _stop(self) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        self.state = OFF
        rt = self.rt
        rt.profile = self._was_profiling           # composes the chains again, without this part
        if not rt.profile:
            rt.profiler.clear()

    # ------------------------------------------------------------------ the slot count
    def _limit(self) -> tuple:
        """(cap bytes or None, the most slots the ring may get): the plan's window limit, free memory less
        TUNE_RESERVE_BYTES (CUDA; the ring's own slots and torch's cached blocks count free), MAX_SLOTS
        and one slot per ring item."""
        rt = self.rt
        ring = rt.ring
        slot = ring.pool.slot_bytes
        cap = (rt.plan.predicted or {}).get("window_max_bytes")
        if rt.be.cuda:
            free = torch.cuda.mem_get_info(rt.device)[0] - TUNE_RESERVE_BYTES
            free += torch.cuda.memory_reserved(rt.device) - torch.cuda.memory_allocated(rt.device)
            cap = min(cap if cap is not None else float("inf"), ring.W * slot + max(0, free))
        return cap, min(MAX_SLOTS, max(ring.ng, 1), int(cap // slot) if cap is not None else MAX_SLOTS)

    def _resize(self, k: int) -> None:
        rt = self.rt
        rt.ring.resize(k)
        if rt.plan.window_bytes is not None:
            rt.plan.window_bytes = k * rt.unit_bytes
        self._acted = True

    def choose(self, times: dict, rates: dict, step_s: float, gap_s: float = 0.0, *, stall_s: float = 0.0,
               floor: int | None = None) -> dict:
        """Measured unit times (name -> s per step), link rates (home -> bytes/s), the step, the gap
        before it and the stall in it -> the slot count (compiler.cost.best_window, never below `floor`,
        default the ring's count); the ring is resized to it.  The root unit gets the step less the units
        and the stall (the stall is what the simulation predicts, not a compute time)."""
        rt = self.rt
        ring = rt.ring
        cap, limit = self._limit()
        before = ring.W
        floor = before if floor is None else max(1, min(int(floor), before))
        k, pred = best_window(rt.plan, times, rates, max(0.0, step_s - stall_s), unit_bytes=rt.unit_bytes,
                              current=floor, limit=limit, gap_s=gap_s)
        res = {"measured_step_s": step_s, "gap_s": gap_s, "stall_s": stall_s, "slots_before": before, "slots": k,
               "cap_bytes": cap, "predicted_by_slots": pred, "link_rates": rates, "signature": self.sig}
        if k != before:
            self._resize(k)
            was = f"{pred[before] * 1e3:.1f}" if before in pred else "-"
            log.info("distorch: ring %s from %d to %d slots from measured unit times (simulated step "
                     "%s -> %.1f ms%s)", "grown" if k > before else "shrunk", before, k, was, pred[k] * 1e3,
                     f", input {self.sig}" if self.sig is not None else "")
        self.result = res
        return res

    def detach(self, rt: Runtime) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        if self.watch is not None:
            self.watch.remove()
            self.watch = None
        self.state = OFF
