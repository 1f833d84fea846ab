"""The README demo and the plots command run end to end (CPU here; GPU when present)."""
from __future__ import annotations

import os

import pytest
import torch


def test_demo_runs_and_output_is_bit_identical(capsys):
    from distorch import demo
    rc = demo.main(["--device", "cpu", "--steps", "2", "--offload", "0.5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "output bit-identical to the resident model: True" in out
    assert "(streamed)" in out and "predicted" in out and "re-planned" in out


def test_demo_model_is_pure_torch_and_deterministic():
    from distorch.demo import build_demo_model, demo_inputs
    a, b = build_demo_model("cpu"), build_demo_model("cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    x, t, ctx, pooled = demo_inputs("cpu")
    with torch.no_grad():
        assert a(x, t, ctx, pooled).shape == x.shape
    assert "diffusers" not in type(a).__module__


def test_demo_rejects_bad_offload(capsys):
    from distorch import demo
    assert demo.main(["--device", "cpu", "--offload", "1.5"]) == 2
    assert "--offload 1.5" in capsys.readouterr().err


def test_plots_command_writes_pngs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from distorch import demo
    paths = demo.write_plots(str(tmp_path), offload=0.5)
    assert [os.path.basename(p) for p in paths] == ["timeline.png", "placement.png"]
    for p in paths:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        assert os.path.getsize(p) > 5000
    assert demo.main(["--device", "cpu", "--plots", str(tmp_path / "cli")]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "cli" / n) for n in ("timeline.png", "placement.png")]
