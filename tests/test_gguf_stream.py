"""GGUF weights through the streaming runtime (CPU: the same homes / slots / ring code as on CUDA).

Reference everywhere: the same GGUF model run resident-quantized on the same device; dequantization
is deterministic, so streamed outputs must be equal bit for bit.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

import distorch.runtime.api as api  # noqa: E402
from distorch.compiler.graph import ROOT, stored_nbytes  # noqa: E402
from distorch.compiler.plan import Plan, PlacedUnit  # noqa: E402
from distorch.errors import DisTorchError  # noqa: E402
from distorch.formats import testing as ft  # noqa: E402
from distorch.formats.dequant import SUPPORTED_TYPES, dequantize  # noqa: E402
from distorch.formats.gguf_loader import load_gguf  # noqa: E402
from distorch.formats.gguf_tensor import GGUFLinear, GGUFTensor, gguf_ops  # noqa: E402
from distorch.runtime import gguf_stream as gs  # noqa: E402
from distorch.runtime.apply import apply  # noqa: E402

C = "cpu:0"
BF = torch.bfloat16


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        x = x + self.proj(a)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, d=256, depth=4, cin=16):
        super().__init__()
        self.embed = nn.Linear(cin, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def make(qtype="Q8_0", d=256, depth=4, seed=0):
    torch.manual_seed(seed)
    m = Toy(d, depth).to(BF).eval()
    g = torch.Generator().manual_seed(seed + 1)
    n = ft.quantize_module(m, qtype, generator=g)
    assert n == 1 + 4 * depth    # embed (in 16) stays dense for K types; Q8_0 too (16 % 32 != 0)
    return m


def x_in(d_in=16, seed=3):
    return torch.randn(2, 8, d_in, generator=torch.Generator().manual_seed(seed)).to(BF)


def hand_plan(m, offloaded, quant=None, slots=2):
    names = [f"blocks.{i}" for i in range(len(m.blocks))]
    sizes = {n: sum(stored_nbytes(p) for p in m.get_submodule(n).parameters()) for n in names}
    root = sum(stored_nbytes(p) for p in m.parameters()) - sum(sizes.values())
    pu = [PlacedUnit(ROOT, "Toy", root, C, 0, "root")]
    pu += [PlacedUnit(n, "Block", sizes[n], "cpu" if n in offloaded else C, i + 1) for i, n in enumerate(names)]
    big = max([sizes[n] for n in offloaded] or [0])
    return Plan(compute=C, units=pu, window_bytes=slots * big, quant=dict(quant or {}))


def bits(t):
    return t.view(torch.int16) if t.dtype == BF else t


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


def _mixed_block_model(seed=0):
    """Toy whose blocks mix Q8_0, Q4_K and F16 GGUF weights with dense biases and norms."""
    m = make("Q8_0", seed=seed)
    g = torch.Generator().manual_seed(seed + 5)
    for b in m.blocks:
        b.up.weight = nn.Parameter(ft.random_blocks("Q4_K", tuple(b.up.weight.shape), generator=g, dtype=BF,
                                                    name="up"), requires_grad=False)
        b.proj.weight = nn.Parameter(ft.random_blocks("F16", tuple(b.proj.weight.shape), generator=g, dtype=BF,
                                                      name="proj"), requires_grad=False)
    return m


def test_unit_dequant_one_launch_per_type_run_bit_identical(monkeypatch):
    from distorch.formats import dequant as dq
    m = _mixed_block_model()
    x = x_in()
    names = [f"blocks.{i}" for i in range(4)]
    with torch.no_grad():
        ref = m(x)                                   # resident quantized: per-layer dequantization
    launches = []
    real = dq._run

    def counting(qt, raw, dtype, out=None):
        launches.append((qt, raw.numel(), out is not None))
        return real(qt, raw, dtype, out=out)
    monkeypatch.setattr(dq, "_run", counting)
    with torch.no_grad():
        m(x)
    per_layer = len(launches)
    # qkv, down (Q8_0), up (Q4_K) per block (F16 is a cast), and the resident Q8_0 head
    assert per_layer == 4 * 3 + 1
    rt = apply(m, hand_plan(m, set(names)), progress=False, unit_dequant=True)   # default on CUDA only
    try:
        # home layout: dense tensors first, then Q4_K, then Q8_0 back to back (one run each)
        lay = rt.homes["blocks.0"].layout.entries
        kinds = [e.dtype for e in lay]
        assert kinds[-3:] == [torch.uint8] * 3
        ud = rt.UD[0]
        assert [r[0] for r in ud.runs] == sorted([QT.Q4_K, QT.Q8_0], key=int)
        dense_bytes = sum(p.numel() * 2 for p in ud.params)
        assert dense_bytes <= rt.dq_scratch_bytes < dense_bytes + 2 * 256
        with torch.no_grad():
            for _ in range(3):
                launches.clear()
                out = m(x)
                assert torch.equal(bits(out), bits(ref))
                # one launch per run (2 per block) into the scratch, plus the resident head's own
                assert sum(o for _, _, o in launches) == 4 * 2 and len(launches) == 4 * 2 + 1
        # nothing outside a unit's call sees scratch memory
        assert all(p._dq is None for ud in rt.UD for p in ud.params)
        import gc
        import weakref
        held = [weakref.ref(f) for f in rt.pool.flats] + [weakref.ref(rt.dq_scratch)]
        del ud                                   # the test's own reference to a unit's views
    finally:
        rt.undo()
    gc.collect()
    assert all(w() is None for w in held), "slots and the dequant scratch must be freed by undo"
    rt = apply(m, hand_plan(m, set(names)), progress=False)         # CPU default: per layer
    try:
        assert rt.dq_scratch is None
        launches.clear()
        with torch.no_grad():
            assert torch.equal(bits(m(x)), bits(ref))
        assert len(launches) == per_layer and not any(o for _, _, o in launches)
    finally:
        rt.undo()
    with torch.no_grad():
        assert torch.equal(bits(m(x)), bits(ref))


def test_unit_dequant_other_dtype_falls_back_per_layer():
    """A layer computing in another dtype than the weight's own dequantizes per call (same values)."""
    m = make("Q8_0")
    m.float()            # activations and dense weights float32; GGUF weights' own dtype back to bf16
    for mod in m.modules():
        w = mod._parameters.get("weight")
        if isinstance(w, GGUFTensor):
            mod.weight = nn.Parameter(w.with_raw(w.raw, dtype=BF), requires_grad=False)
    gw = [p for p in m.parameters() if isinstance(p, GGUFTensor)]
    assert gw and all(p.dtype == BF for p in gw)
    x = x_in().float()
    with torch.no_grad():
        ref = m(x)
    names = [f"blocks.{i}" for i in range(4)]
    rt = apply(m, hand_plan(m, set(names)), progress=False, unit_dequant=True)
    try:
        assert any(ud is not None for ud in rt.UD)
        with torch.no_grad():
            out = m(x)
        assert out.dtype == torch.float32 and torch.equal(out, ref)
    finally:
        rt.undo()


def test_unit_dequant_with_fallback_loads_and_unit_called_twice():
    """Out-of-order calls (fallback loads) and a unit called twice still read their own weights."""
    m = _mixed_block_model(seed=2)
    x = x_in()
    names = [f"blocks.{i}" for i in range(4)]

    def twice(x):
        h = m.embed(x)
        for i in (0, 1, 1, 3, 2):
            h = m.blocks[i](h)
        return m.head(h)
    with torch.no_grad():
        ref = twice(x)
    rt = apply(m, hand_plan(m, set(names), slots=2), progress=False, unit_dequant=True)
    try:
        with torch.no_grad():
            for _ in range(2):
                assert torch.equal(bits(twice(x)), bits(ref))
        assert rt.fallback_loads > 0
        assert all(p._dq is None for ud in rt.UD for p in ud.params)
    finally:
        rt.undo()


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
