"""DisTorch2 inside a real ComfyUI: s/it against GB offloaded, beside ComfyUI's own loading.

Runs ComfyUI (0.3.75, in-process, the way main.py imports it) with a full-size random-weight
Flux-dev model (ComfyUI's own Flux class, bf16, 57 blocks, 23.8 GB), saved as a .safetensors file
and loaded through ComfyUI's UNETLoader.  Then, at 1024x1024:

  * plain       -- the model as the UNETLoader returns it (resident on the GPU)
  * comfy-N     -- ComfyUI's own partial loading with about N GB left off the GPU (a filler
                   allocation makes its memory manager offload; the real amount is reported)
  * distorch-X  -- the same model through comfy_nodes.entry.distorch() (what UNETLoaderDisTorch2MultiGPU does)
                   with virtual_vram_gb = X, donor cpu

Each row: median seconds per step over the timed steps (first step excluded: it loads), the floor
max(resident step, streamed bytes / pinned host->GPU bandwidth), the Plan's prediction, peak VRAM.

    python bench/bench_comfy.py                       # the GPU run (writes bench/results/comfy_<gpu>.md)
    python bench/bench_comfy.py --device cpu --double 1 --single 1 --res 64 --ctx 16 --vram 0,0.3 \
        --native 0 --steps 3 --out /tmp/smoke.md      # a smoke run of the same code on CPU
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1 << 30


def say(*a):
    print("[bench_comfy %6.1fs]" % (time.perf_counter() - T0), *a, file=sys.stderr, flush=True)


T0 = time.perf_counter()


def boot(comfy_dir: str, cpu: bool):
    """ComfyUI's import order (main.py): options, cli args, cuda_malloc before torch, extra_config, nodes."""
    sys.path.insert(0, comfy_dir)
    try:                                      # carried wheels for av / torchsde / trampoline
        import av  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"ComfyUI needs PyAV here: {e}")
    import comfy.options
    comfy.options.enable_args_parsing(False)
    from comfy.cli_args import args
    args.cpu = cpu
    if not cpu:
        import cuda_malloc  # noqa: F401  (sets the allocator backend before torch initialises CUDA)
    import utils.extra_config  # noqa: F401
    import comfy.model_management as mm
    import nodes
    import folder_paths
    return mm, nodes, folder_paths


def flux_params(double: int, single: int) -> dict:
    return dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=double, depth_single_blocks=single, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def flux_state_dict(double: int, single: int, dev) -> dict:
    """Random bf16 Flux-dev-shaped weights with ComfyUI's own key names (its Flux class), on `dev`."""
    import torch
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    with torch.device("meta"):
        m = Flux(dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init,
                 **flux_params(double, single))
    m = m.to_empty(device=dev)
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for v in m.state_dict().values():
            v.normal_(0.0, 0.02, generator=g) if v.dtype.is_floating_point else v.zero_()
    return dict(m.state_dict())


def make_flux_file(path: str, double: int, single: int, dev):
    """flux_state_dict(...) saved to `path` (a .safetensors file)."""
    import safetensors.torch
    sd = {k: v.to("cpu") for k, v in flux_state_dict(double, single, dev).items()}
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    safetensors.torch.save_file(sd, path)
    del sd
    gc.collect()
    return nbytes


def import_distorch():
    """The distorch.comfy_nodes package, its modules imported (entry, gguf_loaders, nodes ...); where distorch
    is not pip-installed (the GPU machine), the repo root, which IS the package, is put on the path under the
    name distorch."""
    try:
        import distorch.comfy_nodes  # noqa: F401
    except ImportError:
        import tempfile
        d = tempfile.mkdtemp(prefix="distorch_pkg_")
        os.symlink(REPO, os.path.join(d, "distorch"))
        sys.path.insert(0, d)
    from distorch import comfy_nodes
    from distorch.comfy_nodes import entry, gguf_loaders, nodes  # noqa: F401
    return comfy_nodes


def sample_timed(m, label: str, latent, cond, steps: int, dev, cpu: bool) -> dict:
    """ComfyUI's sampler (euler, cfg 1, seed 42) on `m`, a synchronize in the step callback: s/it = median
    step after the first (which includes loading), peak VRAM, the latent."""
    import torch
    import comfy.sample
    times = []

    def cb(step, x0, x, total_steps):
        if not cpu:
            torch.cuda.synchronize(dev)
        times.append(time.perf_counter())

    if not cpu:
        torch.cuda.reset_peak_memory_stats(dev)
    lat = comfy.sample.fix_empty_latent_channels(m, latent)
    noise = comfy.sample.prepare_noise(lat, 42)
    t0 = time.perf_counter()
    out = comfy.sample.sample(m, noise, steps, 1.0, "euler", "simple", cond, cond, lat,
                              callback=cb, disable_pbar=True, seed=42)
    first = times[0] - t0
    dts = [b - a_ for a_, b in zip(times, times[1:])]
    sit = statistics.median(dts)
    try:
        peak = torch.cuda.max_memory_allocated(dev) if not cpu else 0
    except Exception:
        peak = 0
    finite = bool(torch.isfinite(out).all())
    say(f"{label}: {sit:.3f} s/it (steps {[round(x, 3) for x in dts]}), first step incl. load {first:.1f}s, "
        f"peak {peak / GiB:.1f} GiB{'' if finite else ' (non-finite latent: random weights)'}")
    return {"s_it": sit, "first_s": first, "peak": peak, "steps": dts, "out": out}


def write_result(text: str, out: str | None, default_name: str) -> str:
    """The results table to `out` (default bench/results/<default_name>; under $OUT when set)."""
    out = out or os.path.join(REPO, "bench", "results", default_name)
    if os.environ.get("OUT"):
        out = os.path.join(os.environ["OUT"], os.path.basename(out))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as fh:
        fh.write(text)
    return out


# ComfyUI-MultiGPU v2.5.11 (DisTorch2, pageable donor memory), same model, same machine kind, measured
# in an earlier session (shared/DESIGN.md): GiB offloaded -> s/it.
SEED_PROJECT = [(0, 0.180), (4, 0.79), (8, 1.35), (16, 2.35), (22.17, 3.2)]


def plot(json_path: str, png_path: str):
    """s/it against GiB offloaded (the chart the existing project publishes), from a results JSON."""
    import json
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    d = json.load(open(json_path))
    rows = d["rows"]
    dis = sorted((r["gb"], r["s_it"]) for r in rows if r["name"].startswith("DisTorch2"))
    flo = sorted((r["gb"], r["floor"]) for r in rows if r.get("floor"))
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(*zip(*SEED_PROJECT), "s--", color="tab:gray", label="ComfyUI-MultiGPU 2.5.11 (earlier run)")
    ax.plot(*zip(*dis), "o-", color="tab:blue", label="DisTorch2 (this project)")
    if flo:
        ax.plot(*zip(*flo), ":", color="tab:green", label="floor: max(resident, bytes / pinned BW)")
    for r in rows:
        if r["name"].startswith("ComfyUI partial"):
            ax.plot([r["gb"]], [r["s_it"]], "^", color="tab:orange", ms=9, label="ComfyUI's own partial load")
        if r["name"].startswith("plain"):
            ax.axhline(r["s_it"], color="k", lw=0.6, alpha=0.5)
    ax.set_xlabel("GiB of the model off the GPU (virtual_vram_gb)")
    ax.set_ylabel("seconds / iteration")
    ax.set_title(f"Flux-dev 1024x1024 in ComfyUI, {d['gpu']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"wrote {png_path}")


def lora_bench(a, model, run, nodes, folder_paths, mm, entry, torch, cpu):
    """Changing a LoRA strength: ComfyUI reloads the model; DisTorch2 rewrites the patched weights in place."""
    import safetensors.torch
    g = torch.Generator().manual_seed(7)
    lora = {}
    for k, v in model.model.diffusion_model.state_dict().items():
        if k.endswith(".weight") and v.dim() == 2 and "blocks." in k:
            base = "diffusion_model." + k[: -len(".weight")]
            lora[base + ".lora_up.weight"] = (torch.randn(v.shape[0], a.lora_rank, generator=g) * 0.01).to(v.dtype)
            lora[base + ".lora_down.weight"] = (torch.randn(a.lora_rank, v.shape[1], generator=g) * 0.01).to(v.dtype)
    name = f"lora_rand_r{a.lora_rank}.safetensors"
    safetensors.torch.save_file(lora, os.path.join(a.model_dir, name))
    folder_paths.add_model_folder_path("loras", a.model_dir)
    say(f"LoRA: {len(lora) // 2} patched weights")
    loader = nodes.LoraLoaderModelOnly()
    rows, ref = [], {}
    for s_ in (1.0, 0.5):
        m = loader.load_lora_model_only(model, name, s_)[0]
        r = run(m, f"plain + LoRA {s_}")
        ref[s_] = r.pop("out")
        rows.append(dict(name="plain UNETLoader", strength=s_, **r))
    mm.unload_all_models()
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    dm = entry.distorch(model, a.device, a.lora_vram, "cpu", "", True)
    st = entry.state_of(dm)
    for s_ in (1.0, 0.5):
        m = loader.load_lora_model_only(dm, name, s_)[0]
        r = run(m, f"distorch {a.lora_vram:g} GB + LoRA {s_}")
        same = "yes" if torch.equal(r.pop("out"), ref[s_]) else "NO"
        rows.append(dict(name=f"DisTorch2 virtual_vram_gb={a.lora_vram:g}", strength=s_, compiles=st.compiles,
                         repatches=st.repatches, same=same, **r))
    mm.unload_all_models()
    return rows


def main():
    if len(sys.argv) == 4 and sys.argv[1] == "--plot":       # python bench/bench_comfy.py --plot X.json X.png
        return plot(sys.argv[2], sys.argv[3])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("DISTORCH_COMFYUI_DIR") or os.path.join(REPO, ".comfy", "ComfyUI"))
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--vram", default="0,4,8,12,16,23", help="virtual_vram_gb values (GB = 2^30 bytes)")
    ap.add_argument("--native", default="17", help="GB ComfyUI's own partial loading should leave off the GPU (0: skip)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--ctx", type=int, default=256, help="text tokens")
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--model-dir", default="/dev/shm/distorch_bench")
    ap.add_argument("--cycles", type=int, default=6, help="load/sample/unload cycles at --cycle-vram (RSS, VRAM)")
    ap.add_argument("--cycle-vram", type=float, default=8.0)
    ap.add_argument("--lora-rank", type=int, default=0, help="also: a random LoRA on every block weight, "
                    "strength 1.0 then 0.5, plain vs DisTorch2 at --lora-vram (0: skip)")
    ap.add_argument("--lora-vram", type=float, default=12.0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    cpu = a.device == "cpu"
    mm, nodes, folder_paths = boot(a.comfy, cpu)
    import torch
    import comfyui_version
    entry = import_distorch().entry

    dev = torch.device(a.device)
    gpu = "cpu" if cpu else torch.cuda.get_device_name(dev)
    say(f"ComfyUI {comfyui_version.__version__}, torch {torch.__version__}, {gpu}")

    os.makedirs(a.model_dir, exist_ok=True)
    fname = f"flux_rand_{a.double}x{a.single}.safetensors"
    path = os.path.join(a.model_dir, fname)
    if not os.path.exists(path):
        nb = make_flux_file(path, a.double, a.single, dev)
        say(f"wrote {path}: {nb / GiB:.2f} GiB")
    folder_paths.add_model_folder_path("diffusion_models", a.model_dir)
    t = time.perf_counter()
    model = nodes.UNETLoader().load_unet(fname, "default")[0]
    say(f"UNETLoader: {type(model.model).__name__} {model.model_size() / GiB:.2f} GiB in {time.perf_counter() - t:.1f}s")
    os.remove(path)                       # the loaded model holds the weights now; give /dev/shm back
    total = model.model_size()

    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, a.ctx, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                       "guidance": 3.5}]]
    latent = torch.zeros(1, 16, a.res // 8, a.res // 8)

    def run(m, label):
        return sample_timed(m, label, latent, cond, a.steps, dev, cpu)

    rows = []
    lora_rows = []
    # 1. plain: resident
    r = run(model, "plain")
    resident_s = r["s_it"]
    rows.append(dict(name="plain UNETLoader (resident)", gb=0.0, **r))
    ref = r["out"]
    mm.unload_all_models()
    gc.collect()
    torch.cuda.empty_cache() if not cpu else None

    # 2. ComfyUI's own partial loading
    for n in [float(x) for x in a.native.split(",") if x.strip() and float(x) > 0]:
        if cpu:
            break
        free = mm.get_free_memory(dev)
        need = model.memory_required([1] + list(latent.shape[1:])) + mm.minimum_inference_memory() \
            + mm.extra_reserved_memory()
        keep = total - n * GiB + need            # ComfyUI loads about (free - need) of the weights
        filler = torch.empty(max(0, int(free - keep)), dtype=torch.uint8, device=dev)
        r = run(model, f"comfy native ~{n:g} GB off")
        off = total - model.loaded_size()
        rows.append(dict(name=f"ComfyUI partial load", gb=off / GiB, **r))
        del filler
        mm.unload_all_models()
        gc.collect()
        torch.cuda.empty_cache()

    # 3. LoRA strength change (before the sweep: it needs `model` still plain)
    if a.lora_rank:
        lora_rows = lora_bench(a, model, run, nodes, folder_paths, mm, entry, torch, cpu)
        gc.collect()

    # 4. DisTorch2 at each virtual_vram_gb
    from distorch.compiler.inventory import probe
    bw = None
    if not cpu:
        inv = probe()
        bw = inv.bandwidth("cpu", str(dev))
        say(f"pinned host->GPU bandwidth (probed): {bw / 1e9:.1f} GB/s")
    for v in [float(x) for x in a.vram.split(",") if x.strip()]:
        t = time.perf_counter()
        m = entry.distorch(model, a.device, v, "cpu", "", True)
        plan_s = time.perf_counter() - t
        st = entry.state_of(m)
        r = run(m, f"distorch {v:g} GB")
        off = st.plan.offloaded_bytes()
        pred = (st.plan.predicted or {}).get("step_s")
        floor = max(resident_s, off / bw) if bw else None
        same = torch.equal(r["out"], ref)
        rows.append(dict(name=f"DisTorch2 virtual_vram_gb={v:g}", gb=off / GiB, pred=pred, floor=floor,
                         plan_s=plan_s, same=same, window=st.plan.window_bytes, **r))
        mm.unload_all_models()
        assert st.handle is None
        gc.collect()
        torch.cuda.empty_cache() if not cpu else None

    # 5. load / sample / unload cycles: host RSS and device memory must stay flat
    cyc = []
    if a.cycles:
        def rss():
            with open("/proc/self/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        steps = a.steps
        a.steps = 2
        for i in range(a.cycles):
            m = entry.distorch(model, a.device, a.cycle_vram, "cpu", "", True)
            run(m, f"cycle {i}")
            mm.unload_all_models()
            gc.collect()
            used = 0
            if not cpu:
                torch.cuda.empty_cache()
                f_, t_ = torch.cuda.mem_get_info(dev)
                used = t_ - f_
            cyc.append((rss(), used))
            say(f"cycle {i}: host RSS {cyc[-1][0] / GiB:.2f} GiB, device used {used / GiB:.2f} GiB")
        a.steps = steps

    lines = [f"# DisTorch2 in ComfyUI {comfyui_version.__version__}: Flux-dev-shaped model, {a.res}x{a.res}",
             "",
             f"Card: {gpu}; torch {torch.__version__}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
             f"Model: random bf16 weights in ComfyUI's Flux class, {a.double} double + {a.single} single blocks, "
             f"{total / GiB:.2f} GiB, loaded by ComfyUI's UNETLoader; euler, {a.steps} steps, cfg 1, "
             f"{a.ctx} text tokens. s/it = median step time after the first step.",
             f"Command: `python bench/bench_comfy.py {' '.join(sys.argv[1:])}`",
             "" if bw is None else f"Pinned host->GPU bandwidth probed by distorch: {bw / 1e9:.1f} GB/s.",
             "",
             "| configuration | GiB off GPU | s/it | x resident | floor s/it | predicted s/it | peak VRAM GiB | same latent as plain |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        f = r.get("floor")
        p = r.get("pred")
        same = r.get("same")
        lines.append(f"| {r['name']} | {r['gb']:.2f} | {r['s_it']:.3f} | {r['s_it'] / resident_s:.2f} | "
                     f"{'' if f is None else f'{f:.3f}'} | {'' if not p else f'{p:.3f}'} | {r['peak'] / GiB:.1f} | "
                     f"{'' if same is None else ('yes' if same else 'NO')} |")
    if lora_rows:
        lines += ["", f"LoRA (random, rank {a.lora_rank}, on every 2-D weight of the blocks): strength 1.0, then 0.5 "
                  f"(LoraLoaderModelOnly), plain vs DisTorch2 at virtual_vram_gb={a.lora_vram:g}. 'first step' includes "
                  "ComfyUI's load of the model (patching weights).", "",
                  "| model | strength | first step incl. load s | s/it | compiles so far | same latent as plain |",
                  "|---|---:|---:|---:|---:|---|"]
        for r in lora_rows:
            lines.append(f"| {r['name']} | {r['strength']:g} | {r['first_s']:.2f} | {r['s_it']:.3f} | "
                         f"{r.get('compiles', '')} | {r.get('same', '')} |")
    if cyc:
        r0, v0 = cyc[min(1, len(cyc) - 1)]
        r1, v1 = cyc[-1]
        lines += ["", f"Load / sample / unload cycles at virtual_vram_gb={a.cycle_vram:g} (after each unload): host RSS "
                  + ", ".join(f"{r / GiB:.2f}" for r, _ in cyc) + " GiB; device memory in use "
                  + ", ".join(f"{v / GiB:.2f}" for _, v in cyc) + " GiB. Change from cycle 2 to the last: RSS "
                  f"{100.0 * (r1 - r0) / r0:+.2f} %, device {(v1 - v0) / 2**20:+.0f} MiB."]
    text = "\n".join(lines) + "\n"
    print(text)
    out = write_result(text, a.out, f"comfy_{'cpu' if cpu else 'gpu'}.md")
    import json
    with open(os.path.splitext(out)[0] + ".json", "w") as fh:
        json.dump({"gpu": gpu, "total_bytes": total, "cycles": cyc, "lora": lora_rows,
                   "rows": [{k: v for k, v in r.items() if k != "out"} for r in rows]}, fh, indent=1)
    say(f"wrote {out}")


if __name__ == "__main__":
    main()
