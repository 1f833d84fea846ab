"""GGUF weights without a file, for tests and benchmarks (not used by the library itself).

    quantize_q8_0(w)                    Q8_0 blocks of a dense tensor, computed in torch on its device
    random_blocks(qtype, shape)         random but valid blocks of any supported type (finite scales)
    quantize_module(module, qtype)      every suitable nn.Linear weight -> a GGUF parameter (+ GGUF ops)
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from gguf import GGMLQuantizationType as QT

from ..errors import GGUFError
from .dequant import BLOCK_SIZES, as_qtype, quantized_nbytes
from .gguf_tensor import GGUFTensor, gguf_ops, is_gguf

if TYPE_CHECKING:
    from typing import Sequence

__all__ = ["quantize_q8_0", "random_blocks", "quantize_module"]


def quantize_q8_0(w: torch.Tensor, dtype: torch.dtype = torch.bfloat16, name: str | None = None) -> GGUFTensor:
    """Q8_0 blocks of `w` (last dim a multiple of 32) computed in torch on w's device -> GGUFTensor.
    Scale d = amax / 127 (fp16), q = round(w / d): the ggml reference rounding."""
    if w.shape[-1] % 32:
        raise GGUFError(f"quantize_q8_0: last dimension {w.shape[-1]} of {name or 'tensor'} is not a multiple of 32")
    shape = tuple(w.shape)
    x = w.detach().reshape(-1, 32).float()
    amax = x.abs().amax(dim=1, keepdim=True)
    d = amax / 127.0
    inv = torch.where(d > 0, 1.0 / d, torch.zeros_like(d))
    q = torch.round(x * inv).clamp_(-127, 127).to(torch.int8)
    d16 = d.to(torch.float16)
    raw = torch.cat([d16.view(torch.uint8).reshape(-1, 2), q.view(torch.uint8)], dim=1).reshape(-1)
    return GGUFTensor(raw, QT.Q8_0, shape, dtype, name=name)


def random_blocks(qtype: QT | int | str, shape: Sequence[int], *, device: torch.device | str = "cpu",
                  generator: torch.Generator | None = None, scale: float = 0.02,
                  dtype: torch.dtype = torch.bfloat16, name: str | None = None) -> GGUFTensor:
    """A GGUFTensor of `shape` with random but valid blocks (finite fp16 scales, weights roughly
    within +-3*scale), built on `device` without a dense copy."""
    qt = as_qtype(qtype)
    nbytes = quantized_nbytes(qt, shape, name)
    block, tsize = BLOCK_SIZES[qt]
    dev = torch.device(device)
    raw = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev, generator=generator)
    if qt in (QT.F32, QT.F16, QT.BF16):
        t = torch.randn(tuple(shape), device=dev, generator=generator) * scale
        pd = {QT.F32: torch.float32, QT.F16: torch.float16, QT.BF16: torch.bfloat16}[qt]
        raw = t.to(pd).reshape(-1).view(torch.uint8).clone()
        return GGUFTensor(raw, qt, shape, dtype, name=name)
    b = raw.view(-1, tsize)
    nb = b.shape[0]

    def f16(vals):
        return vals.to(torch.float16).view(torch.uint8).reshape(nb, 2)

    def rnd(lo, hi):
        return lo + (hi - lo) * torch.rand(nb, device=dev, generator=generator)
    # (offset of d, max |q| the type's integer part reaches); dmin where the type has one
    if qt == QT.Q8_0:
        b[:, 0:2] = f16(rnd(0.5, 1.0) * 3 * scale / 127)
    elif qt in (QT.Q4_0, QT.IQ4_NL):
        b[:, 0:2] = f16(rnd(0.5, 1.0) * 3 * scale / (8 if qt == QT.Q4_0 else 127))
    elif qt == QT.Q5_0:
        b[:, 0:2] = f16(rnd(0.5, 1.0) * 3 * scale / 16)
    elif qt in (QT.Q4_1, QT.Q5_1):
        top = 15 if qt == QT.Q4_1 else 31
        d = rnd(0.5, 1.0) * 6 * scale / top
        b[:, 0:2] = f16(d)
        b[:, 2:4] = f16(-d * top / 2)
    elif qt in (QT.Q4_K, QT.Q5_K):
        top = 15 if qt == QT.Q4_K else 31
        d = rnd(0.5, 1.0) * 6 * scale / (top * 63)
        b[:, 0:2] = f16(d)
        b[:, 2:4] = f16(d * top / 2)      # scale ~ min in expectation: values centred near 0
    elif qt == QT.Q6_K:
        b[:, 208:210] = f16(rnd(0.5, 1.0) * 3 * scale / (32 * 127))
    elif qt == QT.Q3_K:
        b[:, 108:110] = f16(rnd(0.5, 1.0) * 3 * scale / (4 * 32))
    elif qt == QT.Q2_K:
        d = rnd(0.5, 1.0) * 6 * scale / (3 * 15)
        b[:, 80:82] = f16(d)
        b[:, 82:84] = f16(d * 1.5)
    elif qt == QT.IQ4_XS:
        b[:, 0:2] = f16(rnd(0.5, 1.0) * 3 * scale / (127 * 32))
    return GGUFTensor(raw, qt, shape, dtype, name=name)


def quantize_module(module: nn.Module, qtype: QT | int | str = "Q8_0", *, min_in: int = 0,
                    generator: torch.Generator | None = None,
                    ops: bool = True, progress: bool = False) -> int:
    """Replace the weight of every nn.Linear whose in_features is a multiple of the type's block (and
    >= min_in) by a GGUF parameter: Q8_0 is quantized from the current weight (in torch, on its
    device); other types get random valid blocks of the same shape.  The dense weight is freed.
    With `ops`, the layers become GGUF ops (formats.gguf_tensor.gguf_ops).  Returns the count."""
    qt = as_qtype(qtype)
    block = BLOCK_SIZES[qt][0]
    lins = [(n, m) for n, m in module.named_modules() if type(m) is nn.Linear]
    k = 0
    for i, (n, m) in enumerate(lins):
        w = m.weight
        if w is None or w.shape[-1] % block or w.shape[-1] < min_in or is_gguf(w):
            continue
        with torch.no_grad():
            if qt.name == "Q8_0":
                g = quantize_q8_0(w.data, dtype=w.dtype, name=n + ".weight")
            else:
                g = random_blocks(qt, tuple(w.shape), device=w.device, generator=generator,
                                  dtype=w.dtype, name=n + ".weight")
        m.weight = nn.Parameter(g, requires_grad=False)
        del w
        k += 1
        if progress and (i % 32 == 0 or i == len(lins) - 1):
            sys.stderr.write(f"\rquantize {qt.name}: {i + 1}/{len(lins)} linear layers")
            sys.stderr.flush()
    if progress:
        sys.stderr.write("\n")
    if ops:
        gguf_ops(module)
    return k
