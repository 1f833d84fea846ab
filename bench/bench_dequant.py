"""Dequantization throughput per GGUF type on the compute GPU, against its memory bandwidth.

    PYTHONPATH=<dir holding the package as distorch> python bench/bench_dequant.py [--types Q8_0,Q4_K]

For each type: one Flux-size layer (3072 x 12288, random valid blocks) dequantized to bf16 by each
backend of formats.dequant: the hand-written Triton kernel (default on CUDA; several tile sizes for
the common types), the torch code compiled by torch.compile, and the eager torch code.  Throughput =
(blocks read + bf16 written) / device time, beside a large device-to-device copy (read + write).
Device time is taken with CUDA events while the GPU is kept busy ahead of the host (a sleep kernel
first), so Python launch cost is excluded from it and reported separately as host us/call.

Then every linear weight of a Flux-dev-sized DiT (19 double + 38 single blocks, 304 weights, 11.8 B
parameters; blocks all resident on the GPU) is dequantized once, in order, with the default backend
and with torch.compile: device and host time, beside the 0.181 s step of that model at 1024x1024
measured on an H100 (DESIGN.md).

Correctness on the GPU: Triton output vs gguf-py's numpy dequantizer (rounded once to bf16) on the
first 16 rows, and Triton / compiled vs eager on the whole layer.

Prints a markdown table and writes it to $OUT/dequant.md when OUT is set.  Without CUDA it runs a
tiny CPU version (sanity of the script only).
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

import torch

try:
    from distorch.formats import dequant as dq
except ImportError:  # pragma: no cover - run from a checkout whose folder is not named distorch
    sys.exit("put the folder holding this package (as `distorch`) on PYTHONPATH")
from gguf import GGMLQuantizationType as QT

COMMON = [QT.Q8_0, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.Q4_0]
OTHERS = [QT.Q5_0, QT.Q5_1, QT.Q4_1, QT.Q3_K, QT.Q2_K, QT.IQ4_NL, QT.IQ4_XS]
F16_OFFSETS = {QT.Q8_0: (0,), QT.Q4_0: (0,), QT.Q5_0: (0,), QT.Q4_1: (0, 2), QT.Q5_1: (0, 2),
               QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
               QT.IQ4_NL: (0,), QT.IQ4_XS: (0,)}
STEP_S = 0.181   # Flux-dev-sized DiT, 1024x1024, all resident, one H100 (DESIGN.md)
CUDA = torch.cuda.is_available()


def flux_dev_weights() -> list[tuple[int, int]]:
    """(out, in) of the linear weights of the 57 transformer blocks of Flux-dev, in execution order."""
    h, mlp = 3072, 12288
    double = [(3 * h, h), (h, h), (mlp, h), (h, mlp), (6 * h, h)] * 2      # img + txt streams
    single = [(3 * h + mlp, h), (h, h + mlp), (3 * h, h)]                  # linear1, linear2, modulation
    return [s for _ in range(19) for s in double] + [s for _ in range(38) for s in single]


def random_blocks(qt, n_blocks: int, device, gen=None) -> torch.Tensor:
    """Random bytes, every fp16 scale replaced by a finite value in [-0.05, 0.05]; flat uint8."""
    _, ts = dq.BLOCK_SIZES[qt]
    b = torch.randint(0, 256, (n_blocks, ts), dtype=torch.uint8, device=device, generator=gen)
    for off in F16_OFFSETS[qt]:
        s = (torch.rand(n_blocks, device=device, generator=gen) * 0.1 - 0.05).to(torch.float16)
        b[:, off:off + 2] = s.view(torch.uint8).view(n_blocks, 2)
    return b.reshape(-1)


def measure(fn, n: int, reps: int = 3) -> tuple[float, float]:
    """(device seconds per call, host seconds per call), medians over `reps` rounds of n calls."""
    if not CUDA:
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            ts.append((time.perf_counter() - t0) / n)
        return statistics.median(ts), statistics.median(ts)
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    dev, host = [], []
    for _ in range(reps):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(min(2.0 * wall + 2e-4, 2.0) * 2.0e9))  # GPU busy while the host enqueues
        e0.record()
        h0 = time.perf_counter()
        for _ in range(n):
            fn()
        h1 = time.perf_counter()
        e1.record()
        e1.synchronize()
        dev.append(e0.elapsed_time(e1) / 1e3 / n)
        host.append((h1 - h0) / n)
    return statistics.median(dev), statistics.median(host)


def copy_bandwidth(device, nbytes: int) -> float:
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t, _ = measure(lambda: y.copy_(x), 10)
    del x, y
    return 2 * nbytes / t


def check_vs_gguf(qt, raw: torch.Tensor, rows: int, cols: int, out: torch.Tensor) -> str:
    try:
        import gguf
        import numpy as np
    except ImportError:
        return "n/a (no gguf)"
    bsz, ts = dq.BLOCK_SIZES[qt]
    nb = rows * cols // bsz
    ref = torch.from_numpy(np.ascontiguousarray(
        gguf.quants.dequantize(raw[: nb * ts].cpu().numpy().reshape(rows, -1), qt)))
    got = out.reshape(-1)[: rows * cols].cpu().reshape(rows, cols)
    ref = ref.to(got.dtype)   # the reference's fp32 values rounded once to the output dtype
    if torch.equal(got, ref):
        return f"exact ({rows * cols})"
    bad = got != ref
    d = (got.float() - ref.float()).abs().max().item()
    return f"{int(bad.sum())}/{rows * cols} differ (max {d:.1e})"


def cuda_module_check() -> str:
    """GGUFTensor parameters through nn.Module.to('cuda'), GGUF ops, and the per-call CPU->GPU path."""
    try:
        import torch.nn as nn
        from distorch.formats.gguf_tensor import GGUFTensor, gguf_ops
        out = []
        for qt in (QT.Q8_0, QT.Q4_K):
            bsz, _ = dq.BLOCK_SIZES[qt]
            raw = random_blocks(qt, 512 * 1024 // bsz, "cpu").pin_memory()
            w = GGUFTensor(raw, qt, (512, 1024), torch.bfloat16, name="w")
            dense = w.dequantize(torch.float32)
            lin = nn.Linear(1024, 512, bias=False)
            lin.weight = nn.Parameter(w, requires_grad=False)
            gguf_ops(lin)
            x = torch.randn(8, 1024, device="cuda", dtype=torch.bfloat16)
            y_stream = lin(x)                                   # weight on CPU: bytes cross, then dequant
            lin.to("cuda", non_blocking=True)
            ok_type = isinstance(lin.weight, GGUFTensor) and lin.weight.raw.is_cuda
            y_res = lin(x)
            ref = x.float() @ dense.to(torch.bfloat16).float().cuda().T
            err = ((y_res.float() - ref).abs().max() / ref.abs().max()).item()
            out.append(f"{qt.name}: weight stays GGUF on cuda {ok_type}, resident == per-call "
                       f"{torch.equal(y_res, y_stream)}, max err vs dense / max |y| {err:.1e}")
        return "GGUF module check: " + "; ".join(out)
    except Exception as e:
        return f"GGUF module check failed: {type(e).__name__}: {e}"


def with_backend(name, fn):
    dq.set_backend(name)
    try:
        return fn()
    finally:
        dq.set_backend(None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="", help="comma-separated type names (default: all 12)")
    ap.add_argument("--tiles", default="512,1024,2048,4096", help="Triton tiles tried on the common types")
    ap.add_argument("--n", type=int, default=20, help="calls per timing round")
    ap.add_argument("--budget-s", type=float, default=220.0, help="start no new type after this")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    t_start = time.time()

    device = torch.device("cuda" if CUDA else "cpu")
    rows, cols = (3072, 12288) if CUDA else (256, 1024)
    weights = flux_dev_weights() if CUDA else [(256, 512), (512, 256)] * 4
    n_model = sum(o * i for o, i in weights)
    types = [QT[t.strip().upper()] for t in args.types.split(",") if t.strip()] or COMMON + OTHERS
    tiles = [int(t) for t in args.tiles.split(",") if t.strip()]
    have_triton = CUDA and dq.triton_available()

    card = torch.cuda.get_device_name(0) if CUDA else "cpu"
    bw = copy_bandwidth(device, (2 << 30) if CUDA else (64 << 20))
    head = [
        f"# GGUF dequantization throughput ({card})",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}; "
        f"triton {'yes' if have_triton else 'no'}; command `python bench/bench_dequant.py {' '.join(argv)}`",
        "",
        f"- device-to-device copy (read + write): **{bw / 1e9:.0f} GB/s**",
        f"- layer {rows} x {cols} -> bf16 ({rows * cols * 2 / 1e6:.1f} MB written). GB/s = (blocks read + "
        f"bf16 written) / device time; device time with the GPU kept ahead of the host; host = Python "
        f"cost per call. Median of 3 rounds of {args.n} calls.",
        f"- model: {len(weights)} linear weights of a Flux-dev-sized DiT ({n_model / 1e9:.2f} B params), each "
        f"dequantized once; % of step = device time / {STEP_S} s (Flux-dev 1024x1024 resident, H100)",
        "",
        "| type | bits/w | layer MB | Triton us (tile) | Triton GB/s | % copy BW | Triton host us | "
        "compile us | compile host us | eager us | model ms Triton (host) | model ms compile (host) | "
        "% of step | Triton vs gguf-py | vs eager |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines: list[str] = []
    notes: list[str] = []

    def emit():
        text = "\n".join(head + lines + [""] + notes) + "\n"
        out = os.environ.get("OUT")
        if out:
            with open(os.path.join(out, "dequant.md"), "w") as f:
                f.write(text)
        return text

    gen = torch.Generator(device=device)
    gen.manual_seed(0)
    tile_best: dict[int, list[float]] = {t: [] for t in tiles}
    for qt in types:
        if time.time() - t_start > args.budget_s:
            lines.append(f"| {qt.name} | skipped: time budget ({args.budget_s:.0f} s) spent |")
            continue
        try:
            bsz, ts = dq.BLOCK_SIZES[qt]
            raw = random_blocks(qt, rows * cols // bsz, device, gen)
            in_b, out_b = raw.numel(), rows * cols * 2
            shape = (rows, cols)

            def call():
                return dq.dequantize(raw, qt, shape)

            t_eager, _ = with_backend("eager", lambda: measure(call, max(3, args.n // 4)))
            y_eager = with_backend("eager", call)
            tc0 = time.time()
            y_comp = with_backend("compile", call)
            t_compile_s = time.time() - tc0
            t_comp, h_comp = with_backend("compile", lambda: measure(call, args.n))
            cells_tr = ["n/a"] * 4
            check, vs_eager = "n/a", ("compile " + ("=" if torch.equal(y_comp, y_eager) else "DIFFERS"))
            y = y_comp
            if have_triton:
                best = None
                for tile in (tiles if qt in COMMON else [dq._triton().TILE]):
                    r = raw
                    f = (lambda r=r, tile=tile: dq._triton_run(qt, r, torch.bfloat16, tile=tile))
                    f()
                    t, h = measure(f, args.n)
                    if qt in COMMON:
                        tile_best[tile].append(t)
                    if best is None or t < best[0]:
                        best = (t, h, tile)
                y = with_backend("triton", call)
                t_tr, _, tile = best
                _, h_tr = with_backend("triton", lambda: measure(call, args.n))   # host via dequantize()
                gbs = (in_b + out_b) / t_tr
                cells_tr = [f"{t_tr * 1e6:.0f} ({tile})", f"{gbs / 1e9:.0f}", f"{100 * gbs / bw:.0f} %",
                            f"{h_tr * 1e6:.0f}"]
                vs_eager = ("triton " + ("=" if torch.equal(y, y_eager) else "DIFFERS")) + "; " + vs_eager
            check = check_vs_gguf(qt, raw, 16, cols, y)
            del y, y_eager, y_comp, raw

            raws = [random_blocks(qt, o * i // bsz, device, gen) for o, i in weights]

            def run_model():
                for (o, i), r in zip(weights, raws):
                    dq.dequantize(r, qt, (o, i))
            m_def = measure(run_model, 1) if have_triton else (float("nan"), float("nan"))
            m_cmp = with_backend("compile", lambda: measure(run_model, 1))
            del raws
            m_best = m_def[0] if have_triton else m_cmp[0]
            lines.append(
                f"| {qt.name} | {8 * ts / bsz:.2f} | {in_b / 1e6:.1f} | " + " | ".join(cells_tr[:3]) +
                f" | {cells_tr[3]} | {t_comp * 1e6:.0f} | {h_comp * 1e6:.0f} | {t_eager * 1e6:.0f} | "
                f"{m_def[0] * 1e3:.1f} ({m_def[1] * 1e3:.1f}) | {m_cmp[0] * 1e3:.1f} ({m_cmp[1] * 1e3:.1f}) | "
                f"{100 * m_best / STEP_S:.1f} % | {check} | {vs_eager} |")
            notes.append(f"- {qt.name}: first torch.compile {t_compile_s:.1f} s")
        except Exception as e:  # keep going: one broken type must not hide the others
            dq.set_backend(None)
            lines.append(f"| {qt.name} | error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''} |")
        if CUDA:
            torch.cuda.empty_cache()
        print(lines[-1], file=sys.stderr, flush=True)
        emit()

    if any(tile_best.values()):
        notes.append("- Triton tile (weights per program) vs device time summed over the common types: " +
                     ", ".join(f"{t}: {sum(v) * 1e6:.0f} us" for t, v in tile_best.items() if v) +
                     f" (default tile {dq._triton().TILE})")
    # small-tensor cost of one call (the runtime calls it per weight per step)
    try:
        small = random_blocks(QT.Q8_0, 3072 * 3072 // 32, device, gen)
        for name in (["triton"] if have_triton else []) + ["compile", "eager"]:
            t, h = with_backend(name, lambda: measure(lambda: dq.dequantize(small, QT.Q8_0, (3072, 3072)), 50))
            notes.append(f"- one Q8_0 3072x3072 call, {name}: {t * 1e6:.0f} us device, {h * 1e6:.0f} us host")
    except Exception as e:
        notes.append(f"- small-call measurement failed: {type(e).__name__}: {e}")
    if CUDA:
        notes.append("- " + cuda_module_check())
    notes.append(f"- bench wall time {time.time() - t_start:.0f} s")
    print(emit())
    return 0


if __name__ == "__main__":
    sys.exit(main())
