"""Which ring position each call of a streamed unit is: the learned call order and its deviations.

Pure logic over lists of unit indices (no torch; tests/test_learn.py drives it alone).  The ring
(runtime/ring.py) asks `call(i)` in the pre-hook of streamed unit i and streams the unit at the
position returned, or loads it on demand (a *fallback*: copy into the next slot, wait, run -- still
ordered by events, just not prefetched) when -1 comes back.  The compiled module's forward brackets
the calls with `begin()` / `end()`; `depth` counts how deep inside that forward the calls are.

State
    seq, n     the period: streamed unit indices in call order, n = len(seq); at first every streamed
               unit once, in plan order; afterwards what the calls showed
    g          calls streamed since the ring was primed: call g is seq[g % n] (the ring derives its
               item and slot from g); g0: g when the current forward (or free-run period) began
    primed     the ring holds the copies for position g onwards; `prime()` restarts at g = 0 and has
               the ring `fill` its slots (a callback, so this module needs no ring)
    deviations calls that were not the expected next one

Rules
  * Inside the forward (depth 1) a call streams while it is the next unit of seq.  The first call that
    is not (a unit skipped, called twice, called out of order) marks the forward `deviated`: it and the
    rest of that forward are fallbacks; at `end()` the order actually seen (`recorded`) becomes seq and
    the ring is primed again at the next forward.  Nested forwards (depth > 1) are fallbacks and mark
    the outer forward deviated (their loads reuse the slots its prefetched items sit in).
  * Outside any forward (depth 0: a wrapper calling inner modules itself, as ComfyUI's CLIP encode and
    VAE decode do) calls are fallbacks while they are recorded in `free_rec`; when the first recorded
    unit comes again, the calls since are the period: it becomes seq, the ring is primed and the calls
    stream ("free run") until the order changes (learned again from that call) or the module's own
    forward runs (its order, primed afresh).
"""
from __future__ import annotations

from typing import Callable

__all__ = ["Learner", "FALLBACK"]

FALLBACK = -1


def _nothing() -> None:
    return None


class Learner:
    def __init__(self, n_units: int, fill: Callable[[], None] | None = None) -> None:
        self.seq: list[int] = list(range(n_units))
        self.n = n_units
        self.g = 0
        self.g0 = 0
        self.depth = 0
        self.primed = False
        self.deviated = False           # the current forward left seq: the rest of it are fallbacks
        self.ok = True                  # the last forward ran exactly seq
        self.recorded: list[int] = []   # units called in the current forward, in order
        self.free_run = False           # streaming calls made outside the module's forward
        self.free_rec: list[int] = []   # calls outside the forward, while learning their period
        self.deviations = 0
        self.fill = fill or _nothing    # the ring's: copy the first items of seq into the slots

    def prime(self) -> None:
        self.g = 0
        self.g0 = 0
        if self.n:
            self.fill()
        self.primed = True

    def forget(self) -> None:
        """The slots' bytes are stale (homes rewritten): prime again before streaming, and learn a free-run
        period afresh."""
        self.primed = False
        self.free_run = False
        self.free_rec = []

    def begin(self) -> None:
        """The compiled module's forward starts: its order, primed if needed."""
        if self.free_run:
            self.free_run = False
            self.free_rec = []
            self.primed = False
        if self.n and not self.primed:
            self.prime()
        self.g0 = self.g
        self.deviated = False
        self.recorded.clear()

    def end(self) -> bool:
        """The forward returned: True when it ran exactly seq; else the order seen becomes seq."""
        ok = not (self.deviated or self.g - self.g0 != self.n)
        if not ok:
            if self.recorded and self.recorded != self.seq:
                self.seq = list(self.recorded)
                self.n = len(self.seq)
            self.primed = False
        self.ok = ok
        return ok

    def call(self, i: int) -> int:
        """Unit i is called: its position g in the ring's sequence, or FALLBACK."""
        depth = self.depth
        if depth == 0:
            if self.free_run and not self.primed:
                # slots were invalidated (homes rewritten) or the ring was reset: learn the period again
                self.free_run = False
                self.free_rec = []
            if not self.free_run and not self._free_learn(i):
                return self._fallback(i)
            if self.g - self.g0 >= self.n:       # free running: the next period begins
                self.g0 += self.n
        elif depth != 1 or self.deviated:
            # a nested forward's fallbacks reuse slots the outer one's prefetched items sit in: the
            # rest of the outer forward loads on demand too
            self.deviated = True
            return self._fallback(i)
        g = self.g
        n = self.n
        if g - self.g0 < n and self.seq[g % n] == i:
            self.g = g + 1
            if depth:
                self.recorded.append(i)
            return g
        self.primed = False
        self.deviations += 1
        if depth:
            self.deviated = True
        else:                                    # the period changed: learn it again from this call
            self.free_run = False
            self.free_rec = [i]
        return self._fallback(i)

    def _fallback(self, i: int) -> int:
        if self.depth:
            self.recorded.append(i)
        self.primed = False
        return FALLBACK

    def _free_learn(self, i: int) -> bool:
        """A call outside any forward: record it; when the first recorded unit comes again, the calls since
        are the period: adopt it as seq, prime, and stream from this call on (True)."""
        rec = self.free_rec
        if rec and i == rec[0]:
            if rec != self.seq:
                self.seq = list(rec)
                self.n = len(rec)
            self.free_rec = []
            self.prime()
            self.free_run = True
            return True
        rec.append(i)
        if len(rec) > 4 * max(self.n, 1) + 64:     # no period in sight: keep the record bounded
            del rec[:-1]
        return False
