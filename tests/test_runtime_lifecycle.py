"""A runtime's life on CPU (hand-built plans, tests/runtime_toys.py): one host copy of the offloaded weights,
undo frees homes and slots and leaves the module as it was, home views and invalidate(), the runtime object
released after undo, clear errors for bad plans, and the stats and timeline of profiled steps."""
from __future__ import annotations

import gc
import weakref

import pytest
import torch

from distorch.compiler.plan import Plan, PlacedUnit
from distorch.errors import DisTorchError
from distorch.runtime import stats as rstats
from distorch.runtime.apply import apply

import runtime_fixtures
from runtime_toys import C, ToyDiT, make_plan, run, toy_inputs

toy = runtime_fixtures.toy              # the shared fixture (tests/runtime_fixtures.py): pytest finds it here


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
