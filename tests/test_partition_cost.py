"""Cost model (compiler/cost.py): unit compute and transfer times, the step simulation, the ring's gates."""
import pytest

from distorch.compiler.cost import (COPY_FIXED_S, FALLBACK_FLOPS_PER_BYTE, simulate, slot_gates, unit_compute_s,
                                    unit_transfer_s)
from distorch.compiler.graph import ModuleGraph, Unit
from distorch.compiler.inventory import declare

from partition_graphs import INV, check_invariants


# --- cost model ----------------------------------------------------------------------------------

def test_compute_time_precedence():
    inv = declare("cuda:0=8GiB@100TFLOPS,cpu=8GiB")
    u = Unit("b", "B", param_bytes=1000)
    assert unit_compute_s(u, "cuda:0", inv) == pytest.approx(1000 * FALLBACK_FLOPS_PER_BYTE / 100e12)
    u.flops = 5e12
    u.calls = 2
    assert unit_compute_s(u, "cuda:0", inv) == pytest.approx(0.1)
    u.time_s = 0.003
    assert unit_compute_s(u, "cuda:0", inv) == 0.003


def test_transfer_time():
    inv = declare("cuda:0=8GiB,cpu=8GiB;cpu>cuda:0=10GB/s")
    assert unit_transfer_s(10**9, "cpu", "cuda:0", inv) == pytest.approx(0.1 + COPY_FIXED_S)
    assert unit_transfer_s(10**9, "cuda:0", "cuda:0", inv) == 0.0


def _uniform(n, t_compute):
    return ModuleGraph([Unit(f"blocks.{i}", "B", param_bytes=10**9, time_s=t_compute) for i in range(n)])


def test_simulate_resident_equals_compute():
    g = _uniform(10, 0.01)
    r = simulate(g.units, {}, "cuda:0", INV, 0)
    assert r["step_s"] == pytest.approx(0.1) and r["overhead_s"] == pytest.approx(0.0)


def test_simulate_link_bound_reaches_floor():
    inv = declare("cuda:0=80GiB,cpu=80GiB;cpu>cuda:0=10GB/s")
    g = _uniform(10, 0.001)
    h = {u.name: "cpu" for u in g.units}
    r = simulate(g.units, h, "cuda:0", inv, 2 * 10**9)
    link_s = 10 * (0.1 + COPY_FIXED_S)
    assert r["step_s"] >= link_s
    assert r["step_s"] == pytest.approx(link_s, rel=0.02)
    assert r["per_link_bytes"] == {"cpu>cuda:0": 10 * 10**9}


def test_simulate_prefetch_wraps_step_boundary():
    # one offloaded unit at the very start; its copy (0.05 s) hides behind the previous step's compute
    inv = declare("cuda:0=80GiB,cpu=80GiB;cpu>cuda:0=20GB/s")
    g = _uniform(10, 0.01)
    h = {"blocks.0": "cpu"}
    r = simulate(g.units, h, "cuda:0", inv, 10**9)
    assert r["step_s"] == pytest.approx(0.1)
    # ... and with one step only (cold start) the copy is exposed
    r1 = simulate(g.units, h, "cuda:0", inv, 10**9, steps=1)
    assert r1["step_s"] > 0.1


def test_simulate_window_size_matters():
    inv = declare("cuda:0=80GiB,cpu=80GiB;cpu>cuda:0=20GB/s")
    g = _uniform(12, 0.03)  # copy 0.05 s > one unit's compute: needs two units of compute to hide
    h = {f"blocks.{i}": "cpu" for i in range(0, 12, 2)}
    one = simulate(g.units, h, "cuda:0", inv, 10**9)["step_s"]
    two = simulate(g.units, h, "cuda:0", inv, 2 * 10**9)["step_s"]
    assert two < one
    assert two == pytest.approx(0.36)


def test_slot_gates_monotone_and_wrap():
    for m in range(1, 12):
        for n in range(1, 5):
            gs = slot_gates(m, n)
            assert gs == sorted(gs)
            for k, (ds, g) in enumerate(gs):
                assert (ds, g) < (0, k)   # issued before the unit itself is used
                # ring: the trigger is the item min(n, m) places earlier in the periodic sequence
                assert (ds * m + g) == k - min(n, m)


def test_simulate_window_too_small():
    g = _uniform(4, 0.01)
    with pytest.raises(ValueError):
        simulate(g.units, {"blocks.0": "cpu"}, "cuda:0", INV, 10)


def test_simulate_ring_items_small_units_do_not_eat_look_ahead():
    """Flux-like step: 8 tiny units, 4 big units whose copies outlast their compute, 8 units the reverse.
    One item per unit: the ring's look-ahead at the step boundary is spent on the tiny units, the big
    ones stall.  Packed into items (compiler.cost.stream_groups), the same window runs at the link floor."""
    from distorch.compiler.cost import simulate_core, stream_groups
    ct = [0.0] * 8 + [3.0] * 4 + [3.2] * 8
    tt = [0.1] * 8 + [6.7] * 4 + [2.8] * 8
    sizes = [10] * 8 + [2_000_000] * 4 + [800_000] * 8
    off = list(range(20))
    link = ["cpu"] * 20
    floor = sum(tt)
    groups = stream_groups(sizes, max(sizes))
    assert groups[0] == list(range(8)) and len(groups) == 1 + 4 + 4
    single, _ = simulate_core(ct, tt, link, off, 4, steps=4)
    packed, _ = simulate_core(ct, tt, link, off, 4, steps=4, groups=groups)
    assert packed == pytest.approx(floor, rel=1e-9)
    assert single > floor * 1.05
    # one unit per item is the default
    assert simulate_core(ct, tt, link, off, 4, steps=4, groups=[[k] for k in off])[0] == single


def test_least_regret_judges_candidates_in_every_scenario():
    from distorch.passes.budget import least_regret
    # the second is 1 % slower in the first scenario and 10 % faster in the second: it wins
    assert least_regret([[1.0, 2.0], [1.01, 1.8]], 0.001) == 1
    # equal everywhere, or better by less than the tie: the first (the least offload) stays
    assert least_regret([[1.0, 1.0], [1.0, 1.0]], 0.001) == 0
    assert least_regret([[1.0], [0.9995]], 0.001) == 0
    assert least_regret([[1.0], [0.99]], 0.001) == 1
    assert least_regret([[0.0, 0.0]], 0.001) == 0           # nothing offloaded


def test_offload_plan_keeps_its_step_when_compute_runs_faster_than_estimated():
    """Flux-dev (the built-in shape, layers inside the blocks) on an H200-like card at 55 GB/s, 6 and 9 GiB
    off: the estimate alone made 2 slots look as good as more, and in ComfyUI on an H200, where compute ran
    at 0.71x its estimate, the step was 4 % slower than with the best window.  The plan is now judged in
    every compute-time scenario: at 0.7x compute its step is within 1 % of the best any window (each with
    the least offload that fits the budget) gives."""
    import copy
    from distorch.compiler.cost import simulate, unit_compute_s
    from distorch.compiler.files import graph_from_file, leaf_graph_from_file
    from distorch.passes.granularity import sub_unit_graph
    from distorch.passes.partition import partition
    inv = declare("cuda:0=141GiB,cpu=125GiB;cpu>cuda:0=55GB/s")
    g = sub_unit_graph(graph_from_file("flux-dev"), leaf_graph_from_file("flux-dev"))
    fast = []
    for u in g.units:
        v = copy.copy(u)
        v.time_s = unit_compute_s(u, "cuda:0", inv) * 0.7
        fast.append(v)

    def at_fast(plan):
        homes = {u.name: u.device for u in plan.units if u.device != "cuda:0"}
        return simulate(fast, homes, "cuda:0", inv, plan.window_bytes)["step_s"]
    slot = max(u.bytes for u in g.units) + (64 << 10)
    for off in (6, 9):
        plan = partition(g, inv, "cuda:0", offload_gb=off)
        check_invariants(plan, g, inv)
        best = min(at_fast(partition(g, inv, "cuda:0", offload_gb=off, window_bytes=k * slot)) for k in range(1, 9))
        assert at_fast(plan) <= best * 1.01, (off, plan.predicted["n_slots"])
        assert plan.predicted["n_slots"] >= 3
