"""formats.dequant against gguf-py's numpy dequantizer (the reference), on random valid blocks.

Tolerance per type (stated, and asserted):
  float32 output: EXACT (bit-identical) for every type.  Every product in these formats is of an
  fp16 scale (11-bit mantissa) with small integers (<= 8 bits, and 6-bit sub-scales), which fp32
  holds exactly; the only rounding steps are the additions of Q4_1/Q5_1 (+m) and the K types
  (-dmin*m), which we perform in the same order, once, like the reference.
  bfloat16 / float16 output: EXACT against the reference's fp32 result rounded once to that dtype
  (we compute in fp32 and round once at the end).
  (On CUDA with torch.compile, Triton may contract a*b+c into one FMA: then Q4_1, Q5_1 and the K
  types can differ by 1 fp32 ulp before the final rounding; the GPU benchmark checks that bound.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from distorch.compiler import cost  # noqa: E402
from distorch.errors import DisTorchError, GGUFError  # noqa: E402
from distorch.formats import dequant as dq  # noqa: E402
from distorch.formats.dequant import dequantize  # noqa: E402

# types gguf-py can quantize: we quantize random float data with it
QUANTIZABLE = [QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1]
# types built as random raw blocks: byte offsets of their fp16 scale fields (d, dmin)
RAW_BLOCK_TYPES = {
    QT.Q2_K: (80, 82), QT.Q3_K: (108,), QT.Q4_K: (0, 2), QT.Q5_K: (0, 2), QT.Q6_K: (208,),
    QT.IQ4_NL: (0,), QT.IQ4_XS: (0,),
}
ALL_QUANT = QUANTIZABLE + list(RAW_BLOCK_TYPES)
EXACT_FP32 = {t: True for t in ALL_QUANT}  # see the module docstring


def random_blocks(qt, n_blocks: int, seed: int = 0) -> np.ndarray:
    """Random bytes with every fp16 scale replaced by a finite value in [-0.05, 0.05]."""
    rng = np.random.default_rng(seed + int(qt))
    _, tsize = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(n_blocks, tsize), dtype=np.uint8)
    offsets = RAW_BLOCK_TYPES.get(qt, (0,) if qt in (QT.Q8_0, QT.Q4_0, QT.Q5_0) else (0, 2))
    for off in offsets:
        raw[:, off:off + 2] = rng.uniform(-0.05, 0.05, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


def reference(raw_rows: np.ndarray, qt) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(raw_rows, qt)))


def test_block_table_matches_gguf():
    for qt, sizes in dq.BLOCK_SIZES.items():
        assert gguf.GGML_QUANT_SIZES[qt] == sizes, qt.name
    assert {QT.F32, QT.F16, QT.BF16} | set(ALL_QUANT) == set(dq.SUPPORTED_TYPES)


@pytest.mark.parametrize("qt", QUANTIZABLE, ids=lambda t: t.name)
def test_quantized_from_floats_matches_reference(qt):
    rng = np.random.default_rng(1)
    data = (rng.standard_normal((6, 256)) * rng.uniform(0.01, 3, size=(6, 1))).astype(np.float32)
    q = gguf.quants.quantize(data, qt)                    # (6, bytes per row) uint8
    ref = reference(q, qt)
    got = dequantize(torch.from_numpy(q), qt, (6, 256), torch.float32)
    assert got.shape == (6, 256) and got.dtype == torch.float32
    assert EXACT_FP32[qt] and torch.equal(got, ref)
    # and it is a real dequantization (close to the data it came from)
    assert (got - torch.from_numpy(data)).abs().max() < 0.5 * float(np.abs(data).max())


@pytest.mark.parametrize("qt", ALL_QUANT, ids=lambda t: t.name)
def test_random_blocks_match_reference_fp32(qt):
    block, _ = gguf.GGML_QUANT_SIZES[qt]
    raw = random_blocks(qt, 48)
    rows = raw.reshape(4, -1)                               # 4 rows of 12 blocks
    ref = reference(rows, qt)
    got = dequantize(torch.from_numpy(raw), qt, (4, 12 * block), torch.float32)
    assert ref.shape == got.shape
    assert EXACT_FP32[qt] and torch.equal(got, ref), f"max diff {(got - ref).abs().max()}"
    assert ref.abs().max() > 0  # not a vacuous comparison


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qt", ALL_QUANT, ids=lambda t: t.name)
def test_half_outputs_are_one_rounding_of_reference(qt, dtype):
    block, _ = gguf.GGML_QUANT_SIZES[qt]
    raw = random_blocks(qt, 16, seed=7)
    ref = reference(raw.reshape(2, -1), qt).to(dtype)
    got = dequantize(torch.from_numpy(raw), qt, (2, 8 * block), dtype)
    assert got.dtype == dtype and torch.equal(got, ref)


@pytest.mark.parametrize("qt", ALL_QUANT, ids=lambda t: t.name)
def test_compile_friendly_branch_is_exact(qt, monkeypatch):
    """The code torch.compile traces (integer fp16 decoding) gives the same bits, run eagerly."""
    block, _ = gguf.GGML_QUANT_SIZES[qt]
    raw = random_blocks(qt, 24, seed=3)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    got = dq._eager(qt, torch.from_numpy(raw).reshape(-1), torch.float32)
    assert torch.equal(got, reference(raw, qt).reshape(-1))


def test_plain_types():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 7)).astype(np.float32)
    for qt, arr in [(QT.F32, x), (QT.F16, x.astype(np.float16)), (QT.BF16, gguf.quants.quantize(x, QT.BF16))]:
        raw = torch.from_numpy(np.ascontiguousarray(arr).view(np.uint8).reshape(-1))
        got = dequantize(raw, qt, (3, 5, 7), torch.float32)
        ref = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(arr, qt))).reshape(3, 5, 7)
        assert torch.equal(got, ref), qt.name


def test_multidim_shape_and_unaligned_slice():
    """A 4-D conv-like weight, its bytes starting at an odd offset inside a bigger buffer."""
    qt = QT.Q4_K
    raw = random_blocks(qt, 2 * 3 * 2, seed=5)               # shape (2, 3, 1, 512): 2 blocks a row
    buf = torch.zeros(raw.size + 7, dtype=torch.uint8)
    buf[3:3 + raw.size] = torch.from_numpy(raw.reshape(-1))
    view = buf[3:3 + raw.size]
    assert view.storage_offset() % 2 == 1
    got = dequantize(view, qt, (2, 3, 1, 512), torch.float32)
    assert torch.equal(got.reshape(6, 512), reference(raw.reshape(6, -1), qt))


def test_stored_shape_differs_from_shape():
    raw = random_blocks(QT.Q8_0, 8)
    got = dequantize(torch.from_numpy(raw), QT.Q8_0, (2, 2, 64), torch.float32, stored_shape=(4, 64))
    assert torch.equal(got.reshape(4, 64), reference(raw.reshape(4, -1), QT.Q8_0))


def test_accepts_int_and_name_qtypes():
    raw = torch.from_numpy(random_blocks(QT.Q6_K, 2))
    a = dequantize(raw, QT.Q6_K, (512,), torch.float32)
    assert torch.equal(a, dequantize(raw, int(QT.Q6_K), (512,), torch.float32))
    assert torch.equal(a, dequantize(raw, "q6_k", (512,), torch.float32))


def test_non_multiple_of_block_rejected_naming_tensor_and_type():
    raw = torch.zeros(34 * 3, dtype=torch.uint8)
    with pytest.raises(GGUFError) as e:
        dequantize(raw, QT.Q8_0, (3, 33), name="blocks.0.attn.qkv.weight")
    msg = str(e.value)
    assert "blocks.0.attn.qkv.weight" in msg and "Q8_0" in msg and "33" in msg and "32" in msg
    assert isinstance(e.value, DisTorchError) and isinstance(e.value, ValueError)
    with pytest.raises(GGUFError, match=r"Q4_K.*block size 256"):
        dequantize(torch.zeros(144, dtype=torch.uint8), QT.Q4_K, (1, 128), name="w")


def test_wrong_byte_count_rejected():
    with pytest.raises(GGUFError, match=r"'w'.*Q8_0.*needs 68 bytes.*got 67"):
        dequantize(torch.zeros(67, dtype=torch.uint8), QT.Q8_0, (2, 32), name="w")


def test_unsupported_type_rejected():
    with pytest.raises(GGUFError, match=r"'x'.*TQ1_0.*not supported.*Q4_K"):
        dequantize(torch.zeros(54, dtype=torch.uint8), QT.TQ1_0, (256,), name="x")
    with pytest.raises(GGUFError, match="IQ2_XXS"):
        dequantize(torch.zeros(66, dtype=torch.uint8), QT.IQ2_XXS, (256,))
    with pytest.raises(GGUFError, match="unknown GGML quantization type 'Q9_9'"):
        dequantize(torch.zeros(66, dtype=torch.uint8), "Q9_9", (256,))


def test_backend_switch():
    with pytest.raises(DisTorchError, match="unknown dequantization backend 'cuda'"):
        dq.set_backend("cuda")
    dq.set_backend("compile")
    try:
        assert dq.get_backend() == "compile"
        # CPU tensors never take a CUDA backend; results stay exact
        raw = random_blocks(QT.Q5_K, 3)
        got = dequantize(torch.from_numpy(raw), QT.Q5_K, (768,), torch.float32)
        assert torch.equal(got, reference(raw, QT.Q5_K).reshape(-1))
    finally:
        dq.set_backend(None)
    assert dq.get_backend() in dq.BACKENDS


def test_unchecked_fast_path_same_result():
    raw = torch.from_numpy(random_blocks(QT.Q4_K, 4)).reshape(-1)
    a = dequantize(raw, QT.Q4_K, (2, 512), torch.bfloat16)
    b = dequantize(raw, QT.Q4_K, (2, 512), torch.bfloat16, check=False)
    assert torch.equal(a, b)


def _triton_interpreter_ready():
    import os
    return os.environ.get("TRITON_INTERPRET") == "1" and dq.triton_available()


@pytest.mark.skipif(not _triton_interpreter_ready(), reason="needs triton with TRITON_INTERPRET=1 (CPU)")
@pytest.mark.parametrize("qt", ALL_QUANT, ids=lambda t: t.name)
def test_triton_kernel_in_interpreter(qt):
    """The CUDA Triton kernel, run by Triton's CPU interpreter: fp32 bit-identical to gguf-py.
    (The interpreter rounds fp32->bf16 by truncation, unlike the GPU, so only fp32 is compared.)"""
    raw = random_blocks(qt, 37, seed=11)                       # 37: not a multiple of the tile
    got = dq._triton_run(qt, torch.from_numpy(raw).reshape(-1), torch.float32, tile=512)
    assert torch.equal(got, reference(raw, qt).reshape(-1))


def test_dequant_cost_model_data():
    """dequant_seconds reproduces the H100 layer measurement it was taken from (42 us for Q8_0 and
    39 us for Q4_K on 3072 x 12288 at 3025 GB/s copy) and orders types by bytes moved / efficiency."""
    n = 3072 * 12288

    def secs(qt, **kw):           # the layer's blocks as stored, bf16 written
        block, tsize = dq.BLOCK_SIZES[qt]
        return cost.dequant_seconds(qt.name, n // block * tsize, 2 * n, **kw)
    assert secs(QT.Q8_0, copy_bw=3025e9) == pytest.approx(42e-6, rel=0.03)
    assert secs(QT.Q4_K, copy_bw=3025e9) == pytest.approx(39e-6, rel=0.03)
    assert secs(QT.Q6_K) > secs(QT.Q4_0)
    assert cost.dequant_seconds(QT.Q8_0, 34, 64) == cost.dequant_seconds("Q8_0", 34, 64)   # enum or name
    assert set(cost.DEQUANT_EFFICIENCY) == {t.name for t in dq.QUANTIZED_TYPES}
