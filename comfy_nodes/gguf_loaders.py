"""GGUF models in ComfyUI without ComfyUI-GGUF: DisTorch's own reader + ComfyUI's own loader entry points.

Model files
-----------
gguf_filenames(kind) / gguf_clip_filenames() / gguf_path(kind, name)
    the .gguf files of the diffusion-model ('unet') and text-encoder ('clip') folders, from ComfyUI's
    folder_paths; the keys `unet_gguf` / `clip_gguf` are shared with ComfyUI-GGUF (same meaning).

How a .gguf diffusion model becomes a ComfyUI MODEL (load_gguf_unet)
--------------------------------------------------------------------
1. formats.gguf_loader.load_gguf memory-maps the file: quantized tensors are GGUFTensors (their bytes a
   view of the mapping, never dequantized on the host), F32/F16/BF16 tensors plain tensors.
2. ComfyUI's own entry point `comfy.sd.load_diffusion_model_state_dict(sd, model_options=
   {"custom_operations": ops})` detects the architecture from the keys and builds its model with our
   operations class (gguf_ops.gguf_operations) instead of comfy.ops.
3. Those layers take a GGUFTensor from the state dict AS their parameter and dequantize it on the
   compute device at every call (gguf_ops.py). The patcher's class becomes gguf_ops.gguf_patcher_class:
   LoRA patches of GGUF weights are applied per call to the dequantized weight.

Text encoders (load_gguf_clip)
------------------------------
.safetensors files and .gguf files load through `comfy.sd.load_text_encoder_state_dicts` with the
same operations class. GGUF text encoders in llama.cpp naming (`enc.blk.0.attn_q.weight`,
`token_embd.weight`...: T5/UMT5, llama, qwen2, gemma families) get their original names back first
(formats/gguf_names.py: the gguf package's own name map, llama Q/K rows un-permuted on the quantized
bytes, gemma norms un-shifted); the LM head and decoder tensors an encoder does not use are dropped.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Iterable

import torch

from ..errors import GGUFLoadError, GGUFNameError
from ..formats.gguf_loader import load_gguf
from ..formats.gguf_names import is_llama_cpp_named, to_original_names
from ..formats.gguf_tensor import is_gguf
from .comfy_api import comfy, folder_paths
from .gguf_ops import dtype_option, gguf_operations, gguf_patcher_class

log = logging.getLogger("distorch.comfy.gguf_loaders")
# ComfyUI's objects (ModelPatcher, CLIP) are typed Any: ComfyUI ships no types.

# kind -> (our folder key, shared with ComfyUI-GGUF; ComfyUI's folder it lists)
_FOLDERS = {"unet": ("unet_gguf", "diffusion_models"), "clip": ("clip_gguf", "text_encoders")}


def gguf_filenames(kind: str) -> list[str]:
    """.gguf files of the diffusion-model ('unet') or text-encoder ('clip') folders.

    Registers the keys `unet_gguf` / `clip_gguf` (shared with ComfyUI-GGUF, same meaning) on first use."""
    key, target = _FOLDERS[kind]
    if key not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[key] = (folder_paths.folder_names_and_paths[target][0], {".gguf"})
    return folder_paths.get_filename_list(key)


def gguf_clip_filenames() -> list[str]:
    return sorted(set(folder_paths.get_filename_list("text_encoders")) | set(gguf_filenames("clip")))


def gguf_path(kind: str, name: str) -> str:
    gguf_filenames(kind)
    key, target = _FOLDERS[kind]
    path = folder_paths.get_full_path(key, name) or folder_paths.get_full_path(target, name)
    if path is None:
        raise FileNotFoundError(f"model file {name!r} not found in the {kind} model folders")
    return path


def load_gguf_unet(path: str | os.PathLike[str], dequant_dtype: str | torch.dtype | None = None,
                   patch_dtype: str | torch.dtype | None = None, patch_on_device: bool | None = None) -> Any:
    """A .gguf diffusion model -> ComfyUI ModelPatcher, through comfy.sd.load_diffusion_model_state_dict;
    weights stay quantized (dequantized per call)."""
    ops = gguf_operations(dequant_dtype)
    pt = dtype_option(patch_dtype, "patch_dtype")
    sd, meta = load_gguf(path)
    n_q = sum(1 for v in sd.values() if is_gguf(v))
    model = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"custom_operations": ops})
    if model is None:
        raise GGUFLoadError(f"{path}: ComfyUI could not detect the model type from its {len(sd)} tensors "
                            f"(GGUF architecture {meta.get('architecture')!r}); is it a diffusion model "
                            f"converted for ComfyUI?")
    if pt is not None:
        model.model_options.setdefault("distorch_gguf", {})["patch_dtype"] = pt
    if patch_on_device:
        model.model_options.setdefault("distorch_gguf", {})["patch_on_device"] = True
    model.__class__ = gguf_patcher_class(type(model))
    log.info("DisTorch: %s loaded natively (%d quantized tensors: %s; %.2f GiB stored)", path, n_q,
             ", ".join(f"{k} {v}" for k, v in sorted(meta["qtypes"].items())), meta["stored_bytes"] / 2**30)
    return model


def _clip_state_dict(path):
    """One text encoder file's state dict: .gguf (llama.cpp names mapped back) or anything ComfyUI reads."""
    if not str(path).lower().endswith(".gguf"):
        return comfy.utils.load_torch_file(path, safe_load=True)
    sd, meta = load_gguf(path, prefix=None)
    if is_llama_cpp_named(sd):
        try:
            sd, info = to_original_names(sd, meta, drop_lm_head=True)
        except GGUFNameError as e:
            raise GGUFLoadError(f"{path}: {e}") from None
        log.info("DisTorch: %s: %d tensors renamed from llama.cpp names (%s)%s", path, info["mapped"],
                 info["architecture"], f", {len(info['dropped'])} unused dropped" if info["dropped"] else "")
    return sd


def load_gguf_clip(paths: Iterable[str | os.PathLike[str]], clip_type: str = "stable_diffusion",
                   dequant_dtype: str | torch.dtype | None = None) -> Any:
    """Text encoder(s) from .gguf (original key names) and/or .safetensors files -> ComfyUI CLIP; GGUF
    weights stay quantized."""
    ops = gguf_operations(dequant_dtype)
    ct = getattr(comfy.sd.CLIPType, str(clip_type).upper(), None)
    if ct is None:
        raise GGUFLoadError(f"clip type {clip_type!r} is not one of ComfyUI's "
                            f"({', '.join(t.name.lower() for t in comfy.sd.CLIPType)})")
    sds = [_clip_state_dict(p) for p in paths]
    return comfy.sd.load_text_encoder_state_dicts(sds, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                                                  clip_type=ct, model_options={"custom_operations": ops})
