"""Moving a GGUF weight never dequantizes it, in torch.inference_mode() and out of it; the GGUF
embedding gathers only the rows it needs; unknown ops raise in strict mode.

ComfyUI runs every node under torch.inference_mode(); there `.to()` reaches __torch_dispatch__ as
aten.to.* (not decomposed into _to_copy) and module._apply / `param.data = ...` ask
aten._has_compatible_shallow_copy_type.  Every test here runs in strict mode (an op without a quantized
handler raises GGUFError instead of dequantizing), so a movement op that fell back would fail loudly.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

pytest.importorskip("gguf")

from distorch.errors import GGUFError  # noqa: E402
from distorch.formats import dequant, gguf_core, gguf_tensor as gt  # noqa: E402
from distorch.formats.gguf_tensor import GGUFEmbedding, GGUFTensor, strict_gguf  # noqa: E402
from distorch.formats.testing import QT, random_blocks  # noqa: E402

MODES = [pytest.param(False, id="grad-mode"), pytest.param(True, id="inference-mode")]


def _w(qtype=QT.Q8_0, shape=(16, 256), seed=0):
    return random_blocks(qtype, shape, generator=torch.Generator().manual_seed(seed), name="w")


def _layer(seed=0):
    m = nn.Linear(256, 16)
    m._parameters["weight"] = nn.Parameter(_w(seed=seed), requires_grad=False)
    return m


@pytest.fixture
def no_dequant(monkeypatch):
    """Counts whole-tensor dequantizations (the ones moving must never do)."""
    calls = []
    real = dequant.dequantize

    def spy(raw, qtype, shape, *a, **k):
        calls.append(tuple(shape))
        return real(raw, qtype, shape, *a, **k)
    monkeypatch.setattr(gguf_core, "_dequantize", spy)
    monkeypatch.setattr(gt, "_dequantize", spy)
    return calls


@pytest.mark.parametrize("inference", MODES)
def test_module_moves_keep_raw_blocks(inference, no_dequant):
    with torch.inference_mode(inference), strict_gguf():
        m = _layer()
        raw = m.weight.raw
        m.to("cpu")
        m.cpu()
        m.to(torch.float16)
        assert type(m.weight) is GGUFTensor and isinstance(m.weight, nn.Parameter)
        assert m.weight.dtype == torch.float16 and torch.equal(m.weight.raw, raw)
        if inference:      # aten.to itself: the same bytes (out of it, torch's _to_copy copies them)
            assert m.weight.raw.data_ptr() == raw.data_ptr()
        raw = m.weight.raw
        m.float()
        m.to("cpu", torch.bfloat16, non_blocking=True)
        m._apply(lambda t: t.to("cpu"))
        m.requires_grad_(False)
        p, raw = m.weight, m.weight.raw
        assert p.detach().raw is raw and p.data.raw is raw
        assert p.to("cpu") is p                        # nothing to do: the tensor itself, as aten.to
        assert torch.equal(p.to(torch.float32).raw, raw)
        if inference:                                   # dequantization target only: the same bytes
            assert p.to(torch.float32).raw is raw
        assert p.to("cpu", copy=True).raw.data_ptr() != raw.data_ptr()
        assert p.to(torch.empty(0, dtype=torch.float16)).dtype == torch.float16
        assert torch.equal(copy.deepcopy(m).weight.raw, raw)
        assert nn.Parameter(p, requires_grad=False).raw is raw
        sd = m.state_dict()
        m2 = nn.Linear(256, 16)
        m2.load_state_dict(sd, assign=True)
        assert m2.weight.raw is raw
        with pytest.raises(GGUFError, match="only floating"):
            p.to(torch.int8)
    assert no_dequant == []


@pytest.mark.parametrize("inference", MODES)
def test_param_data_assignment_moves_the_bytes(inference):
    with torch.inference_mode(inference), strict_gguf():
        p = _layer().weight
        q = _w(seed=1)
        p.data = q                                      # torch's own setter would keep the old `raw`
        assert p.raw is q.raw and torch.equal(p.dequantize(), q.dequantize())
        assert torch._has_compatible_shallow_copy_type(p, q)
        if inference:      # out of inference mode torch answers from the dispatch keys alone
            assert not torch._has_compatible_shallow_copy_type(p, torch.zeros(16, 256))
        with pytest.raises(GGUFError, match="assign a new Parameter"):
            p.data = torch.zeros(16, 256)


@pytest.mark.parametrize("inference", MODES)
def test_unknown_ops_raise_in_strict_mode_and_in_place_ops_always(inference, monkeypatch):
    with torch.inference_mode(inference):
        w = _w()
        with strict_gguf(), pytest.raises(GGUFError, match="strict mode"):
            w + 1
        monkeypatch.setenv("DISTORCH_GGUF_STRICT", "1")
        with pytest.raises(GGUFError, match="strict mode"):
            w.t()
        monkeypatch.delenv("DISTORCH_GGUF_STRICT")
        # not strict: a compute op still works on the dequantized values
        assert torch.equal(w + 1, w.dequantize() + 1)
        # writing into a GGUF tensor is never allowed (it would write into a temporary dense copy)
        with pytest.raises(GGUFError, match="read-only"):
            w.mul_(2)


@pytest.mark.parametrize("qtype", [QT.Q8_0, QT.Q4_0, QT.Q5_1, QT.Q4_K, QT.Q6_K, QT.IQ4_XS, QT.F16])
@pytest.mark.parametrize("inference", MODES)
def test_embedding_gathers_rows_bit_identical(qtype, inference, no_dequant):
    vocab, dim = 1000, 512
    t = random_blocks(qtype, (vocab, dim), generator=torch.Generator().manual_seed(3), dtype=torch.float32)
    ids = torch.tensor([[0, 5, 5, 999, 17], [3, 3, 3, 998, 0]])
    e = nn.Embedding(vocab, dim)
    e._parameters["weight"] = nn.Parameter(t, requires_grad=False)
    e.__class__ = GGUFEmbedding
    dtypes = (None, torch.float16, torch.bfloat16)
    refs = [t.dequantize(d)[ids] for d in dtypes]
    no_dequant.clear()
    with torch.inference_mode(inference), strict_gguf():
        for out_dtype, ref in zip(dtypes, refs):
            out = e(ids) if out_dtype is None else e.forward_gguf(ids, out_dtype=out_dtype)
            assert out.dtype == ref.dtype and torch.equal(out, ref), (qtype, out_dtype)
    # only the 10 asked rows were dequantized, never the whole [vocab, dim] table
    assert no_dequant and all(s == (ids.numel(), dim) for s in no_dequant)
    with pytest.raises(IndexError):
        e(torch.tensor([vocab]))


def test_embedding_keeps_whole_table_path_where_needed():
    t = random_blocks(QT.Q8_0, (64, 64), generator=torch.Generator().manual_seed(4), dtype=torch.float32)
    e = nn.Embedding(64, 64)
    e._parameters["weight"] = nn.Parameter(t, requires_grad=False)
    e.__class__ = GGUFEmbedding
    e.weight_function = [lambda w: w * 2]              # a per-call patch needs the whole weight
    ids = torch.tensor([1, 2, 63])
    assert torch.equal(e(ids), t.dequantize()[ids] * 2)
    e.weight_function = []
    e.dequant_dtype = torch.float16                     # dequantize into fp16 first, then cast
    assert torch.equal(e.forward_gguf(ids, out_dtype=torch.float32),
                       t.dequantize(torch.float16)[ids].float())
