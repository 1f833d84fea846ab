"""A text encoder placed by DisTorch2 inside ComfyUI: encode time, resident vs streamed.

ComfyUI encodes through the CLIP object's inner encoder, never through the compiled module's forward;
the runtime learns the period of those calls (runtime/apply.py, "free run"): the first encode loads
each offloaded unit on demand, later encodes stream with prefetch.  This bench measures that on a
T5-XXL-shaped encoder (ComfyUI's own T5 class, random bf16 weights, 9.5 GB; as loaded for SD3/Flux) or,
for a CPU check, an SD1 CLIP-L:

  * resident       -- ComfyUI's loader, the encoder on the GPU
  * DisTorch2 X GB -- entry.distorch(clip, device, X, "cpu") (what CLIPLoaderDisTorch2MultiGPU does):
                      encode 1 (loads on demand), encodes 2..N (streamed), each timed with a synchronize

Floor of a streamed encode: max(resident encode, bytes offloaded / probed pinned host->GPU rate).

    python bench/bench_comfy_clip.py --comfy .benchc/ComfyUI               # T5-XXL on the GPU
    python bench/bench_comfy_clip.py --device cpu --encoder clip_l --vram 0.2   # a CPU check
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_comfy as BC  # noqa: E402

GiB = 1 << 30


def say(*a):
    print("[bench_comfy_clip %6.1fs]" % (time.perf_counter() - BC.T0), *a, file=sys.stderr, flush=True)


def encoder_state_dict(kind: str, torch):
    """Random weights with ComfyUI's key names: T5-XXL (24 blocks, d_model 4096) or SD1 CLIP-L."""
    g = torch.Generator().manual_seed(0)
    if kind == "t5xxl":
        import json
        import comfy.ops
        import comfy.text_encoders.t5 as t5
        cfg_path = os.path.join(os.path.dirname(t5.__file__), "t5_config_xxl.json")
        with open(cfg_path) as fh:
            cfg = json.load(fh)
        with torch.device("meta"):
            m = t5.T5(cfg, torch.bfloat16, "meta", comfy.ops.manual_cast)
    else:
        import comfy.sd1_clip
        m = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32).transformer
    sd = {}
    for k, v in m.state_dict().items():
        t = torch.empty(tuple(v.shape), dtype=torch.bfloat16 if kind == "t5xxl" else torch.float32)
        sd[k] = t.normal_(0.0, 0.02, generator=g) if t.is_floating_point() else t.zero_()
    return sd


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("DISTORCH_COMFYUI_DIR") or os.path.join(BC.REPO, ".comfy", "ComfyUI"))
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--encoder", default="t5xxl", choices=["t5xxl", "clip_l"])
    ap.add_argument("--vram", default="10", help="virtual_vram_gb values")
    ap.add_argument("--encodes", type=int, default=5)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cpu = a.device == "cpu"
    mm, nodes, folder_paths = BC.boot(a.comfy, cpu)
    import torch
    import comfy.sd
    import comfyui_version
    entry = BC.import_distorch().entry
    dev = torch.device(a.device)
    gpu = "cpu" if cpu else torch.cuda.get_device_name(dev)
    say(f"ComfyUI {comfyui_version.__version__}, torch {torch.__version__}, {gpu}")
    sd = encoder_state_dict(a.encoder, torch)
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    ctype = comfy.sd.CLIPType.SD3 if a.encoder == "t5xxl" else comfy.sd.CLIPType.STABLE_DIFFUSION
    prompt = "a photo of a red fox in the snow, golden hour, 35 mm, shallow depth of field"

    def load():
        clip = comfy.sd.load_text_encoder_state_dicts([dict(sd)], clip_type=ctype)
        if not cpu:
            clip.patcher.load_device = dev
        return clip

    def encode(clip):
        if not cpu:
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        out = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
        if not cpu:
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0, out

    rows = []
    clip = load()
    ts = []
    for _ in range(a.encodes):
        t, ref = encode(clip)
        ts.append(t)
    res_s = statistics.median(ts[1:])
    say(f"resident: encodes {[round(x, 3) for x in ts]} s")
    rows.append(("resident", 0.0, ts[0], res_s, None, "reference"))
    mm.unload_all_models()
    del clip
    bw = None
    if not cpu:
        from distorch.compiler.inventory import probe
        bw = probe().bandwidth("cpu", str(dev))
    for v in [float(x) for x in a.vram.split(",") if x.strip()]:
        clip = entry.distorch(load(), a.device, v, "cpu", "", False)
        ts, eq = [], []
        for _ in range(a.encodes):
            t, out = encode(clip)
            ts.append(t)
            eq.append(bool(torch.equal(out[0], ref[0])))
        same = "".join("=" if e else "x" for e in eq)     # per encode: = same as resident, x differs
        st = entry.state_of(clip)
        rt = st.handle.runtime
        off = st.plan.offloaded_bytes()
        say(f"DisTorch2 {v:g} GB ({off / GiB:.2f} GiB offloaded): encodes {[round(x, 3) for x in ts]} s, "
            f"free run {rt.free_run}, on-demand loads {rt.fallback_loads}, same {same}")
        floor = max(res_s, off / bw) if bw else None
        rows.append((f"DisTorch2 virtual_vram_gb={v:g}", off / GiB, ts[0], statistics.median(ts[2:] or ts[1:]),
                     floor, same))
        mm.unload_all_models()
        del clip
    lines = [f"# A text encoder placed by DisTorch2 in ComfyUI {comfyui_version.__version__}: encode time", "",
             f"Card: {gpu}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             f"Encoder: {a.encoder} (ComfyUI's own class, random weights, {nbytes / GiB:.2f} GiB), prompt of "
             f"{len(prompt.split())} words; each encode timed with a synchronize before and after.",
             f"Command: `python bench/bench_comfy_clip.py {' '.join(sys.argv[1:])}`",
             "" if bw is None else f"Pinned host->GPU bandwidth probed by distorch: {bw / 1e9:.1f} GB/s.", "",
             "| configuration | GiB off GPU | first encode s | later encodes s (median) | floor s | "
             "output per encode (= same as resident, x differs) |",
             "|---|---:|---:|---:|---:|---|"]
    for name, gb, first, later, floor, same in rows:
        lines.append(f"| {name} | {gb:.2f} | {first:.3f} | {later:.3f} | {'' if floor is None else f'{floor:.3f}'} | "
                     f"{same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    BC.write_result(text, a.out, f"comfy_clip_{'cpu' if cpu else 'gpu'}.md")


if __name__ == "__main__":
    main()
