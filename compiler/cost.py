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
copy per unit, its weights gathered in one flat pinned buffer).

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
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .graph import ROOT, Unit
from .inventory import Inventory
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


def simulate(units_in_order: list[Unit], homes: dict[str, str], compute: str, inventory: Inventory,
             window_bytes: int, steps: int = DEFAULT_STEPS) -> dict:
    """Predict one steady-state step.  homes: unit name -> home device (missing = compute).
    Returns dict(step_s, compute_s, stall_s, overhead_s, floor_s, per_link_bytes, per_link_s, n_slots,
    offloaded_bytes)."""
    ct, tt, link, off, sizes = [], [], [], [], []
    per_link_bytes: dict[str, int] = {}
    per_link_s: dict[str, float] = {}
    pinned_seen = 0
    for i, u in enumerate(units_in_order):
        ct.append(unit_compute_s(u, compute, inventory))
        h = homes.get(u.name, compute)
        if h != compute:
            key = f"{h}>{compute}"
            pageable = False
            if h == "cpu" and getattr(inventory, "pinned_limit", None) is not None:
                pinned_seen += u.bytes      # homes pin in execution order; past the cap they stay pageable
                pageable = pinned_seen > inventory.pinned_limit
            t = unit_transfer_s(u.bytes, h, compute, inventory, pageable=pageable)
            tt.append(t)
            link.append(key)
            off.append(i)
            sizes.append(u.bytes)
            per_link_bytes[key] = per_link_bytes.get(key, 0) + u.bytes
            per_link_s[key] = per_link_s.get(key, 0.0) + t
        else:
            tt.append(0.0)
            link.append(None)
    n_slots = n_slots_for(window_bytes, sizes)
    if off and n_slots < 1:
        raise ValueError(f"window of {window_bytes} bytes cannot hold the largest offloaded unit "
                         f"({max(sizes)} bytes)")
    groups = stream_groups(sizes, max(sizes), item_keys([link[i] for i in off], off)) if off else None
    if groups is not None:
        n_slots = min(n_slots, len(groups))
    step, stall = simulate_core(ct, tt, link, off, n_slots, steps, groups)
    compute_s = sum(ct)
    floor = max([compute_s] + list(per_link_s.values()))
    if step < floor:
        step = floor
    return {"step_s": step, "compute_s": compute_s, "stall_s": step - compute_s if step > compute_s else 0.0,
            "overhead_s": step - compute_s, "floor_s": floor, "per_link_bytes": per_link_bytes,
            "per_link_s": per_link_s, "n_slots": n_slots, "offloaded_bytes": sum(sizes)}


WINDOW_GAIN = 0.01     # best_window takes the fewest slots within 1 % of the best step


def best_window(plan: Plan, times: dict, rates: dict, step_s: float, *, unit_bytes: int, current: int, limit: int,
                gap_s: float = 0.0) -> tuple[int, dict]:
    """The runtime's autotune policy: the slot count for `plan` from measured times.

    times: unit name -> measured compute seconds per step (ROOT gets the rest of `step_s`); rates:
    home device -> measured bytes/s of its link to the compute device; unit_bytes: one slot's share of
    the window (the largest streamed unit); current: the slots the ring has; limit: the most it may get
    (memory, MAX_SLOTS, ring items).  Simulates every count from 1 to max(limit, current), adds `gap_s`
    (the measured GPU time between steps, which no slot count buys back: no copy is issued while the host
    is away) to each, and returns (k, {count: predicted step seconds}): the fewest slots, never fewer than
    `current`, within WINDOW_GAIN of the best."""
    placed = sorted(plan.units, key=lambda u: u.order)
    root_t = max(0.0, step_s - sum(times.values()))
    units = [Unit(u.name, u.type, param_bytes=u.bytes, kind=u.kind,
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
