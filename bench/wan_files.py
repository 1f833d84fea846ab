"""The model files of bench/bench_comfy_wan.py: a Wan-2.x-14B-shaped expert in ComfyUI's fp8_scaled form
(random weights, each Linear weight float8_e4m3fn with its float32 scale_weight, the rest bf16, the
scaled_fp8 marker) and a random rank-r LoRA per expert in ComfyUI's key format, made once and reused; and
the latent shape the runs sample.

    n = ensure_files(a)      # the missing or incomplete files made; n = names(a): key -> file name
    latent_shape(a)          # the latent of --height x --width x --frames (16 channels, 4x time, 8x space)
"""
from __future__ import annotations

import json
import os
import time

import bench_comfy as B

say = B.say


def wan_params(a) -> dict:
    return dict(model_type="t2v", patch_size=(1, 2, 2), text_len=512, in_dim=16, dim=a.dim, ffn_dim=a.ffn,
                freq_dim=256, text_dim=4096, out_dim=16, num_heads=a.dim // 128, num_layers=a.layers,
                window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)


def latent_shape(a) -> tuple:
    return (1, 16, (a.frames - 1) // 4 + 1, a.height // 8, a.width // 8)


def wan_layout(a):
    """([(key, shape, dtype)] of the bf16 model, the set of Linear module names) from ComfyUI's WanModel on meta."""
    import torch
    import comfy.ops
    from comfy.ldm.wan.model import WanModel
    with torch.device("meta"):
        m = WanModel(device="meta", dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init, **wan_params(a))
    lin = {n for n, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)}
    return [(k, tuple(v.shape), v.dtype) for k, v in m.state_dict().items()], lin


def fp8_specs(a):
    """The fp8_scaled file's tensors: Linear weights fp8 + scale_weight, the rest bf16, the marker."""
    import torch
    specs, lin = wan_layout(a)
    out = []
    for k, shape, dt in specs:
        mod = k.rsplit(".", 1)[0]
        if k.endswith(".weight") and mod in lin:
            out += [(k, shape, torch.float8_e4m3fn), (mod + ".scale_weight", (), torch.float32)]
        else:
            out.append((k, shape, dt))
    out.append(("scaled_fp8", (a.fp8_marker,), torch.float8_e4m3fn))
    return out, lin


def make_expert(path: str, a, seed: int, dev) -> int:
    """Random weights N(0, 0.02); each Linear weight quantized per tensor: scale = absmax / 448."""
    import torch
    specs, lin = fp8_specs(a)
    g = torch.Generator(device=dev).manual_seed(seed)
    pending = {}

    def make(name, shape, dt):
        if name == "scaled_fp8":
            return torch.zeros(shape, dtype=dt)
        if name.endswith(".scale_weight"):
            return pending.pop(name)
        w = torch.empty(shape, dtype=torch.bfloat16, device=dev).normal_(0.0, 0.02, generator=g)
        if dt == torch.float8_e4m3fn:
            s = (w.abs().amax().float() / 448.0).clamp_min(1e-12)
            pending[name.rsplit(".", 1)[0] + ".scale_weight"] = s.cpu().reshape(())
            return (w.float() / s).to(torch.float8_e4m3fn)
        return w.to(dt)
    with torch.no_grad():
        return B.write_safetensors(path, specs, make)


def make_lora(path: str, a, seed: int, dev) -> int:
    """Rank-r LoRA on every Linear inside blocks.* (ComfyUI key format), bf16, up/down N(0, 0.01)."""
    import torch
    specs, lin = wan_layout(a)
    shapes = {k: s for k, s, _ in specs}
    out = []
    for mod in sorted(lin):
        if not mod.startswith("blocks."):
            continue
        o, i = shapes[mod + ".weight"]
        base = "diffusion_model." + mod
        out += [(base + ".lora_up.weight", (o, a.lora_rank), torch.bfloat16),
                (base + ".lora_down.weight", (a.lora_rank, i), torch.bfloat16)]
    g = torch.Generator(device=dev).manual_seed(seed)

    def make(name, shape, dt):
        return torch.empty(shape, dtype=dt, device=dev).normal_(0.0, 0.01, generator=g)
    with torch.no_grad():
        return B.write_safetensors(path, out, make)


def file_ok(path: str) -> bool:
    """A complete safetensors file (header parses, size = header + data)."""
    try:
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in h.items() if k != "__metadata__"), default=0)
        return os.path.getsize(path) == 8 + n + end
    except (OSError, ValueError, KeyError):
        return False


def names(a) -> dict:
    t = a.tag
    return {"high": f"wan_{t}_high_fp8_scaled.safetensors", "low": f"wan_{t}_low_fp8_scaled.safetensors",
            "lora_high": f"wan_{t}_high_lora_r{a.lora_rank}.safetensors",
            "lora_low": f"wan_{t}_low_lora_r{a.lora_rank}.safetensors",
            "ready": f"wan_{t}.ready", "ref": f"wan_{t}_ref_latents.pt"}


def ensure_files(a) -> dict:
    """Make the expert and LoRA files that are missing or incomplete; touch the ready marker."""
    import torch
    n = names(a)
    dev = torch.device("cuda:0" if (a.device != "cpu" and torch.cuda.is_available()) else "cpu")
    os.makedirs(a.model_dir, exist_ok=True)
    jobs = [("high", make_expert, 11), ("low", make_expert, 12)]
    if a.lora_rank:
        jobs += [("lora_high", make_lora, 21), ("lora_low", make_lora, 22)]
    for key, fn, seed in jobs:
        p = os.path.join(a.model_dir, n[key])
        if file_ok(p):
            continue
        t = time.perf_counter()
        nb = fn(p, a, seed, dev)
        say(f"wrote {p}: {nb / 1e9:.2f} GB in {time.perf_counter() - t:.1f}s")
    with open(os.path.join(a.model_dir, n["ready"]), "w") as fh:
        fh.write("ok\n")
    return n
