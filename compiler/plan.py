"""Plan: where every unit lives and what the step is predicted to cost. Plain data, JSON round-trip."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

PLAN_VERSION = 1
GiB = 1 << 30

# Plan.quant values: how a unit's GGUF weights are kept (passes/quant_choice.py chooses,
# runtime/gguf_stream.py carries it out)
STREAMED_Q = "streamed_q"      # offloaded: quantized bytes cross the bus, dequantized after the copy
RESIDENT_Q = "resident_q"      # resident, quantized: dequantized on every call
RESIDENT_DQ = "resident_dq"    # resident, dequantized once at apply()
CHOICES = (STREAMED_Q, RESIDENT_Q, RESIDENT_DQ)


@dataclass
class PlacedUnit:
    name: str
    type: str
    bytes: int
    device: str          # home device of its weights
    order: int           # execution order
    kind: str = "block"
    parent: str = ""     # the block a sub-unit (kind "sub") was split from (passes/granularity.py)


@dataclass
class Plan:
    compute: str                                   # the device that runs the model
    units: list[PlacedUnit]
    devices: dict[str, dict] = field(default_factory=dict)   # dev -> {"bytes", "units", "total", "types"}
    expert_string: str = ""                        # equivalent v2 fraction-form allocation string
    window_bytes: int = 0                          # VRAM slot pool for streamed units on `compute`
    predicted: dict = field(default_factory=dict)  # compute_s, step_s, overhead_s, peak_bytes, ...
    source: dict = field(default_factory=dict)     # how it was asked for (vram_gb/donors or expert)
    version: int = PLAN_VERSION
    # GGUF units: unit name -> one of CHOICES (passes/quant_choice.py, runtime/gguf_stream.py);
    # units not named: streamed when offloaded, else resident quantized
    quant: dict = field(default_factory=dict)
    # units whose bf16/fp16 weights stream losslessly compressed (passes/codec_choice.py chooses,
    # runtime/codec_stream.py carries it out): unit name -> its predicted bytes as streamed (compressed
    # codable tensors + the rest raw); units not named stream raw
    codec: dict = field(default_factory=dict)

    @property
    def model_bytes(self) -> int:
        return sum(u.bytes for u in self.units)

    def home(self, name: str) -> str:
        for u in self.units:
            if u.name == name:
                return u.device
        raise KeyError(f"unit {name!r} is not in this plan")

    def offloaded(self) -> list[PlacedUnit]:
        return [u for u in self.units if u.device != self.compute]

    def offloaded_bytes(self) -> int:
        return sum(u.bytes for u in self.offloaded())

    def streamed_sizes(self) -> dict[str, int]:
        """Offloaded unit -> its bytes as streamed (`codec`: compressed, else raw): what its copy moves and
        its share of a slot."""
        codec = self.codec or {}
        return {u.name: int(codec.get(u.name, u.bytes)) for u in self.offloaded()}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["model_bytes"] = self.model_bytes
        return d

    def to_json(self, **kw: Any) -> str:
        return json.dumps(self.to_dict(), **kw)

    @classmethod
    def from_dict(cls, d: dict) -> "Plan":
        d = dict(d)
        d.pop("model_bytes", None)
        d["units"] = [PlacedUnit(**u) for u in d["units"]]
        return cls(**d)

    @classmethod
    def from_json(cls, s: str) -> "Plan":
        return cls.from_dict(json.loads(s))
