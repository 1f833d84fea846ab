"""The fixture the CPU runtime tests share (tests/test_runtime.py, test_runtime_lifecycle.py,
test_runtime_compile.py): toy, a seeded ToyDiT (tests/runtime_toys.py) in eval mode, its inputs and its
reference output."""
import pytest
import torch

from runtime_toys import ToyDiT, toy_inputs


@pytest.fixture
def toy():
    torch.manual_seed(0)
    m = ToyDiT().eval()
    args = toy_inputs()
    with torch.no_grad():
        ref = m(*args)
    return m, args, ref
