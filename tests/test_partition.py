"""Partition pass: virtual_vram_gb budgets, expert strings and their round trip, donors, errors, ranking;
invariants on hand-built and random graphs.  The cost model: tests/test_partition_cost.py; schedule and
verify: tests/test_partition_schedule.py."""
import random

import pytest

from distorch.compiler.cost import simulate
from distorch.compiler.graph import ModuleGraph, Unit, ROOT
from distorch.compiler.inventory import declare
from distorch.errors import DisTorchError, PartitionError
from distorch.passes.partition import partition
from distorch.passes.rank import priority_order

from partition_graphs import GiB, INV, MiB, check_invariants, flux_like


def random_graph(rng: random.Random) -> ModuleGraph:
    us = [Unit("embed", "Embed", param_bytes=rng.randint(1, 50) * MiB, kind="leaf")]
    for i in range(rng.randint(3, 40)):
        t = rng.choice(["A", "B", "C"])
        u = Unit(f"blocks.{i}", t, param_bytes=rng.randint(1, 900) * MiB + rng.randint(0, 4095),
                 buffer_bytes=rng.choice([0, 0, rng.randint(1, 10000)]))
        if rng.random() < 0.5:
            u.flops = rng.uniform(0.2, 3.0) * u.bytes * 4096
        if rng.random() < 0.1:
            u.time_s = rng.uniform(1e-4, 2e-2)
        us.append(u)
    us.append(Unit("head", "Head", param_bytes=rng.randint(0, 40) * MiB, kind="leaf"))
    if rng.random() < 0.5:
        us.append(Unit(ROOT, "Root", param_bytes=rng.randint(1, 5) * MiB, kind="root"))
    return ModuleGraph(us, source="random")


def homes(plan):
    return {u.name: u.device for u in plan.units}


# --- partition: virtual_vram_gb ---------------------------------------------------------------

@pytest.mark.parametrize("vram", [0, 0.5, 1, 2.5, 4, 7.3, 10, 12])
def test_vram_invariants(vram):
    g = flux_like()
    p = partition(g, INV, "cuda:0", offload_gb=vram, donors=["cpu"])
    check_invariants(p, g, INV)
    req = min(int(vram * GiB), g.total_bytes)
    off = p.offloaded()
    got = sum(u.bytes for u in off)
    assert got >= req
    if off:
        # the model holds at most model - offload on the compute device, its slots included
        assert p.predicted["compute_peak_bytes"] <= g.total_bytes - req or req >= g.total_bytes
    else:
        assert req == 0 and p.window_bytes == 0
    assert all(u.device == "cpu" for u in off)


def test_vram_at_least_model_offloads_everything():
    g = flux_like()
    p = partition(g, INV, "cuda:0", offload_gb=g.total_bytes / GiB + 5)
    assert all(u.device == "cpu" for u in p.units)
    check_invariants(p, g, INV)


def test_larger_budget_offloads_a_superset():
    g = flux_like(flops=True)
    prev = set()
    for v in [0.3, 1, 2, 3, 5, 8, 11]:
        cur = {u.name for u in partition(g, INV, "cuda:0", offload_gb=v).offloaded()}
        assert prev <= cur
        prev = cur


def test_root_and_end_leaves_stay_resident_unless_needed():
    g = flux_like()
    p = partition(g, INV, "cuda:0", offload_gb=5)
    for name in ("img_in", "time_in", "final_layer", ROOT):
        assert p.home(name) == "cuda:0"
    order = priority_order(g, INV, "cuda:0")
    assert set(order[-4:]) == {"img_in", "time_in", "final_layer", ROOT}


def test_offloaded_units_spread_when_cost_model_says_so():
    # 24 equal blocks; each copy takes 1.5x one block's compute: two contiguous offloaded units cannot
    # both hide, spread ones can
    inv = declare("cuda:0=80GiB,cpu=80GiB;cpu>cuda:0=10GB/s")
    g = ModuleGraph([Unit(f"blocks.{i}", "B", param_bytes=10**9, time_s=0.0667) for i in range(24)])
    # 16 GB resident + 2 slots of 1 GB (+ runtime buffers): 8 blocks offloaded
    p = partition(g, inv, "cuda:0", max_vram_gb=(18 * 10**9 + (4 << 20)) / GiB)
    idx = [u.order for u in p.offloaded()]
    assert 7 <= len(idx) <= 8       # one slot hides these copies already: 7 may do
    assert all(b - a > 1 for a, b in zip(idx, idx[1:])), idx   # never two offloaded neighbours
    assert idx[0] + 24 - idx[-1] > 1                          # not across the step boundary either
    contiguous = {f"blocks.{i}": "cpu" for i in range(8)}
    worse = simulate(g.units, contiguous, "cuda:0", inv, p.window_bytes)["step_s"]
    assert p.predicted["step_s"] < worse
    assert p.predicted["step_s"] == pytest.approx(p.predicted["compute_s"], rel=1e-6)


def test_multiple_donors_fastest_first_within_free():
    inv = declare("cuda:0=24GiB,cuda:1=16GiB/3GiB,cpu=64GiB;cuda:1<>cuda:0=100GB/s")
    g = flux_like()
    p = partition(g, inv, "cuda:0", offload_gb=8, donors=["cpu", "cuda:1"])
    check_invariants(p, g, inv)
    on1 = p.devices["cuda:1"]["bytes"]
    assert 0 < on1 <= 3 * GiB
    assert p.devices["cpu"]["bytes"] > 0
    # cuda:1 was filled before cpu: no offloaded unit on cpu would have fitted in cuda:1's remaining room
    room = 3 * GiB - on1
    assert all(u.bytes > room for u in p.offloaded() if u.device == "cpu")
    assert p.expert_string.startswith("cuda:0,")
    assert p.expert_string.index("cuda:1") < p.expert_string.index("cpu")


# --- round trip -----------------------------------------------------------------------------------

def test_round_trip_random_graphs_and_budgets():
    rng = random.Random(1234)
    for trial in range(60):
        g = random_graph(rng)
        model = g.total_bytes
        inv = declare(f"cuda:0={rng.choice([8, 12, 24, 80])}GiB,cuda:1=24GiB,cpu=128GiB;"
                      f"cuda:1<>cuda:0={rng.choice([25, 50, 400])}GB/s")
        donors = rng.choice([["cpu"], ["cuda:1"], ["cuda:1", "cpu"]])
        vram = rng.uniform(0, 1.2) * model / GiB
        try:
            p = partition(g, inv, "cuda:0", offload_gb=vram, donors=donors)
        except PartitionError as e:   # model too big for the card at this budget: a fine answer
            assert "offload" in str(e)
            continue
        check_invariants(p, g, inv)
        assert p.source["expert_string_exact"]
        back = partition(g, inv, "cuda:0", expert=p.expert_string)
        assert homes(back) == homes(p), (trial, p.expert_string)
        assert back.expert_string == p.expert_string
        # 4 decimals unless more were needed, compute device first
        assert p.expert_string.split(";")[0].startswith("cuda:0,")


def test_round_trip_from_expert_inputs():
    rng = random.Random(99)
    done = 0
    for trial in range(60):
        g = random_graph(rng)
        inv = declare("cuda:0=80GiB,cuda:1=24GiB,cpu=128GiB")
        a = rng.randint(0, 100)
        s = rng.choice([f"cuda:0,{a}%;cpu,{100 - a}%", f"cuda:0,{a * 10}mb;cpu,*",
                        f"cuda:0,{a / 1000:.4f};cuda:1,{rng.randint(0, 9) / 10};cpu,0.5"])
        try:
            p = partition(g, inv, "cuda:0", expert=s)
        except PartitionError:
            continue
        check_invariants(p, g, inv)
        back = partition(g, inv, "cuda:0", expert=p.expert_string)
        assert homes(back) == homes(p), (s, p.expert_string)
        done += 1
    assert done > 40


def test_round_trip_string_has_four_decimals():
    g = flux_like()
    p = partition(g, INV, "cuda:0", offload_gb=6)
    for part in p.expert_string.split(";"):
        dev, frac = part.split(",")
        assert len(frac.split(".")[1]) == 4
        assert 0 <= float(frac) <= 1


# --- expert mode ----------------------------------------------------------------------------------

def test_expert_fraction_budgets():
    g = flux_like()
    p = partition(g, INV, "cuda:0", expert="cuda:0,0.2;cpu,0.2")
    check_invariants(p, g, INV)
    assert p.devices["cuda:0"]["bytes"] <= 0.2 * 24 * GiB
    assert p.source["mode"] == "expert"


def test_expert_bytes_star_and_percent():
    g = flux_like()
    p = partition(g, INV, "cuda:0", expert="cuda:0,4gb;cpu,*")
    check_invariants(p, g, INV)
    assert p.devices["cuda:0"]["bytes"] <= 4 * GiB
    assert p.devices["cuda:0"]["bytes"] > 4 * GiB - 650 * MiB
    p = partition(g, INV, "cuda:0", expert="cuda:0,500mb;cuda:1,3.0g;cpu,5gb*")
    check_invariants(p, g, INV)
    assert p.devices["cuda:0"]["bytes"] <= 500 * MiB
    assert p.devices["cuda:1"]["bytes"] <= 3 * GiB + 650 * MiB
    p = partition(g, INV, "cuda:0", expert="cuda:0,8%;cuda:1,8%;cpu,4%")   # 40/40/20
    check_invariants(p, g, INV)
    model = g.total_bytes
    assert p.devices["cuda:0"]["bytes"] <= 0.4 * model + 1
    assert p.devices["cuda:0"]["bytes"] > 0.4 * model - 650 * MiB
    assert p.devices["cpu"]["bytes"] > 0


def test_expert_empty_string_means_not_set():
    g = flux_like()
    a = partition(g, INV, "cuda:0", offload_gb=3, expert="")
    b = partition(g, INV, "cuda:0", offload_gb=3)
    assert homes(a) == homes(b) and a.source["mode"] == "offload"


def test_expert_compute_not_listed_offloads_everything():
    g = flux_like()
    p = partition(g, INV, "cuda:0", expert="cpu,1.0")
    assert p.devices["cuda:0"]["bytes"] == 0


# --- errors ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,needle", [
    (dict(compute="cuda:7"), "cuda:7"),
    (dict(compute="gpu zero"), "gpu zero"),
    (dict(offload_gb=-1), "negative"),
    (dict(offload_gb="lots"), "'lots'"),
    (dict(offload_gb=float("nan")), "finite"),
    (dict(offload_gb=2, donors=["cuda:5"]), "cuda:5"),
    (dict(offload_gb=2, donors=["cuda:0"]), "compute device"),
    (dict(offload_gb=2, donors=["cpu", "cpu"]), "twice"),
    (dict(expert="cuda:0,0.1;cpu,0.01"), "missing"),
    (dict(expert="cuda:0,0.1;cuda:9,0.5"), "cuda:9"),
    (dict(expert="cuda:0,1.5"), "above 1"),
    (dict(expert="cuda:0,1gb*;cpu,*"), "'*'"),
])
def test_errors_name_the_bad_value(kw, needle):
    g = flux_like()
    compute = kw.pop("compute", "cuda:0")
    with pytest.raises(DisTorchError) as ei:
        partition(g, INV, compute, **kw)
    assert needle in str(ei.value)


def test_missing_amount_is_reported():
    g = flux_like()
    with pytest.raises(PartitionError) as ei:
        partition(g, declare("cuda:0=10GiB,cpu=10GiB"), "cuda:0", expert="cuda:0,0.1;cpu,0.1")
    need = g.total_bytes - 2 * GiB
    assert f"{need / GiB:.2f} GiB" in str(ei.value)


def test_donor_without_free_memory():
    inv = declare("cuda:0=24GiB,cpu=64GiB/0GiB")
    with pytest.raises(PartitionError, match="no free memory"):
        partition(flux_like(), inv, "cuda:0", offload_gb=2)


def test_donors_too_small_and_card_too_small():
    g = flux_like()
    with pytest.raises(PartitionError, match="do not fit"):
        partition(g, declare("cuda:0=24GiB,cpu=1GiB"), "cuda:0", offload_gb=5)
    with pytest.raises(PartitionError, match="offload at least"):
        partition(g, declare("cuda:0=4GiB,cpu=64GiB"), "cuda:0", offload_gb=1)


def test_window_argument():
    g = flux_like()
    p = partition(g, INV, "cuda:0", offload_gb=4, window_bytes=3 * 650 * MiB)
    assert p.window_bytes == 3 * 650 * MiB and p.predicted["n_slots"] == 3
    with pytest.raises(PartitionError, match="largest offloaded unit"):
        partition(g, INV, "cuda:0", offload_gb=4, window_bytes=MiB)


def test_expert_byte_amount_larger_than_device_is_named():
    from distorch.compiler.inventory import declare
    from distorch.errors import AllocationError
    from distorch.passes.partition import partition
    g = ModuleGraph([Unit(f"blocks.{i}", "Block", param_bytes=1 << 30) for i in range(4)])
    inv = declare("cuda:0=12GiB,cpu=32GiB")
    with pytest.raises(AllocationError) as ei:
        partition(g, inv, "cuda:0", expert="cuda:0,5tb;cpu,*")
    msg = str(ei.value)
    assert "cuda:0,5tb" in msg and "12.00" in msg
    # the same string with a size the card has is fine
    plan = partition(g, inv, "cuda:0", expert="cuda:0,2gb;cpu,*")
    assert sum(u.bytes for u in plan.units if u.device == "cuda:0") <= 2 << 30


def test_slow_donor_gets_the_best_hiding_units():
    """Two donors under an expert split: which units go to which link.  Filling in execution order puts
    the first (copy-heavy) blocks on the fast link and everything later on the slow one; giving the slow
    link the best-hiding units (the fast one the rest) is never slower in the simulator, and here faster."""
    from distorch.compiler.inventory import declare
    from distorch.passes.donors import _split
    g = flux_like(n_double=8, n_single=16, flops=True)
    for u in g.units:                      # Flux-like compute: double blocks copy longer than they compute
        if u.name.startswith("double"):
            u.flops = u.bytes * 600.0
        elif u.name.startswith("single"):
            u.flops = u.bytes * 3000.0
    inv = declare("cuda:0=80GiB@400TF,cuda:1=80GiB,cpu=256GiB;cuda:1>cuda:0=380GB/s;cpu>cuda:0=50GB/s")
    p = partition(g, inv, "cuda:0", expert="cuda:0,0%;cuda:1,35%;cpu,65%")
    check_invariants(p, g, inv)
    homes = {u.name: u.device for u in p.units}
    off = {n for n, d in homes.items() if d != "cuda:0"}
    by_dev = {d: sum(g[n].bytes for n in off if homes[n] == d) for d in ("cuda:1", "cpu")}
    naive = _split(g, off, [("cuda:1", by_dev["cuda:1"]), ("cpu", 1 << 50)], "test")
    naive_homes = {**homes, **naive}
    # the execution-order fill puts no more on the fast link than the new assignment does
    assert sum(g[n].bytes for n in off if naive_homes[n] == "cuda:1") <= by_dev["cuda:1"]
    new = simulate(g.units, homes, "cuda:0", inv, p.window_bytes)["step_s"]
    old = simulate(g.units, naive_homes, "cuda:0", inv, p.window_bytes)["step_s"]
    assert new < old * 0.97, (new, old)


def test_ranking_is_remembered_for_equal_inputs_only(monkeypatch):
    """The second expert of a workflow (same units, same costs) ranks from the memo; any change ranks again."""
    from distorch.passes import rank
    rank._MEMO.clear()
    calls = []
    real = rank._greedy
    monkeypatch.setattr(rank, "_greedy", lambda *a: calls.append(1) or real(*a))
    g = flux_like(flops=True)
    first = priority_order(g, INV, "cuda:0")
    again = priority_order(flux_like(flops=True), INV, "cuda:0")
    assert again == first and len(calls) == 1
    again.reverse()                      # the caller's list is its own
    assert priority_order(g, INV, "cuda:0") == first and len(calls) == 1
    h = flux_like(flops=True)
    h.units[3].param_bytes += 1 << 20    # another model: ranked again
    priority_order(h, INV, "cuda:0")
    assert len(calls) == 2
    for i in range(rank.MEMO_SIZE + 2):  # bounded
        k = flux_like(flops=True)
        k.units[1].param_bytes += i + 1
        priority_order(k, INV, "cuda:0")
    assert len(rank._MEMO) <= rank.MEMO_SIZE
