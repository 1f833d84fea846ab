"""GGUF inside a real ComfyUI: the GGUF loader nodes, resident and streamed by DisTorch2, beside bf16.

Runs ComfyUI (0.3.75, in-process, as bench_comfy.py does) with a full-size random Flux-dev model in
ComfyUI's own Flux class, then at 1024x1024:

  * bf16 resident      -- the bf16 weights through comfy.sd.load_diffusion_model_state_dict (in memory)
  * GGUF resident      -- the same weights as Q8_0 in a .gguf file (every 2-D weight whose last dimension is
                          a multiple of 32; quantized in torch: formats.testing.quantize_q8_0), loaded
                          by the native GGUF loader (UnetLoaderGGUFMultiGPU's loader: quantized bytes
                          resident, dequantized per call)
  * DisTorch2 GGUF X   -- UnetLoaderGGUFDisTorch2MultiGPU with virtual_vram_gb = X, donor cpu (quantized
                          bytes streamed from pinned RAM, dequantized on the GPU after the copy)

Each row: median s/it over the timed steps (first step excluded: it loads), the floor
max(bf16 resident step, streamed bytes / probed pinned host->GPU rate), the plan's prediction, peak
VRAM, and whether the latent equals the GGUF-resident one bit for bit.

    python bench/bench_comfy_gguf.py --comfy .benchc/ComfyUI                    # the GPU run
    python bench/bench_comfy_gguf.py --device cpu --double 1 --single 1 --res 64 --ctx 16 --vram 0.01 \\
        --steps 3                                                               # a smoke run on CPU
"""
from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_comfy as BC  # noqa: E402

GiB = 1 << 30


def say(*a):
    print("[bench_comfy_gguf %6.1fs]" % (time.perf_counter() - BC.T0), *a, file=sys.stderr, flush=True)


def write_gguf_q8(sd: dict, path: str) -> tuple[int, int]:
    """sd -> a .gguf file (architecture "flux"): Q8_0 for 2-D weights with a last dim multiple of 32,
    float32 for the rest.  Returns (quantized tensors, file bytes)."""
    import numpy as np
    import gguf
    from distorch.formats.testing import quantize_q8_0
    w = gguf.GGUFWriter(path, "flux")
    n_q = 0
    for k, v in sd.items():
        if v.dim() == 2 and v.shape[-1] % 32 == 0 and v.numel() >= 4096:
            q = quantize_q8_0(v)                     # on v's device, then the bytes to the host
            raw = q.raw.to("cpu").numpy().reshape(v.shape[0], -1)
            w.add_tensor(k, raw, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            n_q += 1
        else:
            w.add_tensor(k, v.float().cpu().numpy().astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file(progress=False)
    w.close()
    return n_q, os.path.getsize(path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("DISTORCH_COMFYUI_DIR") or os.path.join(BC.REPO, ".comfy", "ComfyUI"))
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--vram", default="6,13", help="virtual_vram_gb values for the DisTorch2 GGUF node")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--model-dir", default="/dev/shm/distorch_bench_gguf")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cpu = a.device == "cpu"
    mm, nodes, folder_paths = BC.boot(a.comfy, cpu)
    import torch
    import comfy.sd
    import comfyui_version
    cn = BC.import_distorch()
    N = cn.nodes
    dev = torch.device(a.device)
    gpu = "cpu" if cpu else torch.cuda.get_device_name(dev)
    say(f"ComfyUI {comfyui_version.__version__}, torch {torch.__version__}, {gpu}")

    os.makedirs(a.model_dir, exist_ok=True)
    sd = BC.flux_state_dict(a.double, a.single, dev)
    bf16_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    fname = f"flux_q8_{a.double}x{a.single}.gguf"
    path = os.path.join(a.model_dir, fname)
    t = time.perf_counter()
    n_q, fbytes = write_gguf_q8(sd, path)
    say(f"wrote {path}: {n_q} Q8_0 tensors, {fbytes / GiB:.2f} GiB in {time.perf_counter() - t:.1f}s")
    folder_paths.add_model_folder_path("diffusion_models", a.model_dir)
    folder_paths.add_model_folder_path("unet", a.model_dir)

    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, a.ctx, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                       "guidance": 3.5}]]
    latent = torch.zeros(1, 16, a.res // 8, a.res // 8)

    def run(m, label):
        return BC.sample_timed(m, label, latent, cond, a.steps, dev, cpu)

    rows = []
    # 1. bf16 resident (in memory, ComfyUI's own loader function)
    m = comfy.sd.load_diffusion_model_state_dict({k: v.to("cpu") for k, v in sd.items()})
    del sd
    gc.collect()
    r = run(m, "bf16 resident")
    bf16_s = r["s_it"]
    rows.append(dict(name="bf16, ComfyUI loader (resident)", gb=0.0, **r))
    mm.unload_all_models()
    del m
    gc.collect()
    torch.cuda.empty_cache() if not cpu else None

    # 2. GGUF resident: the native GGUF loader (what UnetLoaderGGUFMultiGPU runs)
    m = cn.gguf_loaders.load_gguf_unet(path)
    r = run(m, "GGUF resident")
    ref = r["out"]
    stored = sum(v.raw.numel() if hasattr(v, "raw") else v.numel() * v.element_size()
                 for v in m.model.diffusion_model.state_dict().values())
    rows.append(dict(name="Q8_0 GGUF loader (resident, dequant per call)", gb=0.0, same=True, **r))
    mm.unload_all_models()
    del m
    gc.collect()
    torch.cuda.empty_cache() if not cpu else None

    # 3. the DisTorch2 GGUF node
    from distorch.compiler.inventory import probe
    bw = None if cpu else probe().bandwidth("cpu", str(dev))
    if bw:
        say(f"pinned host->GPU (probed): {bw / 1e9:.1f} GB/s")
    cls = N.build()["UnetLoaderGGUFDisTorch2MultiGPU"]
    for v in [float(x) for x in a.vram.split(",") if x.strip()]:
        (m,) = getattr(cls(), cls.FUNCTION)(unet_name=fname, compute_device=a.device, virtual_vram_gb=v,
                                            donor_device="cpu", expert_mode_allocations="", eject_models=False)
        r = run(m, f"DisTorch2 GGUF {v:g} GB")
        st = cn.entry.state_of(m)
        rt = getattr(st.handle, "runtime", None)
        tune = getattr(rt, "tune_result", None) if rt is not None else None
        if tune:
            say(f"  autotune: slots {tune['slots_before']} -> {tune['slots']}, measured step "
                f"{tune['measured_step_s'] * 1e3:.1f} ms, between steps {tune['gap_s'] * 1e3:.1f} ms, simulated "
                + ", ".join(f"{k}: {t * 1e3:.0f}" for k, t in tune["predicted_by_slots"].items()) + " ms")
            r["slots"] = f"{tune['slots_before']} -> {tune['slots']}"
        elif rt is not None:
            r["slots"] = str(rt.W)
        plan = st.plan
        off = plan.offloaded_bytes()
        pred = (plan.predicted or {}).get("step_s")
        floor = max(bf16_s, off / bw) if bw else None
        rows.append(dict(name=f"UnetLoaderGGUFDisTorch2MultiGPU virtual_vram_gb={v:g}", gb=off / GiB, pred=pred,
                         floor=floor, same=bool(torch.equal(r["out"], ref)), window=plan.window_bytes, **r))
        mm.unload_all_models()
        del m
        gc.collect()
        torch.cuda.empty_cache() if not cpu else None
    os.remove(path)

    lines = [f"# GGUF in ComfyUI {comfyui_version.__version__}: Flux-dev-shaped Q8_0, {a.res}x{a.res}", "",
             f"Card: {gpu}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             f"Model: random weights in ComfyUI's Flux class, {a.double} double + {a.single} single blocks; bf16 "
             f"{bf16_bytes / GiB:.2f} GiB; Q8_0 GGUF file {fbytes / GiB:.2f} GiB ({n_q} Q8_0 tensors, stored "
             f"{stored / GiB:.2f} GiB); euler, {a.steps} steps, cfg 1, {a.ctx} text tokens; s/it = median step "
             "after the first.",
             f"Command: `python bench/bench_comfy_gguf.py {' '.join(sys.argv[1:])}`",
             "" if bw is None else f"Pinned host->GPU bandwidth probed by distorch: {bw / 1e9:.1f} GB/s.", "",
             "| configuration | GiB off GPU | s/it | x bf16 resident | floor s/it | predicted s/it | peak VRAM GiB | "
             "slots (autotune) | same latent as GGUF resident |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        f, p, same = r.get("floor"), r.get("pred"), r.get("same")
        lines.append(f"| {r['name']} | {r['gb']:.2f} | {r['s_it']:.3f} | {r['s_it'] / bf16_s:.3f} | "
                     f"{'' if f is None else f'{f:.3f}'} | {'' if not p else f'{p:.3f}'} | {r['peak'] / GiB:.1f} | "
                     f"{r.get('slots', '')} | {'' if same is None else ('yes' if same else 'NO')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out = BC.write_result(text, a.out, f"comfy_gguf_{'cpu' if cpu else 'gpu'}.md")
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
