"""Cold start: how fast the homes fill (weights already in host RAM, as ComfyUI loaded them -> homes).

Builds a model of --gb GB of bf16 Linear blocks on the CPU, then runs the real HomeStore (runtime/store.py
through runtime/fill.py) for each thread count in --threads, and prints GB/s for the copy into the homes
and, with CUDA, for page-locking them (cudaHostRegister), plus the total.  Every run checks the homes hold
the exact bytes.  Prints one line per run and a final summary; no timing is asserted.

    python bench/bench_fill.py --smoke                         # CPU, 0.5 GB, threads 1 and 4
    python bench/bench_fill.py --gb 24 --threads 1,4,8,16      # GPU machine: pinned homes, target >= 10 GB/s
    python bench/bench_fill.py --gb 8 --threads 8,16 --diagnose   # + the fill's parts apart (diagnose())
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from distorch.runtime import fill, pinning  # noqa: E402
from distorch.runtime.store import HomeStore  # noqa: E402


def model(gb: float, block_mb: int = 256) -> torch.nn.ModuleList:
    d = 4096
    per = max(1, int(block_mb * 2**20 / (d * d * 2)))
    n = max(1, int(gb * 1e9 / (per * d * d * 2)))
    blocks = torch.nn.ModuleList()
    for i in range(n):
        b = torch.nn.Module()
        for j in range(per):
            w = torch.empty(d, d, dtype=torch.bfloat16)
            w.view(torch.int16).fill_(i * 31 + j)         # touched: resident like loaded weights
            b.register_parameter(f"w{j}", torch.nn.Parameter(w, requires_grad=False))
        blocks.append(b)
    return blocks


def run(gb: float, n_threads: int, pin: bool) -> dict:
    m = model(gb)
    streamed = {f"{i}": [(f"{i}.{k}", p) for k, p in b.named_parameters()] for i, b in enumerate(m)}
    units = list(streamed)
    total = sum(p.numel() * p.element_size() for b in m for p in b.parameters())
    os.environ[fill.ENV] = str(n_threads)
    p0 = pinning.pinned_bytes()
    t0 = time.perf_counter()
    st = HomeStore(units, streamed, {n: "cpu" for n in units}, pin=pin, progress=False)
    dt = time.perf_counter() - t0
    ok = all(bool((p.view(torch.int16) == int(n) * 31 + j).all())
             for n in units for j, (_, p) in enumerate(streamed[n]))
    pinned = pinning.pinned_bytes() - p0
    lt = dict(st.load_times)            # pinning runs piece by piece on threads during the fill (pin_total_s);
    #                                     pin_s is what was left to wait for after the copies
    for a in st.arenas.values():
        a.unpin()
    del st, m, streamed
    gc.collect()
    return {"threads": n_threads, "GB": total / 1e9, "copy_GBps": total / 1e9 / max(lt["fill_s"], 1e-9),
            "pin_GBps": total / 1e9 / lt["pin_total_s"] if pinned and lt["pin_total_s"] else None,
            "pin_wait_s": lt["pin_s"], "total_GBps": total / 1e9 / dt, "pinned_GB": pinned / 1e9, "exact": ok}


def host_bound(gb: float, n_threads: int) -> dict:
    """The host's own bound for the fill: `gb` GB copied with n_threads threads (64 MB chunks) into fresh
    memory (numpy-owned, as a HostArena: every page faulted in and zeroed by the kernel on first write) and
    then into the same memory again (pages already there: memory bandwidth alone)."""
    import concurrent.futures as cf
    import numpy as np
    n = int(gb * 1e9)
    src = torch.empty(n, dtype=torch.uint8)
    src.fill_(3)
    chunk = 64 << 20
    spans = [(o, min(o + chunk, n)) for o in range(0, n, chunk)]
    out = {}
    dst = torch.from_numpy(np.empty(n, dtype=np.uint8))
    with cf.ThreadPoolExecutor(n_threads) as ex:
        for what in ("fresh", "touched"):
            t = time.perf_counter()
            list(ex.map(lambda s: dst[s[0]:s[1]].copy_(src[s[0]:s[1]]), spans))
            out[what] = n / 1e9 / (time.perf_counter() - t)
    return out                                  # both buffers are freed with this frame


def diagnose(gb: float, n_threads: int, pin: bool, quick: bool = False) -> list[tuple[str, float]]:
    """Where the fill loses against the host bound (bench/results/fill_h200.md): the same bytes, twice each
    (a first touch of fresh memory and a second run can differ).  Plain pieces: copied as the fill cuts them
    (16 MiB, fill.CHUNK) into one fresh numpy buffer by a plain thread pool, no HomeStore -- with nothing
    freed, or with each unit's sources freed as it completes, on the calling thread (what the fill did
    before) or on fill.release_threads() threads (what it does now); the freeing alone on one thread.  Then
    HomeStore with pageable homes as it is, with its frees back on the calling thread (fill.RELEASERS = 0), on
    1 and on n_threads release threads (not with one thread, whose fill is serial, nor `quick`), without heap
    trims, with each piece's home pages pre-faulted (fill.PREFAULT), with each piece's source pages given back as
    it lands (fill.DROP_EARLY, the default; the other HomeStore cases run with it off), and pinned with CUDA
    (with DROP_EARLY and without).
    Returns [(label, GB/s)]."""
    nr = fill.release_threads(n_threads)
    off = (fill, "DROP_EARLY")
    cases = [("plain pieces into fresh memory", lambda: plain_pieces(gb, n_threads, None), {}),
             ("plain pieces, sources freed on the calling thread as each unit completes",
              lambda: plain_pieces(gb, n_threads, 0), {}),
             (f"plain pieces, sources freed on {nr} release thread(s) as each unit completes",
              lambda: plain_pieces(gb, n_threads, nr), {}),
             ("freeing the sources alone, one thread", lambda: free_alone(gb), {}),
             ("HomeStore, pageable, DROP_EARLY off", lambda: store(False), {off: False}),
             ("HomeStore, pageable, DROP_EARLY off, frees on the calling thread (before the fix)",
              lambda: store(False), {off: False, (fill, "RELEASERS"): 0}),
             ("HomeStore, pageable, DROP_EARLY off, no heap trims", lambda: store(False),
              {off: False, (pinning, "trim_heap"): lambda: None}),
             ("HomeStore, pageable, DROP_EARLY off, home pages pre-faulted (MADV_POPULATE_WRITE)",
              lambda: store(False), {off: False, (fill, "PREFAULT"): True}),
             ("HomeStore, pageable, source pages given back as each piece lands (fill.DROP_EARLY, the default)",
              lambda: store(False), {off: True})]
    if n_threads > 1 and not quick:
        cases[6:6] = [(f"HomeStore, pageable, DROP_EARLY off, frees on {k} release thread(s)", lambda: store(False),
                       {off: False, (fill, "RELEASERS"): k}) for k in sorted({1, n_threads} - {nr})]
    if pin:
        cases.append(("HomeStore, pinned, DROP_EARLY off", lambda: store(True), {off: False}))
        cases.append(("HomeStore, pinned, fill.DROP_EARLY (the default)", lambda: store(True), {off: True}))

    def store(pinned: bool) -> float:
        return run(gb, n_threads, pinned)["total_GBps"]
    out = []
    for label, fn, patch in cases:
        saved = {k: getattr(*k) for k in patch}
        for (mod, name), v in patch.items():
            setattr(mod, name, v)
        try:
            for k in (1, 2):
                out.append((f"{label} (run {k})", fn()))
                gc.collect()
        finally:
            for (mod, name), v in saved.items():
                setattr(mod, name, v)
    return out


def _sources(gb: float) -> list[list[torch.Tensor]]:
    """model(gb)'s weights, flat, per unit; these lists hold the only references."""
    return [[p.data.reshape(-1) for p in b.parameters()] for b in model(gb)]


def plain_pieces(gb: float, n_threads: int, releasers: int | None) -> float:
    """GB/s of the fill's pieces copied into one fresh numpy buffer by a plain pool, all submitted at once;
    `releasers` None: nothing freed while timed; 0: each unit's sources freed on the calling thread as soon as
    its pieces landed (in order); n: freed on n threads of their own."""
    import concurrent.futures as cf
    import numpy as np
    srcs = _sources(gb)
    total = sum(s.numel() * s.element_size() for u in srcs for s in u)
    arena = torch.from_numpy(np.empty(total, dtype=np.uint8))
    jobs, off = [], 0
    for u in srcs:
        jobs.append([])
        for s in u:
            nb = s.numel() * s.element_size()
            jobs[-1] += fill.pieces(arena[off:off + nb].view(s.dtype), s)
            off += nb
    u = s = None                            # no loop variable may keep a source alive
    rel = cf.ThreadPoolExecutor(releasers) if releasers else None
    t = time.perf_counter()
    with cf.ThreadPoolExecutor(n_threads) as ex:
        futs = [[ex.submit(lambda d, s: d.copy_(s), d, s) for d, s in js] for js in jobs]
        for i in range(len(jobs)):
            for f in futs[i]:
                f.result()
            futs[i] = jobs[i] = None
            if releasers is None:
                continue
            box = [srcs[i]]                 # the last references to unit i's sources
            srcs[i] = None
            if rel is None:
                box.clear()
            else:
                rel.submit(box.clear)
            box = None
        if rel is not None:
            rel.shutdown(wait=True)
    return total / 1e9 / (time.perf_counter() - t)


def free_alone(gb: float) -> float:
    """GB/s of freeing model(gb)'s weights (touched, as loaded) on one thread, nothing else running."""
    srcs = _sources(gb)
    total = sum(s.numel() * s.element_size() for u in srcs for s in u)
    t = time.perf_counter()
    srcs.clear()
    return total / 1e9 / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=4.0)
    ap.add_argument("--threads", default="1,4,8")
    ap.add_argument("--smoke", action="store_true", help="CPU smoke: 0.5 GB, threads 1,4")
    ap.add_argument("--diagnose", action="store_true", help="also: the same bytes as plain pieces (sources kept, "
                    "freed on the calling thread, freed on release threads), the freeing alone, HomeStore pageable "
                    "(as is, frees on the calling thread, no heap trims, pre-faulted), pinned (see diagnose())")
    a = ap.parse_args()
    gb, ths = (0.5, [1, 4]) if a.smoke else (a.gb, [int(x) for x in a.threads.split(",")])
    pin = torch.cuda.is_available()
    dev = torch.cuda.get_device_name(0) if pin else "cpu only (homes pageable)"
    print(f"bench_fill: {gb} GB bf16, {dev}, torch {torch.__version__}, {os.cpu_count()} CPUs", flush=True)
    for n in ths:
        b = host_bound(min(gb, 4.0), n)
        print(f"threads {n:>2}: host bound: copy into fresh memory {b['fresh']:.1f} GB/s, into touched memory "
              f"{b['touched']:.1f} GB/s", flush=True)
    rows = []
    for n in ths:
        r = run(gb, n, pin)
        rows.append(r)
        pin_s = (f", page-locking {r['pin_GBps']:.1f} GB/s overlapped, {r['pin_wait_s']:.2f} s after the copies"
                 if r["pin_GBps"] else "")
        print(f"threads {n:>2}: {r['GB']:.2f} GB copy {r['copy_GBps']:.1f} GB/s{pin_s}, weights -> homes "
              f"{r['total_GBps']:.1f} GB/s, exact={r['exact']}", flush=True)
    if a.diagnose:
        for n in ths:
            for label, rate in diagnose(gb, n, pin, quick=a.smoke):
                print(f"threads {n:>2}: diagnose: {label}: {rate:.1f} GB/s", flush=True)
    best = max(rows, key=lambda r: r["total_GBps"])
    print(f"best: threads {best['threads']} at {best['total_GBps']:.1f} GB/s (target >= 10 GB/s)")
    if not all(r["exact"] for r in rows):
        raise SystemExit("homes do not hold the exact bytes")


if __name__ == "__main__":
    main()
