"""The report side of bench/bench_comfy.py (and bench_comfy_wan.py's vram mode): VRAM-true floors, our
curve interpolated at ComfyUI's peaks, the markdown + JSON results, the s/it-against-peak-VRAM chart, and
merging several runs.  No ComfyUI and no torch here: it reads plain rows.
"""
from __future__ import annotations

import json
import os
import sys
import time

GiB = 1 << 30


def say(*a) -> None:
    print("[comfy_report %s]" % time.strftime("%H:%M:%S"), *a, file=sys.stderr, flush=True)


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------
# Analysis: floors, interpolation at equal VRAM, targets
# ------------------------------------------------------------------------------------------------------
def floor_at(peak: float, model_bytes: int, resident_s: float, act: float, bw: float | None) -> float | None:
    """VRAM-true floor of a step that holds `peak` bytes on the device: the weights that do not fit stream."""
    if not bw or resident_s is None:
        return None
    held = max(0.0, peak - act)
    return max(resident_s, max(0.0, model_bytes - held) / bw)


def interp(points: list, x: float) -> float | None:
    """Linear interpolation of y at x on points [(x, y)] (sorted here); None outside their range."""
    pts = sorted(points)
    if not pts or x < pts[0][0] or x > pts[-1][0]:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[0][1]


def resident_step(rows: list) -> float:
    """The resident step of one resolution's rows: the faster of the plain row and the DisTorch2 rows with
    nothing offloaded (the same ops and kernels).  A host-bound step varies from run to run (Flux-dev at
    512x512 on an H200: plain 0.058, 0.124 and 0.063 s/it in three runs), and a floor taken from one slow
    plain run would flatter every row."""
    plain = next(r for r in rows if r["kind"] == "plain")
    same = [r["s_it"] for r in rows if r["kind"] == "distorch" and not r.get("off") and r.get("same")]
    return min([plain["s_it"]] + same)


def analyze(rows: list, model_bytes: int, bw: float | None) -> dict:
    """Per resolution label: plain s/it and activations, each row's floor and ratio, ComfyUI vs ours at equal
    peak VRAM.  Rows get 'floor' and 'x_floor' keys.  Returns {label: {...}}."""
    out = {}
    for lab in dict.fromkeys(r["res"] for r in rows):
        rs = [r for r in rows if r["res"] == lab]
        plain = next((r for r in rs if r["kind"] == "plain"), None)
        if plain is None:
            continue
        act = max(0, plain["peak"] - model_bytes) if plain["peak"] else 0
        resident = resident_step(rs)
        for r in rs:
            f = floor_at(r["peak"], model_bytes, resident, act, bw) if r["peak"] else None
            r["floor"] = f
            r["x_floor"] = r["s_it"] / f if f else None
        ours = [(r["peak"] / GiB, r["s_it"]) for r in rs if r["kind"] == "distorch" and r["peak"]]
        comp = []
        for r in rs:
            if r["kind"] != "comfy":
                continue
            o = interp(ours, r["peak"] / GiB)
            comp.append({"res": lab, "off_gib": r["off"] / GiB, "peak_gib": r["peak"] / GiB, "comfy_s_it": r["s_it"],
                         "ours_s_it": o, "speedup": (r["s_it"] / o) if o else None, "comfy_x_floor": r.get("x_floor")})
        dis = [r for r in rs if r["kind"] == "distorch"]
        for r in dis:        # issue 10 criterion 3: the prediction after profiling against what was measured
            r["pred_err"] = r["pred_step_after"] / r["s_it"] - 1 if r.get("pred_step_after") else None
            gap = r.get("pred_gap")
            r["pred_iter"] = r["pred_step_after"] + gap if r.get("pred_step_after") and gap is not None else None
            r["pred_iter_err"] = r["pred_iter"] / r["s_it"] - 1 if r["pred_iter"] else None
        xf = [r["x_floor"] for r in dis if r.get("x_floor")]
        sp = [c["speedup"] for c in comp if c["speedup"]]
        out[lab] = {"resident_s_it": resident, "plain_s_it": plain["s_it"], "activations": act, "compare": comp,
                    "distorch_points": len(dis), "comfy_points": len(comp),
                    "max_x_floor": max(xf) if xf else None,
                    "pred_iter_errs": [r["pred_iter_err"] for r in dis if r.get("pred_iter_err") is not None],
                    "pred_step_errs": [r["pred_err"] for r in dis if r.get("pred_err") is not None],
                    "min_speedup": min(sp) if sp else None,
                    "all_bit_identical": all(r.get("same") for r in rs if r["kind"] != "plain"),
                    "peak_range_gib": [min(p for p, _ in ours), max(p for p, _ in ours)] if ours else None}
    return out


def _gpu(r: dict) -> str:
    st, gap = r.get("gpu_step"), r.get("gpu_gap")
    return "" if st is None else f"{st * 1e3:.1f} / {gap * 1e3:.1f}" if gap is not None else f"{st * 1e3:.1f} / "


def _f(x, fmt="%.3f", none=""):
    return none if x is None else fmt % x


def render_md(d: dict) -> str:
    """The results document from the JSON-able dict d (rows analysed)."""
    L = [f"# {d['title']}", "",
         f"Card: {d['gpu']}; torch {d['torch']}; ComfyUI {d['comfyui']}; date {d['date']}.",
         d["model_line"],
         f"Command: `{d['command']}`"]
    if d.get("bw"):
        L.append(f"Pinned host->GPU bandwidth probed by distorch: {d['bw'] / 1e9:.1f} GB/s.")
    L += ["", "s/it = median step after the first (the step callback waits for the compute stream only: "
          "bench_util.step_sync); peak = torch.cuda.max_memory_allocated during the sampling "
          "(ComfyUI rows: minus the filler that makes ComfyUI offload); floor = max(resident s/it (the faster of "
          "the plain row and DisTorch2 with nothing offloaded), (model - "
          "(peak - activations)) / pinned bandwidth), activations = plain peak - model; predicted footprint = "
          "plan.predicted['compute_peak_bytes'] (weights + slots + buffers, no activations); predicted step = "
          "plan.predicted['step_s'] at compile, 'after profiling' = handle.stats['predicted_step_s'] after "
          "sampling; runtime step = handle.stats['measured_step_s'] (the profiled step); GPU step / gap = the "
          "median forward on the compute stream and the median time it spent between forwards, over the steps "
          "after the first; host RSS = this process's VmRSS (and RssAnon) "
          "at their peak during the run, sampled every 50 ms. Bit-identical: the latent's bytes equal the "
          "plain row's."]
    for lab, a in d["analysis"].items():
        L += ["", f"## {lab}", "",
              "| configuration | GiB off | peak VRAM GiB | s/it | floor s/it | x floor | pred. footprint GiB "
              "| pred. + act. GiB | pred. step s | pred. after profiling s | runtime step s | GPU step / gap ms "
              "| first step s "
              "| peak host RSS GiB | RssAnon GiB | bit-identical |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted((r for r in d["rows"] if r["res"] == lab),
                        key=lambda r: ({"plain": 0, "distorch": 1, "block": 2, "comfy": 3}[r["kind"]], -r["peak"])):
            pp = r.get("pred_peak")
            L.append(f"| {r['name']} | {r['off'] / GiB:.2f} | {r['peak'] / GiB:.2f} | {r['s_it']:.3f} | "
                     f"{_f(r.get('floor'))} | {_f(r.get('x_floor'), '%.3f')} | {_f(pp and pp / GiB, '%.2f')} | "
                     f"{_f(pp and (pp + a['activations']) / GiB, '%.2f')} | {_f(r.get('pred_step'))} | "
                     f"{_f(r.get('pred_step_after'))} | {_f(r.get('meas_step'))} | {_gpu(r)} | {_f(r.get('first_s'), '%.2f')} | "
                     f"{_f(r.get('rss_peak') and r['rss_peak'] / GiB, '%.2f')} | "
                     f"{_f(r.get('rss_anon_peak') and r['rss_anon_peak'] / GiB, '%.2f')} | "
                     f"{'' if r['kind'] == 'plain' else ('yes' if r.get('same') else 'NO')} |")
        if a["compare"]:
            L += ["", "ComfyUI's own partial loading against ours at the same peak VRAM (ours interpolated "
                  "linearly on the DisTorch2 points):", "",
                  "| ComfyUI GiB off | peak VRAM GiB | ComfyUI s/it | ComfyUI x floor | ours s/it at that VRAM | ComfyUI / ours |",
                  "|---:|---:|---:|---:|---:|---:|"]
            for c in sorted(a["compare"], key=lambda c: -c["peak_gib"]):
                L.append(f"| {c['off_gib']:.2f} | {c['peak_gib']:.2f} | {c['comfy_s_it']:.3f} | "
                         f"{_f(c['comfy_x_floor'])} | {_f(c['ours_s_it'], none='outside our range')} | "
                         f"{_f(c['speedup'], '%.3fx')} |")
        it = a.get("pred_iter_errs") or []
        if it:
            ok = sum(abs(e) <= 0.05 for e in it)
            L += ["", f"Prediction {lab}: predicted step after profiling + the gap between forwards the runtime "
                  f"measured (the sampler's own work) against s/it: within 5 % at {ok} of {len(it)} points "
                  f"({min(it) * 100:+.1f} .. {max(it) * 100:+.1f} %); the step alone: "
                  f"{min(a['pred_step_errs']) * 100:+.1f} .. {max(a['pred_step_errs']) * 100:+.1f} %."]
        L += ["", f"Summary {lab}: {a['distorch_points']} DisTorch2 points"
              + (f" over peak {a['peak_range_gib'][0]:.2f}-{a['peak_range_gib'][1]:.2f} GiB" if a["peak_range_gib"] else "")
              + f", worst {_f(a['max_x_floor'], '%.3fx', 'n/a')} of the floor; {a['comfy_points']} ComfyUI points, "
              f"smallest speedup at equal VRAM {_f(a['min_speedup'], '%.3fx', 'n/a')}; every row bit-identical: "
              f"{'yes' if a['all_bit_identical'] else 'NO'}."]
    if d.get("skipped"):
        L += ["", "Skipped by the time guard: " + ", ".join(d["skipped"]) + "."]
    for n in d.get("notes", []):
        L += ["", n]
    for extra in d.get("extra_md", []):
        L += [""] + extra
    return "\n".join(L) + "\n"


def save_results(d: dict, md_path: str) -> None:
    """md + json side by side (atomic), rows analysed afresh; called after every row."""
    d["analysis"] = analyze(d["rows"], d["total_bytes"], d.get("bw"))
    write_atomic(md_path, render_md(d))
    clean = dict(d)
    clean["rows"] = [{k: v for k, v in r.items() if k != "out"} for r in d["rows"]]
    write_atomic(os.path.splitext(md_path)[0] + ".json", json.dumps(clean, indent=1, default=str))


def plot(json_path: str, png_path: str) -> str:
    """s/it against measured peak VRAM, one panel per resolution: our curve, ComfyUI's points, the floor
    curve, the resident point."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = json.load(open(json_path))
    labs = list(d["analysis"])
    fig, axes = plt.subplots(1, max(1, len(labs)), figsize=(6.2 * max(1, len(labs)), 4.4), squeeze=False)
    M, bw = d["total_bytes"], d.get("bw")
    for ax, lab in zip(axes[0], labs):
        a = d["analysis"][lab]
        rs = [r for r in d["rows"] if r["res"] == lab]
        ours = sorted((r["peak"] / GiB, r["s_it"]) for r in rs if r["kind"] == "distorch")
        if ours:
            ax.plot(*zip(*ours), "o-", color="tab:blue", label="DisTorch2 (this project)")
        blk = sorted((r["peak"] / GiB, r["s_it"]) for r in rs if r["kind"] == "block")
        if blk:
            ax.plot(*zip(*blk), "s", color="tab:purple", ms=7, mfc="none", label="DisTorch2, whole blocks forced")
        com = sorted((r["peak"] / GiB, r["s_it"]) for r in rs if r["kind"] == "comfy")
        if com:
            ax.plot(*zip(*com), "^", color="tab:orange", ms=9, label="ComfyUI's own partial loading")
        plain = next((r for r in rs if r["kind"] == "plain"), None)
        if plain:
            ax.plot([plain["peak"] / GiB], [plain["s_it"]], "*", color="k", ms=13, label="resident (plain loader)")
        if bw and plain and plain["peak"]:
            act = a["activations"]
            lo = act / GiB
            xs = [lo + (plain["peak"] / GiB - lo) * i / 200 for i in range(201)]
            ax.plot(xs, [floor_at(x * GiB, M, a["resident_s_it"], act, bw) for x in xs], ":", color="tab:green",
                    label="VRAM-true floor")
        ax.set_xlabel("peak VRAM during sampling (GiB)")
        ax.set_ylabel("seconds / iteration")
        ax.set_title(f"{d.get('short', '')} {lab}, {d['gpu']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def try_plot(md_path: str) -> None:
    j, png = os.path.splitext(md_path)[0] + ".json", os.path.splitext(md_path)[0] + ".png"
    try:
        say(f"wrote {plot(j, png)}")
    except Exception as e:   # matplotlib may be missing on the GPU machine: plot later from the JSON
        say(f"no chart ({type(e).__name__}: {e}); later: python bench/bench_comfy.py --plot {j} {png}")

def merge(out_md: str, paths: list) -> str:
    """Runs of this benchmark (their JSONs, each with its own resident baseline) as one document and chart:
    every run's rows keep the floor and ratio computed against their own run's resident row; ComfyUI's
    points and the whole-blocks rows are compared with our points of all runs at the same peak VRAM."""
    ds = [json.load(open(p)) for p in paths]
    rows = []
    for k, d in enumerate(ds, 1):
        rows += [dict(r, run=k) for r in d["rows"]]
    labs = list(dict.fromkeys(r["res"] for r in rows))
    L = [f"# {ds[-1]['title']} ({len(ds)} runs merged)", "",
         "Rows from separate device calls, each with its own resident (plain) row; floor and x floor are "
         "computed against the row's own run. Runs:", ""]
    for k, d in enumerate(ds, 1):
        res = ", ".join(f"{lab} {a['resident_s_it']:.3f} s/it" for lab, a in d["analysis"].items())
        L.append(f"- run {k}: {d['gpu']}, {d['date']}, pinned {d.get('bw', 0) / 1e9:.1f} GB/s, resident {res}; "
                 f"`{d['command']}`")
    L += ["", f"Merged by `python bench/bench_comfy.py --merge {out_md} {' '.join(paths)}`."]
    for lab in labs:
        rs = [r for r in rows if r["res"] == lab]
        ours = sorted((r["peak"] / GiB, r["s_it"]) for r in rs if r["kind"] == "distorch")
        L += ["", f"## {lab}", "", "| run | configuration | GiB off | peak VRAM GiB | s/it | x floor | peak host RSS GiB "
              "| bit-identical |", "|---:|---|---:|---:|---:|---:|---:|---|"]
        for r in sorted(rs, key=lambda r: ({"plain": 0, "distorch": 1, "block": 2, "comfy": 3}[r["kind"]], -r["peak"])):
            L.append(f"| {r['run']} | {r['name']} | {r['off'] / GiB:.2f} | {r['peak'] / GiB:.2f} | {r['s_it']:.3f} | "
                     f"{_f(r.get('x_floor'))} | {_f(r.get('rss_peak') and r['rss_peak'] / GiB, '%.2f', 'not recorded')} | "
                     f"{'' if r['kind'] == 'plain' else ('yes' if r.get('same') else 'NO')} |")
        L += ["", "Against ours at the same peak VRAM (linear between our points of all runs):", "",
              "| run | configuration | peak VRAM GiB | its s/it | ours at that VRAM | it / ours |", "|---:|---|---:|---:|---:|---:|"]
        sp = []
        for r in sorted((r for r in rs if r["kind"] in ("comfy", "block")), key=lambda r: -r["peak"]):
            o = interp(ours, r["peak"] / GiB)
            if o and r["kind"] == "comfy":
                sp.append(r["s_it"] / o)
            L.append(f"| {r['run']} | {r['name']} | {r['peak'] / GiB:.2f} | {r['s_it']:.3f} | "
                     f"{_f(o, none='outside our range')} | {_f(o and r['s_it'] / o, '%.3fx')} |")
        xf = [r["x_floor"] for r in rs if r["kind"] == "distorch" and r.get("x_floor")]
        L += ["", f"Summary {lab}: {len(ours)} DisTorch2 points, worst {_f(max(xf) if xf else None, '%.3fx', 'n/a')} "
              f"of the floor; ComfyUI / ours at equal VRAM {', '.join('%.3fx' % x for x in sp) or 'n/a'}; every row "
              f"bit-identical: {'yes' if all(r.get('same') for r in rs if r['kind'] != 'plain') else 'NO'}."]
    write_atomic(out_md, "\n".join(L) + "\n")
    m = dict(ds[-1], rows=rows)
    jpath = os.path.splitext(out_md)[0] + ".json"
    with open(jpath, "w") as fh:
        json.dump(m, fh, indent=1)
    try:
        plot(jpath, os.path.splitext(out_md)[0] + ".png")
    except Exception as e:      # matplotlib missing: the table is the result
        say(f"no chart ({type(e).__name__}: {e})")
    return out_md
