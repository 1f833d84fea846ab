"""Read a GGUF diffusion model (as made for ComfyUI) into a state dict, quantized weights kept quantized.

    load_gguf(path, *, device="cpu", dtype=torch.bfloat16, prefix="model.diffusion_model.")
        -> (state_dict, meta)

- The header is walked and checked by formats/gguf_reader.py first (bounded: a crafted file fails
  with a GGUFFileError before anything is allocated from its claims); every tensor's type is checked
  before anything is built.  Then the file is memory-mapped (numpy, as gguf.GGUFReader does; the
  header is not parsed a second time); nothing is dequantized on the host.
- Quantized tensors (Q4_0 ... Q6_K, IQ4_NL, IQ4_XS) become `GGUFTensor`s whose `raw` is a view of
  the mapped file (read-only, not yet in RAM until touched); their `dtype` is `dtype` (the
  dequantization target).  F32 / F16 / BF16 tensors become plain tensors (views of the mapping).
- Shapes: GGUF stores dimensions innermost first (ggml order), so the torch shape is the reverse of
  the file's.  A file made by ComfyUI-GGUF's converter may have stored a tensor reshaped and recorded
  its torch shape in the metadata key `comfy.gguf.orig_shape.<tensor name>` (array of integers); that
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

import logging
import os
import warnings

import numpy as np
import torch
from gguf import GGMLQuantizationType as QT, GGUFValueType as VT

from .. import progress as _stages
from ..errors import GGUFFileError
from .dequant import PLAIN_TYPES, QUANTIZED_TYPES, SUPPORTED_TYPES, supported_names
from .gguf_reader import GGUFHeader, read_gguf_header
from .gguf_tensor import GGUFTensor

__all__ = ["load_gguf", "inspect_gguf", "GGUFFileError", "DIFFUSION_PREFIX", "ORIG_SHAPE_KEY"]

log = logging.getLogger("distorch.formats.gguf_loader")

DIFFUSION_PREFIX = "model.diffusion_model."
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."
_INT_TYPES = {int(VT.INT32), int(VT.UINT32), int(VT.INT64), int(VT.UINT64)}


def inspect_gguf(path: str | os.PathLike[str]) -> dict:
    """The checked header: {"version", "kv" {metadata}, "tensors": [(name, dims, type_id, offset)],
    "data_start"}; raises GGUFFileError naming the first problem (the tensor and type where there is one)."""
    h = read_gguf_header(path)
    return {"version": h.version, "kv": h.kv, "tensors": h.tensors, "data_start": h.data_start}


def _orig_shape(h: GGUFHeader, name: str):
    key = ORIG_SHAPE_KEY + name
    types = h.kv_types.get(key)
    if types is None:
        return None
    v = h.kv.get(key)
    if len(types) != 2 or types[0] != VT.ARRAY or types[1] not in _INT_TYPES or v is None \
            or not all(type(d) is int and d >= 0 for d in v):
        got = [VT(t).name for t in types]      # the reader only records known value types
        raise GGUFFileError(f"{h.path}: metadata {key!r} for tensor {name!r} should be an array of at most "
                            f"64 non-negative integers, got {got} {v!r:.80}")
    return torch.Size(v)


def load_gguf(path: str | os.PathLike[str], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.bfloat16,
              prefix: str | None = DIFFUSION_PREFIX,
              progress: bool | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Memory-map a .gguf model: (state_dict, meta). See the module docstring."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"GGUF file not found: {path}")
    h = read_gguf_header(path)                      # bounded, checked: nothing else has touched the file
    qts = [QT[i.dtype_str] for i in h.infos]
    # check every tensor first: one clear error before anything is built
    bad = [(i.name, q) for i, q in zip(h.infos, qts) if q not in SUPPORTED_TYPES]
    if bad:
        listed = ", ".join(f"{n!r} ({q.name})" for n, q in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise GGUFFileError(f"{path}: unsupported tensor type: {listed}{more}; DisTorch reads "
                            f"{supported_names()}")
    names = [i.name for i in h.infos]
    strip = bool(prefix) and any(n.startswith(prefix) for n in names)
    metadata = {k: v for k, v in h.kv.items() if not k.startswith(ORIG_SHAPE_KEY)}
    mapped = np.memmap(path, mode="r") if h.size else np.zeros(0, np.uint8)

    device = torch.device(device)
    show = progress if progress is not None else (device.type != "cpu" and len(h.infos) > 50)
    sd: dict[str, torch.Tensor] = {}
    qtypes: dict[str, int] = {}
    tensor_types: dict[str, str] = {}
    stored = 0
    st = _stages.Stage(f"distorch: loading {os.path.basename(path)}",
                       sum(i.nbytes for i in h.infos if not strip or i.name.startswith(prefix)), "B", enabled=show)
    for i, (info, qt) in enumerate(zip(h.infos, qts)):
        key = info.name
        if strip:
            if not key.startswith(prefix):
                continue
            key = key[len(prefix):]
        file_shape = torch.Size(info.shape)
        shape = _orig_shape(h, info.name) or file_shape
        if shape.numel() != file_shape.numel():
            raise GGUFFileError(f"{path}: tensor {info.name!r} ({qt.name}): metadata shape {list(shape)} does not "
                                f"hold the {file_shape.numel()} values stored ({list(file_shape)})")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            data = torch.from_numpy(mapped[info.offset:info.offset + info.nbytes])  # a view of the mapping
        if qt in QUANTIZED_TYPES:
            value = GGUFTensor(data, qt, shape, dtype, name=key, stored_shape=file_shape)
        else:
            value = data.view(PLAIN_TYPES[qt]).reshape(shape)
        if device.type != "cpu":
            value = value.to(device)
        sd[key] = value
        stored += info.nbytes
        qtypes[qt.name] = qtypes.get(qt.name, 0) + 1
        tensor_types[key] = qt.name
        st.update(info.nbytes)
    st.close()
    log.debug("%s: %d tensors, %.2f GiB stored", path, len(sd), stored / 2**30)
    meta = {
        "path": path,
        "architecture": h.architecture,
        "version": h.version,
        "alignment": h.alignment,
        "qtypes": qtypes,
        "tensor_types": tensor_types,
        "stored_bytes": stored,
        "file_bytes": h.size,
        "metadata": metadata,
    }
    return sd, meta
