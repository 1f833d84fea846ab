"""Units streamed compressed (Plan.codec, runtime/codec_stream.py) on CPU: the same homes / ring / decode
code that runs on CUDA, with the torch reference decoder.  Outputs, gradients, state dicts and undo must
equal the uncompiled model's bit for bit."""
from __future__ import annotations

import copy

import pytest
import torch

from distorch.errors import DisTorchError
from distorch.runtime import fill as _fill
from distorch.runtime import stats as rstats
from distorch.runtime.apply import apply
from distorch.runtime.codec_stream import CodedBinder, SlotDecode
from distorch.runtime.guard import StateError

from runtime_toys import ToyDiT, make_plan, toy_inputs

D = 256          # Linear weights of 256 x 256 and up: at least formats.bf16_encode.MIN_CODED_NUMEL values


def toy(dtype=torch.bfloat16, depth=3):
    torch.manual_seed(0)
    m = ToyDiT(d=D, depth=depth).eval().to(dtype)
    x, t = toy_inputs()
    args = (x.to(dtype), t.to(dtype))
    return m, args


def coded_plan(m, offloaded, codec=None, **kw):
    plan = make_plan(m, offloaded, **kw)
    names = offloaded if codec is None else codec
    plan.codec = {u.name: u.bytes for u in plan.units if u.name in names}
    return plan


def state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("which,slots", [("all", 1), ("all", 2), ("some", 2)])
def test_compressed_units_bit_identical(dtype, which, slots):
    m, args = toy(dtype)
    with torch.no_grad():
        ref = m(*args)
    before = state(m)
    off = [f"blocks.{i}" for i in range(3)] if which == "all" else ["blocks.0", "blocks.2"]
    rt = apply(m, coded_plan(m, off), window_units=slots, progress=False)
    coded = [b for P in rt.store.params for b in P if type(b) is CodedBinder]
    assert coded, "no tensor was coded"
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(m(*args), ref)
    st = rstats.summarize(rt)["codec"]
    assert st["tensors"] == len(coded) and st["raw_bytes"] > st["stored_bytes"] > 0
    assert f"compressed: {len(coded)} tensors" in rstats.format_stats(rstats.summarize(rt))
    if dtype == torch.bfloat16:
        assert st["ratio"] < 0.8, st
    # homes hold the packed bytes: fewer than the raw ones
    raw = sum(p.numel() * p.element_size() for n in off for p in m.get_submodule(n).parameters())
    assert sum(h.nbytes for h in rt.store.homes.values()) < raw
    after = state(m)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], before[k]) for k in before)
    rt.undo("cpu")
    for k, v in m.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    with torch.no_grad():
        assert torch.equal(m(*args), ref)


def test_uncoded_units_of_the_plan_stream_raw():
    m, args = toy()
    with torch.no_grad():
        ref = m(*args)
    off = ["blocks.0", "blocks.1", "blocks.2"]
    rt = apply(m, coded_plan(m, off, codec=["blocks.1"]), progress=False)
    kinds = [any(type(b) is CodedBinder for b in P) for P in rt.store.params]
    assert kinds == [False, True, False]
    with torch.no_grad():
        assert torch.equal(m(*args), ref)
    rt.undo()


def test_load_state_dict_and_deepcopy():
    m, args = toy()
    other, _ = toy()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)                  # values that code to more bytes
        ref = m(*args)
    rt = apply(m, coded_plan(m, ["blocks.0", "blocks.1", "blocks.2"]), progress=False)
    clone = copy.deepcopy(m)
    assert not hasattr(clone, "_distorch_runtime")
    with torch.no_grad():
        assert torch.equal(clone(*args), ref)
    # values that code to more bytes than their homes hold: refused before anything is written
    with pytest.raises(StateError, match="changed nothing"):
        m.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert torch.equal(m(*args), ref)
    # values that fit (a permutation of each weight's own values codes to the same size) are written
    new = {k: (v.flip(0) if v.dim() == 2 and k.startswith("blocks.") else v) for k, v in m.state_dict().items()}
    with torch.no_grad():
        fresh, _ = toy()
        fresh.load_state_dict(new)
        ref_new = fresh(*args)
    m.load_state_dict(new)
    with torch.no_grad():
        assert torch.equal(m(*args), ref_new)
    st = m.state_dict()
    for k, v in new.items():
        assert torch.equal(st[k], v), k
    rt.undo()
    with torch.no_grad():
        assert torch.equal(m(*args), ref_new)


def test_gradients_equal_uncompiled():
    m, args = toy(torch.float32)
    m = m.to(torch.bfloat16)
    ref_m = copy.deepcopy(m)
    x = args[0].to(torch.bfloat16).requires_grad_(True)
    t = args[1].to(torch.bfloat16)
    ref_m(x, t).float().square().sum().backward()
    gx_ref, gw_ref = x.grad.clone(), {k: p.grad.clone() for k, p in ref_m.named_parameters()}
    x.grad = None
    apply(m, coded_plan(m, ["blocks.0", "blocks.1", "blocks.2"]), progress=False)
    m(x, t).float().square().sum().backward()
    assert torch.equal(x.grad, gx_ref)
    for k, p in m.named_parameters():
        if k.startswith("blocks."):
            assert p.grad is not None and torch.equal(p.grad, gw_ref[k]), k


def test_failed_fill_restores_every_weight(monkeypatch, fail_fill_after):
    m, args = toy()
    before = state(m)
    real = fail_fill_after(12)
    with pytest.raises(DisTorchError, match="disk on fire"):
        apply(m, coded_plan(m, ["blocks.0", "blocks.1", "blocks.2"]), progress=False)
    monkeypatch.setattr(_fill, "copy_piece", real)
    after = {k: v for k, v in m.state_dict().items()}
    for k, v in before.items():
        assert after[k].shape == v.shape and torch.equal(after[k], v), k


def test_scratch_is_one_unit_and_parameters_keep_their_shape():
    m, args = toy()
    shapes = {k: (p.shape, p.dtype) for k, p in m.named_parameters()}
    rt = apply(m, coded_plan(m, ["blocks.0", "blocks.1", "blocks.2"]), progress=False)
    part = rt.codec
    assert isinstance(part, SlotDecode)
    one = max(sum(p.numel() * p.element_size() for p in m.get_submodule(f"blocks.{i}").parameters())
              for i in range(3))
    assert 0 < part.nbytes <= one
    for k, p in m.named_parameters():
        assert (p.shape, p.dtype) == shapes[k], k
    rt.undo()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_compressed_bit_identical_and_vram(dtype):
    """On the GPU (Triton decoder when installed): outputs equal the resident model's bit for bit, and the
    device holds the resident weights + the slots (packed bytes) + one unit's decode scratch."""
    m, args = toy(dtype, depth=4)
    dev = "cuda:0"
    resident = copy.deepcopy(m).to(dev)
    cargs = tuple(a.to(dev) for a in args)
    with torch.no_grad():
        ref = resident(*cargs)
    del resident
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    off = [f"blocks.{i}" for i in range(4)]
    plan = coded_plan(m, off, compute=dev)
    rt = apply(m, plan, window_units=2, progress=False)
    held = torch.cuda.memory_allocated() - base
    slots = rt.ring.W * rt.ring.slot_bytes
    resident_bytes = sum(p.numel() * p.element_size() for n, p in m.named_parameters()
                         if not n.startswith("blocks.")) + sum(b.numel() * b.element_size() for b in m.buffers())
    assert held <= resident_bytes + slots + rt.codec.nbytes + (1 << 20)
    with torch.no_grad():
        for _ in range(3):
            assert torch.equal(m(*cargs), ref)
    rt.undo("cpu")


@pytest.mark.parametrize("compress", ["on", "auto", "off"])
def test_compile_compress_modes_on_the_host(compress):
    """distorch.compile(compress=...): "on" streams every offloaded bf16 unit compressed, bit-identical;
    "auto" on a host computing never does (its decoder runs at ~0.13 GB/s); "off" never."""
    import distorch
    m, args = toy(depth=4)
    with torch.no_grad():
        ref = m(*args)
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    h = distorch.compile(m, "cpu", offload_gb=0.6 * size / 2**30, compress=compress, granularity="block",
                         progress=False)
    assert bool(h.plan.codec) == (compress == "on")
    assert h.plan.predicted["codec"]["mode"] == compress
    with torch.no_grad():
        assert torch.equal(m(*args), ref)
    st = h.stats["codec"] if isinstance(h.stats, dict) else h.stats()["codec"]
    assert (st is not None) == (compress == "on")
    h.undo()


def test_compress_mode_is_checked():
    import distorch
    m, _ = toy(depth=1)
    with pytest.raises(DisTorchError, match="compress='zip'"):
        distorch.compile(m, "cpu", offload_gb=0.0001, compress="zip", progress=False)


def test_measured_prediction_of_a_compressed_plan():
    """After a profiled step the prediction is re-simulated from measured unit times with the units' bytes
    as streamed (the window was sized for the packed bytes; raw ones would not fit it)."""
    import distorch
    m, args = toy(depth=4)
    with torch.no_grad():
        ref = m(*args)
    size = sum(p.numel() * p.element_size() for p in m.parameters())
    h = distorch.compile(m, "cpu", offload_gb=0.6 * size / 2**30, compress="on", granularity="block",
                         example_args=args, profile=True, progress=False)
    try:
        assert h.plan.codec and h.plan.window_bytes < max(u.bytes for u in h.plan.offloaded()) * 2
        with torch.no_grad():
            for _ in range(3):
                assert torch.equal(m(*args), ref)
        assert h.plan.predicted["basis"] == "measured"
    finally:
        h.undo()


def test_device_out_of_memory_codes_on_the_host(monkeypatch, caplog):
    """A compute GPU without room for the coding's scratch: those tensors are coded on the host (the same
    bytes), with one warning; the load does not fail."""
    from distorch.runtime import codec_stream as cs
    m, args = toy(depth=2)
    params = [(n, p) for n, p in m.named_parameters() if n.startswith("blocks.0.") and p.numel() >= 1 << 16]

    def oom(t, device, infer, staging):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
    monkeypatch.setattr(cs, "_encode_gpu", oom)
    want = {id(p): cs.encode(p.detach()) for _, p in params}
    with caplog.at_level("WARNING", logger="distorch.runtime.codec_stream"):
        out = cs.encode_units({"blocks.0": params}, ["blocks.0"], "cuda:0", progress=False)
    assert len(out.meta) == len(params)
    for _, p in params:
        assert out.enc[id(p)].meta == want[id(p)].meta and torch.equal(out.enc[id(p)].buf, want[id(p)].buf)
    assert "coded on the host instead" in caplog.text
    out.restore()


def test_homes_read_from_the_file_stream_raw_within_the_window(tmp_path):
    """runtime.loading reads a file straight into homes: those units stream raw even when the plan names
    them in Plan.codec, and the ring's slots are counted in raw bytes (never more than the plan's window)."""
    import os
    from safetensors.torch import save_file
    from distorch.runtime.loading import load_into
    m, args = toy(depth=3)
    with torch.no_grad():
        ref = m(*args)
    path = os.path.join(tmp_path, "toy.safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
    with torch.device("meta"):
        fresh = ToyDiT(d=D, depth=3).eval().to(torch.bfloat16)
    off = ["blocks.0", "blocks.1", "blocks.2"]
    plan = coded_plan(fresh, off)
    raw = max(u.bytes for u in plan.units if u.name in off)
    plan.codec = {n: int(b * 0.5) for n, b in plan.codec.items()}     # (3 items: 3 slots of those would fit)
    plan.window_bytes = 2 * raw
    rt = load_into(fresh, path, plan, progress=False)
    try:
        assert not any(type(b) is CodedBinder for P in rt.store.params for b in P)
        assert rt.ring.W * rt.ring.slot_bytes <= plan.window_bytes + 4096
        with torch.no_grad():
            assert torch.equal(fresh(*args), ref)
    finally:
        rt.undo()


def test_device_coding_path_through_the_staging_buffers():
    """The coding workers' path (formats.bf16_encode_torch, then a download through a per-thread staging
    buffer into a buffer of its own), run here on the host device: the bytes equal the host encoder's, a
    staging buffer is reused and grown, and every result owns its memory (not a view of the stage)."""
    from concurrent.futures import ThreadPoolExecutor
    from distorch.runtime import codec_stream as cs
    g = torch.Generator().manual_seed(3)
    ts = [(torch.randn(n, 512, generator=g) * 0.02).to(dt) for n, dt in
          ((256, torch.bfloat16), (300, torch.float16), (1024, torch.bfloat16), (128, torch.bfloat16))]
    stage = cs.Staging()
    try:
        with ThreadPoolExecutor(2) as pool:
            outs = list(pool.map(lambda t: cs._encode_gpu(t, torch.device("cpu"), False, stage), ts))
        for t, enc in zip(ts, outs):
            ref = cs.encode(t)
            assert enc.meta == ref.meta and torch.equal(enc.buf, ref.buf)
            assert enc.buf.untyped_storage().data_ptr() not in {b.untyped_storage().data_ptr() for b, _ in stage.bufs}
        assert 1 <= len(stage.bufs) <= 2 and all(b.numel() >= cs.STAGE_MIN for b, _ in stage.bufs)
        big = stage.get(cs.STAGE_MIN + 1)           # grown for a larger tensor
        assert big.numel() == cs.STAGE_MIN + 1 and len(stage.bufs) >= 2
    finally:
        stage.close()
    assert stage.bufs == []
