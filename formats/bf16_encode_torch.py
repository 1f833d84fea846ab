"""The encoder of formats/bf16_codec.py's "escape levels" format in torch ops, run on the tensor's own device.

    enc = encode_on(t_gpu)                         # one call: the packed buffer on t's device
    job = prepare(t_gpu)                           # phase 1: histograms, widths, sizes (ONE device sync)
    slot = arena_slice(job.nbytes)                 #   the caller allocates the exact packed size ...
    enc = job.write(out=slot)                      # phase 2: code and pack into `slot` (no sync)
    temp_bytes(t.numel(), t.dtype)                 # the documented bound on the device scratch

Why.  formats/bf16_encode.py codes with numpy on the host: ~130 MB/s per thread, ~500-700 MB/s on a
16-thread pool (bench/results/codec_h200.md), so a 23.8 GB FLUX.1-dev checkpoint takes ~40 s to compress,
at every load.  A GPU does the same arithmetic at hundreds of GB/s of memory bandwidth; what is left is
kernel launches (a few dozen per chunk of 16M values) and the tensor's upload, which the runtime pays
anyway.  bench/bench_codec.py reports this encoder's GB/s beside the numpy encoder's MB/s.

Output.  Byte for byte the buffer formats.bf16_encode.encode makes for the same tensor, `block`,
`widths` and `max_levels` (tests/test_bf16_encode_torch.py compares them): the same histogram, the same
rank order (count descending, ties by the smaller symbol: a stable sort of the negated counts), the same
widths (choose_widths is called on the same counts), the same codes, the same zero padding codes per
block and level, the same offsets and the same zero bytes between sections.

How.  The values are cut into chunks of whole blocks (`chunk` values, fewer when blocks are small: the
per-block histograms then dominate), and every step is a vectorised torch op over a chunk; the Python
loops run over chunks and over the <= 4 levels, never over blocks or values.

* phase 1 (`prepare`): per chunk, the symbol histogram of every block (bincount on the CPU; on CUDA an
  index_add_ of ones, because torch.bincount reads its input's maximum back to the host); their sum is
  the tensor's histogram, a stable sort of it the rank order.  Then per block and rank threshold t the
  number of values whose rank is >= t (a reversed cumulative sum over the rank-ordered histogram), each
  rounded up to a multiple of 8 and summed over the chunk's blocks: whatever widths are chosen, a level
  starting at rank `base` holds exactly padded[base] codes of that chunk.  One copy to the host of these
  per-chunk numbers (2 x 256 integers per chunk) is the only device sync of the whole encode; from them
  the host chooses the widths and knows every section's size and where each chunk's codes go.
* phase 2 (`PreparedEncode.write`): per chunk, raw bytes (and fp16's 3-bit `hi` stream), level 0's
  codes (rank, capped at the escape code) packed 8 codes into k bytes with integer shifts, then per level
  j >= 1 the values that reach it (rank >= base_j): their positions by `nonzero_static` (its size is
  known from phase 1, so no sync), each block's count in the level by searchsorted in those sorted
  positions, rounded up to 8 codes for the block's start, a scatter of the codes to block start + index
  in block into a zeroed dense array, and its packing into the level's section; the level's offsets
  (int32) come from the same block counts, continued from the previous chunk's (a host integer).
  The table is the first ranks of the device-side rank order.  Everything lands in one uint8 buffer on
  the tensor's device, or in `out` (the caller's slice of exactly `nbytes`): written in place when `out`
  is on the tensor's device, else staged on the device and copied once, non_blocking when `out` is
  pinned host memory (synchronise the stream, e.g. with an event, before reading it on the host).

Memory.  Besides the input (and its flat copy when it is not contiguous) the device scratch at any
moment is at most `temp_bytes(numel, dtype, block, chunk, staged_bytes)`: 24 bytes per value of one
chunk plus 16 bytes per block and histogram bin of one chunk (the chunk shrinks so that the two
together stay <= 24 x `chunk` bytes), plus the int32 per-block histograms of the whole tensor when
phase 1 keeps them (when they take at most half the tensor's bytes: bf16 with block >= 2048 -- 0.25 x
the tensor at 2048 --, fp16 with block >= 256; else it computes them twice), plus the staged packed
buffer when `out` is on another device, plus 4 MiB of slack.  As a multiple of the bytes of the values
in one chunk (2 per value), measured on the CPU with the profiler: trained-weight-like tensors (std 0.02
normal) need 3.0 x in phase 1 and 3.2 x in phase 2; the worst case, every value escaping to every level
(forced widths (1, 1, 1, 8) on all 65536 bit patterns), 9.2 x; the bound at block 2048 is 13 x (small
blocks cost more: bf16 at block 64 measures 26 x in phase 1, its per-block histograms).  A tensor of at
most `chunk` values (default 2^24 = 32 MiB of bf16) is one chunk, so that is its multiple; a larger one
is coded chunk after chunk, so with the defaults the scratch stays under 388 MiB + 0.25 x the tensor
(+ the staged packed bytes, ~0.68 x the tensor), ~110 MiB in practice for weights.  A smaller `chunk`
lowers the bound (more kernel launches).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

from ..errors import DisTorchError
from .bf16_codec import (DEFAULT_BLOCK, DEFAULT_MAX_LEVELS, CodecMeta, Encoded, _check_meta, _ceil8, layout)
from .bf16_encode import _check_input, choose_widths

__all__ = ["encode_on", "prepare", "PreparedEncode", "temp_bytes", "DEFAULT_DEVICE_CHUNK"]

DEFAULT_DEVICE_CHUNK = 1 << 24   # values per chunk: the scratch is bounded by ~24 bytes x this
_PER_VALUE = 24                  # scratch bytes per value of a chunk, worst case (measured: <= 18.4)
_PER_BIN = 16                    # scratch bytes per block and histogram bin of a chunk (measured: ~12)
_SLACK = 4 << 20                 # allocator rounding, library scratch (cub), small tensors
_BINS = {"bfloat16": 256, "float16": 32}
_ATOMIC_ON_CPU = False           # tests: run the CUDA histogram path (index_add_) on the CPU too


# ------------------------------------------------------------------------------------------------
# sizes

def _chunk_values(n: int, block: int, bins: int, chunk: int) -> int:
    """Values per chunk: whole blocks, at least one, few enough that the chunk's values and its per-block
    histograms need at most _PER_VALUE x `chunk` bytes of scratch, and the chunks of n as even as that
    allows."""
    c = max(block, chunk * _PER_VALUE * block // (_PER_VALUE * block + _PER_BIN * (bins + 1)) // block * block)
    blocks = max(1, -(-n // block))
    pieces = -(-blocks * block // c)
    return -(-blocks // pieces) * block


def _keeps_histograms(n: int, block: int, bins: int) -> bool:
    """Whether phase 1 keeps every block's histogram (int32, bins + 1 each) between its two passes."""
    return -(-n // block) * (bins + 1) * 4 <= n       # at most half the tensor's 2n bytes


def temp_bytes(numel: int, dtype: torch.dtype | str = torch.bfloat16, block: int = DEFAULT_BLOCK,
               chunk: int = DEFAULT_DEVICE_CHUNK, staged_bytes: int = 0) -> int:
    """Upper bound on the device scratch an encode_on / prepare + write of a tensor of `numel` values
    allocates besides its input (module docstring); `staged_bytes`: the packed size when `out` is on
    another device (the staging buffer), else 0."""
    name = str(dtype).removeprefix("torch.")
    bins = _BINS.get(name, 256)
    c = _chunk_values(numel, block, bins, chunk)
    per_chunk = _PER_VALUE * c + _PER_BIN * (c // block) * (bins + 1)
    keep = -(-numel // block) * (bins + 1) * 4 if _keeps_histograms(numel, block, bins) else 0
    chunks = -(-numel // c)
    return per_chunk + keep + chunks * 32 * bins + staged_bytes + _SLACK


# ------------------------------------------------------------------------------------------------
# device helpers (no host sync in any of them)

def _fields(x: torch.Tensor, fp16: bool) -> torch.Tensor:
    """int16 bit patterns -> the exponent symbol (int16)."""
    return (x >> 10) & 0x1F if fp16 else (x >> 7) & 0xFF


def _count(keys: torch.Tensor, size: int, atomic: bool) -> torch.Tensor:
    """Histogram (int32, `size` bins) of int32 `keys` in 0 .. size - 1.  torch.bincount reads the
    maximum key back to the host on CUDA (a sync), so CUDA adds ones with index_add_ instead."""
    if atomic:
        ones = torch.ones((), dtype=torch.int32, device=keys.device).expand(keys.numel())
        return torch.zeros(size, dtype=torch.int32, device=keys.device).index_add_(0, keys, ones)
    return torch.bincount(keys, minlength=size).to(torch.int32)


def _pack_into(dst: torch.Tensor, codes: torch.Tensor, k: int) -> None:
    """k-bit codes (uint8, length a multiple of 8, values < 2^k) -> their little-endian bit stream in
    `dst` (uint8, len(codes) * k / 8 bytes).  The codes of a byte (k = 1, 2, 4) or of a k-byte group
    (8 codes: k = 3, 5, 6, 7) are shifted into place and summed (their bits are disjoint: a sum is an or)."""
    if k == 0 or codes.numel() == 0:
        return
    if k == 8:
        dst.copy_(codes)
        return
    dev = codes.device
    if 8 % k == 0:
        shifts = torch.arange(0, 8, k, dtype=torch.uint8, device=dev)
        dst.copy_((codes.view(-1, 8 // k) << shifts).sum(1, dtype=torch.uint8))
        return
    wide, size = (torch.int32, 4) if k == 3 else (torch.int64, 8)     # 24 or 40..56 bits per word
    shifts = torch.arange(0, 8 * k, k, dtype=wide, device=dev)
    w = codes.view(-1, 8).to(wide).bitwise_left_shift_(shifts).sum(1, dtype=wide)
    dst.view(-1, k).copy_(w.view(torch.uint8).view(-1, size)[:, :k])


# ------------------------------------------------------------------------------------------------
# the two phases

@dataclasses.dataclass
class PreparedEncode:
    """Phase 1 of an encode on the tensor's device: the metadata and packed size are known (`meta`,
    `nbytes`); `write(out)` codes the tensor into `out` without a device sync."""
    meta: CodecMeta
    nbytes: int
    _x: torch.Tensor                       # the values, flat int16, on the device
    _order: torch.Tensor                   # the 256 symbols by rank (int64, device)
    _rank_of: torch.Tensor                 # symbol (and the padding symbol `bins`) -> rank, uint8 (device)
    _spans: list[tuple[int, int]]          # chunks: value ranges, whole blocks
    _level_counts: list[list[int]]         # [chunk][j-1]: values of the chunk in level j
    _level_padded: list[list[int]]         # [chunk][j-1]: codes of the chunk in level j (padded per block)

    @property
    def device(self) -> torch.device:
        return self._x.device

    def write(self, out: torch.Tensor | None = None) -> Encoded:
        """Code and pack (phase 2; no device sync).  Into `out` when given: a contiguous 1-D uint8 tensor
        of exactly `nbytes`, on any device (written in place on the tensor's device; else staged there and
        copied once: non_blocking when `out` is pinned host memory, so synchronise before reading it; a
        pageable one makes the copy synchronous), any start (the decoders want a multiple of 16 bytes);
        else into a new buffer on the tensor's device."""
        if out is not None:
            if (not isinstance(out, torch.Tensor) or out.dtype != torch.uint8 or out.dim() != 1
                    or out.numel() != self.nbytes or not out.is_contiguous()):
                raise DisTorchError(f"out must be a contiguous 1-D uint8 tensor of exactly {self.nbytes} bytes "
                                    f"(the packed size); got {getattr(out, 'dtype', type(out).__name__)} "
                                    f"{tuple(getattr(out, 'shape', ()))}")
        dev = self._x.device
        buf = out if out is not None and out.device == dev else \
            torch.empty(self.nbytes, dtype=torch.uint8, device=dev)
        self._fill(buf)
        if out is None or buf is out:
            return Encoded(self.meta, buf)
        pinned = out.device.type == "cpu" and dev.type == "cuda" and out.is_pinned()
        out.copy_(buf, non_blocking=pinned)
        return Encoded(self.meta, out)

    def _fill(self, buf: torch.Tensor) -> None:
        m, lay = self.meta, layout(self.meta)
        fp16 = m.dtype == "float16"
        widths, bases, L = m.widths, m.bases(), m.levels
        block = m.block
        shift = block.bit_length() - 1
        nb = m.n_blocks
        dev = buf.device
        # zero bytes: everything but the sections written below (alignment gaps, offsets[:, 0])
        sections = [lay.offsets, lay.table, lay.raw, lay.hi, *lay.levels]
        end = 0
        for start, length in sections:
            if start > end:
                buf[end:start].zero_()
            end = max(end, start + length)
        if lay.total > end:
            buf[end:].zero_()
        offs = torch.zeros(L - 1, nb + 1, dtype=torch.int32, device=dev)      # copied in at the end (an
        #                                            `out` slice need not start at a multiple of 4 bytes)
        tl, tab = m.table_len(), lay.table[0]              # the symbols by rank; ranks past 255: 0
        take = min(tl, 256)
        buf[tab:tab + take].copy_(self._order[:take])
        if tl > take:
            buf[tab + take:tab + tl].zero_()
        bins = _BINS[m.dtype]
        starts = [0] * (L - 1)                            # each level's codes before this chunk
        for c, (s, e) in enumerate(self._spans):
            n = e - s
            cb = -(-n // block)
            x = self._x[s:e]
            if cb * block != n:
                x = torch.cat([x, x.new_zeros(cb * block - n)])
            # raw bytes (and fp16's hi stream)
            r0 = lay.raw[0] + s
            if fp16:
                buf[r0:r0 + n].copy_(x[:n] & 0xFF)
                hi = ((x[:_ceil8(n)] >> 13) & 4).bitwise_or_((x[:_ceil8(n)] >> 8) & 3).to(torch.uint8)
                h0 = lay.hi[0] + s * 3 // 8
                _pack_into(buf[h0:h0 + _ceil8(n) * 3 // 8], hi, 3)
                del hi
            else:
                buf[r0:r0 + n].copy_(((x[:n] >> 8) & 0x80).bitwise_or_(x[:n] & 0x7F))
            # ranks (the padding after the last value: the extra symbol `bins`, rank 0)
            sym = _fields(x, fp16).to(torch.int32)
            if cb * block != n:
                sym[n:] = bins
            rank = self._rank_of.index_select(0, sym)
            del sym, x
            k0 = widths[0]
            code0 = rank[:_ceil8(n)]
            if L > 1:
                code0 = code0.clamp_max((1 << k0) - 1)
            l0 = lay.levels[0][0] + s * k0 // 8
            _pack_into(buf[l0:l0 + _ceil8(n) * k0 // 8], code0, k0)
            del code0
            # levels 1 ..: the values that reach them (rank >= base), block by block
            bounds = torch.arange(0, (cb + 1) * block, block, device=dev)
            b0 = s // block
            for j in range(1, L):
                cnt_j, pad_j = self._level_counts[c][j - 1], self._level_padded[c][j - 1]
                if cnt_j:                                 # their positions, ascending (size known: no sync)
                    pos = torch.nonzero_static(rank >= bases[j], size=cnt_j)[:, 0]
                else:                                     # (and a base past 255 would not fit a uint8)
                    pos = torch.zeros(0, dtype=torch.int64, device=dev)
                ustart = torch.searchsorted(pos, bounds)  # [b]: the block's first value in the level
                cnt = ustart[1:] - ustart[:-1]
                pcnt = (cnt + 7) & -8
                pend = torch.cumsum(pcnt, 0)
                offs[j - 1, 1 + b0:1 + b0 + cb] = pend + starts[j - 1]
                k = widths[j]
                if k and cnt_j:
                    code = rank.index_select(0, pos).sub_(bases[j])
                    if j < L - 1:
                        code.clamp_max_((1 << k) - 1)
                    move = pend - pcnt - ustart[:-1]      # per block: padded start - start
                    tgt = move.index_select(0, pos.bitwise_right_shift_(shift))
                    del pos, move
                    tgt += torch.arange(cnt_j, device=dev)
                    dense = torch.zeros(pad_j, dtype=torch.uint8, device=dev)
                    dense.index_put_((tgt,), code)
                    del tgt, code
                    lj = lay.levels[j][0] + starts[j - 1] * k // 8
                    _pack_into(buf[lj:lj + pad_j * k // 8], dense, k)
                    del dense
                else:
                    del pos
                starts[j - 1] += pad_j
            del rank
        if L > 1:
            buf[lay.offsets[0]:lay.offsets[0] + lay.offsets[1]].copy_(offs.view(-1).view(torch.uint8))


def prepare(t: torch.Tensor, *, block: int = DEFAULT_BLOCK, max_levels: int = DEFAULT_MAX_LEVELS,
            widths: Sequence[int] | None = None, chunk: int = DEFAULT_DEVICE_CHUNK) -> PreparedEncode:
    """Phase 1 of coding `t` (bfloat16 / float16, any shape) on its own device: histograms, rank order,
    widths (choose_widths, or `widths` forced), every section's size.  ONE device sync (the per-chunk
    counts read back).  The result's `nbytes` is the packed size; its `write(out)` does the rest."""
    name = _check_input(t)
    fp16 = name == "float16"
    if not isinstance(block, int) or block < 64 or block > 1 << 20 or block & (block - 1):
        raise DisTorchError(f"block {block!r} must be a power of two in 64 .. 2^20")
    if not isinstance(chunk, int) or chunk < 1:
        raise DisTorchError(f"chunk {chunk!r} must be a positive int (values per chunk)")
    if widths is None:
        choose_widths((), 1, max_levels)                 # validates max_levels before any device work
    else:
        widths = tuple(int(k) for k in widths)
        _check_meta(CodecMeta(name, tuple(t.shape), block, widths, (0,) * (len(widths) - 1)))
    bins = _BINS[name]
    x = t.detach().reshape(-1).view(torch.int16)
    n = x.numel()
    dev = x.device
    atomic = dev.type != "cpu" or _ATOMIC_ON_CPU
    c_vals = _chunk_values(n, block, bins, chunk)
    spans = [(s, min(n, s + c_vals)) for s in range(0, n, c_vals)]

    def block_hist(s: int, e: int) -> torch.Tensor:
        """(blocks, bins) int32: each block's symbol histogram (a view of (blocks, bins + 1))."""
        m = e - s
        cb = -(-m // block)
        xs = x[s:e]
        sym = _fields(xs, fp16).to(torch.int32)
        if cb * block != m:
            sym = torch.cat([sym, sym.new_full((cb * block - m,), bins)])
        keys = sym.view(cb, block)
        keys += (torch.arange(cb, dtype=torch.int32, device=dev) * (bins + 1))[:, None]
        h = _count(keys.view(-1), cb * (bins + 1), atomic)
        return h.view(cb, bins + 1)[:, :bins]

    keep = _keeps_histograms(n, block, bins)
    hist = torch.zeros(256, dtype=torch.int64, device=dev)
    kept = []
    for s, e in spans:
        h = block_hist(s, e)
        hist[:bins] += h.sum(0)
        if keep:
            kept.append(h)
        del h
    order = torch.sort(-hist, stable=True).indices                 # ties: the smaller symbol first
    rank_of = torch.empty(256, dtype=torch.int64, device=dev)
    rank_of[order] = torch.arange(256, device=dev)
    rank_ext = torch.cat([rank_of[:bins], rank_of.new_zeros(1)]).to(torch.uint8)   # + the padding symbol
    by_rank = order[:bins].flip(0)          # the ranks bins-1 .. 0 (fp16: ranks 0..31 are symbols 0..31)
    rows = []
    for i, (s, e) in enumerate(spans):
        h = kept[i] if keep else block_hist(s, e)
        if keep:
            kept[i] = None
        hr = h.index_select(1, by_rank)                             # (blocks, bins): rank bins-1 first
        del h
        cnt = hr.sum(0, dtype=torch.int64)
        hr.cumsum_(1)                                               # [:, i]: values of rank >= bins-1-i
        pad = hr.add_(7).bitwise_and_(-8).sum(0, dtype=torch.int64)
        rows.append(torch.stack([cnt, pad]).flip(1))                # back to rank order
        del hr
    host = torch.stack(rows).to("cpu").tolist() if rows else []     # the one device sync
    del rows, kept

    counts = [sum(row[0][r] for row in host) for r in range(bins)]
    distinct = sum(1 for v in counts if v)
    nb = -(-n // block)
    widths = choose_widths(counts, nb, max_levels) if widths is None else widths
    meta = CodecMeta(name, tuple(t.shape), block, widths, (0,) * (len(widths) - 1))
    _check_meta(meta)
    if distinct > meta.table_len():
        raise DisTorchError(f"widths {widths} code {meta.table_len()} symbols; this tensor has {distinct} "
                            "distinct exponents (leave widths=None to choose them)")
    bases = meta.bases()
    level_counts, level_padded = [], []
    for row in host:
        tail = [0] * (bins + 1)                                   # tail[t]: values of rank >= t
        for r in range(bins - 1, -1, -1):
            tail[r] = tail[r + 1] + row[0][r]
        level_counts.append([tail[min(b, bins)] for b in bases[1:]])
        level_padded.append([row[1][b] if b < bins else 0 for b in bases[1:]])
    entries = tuple(sum(p[j] for p in level_padded) for j in range(len(widths) - 1))
    meta = dataclasses.replace(meta, entries=entries)
    table = order.clone()
    table[distinct:] = 0                    # ranks no value has: 0 (as the host encoder writes them)
    return PreparedEncode(meta, layout(meta).total, x, table, rank_ext, spans, level_counts, level_padded)


def encode_on(t: torch.Tensor, *, block: int = DEFAULT_BLOCK, max_levels: int = DEFAULT_MAX_LEVELS,
              widths: Sequence[int] | None = None, out: torch.Tensor | None = None,
              chunk: int = DEFAULT_DEVICE_CHUNK) -> Encoded:
    """Encode a bfloat16 / float16 tensor losslessly with torch ops on its own device (CUDA or CPU), into
    the same bytes as formats.bf16_encode.encode(t, block=block, widths=widths, max_levels=max_levels).
    The packed buffer is a new uint8 tensor on t's device, or `out` (a contiguous uint8 tensor of exactly
    the packed size, any device; see PreparedEncode.write).  One device sync; `prepare` splits the call
    in two so that the caller can allocate `out` in between."""
    return prepare(t, block=block, max_levels=max_levels, widths=widths, chunk=chunk).write(out)
