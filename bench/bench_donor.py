"""Donor GPU: a Flux-dev-sized DiT computing on cuda:0 with its offloaded weights on cuda:1 (peer copies).

In one process: probe the machine (distorch.compiler.inventory.probe: pinned host->GPU and GPU->GPU peer
bandwidth), then at 1024x1024 the resident step and distorch.compile with offload_gb = 50 % and 100 % of the
model on donor cuda:1, and 100 % with donors [cuda:1, cpu] where cuda:1 is given only part of the model
(expert string), each checked bit-identical to the resident output. Needs 2 GPUs.

    python bench/bench_donor.py --res 1024 --reps 5 [--diagnose]

--diagnose adds, in the same process: the resident step while copies stream into cuda:0 in the
background (peer copies cuda:1 -> cuda:0, then pinned host -> cuda:0: does incoming traffic slow the
compute?), and for each distorch config a few profiled steps (runtime events around every copy and
unit): copy time per step, compute busy time, stall, host time, and compute per unit against the
resident model's (where the extra time goes).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import stream_kit as bs  # noqa: E402


def with_background_copies(model, kw, reps, src, dst, chunk=256 << 20, seconds=None):
    """Median step of `model` while `src` -> `dst` copies of `chunk` bytes run back to back on a side
    stream of the source's device (the way torch runs a cross-device copy) for about `seconds`."""
    dev = torch.device("cuda:0")
    a = src if src.device.type == "cuda" else src.pin_memory()
    side = torch.cuda.Stream(device=a.device if a.device.type == "cuda" else dev)
    n_bytes = a.numel()
    # enough copies to outlast the steps: time one first
    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(side):
        e0.record(side)
        dst[:chunk].copy_(a[:chunk], non_blocking=True)
        e1.record(side)
    e1.synchronize()
    per = e0.elapsed_time(e1) / 1e3
    total = seconds or 2.0
    k = int(total / per) + 1
    with torch.cuda.stream(side):
        for j in range(k):
            o = (j * chunk) % max(n_bytes - chunk, 1)
            dst[:chunk].copy_(a[o:o + chunk], non_blocking=True)
    med, ts, _, _ = bs.run_steps(model, kw, 1, reps)
    busy = side.query() is False           # still copying when the steps ended: they overlapped throughout
    torch.cuda.synchronize()
    return med, chunk / per, busy


def profile_runtime(h, model, kw, steps=3):
    """stream_kit.profiled_steps, plus the last step's compute per unit."""
    from distorch.runtime import stats as rstats
    st, _ = bs.profiled_steps(h.runtime, model, kw, steps)
    return st, rstats.unit_times(h.runtime, steps=1)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--peer-modes", default="", help="comma list of runtime.stream.PEER_COPY_MODES to compare")
    a = ap.parse_args(argv)
    if torch.cuda.device_count() < 2:
        sys.exit("needs two GPUs")
    import distorch
    from distorch.compiler.inventory import probe
    inv = probe(cache=False)
    links = {f"{s}>{d}": f"{bw / 1e9:.1f} GB/s" for (s, d), bw in sorted(inv.links.items())}
    print("probed links:", links, flush=True)
    dev = "cuda:0"
    cfg = dict(guidance_embeds=True)
    model = bs.build_model(cfg, dev)
    kw = bs.make_inputs(cfg, a.res, 512, dev)
    ex = {k: v for k, v in kw.items() if k != "return_dict"}
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    res_s, _, ref, _ = bs.run_steps(model, kw, 2, a.reps)
    ref = ref.clone()
    res_units = {}
    if a.diagnose:
        big = torch.empty(4 << 30, dtype=torch.uint8, device="cuda:1")
        sink = torch.empty(512 << 20, dtype=torch.uint8, device=dev)
        m_peer, r_peer, busy = with_background_copies(model, kw, a.reps, big, sink)
        print(f"diagnose: resident step alone {res_s * 1e3:.1f} ms; with peer copies cuda:1->cuda:0 running "
              f"({r_peer / 1e9:.0f} GB/s, still running at the end: {busy}) {m_peer * 1e3:.1f} ms "
              f"(x{m_peer / res_s:.3f})", flush=True)
        del big
        host = torch.empty(2 << 30, dtype=torch.uint8).pin_memory()
        m_h2d, r_h2d, busy = with_background_copies(model, kw, a.reps, host, sink)
        print(f"diagnose: with pinned host->cuda:0 copies running ({r_h2d / 1e9:.0f} GB/s, still running: {busy}) "
              f"{m_h2d * 1e3:.1f} ms (x{m_h2d / res_s:.3f})", flush=True)
        del host, sink
        # host cost of one cross-device copy_ (torch's path), 64 MiB, the call alone
        x1 = torch.empty(64 << 20, dtype=torch.uint8, device="cuda:1")
        x0 = torch.empty(64 << 20, dtype=torch.uint8, device=dev)
        ls = torch.cuda.Stream(device=dev)
        hs = []
        for _ in range(30):
            with torch.cuda.stream(ls):
                t0 = time.perf_counter()
                x0.copy_(x1, non_blocking=True)
                hs.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        hs.sort()
        print(f"diagnose: host time of one cuda:1->cuda:0 copy_ call (64 MiB): median {hs[15] * 1e6:.0f} us, "
              f"max {hs[-1] * 1e6:.0f} us", flush=True)
        del x0, x1
        torch.cuda.empty_cache()
        # resident per-unit compute (a plan with nothing offloaded, profiled)
        h0 = distorch.compile(model, compute=dev, example_kwargs=ex, offload_gb=0, donors=["cuda:1"], profile=True)
        bs.run_steps(model, kw, 1, 2)
        _, res_units = profile_runtime(h0, model, kw)
        h0.undo()
    rows = [("resident", 0.0, res_s, True, "", "")]
    gib = total / 2**30
    configs = [("donor cuda:1, 50 %", dict(offload_gb=gib * 0.5, donors=["cuda:1"])),
               ("donor cuda:1, 100 %", dict(offload_gb=gib, donors=["cuda:1"])),
               ("cuda:1 40 % + cpu 60 %", dict(expert="cuda:0,0%;cuda:1,40%;cpu,60%"))]
    if a.peer_modes:
        configs = [(f"donor cuda:1, {f} %, peer copy {m}", dict(offload_gb=gib * f / 100, donors=["cuda:1"]), m)
                   for m in a.peer_modes.split(",") for f in (50, 100)] + [configs[2] + ("memcpy",)]
    else:
        configs = [c + (None,) for c in configs]
    for name, kwargs, mode in configs:
        if mode:
            os.environ["DISTORCH_PEER_COPY"] = mode
        torch.cuda.reset_peak_memory_stats(0)
        t0 = time.perf_counter()
        h = distorch.compile(model, compute=dev, example_kwargs=ex, profile=a.diagnose, **kwargs)
        t_apply = time.perf_counter() - t0
        med, _, out, _ = bs.run_steps(model, kw, 2, a.reps)
        eq = torch.equal(out, ref)
        per = {d: v["bytes"] / 2**30 for d, v in h.plan.devices.items()}
        pred = h.plan.predicted.get("step_s", float("nan"))
        rows.append((name, sum(v for d, v in per.items() if d != dev), med, eq,
                     ", ".join(f"{d} {v:.1f}" for d, v in per.items()), f"{pred:.3f}"))
        print(f"{name}: {med * 1e3:.1f} ms (predicted {pred * 1e3:.1f}) eq={eq} placement {per} "
              f"peak cuda:0 {torch.cuda.max_memory_allocated(0) / 2**30:.1f} GiB compile {t_apply:.1f} s", flush=True)
        if a.diagnose:
            st, ut = profile_runtime(h, model, kw)
            streamed = {n for n in h.runtime.units}
            d_str = sum(ut.get(n, 0) - res_units.get(n, 0) for n in streamed if n in res_units)
            d_res = sum(ut.get(n, 0) - res_units.get(n, 0) for n in ut if n not in streamed and n in res_units)
            print(f"  profiled: step {1e3 * (st.get('measured_step_s') or 0):.1f} ms, copy {1e3 * st['copy_s']:.1f} ms "
                  f"({sum(st['bytes_per_step'].values()) / max(st['copy_s'], 1e-9) / 1e9:.0f} GB/s), compute busy "
                  f"{1e3 * st['compute_busy_s']:.1f} ms (resident units summed: {1e3 * sum(res_units.values()):.1f}), "
                  f"stall {1e3 * st['stall_s']:.1f} ms, host {1e3 * (st.get('measured_host_s') or 0):.1f} ms; "
                  f"compute of streamed units {1e3 * d_str:+.1f} ms vs resident, of resident units {1e3 * d_res:+.1f} ms; "
                  f"slots {st['window_slots']}", flush=True)
            if "100" in name and "cpu" not in name and not a.peer_modes:
                import cProfile
                import io
                import pstats
                pr = cProfile.Profile()
                torch.cuda.synchronize()
                pr.enable()
                bs.run_steps(model, kw, 0, 2)
                pr.disable()
                sio = io.StringIO()
                pstats.Stats(pr, stream=sio).sort_stats("tottime").print_stats(14)
                print("  host profile of 2 steps (tottime):\n" + "\n".join(
                    ln for ln in sio.getvalue().splitlines() if ln.strip())[-2400:], flush=True)
        h.undo()
    print(f"\n{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {a.res}x{a.res}, model {total / 1e9:.2f} GB bf16")
    print(f"probed links: {links}\n")
    print("| config | GiB off cuda:0 | step s | x resident | predicted s | GiB per device | bit-identical |")
    print("|---|---|---|---|---|---|---|")
    for name, off, s, eq, per, pred in rows:
        print(f"| {name} | {off:.1f} | {s:.3f} | {s / res_s:.3f} | {pred} | {per} | {eq} |")


if __name__ == "__main__":
    main()
