"""Compressed streaming through the library, one process: a Flux-dev-sized DiT (diffusers'
FluxTransformer2DModel default config, random bf16 weights N(0, 0.02)) at one resolution, fully offloaded
and at partial budgets, raw (compress="off") against compressed (compress="on" and "auto"), beside the
resident model and the raw link floor (offloaded bytes / pinned bandwidth measured in this run).

Each row: s/it (steps back to back, median), peak VRAM (max_memory_allocated over the steps), compile
time (compression included: "encode_s"), the compression ratio and stored bytes, host RSS after compile,
and the output compared bit for bit with the resident model's.  The ComfyUI-level bench of issue 14 is
bench/bench_comfy_codec.py; this one isolates the runtime (no ComfyUI, no sampler).

    python bench/bench_codec_stream.py --out OUT [--res 1024] [--offload all,12] [--device cpu --smoke]
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
import stream_kit as S  # noqa: E402  (model, inputs, timing, bandwidth)

GiB = 1 << 30


def row(name: str, model, kw, ref, warmup: int, reps: int, extra: dict) -> dict:
    S._reset_peak()
    med, _, out, _ = S.run_steps(model, kw, warmup, reps)
    d = {"row": name, "s_it": med, "peak_vram_gib": S._peak_gib(),
         "rss_gib": S._rss_gib(), "bit_identical": bool(torch.equal(out, ref))}
    d.update(extra)
    S.log(json.dumps(d))
    return d


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--offload", default="all,12", help="GiB offloaded per budget; 'all' streams everything")
    ap.add_argument("--modes", default="off,on,auto")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--smoke", action="store_true", help="2+4 blocks, 256x256: checks the script")
    a = ap.parse_args(argv)
    import distorch
    S._CPU = a.device == "cpu"
    dev = "cuda:0" if a.device == "cuda" else "cpu"
    # smoke: inner width 256, so the block weights (256 x 256 and up) are codable
    cfg = dict(num_layers=2, num_single_layers=3, attention_head_dim=64, num_attention_heads=4,
               joint_attention_dim=256, pooled_projection_dim=128, axes_dims_rope=(16, 24, 24)) if a.smoke else \
        dict(num_layers=19, num_single_layers=38, guidance_embeds=True)
    res = 256 if a.smoke else a.res
    os.makedirs(a.out, exist_ok=True)
    model = S.build_model(cfg, dev)
    kw = S.make_inputs(cfg, res, 64 if a.smoke else a.txt, dev)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = []
    S._reset_peak()
    med, _, ref, _ = S.run_steps(model, kw, a.warmup, a.reps)
    rows.append({"row": "resident", "s_it": med, "peak_vram_gib": S._peak_gib(), "bit_identical": True})
    bw = S.pinned_bw(dev) if a.device == "cuda" else None
    model = model.to("cpu")
    gc.collect()
    if a.device == "cuda":
        torch.cuda.empty_cache()
    doc = {"card": torch.cuda.get_device_name(0) if a.device == "cuda" else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"), "command": " ".join(["python", "bench/bench_codec_stream.py"] +
                                                                    (argv or sys.argv[1:])),
           "model_gib": size / GiB, "res": res, "pinned_gbps": bw / 1e9 if bw else None, "rows": rows}
    for off in a.offload.split(","):
        gb = size / GiB if off == "all" else float(off)
        floor = max(rows[0]["s_it"], gb * GiB / bw) if bw else None
        for mode in a.modes.split(","):
            t0 = time.perf_counter()
            h = distorch.compile(model, dev, offload_gb=gb, clamp_offload=True, compress=mode, progress=False)
            compile_s = time.perf_counter() - t0
            st = h.runtime.codec.stats or {}
            pr = h.plan.predicted or {}
            rows.append(row(f"distorch off={off} compress={mode}", model, kw, ref, a.warmup, a.reps, {
                "offload_gib": gb, "compile_s": compile_s, "encode_s": st.get("encode_s"),
                "ratio": st.get("ratio"), "stored_gib": (st.get("stored_bytes") or 0) / GiB,
                "coded_units": st.get("units", 0), "predicted_s": pr.get("step_s"), "raw_floor_s": floor,
                "scratch_gib": (st.get("scratch_bytes") or 0) / GiB, "slots": h.runtime.ring.W,
                "slot_gib": h.runtime.ring.slot_bytes / GiB}))
            h.undo("cpu")
            gc.collect()
            if a.device == "cuda":
                torch.cuda.empty_cache()
            with open(os.path.join(a.out, "codec_stream.json"), "w") as f:
                json.dump(doc, f, indent=1)
    S.log(json.dumps(doc, indent=1))
    return 0 if all(r.get("bit_identical") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
