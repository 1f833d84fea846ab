"""ModuleGraph: the transfer units of a model, in execution order, as a networkx DiGraph.

A *unit* is the smallest group of weights that moves as one copy: by default a block (a child of a
ModuleList / Sequential), a leaf module where a model has no blocks, or the "root" remainder (weights
a parent uses directly or that sit outside every block).  This file only defines the data; building
it from a module is `compiler.trace`, from a weights file `compiler.files`.
"""
from __future__ import annotations

from dataclasses import dataclass, field, asdict
from typing import Callable, Iterable

import networkx as nx

ROOT = "<root>"  # name of the unit holding weights outside every block


@dataclass
class Unit:
    name: str                 # qualified module name, e.g. "double_blocks.7"; ROOT for the remainder
    type: str                 # class name ("DoubleStreamBlock", "Linear") or a key-derived family
    param_bytes: int = 0      # parameters, as stored (quantized size for quantized tensors)
    buffer_bytes: int = 0     # persistent buffers, as stored
    tensors: list[str] = field(default_factory=list)  # qualified names of the tensors it owns
    flops: float = 0.0        # estimated FLOPs per call (0 when inputs are unknown)
    act_bytes: int = 0        # bytes of the activations it produces per call (0 when unknown)
    calls: int = 1            # times it runs per forward
    kind: str = "block"       # "block" | "leaf" | "root" | "sub" (a layer of a split block)
    time_s: float | None = None  # measured compute time per forward, when known (fed back by runtime)
    params: int = 0           # parameter elements (0 when unknown): the compute estimate's size when
    #                           FLOPs are unknown (stored bytes under-count quantized weights)
    gguf: dict = field(default_factory=dict)  # GGUF parameters it owns (compiler.trace), empty when none:
    #   {"tensors", "stored_bytes", "dense_bytes", "largest_dense", "patched" (a layer applies per-call
    #    weight patches), "qtypes" {type: count}, "bytes_by_type" {type: [stored, dense]}}
    parent: str = ""          # the block a sub-unit (kind "sub") was split from (passes/granularity.py)
    codec: dict = field(default_factory=dict)  # its parameters the runtime can stream compressed (bf16/fp16,
    #   formats.bf16_encode.codable), empty when none: {"tensors", "dense_bytes", "largest_dense",
    #   "est_bytes" (their packed bytes, estimated: compiler.trace, compiler.files)}; passes/codec_choice.py

    @property
    def bytes(self) -> int:
        return self.param_bytes + self.buffer_bytes

    def to_dict(self) -> dict:
        return asdict(self)


class ModuleGraph:
    """Units in execution order; edge u->v when v runs right after u (the order is a path)."""

    def __init__(self, units: Iterable[Unit], source: str = "") -> None:
        self.units: list[Unit] = list(units)
        self.source = source
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise ValueError(f"duplicate unit names in graph: {dup[:5]}")
        self.g = nx.DiGraph()
        for i, u in enumerate(self.units):
            self.g.add_node(u.name, unit=u, order=i)
        for a, b in zip(names, names[1:]):
            self.g.add_edge(a, b)

    def __len__(self) -> int:
        return len(self.units)

    def __iter__(self):
        return iter(self.units)

    def __getitem__(self, name: str) -> Unit:
        return self.g.nodes[name]["unit"]

    def __contains__(self, name: str) -> bool:
        return name in self.g

    @property
    def total_bytes(self) -> int:
        return sum(u.bytes for u in self.units)

    def order_of(self, name: str) -> int:
        return self.g.nodes[name]["order"]

    def type_counts(self, names: Iterable[str] | None = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for u in (self.units if names is None else [self[n] for n in names]):
            out[u.type] = out.get(u.type, 0) + 1
        return out

    # attributes the builders (compiler.trace / compiler.files) set on a graph, kept by the JSON round trip
    EXTRA = ("shared", "aliases", "traced", "granularity", "outside_flops", "module_names",
             "excluded", "excluded_bytes", "time_scales", "decode_scale")
    # time_scales: when the units' time_s are measured for one input (runtime/timebook.py), the other inputs
    # measured, as the ratio of their step to that one's (512x512 beside 1024x1024: ~0.35); the passes weigh
    # a placement in each (passes/budget.scenario_units, passes/granularity.py, passes/codec_choice.py)
    # decode_scale: measured decode time of compressed units over compiler.cost.decode_seconds' (the time
    # book learns it from a step that streamed compressed; passes/codec_choice.py prices decoding with it)

    def to_dict(self) -> dict:
        d = {"source": self.source, "units": [u.to_dict() for u in self.units]}
        for k in self.EXTRA:
            if hasattr(self, k):
                d[k] = getattr(self, k)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ModuleGraph":
        g = cls([Unit(**u) for u in d["units"]], source=d.get("source", ""))
        for k in cls.EXTRA:
            if k in d:
                setattr(g, k, d[k])
        return g


def owner_lookup(unit_names: Iterable[str]) -> Callable[[str], str | None]:
    """A function mapping a module's qualified name to the unit that contains it (the longest unit
    name that is the module's name or a dotted prefix of it), or None outside every unit."""
    uset = set(unit_names)

    def owner(mname: str):
        parts = mname.split(".") if mname else []
        for k in range(len(parts), 0, -1):
            p = ".".join(parts[:k])
            if p in uset:
                return p
        return None
    return owner


# --- bytes as stored --------------------------------------------------------------------------
# A quantized tensor type says how many bytes it occupies as stored: with a `stored_nbytes` attribute
# (formats.gguf_tensor.GGUFTensor has one, so the compiler needs no import of it) or through
# register_nbytes (other packs' types); plain tensors count numel * element_size, which is right for
# fp32/bf16/fp16/fp8 and for meta tensors too.
_NBYTES_HOOKS: list[tuple[type, Callable[[object], int]]] = []


def register_nbytes(tensor_type: type, fn: Callable[[object], int]) -> None:
    """Teach the cost model the stored size of a tensor subclass (e.g. a quantized GGUF tensor)."""
    _NBYTES_HOOKS.insert(0, (tensor_type, fn))


def stored_nbytes(t: object) -> int:
    for typ, fn in _NBYTES_HOOKS:
        if isinstance(t, typ):
            return int(fn(t))
    n = getattr(t, "stored_nbytes", None)
    if n is not None:
        return int(n)
    return int(t.numel()) * int(t.element_size())


# --- bf16/fp16 weights the runtime can stream compressed ----------------------------------------------
# The rule itself is formats.bf16_encode.codable (compiler.trace applies it to live tensors); a weights
# file's header (compiler.files) has no tensors, so these mirror its bounds without importing torch
# (tests/test_codec_choice.py checks they agree).
CODEC_MIN_NUMEL = 1 << 16               # formats.bf16_encode.MIN_CODED_NUMEL
CODEC_MAX_NUMEL = 2**31 - 2**21         # formats.bf16_codec.MAX_NUMEL
# Packed bytes / raw bytes when a tensor's values are unknown (a meta tensor, a file header): the
# escape-levels format at its default 3 levels on trained-like weights, bench/results/codec_h200.md
# (random normal bf16: 0.675, student-t: 0.690; fp16: 0.857), rounded.
CODEC_RATIO = {"bfloat16": 0.68, "float16": 0.86}


def codec_default_bytes(dense_bytes: int, dtype_name: str) -> int:
    """Estimated packed bytes of `dense_bytes` of `dtype_name` ("bfloat16" | "float16") weights whose
    values are unknown: CODEC_RATIO of them, rounded up."""
    return -(-int(dense_bytes) * int(CODEC_RATIO[dtype_name] * 1000) // 1000)


def add_codec_fact(unit: Unit, dense_bytes: int, est_bytes: int) -> None:
    """Count one codable tensor of `dense_bytes` (raw) and `est_bytes` (packed, estimated) in `unit.codec`."""
    f = unit.codec or {"tensors": 0, "dense_bytes": 0, "largest_dense": 0, "est_bytes": 0}
    f["tensors"] += 1
    f["dense_bytes"] += int(dense_bytes)
    f["largest_dense"] = max(f["largest_dense"], int(dense_bytes))
    f["est_bytes"] += int(est_bytes)
    unit.codec = f
