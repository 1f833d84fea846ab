"""Schedule and verify passes: the ring's items, slots and ops of a partitioned plan, and the broken
plans and schedules verify must catch."""
import copy

import pytest

from distorch.compiler.cost import item_keys, stream_groups
from distorch.compiler.graph import ModuleGraph, Unit
from distorch.compiler.inventory import declare
from distorch.passes.partition import partition
from distorch.passes.schedule import schedule
from distorch.passes.verify import PlanVerificationError, check, verify

from partition_graphs import GiB, INV, MiB, check_invariants, flux_like


# --- schedule / verify ----------------------------------------------------------------------------

def test_schedule_shape():
    g = flux_like()
    p = partition(g, INV, "cuda:0", offload_gb=5)
    s = schedule(p, g)
    off = p.offloaded()
    assert [ld.unit for ld in s.loads] == [u.name for u in off]
    assert s.n_slots == p.predicted["n_slots"] >= 1
    assert s.slot_bytes == max(u.bytes for u in off)
    # items: the greedy packing of compiler.cost.stream_groups, consecutive offloaded units, each once
    groups = stream_groups([u.bytes for u in off], s.slot_bytes, item_keys([u.device for u in off], [u.order for u in off]))
    assert s.items == [[off[k].name for k in grp] for grp in groups]
    assert [n for it in s.items for n in it] == [u.name for u in off]
    n_items = len(s.items)
    assert 1 <= s.n_slots <= n_items
    assert s.prologue == s.items[:s.n_slots]
    for k, ld in enumerate(s.loads):
        q = ld.item
        it = s.items[q]
        assert ld.unit in it
        j = it.index(ld.unit)
        assert ld.item_offset == sum((x.bytes + 255) // 256 * 256 for x in s.loads[k - j:k])
        assert ld.slot == q % s.n_slots and ld.slot_offset == ld.slot * s.slot_bytes + ld.item_offset
        assert s.slot_for(k, 1) == s.item_slot(q, 1) == (n_items + q) % s.n_slots
        # issued after the last unit of the item n_slots earlier in the ring (previous call for the first ones)
        assert ld.issue_after == s.items[(q - s.n_slots) % n_items][-1]
        assert ld.next_step == (q < s.n_slots)
        assert ld.release_after == it[-1]
    for q in range(n_items):
        assert s.item_bytes(q) <= s.slot_bytes
    computes = [o["unit"] for o in s.ops if o["op"] == "compute"]
    assert computes == [u.name for u in g.units]
    loads = [o for o in s.ops if o["op"] == "load"]
    assert sorted(o["item"] for o in loads) == list(range(n_items))
    for o in loads:
        assert o["units"] == s.items[o["item"]] and o["unit"] == o["units"][0]
        assert o["bytes"] == s.item_bytes(o["item"])
    assert [(o["unit"], o["item"]) for o in s.ops if o["op"] == "wait"] == [(it[0], q) for q, it in enumerate(s.items)]
    assert [(o["unit"], o["item"]) for o in s.ops if o["op"] == "release"] == \
        [(it[-1], q) for q, it in enumerate(s.items)]


def _tiny_head_graph():
    """Flux-like: 6 embedders of a few KB ahead of 8 big blocks and a small final layer."""
    us = [Unit(f"embed.{i}", "Linear", param_bytes=3000 + 517 * i, kind="leaf") for i in range(6)]
    us += [Unit(f"blocks.{i}", "Block", param_bytes=400 * MiB, time_s=0.01) for i in range(8)]
    us += [Unit("final_layer", "LastLayer", param_bytes=5000, kind="leaf")]
    return ModuleGraph(us, source="tiny-head")


@pytest.mark.parametrize("slots", [2, 3, 4, 8, 12])
def test_schedule_packs_tiny_units_into_one_item(slots):
    g = _tiny_head_graph()
    inv = declare("cuda:0=24GiB,cpu=64GiB")
    p = partition(g, inv, "cuda:0", offload_gb=g.total_bytes / GiB + 1, window_bytes=slots * 400 * MiB)
    off = p.offloaded()
    assert len(off) == 15
    s = schedule(p, g)
    groups = stream_groups([u.bytes for u in off], max(u.bytes for u in off), item_keys([u.device for u in off], [u.order for u in off]))
    assert s.items == [[off[k].name for k in grp] for grp in groups]
    assert s.items[0] == [f"embed.{i}" for i in range(6)]          # all tiny units: one item, one copy
    assert s.items[1:] == [[f"blocks.{i}"] for i in range(8)] + [["final_layer"]]   # blocks fill a slot each
    assert s.n_slots == p.predicted["n_slots"] == min(slots, len(s.items))
    first = [ld for ld in s.loads if ld.item == 0]
    assert [ld.item_offset for ld in first] == [0, 3072, 6656, 10752, 15360, 20480]   # 256-aligned
    assert len([o for o in s.ops if o["op"] == "load"]) == len(s.items)
    assert sum(o["op"] == "wait" for o in s.ops) == len(s.items)
    verify(p, s)
    check_invariants(p, g, inv)


def test_verify_catches_broken_plans():
    g = flux_like()
    p = partition(g, INV, "cuda:0", offload_gb=5)
    s = schedule(p, g)
    assert check(p, s) == []
    assert len(s.items) > s.n_slots            # some loads are same-step loads
    bad = copy.deepcopy(s)
    bad.ops = [o for o in bad.ops if not (o["op"] == "load" and o["item"] == len(s.items) - 1)]
    assert any("used before" in e or "loaded 0 times" in e for e in check(p, bad))
    bad = copy.deepcopy(s)
    bad.n_slots = s.n_slots + 5
    assert any("window exceeded" in e for e in check(p, bad))
    bad = copy.deepcopy(s)                  # a copy issued too early: into a slot still in use
    i = next(j for j, o in enumerate(bad.ops) if o["op"] == "load" and not o["next_step"])
    op = bad.ops.pop(i)
    bad.ops.insert(0, op)
    assert any("still holds" in e for e in check(p, bad))
    bad = copy.deepcopy(s)                  # a slot never released
    bad.ops = [o for o in bad.ops if not (o["op"] == "release" and o["item"] == 0)]
    assert any("still holds" in e or "never released" in e for e in check(p, bad))
    # a slot released after the first unit of a multi-unit item (everything offloaded: the leaves and
    # single blocks share items; at 5 GiB the offloaded units are spread between resident ones, which
    # never share an item)
    pa = partition(g, INV, "cuda:0", offload_gb=1000)
    sa = schedule(pa, g)
    assert check(pa, sa) == []
    assert all(len(it) == 1 for it in s.items)
    bad = copy.deepcopy(sa)
    q = next(q for q, it in enumerate(sa.items) if len(it) > 1)
    i = next(j for j, o in enumerate(bad.ops) if o["op"] == "release" and o["item"] == q)
    op = bad.ops.pop(i)
    c = next(j for j, o in enumerate(bad.ops) if o["op"] == "compute" and o["unit"] == sa.items[q][0])
    bad.ops.insert(c + 1, op)
    assert any(f"released before {sa.items[q][1]} computed" in e for e in check(pa, bad))
    bad = copy.deepcopy(s)                  # an item's wait dropped: its first unit computes on an unfinished copy
    bad.ops = [o for o in bad.ops if not (o["op"] == "wait" and o["item"] == 2)]
    assert any("before waiting" in e for e in check(p, bad))
    badp = copy.deepcopy(p)
    badp.devices["cuda:0"]["bytes"] += 1
    assert any("add up" in e for e in check(badp, s))
    badp = copy.deepcopy(p)
    badp.window_bytes = 100 * GiB
    bs = copy.deepcopy(s)
    bs.window_bytes = badp.window_bytes
    assert any("free" in e for e in check(badp, bs))
    with pytest.raises(PlanVerificationError):
        verify(badp, bs)


def test_verify_catches_broken_items():
    g = _tiny_head_graph()
    inv = declare("cuda:0=24GiB,cpu=64GiB")
    p = partition(g, inv, "cuda:0", offload_gb=g.total_bytes / GiB + 1, window_bytes=3 * 400 * MiB)
    s = schedule(p, g)
    assert check(p, s) == [] and len(s.items[0]) == 6
    bad = copy.deepcopy(s)                  # an item that overflows its slot: a block joins the embedders
    bad.items[0] = bad.items[0] + bad.items.pop(1)
    assert any("does not fit a slot" in e for e in check(p, bad))
    bad = copy.deepcopy(s)                  # units overlapping inside the slot
    bad.loads[1].item_offset = 0
    bad.loads[1].slot_offset = bad.loads[1].slot * s.slot_bytes
    assert any("offset" in e for e in check(p, bad))
    bad = copy.deepcopy(s)                  # a unit left out of every item
    bad.items[0] = bad.items[0][1:]
    assert any("no ring item" in e for e in check(p, bad))
    bad = copy.deepcopy(s)                  # an empty item
    bad.items[1:1] = [[]]
    assert any("empty ring item" in e for e in check(p, bad))
    bad = copy.deepcopy(s)                  # items split without their loads: the loads point at other items
    bad.items[0:1] = [s.items[0][:3], s.items[0][3:]]
    assert any("expected item 1 at 0" in e for e in check(p, bad))
    bad = copy.deepcopy(s)                  # a wrong slot recorded for a unit
    bad.loads[7].slot = (bad.loads[7].slot + 1) % s.n_slots
    assert any("uses slot" in e for e in check(p, bad))
