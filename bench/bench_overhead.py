"""Host overhead of the runtime where the step is host-bound (Flux-dev shape at 512x512).

Interleaves, in one process, rounds of: the plain model; the model compiled with 0 % offloaded (hooks on
the root only); and 25 % offloaded -- so that drift of the card between rounds shows up in all three.
Prints per-round medians and the host time per step (python wall / steps, no synchronize in the loop).

    python bench/bench_overhead.py --res 512 --rounds 4 --reps 10
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import stream_kit as bs  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--fracs", default="0,25")
    a = ap.parse_args(argv)
    import distorch
    dev = "cuda:0"
    cfg = dict(guidance_embeds=True)
    model = bs.build_model(cfg, dev)
    kw = bs.make_inputs(cfg, a.res, 512, dev)
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    ref = None
    rows: dict[str, list] = {}

    def measure(tag):
        med, ts, out, wall = bs.run_steps(model, kw, 2, a.reps)
        rows.setdefault(tag, []).append((med, wall / (a.reps + 2)))
        return out

    ref = measure("resident").clone()
    for r in range(a.rounds):
        measure("resident")
        for f in [int(x) for x in a.fracs.split(",")]:
            h = distorch.compile(model, compute=dev, offload_gb=total * f / 100 / 2**30, donors=["cpu"],
                                 example_kwargs={k: v for k, v in kw.items() if k != "return_dict"})
            out = measure(f"distorch {f}%")
            assert torch.equal(out, ref), f"output differs at {f}%"
            h.undo()
        print(f"round {r}: " + ", ".join(f"{k} {v[-1][0] * 1e3:.1f} ms" for k, v in rows.items()), flush=True)
    print(f"\n{torch.cuda.get_device_name(0)}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {a.res}x{a.res}\n")
    print("| config | median of round medians (ms) | min (ms) | max (ms) | host wall / step (ms) |")
    print("|---|---|---|---|---|")
    base = statistics.median(m for m, _ in rows["resident"])
    for k, v in rows.items():
        ms = [m * 1e3 for m, _ in v]
        print(f"| {k} | {statistics.median(ms):.1f} ({statistics.median(ms) / base / 1e3:.3f}x) | {min(ms):.1f} | "
              f"{max(ms):.1f} | {statistics.median(h for _, h in v) * 1e3:.1f} |")


if __name__ == "__main__":
    main()
