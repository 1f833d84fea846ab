"""Cost model: what a unit costs to compute and to move, and a simulation of one steady-state step.

Mechanism only; the placement policy that uses it lives in passes/partition.py.

Per-unit compute time on the compute device, first that applies:
  1. `Unit.time_s` (measured by the runtime, per forward);
  2. `Unit.flops * Unit.calls / inventory.rate(device)`;
  3. a bytes fallback for plans made from a weights file alone:
     `bytes * FALLBACK_FLOPS_PER_BYTE * calls / rate`, FALLBACK_FLOPS_PER_BYTE = 4096, i.e. 2 FLOP per
     parameter per token, 2 bytes per parameter (bf16), 4096 tokens per forward (a 1024x1024 image in a
     DiT).  For a 23.8 GB Flux-dev that predicts 0.24 s per step on a 400 TFLOP/s GPU (measured: 0.18 s).
     The size is 2 bytes x `Unit.params` when the parameter count is known (trace, file headers), so a
     quantized model (Q8_0: ~1.06 bytes per parameter) is estimated like its bf16 original.
Per-unit transfer time: `bytes / inventory.bandwidth(home, compute) + COPY_FIXED_S` (5 us per copy: one
copy per unit, its weights gathered in one flat pinned buffer); `bytes` is the unit's bytes as streamed
(`simulate(streamed=)`: a unit whose bf16/fp16 weights stream compressed moves fewer, Plan.codec).
Per-unit decode time of compressed weights (`decode_seconds`, on the compute stream after the copy):
dense bytes / DECODE_BW + DECODE_LAUNCH_S per tensor on a CUDA device; the torch decoder's rates elsewhere.

`simulate` replays the step as the runtime executes it: one compute stream running the units in
order; one copy engine per link (src -> compute), FIFO in execution order; a window of equal slots on the
compute device, each the size of the largest offloaded unit (n_slots = window_bytes // largest, at most
one per ring item), used as a ring exactly like runtime/ring.py, with the geometry of
compiler/ring_layout.py: the offloaded units form a periodic sequence packed into ring items
(`stream_groups`: units from one home that run back to back and fit one slot together share one copy),
item g runs from slot g % n_slots, and the copy of item g + n_slots is issued when item g's last unit has
computed (for the first items of a step that item belongs to the previous step: prefetch wraps across
the step boundary; see slot_gates); a copy starts when it is issued and its link is free.  A unit
computes when the previous unit is done and its item's copy has landed.  Several steps are simulated
(the first starts cold) and the last is reported.  The reported step time is never below the floor
max(compute, bytes_l / bandwidth_l).

`best_window` is the runtime's autotune policy: given measured unit times and link rates, the slot count.
`StepModel` is simulate's arrays kept for a caller that changes one unit at a time and simulates again
(passes/codec_choice.py); simulate() is one StepModel run.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .graph import ROOT, Unit
from .inventory import Inventory, is_host
from .ring_layout import item_keys, n_slots_for, slot_gates, stream_groups

if TYPE_CHECKING:
    from enum import Enum

    from .plan import Plan

COPY_FIXED_S = 5e-6
FALLBACK_FLOPS_PER_BYTE = 4096.0
DEFAULT_STEPS = 3


def unit_compute_s(unit: Unit, device: str, inventory: Inventory) -> float:
    """Compute time of `unit` per forward on `device` (measured > FLOPs > bytes fallback)."""
    if unit.time_s is not None:
        return float(unit.time_s)
    rate = inventory.rate(device)
    calls = max(1, int(unit.calls or 1))
    if unit.flops and unit.flops > 0:
        return float(unit.flops) * calls / rate
    size = 2 * unit.params if unit.params else unit.bytes      # as bf16: quantized bytes under-count compute
    return size * FALLBACK_FLOPS_PER_BYTE * calls / rate


def unit_transfer_s(nbytes: int, src: str, dst: str, inventory: Inventory, pageable: bool = False) -> float:
    """Time to copy `nbytes` from src to dst: bytes / bandwidth + fixed per-copy cost (0 on one device);
    `pageable`: from host memory that is not pinned (inventory.pageable_bandwidth)."""
    if src == dst or nbytes <= 0:
        return 0.0
    bw = inventory.pageable_bandwidth(src, dst) if pageable else inventory.bandwidth(src, dst)
    return nbytes / bw + COPY_FIXED_S


# Dequantization of GGUF weights (bench/results/dequant_h100.md, H100, Triton backend): throughput of
# the kernel as a fraction of the device's copy bandwidth (read + write), counting blocks read + bf16
# written; 3072 x 12288 layer on an H100 (copy 3025 GB/s).  By GGML type name; plain types (F16 ...)
# cost a cast at copy bandwidth.
DEQUANT_EFFICIENCY: dict[str, float] = {
    "Q8_0": 0.91, "Q4_K": 0.82, "Q5_K": 0.67, "Q6_K": 0.66, "Q4_0": 0.96, "Q5_0": 0.89,
    "Q5_1": 0.89, "Q4_1": 0.92, "Q3_K": 0.58, "Q2_K": 0.96, "IQ4_NL": 0.91, "IQ4_XS": 0.86,
}
DEQUANT_HOST_S = 60e-6     # Python cost of one dequantize() call on the host (Triton launch + checks)


def dequant_seconds(qtype: str | Enum, stored_bytes: int, dense_bytes: int, *, copy_bw: float = 3.0e12) -> float:
    """Predicted device time to dequantize tensors of GGML type `qtype` (name, or an enum with .name)
    holding `stored_bytes` of blocks into `dense_bytes` of output, on a device whose device-to-device
    copy moves `copy_bw` bytes/s (read + write counted): (stored + dense) / (efficiency * copy_bw)."""
    eff = DEQUANT_EFFICIENCY.get(getattr(qtype, "name", qtype), 1.0)
    return (stored_bytes + dense_bytes) / (eff * copy_bw)


# Decoding bf16/fp16 weights streamed compressed (formats/bf16_codec.py), by where the model computes.
DECODE_BW = 4.7e11         # B/s of output, the Triton decoder on a CUDA GPU: ~470 GB/s on an H200 for a
#                            3072 x 12288 bf16 layer at the default 3 levels (bench/results/codec_h200.md)
DECODE_LAUNCH_S = 15e-6    # device time per tensor decoded (launch, a short tail, the prefix sums' ramp):
#                            an estimate, not measured (that file's GB/s are of large tensors only)
DECODE_BW_TORCH = 1.0e10   # B/s, the torch decoder on another accelerator (no Triton): 9.8-15.8 GB/s on an
#                            H200 in the same file, its lower end
DECODE_BW_HOST = 1.3e8     # B/s, the torch decoder on the host: 131-134 MB/s in the same file ("cpu dec")


def decode_seconds(dense_bytes: int, tensors: int, compute: str, scale: float = 1.0) -> float:
    """Predicted time on `compute`'s stream to decode `tensors` compressed bf16/fp16 tensors back into
    `dense_bytes` of weights: dense_bytes / DECODE_BW + DECODE_LAUNCH_S per tensor on a CUDA device,
    dense_bytes / DECODE_BW_HOST when the host computes (so compressing never pays there), the torch
    decoder's DECODE_BW_TORCH on other accelerators; times `scale`, what this model's measured steps showed
    of the rate beside its own compute (ModuleGraph.decode_scale, runtime/timebook.py)."""
    if dense_bytes <= 0:
        return 0.0
    dev = str(compute)
    if is_host(dev):
        return dense_bytes / DECODE_BW_HOST * scale
    if dev.split(":")[0] in ("cuda", "hip"):
        return (dense_bytes / DECODE_BW + DECODE_LAUNCH_S * max(0, int(tensors))) * scale
    return (dense_bytes / DECODE_BW_TORCH + DECODE_LAUNCH_S * max(0, int(tensors))) * scale


def simulate_core(ct: list[float], tt: list[float], link: list, offloaded: list[int], n_slots: int,
                  steps: int = DEFAULT_STEPS, groups: list[list[int]] | None = None) -> tuple[float, float]:
    """Fast inner simulation on arrays. ct: compute s per unit; tt: transfer s per unit; link: link key per
    unit; offloaded: indices (execution order) of offloaded units; n_slots >= 1 when any is offloaded;
    groups: ring items as lists of positions in `offloaded` (stream_groups; default one unit per item).
    An item is one copy (the sum of its units' transfer times) into one slot, gated like a unit; its
    first unit waits for the copy, and the slot is released when its last unit has computed.
    Returns (last step duration, stall seconds in the last step)."""
    n = len(ct)
    m = len(offloaded)
    if m == 0:
        return sum(ct), 0.0
    if n_slots < 1:
        raise ValueError("a window of at least one slot is needed when units are offloaded")
    if groups is None:
        groups = [[k] for k in range(m)]
    ng = len(groups)
    gates = slot_gates(ng, n_slots)
    item_of = [0] * m
    for q, grp in enumerate(groups):
        for k in grp:
            item_of[k] = q
    first = [grp[0] for grp in groups]
    last_k = [grp[-1] for grp in groups]
    gtt = [sum(tt[offloaded[k]] for k in grp) for grp in groups]
    pos_of = {i: k for k, i in enumerate(offloaded)}
    release_prev = [0.0] * ng     # cold start: the previous step released everything at t=0
    release_cur = [0.0] * ng
    landed = [0.0] * ng
    link_free: dict = {}
    t = 0.0
    last = 0.0
    stall = 0.0
    for _ in range(steps):
        start_of_step = t
        stall = 0.0
        for i in range(n):
            k = pos_of.get(i)
            if k is not None:
                q = item_of[k]
                if k == first[q]:
                    ds, g = gates[q]
                    gate = release_prev[g] if ds < 0 else release_cur[g]
                    lk = link[i]
                    cs = link_free.get(lk, 0.0)
                    if gate > cs:
                        cs = gate
                    landed[q] = ce = cs + gtt[q]
                    link_free[lk] = ce
                ce = landed[q]
                if ce > t:
                    stall += ce - t
                    t = ce
                t += ct[i]
                if k == last_k[q]:
                    release_cur[q] = t
            else:
                t += ct[i]
        last = t - start_of_step
        release_prev, release_cur = release_cur, [0.0] * ng
    return last, stall


class StepModel:
    """`simulate`'s arrays for one placement, kept so that a caller can change one unit's compute time or
    bytes as streamed and simulate again without rebuilding them (passes/codec_choice.py weighs one unit
    more per simulation): `set(i, compute_s=, nbytes=)` then `run(window_bytes)`.  simulate() is one run."""

    def __init__(self, units_in_order: list[Unit], homes: dict[str, str], compute: str, inventory: Inventory,
                 streamed: dict[str, int] | None = None) -> None:
        self.compute, self.inventory = compute, inventory
        self.pinned_limit = getattr(inventory, "pinned_limit", None)
        self.ct: list[float] = []
        self.tt: list[float] = []
        self.link: list = []
        self.off: list[int] = []
        self.home: dict[int, str] = {}
        self.nbytes: dict[int, int] = {}
        for i, u in enumerate(units_in_order):
            self.ct.append(unit_compute_s(u, compute, inventory))
            h = homes.get(u.name, compute)
            if h != compute:
                self.link.append(f"{h}>{compute}")
                self.off.append(i)
                self.home[i] = h
                self.nbytes[i] = u.bytes if streamed is None else streamed.get(u.name, u.bytes)
            else:
                self.link.append(None)
            self.tt.append(0.0)
        self.keys = item_keys([self.link[i] for i in self.off], self.off) if self.off else []
        self._transfers()

    def _transfers(self) -> None:
        pinned_seen = 0
        for i in self.off:
            h, nb = self.home[i], self.nbytes[i]
            pageable = False
            if h == "cpu" and self.pinned_limit is not None:
                pinned_seen += nb           # homes pin in execution order; past the cap they stay pageable
                pageable = pinned_seen > self.pinned_limit
            self.tt[i] = unit_transfer_s(nb, h, self.compute, self.inventory, pageable=pageable)

    def set(self, i: int, compute_s: float | None = None, nbytes: int | None = None) -> None:
        """Unit i (execution order) now computes in `compute_s` / streams `nbytes` (an offloaded unit)."""
        if compute_s is not None:
            self.ct[i] = float(compute_s)
        if nbytes is not None and i in self.nbytes:
            self.nbytes[i] = int(nbytes)
            if self.pinned_limit is not None:
                self._transfers()
            else:
                self.tt[i] = unit_transfer_s(int(nbytes), self.home[i], self.compute, self.inventory)

    def run(self, window_bytes: int, steps: int = DEFAULT_STEPS) -> dict:
        """simulate's dict for the units as they are now and a window of `window_bytes`."""
        off, link, tt = self.off, self.link, self.tt
        sizes = [self.nbytes[i] for i in off]
        per_link_bytes: dict[str, int] = {}
        per_link_s: dict[str, float] = {}
        for i, nb in zip(off, sizes):
            key = link[i]
            per_link_bytes[key] = per_link_bytes.get(key, 0) + nb
            per_link_s[key] = per_link_s.get(key, 0.0) + tt[i]
        n_slots = n_slots_for(window_bytes, sizes)
        if off and n_slots < 1:
            raise ValueError(f"window of {window_bytes} bytes cannot hold the largest offloaded unit "
                             f"({max(sizes)} bytes)")
        groups = stream_groups(sizes, max(sizes), self.keys) if off else None
        if groups is not None:
            n_slots = min(n_slots, len(groups))
        step, stall = simulate_core(self.ct, tt, link, off, n_slots, steps, groups)
        compute_s = sum(self.ct)
        floor = max([compute_s] + list(per_link_s.values()))
        if step < floor:
            step = floor
        return {"step_s": step, "compute_s": compute_s, "stall_s": step - compute_s if step > compute_s else 0.0,
                "overhead_s": step - compute_s, "floor_s": floor, "per_link_bytes": per_link_bytes,
                "per_link_s": per_link_s, "n_slots": n_slots, "offloaded_bytes": sum(sizes)}


def simulate(units_in_order: list[Unit], homes: dict[str, str], compute: str, inventory: Inventory,
             window_bytes: int, steps: int = DEFAULT_STEPS, streamed: dict[str, int] | None = None) -> dict:
    """Predict one steady-state step.  homes: unit name -> home device (missing = compute); streamed:
    unit name -> its bytes as streamed, when not `Unit.bytes` (compressed weights, Plan.codec): what its
    copy moves and its share of a slot.  Returns dict(step_s, compute_s, stall_s, overhead_s, floor_s,
    per_link_bytes, per_link_s, n_slots, offloaded_bytes), bytes as streamed."""
    return StepModel(units_in_order, homes, compute, inventory, streamed).run(window_bytes, steps)


WINDOW_GAIN = 0.01     # best_window takes the fewest slots within 1 % of the best step


def best_window(plan: Plan, times: dict, rates: dict, step_s: float, *, unit_bytes: int, current: int, limit: int,
                gap_s: float = 0.0) -> tuple[int, dict]:
    """The runtime's autotune policy: the slot count for `plan` from measured times.

    times: unit name -> measured compute seconds per step (ROOT gets the rest of `step_s`); rates:
    home device -> measured bytes/s of its link to the compute device; unit_bytes: one slot's share of
    the window (the largest streamed unit); current: the slots the ring has; limit: the most it may get
    (memory, MAX_SLOTS, ring items).  Units in `plan.codec` move their bytes as streamed (the measured
times include their decoding).  Simulates every count from 1 to max(limit, current), adds `gap_s`
    (the measured GPU time between steps, which no slot count buys back: no copy is issued while the host
    is away) to each, and returns (k, {count: predicted step seconds}): the fewest slots, never fewer than
    `current`, within WINDOW_GAIN of the best."""
    placed = sorted(plan.units, key=lambda u: u.order)
    root_t = max(0.0, step_s - sum(times.values()))
    codec = getattr(plan, "codec", None) or {}      # units streamed compressed: their bytes as streamed
    units = [Unit(u.name, u.type, param_bytes=int(codec.get(u.name, u.bytes)), kind=u.kind,
                  time_s=root_t if u.name == ROOT else times.get(u.name, 0.0)) for u in placed]
    homes = {u.name: u.device for u in placed}
    inv = Inventory(source="measured")
    for src, r in rates.items():
        inv.links[(src, plan.compute)] = r
    pred = {k: simulate(units, homes, plan.compute, inv, k * unit_bytes)["step_s"] + gap_s
            for k in range(1, max(limit, current) + 1)}
    best = min(pred[k] for k in pred if k >= current)
    k = min(k for k in pred if k >= current and pred[k] <= best * (1 + WINDOW_GAIN))
    return k, pred
