"""Device inventory: devices with total/free memory and link bandwidths (probed or declared).

Filled in by the compiler-core work: `declare(spec)` parses e.g. "cuda:0=24GiB,cuda:1=12GiB,cpu=64GiB"
(optional links "cpu>cuda:0=25GB/s"), `probe()` measures the real machine (cached).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Device:
    name: str            # "cuda:0", "cpu", ...
    total_bytes: int
    free_bytes: int


@dataclass
class Inventory:
    devices: dict[str, Device] = field(default_factory=dict)
    links: dict[tuple[str, str], float] = field(default_factory=dict)   # (src, dst) -> bytes/s
    compute_rate: dict[str, float] = field(default_factory=dict)        # dev -> FLOP/s, when known
    source: str = "declared"                                            # "declared" | "probed"

    def bandwidth(self, src: str, dst: str) -> float:
        """Bytes/s from src to dst (defaults documented in README when not declared/probed)."""
        raise NotImplementedError
