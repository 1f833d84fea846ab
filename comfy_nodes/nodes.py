"""The node families users' saved workflows name (../shared/COMPAT.md), built at start-up.

Core loaders' wrappers are generated from ComfyUI's own node classes (comfy_api.core_node_class), other
packs' wrappers from the installed pack's classes, so their inputs never go stale. Our GGUF nodes do
not need ComfyUI-GGUF: without it they stand on the native GGUF base classes below (same input names
and defaults as ComfyUI-GGUF's); with it they are generated from its classes instead.
"""
from __future__ import annotations

import logging
from typing import Any

from . import registry as R

log = logging.getLogger("distorch.comfy.nodes")
# ComfyUI's objects (MODEL, CLIP, VAE) are typed Any: ComfyUI ships no types.

# name -> core loader (device selector `...MultiGPU` and `...DisTorch2MultiGPU` twins)
CORE_LOADERS = {
    "UNETLoader": "UNETLoader",
    "VAELoader": "VAELoader",
    "CLIPLoader": "CLIPLoader",
    "DualCLIPLoader": "DualCLIPLoader",
    "TripleCLIPLoader": "TripleCLIPLoader",
    "QuadrupleCLIPLoader": "QuadrupleCLIPLoader",
    "CLIPVisionLoader": "CLIPVisionLoader",
    "CheckpointLoaderSimple": "CheckpointLoaderSimple",
    "ControlNetLoader": "ControlNetLoader",
    "DiffusersLoader": "DiffusersLoader",
    "DiffControlNetLoader": "DiffControlNetLoader",
}
# Text encoders: the DisTorch2 device input is `device`, eject_models defaults to False.
CLIP_LOADERS = {"CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader", "QuadrupleCLIPLoader", "CLIPVisionLoader"}

# GGUF families: our node stem -> ComfyUI-GGUF's class name (also our native base's role).
GGUF_LOADERS = {
    "UnetLoaderGGUF": "UnetLoaderGGUF",
    "UnetLoaderGGUFAdvanced": "UnetLoaderGGUFAdvanced",
    "CLIPLoaderGGUF": "CLIPLoaderGGUF",
    "DualCLIPLoaderGGUF": "DualCLIPLoaderGGUF",
    "TripleCLIPLoaderGGUF": "TripleCLIPLoaderGGUF",
    "QuadrupleCLIPLoaderGGUF": "QuadrupleCLIPLoaderGGUF",
}

# Other packs: our node -> that pack's node class, registered only when the pack's class exists.
PACK_WRAPPERS = {
    "ComfyUI-WanVideoWrapper": {
        "WanVideoModelLoaderMultiGPU": "WanVideoModelLoader",
        "WanVideoVAELoaderMultiGPU": "WanVideoVAELoader",
        "WanVideoTinyVAELoaderMultiGPU": "WanVideoTinyVAELoader",
        "LoadWanVideoT5TextEncoderMultiGPU": "LoadWanVideoT5TextEncoder",
        "LoadWanVideoClipTextEncoderMultiGPU": "LoadWanVideoClipTextEncoder",
        "WanVideoTextEncodeMultiGPU": "WanVideoTextEncode",
        "WanVideoBlockSwapMultiGPU": "WanVideoBlockSwap",
        "WanVideoSamplerMultiGPU": "WanVideoSampler",
    },
    "ComfyUI-Florence2": {
        "Florence2ModelLoaderMultiGPU": "Florence2ModelLoader",
        "DownloadAndLoadFlorence2ModelMultiGPU": "DownloadAndLoadFlorence2Model",
    },
    "ComfyUI-LTXVideo": {"LTXVLoaderMultiGPU": "LTXVLoader"},
    "ComfyUI_bitsandbytes_NF4": {"CheckpointLoaderNF4MultiGPU": "CheckpointLoaderNF4"},
    "x-flux-comfyui": {"LoadFluxControlNetMultiGPU": "LoadFluxControlNet"},
    "ComfyUI-HunyuanVideoWrapper": {
        "HyVideoModelLoaderMultiGPU": "HyVideoModelLoader",
        "HyVideoVAELoaderMultiGPU": "HyVideoVAELoader",
        "DownloadAndLoadHyVideoTextEncoderMultiGPU": "DownloadAndLoadHyVideoTextEncoder",
    },
}

GGUF_DTYPES = ["default", "target", "float32", "float16", "bfloat16"]


# ---------------------------------------------------------------------------------------------
# Native GGUF base classes (used when ComfyUI-GGUF is not installed)
# ---------------------------------------------------------------------------------------------
def gguf_filenames(kind: str) -> list[str]:
    """.gguf files of the diffusion-model ('unet') or text-encoder ('clip') model folders."""
    return R.backend().gguf_filenames(kind)


def gguf_clip_filenames() -> list[str]:
    return R.backend().gguf_clip_filenames()


def _gguf_path(kind, name):
    return R.backend().gguf_path(kind, name)


def _backend_gguf(fn_name):
    fn = getattr(R.backend(), fn_name, None)
    if fn is None:
        raise NotImplementedError(
            f"GGUF loading needs ComfyUI-GGUF installed (custom_nodes/ComfyUI-GGUF) or a backend with "
            f"{fn_name}(); this build has neither.")
    return fn


def _clip_type_spec(core_name):
    core = R.backend().core_node_class(core_name)
    return core.INPUT_TYPES()["required"]["type"] if core is not None else (["stable_diffusion"],)


class UnetLoaderGGUFNative:
    TIP = "A .gguf diffusion model from models/unet or models/diffusion_models."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"unet_name": (gguf_filenames("unet"), {"tooltip": cls.TIP})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    CATEGORY = R.CATEGORY
    TITLE = "Unet Loader (GGUF)"

    def load_unet(self, unet_name: str, dequant_dtype: str | None = None, patch_dtype: str | None = None,
                  patch_on_device: bool | None = None) -> tuple[Any]:
        load = _backend_gguf("load_gguf_unet")
        return (load(_gguf_path("unet", unet_name), dequant_dtype=dequant_dtype, patch_dtype=patch_dtype,
                     patch_on_device=patch_on_device),)


class UnetLoaderGGUFAdvancedNative(UnetLoaderGGUFNative):
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        inputs = super().INPUT_TYPES()
        inputs["required"].update({
            "dequant_dtype": (GGUF_DTYPES, {"default": "default",
                                            "tooltip": "dtype quantized weights are dequantized to."}),
            "patch_dtype": (GGUF_DTYPES, {"default": "default", "tooltip": "dtype LoRA patches are computed in."}),
            "patch_on_device": ("BOOLEAN", {"default": False,
                                            "tooltip": "Keep LoRA patches on the compute device."}),
        })
        return inputs

    TITLE = "Unet Loader (GGUF/Advanced)"


class CLIPLoaderGGUFNative:
    N = 1
    TYPE_FROM = "CLIPLoader"
    TIP = "A text encoder (.gguf or .safetensors) from models/text_encoders or models/clip."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        files = gguf_clip_filenames()
        names = ["clip_name"] if cls.N == 1 else [f"clip_name{i + 1}" for i in range(cls.N)]
        req = {n: (files, {"tooltip": cls.TIP}) for n in names}
        if cls.TYPE_FROM:
            req["type"] = R.with_tooltip(_clip_type_spec(cls.TYPE_FROM), "Which model family the encoder(s) belong to.")
        return {"required": req}

    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    CATEGORY = R.CATEGORY
    TITLE = "CLIPLoader (GGUF)"

    def load_clip(self, type: str = "stable_diffusion", **names: str) -> tuple[Any]:
        paths = [_gguf_path("clip", names[k]) for k in sorted(names)]
        return (_backend_gguf("load_gguf_clip")(paths, type),)


class DualCLIPLoaderGGUFNative(CLIPLoaderGGUFNative):
    N, TYPE_FROM, TITLE = 2, "DualCLIPLoader", "DualCLIPLoader (GGUF)"


class TripleCLIPLoaderGGUFNative(CLIPLoaderGGUFNative):
    N, TYPE_FROM, TITLE = 3, None, "TripleCLIPLoader (GGUF)"

    def load_clip(self, type: str = "sd3", **names: str) -> tuple[Any]:
        return super().load_clip(type=type, **names)


class QuadrupleCLIPLoaderGGUFNative(CLIPLoaderGGUFNative):
    N, TYPE_FROM, TITLE = 4, None, "QuadrupleCLIPLoader (GGUF)"


NATIVE_GGUF = {
    "UnetLoaderGGUF": UnetLoaderGGUFNative,
    "UnetLoaderGGUFAdvanced": UnetLoaderGGUFAdvancedNative,
    "CLIPLoaderGGUF": CLIPLoaderGGUFNative,
    "DualCLIPLoaderGGUF": DualCLIPLoaderGGUFNative,
    "TripleCLIPLoaderGGUF": TripleCLIPLoaderGGUFNative,
    "QuadrupleCLIPLoaderGGUF": QuadrupleCLIPLoaderGGUFNative,
}


# ---------------------------------------------------------------------------------------------
# Checkpoint loaders with a device per component (no single core class to wrap)
# ---------------------------------------------------------------------------------------------
def _ckpt_spec():
    core = R.backend().core_node_class("CheckpointLoaderSimple")
    return R.with_tooltip(core.INPUT_TYPES()["required"]["ckpt_name"], "The checkpoint to load.")


def _load_checkpoint(ckpt_name, unet_device, clip_device, vae_device):
    """(MODEL, CLIP, VAE) of a checkpoint, the model loaded for unet_device, CLIP and VAE for theirs."""
    be = R.backend()
    core = be.core_node_class("CheckpointLoaderSimple")
    out = list(be.load_on_device(unet_device, lambda: R.call_base(core, {"ckpt_name": ckpt_name})))
    for i, dev in ((1, clip_device), (2, vae_device)):
        if out[i] is not None and dev != unet_device:
            out[i] = be.load_on_device(dev, lambda obj=out[i]: obj)  # retarget the part already loaded
    return out


class CheckpointLoaderAdvancedMultiGPU:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "ckpt_name": _ckpt_spec(),
            "unet_device": R.device_input("Device for the diffusion model."),
            "clip_device": R.device_input("Device for the text encoder."),
            "vae_device": R.device_input("Device for the VAE."),
        }}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = R.CATEGORY
    TITLE = "Checkpoint Loader Advanced (MultiGPU)"
    DESCRIPTION = "Loads a checkpoint with the diffusion model, text encoder and VAE each on its own device."

    def load_checkpoint(self, ckpt_name: str, unet_device: str, clip_device: str,
                        vae_device: str) -> tuple[Any, Any, Any]:
        return tuple(_load_checkpoint(ckpt_name, unet_device, clip_device, vae_device))


class CheckpointLoaderAdvancedDisTorch2MultiGPU:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "ckpt_name": _ckpt_spec(),
                "unet_compute_device": R.device_input("Device that runs the diffusion model."),
                "unet_virtual_vram_gb": R.vvram_input(4.0),
                "unet_donor_device": ("STRING", {"default": "cpu", "tooltip": R.TIP_DONOR}),
                "clip_compute_device": R.device_input("Device that runs the text encoder.", default="cpu"),
                "clip_virtual_vram_gb": R.vvram_input(2.0),
                "clip_donor_device": ("STRING", {"default": "cpu", "tooltip": R.TIP_DONOR}),
                "vae_device": R.device_input("Device for the VAE."),
            },
            "optional": {
                "unet_expert_mode_allocations": R.expert_input(),
                "clip_expert_mode_allocations": R.expert_input(),
                "high_precision_loras": ("BOOLEAN", {"default": True,
                                                     "tooltip": "Compute LoRA patches in float32 for every weight (streamed or resident), "
                                                                "then round once into the weight's dtype; off: in the weight's "
                                                                "own fp16/bf16 dtype."}),
                "eject_models": R.eject_input(True),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    CATEGORY = R.CATEGORY_D2
    TITLE = "Checkpoint Loader Advanced (DisTorch2)"
    DESCRIPTION = "Loads a checkpoint; DisTorch places the diffusion model and the text encoder each by its own budget."

    def load_checkpoint(self, ckpt_name: str, unet_compute_device: str, unet_virtual_vram_gb: float,
                        unet_donor_device: str, clip_compute_device: str, clip_virtual_vram_gb: float,
                        clip_donor_device: str, vae_device: str, unet_expert_mode_allocations: str = "",
                        clip_expert_mode_allocations: str = "", high_precision_loras: bool = True,
                        eject_models: bool = True) -> tuple[Any, Any, Any]:
        be = R.backend()
        model, clip, vae = _load_checkpoint(ckpt_name, unet_compute_device, clip_compute_device, vae_device)
        model = be.distorch(model, unet_compute_device, float(unet_virtual_vram_gb), unet_donor_device,
                            unet_expert_mode_allocations or "", bool(eject_models))
        if clip is not None:
            clip = be.distorch(clip, clip_compute_device, float(clip_virtual_vram_gb), clip_donor_device,
                               clip_expert_mode_allocations or "", False)
        from .patcher import set_lora_precision     # imports ComfyUI: on use only
        for obj in (model, clip):      # LoRA math in float32 (or the weight's dtype) downstream: patcher.py
            if obj is not None:
                set_lora_precision(obj, high_precision_loras)
        return (model, clip, vae)


class DeviceSelectorMultiGPU:
    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"device": R.device_input("The device this node outputs.")}}

    RETURN_TYPES = (["cpu"],)  # set in build(): the device list, so it connects to every device input
    RETURN_NAMES = ("device",)
    FUNCTION = "select_device"
    CATEGORY = R.CATEGORY
    TITLE = "Device Selector (MultiGPU)"
    DESCRIPTION = "Outputs a device name for any device input of the MultiGPU / DisTorch2 nodes."

    def select_device(self, device: str) -> tuple[str]:
        return (device,)


# ---------------------------------------------------------------------------------------------
# Building the mappings
# ---------------------------------------------------------------------------------------------
def _gguf_family(base_for, out):
    """GGUF nodes from base classes (ComfyUI-GGUF's when given, else the native ones)."""
    for stem in GGUF_LOADERS:
        base = base_for(stem)
        label = f"{stem} ({'ComfyUI-GGUF' if base is not NATIVE_GGUF[stem] else 'native'})"
        is_clip = stem.startswith(("CLIP", "Dual", "Triple", "Quadruple"))
        out[f"{stem}MultiGPU"] = R.device_wrapper(f"{stem}MultiGPU", base, label)
        out[f"{stem}DisTorch2MultiGPU"] = R.distorch2_wrapper(
            f"{stem}DisTorch2MultiGPU", base, label,
            device_key="device" if is_clip else "compute_device", eject_default=not is_clip)
        out[f"{stem}DisTorchMultiGPU"] = R.legacy_distorch_wrapper(f"{stem}DisTorchMultiGPU", base, label)


def build() -> dict[str, type]:
    """NODE_CLASS_MAPPINGS of everything that can be built now."""
    be = R.backend()
    out: dict[str, type] = {}
    for stem, core_name in CORE_LOADERS.items():
        base = be.core_node_class(core_name)
        if base is None:
            log.warning("ComfyUI has no %s node: %sMultiGPU / %sDisTorch2MultiGPU not registered", core_name, stem, stem)
            continue
        label = f"ComfyUI's {core_name}"
        out[f"{stem}MultiGPU"] = R.device_wrapper(f"{stem}MultiGPU", base, label)
        is_clip = stem in CLIP_LOADERS
        out[f"{stem}DisTorch2MultiGPU"] = R.distorch2_wrapper(
            f"{stem}DisTorch2MultiGPU", base, label,
            device_key="device" if is_clip else "compute_device", eject_default=not is_clip)
    out["CheckpointLoaderAdvancedMultiGPU"] = CheckpointLoaderAdvancedMultiGPU
    out["CheckpointLoaderAdvancedDisTorch2MultiGPU"] = CheckpointLoaderAdvancedDisTorch2MultiGPU
    DeviceSelectorMultiGPU.RETURN_TYPES = (R.devices(),)
    out["DeviceSelectorMultiGPU"] = DeviceSelectorMultiGPU
    out.update(build_late())
    return out


def build_late() -> dict[str, type]:
    """Nodes generated from other packs' classes: call again once every pack has loaded."""
    be = R.backend()
    out: dict[str, type] = {}
    _gguf_family(lambda stem: be.core_node_class(GGUF_LOADERS[stem]) or NATIVE_GGUF[stem], out)
    for pack, names in PACK_WRAPPERS.items():
        for ours, theirs in names.items():
            base = be.core_node_class(theirs)
            if base is not None:
                out[ours] = R.device_wrapper(ours, base, f"{pack}'s {theirs}")
    return out


def display_names(mapping: dict[str, type]) -> dict[str, str]:
    return {name: getattr(cls, "TITLE", name) for name, cls in mapping.items()}
