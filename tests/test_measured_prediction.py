"""Predictions from measurements (issue 10, criterion 3), on CPU.

After the profiled step (window autotune on CUDA; profile=True or measure_next() anywhere) the measured
unit times and link rates replace the estimates: plan.predicted["step_s"] is compiler.cost.simulate of the
plan with those times, basis "measured", the estimate kept as "estimated_step_s"; handle.stats reports it.
"""
from __future__ import annotations

import math

import pytest
import torch

import distorch
from distorch.compiler.cost import simulate
from distorch.compiler.graph import ROOT, Unit
from distorch.compiler.inventory import Inventory
from distorch.runtime import stats as rstats
from distorch.runtime.apply import apply
from distorch.runtime.autotune import measured_prediction

from runtime_toys import ToyDiT, _mixed_case, _mixed_times, make_plan, nbytes, run, toy_inputs


def _resimulate(plan, m, slots, unit_bytes):
    """The measured prediction written out independently: the plan's units with the measured times, the
    root with the step's rest (less the stall), links at the measured rates."""
    placed = sorted(plan.units, key=lambda u: u.order)
    root_t = max(0.0, m["step_s"] - m["stall_s"] - sum(m["times"].values()))
    units = [Unit(u.name, u.type, param_bytes=u.bytes, kind=u.kind,
                  time_s=root_t if u.name == ROOT else m["times"].get(u.name, 0.0)) for u in placed]
    if not any(u.name == ROOT for u in placed):
        units.insert(0, Unit(ROOT, "root", kind="root", time_s=root_t))
    inv = Inventory(source="test")
    for src, r in m["rates"].items():
        inv.links[(src, plan.compute)] = r
    return simulate(units, {u.name: u.device for u in placed}, plan.compute, inv, slots * unit_bytes)


def test_profiled_compile_on_cpu_predicts_from_measured_unit_times():
    torch.manual_seed(0)
    m = ToyDiT(depth=6).eval()
    args = toy_inputs()
    with torch.no_grad():
        ref = m(*args)
    h = distorch.compile(m, compute="cpu", offload_gb=0.5 * nbytes(m) / 2**30, donors=["cpu"],
                         example_args=args, progress=False, profile=True)
    try:
        est = dict(h.plan.predicted)
        assert est["basis"] != "measured" and h.plan.offloaded()
        graph_times = [u.time_s for u in h.graph.units]
        for out in run(m, args, 4):
            assert torch.equal(out, ref)                 # measuring changes nothing the model computes
        rt = h.runtime
        pr = h.plan.predicted
        assert pr["basis"] == "measured" and pr["estimated_step_s"] == est["step_s"]
        assert pr["estimated_basis"] == est["basis"] and pr["estimated_compute_s"] == est["compute_s"]
        meas = rt.autotune.measured
        assert meas is not None and set(meas["times"]) >= {u.name for u in h.plan.offloaded()}
        assert meas["rates"]["cpu"] > 0
        want = _resimulate(h.plan, meas, rt.ring.W, rt.unit_bytes)
        assert pr["step_s"] == pytest.approx(want["step_s"], rel=1e-12)
        assert pr["compute_s"] == pytest.approx(want["compute_s"], rel=1e-12)
        assert pr["measured_slots"] == rt.ring.W
        # the step's measured compute is the prediction's compute: units + the rest outside any unit
        assert pr["compute_s"] == pytest.approx(meas["step_s"] - meas["stall_s"], rel=1e-9)
        # memory figures are the plan's own, untouched
        for k in ("compute_peak_bytes", "window_max_bytes", "budget_bytes"):
            assert pr.get(k) == est.get(k)
        s = h.stats
        assert s["predicted_step_s"] == pr["step_s"] and s["predicted_basis"] == "measured"
        assert s["estimated_step_s"] == est["step_s"]
        assert "from measured unit times" in rstats.format_stats(s)
        # the user's graph objects are not changed (copies were simulated)
        assert [u.time_s for u in h.graph.units] == graph_times
        # profiling stays on (the user asked for it); the measuring part is done
        assert rt.profile and not rt.autotune.enabled and not rt.autotune.hooks
    finally:
        h.undo()


def test_measured_prediction_follows_the_measurements():
    """Not a copy of the measured step: slower measured units or a slower link give a longer step."""
    m, x, ref, plan, names = _mixed_case(1, 2)
    big = max(u.bytes for u in plan.units)
    times = _mixed_times(0.001, 0.01, 0.01)
    step = sum(times.values())
    a = measured_prediction(plan, times, {"cpu": big / 0.001}, step, window_bytes=2 * big)
    b = measured_prediction(plan, {k: 2 * v for k, v in times.items()}, {"cpu": big / 0.001}, step,
                            window_bytes=2 * big)
    c = measured_prediction(plan, times, {"cpu": big / 0.05}, step, window_bytes=2 * big)
    assert a["step_s"] == pytest.approx(step, rel=1e-6)           # compute-bound: the measured compute
    assert b["step_s"] == pytest.approx(2 * step, rel=1e-6)
    assert c["step_s"] > 2 * a["step_s"] and c["stall_s"] > 0      # copy-bound: the link decides
    # the stall in a measured step is not taken for compute outside the units
    d = measured_prediction(plan, times, {"cpu": big / 0.001}, step + 0.5, stall_s=0.5, window_bytes=2 * big)
    assert d["step_s"] == pytest.approx(a["step_s"], rel=1e-9)


@pytest.mark.parametrize("grow", [True, False])
def test_autotune_repredicts_whether_or_not_the_ring_grows(monkeypatch, grow):
    """Tuning: the slot count from the measured times, then the prediction at THAT slot count."""
    m, x, ref, plan, names = _mixed_case(3, 2)
    rt = apply(m, plan, progress=False, autotune=True)
    big = max(rt.ring.nbytes)
    times = _mixed_times(0.0, 0.5, 0.8) if grow else {n: 5.0 for n in _mixed_times(0, 0, 0)}
    fake = {"times": times, "rates": {"cpu": big / 1.0}, "step_s": sum(times.values()), "stall_s": 0.0,
            "gap_s": 0.25}
    monkeypatch.setattr(rstats, "measured_step", lambda rt_: dict(fake))
    try:
        est = plan.predicted.get("step_s")
        with torch.no_grad():
            for _ in range(4):
                assert torch.equal(m(x), ref)
        r = rt.tune_result
        assert r is not None and r["slots_before"] == 2
        assert (r["slots"] > 2) if grow else (r["slots"] == 2)
        assert rt.W == r["slots"]
        pr = rt.plan.predicted
        assert pr["basis"] == "measured" and pr["measured_slots"] == rt.W and pr["estimated_step_s"] == est
        assert pr["step_s"] == pytest.approx(_resimulate(rt.plan, fake, rt.W, rt.unit_bytes)["step_s"], rel=1e-12)
        # the prediction at the chosen count is the policy's, less the gap between steps (reported apart)
        assert pr["step_s"] == pytest.approx(r["predicted_by_slots"][rt.W] - 0.25, rel=1e-9)
        assert pr["gap_s"] == 0.25
        assert rstats.summarize(rt)["predicted_step_s"] == pr["step_s"]
    finally:
        rt.undo()


def test_measure_next_on_cpu_without_profiling_leaves_nothing_behind():
    m, x, ref, plan, names = _mixed_case(4, 2)
    for u in plan.units:                 # a resident unit: timed through a temporary hook while measuring
        if u.name == "singles.1":
            u.device = plan.compute
    before = {n: (len(mod._forward_pre_hooks), len(mod._forward_hooks)) for n, mod in m.named_modules()}
    rt = apply(m, plan, progress=False, autotune=False)
    try:
        assert not rt.autotune.enabled
        assert rt.autotune.measure_next() is True and rt.autotune.enabled
        assert rt.autotune.measure_next() is False                 # armed already
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(x), ref)
        pr = rt.plan.predicted
        assert pr["basis"] == "measured" and "singles.1" in rt.autotune.measured["times"]
        assert not rt.profile and not rt.trace and not rt.autotune.enabled and not rt.autotune.hooks
        assert rt.tune_result is None and rt.W == 2                 # measured only: the ring is as it was
        assert rt.autotune.measure_next() is False                  # the plan's times are measurements now
    finally:
        rt.undo()
    after = {n: (len(mod._forward_pre_hooks), len(mod._forward_hooks)) for n, mod in m.named_modules()}
    assert after == before
    # a later compile with the measured plan does not measure again, even profiled
    rt = apply(m, plan, progress=False, profile=True)
    try:
        assert not rt.autotune.enabled
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(x), ref)
        assert rt.plan.predicted["estimated_step_s"] == pr["estimated_step_s"]
    finally:
        rt.undo()


def test_a_ring_holding_every_item_moves_nothing_per_step():
    """Two streamed blocks, two slots: they stay in their slots, no copy runs per step, and the measured
    prediction charges no transfer (the link's rate is inf, not a missing value)."""
    torch.manual_seed(0)
    m = ToyDiT(depth=4).eval()
    args = toy_inputs()
    plan = make_plan(m, {"blocks.1", "blocks.2"})
    rt = apply(m, plan, window_units=2, profile=True, progress=False)
    try:
        c0 = None
        for k in range(4):
            run(m, args, 1)
            if k == 0:
                c0 = rt.ring.copies
        assert rt.ring.copies == c0                    # nothing copied after the first fill
        meas = rt.autotune.measured
        assert meas["rates"] == {"cpu": math.inf}
        pr = rt.plan.predicted
        assert pr["basis"] == "measured" and pr["stall_s"] == 0.0
        assert pr["step_s"] == pytest.approx(pr["compute_s"], rel=1e-12)
        assert pr["measured_link_rates"] == {}         # inf is not written into the plan (JSON)
        times = pr["measured_unit_times"]              # per unit call, what a re-plan would start from
        assert set(times) <= {u.name for u in plan.units} and {"blocks.1", "blocks.2"} <= set(times)
        assert all(t >= 0 for t in times.values()) and times == meas["times"]
        rt.plan.to_json()
    finally:
        rt.undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_autotune_step_replaces_the_estimate_with_the_measured_prediction():
    from test_step_boundary import _cuda_case
    m, x, ref, plan = _cuda_case(22)
    plan.predicted = {"step_s": 1.0, "compute_s": 0.5, "basis": "flops"}
    rt = apply(m, plan, progress=False)
    try:
        with torch.no_grad():
            for _ in range(4):
                assert torch.equal(m(x), ref)
        pr = rt.plan.predicted
        meas = rt.autotune.measured
        assert pr["basis"] == "measured" and pr["estimated_step_s"] == 1.0 and pr["estimated_basis"] == "flops"
        assert meas["rates"]["cpu"] > 0 and pr["measured_slots"] == rt.W == rt.tune_result["slots"]
        assert pr["step_s"] == pytest.approx(_resimulate(rt.plan, meas, rt.W, rt.unit_bytes)["step_s"], rel=1e-12)
        assert rstats.summarize(rt)["predicted_step_s"] == pr["step_s"]
    finally:
        rt.undo()


def test_work_between_units_is_counted_with_the_unit_after_it_not_lumped_at_the_root():
    """stats.lead_gaps: the time between two units' events that is no stall (the attention and norms
    between the Linear layers of a sub-unit plan) belongs to the unit after it, so the re-simulation keeps
    it where it ran; a streamed unit's wait for its copy stays a stall; before the first unit: the root's."""
    class _Rt:
        index = {"b": 1}            # the streamed units
    tl = [{"lane": "compute", "unit": "a", "start_ms": 0.5, "end_ms": 1.0},
          {"lane": "copy:cpu", "unit": "b", "start_ms": 0.0, "end_ms": 3.0},
          {"lane": "compute", "unit": "b", "start_ms": 4.0, "end_ms": 5.0},      # waited 1 -> 3, then 1 ms of work
          {"lane": "compute", "unit": "c", "start_ms": 5.5, "end_ms": 6.0},      # 0.5 ms of work before it
          {"lane": "compute", "unit": "a", "start_ms": 6.0, "end_ms": 6.25}]     # called again, right after
    got = rstats.lead_gaps(_Rt(), tl)
    want = [("a", 0.5e-3, 0.0, 0.0), ("b", 1e-3, 1e-3, 2e-3), ("c", 0.5e-3, 0.5e-3, 0.0), ("a", 0.25e-3, 0.0, 0.0)]
    for g, w in zip(got, want):
        assert g[0] == w[0] and g[1:] == pytest.approx(w[1:], abs=1e-12)
    assert len(got) == len(want)
    assert rstats.stall_seconds(_Rt(), tl) == pytest.approx(2e-3)
    # every millisecond of the step after the first unit's start is a unit's time or a stall
    assert sum(g[1] + g[2] + g[3] for g in got) == pytest.approx(5.75e-3)


def test_a_plan_streaming_nothing_is_measured_too():
    """Nothing offloaded (virtual_vram_gb 0): no ring to tune, but where autotune is on (CUDA's default) the
    step after the warm-up is measured all the same, and the prediction is that measured compute instead
    of the FLOP-rate estimate (in ComfyUI on an H200: 0.238 s estimated for a 0.160 s step).  Nothing of
    the measurement stays on the module; without autotune (the CPU default) nothing is measured."""
    m, x, ref, plan, names = _mixed_case(4, 2)
    for u in plan.units:
        u.device = plan.compute
    plan.window_bytes = 0
    plan.predicted = dict(plan.predicted or {}, step_s=1.0, compute_s=1.0)      # an estimate, far off
    est = dict(plan.predicted)
    before = {n: (len(mod._forward_pre_hooks), len(mod._forward_hooks)) for n, mod in m.named_modules()}
    rt = apply(m, plan, progress=False, autotune=False)
    try:
        assert not rt.units and not rt.autotune.enabled and rt.autotune.measure_next() is False
    finally:
        rt.undo()
    rt = apply(m, plan, progress=False, autotune=True)
    try:
        assert not rt.units and rt.autotune.enabled and rt.tune_result is None
        with torch.no_grad():
            for _ in range(4):
                assert torch.equal(m(x), ref)
        pr, meas = rt.plan.predicted, rt.autotune.measured
        assert pr["basis"] == "measured" and pr["estimated_step_s"] == est["step_s"]
        assert set(meas["times"]) >= {u.name for u in plan.units if u.name != ROOT}
        assert meas["stall_s"] == 0.0 and meas["rates"] == {}
        # nothing streams: the prediction is the measured compute, the step itself
        assert pr["step_s"] == pytest.approx(meas["step_s"], rel=1e-9) and pr["stall_s"] == 0.0
        assert not rt.profile and not rt.autotune.enabled and not rt.autotune.hooks
    finally:
        rt.undo()
    after = {n: (len(mod._forward_pre_hooks), len(mod._forward_hooks)) for n, mod in m.named_modules()}
    assert after == before
