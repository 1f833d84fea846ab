"""What COMPAT.md promises about the pack's nodes (names, categories, inputs, outputs, defaults), listed
explicitly, and the differences between a node as ComfyUI shows it and that promise.
"""

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
