"""Resident units profiled as stretches (runtime/profile.py): one span per run of resident sub-units of one
block between two streamed units instead of one per unit, so that the profiler's hooks do not slow a
host-bound step it measures (issue 10: at 512x512 the per-layer hooks made Flux's profiled unit times sum
to 1.5-1.7x its real step).  Whole blocks stay one span each: tests/test_runtime_lifecycle.py."""
from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from distorch.compiler.graph import ROOT
from distorch.compiler.plan import Plan, PlacedUnit
from distorch.runtime import stats as rstats
from distorch.runtime.apply import apply
from distorch.runtime.stream import HostEvent

from runtime_toys import nbytes

C = "cpu:0"


class _Chain(nn.Module):
    """Linear layers of different widths in a row; `skip` names layers the forward leaves out."""

    def __init__(self, n=12, d=16):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d, bias=(i % 3 == 0)) for i in range(n))
        self.skip: set[int] = set()

    def forward(self, x):
        for i, lin in enumerate(self.layers):
            if i not in self.skip:
                x = torch.tanh(lin(x))
        return x


def _plan(m, streamed, per_block=6):
    """Each layer a sub-unit of block "b<i // per_block>" (as passes/granularity.py splits a block)."""
    pu = [PlacedUnit(ROOT, "root", 0, C, 0, "root")]
    pu += [PlacedUnit(f"layers.{i}", "Linear", nbytes(m.layers[i]), "cpu" if i in streamed else C, i + 1, "sub",
                      f"b{i // per_block}") for i in range(len(m.layers))]
    return Plan(compute=C, units=pu, window_bytes=2 * max(u.bytes for u in pu))


def _hooked(m):
    return {i for i, lin in enumerate(m.layers) if lin._forward_pre_hooks or lin._forward_hooks}


def test_a_stretch_is_hooked_at_its_ends_and_shared_out_by_bytes():
    torch.manual_seed(0)
    m = _Chain().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        ref = m(x)
    streamed = {3, 8}
    rt = apply(m, _plan(m, streamed), progress=False, autotune=False, profile=True)
    try:
        # stretches 0-2, 4-5 (block b0), 6-7, 9-11 (b1): hooks on their ends (and the streamed units' own)
        assert _hooked(m) == {0, 2, 3, 4, 5, 6, 7, 8, 9, 11}
        assert rt.profiler.stretches == {"layers.0 .. layers.2": ["layers.0", "layers.1", "layers.2"],
                                         "layers.4 .. layers.5": ["layers.4", "layers.5"],
                                         "layers.6 .. layers.7": ["layers.6", "layers.7"],
                                         "layers.9 .. layers.11": [f"layers.{i}" for i in range(9, 12)]}
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(x), ref)
        tl = rstats.timeline(rt)
        assert [e["unit"] for e in tl if e["lane"] == "compute"] == [
            "layers.0 .. layers.2", "layers.3", "layers.4 .. layers.5", "layers.6 .. layers.7", "layers.8",
            "layers.9 .. layers.11"]
        ms = rstats.measured_step(rt)
        assert set(ms["times"]) == {f"layers.{i}" for i in range(12)}
        # a stretch's time (span + the work before it) goes to its units by bytes
        gaps = {n: span + lead for n, span, lead, _ in rstats.lead_gaps(rt, tl)}
        b = {i: nbytes(m.layers[i]) for i in range(12)}
        tot = sum(b[i] for i in range(9, 12))
        for i in range(9, 12):
            assert ms["times"][f"layers.{i}"] == pytest.approx(gaps["layers.9 .. layers.11"] * b[i] / tot)
        assert ms["times"]["layers.3"] == pytest.approx(gaps["layers.3"])
        # nothing lost or made up: the units' times add up to the spans and leads
        assert sum(ms["times"].values()) == pytest.approx(sum(gaps.values()))
    finally:
        rt.undo()
    assert not _hooked(m)


def test_a_stretch_whose_last_unit_did_not_run_ends_before_the_next_unit_waits():
    """The forward skips the stretch's last unit: the Closer ends the span at the next streamed unit's
    start, before the ring's wait for its copy (so no stall is timed as compute), or at the forward's end."""
    torch.manual_seed(1)
    m = _Chain().eval()
    m.skip = {7, 11}
    x = torch.randn(4, 16)
    with torch.no_grad():
        ref = m(x)
    rt = apply(m, _plan(m, {3, 8}), progress=False, autotune=False, profile=True)
    order = []
    real = rt.ring.pre

    def ring_pre(i):               # the ring's wait for unit i's copy: the stretch must be closed by then
        order.append((rt.units[i], rt.profiler._open))
        return real(i)
    rt.ring.pre = ring_pre
    rt.compose()
    try:
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(x), ref)
        assert order and all(op is None for _, op in order)
        tl = rstats.timeline(rt)
        comp = [e for e in tl if e["lane"] == "compute"]
        assert [e["unit"] for e in comp] == [
            "layers.0 .. layers.2", "layers.3", "layers.4 .. layers.5", "layers.6 .. layers.7", "layers.8",
            "layers.9 .. layers.11"]
        for a, b in zip(comp, comp[1:]):
            assert a["end_ms"] <= b["start_ms"]
        ms = rstats.measured_step(rt)
        assert set(ms["times"]) == {f"layers.{i}" for i in range(12)}
        assert rt.profiler._open is None
    finally:
        rt.undo()


def test_autotune_profiles_stretches_and_removes_their_hooks():
    torch.manual_seed(2)
    m = _Chain().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        ref = m(x)
    rt = apply(m, _plan(m, {5}), progress=False, autotune=False)
    try:
        assert _hooked(m) == {5}
        seen = []
        real = rt.profiler.hook_resident

        def hook_resident():
            out = real()
            seen.append(_hooked(m))
            return out
        rt.profiler.hook_resident = hook_resident
        assert rt.autotune.measure_next()
        with torch.no_grad():
            for _ in range(4):
                assert torch.equal(m(x), ref)
        assert seen == [{0, 4, 5, 6, 11}]          # measuring: stretches 0-4 (block b0) and 6-11 (b1)
        assert _hooked(m) == {5}
        pr = rt.plan.predicted
        assert pr["basis"] == "measured" and set(pr["measured_unit_times"]) >= {f"layers.{i}" for i in range(12)}
    finally:
        rt.undo()


# ----------------------------------------------------------------------------- calibration (runtime/autotune.py)
class _Clock:
    """The host clock plus `ahead`: time injected by moving the clock (HostEvent, StepClock and the
    profiler read it), so the test does not depend on this machine's speed."""
    ahead = 0.0
    real = staticmethod(time.perf_counter)

    @classmethod
    def now(cls) -> float:
        return cls.real() + cls.ahead


class _Tick(nn.Linear):
    """A layer whose compute takes TICK of (injected) time."""

    def forward(self, x):
        _Clock.ahead += TICK
        return torch.tanh(super().forward(x))


TICK = 1e-3
GAP = 4e-3             # the caller's own work between forwards (a sampler's)
SLOW = 2e-3            # the host cost of a hooked module's slower call path while profiling (no event times it)


class _Ticks(nn.Module):
    def __init__(self, n=16, d=8):
        super().__init__()
        self.layers = nn.ModuleList(_Tick(d, d) for _ in range(n))

    def forward(self, x):
        for lin in self.layers:
            x = lin(x)
        return x


def _slow_while_profiling(rt):
    """hook_resident as it is, plus SLOW on every module it hooked (the call path torch takes for them)."""
    real = rt.profiler.hook_resident

    def hook_resident():
        out = real()
        for run in rt.profiler.stretch_runs():
            for n in {run[0], run[-1]}:
                out.append(rt.profiler.unit_mods[n].register_forward_pre_hook(
                    lambda mod, args: setattr(_Clock, "ahead", _Clock.ahead + SLOW)))
        return out
    rt.profiler.hook_resident = hook_resident


def _ticks_runtime(monkeypatch):
    from distorch.runtime import profile as profile_mod
    monkeypatch.setattr(time, "perf_counter", _Clock.now)
    monkeypatch.setattr(profile_mod, "_now", _Clock.now)
    torch.manual_seed(3)
    m = _Ticks().eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        ref = m(x)
    return m, x, ref, apply(m, _plan(m, {4, 12}, per_block=8), progress=False, autotune=False)


class _Running(HostEvent):
    """A step's end event the device has not reached yet."""
    __slots__ = ()

    def query(self):
        return False


def test_calibration_waits_for_completed_steps(monkeypatch):
    """The host runs ahead of the device: a step whose end event has not completed is not read (no
    synchronize in the forward's pre-hook); the steps before it are, once there are enough of them."""
    from distorch.runtime.calibrate import CALIB_STEPS
    m, x, _, rt = _ticks_runtime(monkeypatch)
    try:
        _slow_while_profiling(rt)
        assert rt.autotune.measure_next()
        ev = rt.clock.events
        swapped = []

        def latest_running():          # the latest step still running; the one made so before has completed
            for k, done in swapped:
                ev[k] = done
            swapped.clear()
            k = (rt.clock.steps - 1) % len(ev)
            e = _Running()
            e.t = ev[k][1].t
            swapped.append((k, ev[k]))
            ev[k] = (ev[k][0], e)
        with torch.no_grad():
            for _ in range(2 + CALIB_STEPS):         # warm-up, profiled, CALIB_STEPS unprofiled
                m(x)
            latest_running()
            m(x)                                     # its pre-hook: the latest of the 3 is still running
            assert "calibration" not in rt.plan.predicted
            latest_running()
            m(x)                                     # 4 since: the 3 before the running one
            pr = rt.plan.predicted
            assert "calibration" in pr
            plain = sorted(rstats.step_times(rt)[2:2 + CALIB_STEPS])[CALIB_STEPS // 2]
            assert pr["unprofiled_step_s"] == pytest.approx(plain, rel=1e-9)
    finally:
        rt.undo()


@pytest.mark.parametrize("slow", [True, False])
def test_unprofiled_steps_calibrate_the_measured_prediction(monkeypatch, slow):
    """The profiled step carries a cost no event times (SLOW per hooked module): the prediction made from it
    is too slow until CALIB_STEPS unprofiled forwards of the same input ran; then their GPU step scales the
    measured compute down to them, and the signature's entry keeps the calibrated measurement.  Without
    that cost nothing is scaled."""
    from distorch.runtime.calibrate import CALIB_STEPS
    m, x, ref, rt = _ticks_runtime(monkeypatch)
    try:
        if slow:
            _slow_while_profiling(rt)
        assert rt.autotune.measure_next()
        with torch.no_grad():
            for gap in (0.0, 5 * GAP):               # warm-up, profiled (after an atypical gap)
                _Clock.ahead += gap
                assert torch.equal(m(x), ref)
            first = dict(rt.plan.predicted)
            assert first["basis"] == "measured" and "calibration" not in first
            assert first["gap_s"] >= 5 * GAP
            for _ in range(CALIB_STEPS + 1):         # unprofiled; the last one's pre-hook calibrates
                _Clock.ahead += GAP
                assert torch.equal(m(x), ref)
        pr = rt.plan.predicted
        assert pr["gap_s"] == pytest.approx(GAP, rel=0.5)                # the typical gap, from the same steps
        plain = sorted(rstats.step_times(rt)[2:2 + CALIB_STEPS])[CALIB_STEPS // 2]
        assert plain == pytest.approx(16 * TICK, rel=0.3)
        if not slow:
            assert "calibration" not in pr and pr["step_s"] == first["step_s"]
            return
        # 4 stretches (0-3, 5-7 | 8-11, 13-15): 8 hooked modules, SLOW each, in the profiled step
        assert first["step_s"] > plain + 8 * SLOW * 0.8
        assert pr["unprofiled_step_s"] == pytest.approx(plain, rel=1e-9)
        assert 0.5 <= pr["calibration"] < 0.97
        assert pr["step_s"] == pytest.approx(plain, rel=0.1)             # the profiled one was 2x that
        assert pr["compute_s"] < first["compute_s"] and pr["estimated_step_s"] == first["estimated_step_s"]
        entry = rt.autotune.known.get(pr["signature"])
        assert entry["_m"]["calibration"] == pr["calibration"]
        assert sum(entry["_m"]["times"].values()) == pytest.approx(
            sum(rt.autotune.measured["times"].values()), rel=1e-9)
        # one calibration per measurement: more forwards change nothing
        with torch.no_grad():
            for _ in range(CALIB_STEPS + 1):
                m(x)
        assert rt.plan.predicted["step_s"] == pr["step_s"]
    finally:
        rt.undo()


def test_calibrated_scales_the_compute_and_keeps_the_link():
    from distorch.runtime.measured import CALIB_MIN, calibrated
    m = {"times": {"a": 0.010, "b": 0.020}, "rates": {"cpu": 5e9}, "step_s": 0.040, "stall_s": 0.004, "gap_s": 0.003}
    c = calibrated(m, 0.022)
    f = (0.022 - 0.004) / 0.036
    assert c["calibration"] == pytest.approx(f) and c["step_s"] == pytest.approx(0.022)
    assert c["times"] == {"a": pytest.approx(0.010 * f), "b": pytest.approx(0.020 * f)}
    assert c["rates"] == m["rates"] and c["stall_s"] == 0.004 and c["gap_s"] == 0.003 and m["step_s"] == 0.040
    assert calibrated(m, 0.039) is None and calibrated(m, 0.050) is None and calibrated(m, 0.0) is None
    assert calibrated(m, 0.001)["calibration"] == CALIB_MIN                      # at most halved


def test_a_forward_that_raised_inside_a_stretch_leaves_no_span_open():
    """A forward raises inside a stretch: the root's post hook (always called) ends the span with the step,
    and the next steps time their own spans, none across two steps."""
    torch.manual_seed(4)
    m = _Chain().eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        ref = m(x)
    rt = apply(m, _plan(m, {3, 8}), progress=False, autotune=False, profile=True)
    boom = m.layers[1].register_forward_hook(lambda mod, a, out: (_ for _ in ()).throw(RuntimeError("boom")))
    try:
        with torch.no_grad():
            with pytest.raises(RuntimeError, match="boom"):
                m(x)
            boom.remove()
            assert rt.profiler._open is None
            for _ in range(2):
                assert torch.equal(m(x), ref)
        comp = [e for e in rstats.timeline(rt) if e["lane"] == "compute"]
        assert [e["unit"] for e in comp][:2] == ["layers.0 .. layers.2", "layers.3"]
        assert all(e["end_ms"] >= e["start_ms"] for e in comp)
        assert {e["step"] for e in comp} == {comp[-1]["step"]}
    finally:
        boom.remove()
        rt.undo()
