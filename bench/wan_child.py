"""The child process of bench/bench_comfy_wan.py's workflow mode: ONE configuration of the two-expert workflow
(plain, distorch:<virtual_vram_gb> or comfy:<GiB off>), cold run then warm run, in a process of its own so that
host RSS is this configuration's; its row goes to --child-out (JSON, rewritten after every phase).

Phases, each a method of WanChild: the cold run (both experts loaded through the node chain, both
KSamplerAdvanced phases), the warm run (both phases again), the comparison with the plain run's latents, the RSS
after unload_all_models (rss_after_unload) and after dropping the models, and with --reload a second load of the
same models in this process.

    child(a)      # a: bench_comfy_wan.parse_args(...) with --mode child --config ... --child-out ...
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import time

import bench_comfy as B
import comfy_report as R
from wan_files import latent_shape, names

say = B.say
GiB = B.GiB


def rss_after_unload(mm, rss, cpu: bool) -> dict:
    """ComfyUI's unload_all_models (models still referenced, as its node cache holds them) -> RSS."""
    import torch
    mm.unload_all_models()
    gc.collect()
    if not cpu:
        torch.cuda.empty_cache()
    time.sleep(0.2)
    return rss.read()


def rss_after_drop(rss) -> dict:
    """RSS once the caller has deleted its references to the models (gc, a moment to settle)."""
    gc.collect()
    time.sleep(0.2)
    return rss.read()


class WanChild:
    """One configuration: ComfyUI booted, the conditioning made, the RSS sampler and the progress hook (sampler
    step timestamps) running; `row` is what --child-out gets."""

    def __init__(self, a):
        self.a = a
        self.cpu = cpu = a.device == "cpu"
        self.mm, self.nodes, folder_paths = B.boot(a.comfy, cpu)
        import torch
        import comfy.utils
        self.cn = B.import_distorch()
        from comfy_extras.nodes_model_advanced import ModelSamplingSD3
        self.ModelSamplingSD3 = ModelSamplingSD3
        self.dev = torch.device(a.device)
        self.n = names(a)
        folder_paths.add_model_folder_path("diffusion_models", a.model_dir)
        folder_paths.add_model_folder_path("loras", a.model_dir)
        kind, _, val = a.config.split("#")[0].partition(":")     # "<config>#<n>": the same configuration again
        if kind not in ("plain", "distorch", "comfy"):
            raise SystemExit(f"--config {a.config!r}: give plain, distorch:<virtual_vram_gb> or comfy:<GiB off>")
        self.kind, self.val = kind, val
        self.rss = B.RssSampler(0.05, self.mm)
        self.rss.start()
        self.row = {"config": a.config, "kind": kind, "value": float(val) if val else None}
        self.marks = []             # (phase name, time): each sampler step's end, each phase's start
        self.phase = None
        comfy.utils.set_progress_bar_global_hook(self.hook)
        g = torch.Generator().manual_seed(1)
        self.pos = [[torch.randn(1, a.ctx, 4096, generator=g), {}]]
        self.neg = [[torch.randn(1, a.ctx, 4096, generator=g), {}]]
        self.shape = latent_shape(a)
        self.split = a.steps // 2
        self.row["rss_before_load"] = self.rss.mark()
        self.ks = self.nodes.KSamplerAdvanced()
        self.filler, self.fb = None, 0      # comfy: the tensor (and its bytes) holding VRAM so ComfyUI loads partially
        self.sampler = None
        if a.sample_stacks:
            from sampler import StackSampler
            self.sampler = StackSampler(0.01)

    def save(self) -> None:
        R.write_atomic(self.a.child_out, json.dumps(self.row, indent=1, default=str))

    def hook(self, value, total, preview, **kw):
        a = self.a
        if total not in (a.steps // 2, a.steps - a.steps // 2):
            return          # not a sampler step: DisTorch's own progress bars (weights -> homes ...) use this hook too
        if not self.cpu:
            B.step_sync(self.dev)       # the compute stream only (bench_util.step_sync: why)
        self.marks.append((self.phase, time.perf_counter()))

    # ------------------------------------------------------------------------------------------ the models
    def load(self, which):
        """UNETLoader (or UNETLoaderDisTorch2MultiGPU) -> LoraLoaderModelOnly -> ModelSamplingSD3."""
        a, n, nodes = self.a, self.n, self.nodes
        if self.kind == "distorch":
            cls = self.cn.NODE_CLASS_MAPPINGS["UNETLoaderDisTorch2MultiGPU"]
            m = cls().load(unet_name=n[which], weight_dtype="default", compute_device=a.device,
                           virtual_vram_gb=float(self.val), donor_device="cpu", expert_mode_allocations="",
                           eject_models=True)[0]
        else:
            m = nodes.UNETLoader().load_unet(n[which], "default")[0]
        if a.lora_rank:
            m = nodes.LoraLoaderModelOnly().load_lora_model_only(m, n["lora_" + which], 1.0)[0]
        return self.ModelSamplingSD3().patch(m, a.shift)[0]

    def loaded(self, w):
        t = time.perf_counter()
        m = self.load(w)
        self.row.setdefault("load_node_s", {})[w] = time.perf_counter() - t
        return m

    def off_of(self, m):
        if self.kind == "distorch":
            st = self.cn.entry.state_of(m)
            return st.plan.offloaded_bytes() if st is not None and st.plan is not None else None
        if self.kind == "comfy":
            return m.model_size() - m.loaded_size()
        return 0

    # ------------------------------------------------------------------------------------------ the runs
    def phases(self, models, run):
        """Both KSamplerAdvanced phases: high-noise expert steps 0-split (leftover noise on), low-noise the rest."""
        import torch
        a = self.a
        lat = {"samples": torch.zeros(self.shape)}
        out = {}
        for which, add, start, end, left in (("high", "enable", 0, self.split, "enable"),
                                             ("low", "disable", self.split, 10000, "disable")):
            self.phase = f"{run}:{which}"
            self.marks.append((self.phase + ":start", time.perf_counter()))
            lat = self.ks.sample(models[which], add, a.seed, a.steps, 1.0, "euler", "simple", self.pos, self.neg, lat,
                                 start, end, left)[0]
            out[which] = lat["samples"]
            self.row.setdefault("off", {})[which] = self.off_of(models[which])
        if not self.cpu:
            torch.cuda.synchronize(self.dev)
        return out

    def step_stats(self, run):
        per = {}
        for which in ("high", "low"):
            p = f"{run}:{which}"
            t0 = next(t for nm, t in self.marks if nm == p + ":start")
            ts = [t for nm, t in self.marks if nm == p]
            per[which] = {"first_s": ts[0] - t0 if ts else None, "steps": [b - x for x, b in zip(ts, ts[1:])]}
        allsteps = per["high"]["steps"] + per["low"]["steps"]
        return per, (statistics.median(allsteps) if allsteps else None)

    def timed(self, run, fn):
        """fn() as the run `run`: wall time, peak VRAM (less the filler), peak RSS, per-step times -> row."""
        import torch
        row, dev = self.row, self.dev
        if not self.cpu:
            torch.cuda.synchronize(dev)
            torch.cuda.reset_peak_memory_stats(dev)
        self.rss.mark()
        t = time.perf_counter()
        res = fn()
        row[f"{run}_s"] = time.perf_counter() - t
        row[f"peak_vram_{run}"] = max(0, torch.cuda.max_memory_allocated(dev) - self.fb) if not self.cpu else 0
        row[f"rss_{run}"] = self.rss.peak()
        row[f"steps_{run}"], row[f"s_step_{run}"] = self.step_stats(run)
        say(f"{self.a.config} {run}: {row[f'{run}_s']:.2f}s, {row[f's_step_{run}'] or 0:.3f} s/step, peak VRAM "
            f"{row[f'peak_vram_{run}'] / GiB:.2f} GiB, peak RSS {row[f'rss_{run}']['max'].get('VmRSS', 0) / GiB:.2f} GiB")
        self.save()
        return res

    def cold(self):
        """Load both experts (and, for comfy:<GiB off>, hold VRAM so ComfyUI loads partially), run both phases."""
        if self.sampler is not None:
            self.sampler.start()
        ms = {w: self.loaded(w) for w in ("high", "low")}
        if self.kind == "comfy" and not self.cpu:
            self.filler, self.fb = B.comfy_filler(self.mm, ms["high"], self.shape, int(float(self.val) * GiB), self.dev)
            self.row["filler"] = self.fb
        return ms, self.phases(ms, "cold")

    def warm(self, models):
        """Both phases again, the models loaded."""
        return self.timed("warm", lambda: self.phases(models, "warm"))

    def compare(self, out_cold, out_warm) -> dict:
        """The cold latents (on the host) against the plain run's (plain writes them), warm against cold."""
        import torch
        row = self.row
        ref_path = os.path.join(self.a.model_dir, self.n["ref"])
        lat = {k: v.detach().cpu() for k, v in out_cold.items()}
        if self.kind == "plain":
            torch.save(lat, ref_path)
            row["same"] = {"high": True, "low": True}
        elif os.path.exists(ref_path):
            ref = torch.load(ref_path)
            row["same"] = {k: B.bit_equal(lat[k], ref[k]) for k in ("high", "low")}
        row["warm_same_as_cold"] = all(B.bit_equal(out_warm[k], out_cold[k]) for k in ("high", "low"))
        row["finite"] = bool(torch.isfinite(lat["low"]).all())
        self.save()
        return lat

    def reload(self, models, lat) -> None:
        """The second load of the same models in this process (ComfyUI reloads them after an unload)."""
        out_re = self.timed("reload", lambda: self.phases(models, "reload"))
        self.row["reload_same_as_cold"] = all(B.bit_equal(out_re[k].cpu(), lat[k]) for k in ("high", "low"))
        del out_re
        self.row["rss_after_unload2"] = rss_after_unload(self.mm, self.rss, self.cpu)
        self.save()

    def run(self) -> None:
        import torch
        a, row = self.a, self.row
        with torch.inference_mode():
            models, out_cold = self.timed("cold", self.cold)
            if self.sampler is not None:
                self.sampler.stop()
                row["cold_profile"] = self.sampler.report(top=20)
                say(f"{a.config} cold: where the time went (sampled stacks)\n" + self.sampler.text(row["cold_profile"]))
            out_warm = self.warm(models)
            lat = self.compare(out_cold, out_warm)
            self.filler, self.fb = None, 0
            row["rss_after_unload"] = rss_after_unload(self.mm, self.rss, self.cpu)
            if a.reload and self.kind != "comfy":
                self.reload(models, lat)
            del models, out_cold, out_warm, lat
            row["rss_after_drop"] = rss_after_drop(self.rss)
        self.rss.stop()
        self.save()
        say(f"{a.config}: done")


def child(a) -> None:
    """One configuration of the two-expert workflow, cold then warm; writes its row to --child-out."""
    WanChild(a).run()
