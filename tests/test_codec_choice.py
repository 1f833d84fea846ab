"""passes/codec_choice.py and its facts: which offloaded units stream bf16/fp16 weights compressed (CPU only)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from distorch.compiler import graph as cgraph
from distorch.compiler.cost import DECODE_BW, DECODE_BW_HOST, DECODE_LAUNCH_S, decode_seconds, simulate
from distorch.compiler.files import codable_info, graph_from_file, graph_from_tensors
from distorch.compiler.graph import CODEC_RATIO, ROOT, ModuleGraph, Unit
from distorch.compiler.inventory import declare
from distorch.compiler.plan import Plan
from distorch.compiler.ring_layout import ALIGN, align
from distorch.compiler.codec_facts import SAMPLE_MARGIN, codec_estimate, exponent_counts
from distorch.compiler.trace import trace
from distorch.errors import DisTorchError
from distorch.formats.bf16_codec import MAX_NUMEL
from distorch.formats.bf16_encode import MIN_CODED_NUMEL, encode, estimate_nbytes
from distorch.formats.tensor_info import TensorInfo
from distorch.passes.codec_choice import (FAST_SCALE, MIN_GAIN, CodecChoiceError, choose_codec, codec_info, codec_table,
                                          streamed_sizes)
from distorch.passes.granularity import sub_unit_graph
from distorch.errors import PartitionError
from distorch.passes.partition import partition
from distorch.passes.schedule import schedule
from distorch.passes.verify import verify

MiB = 1 << 20
GPU = "cuda:0"


# --- facts -----------------------------------------------------------------------------------------------

def test_codable_bounds_mirror_the_codec():
    assert cgraph.CODEC_MIN_NUMEL == MIN_CODED_NUMEL and cgraph.CODEC_MAX_NUMEL == MAX_NUMEL
    assert codable_info(TensorInfo("w", (256, 256), "BF16", 2 * 65536)) == "bfloat16"
    assert codable_info(TensorInfo("w", (256, 256), "F16", 2 * 65536)) == "float16"
    assert codable_info(TensorInfo("w", (256, 255), "BF16", 2 * 65280)) is None      # too small
    assert codable_info(TensorInfo("w", (256, 256), "F32", 4 * 65536)) is None
    assert codable_info(TensorInfo("w", (256, 256), "Q8_0", 69632)) is None


def _tensor(kind: str, shape: tuple, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 0.02
    if kind == "rows":           # per-row scales over two decades
        x = x * torch.exp(torch.randn((shape[0],) + (1,) * (len(shape) - 1), generator=g) * 1.5)
    elif kind == "sparse":
        x = x * (torch.rand(shape, generator=g) < 0.3)
    elif kind == "wide":
        x = (torch.rand(shape, generator=g) - 0.5) * 4
    return x.to(dtype)


@pytest.mark.parametrize("kind,shape,dtype", [
    ("normal", (256, 256), torch.bfloat16), ("rows", (300, 700), torch.bfloat16),
    ("sparse", (1000, 333), torch.bfloat16), ("wide", (2048, 520), torch.bfloat16),
    ("normal", (512, 256), torch.float16), ("rows", (64, 32, 3, 3), torch.float16), ("normal", (70001,), torch.bfloat16)])
def test_estimate_nbytes_bounds_encode_within_one_percent(kind, shape, dtype):
    t = _tensor(kind, shape, dtype, seed=len(kind) + sum(shape))
    actual = encode(t).nbytes
    est = estimate_nbytes(exponent_counts(t, sample=False), t.numel(), str(dtype).removeprefix("torch."))
    assert actual <= est <= actual * 1.01
    # a sample's histogram is scaled to numel; the sampled estimate (+ margin) lands close too
    sampled = codec_estimate(t)
    assert abs(sampled / actual - 1) <= SAMPLE_MARGIN + 0.01


def test_estimate_nbytes_errors():
    with pytest.raises(DisTorchError, match="float32"):
        estimate_nbytes([10], 10, "float32")
    with pytest.raises(DisTorchError, match="all zero"):
        estimate_nbytes([0] * 256, 100, "bfloat16")
    with pytest.raises(DisTorchError, match="numel"):
        estimate_nbytes([1], -1, "bfloat16")
    assert estimate_nbytes([], 0, "bfloat16") > 0        # an empty tensor still has its table


class Blk(nn.Module):
    def __init__(self, d: int, dtype: torch.dtype):
        super().__init__()
        self.norm = nn.LayerNorm(d, dtype=dtype)
        self.a = nn.Linear(d, 4 * d, dtype=dtype)
        self.b = nn.Linear(4 * d, d, dtype=dtype)

    def forward(self, x):
        return x + self.b(torch.nn.functional.gelu(self.a(self.norm(x))))


class Net(nn.Module):
    def __init__(self, d: int = 128, n: int = 3, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.emb = nn.Linear(d, d, dtype=dtype)           # 16K values: too small to code
        self.blocks = nn.ModuleList([Blk(d, dtype) for _ in range(n)])

    def forward(self, x):
        x = self.emb(x)
        for b in self.blocks:
            x = b(x)
        return x


def test_trace_records_codec_facts_of_a_bf16_model():
    torch.manual_seed(0)
    m = Net()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0, 0.02)
    g = trace(m)                   # the facts need no call
    assert g["emb"].codec == {}
    for i in range(3):
        f = g[f"blocks.{i}"].codec
        blk = m.blocks[i]
        assert f["tensors"] == 2 and f["dense_bytes"] == 2 * 2 * 128 * 512 and f["largest_dense"] == 2 * 128 * 512
        actual = encode(blk.a.weight).nbytes + encode(blk.b.weight).nbytes
        assert actual <= f["est_bytes"] <= actual * 1.03
    # fp32: nothing codable
    assert all(not u.codec for u in trace(Net(dtype=torch.float32)).units)


def test_trace_on_meta_uses_the_default_ratio_and_ties_are_not_counted():
    with torch.device("meta"):
        m = Net()
    g = trace(m)
    f = g["blocks.0"].codec
    assert f["est_bytes"] == math.ceil(f["dense_bytes"] * CODEC_RATIO["bfloat16"])
    h = Net(dtype=torch.float16)
    h.blocks[1].a.weight = h.blocks[0].a.weight           # tied: stays resident, never streams
    gh = trace(h)
    assert gh["blocks.0"].codec["tensors"] == 1 and gh["blocks.1"].codec["tensors"] == 1
    assert gh["blocks.2"].codec["tensors"] == 2


def test_sub_unit_graph_and_json_round_trip_carry_the_facts():
    m = Net()
    gb, gl = trace(m), trace(m, granularity="leaf")
    assert gl["blocks.0.a"].codec["tensors"] == 1
    sub = sub_unit_graph(gb, gl)
    assert sub is not None
    for i in range(3):
        kids = [u for u in sub.units if u.parent == f"blocks.{i}"]
        assert sum(u.codec.get("dense_bytes", 0) for u in kids) == gb[f"blocks.{i}"].codec["dense_bytes"]
    back = ModuleGraph.from_dict(json.loads(json.dumps(sub.to_dict())))
    assert [u.codec for u in back.units] == [u.codec for u in sub.units]
    old = sub.to_dict()
    for u in old["units"]:
        u.pop("codec")                                    # a graph saved before Unit.codec existed
    assert all(u.codec == {} for u in ModuleGraph.from_dict(old).units)


def test_file_graphs_use_the_default_ratios():
    g = graph_from_file("flux-dev")
    f = g["double_blocks.0"].codec
    assert f["tensors"] > 0 and f["est_bytes"] == pytest.approx(f["dense_bytes"] * CODEC_RATIO["bfloat16"], rel=1e-6)
    infos = [TensorInfo("blocks.0.w", (512, 512), "F16", 2 * 512 * 512),
             TensorInfo("blocks.0.q", (512, 512), "Q8_0", 512 * 544), TensorInfo("blocks.0.b", (512,), "F16", 1024)]
    u = graph_from_tensors(infos)["blocks.0"]
    assert u.codec == {"tensors": 1, "dense_bytes": 2 * 512 * 512, "largest_dense": 2 * 512 * 512,
                       "est_bytes": math.ceil(2 * 512 * 512 * CODEC_RATIO["float16"])}


def test_decode_seconds():
    assert decode_seconds(int(4.7e11), 2, GPU) == pytest.approx(1 + 2 * DECODE_LAUNCH_S)
    assert decode_seconds(int(4.7e11), 2, GPU, 1.5) == pytest.approx(1.5 * (1 + 2 * DECODE_LAUNCH_S))
    assert decode_seconds(10**8, 1, "cpu:0") == pytest.approx(10**8 / DECODE_BW_HOST)
    assert decode_seconds(0, 0, GPU) == 0.0
    assert DECODE_BW == 4.7e11


# --- the pass ----------------------------------------------------------------------------------------------

def synthetic(n: int = 12, *, flops_per_byte: float = 100.0, gguf_every: int = 0, dtype_ratio: float = 0.68):
    """A ROOT + n bf16 blocks of 40-60 MiB whose weights are nearly all codable; FLOPs set the compute."""
    units = [Unit(ROOT, "M", param_bytes=4 * MiB, kind="root", flops=1e9)]
    for i in range(n):
        b = (40 + (i * 7) % 21) * MiB
        dense = b - 64 * 1024
        u = Unit(f"blocks.{i}", "Block", param_bytes=b, flops=b * flops_per_byte, tensors=[f"blocks.{i}.{k}" for k in "abcd"])
        if gguf_every and i % gguf_every == 0:
            u.gguf = {"tensors": 4, "stored_bytes": b, "dense_bytes": 2 * b, "largest_dense": b, "patched": False,
                      "qtypes": {"Q8_0": 4}, "bytes_by_type": {"Q8_0": [b, 2 * b]}}
        else:
            u.codec = {"tensors": 4, "dense_bytes": dense, "largest_dense": dense // 2,
                       "est_bytes": int(dense * dtype_ratio)}
        units.append(u)
    return ModuleGraph(units)


def _inv(compute: str = GPU, link: str = "25GB/s", rate: str = "") -> object:
    r = f";rate@{compute}={rate}" if rate else ""
    return declare(f"{compute}=80GiB,cpu=256GiB;cpu>{compute}={link}{r}")


def _full(graph, inv, compute=GPU):
    return partition(graph, inv, compute, offload_gb=graph.total_bytes / 2**30, donors=["cpu"])


def test_link_bound_plan_compresses_and_gets_faster():
    g = synthetic(flops_per_byte=100.0)
    inv = _inv()
    plan = _full(g, inv)
    out = choose_codec(plan, g, inv)
    pc = out.predicted["codec"]
    assert pc["units"] and set(out.codec) == set(pc["units"])
    assert out.predicted["step_s"] <= pc["step_s_raw"] * (1 - MIN_GAIN)
    assert pc["step_s_raw"] == pytest.approx(plan.predicted["step_s"])
    # the streamed sizes, the window (same slot count, slots of the largest unit as streamed) and the footprint
    sizes = streamed_sizes(out)
    for n in pc["units"]:
        u = g[n]
        assert out.codec[n] == sizes[n] == u.bytes - u.codec["dense_bytes"] + u.codec["est_bytes"]
    k = plan.predicted["slots"]
    assert out.predicted["slots"] == k and out.window_bytes == k * max(sizes.values())
    assert out.window_bytes < plan.window_bytes
    grow = out.predicted["window_footprint_bytes"] - plan.predicted["window_footprint_bytes"] + pc["scratch_bytes"]
    assert out.predicted["compute_peak_bytes"] == plan.predicted["compute_peak_bytes"] + grow
    assert pc["scratch_bytes"] == max(align(g[n].codec["dense_bytes"] + 4 * ALIGN) for n in pc["units"])
    assert pc["stored_bytes"] < pc["raw_bytes"]
    # the prediction is the simulation of what it says
    re = simulate([_with_decode(u, out) for u in g.units], {u.name: u.device for u in out.units}, GPU, inv,
                  out.window_bytes, streamed=out.codec)
    assert re["step_s"] == pytest.approx(out.predicted["step_s"])
    assert "packed" in codec_table(out, codec_info(out, g, inv))


def test_a_fully_offloaded_plan_keeps_its_ring_fixed_when_compressed():
    """Everything offloaded: the ring may not grow (passes/partition.py), and compressed it keeps its new,
    smaller window as the limit, so autotune never holds more than the predicted footprint."""
    g = synthetic(flops_per_byte=100.0)
    inv = _inv()
    plan = _full(g, inv)
    assert plan.predicted["window_max_bytes"] == plan.predicted["window_footprint_bytes"]
    out = choose_codec(plan, g, inv)
    assert out.predicted["codec"]["units"]
    assert out.predicted["window_max_bytes"] == out.predicted["window_footprint_bytes"] < \
        plan.predicted["window_footprint_bytes"]


def _with_decode(u, plan):
    from dataclasses import replace
    from distorch.compiler.cost import unit_compute_s
    t = unit_compute_s(u, plan.compute, _inv())
    if u.name in plan.codec:
        t += decode_seconds(u.codec["dense_bytes"], u.codec["tensors"], plan.compute)
    return replace(u, time_s=t)


def test_compute_bound_plan_stays_raw_and_never_slower():
    g = synthetic(flops_per_byte=1e6)        # compute far longer than the copies
    inv = _inv()
    plan = _full(g, inv)
    out = choose_codec(plan, g, inv)
    assert out.codec == {} and out.predicted["codec"]["units"] == []
    assert out.predicted["step_s"] == plan.predicted["step_s"] and out.window_bytes == plan.window_bytes
    for fpb in (1.0, 100.0, 1e3, 1e4, 3e4, 1e5, 1e6):     # from link-bound to compute-bound: never slower
        g = synthetic(flops_per_byte=fpb)
        plan = _full(g, inv)
        out = choose_codec(plan, g, inv)
        c = out.predicted["codec"]
        # estimated unit times: the choice's score (mean step at the estimate and at FAST_SCALE x it) is
        # never worse than all raw, and at least MIN_GAIN better when anything is compressed
        assert c["score"]["scales"] == [1.0, FAST_SCALE]
        assert c["score"]["chosen"] <= c["score"]["raw"] * (1 + 1e-12)
        if c["units"]:
            assert c["score"]["chosen"] <= c["score"]["raw"] * (1 - MIN_GAIN)
    for u in g.units:                                       # measured times: never slower, at the measurement
        u.time_s = 1.0 if u.name != "root" else 0.1
    plan = _full(g, inv)
    out = choose_codec(plan, g, inv)
    assert out.predicted["codec"]["score"]["scales"] == [1.0]
    assert out.predicted["step_s"] <= out.predicted["codec"]["step_s_raw"] * (1 + 1e-12)


def test_budget_counts_the_scratch_and_shrinks_the_set():
    g = synthetic(flops_per_byte=100.0)
    inv = _inv()
    plan = _full(g, inv)
    free = choose_codec(plan, g, inv, mode="on")
    assert len(free.codec) == 12
    need = free.predicted["compute_peak_bytes"]
    raw_peak = plan.predicted["compute_peak_bytes"]
    assert need > raw_peak                  # 2 slots: the scratch outweighs what the slots shrink by
    for budget in (raw_peak, (raw_peak + need) // 2, need - 1):
        out = choose_codec(plan, g, inv, mode="on", budget_bytes=budget)
        pc = out.predicted["codec"]
        assert out.predicted["compute_peak_bytes"] <= max(budget, raw_peak)
        assert pc["dropped"] and pc["note"] and len(pc["units"]) + len(pc["dropped"]) == 12
        assert pc["scratch_bytes"] == (max(align(g[n].codec["dense_bytes"] + 4 * ALIGN) for n in pc["units"])
                                       if pc["units"] else 0)
        dense = {n: g[n].codec["dense_bytes"] for n in pc["dropped"]}
        assert min(dense.values()) >= max((g[n].codec["dense_bytes"] for n in pc["units"]), default=0)
    # the plan's own budget (predicted["budget_bytes"]) is the default limit
    capped = partition(g, inv, GPU, max_vram_gb=plan.predicted["compute_peak_bytes"] / 2**30, donors=["cpu"])
    out = choose_codec(capped, g, inv, mode="on")
    assert out.predicted["compute_peak_bytes"] <= capped.predicted["budget_bytes"]
    with pytest.raises(CodecChoiceError, match="budget_bytes"):
        choose_codec(plan, g, inv, budget_bytes=-1)


def test_modes_and_errors():
    g = synthetic(flops_per_byte=1e4)
    inv = _inv()
    plan = _full(g, inv)
    on = choose_codec(plan, g, inv, mode="on")
    assert set(on.codec) == {u.name for u in g.units if u.codec}
    off = choose_codec(plan, g, inv, mode="off")
    assert off.codec == {} and off.window_bytes == plan.window_bytes
    assert {k: v for k, v in off.predicted.items() if k != "codec"} == plan.predicted
    assert off.predicted["codec"]["mode"] == "off"
    # "off" on a plan that compresses: back to raw, the raw footprint and window
    back = choose_codec(on, g, inv, mode="off")
    assert back.codec == {} and back.window_bytes == plan.predicted["slots"] * max(u.bytes for u in g.units[1:])
    assert back.predicted["compute_peak_bytes"] == plan.predicted["compute_peak_bytes"]
    assert back.predicted["step_s"] == pytest.approx(plan.predicted["step_s"])
    with pytest.raises(CodecChoiceError, match=r"'fast'.*auto, on, off"):
        choose_codec(plan, g, inv, mode="fast")
    with pytest.raises(CodecChoiceError, match="not in the graph"):
        choose_codec(plan, synthetic(n=3), inv)


def test_gguf_units_are_never_candidates_and_resident_units_neither():
    g = synthetic(flops_per_byte=100.0, gguf_every=3)
    inv = _inv()
    plan = partition(g, inv, GPU, offload_gb=0.6 * g.total_bytes / 2**30, donors=["cpu"])
    info = codec_info(plan, g, inv)
    off = {u.name for u in plan.offloaded()}
    assert info and set(info) <= off and not any(g[n].gguf for n in info)
    out = choose_codec(plan, g, inv, mode="on", budget_bytes=1 << 40)
    assert set(out.codec) == set(info)
    tight = choose_codec(plan, g, inv, mode="on")          # offload_gb's budget: model - offload, binding here
    pc = tight.predicted["codec"]
    assert set(pc["units"]) | set(pc["dropped"]) == set(info)
    assert tight.predicted["compute_peak_bytes"] <= plan.predicted["budget_bytes"]


def test_plan_with_codec_round_trips_json():
    g = synthetic(flops_per_byte=100.0)
    inv = _inv()
    out = choose_codec(_full(g, inv), g, inv)
    assert out.codec
    back = Plan.from_json(out.to_json())
    assert back.codec == out.codec and back.window_bytes == out.window_bytes
    assert back.predicted["codec"] == json.loads(json.dumps(out.predicted["codec"]))


def test_host_compute_never_compresses_in_auto():
    g = synthetic(flops_per_byte=1.0)
    inv = declare("cpu:0=64GiB,cpu=256GiB;cpu>cpu:0=1GB/s")
    plan = _full(g, inv, compute="cpu:0")
    assert plan.offloaded()
    out = choose_codec(plan, g, inv)
    assert out.codec == {} and out.predicted["step_s"] == plan.predicted["step_s"]
    on = choose_codec(plan, g, inv, mode="on")
    assert on.codec and on.predicted["codec"]["scratch_bytes"] == 0       # decoded into host memory
    assert on.predicted["step_s"] > plan.predicted["step_s"]


def test_measured_times_are_without_decoding():
    g = synthetic(flops_per_byte=100.0)
    for u in g.units:
        u.time_s = 1e-4
    inv = _inv()
    plan = _full(g, inv)
    out = choose_codec(plan, g, inv, mode="on")
    extra = sum(decode_seconds(g[n].codec["dense_bytes"], 4, GPU) for n in out.codec)
    assert out.predicted["compute_s"] == pytest.approx(plan.predicted["compute_s"] + extra)


def test_many_units_one_simulation_each():
    import time
    g = synthetic(n=500, flops_per_byte=300.0)
    inv = _inv()
    big = max(u.bytes for u in g.units)
    plan = partition(g, inv, GPU, offload_gb=g.total_bytes / 2**30, donors=["cpu"], window_bytes=4 * big)
    t0 = time.perf_counter()
    out = choose_codec(plan, g, inv)
    assert time.perf_counter() - t0 < 20          # ~0.5 s on 2 cores; O(n^2) simulations would take minutes
    assert out.predicted["codec"]["candidates"] == 500 and out.predicted["slots"] == 4
    assert out.predicted["step_s"] <= plan.predicted["step_s"]


def test_room_is_made_for_the_scratch_on_a_tight_budget():
    """A budget filled to its last unit leaves no room for the decode scratch: choose_codec drops units;
    choose_codec_with_room also places the graph with the scratch's room made and keeps that plan when it
    is faster, within the ORIGINAL budget, with the original budget and source."""
    from distorch.passes.codec_choice import choose_codec_with_room
    g = synthetic(flops_per_byte=100.0)          # link-bound: compression pays
    inv = _inv()
    cap = 310 * MiB                              # filled to its last unit: no room for the scratch
    tight = partition(g, inv, GPU, max_vram_gb=cap / 2**30, donors=["cpu"])
    plain = choose_codec(tight, g, inv, mode="auto")
    calls = []

    def room(c: int):
        calls.append(c)
        return partition(g, inv, GPU, max_vram_gb=c / 2**30, donors=["cpu"])
    out = choose_codec_with_room(tight, g, inv, mode="auto", repartition=room)
    pc = out.predicted["codec"]
    assert plain.predicted["codec"]["dropped"] and not plain.codec      # no room: nothing compressed
    assert calls and calls[0] < cap
    assert pc["units"] and pc["room_bytes"] > 0
    assert out.predicted["compute_peak_bytes"] <= tight.predicted["budget_bytes"]
    assert out.predicted["budget_bytes"] == tight.predicted["budget_bytes"] and out.source["mode"] == tight.source["mode"]
    assert out.predicted["step_s"] <= plain.predicted["step_s"] * (1 - MIN_GAIN)
    assert pc["step_s_without_room"] == pytest.approx(plain.predicted["step_s"])
    verify(out, schedule(out, g))               # a consistent plan: the schedule and its invariants hold
    # nothing to gain, nothing to try: off, no repartition, or a repartition that cannot place
    assert choose_codec_with_room(tight, g, inv, mode="off", repartition=room).codec == {}
    assert choose_codec_with_room(tight, g, inv, repartition=None).codec == plain.codec

    def fails(c: int):
        raise PartitionError("no room")
    assert choose_codec_with_room(tight, g, inv, repartition=fails).codec == plain.codec


def test_a_measured_decode_scale_prices_decoding_and_compresses_less():
    """ModuleGraph.decode_scale (the time book's, from a step that streamed compressed) multiplies every
    unit's decode time; priced higher, decoding pays for fewer units."""
    g = synthetic(flops_per_byte=100.0)
    inv = _inv()
    plan = _full(g, inv)
    base = choose_codec(plan, g, inv)
    pb = base.predicted["codec"]
    assert pb["units"] and pb["decode_scale"] == 1.0
    assert set(pb["decode_s_by_unit"]) == set(pb["units"])
    assert sum(pb["decode_s_by_unit"].values()) == pytest.approx(pb["decode_s_per_step"])
    g.decode_scale = 40.0
    dear = choose_codec(plan, g, inv)
    pd = dear.predicted["codec"]
    assert pd["decode_scale"] == 40.0 and len(pd["units"]) < len(pb["units"])
    for n in pd["units"]:
        u = g[n]
        assert pd["decode_s_by_unit"][n] == pytest.approx(40.0 * decode_seconds(u.codec["dense_bytes"], 4, GPU))
