"""The shipped example workflows (example_workflows/, UI format as ComfyUI's frontend saves them) are accepted
by a REAL ComfyUI server (0.3.75, headless main.py, this pack in its custom_nodes/), and the packaging files
say what a ComfyUI install needs.

Each workflow is converted to the API format the way the frontend does it on "Queue": links become
[node_id, output_slot], `widgets_values` are assigned to the node's widget inputs in the order of the server's
/object_info (required, then optional; an INT with control_after_generate is followed by that extra value),
notes are dropped. The API prompt is POSTed to /prompt, where ComfyUI's own validation checks node names,
input names, link types and every widget value (file names included). The model files are empty
placeholders with the names the workflows use, so an accepted prompt fails at its first loader: nothing is
ever sampled. Negative cases show that a wrong node name, input name, link or value is refused.

Needs .ci/setup_comfyui.sh for this interpreter (skipped without it; FAILS under DISTORCH_REQUIRE_COMFYUI=1).
"""
import copy
import json
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from comfy_harness import COMFY_DIR, PACK_NAME, REPO, ComfyServer, require_comfy  # noqa: E402
from comfy_workflows import DEVICE_INPUTS, map_device  # noqa: E402

EXAMPLES = REPO / "example_workflows"
EXAMPLE_NAMES = sorted(p.name for p in EXAMPLES.glob("*.json"))

# Nodes the frontend keeps to itself (never sent to the server).
FRONTEND_ONLY = {"Note", "MarkdownNote"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}

# The model files the examples name (their notes tell users where to put them): folder -> names.
# Written as empty placeholders: enough for validation, and loading one fails at once.
MODEL_FILES = {
    "diffusion_models": ["flux1-dev.safetensors", "flux1-dev-Q8_0.gguf",
                         "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors",
                         "wan2.2_t2v_low_noise_14B_fp8_scaled.safetensors"],
    "text_encoders": ["clip_l.safetensors", "t5xxl_fp16.safetensors", "t5-v1_1-xxl-encoder-Q8_0.gguf",
                      "umt5_xxl_fp8_e4m3fn_scaled.safetensors"],
    "vae": ["ae.safetensors", "wan_2.1_vae.safetensors"],
    "checkpoints": ["sd_xl_base_1.0.safetensors"],
}

# What each example must contain (issue 13: the common jobs).
REQUIRED_NODES = {
    "flux_dev_distorch2_unet_clip_on_second_gpu.json": {"UNETLoaderDisTorch2MultiGPU": 1, "DualCLIPLoaderMultiGPU": 1},
    "flux_dev_gguf_unet_distorch2.json": {"UnetLoaderGGUFDisTorch2MultiGPU": 1},
    "wan2_2_t2v_two_experts_distorch2.json": {"UNETLoaderDisTorch2MultiGPU": 2, "KSamplerAdvanced": 2},
    "sdxl_checkpoint_advanced_distorch2.json": {"CheckpointLoaderAdvancedDisTorch2MultiGPU": 1},
}


# ------------------------------------------------------------------------------------------------
# UI format -> API format (what the frontend does on "Queue")
# ------------------------------------------------------------------------------------------------
class ConversionError(AssertionError):
    pass


def _spec(info, name):
    for section in ("required", "optional"):
        spec = (info["input"].get(section) or {}).get(name)
        if spec is not None:
            return spec
    return None


def _widget_type(spec):
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if isinstance(typ, (list, tuple)):
        typ = "COMBO"
    if typ not in WIDGET_TYPES or opts.get("forceInput"):
        return None
    return typ


def widget_inputs(info):
    """[(input name, has a control_after_generate value after it)] in the frontend's widget order."""
    order = info.get("input_order") or {s: list(info["input"].get(s) or {}) for s in ("required", "optional")}
    out = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = info["input"][section][name]
            typ = _widget_type(spec)
            if typ is None:
                continue
            opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if opts.get("image_upload") or opts.get("video_upload") or opts.get("audio_upload"):
                raise ConversionError(f"{name}: upload widgets are not handled by this converter")
            control = bool(opts.get("control_after_generate")) or (typ == "INT" and name in ("seed", "noise_seed"))
            out.append((name, control))
    return out


def ui_to_api(ui, object_info):
    """API-format prompt of a UI-format workflow. Raises ConversionError where the file cannot be what the
    frontend saved for these node definitions (a widget count that does not match, a link that is not in the
    link table, an input name the node does not have). A node type the server does not know is passed through
    with its links only: the server must refuse it by name."""
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        ntype, nid = node["type"], str(node["id"])
        if ntype in FRONTEND_ONLY:
            continue
        if node.get("mode", 0) != 0:
            raise ConversionError(f"node {nid} ({ntype}): muted/bypassed nodes are not handled by this converter")
        info = object_info.get(ntype)
        inputs = {}
        if info is not None:
            values = node.get("widgets_values") or []
            if not isinstance(values, list):
                raise ConversionError(f"node {nid} ({ntype}): widgets_values is not a list")
            names = widget_inputs(info)
            want = len(names) + sum(control for _, control in names)
            if len(values) != want:
                raise ConversionError(
                    f"node {nid} ({ntype}): {len(values)} widget values for {want} widgets "
                    f"{[n for n, _ in names]} (+1 after each seed)")
            it = iter(values)
            for name, control in names:
                inputs[name] = next(it)
                if control:
                    next(it)  # control_after_generate ("randomize", "fixed", ...): frontend-only
        for slot, inp in enumerate(node.get("inputs") or []):
            if info is not None and _spec(info, inp["name"]) is None:
                raise ConversionError(f"node {nid} ({ntype}) has no input {inp['name']!r}")
            if inp.get("link") is None:
                continue
            link = links.get(inp["link"])
            if link is None:
                raise ConversionError(f"node {nid} input {inp['name']}: link {inp['link']} is not in the link table")
            _lid, src, src_slot, dst, dst_slot, _typ = link
            if (dst, dst_slot) != (node["id"], slot):
                raise ConversionError(f"link {inp['link']} ends at node {dst} slot {dst_slot}, not node {nid} slot {slot}")
            inputs[inp["name"]] = [str(src), src_slot]
        api[nid] = {"class_type": ntype, "inputs": inputs, "_meta": {"title": node.get("title") or ntype}}
    for nid, node in api.items():
        for name, value in node["inputs"].items():
            if isinstance(value, list) and value[0] not in api:
                raise ConversionError(f"node {nid} input {name}: linked to node {value[0]}, which the server never sees")
    return api


def ui_problems(ui, object_info):
    """What in a UI file disagrees with itself or with the node definitions (empty = consistent)."""
    bad = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    if len(nodes) != len(ui["nodes"]):
        bad.append("duplicate node ids")
    if ui.get("last_node_id", 0) < max(nodes):
        bad.append("last_node_id below the largest node id")
    if ui["links"] and ui.get("last_link_id", 0) < max(link[0] for link in ui["links"]):
        bad.append("last_link_id below the largest link id")
    for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:
        s, d = nodes.get(src), nodes.get(dst)
        if s is None or d is None:
            bad.append(f"link {lid}: node {src} or {dst} missing")
            continue
        outs, ins = s.get("outputs") or [], d.get("inputs") or []
        if src_slot >= len(outs) or lid not in (outs[src_slot].get("links") or []):
            bad.append(f"link {lid}: not listed on output {src_slot} of node {src}")
        elif outs[src_slot]["type"] != typ:
            bad.append(f"link {lid}: type {typ} but output {src_slot} of node {src} is {outs[src_slot]['type']}")
        if dst_slot >= len(ins) or ins[dst_slot].get("link") != lid:
            bad.append(f"link {lid}: not the link of input {dst_slot} of node {dst}")
    for n in ui["nodes"]:
        info = object_info.get(n["type"])
        if n["type"] in FRONTEND_ONLY or info is None:
            continue
        want = [str(t) for t in info["output"]]
        got = [o["type"] for o in n.get("outputs") or []]
        if got != want:
            bad.append(f"node {n['id']} ({n['type']}): outputs {got}, the server says {want}")
        for inp in n.get("inputs") or []:
            spec = _spec(info, inp["name"])
            if spec is None:
                bad.append(f"node {n['id']} ({n['type']}): no input {inp['name']!r}")
            elif "widget" not in inp and _widget_type(spec) is None and spec[0] != inp["type"]:
                bad.append(f"node {n['id']} ({n['type']}).{inp['name']}: type {inp['type']}, the server says {spec[0]}")
    return bad


def map_devices(api, devices):
    """Device names of the examples (cuda:0, cuda:1, cpu) -> devices that exist on this machine."""
    out = copy.deepcopy(api)
    for node in out.values():
        for key, value in node["inputs"].items():
            if key in DEVICE_INPUTS and isinstance(value, str):
                node["inputs"][key] = map_device(value, devices)
    return out


def load(name):
    return json.loads((EXAMPLES / name).read_text())


# ------------------------------------------------------------------------------------------------
# The server
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_comfy()
    base = tmp_path_factory.mktemp("comfy_examples")
    for folder, names in MODEL_FILES.items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / "models" / folder / name).write_bytes(b"")
    srv = ComfyServer(base)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def object_info(server):
    return server.get("/object_info", timeout=120)


@pytest.fixture(scope="module")
def devices(object_info):
    return list(object_info["UNETLoaderDisTorch2MultiGPU"]["input"]["optional"]["compute_device"][0])


def submit(server, object_info, devices, ui):
    """(HTTP status, body) of POST /prompt for a UI workflow."""
    prompt = map_devices(ui_to_api(ui, object_info), devices)
    return server.post("/prompt", {"prompt": prompt, "client_id": "distorch-example-tests"})


def wait_done(server, prompt_id, timeout=120):
    t = time.time()
    while time.time() - t < timeout:
        hist = server.get(f"/history/{prompt_id}")
        if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
            return hist[prompt_id]
        time.sleep(0.2)
    raise AssertionError(f"prompt {prompt_id} did not finish in {timeout}s:\n{server.log_tail()}")


def test_examples_exist_for_the_common_jobs():
    assert set(REQUIRED_NODES) <= set(EXAMPLE_NAMES), EXAMPLE_NAMES
    for name, want in REQUIRED_NODES.items():
        ui = load(name)
        assert "links" in ui and "nodes" in ui and "widgets_values" in ui["nodes"][0], f"{name}: not UI format"
        count = {}
        for node in ui["nodes"]:
            count[node["type"]] = count.get(node["type"], 0) + 1
        for node_type, n in want.items():
            assert count.get(node_type, 0) >= n, f"{name}: wants {n} x {node_type}, has {count}"


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_workflow_is_consistent_with_the_node_definitions(object_info, name):
    ui = load(name)
    unknown = {n["type"] for n in ui["nodes"]} - set(object_info) - FRONTEND_ONLY
    assert not unknown, f"{name}: node types the server does not have: {unknown}"
    problems = ui_problems(ui, object_info)
    assert not problems, f"{name}:\n" + "\n".join(problems)


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_example_workflow_passes_comfyui_validation(server, object_info, devices, name):
    ui = load(name)
    status, body = submit(server, object_info, devices, ui)
    assert status == 200 and not body.get("node_errors"), \
        f"{name}: /prompt refused it ({status}):\n{json.dumps(body, indent=1)[:4000]}"
    # Accepted and queued: with placeholder model files it stops at its first loader, before any sampler.
    hist = wait_done(server, body["prompt_id"])
    errors = [m[1] for m in hist["status"].get("messages", []) if m[0] == "execution_error"]
    assert hist["status"]["status_str"] == "error" and errors, hist["status"]
    assert "Loader" in errors[0]["node_type"], errors[0]
    assert not hist.get("outputs"), hist["outputs"]


def test_examples_are_listed_as_workflow_templates(server):
    """ComfyUI's template browser lists example_workflows/ of the pack's folder."""
    templates = server.get("/workflow_templates")
    assert sorted(templates.get(PACK_NAME, [])) == sorted(Path(n).stem for n in EXAMPLE_NAMES), templates


# ------------------------------------------------------------------------------------------------
# Negative cases: the checks above can fail
# ------------------------------------------------------------------------------------------------
NEG = "flux_dev_distorch2_unet_clip_on_second_gpu.json"


def _node(ui, node_type):
    return next(n for n in ui["nodes"] if n["type"] == node_type)


def _rename_node(ui):
    _node(ui, "UNETLoaderDisTorch2MultiGPU")["type"] = "UNETLoaderDisTorch2MultiGPUx"
    return "UNETLoaderDisTorch2MultiGPUx"


def _unlinked_required_input(ui):
    next(i for i in _node(ui, "KSampler")["inputs"] if i["name"] == "model")["link"] = None
    return "required_input_missing"


def _link_wrong_output(ui):
    """The sampler's model link re-pointed at the VAE loader's output (a VAE where a MODEL goes)."""
    ks, vae = _node(ui, "KSampler"), _node(ui, "VAELoader")
    lid = next(i for i in ks["inputs"] if i["name"] == "model")["link"]
    link = next(li for li in ui["links"] if li[0] == lid)
    link[1], link[2] = vae["id"], 0
    return "mismatch"


def _bad_combo_value(ui):
    _node(ui, "KSampler")["widgets_values"][4] = "euler_but_wrong"
    return "euler_but_wrong"


def _missing_model_file(ui):
    _node(ui, "UNETLoaderDisTorch2MultiGPU")["widgets_values"][0] = "not_there.safetensors"
    return "not_there.safetensors"


@pytest.mark.parametrize("mutate", [_rename_node, _unlinked_required_input, _link_wrong_output, _bad_combo_value,
                                    _missing_model_file])
def test_validation_refuses_a_broken_workflow(server, object_info, devices, mutate):
    ui = load(NEG)
    expect = mutate(ui)
    status, body = submit(server, object_info, devices, ui)
    assert status == 400, f"{mutate.__name__}: accepted ({status}): {json.dumps(body)[:2000]}"
    assert expect in json.dumps(body), f"{mutate.__name__}: {json.dumps(body, indent=1)[:3000]}"


def test_validation_refuses_a_device_that_does_not_exist(server, object_info, devices):
    """Device names are mapped to this machine's before submitting; an unknown one is still refused."""
    prompt = map_devices(ui_to_api(load(NEG), object_info), devices)
    nid = next(k for k, n in prompt.items() if n["class_type"] == "UNETLoaderDisTorch2MultiGPU")
    prompt[nid]["inputs"]["donor_device"] = "tpu:0"
    status, body = server.post("/prompt", {"prompt": prompt, "client_id": "distorch-example-tests"})
    assert status == 400 and nid in body["node_errors"] and "tpu:0" in json.dumps(body["node_errors"][nid]), body


def _drop_widget_value(ui):
    _node(ui, "UNETLoaderDisTorch2MultiGPU")["widgets_values"].pop()  # as if the node lost an input


def _unknown_input_name(ui):
    """A linked input the node does not declare (the server alone would ignore an extra optional input)."""
    node = _node(ui, "UNETLoaderDisTorch2MultiGPU")
    node["inputs"].append({"name": "virtual_vram", "type": "FLOAT", "widget": {"name": "virtual_vram"}, "link": None})


def _rename_linked_input(ui):
    next(i for i in _node(ui, "KSampler")["inputs"] if i["name"] == "model")["name"] = "modle"


def _dangling_link(ui):
    _node(ui, "KSampler")["inputs"][0]["link"] = 999


@pytest.mark.parametrize("mutate", [_drop_widget_value, _unknown_input_name, _rename_linked_input, _dangling_link])
def test_conversion_refuses_a_workflow_that_does_not_fit_the_nodes(object_info, mutate):
    ui = load(NEG)
    ui_to_api(ui, object_info)  # the original converts
    mutate(ui)
    with pytest.raises(ConversionError):
        ui_to_api(ui, object_info)


def test_widget_order_follows_object_info_with_seed_control(object_info):
    """KSampler: seed, its control_after_generate value, then the rest; links replace sockets."""
    api = ui_to_api(load(NEG), object_info)
    ks = next(n for n in api.values() if n["class_type"] == "KSampler")
    assert ks["inputs"]["seed"] == 0 and ks["inputs"]["steps"] == 20 and ks["inputs"]["cfg"] == 1.0
    assert ks["inputs"]["sampler_name"] == "euler" and ks["inputs"]["denoise"] == 1.0
    assert all(isinstance(ks["inputs"][k], list) for k in ("model", "positive", "negative", "latent_image"))
    unet = next(n for n in api.values() if n["class_type"] == "UNETLoaderDisTorch2MultiGPU")["inputs"]
    assert unet == {"unet_name": "flux1-dev.safetensors", "weight_dtype": "default", "compute_device": "cuda:0",
                    "virtual_vram_gb": 10.0, "donor_device": "cpu", "expert_mode_allocations": "",
                    "eject_models": True}
    clip = next(n for n in api.values() if n["class_type"] == "DualCLIPLoaderMultiGPU")["inputs"]
    assert clip["device"] == "cuda:1" and clip["type"] == "flux"  # the text encoders on a second device


def test_wan_experts_split_the_steps(object_info):
    """High-noise expert: steps 0..k with leftover noise; low-noise expert: k..end on its latent, no new noise."""
    api = ui_to_api(load("wan2_2_t2v_two_experts_distorch2.json"), object_info)
    samplers = [(nid, n["inputs"]) for nid, n in api.items() if n["class_type"] == "KSamplerAdvanced"]
    (hid, high), (_lid, low) = sorted(samplers, key=lambda s: s[1]["start_at_step"])
    assert high["add_noise"] == "enable" and high["return_with_leftover_noise"] == "enable"
    assert low["add_noise"] == "disable" and low["return_with_leftover_noise"] == "disable"
    assert high["start_at_step"] == 0 and high["end_at_step"] == low["start_at_step"] < high["steps"] == low["steps"]
    assert low["latent_image"] == [hid, 0]
    experts = {api[m["model"][0]]["inputs"]["model"][0] for m in (high, low)}  # through ModelSamplingSD3
    names = sorted(api[e]["inputs"]["unet_name"] for e in experts)
    assert [n.split("_")[2] for n in names] == ["high", "low"], names


# ------------------------------------------------------------------------------------------------
# Packaging: requirements.txt and the registry metadata
# ------------------------------------------------------------------------------------------------
def _req_names(path):
    names = set()
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(re.split(r"[<>=~!\[; ]", line, maxsplit=1)[0].lower().replace("_", "-"))
    return names


def test_requirements_txt_adds_what_comfyui_lacks_and_never_torch():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = {re.split(r"[<>=~!\[; ]", d, maxsplit=1)[0].lower() for d in pyproject["project"]["dependencies"]}
    ours = _req_names(REPO / "requirements.txt")
    assert not ours & {"torch", "torchvision", "torchaudio"}, ours
    assert ours <= deps, f"requirements.txt names packages the library does not depend on: {ours - deps}"
    comfy_req = COMFY_DIR / "requirements.txt"
    if not comfy_req.is_file():
        require_comfy()
    missing = deps - {"torch"} - ours - _req_names(comfy_req)
    assert not missing, f"neither ComfyUI nor requirements.txt installs {missing}"
    assert {"gguf", "networkx"} <= ours


def test_registry_metadata_reads_through_comfyuis_parser():
    require_comfy()
    if str(COMFY_DIR) not in sys.path:
        sys.path.insert(0, str(COMFY_DIR))
    from comfy_config import config_parser

    cfg = config_parser.extract_node_configuration(str(REPO))
    assert cfg.tool_comfy.publisher_id and cfg.tool_comfy.display_name and cfg.tool_comfy.icon
    assert cfg.project.name and not cfg.project.name.lower().startswith("comfyui")
