"""Place a benchmarked model again from a results JSON, on any machine (no GPU, no weights): what would the
partition pass do with these measured unit times, and what does the simulation say of each slot count?

A DisTorch2 row of bench_comfy.py's JSON keeps its plan's units (name, home, bytes, kind) and the unit times
the runtime measured (plan_detail).  This rebuilds the ModuleGraph from them (a sub-unit's block from its
name), sets the times of one row as Unit.time_s (the root's from the row with nothing offloaded, at the same
resolution) and the other inputs as time scales (as runtime/timebook.py does for a later compile), runs
passes.partition at a budget, and simulates the chosen placement at each slot count for every input:

    python bench/replay_plan.py bench/results/comfy_vram_h200_r10.json --row 3 --offload 3 --scale 0.32
    python bench/replay_plan.py R.json --row 3 --offload 3 --scale 0.32 --bw 54e9 --as-json   # machine-readable

--row picks the row (its virtual_vram_gb) whose first resolution's unit times are used; --scale gives the other
input's compute against that one (e.g. 512x512 over 1024x1024, from a plain run: 0.052 / 0.160 = 0.32); --bw
the pinned host link (default: the JSON's probed bandwidth).
"""
from __future__ import annotations

import argparse
import json
import re
import sys

GiB = 1 << 30
_BLOCK = re.compile(r"^(.*?(?:blocks|layers)\.\d+)\.")


def parent_of(name: str) -> str:
    """The block a sub-unit belongs to, from its name ("double_blocks.3.img_mlp.0" -> "double_blocks.3")."""
    m = _BLOCK.match(name)
    return m.group(1) if m else ""


def resident_root_s(rows: list, res: str) -> float | None:
    """The root's own time at `res`: a row with nothing offloaded, its GPU step less its units' times (a
    streamed row's GPU step also holds the waits for the link, which are no unit's)."""
    for r in rows:
        if r.get("kind") == "distorch" and r.get("off") == 0 and r.get("res") == res and r.get("plan_detail") \
                and r.get("gpu_step"):
            return max(0.0, r["gpu_step"] - sum((r["plan_detail"].get("unit_times") or {}).values()))
    return None


def graph_from_row(row: dict, root_s: float | None = None):
    """ModuleGraph of a results row's plan (units in order, bytes, kind, block) with its measured times; the
    root takes `root_s` (resident_root_s), else what the row's GPU step leaves when it streamed nothing, else 0."""
    from distorch.compiler.graph import ROOT, ModuleGraph, Unit
    detail = row["plan_detail"]
    times = detail.get("unit_times") or {}
    units = []
    for name, _home, nbytes, _codec, kind, _order in sorted(detail["units"], key=lambda u: u[5]):
        units.append(Unit(name, kind, param_bytes=int(nbytes), kind=kind,
                          parent=parent_of(name) if kind == "sub" else "", time_s=float(times.get(name, 0.0))))
    if root_s is None:
        step = row.get("gpu_step") or row.get("meas_step") or 0.0
        streamed = any(u[1] != "cuda:0" for u in detail["units"])
        root_s = 0.0 if streamed else max(0.0, step - sum(u.time_s for u in units))
    units = [u for u in units if u.name != ROOT]
    units.insert(0, Unit(ROOT, "root", kind="root", time_s=float(root_s)))
    return ModuleGraph(units, source="replay")


def replay(row: dict, offload_gb: float, scales: list[float], bw: float, max_slots: int = 8,
           root_s: float | None = None) -> dict:
    from distorch.compiler.inventory import Device, Inventory
    from distorch.passes.budget import scenario_steps, scenario_units
    from distorch.passes.partition import partition
    g = graph_from_row(row, root_s)
    g.time_scales = list(scales)
    total = g.total_bytes
    inv = Inventory(devices={"cuda:0": Device("cuda:0", 4 * total + 8 * GiB, 4 * total + 8 * GiB),
                             "cpu": Device("cpu", 4 * total + 8 * GiB, 4 * total + 8 * GiB)},
                    links={("cpu", "cuda:0"): bw}, source="declared")
    plan = partition(g, inv, "cuda:0", offload_gb=offload_gb)
    homes = {u.name: u.device for u in plan.units}
    off = [u for u in plan.units if u.device != "cuda:0"]
    slot = max((u.bytes for u in off), default=0)
    pr = plan.predicted
    out = {"offload_gb": offload_gb, "scales": [1.0] + list(scales), "bw": bw, "streamed_units": len(off),
           "streamed_gib": sum(u.bytes for u in off) / GiB, "slots": pr.get("slots"), "slot_mib": slot / 2 ** 20,
           "predicted_step_s": pr.get("step_s"), "by_slots": {}}
    scenarios = scenario_units(g, "cuda:0", inv)        # every unit's time measured: 1.0 and each scale
    for k in range(1, max_slots + 1 if slot else 1):
        out["by_slots"][k] = scenario_steps(g, homes, "cuda:0", inv, k * slot, scenarios)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="a bench_comfy.py results JSON")
    ap.add_argument("--row", type=float, required=True, help="the row's virtual_vram_gb")
    ap.add_argument("--res", default=None, help="its resolution label (default: the first)")
    ap.add_argument("--offload", type=float, required=True, help="offload_gb to place at")
    ap.add_argument("--scale", type=float, action="append", default=[], help="another input's compute scale")
    ap.add_argument("--bw", type=float, default=None, help="host link bytes/s (default: the JSON's)")
    ap.add_argument("--as-json", action="store_true", help="print JSON")
    a = ap.parse_args(argv)
    with open(a.results) as f:
        d = json.load(f)
    rows = [r for r in d["rows"] if r.get("kind") == "distorch" and r.get("v") == a.row and r.get("plan_detail")
            and (a.res is None or r.get("res") == a.res)]
    if not rows:
        have = sorted({r.get("v") for r in d["rows"] if r.get("kind") == "distorch"})
        print(f"no DisTorch2 row at virtual_vram_gb {a.row:g}{' ' + a.res if a.res else ''} in {a.results} "
              f"(rows: {have})", file=sys.stderr)
        return 2
    bw = a.bw or d.get("bw")
    if not bw:
        print("no --bw and no probed bandwidth in the JSON: give --bw BYTES_PER_S", file=sys.stderr)
        return 2
    out = replay(rows[0], a.offload, a.scale, float(bw), root_s=resident_root_s(d["rows"], rows[0].get("res")))
    if a.as_json:
        print(json.dumps(out, indent=1))
        return 0
    print(f"offload {a.offload:g} GiB: {out['streamed_units']} units streamed ({out['streamed_gib']:.2f} GiB), "
          f"{out['slots']} slots of {out['slot_mib']:.0f} MiB chosen, predicted {out['predicted_step_s']:.4f} s")
    print("slots  " + "  ".join(f"x{sc:g}".rjust(8) for sc in out["scales"]))
    for k, steps in out["by_slots"].items():
        print(f"{k:5d}  " + "  ".join(f"{s:8.4f}" for s in steps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
