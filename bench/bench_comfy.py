"""DisTorch2 inside a real ComfyUI: seconds per step against measured peak VRAM, beside ComfyUI's own loading.

Runs ComfyUI (0.3.75, in-process, the way main.py imports it, every node call under torch.inference_mode()
as ComfyUI's executor runs them) with a full-size random-weight Flux-dev model (ComfyUI's own Flux class,
bf16, 19 double + 38 single blocks, 22.17 GiB) written as a .safetensors file and loaded through ComfyUI's
UNETLoader (once: every resolution and every row uses that one model).  Rows, at each --res:

  * plain         the model as UNETLoader returns it (resident on the GPU)
  * ComfyUI-N     ComfyUI's own partial loading with about N GiB of the model left off the GPU (a filler
                  allocation makes its memory manager offload; the real amount is reported, and the filler
                  is subtracted from the peak)
  * DisTorch2-X   the same model through comfy_nodes.entry.distorch() (what UNETLoaderDisTorch2MultiGPU
                  does) with virtual_vram_gb = X, donor cpu; compiled once per X, every --res sampled on it

Each row: s/it (median step after the first, the compute stream synchronized in the step callback:
bench_util.step_sync), measured peak VRAM
(torch.cuda.max_memory_allocated during sampling), the plan's predicted footprint and step (and the
runtime's own prediction and measured step after sampling), the VRAM-true floor
    max(resident s/it, (model bytes - (peak - activations)) / pinned bandwidth),  activations = plain peak - model,
    resident s/it = the faster of the plain row and DisTorch2 with nothing offloaded (bench/comfy_report.py)
and the latent compared bit for bit with the plain row's.  Each ComfyUI point is also set against our s/it at
the same peak VRAM (linear interpolation on our curve).  Results (md + json, written after every row, so a
crash or a timeout keeps the rows done) and a chart (s/it against peak VRAM, one panel per resolution).

    python bench/bench_comfy.py --deadline 270          # the GPU run: bench/results/comfy_vram_<gpu>.md/.json/.png
    python bench/bench_comfy.py --tiny                  # smoke run of the same code on CPU (tiny Flux, ~20 s)
    python bench/bench_comfy.py --plot X.json X.png     # the chart again from a results JSON
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The shared plumbing (bench_util.py), also reached as bench_comfy.<name> by the other benches and the tests.
from bench_util import (  # noqa: E402,F401
    GiB, REPO, T0, Guard, RssSampler, bit_equal, boot, card_tag, comfy_filler, header, import_distorch, out_path,
    sample_timed, say, spread_order, start, step_sync, unload_all, wait_for, write_result, write_safetensors)
from comfy_report import merge, plot, save_results, try_plot  # noqa: E402  (analysis, results, chart)




# ------------------------------------------------------------------------------------------------------
# The model: random Flux-dev-shaped weights in a .safetensors file (bench_comfy_codec.py uses it too)
# ------------------------------------------------------------------------------------------------------
def flux_params(double: int, single: int) -> dict:
    """Flux-dev's config (ComfyUI's detection fixes hidden 3072 / 24 heads / axes 16,56,56 for Flux files)."""
    return dict(in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096, hidden_size=3072,
                mlp_ratio=4.0, num_heads=24, depth=double, depth_single_blocks=single, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def flux_specs(double: int, single: int) -> list:
    """[(key, shape, dtype)] of ComfyUI's Flux class in bf16 (built on the meta device)."""
    import torch
    import comfy.ops
    from comfy.ldm.flux.model import Flux
    with torch.device("meta"):
        m = Flux(dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init,
                 **flux_params(double, single))
    return [(k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()]


def flux_state_dict(double: int, single: int, dev) -> dict:
    """The same random weights in memory: {key: tensor on `dev`} (bench_comfy_gguf.py quantizes them)."""
    import torch
    g = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        return {k: torch.empty(shape, dtype=dt, device=dev).normal_(0.0, 0.02, generator=g)
                if dt.is_floating_point else torch.zeros(shape, dtype=dt, device=dev)
                for k, shape, dt in flux_specs(double, single)}


def make_flux_file(path: str, double: int, single: int, dev) -> int:
    """Random bf16 Flux-dev-shaped weights (N(0, 0.02), generated on `dev`) with ComfyUI's key names."""
    import torch
    g = torch.Generator(device=dev).manual_seed(0)

    def make(name, shape, dt):
        t = torch.empty(shape, dtype=dt, device=dev)
        return t.normal_(0.0, 0.02, generator=g) if dt.is_floating_point else t.zero_()
    with torch.no_grad():
        return write_safetensors(path, flux_specs(double, single), make)


# ------------------------------------------------------------------------------------------------------
# Optional extras kept from earlier rounds: LoRA strength change, load / sample / unload cycles
# ------------------------------------------------------------------------------------------------------
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
    unload_all(mm, cpu)
    dm = entry.distorch(model, a.device, a.lora_vram, "cpu", "", True)
    st = entry.state_of(dm)
    for s_ in (1.0, 0.5):
        m = loader.load_lora_model_only(dm, name, s_)[0]
        r = run(m, f"distorch {a.lora_vram:g} GB + LoRA {s_}")
        same = "yes" if bit_equal(r.pop("out"), ref[s_]) else "NO"
        rows.append(dict(name=f"DisTorch2 virtual_vram_gb={a.lora_vram:g}", strength=s_, compiles=st.compiles,
                         repatches=st.repatches, same=same, **r))
    unload_all(mm, cpu)
    return rows


def cycles_bench(a, model, run, mm, entry, torch, cpu):
    """Load / sample / unload cycles: host RSS and device memory must stay flat."""
    def rss():
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    cyc = []
    for i in range(a.cycles):
        m = entry.distorch(model, a.device, a.cycle_vram, "cpu", "", True)
        run(m, f"cycle {i}", steps=2)
        unload_all(mm, cpu)
        used = 0
        if not cpu:
            f_, t_ = torch.cuda.mem_get_info(torch.device(a.device))
            used = t_ - f_
        cyc.append((rss(), used))
        say(f"cycle {i}: host RSS {cyc[-1][0] / GiB:.2f} GiB, device used {used / GiB:.2f} GiB")
    return cyc


def extras_md(a, lora_rows, cyc) -> list:
    L = []
    if lora_rows:
        L += [f"LoRA (random, rank {a.lora_rank}, on every 2-D weight of the blocks): strength 1.0, then 0.5 "
              f"(LoraLoaderModelOnly), plain vs DisTorch2 at virtual_vram_gb={a.lora_vram:g}. 'first step' includes "
              "ComfyUI's load of the model (patching weights).", "",
              "| model | strength | first step incl. load s | s/it | compiles so far | same latent as plain |",
              "|---|---:|---:|---:|---:|---|"]
        for r in lora_rows:
            L.append(f"| {r['name']} | {r['strength']:g} | {r['first_s']:.2f} | {r['s_it']:.3f} | "
                     f"{r.get('compiles', '')} | {r.get('same', '')} |")
    if cyc:
        r0, v0 = cyc[min(1, len(cyc) - 1)]
        r1, v1 = cyc[-1]
        L += ([""] if L else []) + [
            f"Load / sample / unload cycles at virtual_vram_gb={a.cycle_vram:g} (after each unload): host RSS "
            + ", ".join(f"{r / GiB:.2f}" for r, _ in cyc) + " GiB; device memory in use "
            + ", ".join(f"{v / GiB:.2f}" for _, v in cyc) + " GiB. Change from cycle 2 to the last: RSS "
            f"{100.0 * (r1 - r0) / max(r0, 1):+.2f} %, device {(v1 - v0) / 2**20:+.0f} MiB."]
    return L


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------
def common_args(ap) -> None:
    """The options every Flux-in-ComfyUI bench shares: where ComfyUI is, the device, the sampling, the model's
    blocks and file, the time guard."""
    ap.add_argument("--comfy", default=os.environ.get("DISTORCH_COMFYUI_DIR") or os.path.join(REPO, ".comfy", "ComfyUI"))
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--small-steps", type=int, default=10,
                    help="steps for every resolution after the first (512x512 steps take a third of 1024x1024's "
                         "and vary more: more of them for a steadier median)")
    ap.add_argument("--ctx", type=int, default=256, help="text tokens")
    ap.add_argument("--double", type=int, default=19)
    ap.add_argument("--single", type=int, default=38)
    ap.add_argument("--model-dir", default="/dev/shm/distorch_bench",
                    help="where the model file is written (removed again once loaded)")
    ap.add_argument("--deadline", type=float, default=0.0,
                    help="seconds from start after which no new row starts (0: none)")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(ap)
    ap.add_argument("--res", default="1024,512", help="square resolutions, one model load for all")
    ap.add_argument("--vram", default="0,3,6,9,12,15,18,20,21.5,23",
                    help="DisTorch2 virtual_vram_gb values (GiB; above the model size = everything offloaded)")
    ap.add_argument("--native", default="4,8,12,16,20",
                    help="GiB ComfyUI's own partial loading should leave off the GPU ('' or 0: none)")
    ap.add_argument("--block-vram", default="18,21.5", help="budgets also run with whole blocks forced "
                    "(DISTORCH_GRANULARITY=block), first resolution only ('' to skip)")
    ap.add_argument("--replain", action="store_true", help="the plain model sampled again after every DisTorch2 "
                    "row (a note per resolution): whether a step that moved is the process's or the row's")
    ap.add_argument("--wait-for", default="", help="before the first timed row wait (<= 120 s) until this file "
                    "exists (another job making files must be done before anything is timed)")
    ap.add_argument("--cycles", type=int, default=0, help="load/sample/unload cycles at --cycle-vram (RSS, VRAM)")
    ap.add_argument("--cycle-vram", type=float, default=8.0)
    ap.add_argument("--lora-rank", type=int, default=0, help="also: a random LoRA on every block weight, "
                    "strength 1.0 then 0.5, plain vs DisTorch2 at --lora-vram (0: skip)")
    ap.add_argument("--lora-vram", type=float, default=12.0)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: 1 double block (ComfyUI's Flux detection "
                    "fixes the width), 64x64 and 32x32, 2 steps, 16 text tokens, budgets 0.5 and 3 GiB (all)")
    ap.add_argument("--out", default=None, help="results .md (default bench/results/comfy_vram_<gpu>.md; "
                    "under $OUT when set)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.device, a.double, a.single, a.res, a.steps, a.ctx = "cpu", 1, 0, "64,32", 2, 16
        a.small_steps = 2
        a.vram, a.native = "0.5,3", ""
        if a.model_dir == "/dev/shm/distorch_bench":
            a.model_dir = "/tmp/distorch_bench_tiny"
    return a


def gpu_steps(st, steps: int) -> dict:
    """The sampling run's forwards as the compute stream ran them (runtime/profile.StepClock's events): the
    median GPU step and the median time the stream spent between one forward's end and the next one's
    start (the sampler's own work plus whatever left the GPU waiting for the host there)."""
    try:
        rt = st.handle.runtime
        rt.be.synchronize()
        ev = rt.clock.step_events()[-(steps - 1):]      # the first (warm-up) forward left out
        times = [e0.elapsed_time(e1) / 1e3 for e0, e1 in ev]
        gaps = [a[1].elapsed_time(b[0]) / 1e3 for a, b in zip(ev, ev[1:])]
    except Exception:          # statistics are a courtesy (CPU events, an undone handle)
        return {}
    return {"gpu_step": statistics.median(times) if times else None,
            "gpu_gap": statistics.median(gaps) if gaps else None}


def plan_detail(st) -> dict:
    """What an offline re-plan needs (compiler.cost.simulate on other placements): every unit's home, bytes,
    bytes as streamed and kind, and the compute seconds per unit call of the last profiled step (the runtime's
    measured prediction keeps them: runtime/autotune.py)."""
    out = {"units": [[u.name, u.device, u.bytes, (st.plan.codec or {}).get(u.name), u.kind, u.order]
                     for u in st.plan.units]}
    out["unit_times"] = (st.plan.predicted or {}).get("measured_unit_times") or {}
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == "--plot":       # python bench/bench_comfy.py --plot X.json X.png
        print(plot(argv[1], argv[2]))
        return
    if len(argv) >= 3 and argv[0] == "--merge":      # python bench/bench_comfy.py --merge OUT.md A.json B.json ...
        print(merge(argv[1], argv[2:]))
        return
    a = parse_args(argv)
    cpu = a.device == "cpu"
    mm, nodes, folder_paths, torch, comfy_ver, entry, dev, gpu = start(a.comfy, a.device)
    guard = Guard(a.deadline)
    md = out_path(a.out, f"comfy_vram_{card_tag(gpu)}.md")
    with torch.inference_mode():
        run_all(a, cpu, dev, gpu, mm, nodes, folder_paths, entry, torch, comfy_ver, guard, md)


def load_flux(a, dev, nodes, folder_paths):
    """The Flux-dev-shaped model (a.double / a.single blocks) through ComfyUI's UNETLoader: its file written
    into a.model_dir when missing, loaded, then removed (the loaded model holds the weights)."""
    os.makedirs(a.model_dir, exist_ok=True)
    fname = f"flux_rand_{a.double}x{a.single}.safetensors"
    path = os.path.join(a.model_dir, fname)
    if not os.path.exists(path):
        t = time.perf_counter()
        nb = make_flux_file(path, a.double, a.single, dev)
        say(f"wrote {path}: {nb / GiB:.2f} GiB in {time.perf_counter() - t:.1f}s")
    folder_paths.add_model_folder_path("diffusion_models", a.model_dir)
    t = time.perf_counter()
    model = nodes.UNETLoader().load_unet(fname, "default")[0]
    say(f"UNETLoader: {type(model.model).__name__} {model.model_size() / GiB:.2f} GiB in {time.perf_counter() - t:.1f}s")
    os.remove(path)                       # the loaded model holds the weights now; give the space back
    return model


def flux_cond(torch, ctx: int) -> list:
    """A random Flux conditioning (seed 1): ctx T5 tokens, the pooled CLIP vector, guidance 3.5."""
    g = torch.Generator().manual_seed(1)
    return [[torch.randn(1, ctx, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                     "guidance": 3.5}]]


def run_all(a, cpu, dev, gpu, mm, nodes, folder_paths, entry, torch, comfy_ver, guard, md):
    model = load_flux(a, dev, nodes, folder_paths)
    total = model.model_size()
    cond = flux_cond(torch, a.ctx)
    ress = [int(x) for x in a.res.split(",") if x.strip()]
    label = {r: f"{r}x{r}" for r in ress}
    latent = {r: torch.zeros(1, 16, r // 8, r // 8) for r in ress}

    def n_steps(res):
        return a.steps if res == ress[0] else a.small_steps

    def run(m, lab, res=None, steps=None, filler=0):
        res = res or ress[0]
        return sample_timed(m, lab, latent[res], cond, steps or n_steps(res), dev, cpu, filler)

    d = {"title": f"DisTorch2 in ComfyUI {comfy_ver}: s/it against peak VRAM, Flux-dev-shaped model",
         "short": "Flux-dev bf16", "total_bytes": total, "bw": None, "rows": [], "skipped": [], "notes": [],
         "model_line": f"Model: random bf16 weights in ComfyUI's Flux class, {a.double} double + {a.single} single "
                       f"blocks, {total / GiB:.2f} GiB, loaded once by ComfyUI's UNETLoader; euler, {a.steps} steps "
                       f"({a.small_steps} at {', '.join(list(label.values())[1:]) or 'no other size'}), "
                       f"cfg 1, {a.ctx} text tokens; every node call under torch.inference_mode(). DisTorch2 rows: "
                       f"one compile per budget, the resolutions sampled on it in the order {', '.join(label.values())}; "
                       f"[learned]: placed from the unit times earlier rows of this process measured (runtime/"
                       f"timebook.py, as any later compile of the model in a ComfyUI session is), the others from "
                       f"the FLOP-rate estimate."}
    header(d, gpu, torch, comfy_ver)
    rows = d["rows"]
    wait_for(a.wait_for)

    def save():
        save_results(d, md)

    # 1. plain: resident
    ref = {}
    for res in ress:
        r = run(model, f"plain {label[res]}", res)
        ref[res] = r.pop("out")
        rows.append(dict(kind="plain", name="plain UNETLoader (resident)", res=label[res], off=0, **r))
        save()
    unload_all(mm, cpu)

    # 2. ComfyUI's own partial loading, a fresh load per budget and resolution
    natives = [float(x) for x in a.native.split(",") if x.strip() and float(x) > 0] if not cpu else []
    est = 0.0
    for n in natives:
        for res in ress:
            if not guard.allow(est * 1.2 + 5, f"ComfyUI partial ~{n:g} GiB off at {label[res]}", d["skipped"]):
                continue
            t = time.perf_counter()
            filler, fb = comfy_filler(mm, model, latent[res].shape, int(n * GiB), dev)
            r = run(model, f"comfy native ~{n:g} GiB off {label[res]}", res, filler=fb)
            off = total - model.loaded_size()
            same = bit_equal(r.pop("out"), ref[res])
            rows.append(dict(kind="comfy", name=f"ComfyUI partial load (asked {n:g} GiB off)", res=label[res],
                             off=off, asked_gib=n, filler=fb, same=same, **r))
            del filler
            tu = time.perf_counter()
            unload_all(mm, cpu)
            say(f"comfy native ~{n:g} GiB off {label[res]}: unload {time.perf_counter() - tu:.1f}s")
            save()
            est = max(est, time.perf_counter() - t)

    # 3. DisTorch2 at each virtual_vram_gb (one compile per budget; every resolution sampled on it)
    if not cpu:
        from distorch.compiler.inventory import probe
        d["bw"] = probe().bandwidth("cpu", str(dev))
        say(f"pinned host->GPU bandwidth (probed): {d['bw'] / 1e9:.1f} GB/s")
    est = 0.0
    for v in spread_order([float(x) for x in a.vram.split(",") if x.strip()]):
        if not guard.allow(max(est * 1.2, 15.0 if not cpu else 1.0), f"DisTorch2 virtual_vram_gb={v:g}", d["skipped"]):
            continue
        t = time.perf_counter()
        m = entry.distorch(model, a.device, v, "cpu", "", True)
        plan_s = time.perf_counter() - t
        st = entry.state_of(m)
        pred0 = dict(st.plan.predicted or {})
        for res in ress:
            r = run(m, f"distorch {v:g} GiB {label[res]}", res)
            stats = {}
            try:
                stats = dict(st.handle.stats) if st.handle is not None else dict(st.last_stats or {})
            except Exception as e:  # statistics are a courtesy
                d["notes"].append(f"stats of virtual_vram_gb={v:g} failed: {type(e).__name__}: {e}")
            same = bit_equal(r.pop("out"), ref[res])
            r.update(gpu_steps(st, n_steps(res)))
            gran = (pred0.get("granularity") or {}).get("chosen", "block")
            r["plan_detail"] = plan_detail(st)
            # placed from unit times an earlier row measured (runtime/timebook.py: a second compile of the model
            # in one process), or from the FLOP-rate estimate (the first)
            basis = pred0.get("basis")
            mark = " learned" if basis == "learned" else ""
            rows.append(dict(kind="distorch", name=f"DisTorch2 virtual_vram_gb={v:g} [{gran}{mark}]", res=label[res],
                             v=v, gran=gran, plan_basis=basis, learned_from=pred0.get("learned_from"),
                             off=st.plan.offloaded_bytes(), pred_peak=pred0.get("compute_peak_bytes"),
                             pred_step=pred0.get("step_s"), pred_step_after=stats.get("predicted_step_s"),
                             meas_step=stats.get("measured_step_s"), window_slots=stats.get("window_slots"),
                             window_bytes=stats.get("window_bytes"), plan_s=plan_s, same=same,
                             pred_gap=stats.get("measured_gap_s"),
                             calibration=(st.plan.predicted or {}).get("calibration"), **r))
            save()
        tu = time.perf_counter()
        unload_all(mm, cpu)
        tu = time.perf_counter() - tu
        if st.handle is not None:
            d["notes"].append(f"virtual_vram_gb={v:g}: the handle was still live after unload_all_models")
        est = max(est, time.perf_counter() - t)
        say(f"distorch {v:g} GiB: {time.perf_counter() - t:.1f}s for compile + {len(ress)} resolutions "
            f"(unload {tu:.1f}s)")

    # 3b. the same budgets with whole blocks forced (DISTORCH_GRANULARITY=block), first resolution only: what
    #     streaming the layers inside the blocks bought, measured
    for v in [float(x) for x in a.block_vram.split(",") if x.strip()]:
        if not guard.allow(max(est * 0.7, 10.0 if not cpu else 1.0), f"whole blocks at {v:g}", d["skipped"]):
            continue
        os.environ["DISTORCH_GRANULARITY"] = "block"
        try:
            m = entry.distorch(model, a.device, v, "cpu", "", True)
            st = entry.state_of(m)
            pred0 = dict(st.plan.predicted or {})
            res = ress[0]
            r = run(m, f"distorch blocks {v:g} GiB {label[res]}", res)
            same = bit_equal(r.pop("out"), ref[res])
            rows.append(dict(kind="block", name=f"DisTorch2 virtual_vram_gb={v:g} [whole blocks forced]",
                             res=label[res], v=v, gran="block", off=st.plan.offloaded_bytes(),
                             pred_peak=pred0.get("compute_peak_bytes"), pred_step=pred0.get("step_s"),
                             pred_step_after=None, meas_step=None, plan_s=None, same=same, **r))
            save()
            unload_all(mm, cpu)
        finally:
            os.environ.pop("DISTORCH_GRANULARITY", None)

    # 3c. the plain model again, last (--replain): a resident step that differs between the plain row and
    #     DisTorch2 with nothing offloaded (Flux-dev at 512x512 on an H200, runs 10 and 11) is either the
    #     process's state by then or the compiled model's own
    if a.replain:
        for res in ress:
            if not guard.allow(10.0 if not cpu else 1.0, f"plain again at {label[res]}", d["skipped"]):
                continue
            r = run(model, f"plain again {label[res]}", res)
            same = bit_equal(r.pop("out"), ref[res])
            d["notes"].append(f"Plain again after every DisTorch2 row, {label[res]}: {r['s_it']:.4f} s/it (steps "
                              f"{[round(x, 4) for x in r['steps']]}); bit-identical to the first plain row: "
                              f"{'yes' if same else 'NO'}.")
            save()
        unload_all(mm, cpu)

    # 4. optional extras (off by default)
    lora_rows, cyc = [], []
    if a.lora_rank and guard.allow(30, "LoRA", d["skipped"]):
        lora_rows = lora_bench(a, model, lambda m, lab: run(m, lab), nodes, folder_paths, mm, entry, torch, cpu)
    if a.cycles and guard.allow(30, "cycles", d["skipped"]):
        cyc = cycles_bench(a, model, run, mm, entry, torch, cpu)
    d["lora"], d["cycles"] = lora_rows, cyc
    d["extra_md"] = [extras_md(a, lora_rows, cyc)] if (lora_rows or cyc) else []
    save()
    print(open(md).read())
    say(f"wrote {md}")
    try_plot(md)


if __name__ == "__main__":
    main()
