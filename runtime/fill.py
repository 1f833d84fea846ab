"""Filling homes in parallel: the streamed units' bytes copied into their homes by a small thread pool.

    held = move_into_homes(homes, streamed, on_homed, trim_every)   # what runtime.store's HomeStore runs
    fill_units(items, on_done, n_threads=None)                       # the parallel copy under it

`items` is [(unit name, [(dst, src), ...])] in the order units are homed.  Every (dst, src) pair is cut
into pieces of at most CHUNK bytes (flat views of contiguous tensors) and the pieces run on THREADS worker
threads (torch's copies release the GIL, so the threads copy at once: page faults on the fresh home pages
and the memory bandwidth are shared, not serialised behind one core).  Pieces are submitted in order while
the bytes of units not yet handed to `on_done` stay under `in_flight_cap` (about WINDOW_FRACTION of all the
bytes, at least one piece and at most four per thread; the unit being waited for always goes in whole), and
within WINDOW units;
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

CHUNK = 16 << 20          # bytes per piece: small enough that every thread has one
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


def pieces(dst: torch.Tensor, src: torch.Tensor, chunk: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(dst, src) cut into flat pieces of at most `chunk` (default CHUNK) bytes when both are contiguous of
    one shape."""
    chunk = CHUNK if chunk is None else chunk
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
    cap = in_flight_cap(sum(sizes), n)
    # a unit's pieces are cut when its first one is submitted and dropped once it is done: they are views of
    # the old storages, which must die when on_done rebinds the unit (else RAM would hold two copies)
    work: list = [None] * len(items)
    infer = torch.is_inference_mode_enabled()     # thread-local: the workers copy in the caller's mode

    def job(d, s):
        with torch.inference_mode(infer):
            copy_piece(d, s)
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="distorch-fill") as ex:
        futs: list[list] = [[] for _ in items]
        nu = nk = 0             # next piece to submit: work[nu][nk]
        inflight = 0            # bytes submitted for units not handed to on_done yet

        def submit(first: int) -> None:
            """Pieces in order while under the cap and the unit window; all of unit `first` regardless (the
            caller waits for it next: never less than one unit at a time)."""
            nonlocal nu, nk, inflight
            while nu < len(items) and nu < first + window:
                if work[nu] is None:
                    work[nu] = [pc for dd, ss in items[nu][1] for pc in pieces(dd, ss)]
                if nk == len(work[nu]):
                    nu, nk = nu + 1, 0
                    continue
                d, s = work[nu][nk]
                b = d.numel() * d.element_size()
                if nu > first and inflight + b > cap:
                    return
                futs[nu].append(ex.submit(job, d, s))
                inflight += b
                nk += 1
        submit(0)
        for i, (name, _) in enumerate(items):
            submit(i)
            wait(futs[i], return_when=FIRST_EXCEPTION)
            err = next((f.exception() for f in futs[i] if f.done() and f.exception() is not None), None)
            if err is not None:
                for fs in futs:
                    for f in fs:
                        f.cancel()
                wait([f for fs in futs for f in fs])
                raise DisTorchError(f"copying unit {name!r} into its home failed ({type(err).__name__}: {err}); "
                                    f"{i} unit(s) were homed, this one and later ones are unchanged") from err
            futs[i] = []
            inflight -= sizes[i]            # its pieces cover exactly its pairs' bytes
            work[i] = None
            on_done(i)
            submit(i + 1)


def in_flight_cap(total: int, n_threads: int) -> int:
    """Bytes of home pages written ahead of the units handed to on_done (a transient second copy): about
    WINDOW_FRACTION of everything (+ WINDOW_SLACK), but at least one piece per thread and at most four, so
    that every thread has a piece to copy whatever the unit sizes (units were once the grain: one 256 MB
    unit in flight kept 4 of 16 threads busy and an H200 host's homes filled at 8.8 GB/s, against 17-21 GB/s
    for the same copy into fresh memory)."""
    return max(n_threads * CHUNK, min(int(WINDOW_FRACTION * total) + WINDOW_SLACK, 4 * n_threads * CHUNK))


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
