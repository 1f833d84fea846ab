"""The hand-made placements of bench_stream.py: the Flux model's blocks in execution order, an evenly spread
set of blocks offloaded to reach a fraction of the block bytes, the block graph, a plan that streams that set
through a ring of slots, and the cost model's prediction of such a plan at the measured link rate.

    units = block_units(model)      off = pick_offloaded(units, 0.5)      graph = graph_of(model, units, root_bytes)
    plan = hand_plan(graph, off, slots, dev)      pred = predict(graph, plan, bw, dev)
"""
from __future__ import annotations


def block_units(model):
    """[(name, type, bytes)] in execution order for a Flux model: double blocks, then single blocks."""
    out = []
    for lname in ("transformer_blocks", "single_transformer_blocks"):
        for i, b in enumerate(getattr(model, lname)):
            nb = sum(p.numel() * p.element_size() for p in b.parameters())
            out.append((f"{lname}.{i}", type(b).__name__, nb))
    return out


def pick_offloaded(units, frac: float):
    """Spread the offloaded blocks evenly over the order until >= frac of block bytes is offloaded."""
    if frac <= 0:
        return set()
    if frac >= 1:
        return {u[0] for u in units}
    total = sum(u[2] for u in units)
    target = frac * total
    chosen, acc = set(), 0
    n = len(units)
    k = max(1, round(frac * n))
    # evenly spaced indices, then top up / trim to the byte target
    idx = sorted({min(n - 1, int((j + 0.5) * n / k)) for j in range(k)})
    for i in idx:
        chosen.add(units[i][0])
        acc += units[i][2]
    for i in range(n):
        if acc >= target * 0.98:
            break
        if units[i][0] not in chosen:
            chosen.add(units[i][0])
            acc += units[i][2]
    return chosen


def graph_of(model, units, root_bytes: int):
    from distorch.compiler.graph import ModuleGraph, Unit, ROOT
    us = [Unit(ROOT, type(model).__name__, param_bytes=root_bytes, kind="root")]
    us += [Unit(n, t, param_bytes=b, kind="block") for n, t, b in units]
    return ModuleGraph(us, source="bench")


def hand_plan(graph, offloaded: set, window_slots: int, compute: str):
    from distorch.compiler.plan import Plan, PlacedUnit
    pu = [PlacedUnit(u.name, u.type, u.bytes, "cpu" if u.name in offloaded else compute, i, u.kind)
          for i, u in enumerate(graph.units)]
    big = max((u.bytes for u in graph.units if u.name in offloaded), default=0)
    return Plan(compute=compute, units=pu, window_bytes=window_slots * big,
                source={"bench": "hand", "offloaded_units": len(offloaded)})


def predict(graph, plan, bw: float, compute: str):
    """Cost model prediction (compiler.cost.simulate) with the measured link and per-unit times."""
    try:
        from distorch.compiler.cost import simulate
        from distorch.compiler.inventory import declare
    except Exception as e:
        return {"error": f"cost model unavailable: {e}"}
    try:
        inv = declare(f"{compute}=80GiB,cpu=128GiB;cpu>{compute}={bw / 1e9:.3f}GB/s")
        homes = {u.name: u.device for u in plan.units}
        return simulate(graph.units, homes, compute, inv, plan.window_bytes)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
