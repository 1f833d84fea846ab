"""Saved API-format workflows (tests/workflows/) mapped to this machine: model file names to the test
models (comfy_models.FILES), device names to the devices that exist here, sizes and steps shrunk for CPU.
"""
import json
from pathlib import Path

from comfy_models import FILES

WORKFLOWS = Path(__file__).resolve().parent / "workflows"
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
