"""passes/quant_choice.py: per-unit choice for GGUF weights (streamed / resident quantized / dequantized)."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

from distorch.compiler.graph import ROOT, ModuleGraph, Unit  # noqa: E402
from distorch.compiler.inventory import declare  # noqa: E402
from distorch.compiler.plan import Plan, PlacedUnit  # noqa: E402
from distorch.passes.partition import partition  # noqa: E402
from distorch.passes.quant_choice import (RESIDENT_DQ, RESIDENT_Q, STREAMED_Q, QuantChoiceError,  # noqa: E402
                                          UnitQuant, choose_quant, predict, quant_info)
from distorch.runtime.apply import apply  # noqa: E402
from distorch.formats.gguf_tensor import GGUFTensor  # noqa: E402

MiB = 1 << 20
GPU = "cuda:0"


def synthetic(n=12, seed=0):
    """A graph of n GGUF blocks of varied size/cost, a plan offloading every third, and their info."""
    g = torch.Generator().manual_seed(seed)
    units = [Unit(ROOT, "M", param_bytes=4 * MiB, kind="root", flops=1e9)]
    info = {}
    for i in range(n):
        stored = int((20 + 60 * torch.rand((), generator=g).item()) * MiB)
        name = f"blocks.{i}"
        units.append(Unit(name, "Block", param_bytes=stored, flops=stored * 4096.0))
        dense = int(stored * 2 / (8.5 / 8))           # Q8_0: 8.5 bits per weight -> bf16
        info[name] = UnitQuant(name, stored_bytes=stored, dense_bytes=dense,
                               dequant_s=(stored + dense) / (0.9 * 3e12) * (1 + (i % 3)), tensors=4,
                               largest_dense=dense // 2)
    graph = ModuleGraph(units)
    inv = declare(f"{GPU}=80GiB,cpu=128GiB;cpu>{GPU}=50GB/s")
    plan = partition(graph, inv, GPU, offload_gb=0.3 * graph.total_bytes / 2**30, donors=["cpu"])
    return graph, inv, plan, info


def extra(plan, info):
    return sum(info[n].extra_bytes for n, c in plan.quant.items() if c == RESIDENT_DQ)


def test_streamed_units_stream_quantized_and_budget_respected():
    graph, inv, plan, info = synthetic()
    off = {u.name for u in plan.units if u.device != plan.compute}
    assert off
    for budget in [0, 30 * MiB, 100 * MiB, 400 * MiB, 10 << 30]:
        p = choose_quant(plan, graph, inv, info, budget_bytes=budget)
        assert set(p.quant) == set(info)
        for n in off:
            assert p.quant[n] == STREAMED_Q
        for n in set(info) - off:
            assert p.quant[n] in (RESIDENT_Q, RESIDENT_DQ)
        assert extra(p, info) <= budget
        assert p.predicted["quant"]["extra_bytes"] == extra(p, info)
    # zero budget: nothing dequantized; a huge one: every resident unit
    p0 = choose_quant(plan, graph, inv, info, budget_bytes=0)
    assert RESIDENT_DQ not in p0.quant.values()
    pall = choose_quant(plan, graph, inv, info, budget_bytes=10 << 30)
    assert all(pall.quant[n] == RESIDENT_DQ for n in set(info) - off)


def test_more_vram_more_dequantized_and_step_never_worse():
    graph, inv, plan, info = synthetic(n=16, seed=3)
    base = predict(plan, graph, inv, info, set())["step_s"]
    prev_n, prev_step = -1, None
    for budget in [0, 40 * MiB, 80 * MiB, 160 * MiB, 320 * MiB, 640 * MiB, 4 << 30]:
        p = choose_quant(plan, graph, inv, info, budget_bytes=budget)
        k = sum(1 for c in p.quant.values() if c == RESIDENT_DQ)
        assert k >= prev_n
        assert p.predicted["step_s"] <= base + 1e-12
        assert p.predicted["quant"]["step_s_all_quantized"] == pytest.approx(base)
        if prev_step is not None:
            assert p.predicted["step_s"] <= prev_step + 1e-12
        prev_n, prev_step = k, p.predicted["step_s"]
    assert prev_n > 0 and prev_step < base      # dequantizing removes per-call compute


def test_biggest_dequant_cost_first():
    graph, inv, plan, info = synthetic(n=10, seed=5)
    resident = [n for n in info if plan.home(n) == plan.compute]
    top = max(resident, key=lambda n: info[n].dequant_s)
    p = choose_quant(plan, graph, inv, info, budget_bytes=info[top].extra_bytes)
    assert [n for n, c in p.quant.items() if c == RESIDENT_DQ] == [top]


def test_modes_budget_from_inventory_and_errors():
    graph, inv, plan, info = synthetic()
    pq = choose_quant(plan, graph, inv, info, mode="quantized")
    assert RESIDENT_DQ not in pq.quant.values()
    # the plan's own budget (offload_gb: at most model - offload on the card) has no room for dense copies
    pb = choose_quant(plan, graph, inv, info)
    assert pb.predicted["quant"]["budget_bytes"] == 0 and RESIDENT_DQ not in pb.quant.values()
    # 80 GiB card, no budget in the plan: the default budget (free - peak - reserve - workspace) holds every
    # resident unit
    from dataclasses import replace
    free_plan = replace(plan, predicted=dict(plan.predicted, budget_bytes=None))
    pa = choose_quant(free_plan, graph, inv, info)
    assert all(c != RESIDENT_Q for c in pa.quant.values())
    small = declare(f"{GPU}=1GiB,cpu=128GiB;cpu>{GPU}=50GB/s")
    with pytest.raises(QuantChoiceError, match="mode"):
        choose_quant(plan, graph, inv, info, mode="int8")
    with pytest.raises(QuantChoiceError, match="negative"):
        choose_quant(plan, graph, inv, info, budget_bytes=-1)
    with pytest.raises(QuantChoiceError, match="compute device"):
        choose_quant(plan, graph, declare("cpu=8GiB"), info)
    ps = choose_quant(plan, graph, small, info)     # peak exceeds 1 GiB: no room at all
    assert ps.predicted["quant"]["budget_bytes"] == 0 and RESIDENT_DQ not in ps.quant.values()
    # JSON round trip keeps the choice
    assert Plan.from_json(pa.to_json()).quant == pa.quant


def test_measured_times_are_taken_as_including_dequant():
    graph, inv, plan, info = synthetic()
    for u in graph.units:
        u.time_s = 0.004
    p = choose_quant(plan, graph, inv, info, budget_bytes=10 << 30)
    saved = p.predicted["quant"]["dequant_s_saved"]
    assert saved > 0
    assert p.predicted["compute_s"] == pytest.approx(0.004 * len(graph.units) - saved)


# ------------------------------------------------------------------------------ with a real module
def _toy():
    from test_gguf_stream import make
    return make("Q8_0", depth=4)


def test_quant_info_from_module_and_runtime_honours_choice():
    from distorch.compiler.trace import trace
    from test_gguf_stream import bits, x_in
    m = _toy()
    x = x_in()
    with torch.no_grad():
        ref = m(x)
    graph = trace(m, (x,))
    inv = declare("cpu:0=64GiB,cpu=64GiB")
    plan = partition(graph, inv, "cpu:0", offload_gb=0.2 * graph.total_bytes / 2**30, donors=["cpu"])
    info = quant_info(plan, graph)
    blk = m.blocks[0]
    ws = [blk.qkv.weight, blk.proj.weight, blk.up.weight, blk.down.weight]
    assert info["blocks.0"].stored_bytes == sum(w.raw.numel() for w in ws)
    assert info["blocks.0"].dense_bytes == sum(w.numel() * 2 for w in ws)
    assert info["blocks.0"].qtypes == {"Q8_0": 4}
    assert "embed" not in info                 # 16 inputs: stays dense (not a GGUF tensor)
    resident = [n for n in info if plan.home(n) == plan.compute]
    assert resident
    one = max(resident, key=lambda n: info[n].dequant_s)
    p = choose_quant(plan, graph, inv, info, budget_bytes=info[one].extra_bytes)
    assert p.quant[one] == RESIDENT_DQ
    rt = apply(m, p, graph, progress=False)
    try:
        assert rt.dequantized.units == [one]
        mod = m.get_submodule(one)
        assert not any(isinstance(q, GGUFTensor) for q in mod.parameters())
        for n, c in p.quant.items():
            if c != RESIDENT_DQ:
                assert any(isinstance(q, GGUFTensor) for q in m.get_submodule(n).parameters())
        with torch.no_grad():
            assert torch.equal(bits(m(x)), bits(ref))
    finally:
        rt.undo()
    assert any(isinstance(q, GGUFTensor) for q in m.get_submodule(one).parameters())


def test_units_with_per_call_patches_stay_quantized():
    graph, inv, plan, info = synthetic()
    resident = [n for n in info if plan.home(n) == plan.compute]
    info[resident[0]].patched = True
    p = choose_quant(plan, graph, inv, info, budget_bytes=10 << 30, mode="dequantized")
    assert p.quant[resident[0]] == RESIDENT_Q
    assert all(p.quant[n] == RESIDENT_DQ for n in resident[1:])


def test_dequant_scratch_of_streamed_units_counted_in_peak_and_budget():
    from dataclasses import replace
    from distorch.passes.quant_choice import default_budget, scratch_bytes
    graph, inv, plan, info = synthetic()
    off = [u.name for u in plan.units if u.device != plan.compute and u.name in info]
    want = max(info[n].dense_bytes for n in off)
    assert scratch_bytes(plan, info) == want
    p = choose_quant(plan, graph, inv, info, budget_bytes=0)
    assert p.predicted["quant"]["dequant_scratch_bytes"] == want
    # the footprint counts it, and two transient per-call dense copies (the partition saw no GGUF facts in
    # this synthetic graph, so quant_choice adds both from `info`)
    work = 2 * max(q.largest_dense for q in info.values())
    assert p.predicted["peak_bytes"] == p.predicted["compute_peak_bytes"] == plan.predicted["peak_bytes"] + want + work
    assert p.predicted["dequant_scratch_bytes"] == want and p.predicted["dequant_transient_bytes"] == work
    # the default budget leaves room for them, within the plan's own budget (offload_gb)
    base = plan.predicted["peak_bytes"] + work + want
    assert default_budget(plan, inv, info, reserve_bytes=0) == max(0, min(
        inv.devices[GPU].free_bytes - base, plan.predicted["budget_bytes"] - base))
    free_plan = replace(plan, predicted=dict(plan.predicted, budget_bytes=None))
    assert default_budget(free_plan, inv, info, reserve_bytes=0) == inv.devices[GPU].free_bytes - base
    # computing on the host: per-layer dequantization, no scratch
    assert scratch_bytes(replace(plan, compute="cpu:0"), info) == 0


def test_quant_info_reads_graph_facts_without_a_module():
    """The pass reads Unit.gguf (recorded by trace) and compiler.cost's dequant cost: plain data only."""
    from distorch.compiler.cost import dequant_seconds
    facts = {"tensors": 3, "stored_bytes": 3400 + 2100, "dense_bytes": 6400 + 4 * 2560, "largest_dense": 6400,
             "patched": False, "qtypes": {"Q8_0": 2, "Q6_K": 1},
             "bytes_by_type": {"Q8_0": [3400, 6400], "Q6_K": [2100, 4 * 2560]}}
    units = [Unit(ROOT, "M", param_bytes=1000, kind="root"),
             Unit("blocks.0", "Block", param_bytes=5500, calls=2, gguf=facts),
             Unit("blocks.1", "Block", param_bytes=5500, gguf=dict(facts, patched=True)),
             Unit("head", "Linear", param_bytes=64, kind="leaf")]
    graph = ModuleGraph(units)
    inv = declare(f"{GPU}=80GiB,cpu=128GiB;cpu>{GPU}=50GB/s")
    plan = Plan(GPU, [PlacedUnit(u.name, u.type, u.bytes, GPU, i, u.kind) for i, u in enumerate(units)],
                predicted={"peak_bytes": graph.total_bytes})
    info = quant_info(plan, graph, copy_bw=1e12)
    assert set(info) == {"blocks.0", "blocks.1"}
    q = info["blocks.0"]
    want = (dequant_seconds("Q8_0", 3400, 6400, copy_bw=1e12) + dequant_seconds("Q6_K", 2100, 10240, copy_bw=1e12)) * 2
    assert q.dequant_s == pytest.approx(want) and q.calls == 2
    assert (q.stored_bytes, q.dense_bytes, q.tensors, q.largest_dense) == (5500, 16640, 3, 6400)
    assert q.qtypes == {"Q8_0": 2, "Q6_K": 1} and not q.patched and info["blocks.1"].patched
    # choose_quant computes the same info itself when none is given; the patched unit stays quantized
    p = choose_quant(plan, graph, inv, budget_bytes=10 << 30, mode="dequantized")
    assert p.quant == {"blocks.0": RESIDENT_DQ, "blocks.1": RESIDENT_Q}
    # the facts survive the graph's JSON round trip
    assert ModuleGraph.from_dict(graph.to_dict())["blocks.0"].gguf == facts
    assert quant_info(plan, None) == {}
