"""Tuning per input signature (issue 10), on CPU.

One compiled model sampled at several input sizes: a signature not seen yet is measured (warm-up, then a
profiled step), re-predicted and, when tuning, the ring resized for it; a known one gets its slot count
and prediction back without measuring (runtime/autotune.py, runtime/signatures.py).  The ring shrinks as
well as grows (runtime/ring.py `resize`).  The profiler's own cost in the measured step:
test_profiler_cost.py.
"""
from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch

from distorch.compiler.plan import Plan
from distorch.runtime import autotune as A
from distorch.runtime import stats as rstats
from distorch.runtime.apply import apply
from distorch.runtime.signatures import Tunings, signature, text

from test_measured_prediction import _resimulate
from runtime_toys import Mixed, _mixed_plan, _mixed_times

XA = torch.randn(64, 8, generator=torch.Generator().manual_seed(1))     # input A
XB = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))     # input B: another signature
XC = torch.randn(4, 8, generator=torch.Generator().manual_seed(3))


def _case(seed=0, window_units=2):
    torch.manual_seed(seed)
    m = Mixed().eval()
    with torch.no_grad():
        refs = {id(x): m(x) for x in (XA, XB, XC)}
    plan, _ = _mixed_plan(m, window_units)
    return m, refs, plan


def _step(m, refs, x):
    with torch.no_grad():
        out = m(x)
    assert torch.equal(out, refs[id(x)])        # bit-identical to the uncompiled module at every step


def _fake_steps(monkeypatch, rt, by_batch):
    """rstats.measured_step returning made-up measurements that depend on the input's batch size (the
    signature autotune has for the step); returns the list of signatures measured."""
    big = max(rt.ring.nbytes)
    seen = []

    def measured_step(rt_):
        b = int(rt_.autotune.sig.split("[")[1].split(",")[0])
        seen.append(rt_.autotune.sig)
        times = by_batch[b]
        return {"times": dict(times), "rates": {"cpu": big / 1.0}, "step_s": sum(times.values()),
                "stall_s": 0.0, "gap_s": 0.0}
    monkeypatch.setattr(rstats, "measured_step", measured_step)
    return seen


def test_signature_keys_tensor_shapes_and_ignores_the_rest():
    x = torch.zeros(2, 4, 8, 8)
    k = signature((x, torch.zeros(2), 7), {"context": torch.zeros(2, 77, 16, dtype=torch.bfloat16),
                                          "transformer_options": {"sigmas": torch.zeros(1), "n": 3,
                                                                  "control": [torch.zeros(2, 64)]}})
    assert text(k) == "0:f32[2,4,8,8] 1:f32[2] context:bf16[2,77,16] transformer_options.control:f32[2,64]"
    # a schedule inside an options dict (ComfyUI's sample_sigmas: steps + 1 values) is no new signature
    k2 = signature((x, torch.zeros(2), 9), {"context": torch.zeros(2, 77, 16, dtype=torch.bfloat16),
                                           "transformer_options": {"sigmas": torch.zeros(30), "n": 4,
                                                                   "control": [torch.zeros(2, 64)]}})
    assert k2 == k and hash(k2) == hash(k)
    assert signature((torch.zeros(1, 4, 8, 8),), {}) != signature((x,), {})
    assert text(()) == "-"


def test_tunings_keep_the_most_recently_used():
    t = Tunings(2)
    for s in "abc":
        t.put(s, {"slots": 2, "tuned": True, "predicted": {"step_s": 1.0}, "_m": {"x": 1}})
    assert list(t.entries) == ["b", "c"]
    t.get("b")
    t.put("d", {"slots": 3, "tuned": False, "predicted": {}})
    assert list(t.entries) == ["b", "d"]
    view = t.plan_view()
    assert "_m" not in view["b"] and json.loads(json.dumps(view)) == view
    u = Tunings(8)
    u.load(view)
    assert list(u.entries) == ["b", "d"]


def test_each_signature_is_tuned_once_and_reapplied_without_measuring(monkeypatch):
    """A (compute-bound: the plan's 2 slots), B (copy-bound: more slots), back to A: the ring shrinks to
    A's count and A's prediction comes back, with no measurement."""
    m, refs, plan = _case(1)
    rt = apply(m, plan, progress=False, autotune=True)
    try:
        a_times = {n: 5.0 for n in _mixed_times(0, 0, 0)}
        b_times = _mixed_times(0.0, 0.5, 0.8)
        seen = _fake_steps(monkeypatch, rt, {64: a_times, 16: b_times})
        for _ in range(3):
            _step(m, refs, XA)
        sig_a = rt.autotune.sig
        assert seen == [sig_a] and rt.W == 2 and not rt.autotune.enabled
        pa = dict(rt.plan.predicted)
        assert pa["signature"] == sig_a and pa["basis"] == "measured"
        fake_a = {"times": a_times, "rates": {"cpu": max(rt.ring.nbytes) / 1.0}, "step_s": sum(a_times.values()),
                  "stall_s": 0.0}
        assert pa["step_s"] == pytest.approx(_resimulate(rt.plan, fake_a, 2, rt.unit_bytes)["step_s"], rel=1e-12)
        for _ in range(3):
            _step(m, refs, XB)
        sig_b = rt.autotune.sig
        assert seen == [sig_a, sig_b] and sig_b != sig_a
        kb = rt.W
        assert kb > 2 and rt.tune_result["slots"] == kb and rt.tune_result["signature"] == sig_b
        pb = rt.plan.predicted
        assert pb["signature"] == sig_b and pb["measured_slots"] == kb and pb["step_s"] != pa["step_s"]
        assert pb["estimated_step_s"] == pa["estimated_step_s"]           # the plan's own estimate stays
        assert set(pb["by_signature"]) == {sig_a, sig_b}
        assert rstats.summarize(rt)["predicted_step_s"] == pb["step_s"]
        # back to A: A's slots and prediction at once, nothing measured
        _step(m, refs, XA)
        assert rt.W == 2 and len(rt.pool.flats) == 2 and seen == [sig_a, sig_b]
        pr = rt.plan.predicted
        assert pr["signature"] == sig_a and all(pr[k] == pa[k] for k in ("step_s", "compute_s", "measured_slots"))
        assert rt.tune_result["signature"] == sig_a
        for _ in range(2):
            _step(m, refs, XA)
        _step(m, refs, XB)                                                 # and B again
        assert rt.W == kb and rt.plan.predicted["step_s"] == pb["step_s"] and len(seen) == 2
        assert rt.deviations == 0
        json.loads(rt.plan.to_json())
    finally:
        rt.undo()


def test_signatures_alternating_every_forward_do_not_resize_every_forward(monkeypatch):
    """cond and uncond of different shapes alternate every forward: each is measured once, its prediction
    follows the forward, and the ring is not resized per forward."""
    m, refs, plan = _case(2)
    rt = apply(m, plan, progress=False, autotune=True)
    sizes = []
    try:
        seen = _fake_steps(monkeypatch, rt, {64: {n: 5.0 for n in _mixed_times(0, 0, 0)},
                                             16: _mixed_times(0.0, 0.5, 0.8)})
        real = rt.ring.resize
        monkeypatch.setattr(rt.ring, "resize", lambda k: (sizes.append(k), real(k))[1])
        for _ in range(8):
            _step(m, refs, XA)
            _step(m, refs, XB)
        assert len(seen) == 2 and len(set(seen)) == 2
        assert len(sizes) <= 2, sizes
        assert rt.plan.predicted["signature"] == rt.autotune.sig == seen[1]
    finally:
        rt.undo()


def test_measure_only_follows_signatures_on_the_host():
    """measure_next() (what the ComfyUI nodes call on CPU compute): real profiled steps per signature, the
    ring left as it is; a later compile with the same plan re-applies them without measuring."""
    m, refs, plan = _case(3)
    rt = apply(m, plan, progress=False, autotune=False)
    calls = []
    real = rstats.measured_step
    try:
        assert rt.autotune.measure_next()
        rstats.measured_step = lambda rt_: (calls.append(rt_.autotune.sig), real(rt_))[1]
        for x in (XA, XA, XA, XB, XB, XB):
            _step(m, refs, x)
        sig_a, sig_b = calls
        pb = dict(rt.plan.predicted)
        assert pb["signature"] == sig_b and rt.W == 2 and rt.tune_result is None
        _step(m, refs, XA)
        pa = rt.plan.predicted
        assert len(calls) == 2 and pa["signature"] == sig_a and pa["step_s"] == pa["by_signature"][sig_a][
            "predicted"]["step_s"]
        assert not rt.profile and not rt.trace
    finally:
        rstats.measured_step = real
        rt.undo()
    plan2 = Plan.from_json(plan.to_json())
    rt = apply(m, plan2, progress=False, autotune=False)
    try:
        rstats.measured_step = lambda rt_: (calls.append(rt_.autotune.sig), real(rt_))[1]
        for x in (XB, XB, XA, XA):
            _step(m, refs, x)
        assert len(calls) == 2                                     # both known from the plan
        assert plan2.predicted["signature"] == sig_a
        for x in (XC, XC, XC):                                     # a third one is measured
            _step(m, refs, x)
        assert len(calls) == 3 and plan2.predicted["signature"] == calls[-1] not in (sig_a, sig_b)
    finally:
        rstats.measured_step = real
        rt.undo()


def test_the_signature_hook_goes_with_undo_and_stays_out_of_copies():
    import copy
    m, refs, plan = _case(7)
    before = (len(m._forward_pre_hooks), len(m._forward_hooks))
    rt = apply(m, plan, progress=False, autotune=True)
    try:
        assert rt.autotune.watch is not None and len(m._forward_pre_hooks) == before[0] + 2
        _step(m, refs, XA)
        c = copy.deepcopy(m)
        assert all(not mod._forward_pre_hooks and not mod._forward_hooks for mod in c.modules())
        with torch.no_grad():
            assert torch.equal(c(XA), refs[id(XA)])
    finally:
        rt.undo()
    assert (len(m._forward_pre_hooks), len(m._forward_hooks)) == before
    _step(m, refs, XB)


def test_remembered_signatures_and_measurements_are_capped(monkeypatch):
    monkeypatch.setattr(A, "MAX_SIGNATURES", 2)
    monkeypatch.setattr(A, "MAX_MEASURES", 4)
    m, refs, plan = _case(4)
    xs = [torch.randn(b, 8) for b in (3, 5, 7, 9, 11)]
    with torch.no_grad():
        refs.update({id(x): m(x) for x in xs})
    rt = apply(m, plan, progress=False, autotune=True)
    try:
        seen = _fake_steps(monkeypatch, rt, {x.shape[0]: {n: 1.0 for n in _mixed_times(0, 0, 0)} for x in xs})
        for x in xs[:3]:
            for _ in range(3):
                _step(m, refs, x)
        assert len(seen) == 3 and len(rt.autotune.known) == 2
        assert list(rt.plan.predicted["by_signature"]) == seen[1:]          # the least recently used went
        for _ in range(3):
            _step(m, refs, xs[0])                                            # forgotten: measured again
        assert len(seen) == 4 and seen[-1] == seen[0]
        for _ in range(3):
            _step(m, refs, xs[3])                                            # past MAX_MEASURES: not measured
        assert len(seen) == 4 and not rt.autotune.enabled
    finally:
        rt.undo()


def test_shrinking_the_ring_frees_the_dropped_slots_and_keeps_the_rest():
    m, refs, plan = _case(5, window_units=4)
    rt = apply(m, plan, progress=False, autotune=False)
    try:
        ring = rt.ring
        for _ in range(2):
            _step(m, refs, XA)
        assert rt.W == 4
        order = []
        sync = rt.be.synchronize
        rt.be.synchronize = lambda: (order.append("sync"), sync())[1]
        kept = [f.data_ptr() for f in ring.pool.flats[:2]]
        dropped = [weakref.ref(f) for f in ring.pool.flats[2:]]
        old_pool = ring.pool
        ring.resize(2)
        assert order == ["sync"]                                  # nothing in flight on a slot it frees
        gc.collect()
        assert all(d() is None for d in dropped), "dropped slots must be freed"
        assert ring.pool is not old_pool and [f.data_ptr() for f in ring.pool.flats] == kept
        assert rt.W == 2 == len(ring.copied) == len(ring.done) == len(ring.content)
        for _ in range(3):
            _step(m, refs, XA)
        ring.resize(5)                                            # and grows again, keeping its slots
        assert [f.data_ptr() for f in ring.pool.flats[:2]] == kept and len(ring.pool.flats) == 5
        for _ in range(3):
            _step(m, refs, XA)
        ring.resize(5)                                            # the same count: nothing happens
        assert order == ["sync", "sync"] and rt.deviations == 0
    finally:
        rt.undo()


def test_comfyui_log_after_sampling_follows_the_latent_size(caplog):
    """Inside a real ComfyUI on CPU: sampling at one latent size, then another, then the first again; the
    log line after each run compares with the prediction for that size, measured once per size."""
    import logging
    from comfy_calls import sd3_conditioning
    from comfy_harness import boot_inprocess
    from comfy_models import tiny_mmdit_state
    mm, nodes, folder_paths = boot_inprocess()
    import tempfile
    import os
    import safetensors.torch
    from distorch.comfy_nodes import entry
    root = tempfile.mkdtemp(prefix="retune_")
    safetensors.torch.save_file(tiny_mmdit_state(4, 3), os.path.join(root, "tiny_retune.safetensors"))
    folder_paths.add_model_folder_path("diffusion_models", root)
    mm.unload_all_models()
    try:
        model = entry.distorch(nodes.UNETLoader().load_unet("tiny_retune.safetensors", "default")[0], "cpu",
                               100.0, "cpu", "", False)
        st = entry.state_of(model)
        pos, neg = sd3_conditioning()
        preds = {}
        for side in (8, 16, 8):
            lat = {"samples": torch.zeros(1, 16, side, side)}
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="distorch"):
                nodes.KSampler().sample(model, 42, 3, 3.0, "euler", "normal", pos, neg, lat)
            d = st.last_stats
            pr = st.plan.predicted
            assert f"[2,16,{side},{side}]" in pr["signature"]
            assert d["predicted_step_s"] == pr["step_s"] and d["predicted_basis"] == "measured"
            preds.setdefault(side, pr["step_s"])
            assert pr["step_s"] == preds[side]                # the 8x8 prediction comes back unchanged
            (line,) = [r.getMessage() for r in caplog.records if "DisTorch: measured step" in r.getMessage()]
            assert f"predicted {pr['step_s'] * 1e3:.1f} ms from measured unit times" in line
        assert len(st.plan.predicted["by_signature"]) == 2 and preds[8] != preds[16]
        from distorch.comfy_nodes.state import step_report        # tuned on a GPU: the input is named
        line = step_report({"measured_step_s": 0.2, "predicted_step_s": 0.19, "predicted_basis": "measured",
                            "compute": "cuda:0", "autotune": {"signature": "0:bf16[2,16,64,64]"}})
        assert "predicted 190.0 ms from measured unit times for input 0:bf16[2,16,64,64] (measured/predicted" in line
    finally:
        mm.unload_all_models()
