"""A Wan-2.x-14B-shaped model in ComfyUI's fp8_scaled form inside ComfyUI 0.3.75: VRAM rows and the
two-expert workflow (host RAM, cold and warm runs).

Model: ComfyUI's own WanModel (comfy/ldm/wan/model.py), t2v, dim 5120, ffn 13824, 40 heads, 40 layers,
in/out 16 channels, patch (1,2,2); random weights written as ComfyUI's fp8_scaled files read them: every
Linear weight float8_e4m3fn with a float32 `<module>.scale_weight` beside it (weight * scale = the bf16
weight), the rest bf16, and the `scaled_fp8` marker key (an empty float8_e4m3fn tensor of 2 elements, which
ComfyUI's model_detection reads as "scaled fp8, no fp8 matmul"; `--fp8-marker 0` writes the 0-element form,
which turns ComfyUI's fp8 matmul on where the card has it).  Two experts (high / low noise, different
seeds), 14.3 GB each, and a random rank-64 LoRA per expert on every block Linear (ComfyUI's
`diffusion_model.<module>.lora_up/lora_down.weight` keys, 613 MB).  Files go to --model-dir (disk, not
/dev/shm: RAM is what is measured) and are made once (`--mode make`), reused by every process.

  --mode vram      one expert at 480x832, 17 frames (latent 16x5x60x104), one process: plain (resident),
                   DisTorch2 at --vram budgets, ComfyUI's own partial loading at --native budgets; s/it,
                   peak VRAM, floor, bit-identity (bench_comfy's table and chart).  -> wan_vram_<gpu>.md/.json/.png
  --mode workflow  the Wan 2.2 two-expert workflow: UNETLoader (or UNETLoaderDisTorch2MultiGPU) ->
                   LoraLoaderModelOnly -> ModelSamplingSD3 (shift 8) per expert, KSamplerAdvanced euler cfg 1,
                   high-noise expert steps 0-4 (leftover noise on), low-noise expert 4-8, at 480x832x17.
                   ONE PROCESS PER CONFIGURATION (this driver spawns them), so host RSS is per configuration:
                   plain, distorch:13, comfy:13 (ComfyUI's own partial load, ~13 GiB of each expert off),
                   distorch:30 (all), distorch:9.  Per configuration: cold run (load -> both phases done) and
                   warm run (both samplers again, models loaded), s/step, peak VRAM, peak host RSS and its
                   breakdown (RssAnon / RssFile / RssShmem sampled every 50 ms, machine used memory, pinned
                   bytes of distorch and of ComfyUI), RSS after unload_all_models + gc (models still
                   referenced, as ComfyUI's cache holds them) and after dropping them, and the latents
                   compared bit for bit with the plain run's.  -> wan_workflow_<gpu>.md/.json
  --mode make      only the files (prints the marker file's path when done).

The files are made by bench/wan_files.py; the workflow table is drawn by bench/wan_report.py.

Every node call runs under torch.inference_mode(), as ComfyUI's executor runs them.  Results are written
after every row / configuration (a timeout late keeps what was done); --deadline guards each phase.

    python bench/bench_comfy_wan.py --mode make
    python bench/bench_comfy_wan.py --mode vram --deadline 100
    python bench/bench_comfy_wan.py --mode workflow --deadline 200
    python bench/bench_comfy_wan.py --tiny --mode workflow      # CPU smoke (dim 128, 2 layers, 64x64x5)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_comfy as B  # noqa: E402
import bench_util as U  # noqa: E402
import comfy_report as R  # noqa: E402
from wan_files import ensure_files, names  # noqa: E402
from wan_report import wf_md  # noqa: E402

U.NAME = "bench_wan"     # the prefix of every say() line, the shared helpers' too
say = B.say
GiB = B.GiB
REPO = B.REPO


# ------------------------------------------------------------------------------------------------------
# --mode vram (issue 10): one expert, resident / DisTorch2 / ComfyUI partial
# ------------------------------------------------------------------------------------------------------
def latent_shape(a) -> tuple:
    return (1, 16, (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8)


def run_vram(a):
    cpu = a.device == "cpu"
    mm, nodes, folder_paths = B.boot(a.comfy, cpu)
    import torch
    import comfyui_version
    entry = B.import_distorch().entry
    dev = torch.device(a.device)
    gpu = "cpu" if cpu else torch.cuda.get_device_name(dev)
    guard = B.Guard(a.deadline)
    md = B.out_path(a.out, f"wan_vram_{B.card_tag(gpu)}.md")
    with torch.inference_mode():
        n = ensure_files(a)
        folder_paths.add_model_folder_path("diffusion_models", a.model_dir)
        t = time.perf_counter()
        model = nodes.UNETLoader().load_unet(n["high"], "default")[0]
        total = model.model_size()
        say(f"UNETLoader: {type(model.model.diffusion_model).__name__} {total / GiB:.2f} GiB in "
            f"{time.perf_counter() - t:.1f}s")
        g = torch.Generator().manual_seed(1)
        cond = [[torch.randn(1, a.ctx, 4096, generator=g), {}]]
        shape = latent_shape(a)
        latent = torch.zeros(shape)
        lab = f"{a.height}x{a.width}x{a.frames}"
        d = {"title": f"DisTorch2 in ComfyUI {comfyui_version.__version__}: s/it against peak VRAM, "
                      f"Wan-2.x-14B-shaped model in fp8_scaled form",
             "short": "Wan fp8_scaled", "total_bytes": total, "bw": None, "rows": [], "skipped": [], "notes": [],
             "model_line": f"Model: ComfyUI's WanModel t2v, dim {a.dim}, ffn {a.ffn}, {a.dim // 128} heads, "
                           f"{a.layers} layers, random weights in fp8_scaled form (scaled_fp8 marker of "
                           f"{a.fp8_marker} elements), {total / GiB:.2f} GiB as ComfyUI holds it, loaded by "
                           f"UNETLoader; one expert; latent {tuple(shape[1:])} ({lab}), {a.ctx} text tokens, "
                           f"euler, {a.steps} steps, cfg 1; every node call under torch.inference_mode()."}
        B.header(d, gpu, torch, comfyui_version.__version__)
        rows = d["rows"]

        def run(m, label, filler=0):
            return B.sample_timed(m, label, latent, cond, a.steps, dev, cpu, filler)

        r = run(model, "plain")
        ref = r.pop("out")
        rows.append(dict(kind="plain", name="plain UNETLoader (resident)", res=lab, off=0, **r))
        B.save_results(d, md)
        B.unload_all(mm, cpu)
        est = 0.0
        for nat in ([float(x) for x in a.native.split(",") if x.strip() and float(x) > 0] if not cpu else []):
            if not guard.allow(est * 1.2 + 5, f"ComfyUI partial ~{nat:g} GiB off", d["skipped"]):
                continue
            t = time.perf_counter()
            filler, fb = B.comfy_filler(mm, model, shape, int(nat * GiB), dev)
            r = run(model, f"comfy native ~{nat:g} GiB off", filler=fb)
            off = total - model.loaded_size()
            same = B.bit_equal(r.pop("out"), ref)
            rows.append(dict(kind="comfy", name=f"ComfyUI partial load (asked {nat:g} GiB off)", res=lab, off=off,
                             asked_gib=nat, filler=fb, same=same, **r))
            del filler
            B.unload_all(mm, cpu)
            B.save_results(d, md)
            est = max(est, time.perf_counter() - t)
        if not cpu:
            from distorch.compiler.inventory import probe
            d["bw"] = probe().bandwidth("cpu", str(dev))
            say(f"pinned host->GPU bandwidth (probed): {d['bw'] / 1e9:.1f} GB/s")
        est = 0.0
        for v in B.spread_order([float(x) for x in a.vram.split(",") if x.strip()]):
            if not guard.allow(max(est * 1.2, 10.0 if not cpu else 1.0), f"DisTorch2 virtual_vram_gb={v:g}",
                               d["skipped"]):
                continue
            t = time.perf_counter()
            m = entry.distorch(model, a.device, v, "cpu", "", True)
            st = entry.state_of(m)
            pred0 = dict(st.plan.predicted or {})
            r = run(m, f"distorch {v:g} GiB")
            stats = {}
            try:
                stats = dict(st.handle.stats) if st.handle is not None else dict(st.last_stats or {})
            except Exception as e:
                d["notes"].append(f"stats of virtual_vram_gb={v:g} failed: {type(e).__name__}: {e}")
            same = B.bit_equal(r.pop("out"), ref)
            rows.append(dict(kind="distorch", name=f"DisTorch2 virtual_vram_gb={v:g}", res=lab, v=v,
                             off=st.plan.offloaded_bytes(), pred_peak=pred0.get("compute_peak_bytes"),
                             pred_step=pred0.get("step_s"), pred_step_after=stats.get("predicted_step_s"),
                             meas_step=stats.get("measured_step_s"), window_slots=stats.get("window_slots"),
                             same=same, **r))
            B.unload_all(mm, cpu)
            B.save_results(d, md)
            est = max(est, time.perf_counter() - t)
        B.save_results(d, md)
    print(open(md).read())
    say(f"wrote {md}")
    B.try_plot(md)


# ------------------------------------------------------------------------------------------------------
# --mode workflow (issue 11): one child process per configuration
# ------------------------------------------------------------------------------------------------------
def child(a):
    """One configuration of the two-expert workflow, cold then warm; writes its row to --child-out."""
    cpu = a.device == "cpu"
    mm, nodes, folder_paths = B.boot(a.comfy, cpu)
    import torch
    import comfy.utils
    cn = B.import_distorch()
    from comfy_extras.nodes_model_advanced import ModelSamplingSD3
    dev = torch.device(a.device)
    n = names(a)
    folder_paths.add_model_folder_path("diffusion_models", a.model_dir)
    folder_paths.add_model_folder_path("loras", a.model_dir)
    kind, _, val = a.config.split("#")[0].partition(":")     # "<config>#<n>": the same configuration again
    if kind not in ("plain", "distorch", "comfy"):
        raise SystemExit(f"--config {a.config!r}: give plain, distorch:<virtual_vram_gb> or comfy:<GiB off>")
    rss = B.RssSampler(0.05, mm)
    rss.start()
    row = {"config": a.config, "kind": kind, "value": float(val) if val else None}

    def save():
        R.write_atomic(a.child_out, json.dumps(row, indent=1, default=str))

    marks = []
    phase = {"name": None}

    def hook(value, total, preview, **kw):
        if total not in (a.steps // 2, a.steps - a.steps // 2):
            return          # not a sampler step: DisTorch's own progress bars (weights -> homes ...) use this hook too
        if not cpu:
            torch.cuda.synchronize(dev)
        marks.append((phase["name"], time.perf_counter()))
    comfy.utils.set_progress_bar_global_hook(hook)

    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, a.ctx, 4096, generator=g), {}]]
    neg = [[torch.randn(1, a.ctx, 4096, generator=g), {}]]
    shape = latent_shape(a)
    split = a.steps // 2
    row["rss_before_load"] = rss.mark()
    ks = nodes.KSamplerAdvanced()
    filler, fb = None, 0

    def load(which):
        if kind == "distorch":
            cls = cn.NODE_CLASS_MAPPINGS["UNETLoaderDisTorch2MultiGPU"]
            m = cls().load(unet_name=n[which], weight_dtype="default", compute_device=a.device,
                           virtual_vram_gb=float(val), donor_device="cpu", expert_mode_allocations="",
                           eject_models=True)[0]
        else:
            m = nodes.UNETLoader().load_unet(n[which], "default")[0]
        if a.lora_rank:
            m = nodes.LoraLoaderModelOnly().load_lora_model_only(m, n["lora_" + which], 1.0)[0]
        return ModelSamplingSD3().patch(m, a.shift)[0]

    def off_of(m):
        if kind == "distorch":
            st = cn.entry.state_of(m)
            return st.plan.offloaded_bytes() if st is not None and st.plan is not None else None
        if kind == "comfy":
            return m.model_size() - m.loaded_size()
        return 0

    def phases(models, run):
        lat = {"samples": torch.zeros(shape)}
        out = {}
        for which, add, start, end, left in (("high", "enable", 0, split, "enable"),
                                             ("low", "disable", split, 10000, "disable")):
            phase["name"] = f"{run}:{which}"
            marks.append((phase["name"] + ":start", time.perf_counter()))
            lat = ks.sample(models[which], add, a.seed, a.steps, 1.0, "euler", "simple", pos, neg, lat, start, end,
                            left)[0]
            out[which] = lat["samples"]
            row.setdefault("off", {})[which] = off_of(models[which])
        if not cpu:
            torch.cuda.synchronize(dev)
        return out

    def step_stats(run):
        per = {}
        for which in ("high", "low"):
            p = f"{run}:{which}"
            t0 = next(t for nm, t in marks if nm == p + ":start")
            ts = [t for nm, t in marks if nm == p]
            per[which] = {"first_s": ts[0] - t0 if ts else None, "steps": [b - x for x, b in zip(ts, ts[1:])]}
        allsteps = per["high"]["steps"] + per["low"]["steps"]
        return per, (statistics.median(allsteps) if allsteps else None)

    def timed(run, fn):
        if not cpu:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        rss.mark()
        t = time.perf_counter()
        res = fn()
        row[f"{run}_s"] = time.perf_counter() - t
        row[f"peak_vram_{run}"] = max(0, torch.cuda.max_memory_allocated(dev) - fb) if not cpu else 0
        row[f"rss_{run}"] = rss.peak()
        row[f"steps_{run}"], row[f"s_step_{run}"] = step_stats(run)
        say(f"{a.config} {run}: {row[f'{run}_s']:.2f}s, {row[f's_step_{run}'] or 0:.3f} s/step, peak VRAM "
            f"{row[f'peak_vram_{run}'] / GiB:.2f} GiB, peak RSS {row[f'rss_{run}']['max'].get('VmRSS', 0) / GiB:.2f} GiB")
        save()
        return res

    sampler = None
    if a.sample_stacks:
        from sampler import StackSampler
        sampler = StackSampler(0.01)

    def loaded(w):
        t = time.perf_counter()
        m = load(w)
        row.setdefault("load_node_s", {})[w] = time.perf_counter() - t
        return m

    with torch.inference_mode():
        def cold():
            nonlocal filler, fb
            if sampler is not None:
                sampler.start()
            ms = {w: loaded(w) for w in ("high", "low")}
            if kind == "comfy" and not cpu:
                filler, fb = B.comfy_filler(mm, ms["high"], shape, int(float(val) * GiB), dev)
                row["filler"] = fb
            return ms, phases(ms, "cold")
        models, out_cold = timed("cold", cold)
        if sampler is not None:
            sampler.stop()
            row["cold_profile"] = sampler.report(top=20)
            say(f"{a.config} cold: where the time went (sampled stacks)\n" + sampler.text(row["cold_profile"]))
        out_warm = timed("warm", lambda: phases(models, "warm"))
        ref_path = os.path.join(a.model_dir, n["ref"])
        lat = {k: v.detach().cpu() for k, v in out_cold.items()}
        if kind == "plain":
            torch.save(lat, ref_path)
            row["same"] = {"high": True, "low": True}
        elif os.path.exists(ref_path):
            ref = torch.load(ref_path)
            row["same"] = {k: B.bit_equal(lat[k], ref[k]) for k in ("high", "low")}
        row["warm_same_as_cold"] = all(B.bit_equal(out_warm[k], out_cold[k]) for k in ("high", "low"))
        row["finite"] = bool(torch.isfinite(lat["low"]).all())
        save()
        del filler
        filler, fb = None, 0

        def unloaded() -> dict:
            """ComfyUI's unload_all_models (models still referenced, as its node cache holds them) -> RSS."""
            mm.unload_all_models()
            gc.collect()
            if not cpu:
                torch.cuda.empty_cache()
            time.sleep(0.2)
            return rss.read()
        row["rss_after_unload"] = unloaded()
        if a.reload and kind != "comfy":
            # the second load of the same models in this process (ComfyUI reloads them after an unload)
            out_re = timed("reload", lambda: phases(models, "reload"))
            row["reload_same_as_cold"] = all(B.bit_equal(out_re[k].cpu(), lat[k]) for k in ("high", "low"))
            del out_re
            row["rss_after_unload2"] = unloaded()
            save()
        del models, out_cold, out_warm, lat
        gc.collect()
        time.sleep(0.2)
        row["rss_after_drop"] = rss.read()
    rss.stop()
    save()
    say(f"{a.config}: done")


def run_workflow(a):
    """The driver: make the files (here, once), then one child process per configuration."""
    guard = B.Guard(a.deadline)
    n = names(a)
    ready = os.path.join(a.model_dir, n["ready"])
    if not os.path.exists(ready):
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", "make"] + pass_args(a)
        say("making the files: " + " ".join(cmd[2:]))
        subprocess.run(cmd, check=True)
    ref = os.path.join(a.model_dir, n["ref"])
    if os.path.exists(ref):
        os.remove(ref)          # a stale reference from another run must not be compared against
    gpu = "cpu" if a.device == "cpu" else gpu_name()
    md = B.out_path(a.out, f"wan_workflow_{B.card_tag(gpu)}.md")
    frames = f"{a.height}x{a.width}x{a.frames}"
    d = {"title": "Wan 2.2-style two-expert workflow in ComfyUI: host RAM, cold and warm runs",
         "gpu": gpu, "torch": "", "comfyui": "0.3.75", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
         "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
         "model_line": f"Two experts: ComfyUI's WanModel t2v, dim {a.dim}, ffn {a.ffn}, {a.layers} layers, random "
                       f"weights in fp8_scaled form (files in {a.model_dir}, read from the page cache), each through "
                       f"LoraLoaderModelOnly (random rank-{a.lora_rank} LoRA on every block Linear, strength 1) and "
                       f"ModelSamplingSD3 (shift {a.shift:g}); KSamplerAdvanced euler / simple, cfg 1, {a.steps} steps: "
                       f"high-noise expert steps 0-{a.steps // 2}, low-noise {a.steps // 2}-{a.steps}; {frames} "
                       f"(latent {latent_shape(a)[1:]}), {a.ctx} text tokens.",
         "rows": [], "skipped": [], "notes": []}
    try:
        import torch
        d["torch"] = torch.__version__
    except ImportError:
        pass

    def save():
        R.write_atomic(md, wf_md(d))
        R.write_atomic(os.path.splitext(md)[0] + ".json", json.dumps(d, indent=1, default=str))
    est = 0.0
    for cfg in [c.strip() for c in a.configs.split(",") if c.strip()]:
        left = guard.left()
        need = max(est * 1.1, a.min_child_s)
        if not guard.allow(need, cfg, d["skipped"]):
            save()
            continue
        out = os.path.join(a.model_dir, f"wan_{a.tag}_row_{cfg.replace(':', '_').replace('#', '_r')}.json")
        if os.path.exists(out):
            os.remove(out)
        cmd = [sys.executable, os.path.abspath(__file__), "--mode", "child", "--config", cfg, "--child-out", out] \
            + pass_args(a)
        readahead([os.path.join(a.model_dir, n[k]) for k in ("high", "low", "lora_high", "lora_low")])
        limit = min(a.child_timeout, left - 3) if left != float("inf") else a.child_timeout
        say(f"{cfg}: child process (limit {limit:.0f}s)")
        t = time.perf_counter()
        err = None
        try:
            p = subprocess.run(cmd, timeout=limit)
            if p.returncode != 0:
                err = f"exit code {p.returncode}"
        except subprocess.TimeoutExpired:
            err = f"killed after {limit:.0f}s"
        dt = time.perf_counter() - t
        est = max(est, dt)
        row = {"config": cfg}
        if os.path.exists(out):
            row = json.load(open(out))
        if err:
            row["error"] = err
        row["process_s"] = dt
        d["rows"].append(row)
        save()
        say(f"{cfg}: {dt:.1f}s{' (' + err + ')' if err else ''}")
    save()
    print(open(md).read())
    say(f"wrote {md}")


def readahead(paths: list) -> None:
    """Ask the kernel to have the files in the page cache (asynchronous; cheap when they are there already),
    so that every configuration's cold run reads them from memory, as the first did."""
    for p in paths:
        try:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except (OSError, AttributeError):
            pass


def gpu_name() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", "0"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
        return out or "gpu"
    except (OSError, subprocess.SubprocessError):
        return "gpu"


def pass_args(a) -> list:
    """The model and workflow options a child needs, as command-line arguments."""
    out = ["--comfy", a.comfy, "--device", a.device, "--model-dir", a.model_dir, "--dim", str(a.dim),
           "--ffn", str(a.ffn), "--layers", str(a.layers), "--height", str(a.height), "--width", str(a.width),
           "--frames", str(a.frames), "--ctx", str(a.ctx), "--steps", str(a.steps), "--lora-rank", str(a.lora_rank),
           "--shift", str(a.shift), "--seed", str(a.seed), "--fp8-marker", str(a.fp8_marker), "--tag", a.tag]
    return out + (["--sample-stacks"] if a.sample_stacks else []) + (["--reload"] if a.reload else [])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", choices=["make", "vram", "workflow", "child", "paths"], default="workflow",
                    help="paths: print the files' paths (JSON) and exit")
    ap.add_argument("--comfy", default=os.environ.get("DISTORCH_COMFYUI_DIR") or os.path.join(REPO, ".comfy", "ComfyUI"))
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--model-dir", default="/tmp/distorch_wan", help="where the files are made and read (disk)")
    ap.add_argument("--dim", type=int, default=5120)
    ap.add_argument("--ffn", type=int, default=13824)
    ap.add_argument("--layers", type=int, default=40)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=832)
    ap.add_argument("--frames", type=int, default=17)
    ap.add_argument("--ctx", type=int, default=512, help="text tokens (UMT5 length)")
    ap.add_argument("--steps", type=int, default=None, help="vram: 6; workflow: 8 (split in half)")
    ap.add_argument("--lora-rank", type=int, default=64, help="workflow LoRA rank (0: no LoRA)")
    ap.add_argument("--shift", type=float, default=8.0)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--fp8-marker", type=int, default=2, choices=[0, 2],
                    help="elements of the scaled_fp8 marker: 2 = no fp8 matmul (default), 0 = fp8 matmul allowed")
    ap.add_argument("--vram", default="4,8,14", help="vram mode: DisTorch2 virtual_vram_gb values")
    ap.add_argument("--native", default="4,8,13", help="vram mode: GiB ComfyUI's partial load leaves off")
    ap.add_argument("--configs", default="plain,distorch:13,comfy:13,distorch:30,distorch:9",
                    help="workflow mode: plain | distorch:<virtual_vram_gb> | comfy:<GiB off>, in this order "
                    "(plain first: it writes the reference latents; the time guard drops the last ones first); "
                    "'<config>#<n>' runs one again in a fresh process, e.g. plain,distorch:13,plain#2,distorch:13#2 "
                    "to compare cold runs alternately")
    ap.add_argument("--child-timeout", type=float, default=150.0, help="workflow: seconds per configuration")
    ap.add_argument("--min-child-s", type=float, default=25.0,
                    help="workflow: start no configuration with less time than this left")
    ap.add_argument("--deadline", type=float, default=0.0, help="seconds from start after which no new row starts")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: dim 128, ffn 256, 2 layers, 64x64x5, 16 tokens, "
                    "LoRA rank 4")
    ap.add_argument("--sample-stacks", action="store_true",
                    help="workflow: sample Python stacks through each cold run (bench/sampler.py) and report where "
                    "its time went")
    ap.add_argument("--reload", action="store_true", help="workflow: after the unload, run both phases again (the "
                    "second load of the same models in one process) and measure it")
    ap.add_argument("--tag", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--config", default="plain", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="results .md (default bench/results/wan_<mode>_<gpu>.md; under $OUT "
                    "when set)")
    a = ap.parse_args(argv)
    if a.tiny:
        a.device, a.dim, a.ffn, a.layers, a.height, a.width, a.frames, a.ctx = "cpu", 128, 256, 2, 64, 64, 5, 16
        if a.lora_rank == 64:
            a.lora_rank = 4
        if a.model_dir == "/tmp/distorch_wan":
            a.model_dir = "/tmp/distorch_wan_tiny"
        if a.vram == "4,8,14":
            a.vram = "0.0005,1"
        if a.configs == "plain,distorch:13,comfy:13,distorch:30,distorch:9":
            a.configs = "plain,distorch:0.0005,distorch:1"
        a.min_child_s = min(a.min_child_s, 5.0)
    if a.steps is None:
        a.steps = 6 if a.mode == "vram" else 8
    if a.tag is None:
        a.tag = f"d{a.dim}l{a.layers}f{a.ffn}m{a.fp8_marker}"
    if a.dim % 128:
        raise SystemExit(f"--dim {a.dim}: ComfyUI's Wan detection takes heads = dim // 128; give a multiple of 128")
    return a


def main(argv=None):
    a = parse_args(sys.argv[1:] if argv is None else argv)
    if a.mode == "paths":
        print(json.dumps({k: os.path.join(a.model_dir, v) for k, v in names(a).items()}))
    elif a.mode == "make":
        B.boot(a.comfy, a.device == "cpu")
        import torch
        with torch.inference_mode():
            n = ensure_files(a)
        print(os.path.join(a.model_dir, n["ready"]))
    elif a.mode == "vram":
        run_vram(a)
    elif a.mode == "child":
        child(a)
    else:
        run_workflow(a)


if __name__ == "__main__":
    main()
