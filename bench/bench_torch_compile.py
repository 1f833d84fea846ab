"""torch.compile on top of distorch.compile: step time against eager, resident and streamed, in one process.

The demo's Flux-like DiT (demo.TinyFlux, the "cuda" config: ~1.9 GB bf16, 6 double + 12 single blocks,
1024 image + 256 text tokens) in four configurations, each timed over the same steps:

  resident eager / resident torch.compile
  distorch offload_gb=half eager / distorch offload_gb=half + torch.compile (each unit boundary one graph break)

Each row: median step (CUDA events, after warm-up), recompiles seen by a counting backend wrapped around
inductor, peak VRAM (max_memory_allocated), host RSS (VmRSS), and the output against the same mode's
resident output (eager: torch.equal; compiled: max abs difference, since inductor may fuse differently).

    python bench/bench_torch_compile.py [--steps 10] [--out bench/results/torch_compile_h200.md]
    python bench/bench_torch_compile.py --device cpu --steps 2 --out /tmp/tc.md      # smoke run on CPU
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024 / GiB
    return float("nan")


def timed(fn, inputs, steps: int, cuda: bool) -> tuple[float, torch.Tensor]:
    out = None
    for _ in range(2):                       # warm-up (compilation happens here)
        out = fn(*inputs)
    times = []
    for _ in range(steps):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            out = fn(*inputs)
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            out = fn(*inputs)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    import distorch
    from distorch.demo import build_demo_model, demo_inputs
    cuda = a.device.startswith("cuda")
    dev = "cuda:0" if cuda else "cpu"
    graphs = {"n": 0}

    def counting(gm, example_inputs):
        graphs["n"] += 1
        from torch._inductor.compile_fx import compile_fx
        return compile_fx(gm, example_inputs) if cuda else gm.forward

    rows, ref = [], {}
    for mode in ("resident", "distorch"):
        for compiled in (False, True):
            torch._dynamo.reset()
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            m = build_demo_model(dev)
            inputs = demo_inputs(dev)
            model_bytes = sum(p.numel() * p.element_size() for p in m.parameters())
            h = None
            if mode == "distorch":
                h = distorch.compile(m, compute=dev, offload_gb=model_bytes / 2 / GiB, progress=False)
            fn = torch.compile(m, backend=counting) if compiled else m
            graphs["n"] = 0
            with torch.no_grad():
                s, out = timed(fn, inputs, a.steps, cuda)
                g_after_warm = graphs["n"]
                timed(fn, inputs, 2, cuda)
            peak = torch.cuda.max_memory_allocated() / GiB if cuda else float("nan")
            key = "compiled" if compiled else "eager"
            if mode == "resident":
                ref[key] = out.detach().clone()
                same = "reference"
            elif compiled:
                same = f"max |diff| {(out.float() - ref[key].float()).abs().max().item():.2e}"
            else:
                same = "bit-identical" if torch.equal(out, ref[key]) else "DIFFERENT"
            offl = (h.plan.offloaded_bytes() / GiB) if h else 0.0
            rows.append((mode, key, s, graphs["n"], graphs["n"] - g_after_warm, peak, rss_gib(), offl, same))
            print(f"{mode:9s} {key:8s} {s * 1e3:8.2f} ms graphs {graphs['n']} (+{graphs['n'] - g_after_warm} after "
                  f"warm-up) peak {peak:.2f} GiB rss {rss_gib():.2f} GiB off {offl:.2f} GiB  {same}",
                  file=sys.stderr, flush=True)
            if h:
                h.undo()
            del fn, m, h
    card = torch.cuda.get_device_name(0) if cuda else "cpu"
    lines = [f"# torch.compile on a distorch-compiled model ({card}, torch {torch.__version__}, "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", "",
             f"Command: `python {' '.join(sys.argv)}`. Model: demo.TinyFlux, the demo config for {'cuda' if cuda else 'cpu'}, "
             f"{a.steps} timed steps after 2 warm-up steps, median.", "",
             "| model | mode | step ms | graphs compiled | graphs after warm-up | peak VRAM GiB | host RSS GiB | "
             "offloaded GiB | output vs resident, same mode |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for mode, key, s, g, g2, peak, rss, offl, same in rows:
        lines.append(f"| {mode} | {key} | {s * 1e3:.2f} | {g} | {g2} | {peak:.2f} | {rss:.2f} | {offl:.2f} | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
