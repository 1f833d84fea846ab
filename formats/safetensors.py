"""The .safetensors header: one parser for planning (compiler/files.py) and loading (runtime/loading.py).

    infos = read_safetensors_header(path)     # [TensorInfo], absolute byte offsets, header bytes only
    read_range(f, info.offset, buf, ...)      # exactly len(buf) bytes of an open file into buf

A .safetensors file is 8 bytes (little-endian u64 N), N bytes of JSON {name: {"dtype", "shape",
"data_offsets": [begin, end]}, "__metadata__": {...}}, then the data; offsets count from the end of
the JSON.

Why a hand-written parser instead of `safetensors.safe_open`: both callers need each tensor's byte
offset in the file (planning records it; `load_into` reads every tensor straight into its home with
`readinto`, no intermediate tensor), and safe_open does not expose offsets; it would also refuse
dtypes newer than the installed package even where only the byte count matters.  The format is a
length and a JSON object, so the parser is short.  It validates everything before anything is
allocated from the file's claims: the header length within the file and the format's 100 MB limit,
a JSON object of well-formed entries (dtype known, shape a list of non-negative integers, two integer
data_offsets), offsets inside the data section, sizes equal to shape x dtype, no overlaps, no
duplicate names.  Every error is a FileFormatError naming the file, the tensor and the value.
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import TYPE_CHECKING

from ..errors import FileFormatError
from .tensor_info import TensorInfo

if TYPE_CHECKING:
    from typing import BinaryIO

__all__ = ["read_safetensors_header", "read_range", "DTYPE_BITS", "MAX_HEADER_BYTES"]

# bits per element (sub-byte types are packed)
DTYPE_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "C64": 64,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}
MAX_HEADER_BYTES = 100 * 1000 * 1000  # the safetensors format caps its header at 100 MB


def _no_duplicates(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(k)
        out[k] = v
    return out


class _Duplicate(Exception):
    pass


def _short(v, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[:n] + "..."


def _is_int(v) -> bool:
    return type(v) is int      # not bool, not float (1e400 parses as inf), not a string of digits


def _entry(path: str, name: str, ent, data_len: int) -> TensorInfo:
    """One header entry -> TensorInfo (offset relative to the data section), checked."""
    if not isinstance(ent, dict) or not {"dtype", "shape", "data_offsets"} <= set(ent):
        raise FileFormatError(f"{path}: tensor {name!r} has a malformed header entry {_short(ent)} "
                              f"(needs dtype, shape, data_offsets)")
    dtype, shape, offs = ent["dtype"], ent["shape"], ent["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise FileFormatError(f"{path}: tensor {name!r} has dtype {_short(dtype)}, which is not a safetensors "
                              f"dtype ({', '.join(DTYPE_BITS)})")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 1 << 63 for d in shape):
        raise FileFormatError(f"{path}: tensor {name!r} has shape {_short(shape)}; a shape is a list of "
                              f"non-negative (int64) integers")
    if not isinstance(offs, list) or len(offs) != 2 or not all(_is_int(x) for x in offs):
        raise FileFormatError(f"{path}: tensor {name!r} has data_offsets {_short(offs)}; expected "
                              f"[begin, end], two integers")
    b, e = offs
    shape = tuple(shape)
    if b < 0 or e < b:
        raise FileFormatError(f"{path}: tensor {name!r} has invalid data_offsets [{b}, {e}] or shape {shape}")
    if e > data_len:
        raise FileFormatError(f"{path}: tensor {name!r} data [{b}, {e}) lies beyond the end of the file "
                              f"(data section holds {data_len} bytes): the file is truncated")
    want = (math.prod(shape) * DTYPE_BITS[dtype] + 7) // 8
    if want != e - b:
        raise FileFormatError(f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) needs {want} bytes "
                              f"but its data_offsets span {e - b}")
    return TensorInfo(name, shape, dtype, e - b, b)


def read_safetensors_header(path: str | os.PathLike[str]) -> list[TensorInfo]:
    """The tensors of a .safetensors file from its header (file order), with absolute byte offsets.
    Reads the first 8 + N bytes only; raises FileFormatError naming the file and what is wrong."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"{path}: truncated safetensors file ({size} bytes; a valid file starts "
                                  f"with an 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FileFormatError(f"{path}: safetensors header length {n} runs past the end of the file "
                                  f"({size} bytes): the file is truncated or not a safetensors file")
        if n > MAX_HEADER_BYTES:
            raise FileFormatError(f"{path}: safetensors header length {n} exceeds the format's 100 MB limit")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise FileFormatError(f"{path}: safetensors header JSON is nested too deeply (not a safetensors "
                              f"header)") from None
    except _Duplicate as e:
        raise FileFormatError(f"{path}: safetensors header has the key {e.args[0]!r} twice (a tensor name or "
                              f"an entry field given twice)") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: safetensors header is not a JSON object (got a JSON "
                              f"{type(header).__name__})")
    base = 8 + n
    data_len = size - base
    infos: list[TensorInfo] = []
    for name, ent in header.items():
        if name == "__metadata__":
            continue
        i = _entry(path, name, ent, data_len)
        infos.append(TensorInfo(i.name, i.shape, i.dtype_str, i.nbytes, base + i.offset))
    spans = sorted(((i.offset, i.offset + i.nbytes, i.name) for i in infos if i.nbytes))
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FileFormatError(f"{path}: tensor {n1!r} data [{b1 - base}, {e1 - base}) overlaps tensor {n0!r} "
                                  f"[{b0 - base}, {e0 - base})")
    return infos


def read_range(f: BinaryIO, offset: int, out: bytearray | memoryview, path: str = "", what: str = "") -> None:
    """Read exactly len(out) bytes at `offset` of the open binary file `f` into the writable buffer
    `out` (a bytearray or a memoryview of a tensor's bytes): one seek + readinto, no copy."""
    mv = memoryview(out).cast("B")
    f.seek(offset)
    got = f.readinto(mv) if len(mv) else 0
    if got != len(mv):
        raise FileFormatError(f"{path}: truncated while reading {what or 'tensor data'} ({got} of {len(mv)} "
                              f"bytes at byte {offset})")
