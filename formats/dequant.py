"""Dequantization of GGUF (ggml) tensors on whatever device the bytes sit: entry points and backend choice.

    dequantize(raw_uint8, qtype, shape, dtype=torch.bfloat16, *, name=None) -> Tensor

`raw_uint8` holds the tensor's blocks exactly as they are stored in a .gguf file (rows of blocks,
row-major, any shape as long as its bytes are contiguous); `shape` is the logical torch shape
(outermost first, the last dimension is the one cut into blocks).  The result is a new contiguous
tensor of `shape` and `dtype` on `raw_uint8.device`.  `dequantize_into` writes whole blocks of one
type into a given flat buffer (the runtime's per-unit batches); the type tables (`BLOCK_SIZES`, ...)
and checks (`check_supported`, `quantized_nbytes`) say which types and shapes are accepted.

The per-type block kernels (the table `KERNELS`, one signature, float32 arithmetic in the reference's
order, bit for bit equal to `gguf.quants.dequantize` on CPU) live in formats/dequant_blocks.py; this
file decides where they run.  `_run` is the one wrapper: on CUDA, the hand-written Triton kernel
(formats/dequant_triton.py, imported on first use) reads the blocks once and writes the output once;
where Triton is missing or fails, each type's torch function compiled with `torch.compile` runs, else
the eager torch code (correct everywhere, several kernels, slower).  A fallback is logged once per type
and kind (visible, never silent); other dtypes than float32 are one rounding of the float32 value.
`set_backend("auto" | "triton" | "compile" | "eager")` or DISTORCH_DEQUANT_BACKEND choose.  What a
dequantization costs (for the planner) is data in compiler/cost.py (`dequant_seconds`).
"""
from __future__ import annotations

import logging
import os
import threading
import types
from typing import Callable, Iterable, Sequence

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as QT

from ..errors import DisTorchError, GGUFError, UnsupportedQuantError
from .dequant_blocks import KERNELS, NEEDS_LEVELS, dequantize_eager as _eager, iq4_levels
from .optional import lazy_module

__all__ = ["dequantize", "dequantize_into", "quantized_nbytes", "check_supported", "as_qtype", "supported_names",
           "set_backend", "get_backend", "triton_available", "warmup", "BLOCK_SIZES", "PLAIN_TYPES",
           "QUANTIZED_TYPES", "SUPPORTED_TYPES", "BACKENDS", "GGUFError", "UnsupportedQuantError"]

log = logging.getLogger("distorch.formats.dequant")

# qtype -> (weights per block, bytes per block): the types DisTorch dequantizes, sizes from gguf's table
BLOCK_SIZES: dict[QT, tuple[int, int]] = {
    qt: GGML_QUANT_SIZES[qt] for qt in (QT.F32, QT.F16, QT.BF16, QT.Q8_0, QT.Q4_0, QT.Q4_1, QT.Q5_0, QT.Q5_1,
                                        QT.Q2_K, QT.Q3_K, QT.Q4_K, QT.Q5_K, QT.Q6_K, QT.IQ4_NL, QT.IQ4_XS)}
PLAIN_TYPES = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}
QUANTIZED_TYPES = frozenset(BLOCK_SIZES) - frozenset(PLAIN_TYPES)
SUPPORTED_TYPES = frozenset(BLOCK_SIZES)


def as_qtype(qtype: QT | int | str) -> QT:
    """GGMLQuantizationType from an enum, its int value or its name ("Q4_K")."""
    if isinstance(qtype, QT):
        return qtype
    try:
        if isinstance(qtype, str):
            return QT[qtype.upper()]
        return QT(int(qtype))
    except (KeyError, ValueError):
        raise UnsupportedQuantError(
            f"unknown GGML quantization type {qtype!r}; supported: {supported_names()}") from None


def supported_names() -> str:
    return ", ".join(t.name for t in sorted(SUPPORTED_TYPES, key=int))


def check_supported(qtype: QT | int | str, name: str | None = None) -> QT:
    qt = as_qtype(qtype)
    if qt not in SUPPORTED_TYPES:
        where = f"tensor {name!r}: " if name else ""
        raise UnsupportedQuantError(
            f"{where}GGML type {qt.name} is not supported by DisTorch's dequantizer; "
            f"supported: {supported_names()} (re-quantize the model to one of these)")
    return qt


def quantized_nbytes(qtype: QT | int | str, shape: Sequence[int], name: str | None = None) -> int:
    """Bytes the blocks of a tensor of logical `shape` occupy; checks the row splits into blocks."""
    qt = check_supported(qtype, name)
    block, tsize = BLOCK_SIZES[qt]
    shape = tuple(int(s) for s in shape)
    if len(shape) == 0:
        shape = (1,)
    if block > 1 and shape[-1] % block != 0:
        where = f"tensor {name!r}" if name else "tensor"
        raise GGUFError(
            f"{where} of type {qt.name} has shape {list(shape)}: its last dimension {shape[-1]} is not "
            f"a multiple of the {qt.name} block size {block}; only rows made of whole blocks can be stored")
    n = 1
    for s in shape:
        n *= s
    return n // block * tsize


# ------------------------------------------------------------------------------------------------
# Triton path (CUDA): formats/dequant_triton.py, imported on first use (Triton is an optional
# dependency, and importing it costs time); the same fp32 arithmetic as formats/dequant_blocks.py,
# bit-identical.

_triton = lazy_module(".dequant_triton", __package__, "Triton dequantizer", log)   # the module, or None


def triton_available() -> bool:
    return _triton() is not None


def _triton_run(qt: QT, raw: torch.Tensor, dtype: torch.dtype, tile: int | None = None,
                num_warps: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    qb, ts = BLOCK_SIZES[qt]
    n_out = raw.numel() // ts * qb
    if out is None:
        out = torch.empty(n_out, dtype=dtype, device=raw.device)
    _triton().launch(raw, out, iq4_levels(raw.device), n_out, int(qt), qb, ts, tile=tile, num_warps=num_warps)
    return out


# ------------------------------------------------------------------------------------------------
# torch.compile path (an alternative on CUDA; higher per-call host cost than the Triton kernel)

_compiled: dict[QT, Callable] = {}
_failed: dict[str, set] = {"triton": set(), "compile": set()}
_lock = threading.Lock()

BACKENDS = ("auto", "triton", "compile", "eager")
_backend: str | None = None  # None: from DISTORCH_DEQUANT_BACKEND, default "auto"


def set_backend(name: str | None) -> None:
    """Where CUDA dequantization runs: "auto" (Triton kernel, else torch.compile, else eager),
    "triton", "compile", "eager"; None restores the default (env DISTORCH_DEQUANT_BACKEND or auto).
    CPU tensors always use the eager torch code."""
    global _backend
    if name is not None and name not in BACKENDS:
        raise DisTorchError(f"unknown dequantization backend {name!r}; use one of {BACKENDS}")
    _backend = name


def get_backend() -> str:
    if _backend is not None:
        return _backend
    env = os.environ.get("DISTORCH_DEQUANT_BACKEND", "auto").strip().lower() or "auto"
    if os.environ.get("DISTORCH_DEQUANT_COMPILE", "1").lower() in ("0", "false", "no", "off") and env == "auto":
        env = "triton"
    return env if env in BACKENDS else "auto"


def set_compile(enabled: bool | None) -> None:
    """Compatibility switch: False = eager everywhere, True/None = default backend choice."""
    set_backend("eager" if enabled is False else None)


def compile_enabled() -> bool:
    return get_backend() != "eager"


def _make_compiled(qt: QT) -> Callable:
    tsize = BLOCK_SIZES[qt][1]
    kernel = KERNELS[qt]
    if qt in NEEDS_LEVELS:
        def run(raw, levels, dtype):
            return kernel(raw.view(-1, tsize), levels).reshape(-1).to(dtype)
    else:
        def run(raw, levels, dtype):
            return kernel(raw.view(-1, tsize)).reshape(-1).to(dtype)
    # a code object of its own per type: dynamo caches (and counts recompiles) per code object
    name = f"dequant_{qt.name.lower()}"
    run = types.FunctionType(run.__code__.replace(co_name=name), run.__globals__, name,
                             run.__defaults__, run.__closure__)
    return torch.compile(run, dynamic=True, fullgraph=True)


def _compiled_run(qt: QT, raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    fn = _compiled.get(qt)
    if fn is None:
        with _lock:
            fn = _compiled.get(qt) or _make_compiled(qt)
            _compiled[qt] = fn
    return fn(raw, iq4_levels(raw.device), dtype)


def _fail(kind: str, qt: QT, e: Exception) -> None:
    _failed[kind].add(qt)
    log.warning("distorch: the %s dequantizer for %s failed (%s: %s); falling back", kind, qt.name,
                type(e).__name__, str(e).splitlines()[0] if str(e) else "")


def _run(qt: QT, raw: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Flat dequantized output from flat contiguous uint8 blocks, on raw's device (written into the
    flat contiguous `out` when given)."""
    if raw.device.type == "cuda":
        backend = get_backend()
        if backend in ("auto", "triton") and qt not in _failed["triton"] and triton_available():
            try:
                return _triton_run(qt, raw, dtype, out=out)
            except Exception as e:  # a broken Triton install must not break inference
                _fail("triton", qt, e)
        if backend in ("auto", "compile") and qt not in _failed["compile"]:
            try:
                r = _compiled_run(qt, raw, dtype)
                return r if out is None else out.copy_(r.reshape(-1))
            except Exception as e:
                _fail("compile", qt, e)
    if raw.storage_offset() % 2:
        raw = raw.clone()  # the eager code views fp16 fields: needs 2-byte aligned storage
    r = _eager(qt, raw, dtype)
    return r if out is None else out.copy_(r.reshape(-1))


def dequantize_into(raw: torch.Tensor, qtype: QT, out: torch.Tensor) -> torch.Tensor:
    """Dequantize the flat contiguous uint8 blocks `raw` (any number of whole blocks of one quantized
    type, e.g. several tensors stored back to back) into the flat contiguous floating tensor `out`
    (same device, one element per weight), in out's dtype.  Unchecked: for the runtime's per-unit
    batched dequantization, whose layout was validated once.  Element for element the same arithmetic
    as `dequantize`, so the values are bit-identical to dequantizing each tensor alone."""
    if out.numel():
        _run(qtype, raw, out.dtype, out=out)
    return out


def _flat_bytes(raw: torch.Tensor) -> torch.Tensor:
    if raw.dtype != torch.uint8:
        if not raw.is_contiguous():
            raw = raw.contiguous()
        raw = raw.reshape(-1).view(torch.uint8)
    if not raw.is_contiguous():
        raw = raw.contiguous()
    return raw.reshape(-1)


def dequantize(raw: torch.Tensor, qtype: QT | int | str, shape: Sequence[int], dtype: torch.dtype = torch.bfloat16,
               *, name: str | None = None, stored_shape: Sequence[int] | None = None,
               check: bool = True) -> torch.Tensor:
    """Dequantize GGUF blocks `raw` (uint8, on any device) of type `qtype` into a tensor of `shape`.

    `stored_shape` is the shape the blocks were cut from when it differs from `shape` (a GGUF file
    may store a reshaped tensor and record the original shape in metadata); rows of blocks are
    checked against it and the result is reshaped to `shape`.

    Raises GGUFError (a DisTorchError / ValueError) naming `name` and the type when the type is not
    supported, the last dimension is not a whole number of blocks, or `raw` holds the wrong number
    of bytes.  `check=False` (for callers that validated once, e.g. GGUFTensor) skips those checks
    to keep the per-call host cost small; `raw` must then be flat contiguous uint8 of the right size.
    """
    if not check:
        if qtype in PLAIN_TYPES:
            return _plain(raw, qtype, shape, dtype)
        if raw.numel() == 0:
            return torch.empty(shape, dtype=dtype, device=raw.device)
        return _run(qtype, raw, dtype).view(shape)
    qt = check_supported(qtype, name)
    shape = torch.Size(int(s) for s in shape)
    if stored_shape is not None:
        stored_shape = torch.Size(int(s) for s in stored_shape)
        if stored_shape.numel() != shape.numel():
            raise GGUFError(f"tensor {name!r}: stored shape {list(stored_shape)} and shape {list(shape)} "
                            f"differ in element count")
    want = quantized_nbytes(qt, stored_shape if stored_shape is not None else shape, name)
    have = raw.numel() * raw.element_size()
    if have != want:
        where = f"tensor {name!r}" if name else "tensor"
        raise GGUFError(f"{where} of type {qt.name} and shape {list(shape)} needs {want} bytes of blocks, "
                        f"got {have} ({raw.dtype}, shape {list(raw.shape)})")
    raw = _flat_bytes(raw)
    if qt in PLAIN_TYPES:
        return _plain(raw, qt, shape, dtype)
    if want == 0:
        return torch.empty(shape, dtype=dtype, device=raw.device)
    return _run(qt, raw, dtype).view(shape)


def _plain(raw: torch.Tensor, qt: QT, shape, dtype: torch.dtype) -> torch.Tensor:
    src = PLAIN_TYPES[qt]
    if raw.storage_offset() % src.itemsize:
        raw = raw.clone()
    return raw.view(src).view(shape).to(dtype, copy=True)


def warmup(qtypes: Iterable[QT | int | str] | None = None, device: torch.device | str = "cuda",
           dtype: torch.dtype = torch.bfloat16) -> None:
    """Compile the dequantizers of `qtypes` for `device` now (first compile takes seconds each)."""
    for qt in (QUANTIZED_TYPES if qtypes is None else [as_qtype(q) for q in qtypes]):
        block, tsize = BLOCK_SIZES[qt]
        raw = torch.zeros(4 * tsize, dtype=torch.uint8, device=device)
        dequantize(raw, qt, (4 * block,), dtype)
