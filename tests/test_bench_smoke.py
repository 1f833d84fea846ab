"""The ComfyUI benchmarks (bench/bench_comfy.py, bench/bench_comfy_codec.py, bench/bench_fill.py; the Wan ones:
tests/test_bench_smoke_wan.py) proven on CPU before a GPU runs them.

Smoke runs: each script's --tiny mode in a subprocess against the real ComfyUI 0.3.75 (skipped without it
unless DISTORCH_REQUIRE_COMFYUI=1), asserting that the result files exist, carry every row, and that every
row's latent is bit-identical to the plain loader's.  Each smoke run may use at most 60 s of CPU time (its own
processes, measured by getrusage, so that a busy machine does not fail it); a hung run is cut after a wall
limit.  The pure helpers (floor, interpolation, ordering, the safetensors writer, the RSS sampler) are tested
directly.  `DISTORCH_SMOKE_GPU_BENCH=1` also rehearses bench/gpu_bench.sh end to end on CPU (minutes).
"""
import math
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_smoke_util import REPO, check_run, run_script, run_tiny
from comfy_harness import COMFY_DIR, require_comfy

sys.path.insert(0, str(REPO / "bench"))
import bench_comfy as B  # noqa: E402
import codec_report as CR  # noqa: E402
import comfy_report as R  # noqa: E402

GiB = 1 << 30


# ------------------------------------------------------------------------------------------------------
# Smoke runs (real ComfyUI)
# ------------------------------------------------------------------------------------------------------
def test_bench_comfy_tiny(tmp_path):
    d, md = run_tiny(tmp_path, "comfy_vram_cpu.md", ["bench/bench_comfy.py", "--model-dir", str(tmp_path / "m"),
                                                     "--replain"])
    rows = d["rows"]
    labs = ["64x64", "32x32"]
    assert [r["res"] for r in rows if r["kind"] == "plain"] == labs
    dis = [r for r in rows if r["kind"] == "distorch"]
    assert sorted((r["v"], r["res"]) for r in dis) == sorted((v, lab) for v in (0.5, 3.0) for lab in labs)
    assert all(r["same"] is True for r in dis), [(r["name"], r["res"], r["same"]) for r in dis]
    assert all(d["analysis"][lab]["all_bit_identical"] for lab in labs)
    assert all(r["rss_peak"] > 0 and r["rss_anon_peak"] > 0 for r in rows)     # host memory beside s/it
    assert "peak host RSS GiB" in md.read_text()
    blk = [r for r in rows if r["kind"] == "block"]          # whole blocks forced, first resolution
    assert blk and all(r["same"] is True and r["gran"] == "block" and r["res"] == labs[0] for r in blk)
    full = max(dis, key=lambda r: r["v"])
    assert full["off"] >= 0.95 * d["total_bytes"]   # virtual_vram_gb above the model: (nearly) all offloaded
    assert 0 < min(dis, key=lambda r: r["v"])["off"] < d["total_bytes"]
    assert all(r["pred_peak"] and r["pred_step"] and r["meas_step"] for r in dis)
    # steady-state forwards off the compute stream's events (2 steps: one forward after the first, no gap)
    assert all(r["gpu_step"] > 0 and r["gpu_gap"] is None for r in dis), [(r.get("gpu_step"), r.get("gpu_gap")) for r in dis]
    assert not (tmp_path / "m" / "flux_rand_1x0.safetensors").exists()    # the file is removed once loaded
    text = md.read_text()
    assert "## 64x64" in text and "## 32x32" in text and "| NO |" not in text
    again = [n for n in d["notes"] if n.startswith("Plain again")]      # --replain: the plain model, last
    assert len(again) == 2 and all("bit-identical to the first plain row: yes" in n for n in again), again


def test_bench_comfy_codec_tiny(tmp_path):
    """Raw against compressed inside ComfyUI.  On a host ComfyUI holds the tiny Flux in fp32: nothing in it is
    codable, so its compressed rows run with the runtime's codec statistics null (reported, not a crash); the
    bf16 CLIP-L streams really compressed, its conditioning bit-identical to the plain CLIP's."""
    d, md = run_tiny(tmp_path, "comfy_codec_cpu.md", ["bench/bench_comfy_codec.py", "--model-dir", str(tmp_path / "m")])
    rows, clips = d["rows"], d["clip"]
    assert not [r for r in rows + clips if r.get("error")]
    assert [r["kind"] for r in rows] == ["plain"] + ["distorch"] * 4      # ComfyUI rows need a GPU
    dis = rows[1:]
    assert [(r["v"], r["mode"]) for r in dis] == [(3.0, "on"), (3.0, "off"), (0.5, "on"), (0.5, "off")]
    assert all(r["same"] is True for r in dis)
    assert all(r["codec"] is None and r["ratio"] is None for r in dis)         # fp32: nothing compressed
    assert dis[0]["off"] >= 0.95 * d["total_bytes"] and dis[0]["streamed"] == dis[0]["off"]
    assert 0 < dis[2]["off"] < d["total_bytes"]
    assert all(r["rss_peak"] > 0 and r["rss_anon_peak"] > 0 and "rss_file_peak" in r for r in rows)
    assert all(r["cold_s"] >= r["first_s"] > 0 and r["rss_before"] > 0 and r["rss_after"] > 0 for r in dis)
    assert d["decode"]["gbps"] is None and "n/a" in d["decode"]["note"]
    clip = {r["mode"]: r for r in clips}
    assert set(clip) == {None, "on", "off"}
    c = clip["on"]["codec"]
    assert c and c["tensors"] > 0 and c["stored_bytes"] < c["raw_bytes"] and 0.6 < c["ratio"] < 0.72
    assert clip["on"]["home_bytes"] <= 0.72 * clip["on"]["off"] and clip["on"]["streamed"] == clip["on"]["home_bytes"]
    assert clip["off"]["codec"] is None and clip["off"]["home_bytes"] == clip["off"]["off"]
    assert clip["on"]["same"] is True and clip["off"]["same"] is True and clip[None]["deterministic"]
    h = d["headline"]
    assert h["all_identical"] and h["clip_identical"] and h["ratio"] is None and not h["failed"]
    text = md.read_text()
    assert text.index("## Headline") < text.index("## Flux-dev-shaped model") and "| NO |" not in text
    assert "Not run: ComfyUI partial load" in text
    assert not (tmp_path / "m" / "flux_rand_1x0.safetensors").exists()


@pytest.mark.skipif(os.environ.get("DISTORCH_SMOKE_GPU_BENCH") != "1",
                    reason="rehearsal of bench/gpu_bench.sh takes minutes: DISTORCH_SMOKE_GPU_BENCH=1 runs it")
def test_gpu_bench_script_rehearsal(tmp_path):
    require_comfy()
    env = {k: v for k, v in os.environ.items()}
    env.update(SMOKE="1", PY=sys.executable, OUT=str(tmp_path / "out"), DISTORCH_COMFYUI_DIR=str(COMFY_DIR),
               WAN_DIR_SMOKE=str(tmp_path / "w"), FLUX_ARGS=f"--model-dir {tmp_path / 'm'}")
    p = subprocess.run(["bash", "bench/gpu_bench.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for f in ("comfy_vram_cpu.json", "wan_vram_cpu.json", "wan_workflow_cpu.json", "timing.txt"):
        assert (tmp_path / "out" / f).exists(), f
    assert "NO" not in (tmp_path / "out" / "wan_workflow_cpu.md").read_text().split("|---")[-1]
    # every Flux row also as one line of the call's output (files that do not come back lose nothing)
    rows = [ln for ln in p.stdout.splitlines() if ln.startswith("row 64x64 | DisTorch2") and "forced" not in ln]
    assert rows and all(re.search(r" s/it \d+\.\d{3} .* gpu \d+\.\d{4} ", ln) for ln in rows), p.stdout[-3000:]


@pytest.mark.skipif(os.environ.get("DISTORCH_SMOKE_GPU_BENCH") != "1",
                    reason="rehearsal of bench/gpu_bench.sh: DISTORCH_SMOKE_GPU_BENCH=1 runs it")
def test_gpu_bench_phase_d_rehearsal(tmp_path):
    """PHASES=D alone: setup, preflight, the codec bench, its headline in the summary."""
    require_comfy()
    env = {k: v for k, v in os.environ.items()}
    env.update(SMOKE="1", PHASES="D", PY=sys.executable, OUT=str(tmp_path / "out"), DISTORCH_COMFYUI_DIR=str(COMFY_DIR),
               CODEC_ARGS=f"--model-dir {tmp_path / 'm'}")
    p = subprocess.run(["bash", "bench/gpu_bench.sh"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert (tmp_path / "out" / "comfy_codec_cpu.json").exists() and "D: exit 0" in p.stdout
    assert "--- comfy_codec" in p.stdout and "## Headline" in p.stdout.split("--- comfy_codec")[1]


# ------------------------------------------------------------------------------------------------------
# Helpers (no ComfyUI)
# ------------------------------------------------------------------------------------------------------
def test_floor_is_resident_until_the_weights_no_longer_fit():
    M, act, bw, res = 20 * GiB, 1 * GiB, 50e9, 0.17
    assert R.floor_at(M + act, M, res, act, bw) == res                  # everything held: resident
    assert R.floor_at(M + act + GiB, M, res, act, bw) == res            # more than the model: still resident
    f = R.floor_at(act + 2 * GiB, M, res, act, bw)                       # 2 GiB held: 18 GiB streamed
    assert f == pytest.approx(18 * GiB / bw)
    assert R.floor_at(act + 2 * GiB, M, res, act, None) is None


def test_interp_inside_and_outside_the_curve():
    pts = [(10.0, 0.3), (2.0, 0.5), (20.0, 0.2)]
    assert R.interp(pts, 6.0) == pytest.approx(0.4)
    assert R.interp(pts, 20.0) == pytest.approx(0.2)
    assert R.interp(pts, 1.0) is None and R.interp(pts, 21.0) is None and R.interp([], 3.0) is None


def test_spread_order_covers_the_range_first():
    v = [0, 3, 6, 9, 12, 15, 18, 20, 21.5, 23]
    o = B.spread_order(v)
    assert sorted(o) == v and len(o) == len(v)
    assert o[:2] == [23, 0] and o[2] in (12, 15)
    assert B.spread_order([4, 1]) == [4, 1] and B.spread_order([]) == []


def test_analyze_floor_ratio_and_speedup_at_equal_vram():
    M = 20 * GiB
    rows = [dict(kind="plain", res="r", name="p", peak=M + GiB, s_it=0.2, off=0),
            dict(kind="distorch", res="r", name="d1", peak=11 * GiB, s_it=0.22, off=10 * GiB, same=True),
            dict(kind="distorch", res="r", name="d2", peak=3 * GiB, s_it=0.42, off=18 * GiB, same=True),
            dict(kind="comfy", res="r", name="c", peak=7 * GiB, s_it=0.40, off=14 * GiB, same=False)]
    a = R.analyze(rows, M, 100e9)["r"]
    assert a["activations"] == GiB
    assert rows[1]["floor"] == pytest.approx(max(0.2, 10 * GiB / 100e9))
    assert a["compare"][0]["ours_s_it"] == pytest.approx(0.32)
    assert a["compare"][0]["speedup"] == pytest.approx(0.40 / 0.32)
    assert a["all_bit_identical"] is False                    # the ComfyUI row differs
    md = R.render_md({"title": "t", "gpu": "g", "torch": "x", "comfyui": "y", "date": "z", "model_line": "m",
                      "command": "c", "rows": rows, "analysis": {"r": a}})
    assert "| NO |" in md and "1.250x" in md


def test_floor_takes_the_faster_resident_step():
    """The resident step is the faster of the plain row and DisTorch2 with nothing offloaded (the same ops):
    a slow plain run (a host-bound step) must not lower every row's ratio; a row that streams does not count,
    nor one whose output differs."""
    M = 20 * GiB
    rows = [dict(kind="plain", res="r", name="p", peak=M + GiB, s_it=0.12, off=0),
            dict(kind="distorch", res="r", name="d0", peak=M + GiB, s_it=0.06, off=0, same=True),
            dict(kind="distorch", res="r", name="d1", peak=18 * GiB, s_it=0.09, off=3 * GiB, same=True)]
    a = R.analyze(rows, M, 100e9)["r"]
    assert a["resident_s_it"] == 0.06 and a["plain_s_it"] == 0.12
    assert rows[2]["floor"] == pytest.approx(max(0.06, 3 * GiB / 100e9))
    assert rows[0]["x_floor"] == pytest.approx(2.0)
    rows[1]["same"] = False
    assert R.analyze(rows, M, 100e9)["r"]["resident_s_it"] == 0.12


def test_write_safetensors_round_trip(tmp_path):
    from safetensors.torch import load_file
    src = {"a": torch.randn(3, 5).to(torch.bfloat16), "b.scale_weight": torch.tensor(0.25),
           "c": (torch.randn(4, 4) * 10).to(torch.float8_e4m3fn), "scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn),
           "d": torch.arange(7, dtype=torch.int64)}
    specs = [(k, tuple(v.shape), v.dtype) for k, v in src.items()]
    p = str(tmp_path / "x.safetensors")
    n = B.write_safetensors(p, specs, lambda name, shape, dt: src[name], metadata={"k": 1})
    assert n == sum(v.numel() * v.element_size() for v in src.values())
    back = load_file(p)
    assert set(back) == set(src) and all(B.bit_equal(back[k], src[k]) for k in src)
    with pytest.raises(ValueError, match="declared"):
        B.write_safetensors(p, [("a", (2, 2), torch.float32)], lambda *a: torch.zeros(3))
    assert B.bit_equal(load_file(p)["a"], src["a"])            # a failed write leaves the old file


def test_codec_headline_against_the_targets():
    """The headline of bench_comfy_codec: s/it against today's raw link floor, homes against the raw
    offloaded bytes, each against its target; a failed row is named, not counted as identical."""
    G = GiB
    rows = [dict(kind="plain", name="plain", s_it=0.17, off=0),
            dict(kind="distorch", mode="on", v=30.0, name="comp", s_it=0.31, off=22 * G, home_bytes=int(14.9 * G),
                 pinned_peak=15 * G, ratio=0.675, codec={"ratio": 0.675}, same=True),
            dict(kind="distorch", mode="off", v=30.0, name="raw", s_it=0.44, off=22 * G, home_bytes=22 * G,
                 pinned_peak=22 * G, ratio=None, codec=None, same=True),
            dict(kind="distorch", mode="on", v=8.0, name="comp 8", s_it=0.2, off=8 * G, same=False),
            dict(kind="error", name="raw 8", error="ValueError: boom")]
    dec = {"gbps": 470.0, "weight": "w", "shape": [3072, 12288], "widths": [3, 2, 3], "ratio": 0.675,
           "encode_mbps": 900.0, "copy_gbps": 2000.0, "exact": True}
    d = {"rows": rows, "all_gb": 30.0, "bw": 55e9, "decode": dec, "clip": [],
         "title": "t", "gpu": "NVIDIA H200", "torch": "x", "comfyui": "y", "date": "z", "model_line": "m",
         "command": "c", "res": 1024, "encoder": "t5xxl", "clip_gb": 30.0, "decode_reps": 20, "total_bytes": 22 * G}
    h = CR.headline(d)
    floor = 22 * G / 55e9
    assert h["raw_floor_s"] == pytest.approx(floor)
    assert h["comp_x"] == pytest.approx(0.31 / floor) and h["raw_x"] == pytest.approx(0.44 / floor)
    assert h["homes_comp"] == pytest.approx(14.9 / 22) and h["homes_comp_pinned"] == pytest.approx(15 / 22)
    assert h["ratio"] == 0.675 and h["decode_gbps"] == 470.0 and h["failed"] == ["raw 8"]
    assert h["all_identical"] is False                       # the 8 GiB compressed row differs
    md = CR.render(dict(d, headline=h))
    assert "| <= 0.75 | yes |" in md and "| <= 0.72 | yes |" in md and "| <= 0.32 on the H200 | yes |" in md
    assert "failed: ValueError: boom" in md and "Failed (the error is in its row): raw 8." in md
    assert "| NO |" in md and "470 GB/s" in md and "the whole model decodes in 0.050 s" in md
    assert "Compressed, fully offloaded: 0.310 s/it = 0.722x today's raw link floor (0.429 s" in md
    assert "the homes hold 0.677x the raw offloaded bytes" in md


def test_bit_equal_compares_bits():
    x = torch.tensor([1.0, float("nan"), -0.0])
    assert B.bit_equal(x, x.clone()) and not torch.equal(x, x.clone())
    assert not B.bit_equal(x, torch.tensor([1.0, float("nan"), 0.0]))     # -0.0 and 0.0 differ in bits
    assert not B.bit_equal(x, x.double()) and not B.bit_equal(x, None)


def test_card_tag_and_guard():
    assert B.card_tag("NVIDIA H200") == "h200" and B.card_tag("NVIDIA H100 80GB HBM3") == "h100"
    assert B.card_tag("NVIDIA GeForce RTX 4090") == "rtx4090" and B.card_tag("cpu") == "cpu"
    skipped = []
    g = B.Guard(0)
    assert g.left() == math.inf and g.allow(1e9, "x", skipped) and not skipped
    g = B.Guard(1e-9)
    assert not g.allow(1.0, "late row", skipped) and skipped == ["late row"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="Linux /proc")
def test_rss_sampler_sees_an_allocation():
    s = B.RssSampler(0.01)
    base = s.mark()
    assert base["VmRSS"] > 0 and {"RssAnon", "RssFile", "RssShmem", "sys_used"} <= set(base)
    # 64 MiB of fresh anonymous pages, touched (a torch tensor may reuse memory the allocator kept from an
    # earlier test in the same process, and then RSS does not move)
    buf = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.write(b"\1" * (64 << 20))
    pk = s.peak()
    assert pk["max"]["RssAnon"] - base["RssAnon"] > 48 << 20
    buf.close()


def test_bench_fill_smoke_with_the_diagnosis(tmp_path):
    """bench/bench_fill.py on the CPU: homes exact, the host bound, and each part of the fill apart."""
    rc, out, cpu = run_script(["bench/bench_fill.py", "--smoke", "--diagnose"], tmp_path)
    check_run(rc, out, cpu)
    assert "exact=True" in out and "exact=False" not in out and "host bound" in out
    for part in ("plain pieces into fresh memory (run 2)", "HomeStore, pageable, DROP_EARLY off (run 1)",
                 "HomeStore, pageable, DROP_EARLY off, no heap trims (run 2)",
                 "HomeStore, pageable, source pages given back as each piece lands (fill.DROP_EARLY, the default) "
                 "(run 1)"):
        assert out.count(part) == 2, out[-2000:]           # threads 1 and 4
