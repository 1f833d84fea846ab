"""The toy models of the runtime tests and their hand-built plans (compute "cpu:0", offloaded homes "cpu"):
ToyDiT (a DiT-like stack of Blocks), Twice (a block called twice, a branch), Mixed (tiny embedders, wide blocks,
tiny head: small units share ring items).  The runtime test files import them from here."""
from __future__ import annotations

import torch
import torch.nn as nn

from distorch.compiler.graph import ROOT
from distorch.compiler.plan import Plan, PlacedUnit

C = "cpu:0"   # compute on the host; "cpu" is the host home of offloaded units


# ----------------------------------------------------------------------------------------- models
class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.attn = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.mod = nn.Linear(d, 2 * d)

    def forward(self, x, c):
        shift, scale = self.mod(c).chunk(2, -1)
        h = self.norm(x) * (1 + scale[:, None]) + shift[:, None]
        q, k, v = self.attn(h).chunk(3, -1)
        a = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
        x = x + self.proj(a)
        return x + self.mlp(self.norm(x))


class ToyDiT(nn.Module):
    """DiT-like: embedder, time MLP (parent-owned params), a ModuleList of blocks, head."""

    def __init__(self, d=32, depth=6, cin=8):
        super().__init__()
        self.embed = nn.Linear(cin, d)
        self.t_w = nn.Parameter(torch.randn(d) * 0.1)      # used by the parent directly (ROOT)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.head = nn.Linear(d, cin)
        self.register_buffer("pos", torch.randn(1, 16, d) * 0.1)

    def forward(self, x, t):
        c = torch.sin(t[:, None] * self.t_w)
        h = self.embed(x) + self.pos[:, : x.shape[1]]
        for b in self.blocks:
            h = b(h, c)
        return self.head(h)


def toy_inputs(b=2, n=16, cin=8):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, n, cin, generator=g), torch.rand(b, generator=g)


def nbytes(m: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in m.parameters())


def make_plan(model, offloaded, units=None, window_units=None, compute=C, home="cpu"):
    """units: module names in execution order (default: the ModuleList children 'blocks.i')."""
    units = units if units is not None else [f"blocks.{i}" for i in range(len(model.blocks))]
    pu = [PlacedUnit(ROOT, "root", 0, compute, 0, "root")]
    for i, n in enumerate(units):
        pu.append(PlacedUnit(n, type(model.get_submodule(n)).__name__, nbytes(model.get_submodule(n)),
                             home if n in offloaded else compute, i + 1))
    return Plan(compute=compute, units=pu)


def run(model, args, steps=3):
    outs = []
    with torch.no_grad():
        for _ in range(steps):
            outs.append(model(*args))
    return outs


# -------------------------------------------------------------------------------- tricky modules
class Twice(nn.Module):
    """A block called twice per forward, and a branch taken only on some calls."""

    def __init__(self, d=16):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
        self.extra = nn.ModuleList([nn.Linear(d, d)])

    def forward(self, x, branch=False):
        x = self.blocks[0](x)
        x = self.blocks[1](x)
        x = self.blocks[1](x)          # called twice
        if branch:
            x = self.extra[0](x)       # branch not always taken
        x = self.blocks[2](x)
        return self.blocks[3](x)

    @staticmethod
    def plan(compute: str) -> Plan:
        """Every unit of a Twice streamed from the CPU to `compute`."""
        units = [f"blocks.{i}" for i in range(4)] + ["extra.0"]
        return Plan(compute=compute, units=[PlacedUnit(n, "Linear", 0, "cpu", i) for i, n in enumerate(units)])


# ------------------------------------------------------------------------------------------------
# ring items: small units travel together

class Mixed(nn.Module):
    """Tiny embedders, then wide blocks, then tiny head layers (Flux-like sizes in miniature)."""

    def __init__(self, d=64):
        super().__init__()
        self.e1 = nn.Linear(8, d)
        self.e2 = nn.Linear(d, d // 8)
        self.e3 = nn.Linear(d // 8, d)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
                                    for _ in range(3))
        self.singles = nn.ModuleList(nn.Linear(d, d) for _ in range(4))
        self.h1 = nn.Linear(d, 8)
        self.h2 = nn.Linear(8, 8)

    def forward(self, x):
        x = self.e3(torch.tanh(self.e2(self.e1(x))))
        for b in self.blocks:
            x = x + b(x)
        for s in self.singles:
            x = torch.tanh(s(x))
        return self.h2(self.h1(x))


def _mixed_plan(m, window_units):
    names = ["e1", "e2", "e3"] + [f"blocks.{i}" for i in range(3)] + [f"singles.{i}" for i in range(4)] + ["h1", "h2"]
    pu = [PlacedUnit(ROOT, "root", 0, C, 0, "root")]
    pu += [PlacedUnit(n, "x", nbytes(m.get_submodule(n)), "cpu", i + 1) for i, n in enumerate(names)]
    return Plan(compute=C, units=pu, window_bytes=window_units * max(u.bytes for u in pu)), names


def _mixed_case(seed, window_units):
    """A seeded Mixed model, an input, its resident output, and a plan streaming every unit."""
    torch.manual_seed(seed)
    m = Mixed().eval()
    x = torch.randn(4, 8)
    with torch.no_grad():
        ref = m(x)
    plan, names = _mixed_plan(m, window_units)
    return m, x, ref, plan, names


def _mixed_by_hand(m, x, reverse_singles=False):
    """Mixed's forward written out, calling the units outside the module's own forward."""
    h = m.e3(torch.tanh(m.e2(m.e1(x))))
    for b in m.blocks:
        h = h + b(h)
    for s in (reversed(m.singles) if reverse_singles else m.singles):
        h = torch.tanh(s(h))
    return m.h2(m.h1(h))


def _mixed_times(edge, block, single):
    """Compute seconds per unit of Mixed: embedders and head `edge`, blocks `block`, singles `single`."""
    times = {n: edge for n in ("e1", "e2", "e3", "h1", "h2")}
    times.update({f"blocks.{i}": block for i in range(3)})
    times.update({f"singles.{i}": single for i in range(4)})
    return times
