"""The encoder of formats/bf16_codec.py's "escape levels" format (that file: the format, its validation and
the decoders): the level widths for a histogram (`choose_widths`) and `encode`, which codes a bfloat16 or
float16 tensor on the CPU once, at load, in chunks a thread pool can run.
"""
from __future__ import annotations

import dataclasses
import functools
from concurrent.futures import Executor
from typing import Callable, Sequence

import numpy as np
import torch

from ..errors import DisTorchError
from .bf16_codec import (DEFAULT_BLOCK, DEFAULT_CHUNK, DEFAULT_MAX_LEVELS, DTYPES, MAX_LEVELS, MAX_NUMEL,
                         _OFFSET_BITS, CodecMeta, Encoded, _check_meta, layout)

__all__ = ["encode", "choose_widths", "codable", "MIN_CODED_NUMEL"]

MIN_CODED_NUMEL = 1 << 16      # smaller tensors (biases, norm scales) stream raw: too small to pay a launch


def codable(t: torch.Tensor) -> bool:
    """Whether the runtime codes tensor `t` when its unit streams compressed: a plain (not subclassed)
    bfloat16 / float16 tensor, dense, with MIN_CODED_NUMEL .. MAX_NUMEL values.  The one rule the tracer's
    facts (compiler/trace.py), the planner (passes/codec_choice.py) and the runtime (runtime/codec_stream.py)
    share."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.dtype not in (torch.bfloat16, torch.float16):
        return False
    n = t.numel()
    if n < MIN_CODED_NUMEL or n > MAX_NUMEL:
        return False
    return t.is_contiguous()


# ------------------------------------------------------------------------------------------------
# the width choice

def choose_widths(counts: Sequence[int], n_blocks: int = 1, max_levels: int = DEFAULT_MAX_LEVELS) -> tuple[int, ...]:
    """The level widths that minimise the coded size of symbols with these counts (any order; zeros
    allowed).  Cost: codes of every level, plus per block and level >= 1 an int32 offset and on
    average 3.5 padding codes.  Exact over all 1 .. max_levels level choices of widths 0 .. 8."""
    if not isinstance(max_levels, int) or not 1 <= max_levels <= MAX_LEVELS:
        raise DisTorchError(f"max_levels {max_levels!r} must be an int in 1 .. {MAX_LEVELS}")
    f = sorted((int(c) for c in counts if c > 0), reverse=True)
    distinct = len(f)
    if distinct > 256:
        raise DisTorchError(f"{distinct} distinct symbols; the codec codes at most 256")
    rem = [0] * (distinct + 1)               # rem[c]: values whose rank >= c
    for i in range(distinct - 1, -1, -1):
        rem[i] = rem[i + 1] + f[i]

    @functools.lru_cache(maxsize=None)
    def best(level: int, covered: int) -> tuple[float, tuple[int, ...]]:
        n = rem[min(covered, distinct)]
        over = n_blocks * _OFFSET_BITS if level > 0 else 0
        opts: list[tuple[float, tuple[int, ...]]] = []
        for k in range(0, 9):
            pad = 3.5 * k * n_blocks if level > 0 else 0
            if distinct - covered <= (1 << k):          # last level: no escape
                opts.append((n * k + over + pad, (k,)))
            if k >= 1 and level + 1 < max_levels and covered + (1 << k) - 1 < distinct:
                sub_cost, sub = best(level + 1, covered + (1 << k) - 1)
                opts.append((n * k + over + pad + sub_cost, (k,) + sub))
        return min(opts, key=lambda o: (o[0], len(o[1])))
    return best(0, 0)[1]


# ------------------------------------------------------------------------------------------------
# encoder (numpy: on the CPU its ufuncs and gathers are several times faster than torch's, whose
# fresh allocations are not huge-page backed; chunks of ~1M values keep the temporaries in cache)

def _check_input(t: torch.Tensor) -> str:
    if not isinstance(t, torch.Tensor):
        raise DisTorchError(f"encode takes a torch.Tensor, not {type(t).__name__}")
    name = str(t.dtype).removeprefix("torch.")
    if name not in DTYPES:
        raise DisTorchError(f"encode codes bfloat16 and float16 tensors; this one is {name}")
    if t.numel() > MAX_NUMEL:
        raise DisTorchError(f"tensor of {t.numel()} values; the codec takes at most {MAX_NUMEL} per tensor "
                            "(encode it in slices)")
    return name


def _symbols(u: np.ndarray, fp16: bool) -> np.ndarray:
    """uint16 values -> their exponents (uint8)."""
    return ((u >> 10) & 0x1F).astype(np.uint8) if fp16 else (u >> 7).astype(np.uint8)


def _pack_bits(codes: np.ndarray, k: int) -> np.ndarray:
    """k-bit codes (uint8, length a multiple of 8, values < 2^k) -> their little-endian bit stream."""
    if k == 0 or codes.size == 0:
        return np.empty(0, np.uint8)
    if k == 8:
        return codes
    if 8 % k == 0:                                  # 1, 2, 4: whole codes per byte
        c = codes.reshape(-1, 8 // k)
        out = c[:, 0].copy()
        for i in range(1, 8 // k):
            out |= c[:, i] << np.uint8(k * i)
        return out
    wide = np.uint32 if k <= 4 else np.uint64       # 3, 5, 6, 7: 8 codes in k bytes of one word
    c = codes.reshape(-1, 8)
    w = c[:, 0].astype(wide)
    for i in range(1, 8):
        w |= c[:, i].astype(wide) << wide(k * i)
    return w.view(np.uint8).reshape(-1, np.dtype(wide).itemsize)[:, :k].reshape(-1)


def _pad8(a: np.ndarray) -> np.ndarray:
    r = (-a.size) % 8
    return np.concatenate([a, np.zeros(r, a.dtype)]) if r else a


def _encode_chunk(u: np.ndarray, fp16: bool, rank_of: np.ndarray, widths: tuple[int, ...],
                  bases: tuple[int, ...], block: int) -> dict:
    """Encode uint16 values `u` (a whole number of blocks, except in the last chunk) -> its pieces."""
    levels = len(widths)
    if fp16:
        raw = u.astype(np.uint8)
        hi = (((u >> 13) & 4) | ((u >> 8) & 3)).astype(np.uint8)
    else:
        s = u & np.uint16(0x807F)
        raw = (s | (s >> 8)).astype(np.uint8)      # sign << 7 | mantissa (the high byte drops off)
        hi = None
    rank = rank_of[_symbols(u, fp16)]
    pieces: dict = {"raw": raw, "hi": None if hi is None else _pack_bits(_pad8(hi), 3), "levels": [], "pcounts": []}
    code0 = rank if levels == 1 else np.minimum(rank, np.uint8((1 << widths[0]) - 1))
    pieces["levels"].append(_pack_bits(_pad8(code0), widths[0]))
    nb = -(-u.size // block)
    shift = block.bit_length() - 1
    pos = np.arange(0)
    r = rank
    for j in range(1, levels):
        sel = np.flatnonzero(r >= bases[j])
        pos = sel if j == 1 else pos[sel]
        r = r[sel]
        code = r - np.uint8(bases[j])
        if j < levels - 1:
            code = np.minimum(code, np.uint8((1 << widths[j]) - 1))
        blk = pos >> shift
        cnt = np.bincount(blk, minlength=nb)
        pcnt = (cnt + 7) // 8 * 8
        move = (np.cumsum(pcnt) - pcnt) - (np.cumsum(cnt) - cnt)    # padded start - start, per block
        dense = np.zeros(int(pcnt.sum()), np.uint8)
        dense[np.arange(code.size) + move[blk]] = code
        pieces["levels"].append(_pack_bits(dense, widths[j]))
        pieces["pcounts"].append(pcnt)
    return pieces


def encode(t: torch.Tensor, *, block: int = DEFAULT_BLOCK, chunk: int = DEFAULT_CHUNK,
           executor: Executor | None = None, widths: Sequence[int] | None = None,
           max_levels: int = DEFAULT_MAX_LEVELS, alloc: Callable[[int], torch.Tensor] | None = None) -> Encoded:
    """Encode a bfloat16 or float16 tensor (any shape, any device; coded on the CPU) losslessly.

    The work is cut into chunks of `chunk` values (whole blocks) that run on `executor` when one is given
    (numpy releases the GIL, so a thread pool runs them in parallel).  `alloc(nbytes)` makes the output
    buffer (a 1-D uint8 CPU tensor, e.g. pinned memory); default torch.empty.  `widths` forces the level
    widths (tests, benchmarks); by default `choose_widths` picks them, with at most `max_levels` levels
    (4 codes ~0.5 % smaller than 3, and the GPU decodes them ~30 % slower; bench/bench_codec.py)."""
    name = _check_input(t)
    fp16 = name == "float16"
    if not isinstance(block, int) or block < 64 or block > 1 << 20 or block & (block - 1):
        raise DisTorchError(f"block {block!r} must be a power of two in 64 .. 2^20")
    u = t.detach().reshape(-1).to("cpu").contiguous().view(torch.int16).numpy().view(np.uint16)
    n = u.size
    chunk = max(block, chunk // block * block)
    spans = [(s, min(n, s + chunk)) for s in range(0, n, chunk)]

    def run(fn: Callable, items: list) -> list:
        return list(executor.map(fn, items)) if executor is not None else [fn(x) for x in items]

    hist = np.zeros(256, np.int64)
    for h in run(lambda s: torch.bincount(torch.from_numpy(_symbols(u[s[0]:s[1]], fp16)), minlength=256), spans):
        hist += h.numpy()      # torch's bincount releases the GIL (numpy's does not), and is faster
    order = sorted(range(256), key=lambda s: (-int(hist[s]), s))
    distinct = int((hist > 0).sum())
    nb = -(-n // block)
    widths = choose_widths(hist.tolist(), nb, max_levels) if widths is None else tuple(int(k) for k in widths)
    meta = CodecMeta(name, tuple(t.shape), block, widths, (0,) * (len(widths) - 1))
    _check_meta(meta)
    if distinct > meta.table_len():
        raise DisTorchError(f"widths {widths} code {meta.table_len()} symbols; this tensor has {distinct} "
                            "distinct exponents (leave widths=None to choose them)")
    rank_of = np.zeros(256, np.uint8)
    rank_of[np.array(order)] = np.arange(256, dtype=np.int64).clip(max=255).astype(np.uint8)
    bases = meta.bases()

    pieces = run(lambda s: _encode_chunk(u[s[0]:s[1]], fp16, rank_of, widths, bases, block), spans)

    entries = tuple(sum(int(p["pcounts"][j - 1].sum()) for p in pieces) for j in range(1, len(widths)))
    meta = dataclasses.replace(meta, entries=entries)
    lay = layout(meta)
    out = torch.empty(lay.total, dtype=torch.uint8) if alloc is None else alloc(lay.total)
    if out.dtype != torch.uint8 or out.shape != (lay.total,) or out.device.type != "cpu" or not out.is_contiguous():
        raise DisTorchError(f"alloc({lay.total}) must return a contiguous 1-D uint8 CPU tensor of that size")
    buf = out.numpy()

    def place(section: tuple[int, int], parts: list[np.ndarray], end: int) -> None:
        at = section[0]
        for p in parts:
            buf[at:at + p.size] = p
            at += p.size
        if at != section[0] + section[1]:          # pragma: no cover - an encoder bug, never bad input
            raise AssertionError(f"section filled with {at - section[0]} of {section[1]} bytes")
        buf[at:end] = 0                            # the alignment gap before the next section
    ends = [lay.table[0], lay.raw[0], lay.hi[0]] + [s[0] for s in lay.levels] + [lay.total]
    buf[:lay.offsets[0]] = 0
    if len(widths) > 1:
        off = np.zeros((len(widths) - 1, nb + 1), np.int32)
        for j in range(1, len(widths)):
            off[j - 1, 1:] = np.cumsum(np.concatenate([p["pcounts"][j - 1] for p in pieces]))
        place(lay.offsets, [off.reshape(-1).view(np.uint8)], ends[0])
    else:
        place(lay.offsets, [], ends[0])
    # symbols by rank; ranks no value has are written 0 (an fp16 table must hold exponents < 32 only)
    table = np.array((order[:distinct] + [0] * meta.table_len())[:meta.table_len()], np.uint8)
    place(lay.table, [table], ends[1])
    place(lay.raw, [p["raw"] for p in pieces], ends[2])
    place(lay.hi, [p["hi"] for p in pieces] if fp16 else [], ends[3])
    for j in range(len(widths)):
        place(lay.levels[j], [p["levels"][j] for p in pieces], ends[4 + j])
    return Encoded(meta, out)


# ------------------------------------------------------------------------------------------------
# the packed size, without encoding

def estimate_nbytes(counts: Sequence[int], numel: int, dtype_name: str, block: int = DEFAULT_BLOCK,
                    max_levels: int = DEFAULT_MAX_LEVELS) -> int:
    """The packed size (`layout(meta).total`) `encode` gives a tensor of `numel` values of `dtype_name`
    ("bfloat16" | "float16") whose exponent histogram is `counts` (symbol -> count, any order), never less.

    The widths are `choose_widths`'s, as `encode` picks them; what the histogram does not say is how a
    level's codes fall into blocks, whose padding to 8 codes is bounded from above (at most 7 codes per
    block holding any), so the result is exact but for that padding (about 0.1 % of the packed bytes at
    the default block).  Counts summing to other than `numel` (a sample's histogram) are scaled to it,
    rounded up."""
    if dtype_name not in DTYPES:
        raise DisTorchError(f"dtype {dtype_name!r}: the codec codes {', '.join(sorted(DTYPES))}")
    if isinstance(numel, bool) or not isinstance(numel, int) or not 0 <= numel <= MAX_NUMEL:
        raise DisTorchError(f"numel {numel!r} must be an int in 0 .. {MAX_NUMEL}")
    if not isinstance(block, int) or block < 64 or block > 1 << 20 or block & (block - 1):
        raise DisTorchError(f"block {block!r} must be a power of two in 64 .. 2^20")
    c = [int(x) for x in counts]
    if len(c) > 256 or any(x < 0 for x in c):
        raise DisTorchError(f"counts must be at most 256 non-negative counts, got {len(c)} (min {min(c, default=0)})")
    total = sum(c)
    if numel and not total:
        raise DisTorchError(f"counts are all zero for a tensor of {numel} values: give its exponent histogram")
    if total != numel:
        c = [-(-x * numel // total) for x in c]        # scaled, rounded up: a bound, not an average
    nb = -(-numel // block)
    widths = choose_widths(c, nb, max_levels)
    ranked = sorted(c, reverse=True)
    cap = nb * block
    entries, base = [], 0
    for j, k in enumerate(widths[:-1]):
        base += (1 << k) - 1
        esc = sum(ranked[base:])                      # values escaping into level j + 1
        bound = esc + 7 * min(nb, esc)                # each block holding some pads at most 7 codes
        entries.append(min(bound, cap) // 8 * 8)      # a multiple of 8 that bounds the true count
    return layout(CodecMeta(dtype_name, (numel,), block, widths, tuple(entries))).total
