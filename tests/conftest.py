"""Test-session setup, and fixtures several test files share.

Without a GPU, Triton's CPU interpreter runs the CUDA dequantization kernels (tests/test_dequant.py):
TRITON_INTERPRET must be set before triton is imported, so it is set here, once, for the session.
On a CUDA machine the kernels run for real and nothing is changed."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def fake_pin(monkeypatch):
    """cudaHostRegister / Unregister faked (runtime.pinning's module attributes): {ptr: nbytes} registered now."""
    from distorch.runtime import pinning
    regs = {}

    def reg(ptr, n):
        regs[ptr] = n
        return 0
    monkeypatch.setattr(pinning, "host_register", reg)
    monkeypatch.setattr(pinning, "host_unregister", lambda ptr: regs.pop(ptr))
    return regs
