"""`distorch plan`: table, --json schema, exit codes, errors without tracebacks."""
import json
import os
import subprocess
import sys

import pytest

from distorch.cli import main
from distorch.compiler.files import graph_from_file

GiB = 1 << 30
DEV = ["--devices", "cuda:0=12GiB,cpu=32GiB"]


def run(argv, capsys):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_flux_dev_on_12gb_card_table(capsys):
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", *DEV, "--offload", "16"], capsys)
    assert rc == 0, err
    assert "v2 Expert String: cuda:0," in out
    assert "predicted step" in out and "overhead" in out
    lines = {l.split()[0]: l for l in out.splitlines() if l.startswith(("cuda:0 ", "cpu "))}
    assert "12.00 GiB" in lines["cuda:0"] and "32.00 GiB" in lines["cpu"]
    # one unit vocabulary (issue 13): sizes in GiB (2^30), speeds in GB/s (10^9); never a bare "GB" for 2^30
    assert " GB " not in out and "GB = 2^30" not in out and "GiB = 2^30 bytes" in out
    # at this budget the layers inside the blocks stream (passes/granularity.py): counted per block family
    assert "streams the layers inside blocks" in out
    assert "double_blocks layer x" in out and "single_blocks layer x" in out
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", *DEV, "--offload", "16", "--granularity", "block"],
                       capsys)
    assert rc == 0 and "double_blocks x" in out and "single_blocks x" in out and "streams" not in out


def test_flux_dev_json_schema(capsys):
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", *DEV, "--offload", "16", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    g = graph_from_file("flux-dev")
    assert isinstance(d["model_bytes"], int) and d["model_bytes"] == g.total_bytes
    assert set(d["devices"]) >= {"cuda:0", "cpu"}
    assert all(isinstance(v["bytes"], int) for v in d["devices"].values())
    assert sum(v["bytes"] for v in d["devices"].values()) == d["model_bytes"]
    if d["predicted"].get("granularity", {}).get("chosen") == "sub":
        from distorch.compiler.files import leaf_graph_from_file
        from distorch.passes.granularity import sub_unit_graph
        g = sub_unit_graph(g, leaf_graph_from_file("flux-dev"))
    assert {u["name"] for u in d["units"]} == {u.name for u in g.units}
    for u in d["units"]:
        assert {"name", "bytes", "device"} <= set(u) and u["device"] in d["devices"]
    off = sum(u["bytes"] for u in d["units"] if u["device"] != "cuda:0")
    assert off >= 16 * GiB
    # what the model holds on cuda:0, slots included, is at most model - 16 GiB
    assert d["compute_peak_bytes"] == d["predicted"]["compute_peak_bytes"] <= d["model_bytes"] - 16 * GiB
    assert d["expert_string"].startswith("cuda:0,")
    for k in ("step_s", "compute_s", "overhead_s", "peak_bytes"):
        assert k in d["predicted"]
    assert d["predicted"]["peak_bytes"] <= 12 * GiB
    assert d["schedule"]["n_slots"] >= 1


def test_expert_string_fed_back_gives_same_placement(capsys):
    """The v2 expert string places whole blocks: fed back, a whole-block plan's string gives the same
    placement; a plan streaming layers gives the same share per device, to within one block."""
    rc, out, _ = run(["plan", "flux-dev", *DEV, "--compute", "cuda:0", "--offload", "13.5", "--granularity", "block",
                      "--json"], capsys)
    a = json.loads(out)
    rc, out, _ = run(["plan", "flux-dev", *DEV, "--compute", "cuda:0", "--expert", a["expert_string"], "--json"],
                     capsys)
    b = json.loads(out)
    assert rc == 0
    assert [(u["name"], u["device"]) for u in a["units"]] == [(u["name"], u["device"]) for u in b["units"]]
    rc, out, _ = run(["plan", "flux-dev", *DEV, "--compute", "cuda:0", "--offload", "13.5", "--json"], capsys)
    s = json.loads(out)
    assert s["predicted"]["granularity"]["chosen"] == "sub"
    rc, out, _ = run(["plan", "flux-dev", *DEV, "--compute", "cuda:0", "--expert", s["expert_string"], "--json"],
                     capsys)
    e = json.loads(out)
    block = max(u["bytes"] for u in e["units"])
    assert abs(e["devices"]["cpu"]["bytes"] - s["devices"]["cpu"]["bytes"]) <= block


@pytest.mark.parametrize("model", ["sdxl", "wan2.1-14b"])
def test_other_builtins(model, capsys):
    rc, out, err = run(["plan", model, "--devices", "cuda:0=24GiB,cuda:1=24GiB,cpu=64GiB", "--offload", "4",
                        "--donor", "cuda:1,cpu", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    assert d["devices"]["cuda:1"]["bytes"] >= 4 * GiB and d["devices"]["cpu"]["bytes"] == 0


@pytest.mark.parametrize("argv,needle", [
    (["plan", "flux-dev", *DEV, "--expert", "cuda:0,0.5;cpux,0.6"], "cpux"),
    (["plan", "flux-dev", *DEV, "--expert", "cuda:0,2"], "above 1"),
    (["plan", "flux-dev", *DEV, "--expert", "cuda:0,0.1;cpu,0.1"], "missing"),
    (["plan", "flux-dev", *DEV, "--offload", "-3"], "negative"),
    (["plan", "flux-dev", *DEV, "--offload", "abc"], "'abc'"),
    (["plan", "flux-dev", *DEV, "--offload", "2"], "offload at least"),
    (["plan", "flux-dev", *DEV, "--offload", "16", "--donor", "cuda:3"], "cuda:3"),
    (["plan", "flux-dev", "--devices", "cuda:0=12XB", "--offload", "16"], "12XB"),
    (["plan", "flux-dev", *DEV, "--compute", "cuda:1"], "cuda:1"),
    (["plan", "no-such-model", *DEV], "no-such-model"),
    (["plan", "flux-dev", *DEV, "--window", "huge"], "huge"),
    # issue 12, item 6: these were tracebacks (OverflowError, decimal.InvalidOperation)
    (["plan", "flux-dev", *DEV, "--offload", "1e300"], "more than 1 EiB"),
    (["plan", "flux-dev", *DEV, "--offload", "9" * 400], "more than 1 EiB"),
    (["plan", "flux-dev", *DEV, "--offload", "inf"], "more than 1 EiB"),
    (["plan", "flux-dev", *DEV, "--offload", "nan"], "not a number"),
    (["plan", "flux-dev", *DEV, "--window", "9" * 400 + "GiB"], "more than 1 EiB"),
    (["plan", "flux-dev", *DEV, "--window", "9" * 400], "no unit"),
    (["plan", "flux-dev", *DEV, "--window", "0GiB"], "above 0"),
    (["plan", "flux-dev", "--devices", "cuda:0=" + "9" * 400 + "GiB,cpu=32GiB"], "more than 1 EiB"),
    (["plan", "flux-dev", "--devices", "cuda:0=" + "9" * 400 + ",cpu=32GiB"], "no unit"),
    (["plan", "flux-dev", *DEV, "--expert", "cuda:0," + "9" * 400 + "%;cpu,1%"], "too large"),
    (["plan", "flux-dev", *DEV, "--expert", "cuda:0," + "9" * 400 + "gb;cpu,*"], "more than 1 EiB"),
    (["plan", "flux-dev", *DEV, "--expert", "cuda:0,0." + "9" * 400 + ";cpu,0." + "0" * 400 + "1"], "missing"),
    # issue 12, item 10 / issue 13, item 4
    (["plan", "flux-dev", "--devices", "cuda:0=12GiB@0TFLOPS,cpu=32GiB", "--offload", "16"], "above zero"),
    (["plan", "flux-dev", "--devices", "cuda:0=12GiB,cuda:00=12GiB,cpu=32GiB"], "twice"),
    (["plan", "flux-dev", "--devices", "cuda:0=12,cpu=32", "--offload", "16"], "did you mean 12GiB"),
    (["plan", "flux-dev", "--devices", "cuda:0=12GiB,cpu=32GiB;cpu>cuda:0=" + "9" * 400 + "GB/s"], "outside"),
    (["plan", "flux-dev", "--devices", ""], "empty device spec"),
    (["plan", "flux-dev", *DEV, "--compute", "gpu 0"], "bad device name"),
    (["plan", "flux-dev", "--devices", "cpu=1GiB,cuda:0=1GiB;cpu" + " " * 32000 + "x=1GB/s"], "bad link"),
])
def test_errors_exit_2_with_message(argv, needle, capsys):
    rc, out, err = run(argv, capsys)
    assert rc == 2
    assert needle in err and "Traceback" not in err
    assert out == ""


def test_device_spellings_and_vram_units(capsys):
    # cuda:00 and CUDA are cuda:0; --offload takes a number of GiB or a size with its unit
    rc, out, err = run(["plan", "flux-dev", "--compute", "CUDA:00", "--devices", "cuda=12GiB,cpu=32GiB",
                        "--offload", "16GiB", "--json"], capsys)
    assert rc == 0, err
    a = json.loads(out)
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", *DEV, "--offload", "16", "--json"], capsys)
    assert rc == 0, err
    assert [u["device"] for u in a["units"]] == [u["device"] for u in json.loads(out)["units"]]


def test_decimal_gb_in_devices(capsys):
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", "--devices", "cuda:0=12GB,cpu=32GB",
                        "--offload", "16", "--json"], capsys)
    assert rc == 0, err
    assert json.loads(out)["inventory"]["devices"]["cuda:0"]["total_bytes"] == 12 * 10 ** 9


def test_version(capsys):
    from distorch import __version__
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"distorch {__version__}"


def test_plan_help_lists_every_builtin(capsys):
    from distorch.compiler.shapes import BUILTINS
    with pytest.raises(SystemExit) as ei:
        main(["plan", "--help"])
    assert ei.value.code == 0
    text = " ".join(capsys.readouterr().out.split())    # argparse wraps lines
    assert "flux-schnell" in BUILTINS
    for name in BUILTINS:
        assert name in text, name
    assert "GiB = 2^30" in text and "GB = 10^9" in text


def test_no_command_and_bad_option(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as ei:
        main(["plan", "flux-dev", "--frobnicate"])
    assert ei.value.code == 2


def test_probe_cpu_only_machine_asks_for_devices(capsys, monkeypatch, tmp_path):
    import torch
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", "--offload", "16"], capsys)
    assert rc == 2 and "--devices" in err
    rc, out, err = run(["plan", "flux-dev"], capsys)
    assert rc == 2 and "--devices" in err


def test_python_dash_m_subprocess():
    env = dict(os.environ, XDG_CACHE_HOME="/nonexistent-distorch-cache")
    r = subprocess.run([sys.executable, "-m", "distorch", "plan", "flux-dev", "--compute", "cuda:0", *DEV,
                        "--offload", "16", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model_bytes"] > 20 * GiB
    r = subprocess.run([sys.executable, "-m", "distorch", "plan", "flux-dev", *DEV, "--expert", "cuda:0,7"],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "above 1" in r.stderr and "Traceback" not in r.stderr


# --- budgets: --offload / --max-vram (issue 10) ----------------------------------------------------

def test_max_vram_caps_the_footprint_and_table_prints_it(capsys):
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", *DEV, "--max-vram", "6", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    assert d["compute_peak_bytes"] <= 6 * GiB
    assert d["predicted"]["budget_bytes"] == 6 * GiB
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", *DEV, "--max-vram", "6"], capsys)
    assert rc == 0, err
    assert "footprint on cuda:0:" in out and "resident" in out and "slots" in out


@pytest.mark.parametrize("argv,want", [
    (["--vram", "3"], "--offload 3"),                     # refused, naming both new options
    (["--vram", "3"], "--max-vram"),
    (["--offload", "3", "--max-vram", "8"], "give one"),
    (["--max-vram", "0.1"], "minimum working set"),       # under one layer-sized slot (0.126 GiB)
    (["--max-vram", "0.5", "--granularity", "block"], "minimum working set"),   # under one block-sized slot
    (["--max-vram", "-1"], "negative"),
    (["--max-vram", "abc"], "not a number"),
    (["--offload", "22.1"], "minimum working set"),         # leaves less than one slot's room
])
def test_budget_options_errors(capsys, argv, want):
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", *DEV, *argv], capsys)
    assert rc == 2 and want in err and "Traceback" not in err


def test_max_vram_near_the_card_warns_about_activations(capsys):
    rc, out, err = run(["plan", "flux-dev", "--compute", "cuda:0", *DEV, "--max-vram", "11"], capsys)
    assert rc == 0
    assert "warning" in err and "activations" in err


def test_small_offload_frees_what_it_says(capsys):
    # issue 10: `--vram 2` on sdxl planned a 2.31 GB window for 2.28 GB offloaded (freeing nothing)
    rc, out, err = run(["plan", "sdxl", "--compute", "cuda:0", *DEV, "--offload", "2", "--json"], capsys)
    assert rc == 0, err
    d = json.loads(out)
    assert d["compute_peak_bytes"] <= d["model_bytes"] - 2 * GiB
