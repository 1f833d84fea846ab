"""Runtime tests on CUDA (skipped without a GPU; the donor-GPU test needs two): bit-identity and peak VRAM of
streamed blocks, order deviations, a donor GPU home."""
from __future__ import annotations

import pytest
import torch

from distorch.runtime import stats as rstats
from distorch.runtime.apply import apply

from runtime_toys import ToyDiT, Twice, make_plan, nbytes, run, toy_inputs


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
    rt = apply(m, Twice.plan(dev), window_units=2, progress=False)
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

