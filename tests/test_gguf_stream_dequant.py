"""GGUF units dequantized at once (unit_dequant): one dequantization launch per quantization type run of a
unit into a shared scratch, bit identical to per-layer dequantization; the fallbacks (a layer computing in
another dtype, out-of-order calls, a unit called twice); undo frees the scratch.  The toy model:
tests/gguf_toys.py."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from distorch.formats import testing as ft  # noqa: E402
from distorch.formats.gguf_tensor import GGUFTensor  # noqa: E402
from distorch.runtime.apply import apply  # noqa: E402

from gguf_toys import BF, bits, hand_plan, make, x_in  # noqa: E402


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
