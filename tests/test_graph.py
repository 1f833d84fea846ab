import json

import torch

from distorch.compiler.graph import ModuleGraph, Unit, ROOT
from distorch.compiler.trace import trace


class Tied(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(4, 4) for _ in range(2)])
        self.blocks[1].weight = self.blocks[0].weight
        self.scale = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x * self.scale


def test_json_round_trip_keeps_units_order_and_sharing():
    g = trace(Tied(), (torch.randn(2, 4),))
    assert g.shared, "the tied weight must be recorded as shared"
    back = ModuleGraph.from_dict(json.loads(json.dumps(g.to_dict())))
    assert [u.to_dict() for u in back] == [u.to_dict() for u in g]
    assert back.shared == g.shared and back.aliases == g.aliases and back.traced == g.traced
    assert list(back.g.edges) == list(g.g.edges)


def test_duplicate_unit_names_rejected():
    try:
        ModuleGraph([Unit("a", "X"), Unit("a", "X")])
    except ValueError as e:
        assert "a" in str(e)
    else:
        raise AssertionError("duplicate names accepted")


def test_root_unit_present_for_parent_param():
    g = trace(Tied(), (torch.randn(2, 4),))
    assert ROOT in g and "scale" in g[ROOT].tensors
