"""Test harness for the node pack against a REAL ComfyUI (0.3.75, set up by .ci/setup_comfyui.sh).

- `comfy_available()` / `require_comfy()`: skip when ComfyUI is not set up, or FAIL when the
  environment says it must be there (DISTORCH_REQUIRE_COMFYUI=1, as CI sets it).
- `ComfyInProcess`: ComfyUI imported into this process on CPU (import order as main.py), builtin
  extra nodes loaded, this pack loaded the way ComfyUI loads any custom-node folder.
- `ComfyServer`: a real headless `main.py --cpu` server with this pack in its custom_nodes/.
- `make_models(base)`: random-weight model files ComfyUI detects (an SD1.5-architecture checkpoint
  with a reduced UNet, plus the same parts as separate UNet / CLIP-L / VAE files, and a tiny .gguf).
- `map_workflow(...)`: map a saved workflow's model file names and devices to what exists here.
"""
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMFY_DIR = Path(os.environ.get("DISTORCH_COMFYUI_DIR", REPO / ".comfy" / "ComfyUI"))
PACK_NAME = "ComfyUI-DisTorch"  # the folder name users clone into (a dash: not importable by name)
WORKFLOWS = Path(__file__).resolve().parent / "workflows"

REQUIRED_MODULES = ("torch", "torchvision", "transformers", "aiohttp", "av", "torchsde", "safetensors", "yaml")


def comfy_missing_reason():
    """None when a usable ComfyUI is set up, else why not."""
    if not (COMFY_DIR / "main.py").is_file():
        return f"ComfyUI not found at {COMFY_DIR} (run .ci/setup_comfyui.sh VENV)"
    import importlib.util
    missing = [m for m in REQUIRED_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"ComfyUI's requirements missing in {sys.executable}: {', '.join(missing)} (run .ci/setup_comfyui.sh)"
    return None


def require_comfy():
    import pytest
    reason = comfy_missing_reason()
    if reason is None:
        return
    if os.environ.get("DISTORCH_REQUIRE_COMFYUI") == "1":
        pytest.fail(f"DISTORCH_REQUIRE_COMFYUI=1 but {reason}", pytrace=False)
    pytest.skip(reason)


def progress(msg):
    print(f"[comfy_harness] {msg}", file=sys.stderr, flush=True)


MODEL_FOLDERS = {"checkpoints": "checkpoints", "diffusion_models": "unet", "text_encoders": "text_encoders",
                 "vae": "vae", "controlnet": "controlnet", "clip_vision": "clip_vision", "diffusers": "diffusers"}


def install_pack(base):
    """base/custom_nodes/ComfyUI-DisTorch -> the repository root, as a user's clone would sit there."""
    link = Path(base) / "custom_nodes" / PACK_NAME
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return link


def make_frontend(base):
    fe = Path(base) / "frontend"
    fe.mkdir(parents=True, exist_ok=True)
    (fe / "index.html").write_text("<!doctype html><title>headless test</title>\n")
    return fe


# ------------------------------------------------------------------------------------------------
# In-process ComfyUI
# ------------------------------------------------------------------------------------------------
class ComfyInProcess:
    """ComfyUI imported into this process (CPU), with this pack loaded from base/custom_nodes."""

    def __init__(self, base):
        self.base = Path(base)
        path = str(COMFY_DIR)
        if path not in sys.path:
            sys.path.insert(0, path)
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = True
        args.base_directory = str(self.base)
        args.disable_all_custom_nodes = False
        import utils.extra_config  # noqa: F401  (before `nodes`, as main.py does, else utils = comfy/utils.py)
        import comfy.model_management  # noqa: F401
        import nodes
        import folder_paths
        self.nodes = nodes
        self.folder_paths = folder_paths
        # Another test may have imported ComfyUI first (base directory already fixed): point the
        # folders this harness uses at `base` explicitly.
        for name, sub in MODEL_FOLDERS.items():
            path = self.base / "models" / sub
            path.mkdir(parents=True, exist_ok=True)
            folder_paths.add_model_folder_path(name, str(path), is_default=True)
        for sub, setter in (("input", folder_paths.set_input_directory), ("output", folder_paths.set_output_directory),
                            ("temp", folder_paths.set_temp_directory)):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
            setter(str(self.base / sub))
        if "TripleCLIPLoader" not in nodes.NODE_CLASS_MAPPINGS:  # builtin extra nodes not loaded yet
            t = time.time()
            asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
            progress(f"ComfyUI builtin nodes loaded in {time.time() - t:.1f}s")
        self.pack_path = install_pack(self.base)
        before = set(nodes.NODE_CLASS_MAPPINGS)
        ok = asyncio.run(nodes.load_custom_node(str(self.pack_path), ignore=set(), module_parent="custom_nodes"))
        if not ok:
            raise RuntimeError(f"ComfyUI failed to load {self.pack_path} (see the log above)")
        self.pack_nodes = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
        self.pack_module = sys.modules[str(self.pack_path).replace(".", "_x_")]

    def validate(self, prompt):
        """ComfyUI's own validation of an API-format prompt: (valid, error, node_errors)."""
        import execution
        valid, error, _outputs, node_errors = asyncio.run(execution.validate_prompt("test", prompt, None))
        return valid, error, node_errors


# ------------------------------------------------------------------------------------------------
# Server
# ------------------------------------------------------------------------------------------------
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """`python main.py --cpu ...` in a subprocess; stdout+stderr go to base/server.log."""

    def __init__(self, base, timeout=180.0):
        self.base = Path(base)
        install_pack(self.base)
        fe = make_frontend(self.base)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self._log = open(self.log_path, "wb")
        cmd = [sys.executable, str(COMFY_DIR / "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--front-end-root", str(fe)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t = time.time()
        self.proc = subprocess.Popen(cmd, cwd=str(COMFY_DIR), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"ComfyUI server exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    self.get("/system_stats", timeout=2)
                    break
                except (urllib.error.URLError, ConnectionError, OSError):
                    pass
                if time.time() - t > timeout:
                    raise RuntimeError(f"ComfyUI server not up after {timeout:.0f}s:\n{self.log_tail()}")
                time.sleep(0.5)
        except BaseException:
            self.stop()
            raise
        self.startup_s = time.time() - t
        progress(f"ComfyUI server up on port {self.port} in {self.startup_s:.1f}s")

    def log_text(self):
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def log_tail(self, n=6000):
        return self.log_text()[-n:]

    def get(self, path, timeout=30):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, payload, timeout=30):
        """(status, json body) of a POST; HTTP errors return their body instead of raising."""
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
                return r.status, (json.loads(body) if body else None)
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def run(self, prompt, timeout=300):
        """Queue a prompt and wait for it; returns its /history entry. Raises on validation errors."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": "distorch-tests"})
        if status != 200:
            raise AssertionError(f"/prompt refused the workflow ({status}): {json.dumps(body, indent=1)[:4000]}")
        pid = body["prompt_id"]
        t = time.time()
        while time.time() - t < timeout:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                st = hist[pid]["status"]
                if st.get("status_str") != "success" or not st.get("completed"):
                    raise AssertionError(f"prompt {pid} failed: {json.dumps(st)[:4000]}\n{self.log_tail()}")
                return hist[pid]
            if self.proc.poll() is not None:
                raise AssertionError(f"server died while running the prompt:\n{self.log_tail()}")
            time.sleep(0.3)
        raise AssertionError(f"prompt {pid} did not finish in {timeout}s:\n{self.log_tail()}")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


# ------------------------------------------------------------------------------------------------
# Random-weight model files ComfyUI detects
# ------------------------------------------------------------------------------------------------
# SD1.5 is recognised by model_channels 320, context_dim 768, no linear-in-transformer, no adm: the
# depth of the UNet is read from the keys, so two levels of one block each still load as SD1.5.
TINY_SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1],
                      channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
                      transformer_depth_middle=1, use_spatial_transformer=True, context_dim=768, num_heads=8,
                      num_head_channels=-1, legacy=False, use_linear_in_transformer=False, adm_in_channels=None)
SD_VAE = {'double_z': True, 'z_channels': 4, 'resolution': 256, 'in_channels': 3, 'out_ch': 3, 'ch': 128,
          'ch_mult': [1, 2, 4, 4], 'num_res_blocks': 2, 'attn_resolutions': [], 'dropout': 0.0}

FILES = {
    "checkpoint": "tiny_sd15.safetensors",
    "unet": "tiny_sd15_unet.safetensors",
    "clip": "tiny_clip_l.safetensors",
    "vae": "tiny_sd_vae.safetensors",
    "unet_gguf": "tiny_unet.gguf",
    "image": "tiny.png",
}


def _shapes(module):
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


def _random_state(shapes, seed, dtype):
    """Seeded random tensors: norms at identity, biases 0, other weights N(0, 0.02) (finite, tame)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, (shape, src_dtype) in sorted(shapes.items()):
        if not src_dtype.is_floating_point:
            out[k] = torch.zeros(shape, dtype=src_dtype)
            continue
        leaf = k.rsplit(".", 1)[-1]
        if leaf == "bias":
            t = torch.zeros(shape)
        elif "norm" in k and leaf == "weight" and len(shape) == 1:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=g) * 0.02
        out[k] = t.to(dtype).contiguous()
    return out


def make_models(base, seed=0):
    """Write random-weight model files under base/models (and an input image). Needs ComfyUI importable
    (ComfyInProcess first): the architectures come from ComfyUI's own classes, built on the meta device."""
    import torch
    from safetensors.torch import save_file
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.ldm.models.autoencoder import AutoencoderKL
    import comfy.sd1_clip
    import comfy.ops

    t = time.time()
    models = Path(base) / "models"
    for sub in MODEL_FOLDERS.values():
        (models / sub).mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        unet = _shapes(UNetModel(**TINY_SD15_UNET, operations=comfy.ops.disable_weight_init))
        clip = _shapes(comfy.sd1_clip.SDClipModel(device="meta"))
        vae = _shapes(AutoencoderKL(ddconfig=SD_VAE, embed_dim=4))
    fp16 = torch.float16
    unet_sd = _random_state(unet, seed, fp16)
    clip_sd = _random_state(clip, seed + 1, fp16)
    vae_sd = _random_state(vae, seed + 2, fp16)
    ckpt = {}
    ckpt.update({"model.diffusion_model." + k: v for k, v in unet_sd.items()})
    ckpt.update({"cond_stage_model." + k: v for k, v in clip_sd.items()})
    ckpt.update({"first_stage_model." + k: v for k, v in vae_sd.items()})
    save_file(ckpt, str(models / "checkpoints" / FILES["checkpoint"]))
    save_file(unet_sd, str(models / "unet" / FILES["unet"]))
    # A text-encoder file holds the transformers-format keys (text_model.*, text_projection.*).
    save_file({k[len("transformer."):]: v for k, v in clip_sd.items() if k.startswith("transformer.")},
              str(models / "text_encoders" / FILES["clip"]))
    save_file(vae_sd, str(models / "vae" / FILES["vae"]))
    _write_tiny_gguf(models / "unet" / FILES["unet_gguf"])
    inp = Path(base) / "input"
    inp.mkdir(parents=True, exist_ok=True)
    from PIL import Image
    Image.new("RGB", (64, 64), (120, 30, 200)).save(inp / FILES["image"])
    n = sum(v.numel() for v in ckpt.values())
    progress(f"random-weight models written ({n / 1e6:.0f} M parameters) in {time.time() - t:.1f}s")
    return models


def _write_tiny_gguf(path):
    import numpy as np
    import gguf
    w = gguf.GGUFWriter(str(path), "sd1")
    w.add_tensor("input_blocks.0.0.weight", np.zeros((8, 4, 3, 3), dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# ------------------------------------------------------------------------------------------------
# Saved workflows -> this machine
# ------------------------------------------------------------------------------------------------
DEVICE_INPUTS = {"device", "compute_device", "donor_device", "unet_device", "clip_device", "vae_device",
                 "unet_compute_device", "clip_compute_device", "unet_donor_device", "clip_donor_device"}


def map_device(value, devices):
    """A saved device name -> one that exists: kept if present, a missing GPU -> the first GPU here,
    else cpu."""
    if value in devices:
        return value
    gpus = [d for d in devices if d != "cpu"]
    if str(value).startswith("cuda") and gpus:
        return gpus[0]
    return "cpu" if "cpu" in devices else devices[0]


def map_workflow(prompt, devices):
    """Copy of an API-format workflow with model files and devices replaced by what exists here."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        gguf = "GGUF" in node["class_type"]
        for key, value in list(node["inputs"].items()):
            if isinstance(value, list):  # a link
                continue
            if key in DEVICE_INPUTS:
                node["inputs"][key] = map_device(value, devices)
            elif key == "ckpt_name":
                node["inputs"][key] = FILES["checkpoint"]
            elif key == "unet_name":
                node["inputs"][key] = FILES["unet_gguf"] if gguf else FILES["unet"]
            elif key == "vae_name":
                node["inputs"][key] = FILES["vae"]
            elif key in ("clip_name", "clip_name1", "clip_name2", "clip_name3", "clip_name4"):
                node["inputs"][key] = FILES["clip"]
            elif key == "image" and node["class_type"] == "LoadImage":
                node["inputs"][key] = FILES["image"]
    return out


def load_workflow(name):
    return json.loads((WORKFLOWS / name).read_text())


def shrink_for_cpu(prompt, size=64, steps=2):
    """Tiny latents and few steps so a run takes seconds on CPU."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs["width"] = inputs["height"] = size
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            inputs["steps"] = steps
    return out


# ------------------------------------------------------------------------------------------------
# What COMPAT.md promises (../shared/COMPAT.md), listed explicitly
# ------------------------------------------------------------------------------------------------
CORE_BASE = {  # core loader -> (its inputs users' workflows set, its outputs)
    "UNETLoader": (["unet_name", "weight_dtype"], ["MODEL"]),
    "VAELoader": (["vae_name"], ["VAE"]),
    "CLIPLoader": (["clip_name", "type"], ["CLIP"]),
    "DualCLIPLoader": (["clip_name1", "clip_name2", "type"], ["CLIP"]),
    "TripleCLIPLoader": (["clip_name1", "clip_name2", "clip_name3"], ["CLIP"]),
    "QuadrupleCLIPLoader": (["clip_name1", "clip_name2", "clip_name3", "clip_name4"], ["CLIP"]),
    "CLIPVisionLoader": (["clip_name"], ["CLIP_VISION"]),
    "CheckpointLoaderSimple": (["ckpt_name"], ["MODEL", "CLIP", "VAE"]),
    "ControlNetLoader": (["control_net_name"], ["CONTROL_NET"]),
    "DiffusersLoader": (["model_path"], ["MODEL", "CLIP", "VAE"]),
    "DiffControlNetLoader": (["model", "control_net_name"], ["CONTROL_NET"]),
}
CLIP_FAMILY = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader", "CLIPVisionLoader"}
GGUF_BASE = {
    "UnetLoaderGGUF": (["unet_name"], ["MODEL"]),
    "UnetLoaderGGUFAdvanced": (["unet_name", "dequant_dtype", "patch_dtype", "patch_on_device"], ["MODEL"]),
    "CLIPLoaderGGUF": (["clip_name", "type"], ["CLIP"]),
    "DualCLIPLoaderGGUF": (["clip_name1", "clip_name2", "type"], ["CLIP"]),
    "TripleCLIPLoaderGGUF": (["clip_name1", "clip_name2", "clip_name3"], ["CLIP"]),
    "QuadrupleCLIPLoaderGGUF": (["clip_name1", "clip_name2", "clip_name3", "clip_name4"], ["CLIP"]),
}
COMBO = "COMBO"


def _d2_extra(device_key, eject):
    return {
        device_key: (COMBO, {"default": "<gpu-or-cpu>"}),
        "virtual_vram_gb": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 128.0, "step": 0.1}),
        "donor_device": (COMBO, {"default": "cpu"}),
        "expert_mode_allocations": ("STRING", {"default": ""}),
        "eject_models": ("BOOLEAN", {"default": eject}),
    }


def expected_nodes():
    """name -> dict(category, outputs, inputs: {input: (type, {option: value}) or None = any})."""
    exp = {}
    dev = {"device": (COMBO, {"default": "<gpu-or-cpu>"})}
    for stem, (names, outs) in CORE_BASE.items():
        base = {n: None for n in names}
        exp[f"{stem}MultiGPU"] = dict(category="multigpu", outputs=outs, inputs={**base, **dev})
        clip = stem in CLIP_FAMILY
        exp[f"{stem}DisTorch2MultiGPU"] = dict(
            category="multigpu/distorch_2", outputs=outs,
            inputs={**base, **_d2_extra("device" if clip else "compute_device", not clip)})
    for stem, (names, outs) in GGUF_BASE.items():
        base = {n: None for n in names}
        if "dequant_dtype" in base:
            base.update(dequant_dtype=(COMBO, {"default": "default"}), patch_dtype=(COMBO, {"default": "default"}),
                        patch_on_device=("BOOLEAN", {"default": False}))
        clip = "CLIP" in stem
        exp[f"{stem}MultiGPU"] = dict(category="multigpu", outputs=outs, inputs={**base, **dev})
        exp[f"{stem}DisTorch2MultiGPU"] = dict(
            category="multigpu/distorch_2", outputs=outs,
            inputs={**base, **_d2_extra("device" if clip else "compute_device", not clip)})
        exp[f"{stem}DisTorchMultiGPU"] = dict(category="multigpu", outputs=outs, inputs={
            **base, **dev, "virtual_vram_gb": ("FLOAT", {"default": 4.0, "min": 0.0}),
            "use_other_vram": ("BOOLEAN", {"default": False}), "expert_mode_allocations": ("STRING", {"default": ""})})
    exp["CheckpointLoaderAdvancedMultiGPU"] = dict(category="multigpu", outputs=["MODEL", "CLIP", "VAE"], inputs={
        "ckpt_name": None, "unet_device": (COMBO, {"default": "<gpu-or-cpu>"}),
        "clip_device": (COMBO, {"default": "<gpu-or-cpu>"}), "vae_device": (COMBO, {"default": "<gpu-or-cpu>"})})
    exp["CheckpointLoaderAdvancedDisTorch2MultiGPU"] = dict(
        category="multigpu/distorch_2", outputs=["MODEL", "CLIP", "VAE"], inputs={
            "ckpt_name": None,
            "unet_compute_device": (COMBO, {"default": "<gpu-or-cpu>"}),
            "unet_virtual_vram_gb": ("FLOAT", {"default": 4.0, "min": 0.0, "max": 128.0, "step": 0.1}),
            "unet_donor_device": None,
            "clip_compute_device": (COMBO, {"default": "cpu"}),
            "clip_virtual_vram_gb": ("FLOAT", {"default": 2.0, "min": 0.0, "max": 128.0, "step": 0.1}),
            "clip_donor_device": None,
            "vae_device": (COMBO, {"default": "<gpu-or-cpu>"}),
            "unet_expert_mode_allocations": ("STRING", {"default": ""}),
            "clip_expert_mode_allocations": ("STRING", {"default": ""}),
            "high_precision_loras": ("BOOLEAN", {"default": True}),
            "eject_models": ("BOOLEAN", {"default": True}),
        })
    exp["DeviceSelectorMultiGPU"] = dict(category="multigpu", outputs=None,
                                         inputs={"device": (COMBO, {"default": "<gpu-or-cpu>"})})
    return exp


def spec_problems(name, expected, inputs, outputs, category, devices):
    """Differences between a node as ComfyUI shows it and what COMPAT.md promises (empty = fine).

    `inputs` is INPUT_TYPES()-shaped ({"required": {...}, "optional": {...}}), specs as tuples or lists;
    a combo may be given as a list of options or as ("COMBO", {"options": [...]})."""
    gpu_or_cpu = next((d for d in devices if d != "cpu"), "cpu")
    flat = {}
    for section in ("required", "optional"):
        flat.update(inputs.get(section, {}) or {})
    bad = []
    if category != expected["category"]:
        bad.append(f"{name}: category {category!r} != {expected['category']!r}")
    if expected["outputs"] is not None and list(outputs) != list(expected["outputs"]):
        bad.append(f"{name}: outputs {list(outputs)} != {expected['outputs']}")
    for key, spec in flat.items():
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if not opts.get("tooltip"):
            bad.append(f"{name}.{key}: no tooltip")
    for key, want in expected["inputs"].items():
        if key not in flat:
            bad.append(f"{name}: input {key!r} missing (has {sorted(flat)})")
            continue
        if want is None:
            continue
        spec = flat[key]
        typ = COMBO if isinstance(spec[0], (list, tuple)) else spec[0]
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if typ != want[0]:
            bad.append(f"{name}.{key}: type {typ!r} != {want[0]!r}")
        for o, v in want[1].items():
            v = gpu_or_cpu if v == "<gpu-or-cpu>" else v
            if opts.get(o) != v:
                bad.append(f"{name}.{key}: {o}={opts.get(o)!r}, COMPAT says {v!r}")
        if typ == COMBO:
            options = spec[0] if isinstance(spec[0], (list, tuple)) else opts.get("options", [])
            if key.endswith("device") and list(options) != list(devices):
                bad.append(f"{name}.{key}: device options {options} != {devices}")
    return bad


# ---------------------------------------------------------------------------------------------
# In-process ComfyUI (for tests that call node functions directly)
# ---------------------------------------------------------------------------------------------
def boot_inprocess():
    """Skip (or fail under DISTORCH_REQUIRE_COMFYUI=1) without ComfyUI; else import it the way main.py
    does, on CPU, once per process. Returns (comfy.model_management, nodes, folder_paths)."""
    import pytest
    reason = comfy_missing_reason()
    if reason is not None:
        if os.environ.get("DISTORCH_REQUIRE_COMFYUI") == "1":
            raise RuntimeError(f"DISTORCH_REQUIRE_COMFYUI=1 but {reason}")
        pytest.skip(reason, allow_module_level=True)
    if "comfy.model_management" not in sys.modules:
        if str(COMFY_DIR) not in sys.path:
            sys.path.insert(0, str(COMFY_DIR))
        import comfy.options
        comfy.options.enable_args_parsing(False)
        from comfy.cli_args import args
        args.cpu = True
        import utils.extra_config  # noqa: F401  (before `nodes`, else `utils` is comfy/utils.py)
    import comfy.model_management as mm
    import nodes
    import folder_paths
    return mm, nodes, folder_paths


def unet_lora_dirs(tmp_path_factory, name: str):
    """A fresh `diffusion_models` and `loras` folder under a temporary `name` folder, registered with
    ComfyUI's folder_paths (files written there later are listed: it re-reads a folder whose mtime changed)."""
    import folder_paths
    root = tmp_path_factory.mktemp(name)
    unet_dir, lora_dir = root / "diffusion_models", root / "loras"
    unet_dir.mkdir()
    lora_dir.mkdir()
    folder_paths.add_model_folder_path("diffusion_models", str(unet_dir))
    folder_paths.add_model_folder_path("loras", str(lora_dir))
    return unet_dir, lora_dir


def plain_unet(name):
    """ComfyUI's own UNETLoader (default weight dtype)."""
    import nodes
    return nodes.UNETLoader().load_unet(name, "default")[0]


def distorch_unet(name, vram_gb=100.0):
    """The same file through this pack's UNETLoaderDisTorch2MultiGPU node, computing on the CPU, donor cpu."""
    from distorch.comfy_nodes import nodes as pack_nodes
    cls = pack_nodes.build()["UNETLoaderDisTorch2MultiGPU"]
    return cls().load(unet_name=name, weight_dtype="default", compute_device="cpu", virtual_vram_gb=vram_gb,
                      donor_device="cpu", expert_mode_allocations="", eject_models=False)[0]


def lora(model, name, strength=1.0):
    """ComfyUI's own LoraLoaderModelOnly."""
    import nodes
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def plain_lora_refs(unet, lora_name, strengths=(1.0, 0.5)):
    """The plain loader's latents with the LoRA at each strength and without it (key 0.0); ComfyUI's models are
    unloaded again afterwards, so the DisTorch loads that follow start from nothing."""
    import comfy.model_management as mm
    plain = plain_unet(unet)
    refs = {s: ksample(lora(plain, lora_name, s)) for s in strengths}
    refs[0.0] = ksample(plain)
    mm.unload_all_models()
    return refs


def sd3_conditioning():
    """Fixed (positive, negative) conditioning for the tiny SD3-style test models (context 32, pooled 64)."""
    import torch
    pos = [[torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)),
            {"pooled_output": torch.randn(1, 64, generator=torch.Generator().manual_seed(2))}]]
    neg = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 64)}]]
    return pos, neg


def ksample(model, seed=42, steps=2):
    """Two euler steps of ComfyUI's own KSampler on a tiny 16-channel latent; returns the latent."""
    import torch
    import nodes
    pos, neg = sd3_conditioning()
    lat = {"samples": torch.zeros(1, 16, 8, 8)}
    return nodes.KSampler().sample(model, seed, steps, 3.0, "euler", "normal", pos, neg, lat)[0]["samples"]


def tiny_mmdit_state(depth: int = 2, seed: int = 0) -> dict:
    """Random weights (fp32, x0.05) of a tiny SD3-style MMDiT that ComfyUI detects as SD3: hidden 64 x depth,
    16 latent channels; built on meta from ComfyUI's own class (needs ComfyUI importable)."""
    import torch
    from comfy.ldm.modules.diffusionmodules.mmdit import MMDiT
    import comfy.ops
    m = MMDiT(input_size=None, patch_size=2, in_channels=16, depth=depth, out_channels=16, adm_in_channels=64,
              context_embedder_config={"target": "torch.nn.Linear",
                                       "params": {"in_features": 32, "out_features": 64 * depth}},
              pos_embed_max_size=8, num_patches=64, operations=comfy.ops.disable_weight_init,
              dtype=torch.float32, device="meta")
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(tuple(v.shape), generator=g) * 0.05 for k, v in m.state_dict().items()}


def save_tiny_lora(sd: dict, path: str, rank: int = 4, seed: int = 5) -> None:
    """A random LoRA (ComfyUI's lora_up / lora_down keys, x0.1) on every 2-D weight of the joint blocks of
    the tiny MMDiT state `sd`, saved to `path` (.safetensors)."""
    import torch
    import safetensors.torch
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and "joint_blocks" in k:
            base = "diffusion_model." + k[: -len(".weight")]
            lora[base + ".lora_up.weight"] = torch.randn(v.shape[0], rank, generator=g) * 0.1
            lora[base + ".lora_down.weight"] = torch.randn(rank, v.shape[1], generator=g) * 0.1
    safetensors.torch.save_file(lora, path)
