"""Plans' quantization choices for GGUF units (resident dequantized, resident quantized, streamed quantized):
applied and undone, inconsistent choices rejected, the JSON form; compile() of a GGUF model (units counted at
their stored size, streamed quantized) and the compute estimate of a quantized unit.  The toy model:
tests/gguf_toys.py."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("gguf")

import distorch.runtime.api as api  # noqa: E402
from distorch.compiler.graph import stored_nbytes  # noqa: E402
from distorch.compiler.plan import Plan  # noqa: E402
from distorch.errors import DisTorchError  # noqa: E402
from distorch.formats.gguf_tensor import GGUFTensor  # noqa: E402
from distorch.runtime import gguf_stream as gs  # noqa: E402
from distorch.runtime.apply import apply  # noqa: E402

from gguf_toys import BF, Toy, bits, hand_plan, make, x_in  # noqa: E402


def test_resident_dequantized_units_hold_dense_copies_and_undo_restores():
    m = make("Q8_0")
    x = x_in()
    with torch.no_grad():
        ref = m(x)
    orig = m.blocks[0].qkv.weight
    plan = hand_plan(m, {"blocks.2", "blocks.3"},
                     quant={"blocks.0": gs.RESIDENT_DQ, "blocks.1": gs.RESIDENT_Q,
                            "blocks.2": gs.STREAMED_Q})
    rt = apply(m, plan, progress=False)
    try:
        w = m.blocks[0].qkv.weight
        assert not isinstance(w, GGUFTensor) and w.dtype == BF
        assert torch.equal(bits(w), bits(orig.dequantize()))
        assert isinstance(m.blocks[1].qkv.weight, GGUFTensor)
        assert rt.dequantized.units == ["blocks.0"]
        assert rt.dequantized.dense_bytes > rt.dequantized.stored_bytes
        with torch.no_grad():
            assert torch.equal(bits(m(x)), bits(ref))
    finally:
        rt.undo()
    assert m.blocks[0].qkv.weight is orig and isinstance(orig, GGUFTensor)
    with torch.no_grad():
        assert torch.equal(bits(m(x)), bits(ref))


def test_plan_quant_inconsistent_choices_rejected():
    m = make("Q8_0", depth=2)
    for quant, word in [({"blocks.0": gs.STREAMED_Q}, "compute device"),
                        ({"blocks.1": gs.RESIDENT_DQ}, "streamed from"),
                        ({"blocks.0": "fp8"}, "expected one of"),
                        ({"nope": gs.RESIDENT_Q}, "not in the plan")]:
        with pytest.raises(DisTorchError, match=word):
            apply(m, hand_plan(m, {"blocks.1"}, quant=quant), progress=False)
        assert getattr(m, "_distorch_runtime", None) is None


def test_plan_quant_json_round_trip():
    m = make("Q8_0", depth=2)
    p = hand_plan(m, {"blocks.1"}, quant={"blocks.0": gs.RESIDENT_DQ, "blocks.1": gs.STREAMED_Q})
    q = Plan.from_json(p.to_json())
    assert q.quant == p.quant
    d = p.to_dict()
    d.pop("quant")
    assert Plan.from_dict(d).quant == {}          # plans written before the field still load


def test_compile_traces_and_streams_gguf_model():
    m = make("Q4_K")
    x = x_in()
    with torch.no_grad():
        ref = m(x)
    total = sum(stored_nbytes(p) for p in m.parameters())
    h = api.compile(m, compute="cpu", offload_gb=0.6 * total / 2**30, donors=["cpu"], example_args=(x,),
                    progress=False)
    try:
        off = [u for u in h.plan.units if u.device != h.plan.compute]
        assert off, h.placement_table()
        # units are counted at stored (quantized) size
        assert abs(h.plan.model_bytes - total) < 0.05 * total
        for u in off:
            assert h.plan.quant.get(u.name) == gs.STREAMED_Q
        with torch.no_grad():
            assert torch.equal(bits(m(x)), bits(ref))
            assert torch.equal(bits(m(x)), bits(ref))
    finally:
        h.undo()


def test_bytes_fallback_estimates_a_quantized_unit_like_its_bf16_original():
    from distorch.compiler.cost import unit_compute_s
    from distorch.compiler.inventory import declare
    from distorch.compiler.trace import trace
    dense = Toy().to(BF).eval()
    q = make("Q8_0")
    gd, gq = trace(dense), trace(q)
    inv = declare("cuda:0=80GiB@400TF,cpu=64GiB")
    for ud, uq in zip(gd.units, gq.units):
        assert ud.name == uq.name and ud.params == uq.params > 0
        if uq.name.startswith("blocks."):
            assert uq.bytes < 0.6 * ud.bytes                   # stored quantized ...
            # ... but the same compute estimate (no FLOPs known: the bytes fallback, sized as bf16)
            assert unit_compute_s(uq, "cuda:0", inv) == pytest.approx(unit_compute_s(ud, "cuda:0", inv))
