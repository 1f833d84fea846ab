"""formats/bf16_codec.py: the lossless bf16/fp16 codec (escape levels) and its Triton decoder.

Every round trip is compared on the int16 view (bit for bit: -0.0, NaN payloads, subnormals included).
The Triton kernel runs under Triton's CPU interpreter (conftest sets TRITON_INTERPRET=1 without CUDA);
bench/bench_codec.py runs it on a GPU."""
from __future__ import annotations

import itertools
import math
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from distorch.errors import DisTorchError, FileFormatError
from distorch.formats import bf16_codec as codec
from distorch.formats.bf16_codec import CodecError, CodecMeta, Encoded, decode
from distorch.formats.bf16_encode import choose_widths, encode

DTYPES = [torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.int16)


def assert_exact(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(bits(a), bits(b))


def normal(shape, dtype, std=0.02, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * std).to(dtype)


def every_pattern(dtype) -> torch.Tensor:
    """All 65536 bit patterns: every exponent, subnormals, +-0, +-inf, every NaN payload."""
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


def round_trip(t: torch.Tensor, **kw) -> Encoded:
    enc = encode(t, **kw)
    assert_exact(decode(enc), t)
    again = Encoded.from_packed(enc.pack().clone(), CodecMeta.from_dict(enc.meta.to_dict()))
    assert_exact(decode(again), t)
    return enc


# ------------------------------------------------------------------------------------------------
# round trips

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(0,), (1,), (7,), (8,), (63,), (64,), (65,), (1000,), (3, 333), (2, 3, 5, 7),
                                   (129, 64), (4099,)])
def test_round_trip_shapes(shape, dtype):
    t = normal(shape, dtype, seed=math.prod(shape))
    enc = round_trip(t, block=64)
    assert decode(enc).shape == t.shape
    round_trip(t)                                   # the default block (larger than most of these)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_bit_pattern(dtype):
    """All 256 (bf16) / 32 (fp16) exponents, subnormals, infinities, NaNs with every payload, -0.0."""
    t = every_pattern(dtype)
    enc = round_trip(t, block=1024)
    assert enc.meta.table_len() >= (256 if dtype == torch.bfloat16 else 32)
    shuffled = t[torch.randperm(t.numel(), generator=torch.Generator().manual_seed(1))]
    round_trip(shuffled, block=64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_special_values_in_normal_weights(dtype):
    t = normal((5000,), dtype, seed=3)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")], dtype=dtype)
    t[::97][:5] = special
    v = bits(t)
    nan_payloads = [0x7FC1, 0x7F81, -1, 0x7FFF] if dtype == torch.bfloat16 else [0x7E01, 0x7C01, -1, 0x7FFF]
    for i, p in enumerate(nan_payloads):                         # quiet, signalling, negative NaNs
        v[1000 + i] = p
    v[2000:2010] = torch.arange(1, 11, dtype=torch.int16)        # positive subnormals
    v[3000:3010] = torch.arange(1, 11, dtype=torch.int16) | -32768   # negative subnormals
    assert torch.isnan(t).sum() >= 5
    round_trip(t, block=64)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [0.0, -0.0, 1.0, float("nan"), 3e-39])
def test_single_distinct_value(value, dtype):
    t = torch.full((3000,), value, dtype=dtype)
    enc = round_trip(t, block=64)
    assert enc.meta.widths == (0,)                          # one exponent: no exponent bits at all
    raw_part = (11 if dtype == torch.float16 else 8) / 16
    assert enc.ratio < raw_part + 0.02


@pytest.mark.parametrize("widths", [(0,), (1, 8), (2, 8), (3, 8), (4, 8), (5, 8), (6,), (7, 8), (8,),
                                    (1, 1, 1, 8), (2, 3, 5, 6), (3, 2, 7), (2, 2, 2, 5)])
def test_forced_widths(widths):
    t = normal((3001,), torch.bfloat16, seed=5) if widths != (0,) else torch.ones(3001, dtype=torch.bfloat16)
    enc = round_trip(t, block=64, widths=widths)
    assert enc.meta.widths == widths


def test_forced_widths_too_narrow():
    with pytest.raises(DisTorchError, match="distinct"):
        encode(normal((1000,), torch.bfloat16), widths=(2,))


def test_deterministic_across_chunks_and_threads():
    t = normal((64, 1000), torch.bfloat16, seed=7)
    a = encode(t, block=256)
    b = encode(t, block=256, chunk=256)
    with ThreadPoolExecutor(3) as ex:
        c = encode(t, block=256, chunk=1024, executor=ex)
    assert torch.equal(a.buf, b.buf) and torch.equal(a.buf, c.buf) and a.meta == b.meta == c.meta


def test_encode_any_layout_and_alloc():
    base = normal((300, 200), torch.bfloat16, seed=9)
    t = base.t()                                            # not contiguous
    made = []

    def alloc(n):
        made.append(n)
        return torch.empty(n, dtype=torch.uint8)
    enc = encode(t, alloc=alloc)
    assert made == [enc.nbytes] and enc.meta.shape == (200, 300)
    assert_exact(decode(enc), t.contiguous())


def test_decode_into_out():
    t = normal((10, 100), torch.float16, seed=2)
    enc = encode(t, block=64)
    out = torch.empty(1000, dtype=torch.float16)
    assert decode(enc, out) is out
    assert_exact(out.view(10, 100), t)
    for bad in (torch.empty(1000, dtype=torch.bfloat16), torch.empty(999, dtype=torch.float16),
                torch.empty(2000, dtype=torch.float16)[::2]):
        with pytest.raises(DisTorchError, match="contiguous float16 tensor of 1000 values"):
            decode(enc, bad)


# ------------------------------------------------------------------------------------------------
# the format: ratio, width choice, layout

@pytest.mark.parametrize("std", [0.02, 0.002])
def test_ratio_of_weight_like_data(std):
    """Random normal bf16 (what trained weights look like): <= 0.70 of the raw bytes (DFloat11's Huffman
    code: 0.686 on FLUX.1-dev), within 3 % of the entropy bound of any exponent code."""
    t = normal((1 << 20,), torch.bfloat16, std=std, seed=11)
    enc = encode(t)
    assert enc.ratio <= 0.70
    u = bits(t).to(torch.int32) & 0xFFFF
    counts = torch.bincount((u >> 7) & 255, minlength=256)
    p = counts[counts > 0].double() / t.numel()
    entropy_ratio = (8 + float(-(p * p.log2()).sum())) / 16
    assert enc.ratio <= entropy_ratio * 1.03
    assert encode(t, max_levels=4).ratio <= enc.ratio


def test_ratio_heavy_tailed():
    g = torch.Generator().manual_seed(4)
    n = 1 << 19
    z = torch.randn(n, generator=g) / (torch.randn(n, 3, generator=g).pow(2).sum(1) / 3).sqrt()   # Student-t3
    assert encode((z * 0.012).to(torch.bfloat16)).ratio <= 0.71


def brute_force_bits(counts, max_levels):
    f = sorted((c for c in counts if c), reverse=True)
    best = None
    for levels in range(1, max_levels + 1):
        for ws in itertools.product(range(9), repeat=levels):
            if any(k == 0 for k in ws[:-1]):
                continue
            covered, total = 0, 0
            for j, k in enumerate(ws):
                total += sum(f[covered:]) * k
                if j < levels - 1:
                    covered += (1 << k) - 1
            if len(f) - min(covered, len(f)) > (1 << ws[-1]) or covered >= len(f) and levels > 1:
                continue
            best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("max_levels", [1, 2, 3])
def test_choose_widths_is_optimal(seed, max_levels):
    g = torch.Generator().manual_seed(seed)
    counts = (torch.rand(40, generator=g) ** 6 * 10000).long().tolist()
    ws = choose_widths(counts, n_blocks=0, max_levels=max_levels)   # n_blocks=0: code bits only
    assert 1 <= len(ws) <= max_levels
    f = sorted((c for c in counts if c), reverse=True)
    covered, total = 0, 0
    for j, k in enumerate(ws):
        total += sum(f[covered:]) * k
        covered += (1 << k) - 1
    assert total == brute_force_bits(counts, max_levels)


def test_choose_widths_edges():
    assert choose_widths([0, 5, 0]) == (0,)
    assert choose_widths([]) == (0,)
    assert choose_widths([1] * 256, max_levels=1) == (8,)
    with pytest.raises(DisTorchError, match="max_levels"):
        choose_widths([1, 2], max_levels=5)


def test_layout_aligned_and_sized():
    enc = encode(normal((777, 13), torch.float16, seed=1), block=128)
    lay = codec.layout(enc.meta)
    sections = [lay.offsets, lay.table, lay.raw, lay.hi, *lay.levels]
    assert all(start % 16 == 0 for start, _ in sections)
    assert all(a[0] + a[1] <= b[0] for a, b in zip(sections, sections[1:]))
    assert lay.total == enc.nbytes == enc.pack().numel()
    assert codec.scratch_bytes(enc.meta) == 0
    assert enc.section("offsets").shape == (enc.meta.levels - 1, enc.meta.n_blocks + 1)


def test_rejects_bad_input():
    with pytest.raises(DisTorchError, match="float32"):
        encode(torch.zeros(4))
    with pytest.raises(DisTorchError, match="block 100"):
        encode(torch.zeros(4, dtype=torch.bfloat16), block=100)
    with pytest.raises(DisTorchError, match="max_levels"):
        encode(torch.zeros(4, dtype=torch.bfloat16), max_levels=0)


# ------------------------------------------------------------------------------------------------
# corrupt or truncated input: CodecError, never a read outside the buffer

def _enc():
    return encode(normal((4000,), torch.bfloat16, seed=21), block=64, widths=(2, 2, 5))


def test_truncated_or_wrong_buffer():
    enc = _enc()
    buf = enc.pack()
    assert issubclass(CodecError, FileFormatError)
    with pytest.raises(CodecError, match=f"has {buf.numel() - 1} bytes, its metadata needs {buf.numel()}"):
        Encoded.from_packed(buf[:-1].clone(), enc.meta)
    with pytest.raises(CodecError, match="1-D uint8"):
        Encoded.from_packed(buf.view(torch.int8), enc.meta)
    with pytest.raises(CodecError, match="CodecMeta"):
        Encoded.from_packed(buf, enc.meta.to_dict())


@pytest.mark.parametrize("change, match", [
    ({"dtype": "float32"}, "dtype"),
    ({"block": 96}, "block"),
    ({"block": 32}, "block"),
    ({"widths": [9, 8]}, "widths"),
    ({"widths": [2, 0, 5]}, "only the last"),
    ({"widths": [2, 2, 2, 2, 5]}, "levels"),
    ({"entries": [8]}, "entry counts"),
    ({"entries": [3, 8]}, "multiples of 8"),
    ({"entries": [8, 10 ** 9]}, "multiples of 8"),
    ({"shape": [-1, 4]}, "shape"),
    ({"shape": [2 ** 31]}, "at most"),
    ({"shape": "abc"}, "malformed"),
])
def test_bad_metadata(change, match):
    enc = _enc()
    d = {**enc.meta.to_dict(), **change}
    with pytest.raises(CodecError, match=match):
        Encoded.from_packed(enc.pack(), CodecMeta.from_dict(d))
    with pytest.raises(CodecError):
        CodecMeta.from_dict({"dtype": "bfloat16"})


def test_bad_offsets_and_table():
    enc = _enc()
    assert enc.meta.levels > 1
    cases = []
    for row, col, value in [(0, 0, 8), (0, 5, -8), (0, 3, 3), (0, -1, 0), (0, 4, 10 ** 6)]:
        buf = enc.pack().clone()
        Encoded(enc.meta, buf).section("offsets")[row, col] = value
        cases.append(buf)
    for buf in cases:
        with pytest.raises(CodecError, match="offsets"):
            Encoded.from_packed(buf, enc.meta)
    half = encode(normal((500,), torch.float16), block=64)
    buf = half.pack().clone()
    Encoded(half.meta, buf).section("table")[0] = 40
    with pytest.raises(CodecError, match="fp16 exponent table"):
        Encoded.from_packed(buf, half.meta)


def test_more_escapes_than_room():
    """Level-0 codes rewritten to all escapes: more level-1 codes than the offsets hold -> CodecError."""
    enc = _enc()
    buf = enc.pack().clone()
    Encoded(enc.meta, buf).section("level", 0).fill_(255)
    bad = Encoded.from_packed(buf, enc.meta)                 # offsets and table are still valid
    with pytest.raises(CodecError, match="more escapes into level 1"):
        decode(bad)


def test_random_corruption_never_crashes():
    """Random bytes flipped anywhere: the torch decoder returns some tensor or raises CodecError."""
    enc = _enc()
    g = torch.Generator().manual_seed(0)
    outcomes = set()
    for _ in range(40):
        buf = enc.pack().clone()
        idx = torch.randint(0, buf.numel(), (4,), generator=g)
        buf[idx] = torch.randint(0, 256, (4,), generator=g, dtype=torch.uint8)
        try:
            decode(Encoded.from_packed(buf, enc.meta))
            outcomes.add("decoded")
        except CodecError:
            outcomes.add("CodecError")
    assert "decoded" in outcomes


# ------------------------------------------------------------------------------------------------
# the Triton kernel, in Triton's CPU interpreter

def _interpreter_ready() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1" and codec.triton_available()


triton_only = pytest.mark.skipif(not _interpreter_ready(), reason="needs triton with TRITON_INTERPRET=1 (CPU)")


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, block, widths", [
    ((1,), 64, None), ((1000,), 64, None), ((3, 700), 128, (2, 3, 5, 6)), ((513,), 64, (3, 8)),
    ((333,), 64, (1, 1, 1, 8)), ((200,), 64, (5, 8)), ((100,), 64, (8,)),
])
def test_triton_kernel_in_interpreter(shape, block, widths, dtype):
    t = normal(shape, dtype, seed=sum(shape))
    t.view(-1)[::50] = torch.tensor(float("nan"), dtype=dtype)
    enc = encode(t, block=block, widths=widths)
    out = torch.full_like(t, 7.0)
    assert codec.decode_triton(enc, out) is out
    assert_exact(out, t)


@triton_only
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_triton_every_bit_pattern(dtype):
    t = every_pattern(dtype)[::7].contiguous()               # every exponent, fewer values (interpreter)
    enc = encode(t, block=1024)
    assert_exact(codec.decode_triton(enc), t)
    assert_exact(codec.decode_triton(encode(torch.full((100,), -0.0, dtype=dtype), block=64)),
                 torch.full((100,), -0.0, dtype=dtype))


@triton_only
def test_triton_corrupt_offsets_stay_in_bounds():
    """Offsets not checked (check_contents=False, as for a buffer already on the device): wrong values,
    but every read is masked to its section."""
    enc = _enc()
    buf = enc.pack().clone()
    off = Encoded(enc.meta, buf).section("offsets")
    off[:, 1:] = 2 ** 30
    Encoded(enc.meta, buf).section("level", 0).fill_(255)
    bad = Encoded.from_packed(buf, enc.meta, check_contents=False)
    out = codec.decode_triton(bad)
    assert out.shape == enc.meta.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_decoders(dtype):
    """On a GPU: the buffer copied to the device in one copy, decoded by the kernel into a slot and by torch."""
    for t in (normal((3072, 1000), dtype, seed=1), every_pattern(dtype), torch.full((5,), -0.0, dtype=dtype)):
        for max_levels in (2, 3, 4):
            enc = encode(t, max_levels=max_levels)
            dev = Encoded.from_packed(enc.pack().to("cuda"), enc.meta)
            slot = torch.empty(t.numel(), dtype=dtype, device="cuda")
            codec.decode_triton(dev, slot)
            assert_exact(slot.view(t.shape).cpu(), t)
            assert_exact(decode(dev).cpu(), t)
