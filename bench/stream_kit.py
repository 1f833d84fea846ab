"""The measuring kit of the Flux-sized streaming benches (bench_stream.py, bench_gguf.py, bench_codec_stream.py,
bench_donor.py, bench_overhead.py): the --device cpu switch (_CPU, set by the script), the diffusers
FluxTransformer2DModel with random bf16 weights and its inputs, back-to-back timed steps and profiled steps,
peak VRAM and host RSS, and the pinned host->GPU link (one big copy: pinned_bw; unit-sized copies: link_probe).

    model = build_model(cfg, dev); kw = make_inputs(cfg, res, txt, dev)
    med, times, out, wall = run_steps(model, kw, warmup, reps)      bw = pinned_bw(dev)
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

GiB = 1 << 30


_CPU = False   # --device cpu: a tiny config through the same code, for checking the script without a GPU


def _sync():
    if not _CPU:
        torch.cuda.synchronize()


def _event():
    if _CPU:
        from distorch.runtime.stream import HostEvent
        return HostEvent()
    return torch.cuda.Event(enable_timing=True)


def _reset_peak():
    if not _CPU:
        torch.cuda.reset_peak_memory_stats()


def _peak_gib():
    return 0.0 if _CPU else torch.cuda.max_memory_allocated() / 2**30


def _rss_gib() -> float:
    """This process's resident host memory now (VmRSS), GiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / GiB
    except OSError:
        pass
    return float("nan")


class _Rows(list):
    """The result rows; each row records host RSS when it is appended (after its timed steps)."""

    def append(self, row):
        row.setdefault("rss_gib", _rss_gib())
        super().append(row)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def import_flux():
    import diffusers.utils.import_utils as iu
    try:
        import transformers  # noqa: F401
    except Exception:       # an incompatible transformers must not break diffusers' model import
        iu._transformers_available = False
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel


def build_model(cfg: dict, dev: str):
    Flux = import_flux()
    with torch.device("meta"):
        m = Flux(**cfg)
    m = m.to(torch.bfloat16)
    m.to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.02, generator=g)
        for b in m.buffers():
            b.zero_()
    m.eval()
    return m


def make_inputs(cfg: dict, res: int, txt: int, dev: str):
    g = torch.Generator(device=dev).manual_seed(1)
    side = res // 16
    tok = side * side
    bf = torch.bfloat16
    img_ids = torch.zeros(side, side, 3, device=dev)
    img_ids[..., 1] = torch.arange(side, device=dev)[:, None]
    img_ids[..., 2] = torch.arange(side, device=dev)[None, :]
    kw = dict(
        hidden_states=torch.randn(1, tok, cfg.get("in_channels", 64), generator=g, device=dev).to(bf),
        encoder_hidden_states=torch.randn(1, txt, cfg.get("joint_attention_dim", 4096), generator=g, device=dev).to(bf),
        pooled_projections=torch.randn(1, cfg.get("pooled_projection_dim", 768), generator=g, device=dev).to(bf),
        timestep=torch.tensor([0.5], device=dev, dtype=bf),
        img_ids=img_ids.reshape(tok, 3),
        txt_ids=torch.zeros(txt, 3, device=dev),
        return_dict=False,
    )
    if cfg.get("guidance_embeds"):
        kw["guidance"] = torch.tensor([3.5], device=dev, dtype=bf)
    return kw


def run_steps(model, kw, warmup: int, reps: int):
    """Back-to-back steps; per-step GPU time from events between steps. Returns (median_s, times, out)."""
    evs = [_event() for _ in range(warmup + reps + 1)]
    out = None
    t0 = time.perf_counter()
    with torch.inference_mode():
        evs[0].record()
        for i in range(warmup + reps):
            out = model(**kw)[0]
            evs[i + 1].record()
    _sync()
    wall = time.perf_counter() - t0
    ts = [evs[i].elapsed_time(evs[i + 1]) / 1e3 for i in range(warmup, warmup + reps)]
    return statistics.median(ts), ts, out, wall


def profiled_steps(rt, model, kw, steps: int = 3):
    """`steps` more steps with the runtime's profiling on (events around every copy and unit, not in any
    timed step): (runtime.stats.summarize over them, the last step's timeline).  rt.trace keeps the events
    (runtime.stats.unit_times reads them)."""
    from distorch.runtime import stats as rstats
    rt.trace.clear()
    rt.profile = True
    try:
        run_steps(model, kw, 0, steps)
        st = rstats.summarize(rt, last=steps)
        tl = rstats.timeline(rt, steps=1)
    finally:
        rt.profile = False
    return st, tl


def pinned_bw(dev: str, nbytes: int = 2 * GiB, reps: int = 8) -> float:
    """Best pinned host->GPU copy rate of `reps` copies of `nbytes` (the floor uses the best the link gives)."""
    if _CPU:
        return 25e9
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    ts = []
    for _ in range(reps + 1):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        dst.copy_(src, non_blocking=True)
        e1.record()
        _sync()
        ts.append(e0.elapsed_time(e1) / 1e3)
    del src, dst
    log(f"pinned H2D copies of {nbytes >> 20} MiB: median {nbytes / statistics.median(ts[1:]) / 1e9:.1f} GB/s, "
        f"best {nbytes / min(ts[1:]) / 1e9:.1f} GB/s")
    return nbytes / min(ts[1:])


def link_probe(dev, sizes=(150_000_000, 360_000_000), total=3 * GiB) -> dict:
    """Back-to-back pinned host->GPU copies of unit-sized chunks on a side stream, from torch's pinned
    allocator and from a HostArena (bytes/s of the whole sequence, best of 3)."""
    from distorch.runtime.arena import HostArena
    out = {}
    if _CPU:
        return out
    st = torch.cuda.Stream()
    dst = torch.empty(max(sizes), dtype=torch.uint8, device=dev)
    arena = HostArena(total, pin=True)
    arena.flat.fill_(1)
    srcs = {"torch_pinned": torch.ones(total, dtype=torch.uint8, pin_memory=True), "host_arena": arena.flat}
    for name, src in srcs.items():
        for cs in sizes:
            k = total // cs
            best = 0.0
            for _ in range(3):
                e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                with torch.cuda.stream(st):
                    e0.record(st)
                    for j in range(k):
                        dst[:cs].copy_(src[j * cs:(j + 1) * cs], non_blocking=True)
                    e1.record(st)
                e1.synchronize()
                best = max(best, k * cs / (e0.elapsed_time(e1) / 1e3))
            out[f"{name}_{cs // 1_000_000}MB"] = best
            log(f"link {name:<13} chunks {cs / 1e6:5.0f} MB: {best / 1e9:6.2f} GB/s")
    # two copy streams taking alternate chunks (two copy engines busy at once)
    st2 = [st, torch.cuda.Stream()]
    dst2 = [dst, torch.empty_like(dst)]
    cs = sizes[0]
    k = total // cs
    best = 0.0
    for _ in range(3):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(st2[0])
        st2[1].wait_event(e0)
        for j in range(k):
            with torch.cuda.stream(st2[j % 2]):
                dst2[j % 2][:cs].copy_(arena.flat[j * cs:(j + 1) * cs], non_blocking=True)
        st2[0].wait_stream(st2[1])
        e1.record(st2[0])
        e1.synchronize()
        best = max(best, k * cs / (e0.elapsed_time(e1) / 1e3))
    out[f"host_arena_2streams_{cs // 1_000_000}MB"] = best
    log(f"link host_arena, 2 streams, chunks {cs / 1e6:5.0f} MB: {best / 1e9:6.2f} GB/s")
    del dst2
    del srcs, dst
    arena.release()
    return out
