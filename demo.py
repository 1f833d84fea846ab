"""DisTorch demo: no download, no diffusers -- a small Flux-like DiT in pure torch, compiled with a budget.

    python -m distorch.demo [--offload 0.5] [--steps 4] [--device cuda:0|cpu]
    python -m distorch.demo --plots OUT_DIR [--offload 0.5]     # timeline.png + placement.png (matplotlib)

Builds the DiT from a built-in config (random weights, fixed seed), runs a few Euler denoising steps
with every weight resident (the reference), then `distorch.compile`s the same module with half of it
(by default) kept off the compute device, runs the same steps, checks the result is bit-identical
(torch.equal), prints the placement table and the predicted vs measured step time, feeds the
measured per-unit times back into the graph and shows the re-planned placement's prediction.
On a CUDA machine the compute device is the GPU and the offloaded units stream from pinned host
memory; elsewhere the very same machinery runs on the CPU, synchronously.

With --plots the compiled demo runs three profiled steps and writes the transfer/compute timeline and
the placement per unit as PNGs (runtime/plots.py; needs the `plot` extra).
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import statistics
import sys
import time
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import DisTorchError
from .passes.partition import partition
from .runtime import plots
from .runtime.api import compile as dt_compile, inventory_for, norm_compute

log = logging.getLogger("distorch.demo")

CONFIGS: dict[str, dict[str, Any]] = {
    # small enough for a 2-core CPU in seconds
    "cpu": dict(dim=256, heads=4, double=4, single=8, in_ch=16, ctx_dim=64, pooled_dim=32,
                img_tokens=256, txt_tokens=32, dtype=torch.float32),
    # about 1.9 GB of bf16 weights: big enough for copies and compute to be worth overlapping
    "cuda": dict(dim=1536, heads=12, double=6, single=12, in_ch=64, ctx_dim=1024, pooled_dim=256,
                 img_tokens=1024, txt_tokens=256, dtype=torch.bfloat16),
}


class RMSNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * self.scale


class Modulation(nn.Module):
    def __init__(self, d: int, n: int) -> None:
        super().__init__()
        self.n = n
        self.lin = nn.Linear(d, n * d)

    def forward(self, vec: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.lin(F.silu(vec))[:, None, :].chunk(self.n, dim=-1)


class MLP(nn.Sequential):
    def __init__(self, d: int) -> None:
        super().__init__(nn.Linear(d, 4 * d), nn.GELU(approximate="tanh"), nn.Linear(4 * d, d))


def _attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, d = q.shape
    q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(b, -1, d)


class DoubleBlock(nn.Module):
    """Image and text streams with their own weights, one joint attention (as in Flux)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(d, 6))
            setattr(self, f"{s}_norm", nn.LayerNorm(d, elementwise_affine=False, eps=1e-6))
            setattr(self, f"{s}_qkv", nn.Linear(d, 3 * d))
            setattr(self, f"{s}_qnorm", RMSNorm(d))
            setattr(self, f"{s}_knorm", RMSNorm(d))
            setattr(self, f"{s}_proj", nn.Linear(d, d))
            setattr(self, f"{s}_mlp", MLP(d))

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        qkv = []
        mods = []
        for s, x in (("txt", txt), ("img", img)):
            sh1, sc1, g1, sh2, sc2, g2 = getattr(self, f"{s}_mod")(vec)
            mods.append((sh2, sc2, g1, g2))
            h = getattr(self, f"{s}_norm")(x) * (1 + sc1) + sh1
            q, k, v = getattr(self, f"{s}_qkv")(h).chunk(3, -1)
            qkv.append((getattr(self, f"{s}_qnorm")(q), getattr(self, f"{s}_knorm")(k), v))
        q, k, v = (torch.cat([qkv[0][i], qkv[1][i]], 1) for i in range(3))   # text first, then image
        a = _attn(q, k, v, self.heads)
        nt = txt.shape[1]
        for (s, x), att, (sh2, sc2, g1, g2) in zip((("txt", txt), ("img", img)), (a[:, :nt], a[:, nt:]), mods):
            x = x + g1 * getattr(self, f"{s}_proj")(att)
            x = x + g2 * getattr(self, f"{s}_mlp")(getattr(self, f"{s}_norm")(x) * (1 + sc2) + sh2)
            out.append(x)
        return out[1], out[0]


class SingleBlock(nn.Module):
    """Joint sequence, parallel attention + MLP from one input projection (as in Flux)."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads, self.d = heads, d
        self.mod = Modulation(d, 3)
        self.norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.linear1 = nn.Linear(d, 3 * d + 4 * d)
        self.qnorm, self.knorm = RMSNorm(d), RMSNorm(d)
        self.linear2 = nn.Linear(d + 4 * d, d)

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        sh, sc, g = self.mod(vec)
        h = self.norm(x) * (1 + sc) + sh
        qkv, mlp = self.linear1(h).split([3 * self.d, 4 * self.d], -1)
        q, k, v = qkv.chunk(3, -1)
        a = _attn(self.qnorm(q), self.knorm(k), v, self.heads)
        return x + g * self.linear2(torch.cat([a, F.gelu(mlp, approximate="tanh")], -1))


def timestep_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * 1000 * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], -1)


class TinyFlux(nn.Module):
    def __init__(self, dim: int, heads: int, double: int, single: int, in_ch: int, ctx_dim: int, pooled_dim: int,
                 **_: object) -> None:
        super().__init__()
        self.img_in = nn.Linear(in_ch, dim)
        self.txt_in = nn.Linear(ctx_dim, dim)
        self.time_in = nn.Sequential(nn.Linear(256, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.vector_in = nn.Sequential(nn.Linear(pooled_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.double_blocks = nn.ModuleList(DoubleBlock(dim, heads) for _ in range(double))
        self.single_blocks = nn.ModuleList(SingleBlock(dim, heads) for _ in range(single))
        self.final_mod = Modulation(dim, 2)
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.final = nn.Linear(dim, in_ch)

    def forward(self, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        vec = self.time_in(timestep_embedding(t).to(x.dtype)) + self.vector_in(pooled)
        img, txt = self.img_in(x), self.txt_in(ctx)
        for b in self.double_blocks:
            img, txt = b(img, txt, vec)
        h = torch.cat([txt, img], 1)
        for b in self.single_blocks:
            h = b(h, vec)
        img = h[:, txt.shape[1]:]
        sh, sc = self.final_mod(vec)
        return self.final(self.final_norm(img) * (1 + sc) + sh)


def _kind(device: str | torch.device) -> str:
    return "cuda" if str(device).startswith("cuda") else "cpu"


def check_device(device: str) -> None:
    """DisTorchError unless `device` is 'cpu' or a CUDA device this torch can use."""
    d = str(device)
    if d == "cpu" or d.startswith("cpu:"):
        return
    if not d.startswith("cuda"):
        raise DisTorchError(f"--device {d}: expected cpu or cuda[:N]")
    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if not torch.backends.cuda.is_built() else "no CUDA device is visible"
        raise DisTorchError(f"--device {d}: {why}; run the demo with --device cpu")
    idx = d.partition(":")[2]
    if idx and (not idx.isdigit() or int(idx) >= torch.cuda.device_count()):
        raise DisTorchError(f"--device {d}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                            f"(cuda:0..cuda:{torch.cuda.device_count() - 1})")


def build_demo_model(device: str = "cpu", seed: int = 0) -> TinyFlux:
    check_device(device)
    cfg = CONFIGS[_kind(device)]
    torch.manual_seed(seed)
    with torch.device("meta"):
        m = TinyFlux(**cfg)
    m = m.to_empty(device=device).to(cfg["dtype"])
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("scale"):
                p.fill_(1.0)
            elif p.dim() == 1:
                p.zero_()
            else:
                p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]), generator=g)
    return m.eval()


def demo_inputs(device: str = "cpu", seed: int = 1) -> tuple[torch.Tensor, ...]:
    cfg = CONFIGS[_kind(device)]
    g = torch.Generator(device=device).manual_seed(seed)
    dt = cfg["dtype"]
    x = torch.randn(1, cfg["img_tokens"], cfg["in_ch"], generator=g, device=device).to(dt)
    t = torch.tensor([1.0], device=device)
    ctx = torch.randn(1, cfg["txt_tokens"], cfg["ctx_dim"], generator=g, device=device).to(dt)
    pooled = torch.randn(1, cfg["pooled_dim"], generator=g, device=device).to(dt)
    return x, t, ctx, pooled


def denoise(model: nn.Module, inputs: tuple[torch.Tensor, ...], steps: int) -> tuple[torch.Tensor, list[float]]:
    """Euler steps of a rectified-flow sampler; returns (latent, seconds per step).

    The first step is timed alone (warm-up); the others run back to back with no synchronize between
    them, as a sampler runs, so prefetch that wraps into the next step is not cut off by a sync."""
    x, _, ctx, pooled = inputs
    ts = torch.linspace(1.0, 0.0, steps + 1, device=x.device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        t0 = time.perf_counter()
        for i in range(steps):
            v = model(x, ts[i:i + 1], ctx, pooled)
            x = x + (ts[i + 1] - ts[i]) * v
            if i == 0:
                sync()
                times.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
        sync()
    if steps > 1:
        times += [(time.perf_counter() - t0) / (steps - 1)] * (steps - 1)
    return x, times


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m distorch.demo", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--offload", type=float, default=0.5, help="share of the model kept off the compute device")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--plots", metavar="OUT_DIR", help="write timeline.png and placement.png here instead")
    a = ap.parse_args(argv)
    dev = a.device
    if not logging.getLogger().handlers:      # progress lines on stderr (the results go to stdout)
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if not 0 <= a.offload <= 1:
        print(f"--offload {a.offload}: give a share between 0 and 1", file=sys.stderr)
        return 2
    try:
        check_device(dev)
        if a.plots:
            plots.require()                   # before any work
    except (DisTorchError, plots.PlotDependencyError) as e:
        print(f"demo: {e}", file=sys.stderr)
        return 2
    if a.plots:
        for p in write_plots(a.plots, a.offload, dev):
            print(p)
        return 0
    t0 = time.perf_counter()
    log.info("demo: building the demo DiT on %s (random weights, fixed seed)...", dev)
    model = build_demo_model(dev)
    inputs = demo_inputs(dev)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"demo DiT: {len(model.double_blocks)} double + {len(model.single_blocks)} single blocks, "
          f"{total / 2**20:.1f} MiB of {CONFIGS[_kind(dev)]['dtype']} weights, compute on {dev}", flush=True)
    log.info("demo: reference run, %d steps with every weight resident...", a.steps)
    t1 = time.perf_counter()
    ref, t_res = denoise(model, inputs, a.steps)
    resident_s = statistics.median(t_res[1:] or t_res)
    log.info("demo: reference done in %.1f s; compiling with %.0f%% of the weights off %s (trace, place, "
             "weights into their homes)...", time.perf_counter() - t1, 100 * a.offload, dev)
    handle = dt_compile(model, compute=dev, offload_gb=a.offload * total / 2**30, donors=["cpu"],
                        example_args=inputs, profile=True, progress=True)
    log.info("demo: compiled run, %d steps streaming the offloaded units...", a.steps)
    t1 = time.perf_counter()
    out, t_off = denoise(model, inputs, a.steps)
    same = torch.equal(out, ref)
    log.info("demo: compiled run done in %.1f s; re-planning with the measured unit times...",
             time.perf_counter() - t1)
    print()
    print(handle.placement_table())
    st = handle.stats
    measured = statistics.median(t_off[1:] or t_off)
    pred = (handle.plan.predicted or {}).get("step_s")
    print()
    print(f"step time (steps 2..n, back to back): resident {resident_s * 1e3:.1f} ms, compiled {measured * 1e3:.1f} ms measured, "
          + (f"{pred * 1e3:.1f} ms predicted" if pred else "no prediction"))
    print(f"streamed per step: {sum(st['bytes_per_step'].values()) / 2**20:.1f} MiB through "
          f"{st['window_slots']} slot(s) of {st['slot_bytes'] / 2**20:.1f} MiB")
    # feed measured per-unit compute times back and re-plan
    n = handle.feedback()
    g = handle.graph
    inv = inventory_for(norm_compute(dev), ["cpu"])
    plan2 = partition(g, inv, handle.plan.compute, offload_gb=a.offload * total / 2**30, donors=["cpu"])
    p2 = (plan2.predicted or {}).get("step_s")
    moved = sum(1 for u, v in zip(sorted(handle.plan.units, key=lambda u: u.order),
                                  sorted(plan2.units, key=lambda u: u.order)) if u.device != v.device)
    print(f"re-planned with {n} measured unit times: predicted {p2 * 1e3:.1f} ms, {moved} unit(s) moved"
          if p2 else f"re-planned with {n} measured unit times")
    handle.undo()
    print(f"\noutput bit-identical to the resident model: {same}   ({time.perf_counter() - t0:.1f} s total)")
    return 0 if same else 1


def write_plots(out_dir: str, offload: float = 0.5, device: str | None = None) -> list[str]:
    """The demo DiT compiled with `offload` of its weights off the device, three profiled steps, then
    OUT_DIR/timeline.png (copies vs compute, the last step) and OUT_DIR/placement.png."""
    plots.require()                           # before any work: matplotlib missing fails here
    dev = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    model = build_demo_model(device=dev)
    args = demo_inputs(device=dev)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    h = dt_compile(model, compute=dev, offload_gb=offload * total / 2**30, donors=["cpu"],
                   example_args=args, profile=True, progress=False)
    with torch.no_grad():
        for _ in range(3):
            model(*args)
    os.makedirs(out_dir, exist_ok=True)
    paths = [plots.timeline_png(h.timeline(), os.path.join(out_dir, "timeline.png"), f"demo DiT on {dev}"),
             plots.placement_png(h.plan, os.path.join(out_dir, "placement.png"))]
    h.undo()
    return paths


if __name__ == "__main__":
    sys.exit(main())
