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


@pytest.fixture
def fail_fill_after(monkeypatch):
    """arm(n): the homes' fill (runtime.fill.copy_piece, one thread) raises RuntimeError("disk on fire") from
    its (n+1)-th copy on; returns the real copy_piece (to put back)."""
    from distorch.runtime import fill

    def arm(n: int):
        real = fill.copy_piece
        calls = [0]

        def flaky(d, s):
            calls[0] += 1
            if calls[0] > n:
                raise RuntimeError("disk on fire")
            real(d, s)
        monkeypatch.setattr(fill, "copy_piece", flaky)
        monkeypatch.setenv(fill.ENV, "1")
        return real
    return arm


@pytest.fixture(autouse=True)
def _fresh_timebook():
    """Every test starts with an empty time book (runtime/timebook.py): a model measured by one test would
    otherwise place the next test's compile of the same toy from that test's measurements."""
    from distorch.runtime import timebook
    timebook.BOOK.clear()
    yield
    timebook.BOOK.clear()
