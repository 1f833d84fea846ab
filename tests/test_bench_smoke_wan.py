"""bench/bench_comfy_wan.py proven on CPU before a GPU runs it: its --tiny vram and workflow modes in a
subprocess against the real ComfyUI 0.3.75 (tests/bench_smoke_util.py), every row bit-identical to the plain
loader's.  A file of its own so that a parallel run (bench/gpu_suite.sh: a file's tests stay in one worker)
spreads the smoke runs over two workers."""
from __future__ import annotations

import pytest
import torch

from bench_smoke_util import run_tiny


def test_bench_wan_vram_tiny(tmp_path):
    d, _ = run_tiny(tmp_path, "wan_vram_cpu.md",
                    ["bench/bench_comfy_wan.py", "--mode", "vram", "--model-dir", str(tmp_path / "w")])
    kinds = [r["kind"] for r in d["rows"]]
    assert kinds.count("plain") == 1 and kinds.count("distorch") == 2
    assert all(r["same"] is True for r in d["rows"] if r["kind"] != "plain")
    assert d["analysis"]["64x64x5"]["all_bit_identical"]
    assert max(r["off"] for r in d["rows"] if r["kind"] == "distorch") >= 0.95 * d["total_bytes"]
    # the file is ComfyUI's fp8_scaled form: fp8 Linear weights, a scale per weight, the marker
    from safetensors import safe_open
    f = next((tmp_path / "w").glob("*_high_fp8_scaled.safetensors"))
    with safe_open(str(f), "pt") as st:
        keys = set(st.keys())
        assert st.get_tensor("blocks.0.self_attn.q.weight").dtype == torch.float8_e4m3fn
        assert st.get_tensor("blocks.0.self_attn.q.scale_weight").dtype == torch.float32
        assert st.get_tensor("scaled_fp8").numel() == 2
        assert st.get_tensor("blocks.0.modulation").dtype == torch.bfloat16
    assert {"head.head.scale_weight", "blocks.1.ffn.2.scale_weight", "blocks.0.cross_attn.k.scale_weight"} <= keys


@pytest.mark.parametrize("gran", ["auto", "sub"])
def test_bench_wan_workflow_tiny(tmp_path, monkeypatch, gran):
    """The two-expert fp8_scaled workflow with LoRAs; with DISTORCH_GRANULARITY=sub the layers inside the
    blocks stream (scaled-fp8 layers, LoRA'd weights re-read from the file): still bit-identical."""
    monkeypatch.setenv("DISTORCH_GRANULARITY", gran)
    d, md = run_tiny(tmp_path, "wan_workflow_cpu.md", ["bench/bench_comfy_wan.py", "--mode", "workflow", "--model-dir",
                                                       str(tmp_path / "w"), "--configs", "plain,distorch:0.0005"])
    rows = {r["config"]: r for r in d["rows"]}
    assert set(rows) == {"plain", "distorch:0.0005"}
    for r in rows.values():
        assert "error" not in r, r.get("error")
        assert r["same"] == {"high": True, "low": True} and r["warm_same_as_cold"]
        assert r["cold_s"] > 0 and r["warm_s"] > 0 and r["s_step_warm"] > 0
        for k in ("rss_before_load", "rss_after_unload", "rss_after_drop"):
            assert r[k]["VmRSS"] > 0 and "RssAnon" in r[k] and "RssShmem" in r[k]
        assert r["rss_cold"]["at_peak"]["VmRSS"] >= r["rss_before_load"]["VmRSS"] * 0.9
        assert len(r["steps_warm"]["high"]["steps"]) == 3 and len(r["steps_warm"]["low"]["steps"]) == 3
    assert 0 < rows["distorch:0.0005"]["off"]["high"]
    assert len(list((tmp_path / "w").glob("*_lora_r4.safetensors"))) == 2
    assert "| plain |" in md.read_text()
