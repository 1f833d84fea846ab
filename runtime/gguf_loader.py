"""Read a GGUF diffusion model (as made for ComfyUI) into a state dict, quantized weights kept quantized.

    load_gguf(path, *, device="cpu", dtype=torch.bfloat16, prefix="model.diffusion_model.")
        -> (state_dict, meta)

- The file is memory-mapped through `gguf.GGUFReader`; nothing is dequantized on the host.
- Quantized tensors (Q4_0 ... Q6_K, IQ4_NL, IQ4_XS) become `GGUFTensor`s whose `raw` is a view of
  the mapped file (read-only, not yet in RAM until touched); their `dtype` is `dtype` (the
  dequantization target).  F32 / F16 tensors become plain tensors (views of the mapping); BF16,
  stored by gguf as raw 2-byte words, is viewed as torch.bfloat16.
- Shapes: GGUF stores dimensions innermost first (ggml order), so the torch shape is the reverse of
  the file's.  A file made by ComfyUI-GGUF's converter may have stored a tensor reshaped and recorded
  its torch shape in the metadata key `comfy.gguf.orig_shape.<tensor name>` (array of int32); that
  shape wins and the blocks stay cut along the stored shape (GGUFTensor.stored_shape).
- Keys: original model key names; a leading "model.diffusion_model." (from checkpoint-style exports)
  is removed when present on any key, other keys being dropped then, as ComfyUI does.
- `device` other than "cpu" copies each tensor there (quantized bytes as they are).

Errors (`GGUFFileError`, a FileFormatError / DisTorchError / ValueError) name the tensor and its type:
truncated file (a tensor's data runs past the end), corrupt header (bad magic, unknown version,
impossible lengths, unknown type id), unsupported quantization (e.g. TQ1_0, IQ2_XXS), big-endian files.

meta = {"path", "architecture" (general.architecture or None), "version", "alignment",
        "qtypes" {type name: count}, "tensor_types" {key: type name}, "stored_bytes",
        "file_bytes", "metadata" {key: value of scalar / string / short-array fields}}
"""
from __future__ import annotations

import os
import struct
import sys
import time
import warnings
from typing import Any

import numpy as np
import torch

from .dequant import GGUFError, PLAIN_TYPES, QUANTIZED_TYPES, SUPPORTED_TYPES, supported_names
from .gguf_tensor import GGUFTensor

__all__ = ["load_gguf", "GGUFFileError", "inspect_gguf", "DIFFUSION_PREFIX"]

DIFFUSION_PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."


class GGUFFileError(GGUFError):
    """A .gguf file that is truncated, corrupt or holds a tensor type DisTorch cannot use."""


def _gguf():
    try:
        import gguf  # noqa: F401
    except ImportError as e:  # pragma: no cover - gguf is a dependency
        raise GGUFFileError("reading .gguf files needs the `gguf` package: pip install gguf") from e
    return gguf


# ------------------------------------------------------------------------------------------------
# our own header walk: only used to explain why gguf.GGUFReader refused a file

_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


class _Walk:
    def __init__(self, buf, path: str):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFFileError(f"{self.path}: corrupt or truncated GGUF header: {what} at byte {self.pos} "
                                f"needs {n} bytes, the file has {self.size}")

    def take(self, fmt: str, what: str):
        n = struct.calcsize("<" + fmt)
        self.need(n, what)
        v = struct.unpack_from("<" + fmt, self.buf, self.pos)[0]
        self.pos += n
        return v

    def string(self, what: str) -> str:
        n = self.take("Q", what + " length")
        self.need(n, what)
        s = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        try:
            return s.decode("utf-8")
        except UnicodeDecodeError:
            raise GGUFFileError(f"{self.path}: corrupt GGUF header: {what} at byte {self.pos - n} is not UTF-8")

    def value(self, vtype: int, what: str):
        if vtype in _SCALAR:
            return self.take(_SCALAR[vtype], what)
        if vtype == 8:
            return self.string(what)
        if vtype == 9:
            itype = self.take("I", what + " item type")
            count = self.take("Q", what + " item count")
            if count > self.size:
                raise GGUFFileError(f"{self.path}: corrupt GGUF header: {what} claims {count} items")
            return [self.value(itype, what) for _ in range(count)]
        raise GGUFFileError(f"{self.path}: corrupt GGUF header: {what} has unknown value type {vtype}")


def inspect_gguf(path: str) -> dict:
    """Walk the header with plain struct reads and check every tensor's type and extent.

    Returns {"version", "kv": {...}, "tensors": [(name, dims, type_id, offset)], "data_start"};
    raises GGUFFileError naming the first problem (the tensor and type where there is one)."""
    path = os.fspath(path)
    gguf = _gguf()
    QT = gguf.GGMLQuantizationType
    buf = np.memmap(path, mode="r") if os.path.getsize(path) else b""
    w = _Walk(buf, path)
    w.need(4, "magic")
    magic = bytes(buf[0:4])
    w.pos = 4
    if magic != b"GGUF":
        raise GGUFFileError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    version = w.take("I", "version")
    if version not in (2, 3):
        raise GGUFFileError(f"{path}: GGUF version {version} is not supported (2 or 3; a big-endian file "
                            f"reads as a huge version number)")
    n_tensors = w.take("Q", "tensor count")
    n_kv = w.take("Q", "metadata count")
    if n_tensors > w.size or n_kv > w.size:
        raise GGUFFileError(f"{path}: corrupt GGUF header: {n_tensors} tensors / {n_kv} metadata entries")
    kv: dict[str, Any] = {}
    for i in range(n_kv):
        key = w.string(f"metadata key #{i}")
        vtype = w.take("I", f"type of metadata {key!r}")
        kv[key] = w.value(vtype, f"metadata {key!r}")
    tensors = []
    for i in range(n_tensors):
        name = w.string(f"name of tensor #{i}")
        nd = w.take("I", f"rank of tensor {name!r}")
        if nd > 8:
            raise GGUFFileError(f"{path}: corrupt GGUF header: tensor {name!r} claims {nd} dimensions")
        dims = [w.take("Q", f"dims of tensor {name!r}") for _ in range(nd)]
        tid = w.take("I", f"type of tensor {name!r}")
        off = w.take("Q", f"offset of tensor {name!r}")
        tensors.append((name, dims, tid, off))
    align = int(kv.get("general.alignment", 32) or 32)
    if align <= 0 or align & (align - 1):
        raise GGUFFileError(f"{path}: corrupt GGUF header: general.alignment {align} is not a power of two")
    start = (w.pos + align - 1) // align * align
    for name, dims, tid, off in tensors:
        try:
            qt = QT(tid)
        except ValueError:
            raise GGUFFileError(f"{path}: tensor {name!r} has unknown GGML type id {tid} (corrupt header, "
                                f"or a type newer than the installed gguf package)") from None
        block, tsize = gguf.GGML_QUANT_SIZES[qt]
        n = 1
        for d in dims:
            n *= int(d)
        if dims and dims[0] % block:
            raise GGUFFileError(f"{path}: tensor {name!r} of type {qt.name} has rows of {dims[0]} values, "
                                f"not a multiple of the {qt.name} block size {block}")
        nbytes = n // block * tsize
        if start + off + nbytes > w.size:
            raise GGUFFileError(
                f"{path}: truncated file: tensor {name!r} ({qt.name}, {nbytes} bytes at byte {start + off}) "
                f"runs past the end of the file ({w.size} bytes; {start + off + nbytes - w.size} missing)")
    return {"version": version, "kv": kv, "tensors": tensors, "data_start": start}


# ------------------------------------------------------------------------------------------------

def _field_value(field) -> Any:
    try:
        v = field.contents()
    except Exception:
        return None
    if isinstance(v, list) and len(v) > 64:
        return None  # tokenizer vocabularies and the like: not needed here
    return v


def _orig_shape(reader, name: str):
    field = reader.get_field(ORIG_SHAPE_KEY + name)
    if field is None:
        return None
    gguf = _gguf()
    VT = gguf.GGUFValueType
    ok_int = {VT.INT32, VT.UINT32, VT.INT64, VT.UINT64}
    if len(field.types) != 2 or field.types[0] != VT.ARRAY or field.types[1] not in ok_int:
        raise GGUFFileError(f"metadata {ORIG_SHAPE_KEY + name!r} for tensor {name!r} should be an array "
                            f"of integers, got {[t.name for t in field.types]}")
    return torch.Size(int(v) for v in field.contents())


def load_gguf(path, *, device="cpu", dtype: torch.dtype = torch.bfloat16,
              prefix: str | None = DIFFUSION_PREFIX, progress: bool | None = None):
    """Memory-map a .gguf model: (state_dict, meta). See the module docstring."""
    gguf = _gguf()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    file_bytes = os.path.getsize(path)
    try:
        reader = gguf.GGUFReader(path, "r")
    except GGUFFileError:
        raise
    except Exception as e:
        inspect_gguf(path)  # raises the precise reason where our own walk finds one
        raise GGUFFileError(f"{path}: gguf could not read this file ({type(e).__name__}: {e})") from e
    if reader.byte_order != "I":
        raise GGUFFileError(f"{path}: big-endian GGUF files are not supported (byte order differs from this "
                            f"machine's)")

    # check every tensor first: one clear error before anything is built
    bad = [(t.name, t.tensor_type) for t in reader.tensors if t.tensor_type not in SUPPORTED_TYPES]
    if bad:
        listed = ", ".join(f"{n!r} ({getattr(q, 'name', q)})" for n, q in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise GGUFFileError(f"{path}: unsupported tensor type: {listed}{more}; DisTorch reads "
                            f"{supported_names()}")
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > file_bytes or t.data.nbytes != t.n_bytes:
            raise GGUFFileError(f"{path}: truncated file: tensor {t.name!r} ({t.tensor_type.name}) runs past "
                                f"the end of the file")

    names = [t.name for t in reader.tensors]
    strip = bool(prefix) and any(n.startswith(prefix) for n in names)

    arch_field = reader.get_field("general.architecture")
    arch = _field_value(arch_field) if arch_field is not None else None
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith(ORIG_SHAPE_KEY):
            continue
        v = _field_value(field)
        if v is not None:
            metadata[key] = v

    device = torch.device(device)
    show = progress if progress is not None else (device.type != "cpu" and len(reader.tensors) > 50)
    sd: dict[str, torch.Tensor] = {}
    qtypes: dict[str, int] = {}
    tensor_types: dict[str, str] = {}
    stored = 0
    t0 = time.time()
    n_total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        key = t.name
        if strip:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        qt = gguf.GGMLQuantizationType(t.tensor_type)
        file_shape = torch.Size(int(v) for v in reversed(t.shape.tolist()))
        shape = _orig_shape(reader, t.name) or file_shape
        if shape.numel() != file_shape.numel():
            raise GGUFFileError(f"{path}: tensor {t.name!r} ({qt.name}): metadata shape {list(shape)} does not "
                                f"hold the {file_shape.numel()} values stored ({list(file_shape)})")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(t.data)  # a view of the memory map
        if qt in QUANTIZED_TYPES:
            value = GGUFTensor(data.reshape(-1), qt, shape, dtype, name=key, stored_shape=file_shape)
        elif qt == gguf.GGMLQuantizationType.BF16:
            value = data.reshape(-1).view(torch.bfloat16).reshape(shape)
        else:
            value = data.view(PLAIN_TYPES[qt]).reshape(shape)
        if device.type != "cpu":
            value = value.to(device)
        sd[key] = value
        stored += int(t.n_bytes)
        qtypes[qt.name] = qtypes.get(qt.name, 0) + 1
        tensor_types[key] = qt.name
        if show and (i + 1 == n_total or (i + 1) % 100 == 0):
            print(f"\rdistorch: loading {os.path.basename(path)} {i + 1}/{n_total} tensors "
                  f"({stored / 2**30:.2f} GiB, {time.time() - t0:.1f}s)", end="\n" if i + 1 == n_total else "",
                  file=sys.stderr, flush=True)

    meta = {
        "path": path,
        "architecture": arch,
        "version": int(reader.fields["GGUF.version"].parts[0][0]) if "GGUF.version" in reader.fields else None,
        "alignment": int(reader.alignment),
        "qtypes": qtypes,
        "tensor_types": tensor_types,
        "stored_bytes": stored,
        "file_bytes": file_bytes,
        "metadata": metadata,
    }
    return sd, meta
