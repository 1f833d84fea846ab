"""Dequantization of GGUF (ggml) blocks in pure torch, on whatever device the bytes sit.

    dequantize(raw_uint8, qtype, shape, dtype=torch.bfloat16, *, name=None) -> Tensor

`raw_uint8` holds the tensor's blocks exactly as they are stored in a .gguf file (rows of blocks,
row-major, any shape as long as its bytes are contiguous); `shape` is the logical torch shape
(outermost first, the last dimension is the one cut into blocks).  The result is a new contiguous
tensor of `shape` and `dtype` on `raw_uint8.device`.

One table, `_KERNELS`, maps each GGML type to its block kernel; every kernel has one signature,
(n_blocks, type_size) uint8 -> (n_blocks, weights_per_block) float32, written as a handful of
vectorised tensor ops over all blocks at once (no Python loop over blocks).  `_run` is the one
wrapper (the shared block reshape and the backend choice).  Arithmetic is done in float32 in the
same order as the reference (ggml / gguf-py), so float32 results match `gguf.quants.dequantize` bit
for bit on CPU; other dtypes are one rounding of that float32 value.

On CUDA, the hand-written Triton kernel (formats/dequant_triton.py, imported on first use) reads the
blocks once and writes the output once; where Triton is missing or fails, each type's torch function
compiled with `torch.compile` runs, else the eager torch code (correct everywhere, several kernels,
slower).  A fallback is logged once per type and kind (visible, never silent).
`set_backend("auto" | "triton" | "compile" | "eager")` or DISTORCH_DEQUANT_BACKEND choose.  What a
dequantization costs (for the planner) is data in compiler/cost.py (`dequant_seconds`).

Block layouts (facts from ggml's ggml-common.h / gguf-py; QK_K = 256), bytes in order:
  Q8_0   (32 w, 34 B):  d f16 | qs int8[32]                           w = d*q
  Q4_0   (32 w, 18 B):  d f16 | qs[16] (low nibbles w0-15, high w16-31)   w = d*(q-8)
  Q4_1   (32 w, 20 B):  d f16 | m f16 | qs[16]                        w = d*q + m
  Q5_0   (32 w, 22 B):  d f16 | qh u32 (bit j = 5th bit of w_j) | qs[16]   w = d*(q-16)
  Q5_1   (32 w, 24 B):  d f16 | m f16 | qh u32 | qs[16]               w = d*q + m
  Q2_K  (256 w, 84 B):  scales[16] (lo nibble scale, hi nibble min) | qs[64] (2-bit) | d f16 | dmin f16
  Q3_K (256 w, 110 B):  hmask[32] | qs[64] (2-bit) | scales[12] (16 x 6-bit, -32) | d f16
  Q4_K (256 w, 144 B):  d f16 | dmin f16 | scales[12] (8 x 6-bit scale + 8 x 6-bit min) | qs[128]
  Q5_K (256 w, 176 B):  d f16 | dmin f16 | scales[12] | qh[32] | qs[128]
  Q6_K (256 w, 210 B):  ql[128] | qh[64] | scales int8[16] | d f16    w = d*sc*(q-32)
  IQ4_NL (32 w, 18 B):  d f16 | qs[16] (4-bit indices into a 16-value table)
  IQ4_XS (256 w, 136 B): d f16 | scales_h u16 | scales_l[4] | qs[128]
"""
from __future__ import annotations

import logging
import os
import threading
import types
from typing import Callable, Iterable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ..errors import DisTorchError, GGUFError, UnsupportedQuantError
from .optional import lazy_module

__all__ = ["dequantize", "dequantize_into", "quantized_nbytes", "check_supported", "as_qtype", "supported_names",
           "set_backend", "get_backend", "triton_available", "warmup", "BLOCK_SIZES", "PLAIN_TYPES",
           "QUANTIZED_TYPES", "SUPPORTED_TYPES", "BACKENDS", "GGUFError", "UnsupportedQuantError"]

log = logging.getLogger("distorch.formats.dequant")

QK_K = 256

# qtype -> (weights per block, bytes per block): the types DisTorch dequantizes, sizes from gguf's table
BLOCK_SIZES: dict[QT, tuple[int, int]] = {
    qt: GGML_QUANT_SIZES[qt] for qt in (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                                        QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS)}
PLAIN_TYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
QUANTIZED_TYPES = frozenset(BLOCK_SIZES) - frozenset(PLAIN_TYPES)
SUPPORTED_TYPES = frozenset(BLOCK_SIZES)

# the 16 non-linear levels of IQ4_NL / IQ4_XS
_IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def as_qtype(qtype: QT | int | str) -> QT:
    """GGMLQuantizationType from an enum, its int value or its name ("Q4_K")."""
    if isinstance(qtype, QT):
        return qtype
    try:
        if isinstance(qtype, str):
            return QT[qtype.upper()]
        return QT(int(qtype))
    except (KeyError, ValueError):
        raise UnsupportedQuantError(
            f"unknown GGML quantization type {qtype!r}; supported: {supported_names()}") from None


def supported_names() -> str:
    return ", ".join(t.name for t in sorted(SUPPORTED_TYPES, key=int))


def check_supported(qtype: QT | int | str, name: str | None = None) -> QT:
    qt = as_qtype(qtype)
    if qt not in SUPPORTED_TYPES:
        where = f"tensor {name!r}: " if name else ""
        raise UnsupportedQuantError(
            f"{where}GGML type {qt.name} is not supported by DisTorch's dequantizer; "
            f"supported: {supported_names()} (re-quantize the model to one of these)")
    return qt


def quantized_nbytes(qtype: QT | int | str, shape: Sequence[int], name: str | None = None) -> int:
    """Bytes the blocks of a tensor of logical `shape` occupy; checks the row splits into blocks."""
    qt = check_supported(qtype, name)
    block, tsize = BLOCK_SIZES[qt]
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        shape = (1,)
    if block > 1 and shape[-1] % block != 0:
        where = f"tensor {name!r}" if name else "tensor"
        raise GGUFError(
            f"{where} of type {qt.name} has shape {list(shape)}: its last dimension {shape[-1]} is not "
            f"a multiple of the {qt.name} block size {block}; only rows made of whole blocks can be stored")
    n = 1
    for s in shape:
        n *= s
    return n // block * tsize


# ------------------------------------------------------------------------------------------------
# helpers (all shapes static given the number of blocks; no data-dependent control flow)

def _f16(b: torch.Tensor, off: int) -> torch.Tensor:
    """float32 (n, 1) from the little-endian fp16 stored at byte `off` of every block row of b."""
    if not torch.compiler.is_compiling():
        return b[:, off:off + 2].contiguous().view(torch.float16).to(torch.float32)
    v = b[:, off:off + 1].to(torch.int32) | (b[:, off + 1:off + 2].to(torch.int32) << 8)
    v = v - ((v >> 15) << 16)  # to signed 16-bit range, so the int16 cast is exact
    return v.to(torch.int16).view(torch.float16).to(torch.float32)


def _nibbles(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., W) uint8 -> low and high nibbles stacked at `dim` (low first)."""
    return torch.stack([x & 0x0F, x >> 4], dim=dim)


def _crumbs(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., W) uint8 -> its four 2-bit fields stacked at `dim` (lowest bits first)."""
    return torch.stack([x & 3, (x >> 2) & 3, (x >> 4) & 3, x >> 6], dim=dim)


def _bits(x: torch.Tensor, dim: int) -> torch.Tensor:
    """(..., W) uint8 -> its eight bits stacked at `dim` (bit 0 first)."""
    return torch.stack([(x >> i) & 1 for i in range(8)], dim=dim)


def _i8(x: torch.Tensor, offset: int) -> torch.Tensor:
    """uint8 values 0..127 minus offset, as float32 (via int8: small and exact)."""
    return (x.to(torch.int8) - offset).to(torch.float32)


# ------------------------------------------------------------------------------------------------
# one function per type: (n_blocks, type_size) uint8 -> float32, (n_blocks, weights_per_block)
# the float32 operation order follows the reference so results are bit-identical.

def _q8_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return b[:, 2:].view(torch.int8).to(torch.float32) * d


def _q4_0(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    q = _nibbles(b[:, 2:18], -2).reshape(n, 32)
    return d * _i8(q, 8)


def _q4_1(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, m = _f16(b, 0), _f16(b, 2)
    q = _nibbles(b[:, 4:20], -2).reshape(n, 32)
    return d * q.to(torch.float32) + m


def _q5_low_high(b: torch.Tensor, qh_off: int) -> torch.Tensor:
    n = b.shape[0]
    hi = _bits(b[:, qh_off:qh_off + 4], -1).reshape(n, 32)          # bit j of the u32 -> weight j
    lo = _nibbles(b[:, qh_off + 4:qh_off + 20], -2).reshape(n, 32)
    return lo | (hi << 4)


def _q5_0(b: torch.Tensor) -> torch.Tensor:
    d = _f16(b, 0)
    return d * _i8(_q5_low_high(b, 2), 16)


def _q5_1(b: torch.Tensor) -> torch.Tensor:
    d, m = _f16(b, 0), _f16(b, 2)
    return d * _q5_low_high(b, 4).to(torch.float32) + m


def _q2_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    sc = b[:, 0:16]
    d, dmin = _f16(b, 80), _f16(b, 82)
    dl = (d * (sc & 0x0F).to(torch.float32)).reshape(n, 16, 1)
    ml = (dmin * (sc >> 4).to(torch.float32)).reshape(n, 16, 1)
    q = _crumbs(b[:, 16:80].reshape(n, 2, 32), -2).reshape(n, 16, 16).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 108)
    s = b[:, 96:108]
    lo = _nibbles(s[:, 0:8], -2).reshape(n, 16)
    hi = _crumbs(s[:, 8:12], -2).reshape(n, 16)
    sc = _i8(lo | (hi << 4), 32)
    dl = (d * sc).reshape(n, 16, 1)
    ql = _crumbs(b[:, 32:96].reshape(n, 2, 32), -2).reshape(n, 16, 16)
    hm = _bits(b[:, 0:32], -2).reshape(n, 16, 16)
    q = ql.to(torch.int8) - ((hm ^ 1) << 2).to(torch.int8)     # high bit clear means -4
    return (dl * q.to(torch.float32)).reshape(n, QK_K)


def _k_scale_min(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K / Q5_K packing)."""
    n = s.shape[0]
    s = s.reshape(n, 3, 4)
    a, m, md = s[:, 0], s[:, 1], s[:, 2]
    sc = torch.cat([a & 0x3F, (md & 0x0F) | ((a >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def _k_scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: per 32-value sub-block scale and offset, (n, 8, 1) float32 each."""
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    return (d * sc.to(torch.float32)).reshape(n, 8, 1), (dmin * mn.to(torch.float32)).reshape(n, 8, 1)


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dd, dm = _k_scales(b)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32), -2).reshape(n, 8, 32).to(torch.float32)
    return (dd * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    dd, dm = _k_scales(b)
    hi = _bits(b[:, 16:48], -2).reshape(n, 8, 32)
    lo = _nibbles(b[:, 48:176].reshape(n, 4, 32), -2).reshape(n, 8, 32)
    q = (lo | (hi << 4)).to(torch.float32)
    return (dd * q - dm).reshape(n, QK_K)


def _q6_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 208)
    dd = (d * b[:, 192:208].view(torch.int8).to(torch.float32)).reshape(n, 16, 1)
    lo = _nibbles(b[:, 0:128].reshape(n, 2, 64), -2).reshape(n, QK_K)
    hi = _crumbs(b[:, 128:192].reshape(n, 2, 32), -2).reshape(n, QK_K)
    q = _i8(lo | (hi << 4), 32).reshape(n, 16, 16)
    return (dd * q).reshape(n, QK_K)


_LEVEL_CACHE: dict[torch.device, torch.Tensor] = {}


def _levels(device: torch.device) -> torch.Tensor:
    t = _LEVEL_CACHE.get(device)
    if t is None:
        t = torch.tensor(_IQ4_LEVELS, dtype=torch.float32, device=device)
        _LEVEL_CACHE[device] = t
    return t


def _iq4_nl(b: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    idx = _nibbles(b[:, 2:18], -2).reshape(n, 32)
    return d * levels[idx.to(torch.int64)]


def _iq4_xs(b: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d = _f16(b, 0)
    hi = _crumbs(b[:, 2:4], -1).reshape(n, 8)       # u16, 2 bits per sub-block, lowest first
    lo = _nibbles(b[:, 4:8], -1).reshape(n, 8)
    dl = (d * _i8(lo | (hi << 4), 32)).reshape(n, 8, 1)
    idx = _nibbles(b[:, 8:136].reshape(n, 8, 16), -2).reshape(n, 8, 32)
    return (dl * levels[idx.to(torch.int64)]).reshape(n, QK_K)


_KERNELS: dict[QT, Callable] = {
    QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1,
    QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
    QT.IQ4_NL: _iq4_nl, QT.IQ4_XS: _iq4_xs,
}
_NEEDS_LEVELS = {QT.IQ4_NL, QT.IQ4_XS}


def _eager(qt: QT, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Flat output of `dtype` from flat contiguous uint8 raw."""
    tsize = BLOCK_SIZES[qt][1]
    b = raw.view(-1, tsize)
    if qt in _NEEDS_LEVELS:
        y = _KERNELS[qt](b, _levels(raw.device))
    else:
        y = _KERNELS[qt](b)
    return y.reshape(-1).to(dtype)


# ------------------------------------------------------------------------------------------------
# Triton path (CUDA): formats/dequant_triton.py, imported on first use (Triton is an optional
# dependency, and importing it costs time); same fp32 arithmetic as the torch code above, bit-identical.

_triton = lazy_module(".dequant_triton", __package__, "Triton dequantizer", log)   # the module, or None


def triton_available() -> bool:
    return _triton() is not None


def _triton_run(qt: QT, raw: torch.Tensor, dtype: torch.dtype, tile: int | None = None,
                num_warps: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    qb, ts = BLOCK_SIZES[qt]
    n_out = raw.numel() // ts * qb
    if out is None:
        out = torch.empty(n_out, dtype=dtype, device=raw.device)
    _triton().launch(raw, out, _levels(raw.device), n_out, int(qt), qb, ts, tile=tile, num_warps=num_warps)
    return out


# ------------------------------------------------------------------------------------------------
# torch.compile path (an alternative on CUDA; higher per-call host cost than the Triton kernel)

_compiled: dict[QT, Callable] = {}
_failed: dict[str, set] = {"triton": set(), "compile": set()}
_lock = threading.Lock()

BACKENDS = ("auto", "triton", "compile", "eager")
_backend: str | None = None  # None: from DISTORCH_DEQUANT_BACKEND, default "auto"


def set_backend(name: str | None) -> None:
    """Where CUDA dequantization runs: "auto" (Triton kernel, else torch.compile, else eager),
    "triton", "compile", "eager"; None restores the default (env DISTORCH_DEQUANT_BACKEND or auto).
    CPU tensors always use the eager torch code."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise DisTorchError(f"unknown dequantization backend {name!r}; use one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    if _backend is not None:
        return _backend
    env = os.environ.get("DISTORCH_DEQUANT_BACKEND", "auto").strip().lower() or "auto"
    if os.environ.get("DISTORCH_DEQUANT_COMPILE", "1").lower() in ("0", "false", "no", "off") and env == "auto":
        env = "triton"
    return env if env in BACKENDS else "auto"


def set_compile(enabled: bool | None) -> None:
    """Compatibility switch: False = eager everywhere, True/None = default backend choice."""
    set_backend("eager" if enabled is False else None)


def compile_enabled() -> bool:
    return get_backend() != "eager"


def _make_compiled(qt: QT) -> Callable:
    tsize = BLOCK_SIZES[qt][1]
    kernel = _KERNELS[qt]
    if qt in _NEEDS_LEVELS:
        def run(raw, levels, dtype):
            return kernel(raw.view(-1, tsize), levels).reshape(-1).to(dtype)
    else:
        def run(raw, levels, dtype):
            return kernel(raw.view(-1, tsize)).reshape(-1).to(dtype)
    # a code object of its own per type: dynamo caches (and counts recompiles) per code object
    name = f"dequant_{qt.name.lower()}"
    run = types.FunctionType(run.__code__.replace(co_name=name), run.__globals__, name,
                             run.__defaults__, run.__closure__)
    return torch.compile(run, dynamic=True, fullgraph=True)


def _compiled_run(qt: QT, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fn = _compiled.get(qt)
    if fn is None:
        with _lock:
            fn = _compiled.get(qt) or _make_compiled(qt)
            _compiled[qt] = fn
    return fn(raw, _levels(raw.device), dtype)


def _fail(kind: str, qt: QT, e: Exception) -> None:
    _failed[kind].add(qt)
    log.warning("distorch: the %s dequantizer for %s failed (%s: %s); falling back", kind, qt.name,
                type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def _run(qt: QT, raw: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat dequantized output from flat contiguous uint8 blocks, on raw's device (written into the
    flat contiguous `out` when given)."""
    if raw.device.type == "cuda":
        backend = get_backend()
        if backend in ("auto", "triton") and qt not in _failed["triton"] and triton_available():
            try:
                return _triton_run(qt, raw, dtype, out=out)
            except Exception as e:  # a broken Triton install must not break inference
                _fail("triton", qt, e)
        if backend in ("auto", "compile") and qt not in _failed["compile"]:
            try:
                r = _compiled_run(qt, raw, dtype)
                return r if out is None else out.copy_(r.reshape(-1))
            except Exception as e:
                _fail("compile", qt, e)
    if raw.storage_offset() % 2:
        raw = raw.clone()  # the eager code views fp16 fields: needs 2-byte aligned storage
    r = _eager(qt, raw, dtype)
    return r if out is None else out.copy_(r.reshape(-1))


def dequantize_into(raw: torch.Tensor, qtype: QT, out: torch.Tensor) -> torch.Tensor:
    """Dequantize the flat contiguous uint8 blocks `raw` (any number of whole blocks of one quantized
    type, e.g. several tensors stored back to back) into the flat contiguous floating tensor `out`
    (same device, one element per weight), in out's dtype.  Unchecked: for the runtime's per-unit
    batched dequantization, whose layout was validated once.  Element for element the same arithmetic
    as `dequantize`, so the values are bit-identical to dequantizing each tensor alone."""
    if out.numel():
        _run(qtype, raw, out.dtype, out=out)
    return out


def _flat_bytes(raw: torch.Tensor) -> torch.Tensor:
    if raw.dtype != torch.uint8:
        if not raw.is_contiguous():
            raw = raw.contiguous()
        raw = raw.reshape(-1).view(torch.uint8)
    if not raw.is_contiguous():
        raw = raw.contiguous()
    return raw.reshape(-1)


def dequantize(raw: torch.Tensor, qtype: QT | int | str, shape: Sequence[int], dtype: torch.dtype = torch.bfloat16,
               *, name: str | None = None, stored_shape: Sequence[int] | None = None,
               check: bool = True) -> torch.Tensor:
    """Dequantize GGUF blocks `raw` (uint8, on any device) of type `qtype` into a tensor of `shape`.

    `stored_shape` is the shape the blocks were cut from when it differs from `shape` (a GGUF file
    may store a reshaped tensor and record the original shape in metadata); rows of blocks are
    checked against it and the result is reshaped to `shape`.

    Raises GGUFError (a DisTorchError / ValueError) naming `name` and the type when the type is not
    supported, the last dimension is not a whole number of blocks, or `raw` holds the wrong number
    of bytes.  `check=False` (for callers that validated once, e.g. GGUFTensor) skips those checks
    to keep the per-call host cost small; `raw` must then be flat contiguous uint8 of the right size.
    """
    if not check:
        if qtype in PLAIN_TYPES:
            return _plain(raw, qtype, shape, dtype)
        if raw.numel() == 0:
            return torch.empty(shape, dtype=dtype, device=raw.device)
        return _run(qtype, raw, dtype).view(shape)
    qt = check_supported(qtype, name)
    shape = torch.Size(int(s) for s in shape)
    if stored_shape is not None:
        stored_shape = torch.Size(int(s) for s in stored_shape)
        if stored_shape.numel() != shape.numel():
            raise GGUFError(f"tensor {name!r}: stored shape {list(stored_shape)} and shape {list(shape)} "
                            f"differ in element count")
    want = quantized_nbytes(qt, stored_shape if stored_shape is not None else shape, name)
    have = raw.numel() * raw.element_size()
    if have != want:
        where = f"tensor {name!r}" if name else "tensor"
        raise GGUFError(f"{where} of type {qt.name} and shape {list(shape)} needs {want} bytes of blocks, "
                        f"got {have} ({raw.dtype}, shape {list(raw.shape)})")
    raw = _flat_bytes(raw)
    if qt in PLAIN_TYPES:
        return _plain(raw, qt, shape, dtype)
    if want == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    return _run(qt, raw, dtype).view(shape)


def _plain(raw: torch.Tensor, qt: QT, shape, dtype: torch.dtype) -> torch.Tensor:
    src = PLAIN_TYPES[qt]
    if raw.storage_offset() % src.itemsize:
        raw = raw.clone()
    return raw.view(src).view(shape).to(dtype, copy=True)


def warmup(qtypes: Iterable[QT | int | str] | None = None, device: torch.device | str = "cuda",
           dtype: torch.dtype = torch.bfloat16) -> None:
    """Compile the dequantizers of `qtypes` for `device` now (first compile takes seconds each)."""
    for qt in (QUANTIZED_TYPES if qtypes is None else [as_qtype(q) for q in qtypes]):
        block, tsize = BLOCK_SIZES[qt]
        raw = torch.zeros(4 * tsize, dtype=torch.uint8, device=device)
        dequantize(raw, qt, (4 * block,), dtype)
