"""Sub-unit granularity (passes/granularity.py): blocks split into the layers inside them, chosen by the
simulated step, streamed bit-identically (dense, fp8, GGUF) on CPU."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import distorch
from distorch.compiler.graph import ROOT
from distorch.compiler.inventory import declare
from distorch.compiler.plan import GiB
from distorch.compiler.trace import trace
from distorch.errors import DisTorchError
from distorch.formats import testing as ft
from distorch.passes.granularity import MIN_GAIN, VRAM_GAIN_BYTES, choose, sub_unit_graph
from distorch.passes.partition import partition


class Blk(nn.Module):
    def __init__(self, d: int, dtype=torch.float32):
        super().__init__()
        self.norm = nn.LayerNorm(d, dtype=dtype)
        self.a = nn.Linear(d, 4 * d, dtype=dtype)
        self.b = nn.Linear(4 * d, d, dtype=dtype)
        self.mod = nn.Parameter(torch.randn(d, dtype=dtype) * 0.1)   # owned by the block itself

    def forward(self, x):
        return x + self.b(F.gelu(self.a(self.norm(x)))) * self.mod


class Net(nn.Module):
    def __init__(self, d: int = 64, n: int = 4, dtype=torch.float32):
        super().__init__()
        self.emb = nn.Linear(d, d, dtype=dtype)
        self.blocks = nn.ModuleList([Blk(d, dtype) for _ in range(n)])
        self.head = nn.Linear(d, d, dtype=dtype)

    def forward(self, x):
        x = self.emb(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)


class FP8Linear(nn.Module):
    """A scaled-fp8 layer as ComfyUI stores them: float8_e4m3fn weight + a per-weight scale."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        s = lin.weight.detach().abs().amax() / 448.0
        self.weight = nn.Parameter((lin.weight.detach() / s).to(torch.float8_e4m3fn), requires_grad=False)
        self.scale_weight = nn.Parameter(s.reshape(()).clone(), requires_grad=False)
        self.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)

    def forward(self, x):
        return F.linear(x, self.weight.to(x.dtype) * self.scale_weight.to(x.dtype), self.bias)


def _fp8(m: nn.Module) -> nn.Module:
    for blk in m.blocks:
        blk.a, blk.b = FP8Linear(blk.a), FP8Linear(blk.b)
    return m


def test_sub_unit_graph_splits_blocks_and_keeps_every_tensor_once():
    m = Net()
    gb, gl = trace(m), trace(m, granularity="leaf")
    sub = sub_unit_graph(gb, gl)
    assert sub is not None and sub.granularity == "sub"
    names = [u.name for u in sub.units]
    assert "blocks.0" not in names and "blocks.0.a" in names and "blocks.3.b" in names
    subs = [u for u in sub.units if u.kind == "sub"]
    assert len(subs) == 4 * 3 and all(u.parent.startswith("blocks.") for u in subs)
    # the blocks' own Parameter joins ROOT; bytes and tensors are those of the block graph, each once
    root = sub[ROOT]
    assert {f"blocks.{i}.mod" for i in range(4)} <= set(root.tensors)
    assert sub.total_bytes == gb.total_bytes
    flat = [t for u in sub.units for t in u.tensors]
    assert sorted(flat) == sorted(t for u in gb.units for t in u.tensors) and len(flat) == len(set(flat))
    # order: the layers of block k sit where block k was
    order = [n for n in names if n.startswith("blocks.")]
    assert order == [f"blocks.{i}.{p}" for i in range(4) for p in ("norm", "a", "b")]


def test_leaf_trace_keeps_units_disjoint():
    gl = trace(Net(), granularity="leaf")
    names = {u.name for u in gl.units}
    assert "blocks.0" not in names                  # the block's own Parameter went to ROOT
    for n in names:
        parts = n.split(".")
        assert not any(".".join(parts[:k]) in names for k in range(1, len(parts)))


def test_sub_unit_graph_refuses_weights_tied_across_blocks():
    m = Net()
    m.blocks[1].a.weight = m.blocks[0].a.weight
    gb, gl = trace(m), trace(m, granularity="leaf")
    # both graphs own the tied tensor once, under blocks.0 / blocks.0.a: the split stays clean
    sub = sub_unit_graph(gb, gl)
    if sub is not None:
        flat = [t for u in sub.units for t in u.tensors]
        assert len(flat) == len(set(flat)) and sub.total_bytes == gb.total_bytes


def _plan(step, peak, n_streamed, compute_s=0.01):
    from distorch.compiler.plan import Plan, PlacedUnit
    units = [PlacedUnit(f"u{i}", "Linear", 10, "cpu" if i < n_streamed else "cuda:0", i, "sub")
             for i in range(max(n_streamed, 1) + 1)]
    return Plan(compute="cuda:0", units=units, devices={}, expert_string="", window_bytes=10,
                predicted={"step_s": step, "compute_peak_bytes": peak, "compute_s": compute_s}, source={})


def test_choose_rule():
    g = None
    base = _plan(0.40, 2 * GiB, 10)
    # faster by more than MIN_GAIN: the sub-unit plan
    assert choose([(g, base), (g, _plan(0.40 * (1 - 2 * MIN_GAIN), 2 * GiB, 100))]) == 1
    # faster by less than MIN_GAIN, same VRAM: whole blocks (fewer hooks)
    assert choose([(g, base), (g, _plan(0.399, 2 * GiB, 100))]) == 0
    # as fast, holding much less VRAM: the sub-unit plan
    assert choose([(g, base), (g, _plan(0.402, 2 * GiB - VRAM_GAIN_BYTES, 100))]) == 1
    # compute-bound: the hooks' host time makes it slower than blocks
    assert choose([(g, base), (g, _plan(0.30, 2 * GiB, 100000, compute_s=0.30))]) == 0
    # no prediction: blocks
    assert choose([(g, _plan(None, None, 1)), (g, _plan(0.1, 1, 1))]) == 0


def test_partition_with_sub_units_uses_smaller_slots_and_keeps_more_resident():
    """A link-bound machine, a budget a few blocks wide: blocks need block-sized slots, sub-units do not."""
    m = Net(d=256, n=8)
    gb = trace(m, (torch.randn(2, 16, 256),))
    sub = sub_unit_graph(gb, trace(m, granularity="leaf"))
    inv = declare("cuda:0=1GiB,cpu=8GiB;cpu>cuda:0=1GB/s")
    budget = gb.total_bytes * 0.4 / GiB
    pb = partition(gb, inv, "cuda:0", max_vram_gb=budget)
    ps = partition(sub, inv, "cuda:0", max_vram_gb=budget)
    assert ps.predicted["slot_bytes"] < pb.predicted["slot_bytes"]
    assert ps.predicted["compute_peak_bytes"] <= budget * GiB and pb.predicted["compute_peak_bytes"] <= budget * GiB
    assert ps.offloaded_bytes() < pb.offloaded_bytes()
    assert ps.predicted["step_s"] < pb.predicted["step_s"]
    assert choose([(gb, pb), (sub, ps)]) == 1


def _compiled_equal(m: nn.Module, x: torch.Tensor, **kw):
    ref = m(x)
    h = distorch.compile(m, compute="cpu", donors=["cpu"], progress=False, **kw)
    try:
        out = m(x)
        out2 = m(x)
        assert h.plan.predicted["granularity"]["chosen"] == "sub"
        streamed = [u.name for u in h.plan.units if u.device != h.plan.compute]
        assert any(n.startswith("blocks.") and n.count(".") >= 2 for n in streamed), streamed
        assert torch.equal(out, ref) and torch.equal(out2, ref)
        return h, streamed
    finally:
        h.undo()
        assert torch.equal(m(x), ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sub_units_stream_bit_identical_dense(dtype):
    torch.manual_seed(0)
    m = Net(d=64, n=4, dtype=dtype).eval()
    x = torch.randn(2, 8, 64, dtype=dtype)
    with torch.no_grad():
        _compiled_equal(m, x, offload_gb=m.emb.weight.numel() * 0 + 0.6 * sum(
            p.numel() * p.element_size() for p in m.parameters()) / GiB, granularity="sub")


def test_sub_units_stream_bit_identical_fp8():
    torch.manual_seed(1)
    m = _fp8(Net(d=64, n=4)).eval()
    x = torch.randn(2, 8, 64)
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    with torch.no_grad():
        h, streamed = _compiled_equal(m, x, offload_gb=0.7 * size / GiB, granularity="sub")
    assert any(n.endswith(".a") or n.endswith(".b") for n in streamed)


def test_sub_units_stream_bit_identical_gguf():
    torch.manual_seed(2)
    m = Net(d=64, n=4).eval()
    g = torch.Generator().manual_seed(3)
    assert ft.quantize_module(m, "Q8_0", generator=g) > 0
    x = torch.randn(2, 8, 64)
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    with torch.no_grad():
        _compiled_equal(m, x, offload_gb=0.6 * size / GiB, granularity="sub")


def test_auto_granularity_records_both_predictions_and_bad_value_is_named():
    torch.manual_seed(0)
    m = Net(d=64, n=4).eval()
    x = torch.randn(2, 8, 64)
    with torch.no_grad():
        ref = m(x)
        h = distorch.compile(m, compute="cpu", donors=["cpu"], progress=False,
                             offload_gb=0.5 * sum(p.numel() * 4 for p in m.parameters()) / GiB)
        info = h.plan.predicted["granularity"]
        assert info["chosen"] in ("block", "sub") and info["block_step_s"] > 0 and "sub_step_s" in info
        assert torch.equal(m(x), ref)
        h.undo()
    with pytest.raises(DisTorchError, match="granularity='blocks'.*auto"):
        distorch.compile(copy.deepcopy(m), compute="cpu", offload_gb=0.001, granularity="blocks", progress=False)


def test_file_leaf_graph_splits_builtin_like_the_module_trace():
    from distorch.compiler.files import graph_from_file, leaf_graph_from_file
    gb = graph_from_file("flux-dev")
    sub = sub_unit_graph(gb, leaf_graph_from_file("flux-dev"))
    assert sub is not None and sub.total_bytes == gb.total_bytes
    names = {u.name for u in sub.units}
    assert "double_blocks.3.img_attn.qkv" in names and "single_blocks.7.linear1" in names
    assert max(u.bytes for u in sub.units if u.kind == "sub") < 140e6       # one Linear, not a 0.68 GB block


def test_cli_plan_chooses_and_reports_granularity(capsys):
    import json
    from distorch.cli import main
    dev = "cuda:0=141GiB,cpu=120GiB;cpu>cuda:0=55GB/s"
    assert main(["plan", "flux-dev", "--compute", "cuda:0", "--devices", dev, "--offload", "20", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    g = d["predicted"]["granularity"]
    assert g["chosen"] == "sub" and g["sub_step_s"] < g["block_step_s"]
    assert d["compute_peak_bytes"] <= d["model_bytes"] - 20 * GiB
    assert main(["plan", "flux-dev", "--compute", "cuda:0", "--devices", dev, "--offload", "20",
                 "--granularity", "block", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert "granularity" not in d["predicted"] and all("." not in u["name"].split("blocks.")[-1] for u in d["units"])
    assert main(["plan", "flux-dev", "--compute", "cuda:0", "--devices", dev, "--offload", "20"]) == 0
    assert "streams the layers inside blocks" in capsys.readouterr().out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("kind", ["bf16", "fp8", "gguf"])
def test_sub_units_stream_bit_identical_on_cuda(kind):
    """The CUDA path: pinned homes, copy stream, events per ring item, views per sub-unit."""
    torch.manual_seed(4)
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    m = Net(d=512, n=6, dtype=dtype).eval()
    if kind == "fp8":
        _fp8(m)
    elif kind == "gguf":
        ft.quantize_module(m, "Q8_0", generator=torch.Generator().manual_seed(5))
    m = m.to("cuda:0")
    x = torch.randn(2, 64, 512, dtype=dtype, device="cuda:0")
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    with torch.no_grad():
        ref = m(x)
        h = distorch.compile(m, compute="cuda:0", donors=["cpu"], offload_gb=0.7 * size / GiB, granularity="sub",
                             progress=False)
        try:
            assert h.plan.predicted["granularity"]["chosen"] == "sub"
            assert h.stats.get("streamed_units", 0) > 6 or len(h.runtime.units) > 6
            for _ in range(4):
                assert torch.equal(m(x), ref)
        finally:
            h.undo()
        assert torch.equal(m(x), ref)


def test_estimated_compute_weighs_the_fast_scenario():
    """Flux-dev at --offload 6 on a declared H200: at the estimated compute both plans hide every copy (a
    tie: whole blocks), but with compute 2x faster than estimated the layers hide more: layers."""
    from distorch.compiler.files import graph_from_file, leaf_graph_from_file
    from distorch.passes.granularity import granularity
    inv = declare("cuda:0=141GiB,cpu=120GiB;cpu>cuda:0=55GB/s")
    g = graph_from_file("flux-dev")
    budget = dict(offload_gb=6)
    plan = partition(g, inv, "cuda:0", **budget)
    g2, p2 = granularity(g, plan, leaf_graph_from_file("flux-dev"), inv, "cuda:0", budget)
    info = p2.predicted["granularity"]
    assert info["sub_step_s"] == pytest.approx(info["block_step_s"], rel=MIN_GAIN)
    assert info["sub_step_fast_s"] < info["block_step_fast_s"] * (1 - 2 * MIN_GAIN)
    assert info["chosen"] == "sub" and g2.granularity == "sub"
    assert p2.predicted["compute_peak_bytes"] <= g.total_bytes - 6 * GiB


def test_traced_sub_units_come_in_call_order_so_the_ring_never_falls_back():
    """With example inputs the layers are ordered as they are called (a Flux double block calls img_mod,
    then txt_mod ..., not in registration order): the ring's first step already expects that order."""
    import test_torch_compile as T
    m, args = T._model_and_inputs()
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    with torch.no_grad():
        ref = m(*args)
        h = distorch.compile(m, compute="cpu", offload_gb=0.5 * total / GiB, donors=["cpu"], example_args=args,
                             progress=False, granularity="sub")
        for _ in range(3):
            assert torch.equal(m(*args), ref)
    st = h.stats
    assert h.plan.predicted["granularity"]["chosen"] == "sub"
    assert st["deviations"] == 0 and st["fallback_loads"] == 0, (st["deviations"], st["fallback_loads"])
    h.undo()


def test_budget_under_whole_blocks_minimum_streams_layers():
    """A max_vram_gb under one block-sized slot is not an error when the layers inside the blocks fit; the
    error, when even they do not fit, names their (smaller, true) minimum."""
    from distorch.cli import main
    from distorch.errors import PartitionError
    from distorch.passes.granularity import below_blocks, sub_only
    with torch.device("meta"):
        m = Net(d=1024, n=4)                              # blocks of 34 MB, layers of at most 17 MB
    inv = declare("cuda:0=8GiB,cpu=8GiB;cpu>cuda:0=25GB/s")
    gb, gl = trace(m), trace(m, granularity="leaf")
    block = max(u.bytes for u in gb.units if u.kind == "block")
    cap = 0.7 * block / GiB                               # below one block-sized slot
    with pytest.raises(PartitionError, match="minimum working set") as ei:
        partition(gb, inv, "cuda:0", max_vram_gb=cap)
    assert below_blocks(ei.value)
    g, plan = sub_only(gb, gl, inv, "cuda:0", dict(max_vram_gb=cap), ei.value)
    assert plan.predicted["granularity"]["chosen"] == "sub" and "block_error" in plan.predicted["granularity"]
    assert plan.predicted["compute_peak_bytes"] <= cap * GiB and g.granularity == "sub"
    with pytest.raises(PartitionError, match=r"minimum working set") as e2:
        sub_only(gb, gl, inv, "cuda:0", dict(max_vram_gb=0.01 * block / GiB), ei.value)
    assert e2.value is not ei.value and "slot for the largest streamed unit" in str(e2.value)
    dev = "cuda:0=141GiB,cpu=120GiB;cpu>cuda:0=55GB/s"
    assert main(["plan", "flux-dev", "--compute", "cuda:0", "--devices", dev, "--max-vram", "0.5"]) == 0
    assert main(["plan", "flux-dev", "--compute", "cuda:0", "--devices", dev, "--max-vram", "0.5",
                 "--granularity", "block"]) == 2


def test_placement_plot_stacks_the_layers_of_a_split_block():
    from distorch.compiler.files import graph_from_file, leaf_graph_from_file
    from distorch.runtime import plots
    inv = declare("cuda:0=141GiB,cpu=120GiB;cpu>cuda:0=55GB/s")
    sub = sub_unit_graph(graph_from_file("flux-dev"), leaf_graph_from_file("flux-dev"))
    plan = partition(sub, inv, "cuda:0", offload_gb=14)
    groups = plots.placement_groups(plan)
    labels = [g for g, _ in groups]
    assert len(groups) < 80 and "double_blocks.0" in labels and "single_blocks.37" in labels
    assert sum(sum(per.values()) for _, per in groups) == plan.model_bytes
    assert any(len(per) == 2 for _, per in groups)          # a block partly resident, partly streamed
