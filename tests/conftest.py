"""Test-session setup.

Without a GPU, Triton's CPU interpreter runs the CUDA dequantization kernels (tests/test_dequant.py):
TRITON_INTERPRET must be set before triton is imported, so it is set here, once, for the session.
On a CUDA machine the kernels run for real and nothing is changed."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
