"""Dequantization of GGUF (ggml) blocks in pure torch, on whatever device the bytes sit.

    dequantize(raw_uint8, qtype, shape, dtype=torch.bfloat16, *, name=None) -> Tensor

`raw_uint8` holds the tensor's blocks exactly as they are stored in a .gguf file (rows of blocks,
row-major, any shape as long as its bytes are contiguous); `shape` is the logical torch shape
(outermost first, the last dimension is the one cut into blocks).  The result is a new contiguous
tensor of `shape` and `dtype` on `raw_uint8.device`.

Every type is written as a handful of vectorised tensor ops over all blocks at once (no Python
loop over blocks).  Arithmetic is done in float32 in the same order as the reference (ggml /
gguf-py), so float32 results match `gguf.quants.dequantize` bit for bit on CPU; other dtypes are
one rounding of that float32 value.

On CUDA, a hand-written Triton kernel (one per type, below) reads the blocks once and writes the
output once; where Triton is missing or fails, each type's torch function compiled with
`torch.compile` runs, else the eager torch code (correct everywhere, several kernels, slower).
`set_backend("auto" | "triton" | "compile" | "eager")` or DISTORCH_DEQUANT_BACKEND choose.

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
from typing import Callable, Sequence

import torch
from gguf import GGMLQuantizationType as QT

from ..errors import DisTorchError, FileFormatError

log = logging.getLogger(__name__)

QK_K = 256

# qtype -> (weights per block, bytes per block)
BLOCK_SIZES: dict[QT, tuple[int, int]] = {
    QT.F32: (1, 4),
    QT.F16: (1, 2),
    QT.BF16: (1, 2),
    QT.Q8_0: (32, 34),
    QT.Q4_0: (32, 18),
    QT.Q4_1: (32, 20),
    QT.Q5_0: (32, 22),
    QT.Q5_1: (32, 24),
    QT.Q2_K: (QK_K, 84),
    QT.Q3_K: (QK_K, 110),
    QT.Q4_K: (QK_K, 144),
    QT.Q5_K: (QK_K, 176),
    QT.Q6_K: (QK_K, 210),
    QT.IQ4_NL: (32, 18),
    QT.IQ4_XS: (QK_K, 136),
}
PLAIN_TYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
QUANTIZED_TYPES = frozenset(BLOCK_SIZES) - frozenset(PLAIN_TYPES)
SUPPORTED_TYPES = frozenset(BLOCK_SIZES)

# the 16 non-linear levels of IQ4_NL / IQ4_XS
_IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class GGUFError(FileFormatError):
    """A GGUF tensor or file that cannot be read or dequantized."""


class UnsupportedQuantError(GGUFError):
    pass


def as_qtype(qtype) -> QT:
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


def check_supported(qtype, name: str | None = None) -> QT:
    qt = as_qtype(qtype)
    if qt not in SUPPORTED_TYPES:
        where = f"tensor {name!r}: " if name else ""
        raise UnsupportedQuantError(
            f"{where}GGML type {qt.name} is not supported by DisTorch's dequantizer; "
            f"supported: {supported_names()} (re-quantize the model to one of these)")
    return qt


def quantized_nbytes(qtype, shape: Sequence[int], name: str | None = None) -> int:
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


def _q4_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dd = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32), -2).reshape(n, 8, 32).to(torch.float32)
    return (dd * q - dm).reshape(n, QK_K)


def _q5_k(b: torch.Tensor) -> torch.Tensor:
    n = b.shape[0]
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, mn = _k_scale_min(b[:, 4:16])
    dd = (d * sc.to(torch.float32)).reshape(n, 8, 1)
    dm = (dmin * mn.to(torch.float32)).reshape(n, 8, 1)
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
# Triton path (CUDA): one hand-written kernel for all types, specialised per type at compile time.
# Each program dequantizes a tile of TILE consecutive output weights (see the kernel's comment);
# neighbouring weights share cache lines, so the blocks are read from DRAM once, and the tile is
# written once, in the output dtype, with vector stores.  Same fp32 arithmetic as the torch code above; all
# products are exact in fp32, so a fused multiply-add cannot change a result: bit-identical.

_TRITON = None          # (triton module, kernel) once built; False when unavailable
_TRITON_TILE = 1024     # weights per program
_TRITON_WARPS = 4


def _build_triton():
    import triton
    import triton.language as tl

    @triton.jit
    def _tl_u8(ptr, idx, mask):
        return tl.load(ptr + idx, mask=mask, other=0).to(tl.int32)

    @triton.jit
    def _tl_f16(ptr, base, OFF: tl.constexpr, mask):
        v = _tl_u8(ptr, base + OFF, mask) | (_tl_u8(ptr, base + (OFF + 1), mask) << 8)
        v = v - ((v >> 15) << 16)
        return v.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)

    @triton.jit
    def _tl_k_scales(ptr, base, cg, gmask):
        # Q4_K / Q5_K: 8 six-bit scales and mins packed in the 12 bytes at offset 4
        j = cg // 32
        a = _tl_u8(ptr, base + 4 + j % 4, gmask)
        mm = _tl_u8(ptr, base + 8 + j % 4, gmask)
        md = _tl_u8(ptr, base + 12 + j % 4, gmask)
        low = j < 4
        sc = tl.where(low, a & 63, (md & 15) | ((a >> 6) << 4))
        mn = tl.where(low, mm & 63, (md >> 4) | ((mm >> 6) << 4))
        return sc, mn

    @triton.jit
    def _kernel(raw, out, lv, n_out, QT: tl.constexpr, QB: tl.constexpr, TS: tl.constexpr,
                TILE: tl.constexpr):
        # A program writes TILE consecutive output weights as [TILE // 8, 8]: rows are groups of 8
        # weights that share every scale (all formats change scale/shift at multiples of 8), so the
        # per-group quantities are loaded once per row ([G, 1]), the quants once per weight
        # ([G, 8]), and each row is written with one 16-byte store.
        G: tl.constexpr = TILE // 8
        g = tl.program_id(0).to(tl.int64) * G + tl.arange(0, G)[:, None]      # [G, 1]
        k = tl.arange(0, 8)[None, :]                                           # [1, 8]
        offs = g * 8 + k                                                       # [G, 8]
        mask = offs < n_out
        gmask = g * 8 < n_out
        base = (g * 8 // QB) * TS                                              # block start byte
        cg = ((g * 8) % QB).to(tl.int32)                                       # group's first column
        ce = cg + k                                                            # each weight's column
        if QT == 8:      # Q8_0
            d = _tl_f16(raw, base, 0, gmask)
            q = _tl_u8(raw, base + 2 + ce, mask)
            q = q - ((q >> 7) << 8)
            y = q.to(tl.float32) * d
        elif QT == 2:    # Q4_0
            d = _tl_f16(raw, base, 0, gmask)
            q = (_tl_u8(raw, base + 2 + ce % 16, mask) >> ((cg // 16) * 4)) & 15
            y = d * (q - 8).to(tl.float32)
        elif QT == 3:    # Q4_1
            d = _tl_f16(raw, base, 0, gmask)
            m = _tl_f16(raw, base, 2, gmask)
            q = (_tl_u8(raw, base + 4 + ce % 16, mask) >> ((cg // 16) * 4)) & 15
            y = d * q.to(tl.float32) + m
        elif QT == 6:    # Q5_0
            d = _tl_f16(raw, base, 0, gmask)
            hb = (_tl_u8(raw, base + 2 + cg // 8, gmask) >> k) & 1
            lo = (_tl_u8(raw, base + 6 + ce % 16, mask) >> ((cg // 16) * 4)) & 15
            y = d * ((lo | (hb << 4)) - 16).to(tl.float32)
        elif QT == 7:    # Q5_1
            d = _tl_f16(raw, base, 0, gmask)
            m = _tl_f16(raw, base, 2, gmask)
            hb = (_tl_u8(raw, base + 4 + cg // 8, gmask) >> k) & 1
            lo = (_tl_u8(raw, base + 8 + ce % 16, mask) >> ((cg // 16) * 4)) & 15
            y = d * (lo | (hb << 4)).to(tl.float32) + m
        elif QT == 10:   # Q2_K
            d = _tl_f16(raw, base, 80, gmask)
            dmin = _tl_f16(raw, base, 82, gmask)
            sc = _tl_u8(raw, base + cg // 16, gmask)
            q = (_tl_u8(raw, base + 16 + (cg // 128) * 32 + ce % 32, mask) >> (((cg // 32) % 4) * 2)) & 3
            dl = d * (sc & 15).to(tl.float32)
            ml = dmin * (sc >> 4).to(tl.float32)
            y = dl * q.to(tl.float32) - ml
        elif QT == 11:   # Q3_K
            d = _tl_f16(raw, base, 108, gmask)
            j = cg // 16
            lsc = (_tl_u8(raw, base + 96 + j % 8, gmask) >> ((j // 8) * 4)) & 15
            hsc = (_tl_u8(raw, base + 104 + j % 4, gmask) >> ((j // 4) * 2)) & 3
            dl = d * ((lsc | (hsc << 4)) - 32).to(tl.float32)
            ql = (_tl_u8(raw, base + 32 + (cg // 128) * 32 + ce % 32, mask) >> (((cg // 32) % 4) * 2)) & 3
            hm = (_tl_u8(raw, base + ce % 32, mask) >> (cg // 32)) & 1
            y = dl * (ql - 4 * (1 - hm)).to(tl.float32)
        elif QT == 12:   # Q4_K
            d = _tl_f16(raw, base, 0, gmask)
            dmin = _tl_f16(raw, base, 2, gmask)
            sc, mn = _tl_k_scales(raw, base, cg, gmask)
            q = (_tl_u8(raw, base + 16 + (cg // 64) * 32 + ce % 32, mask) >> (((cg // 32) % 2) * 4)) & 15
            y = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        elif QT == 13:   # Q5_K
            d = _tl_f16(raw, base, 0, gmask)
            dmin = _tl_f16(raw, base, 2, gmask)
            sc, mn = _tl_k_scales(raw, base, cg, gmask)
            hb = (_tl_u8(raw, base + 16 + ce % 32, mask) >> (cg // 32)) & 1
            lo = (_tl_u8(raw, base + 48 + (cg // 64) * 32 + ce % 32, mask) >> (((cg // 32) % 2) * 4)) & 15
            q = lo | (hb << 4)
            y = (d * sc.to(tl.float32)) * q.to(tl.float32) - dmin * mn.to(tl.float32)
        elif QT == 14:   # Q6_K
            d = _tl_f16(raw, base, 208, gmask)
            sc = _tl_u8(raw, base + 192 + cg // 16, gmask)
            sc = sc - ((sc >> 7) << 8)
            lo = (_tl_u8(raw, base + (cg // 128) * 64 + ce % 64, mask) >> (((cg // 64) % 2) * 4)) & 15
            hi = (_tl_u8(raw, base + 128 + (cg // 128) * 32 + ce % 32, mask) >> (((cg // 32) % 4) * 2)) & 3
            y = (d * sc.to(tl.float32)) * ((lo | (hi << 4)) - 32).to(tl.float32)
        elif QT == 20:   # IQ4_NL
            d = _tl_f16(raw, base, 0, gmask)
            idx = (_tl_u8(raw, base + 2 + ce % 16, mask) >> ((cg // 16) * 4)) & 15
            y = d * tl.load(lv + idx, mask=mask, other=0.0)
        else:            # IQ4_XS (23)
            d = _tl_f16(raw, base, 0, gmask)
            j = cg // 32
            sl = (_tl_u8(raw, base + 4 + j // 2, gmask) >> ((j % 2) * 4)) & 15
            sh = (_tl_u8(raw, base + 2 + j // 4, gmask) >> ((j % 4) * 2)) & 3
            dl = d * ((sl | (sh << 4)) - 32).to(tl.float32)
            idx = (_tl_u8(raw, base + 8 + j * 16 + ce % 16, mask) >> (((cg // 16) % 2) * 4)) & 15
            y = dl * tl.load(lv + idx, mask=mask, other=0.0)
        tl.store(out + offs, y.to(out.dtype.element_ty), mask=mask)

    # the JIT resolves helper names through the module's globals
    globals().update(_tl_u8=_tl_u8, _tl_f16=_tl_f16, _tl_k_scales=_tl_k_scales)
    return triton, _kernel


def triton_available() -> bool:
    global _TRITON
    if _TRITON is None:
        try:
            _TRITON = _build_triton()
        except Exception as e:  # no triton, or a triton we cannot use
            log.info("distorch: Triton dequantizer unavailable (%s: %s)", type(e).__name__, e)
            _TRITON = False
    return _TRITON is not False


def _triton_run(qt: QT, raw: torch.Tensor, dtype: torch.dtype, tile: int | None = None,
                num_warps: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    triton, kernel = _TRITON
    qb, ts = BLOCK_SIZES[qt]
    n_out = raw.numel() // ts * qb
    if out is None:
        out = torch.empty(n_out, dtype=dtype, device=raw.device)
    tile = tile or _TRITON_TILE
    kernel[(triton.cdiv(n_out, tile),)](raw, out, _levels(raw.device), n_out, QT=int(qt), QB=qb, TS=ts,
                                        TILE=tile, num_warps=num_warps or _TRITON_WARPS)
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
    import types
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


def _use_compiled(qt: QT, raw: torch.Tensor) -> bool:
    return (raw.device.type == "cuda" and get_backend() in ("auto", "compile")
            and qt not in _failed["compile"])


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


def dequantize(raw: torch.Tensor, qtype, shape: Sequence[int], dtype: torch.dtype = torch.bfloat16,
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


# ------------------------------------------------------------------------------------------------
# cost data for the placement / cost model (bench/results/dequant_h100.md, H100, Triton backend)

# device throughput of the Triton kernel, as a fraction of the device's copy bandwidth (read+write),
# counting blocks read + bf16 written; 3072 x 12288 layer on an H100 (copy 3025 GB/s)
DEQUANT_EFFICIENCY: dict[QT, float] = {
    QT.Q8_0: 0.91, QT.Q4_K: 0.82, QT.Q5_K: 0.67, QT.Q6_K: 0.66, QT.Q4_0: 0.96, QT.Q5_0: 0.89,
    QT.Q5_1: 0.89, QT.Q4_1: 0.92, QT.Q3_K: 0.58, QT.Q2_K: 0.96, QT.IQ4_NL: 0.91, QT.IQ4_XS: 0.86,
}
# Python cost of one dequantize() call on the host (Triton launch + checks), seconds
DEQUANT_HOST_S = 60e-6


def dequant_seconds(qtype, numel: int, *, copy_bw: float = 3.0e12, out_itemsize: int = 2) -> float:
    """Predicted device time to dequantize `numel` weights of `qtype` on a GPU whose device-to-device
    copy moves `copy_bw` bytes/s (read + write counted): (stored + written bytes) / (eff * copy_bw).
    Plain types cost a cast (read + write at copy bandwidth)."""
    qt = as_qtype(qtype)
    block, tsize = BLOCK_SIZES.get(qt, (1, 2))
    moved = numel * tsize / block + numel * out_itemsize
    return moved / (DEQUANT_EFFICIENCY.get(qt, 1.0) * copy_bw)


def warmup(qtypes=None, device="cuda", dtype: torch.dtype = torch.bfloat16) -> None:
    """Compile the dequantizers of `qtypes` for `device` now (first compile takes seconds each)."""
    for qt in (QUANTIZED_TYPES if qtypes is None else [as_qtype(q) for q in qtypes]):
        block, tsize = BLOCK_SIZES[qt]
        raw = torch.zeros(4 * tsize, dtype=torch.uint8, device=device)
        dequantize(raw, qt, (4 * block,), dtype)
