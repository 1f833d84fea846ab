"""The copy engine keeps working across the step boundary (issue 10, criterion 3), on CPU.

Between two steady-state forwards nothing may synchronize the device, drain a copy stream or invalidate
the slots, and the next step's first ring items must already be issued during the step before (the ring
wraps: runtime/ring.py).  Every synchronize the runtime could reach (torch.cuda.synchronize, CUDA stream
and event synchronize, the host stand-ins, Backend.synchronize) and every slot invalidation / re-prime is
recorded, as is every copy the ring issues and the start and end of each forward.
"""
from __future__ import annotations

import pytest
import torch

from distorch.runtime import stream as S
from distorch.runtime.apply import apply

from runtime_toys import _mixed_case


def record(monkeypatch, rt, module):
    """A list that receives ("start"|"end", step), ("copy", item, hazard), ("sync", where) and
    ("invalidate"|"prime"|"forget"|"resize", ...) in the order they happen."""
    log: list[tuple] = []

    def syncer(where):
        def f(*a, **k):
            log.append(("sync", where))
        return f
    monkeypatch.setattr(torch.cuda, "synchronize", syncer("torch.cuda.synchronize"))
    monkeypatch.setattr(torch.cuda.Stream, "synchronize", syncer("Stream.synchronize"))
    monkeypatch.setattr(torch.cuda.Event, "synchronize", syncer("Event.synchronize"))
    monkeypatch.setattr(S.HostStream, "synchronize", syncer("HostStream.synchronize"))
    monkeypatch.setattr(S.HostEvent, "synchronize", syncer("HostEvent.synchronize"))
    be_sync = rt.be.synchronize
    monkeypatch.setattr(rt.be, "synchronize", lambda: (log.append(("sync", "Backend.synchronize")), be_sync())[1])
    ring, learn = rt.ring, rt.learn
    for obj, name in ((ring, "invalidate"), (ring, "resize"), (learn, "prime"), (learn, "forget")):
        orig = getattr(obj, name)

        def wrap(*a, _orig=orig, _name=name):
            log.append((_name,))
            return _orig(*a)
        monkeypatch.setattr(obj, name, wrap)
    issue = ring._issue

    def issue_rec(q, s, hazard):
        log.append(("copy", q, hazard))
        return issue(q, s, hazard)
    monkeypatch.setattr(ring, "_issue", issue_rec)
    # around the runtime's own root hooks: prepended before its pre hook, appended after its post hook
    hs = [module.register_forward_pre_hook(lambda mod, a: log.append(("start", rt.clock.steps)), prepend=True),
          module.register_forward_hook(lambda mod, a, o: log.append(("end", rt.clock.steps - 1)), always_call=True)]
    return log, hs


def forwards(log):
    """[(step, [entries between its start and end]), ...] and the entries outside every forward."""
    out, outside, cur = [], [], None
    for e in log:
        if e[0] == "start":
            cur = (e[1], [])
        elif e[0] == "end":
            out.append(cur)
            cur = None
        elif cur is not None:
            cur[1].append(e)
        else:
            outside.append(e)
    return out, outside


@pytest.mark.parametrize("mode", ["plain", "profile", "autotune", "measure_next"])
def test_steady_state_forwards_never_synchronize_and_prefetch_the_next_step(monkeypatch, mode):
    m, x, ref, plan, names = _mixed_case(11, 2)
    rt = apply(m, plan, progress=False, profile=mode == "profile", autotune=mode == "autotune")
    handles = []
    try:
        if mode == "measure_next":
            assert rt.autotune.measure_next()
        with torch.no_grad():
            for _ in range(3):             # warm-up, the measured step (modes that measure), one more
                assert torch.equal(m(x), ref)
        assert not rt.autotune.enabled     # whatever measured is done
        ring = rt.ring
        W, ng = ring.W, ring.ng
        assert 1 <= W < ng                 # a real ring: items come and go every step
        log, handles = record(monkeypatch, rt, m)
        with torch.no_grad():
            for _ in range(5):
                assert torch.equal(m(x), ref)
        steps, outside = forwards(log)
        assert len(steps) == 5
        # nothing at all happens between two forwards
        assert outside == []
        bad = [e for _, es in steps for e in es if e[0] in ("sync", "invalidate", "prime", "forget", "resize")]
        assert bad == [], bad
        for k, (step, es) in enumerate(steps):
            copies = [e for e in es if e[0] == "copy"]
            # every item once per step, in ring order from the (W)th on; the last W of them are the NEXT
            # step's first items, issued during this one, and none waits for the slot's previous copy
            assert [q for _, q, _ in copies] == list(range(W, ng)) + list(range(W)), (step, copies)
            assert not any(h for _, _, h in copies)
        # the next step's first items are issued before the next forward starts: the next forward issues
        # items W.. only (checked above), so items 0..W-1 it runs came from the step before
        assert ring.copies and rt.deviations == 0 and rt.fallback_loads == 0
    finally:
        for h in handles:
            h.remove()
        monkeypatch.undo()
        rt.undo()


def test_the_recorder_sees_what_breaks_the_boundary(monkeypatch):
    """The test above can fail: an invalidation between steps (what a LoRA re-patch does) shows up as
    an invalidate + synchronize outside the forwards and a re-prime (hazard copies) in the next one."""
    m, x, ref, plan, names = _mixed_case(12, 2)
    rt = apply(m, plan, progress=False, autotune=False)
    handles = []
    try:
        with torch.no_grad():
            for _ in range(2):
                m(x)
        log, handles = record(monkeypatch, rt, m)
        with torch.no_grad():
            m(x)
            rt.invalidate()
            m(x)
        steps, outside = forwards(log)
        assert ("invalidate",) in outside and ("sync", "Backend.synchronize") in outside
        second = steps[1][1]
        assert ("prime",) in second and any(e[0] == "copy" and e[2] for e in second)
    finally:
        for h in handles:
            h.remove()
        monkeypatch.undo()
        rt.undo()


def _cuda_case(seed):
    """Mixed (tests/runtime_toys.py) computing on cuda:0, every unit streamed from pinned host homes; its
    resident output on the GPU as the reference."""
    import copy
    from runtime_toys import Mixed, _mixed_plan
    torch.manual_seed(seed)
    m = Mixed().eval()
    x = torch.randn(4, 8, device="cuda:0")
    with torch.no_grad():
        ref = copy.deepcopy(m).to("cuda:0")(x)
    plan, names = _mixed_plan(m, 2)
    plan.compute = "cuda:0"
    for u in plan.units:
        if u.device != "cpu":
            u.device = "cuda:0"
    return m, x, ref, plan


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_steady_state_forwards_never_synchronize_and_prefetch_the_next_step(monkeypatch):
    """On the GPU, with window autotune on (its measured step synchronizes once, before the steady state):
    torch's sync debug mode raises on any synchronizing call during five steady-state forwards, and the
    recorder sees the next step's first items issued during the step before."""
    m, x, ref, plan = _cuda_case(21)
    rt = apply(m, plan, progress=False)          # autotune: on (CUDA, estimated plan)
    handles = []
    try:
        assert rt.autotune.enabled
        with torch.no_grad():
            for _ in range(4):
                assert torch.equal(m(x), ref)
        assert not rt.autotune.enabled and rt.plan.predicted["basis"] == "measured"
        W, ng = rt.ring.W, rt.ring.ng
        assert 1 <= W < ng
        log, handles = record(monkeypatch, rt, m)
        outs = []
        torch.cuda.set_sync_debug_mode("error")
        try:
            with torch.no_grad():
                for _ in range(5):
                    outs.append(m(x))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(torch.equal(o, ref) for o in outs)
        steps, outside = forwards(log)
        assert len(steps) == 5 and outside == []
        for step, es in steps:
            assert not [e for e in es if e[0] in ("sync", "invalidate", "prime", "forget", "resize")]
            assert [e[1] for e in es if e[0] == "copy"] == list(range(W, ng)) + list(range(W))
    finally:
        for h in handles:
            h.remove()
        monkeypatch.undo()
        rt.undo()
