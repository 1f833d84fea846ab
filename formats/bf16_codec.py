"""Lossless compression of bf16 / fp16 weights that a GPU decodes in parallel: "escape levels".

    enc = encode(t)                      # formats/bf16_encode.py: CPU, numpy in chunks; executor= a thread pool
    enc.nbytes, enc.ratio                # compressed bytes, compressed / raw bytes
    buf, meta = enc.pack(), enc.meta     # ONE contiguous uint8 buffer + a small frozen description
    enc = Encoded.from_packed(buf, meta) # validates meta against buf (and buf's contents when on the CPU)
    decode(enc, out=None)                # torch reference decoder, any device, bit-exact
    decode_triton(enc_on_gpu, out)       # the Triton kernel (formats/bf16_codec_triton.py) into `out`
    scratch_bytes(meta)                  # device scratch a decode needs: 0

What is coded.  A bf16 value is sign | exponent (8 bits) | mantissa (7 bits).  Sign and mantissa carry
nearly 8 bits of information and are stored raw, one byte per value (`raw`: sign << 7 | mantissa).
The exponent of trained weights takes a handful of values (about 2.6 bits of entropy): it is the coded
*symbol*.  fp16 (sign | exponent 5 | mantissa 10): the symbol is the 5-bit exponent, the low byte is
`raw` and the other three bits (sign, top two mantissa bits) a 3-bit packed stream `hi`.

The code.  Symbols are ranked by frequency in the tensor (ties: smaller symbol first); `table[r]` is
the symbol of rank r.  The rank is written with up to MAX_LEVELS fixed-width levels of widths
k_0, k_1, ...: level 0 holds one k_0-bit code per value; a code c < 2^k_0 - 1 means rank c, the code
2^k_0 - 1 (all ones) is an *escape*: the value's rank is >= 2^k_0 - 1 and its next code is in level 1,
and so on; the last level has no escape (2^k codes, all ranks).  Rank r of level j is
base_j + c, base_j = sum_{i<j} (2^k_i - 1).  The widths are chosen per tensor, exactly minimising the
bytes for its histogram (`choose_widths`), with at most `max_levels` levels.  This is a prefix code
whose levels are kept in separate streams, so every value is decoded independently, without Huffman's
bit-serial decode.  Measured (bench/results/codec_h200.md, 3072 x 12288 random normal bf16, std 0.02,
H200): 3 levels (the default) 0.675 of the raw bytes, decoded at ~470 GB/s; 4 levels 0.670 at ~340;
2 levels 0.696 at ~750; an optimal Huffman code of the exponents would give 0.662 (DFloat11 reports
0.686 on FLUX.1-dev).

Layout of a level j >= 1.  The values are cut into blocks of `block` (a power of two, >= 64) values.
The codes of one block in level j are contiguous, in value order, padded with zero codes to a
multiple of 8 codes (so every block's codes start on a byte); `offsets[j-1][b]` (int32) is the index
of block b's first code in level j, `offsets[j-1][nb]` the number of codes of level j (`entries`).
A value's index in its level is then offsets[b] + (number of escapes into that level before it in its
block): a prefix sum inside the block, which is how the GPU kernel finds it (one program per block).
Level 0 and `hi` have ceil8(n) codes (n values, zero codes after).  Bits are little-endian: code i of
a k-bit stream is bits [i*k, i*k + k) of the stream read as one little-endian integer.

The packed buffer (`Encoded.pack()`): these sections in this order, each starting at a multiple of 16
bytes, zero bytes between them: offsets (int32, (levels - 1) x (nb + 1)), table (uint8, base_last +
2^k_last entries), raw (n), hi (fp16 only, ceil8(n) * 3 / 8), level 0 .. level L-1 (entries_j * k_j / 8
each).  `CodecMeta` (dtype, shape, block, widths, entries) determines every section's place and size
(`layout`), so the buffer needs no header; `from_packed` checks the two agree and that the offsets and
table are valid (monotone, multiples of 8, at most `block` per block, fp16 symbols < 32), and the
decoders bound every read by its section, so corrupt or truncated input raises `CodecError` (torch
decoder) and never reads outside the buffer (either decoder).
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
import sys
import torch

from ..errors import DisTorchError, FileFormatError
from .optional import lazy_module

__all__ = ["CodecError", "CodecMeta", "Encoded", "decode", "decode_triton", "scratch_bytes", "layout",
           "triton_available", "MAX_LEVELS", "DEFAULT_MAX_LEVELS", "DEFAULT_BLOCK", "DTYPES"]

log = logging.getLogger("distorch.formats.bf16_codec")

MAX_LEVELS = 4
DEFAULT_BLOCK = 2048
DEFAULT_MAX_LEVELS = 3           # each level costs the GPU decoder a prefix sum and a dependent load
DEFAULT_CHUNK = 1 << 20          # values per encoder work item (rounded to whole blocks)
MAX_NUMEL = 2**31 - 2**21        # int32 indices in the kernel, whole blocks included
ALIGN = 16
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
_OFFSET_BITS = 32                # per block per level >= 1, in the width choice's cost

if sys.byteorder != "little":    # pragma: no cover - the bit packing views int64 words as bytes
    raise ImportError("distorch.formats.bf16_codec needs a little-endian machine")


class CodecError(FileFormatError):
    """Encoded bf16/fp16 weights whose metadata or bytes are invalid (corrupt or truncated)."""


def _ceil8(x: int) -> int:
    return (x + 7) // 8 * 8


def _align(x: int) -> int:
    return (x + ALIGN - 1) // ALIGN * ALIGN


# ------------------------------------------------------------------------------------------------
# metadata and layout

@dataclasses.dataclass(frozen=True)
class CodecMeta:
    """What determines an encoded tensor's packed layout (everything but the bytes)."""
    dtype: str                       # "bfloat16" | "float16"
    shape: tuple[int, ...]
    block: int                       # values per block (power of two, 64 .. 2^20)
    widths: tuple[int, ...]          # bits per code of each level, 1 .. MAX_LEVELS levels
    entries: tuple[int, ...]         # codes in level 1 .. L-1 (multiples of 8)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.block)

    @property
    def levels(self) -> int:
        return len(self.widths)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def raw_nbytes(self) -> int:
        """Bytes of the uncompressed tensor."""
        return 2 * self.numel

    def bases(self) -> tuple[int, ...]:
        """First rank of each level."""
        out, b = [], 0
        for k in self.widths:
            out.append(b)
            b += (1 << k) - 1
        return tuple(out)

    def table_len(self) -> int:
        return self.bases()[-1] + (1 << self.widths[-1])

    def to_dict(self) -> dict:
        return {"dtype": self.dtype, "shape": list(self.shape), "block": self.block,
                "widths": list(self.widths), "entries": list(self.entries)}

    @classmethod
    def from_dict(cls, d: dict) -> CodecMeta:
        try:
            meta = cls(str(d["dtype"]), tuple(int(x) for x in d["shape"]), int(d["block"]),
                       tuple(int(x) for x in d["widths"]), tuple(int(x) for x in d["entries"]))
        except (KeyError, TypeError, ValueError) as e:
            raise CodecError(f"bf16 codec metadata {d!r} is malformed ({e}); it needs dtype, shape, block, "
                             "widths and entries") from None
        _check_meta(meta)
        return meta


def _check_meta(m: CodecMeta) -> None:
    def bad(what: str) -> CodecError:
        return CodecError(f"bf16 codec metadata is invalid: {what} (in {m})")
    if m.dtype not in DTYPES:
        raise bad(f"dtype {m.dtype!r} is not one of {sorted(DTYPES)}")
    if not isinstance(m.shape, tuple) or any(not isinstance(s, int) or s < 0 for s in m.shape):
        raise bad(f"shape {m.shape!r} must be a tuple of non-negative ints")
    if m.numel > MAX_NUMEL:
        raise bad(f"{m.numel} values; at most {MAX_NUMEL} per encoded tensor")
    if not isinstance(m.block, int) or m.block < 64 or m.block > 1 << 20 or m.block & (m.block - 1):
        raise bad(f"block {m.block!r} must be a power of two in 64 .. 2^20")
    if not 1 <= len(m.widths) <= MAX_LEVELS:
        raise bad(f"{len(m.widths)} levels; 1 .. {MAX_LEVELS} work")
    if any(not isinstance(k, int) or not 0 <= k <= 8 for k in m.widths):
        raise bad(f"widths {m.widths!r} must be ints in 0 .. 8")
    if any(k == 0 for k in m.widths[:-1]):
        raise bad(f"widths {m.widths!r}: only the last level may have width 0")
    if len(m.entries) != len(m.widths) - 1:
        raise bad(f"{len(m.entries)} entry counts for {len(m.widths)} levels (need levels - 1)")
    cap = m.n_blocks * m.block
    if any(not isinstance(e, int) or e < 0 or e % 8 or e > cap for e in m.entries):
        raise bad(f"entries {m.entries!r} must be multiples of 8 in 0 .. {cap}")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Byte ranges (start, length) of each section in the packed buffer, and its total size."""
    offsets: tuple[int, int]
    table: tuple[int, int]
    raw: tuple[int, int]
    hi: tuple[int, int]
    levels: tuple[tuple[int, int], ...]
    total: int


@functools.lru_cache(maxsize=4096)
def layout(meta: CodecMeta) -> Layout:
    """Where each section of `meta`'s packed buffer lies (see the module docstring)."""
    _check_meta(meta)
    n = meta.numel
    pos = 0

    def take(length: int) -> tuple[int, int]:
        nonlocal pos
        start = _align(pos)
        pos = start + length
        return start, length
    offsets = take(4 * (meta.levels - 1) * (meta.n_blocks + 1) if meta.levels > 1 else 0)
    table = take(meta.table_len())
    raw = take(n)
    hi = take(_ceil8(n) * 3 // 8 if meta.dtype == "float16" else 0)
    counts = (_ceil8(n),) + meta.entries
    levels = tuple(take(c * k // 8) for c, k in zip(counts, meta.widths))
    return Layout(offsets, table, raw, hi, levels, pos)


def scratch_bytes(meta: CodecMeta) -> int:
    """Device memory a decode of `meta` needs besides its input and output: none."""
    return 0


# ------------------------------------------------------------------------------------------------
# the encoded tensor

@dataclasses.dataclass(frozen=True)
class Encoded:
    """An encoded tensor: its metadata and ONE contiguous uint8 buffer (on any device)."""
    meta: CodecMeta
    buf: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.buf.numel()

    @property
    def ratio(self) -> float:
        """Compressed bytes / raw bytes."""
        return self.nbytes / max(1, self.meta.raw_nbytes)

    @property
    def device(self) -> torch.device:
        return self.buf.device

    def pack(self) -> torch.Tensor:
        """The single contiguous uint8 buffer (what a runtime copies host -> device in one copy)."""
        return self.buf

    @classmethod
    def from_packed(cls, buf: torch.Tensor, meta: CodecMeta, *, check_contents: bool | None = None) -> Encoded:
        """Wrap a packed buffer.  Checks `meta` and the buffer's size always; the offsets and table too
        when `check_contents` (default: when `buf` is on the CPU, where it costs no device sync)."""
        if not isinstance(meta, CodecMeta):
            raise CodecError(f"meta must be a CodecMeta (or CodecMeta.from_dict(...)), not {type(meta).__name__}")
        lay = layout(meta)
        if not isinstance(buf, torch.Tensor) or buf.dtype != torch.uint8 or buf.dim() != 1:
            raise CodecError(f"packed buffer must be a 1-D uint8 tensor, not "
                             f"{getattr(buf, 'dtype', type(buf).__name__)} of shape {tuple(getattr(buf, 'shape', ()))}")
        if buf.numel() != lay.total:
            raise CodecError(f"packed buffer has {buf.numel()} bytes, its metadata needs {lay.total} "
                             f"(truncated or not this tensor's buffer): {meta}")
        if not buf.is_contiguous():
            raise CodecError("packed buffer must be contiguous")
        if check_contents is None:
            check_contents = buf.device.type == "cpu"
        enc = cls(meta, buf)
        if check_contents:
            _check_contents(enc)
        return enc

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Encoded:
        """The same encoded tensor on `device` (one copy of the buffer)."""
        return Encoded(self.meta, self.buf.to(device, non_blocking=non_blocking))

    def section(self, name: str, index: int = 0) -> torch.Tensor:
        """A view of one section: "offsets" (int32, levels-1 x nb+1), "table", "raw", "hi", "level"."""
        lay = layout(self.meta)
        start, length = lay.levels[index] if name == "level" else getattr(lay, name)
        view = self.buf[start:start + length]
        if name == "offsets":
            return view.view(torch.int32).view(max(0, self.meta.levels - 1), self.meta.n_blocks + 1)
        return view


def _check_contents(enc: Encoded) -> None:
    m = enc.meta
    if m.levels > 1:
        off = enc.section("offsets").to("cpu", torch.int64)
        d = off[:, 1:] - off[:, :-1]
        for j in range(m.levels - 1):
            if off[j, 0].item() != 0 or off[j, -1].item() != m.entries[j]:
                raise CodecError(f"level {j + 1} offsets run {off[j, 0].item()} .. {off[j, -1].item()}, "
                                 f"metadata says 0 .. {m.entries[j]}: corrupt buffer")
            if bool(((d[j] < 0) | (d[j] % 8 != 0) | (d[j] > m.block)).any()):
                raise CodecError(f"level {j + 1} offsets are not non-decreasing steps of a multiple of 8 "
                                 f"codes, at most {m.block}: corrupt buffer")
    if m.dtype == "float16" and bool((enc.section("table") >= 32).any()):
        raise CodecError("fp16 exponent table holds a value >= 32: corrupt buffer")


# ------------------------------------------------------------------------------------------------
# torch reference decoder

def _read_bits(stream: torch.Tensor, idx: torch.Tensor, k: int) -> torch.Tensor:
    """k-bit codes number `idx` (int64) of a little-endian bit stream; int32.  Reads stay in `stream`."""
    if k == 0:
        return torch.zeros(idx.shape, dtype=torch.int32, device=idx.device)
    bit = idx * k
    byte = bit >> 3
    padded = torch.cat([stream, stream.new_zeros(1)]).to(torch.int32)
    if byte.numel() and int(byte.max()) >= stream.numel():      # pragma: no cover - guarded by callers
        raise CodecError("code index past the end of its stream: corrupt buffer")
    word = padded[byte] | (padded[byte + 1] << 8)
    return (word >> (bit & 7).to(torch.int32)) & ((1 << k) - 1)


def _unpack_all(stream: torch.Tensor, k: int, count: int) -> torch.Tensor:
    """The first `count` k-bit codes of a stream holding ceil8(count) of them (int32), without gathers:
    each 8 codes are k bytes, read as one little-endian word."""
    if k == 0:
        return torch.zeros(count, dtype=torch.int32, device=stream.device)
    rows = stream.view(-1, k).to(torch.int64)
    w = rows[:, 0].clone()
    for i in range(1, k):
        w |= rows[:, i] << (8 * i)
    shifts = torch.arange(0, 8 * k, k, device=stream.device)
    return ((w[:, None] >> shifts) & ((1 << k) - 1)).to(torch.int32).view(-1)[:count]


def decode(enc: Encoded, out: torch.Tensor | None = None) -> torch.Tensor:
    """Decode with torch ops on enc's device (the reference; CI runs it).  Writes into `out` (contiguous,
    meta's dtype and numel) when given, else returns a new tensor of meta's shape."""
    m = enc.meta
    out = _check_out(enc, out)
    n = m.numel
    if n == 0:
        return out
    dev = enc.buf.device
    code = _unpack_all(enc.section("level", 0), m.widths[0], n)
    rank = code.clone()
    if m.levels > 1:
        pos = torch.arange(n, device=dev)
        off = enc.section("offsets").to(torch.int64)
        bases = m.bases()
        esc = code == (1 << m.widths[0]) - 1
        p = pos
        for j in range(1, m.levels):
            p = p[esc]
            blk = p // m.block
            cnt = torch.bincount(blk, minlength=m.n_blocks)
            if bool((cnt > off[j - 1, 1:] - off[j - 1, :-1]).any()):
                raise CodecError(f"a block has more escapes into level {j} than its offsets leave room for: "
                                 "corrupt buffer")
            start = torch.cumsum(cnt, 0) - cnt
            idx = off[j - 1, :-1][blk] + torch.arange(p.numel(), device=dev) - start[blk]
            c = _read_bits(enc.section("level", j), idx, m.widths[j])
            rank[p] = bases[j] + c
            esc = c == (1 << m.widths[j]) - 1 if j < m.levels - 1 else None
    sym = enc.section("table").to(torch.int32)[rank]
    raw = enc.section("raw").to(torch.int32)
    if m.dtype == "float16":
        hi = _unpack_all(enc.section("hi"), 3, n)
        v = ((hi & 4) << 13) | ((sym & 0x1F) << 10) | ((hi & 3) << 8) | raw
    else:
        v = ((raw & 0x80) << 8) | (sym << 7) | (raw & 0x7F)
    out.view(-1).view(torch.int16).copy_(v.to(torch.int16))
    return out


def _check_out(enc: Encoded, out: torch.Tensor | None) -> torch.Tensor:
    m = enc.meta
    if out is None:
        return torch.empty(m.shape, dtype=m.torch_dtype, device=enc.buf.device)
    if out.dtype != m.torch_dtype or out.numel() != m.numel or not out.is_contiguous():
        raise DisTorchError(f"decode output must be a contiguous {m.dtype} tensor of {m.numel} values; got "
                            f"{str(out.dtype).removeprefix('torch.')} {tuple(out.shape)}"
                            f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    if out.device != enc.buf.device:
        raise DisTorchError(f"decode output is on {out.device}, the encoded buffer on {enc.buf.device}; "
                            "move one of them")
    return out


# ------------------------------------------------------------------------------------------------
# Triton decoder: formats/bf16_codec_triton.py, imported on first use (Triton is optional)

_triton = lazy_module(".bf16_codec_triton", __package__, "Triton bf16 decoder", log)   # the module, or None


def triton_available() -> bool:
    """Whether the Triton decoder can be imported (it runs on CUDA, or on the CPU with TRITON_INTERPRET=1)."""
    return _triton() is not None


def decode_triton(enc: Encoded, out: torch.Tensor | None = None, *, num_warps: int | None = None) -> torch.Tensor:
    """Decode with the Triton kernel, one launch on the current stream, into `out` (e.g. a ring slot:
    contiguous, meta's dtype and numel, on enc's device), else into a new tensor.  No host sync."""
    if not triton_available():
        raise DisTorchError("decode_triton needs Triton (pip install triton); decode() works without it")
    out = _check_out(enc, out)
    if enc.meta.numel:
        _triton().launch(enc, out, num_warps=num_warps)
    return out
