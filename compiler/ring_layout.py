"""Ring geometry: how the offloaded units of a step travel through a ring of equal slots.

One module, read by everything that predicts or executes the ring -- the cost simulation
(compiler/cost.py), the schedule and verify passes and the runtime (runtime/ring.py) -- so that
prediction and execution cannot drift apart.

    MAX_SLOTS, DEFAULT_SLOTS        the most slots a ring holds; the slots when nothing says otherwise
    ALIGN, align(n)                 homes sit in their host arena at ALIGN-byte boundaries
    n_slots_for(window, sizes)      slots a window holds
    stream_groups(sizes, slot, keys)  consecutive units packed into ring items (one copy, one slot)
    item_keys(homes, orders)        keys for stream_groups: same home, run back to back
    slot_gates(m, n_slots)          after which item each item's copy is issued

The ring: the offloaded units form a periodic sequence packed into ring ITEMS; item g (counting across
steps) runs from slot g % n_slots, and its copy is issued when item g - n_slots has computed.  For the
first items of a step that item belongs to the previous step: prefetch wraps across the step boundary.
"""
from __future__ import annotations

__all__ = ["MAX_SLOTS", "DEFAULT_SLOTS", "ALIGN", "align", "n_slots_for", "slot_gates", "stream_groups",
           "item_keys"]

MAX_SLOTS = 8    # the most slots a ring holds: the planner's window and the runtime's autotune stay within it
DEFAULT_SLOTS = 2  # the planner's smallest default window; the runtime's ring when the plan names no window
ALIGN = 256      # bytes; keeps every view aligned for any dtype and for vectorised kernels


def align(n: int, a: int = ALIGN) -> int:
    """n rounded up to a multiple of `a`."""
    return (n + a - 1) // a * a


def n_slots_for(window_bytes: int, offloaded_sizes: list[int]) -> int:
    """Slots a window of `window_bytes` holds: equal slots the size of the largest offloaded unit."""
    if not offloaded_sizes:
        return 0
    big = max(offloaded_sizes)
    if big <= 0:
        return len(offloaded_sizes)
    return min(len(offloaded_sizes), int(window_bytes // big))


def slot_gates(m: int, n_slots: int) -> list[tuple[int, int]]:
    """Ring of n_slots slots over the periodic sequence of the m offloaded units of a step: item
    g = step * m + k runs from slot g % n_slots, and its copy is issued right after item g - n_slots
    has computed.  Returns, per k, that trigger as (step offset, k'): offset -1 = the previous step
    (prefetch wrapping across the step boundary).  Triggers are increasing in k, so copies are issued
    in execution order."""
    if m == 0:
        return []
    n = max(1, min(n_slots, m))
    return [(0, k - n) if k >= n else (-1, k - n + m) for k in range(m)]


def stream_groups(sizes: list[int], slot_bytes: int, keys: list | None = None) -> list[list[int]]:
    """Pack consecutive streamed units (positions 0..m-1 in call order) into ring items: a unit joins the
    previous one's item while the item's bytes (each unit's home aligned to ALIGN) stay within
    `slot_bytes` and `keys` (the home device) match.  The runtime (runtime/ring.py) and the cost model
    (compiler/cost.simulate) both use this, so the ring holds items of about one slot each: small units
    (embedders, a final norm) travel together instead of taking a slot, and so a share of the ring's
    look-ahead, each.  Returns [[positions]]."""
    groups: list[list[int]] = []
    used = 0
    for k, b in enumerate(sizes):
        if groups and used + b <= slot_bytes and (keys is None or keys[k] == keys[groups[-1][-1]]):
            groups[-1].append(k)
            used = align(used + b)
        else:
            groups.append([k])
            used = align(b)
    return groups


def item_keys(homes: list, orders: list[int]) -> list:
    """Keys for stream_groups: units may share a ring item only when they come from the same home and
    run back to back (no unit kept on the compute device runs between them: its compute would sit
    between the item's units while the item holds the slot and its copy delays the first of them)."""
    keys, run = [], 0
    for k, (h, o) in enumerate(zip(homes, orders)):
        if k and o != orders[k - 1] + 1:
            run += 1
        keys.append((h, run))
    return keys
