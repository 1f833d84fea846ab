"""Weight-streaming benchmark on one GPU: a Flux-dev-sized DiT (diffusers FluxTransformer2DModel default
config, random bf16 weights) at 512x512 and 1024x1024, offload fractions 0/25/50/75/100 %.

Methods, all in ONE process and run (compare only numbers from the same run):
  resident        all weights on the GPU
  distorch        this project (runtime.apply: pinned homes, slot ring, copy stream, events)
  sync_pinned     copy-before-each-block baseline: each offloaded block's parameters are copied from
                  pinned host tensors with blocking per-tensor copies right before it runs, dropped after
  diffusers_group diffusers enable_group_offload(block_level, num_blocks_per_group=1, use_stream=True);
                  100 % only (its API offloads the whole model, no partial placement)
  floor           max(resident step, offloaded bytes / pinned host->GPU bandwidth measured in this run)

Step time: steps run back to back (no synchronize between them, as in a denoising loop), CUDA events
between steps, median of --reps after --warmup. Every output is checked bit-identical to resident.

    PYTHONUNBUFFERED=1 python bench/bench_stream.py --out OUT [--smoke] [--res 512,1024] [--fracs 0,25,50,75,100]
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import stream_kit as K  # noqa: E402  (the --device cpu switch _CPU, _sync, peak VRAM, rows with host RSS)
from stream_baselines import SyncBaseline  # noqa: E402
from stream_kit import build_model, log, make_inputs, pinned_bw, run_steps  # noqa: E402
from stream_plans import block_units, graph_of, hand_plan, pick_offloaded, predict  # noqa: E402
from stream_report import table  # noqa: E402

GiB = 1 << 30


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "bench_out"))
    ap.add_argument("--smoke", action="store_true", help="reduced model (2+4 blocks), 512 only, quick")
    ap.add_argument("--res", default="512,1024")
    ap.add_argument("--fracs", default="0,25,50,75,100")
    ap.add_argument("--txt", type=int, default=512)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--slots", default="3", help="ring slots for distorch (comma list: each is measured)")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-sync", action="store_true")
    ap.add_argument("--sync-fracs", default=None, help="fractions for the sync baseline (default: all)")
    ap.add_argument("--planner", choices=["partition", "hand"], default="partition",
                    help="partition: compiler.trace + passes.partition with measured unit times (what compile() "
                         "does); hand: evenly spread blocks, --slots ring slots")
    ap.add_argument("--hand", action="store_true", help="with --planner partition, also run the hand plans")
    ap.add_argument("--tag", default="")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: tiny fp32 config through the same code (checks the script, no meaningful times)")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    K._CPU = a.device == "cpu"
    dev = "cpu:0" if K._CPU else "cuda:0"
    from distorch.runtime.apply import apply
    from distorch.runtime import stats as rstats

    cfg = dict(guidance_embeds=True)
    if a.smoke:
        cfg.update(num_layers=2, num_single_layers=4)
    if a.device == "cpu":
        cfg.update(num_layers=2, num_single_layers=3, attention_head_dim=16, num_attention_heads=2,
                   joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    ress = [int(r) for r in a.res.split(",")] if not a.smoke else [512]
    fracs = [int(f) for f in a.fracs.split(",")]
    sync_fracs = [int(f) for f in a.sync_fracs.split(",")] if a.sync_fracs else fracs
    slots_list = [int(s) for s in a.slots.split(",")]
    card = "cpu" if K._CPU else torch.cuda.get_device_name(0)
    log(f"card {card}, torch {torch.__version__}, cfg {cfg}")
    t0 = time.perf_counter()
    model = build_model(cfg, dev)
    K._sync()
    units = block_units(model)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    block_total = sum(u[2] for u in units)
    graph = graph_of(model, units, total - block_total)
    log(f"model built in {time.perf_counter() - t0:.1f} s: {total / 1e9:.2f} GB bf16, {len(units)} blocks")
    bw = pinned_bw(dev)
    log(f"pinned host->GPU bandwidth: {bw / 1e9:.1f} GB/s")
    results = {"card": card, "torch": torch.__version__, "cfg": cfg, "model_bytes": total,
               "pinned_h2d_Bps": bw, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               "command": " ".join(sys.argv), "rows": K._Rows(), "notes": []}
    rows = results["rows"]

    def save():
        with open(os.path.join(a.out, f"stream{a.tag}.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)

    ref = {}
    resident_s = {}
    for res in ress:
        kw = make_inputs(cfg, res, a.txt, dev)
        # ---- resident
        K._reset_peak()
        med, ts, out, wall = run_steps(model, kw, a.warmup, a.reps)
        ref[res] = out.clone()
        resident_s[res] = med
        rows.append(dict(res=res, method="resident", frac=0, step_s=med, floor_s=med, equal=True,
                         peak_gib=K._peak_gib(), host_s=wall / (a.warmup + a.reps)))
        log(f"[{res}] resident {med * 1e3:.1f} ms (host wall/step {wall / (a.warmup + a.reps) * 1e3:.1f} ms)")
        # ---- the graph: compiler.trace on the real model (FLOPs, order), or the hand-made block graph
        g = graph
        if a.planner == "partition":
            try:
                from distorch.compiler.trace import trace
                tt = time.perf_counter()
                g = trace(model, (), {k: v for k, v in kw.items() if k != "return_dict"})
                log(f"[{res}] traced {len(g)} units in {time.perf_counter() - tt:.1f} s")
            except Exception as e:
                results["notes"].append(f"trace failed at {res}: {type(e).__name__}: {e}; hand graph used")
                log("trace failed:", repr(e))
                g = graph
        g_flops = copy.deepcopy(g)
        # ---- per-unit compute times (profile run, all resident) -> Unit.time_s
        from distorch.compiler.plan import Plan, PlacedUnit
        from distorch.compiler.graph import ROOT
        allres = Plan(compute=dev, units=[PlacedUnit(u.name, u.type, u.bytes, dev, i, u.kind)
                                          for i, u in enumerate(g.units)])
        rt = apply(model, allres, profile=True, progress=False)
        run_steps(model, kw, 1, 2)
        ut = rstats.unit_times(rt, steps=1)
        rt.undo()
        for u in g.units:
            if u.name in ut:
                u.time_s = ut[u.name] * max(u.calls, 1)
        blk = sum(u.time_s or 0.0 for u in g.units if u.name in ut)
        if ROOT in g:
            g[ROOT].time_s = max(med - blk, 0.0)
        if g is not graph:   # the hand block graph gets the same measured times
            for u in graph.units:
                if u.name in ut:
                    u.time_s = ut[u.name]
            graph[ROOT].time_s = max(med - sum(u.time_s or 0.0 for u in graph.units if u.name in ut), 0.0)
        log(f"[{res}] per-unit times fed back for {len(ut)} units: {blk * 1e3:.1f} ms "
            f"(resident step {med * 1e3:.1f} ms)")
        save()
        inv = None
        if a.planner == "partition":
            from distorch.compiler.inventory import declare
            tot_mem = 64 * GiB if K._CPU else torch.cuda.get_device_properties(0).total_memory
            inv = declare(f"{dev}={tot_mem}b,cpu=120GiB;cpu>{dev}={bw / 1e9:.3f}GB/s")

        def plans_for(frac):
            out = []
            if a.planner == "partition":
                from distorch.passes.partition import partition
                vram = frac / 100 * g.total_bytes / GiB
                out.append(("distorch", partition(g, inv, dev, offload_gb=vram, donors=["cpu"], clamp=True)))
                if frac == 50:   # the placement the FLOP estimate alone would choose (before feedback)
                    out.append(("distorch_flops_plan", partition(g_flops, inv, dev, offload_gb=vram, donors=["cpu"], clamp=True)))
            for W in (slots_list if a.planner == "hand" or a.hand else []):
                off = pick_offloaded(units, frac / 100)
                plan = hand_plan(graph, off, W, dev)
                pred = predict(graph, plan, bw, dev)
                plan.predicted = {k: v for k, v in pred.items() if isinstance(v, (int, float))}
                out.append((f"distorch_hand_W{W}" if a.planner == "partition" else "distorch", plan))
            return out

        # ---- distorch at each fraction
        for frac in fracs:
            for label, plan in plans_for(frac):
                pred = dict(plan.predicted or {})
                ta = time.perf_counter()
                rt = apply(model, plan, progress=False)
                K._sync()
                t_apply = time.perf_counter() - ta
                gc.collect()
                K._reset_peak()
                try:
                    m2, ts2, out2, wall2 = run_steps(model, kw, a.warmup, a.reps)
                    eq = bool(torch.equal(out2, ref[res]))
                    st = rstats.summarize(rt)
                    peak = K._peak_gib()
                finally:
                    tu = time.perf_counter()
                    rt.undo()
                    K._sync()
                    t_undo = time.perf_counter() - tu
                off_bytes = sum(st["bytes_per_step"].values())     # what actually crossed the bus per step
                floor = max(med, off_bytes / bw)
                row = dict(res=res, method=label, frac=frac, slots=st["window_slots"], step_s=m2, floor_s=floor,
                           x_floor=m2 / floor, equal=eq, offloaded_bytes=off_bytes,
                           plan_offloaded_bytes=plan.offloaded_bytes(), peak_gib=peak,
                           predicted_peak_gib=(pred.get("peak_bytes") or 0) / GiB or None,
                           resident_gib=st["resident_bytes"] / GiB,
                           window_gib=st["window_bytes"] / GiB, predicted_s=pred.get("step_s"),
                           pred_err=(pred["step_s"] / m2 - 1) if pred.get("step_s") else None,
                           deviations=st["deviations"], fallback_loads=st["fallback_loads"],
                           host_s=wall2 / (a.warmup + a.reps), apply_s=t_apply, undo_s=t_undo,
                           expert=plan.expert_string)
                rows.append(row)
                log(f"[{res}] {label} {frac:3d}%: {m2 * 1e3:.1f} ms floor {floor * 1e3:.1f} (x{m2 / floor:.3f}) "
                    f"pred {(row['predicted_s'] or float('nan')) * 1e3:.1f} eq={eq} streamed {off_bytes / 1e9:.2f} GB "
                    f"peak {peak:.2f} GiB (pred {row['predicted_peak_gib'] or float('nan'):.2f}; resident "
                    f"{row['resident_gib']:.2f} + window {row['window_gib']:.2f} [{row['slots']} slots]) "
                    f"dev={st['deviations']} apply {t_apply:.1f}s undo {t_undo:.1f}s")
                save()
        # ---- timeline + placement plots at 50 % and 100 %
        try:
            from distorch.runtime import plots
            for frac in (50, 100):
                if frac not in fracs or res != ress[-1]:
                    continue
                plan = plans_for(frac)[0][1]
                rt = apply(model, plan, profile=True, progress=False)
                run_steps(model, kw, 1, 2)
                tl = rstats.timeline(rt, steps=1)
                rt.undo()
                if True:
                    plots.timeline_png(tl, os.path.join(a.out, f"stream_timeline_{res}_{frac}.png"),
                                       f"Flux-dev-sized DiT {res}x{res}, {frac}% streamed, {card}")
                    if frac == 50:
                        plots.placement_png(plan, os.path.join(a.out, "stream_placement_50.png"),
                                            "placement per unit, 50 % streamed")
        except Exception as e:
            results["notes"].append(f"plots failed: {type(e).__name__}: {e}")
            log("plots failed:", e)
        # ---- synchronous baseline
        if not a.no_sync:
            for frac in sync_fracs:
                if frac == 0:
                    continue
                off = pick_offloaded(units, frac / 100)
                off_bytes = sum(u[2] for u in units if u[0] in off)
                sb = SyncBaseline(model, off, dev)
                gc.collect()
                K._reset_peak()
                try:
                    m4, _, out4, wall4 = run_steps(model, kw, 1, max(3, a.reps))
                    eq = bool(torch.equal(out4, ref[res]))
                    peak = K._peak_gib()
                finally:
                    sb.undo()
                    del sb
                    gc.collect()
                    try:
                        torch._C._host_emptyCache()   # give cached pinned blocks back to the OS
                    except Exception:
                        pass
                floor = max(med, off_bytes / bw)
                rows.append(dict(res=res, method="sync_pinned", frac=frac, step_s=m4, floor_s=floor,
                                 x_floor=m4 / floor, equal=eq, offloaded_bytes=off_bytes, peak_gib=peak))
                log(f"[{res}] sync_pinned {frac}%: {m4 * 1e3:.1f} ms eq={eq}")
                save()
        del kw
    # ---- diffusers group offloading (whole model; last, it moves the model off the GPU)
    if not a.no_diffusers:
        try:
            ta = time.perf_counter()
            model.enable_group_offload(onload_device=torch.device(dev), offload_device=torch.device("cpu"),
                                       offload_type="block_level", num_blocks_per_group=1, use_stream=True)
            K._sync()
            log(f"diffusers group offload enabled in {time.perf_counter() - ta:.1f} s")
            for res in ress:
                kw = make_inputs(cfg, res, a.txt, dev)
                gc.collect()
                K._reset_peak()
                m5, _, out5, wall5 = run_steps(model, kw, a.warmup, a.reps)
                floor = max(resident_s[res], total / bw)
                rows.append(dict(res=res, method="diffusers_group", frac=100, step_s=m5, floor_s=floor,
                                 x_floor=m5 / floor, equal=bool(torch.equal(out5, ref[res])),
                                 offloaded_bytes=total, peak_gib=K._peak_gib()))
                log(f"[{res}] diffusers group offload 100%: {m5 * 1e3:.1f} ms eq={rows[-1]['equal']}")
                save()
        except Exception as e:
            results["notes"].append(f"diffusers group offload failed: {type(e).__name__}: {e}")
            log("diffusers group offload failed:", repr(e))
    # ---- table
    md = table(results)
    print(md)
    with open(os.path.join(a.out, f"stream{a.tag}.md"), "w") as f:
        f.write(md)
    save()
    try:
        from distorch.runtime import plots
        plots.bench_png(rows, os.path.join(a.out, f"stream_steps{a.tag}.png"))
    except Exception as e:
        log("bench plot failed:", e)
    return 0



if __name__ == "__main__":
    sys.exit(main())
