"""The CUDA dequantization kernel in Triton: one kernel for all types, specialised per type at compile time.

Imported by formats/dequant.py on first CUDA use (`triton_available`), inside a try: without Triton
(or with one that cannot be used) dequant falls back to torch.compile / eager and says so once.

Each program dequantizes a tile of TILE consecutive output weights (see the kernel's comment);
neighbouring weights share cache lines, so the blocks are read from DRAM once, and the tile is
written once, in the output dtype, with vector stores.  Same fp32 arithmetic as the torch code in
formats/dequant_blocks.py; all products are exact in fp32, so a fused multiply-add cannot change a result:
bit-identical.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

TILE = 1024     # weights per program
WARPS = 4


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


def launch(raw: torch.Tensor, out: torch.Tensor, levels: torch.Tensor, n_out: int, qtype_id: int, block: int,
           type_size: int, *, tile: int | None = None, num_warps: int | None = None) -> None:
    """Dequantize `n_out` weights of GGML type `qtype_id` (`block` weights in `type_size` bytes per block)
    from the flat uint8 CUDA tensor `raw` into the flat `out` (its dtype), on the current stream."""
    tile = tile or TILE
    _kernel[(triton.cdiv(n_out, tile),)](raw, out, levels, n_out, QT=qtype_id, QB=block, TS=type_size,
                                         TILE=tile, num_warps=num_warps or WARPS)
