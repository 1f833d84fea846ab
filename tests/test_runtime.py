"""Runtime tests on CPU: the same homes / slots / ring / fallback code that runs on CUDA, synchronously.

Plans are built by hand (compute "cpu:0", offloaded homes "cpu").  Here: placements (block and leaf units,
the ring across steps), tricky modules (units called twice, branches, tied weights, buffers, grad modes) and
a diffusers Flux model, all bit identical.  Memory, undo, errors and stats: tests/test_runtime_lifecycle.py;
compile() and loading: tests/test_runtime_compile.py; the CUDA tests: tests/test_runtime_cuda.py; ring items,
autotune and calls outside the forward: tests/test_runtime_ring.py; the toy models: tests/runtime_toys.py.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from distorch.compiler.graph import ROOT
from distorch.compiler.plan import Plan, PlacedUnit
from distorch.runtime import stats as rstats
from distorch.runtime.apply import apply

import runtime_fixtures
from runtime_toys import C, Twice, make_plan, nbytes, run

toy = runtime_fixtures.toy              # the shared fixture (tests/runtime_fixtures.py): pytest finds it here


# ----------------------------------------------------------------------------------- placements
@pytest.mark.parametrize("offload", ["none", "partial", "all"])
@pytest.mark.parametrize("slots", [1, 2, 4])
def test_block_units_bit_identical(toy, offload, slots):
    m, args, ref = toy
    names = [f"blocks.{i}" for i in range(6)]
    off = {"none": set(), "partial": {"blocks.1", "blocks.2", "blocks.4"}, "all": set(names)}[offload]
    rt = apply(m, make_plan(m, off), window_units=slots, progress=False)
    try:
        for out in run(m, args, 4):
            assert torch.equal(out, ref)
        s = rstats.summarize(rt)
        assert s["streamed_units"] == len(off)
        assert s["deviations"] == 0 and s["fallback_loads"] == 0
        want = sum(nbytes(m.get_submodule(n)) for n in off)
        moved = s["bytes_per_step"].get("cpu", 0)   # one flat copy per unit (256-byte aligned tensors)
        assert moved == sum(rt.homes[n].nbytes for n in off)
        assert want <= moved <= want + 256 * sum(len(list(m.get_submodule(n).parameters())) for n in off)
        if off:
            # the offloaded weights now live in their home (host arena), not where they were
            ptr = m.get_submodule(sorted(off)[0]).attn.weight.data_ptr()
            a = rt.arenas["cpu"].flat
            in_home = a.data_ptr() <= ptr < a.data_ptr() + a.numel()
            in_slot = any(f.data_ptr() <= ptr < f.data_ptr() + f.numel() for f in rt.pool.flats)
            assert in_home or in_slot
    finally:
        rt.undo()
    assert torch.equal(m(*args), ref)


def test_leaf_units_bit_identical(toy):
    m, args, ref = toy
    leaves = [n for n, mod in m.named_modules() if n.startswith("blocks.") and isinstance(mod, nn.Linear)]
    off = set(leaves[::2])
    rt = apply(m, make_plan(m, off, units=leaves), window_units=3, progress=False)
    try:
        for out in run(m, args):
            assert torch.equal(out, ref)
        assert rstats.summarize(rt)["streamed_units"] == len(off)
        # LayerNorm params inside blocks belong to no leaf unit here: they stay resident
        assert m.blocks[0].norm.weight.data_ptr() not in {h.flat.data_ptr() for h in rt.homes.values()}
    finally:
        rt.undo()


def test_ring_wraps_across_steps(toy):
    m, args, ref = toy
    off = {f"blocks.{i}" for i in range(6)}
    rt = apply(m, make_plan(m, off), window_units=2, profile=True, progress=False)
    run(m, args, 3)
    tl = rstats.timeline(rt, steps=None)
    # the copies of the next step's first units are issued during this step, after the last-but-one unit
    copies = [(e["step"], e["unit"]) for e in tl if e["lane"].startswith("copy")]
    assert (0, "blocks.0") in copies and (0, "blocks.1") in copies   # issued in step 0 for step 1
    per_step = {}
    for st, u in copies:
        per_step.setdefault(st, []).append(u)
    assert per_step[1] == [f"blocks.{i}" for i in range(2, 6)] + ["blocks.0", "blocks.1"]
    assert rt.ring.copies == 2 + 6 * 3          # primed 2, then one copy per unit call
    rt.undo()


# -------------------------------------------------------------------------------- tricky modules
def test_called_twice_and_branches():
    torch.manual_seed(0)
    m = Twice().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref_a, ref_b = m(x), m(x, branch=True)
    rt = apply(m, Twice.plan(C), window_units=2, progress=False)
    try:
        with torch.no_grad():
            for branch in [False, False, False, True, False, True, True, False]:
                out = m(x, branch=branch)
                assert torch.equal(out, ref_b if branch else ref_a)
        s = rstats.summarize(rt)
        assert s["deviations"] >= 1 and s["fallback_loads"] >= 1   # order changes were detected
        # the order of the last call was learned: steady steps run streamed, without deviations
        d0, f0 = rt.deviations, rt.fallback_loads
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(x), ref_a)
        assert (rt.deviations, rt.fallback_loads) == (d0, f0)
        assert [rt.units[i] for i in rt.learn.seq] == ["blocks.0", "blocks.1", "blocks.1", "blocks.2", "blocks.3"]
        # a unit called directly (outside the model's forward) still gets its weights
        with torch.no_grad():
            assert torch.equal(m.blocks[2](x), nn.functional.linear(x, rt.homes["blocks.2"].views()[0],
                                                                     rt.homes["blocks.2"].views()[1]))
            assert torch.equal(m(x), ref_a)
    finally:
        rt.undo()


class Shared(nn.Module):
    """Weights tied between blocks (requires_grad False), a parent using a block's weight directly."""

    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, d), nn.Tanh()) for _ in range(4))
        self.blocks[3][0].weight = self.blocks[0][0].weight          # tied across units
        self.blocks[0][0].weight.requires_grad_(False)
        self.head = nn.Linear(d, d)
        self.head.bias = self.blocks[2][0].bias                       # tied with the parent

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        # the parent reads a (tied, hence resident) block weight; a streamed one read outside its unit's
        # call would see whatever its slot holds by then (the documented limit of runtime/apply.py)
        return self.head(x) + self.blocks[3][0].weight.sum()


def test_shared_and_parent_params():
    torch.manual_seed(0)
    m = Shared().eval()
    x = torch.randn(2, 16)
    with torch.no_grad():
        ref = m(x)
    names = [f"blocks.{i}" for i in range(4)]
    pu = [PlacedUnit(ROOT, "root", 0, C, 0, "root")] + [PlacedUnit(n, "Sequential", 0, "cpu", i + 1)
                                                       for i, n in enumerate(names)]
    rt = apply(m, Plan(compute=C, units=pu), window_units=2, progress=False)
    try:
        # tied weight and the parent-tied bias are resident (shared), the rest streams
        assert "blocks.0.0.weight" in rt.shared_resident and "blocks.2.0.bias" in rt.shared_resident
        assert m.blocks[0][0].weight is m.blocks[3][0].weight
        for out in run(m, (x,), 3):
            assert torch.equal(out, ref)
    finally:
        rt.undo()
    assert m.blocks[0][0].weight is m.blocks[3][0].weight and not m.blocks[0][0].weight.requires_grad


class WithBuffers(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.ModuleList(nn.BatchNorm1d(d) for _ in range(3))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_buffers_stay_resident_and_mutable():
    torch.manual_seed(0)
    m, m_ref = WithBuffers(), WithBuffers()
    m_ref.load_state_dict(m.state_dict())
    x = torch.randn(5, 8)
    pu = [PlacedUnit(f"blocks.{i}", "BatchNorm1d", 0, "cpu", i) for i in range(3)]
    rt = apply(m, Plan(compute=C, units=pu), progress=False)
    try:
        for _ in range(3):   # training mode: running stats are written by forward
            assert torch.equal(m(x), m_ref(x))
        assert torch.equal(m.blocks[1].running_mean, m_ref.blocks[1].running_mean)
    finally:
        rt.undo()


def test_inference_mode_and_grad_mode(toy):
    m, args, ref = toy
    rt = apply(m, make_plan(m, {"blocks.0", "blocks.3"}), progress=False)
    try:
        with torch.inference_mode():
            assert torch.equal(m(*args), ref)
        assert torch.equal(m(*args).detach(), ref)    # grad mode forward also works
    finally:
        rt.undo()


# ------------------------------------------------------------------------------------ diffusers
def _flux_cls():
    try:
        import diffusers.utils.import_utils as iu
        try:
            import transformers  # noqa: F401
        except Exception:
            iu._transformers_available = False
        from diffusers import FluxTransformer2DModel
        return FluxTransformer2DModel
    except Exception as e:  # pragma: no cover - depends on the test extra
        pytest.skip(f"diffusers FluxTransformer2DModel not importable: {e}")


@pytest.fixture(scope="module")
def flux():
    Flux = _flux_cls()
    torch.manual_seed(0)
    m = Flux(patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=16,
             num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
             guidance_embeds=True).eval()
    g = torch.Generator().manual_seed(1)
    side, txt = 4, 8
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side)[:, None]
    img_ids[..., 2] = torch.arange(side)[None, :]
    kw = dict(hidden_states=torch.randn(1, side * side, 8, generator=g),
              encoder_hidden_states=torch.randn(1, txt, 32, generator=g),
              pooled_projections=torch.randn(1, 16, generator=g), timestep=torch.tensor([0.5]),
              img_ids=img_ids.reshape(-1, 3), txt_ids=torch.zeros(txt, 3), guidance=torch.tensor([3.5]),
              return_dict=False)
    with torch.no_grad():
        ref = m(**kw)[0]
    return m, kw, ref


@pytest.mark.parametrize("which", ["none", "partial", "all", "leaf"])
def test_diffusers_flux_bit_identical(flux, which):
    m, kw, ref = flux
    blocks = [f"transformer_blocks.{i}" for i in range(2)] + [f"single_transformer_blocks.{i}" for i in range(3)]
    units = blocks
    if which == "none":
        off = set()
    elif which == "partial":
        off = {blocks[1], blocks[3]}
    elif which == "all":
        off = set(blocks)
    else:
        units = [n for n, mod in m.named_modules() if n.startswith(("transformer_blocks.", "single_transformer_blocks."))
                 and isinstance(mod, nn.Linear)]
        off = set(units[1::2])
    pu = [PlacedUnit(ROOT, "root", 0, C, 0, "root")] + [
        PlacedUnit(n, type(m.get_submodule(n)).__name__, nbytes(m.get_submodule(n)),
                   "cpu" if n in off else C, i + 1) for i, n in enumerate(units)]
    rt = apply(m, Plan(compute=C, units=pu), window_units=2, progress=False)
    try:
        with torch.no_grad():
            assert torch.equal(m(**kw)[0], ref)
            d1 = rt.deviations        # leaf units listed in registration order: the first call relearns
            assert d1 <= (1 if which == "leaf" else 0)
            for _ in range(2):
                assert torch.equal(m(**kw)[0], ref)
        assert rt.deviations == d1
    finally:
        rt.undo()
    with torch.no_grad():
        assert torch.equal(m(**kw)[0], ref)
