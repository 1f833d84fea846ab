"""Donor GPU: a Flux-dev-sized DiT computing on cuda:0 with its offloaded weights on cuda:1 (peer copies).

In one process: probe the machine (distorch.compiler.inventory.probe: pinned host->GPU and GPU->GPU peer
bandwidth), then at 1024x1024 the resident step and distorch.compile with vram_gb = 50 % and 100 % of the
model on donor cuda:1, and 100 % with donors [cuda:1, cpu] where cuda:1 is given only part of the model
(expert string), each checked bit-identical to the resident output. Needs 2 GPUs.

    python bench/bench_donor.py --res 1024 --reps 5
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import bench_stream as bs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=5)
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
    rows = [("resident", 0.0, res_s, True, "", "")]
    gib = total / 2**30
    configs = [("donor cuda:1, 50 %", dict(vram_gb=gib * 0.5, donors=["cuda:1"])),
               ("donor cuda:1, 100 %", dict(vram_gb=gib, donors=["cuda:1"])),
               ("cuda:1 40 % + cpu 60 %", dict(expert="cuda:0,0%;cuda:1,40%;cpu,60%"))]
    for name, kwargs in configs:
        torch.cuda.reset_peak_memory_stats(0)
        t0 = time.perf_counter()
        h = distorch.compile(model, compute=dev, example_kwargs=ex, **kwargs)
        t_apply = time.perf_counter() - t0
        med, _, out, _ = bs.run_steps(model, kw, 2, a.reps)
        eq = torch.equal(out, ref)
        per = {d: v["bytes"] / 2**30 for d, v in h.plan.devices.items()}
        pred = h.plan.predicted.get("step_s", float("nan"))
        rows.append((name, sum(v for d, v in per.items() if d != dev), med, eq,
                     ", ".join(f"{d} {v:.1f}" for d, v in per.items()), f"{pred:.3f}"))
        print(f"{name}: {med * 1e3:.1f} ms (predicted {pred * 1e3:.1f}) eq={eq} placement {per} "
              f"peak cuda:0 {torch.cuda.max_memory_allocated(0) / 2**30:.1f} GiB compile {t_apply:.1f} s", flush=True)
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
