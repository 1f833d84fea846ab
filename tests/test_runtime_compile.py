"""distorch.compile() and loading on CPU: a given plan and the handle it returns, weights loaded from a
safetensors file straight into their homes (and missing keys reported), compile() planning by trace and
partition, the expert string and measured feedback, and the failing pass named.  The toy model:
tests/runtime_toys.py."""
from __future__ import annotations

import os

import pytest
import torch

from distorch.errors import DisTorchError

import runtime_fixtures
from runtime_toys import ToyDiT, make_plan, nbytes, run

toy = runtime_fixtures.toy              # the shared fixture (tests/runtime_fixtures.py): pytest finds it here


# --------------------------------------------------------------------------------- api / loading
def test_compile_with_plan_and_handle(toy):
    import distorch
    m, args, ref = toy
    h = distorch.compile(m, plan=make_plan(m, {"blocks.2", "blocks.3"}), profile=True, progress=False)
    assert torch.equal(run(m, args, 2)[-1], ref)
    assert h.stats["streamed_units"] == 2
    assert h.timeline()
    assert "blocks.2" in h.placement_table()
    h.undo()
    assert torch.equal(m(*args), ref)
    with pytest.raises(DisTorchError):
        distorch.compile(m, plan="not a plan")


def test_load_into_homes_from_safetensors(toy, tmp_path):
    from safetensors.torch import save_file
    from distorch.runtime.loading import load_into
    m, args, ref = toy
    path = os.path.join(tmp_path, "toy.safetensors")
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, path)
    with torch.device("meta"):
        fresh = ToyDiT().eval()
    plan = make_plan(fresh, {"blocks.0", "blocks.3", "blocks.4"})
    rt = load_into(fresh, path, plan, progress=False)
    try:
        assert all(not p.is_meta for p in fresh.parameters())
        # streamed params were read straight into their homes: apply adopted them without copying
        for n in ("blocks.0", "blocks.3"):
            assert rt.homes[n].flat is not None
        for out in run(fresh, args, 3):
            assert torch.equal(out, ref)
    finally:
        rt.undo()
    assert torch.equal(fresh(*args), ref)


def test_load_into_reports_missing_keys(toy, tmp_path):
    from safetensors.torch import save_file
    from distorch.runtime.loading import load_into
    m, args, ref = toy
    sd = {k: v.contiguous() for k, v in m.state_dict().items() if not k.startswith("blocks.2.")}
    path = os.path.join(tmp_path, "partial.safetensors")
    save_file(sd, path)
    with torch.device("meta"):
        fresh = ToyDiT().eval()
    with pytest.raises(DisTorchError, match="blocks.2"):
        load_into(fresh, path, make_plan(fresh, {"blocks.0"}), progress=False)


# ------------------------------------------------------------------- compile(): trace + partition
def test_compile_plans_with_trace_and_partition(toy):
    import distorch
    m, args, ref = toy
    half = nbytes(m) / 2 / 2**30
    h = distorch.compile(m, compute="cpu", offload_gb=half, donors=["cpu"], example_args=args, progress=False)
    try:
        assert h.plan.compute == "cpu:0" and h.plan.offloaded_bytes() >= nbytes(m) / 2
        assert h.graph is not None and len(h.graph) >= 6
        for out in run(m, args, 3):
            assert torch.equal(out, ref)
        s = h.stats
        assert s["streamed_units"] >= 3 and s["deviations"] == 0
        assert s["predicted_step_s"] and s["measured_step_s"]
    finally:
        h.undo()
    assert torch.equal(m(*args), ref)


def test_compile_expert_string_and_feedback(toy):
    import distorch
    from distorch.passes.partition import partition
    from distorch.runtime.api import inventory_for
    m, args, ref = toy
    h = distorch.compile(m, compute="cpu", expert="cpu:0,40%;cpu,60%", example_args=args, profile=True,
                         progress=False)
    try:
        off = h.plan.offloaded_bytes() / h.plan.model_bytes
        assert 0.5 <= off <= 0.75
        run(m, args, 2)
        assert h.feedback() >= 6          # measured unit times written into the graph
        assert all(u.time_s and u.time_s > 0 for u in h.graph.units if u.name.startswith("blocks."))
        plan2 = partition(h.graph, inventory_for("cpu:0", ["cpu"]), "cpu:0", offload_gb=0.6 * nbytes(m) / 2**30)
        assert plan2.predicted["step_s"] > 0
    finally:
        h.undo()
    with pytest.raises(DisTorchError, match="compute"):
        distorch.compile(m, compute="tpu:3")


def test_compile_names_the_failing_pass_and_the_ones_before_it(toy):
    import distorch
    from distorch.errors import PartitionError
    m, args, ref = toy
    with pytest.raises(PartitionError, match=r"^partition pass failed \(passes run before it: trace\): .*tpu:9"):
        distorch.compile(m, compute="cpu", donors=["tpu:9"], offload_gb=0.0001, example_args=args, progress=False)
    assert getattr(m, "_distorch_runtime", None) is None and torch.equal(m(*args), ref)   # nothing changed
