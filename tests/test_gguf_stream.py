"""GGUF weights through the streaming runtime (CPU: the same homes / slots / ring code as on CUDA).

Reference everywhere: the same GGUF model run resident-quantized on the same device; dequantization
is deterministic, so streamed outputs must be equal bit for bit.  Here: quantized bytes streamed as they are
(also from a GGUF file, through a plain Linear's dispatch, and other packs' byte weights), home views, and the
synthetic quantized weights the tests use.  One dequantization per unit: tests/test_gguf_stream_dequant.py;
plans' quantization choices: tests/test_gguf_stream_plans.py; the toy model: tests/gguf_toys.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from distorch.compiler.graph import ROOT, stored_nbytes  # noqa: E402
from distorch.compiler.plan import Plan, PlacedUnit  # noqa: E402
from distorch.formats import testing as ft  # noqa: E402
from distorch.formats.dequant import SUPPORTED_TYPES, dequantize  # noqa: E402
from distorch.formats.gguf_loader import load_gguf  # noqa: E402
from distorch.formats.gguf_tensor import GGUFLinear, GGUFTensor, gguf_ops  # noqa: E402
from distorch.runtime.apply import apply  # noqa: E402

from gguf_toys import BF, C, Toy, bits, hand_plan, make, x_in  # noqa: E402


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K"])
def test_streamed_quantized_bit_identical_and_bytes_stay_quantized(qtype):
    m = make(qtype)
    x = x_in()
    with torch.no_grad():
        ref = m(x)
    names = [f"blocks.{i}" for i in range(4)]
    gguf_params = [p for n in names for p in m.get_submodule(n).parameters() if isinstance(p, GGUFTensor)]
    stored = {n: sum(stored_nbytes(p) for p in m.get_submodule(n).parameters()) for n in names}
    rt = apply(m, hand_plan(m, set(names)), progress=False)
    try:
        # homes hold stored bytes (quantized), not numel x 2
        for n in names:
            assert rt.homes[n].nbytes < stored[n] + 256 * 16
            dense = sum(p.numel() * 2 for p in m.get_submodule(n).parameters())
            assert rt.homes[n].nbytes < 0.6 * dense
        # every GGUF parameter object survives, its bytes are a view into a home now
        homes = [h.flat for h in rt.homes.values()]
        for p in gguf_params:
            assert isinstance(p, GGUFTensor)
            assert any(h.data_ptr() <= p.raw.data_ptr() < h.data_ptr() + h.numel() for h in homes)
        with torch.no_grad():
            for _ in range(3):
                out = m(x)
                assert torch.equal(bits(out), bits(ref))
        # after a step each GGUF parameter's bytes sit in a slot of the pool
        flats = rt.pool.flats
        for p in gguf_params:
            assert any(f.data_ptr() <= p.raw.data_ptr() < f.data_ptr() + f.numel() for f in flats)
        st = rt.bytes_moved["cpu"]
        assert st >= 3 * sum(rt.homes[n].nbytes for n in names)
        assert rt.deviations == 0
    finally:
        rt.undo()
    # back resident quantized: same parameters, GGUF, bytes outside the freed homes, same output
    for p in gguf_params:
        assert isinstance(p, GGUFTensor) and p.raw.device.type == "cpu"
    with torch.no_grad():
        assert torch.equal(bits(m(x)), bits(ref))


def _write_gguf(path, sd):
    w = gguf.GGUFWriter(str(path), "flux")
    for k, t in sd.items():
        if isinstance(t, GGUFTensor):
            _, ts = gguf.GGML_QUANT_SIZES[t.qtype]
            bs, _ = gguf.GGML_QUANT_SIZES[t.qtype]
            rows = t.raw.numpy().reshape(-1, t.shape[-1] // bs * ts)
            w.add_tensor(k, rows, raw_dtype=t.qtype)
        else:
            w.add_tensor(k, t.float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_file_loaded_model_streams_bit_identical(tmp_path):
    src = make("Q8_0", depth=3)
    sd = {k: v for k, v in src.state_dict().items()}
    path = tmp_path / "toy-Q8_0.gguf"
    _write_gguf(path, sd)
    loaded, meta = load_gguf(path, dtype=BF)
    assert meta["qtypes"].get("Q8_0") == 1 + 4 * 3 - 1 + 1   # every block linear + head
    with torch.device("meta"):
        m = Toy(256, 3)
    m.load_state_dict(loaded, assign=True)
    m = m.to(BF)
    gguf_ops(m)
    assert isinstance(m.blocks[0].qkv, GGUFLinear)
    x = x_in()
    with torch.no_grad():
        ref = m(x)
    plan = hand_plan(m, {"blocks.0", "blocks.1", "blocks.2"})
    rt = apply(m, plan, progress=False)
    try:
        with torch.no_grad():
            assert torch.equal(bits(m(x)), bits(ref))
        # the file mapping is no longer referenced by streamed parameters
        assert all(h.nbytes < 0.6 * sum(p.numel() * 2 for p in m.get_submodule(n).parameters())
                   for n, h in rt.homes.items())
    finally:
        rt.undo()


def test_plain_linear_with_gguf_weight_streams_through_dispatch():
    """No GGUF ops installed: GGUFTensor's dispatch fallback dequantizes from the slot."""
    m = make("Q8_0", depth=2)
    for mod in m.modules():
        if isinstance(mod, GGUFLinear):
            mod.__class__ = nn.Linear
    x = x_in()
    with torch.no_grad():
        ref = m(x)
    rt = apply(m, hand_plan(m, {"blocks.0", "blocks.1"}), progress=False)
    try:
        with torch.no_grad():
            assert torch.equal(bits(m(x)), bits(ref))
    finally:
        rt.undo()


@pytest.mark.parametrize("qt", sorted(SUPPORTED_TYPES - {QT.F32, QT.F16, QT.BF16}, key=int))
def test_random_blocks_valid(qt):
    t = ft.random_blocks(qt, (4, 512), generator=torch.Generator().manual_seed(int(qt)))
    v = dequantize(t.raw, qt, (4, 512), torch.float32)
    assert torch.isfinite(v).all()
    assert 0 < v.abs().max() < 0.2, (qt.name, float(v.abs().max()))
    assert v.std() > 1e-3


def test_quantize_q8_0_matches_gguf_reference():
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    t = ft.quantize_q8_0(w, dtype=torch.float32)
    ref = gguf.quants.quantize(w.numpy(), QT.Q8_0)
    assert np.array_equal(t.raw.numpy(), ref.reshape(-1))


def test_home_views_of_gguf_parameters_are_gguf_tensors_over_home_bytes():
    m = make("Q8_0", depth=2)
    rt = apply(m, hand_plan(m, {"blocks.0", "blocks.1"}), progress=False)
    try:
        hv = rt.home_views()
        w = m.blocks[0].qkv.weight
        h = hv[id(w)]
        assert isinstance(h, GGUFTensor) and h.qtype == w.qtype and h.shape == w.shape
        flat = rt.homes["blocks.0"].flat
        assert flat.data_ptr() <= h.raw.data_ptr() < flat.data_ptr() + flat.numel()
        assert torch.equal(h.dequantize(), w.dequantize())
        b = m.blocks[0].qkv.bias
        assert type(hv[id(b)]) in (torch.Tensor, nn.Parameter) and hv[id(b)].dtype == BF
    finally:
        rt.undo()


class _ByteWeight(torch.Tensor):
    """Stand-in for the quantized weights other GGUF packs put in ComfyUI models (ComfyUI-GGUF's design, as
    a fact: a plain torch.Tensor subclass whose storage is the raw blocks, uint8 [rows, bytes per row], with
    the GGUF type and logical shape as Python attributes and `.shape` answering the logical shape)."""

    def __new__(cls, data, *, qtype, logical_shape):
        t = torch.Tensor._make_subclass(cls, data, False)
        t.qtype_ = qtype
        t.logical_shape = torch.Size(logical_shape)
        return t

    @property
    def shape(self):
        return getattr(self, "logical_shape", self.size())

    def detach(self, *a, **k):          # keeps the attributes through nn.Parameter (the pack does the same)
        return self

    def clone(self, *a, **k):
        return self


class _ByteLinear(nn.Module):
    """Dequantizes its byte weight per call, the way such packs' layers do (from the attributes)."""

    def __init__(self, w):
        super().__init__()
        self.weight = nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        w = self.weight
        dense = dequantize(w.data.reshape(-1), w.qtype_, tuple(w.logical_shape), torch.float32)
        return x @ dense.t()


def test_other_packs_byte_weights_stream_bit_identical():
    """Weights whose `.shape` is not their storage's size (ComfyUI-GGUF-style byte tensors) stream as their
    raw bytes: homes and slots are laid out by `size()`, the Python attributes survive the rebinding."""
    torch.manual_seed(0)
    layers = []
    for i in range(4):
        q = ft.quantize_q8_0(torch.randn(64, 96) * 0.1)
        raw = q.raw.reshape(64, -1)                         # [rows, bytes per row]
        layers.append(_ByteLinear(_ByteWeight(raw.clone(), qtype=QT.Q8_0, logical_shape=(64, 96))))

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(16, 96)
            self.blocks = nn.ModuleList(nn.Sequential(l, nn.Linear(64, 96)) for l in layers)

        def forward(self, x):
            h = self.inp(x)
            for b in self.blocks:
                h = torch.tanh(b(h))
            return h
    m = M().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = m(x)
    w0 = m.blocks[0][0].weight
    assert tuple(w0.shape) == (64, 96) and tuple(w0.size()) == (64, 102)
    pu = [PlacedUnit(ROOT, "M", 0, C, 0, "root")]
    pu += [PlacedUnit(f"blocks.{i}", "Seq", stored_nbytes(m.blocks[i][0].weight) + 64 * 96 * 4, "cpu", i + 1)
           for i in range(4)]
    rt = apply(m, Plan(compute=C, units=pu, window_bytes=2 * 64 * 200 * 4), progress=False)
    try:
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(x), ref)
        w = m.blocks[2][0].weight
        assert type(w) is _ByteWeight and w.qtype_ == QT.Q8_0 and tuple(w.size()) == (64, 102)
        assert rt.deviations == 0
    finally:
        rt.undo()
    with torch.no_grad():
        assert torch.equal(m(x), ref)
