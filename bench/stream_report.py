"""The report side of bench/bench_stream.py: its results markdown (per resolution and offloaded fraction:
resident, floor, distorch, sync_pinned and diffusers step times, prediction error, peak VRAM, host RSS,
bit-identity; the other plans run through the same runtime; the notes).  No torch here: it reads plain rows.

    table(results) -> str
"""
from __future__ import annotations


def table(results: dict) -> str:
    rows = results["rows"]
    out = [f"card: {results['card']}, torch {results['torch']}, {results['date']}; model {results['model_bytes'] / 1e9:.2f} GB bf16; "
           f"pinned H2D {results['pinned_h2d_Bps'] / 1e9:.1f} GB/s", "",
           "| res | offloaded | resident s | floor s | distorch s | x floor | predicted s | pred err | sync_pinned s | diffusers s | distorch vs diffusers | peak GiB | host RSS GiB | bit-identical |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for res in sorted({r["res"] for r in rows}):
        rr = [r for r in rows if r["res"] == res]
        resid = next((r["step_s"] for r in rr if r["method"] == "resident"), None)
        for frac in sorted({r["frac"] for r in rr if r["method"] == "distorch"}):
            ds = [r for r in rr if r["method"] == "distorch" and r["frac"] == frac]
            d = ds[0]
            s = next((r for r in rr if r["method"] == "sync_pinned" and r["frac"] == frac), None)
            g = next((r for r in rr if r["method"] == "diffusers_group" and r["frac"] == frac), None)
            eq = all(r.get("equal") for r in ds + ([s] if s else []) + ([g] if g else []))

            def f(x, k=3):
                return "-" if x is None else f"{x:.{k}f}"
            perr = "-" if d.get("pred_err") is None else "%+.1f%%" % (100 * d["pred_err"])
            vs = "-" if not g else "%.2fx" % (g["step_s"] / d["step_s"])
            out.append(f"| {res} | {frac}% | {f(resid)} | {f(d['floor_s'])} | {f(d['step_s'])} (W={d.get('slots')}) | "
                       f"{f(d['x_floor'], 3)} | {f(d.get('predicted_s'))} | {perr} | "
                       f"{f(s and s['step_s'])} | {f(g and g['step_s'])} | {vs} | {f(d.get('peak_gib'), 1)} | {f(d.get('rss_gib'), 1)} | {eq} |")
    extra = [r for r in rows if r["method"].startswith("distorch_")]
    if extra:
        out += ["", "other plans run through the same runtime (same run):", "",
                "| res | offloaded | plan | step s | x floor | predicted s | streamed GB | slots | bit-identical |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in extra:
            pr = "-" if r.get("predicted_s") is None else "%.3f" % r["predicted_s"]
            out.append(f"| {r['res']} | {r['frac']}% | {r['method']} | {r['step_s']:.3f} | {r['x_floor']:.3f} | {pr} | "
                       f"{r['offloaded_bytes'] / 1e9:.2f} | {r.get('slots')} | {r['equal']} |")
    if results["notes"]:
        out += ["", "notes:"] + [f"- {n}" for n in results["notes"]]
    return "\n".join(out) + "\n"
