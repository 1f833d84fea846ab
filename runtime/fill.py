"""Filling homes in parallel: the streamed units' bytes copied into their homes by a small thread pool.

    held = move_into_homes(homes, streamed, on_homed, trim_every)   # what runtime.store's HomeStore runs
    fill_units(items, on_done, n_threads=None)                       # the parallel copy under it

`items` is [(unit name, [(dst, src), ...])] in the order units are homed.  Every (dst, src) pair is cut
into pieces of at most CHUNK bytes (flat views of contiguous tensors) and the pieces run on THREADS worker
threads (torch's copies release the GIL, so the threads copy at once: page faults on the fresh home pages
and the memory bandwidth are shared, not serialised behind one core).  At most WINDOW units, and at most
about WINDOW_FRACTION of all the bytes (at least one unit, at most 2 x THREADS x CHUNK), are in flight;
`on_done(i)` runs on the calling thread, in unit order, as soon as every piece of unit i has landed -- it
rebinds the unit's parameters to their homes, which frees the old storages, so host RAM holds one copy
plus the window.

A failing copy leaves nothing half-applied: the pieces not started are cancelled, running ones are waited
for, no unit after the last completed one is handed to `on_done`, and the error is raised as a
DisTorchError naming the unit (its parameters still hold their old storages and bytes).

$DISTORCH_FILL_THREADS sets the pool size (default min(8, CPUs); 1 = the serial loop); comfy_nodes/stream_patches.py
sizes its file checks and restores of LoRA'd weights by the same `threads()`.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor, wait, FIRST_EXCEPTION
from typing import Callable

import torch

from ..errors import DisTorchError
from . import gguf_stream as _gs
from . import pinning as _pinning

CHUNK = 64 << 20
ENV = "DISTORCH_FILL_THREADS"
WINDOW_FRACTION = 0.04     # of the bytes being homed: the most in flight at once (a transient second copy)
WINDOW_SLACK = 32 << 20


def threads() -> int:
    raw = os.environ.get(ENV, "").strip()
    if raw.isdigit() and int(raw) > 0:
        return int(raw)
    return max(1, min(8, os.cpu_count() or 1))


def copy_piece(dst: torch.Tensor, src: torch.Tensor) -> None:
    """One copy (a module attribute: tests put a failing one in)."""
    with torch.no_grad():
        dst.copy_(src)


def pieces(dst: torch.Tensor, src: torch.Tensor, chunk: int = CHUNK) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dst, src) cut into flat pieces of at most `chunk` bytes when both are contiguous of one shape."""
    nb = dst.numel() * dst.element_size()
    if nb <= chunk or not (dst.is_contiguous() and src.is_contiguous()) or dst.shape != src.shape \
            or dst.dtype != src.dtype or type(src) is not torch.Tensor and not isinstance(src, torch.nn.Parameter):
        return [(dst, src)]
    d, s = dst.reshape(-1), src.detach().reshape(-1)
    per = max(1, chunk // dst.element_size())
    return [(d[i:i + per], s[i:i + per]) for i in range(0, d.numel(), per)]


def fill_units(items: list[tuple[str, list]], on_done: Callable[[int], None], *, n_threads: int | None = None,
               window: int | None = None) -> None:
    """Copy every unit's (dst, src) pairs, calling on_done(i) in order as unit i completes (module docstring)."""
    n = threads() if n_threads is None else max(1, int(n_threads))
    if n == 1:
        for i, (name, pairs) in enumerate(items):
            try:
                for d, s in pairs:
                    copy_piece(d, s)
            except Exception as e:
                raise DisTorchError(f"copying unit {name!r} into its home failed ({type(e).__name__}: {e}); "
                                    f"{i} unit(s) were homed, this one and later ones are unchanged") from e
            on_done(i)
        return
    window = window or 4 * n
    sizes = [sum(d.numel() * d.element_size() for d, _ in pairs) for _, pairs in items]
    # bytes in flight = new home pages written while the old storages still live: a second copy of that
    # much, so at most WINDOW_FRACTION of the whole (+ WINDOW_SLACK), never less than one unit at a time
    cap = max(CHUNK, min(2 * n * CHUNK, int(WINDOW_FRACTION * sum(sizes)) + WINDOW_SLACK))
    infer = torch.is_inference_mode_enabled()     # thread-local: the workers copy in the caller's mode

    def job(d, s):
        with torch.inference_mode(infer):
            copy_piece(d, s)
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="distorch-fill") as ex:
        futs: dict[int, list] = {}
        nxt = 0
        inflight = [0]

        def submit_upto(limit):
            nonlocal nxt
            while nxt < len(items) and nxt < limit and (not futs or inflight[0] + sizes[nxt] <= cap):
                futs[nxt] = [ex.submit(job, d, s) for dd, ss in items[nxt][1] for d, s in pieces(dd, ss)]
                inflight[0] += sizes[nxt]
                nxt += 1
        submit_upto(window)
        for i, (name, _) in enumerate(items):
            done, _ = wait(futs[i], return_when=FIRST_EXCEPTION)
            err = next((f.exception() for f in futs[i] if f.done() and f.exception() is not None), None)
            if err is not None:
                for fs in futs.values():
                    for f in fs:
                        f.cancel()
                wait([f for fs in futs.values() for f in fs])
                raise DisTorchError(f"copying unit {name!r} into its home failed ({type(err).__name__}: {err}); "
                                    f"{i} unit(s) were homed, this one and later ones are unchanged") from err
            del futs[i]
            inflight[0] -= sizes[i]
            on_done(i)
            submit_upto(i + 1 + window)


def move_into_homes(homes: list, streamed: dict, on_homed: Callable, trim_every: int,
                    coded: dict | None = None) -> dict:
    """Copy the parameters of each Home's unit (`streamed[home.unit]`: [(name, param)]) into it in parallel,
    then, unit by unit in order, rebind them to their home (the old storages are released) and call
    on_homed(home).  Heap memory freed on the way is given back every `trim_every` bytes.  Returns the host
    storages the parameters had ({ptr: (weakref, nbytes)}): one still alive afterwards is a second copy.
    `coded`: id(param) -> formats.bf16_codec.Encoded of the compressed parameters (runtime/codec_stream.py):
    their packed bytes are copied instead, the parameter is not rebound, and the entry is dropped from
    `coded` then points at the home's bytes (its temporary bytes are freed; a failure later still decodes
    it back from there)."""
    coded = {} if coded is None else coded
    from torch.multiprocessing.reductions import StorageWeakRef
    held: dict = {}
    items = []
    for h in homes:
        pairs = []
        for (_, p), v in zip(streamed[h.unit], h.views()):
            enc = coded.get(id(p))
            old = enc.buf if enc is not None else p.raw if _gs.is_gguf(p) else p.data
            if old.device.type == "cpu" and old.untyped_storage().nbytes():
                st = old.untyped_storage()
                held.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
            pairs.append((v, old))
        items.append((h.unit, pairs))
    freed = [0]

    def done(i):
        h = homes[i]
        with torch.no_grad():
            for (_, p), (v, _) in zip(streamed[h.unit], items[i][1]):
                if id(p) in coded:      # compressed: the home holds its packed bytes; the temporary goes
                    coded[id(p)] = dataclasses.replace(coded[id(p)], buf=v)     # (restorable from the home)
                elif _gs.is_gguf(p):    # quantized: the home holds the stored blocks
                    _gs.set_raw(p, v)
                else:
                    p.data = v          # the original storage is released here (unless held elsewhere)
        items[i] = (h.unit, ())
        on_homed(h)
        freed[0] += h.nbytes
        if freed[0] >= trim_every:      # freed weights under glibc's mmap threshold stay in the heap until trimmed
            _pinning.trim_heap()
            freed[0] = 0
    fill_units(items, done)
    return held
