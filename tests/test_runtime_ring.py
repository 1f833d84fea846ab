"""Runtime tests on CPU, ring side: small units travel together in ring items (one copy per item), autotune
sizes the ring from measured times, units called outside the forward stream once their period repeats."""
from __future__ import annotations

import pytest
import torch

from distorch.runtime import stats as rstats
from distorch.runtime.apply import apply

from runtime_toys import C, Mixed, _mixed_by_hand, _mixed_case, _mixed_plan, _mixed_times


# ------------------------------------------------------------------------------------------------
# ring items: small units travel together
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
