"""Random-weight model files for the tests: an SD1.5-architecture checkpoint ComfyUI detects (and its
parts as separate UNet / CLIP-L / VAE files, a tiny .gguf, an input image), a tiny SD3-style MMDiT state,
a random LoRA for it, and the model folders they are written to.
"""
import time
from pathlib import Path

from comfy_harness import MODEL_FOLDERS, progress

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


def save_tiny_lora(sd: dict, path: str, rank: int = 4, seed: int = 5, blocks_only: bool = True) -> None:
    """A random LoRA (ComfyUI's lora_up / lora_down keys, x0.1) on every 2-D weight of the joint blocks of
    the tiny MMDiT state `sd` (blocks_only=False: on every 2-D weight, the embedders and final layer too),
    saved to `path` (.safetensors)."""
    import torch
    import safetensors.torch
    g = torch.Generator().manual_seed(seed)
    lora = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and (not blocks_only or "joint_blocks" in k):
            base = "diffusion_model." + k[: -len(".weight")]
            lora[base + ".lora_up.weight"] = torch.randn(v.shape[0], rank, generator=g) * 0.1
            lora[base + ".lora_down.weight"] = torch.randn(rank, v.shape[1], generator=g) * 0.1
    safetensors.torch.save_file(lora, path)
