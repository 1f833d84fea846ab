"""The GPU decoder of formats/bf16_codec.py in Triton: one program per block of the encoded tensor.

Imported by formats/bf16_codec.py on first use (`triton_available`), inside a try: without Triton the
torch decoder (`bf16_codec.decode`) does the same work, slower.  Under TRITON_INTERPRET=1 the kernel
runs on CPU tensors (that is how CI tests it).

A program decodes the `block` values of its block (see the format in bf16_codec's docstring): it reads
each value's level-0 code; the values whose code is the escape find their level-1 code at
offsets[b] + (escapes before them in the block) -- an exclusive prefix sum over the block, `tl.cumsum`
-- and so on down the levels; the rank indexes the symbol table; the symbol and the raw sign/mantissa
byte (and for fp16 the 3-bit `hi` field) give the 16-bit value, stored with one int16 store per value.
Every load is masked to its section's length (and, per level, to the block's own codes), so a corrupt
buffer yields wrong values but never a read outside it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import triton
import triton.language as tl

if TYPE_CHECKING:
    import torch

    from .bf16_codec import Encoded

WARPS = 8       # with 2048-value blocks: best of 4/8/16 on an H200 (bench/bench_codec.py)


@triton.jit
def _bits(stream, idx, K, nbytes, mask):
    """The K-bit codes number `idx` (int32 < 2^31) of a little-endian bit stream of `nbytes` bytes (int32;
    0 where masked).  For the sparse levels: two byte loads per code; int32 throughout (idx * K could
    overflow, (idx >> 3) * K cannot)."""
    t = (idx & 7) * K
    byte = (idx >> 3) * K + (t >> 3)
    lo = tl.load(stream + byte, mask=mask & (byte < nbytes), other=0).to(tl.int32)
    hi = tl.load(stream + byte + 1, mask=mask & (byte + 1 < nbytes), other=0).to(tl.int32)
    return ((lo | (hi << 8)) >> (t & 7)) & ((1 << K) - 1)


@triton.jit
def _row_codes(stream, rows, K: tl.constexpr, nbytes, rmask):
    """The 8 K-bit codes of each row in `rows` ([G, 1] int32): [G, 8] int32.  Row r's codes are the K
    bytes at r * K, loaded as one word when K is 1, 2, 4 or 8 (the section starts 16-byte aligned)."""
    lane = tl.arange(0, 8)[None, :]
    if K == 0:
        w = tl.zeros(rows.shape, tl.int64)
    elif K == 1:
        w = tl.load(stream + rows, mask=rmask & (rows < nbytes), other=0).to(tl.int64)
    elif K == 2:
        p = stream.to(tl.pointer_type(tl.int16))
        w = tl.load(p + rows, mask=rmask & (rows * 2 < nbytes), other=0).to(tl.int64) & 0xFFFF
    elif K == 4:
        p = stream.to(tl.pointer_type(tl.int32))
        w = tl.load(p + rows, mask=rmask & (rows * 4 < nbytes), other=0).to(tl.int64) & 0xFFFFFFFF
    elif K == 8:
        p = stream.to(tl.pointer_type(tl.int64))
        w = tl.load(p + rows, mask=rmask & (rows * 8 < nbytes), other=0)
    else:
        w = tl.zeros(rows.shape, tl.int64)
        for b in tl.static_range(K):
            byte = rows * K + b
            w |= tl.load(stream + byte, mask=rmask & (byte < nbytes), other=0).to(tl.int64) << (8 * b)
    return ((w >> (lane * K).to(tl.int64)) & ((1 << K) - 1)).to(tl.int32)


@triton.jit
def _escape_level(stream, K, nbytes, offsets, row, n_blocks, pid, esc):
    """Codes of level (row + 1) for the values flagged by `esc` ([G, 8]) in block `pid`: a value's code
    is number offsets[b] + (escapes before it in the block) of that level."""
    e = esc.to(tl.int32)
    per_row = tl.sum(e, axis=1)
    before = (tl.cumsum(per_row, 0) - per_row)[:, None] + (tl.cumsum(e, 1) - e)
    start = tl.load(offsets + row * (n_blocks + 1) + pid)
    end = tl.load(offsets + row * (n_blocks + 1) + pid + 1)
    idx = start + before
    return _bits(stream, idx, K, nbytes, esc & (idx < end))


@triton.jit
def _kernel(out, raw, hi, table, offsets, l0, l1, l2, l3,
            n, n_blocks, table_len, n_hi, n0, n1, n2, n3, k1, k2, k3, b1, b2, b3,
            K0: tl.constexpr, LEVELS: tl.constexpr, FP16: tl.constexpr, BLOCK: tl.constexpr):
    # The block as [BLOCK // 8, 8]: a row is 8 consecutive values, whose level-0 codes fill K0 whole
    # bytes and whose outputs are one 16-byte store.
    G: tl.constexpr = BLOCK // 8
    pid = tl.program_id(0)
    rows = pid * G + tl.arange(0, G)[:, None]             # [G, 1]; int32: values < 2^31 (CodecMeta)
    offs = rows * 8 + tl.arange(0, 8)[None, :]            # [G, 8]
    m = offs < n
    rmask = rows * 8 < n
    code = _row_codes(l0, rows, K0, n0, rmask)
    rank = code
    if LEVELS > 1:
        esc = m & (code == (1 << K0) - 1)
        c = _escape_level(l1, k1, n1, offsets, 0, n_blocks, pid, esc)
        rank = tl.where(esc, b1 + c, rank)
        if LEVELS > 2:
            esc = esc & (c == (1 << k1) - 1)
            c = _escape_level(l2, k2, n2, offsets, 1, n_blocks, pid, esc)
            rank = tl.where(esc, b2 + c, rank)
            if LEVELS > 3:
                esc = esc & (c == (1 << k2) - 1)
                c = _escape_level(l3, k3, n3, offsets, 2, n_blocks, pid, esc)
                rank = tl.where(esc, b3 + c, rank)
    sym = tl.load(table + rank, mask=m & (rank < table_len), other=0).to(tl.int32)
    r = tl.load(raw + offs, mask=m, other=0).to(tl.int32)
    if FP16:
        h = _row_codes(hi, rows, 3, n_hi, rmask)
        v = ((h & 4) << 13) | ((sym & 31) << 10) | ((h & 3) << 8) | r
    else:
        v = ((r & 128) << 8) | (sym << 7) | (r & 127)
    tl.store(out + offs, v.to(tl.int16), mask=m)


def launch(enc: Encoded, out: torch.Tensor, *, num_warps: int | None = None) -> None:
    """Decode `enc` (its buffer on out's device) into the contiguous `out` (meta's dtype and numel), on
    the current stream.  Sections a tensor does not have are passed as the buffer itself, length 0."""
    import torch
    m = enc.meta
    levels = [enc.section("level", j) for j in range(m.levels)]
    streams = [s if s.numel() else enc.buf for s in levels] + [enc.buf] * (4 - m.levels)
    lens = [s.numel() for s in levels] + [0] * (4 - m.levels)
    widths = list(m.widths[1:]) + [0] * (4 - m.levels)
    bases = list(m.bases()[1:]) + [0] * (4 - m.levels)
    offsets = enc.section("offsets") if m.levels > 1 else torch.zeros(1, dtype=torch.int32, device=enc.buf.device)
    hi = enc.section("hi")
    _kernel[(m.n_blocks,)](out.view(-1).view(torch.int16), enc.section("raw"), hi if hi.numel() else enc.buf,
                           enc.section("table"), offsets, *streams,
                           m.numel, m.n_blocks, m.table_len(), hi.numel(), *lens, *widths[:3], *bases[:3],
                           K0=m.widths[0], LEVELS=m.levels, FP16=m.dtype == "float16", BLOCK=m.block,
                           num_warps=num_warps or WARPS)
