"""Load a .safetensors file straight into the homes a Plan chooses, then run it.

    rt = load_into(module, path, plan)      # module may live on the meta device (no memory yet)

Tensor by tensor: the file's header is read and checked (formats/safetensors.py, the same parser
planning uses: offsets inside the file, sizes equal to shape x dtype, no overlaps) before anything is
allocated, every offloaded unit gets its place in one exact-size
host arena (pinned with one registration once filled, when CUDA is there, up to the pinned cap of
runtime.pinning; the rest in a pageable arena) or a buffer on its donor GPU, and each
tensor's bytes are read from the file directly into that place (`readinto`, no intermediate tensor)
when its dtype matches; resident tensors are read into a small reusable staging buffer and copied to
the compute device. The whole model is never materialised anywhere else first. A progress line with
the byte rate goes to stderr for large files. Returns the Runtime from apply() (its `undo()` leaves
every weight resident on the compute device).
"""
from __future__ import annotations

import warnings

import torch

from ..compiler.plan import Plan
from ..errors import DisTorchError, FileFormatError
from ..formats.safetensors import read_range, read_safetensors_header
from .apply import Runtime, classify
from .arena import host_arenas, pin_arenas
from .store import Home, Layout, Progress, parse_device

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any
    from ..compiler.graph import ModuleGraph

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _n, _a in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _a):
        _DTYPES[_n] = getattr(torch, _a)


def file_dtype(dtype_str: str) -> torch.dtype | None:
    """The torch dtype of a .safetensors dtype string ("BF16", "F8_E4M3", ...), or None when unsupported."""
    return _DTYPES.get(dtype_str)


def load_into(module: torch.nn.Module, path: str, plan: Plan, *, graph: ModuleGraph | None = None, strict: bool = True,
              progress: bool = True, **apply_kw: Any) -> Runtime:
    """Read `path` into the homes of `plan` and apply the plan to `module` (see module docstring)."""
    hdr = {i.name: i for i in read_safetensors_header(path)}
    c = classify(module, plan)
    compute = parse_device(plan.compute)
    # every place a tensor object is referenced from (tied weights have several)
    sites: dict[int, list] = {}
    for _, m in module.named_modules(remove_duplicate=False):
        for store in (m._parameters, m._buffers):
            for k, v in store.items():
                if v is not None:
                    sites.setdefault(id(v), []).append((store, k))

    def rebind(t, new):
        if torch._has_compatible_shallow_copy_type(t, new):
            t.data = new
            return
        # meta -> real: a tensor of another kind cannot take .data; replace it at every site
        rep = torch.nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, torch.nn.Parameter) else new
        for store, k in sites.get(id(t), []):
            store[k] = rep

    # qualified name (every alias) -> tensor object
    by_name: dict[str, torch.Tensor] = {}
    for n, p in module.named_parameters(remove_duplicate=False):
        by_name[n] = p
    for mname, m in module.named_modules(remove_duplicate=False):
        for bn, b in m._buffers.items():
            if b is not None and bn not in m._non_persistent_buffers_set:
                by_name[f"{mname}.{bn}" if mname else bn] = b
    missing = []
    seen = set()
    for n, t in by_name.items():
        if id(t) in seen:
            continue
        names = [k for k, v in by_name.items() if v is t]
        if not any(k in hdr for k in names):
            missing.append(n)
        seen.add(id(t))
    if missing and strict:
        raise DisTorchError(f"{path} lacks {len(missing)} tensor(s) of this {type(module).__name__}, e.g. "
                            f"{missing[:5]} (pass strict=False to keep them as they are)")
    unexpected = [k for k in hdr if k not in by_name]
    if unexpected:
        warnings.warn(f"load_into: {len(unexpected)} tensor(s) in {path} match no parameter/buffer, e.g. "
                      f"{unexpected[:5]}", stacklevel=2)

    # homes for streamed units: layout from the module's (possibly meta) tensors
    pin = compute.type == "cuda"
    layouts = {n: Layout.of(c.streamed[n]) for n in c.offloaded if c.streamed[n]}
    # filled pageable, pinned once filled (runtime.pinning caps the pinned bytes; the rest stays pageable)
    arenas, arena_of = host_arenas(layouts, c.home_of, pin, what=f"the homes of {path.rsplit('/', 1)[-1]}")
    homes: dict[str, Home] = {}
    place: dict[int, torch.Tensor] = {}        # id(param) -> its view in the home
    for n, lay in layouts.items():
        h = Home.allocate(n, c.home_of[n], lay, pin=False, arena=arenas.get(arena_of.get(n)))
        homes[n] = h
        for (q, p), v in zip(c.streamed[n], h.views()):
            place[id(p)] = v

    total = sum(i.nbytes for k, i in hdr.items() if k in by_name)
    prog = Progress(total if progress else 0, f"distorch: loading {path.rsplit('/', 1)[-1]}")
    done = set()
    with open(path, "rb", buffering=0) as f, torch.no_grad():
        for key, info in sorted(hdr.items(), key=lambda kv: kv[1].offset):
            t = by_name.get(key)
            if t is None or id(t) in done:
                continue
            done.add(id(t))
            fdt = _DTYPES.get(info.dtype_str)
            if fdt is None:
                raise FileFormatError(f"{path}: tensor {key!r} has dtype {info.dtype_str!r}, which is not supported")
            shape = info.shape
            if shape != tuple(t.shape):
                raise DisTorchError(f"{path}: tensor {key!r} has shape {list(shape)} but the module expects "
                                    f"{list(t.shape)}")
            dst = place.get(id(t))
            if dst is not None and fdt == dst.dtype and dst.is_contiguous() and dst.device.type == "cpu":
                if dst.numel():      # straight into its home
                    read_range(f, info.offset, dst.view(torch.uint8).reshape(-1).numpy(), path, repr(key))
            else:
                buf = bytearray(info.nbytes)      # bounded: the header was checked against the file size
                read_range(f, info.offset, buf, path, repr(key))
                src = torch.frombuffer(buf, dtype=fdt).reshape(shape) if info.nbytes else torch.empty(shape, dtype=fdt)
                if dst is not None:                      # donor GPU home, or a dtype cast
                    dst.copy_(src)
                else:                                    # resident: straight onto the compute device
                    tgt_dtype = t.dtype if t.dtype.is_floating_point == fdt.is_floating_point else fdt
                    new = torch.empty(shape, dtype=tgt_dtype, device=compute)
                    new.copy_(src)
                    rebind(t, new)
            prog.update(info.nbytes)
            if dst is not None:
                rebind(t, dst)
    prog.close()
    pin_arenas(arenas)
    return Runtime(module, plan, graph, homes=homes, progress=False, **apply_kw).adopt_arenas(arenas)
