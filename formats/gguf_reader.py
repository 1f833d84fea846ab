"""The GGUF header: one bounded walk for planning (compiler/files.py) and loading (formats/gguf_loader.py).

    h = read_gguf_header(path)    # GGUFHeader: version, metadata, tensors, data_start, TensorInfos

Layout (little-endian): magic "GGUF", u32 version (2, 3), u64 tensor count, u64 metadata count; the
metadata (string key, u32 value type, value); one entry per tensor (string name, u32 n_dims, u64
dims innermost first, u32 GGML type, u64 offset from the data section); the data section starts at
the next multiple of `general.alignment` (default 32).  A string is a u64 length + UTF-8 bytes; an
array a u32 item type + u64 count + items (arrays may nest).

Why our own walk before anything else touches the file (gguf.GGUFReader included): GGUFReader trusts
the counts it reads (a 64-byte file claiming a 2^60-item array never returns) and recurses on nested
arrays.  Here every count and length is checked against the bytes left in the file before it is
read, nesting is bounded, and each problem is a GGUFFileError naming the file, the field and its byte
offset.  After the walk, tensor extents are checked (inside the file, rows of whole blocks, no
overlap) and `general.alignment` must be an integer power of two.  The type table is the gguf
package's own (GGML_QUANT_SIZES).  Reads go through a buffered file, field by field, so only header
bytes are read, whatever the file size; no torch.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass, field

import gguf

from ..errors import GGUFFileError
from .tensor_info import TensorInfo

__all__ = ["GGUFHeader", "read_gguf_header", "ggml_type", "KEEP_ARRAY_ITEMS", "MAX_NESTING"]

# metadata value types (gguf.GGUFValueType) -> struct format of the fixed-size ones
_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
KEEP_ARRAY_ITEMS = 64      # longer arrays (vocabularies ...) are walked, not kept
MAX_NESTING = 8            # arrays of arrays of ...
MAX_DIMS = 8
MAX_ALIGNMENT = 1 << 30


def ggml_type(type_id: int) -> tuple[str, int, int] | None:
    """(name, weights per block, bytes per block) of a GGML type id, or None when unknown."""
    try:
        qt = gguf.GGMLQuantizationType(type_id)
    except ValueError:
        return None
    sizes = gguf.GGML_QUANT_SIZES.get(qt)
    return None if sizes is None else (qt.name, *sizes)


@dataclass
class GGUFHeader:
    path: str
    size: int                      # file bytes
    version: int
    kv: dict = field(default_factory=dict)         # metadata: scalars, strings, arrays of <= 64 items
    kv_types: dict = field(default_factory=dict)   # key -> value type ids, e.g. (9, 5) = array of int32
    tensors: list = field(default_factory=list)    # (name, dims innermost first, type id, data offset)
    alignment: int = 32
    data_start: int = 0
    infos: list = field(default_factory=list)      # TensorInfo per tensor (same order): torch-order shape

    @property
    def architecture(self) -> str | None:
        return self.kv.get("general.architecture")


class _Walk:
    """Field reader: every length is checked against the bytes left in the file before it is read."""

    def __init__(self, f, path: str, size: int):
        self.f, self.path, self.size, self.pos = f, path, size, 0

    def fail(self, msg: str, at: int | None = None):
        where = f" at byte {self.pos if at is None else at}"
        raise GGUFFileError(f"{self.path}: corrupt GGUF header: {msg}{where}")

    def left(self) -> int:
        return self.size - self.pos

    def read(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise GGUFFileError(f"{self.path}: truncated GGUF header: {what} at byte {self.pos} needs {n} bytes "
                                f"but the file has {self.size} (a corrupt or truncated GGUF header)")
        b = self.f.read(n)
        if len(b) != n:   # the file shrank while being read
            raise GGUFFileError(f"{self.path}: truncated GGUF header while reading {what} at byte {self.pos}")
        self.pos += n
        return b

    def skip(self, n: int, what: str) -> None:
        if n > self.left():
            self.read(n, what)          # raises, naming the field
        self.f.seek(n, 1)
        self.pos += n

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))

    def string(self, what: str, *, strict: bool = True) -> str:
        at = self.pos
        (n,) = self.unpack("Q", f"length of {what}")
        b = self.read(n, what)
        try:
            return b.decode("utf-8")
        except UnicodeDecodeError:
            if not strict:
                return b.decode("utf-8", errors="replace")
            self.fail(f"{what} is not UTF-8", at)

    def count(self, n: int, min_item: int, what: str, at: int) -> None:
        if n * min_item > self.left():
            self.fail(f"{what} claims {n} items of at least {min_item} bytes each, more than the "
                      f"{self.left()} bytes left in the file", at)

    def value(self, vtype: int, what: str, types: list, depth: int = 0):
        """One metadata value; `types` gets its type ids ((9, item type) for an array).  Arrays of more
        than KEEP_ARRAY_ITEMS items are walked, not kept (None)."""
        types.append(vtype)
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype], what)[0]
        if vtype == _STRING:
            return self.string(what, strict=False)
        if vtype != _ARRAY:
            self.fail(f"{what} has unknown value type {vtype}")
        if depth >= MAX_NESTING:
            self.fail(f"{what} nests arrays more than {MAX_NESTING} deep")
        at = self.pos
        itype, n = self.unpack("IQ", f"item type/count of {what}")
        if itype not in _SCALAR and itype not in (_STRING, _ARRAY):
            self.fail(f"{what} has unknown array item type {itype}", at)
        types.append(itype)
        keep = n <= KEEP_ARRAY_ITEMS
        if itype in _SCALAR:
            isz = struct.calcsize("<" + _SCALAR[itype])
            self.count(n, isz, what, at)
            if not keep:
                self.skip(n * isz, what)
                return None
            return list(self.unpack(_SCALAR[itype] * n, what))
        self.count(n, 8 if itype == _STRING else 12, what, at)   # a string's length; an array's type + count
        items = []
        for _ in range(n):
            if itype == _STRING and not keep:                     # vocabularies: lengths only, nothing decoded
                (k,) = self.unpack("Q", f"length of an item of {what}")
                self.skip(k, what)
                continue
            v = self.value(itype, what, [], depth + 1)
            if keep:
                items.append(v)
        return items if keep else None


def _alignment(h: GGUFHeader) -> int:
    a = h.kv.get("general.alignment")
    if "general.alignment" not in h.kv_types:
        return 32
    if type(a) is not int or a <= 0 or a & (a - 1) or a > MAX_ALIGNMENT:
        raise GGUFFileError(f"{h.path}: corrupt GGUF header: general.alignment {a!r} is not an integer power of "
                            f"two (at most {MAX_ALIGNMENT})")
    return a


def _walk(w: _Walk, path: str, size: int) -> GGUFHeader:
    magic = w.read(4, "magic")
    if magic != b"GGUF":
        raise GGUFFileError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    (version,) = w.unpack("I", "version")
    if version not in (2, 3):
        hint = " (a big-endian file? only little-endian GGUF is supported)" if version in (2 << 24, 3 << 24) else ""
        raise GGUFFileError(f"{path}: unsupported GGUF version {version} (supported: 2, 3){hint}")
    at = w.pos
    n_tensors, n_kv = w.unpack("QQ", "tensor/metadata counts")
    if n_tensors > size or n_kv > size:   # more entries than bytes; fewer fail when a field runs past the end
        w.fail(f"{n_tensors} tensors / {n_kv} metadata entries in a file of {size} bytes", at)
    h = GGUFHeader(path, size, version)
    for i in range(n_kv):
        at = w.pos
        key = w.string(f"metadata key #{i}")
        if key in h.kv_types:
            w.fail(f"metadata key {key!r} appears twice", at)
        (vtype,) = w.unpack("I", f"value type of metadata {key!r}")
        types: list = []
        v = w.value(vtype, f"metadata {key!r}", types)
        h.kv_types[key] = tuple(types)
        if v is not None:
            h.kv[key] = v
    names = set()
    for i in range(n_tensors):
        at = w.pos
        name = w.string(f"name of tensor #{i}")
        if name in names:
            w.fail(f"tensor {name!r} appears twice", at)
        names.add(name)
        (nd,) = w.unpack("I", f"rank of tensor {name!r}")
        if nd > MAX_DIMS:
            w.fail(f"tensor {name!r} claims {nd} dimensions (at most {MAX_DIMS})", w.pos - 4)
        dims = w.unpack("Q" * nd, f"dims of tensor {name!r}") if nd else ()
        if any(d >= 1 << 63 for d in dims):        # ggml's dims are int64
            w.fail(f"tensor {name!r} has dimensions {list(dims)}, beyond int64", w.pos - 8 * nd)
        tid, off = w.unpack("IQ", f"type/offset of tensor {name!r}")
        h.tensors.append((name, list(dims), tid, off, w.pos - 12))
    h.alignment = _alignment(h)
    h.data_start = (w.pos + h.alignment - 1) // h.alignment * h.alignment
    return h


def _extents(h: GGUFHeader) -> None:
    """TensorInfos from the tensor entries: known type, whole blocks, inside the file, no overlap."""
    spans = []
    tensors = []
    for name, dims, tid, off, at in h.tensors:
        t = ggml_type(tid)
        if t is None:
            raise GGUFFileError(f"{h.path}: tensor {name!r} has unknown GGML type id {tid} (field at byte {at}; "
                                f"corrupt header, or a type newer than the installed gguf package)")
        tname, block, tsize = t
        if dims and dims[0] % block:
            raise GGUFFileError(f"{h.path}: tensor {name!r} of type {tname} has rows of {dims[0]} values, not a "
                                f"multiple of the {tname} block size {block}")
        nbytes = math.prod(dims) // block * tsize
        start = h.data_start + off
        if start + nbytes > h.size:
            raise GGUFFileError(
                f"{h.path}: tensor {name!r} ({tname}, {nbytes} bytes at byte {start}) runs past the end of the "
                f"file ({h.size} bytes; {start + nbytes - h.size} missing): the file is truncated or its "
                f"offset (field at byte {at + 4}) is corrupt")
        h.infos.append(TensorInfo(name, tuple(int(d) for d in reversed(dims)), tname, nbytes, start))
        tensors.append((name, dims, tid, off))
        if nbytes:
            spans.append((start, start + nbytes, name))
    h.tensors = tensors
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise GGUFFileError(f"{h.path}: tensor {n1!r} data [{b1}, {e1}) overlaps tensor {n0!r} [{b0}, {e0})")


def read_gguf_header(path: str | os.PathLike[str]) -> GGUFHeader:
    """Walk and check the header of a .gguf file (reads header bytes only); raises GGUFFileError."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb", buffering=1 << 16) as f:
        h = _walk(_Walk(f, path, size), path, size)
    _extents(h)
    return h
