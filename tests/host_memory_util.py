"""The model, plan and home store the host-memory tests share (tests/test_host_memory.py,
test_host_memory_pinning.py, test_host_memory_fill.py): TinyDiT (about 260 MiB at its default size), a plan
streaming every block from host homes, and the HomeStore apply() would build for it."""
import torch

from distorch.compiler.graph import ROOT
from distorch.compiler.plan import Plan, PlacedUnit
from distorch.runtime.apply import classify
from distorch.runtime.store import HomeStore


class Block(torch.nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.up = torch.nn.Linear(d, h)
        self.gate = torch.nn.Linear(d, h)
        self.down = torch.nn.Linear(h, d)

    def forward(self, x):
        y = self.norm(x)
        return x + self.down(torch.nn.functional.silu(self.gate(y)) * self.up(y))


class TinyDiT(torch.nn.Module):
    def __init__(self, depth=8, d=1024, h=2560):
        super().__init__()
        self.inp = torch.nn.Linear(d, d)
        self.blocks = torch.nn.ModuleList(Block(d, h) for _ in range(depth))

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return x


def nbytes(m):
    return sum(p.numel() * p.element_size() for p in m.parameters())


def plan_all(model, compute="cpu:0", home="cpu"):
    pu = [PlacedUnit(ROOT, "root", 0, compute, 0, "root")]
    for i, b in enumerate(model.blocks):
        pu.append(PlacedUnit(f"blocks.{i}", "Block", nbytes(b), home, i + 1))
    return Plan(compute=compute, units=pu)


def store_for(m, pin=True):
    plan = plan_all(m)
    c = classify(m, plan)
    units = [n for n in c.offloaded if c.streamed[n]]
    return HomeStore(units, c.streamed, c.home_of, pin=pin, progress=False), units
