"""Runtime tests on CPU: the same homes / slots / ring / fallback code that runs on CUDA, synchronously.

Plans are built by hand (compute "cpu:0", offloaded homes "cpu"), so these tests need no planner.
"""
from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
import torch.nn as nn

from distorch.compiler.graph import ROOT
from distorch.compiler.plan import Plan, PlacedUnit
from distorch.errors import DisTorchError
from distorch.runtime import stats as rstats
from distorch.runtime.apply import apply

C = "cpu:0"   # compute on the host; "cpu" is the host home of offloaded units


# ----------------------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.mod = nn.Linear(d, 2 * d)

    def forward(self, x, c):
        shift, scale = self.mod(c).chunk(2, -1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.attn(h).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        x = x + self.proj(a)
        return x + self.mlp(self.norm(x))


class ToyDiT(nn.Module):
    """DiT-like: embedder, time MLP (parent-owned params), a ModuleList of blocks, head."""

    def __init__(self, d=32, depth=6, cin=8):
        super().__init__()
        self.embed = nn.Linear(cin, d)
        self.t_w = nn.Parameter(torch.randn(d) * 0.1)      # used by the parent directly (ROOT)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, cin)
        self.register_buffer("pos", torch.randn(1, 16, d) * 0.1)

    def forward(self, x, t):
        c = torch.sin(t[:, None] * self.t_w)
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        for b in self.blocks:
            h = b(h, c)
        return self.head(h)


def toy_inputs(b=2, n=16, cin=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, n, cin, generator=g), torch.rand(b, generator=g)


def nbytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def make_plan(model, offloaded, units=None, window_units=None, compute=C, home="cpu"):
    """units: module names in execution order (default: the ModuleList children 'blocks.i')."""
    units = units if units is not None else [f"blocks.{i}" for i in range(len(model.blocks))]
    pu = [PlacedUnit(ROOT, "root", 0, compute, 0, "root")]
    for i, n in enumerate(units):
        pu.append(PlacedUnit(n, type(model.get_submodule(n)).__name__, nbytes(model.get_submodule(n)),
                             home if n in offloaded else compute, i + 1))
    return Plan(compute=compute, units=pu)


def run(model, args, steps=3):
    outs = []
    with torch.no_grad():
        for _ in range(steps):
            outs.append(model(*args))
    return outs


@pytest.fixture
def toy():
    torch.manual_seed(0)
    m = ToyDiT().eval()
    args = toy_inputs()
    with torch.no_grad():
        ref = m(*args)
    return m, args, ref


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
class Twice(nn.Module):
    """A block called twice per forward, and a branch taken only on some calls."""

    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
        self.extra = nn.ModuleList([nn.Linear(d, d)])

    def forward(self, x, branch=False):
        x = self.blocks[0](x)
        x = self.blocks[1](x)
        x = self.blocks[1](x)          # called twice
        if branch:
            x = self.extra[0](x)       # branch not always taken
        x = self.blocks[2](x)
        return self.blocks[3](x)


def test_called_twice_and_branches():
    torch.manual_seed(0)
    m = Twice().eval()
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref_a, ref_b = m(x), m(x, branch=True)
    units = [f"blocks.{i}" for i in range(4)] + ["extra.0"]
    pu = [PlacedUnit(n, "Linear", 0, "cpu", i) for i, n in enumerate(units)]
    rt = apply(m, Plan(compute=C, units=pu), window_units=2, progress=False)
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


# ------------------------------------------------------------------------------ memory / undo
def test_host_holds_one_copy_and_undo_frees_everything():
    torch.manual_seed(0)
    m = ToyDiT(depth=4).eval()
    args = toy_inputs()
    with torch.no_grad():
        ref = m(*args)
    # give the offloaded blocks' parameters numpy-owned storages we can watch
    watch = []
    for b in (m.blocks[1], m.blocks[2]):
        for p in b.parameters():
            arr = p.detach().numpy().copy()
            watch.append(weakref.ref(arr))
            p.data = torch.from_numpy(arr)
            del arr
    off = {"blocks.1", "blocks.2"}
    rt = apply(m, make_plan(m, off), progress=False)
    gc.collect()
    assert all(w() is None for w in watch), "original storages of offloaded params must be released"
    arena = weakref.ref(rt.arenas["cpu"].array)
    slots = [weakref.ref(f) for f in rt.pool.flats]
    hooks_before = (len(m._forward_pre_hooks), len(m.blocks[1]._forward_pre_hooks))
    assert hooks_before == (1, 1)
    run(m, args, 2)
    rt.undo()
    gc.collect()
    assert all(s() is None for s in slots) and not rt.homes and not rt.arenas, "homes and slots must be freed by undo"
    # back to the host the streamed weights stay in their (unpinned) arena, which lives as long as they do:
    # the next compile with the same plan adopts it (runtime/home_reuse.py, tests/test_home_reuse.py)
    assert arena() is not None
    assert len(m._forward_pre_hooks) == 0 and len(m._forward_hooks) == 0
    assert len(m.blocks[1]._forward_pre_hooks) == 0 and len(m.blocks[1]._forward_hooks) == 0
    assert not hasattr(m, "_distorch_runtime")
    assert torch.equal(m(*args), ref)
    # the module can be compiled again; under another plan the old arena is freed
    rt2 = apply(m, make_plan(m, {"blocks.0"}), progress=False)
    gc.collect()
    assert arena() is None, "a compile under another plan must free the arena undo() left"
    assert torch.equal(run(m, args, 1)[0], ref)
    rt2.undo()


def test_home_views_invalidate_and_undo_to_other_device(toy):
    m, args, ref = toy
    rt = apply(m, make_plan(m, {"blocks.1", "blocks.4"}), window_units=2, progress=False)
    run(m, args, 1)
    hv = rt.home_views()
    w = m.blocks[1].proj.weight
    assert id(w) in hv and id(m.blocks[0].proj.weight) not in hv
    saved = hv[id(w)].clone()
    hv[id(w)].zero_()                       # patch the home (what a LoRA merge does)
    rt.invalidate()
    with torch.no_grad():
        assert not torch.equal(m(*args), ref)
        hv[id(w)].copy_(saved)
        rt.invalidate()
        assert torch.equal(m(*args), ref)
    rt.undo(device="cpu")
    assert torch.equal(m(*args), ref)


def test_runtime_object_released_after_undo(toy):
    m, args, ref = toy
    rt = apply(m, make_plan(m, {"blocks.1"}), progress=False)
    run(m, args, 1)
    rt.undo()
    w = weakref.ref(rt)
    del rt
    gc.collect()
    assert w() is None, "no hook or module attribute may keep the runtime alive after undo"


# ------------------------------------------------------------------------------------- errors
def test_bad_plans_raise_clear_errors(toy):
    m, args, ref = toy
    bad = Plan(compute=C, units=[PlacedUnit("blocks.99", "Block", 0, "cpu", 0)])
    with pytest.raises(DisTorchError, match="blocks.99"):
        apply(m, bad)
    overlap = Plan(compute=C, units=[PlacedUnit("blocks.0", "Block", 0, "cpu", 0),
                                     PlacedUnit("blocks.0.attn", "Linear", 0, "cpu", 1)])
    with pytest.raises(DisTorchError, match="overlap"):
        apply(m, overlap)
    with pytest.raises(DisTorchError, match="Plan"):
        apply(m, {"compute": C})
    rt = apply(m, make_plan(m, {"blocks.0"}), progress=False)
    with pytest.raises(DisTorchError, match="already compiled"):
        apply(m, make_plan(m, {"blocks.0"}))
    rt.undo()
    with torch.device("meta"):
        mm = ToyDiT()
    with pytest.raises(DisTorchError, match="meta"):
        apply(mm, make_plan(mm, {"blocks.0"}))


def test_stats_and_timeline(toy):
    m, args, ref = toy
    off = {"blocks.0", "blocks.2", "blocks.5"}
    plan = make_plan(m, off)
    plan.predicted = {"step_s": 0.01, "compute_s": 0.009}
    rt = apply(m, plan, window_units=2, profile=True, progress=False)
    run(m, args, 3)
    s = rstats.summarize(rt)
    assert s["steps"] == 3 and s["measured_step_s"] > 0
    # profiled: the second step's measured unit times replaced the plan's estimate (runtime/autotune.py)
    assert s["estimated_step_s"] == 0.01 and s["predicted_basis"] == "measured" and s["predicted_step_s"] > 0
    assert s["bytes_moved_total"]["cpu"] == s["bytes_per_step"]["cpu"] * 3 + \
        sum(rt.ring.nbytes[i] for i in rt.learn.seq[:2])     # three steps plus the two primed into the next
    tl = rstats.timeline(rt)
    lanes = {e["lane"] for e in tl}
    assert lanes == {"compute", "copy:cpu"}
    assert {e["unit"] for e in tl if e["lane"] == "compute"} == {f"blocks.{i}" for i in range(6)}
    ut = rstats.unit_times(rt)
    assert set(ut) == {f"blocks.{i}" for i in range(6)} and all(v > 0 for v in ut.values())
    assert "per step" in rstats.format_stats(s)
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


# --------------------------------------------------------------------------------- api / loading
def test_compile_with_plan_and_handle(toy):
    import distorch
    m, args, ref = toy
    h = distorch.compile(m, plan=make_plan(m, {"blocks.2", "blocks.3"}), profile=True, progress=False)
    assert torch.equal(run(m, args, 2)[-1], ref)
    assert h.stats["streamed_units"] == 2
    assert h.timeline()
    assert "blocks.2" in h.placement_table()
    h.undo()
    assert torch.equal(m(*args), ref)
    with pytest.raises(DisTorchError):
        distorch.compile(m, plan="not a plan")


def test_load_into_homes_from_safetensors(toy, tmp_path):
    from safetensors.torch import save_file
    from distorch.runtime.loading import load_into
    m, args, ref = toy
    path = os.path.join(tmp_path, "toy.safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
    with torch.device("meta"):
        fresh = ToyDiT().eval()
    plan = make_plan(fresh, {"blocks.0", "blocks.3", "blocks.4"})
    rt = load_into(fresh, path, plan, progress=False)
    try:
        assert all(not p.is_meta for p in fresh.parameters())
        # streamed params were read straight into their homes: apply adopted them without copying
        for n in ("blocks.0", "blocks.3"):
            assert rt.homes[n].flat is not None
        for out in run(fresh, args, 3):
            assert torch.equal(out, ref)
    finally:
        rt.undo()
    assert torch.equal(fresh(*args), ref)


def test_load_into_reports_missing_keys(toy, tmp_path):
    from safetensors.torch import save_file
    from distorch.runtime.loading import load_into
    m, args, ref = toy
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if not k.startswith("blocks.2.")}
    path = os.path.join(tmp_path, "partial.safetensors")
    save_file(sd, path)
    with torch.device("meta"):
        fresh = ToyDiT().eval()
    with pytest.raises(DisTorchError, match="blocks.2"):
        load_into(fresh, path, make_plan(fresh, {"blocks.0"}), progress=False)


# ------------------------------------------------------------------------------------------ CUDA
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_cuda_stream_bit_identical_and_peak_vram(frac):
    torch.manual_seed(0)
    dev = "cuda:0"
    m = ToyDiT(d=512, depth=8).to(dev, torch.bfloat16).eval()
    x, t = (a.to(dev) for a in toy_inputs(b=4, n=16))
    x = x.to(torch.bfloat16)
    t = t.to(torch.bfloat16)
    with torch.no_grad():
        ref = m(x, t)              # also allocates cuBLAS workspaces, so the baseline below includes them
    torch.cuda.synchronize()
    mem0 = torch.cuda.memory_allocated()
    names = [f"blocks.{i}" for i in range(8)]
    off = set(names[::2]) if frac == 0.5 else (set(names) if frac == 1.0 else set())
    rt = apply(m, make_plan(m, off, compute=dev), window_units=2, progress=False)
    try:
        if off:
            assert rt.arenas["cpu"].pinned, "host homes must be page-locked for async copies"
        torch.cuda.synchronize()
        mem1 = torch.cuda.memory_allocated()
        streamed = sum(nbytes(m.get_submodule(n)) for n in off)
        s = rstats.summarize(rt)
        # the streamed weights left the GPU, the slot window arrived: nothing else.  Never more than that
        # (a budget is an upper bound).  It may be less: CUDA's caching allocator does not split off a
        # remainder of <= 1 MiB from a large block, so freeing a weight can return up to 1 MiB more than its
        # nbytes (measured on an H200: exactly 1 MiB less than expected with every block streamed).
        expect = mem0 - streamed + s["window_bytes"]
        n_streamed = sum(1 for n in off for _ in m.get_submodule(n).parameters())
        assert mem1 <= expect, (mem0, mem1, streamed, "an allocation outside the accounting")
        assert expect - mem1 <= n_streamed << 20, (mem0, mem1, streamed)
        torch.cuda.reset_peak_memory_stats()
        outs = run(m, (x, t), 4)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        for o in outs:
            assert torch.equal(o, ref)
        s = rstats.summarize(rt)
        assert s["deviations"] == 0
        acts = peak - mem1
        assert acts < 64 << 20, f"activations {acts} bytes: weights must not be allocated per step"
        assert s["measured_step_s"] > 0
    finally:
        rt.undo()
    torch.cuda.synchronize()
    assert all(p.device.type == "cuda" for p in m.parameters())
    assert torch.equal(m(x, t), ref)


@cuda
def test_cuda_order_deviation_and_unit_called_twice():
    torch.manual_seed(0)
    dev = "cuda:0"
    m = Twice(d=256).to(dev).eval()
    x = torch.randn(8, 256, device=dev)
    with torch.no_grad():
        ref_a, ref_b = m(x), m(x, branch=True)
    units = [f"blocks.{i}" for i in range(4)] + ["extra.0"]
    pu = [PlacedUnit(n, "Linear", 0, "cpu", i) for i, n in enumerate(units)]
    rt = apply(m, Plan(compute=dev, units=pu), window_units=2, progress=False)
    try:
        with torch.no_grad():
            for branch in [False, True, True, False, False, True, False, False]:
                assert torch.equal(m(x, branch=branch), ref_b if branch else ref_a)
    finally:
        rt.undo()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs (donor GPU home)")
def test_cuda_donor_gpu_home():
    torch.manual_seed(0)
    m = ToyDiT(d=128, depth=4).to("cuda:0").eval()
    x, t = (a.to("cuda:0") for a in toy_inputs())
    with torch.no_grad():
        ref = m(x, t)
    rt = apply(m, make_plan(m, {"blocks.1", "blocks.2"}, compute="cuda:0", home="cuda:1"), progress=False)
    try:
        assert m.blocks[1].attn.weight.device.type == "cuda"
        for o in run(m, (x, t), 3):
            assert torch.equal(o, ref)
        assert set(rt.ring.links) == {"cuda:1"}
    finally:
        rt.undo()


# ------------------------------------------------------------------- compile(): trace + partition
def test_compile_plans_with_trace_and_partition(toy):
    import distorch
    m, args, ref = toy
    half = nbytes(m) / 2 / 2**30
    h = distorch.compile(m, compute="cpu", offload_gb=half, donors=["cpu"], example_args=args, progress=False)
    try:
        assert h.plan.compute == "cpu:0" and h.plan.offloaded_bytes() >= nbytes(m) / 2
        assert h.graph is not None and len(h.graph) >= 6
        for out in run(m, args, 3):
            assert torch.equal(out, ref)
        s = h.stats
        assert s["streamed_units"] >= 3 and s["deviations"] == 0
        assert s["predicted_step_s"] and s["measured_step_s"]
    finally:
        h.undo()
    assert torch.equal(m(*args), ref)


def test_compile_expert_string_and_feedback(toy):
    import distorch
    from distorch.passes.partition import partition
    from distorch.runtime.api import inventory_for
    m, args, ref = toy
    h = distorch.compile(m, compute="cpu", expert="cpu:0,40%;cpu,60%", example_args=args, profile=True,
                         progress=False)
    try:
        off = h.plan.offloaded_bytes() / h.plan.model_bytes
        assert 0.5 <= off <= 0.75
        run(m, args, 2)
        assert h.feedback() >= 6          # measured unit times written into the graph
        assert all(u.time_s and u.time_s > 0 for u in h.graph.units if u.name.startswith("blocks."))
        plan2 = partition(h.graph, inventory_for("cpu:0", ["cpu"]), "cpu:0", offload_gb=0.6 * nbytes(m) / 2**30)
        assert plan2.predicted["step_s"] > 0
    finally:
        h.undo()
    with pytest.raises(DisTorchError, match="compute"):
        distorch.compile(m, compute="tpu:3")


def test_compile_names_the_failing_pass_and_the_ones_before_it(toy):
    import distorch
    from distorch.errors import PartitionError
    m, args, ref = toy
    with pytest.raises(PartitionError, match=r"^partition pass failed \(passes run before it: trace\): .*tpu:9"):
        distorch.compile(m, compute="cpu", donors=["tpu:9"], offload_gb=0.0001, example_args=args, progress=False)
    assert getattr(m, "_distorch_runtime", None) is None and torch.equal(m(*args), ref)   # nothing changed


# ------------------------------------------------------------------------------------------------
# ring items: small units travel together

class Mixed(nn.Module):
    """Tiny embedders, then wide blocks, then tiny head layers (Flux-like sizes in miniature)."""

    def __init__(self, d=64):
        super().__init__()
        self.e1 = nn.Linear(8, d)
        self.e2 = nn.Linear(d, d // 8)
        self.e3 = nn.Linear(d // 8, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(3))
        self.singles = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
        self.h1 = nn.Linear(d, 8)
        self.h2 = nn.Linear(8, 8)

    def forward(self, x):
        x = self.e3(torch.tanh(self.e2(self.e1(x))))
        for b in self.blocks:
            x = x + b(x)
        for s in self.singles:
            x = torch.tanh(s(x))
        return self.h2(self.h1(x))


def _mixed_plan(m, window_units):
    names = ["e1", "e2", "e3"] + [f"blocks.{i}" for i in range(3)] + [f"singles.{i}" for i in range(4)] + ["h1", "h2"]
    pu = [PlacedUnit(ROOT, "root", 0, C, 0, "root")]
    pu += [PlacedUnit(n, "x", nbytes(m.get_submodule(n)), "cpu", i + 1) for i, n in enumerate(names)]
    return Plan(compute=C, units=pu, window_bytes=window_units * max(u.bytes for u in pu)), names


def _mixed_case(seed, window_units):
    """A seeded Mixed model, an input, its resident output, and a plan streaming every unit."""
    torch.manual_seed(seed)
    m = Mixed().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = m(x)
    plan, names = _mixed_plan(m, window_units)
    return m, x, ref, plan, names


def _mixed_by_hand(m, x, reverse_singles=False):
    """Mixed's forward written out, calling the units outside the module's own forward."""
    h = m.e3(torch.tanh(m.e2(m.e1(x))))
    for b in m.blocks:
        h = h + b(h)
    for s in (reversed(m.singles) if reverse_singles else m.singles):
        h = torch.tanh(s(h))
    return m.h2(m.h1(h))


def _mixed_times(edge, block, single):
    """Compute seconds per unit of Mixed: embedders and head `edge`, blocks `block`, singles `single`."""
    times = {n: edge for n in ("e1", "e2", "e3", "h1", "h2")}
    times.update({f"blocks.{i}": block for i in range(3)})
    times.update({f"singles.{i}": single for i in range(4)})
    return times


def test_stream_groups_pack_consecutive_units_within_a_slot():
    from distorch.compiler.cost import stream_groups
    assert stream_groups([256, 256, 1024, 512, 256, 512, 256], 1024) == [[0, 1], [2], [3, 4], [5, 6]]
    # a unit never joins across a different home, nor past the slot (with 256-byte alignment)
    assert stream_groups([10, 10, 10], 1000, ["cpu", "cuda:1", "cuda:1"]) == [[0], [1, 2]]
    assert stream_groups([300, 300, 300], 600) == [[0], [1], [2]]          # 512 + 300 > 600
    assert stream_groups([256, 256, 256], 600) == [[0, 1], [2]]
    assert stream_groups([], 100) == []


def test_ring_items_group_small_units_bit_identical_and_one_copy_each():
    m, x, ref, plan, names = _mixed_case(0, 3)
    rt = apply(m, plan, progress=False)
    try:
        items = [[rt.units[i] for i in it] for it in rt.ring.items]
        # the embedders travel together, each block alone, singles in pairs, the head layers together
        assert items[0] == ["e1", "e2", "e3"] and items[-1][-2:] == ["h1", "h2"]
        assert all(len(it) == 1 for it in items if it[0].startswith("blocks"))
        assert any(len(it) > 1 for it in items if it[0].startswith("singles"))
        assert sum(len(it) for it in items) == len(names)
        c0 = rt.ring.copies
        with torch.no_grad():
            for _ in range(4):
                assert torch.equal(m(x), ref)
        assert rt.ring.copies - c0 == 4 * len(items)          # one copy per item per step, never per unit
        assert rt.deviations == 0 and rt.fallback_loads == 0
        st = rstats.summarize(rt)
        assert sum(st["bytes_per_step"].values()) == sum(rt.ring.nbytes)
    finally:
        rt.undo()
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_ring_items_regroup_after_order_change_and_partial_item():
    """A forward that skips into the middle of an item falls back safely, and the new order regroups."""
    torch.manual_seed(1)
    m = Mixed().eval()
    x = torch.randn(4, 8)

    def other(x):           # e1 and e2 skipped: e3 alone first, singles reversed
        x = m.e3(torch.tanh(x.new_zeros(x.shape[0], 8)))
        for b in m.blocks:
            x = x + b(x)
        for s in reversed(m.singles):
            x = torch.tanh(s(x))
        return m.h2(m.h1(x))
    with torch.no_grad():
        ref, ref2 = m(x), other(x)
    plan, _ = _mixed_plan(m, 2)
    rt = apply(m, plan, progress=False)
    try:
        with torch.no_grad():
            assert torch.equal(m(x), ref)
            # the other order, through the root module's hooks: it becomes the model's forward
            m.forward, saved = other, m.forward
            try:
                for _ in range(3):
                    assert torch.equal(m(x), ref2)
            finally:
                m.forward = saved
            assert rt.deviations >= 1
            first = [rt.units[i] for i in rt.ring.items[0]]
            assert first[0] == "e3"
            for _ in range(2):
                assert torch.equal(m(x), ref)
    finally:
        rt.undo()


def test_ring_items_never_span_a_resident_unit():
    m, x, ref, plan, names = _mixed_case(2, 3)
    keep = {"singles.1", "e2"}
    for u in plan.units:
        if u.name in keep:
            u.device = C
    rt = apply(m, plan, progress=False)
    try:
        items = [[rt.units[i] for i in it] for it in rt.ring.items]
        assert ["e1"] in items and not any("e1" in it and "e3" in it for it in items)
        assert not any("singles.0" in it and "singles.2" in it for it in items)
        assert any(it[:2] == ["singles.2", "singles.3"] for it in items)
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(x), ref)
    finally:
        rt.undo()


def test_peer_copy_modes_and_cudart_lookup_are_safe_without_cuda():
    from distorch.runtime import stream as S
    assert S.PEER_COPY_MODES[0] == "memcpy"          # the default
    fn = S._cudart_memcpy()                          # None where no CUDA runtime is loaded, never raises
    assert fn is None or callable(fn)
    link = S.Link("cpu", "cpu:0", cuda=False)         # host links copy with torch, synchronously here
    a, b = torch.arange(8, dtype=torch.uint8), torch.zeros(8, dtype=torch.uint8)
    with link.ctx():
        link.copy(b, a)
    assert torch.equal(a, b) and not link.peer and link.mode == "host"


def test_autotune_grows_the_ring_when_measured_times_need_it():
    """Measured times with Flux's shape (big units whose copy outlasts their compute, then small units
    that compute longer than they copy): more slots let the link bank copies; the ring grows and the
    outputs stay bit-identical."""
    m, x, ref, plan, names = _mixed_case(3, 2)
    rt = apply(m, plan, progress=False, autotune=False)
    try:
        assert rt.W == 2
        big = max(rt.ring.nbytes)
        times = _mixed_times(0.0, 0.5, 0.8)
        res = rt.autotune.choose(times, {"cpu": big / 1.0}, step_s=sum(times.values()))
        assert res["slots_before"] == 2 and res["slots"] > 2
        p = res["predicted_by_slots"]
        assert p[res["slots"]] < p[2] * 0.99
        ring = rt.ring
        assert ring.W == res["slots"] and len(ring.copied) == len(ring.done) == ring.W == len(ring.pool.flats)
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(x), ref)
        assert rt.deviations == 0
        # nothing to gain: the ring stays as it is
        times2 = {n: 5.0 for n in times}
        res2 = rt.autotune.choose(times2, {"cpu": big / 1.0}, step_s=sum(times2.values()))
        assert res2["slots"] == rt.W == res["slots"]
    finally:
        rt.undo()


def test_autotune_measures_one_step_and_keeps_outputs():
    m, x, ref, plan, _ = _mixed_case(4, 2)
    rt = apply(m, plan, progress=False, autotune=True)
    try:
        with torch.no_grad():
            for _ in range(4):
                assert torch.equal(m(x), ref)
        r = rt.tune_result
        assert r is not None and r["slots"] >= r["slots_before"] == 2
        assert set(r["predicted_by_slots"]) >= {1, 2}
        assert not rt.profile and not rt.autotune.hooks and rt.autotune.state == 0
        assert rstats.summarize(rt)["autotune"] is r
    finally:
        rt.undo()


def test_autotune_adds_the_time_between_steps_without_buying_slots_for_it():
    """A pause between steps (the sampler's work, a preview's synchronize) idles the link whatever the
    slot count (no copy is issued while the host is away): it is added to the prediction, and the slot
    choice is the one without it."""
    torch.manual_seed(5)
    m = Mixed().eval()
    plan, _ = _mixed_plan(m, 2)
    times = _mixed_times(0.01, 0.5, 0.01)                       # blocks copy 1.0 s each: copy-bound
    res = []
    for gap in (0.0, 2.0):
        rt = apply(m, plan, progress=False, autotune=False)
        try:
            big = max(rt.ring.nbytes)
            res.append(rt.autotune.choose(times, {"cpu": big / 1.0}, step_s=sum(times.values()), gap_s=gap))
        finally:
            rt.undo()
    r0, r1 = res
    assert r0["slots"] == r1["slots"] and r1["gap_s"] == 2.0
    for k, t in r0["predicted_by_slots"].items():
        assert r1["predicted_by_slots"][k] == pytest.approx(t + 2.0)


def test_undo_while_autotune_measures_leaves_no_hooks():
    m, x, ref, plan, _ = _mixed_case(6, 2)
    for u in plan.units:                      # a resident unit gets a temporary profiling hook
        if u.name == "singles.1":
            u.device = C
    before = {n: (len(mod._forward_pre_hooks), len(mod._forward_hooks)) for n, mod in m.named_modules()}
    rt = apply(m, plan, progress=False, autotune=True)
    rt.autotune.finish = lambda ok: None            # keep it measuring: as if the profiled step never finished
    with torch.no_grad():
        m(x)
        m(x)
    assert rt.autotune.state == 2 and rt.autotune.hooks
    rt.undo()
    after = {n: (len(mod._forward_pre_hooks), len(mod._forward_hooks)) for n, mod in m.named_modules()}
    assert after == before
    with torch.no_grad():
        assert torch.equal(m(x), ref)


def test_units_called_outside_the_forward_stream_once_their_period_repeats():
    """A wrapper that calls the units itself (ComfyUI's CLIP encode calls the inner encoder, not the
    compiled module): the first pass loads each unit on demand, the calls' period is learned when the
    first unit comes again, and from then on the units stream like a forward, bit-identically."""
    m, x, ref_fwd, plan, order = _mixed_case(7, 3)
    with torch.no_grad():
        ref = _mixed_by_hand(m, x)
        ref_rev = _mixed_by_hand(m, x, reverse_singles=True)
    rt = apply(m, plan, progress=False, autotune=False)
    try:
        with torch.no_grad():
            assert torch.equal(_mixed_by_hand(m, x), ref)          # first pass: on-demand loads, recorded
            f1 = rt.fallback_loads
            assert f1 == len(order) and not rt.free_run
            for _ in range(3):
                assert torch.equal(_mixed_by_hand(m, x), ref)
            assert rt.free_run and rt.fallback_loads == f1      # the period repeated: streamed since
            assert [rt.units[i] for i in rt.learn.seq] == order
            # another period: one pass of on-demand loads (from the first unexpected call), then streamed
            d0 = rt.deviations
            for _ in range(3):
                assert torch.equal(_mixed_by_hand(m, x, reverse_singles=True), ref_rev)
            f2 = rt.fallback_loads
            assert rt.deviations > d0 and rt.free_run
            assert torch.equal(_mixed_by_hand(m, x, reverse_singles=True), ref_rev)
            assert rt.fallback_loads == f2
            # the module's own forward takes over again
            for _ in range(3):
                assert torch.equal(m(x), ref_fwd)
            assert not rt.free_run
    finally:
        rt.undo()


def test_free_run_survives_invalidate_and_undo_of_slots_content():
    """Homes rewritten between calls (a LoRA change, ComfyUI reloading the model: invalidate()) while the
    runtime streams calls made outside the forward: the next calls must see the new weights, not a slot's
    old bytes."""
    m, x, _, plan, _ = _mixed_case(8, 3)
    with torch.no_grad():
        ref = _mixed_by_hand(m, x)
    rt = apply(m, plan, progress=False, autotune=False)
    try:
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(_mixed_by_hand(m, x), ref)
            assert rt.free_run
            # rewrite a streamed unit's weights in its home (what a LoRA patch does), then invalidate
            views = rt.home_views()
            w = m.blocks[1][0].weight
            views[id(w)].mul_(0.5)
            rt.invalidate()
            with torch.no_grad():
                m.blocks[1][0].weight.data = views[id(w)]        # the reference model, by hand
            rt.undo()
            ref2 = _mixed_by_hand(m, x)
            rt = apply(m, plan, progress=False, autotune=False)
            for _ in range(3):
                assert torch.equal(_mixed_by_hand(m, x), ref2)
            assert rt.free_run
            views = rt.home_views()
            views[id(m.blocks[0][0].weight)].mul_(2.0)          # a unit the ring has already prefetched
            rt.invalidate()
            outs = [_mixed_by_hand(m, x) for _ in range(3)]
        assert not torch.equal(outs[0], ref2)
        assert all(torch.equal(o, outs[0]) for o in outs)
        rt.undo()
        with torch.no_grad():
            assert torch.equal(_mixed_by_hand(m, x), outs[0])
    finally:
        if rt.active:
            rt.undo()
