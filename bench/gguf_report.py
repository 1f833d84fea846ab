"""The report side of bench/bench_gguf.py: its results markdown (one line per weights type and method: step
time against resident bf16 and the link floor, streamed bytes, peak VRAM, bit-identity, the profiled copy /
stall / host breakdown; the Q8_0 target, the compute-rate calibration, the link probe, the notes).

    table(results) -> str      prof_cell(profile) -> str
"""
from __future__ import annotations


def prof_cell(p) -> str:
    if not p or not p.get("copy_s"):
        return "-"
    return (f"{p['copy_s'] * 1e3:.1f} / {(p.get('copy_rate_Bps') or 0) / 1e9:.1f} / {(p.get('stall_s') or 0) * 1e3:.1f}"
            f" / {(p.get('measured_host_s') or 0) * 1e3:.1f}")


def table(results: dict) -> str:
    rows = results["rows"]
    bf = next(r for r in rows if r["method"] == "resident_bf16")
    out = [f"card: {results['card']}, torch {results['torch']}, {results['date']}; {results['res']}x{results['res']}, "
           f"{results['txt']} text tokens; bf16 model {results['bf16_bytes'] / 1e9:.2f} GB; pinned H2D "
           f"{results['pinned_h2d_Bps'] / 1e9:.1f} GB/s; dequant backend {results.get('dequant_backend')}; "
           f"median of {results['reps']} steps after {results['warmup']} warm-up", "",
           "| weights | method | step s | x resident bf16 | floor s | x floor | streamed GB/step | peak GiB | "
           "bit-identical to resident-quantized | profiled: copy ms / GB/s / stall ms / host ms |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    out.append(f"| bf16 | resident | {bf['step_s']:.3f} | 1.000 | - | - | 0 | {bf['peak_gib']:.1f} | - | - |")
    for r in rows:
        if r is bf:
            continue
        name = {"resident_q": "resident quantized (dequant per call)",
                "distorch_q_100": f"DisTorch, 100 % offloaded (W={r.get('slots')}), one dequant launch per unit",
                "distorch_q_100_perlayer": f"DisTorch, 100 % offloaded (W={r.get('slots')}), dequant per layer",
                "comfy_gguf_pinned": "ComfyUI-GGUF-style, pinned host",
                "comfy_gguf_pageable": "ComfyUI-GGUF-style, pageable host"}.get(r["method"], r["method"])
        if r["method"].startswith("distorch_compile_"):
            name = (f"distorch.compile, {r['method'].rsplit('_', 1)[1]} % offloaded, {r.get('dequantized_units')}/"
                    f"{r.get('quant_units')} GGUF units dequantized resident (predicted "
                    f"{(r.get('predicted_s') or 0):.3f} s)")
        fl = r.get("floor_s")
        sb = r.get("streamed_bytes")
        eq = r.get("equal")
        out.append(f"| {r['qtype']} | {name} | {r['step_s']:.3f} | {r['step_s'] / bf['step_s']:.3f} | "
                   f"{'-' if fl is None else f'{fl:.3f}'} | {'-' if fl is None else '%.3f' % (r['step_s'] / fl)} | "
                   f"{'-' if sb is None else f'{sb / 1e9:.2f}'} | {r['peak_gib']:.1f} | "
                   f"{'reference' if r['method'] == 'resident_q' else eq} | {prof_cell(r.get('profile'))} |")
    q8 = next((r for r in rows if r["method"] == "distorch_q_100" and r["qtype"] == "Q8_0"), None)
    if q8:
        out += ["", f"Target (Q8_0 fully offloaded within 1.3x of resident bf16): {q8['x_bf16']:.3f}x -> "
                f"{'met' if q8['x_bf16'] <= 1.3 else 'NOT met'}"]
    cal = results.get("calibration")
    if cal:
        out += ["", f"Compute-rate calibration: traced {cal['traced_flops'] / 1e12:.1f} TFLOP per step; resident bf16 "
                f"runs them at {cal['dit_rate_flops'] / 1e12:.0f} TFLOP/s; the probed inventory rate (GEMM x GEMM_EFFICIENCY) is "
                f"{cal['inventory_rate_flops'] / 1e12:.0f} TFLOP/s"]
    if results.get("link"):
        out += ["", "Link probe (pinned host->GPU, unit-sized copies back to back, best of 3): " +
                ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in results["link"].items())]
    if results["notes"]:
        out += ["", "notes:"] + [f"- {n}" for n in results["notes"]]
    return "\n".join(out) + "\n"
