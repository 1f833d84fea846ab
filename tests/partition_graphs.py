"""Graphs and checks the partition tests share (tests/test_partition.py, test_partition_cost.py,
test_partition_schedule.py): a Flux-like graph, a declared inventory, and the invariants every plan keeps."""
from distorch.compiler.cost import item_keys, stream_groups
from distorch.compiler.graph import ModuleGraph, Unit, ROOT
from distorch.compiler.inventory import declare
from distorch.compiler.plan import Plan
from distorch.passes.schedule import Schedule, schedule
from distorch.passes.verify import verify

GiB, MiB = 1 << 30, 1 << 20
INV = declare("cuda:0=24GiB,cuda:1=16GiB,cpu=64GiB;cuda:1<>cuda:0=100GB/s")


def flux_like(n_double=8, n_single=16, flops=False):
    us = [Unit("img_in", "Linear", param_bytes=6 * MiB, kind="leaf"),
          Unit("time_in", "MLP", param_bytes=20 * MiB, kind="leaf")]
    us += [Unit(f"double_blocks.{i}", "DoubleStreamBlock", param_bytes=650 * MiB) for i in range(n_double)]
    us += [Unit(f"single_blocks.{i}", "SingleStreamBlock", param_bytes=270 * MiB) for i in range(n_single)]
    us += [Unit("final_layer", "LastLayer", param_bytes=30 * MiB, kind="leaf"),
           Unit(ROOT, "Root", param_bytes=3 * MiB, kind="root")]
    if flops:
        for u in us:
            u.flops = u.bytes * 2000.0
    return ModuleGraph(us, source="flux-like")


def check_invariants(plan, graph, inv):
    # bytes conserved
    assert plan.model_bytes == graph.total_bytes
    assert sum(d["bytes"] for d in plan.devices.values()) == graph.total_bytes
    assert [u.name for u in plan.units] == [u.name for u in graph.units]
    for d, info in plan.devices.items():
        assert info["bytes"] == sum(u.bytes for u in plan.units if u.device == d)
        assert info["units"] == sum(1 for u in plan.units if u.device == d)
        assert sum(info["types"].values()) == info["units"]
        use = plan.predicted["compute_peak_bytes"] if d == plan.compute else info["bytes"]
        assert use <= inv.devices[d].free_bytes <= inv.devices[d].total_bytes
    pr = plan.predicted
    assert pr["step_s"] >= pr["compute_s"] - 1e-12
    for link, b in pr["per_link_bytes"].items():
        src, dst = link.split(">")
        assert pr["step_s"] >= b / inv.bandwidth(src, dst) - 1e-12
    assert abs(pr["overhead_s"] - (pr["step_s"] - pr["compute_s"])) < 1e-12
    # the footprint on the compute device: resident weights + the runtime's slots + scratch + buffers
    assert pr["peak_bytes"] == pr["compute_peak_bytes"] == (
        plan.devices[plan.compute]["bytes"] + pr["slots"] * pr["slot_bytes"] + pr["dequant_scratch_bytes"]
        + pr["dequant_transient_bytes"] + pr["runtime_buffers_bytes"])
    assert pr["resident_bytes"] == plan.devices[plan.compute]["bytes"]
    assert pr["slots"] * max((u.bytes for u in plan.offloaded()), default=0) <= plan.window_bytes
    assert pr["slot_bytes"] >= max((u.bytes for u in plan.offloaded()), default=0)
    if pr.get("budget_bytes") is not None:
        assert pr["compute_peak_bytes"] <= pr["budget_bytes"]
        assert pr["window_max_bytes"] <= pr["budget_bytes"] - (pr["compute_peak_bytes"] - pr["window_footprint_bytes"])
    sched = schedule(plan, graph)
    verify(plan, sched)
    # the schedule's ring is the one the cost model simulated
    off = plan.offloaded()
    groups = stream_groups([u.bytes for u in off], max((u.bytes for u in off), default=0), item_keys([u.device for u in off], [u.order for u in off]))
    assert sched.items == [[off[k].name for k in grp] for grp in groups]
    assert sched.n_slots == plan.predicted["n_slots"]
    # plain data: JSON round trips
    assert Plan.from_json(plan.to_json()).to_dict() == plan.to_dict()
    assert Schedule.from_dict(sched.to_dict()) == sched
