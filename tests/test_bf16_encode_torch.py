"""formats/bf16_encode_torch.py: the torch-ops encoder (runs on the tensor's device) against the numpy one.

Every encode is compared byte for byte with formats.bf16_encode.encode (metadata and packed buffer), and
decoded back (formats.bf16_codec.decode) bit for bit on the int16 view.  The CPU runs both histogram
paths (bincount, and the index_add_ one CUDA takes); the CUDA test runs only where a GPU is present."""
from __future__ import annotations

import math
import warnings

import pytest
import torch

from distorch.errors import DisTorchError
from distorch.formats import bf16_encode_torch as et
from distorch.formats.bf16_codec import CodecError, CodecMeta, Encoded, decode, layout
from distorch.formats.bf16_encode import encode
from distorch.formats.bf16_encode_torch import encode_on, prepare, temp_bytes

DTYPES = [torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.int16)


def normal(shape, dtype, std=0.02, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def every_pattern(dtype) -> torch.Tensor:
    """All 65536 bit patterns: every exponent, subnormals, +-0, +-inf, every NaN payload."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def shuffled(t: torch.Tensor, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return t.reshape(-1)[torch.randperm(t.numel(), generator=g)].reshape(t.shape)


def same(t: torch.Tensor, **kw) -> Encoded:
    """encode_on(t) == encode(t) byte for byte, and it decodes to t bit for bit; returns encode_on's."""
    ref = encode(t, **{k: v for k, v in kw.items() if k != "chunk"})
    got = encode_on(t, **kw)
    assert got.meta == ref.meta
    assert got.buf.dtype == torch.uint8 and got.buf.dim() == 1 and got.buf.device == t.device
    assert torch.equal(got.buf.cpu(), ref.buf), f"packed bytes differ ({kw})"
    assert torch.equal(bits(decode(got)), bits(t.cpu() if got.buf.device.type == "cpu" else t))
    return got


@pytest.fixture(params=["bincount", "index_add"])
def hist_path(request, monkeypatch):
    """Both histogram paths on the CPU: bincount, and CUDA's index_add_ of ones."""
    monkeypatch.setattr(et, "_ATOMIC_ON_CPU", request.param == "index_add")
    return request.param


# ------------------------------------------------------------------------------------------------
# byte-identical to the numpy encoder

SHAPES = [(1,), (7,), (8,), (63,), (64,), (65,), (1000,), (3, 333), (2, 3, 5, 7), (129, 64), (4099,), (70001,)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_same_bytes_shapes(shape, dtype, hist_path):
    t = normal(shape, dtype, seed=math.prod(shape))
    for block in (64, 256):
        same(t, block=block)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_empty_tensor(dtype):
    t = torch.zeros((0, 5), dtype=dtype)
    enc = same(t, block=64)
    assert enc.meta.widths == (0,) and decode(enc).shape == (0, 5)
    # forced levels (the numpy encoder cannot do these on an empty tensor; the layout is still valid)
    enc = encode_on(t, widths=(2, 3))
    assert enc.meta.entries == (0,) and enc.nbytes == layout(enc.meta).total
    assert decode(Encoded.from_packed(enc.buf, enc.meta)).shape == (0, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("max_levels", [1, 2, 3, 4])
def test_same_bytes_max_levels(max_levels, dtype, hist_path):
    for std, seed in ((0.02, 1), (0.002, 2), (1.0, 3)):
        t = normal((5000,), dtype, std=std, seed=seed)
        same(t, block=128, max_levels=max_levels)


@pytest.mark.parametrize("widths", [(8,), (5,), (3, 5), (2, 2, 5), (1, 1, 1, 8), (2, 2, 2, 2), (4, 4, 0), (2, 6),
                                    (7, 1), (6, 2, 2), (8, 2), (1, 8)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_bytes_forced_widths(widths, dtype):
    t = normal((3001,), dtype, seed=7)
    distinct = int(torch.unique((bits(t).to(torch.int32) >> (10 if dtype == torch.float16 else 7)) &
                                (0x1F if dtype == torch.float16 else 0xFF)).numel())
    meta = CodecMeta(str(dtype)[6:], (3001,), 64, widths, (0,) * (len(widths) - 1))
    if distinct > meta.table_len():
        with pytest.raises(DisTorchError, match="distinct exponents"):
            encode_on(t, block=64, widths=widths)
        return
    same(t, block=64, widths=widths)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_levels_past_rank_255(dtype):
    """Forced widths whose later levels start past rank 255 (empty levels): the numpy encoder overflows
    its uint8 ranks there; this one writes empty levels, which decode."""
    t = every_pattern(dtype)
    for widths in ((8, 8, 8, 8), (8, 8, 1)):
        enc = encode_on(t, block=256, widths=widths)
        assert enc.meta.entries[1:] == (0,) * (len(widths) - 2)
        assert torch.equal(bits(decode(Encoded.from_packed(enc.buf, enc.meta, check_contents=False))), bits(t))


@pytest.mark.parametrize("chunk", [1, 64, 200, 1000, 4096, 1 << 30])
def test_same_bytes_any_chunking(chunk, hist_path):
    """Chunks of one block up to the whole tensor, including a short last chunk."""
    for dtype in DTYPES:
        t = normal((9000,), dtype, seed=11)
        same(t, block=64, chunk=chunk)
        same(t, block=128, chunk=chunk, widths=(1, 1, 1, 8))


def test_same_bytes_larger(hist_path):
    t = normal((300, 1111), torch.bfloat16, seed=5)        # 333300 values: 163 blocks, the last short
    same(t)
    same(t, chunk=50000)
    same(t, max_levels=4, chunk=70000)


def test_non_contiguous_input():
    t = normal((64, 300), torch.bfloat16, seed=3).t()
    assert not t.is_contiguous()
    enc = same(t, block=64)
    assert enc.meta.shape == (300, 64)


# ------------------------------------------------------------------------------------------------
# adversarial tensors

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_bit_pattern(dtype, hist_path):
    t = every_pattern(dtype)
    for kw in ({"block": 1024}, {"block": 64, "max_levels": 1}, {"block": 64, "max_levels": 2},
               {"block": 64, "max_levels": 4}, {"block": 256, "widths": (1, 1, 1, 8)}, {"widths": (8,)}):
        same(t, **kw)
        same(shuffled(t), **kw)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_in_weights(dtype, hist_path):
    t = normal((20000,), dtype, seed=4)
    specials = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")], dtype=dtype)
    t[::97] = specials.repeat(len(t[::97]) // 5 + 1)[:len(t[::97])]
    u = bits(t)
    u[5::331] = torch.tensor(0x7FC1 if dtype == torch.bfloat16 else 0x7E01, dtype=torch.int16)    # NaN payload
    u[7::333] = torch.tensor(0x0001, dtype=torch.int16)                                            # subnormal
    u[9::335] = torch.tensor(-32767, dtype=torch.int16)                                            # -subnormal
    same(t, block=64)
    same(t, block=2048, max_levels=4)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, -3.5, float("inf"), float("nan"), 1e-40])
def test_all_equal_tensor(value, dtype, hist_path):
    for n in (1, 9, 64, 1000):
        t = torch.full((n,), value, dtype=dtype)
        enc = same(t, block=64)
        assert enc.meta.widths == (0,)


def test_every_exponent_present_bf16(hist_path):
    """256 distinct exponents, each with a different count (ranks fully ordered), and ties."""
    e = torch.arange(256, dtype=torch.int32)
    counts = torch.cat([e.repeat_interleave(1 + (e % 7)), e])          # ties between symbols
    u = (counts << 7) | (torch.arange(counts.numel()) % 128)
    t = shuffled(u.to(torch.int16).view(torch.bfloat16), seed=9)
    for ml in (1, 2, 3, 4):
        same(t, block=64, max_levels=ml)


# ------------------------------------------------------------------------------------------------
# the API

def test_prepare_then_write_into_out():
    t = normal((50000,), torch.bfloat16, seed=8)
    ref = encode(t)
    job = prepare(t)
    assert job.meta == ref.meta and job.nbytes == ref.nbytes == layout(job.meta).total
    assert job.device == t.device
    out = torch.full((job.nbytes,), 0xAB, dtype=torch.uint8)         # garbage: every byte is written
    enc = job.write(out)
    assert enc.buf is out and torch.equal(out, ref.buf)
    arena = torch.full((job.nbytes + 100,), 0xCD, dtype=torch.uint8)
    enc = encode_on(t, out=arena[41:41 + job.nbytes])                 # a slice of a larger arena, odd start
    assert torch.equal(arena[41:41 + job.nbytes], ref.buf)
    assert bool((arena[:41] == 0xCD).all()) and bool((arena[41 + job.nbytes:] == 0xCD).all())
    assert torch.equal(job.write().buf, ref.buf)                      # write() can run again
    enc = encode_on(t, out=arena[16:16 + job.nbytes])                 # (the decoders want 16-byte starts)
    Encoded.from_packed(enc.buf, enc.meta)                            # contents valid
    assert torch.equal(bits(decode(enc)), bits(t))


def test_out_must_fit():
    t = normal((1000,), torch.float16)
    job = prepare(t, block=64)
    for bad in (torch.empty(job.nbytes + 1, dtype=torch.uint8), torch.empty(job.nbytes, dtype=torch.int8),
                torch.empty(2 * job.nbytes, dtype=torch.uint8)[::2], torch.empty(1, job.nbytes, dtype=torch.uint8),
                "buffer"):
        with pytest.raises(DisTorchError, match="exactly"):
            job.write(bad)


def test_rejects_what_encode_rejects():
    cases = [((torch.zeros(4),), {}), ((torch.zeros(4, dtype=torch.bfloat16),), {"block": 100}),
             ((torch.zeros(4, dtype=torch.bfloat16),), {"max_levels": 0}),
             ((torch.zeros(4, dtype=torch.bfloat16),), {"max_levels": 5}),
             ((normal((1000,), torch.bfloat16),), {"widths": (2,)}),
             ((torch.zeros(4, dtype=torch.bfloat16),), {"widths": (0, 3)}),
             ((torch.zeros(4, dtype=torch.bfloat16),), {"widths": (9,)}),
             ((torch.zeros(4, dtype=torch.bfloat16),), {"widths": (1, 1, 1, 1, 1)}),
             (([1, 2],), {})]
    for args, kw in cases:
        with pytest.raises(DisTorchError) as want:
            encode(*args, **kw)
        with pytest.raises(DisTorchError) as got:
            encode_on(*args, **kw)
        assert type(got.value) is type(want.value) and str(got.value) == str(want.value), (kw, got.value)
    assert issubclass(CodecError, DisTorchError)
    with pytest.raises(DisTorchError, match="chunk"):
        encode_on(torch.zeros(4, dtype=torch.bfloat16), chunk=0)


def test_no_python_loop_over_blocks():
    """The number of torch ops does not grow with the number of blocks of a chunk (only with chunks
    and levels)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n in (64 * 100, 64 * 1000):
        t = normal((n,), torch.bfloat16, seed=1)
        with Count() as c:
            encode_on(t, block=64, widths=(2, 2, 5))
        counts.append(c.n)
    assert counts[0] == counts[1], counts


def _cpu_peak_bytes(fn) -> int:
    """Peak bytes of CPU allocations during fn() (the profiler's memory events)."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("case", ["weights", "worst", "fp16 small blocks", "chunked"])
def test_cpu_scratch_within_bound(case):
    kw = {}
    if case == "weights":
        t = normal((1 << 18,), torch.bfloat16)
    elif case == "worst":
        t = shuffled(every_pattern(torch.float16).repeat(4))
        kw = {"widths": (1, 1, 1, 8), "block": 64}
    elif case == "fp16 small blocks":
        t = normal((1 << 18,), torch.float16)
        kw = {"block": 64}
    else:
        t = normal((1 << 19,), torch.bfloat16)
        kw = {"chunk": 100_000, "max_levels": 4}
    job = prepare(t, **kw)
    out = torch.empty(job.nbytes, dtype=torch.uint8)
    bound = temp_bytes(t.numel(), t.dtype, kw.get("block", 2048), kw.get("chunk", et.DEFAULT_DEVICE_CHUNK))
    p1 = _cpu_peak_bytes(lambda: prepare(t, **kw))
    p2 = _cpu_peak_bytes(lambda: job.write(out))
    assert max(p1, p2) <= bound, (p1, p2, bound)
    assert torch.equal(out, encode(t, **{k: v for k, v in kw.items() if k != "chunk"}).buf)


def test_temp_bytes_bound_shape():
    n = 3072 * 12288
    b = temp_bytes(n, torch.bfloat16)
    assert b <= 24 * et.DEFAULT_DEVICE_CHUNK + 0.26 * 2 * n + (8 << 20)
    assert temp_bytes(n, torch.bfloat16, chunk=1 << 20) < b
    assert temp_bytes(n, torch.bfloat16, staged_bytes=12345) == b + 12345
    small = temp_bytes(1000, "bfloat16", 64)
    assert small < (6 << 20)


# ------------------------------------------------------------------------------------------------
# CUDA

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_same_bytes_one_sync_bounded_memory(dtype):
    dev = torch.device("cuda")
    cases = [(normal((3072, 12288), dtype), {}), (normal((4099,), dtype), {"block": 64}),
             (shuffled(every_pattern(dtype)), {"block": 256, "widths": (1, 1, 1, 8)}),
             (normal((70001,), dtype), {"max_levels": 4, "chunk": 20000}),
             (torch.full((1000,), -0.0, dtype=dtype), {"block": 64})]
    for t, kw in cases:
        ref = encode(t, **{k: v for k, v in kw.items() if k != "chunk"})
        g = t.to(dev)
        torch.cuda.synchronize()
        # phase 1: exactly one synchronizing call (the counts read back)
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                job = prepare(g, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
        assert len(syncs) == 1, [str(w.message) for w in syncs]
        assert job.meta == ref.meta and job.nbytes == ref.nbytes
        # phase 2 into a device slice, then into pinned host memory: no sync at all
        dslot = torch.empty(job.nbytes, dtype=torch.uint8, device=dev)
        host = torch.empty(job.nbytes, dtype=torch.uint8, pin_memory=True)
        kept = torch.cuda.memory_allocated() - base              # what prepare holds (tables) + dslot
        torch.cuda.set_sync_debug_mode("error")
        try:
            enc = job.write(dslot)
            job.write(host)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base     # before the checks (the reference decoder's own
        #                                                     temporaries are ~20x the tensor)
        assert enc.buf is dslot and torch.equal(dslot.cpu(), ref.buf)
        assert torch.equal(host, ref.buf)
        assert torch.equal(bits(decode(enc)), bits(g))
        block, chunk = kw.get("block", 2048), kw.get("chunk", et.DEFAULT_DEVICE_CHUNK)
        bound = temp_bytes(t.numel(), dtype, block, chunk, staged_bytes=job.nbytes) + kept
        assert peak <= bound, (tuple(t.shape), kw, peak, bound)
        del job, enc, dslot, host, g
        torch.cuda.empty_cache()
        # one call, the buffer on the device
        same(t.to(dev), **kw)
