"""Runtime tests on CPU: the same homes / slots / ring / fallback code that runs on CUDA, synchronously.

Plans are built by hand (compute "cpu:0", offloaded homes "cpu"), so these tests need no planner (but for the
compile() ones, which trace and partition).  The CUDA tests: tests/test_runtime_cuda.py; ring items, autotune
and calls outside the forward: tests/test_runtime_ring.py; the toy models: tests/runtime_toys.py.
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

from runtime_toys import C, ToyDiT, Twice, make_plan, nbytes, run, toy_inputs


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

