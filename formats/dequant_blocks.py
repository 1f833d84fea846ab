"""GGUF (ggml) block decoders in torch: one function per quant type, and the table that names them.

Every kernel has one signature, (n_blocks, type_size) uint8 -> (n_blocks, weights_per_block) float32
(IQ4 types also take the 16-value level table, `iq4_levels(device)`), written as a handful of vectorised
tensor ops over all blocks at once (no Python loop over blocks, no data-dependent control flow).
Arithmetic is done in float32 in the same order as the reference (ggml / gguf-py), so results match
`gguf.quants.dequantize` bit for bit on CPU.  `KERNELS` maps each GGML type to its kernel;
`dequantize_eager` is the shared block reshape around it.  Which backend runs a kernel (eager,
torch.compile, the Triton twin in formats/dequant_triton.py) is chosen in formats/dequant.py.

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

from typing import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

__all__ = ["KERNELS", "NEEDS_LEVELS", "QK_K", "iq4_levels", "dequantize_eager"]

QK_K = 256

# the 16 non-linear levels of IQ4_NL / IQ4_XS
_IQ4_LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


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


def iq4_levels(device: torch.device) -> torch.Tensor:
    """The IQ4 level table as float32 on `device` (made once per device)."""
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


KERNELS: dict[QT, Callable] = {
    QT.Q8_0: _q8_0, QT.Q4_0: _q4_0, QT.Q4_1: _q4_1, QT.Q5_0: _q5_0, QT.Q5_1: _q5_1,
    QT.Q2_K: _q2_k, QT.Q3_K: _q3_k, QT.Q4_K: _q4_k, QT.Q5_K: _q5_k, QT.Q6_K: _q6_k,
    QT.IQ4_NL: _iq4_nl, QT.IQ4_XS: _iq4_xs,
}
NEEDS_LEVELS = frozenset({QT.IQ4_NL, QT.IQ4_XS})   # kernels that take iq4_levels(device) as second argument


def dequantize_eager(qt: QT, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Flat output of `dtype` from flat contiguous uint8 raw (whole blocks of quantized type `qt`)."""
    tsize = GGML_QUANT_SIZES[qt][1]
    b = raw.view(-1, tsize)
    if qt in NEEDS_LEVELS:
        y = KERNELS[qt](b, iq4_levels(raw.device))
    else:
        y = KERNELS[qt](b)
    return y.reshape(-1).to(dtype)
