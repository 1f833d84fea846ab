"""torch.compile on top of distorch.compile: no recompilation per unit or per step (CPU).

The runtime's hooks are opaque to Dynamo (runtime/compile_boundary.py): each streamed unit's boundary is
one graph break and the code between the breaks compiles once per unit type.  A counting backend sees
every graph Dynamo hands over; the count must stay bounded (well under one per unit) and must not grow
after the first forward, and the output must equal eager's.
"""
import logging

import pytest
import torch

import distorch
from distorch.demo import TinyFlux

dynamo = pytest.importorskip("torch._dynamo")

CFG = dict(dim=128, heads=2, double=3, single=5, in_ch=8, ctx_dim=16, pooled_dim=8)


def _model_and_inputs():
    torch.manual_seed(0)
    m = TinyFlux(**CFG).eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 16, CFG["in_ch"], generator=g)
    t = torch.tensor([0.5])
    ctx = torch.randn(1, 8, CFG["ctx_dim"], generator=g)
    pooled = torch.randn(1, CFG["pooled_dim"], generator=g)
    return m, (x, t, ctx, pooled)


def _graph_counts(m, args, ref, steps: int) -> list[int]:
    """torch.compile(m) with a backend that counts the graphs it is given; after each of `steps` calls (each
    equal to `ref`), the number of graphs so far."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    cm = torch.compile(m, backend=counting_backend)
    counts = []
    for _ in range(steps):
        with torch.no_grad():
            assert torch.equal(cm(*args), ref)
        counts.append(len(graphs))
    return counts


@pytest.mark.parametrize("profile", [False, True])
def test_torch_compile_after_distorch_compile_does_not_recompile_per_unit(profile):
    m, args = _model_and_inputs()
    with torch.no_grad():
        ref = m(*args)
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    h = distorch.compile(m, compute="cpu", offload_gb=0.5 * total / 2**30, donors=["cpu"],
                         example_args=args, progress=False, profile=profile)
    n_streamed = len(h.plan.offloaded())
    n_units = len(h.plan.units)
    assert n_streamed >= 3

    dynamo.reset()
    try:
        counts = _graph_counts(m, args, ref, 4)
        # bounded: fewer graphs than streamed units (one per unit type plus the root's pieces; traced
        # hooks gave 13 graphs for these 7 streamed units, and more at the second step).  Profiling
        # times every unit, so every unit boundary is a break: fewer graphs than units then ...
        bound = n_units if profile else n_streamed
        assert 0 < counts[0] < bound, (counts, n_streamed, n_units)
        # ... and constant: steps 2..4 compile nothing new (no guard on the runtime's state fails)
        assert counts[0] == counts[1] == counts[2] == counts[3], counts
        st = h.stats
        assert st["deviations"] == 0 and st["fallback_loads"] == 0
        # eager still works, and equals
        with torch.no_grad():
            assert torch.equal(m(*args), ref)
    finally:
        dynamo.reset()
        h.undo()


def test_no_recompiles_when_profiling_turns_on_mid_run():
    """Dynamo's own frame counter, not only the graph count: the H200 run compiled the hook wrapper's
    resume frame once per distinct hook function until the recompile limit, once the profiled step
    (window autotune) added profile hooks.  With more streamed units than the limit (8) and profiling
    switched on and off between steps, no frame is compiled after the first step of each mode."""
    from torch._dynamo.utils import counters
    from distorch.runtime import compile_boundary
    torch.manual_seed(0)
    cfg = dict(CFG, double=6, single=12)
    m = TinyFlux(**cfg).eval()
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(1, 16, cfg["in_ch"], generator=g), torch.tensor([0.5]),
            torch.randn(1, 8, cfg["ctx_dim"], generator=g), torch.randn(1, cfg["pooled_dim"], generator=g))
    with torch.no_grad():
        ref = m(*args)
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    h = distorch.compile(m, compute="cpu", offload_gb=0.5 * total / 2**30, donors=["cpu"], progress=False)
    assert len(h.plan.offloaded()) > 8
    dynamo.reset()
    counters.clear()
    seen: list[str] = []

    class Catch(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    catch = Catch()
    torch._logging.set_logs(recompiles=True)
    logging.getLogger("torch._dynamo").addHandler(catch)
    try:
        cm = torch.compile(m, backend=lambda gm, ex: gm.forward)
        frames = []
        for profile in (False, True, False):
            h.runtime.profile = profile
            for _ in range(2):
                with torch.no_grad():
                    assert torch.equal(cm(*args), ref)
                frames.append(counters["frames"]["total"])
        assert frames[1] == frames[0] and frames[3] == frames[2] and frames[5] == frames[4], frames
        if getattr(compile_boundary, "SKIPPED", True):
            # the wrapper's frames are never compiled, so nothing recompiles for each hook function
            assert frames[-1] == frames[0], frames
            recompiled = [s for s in seen if "Recompiling function" in s]
            assert not recompiled, recompiled[:3]
    finally:
        logging.getLogger("torch._dynamo").removeHandler(catch)
        torch._logging.set_logs()
        dynamo.reset()
        h.undo()


def test_torch_compile_over_compressed_units():
    """Units streamed compressed (Plan.codec): their parameters are rebound to the decode scratch in the
    (opaque) pre hook, so torch.compile sees the same tensors every step: equal outputs, no new graphs
    after the first step."""
    m, args = _model_and_inputs()
    m = m.to(torch.bfloat16)
    args = tuple(a.to(torch.bfloat16) for a in args)
    with torch.no_grad():
        ref = m(*args)
    total = sum(p.numel() * p.element_size() for p in m.parameters())
    h = distorch.compile(m, compute="cpu", offload_gb=0.5 * total / 2**30, donors=["cpu"], compress="on",
                         granularity="block", example_args=args, progress=False)
    assert h.plan.codec and h.runtime.codec.nbytes
    dynamo.reset()
    try:
        counts = _graph_counts(m, args, ref, 3)
        assert counts[0] == counts[1] == counts[2], counts
    finally:
        dynamo.reset()
        h.undo()
