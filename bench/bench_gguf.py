"""GGUF end to end on one GPU: a Flux-dev-sized DiT with Q8_0 and Q4_K weights at 1024x1024.

Model: diffusers FluxTransformer2DModel default config (guidance_embeds=True; 19 + 38 blocks), built on
meta, to_empty on the GPU, random bf16 weights (bench_stream's setup).  Every nn.Linear whose
in_features is a multiple of 256 gets GGUF weights (x_embedder, 64 inputs, stays bf16; biases and norms
stay bf16): Q8_0 quantized from the bf16 weights in torch on the GPU (formats.testing.quantize_q8_0),
Q4_K random valid blocks built on the GPU (formats.testing.random_blocks).  The layers become GGUF ops
(dequantize on the compute device at every call).

Methods (one process; compare only numbers of the same run):
  resident_bf16        the bf16 model, all on the GPU
  resident_q           GGUF model, quantized bytes resident, dequantized every call (the reference output)
  distorch_q_100       all 57 blocks offloaded to pinned host homes through runtime.apply: quantized
                       bytes copied into a --slots ring on a copy stream; after the copy event each
                       unit's GGUF tensors are dequantized by one launch per run of same-type tensors
                       (runtime.gguf_stream.UnitDequant)
  distorch_q_100_perlayer  the same with unit_dequant=False: each layer dequantizes its own weight
                       (one launch per layer; --ab)
  comfy_gguf_pinned    ComfyUI-GGUF-style: every GGUF weight's bytes in pinned host memory, copied
                       synchronously (non_blocking=False) right before its layer runs, then dequantized;
                       no prefetch (biases/norms stay on the GPU)
  comfy_gguf_pageable  the same from pageable host memory
  floor                max(resident_bf16 step, streamed quantized bytes / pinned H2D bandwidth)

Outputs: distorch_q_100 and both comfy-style runs are compared bit for bit with resident_q.
Step time: steps back to back, CUDA events between steps, median of --reps after --warmup.
After each timed distorch run, 3 more steps run with the runtime's profiling on (events around every
copy and unit; not in the timed steps): copy time per step (sum over the copy stream), the in-step
copy rate, the stall of compute waiting for copies, and host time per step (root pre- to post-hook).
Link probe: pinned host->GPU rate from torch's pinned allocator (2 GiB, the floor's rate) and from a
runtime.arena.HostArena (the homes' memory: one cudaHostRegister), in unit-sized copies back to back.

    PYTHONUNBUFFERED=1 python bench/bench_gguf.py --out $OUT            # H100
    python bench/bench_gguf.py --device cpu --small --out /tmp/g        # checks the script on CPU
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stream_kit as K  # noqa: E402  (the --device cpu switch _CPU, _sync, peak VRAM)
from bench_util import bit_equal  # noqa: E402
from gguf_model import block_graph, requantize  # noqa: E402
from gguf_report import table  # noqa: E402
from stream_baselines import ComfyStyle  # noqa: E402
from stream_kit import build_model, link_probe, log, make_inputs, pinned_bw, profiled_steps, run_steps  # noqa: E402

GiB = 1 << 30


def profile_steps(rt, model, kw, steps: int = 3) -> dict:
    """A few steps with the runtime's profiling on: copy/compute/stall/host per step."""
    st, tl = profiled_steps(rt, model, kw, steps)
    streamed = sum(st["bytes_per_step"].values())
    d = {k: st.get(k) for k in ("copy_s", "compute_busy_s", "stall_s", "measured_host_s", "measured_step_s")}
    if st.get("copy_s"):
        d["copy_rate_Bps"] = streamed / st["copy_s"]
    return d, tl


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--small", action="store_true", help="tiny config (2+3 blocks, width 256) for a CPU check")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--slots", type=int, default=8,
                    help="ring slots of the 100%% run (the H100 result in bench/results/gguf_h100.md used 3)")
    ap.add_argument("--qtypes", default="Q8_0,Q4_K")
    ap.add_argument("--no-pageable", action="store_true")
    ap.add_argument("--ab", action="store_true",
                    help="also run the 100%% plan with per-layer dequantization (unit_dequant=False)")
    ap.add_argument("--compile-frac", type=int, default=50,
                    help="also run distorch.compile (trace+partition+quant_choice) offloading this %% (Q8_0; 0: skip)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    K._CPU = a.device == "cpu"
    dev = "cpu:0" if K._CPU else "cuda:0"
    from distorch.compiler.plan import Plan, PlacedUnit
    from distorch.formats import dequant as dq
    from distorch.formats import testing as ft
    from distorch.runtime import gguf_stream as gs
    from distorch.runtime import stats as rstats
    from distorch.runtime.apply import apply

    cfg = dict(guidance_embeds=True)
    res = a.res
    if a.small:
        cfg.update(num_layers=2, num_single_layers=3, attention_head_dim=128, num_attention_heads=2,
                   joint_attention_dim=256, pooled_projection_dim=256, axes_dims_rope=(16, 56, 56))
        res = min(res, 128)
        a.txt = min(a.txt, 16)
    card = "cpu" if K._CPU else torch.cuda.get_device_name(0)
    log(f"card {card}, torch {torch.__version__}, cfg {cfg}, res {res}")
    results = {"card": card, "torch": torch.__version__, "cfg": cfg, "res": res, "txt": a.txt,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
               "warmup": a.warmup, "reps": a.reps, "slots": a.slots, "rows": [], "notes": []}
    rows = results["rows"]

    def save():
        with open(os.path.join(a.out, "gguf.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    t0 = time.perf_counter()
    model = build_model(cfg, dev)
    K._sync()
    graph, total = block_graph(model)
    results["bf16_bytes"] = total
    log(f"model built in {time.perf_counter() - t0:.1f} s: {total / 1e9:.2f} GB bf16")
    bw = pinned_bw(dev)
    results["pinned_h2d_Bps"] = bw
    results["link"] = link_probe(dev)
    results["dequant_backend"] = dq.get_backend() + (" (triton)" if (not K._CPU and dq.triton_available()) else "")
    kw = make_inputs(cfg, res, a.txt, dev)

    def run(label, qtype, **extra):
        gc.collect()
        K._reset_peak()
        med, ts, out, wall = run_steps(model, kw, a.warmup, a.reps)
        row = dict(method=label, qtype=qtype, step_s=med, steps=ts, peak_gib=K._peak_gib(),
                   host_s=wall / (a.warmup + a.reps), **extra)
        rows.append(row)
        log(f"{label:<22} {qtype:<5} {med * 1e3:8.1f} ms  (steps {', '.join(f'{t * 1e3:.0f}' for t in ts)}) "
            f"peak {row['peak_gib']:.1f} GiB " + " ".join(f"{k}={v}" for k, v in extra.items()
                                                         if not isinstance(v, float)))
        save()
        return med, out

    bf16_s, _ = run("resident_bf16", "bf16")
    gen = torch.Generator(device="cpu" if K._CPU else dev).manual_seed(7)
    first = True
    for qt in [q.strip() for q in a.qtypes.split(",") if q.strip()]:
        tq = time.perf_counter()
        if first:
            n = ft.quantize_module(model, qt, min_in=256, generator=gen, progress=True) if qt == "Q8_0" else \
                ft.quantize_module(model, "Q8_0", min_in=256, progress=True) and requantize(model, qt, gen)
            first = False
        else:
            n = requantize(model, qt, gen)
        K._sync()
        gc.collect()
        if not K._CPU:
            torch.cuda.empty_cache()
        graph, stored = block_graph(model)
        qbytes = sum(w.raw.numel() for w in model.parameters() if gs.is_gguf(w))
        log(f"{qt}: {n} GGUF weights, {qbytes / 1e9:.2f} GB quantized, model {stored / 1e9:.2f} GB stored "
            f"({time.perf_counter() - tq:.1f} s)")
        results.setdefault("models", {})[qt] = {"gguf_tensors": n, "gguf_bytes": qbytes, "stored_bytes": stored}
        if not K._CPU:
            dq.warmup([qt], device=dev)
        # ---- resident quantized (reference)
        rq_s, ref = run("resident_q", qt)
        ref = ref.clone()
        # ---- ours, every block offloaded to pinned host homes
        pu = [PlacedUnit(u.name, u.type, u.bytes, dev if u.kind == "root" else "cpu", i, u.kind)
              for i, u in enumerate(graph.units)]
        big = max(u.bytes for u in graph.units if u.kind != "root")
        plan = Plan(compute=dev, units=pu, window_bytes=a.slots * big, source={"bench": "gguf 100%"},
                    quant={u.name: gs.STREAMED_Q for u in graph.units if u.kind != "root"})
        for ud in ([True, False] if a.ab else [True]):
            label = "distorch_q_100" if ud else "distorch_q_100_perlayer"
            ta = time.perf_counter()
            rt = apply(model, plan, progress=True, unit_dequant=ud)
            K._sync()
            t_apply = time.perf_counter() - ta
            try:
                off_s, out = run(label, qt)
                eq = bit_equal(out, ref)
                st = rstats.summarize(rt)
                streamed = sum(st["bytes_per_step"].values())
                rows[-1].update(equal=eq, streamed_bytes=streamed, slots=st["window_slots"],
                                deviations=st["deviations"], apply_s=t_apply, unit_dequant=ud,
                                dq_scratch_bytes=rt.dq_scratch_bytes,
                                pinned=all(x.pinned for x in rt.arenas.values()))
                prof, tl = profile_steps(rt, model, kw)
                rows[-1]["profile"] = prof
                rows[-1]["timeline"] = tl          # one profiled step (plots.timeline_png can redraw it)
                if tl and not K._CPU:
                    from distorch.runtime import plots
                    try:
                        plots.timeline_png(tl, os.path.join(a.out, f"gguf_timeline_{qt}_{label}.png"),
                                           title=f"{qt} 100 % offloaded, {label}: one step")
                    except Exception as e:      # plotting is optional (matplotlib)
                        log("timeline plot skipped:", repr(e))
            finally:
                rt.undo()
                K._sync()
                del rt
                gc.collect()
            floor = max(bf16_s, streamed / bw)
            rows[-1].update(floor_s=floor, x_floor=off_s / floor, x_bf16=off_s / bf16_s)
            cr = prof.get("copy_rate_Bps")
            log(f"  {label} {qt}: {off_s * 1e3:.1f} ms = {off_s / bf16_s:.3f}x resident bf16, floor "
                f"{floor * 1e3:.1f} ms (x{off_s / floor:.3f}), streamed {streamed / 1e9:.2f} GB/step, bit-identical "
                f"{eq}; profiled: copy {1e3 * (prof.get('copy_s') or 0):.1f} ms "
                f"({(cr or 0) / 1e9:.1f} GB/s), stall {1e3 * (prof.get('stall_s') or 0):.1f} ms, host "
                f"{1e3 * (prof.get('measured_host_s') or 0):.1f} ms")
            save()
        # ---- distorch.compile: trace + partition + quant_choice (resident units dequantized if VRAM allows)
        if a.compile_frac and qt == "Q8_0":
            hc = None
            try:
                import distorch
                tc = time.perf_counter()
                hc = distorch.compile(model, compute=dev, offload_gb=a.compile_frac / 100 * stored / GiB,
                                      donors=["cpu"], example_kwargs={k: v for k, v in kw.items()
                                                                      if k != "return_dict"}, progress=False)
                K._sync()
                t_c = time.perf_counter() - tc
                c_s, out = run(f"distorch_compile_{a.compile_frac}", qt)
                st = rstats.summarize(hc.runtime)
                qp = hc.plan.predicted.get("quant", {})
                rows[-1].update(equal=bit_equal(out, ref), streamed_bytes=sum(st["bytes_per_step"].values()),
                                slots=st["window_slots"], compile_s=t_c,
                                predicted_s=hc.plan.predicted.get("step_s"),
                                dequantized_units=len(qp.get("dequantized_units", [])),
                                quant_units=len(hc.plan.quant), x_bf16=c_s / bf16_s,
                                window_slots_chosen=st["window_slots"])
                # calibration of the compute-rate estimate: the traced FLOPs over the resident bf16 step
                if hc.graph is not None and not K._CPU:
                    from distorch.compiler.inventory import probe
                    fl = sum(u.flops * max(1, u.calls) for u in hc.graph.units)
                    rate = probe(progress=False).rate(dev)
                    results["calibration"] = {"traced_flops": fl, "bf16_step_s": bf16_s,
                                              "dit_rate_flops": fl / bf16_s, "inventory_rate_flops": rate,
                                              "predicted_bf16_compute_s": fl / rate}
                    log(f"  calibration: traced {fl / 1e12:.1f} TFLOP per step, resident bf16 runs at "
                        f"{fl / bf16_s / 1e12:.0f} TFLOP/s; inventory rate {rate / 1e12:.0f} TFLOP/s")
                log(f"  compile {a.compile_frac}%: {c_s * 1e3:.1f} ms, predicted "
                    f"{(hc.plan.predicted.get('step_s') or 0) * 1e3:.1f} ms, {rows[-1]['dequantized_units']} of "
                    f"{len(hc.plan.quant)} GGUF units dequantized resident, equal {rows[-1]['equal']}")
            except Exception as e:
                results["notes"].append(f"compile run failed: {type(e).__name__}: {e}")
                log("compile run failed:", repr(e))
            finally:
                if hc is not None:
                    hc.undo()
                K._sync()
                gc.collect()
                if not K._CPU:
                    torch.cuda.empty_cache()
            save()
        # ---- ComfyUI-GGUF-style: synchronous copy + dequant per call, no prefetch
        for pinned in ([True] if a.no_pageable else [True, False]):
            label = "comfy_gguf_" + ("pinned" if pinned else "pageable")
            cs = ComfyStyle(model, pinned, dev)
            try:
                c_s, out = run(label, qt)
                rows[-1].update(equal=bit_equal(out, ref), streamed_bytes=cs.nbytes, pinned=cs.pinned,
                                floor_s=floor, x_floor=c_s / floor, x_bf16=c_s / bf16_s)
            finally:
                cs.undo()
                del cs
                gc.collect()
            save()
        del ref
    md = table(results)
    print(md)
    with open(os.path.join(a.out, "gguf.md"), "w") as f:
        f.write(md)
    save()
    return 0



if __name__ == "__main__":
    sys.exit(main())
