"""Time graph building for a 12B-parameter model (no GPU needed).

    python bench/bench_trace.py [--repeats 5] [--out bench/results/trace_cpu.md]

Measures, for diffusers' FluxTransformer2DModel (Flux-dev config: default + guidance embedder) built
on the meta device and cast to bf16:
  build     constructing the model on meta (diffusers, not ours; for scale)
  trace     compiler.trace without inputs (registration order), block and leaf granularity
  trace+call compiler.trace with a meta-device traced call at 1024x1024 (4096 image + 512 text tokens)
and planning from a file: a sparse 23.8 GB safetensors file with the flux-dev keys (header + hole),
read_header + graph_from_tensors, and the built-in shape.
diffusers is a bench/test dependency only.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import struct
import sys
import tempfile
import time

import torch

from distorch.compiler.files import graph_from_file
from distorch.compiler.shapes import builtin_infos
from distorch.compiler.trace import trace


def timed(fn, repeats):
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, ts


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def sparse_safetensors(path, infos):
    header, off = {}, 0
    for i in infos:
        header[i.name] = {"dtype": i.dtype_str, "shape": list(i.shape), "data_offsets": [off, off + i.nbytes]}
        off += i.nbytes
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)
    return 8 + len(h) + off


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "trace_cpu.md"))
    a = ap.parse_args()
    R = a.repeats
    rows = []

    def row(what, ts, note=""):
        rows.append((what, statistics.median(ts), min(ts), note))
        print(f"{what:55s} median {statistics.median(ts) * 1e3:9.1f} ms  min {min(ts) * 1e3:9.1f} ms  {note}",
              file=sys.stderr)

    t0 = time.perf_counter()
    from diffusers import FluxTransformer2DModel
    row("import diffusers (once)", [time.perf_counter() - t0])

    def build():
        prev = torch.get_default_dtype()
        torch.set_default_dtype(torch.bfloat16)
        try:
            with torch.device("meta"):
                return FluxTransformer2DModel(guidance_embeds=True)
        finally:
            torch.set_default_dtype(prev)

    m, ts = timed(build, R)
    nparams = sum(p.numel() for p in m.parameters())
    row("build FluxTransformer2DModel on meta, bf16 (diffusers)", ts, f"{nparams / 1e9:.2f}B params")

    g, ts = timed(lambda: trace(m), R)
    row("trace(), no inputs, granularity=block", ts, f"{len(g)} units, {g.total_bytes / 1e9:.2f} GB")
    gl, ts = timed(lambda: trace(m, granularity="leaf"), R)
    row("trace(), no inputs, granularity=leaf", ts, f"{len(gl)} units")

    L, T = 4096, 512   # 1024x1024 latents -> 128x128 -> 2x2 patches -> 64x64 = 4096 tokens
    bf = torch.bfloat16
    kw = dict(hidden_states=torch.randn(1, L, 64, dtype=bf), encoder_hidden_states=torch.randn(1, T, 4096, dtype=bf),
              pooled_projections=torch.randn(1, 768, dtype=bf), timestep=torch.tensor([1.0], dtype=bf),
              img_ids=torch.zeros(L, 3), txt_ids=torch.zeros(T, 3), guidance=torch.tensor([3.5], dtype=bf))
    def plain():
        mk = {k: v.to("meta") for k, v in kw.items()}
        with torch.no_grad(), torch.device("meta"):
            return m(**mk)

    _, ts = timed(plain, R)
    row("reference: plain meta forward, no tracing", ts, "")
    gm, ts = timed(lambda: trace(m, (), kw), R)
    tf = sum(u.flops * u.calls for u in gm) / 1e12
    row("trace() + meta traced call, 1024x1024 (4096+512 tok)", ts,
        f"{len(gm)} units, {tf:.1f} TFLOP/step, order={gm.traced}")
    _, ts = timed(lambda: trace(m, (), kw, granularity="leaf"), R)
    row("trace() + meta traced call, leaf granularity", ts, "")

    infos = builtin_infos("flux-dev")
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "flux1-dev.safetensors")
        size = sparse_safetensors(p, infos)
        gf, ts = timed(lambda: graph_from_file(p), R)
        row("graph_from_file(sparse flux-dev .safetensors)", ts, f"{size / 1e9:.1f} GB file, {len(gf)} units")
    gb, ts = timed(lambda: graph_from_file("flux-dev"), R)
    row("graph_from_file('flux-dev') built-in", ts, f"{len(gb)} units, {gb.total_bytes / 1e9:.2f} GB")

    cmd = "python bench/bench_trace.py " + " ".join(sys.argv[1:])
    lines = [
        "# Graph building speed (CPU)",
        "",
        f"- date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {cpu_name()}, {os.cpu_count()} logical CPUs (shared with other jobs), {platform.platform()}",
        f"- python {platform.python_version()}, torch {torch.__version__}",
        f"- command: `{cmd.strip()}` ({R} repeats, wall clock)",
        "",
        "| what | median ms | min ms | note |",
        "|---|---:|---:|---|",
    ]
    lines += [f"| {w} | {med * 1e3:.1f} | {mn * 1e3:.1f} | {n} |" for w, med, mn, n in rows]
    lines += ["", "Model: diffusers FluxTransformer2DModel default config + guidance_embeds=True (Flux-dev),",
              "built in bf16 under `torch.device('meta')`. Target: graph (build excluded) < 2 s; file plan < 5 s.",
              "FLOPs count matmuls, convolutions and attention (torch.utils.flop_counter formulas).", ""]
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as f:
        f.write("\n".join(lines))
    print(f"wrote {a.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
