"""A measured step set against the unprofiled steps that follow it (runtime/autotune.py's one use; why the
profiled step needs it: runtime/measured.py `calibrated`).

    cal = Calibration()
    cal.arm(signature, measured, clock.steps, ring.W, result)   # after a measured step
    got = cal.check(clock, signature, ring.W, run, measuring)   # before each later outermost forward
    if got: autotune.predict(*got)                              # (calibrated measurement, its result)

Once CALIB_STEPS unprofiled forwards of the measured input have run in a row at the same slot count and
completed (StepClock.completed: no synchronize, callable in a forward), their median GPU step may scale the
measured compute down (`calibrated`), and their median gap replaces the one gap before the profiled step
(which follows the warm-up and ran 2-3x the typical one on an H200).  Another input, slot count or
measurement in between drops the pending one: no clean reference.  One check per measurement.
"""
from __future__ import annotations

import logging
import statistics
from typing import TYPE_CHECKING

from .measured import calibrated

if TYPE_CHECKING:
    from .profile import StepClock

__all__ = ["Calibration", "CALIB_STEPS", "GAP_TOL"]

log = logging.getLogger("distorch.runtime.autotune")

CALIB_STEPS = 3      # unprofiled forwards of a measured signature that calibrate its unit times
GAP_TOL = 0.01       # ... and the time between forwards, when it moved by this share of the step


class Calibration:
    """The latest measurement, until the unprofiled steps after it calibrate it (module docstring)."""

    def __init__(self) -> None:
        self.pending: dict | None = None

    def arm(self, sig: str | None, m: dict, steps: int, slots: int, result: dict | None) -> None:
        """Measurement `m` of input `sig` ended after `steps` forwards, at `slots` ring slots."""
        self.pending = {"sig": sig, "m": m, "steps": steps, "slots": slots, "result": result}

    def check(self, clock: StepClock, sig: str | None, slots: int, run: int,
              measuring: bool) -> tuple[dict, dict | None] | None:
        """Before an outermost forward of input `sig` (its `run`-th in a row) at `slots` slots: the pending
        measurement to predict again with (calibrated and/or with the typical gap) and its autotune result,
        once its reference steps completed and something changed; else None (waiting, dropped, nothing to
        change)."""
        c = self.pending
        if c is None:
            return None
        if c["sig"] != sig or c["slots"] != slots or measuring:
            self.pending = None
            return None
        n = min(clock.steps - c["steps"], run - 1)       # unprofiled forwards of it in a row since
        if n < CALIB_STEPS:
            return None
        try:
            got = clock.completed(CALIB_STEPS, n)
        except Exception:              # an event never recorded: no reference
            self.pending = None
            return None
        if got is None:
            return None                # still running: the next forward
        self.pending = None
        ts, gaps = got
        m0 = c["m"]
        m = calibrated(m0, statistics.median(ts))
        if m is not None:
            log.info("distorch: measured unit times scaled by %.3f to the unprofiled step (%.1f ms, profiled "
                     "%.1f ms: hooks' host cost)", m["calibration"], m["unprofiled_step_s"] * 1e3,
                     m0["step_s"] * 1e3)
        gap = statistics.median(gaps) if gaps else m0["gap_s"]
        if m is None and abs(gap - m0["gap_s"]) <= GAP_TOL * m0["step_s"]:
            return None
        return dict(m if m is not None else m0, gap_s=gap), c["result"]
