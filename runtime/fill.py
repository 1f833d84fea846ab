"""Filling homes in parallel: the streamed units' bytes copied into their homes by a small thread pool.

    held = move_into_homes(homes, streamed, on_homed, trim_every)   # what runtime.store's HomeStore runs
    fill_units(items, on_done, n_threads=None)                       # the parallel copy under it

`items` is [(unit name, [(dst, src), ...])] in the order units are homed.  Every (dst, src) pair is cut
into pieces of at most CHUNK bytes (flat views of contiguous tensors) and the pieces run on THREADS worker
threads (torch's copies release the GIL, so the threads copy at once: page faults on the fresh home pages
and the memory bandwidth are shared, not serialised behind one core).  Pieces are submitted in order while
the bytes in flight -- home pages written for units not yet handed to `on_done`, plus old storages not yet
let go of -- stay under `in_flight_cap` (about WINDOW_FRACTION of all the bytes, at least one piece and at
most four per thread; the unit being waited for always goes in whole), and within WINDOW units.
`on_done(i)` runs on the calling thread, in unit order, as soon as every piece of unit i has landed -- it
rebinds the unit's parameters to their homes and hands back its last references to the old tensors, which
fill_units lets go of on release_threads() threads of their own (heap trims there too), so host RAM holds
one copy plus the window.  Freeing is not free -- the kernel unmaps and returns every page, 10-20 GB/s on
one core of a CPU box -- and done on the calling thread it serialises with the copies: an H200 host's homes
filled at 9-12 GB/s with 8 or 16 threads, against 20-25 GB/s for the same pieces with nothing freed
(bench/bench_fill.py --diagnose measures the two apart).

fill.DROP_EARLY (on; $DISTORCH_FILL_DROP_EARLY=0 turns it off) gives each piece's source pages back (madvise
MADV_DONTNEED, on the copying thread) as soon as the piece landed.  Only for what the caller names droppable
(HomeStore: a plain parameter's `.data` alias) whose storage nothing else holds (sole_owner: a state dict kept
elsewhere, a shared or pinned storage keeps its pages), and only for pieces of at least pinning.DROP_MIN_PAGES
whole pages.  Their bytes then leave the window at once instead of when the whole unit is handed over and its
storages are unmapped: the copies no longer wait for the frees, and the kernel's unmap is left with no pages
to free.  Measured (bench_fill --diagnose, 4 GB, 16 threads, H200 host, 2026-12-02): HomeStore 10.4-10.6 GB/s
pageable and 10.7-11.2 pinned without it, 18.4-19.1 and 14.4-15.0 with it (plain pieces into fresh memory,
nothing freed: 22.7-23.3).  The first drop is read back; a host that ignores the advice turns the option off
(with a warning).  Should the fill fail, the pieces given back are copied back from the home first.

A failing copy leaves nothing half-applied: the pieces not started are cancelled, running ones are waited
for, no unit after the last completed one is handed to `on_done`, and the error is raised as a
DisTorchError naming the unit (its parameters still hold their old storages and bytes).

$DISTORCH_FILL_THREADS sets the pool size (default min(8, CPUs); 1 = the serial loop); comfy_nodes/stream_patches.py
sizes its file checks and restores of LoRA'd weights by the same `threads()`.
"""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor, wait, FIRST_COMPLETED
from typing import Callable

import torch

from ..errors import DisTorchError
from . import gguf_stream as _gs
from . import pinning as _pinning

log = logging.getLogger("distorch.runtime.fill")

CHUNK = 16 << 20          # bytes per piece: small enough that every thread has one
ENV = "DISTORCH_FILL_THREADS"
WINDOW_FRACTION = 0.04     # of the bytes being homed: the most in flight at once (a transient second copy)
WINDOW_SLACK = 32 << 20
RELEASERS: int | None = None    # threads letting go of old storages (None: one per two copying; 0: the caller)
PREFAULT = False           # fault each piece's home pages in with one madvise before its copy (pinning.populate)
ENV_DROP = "DISTORCH_FILL_DROP_EARLY"


def _switch(name: str, default: bool) -> bool:
    """An on/off environment setting: 1/on/true/yes or 0/off/false/no (unset or empty: `default`); anything else
    is `default`, with a warning naming the value and what works."""
    raw = os.environ.get(name, "").strip().lower()
    if raw in ("1", "on", "true", "yes"):
        return True
    if raw in ("0", "off", "false", "no"):
        return False
    if raw:
        log.warning("distorch: $%s=%r is not a switch (1/on/true/yes or 0/off/false/no); taken as %s", name,
                    os.environ.get(name), "on" if default else "off")
    return default


# give each piece's source pages back as soon as it landed (sole_owner sources only); on unless $ENV_DROP is off
DROP_EARLY = _switch(ENV_DROP, True)


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


def fill_units(items: list[tuple[str, list]], on_done: Callable[[int], "list | None"], *, n_threads: int | None = None,
               window: int | None = None, trim_every: int = 0, droppable: set | None = None) -> None:
    """Copy every unit's (dst, src) pairs, calling on_done(i) in order as unit i completes; what on_done
    returns (a list of the unit's old tensors, emptied here) is let go of off the calling thread (module
    docstring).  `droppable`: ids of the sources DROP_EARLY may give back piece by piece (a parameter's
    `.data` alias, whose storage sole_owner then checks); none when not given."""
    n = threads() if n_threads is None else max(1, int(n_threads))
    rel = _Releaser(release_threads(n) if n > 1 else 0, trim_every)
    try:
        if n == 1:
            for i in range(len(items)):
                try:
                    for d, s in items[i][1]:
                        copy_piece(d, s)
                except Exception as e:
                    raise _failed(items[i][0], i, e) from e
                d = s = None        # our last references are on_done's to hand back
                rel.let_go(on_done(i))
        else:
            _fill_parallel(items, on_done, n, window or 4 * n, rel, droppable or set())
    finally:
        rel.close()


def _failed(name: str, i: int, e: BaseException) -> DisTorchError:
    return DisTorchError(f"copying unit {name!r} into its home failed ({type(e).__name__}: {e}); "
                         f"{i} unit(s) were homed, this one and later ones are unchanged")


def _fill_parallel(items: list, on_done: Callable, n: int, window: int, rel: "_Releaser", droppable: set) -> None:
    sizes = [sum(d.numel() * d.element_size() for d, _ in pairs) for _, pairs in items]
    cap = in_flight_cap(sum(sizes), n)
    # a unit's pieces are cut when its first one is submitted and dropped once it is done: they are views of
    # the old storages, which must die when on_done rebinds the unit (else RAM would hold two copies)
    work: list = [None] * len(items)
    infer = torch.is_inference_mode_enabled()     # thread-local: the workers copy in the caller's mode
    prefault, early = PREFAULT, DROP_EARLY
    # DROP_EARLY: per unit, the pieces whose source pages went back already (restored from the home should the
    # fill fail before the unit is handed over) and their bytes; `gone` counts them all, for the window
    dropped: list = [[] for _ in items]
    lock = threading.Lock()
    gone = [0, 0]             # bytes dropped, bytes of those the window has taken off

    def job(d, s, u, drop):
        if prefault:
            _pinning.populate(d.data_ptr(), d.numel() * d.element_size())
        with torch.inference_mode(infer):
            copy_piece(d, s)
        if drop and _DROPS["ok"] is not False and _drop_checked(s):
            with lock:
                dropped[u].append((d, s))
                gone[0] += d.numel() * d.element_size()     # the window counts home bytes
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="distorch-fill") as ex:
        futs: list[list] = [[] for _ in items]
        nu = nk = 0             # next piece to submit: work[nu][nk]
        inflight = 0            # bytes of home pages written ahead plus old storages not let go of yet

        def submit(first: int) -> None:
            """Pieces in order while under the cap and the unit window; all of unit `first` once no old storage
            is waiting to be let go of (the caller waits for it next: never less than one unit at a time)."""
            nonlocal nu, nk, inflight
            inflight -= rel.retire()
            with lock:
                inflight -= gone[0] - gone[1]      # pieces whose sources went back: one copy of them left
                gone[1] = gone[0]
            while nu < len(items) and nu < first + window:
                if work[nu] is None:
                    work[nu] = _cut(items[nu][1], early, droppable)
                if nk == len(work[nu]):
                    nu, nk = nu + 1, 0
                    continue
                (d, s), drop = work[nu][nk]
                b = d.numel() * d.element_size()
                if inflight + b > cap and (nu > first or rel.pending):
                    return
                futs[nu].append(ex.submit(job, d, s, nu, drop))
                inflight += b
                nk += 1
        for i in range(len(items)):
            name = items[i][0]  # (not its pairs: a loop variable holding them would free them here, later)
            while True:         # woken by each piece of unit i and each release: more pieces as room frees up
                submit(i)
                err = next((f.exception() for f in futs[i] if f.done() and f.exception() is not None), None)
                left = [f for f in futs[i] if not f.done()]
                if err is not None or not left and nu > i:
                    break
                wait(left + rel.waiting(), return_when=FIRST_COMPLETED)
            if err is not None:
                for fs in futs:
                    for f in fs:
                        f.cancel()
                wait([f for fs in futs for f in fs])
                _restore_dropped(dropped[i:])
                raise _failed(name, i, err) from err
            futs[i] = []
            work[i] = None
            with lock:
                gone_i = sum(d.numel() * d.element_size() for d, _ in dropped[i])
                dropped[i] = []            # views of the old storages: they must die with on_done's hand-back
            # its pieces covered exactly its pairs' bytes (those whose sources went back are off the window
            # already); the old storages count, less the pages already given back, until they are let go of
            inflight += rel.let_go(on_done(i), gone_i) - (sizes[i] - gone_i)


def _cut(pairs: list, early: bool, droppable: set) -> list:
    """[((dst piece, src piece), whether the source pages may go back once it landed)] of one unit's pairs;
    each source is asked sole_owner before its pieces (views: references of their own) exist."""
    out = []
    for dd, ss in pairs:
        drop = early and id(ss) in droppable and sole_owner(ss)
        # only pieces drop_pages acts on: a smaller one keeps its pages until its tensor is let go of
        out += [(pc, drop and _pinning.droppable_span(pc[1].data_ptr(), pc[1].numel() * pc[1].element_size())
                 is not None) for pc in pieces(dd, ss)]
    return out


def sole_owner(t: torch.Tensor) -> bool:
    """Whether the host storage under `t` -- a parameter's `.data` alias, as HomeStore pairs it: a tensor of
    its own beside the parameter's -- is held by nothing but that parameter and `t`: then no one else can read
    its pages once they are copied, and DROP_EARLY may give them back before the unit is handed over.  Dense,
    pageable, on the host only; a storage shared with anything else (a state dict kept elsewhere, a file
    mapping several weights view, a pinned buffer) keeps its pages until it is let go of as before."""
    if type(t) is not torch.Tensor or t.device.type != "cpu" or _gs.is_gguf(t) or t.is_pinned():
        return False
    try:
        st = t.untyped_storage()
        # the parameter, the pair's tensor and `st` itself
        return torch._C._storage_Use_Count(st._cdata) <= 3
    except (AttributeError, RuntimeError):
        return False


_DROPS = {"ok": None}      # does madvise(MADV_DONTNEED) give pages back here? (None: not seen yet)
_DROP_LOCK = threading.Lock()
_FILE_SPANS: list = []     # file-backed mappings a probe met: [(start, end)], never probed again


def _drop_checked(s: torch.Tensor) -> bool:
    """pinning.drop_pages on the whole pages of `s`; the first time a dropped page of anonymous memory held
    nonzero bytes, they are read again: still there means this host ignores the advice, and DROP_EARLY stays
    off in this process (the window would count pages as gone that are not).  A page of a file mapping (a
    weight still viewing the file its loader mapped) reads back the file's bytes whatever the host does: it
    decides nothing, and its pages are not counted as gone until a probe on anonymous memory has worked.
    True when the pages are taken as gone."""
    ptr, nb = s.data_ptr(), s.numel() * s.element_size()
    if _DROPS["ok"]:
        _pinning.drop_pages(ptr, nb)
        return True
    with _DROP_LOCK:                   # until one drop has been seen to work: one at a time
        if _DROPS["ok"] is False or any(lo <= ptr < hi for lo, hi in _FILE_SPANS):
            return False
        span = _pinning.droppable_span(ptr, nb)
        word = None if span is None else torch.frombuffer((ctypes.c_char * 8).from_address(span[0]),
                                                          dtype=torch.int64)
        before = int(word[0]) if word is not None else 0
        _pinning.drop_pages(ptr, nb)
        if before != 0:
            if int(word[0]) != 0:
                fm = _pinning.file_mapping(span[0])
                if fm is not None:          # a file's bytes, back from the page cache: no verdict
                    _FILE_SPANS.append(fm)
                    return False
            _DROPS["ok"] = int(word[0]) == 0
            if not _DROPS["ok"]:
                log.warning("distorch: this host ignores madvise(MADV_DONTNEED); DISTORCH_FILL_DROP_EARLY is off")
        return _DROPS["ok"] is not False


def _restore_dropped(units: list) -> None:
    """A failed fill: the pieces whose source pages went back get their bytes again from the home (which
    holds them), so the units not handed over keep their old storages with their bytes."""
    with torch.no_grad():
        for pcs in units:
            for d, s in pcs:
                s.copy_(d)
            pcs.clear()


def release_threads(n_threads: int) -> int:
    """Threads that let go of the old storages beside n_threads copying ones (RELEASERS, else one per two: a
    unit's sources count against the window until they are gone, so its next pieces wait for them)."""
    return max(1, n_threads // 2) if RELEASERS is None else max(0, int(RELEASERS))


class _Releaser:
    """Lets go of the old tensors on_done hands back, one job per tensor on `n` threads of its own (inline on
    the calling thread when n is 0), and gives freed heap memory back every `trim_every` bytes (weights under
    glibc's mmap threshold free into the heap, which keeps it until trimmed)."""

    def __init__(self, n: int, trim_every: int) -> None:
        self.pool = ThreadPoolExecutor(n, thread_name_prefix="distorch-release") if n else None
        self.trim_every = trim_every
        self.freed = 0
        self.lock = threading.Lock()
        self.pending: collections.deque = collections.deque()      # (future, bytes), in submission order

    def let_go(self, refs: "list | None", gone: int = 0) -> int:
        """Drop the references in `refs` (the list is emptied: it must hold the last ones we have, so that each
        storage dies in the job, not here) -> the bytes now being let go of off this thread, less `gone` (of
        their pages given back already: DROP_EARLY)."""
        boxes = []
        while refs:
            boxes.append([refs.pop()])
        queued = 0
        for box in boxes:
            nb = _nbytes(box[0])
            cut = min(nb, gone)
            nb, gone = nb - cut, gone - cut
            if self.pool is None:
                self._drop(box, nb)
            else:
                self.pending.append((self.pool.submit(self._drop, box, nb), nb))
                queued += nb
        return queued

    def _drop(self, box: list, nb: int) -> None:
        box.clear()                 # the storage is freed here (torch releases the GIL while it unmaps)
        with self.lock:
            self.freed += nb
            trim = bool(self.trim_every) and self.freed >= self.trim_every
            if trim:
                self.freed = 0
        if trim:
            _pinning.trim_heap()

    def retire(self) -> int:
        """The bytes let go of since the last call (jobs finished, taken in order)."""
        out = 0
        while self.pending and self.pending[0][0].done():
            f, nb = self.pending.popleft()
            f.result()
            out += nb
        return out

    def waiting(self) -> list:
        return [f for f, _ in self.pending if not f.done()]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True)
        self.pending.clear()


def _nbytes(t: object) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


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
    then, unit by unit in order, rebind them to their home and call on_homed(home); the old storages are
    let go of on release threads (fill_units).  Heap memory freed on the way is given back every `trim_every`
    bytes.  Returns the host storages the parameters had ({ptr: (weakref, nbytes)}): one still alive
    afterwards is a second copy.
    `coded`: id(param) -> formats.bf16_codec.Encoded of the compressed parameters (runtime/codec_stream.py):
    their packed bytes are copied instead, the parameter is not rebound, and the entry is dropped from
    `coded` then points at the home's bytes (its temporary bytes are freed; a failure later still decodes
    it back from there)."""
    coded = {} if coded is None else coded
    held: dict = {}
    drop: set = set()
    items = [(h.unit, _pairs(h, streamed[h.unit], coded, held, drop)) for h in homes]

    def done(i):
        h = homes[i]
        with torch.no_grad():
            for (_, p), (v, _) in zip(streamed[h.unit], items[i][1]):
                if id(p) in coded:      # compressed: the home holds its packed bytes; the temporary goes
                    coded[id(p)] = dataclasses.replace(coded[id(p)], buf=v)     # (restorable from the home)
                elif _gs.is_gguf(p):    # quantized: the home holds the stored blocks
                    _gs.set_raw(p, v)
                else:
                    p.data = v          # the original storage is released with `old` (unless held elsewhere)
        old = [s for _, s in items[i][1]]
        items[i] = (h.unit, ())
        on_homed(h)
        return old                      # our last references: fill_units lets go of them off this thread
    fill_units(items, done, trim_every=trim_every, droppable=drop)
    return held


def _pairs(h, tensors: list, coded: dict, held: dict, drop: set) -> list:
    """[(view in the home, the tensor whose bytes go there)] of one Home; notes each host storage in `held`,
    and in `drop` the ids of the sources DROP_EARLY may give back: a plain parameter's `.data` alias (a
    tensor of its own, which sole_owner counts beside the parameter), not a GGUF parameter's raw blocks or
    a compressed buffer (the very tensor its holder keeps)."""
    from torch.multiprocessing.reductions import StorageWeakRef
    pairs = []
    for (_, p), v in zip(tensors, h.views()):
        enc = coded.get(id(p))
        old = enc.buf if enc is not None else p.raw if _gs.is_gguf(p) else p.data
        if old.device.type == "cpu" and old.untyped_storage().nbytes():
            st = old.untyped_storage()
            held.setdefault(st.data_ptr(), (StorageWeakRef(st), st.nbytes()))
        pairs.append((v, old))
        if enc is None and not _gs.is_gguf(p):
            drop.add(id(old))
    return pairs
