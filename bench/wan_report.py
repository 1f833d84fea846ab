"""The report side of bench/bench_comfy_wan.py's workflow mode: the results table (one row per configuration:
cold / warm / reload runs, s/step, peak VRAM, the host RSS breakdown, bit-identity) and the line comparing each
configuration's cold run with the resident one of the same call.

    wf_md(d) -> str      cold_summary(rows) -> [lines]
"""
from __future__ import annotations

import statistics

import comfy_report as R

GiB = 1 << 30


WF_COLUMNS = ("| configuration | s/step warm | s/step cold | cold run s | warm run s | reload run s | peak VRAM GiB | GiB off "
              "(high/low) | RSS before load | peak RSS | RssAnon | RssFile | RssShmem | distorch pinned | ComfyUI "
              "pinned | machine used (peak) | RSS after unload | after dropping models | bit-identical to plain "
              "(high/low) |")


def wf_md(d: dict) -> str:
    def gb(x):
        return "" if x is None else f"{x / GiB:.2f}"
    L = [f"# {d['title']}", "", f"Card: {d['gpu']}; torch {d['torch']}; ComfyUI {d['comfyui']}; date {d['date']}.",
         d["model_line"], f"Command: `{d['command']}`", "",
         "One process per configuration. cold = UNETLoader (or UNETLoaderDisTorch2MultiGPU) + LoraLoaderModelOnly + "
         "ModelSamplingSD3 for both experts and both KSamplerAdvanced phases; warm = both phases again, models "
         "loaded. s/step = median step after each phase's first (progress-hook timestamps after the compute stream is synchronized: bench_util.step_sync). "
         "Peak RSS = the sample with the largest VmRSS (every 50 ms) with its RssAnon / RssFile / RssShmem; pinned "
         "= the largest value during the run; machine used = MemTotal - MemAvailable (pinned memory that VmRSS "
         "does not show is in it, and so is everything else on the machine). RSS after unload: "
         "comfy.model_management.unload_all_models() + gc with the models still referenced (as ComfyUI's node "
         "cache holds them); after dropping models: references deleted + gc. GiB = 2^30 bytes.", "",
         WF_COLUMNS, "|" + "|".join(["---"] + ["---:"] * 17 + ["---"]) + "|"]
    for r in d["rows"]:
        if r.get("error") and "cold_s" not in r:
            L.append(f"| {r['config']} | {r['error']} |" + " |" * 17)
            continue
        pk = max((r.get("peak_vram_cold") or 0), (r.get("peak_vram_warm") or 0))
        rc = max((r.get(f"rss_{k}") or {"at_peak": {}, "max": {}} for k in ("cold", "warm")),
                 key=lambda x: x["at_peak"].get("VmRSS", 0))
        ap, mx = rc["at_peak"], rc["max"]
        off = r.get("off") or {}
        same = r.get("same")
        L.append(
            f"| {r['config']} | {R._f(r.get('s_step_warm'))} | {R._f(r.get('s_step_cold'))} | {R._f(r.get('cold_s'), '%.2f')} | "
            f"{R._f(r.get('warm_s'), '%.2f')} | {R._f(r.get('reload_s'), '%.2f')} | {gb(pk)} | {gb(off.get('high'))}/{gb(off.get('low'))} | "
            f"{gb((r.get('rss_before_load') or {}).get('VmRSS'))} | {gb(ap.get('VmRSS'))} | {gb(ap.get('RssAnon'))} | "
            f"{gb(ap.get('RssFile'))} | {gb(ap.get('RssShmem'))} | {gb(mx.get('distorch_pinned'))} | "
            f"{gb(mx.get('comfy_pinned'))} | {gb(mx.get('sys_used'))} | {gb((r.get('rss_after_unload') or {}).get('VmRSS'))} | "
            f"{gb((r.get('rss_after_drop') or {}).get('VmRSS'))} | "
            f"{'' if same is None else '/'.join('yes' if same[k] else 'NO' for k in ('high', 'low'))}"
            f"{'' if r.get('warm_same_as_cold', True) else ' (warm differs from cold)'}"
            f"{'' if r.get('reload_same_as_cold', True) else ' (reload differs from cold)'}"
            f"{' -- ' + r['error'] if r.get('error') else ''} |")
    L += cold_summary(d["rows"])
    if d.get("skipped"):
        L += ["", "Skipped by the time guard: " + ", ".join(d["skipped"]) + "."]
    for nt in d.get("notes", []):
        L += ["", nt]
    return "\n".join(L) + "\n"


def cold_summary(rows: list) -> list:
    """Cold runs against the resident one of this call (the mean of every plain row: repeat it with
    'plain#2' to see how much a cold run moves between processes), one line per configuration."""
    def base(r):
        return r["config"].split("#")[0]
    plain = [r["cold_s"] for r in rows if base(r) == "plain" and r.get("cold_s")]
    if not plain:
        return []
    ref = statistics.mean(plain)
    by: dict = {}
    for r in rows:
        if base(r) != "plain" and r.get("cold_s"):
            by.setdefault(base(r), []).append(r["cold_s"])
    spread = f", {min(plain):.2f}-{max(plain):.2f} s over {len(plain)} processes" if len(plain) > 1 else ""
    out = ["", f"Cold run against the resident one ({ref:.2f} s{spread}): " + "; ".join(
        f"{c} {statistics.mean(v) / ref:.2f}x" + (f" ({min(v) / ref:.2f}-{max(v) / ref:.2f}x)" if len(v) > 1 else "")
        for c, v in by.items()) + "."]
    return out
