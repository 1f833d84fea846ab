"""bench/replay_plan.py: a benchmarked model placed again from its results JSON (no GPU, no weights)."""
from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import replay_plan  # noqa: E402

MiB = 1 << 20


def _results(tmp_path):
    """A bench_comfy-shaped JSON: one row's plan of 2 blocks split into 3 layers each (+ a leaf), its unit
    times: compute 1 ms per layer, the layers 40 MiB each (0.8 ms each at 50 GB/s)."""
    units = [["img_in", "cuda:0", 1 * MiB, None, "leaf", 0]]
    times = {"img_in": 1e-4}
    for b in range(2):
        for j in range(3):
            n = f"double_blocks.{b}.lin{j}"
            units.append([n, "cpu" if j == 0 else "cuda:0", 40 * MiB, None, "sub", len(units)])
            times[n] = 1e-3
    row = {"kind": "distorch", "v": 0.1, "res": "1024x1024", "gpu_step": 0.0062, "off": 80 * MiB,
           "plan_detail": {"units": units, "unit_times": times}}
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"rows": [row], "bw": 50e9}))
    return str(p)


def test_parent_of_names_the_block():
    assert replay_plan.parent_of("double_blocks.3.img_mlp.0") == "double_blocks.3"
    assert replay_plan.parent_of("layers.12.attn.q") == "layers.12"
    assert replay_plan.parent_of("img_in") == ""


def test_replay_places_and_simulates_every_slot_count(tmp_path, capsys):
    path = _results(tmp_path)
    with open(path) as f:
        row = json.load(f)["rows"][0]
    g = replay_plan.graph_from_row(row)
    assert [u.name for u in g.units][:2] == ["<root>", "img_in"] and g.units[2].parent == "double_blocks.0"
    # a streamed row's GPU step holds waits for the link: the root gets none of it unless told
    assert g.units[0].time_s == 0.0 and sum(u.time_s for u in g.units) == pytest.approx(0.0061)
    assert replay_plan.graph_from_row(row, 5e-4).units[0].time_s == 5e-4
    resident = dict(row, v=0.0, off=0, gpu_step=0.0065)
    assert replay_plan.resident_root_s([row, resident], "1024x1024") == pytest.approx(0.0065 - 0.0061)
    assert replay_plan.resident_root_s([row], "1024x1024") is None
    out = replay_plan.replay(row, 80 / 1024, [0.5], 50e9, max_slots=3)
    assert out["streamed_units"] >= 2 and out["slots"] >= 1 and list(out["by_slots"]) == [1, 2, 3]
    one, two = out["by_slots"][1], out["by_slots"][2]
    assert len(one) == 2 and all(s > 0 for s in one)
    assert two[0] <= one[0] and two[1] <= one[1]                        # a second slot never hurts
    assert replay_plan.main([path, "--row", "0.1", "--offload", "0.08", "--scale", "0.5"]) == 0
    assert "MiB chosen" in capsys.readouterr().out
    assert replay_plan.main([path, "--row", "0.1", "--offload", "0.08", "--as-json"]) == 0
    assert json.loads(capsys.readouterr().out)["offload_gb"] == 0.08


def test_replay_names_a_missing_row(tmp_path, capsys):
    assert replay_plan.main([_results(tmp_path), "--row", "7", "--offload", "1"]) == 2
    assert "no DisTorch2 row at virtual_vram_gb 7" in capsys.readouterr().err
