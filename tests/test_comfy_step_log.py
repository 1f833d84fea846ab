"""Inside a real ComfyUI (0.3.75, in this process, on CPU): the log after sampling predicts from measured
unit times and calls the host's compute compute, and the sampler's step boundary neither synchronizes
nor invalidates the ring (issue 10, criterion 3).

ComfyUI comes from comfy_harness (skips without it, fails under DISTORCH_REQUIRE_COMFYUI=1).
"""
from __future__ import annotations

import logging

import pytest

from comfy_calls import ksample
from comfy_harness import boot_inprocess
from comfy_models import tiny_mmdit_state

mm, nodes, folder_paths = boot_inprocess()
import safetensors.torch  # noqa: E402

from distorch.comfy_nodes import entry, state  # noqa: E402

from test_step_boundary import forwards, record  # noqa: E402

DEPTH = 6


@pytest.fixture(scope="module")
def unet(tmp_path_factory):
    root = tmp_path_factory.mktemp("comfy_step_log")
    path = root / "tiny_sd3_steps.safetensors"
    safetensors.torch.save_file(tiny_mmdit_state(DEPTH, 3), str(path))
    folder_paths.add_model_folder_path("diffusion_models", str(root))
    return path.name


@pytest.fixture(autouse=True)
def _clean():
    mm.unload_all_models()
    yield
    mm.unload_all_models()


def _distorch(unet, vram_gb=100.0):
    return entry.distorch(nodes.UNETLoader().load_unet(unet, "default")[0], "cpu", vram_gb, "cpu", "", False)


def test_log_after_sampling_on_cpu_says_compute_and_measured_basis(unet, caplog):
    with caplog.at_level(logging.INFO, logger="distorch"):
        m = _distorch(unet)
        st = entry.state_of(m)
        ksample(m, steps=3)
    lines = caplog.text.splitlines()
    table = [ln for ln in lines if "predicted step" in ln and "measured step" not in ln]
    assert table and "[estimated" in table[0] and "overhead" not in table[0]
    assert "compute on cpu:0" in table[0]
    (line,) = [ln for ln in lines if "DisTorch: measured step" in ln]
    assert "from measured unit times" in line and "measured/predicted x" in line
    assert "compute on the host (cpu:0)" in line and "overhead" not in line
    d = st.last_stats
    assert d["predicted_basis"] == "measured" and d["predicted_step_s"] == st.plan.predicted["step_s"]
    assert d["estimated_step_s"] and d["estimated_step_s"] == st.plan.predicted["estimated_step_s"]


def test_step_report_wording():
    base = {"measured_step_s": 0.2, "predicted_step_s": 0.19, "predicted_compute_s": 0.15, "streamed_units": 3,
            "window_slots": 2, "estimated_step_s": 0.25}
    gpu = state.step_report(dict(base, compute="cuda:0", predicted_basis="measured", measured_gap_s=0.03))
    assert "from measured unit times" in gpu and "streaming overhead" in gpu and "x1.05" in gpu
    assert "estimated before measuring 250.0 ms" in gpu and "30.0 ms between forwards" in gpu
    cpu = state.step_report(dict(base, compute="cpu:0", predicted_basis="flops"))
    assert "estimated (FLOPs" in cpu and "compute on the host (cpu:0) 150.0 ms (predicted)" in cpu
    assert "overhead" not in cpu


def test_sampler_step_boundary_neither_synchronizes_nor_invalidates(unet, monkeypatch):
    m = _distorch(unet)
    st = entry.state_of(m)
    ref = ksample(m, steps=2)                 # loads, compiles, measures a step
    rt = st.handle.runtime
    assert rt is not None and not rt.autotune.enabled
    W, ng = rt.ring.W, rt.ring.ng
    assert 1 <= W < ng
    dev0, fb0 = rt.deviations, rt.fallback_loads     # the first forward may relearn the call order
    log, handles = record(monkeypatch, rt, rt._module_ref())
    try:
        out = ksample(m, steps=4)
    finally:
        for h in handles:
            h.remove()
    assert st.compiles == 1 and st.handle.runtime is rt          # the same compiled model, still loaded
    steps, outside = forwards(log)
    assert len(steps) >= 4
    # between the sampler's forwards: nothing; after the last one: the statistics (one synchronize)
    assert all(e[0] == "sync" for e in outside), outside
    last_end = max(i for i, e in enumerate(log) if e[0] == "end")
    first_start = min(i for i, e in enumerate(log) if e[0] == "start")
    assert all(i > last_end or i < first_start for i, e in enumerate(log) if e[0] == "sync"), log
    for step, es in steps:
        assert not [e for e in es if e[0] in ("sync", "invalidate", "prime", "forget", "resize")]
        assert [e[1] for e in es if e[0] == "copy"] == list(range(W, ng)) + list(range(W))
    assert rt.deviations == dev0 and rt.fallback_loads == fb0
    assert out.shape == ref.shape
