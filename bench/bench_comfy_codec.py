"""Compressed bf16 streaming inside a real ComfyUI (issue 14, criterion 4): DisTorch2 raw against compressed.

One process, ComfyUI 0.3.75 in-process as bench/bench_comfy.py runs it (every node call under
torch.inference_mode(), as ComfyUI's executor runs them), its Flux-dev-sized bf16 model (bench_comfy's file,
made once, 22.17 GiB) at one resolution (1024x1024), rows in this order (most important first, so that a
time guard that stops early keeps what matters):

  * plain                   UNETLoader's model, resident: the reference latent
  * decode                  formats.bf16_codec.decode_triton on one of the model's block weights (a 3072 x 12288
                            bf16 Linear weight, coded by formats.bf16_encode.encode): GB/s of output, median of
                            repeated launches timed with CUDA events (bench_codec.device_time); CPU: n/a
  * DisTorch2 compressed / raw at --all-gb (everything offloaded): DISTORCH_COMPRESS=on / off while the node
                            runs (comfy_nodes/state.py reads it when it plans)
  * ComfyUI's own partial loading at its lowest budget (--native-all GiB left off, as bench_comfy's lowest)
  * per partial budget (--vram, GiB offloaded): DisTorch2 compressed, raw, and ComfyUI asked to leave as much off
  * a text encoder (T5-XXL-shaped, ComfyUI's own class, random bf16 weights, bench_comfy_clip's state dict)
    through the CLIP DisTorch2 node's entry point, fully offloaded: plain CLIP, DisTorch2 compressed, raw

Each Flux row: s/it (median step after the first), peak VRAM (torch.cuda.max_memory_allocated through the
sampling, and of the steps after the first alone), cold time (node call to the end of the first step: plan,
load, compression), host memory (peak VmRSS; RssAnon, RssFile, RssShmem, distorch's and ComfyUI's pinned
bytes at their peak; VmRSS before the node call and after sampling), the runtime's codec statistics
(handle.stats["codec"]: ratio, stored bytes, encode time; null where nothing was compressed), the bytes its
homes hold and the bytes one step streams, the link floor (streamed bytes / probed pinned bandwidth) and the
s/it against today's raw link floor (raw offloaded bytes / bandwidth), and the latent compared bit for bit
with the plain row's.  Results (md with a headline table + json) are written after every row.

DisTorch2 rows compile a clone of UNETLoader's patcher (what a node gets as its input): distorch() turns the
patcher it is given into a DisTorch patcher in place, and the ComfyUI rows need ComfyUI's own.

    python bench/bench_comfy_codec.py --deadline 475     # GPU: bench/results/comfy_codec_<gpu>.md/.json
    PHASES=D bash bench/gpu_bench.sh                     # the same through the GPU driver (setup, preflight)
    python bench/bench_comfy_codec.py --tiny             # the same code on CPU, tiny budgets (smoke test, ~25 s)
    python bench/bench_comfy_codec.py --tiny --host-bf16 # ... the Flux kept bf16 so that it compresses (slow)
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_comfy as BC  # noqa: E402  (ComfyUI boot, the Flux file, sampling, host memory, time guard)
import bench_comfy_clip as BCL  # noqa: E402  (the text encoder's state dict)
from codec_report import save_results  # noqa: E402  (the results: headline, md, json)
from codec_rows import Compress, codec_facts, decode_speed, host_fields, runtime_stats, say  # noqa: E402  (row pieces)
from comfy_report import _f  # noqa: E402

GiB = BC.GiB
MODE_NAME = {"on": "compressed", "off": "raw", "auto": "auto"}
PROMPT = "a photo of a red fox in the snow, golden hour, 35 mm, shallow depth of field"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    BC.common_args(ap)      # --comfy --device --steps --ctx --double --single --model-dir --deadline
    ap.add_argument("--res", type=int, default=1024, help="square resolution")
    ap.add_argument("--all-gb", type=float, default=30.0,
                    help="virtual_vram_gb of the fully offloaded rows (above the model: everything streams)")
    ap.add_argument("--vram", default="16,8", help="partial budgets, in this order: DisTorch2 virtual_vram_gb and "
                    "the GiB ComfyUI's own partial loading is asked to leave off the GPU ('' to skip)")
    ap.add_argument("--native-all", type=float, default=20.0,
                    help="ComfyUI's lowest budget, GiB left off the GPU (bench_comfy's lowest; 0: skip)")
    ap.add_argument("--modes", default="on,off", help="DISTORCH_COMPRESS values, a row each per budget, in this order")
    ap.add_argument("--encoder", default="t5xxl", choices=["t5xxl", "clip_l", "none"])
    ap.add_argument("--clip-gb", type=float, default=30.0, help="virtual_vram_gb of the text encoder rows")
    ap.add_argument("--encodes", type=int, default=4, help="encodes per text-encoder row (the first loads)")
    ap.add_argument("--decode-reps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU smoke: 1 double block (hidden 3072: ComfyUI's Flux "
                    "detection fixes it), 64x64, 2 steps, 16 tokens, budgets 3 (all) and 0.5 GiB, no ComfyUI rows "
                    "(they need a GPU); ComfyUI holds the Flux in fp32 on a host, so nothing of it is codable "
                    "(codec null: the path where the runtime compresses nothing); the compressed path runs on a "
                    "bf16 CLIP-L at 0.01 GiB (a few layers: the host's torch decoder runs at tens of MB/s)")
    ap.add_argument("--host-bf16", action="store_true", help="on a host, keep the Flux in bf16 (ComfyUI's "
                    "--bf16-unet) and stream single layers (DISTORCH_GRANULARITY=sub): its compressed rows really "
                    "compress (slow: ~10 s a step on the host decoder for the 0.16 GiB the smallest plan streams)")
    ap.add_argument("--out", default=None, help="results .md (default bench/results/comfy_codec_<gpu>.md; "
                    "under $OUT when set)")
    if ap.parse_known_args(argv)[0].tiny:      # tiny's values, unless given on the command line
        ap.set_defaults(device="cpu", double=1, single=0, res=64, steps=2, ctx=16, all_gb=3.0, vram="0.5",
                        native_all=0.0, encoder="clip_l", clip_gb=0.01, encodes=2, model_dir="/tmp/distorch_codec_tiny")
    return ap.parse_args(argv)


def floats(s: str) -> list:
    return [float(x) for x in s.split(",") if x.strip()]


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------
def main(argv=None):
    a = parse_args(argv)
    cpu = a.device == "cpu"
    mm, nodes, folder_paths, torch, comfy_ver, entry, dev, gpu = BC.start(a.comfy, a.device)
    if a.host_bf16:
        # ComfyUI keeps a diffusion model in fp32 on a host: keep the file's bf16 (it computes in fp32), and
        # stream single layers rather than the 0.65 GiB block
        from comfy.cli_args import args as comfy_args
        comfy_args.bf16_unet = True
        os.environ.setdefault("DISTORCH_GRANULARITY", "sub")
    md = BC.out_path(a.out, f"comfy_codec_{BC.card_tag(gpu)}.md")
    with torch.inference_mode():
        Bench(a, cpu, dev, gpu, mm, nodes, folder_paths, entry, torch, comfy_ver, md).run()
    print(open(md).read())
    say(f"wrote {md}")


class Bench:
    # first guess of a row's seconds (GPU), replaced by the longest measured one of its kind (x 1.2)
    EST = {"distorch": 30.0, "comfy": 25.0, "clip_setup": 60.0, "clip": 30.0}

    def __init__(self, a, cpu, dev, gpu, mm, nodes, folder_paths, entry, torch, comfy_ver, md):
        self.a, self.cpu, self.dev, self.mm, self.nodes, self.fp = a, cpu, dev, mm, nodes, folder_paths
        self.entry, self.torch, self.md = entry, torch, md
        self.guard = BC.Guard(a.deadline)
        self.est = {k: (v if not cpu else 1.0) for k, v in self.EST.items()}
        self.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
        self.d = {"title": f"Compressed bf16 streaming in ComfyUI {comfy_ver}: DisTorch2 raw vs compressed vs "
                           "ComfyUI's own loading, Flux-dev-shaped model and a T5-XXL-shaped text encoder",
                  "res": a.res, "all_gb": a.all_gb, "encoder": a.encoder, "clip_gb": a.clip_gb,
                  "decode_reps": a.decode_reps, "bw": None, "rows": [], "clip": [], "decode": None,
                  "skipped": [], "not_run": [], "notes": []}
        BC.header(self.d, gpu, torch, comfy_ver)

    def save(self):
        save_results(self.d, self.md)

    def timed_kind(self, kind: str, seconds: float):
        self.est[kind] = max(self.est[kind], 1.2 * seconds)

    def attempt(self, what: str, rows: list, fn) -> None:
        """fn() appends its row; a failure becomes a row with the error (the bench goes on with the next)."""
        try:
            fn()
        except Exception as e:
            traceback.print_exc()
            rows.append({"kind": "error", "name": what, "error": f"{type(e).__name__}: {e}"})
            say(f"{what} failed: {type(e).__name__}: {e}")
            self.unload()
        self.save()

    def unload(self):
        BC.unload_all(self.mm, self.cpu)

    # -- Flux ------------------------------------------------------------------------------------------
    def sample(self, m, label, filler=0):
        return BC.sample_timed(m, label, self.latent, self.cond, self.a.steps, self.dev, self.cpu, filler, detail=True)

    def run(self):
        a, torch, d = self.a, self.torch, self.d
        self.model = BC.load_flux(a, self.dev, self.nodes, self.fp)
        self.plain_class = type(self.model)
        self.total = d["total_bytes"] = self.model.model_size()
        self.cond = BC.flux_cond(torch, a.ctx)
        self.latent = torch.zeros(1, 16, a.res // 8, a.res // 8)
        held = str(self.model.model.get_dtype()).removeprefix("torch.")
        d["model_line"] = (f"Model: random bf16 weights (N(0, 0.02)) in ComfyUI's Flux class, {a.double} double + "
                           f"{a.single} single blocks, {self.total / GiB:.2f} GiB as ComfyUI holds them ({held}), "
                           "loaded once by ComfyUI's UNETLoader; "
                           f"euler, {a.steps} steps, cfg 1, {a.ctx} text tokens, {a.res}x{a.res}; every node call "
                           "under torch.inference_mode(). DisTorch2 rows: DISTORCH_COMPRESS=on (every offloaded "
                           "bf16 unit streams compressed) or off (raw) while the node plans; donor cpu.")
        if not self.cpu:
            from distorch.compiler.inventory import probe
            d["bw"] = probe().bandwidth("cpu", str(self.dev))
            say(f"pinned host->GPU bandwidth (probed): {d['bw'] / 1e9:.1f} GB/s")
        rows = d["rows"]

        t = time.perf_counter()
        r = self.sample(self.model, "plain")
        self.ref = r.pop("out")
        rows.append(dict(kind="plain", name="plain UNETLoader (resident)", off=0, cold_s=r["first_s"],
                         **self.host_of(r), **r))
        self.unload()
        self.save()
        self.timed_kind("comfy", time.perf_counter() - t)

        try:
            d["decode"] = decode_speed(a, self.model, torch, self.cpu, self.dev)
        except Exception as e:
            traceback.print_exc()
            d["decode"] = {"weight": "?", "shape": [], "gbps": None, "note": f"failed: {type(e).__name__}: {e}"}
        self.save()

        for mode in self.modes:
            self.distorch_row(a.all_gb, mode)
        if a.native_all:
            self.comfy_row(a.native_all)
        for v in floats(a.vram):
            for mode in self.modes:
                self.distorch_row(v, mode)
            self.comfy_row(v)
        if a.encoder != "none":
            self.clip_rows()
        self.save()

    def host_of(self, r: dict, before=None, after=None) -> dict:
        r.pop("rss_peak", None), r.pop("rss_anon_peak", None), r.pop("pinned_peak", None)
        return host_fields(r.pop("host", None), before, after)

    def distorch_row(self, v: float, mode: str):
        name = f"DisTorch2 {MODE_NAME.get(mode, mode)} virtual_vram_gb={v:g}"
        if not self.guard.allow(self.est["distorch"], name, self.d["skipped"]):
            return

        def row():
            t = time.perf_counter()
            sampler = BC.RssSampler(mm=self.mm)
            before = sampler.read()
            with Compress(mode):
                # a clone, as a node gets its input: distorch() turns the patcher it is given into a DisTorch
                # patcher in place, and the ComfyUI rows need UNETLoader's own
                m = self.entry.distorch(self.model.clone(), self.a.device, v, "cpu", "", True)
                plan_s = time.perf_counter() - t
                st = self.entry.state_of(m)
                r = self.sample(m, name)
                stats = runtime_stats(st)
            after = sampler.read()
            same = BC.bit_equal(r.pop("out"), self.ref)
            plan = st.plan
            pred = dict(plan.predicted or {})
            facts = codec_facts(stats, plan, self.d["bw"])
            self.d["rows"].append(dict(
                kind="distorch", mode=mode, v=v, name=name, plan_s=plan_s, cold_s=plan_s + r["first_s"], same=same,
                gran=(pred.get("granularity") or {}).get("chosen"), pred_step=pred.get("step_s"),
                meas_step=stats.get("measured_step_s"), pred_peak=pred.get("compute_peak_bytes"),
                window_slots=stats.get("window_slots"), **facts, **self.host_of(r, before, after), **r))
            say(f"{name}: ratio {_f(facts['ratio'], '%.4f', 'null')}, streamed {facts['streamed'] / GiB:.2f} GiB/step, "
                f"homes {facts['home_bytes'] / GiB:.2f} GiB, same {same}")
            self.unload()
            if st.handle is not None:
                self.d["notes"].append(f"{name}: the handle was still live after unload_all_models")
            self.timed_kind("distorch", time.perf_counter() - t)
        self.attempt(name, self.d["rows"], row)

    def comfy_row(self, off_gib: float):
        name = f"ComfyUI partial load (asked {off_gib:g} GiB off)"
        if self.cpu:
            self.d["not_run"].append(f"{name} (ComfyUI's partial loading needs a GPU)")
            return
        if not self.guard.allow(self.est["comfy"], name, self.d["skipped"]):
            return

        def row():
            if type(self.model) is not self.plain_class:
                raise RuntimeError(f"UNETLoader's patcher became a {type(self.model).__name__}: not ComfyUI's loading")
            t = time.perf_counter()
            filler, fb = BC.comfy_filler(self.mm, self.model, self.latent.shape, int(off_gib * GiB), self.dev)
            before = BC.RssSampler(mm=self.mm).read()
            r = self.sample(self.model, name, filler=fb)
            after = BC.RssSampler(mm=self.mm).read()
            off = self.total - self.model.loaded_size()
            same = BC.bit_equal(r.pop("out"), self.ref)
            bw = self.d["bw"]
            self.d["rows"].append(dict(kind="comfy", name=name, asked_gib=off_gib, filler=fb, off=off, same=same,
                                       cold_s=r["first_s"], streamed=off, floor=off / bw if bw else None,
                                       raw_floor=off / bw if bw else None, **self.host_of(r, before, after), **r))
            del filler
            self.unload()
            self.timed_kind("comfy", time.perf_counter() - t)
        self.attempt(name, self.d["rows"], row)

    # -- the text encoder ------------------------------------------------------------------------------
    def clip_rows(self):
        a, torch, d = self.a, self.torch, self.d
        if not self.guard.allow(self.est["clip_setup"], f"text encoder ({a.encoder})", d["skipped"]):
            return
        import comfy.sd
        t = time.perf_counter()
        sd = BCL.encoder_state_dict(a.encoder, torch)
        nbytes = sum(v.numel() * v.element_size() for v in sd.values())
        ctype = comfy.sd.CLIPType.SD3 if a.encoder == "t5xxl" else comfy.sd.CLIPType.STABLE_DIFFUSION
        say(f"text encoder {a.encoder}: state dict {nbytes / GiB:.2f} GiB in {time.perf_counter() - t:.1f}s")
        d["clip_line"] = (f"Encoder: {a.encoder} (ComfyUI's own class, random N(0, 0.02) weights, loaded in bf16 by "
                          f"comfy.sd.load_text_encoder_state_dicts), prompt of {len(PROMPT.split())} words, "
                          f"{a.encodes} encodes per row, each timed with a synchronize before and after; DisTorch2 "
                          f"rows through entry.distorch(clip, ...) as CLIPLoaderDisTorch2MultiGPU calls it.")

        def load():
            clip = comfy.sd.load_text_encoder_state_dicts([dict(sd)], clip_type=ctype,
                                                          model_options={"dtype": torch.bfloat16})
            if not self.cpu:
                clip.patcher.load_device = self.dev
            return clip

        ref = {}

        def encodes(clip, label):
            sampler = BC.RssSampler(mm=self.mm)
            sampler.start()
            ts, outs, peaks = [], [], []
            try:
                for i in range(a.encodes):
                    if not self.cpu:
                        torch.cuda.synchronize(self.dev)
                        torch.cuda.reset_peak_memory_stats(self.dev)
                    t0 = time.perf_counter()
                    outs.append(clip.encode_from_tokens(clip.tokenize(PROMPT), return_pooled=True))
                    if not self.cpu:
                        torch.cuda.synchronize(self.dev)
                        peaks.append(torch.cuda.max_memory_allocated(self.dev))
                    ts.append(time.perf_counter() - t0)
            finally:
                host = sampler.peak()
                sampler.stop()
            later = statistics.median(ts[1:]) if len(ts) > 1 else ts[0]
            say(f"{label}: encodes {[round(x, 3) for x in ts]} s")
            return {"first_s": ts[0], "enc_s": later, "encodes": ts, "peak": max(peaks, default=0),
                    "peak_later": max(peaks[1:], default=0) if len(peaks) > 1 else max(peaks, default=0),
                    **host_fields(host)}, outs

        def same_as_ref(outs) -> bool:
            return all(BC.bit_equal(o[0], ref["c"][0]) and BC.bit_equal(o[1], ref["c"][1]) for o in outs)

        def plain():
            clip = load()
            t0 = time.perf_counter()
            r, outs = encodes(clip, "text encoder plain")
            ref["c"] = outs[0]
            r["cold_s"] = r["first_s"]
            r["deterministic"] = same_as_ref(outs)
            d["clip"].append(dict(name="plain CLIP (resident)", mode=None, off=0, **r))
            del clip
            self.unload()
            self.timed_kind("clip", time.perf_counter() - t0)
        self.attempt("plain CLIP", d["clip"], plain)
        if "c" not in ref:
            return
        for mode in self.modes:
            name = f"DisTorch2 {MODE_NAME.get(mode, mode)} virtual_vram_gb={a.clip_gb:g}"
            if not self.guard.allow(self.est["clip"], f"text encoder {name}", d["skipped"]):
                continue

            def row(mode=mode, name=name):
                clip = load()
                t0 = time.perf_counter()
                with Compress(mode):
                    clip = self.entry.distorch(clip, self.a.device, a.clip_gb, "cpu", "", False)
                    plan_s = time.perf_counter() - t0
                    st = self.entry.state_of(clip)
                    r, outs = encodes(clip, f"text encoder {name}")
                    stats = runtime_stats(st)
                facts = codec_facts(stats, st.plan, d["bw"])
                d["clip"].append(dict(name=name, mode=mode, plan_s=plan_s, cold_s=plan_s + r["first_s"],
                                      same=same_as_ref(outs), **facts, **r))
                del clip
                self.unload()
                self.timed_kind("clip", time.perf_counter() - t0)
            self.attempt(f"text encoder {name}", d["clip"], row)
        del sd


if __name__ == "__main__":
    main()
