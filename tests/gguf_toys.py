"""The GGUF toy model of the GGUF streaming tests and its hand-built plans (compute "cpu:0", offloaded homes
"cpu"): Toy (an embedder, a ModuleList of blocks, a head), make() (a Toy with quantized GGUF linears),
x_in(), hand_plan(), bits() (bf16 compared bit for bit).  Shared by tests/test_gguf_stream.py,
test_gguf_stream_dequant.py and test_gguf_stream_plans.py; tests/test_gguf_stream.py re-exports make, x_in,
hand_plan and bits for the test files that import them from there."""
from __future__ import annotations

import torch
import torch.nn as nn

from distorch.compiler.graph import ROOT, stored_nbytes
from distorch.compiler.plan import Plan, PlacedUnit
from distorch.formats import testing as ft

C = "cpu:0"
BF = torch.bfloat16


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        x = x + self.proj(a)
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


class Toy(nn.Module):
    def __init__(self, d=256, depth=4, cin=16):
        super().__init__()
        self.embed = nn.Linear(cin, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, d)

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)


def make(qtype="Q8_0", d=256, depth=4, seed=0):
    torch.manual_seed(seed)
    m = Toy(d, depth).to(BF).eval()
    g = torch.Generator().manual_seed(seed + 1)
    n = ft.quantize_module(m, qtype, generator=g)
    assert n == 1 + 4 * depth    # embed (in 16) stays dense for K types; Q8_0 too (16 % 32 != 0)
    return m


def x_in(d_in=16, seed=3):
    return torch.randn(2, 8, d_in, generator=torch.Generator().manual_seed(seed)).to(BF)


def hand_plan(m, offloaded, quant=None, slots=2):
    names = [f"blocks.{i}" for i in range(len(m.blocks))]
    sizes = {n: sum(stored_nbytes(p) for p in m.get_submodule(n).parameters()) for n in names}
    root = sum(stored_nbytes(p) for p in m.parameters()) - sum(sizes.values())
    pu = [PlacedUnit(ROOT, "Toy", root, C, 0, "root")]
    pu += [PlacedUnit(n, "Block", sizes[n], "cpu" if n in offloaded else C, i + 1) for i, n in enumerate(names)]
    big = max([sizes[n] for n in offloaded] or [0])
    return Plan(compute=C, units=pu, window_bytes=slots * big, quant=dict(quant or {}))


def bits(t):
    return t.view(torch.int16) if t.dtype == BF else t
