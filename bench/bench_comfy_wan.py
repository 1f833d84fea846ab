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

The files are made by bench/wan_files.py; each workflow configuration runs in bench/wan_child.py's child process;
the workflow table is drawn by bench/wan_report.py.

Every node call runs under torch.inference_mode(), as ComfyUI's executor runs them.  Results are written
after every row / configuration (a timeout late keeps what was done); --deadline guards each phase.

    python bench/bench_comfy_wan.py --mode make
    python bench/bench_comfy_wan.py --mode vram --deadline 100
    python bench/bench_comfy_wan.py --mode workflow --deadline 200
    python bench/bench_comfy_wan.py --tiny --mode workflow      # CPU smoke (dim 128, 2 layers, 64x64x5)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_comfy as B  # noqa: E402
import bench_util as U  # noqa: E402
import comfy_report as R  # noqa: E402
from wan_child import child  # noqa: E402
from wan_files import ensure_files, latent_shape, names  # noqa: E402
from wan_report import wf_md  # noqa: E402

U.NAME = "bench_wan"     # the prefix of every say() line, the shared helpers' too
say = B.say
GiB = B.GiB
REPO = B.REPO


# ------------------------------------------------------------------------------------------------------
# --mode vram (issue 10): one expert, resident / DisTorch2 / ComfyUI partial
# ------------------------------------------------------------------------------------------------------
def res_label(a) -> str:
    return f"{a.height}x{a.width}x{a.frames}"


def vram_doc(a, total: int, comfy_ver: str) -> dict:
    """The vram table's document (bench_comfy's format), without rows yet."""
    return {"title": f"DisTorch2 in ComfyUI {comfy_ver}: s/it against peak VRAM, "
                     f"Wan-2.x-14B-shaped model in fp8_scaled form",
            "short": "Wan fp8_scaled", "total_bytes": total, "bw": None, "rows": [], "skipped": [], "notes": [],
            "model_line": f"Model: ComfyUI's WanModel t2v, dim {a.dim}, ffn {a.ffn}, {a.dim // 128} heads, "
                          f"{a.layers} layers, random weights in fp8_scaled form (scaled_fp8 marker of "
                          f"{a.fp8_marker} elements), {total / GiB:.2f} GiB as ComfyUI holds it, loaded by "
                          f"UNETLoader; one expert; latent {tuple(latent_shape(a)[1:])} ({res_label(a)}), {a.ctx} "
                          f"text tokens, euler, {a.steps} steps, cfg 1; every node call under torch.inference_mode()."}


def run_vram(a):
    """One process: plain (resident), ComfyUI's partial loading at --native budgets, DisTorch2 at --vram budgets;
    the table is written after every row."""
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
        latent = torch.zeros(latent_shape(a))
        d = vram_doc(a, total, comfyui_version.__version__)
        B.header(d, gpu, torch, comfyui_version.__version__)

        def run(m, label, filler=0):
            return B.sample_timed(m, label, latent, cond, a.steps, dev, cpu, filler)

        r = run(model, "plain")
        ref = r.pop("out")
        d["rows"].append(dict(kind="plain", name="plain UNETLoader (resident)", res=res_label(a), off=0, **r))
        B.save_results(d, md)
        B.unload_all(mm, cpu)
        vram_native_rows(a, mm, model, run, ref, d, md, guard)
        if not cpu:
            from distorch.compiler.inventory import probe
            d["bw"] = probe().bandwidth("cpu", str(dev))
            say(f"pinned host->GPU bandwidth (probed): {d['bw'] / 1e9:.1f} GB/s")
        vram_distorch_rows(a, mm, entry, model, run, ref, d, md, guard)
        B.save_results(d, md)
    print(open(md).read())
    say(f"wrote {md}")
    B.try_plot(md)


def vram_native_rows(a, mm, model, run, ref, d, md, guard) -> None:
    """ComfyUI's own partial load, ~--native GiB left off (a filler holds the VRAM it must not use); none on CPU."""
    import torch
    cpu = a.device == "cpu"
    total = d["total_bytes"]
    est = 0.0
    for nat in ([float(x) for x in a.native.split(",") if x.strip() and float(x) > 0] if not cpu else []):
        if not guard.allow(est * 1.2 + 5, f"ComfyUI partial ~{nat:g} GiB off", d["skipped"]):
            continue
        t = time.perf_counter()
        filler, fb = B.comfy_filler(mm, model, latent_shape(a), int(nat * GiB), torch.device(a.device))
        r = run(model, f"comfy native ~{nat:g} GiB off", filler=fb)
        off = total - model.loaded_size()
        same = B.bit_equal(r.pop("out"), ref)
        d["rows"].append(dict(kind="comfy", name=f"ComfyUI partial load (asked {nat:g} GiB off)", res=res_label(a),
                              off=off, asked_gib=nat, filler=fb, same=same, **r))
        del filler
        B.unload_all(mm, cpu)
        B.save_results(d, md)
        est = max(est, time.perf_counter() - t)


def vram_distorch_rows(a, mm, entry, model, run, ref, d, md, guard) -> None:
    """DisTorch2 at each --vram virtual_vram_gb, ends first, then midpoints (bench_util.spread_order): a run cut
    short by the time guard still has points across the range."""
    cpu = a.device == "cpu"
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
        d["rows"].append(dict(kind="distorch", name=f"DisTorch2 virtual_vram_gb={v:g}", res=res_label(a), v=v,
                              off=st.plan.offloaded_bytes(), pred_peak=pred0.get("compute_peak_bytes"),
                              pred_step=pred0.get("step_s"), pred_step_after=stats.get("predicted_step_s"),
                              meas_step=stats.get("measured_step_s"), window_slots=stats.get("window_slots"),
                              same=same, **r))
        B.unload_all(mm, cpu)
        B.save_results(d, md)
        est = max(est, time.perf_counter() - t)


# ------------------------------------------------------------------------------------------------------
# --mode workflow (issue 11): one child process per configuration (bench/wan_child.py)
# ------------------------------------------------------------------------------------------------------
def workflow_doc(a, gpu: str) -> dict:
    """The workflow table's document, without rows yet."""
    return {"title": "Wan 2.2-style two-expert workflow in ComfyUI: host RAM, cold and warm runs",
            "gpu": gpu, "torch": "", "comfyui": "0.3.75", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO)] + sys.argv[1:]),
            "model_line": f"Two experts: ComfyUI's WanModel t2v, dim {a.dim}, ffn {a.ffn}, {a.layers} layers, random "
                          f"weights in fp8_scaled form (files in {a.model_dir}, read from the page cache), each through "
                          f"LoraLoaderModelOnly (random rank-{a.lora_rank} LoRA on every block Linear, strength 1) and "
                          f"ModelSamplingSD3 (shift {a.shift:g}); KSamplerAdvanced euler / simple, cfg 1, {a.steps} "
                          f"steps: high-noise expert steps 0-{a.steps // 2}, low-noise {a.steps // 2}-{a.steps}; "
                          f"{res_label(a)} (latent {latent_shape(a)[1:]}), {a.ctx} text tokens.",
            "rows": [], "skipped": [], "notes": []}


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
    d = workflow_doc(a, gpu)
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
        limit = min(a.child_timeout, left - 3) if left != float("inf") else a.child_timeout
        row, err = run_child(a, cfg, limit)
        est = max(est, row["process_s"])
        d["rows"].append(row)
        save()
        say(f"{cfg}: {row['process_s']:.1f}s{' (' + err + ')' if err else ''}")
    save()
    print(open(md).read())
    say(f"wrote {md}")


def run_child(a, cfg: str, limit: float) -> tuple:
    """One configuration in a child process (--mode child) of at most `limit` seconds -> (its row, with process_s
    and error where it failed or was killed; that error or None)."""
    n = names(a)
    out = os.path.join(a.model_dir, f"wan_{a.tag}_row_{cfg.replace(':', '_').replace('#', '_r')}.json")
    if os.path.exists(out):
        os.remove(out)
    cmd = [sys.executable, os.path.abspath(__file__), "--mode", "child", "--config", cfg, "--child-out", out] \
        + pass_args(a)
    readahead([os.path.join(a.model_dir, n[k]) for k in ("high", "low", "lora_high", "lora_low")])
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
    row = {"config": cfg}
    if os.path.exists(out):
        row = json.load(open(out))
    if err:
        row["error"] = err
    row["process_s"] = dt
    return row, err


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
