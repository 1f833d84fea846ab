"""Running a bench script's smoke mode on CPU for the tests (tests/test_bench_smoke.py, test_bench_smoke_wan.py):
a subprocess against the real ComfyUI 0.3.75, its CPU seconds limited (getrusage of its own processes, so a busy
machine does not fail it) and its wall time cut."""
from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

from comfy_harness import COMFY_DIR, require_comfy

REPO = Path(__file__).resolve().parents[1]

CPU_LIMIT_S = 60.0
WALL_LIMIT_S = 420.0


def run_script(args, tmp_path, env_extra=None):
    """Run a bench script (CPU), return (returncode, output, CPU seconds its processes used)."""
    env = {k: v for k, v in os.environ.items() if k != "OUT"}     # results go where --out says
    env.update({"DISTORCH_COMFYUI_DIR": str(COMFY_DIR), "PYTHONUNBUFFERED": "1",
                # the CPU smoke run as CI runs it on any machine: no GPU, two compute threads (CPU seconds
                # summed over threads: a 16-core GPU host spent 65-77 s where CI spends well under 60)
                # (the fill's, upload's and release threads too: DISTORCH_FILL_THREADS sizes them all; the H200
                # host's 16 cores made 8 fill threads, and the Wan smoke runs 61-62 s of CPU there)
                "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2",
                "DISTORCH_FILL_THREADS": "2"})
    env.update(env_extra or {})
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run([sys.executable] + args, cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=WALL_LIMIT_S)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return p.returncode, p.stdout + p.stderr, cpu


def check_run(rc, out, cpu):
    assert rc == 0, out[-4000:]
    assert cpu < CPU_LIMIT_S, f"smoke run used {cpu:.0f} s of CPU (limit {CPU_LIMIT_S:.0f})"


def run_tiny(tmp_path, md_name: str, args: list) -> tuple[dict, Path]:
    """A bench script's `--tiny` run on the CPU in real ComfyUI (`args`: script and options; results into
    tmp_path/md_name), checked as check_run does -> (its results JSON, the markdown's path)."""
    require_comfy()
    md = tmp_path / md_name
    rc, out, cpu = run_script([args[0], "--tiny"] + args[1:] + ["--out", str(md)], tmp_path)
    check_run(rc, out, cpu)
    return json.loads(md.with_suffix(".json").read_text()), md
