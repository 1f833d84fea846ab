"""The report side of bench/bench_comfy_codec.py: the headline (issue 14's targets, met or not), the
results markdown, and the md + json pair written after every row.

    headline(d) -> dict      render(d) -> str      save_results(d, md_path)
"""
from __future__ import annotations

import os

from comfy_report import _f, write_atomic

GiB = 1 << 30
# targets of issue 14, criterion 4
TARGET_X_FLOOR, TARGET_S_IT_H200, TARGET_HOMES = 0.75, 0.32, 0.72


def _gib(x, fmt="%.2f", none=""):
    return _f(None if x is None else x / GiB, fmt, none)


def _yes(x) -> str:
    return "" if x is None else ("yes" if x else "NO")


def _rows(rows: list, cells: int, time_key: str, fmt) -> list[str]:
    """One table line per result row: fmt(row, its s/it or s/encode over the raw link floor), or, for a row
    that failed, its error in the second of `cells` cells."""
    out = []
    for r in rows:
        if r.get("error"):
            out.append(f"| {r['name']} | failed: {r['error'][:160]} |" + " |" * (cells - 2))
        else:
            out.append(fmt(r, r[time_key] / r["raw_floor"] if r.get("raw_floor") else None))
    return out


def _met(x, target) -> str:
    return "" if x is None else ("yes" if x <= target else "no")


def headline(d: dict) -> dict:
    """The numbers the issue's criterion asks for, from the rows done so far (None: not measured)."""
    rows, allv = d["rows"], d["all_gb"]

    def pick(kind, mode=None, v=None):
        return next((r for r in rows if r["kind"] == kind and r.get("mode") == mode and r.get("v") == v
                     and not r.get("error")), None)
    comp, raw = pick("distorch", "on", allv), pick("distorch", "off", allv)
    ref_off = (raw or comp or {}).get("off")
    bw = d.get("bw")
    raw_floor = ref_off / bw if (ref_off and bw) else None
    h = {"raw_floor_s": raw_floor, "raw_s_it": (raw or {}).get("s_it"), "comp_s_it": (comp or {}).get("s_it"),
         "raw_x": None, "comp_x": None, "homes_raw": None, "homes_comp": None,
         "ratio": (comp or {}).get("ratio"), "decode_gbps": (d.get("decode") or {}).get("gbps"),
         "all_identical": all(r.get("same") for r in rows if r["kind"] != "plain" and not r.get("error")),
         "comp_codec": (comp or {}).get("codec") is not None if comp else None,
         "failed": [r["name"] for r in rows + d.get("clip", []) if r.get("error")],
         "plain_s_it": next((r["s_it"] for r in rows if r["kind"] == "plain"), None)}
    if raw_floor:
        h["raw_x"] = h["raw_s_it"] / raw_floor if h["raw_s_it"] else None
        h["comp_x"] = h["comp_s_it"] / raw_floor if h["comp_s_it"] else None
    for key, r in (("homes_raw", raw), ("homes_comp", comp)):
        if r and ref_off:
            h[key] = r["home_bytes"] / ref_off if r.get("home_bytes") else None
            h[key + "_pinned"] = r["pinned_peak"] / ref_off if r.get("pinned_peak") else None
    clip = {r.get("mode"): r for r in d.get("clip", []) if not r.get("error")}
    h["clip_raw_s"] = (clip.get("off") or {}).get("enc_s")
    h["clip_comp_s"] = (clip.get("on") or {}).get("enc_s")
    h["clip_ratio"] = (clip.get("on") or {}).get("ratio")
    h["clip_identical"] = all(r.get("same") for r in d.get("clip", []) if r.get("mode") and not r.get("error")) \
        if d.get("clip") else None
    return h


def render(d: dict) -> str:
    h = d["headline"]
    bw = d.get("bw")
    on_h200 = "H200" in d["gpu"]
    L = [f"# {d['title']}", "",
         f"Card: {d['gpu']}; torch {d['torch']}; ComfyUI {d['comfyui']}; date {d['date']}.",
         d["model_line"], f"Command: `{d['command']}`",
         f"Pinned host->GPU bandwidth probed by distorch: {bw / 1e9:.1f} GB/s." if bw else
         "No pinned bandwidth (CPU run): link floors n/a.", "",
         "## Headline", "",
         "| measure | raw | compressed | target | met |", "|---|---:|---:|---|---|",
         f"| fully offloaded (virtual_vram_gb={d['all_gb']:g}) s/it | {_f(h['raw_s_it'])} | {_f(h['comp_s_it'])} | "
         f"<= {TARGET_S_IT_H200} on the H200 | {_met(h['comp_s_it'], TARGET_S_IT_H200) if on_h200 else 'n/a'} |",
         f"| s/it / today's raw link floor ({_f(h['raw_floor_s'], '%.3f s', 'n/a')} = raw offloaded bytes / pinned "
         f"bandwidth) | {_f(h['raw_x'])} | {_f(h['comp_x'])} | <= {TARGET_X_FLOOR} | "
         f"{_met(h['comp_x'], TARGET_X_FLOOR)} |",
         f"| host bytes of the homes / raw offloaded bytes (runtime's home_bytes) | {_f(h['homes_raw'])} | "
         f"{_f(h['homes_comp'])} | <= {TARGET_HOMES} | {_met(h['homes_comp'], TARGET_HOMES)} |",
         f"| pinned host bytes (peak, measured) / raw offloaded bytes | {_f(h.get('homes_raw_pinned'))} | "
         f"{_f(h.get('homes_comp_pinned'))} | <= {TARGET_HOMES} | {_met(h.get('homes_comp_pinned'), TARGET_HOMES)} |",
         f"| compression ratio (stored / raw bytes of the coded tensors) | | "
         f"{_f(h['ratio'], '%.4f', 'null' if h['comp_codec'] is False else '')} | | |",
         f"| decode GB/s (Triton, {(d.get('decode') or {}).get('weight', '')}) | | "
         f"{_f(h['decode_gbps'], '%.0f', 'n/a')} | | |",
         f"| every DisTorch2 / ComfyUI latent bit-identical to the plain loader's | | {_yes(h['all_identical'])} | "
         f"bit-identical | {_yes(h['all_identical'])} |"]
    if d.get("clip"):
        L.append(f"| text encoder ({d['encoder']}, virtual_vram_gb={d['clip_gb']:g}): later encodes s | "
                 f"{_f(h['clip_raw_s'])} | "
                 f"{_f(h['clip_comp_s'])} | | |")
        L.append(f"| text encoder: ratio; conditioning bit-identical to the plain CLIP's | | "
                 f"{_f(h['clip_ratio'], '%.4f', 'null')}; {_yes(h['clip_identical'])} | bit-identical | "
                 f"{_yes(h['clip_identical'])} |")
    if h["comp_s_it"] and h["comp_x"] and h["homes_comp"]:
        L += ["", f"Compressed, fully offloaded: {h['comp_s_it']:.3f} s/it = {h['comp_x']:.3f}x today's raw link floor "
              f"({h['raw_floor_s']:.3f} s; raw streaming gives {_f(h['raw_s_it'])} s/it, resident "
              f"{_f(h['plain_s_it'])} s/it); the homes hold {h['homes_comp']:.3f}x the raw offloaded bytes "
              f"(measured ratio {_f(h['ratio'], '%.4f', 'null')})."]
    L += ["", "s/it = median step after the first; peak VRAM = torch.cuda.max_memory_allocated through the sampling "
          "(load and compression included; ComfyUI rows: minus the filler that makes ComfyUI offload), 'steps' = the "
          "steps after the first alone; cold s = node call to the end of the first step (plan, load, compression, "
          "first step); encode s = the runtime's compression time (stats codec encode_s); ratio and stored GiB = "
          "stats codec (null: the runtime compressed nothing); streamed = bytes one step moves (stats bytes_per_step); "
          "link floor = streamed / pinned bandwidth; x raw floor = s/it / (raw offloaded bytes / pinned bandwidth); "
          "homes = host bytes the runtime's homes hold (stats home_bytes); pinned = distorch's pinned bytes at their "
          "peak; host RSS = this process's VmRSS at its peak, RssAnon / RssFile / RssShmem at theirs (50 ms "
          "samples), VmRSS before the node call and after sampling. Bit-identical: the latent's bytes equal the "
          "plain row's.", "",
          f"## Flux-dev-shaped model, {d['res']}x{d['res']}", "",
          "| configuration | GiB off | peak VRAM GiB | peak steps GiB | s/it | cold s | encode s | ratio | stored GiB "
          "| streamed GiB/step | link floor s | x raw floor | homes GiB | pinned GiB | peak RSS GiB | RssAnon | RssFile "
          "| RssShmem | RSS before / after GiB | bit-identical |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    L += _rows(d["rows"], 20, "s_it", lambda r, xr: (
        f"| {r['name']} | {_gib(r.get('off'))} | {_gib(r.get('peak'))} | {_gib(r.get('peak_steps'))} | "
        f"{r['s_it']:.3f} | {_f(r.get('cold_s'), '%.1f')} | {_f(r.get('encode_s'), '%.1f')} | "
        f"{_f(r.get('ratio'), '%.4f', 'null' if r['kind'] == 'distorch' else '')} | "
        f"{_gib(r.get('stored_bytes'))} | {_gib(r.get('streamed'))} | {_f(r.get('floor'))} | {_f(xr)} | "
        f"{_gib(r.get('home_bytes'))} | {_gib(r.get('pinned_peak'))} | {_gib(r.get('rss_peak'))} | "
        f"{_gib(r.get('rss_anon_peak'))} | {_gib(r.get('rss_file_peak'))} | {_gib(r.get('rss_shmem_peak'))} | "
        f"{_gib(r.get('rss_before'))} / {_gib(r.get('rss_after'))} | "
        f"{'' if r['kind'] == 'plain' else _yes(r.get('same'))} |"))
    dec = d.get("decode")
    if dec:
        L += ["", "## Decode", ""]
        if dec.get("gbps"):
            L.append(f"formats.bf16_codec.decode_triton on the model's `{dec['weight']}` {tuple(dec['shape'])} "
                     f"(bf16, coded by formats.bf16_encode.encode, widths {tuple(dec['widths'])}, ratio "
                     f"{dec['ratio']:.4f}, host encoder {dec['encode_mbps']:.0f} MB/s): {dec['gbps']:.0f} GB/s of "
                     f"decoded output, median of 3 x {d['decode_reps']} launches timed with CUDA events (a device "
                     f"copy of the same bytes: {dec['copy_gbps']:.0f} GB/s); bit-exact: {_yes(dec['exact'])}. At "
                     f"that rate the whole model decodes in {d['total_bytes'] / (dec['gbps'] * 1e9):.3f} s.")
        else:
            L.append(f"`{dec['weight']}` {tuple(dec['shape'])}: {dec.get('note', 'n/a')}")
    if d.get("clip"):
        L += ["", f"## Text encoder ({d['encoder']}) through the CLIP DisTorch2 node, virtual_vram_gb={d['clip_gb']:g}",
              "", d.get("clip_line", ""), "",
              "| configuration | GiB off | first encode s | later encodes s (median) | cold s | peak VRAM GiB "
              "| peak later GiB | encode s | ratio | stored GiB | homes GiB | link floor s | x raw floor | peak RSS GiB "
              "| conditioning bit-identical |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        L += _rows(d["clip"], 15, "enc_s", lambda r, xr: (
            f"| {r['name']} | {_gib(r.get('off'))} | {r['first_s']:.3f} | {r['enc_s']:.3f} | "
            f"{_f(r.get('cold_s'), '%.1f')} | {_gib(r.get('peak'))} | {_gib(r.get('peak_later'))} | "
            f"{_f(r.get('encode_s'), '%.1f')} | {_f(r.get('ratio'), '%.4f', 'null' if r.get('mode') else '')} | "
            f"{_gib(r.get('stored_bytes'))} | {_gib(r.get('home_bytes'))} | {_f(r.get('floor'))} | {_f(xr)} | "
            f"{_gib(r.get('rss_peak'))} | {'' if not r.get('mode') else _yes(r.get('same'))} |"))
    if h["failed"]:
        L += ["", "Failed (the error is in its row): " + ", ".join(h["failed"]) + "."]
    if d.get("skipped"):
        L += ["", "Skipped by the time guard: " + ", ".join(d["skipped"]) + "."]
    if d.get("not_run"):
        L += ["", "Not run: " + ", ".join(d["not_run"]) + "."]
    for n in d.get("notes", []):
        L += ["", n]
    return "\n".join(L) + "\n"


def save_results(d: dict, md: str) -> None:
    """md + json side by side (atomic), the headline recomputed; called after every row."""
    import json
    d["headline"] = headline(d)
    write_atomic(md, render(d))
    write_atomic(os.path.splitext(md)[0] + ".json", json.dumps(d, indent=1, default=str))
