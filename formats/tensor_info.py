"""TensorInfo: one tensor of a weights file as its header describes it (no torch needed)."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class TensorInfo:
    name: str                 # key as stored in the file
    shape: tuple              # torch order (outermost first); GGUF dims are reversed to match
    dtype_str: str            # "BF16", "F16", "F32", "F8_E4M3" (safetensors) / "Q8_0", "F16" (GGUF)
    nbytes: int               # bytes as stored (quantized size for GGUF)
    offset: int = 0           # absolute byte offset of the data in the file (0 for built-in shapes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)
