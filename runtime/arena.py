"""Exact-size host arenas for the homes of many units (pinned ones in pieces of about PIECE_BYTES), page-locked
with one registration each.

    arenas, arena_of = host_arenas(layouts, home_of, pin)   # unit -> arena key; pinned up to the cap
    ... fill the arenas ...
    seconds = pin_arenas(arenas)                            # page-lock them once filled (one INFO line)
    arena_of, need, over = arena_split(layouts, home_of, pin)   # the split alone, nothing allocated

runtime/store.py (HomeStore) and runtime/loading.py (files read straight into homes) take their homes'
bytes from these; runtime/home_reuse.py wraps the arenas an undo() kept (HostArena(..., array=)) and
adopts them only when arena_split still splits the units the same way.
"""
from __future__ import annotations

import logging
import time
import warnings
from typing import Iterable

import torch

from ..compiler.inventory import is_host
from ..compiler.ring_layout import align as align_up
from . import pinning as _pinning

__all__ = ["HostArena", "host_arenas", "pin_arenas", "pin_some", "report_pinned", "arena_split", "arena_bytes",
           "warn_past_cap", "PAGEABLE", "PIECE_BYTES"]

log = logging.getLogger("distorch.runtime.arena")


class HostArena:
    """One host buffer holding the homes of many units, pinned with ONE cudaHostRegister call.

    torch's pinned allocator rounds every request up to a power of two (a 680 MB block would take
    1 GiB), so the arena is plain host memory of the exact size (numpy-owned), page-locked in place
    when `pin` is true -- at once, or with `defer=True` only when `pin()` is called after the arena is
    filled (registering touches every page: done first, the whole arena would be resident beside the
    weights it is about to replace).  Registration goes through runtime.pinning (counted against the
    process's cap); it is undone by `unpin()` or when the memory is freed (a finalizer on the numpy
    array, which runs before numpy releases the data), i.e. once no view of it is alive.

    `array`: an existing uint8 numpy buffer to wrap instead (the arena of an earlier load that undo() left
    to its parameters, runtime/home_reuse.py), already full: nothing more can be taken from it.
    """

    def __init__(self, nbytes: int, pin: bool, defer: bool = False, array: "object | None" = None) -> None:
        import numpy as np
        n = arena_bytes(nbytes) if array is None else int(array.size)
        self.array = np.empty(n, dtype=np.uint8) if array is None else array
        self.flat = torch.from_numpy(self.array)
        self.want_pin = bool(pin)
        self.pinned = False
        self.nbytes = n
        self._next = 0 if array is None else n
        self._fin = None
        if pin and not defer:
            why = self.pin()
            if why:
                warnings.warn(f"distorch: cudaHostRegister of {n} bytes failed ({why}); host homes stay "
                              "pageable (copies will be slower and synchronous)", stacklevel=2)

    def pin(self) -> str:
        """Page-lock the arena if it was asked to be; "" when done (or not wanted), else why it failed (the
        arena then stays pageable; never raises)."""
        if not self.want_pin or self.pinned or self.flat is None:
            return ""
        import weakref
        ptr = self.flat.data_ptr()
        ok, why = _pinning.register(ptr, self.nbytes)
        if not ok:
            self.want_pin = False
            return why or "failed"
        self.pinned = True
        self._fin = weakref.finalize(self.array, _pinning.unregister, ptr)
        return ""

    def unpin(self) -> None:
        """Undo the registration now (the memory stays, pageable)."""
        if self._fin is not None:
            self._fin()
            self._fin = None
        self.pinned = False

    def take(self, nbytes: int) -> torch.Tensor:
        off = self._next
        end = off + align_up(max(nbytes, 1))
        if end > self.nbytes:
            raise RuntimeError(f"arena overflow: {end} > {self.nbytes}")
        self._next = end
        return self.flat[off:end]

    def release(self) -> None:
        self.flat = None
        self.array = None


PAGEABLE = "~pageable"      # key suffix of the host arena holding what did not fit under the pinned cap
PIECE = "@"                 # "<dev>@<i>": the i-th further piece of a pinned arena (the first is "<dev>")
PIECE_BYTES = 1 << 30       # pinned homes go into arenas of about this size (whole units), each registered
#                             as soon as its units are filled, while the fill goes on (runtime/store.py):
#                             page-locking 26 GB after the fill took 0.9-2.1 s of a Wan two-expert cold
#                             start on an H200.  Separate arenas are separate storages, so no ring item (one
#                             copy, runtime/ring.pack_items) spans two registrations.


def arena_bytes(nbytes: int) -> int:
    """The size of the arena made for `nbytes` of homes (whole pages, at least one)."""
    return max(align_up(nbytes, 4096), 4096)


def arena_split(layouts: dict, home_of: dict, pin: bool) -> tuple[dict, dict, int]:
    """How host_arenas splits `layouts` (unit -> Layout) under the pinned budget as it stands now ->
    (unit -> arena key, arena key -> bytes of homes, bytes past the cap); nothing is allocated."""
    arena_of: dict[str, str] = {}
    need: dict[str, int] = {}
    piece: dict[str, int] = {}          # host device -> index of its pinned piece being filled
    left = _pinning.budget() if pin else 0
    over = 0
    for n, lay in layouts.items():
        hd = home_of[n]
        if not is_host(hd):
            continue
        b = align_up(max(lay.nbytes, 1))
        if pin and b <= left:
            left -= b
            i = piece.setdefault(hd, 0)
            key = hd if i == 0 else f"{hd}{PIECE}{i}"
            if need.get(key, 0) and need[key] + b > PIECE_BYTES:     # whole units per piece
                i = piece[hd] = i + 1
                key = f"{hd}{PIECE}{i}"
        else:
            key = hd + PAGEABLE if pin else hd
            over += b if pin else 0
        arena_of[n] = key
        need[key] = need.get(key, 0) + b
    return arena_of, need, over


def warn_past_cap(need: dict, over: int, what: str = "host homes") -> None:
    """The one warning for homes past the pinned-memory cap (`over` bytes of the `need` of arena_split)."""
    if over:
        tot = sum(need.values())
        log.warning("distorch: %.2f of %.2f GiB of %s exceed the pinned-memory cap (%.2f GiB, %.2f GiB already "
                    "pinned; set %s to change it) and stay in pageable memory: copies from them run at the "
                    "slower pageable rate", over / 2**30, tot / 2**30, what, _pinning.max_pinned_bytes() / 2**30,
                    _pinning.pinned_bytes() / 2**30, _pinning.ENV)


def host_arenas(layouts: dict, home_of: dict, pin: bool, what: str = "host homes") -> tuple[dict, dict]:
    """Arenas for the host homes of `layouts` (unit -> Layout, in the order units are pinned: execution
    order, as compiler.cost.simulate assumes) -> (arenas, unit -> arena key).  With `pin`, units fill the
    pinned budget (runtime.pinning.budget()) in order; the ones past it get a pageable arena ("<dev>~pageable")
    and ONE warning.  Pinned arenas are created deferred: call pin_arenas() once they are filled."""
    arena_of, need, over = arena_split(layouts, home_of, pin)
    warn_past_cap(need, over, what)
    arenas = {k: HostArena(v, pin=pin and not k.endswith(PAGEABLE), defer=True) for k, v in sorted(need.items())}
    return arenas, arena_of


def pin_arenas(arenas: dict, what: str = "host homes") -> float:
    """Page-lock the arenas created to be pinned; a failure leaves them pageable with one warning.  Returns
    the seconds it took; one INFO line with the rate when anything was pinned (registering touches every
    page: on a cold start this is a visible share of the load time)."""
    t0 = time.perf_counter()
    done, failed = pin_some(arenas.items())
    dt = time.perf_counter() - t0
    report_pinned(done, failed, dt, what)
    return dt


def pin_some(items: Iterable[tuple[str, HostArena]]) -> tuple[int, list]:
    """pin() each (key, arena) of `items` -> (bytes newly page-locked, ["key GiB: why" of the failures])."""
    failed = []
    done = 0
    for k, a in items:
        was = a.pinned
        why = a.pin()
        if why:
            failed.append(f"{k} {a.nbytes / 2**30:.2f} GiB: {why}")
        elif a.pinned and not was:
            done += a.nbytes
    return done, failed


def report_pinned(done: int, failed: list, seconds: float, what: str = "host homes", note: str = "") -> None:
    """The INFO line on what was page-locked (and how fast), the warning on what could not be."""
    if done:
        log.info("distorch: page-locked %.2f GiB of %s in %.2f s (%.1f GB/s)%s", done / 2**30, what, seconds,
                 done / 1e9 / max(seconds, 1e-9), note)
    if failed:
        log.warning("distorch: pinning %s failed (%s); they stay in pageable memory (slower, synchronous "
                    "copies)", what, "; ".join(failed))
