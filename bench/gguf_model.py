"""The GGUF model of bench/bench_gguf.py: its block graph at stored sizes (quantized bytes for GGUF weights),
and its GGUF weights re-drawn as random valid blocks of another type (same shapes).

    graph, stored_bytes = block_graph(model)      n = requantize(model, "Q4_K", generator)
"""
from __future__ import annotations

import torch


def block_graph(model):
    from distorch.compiler.graph import ModuleGraph, Unit, ROOT, stored_nbytes
    units, blocks = [], 0
    for lname in ("transformer_blocks", "single_transformer_blocks"):
        for i, b in enumerate(getattr(model, lname)):
            nb = sum(stored_nbytes(p) for p in b.parameters())
            units.append(Unit(f"{lname}.{i}", type(b).__name__, param_bytes=nb, kind="block"))
            blocks += nb
    total = sum(stored_nbytes(p) for p in model.parameters())
    return ModuleGraph([Unit(ROOT, type(model).__name__, param_bytes=total - blocks, kind="root")] + units), total


def requantize(model, qtype, gen):
    """GGUF weights of every GGUF layer replaced by random valid `qtype` blocks (same shapes)."""
    from distorch.formats import testing as ft
    from distorch.runtime import gguf_stream as gs
    n = 0
    for _, m in model.named_modules():
        w = m._parameters.get("weight") if hasattr(m, "_parameters") else None
        if w is not None and gs.is_gguf(w):
            g = ft.random_blocks(qtype, tuple(w.shape), device=w.raw.device, generator=gen, dtype=w.dtype,
                                 name=w.gguf_name)
            m._parameters["weight"] = torch.nn.Parameter(g, requires_grad=False)
            n += 1
    return n
