"""The node pack inside a REAL ComfyUI (0.3.75): in-process and as a headless server.

Needs .ci/setup_comfyui.sh to have run for this interpreter's venv; otherwise skipped, or FAILED when
DISTORCH_REQUIRE_COMFYUI=1 (CI). Models are random-weight files generated here (comfy_models).
"""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_harness import ComfyInProcess, ComfyServer, require_comfy  # noqa: E402
from comfy_models import FILES, make_models  # noqa: E402
from comfy_specs import expected_nodes, spec_problems  # noqa: E402
from comfy_workflows import WORKFLOWS, load_workflow, map_device, map_workflow, shrink_for_cpu  # noqa: E402

SAVED_WORKFLOWS = sorted(p.name for p in WORKFLOWS.glob("*_api.json"))


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    require_comfy()
    base = tmp_path_factory.mktemp("comfy_base")
    inproc = ComfyInProcess(base)
    make_models(base)
    return inproc


@pytest.fixture(scope="module")
def server(comfy):
    srv = ComfyServer(comfy.base)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def devices(comfy):
    return list(comfy.pack_module.comfy_nodes.registry.devices())


def test_pack_loads_from_a_folder_with_a_dash(comfy):
    """ComfyUI imports custom_nodes/ComfyUI-DisTorch by path (relative imports inside must work)."""
    assert comfy.pack_path.name == "ComfyUI-DisTorch"
    assert "UNETLoaderDisTorch2MultiGPU" in comfy.pack_nodes
    assert set(expected_nodes()) <= set(comfy.pack_nodes)


def test_object_info_lists_every_compat_node(server, devices):
    info = server.get("/object_info")
    problems = []
    for name, exp in expected_nodes().items():
        if name not in info:
            problems.append(f"{name} missing from /object_info")
            continue
        node = info[name]
        problems += spec_problems(name, exp, node["input"], node["output"], node["category"], devices)
    assert not problems, "\n".join(problems)
    # other packs are not installed here: their wrappers must not appear
    assert not any(k.startswith(("WanVideo", "HyVideo", "LTXVLoaderMultiGPU", "Florence2")) for k in info)


@pytest.mark.parametrize("name", SAVED_WORKFLOWS)
def test_saved_workflow_passes_comfyui_validation(comfy, devices, name):
    prompt = map_workflow(load_workflow(name), devices)
    valid, error, node_errors = comfy.validate(prompt)
    assert valid and not node_errors, f"{name}: {json.dumps(error)}\n{json.dumps(node_errors, indent=1)[:3000]}"


def test_validation_rejects_a_device_that_does_not_exist(comfy, devices):
    """The check above can fail: an unmapped device name is refused by ComfyUI's validation."""
    prompt = map_workflow(load_workflow("qwen_image_unet_clip_distorch2_api.json"), devices)
    prompt["78"]["inputs"]["compute_device"] = "cuda:7"
    valid, _error, node_errors = comfy.validate(prompt)
    assert not valid and "78" in node_errors, node_errors
    assert "cuda:7" in json.dumps(node_errors["78"])


def test_sd15_checkpoint_workflow_runs(server, devices):
    prompt = shrink_for_cpu(map_workflow(load_workflow("sd15_checkpoint_loader_simple_api.json"), devices))
    hist = server.run(prompt)
    images = hist["outputs"]["28"]["images"]
    assert len(images) == 1 and images[0]["filename"].endswith(".png")
    assert (server.base / "output" / images[0]["subfolder"] / images[0]["filename"]).is_file()


def _latent(server, hist, node="32"):
    from safetensors.torch import load_file
    item = hist["outputs"][node]["latents"][0]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"]


def test_distorch2_unet_workflow_matches_plain_loader(server, devices):
    """UNETLoaderDisTorch2MultiGPU samples exactly as UNETLoader (same seed -> same latent)."""
    wf = shrink_for_cpu(map_workflow(load_workflow("sd15_unet_distorch2_api.json"), devices))
    plain = json.loads(json.dumps(wf))
    plain["19"] = {"inputs": {"unet_name": FILES["unet"], "weight_dtype": "default"}, "class_type": "UNETLoader"}
    log_before = len(server.log_text())
    ref = _latent(server, server.run(plain))
    got = _latent(server, server.run(wf))
    log = server.log_text()[log_before:]
    assert "expert string" in log.lower(), "DisTorch2 did not log its allocation / v2 expert string:\n" + log[-3000:]
    assert ref.isfinite().all() and ref.float().std() > 0
    assert got.shape == ref.shape and bool((got == ref).all()), (got - ref).abs().max()
    # a different seed gives a different latent (the comparison above can fail)
    other = json.loads(json.dumps(wf))
    other["2"]["inputs"]["seed"] += 1
    assert not bool((_latent(server, server.run(other)) == ref).all())


def test_checkpoint_advanced_loaders_match_plain_checkpoint(server, devices):
    """The saved CheckpointLoaderAdvancedMultiGPU workflow runs, and so does its DisTorch2 twin (MODEL and
    CLIP compiled): both give the plain CheckpointLoaderSimple's latent for the same seed."""
    wf = shrink_for_cpu(map_workflow(load_workflow("sdxl_checkpoint_loader_advanced_api.json"), devices))
    wf["32"] = {"inputs": {"filename_prefix": "latents/advanced", "samples": ["2", 0]}, "class_type": "SaveLatent"}
    plain = json.loads(json.dumps(wf))
    plain["27"] = {"inputs": {"ckpt_name": FILES["checkpoint"]}, "class_type": "CheckpointLoaderSimple"}
    d2 = json.loads(json.dumps(wf))
    gpu = map_device("cuda:0", devices)
    d2["27"] = {"class_type": "CheckpointLoaderAdvancedDisTorch2MultiGPU", "inputs": {
        "ckpt_name": FILES["checkpoint"], "unet_compute_device": gpu, "unet_virtual_vram_gb": 0.1,
        "unet_donor_device": "cpu", "clip_compute_device": "cpu", "clip_virtual_vram_gb": 0.05,
        "clip_donor_device": "cpu", "vae_device": gpu}}
    ref = _latent(server, server.run(plain))
    assert ref.isfinite().all() and ref.float().std() > 0
    for prompt in (wf, d2):
        got = _latent(server, server.run(prompt))
        assert bool((got == ref).all()), (prompt["27"]["class_type"], (got - ref).abs().max())
