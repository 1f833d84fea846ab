"""Built-in model shapes: the tensor names, shapes and dtypes of widely distributed single-file
checkpoints, so a machine can be planned for a model it has not downloaded.

Key layouts follow the checkpoints as distributed (and as ComfyUI loads them):
- flux-dev / flux-schnell: Black Forest Labs layout (img_in, double_blocks.N, single_blocks.N ...), bf16.
- sdxl: the SDXL base UNet in the LDM layout under `model.diffusion_model.` (as inside
  sd_xl_base_1.0.safetensors; the VAE and text encoders of that file are not included), fp16.
- wan2.1-14b: Wan 2.1 text-to-video 14B in the Wan-AI layout (patch_embedding, blocks.N ...), bf16.
The parameter counts are checked in tests against the same architectures built by diffusers.
"""
from __future__ import annotations

import math

from ..errors import DisTorchError
from ..formats.tensor_info import TensorInfo

_ELEM = {"BF16": 2, "F16": 2, "F32": 4}


class _Keys:
    def __init__(self, dtype: str, prefix: str = ""):
        self.dtype, self.prefix, self.out = dtype, prefix, []

    def t(self, name: str, *shape: int):
        self.out.append(TensorInfo(self.prefix + name, tuple(shape), self.dtype,
                                   math.prod(shape) * _ELEM[self.dtype]))

    def linear(self, name: str, n_out: int, n_in: int, bias: bool = True):
        self.t(f"{name}.weight", n_out, n_in)
        if bias:
            self.t(f"{name}.bias", n_out)

    def norm(self, name: str, n: int):  # affine GroupNorm / LayerNorm
        self.t(f"{name}.weight", n)
        self.t(f"{name}.bias", n)

    def conv(self, name: str, n_out: int, n_in: int, *k: int):
        self.t(f"{name}.weight", n_out, n_in, *k)
        self.t(f"{name}.bias", n_out)


# --- Flux (BFL layout) ------------------------------------------------------------------------
def _flux(guidance: bool) -> list[TensorInfo]:
    h, heads, mlp, in_ch, ctx, vec, depth, depth_single = 3072, 24, 12288, 64, 4096, 768, 19, 38
    hd = h // heads
    k = _Keys("BF16")

    def mlp_embedder(name, n_in):
        k.linear(f"{name}.in_layer", h, n_in)
        k.linear(f"{name}.out_layer", h, h)

    k.linear("img_in", h, in_ch)
    mlp_embedder("time_in", 256)
    mlp_embedder("vector_in", vec)
    if guidance:
        mlp_embedder("guidance_in", 256)
    k.linear("txt_in", h, ctx)
    for i in range(depth):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}_"
            k.linear(b + "mod.lin", 6 * h, h)
            k.linear(b + "attn.qkv", 3 * h, h)
            k.t(b + "attn.norm.query_norm.scale", hd)
            k.t(b + "attn.norm.key_norm.scale", hd)
            k.linear(b + "attn.proj", h, h)
            k.linear(b + "mlp.0", mlp, h)
            k.linear(b + "mlp.2", h, mlp)
    for i in range(depth_single):
        b = f"single_blocks.{i}."
        k.linear(b + "linear1", 3 * h + mlp, h)
        k.linear(b + "linear2", h, h + mlp)
        k.t(b + "norm.query_norm.scale", hd)
        k.t(b + "norm.key_norm.scale", hd)
        k.linear(b + "modulation.lin", 3 * h, h)
    k.linear("final_layer.linear", in_ch, h)
    k.linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return k.out


# --- SDXL base UNet (LDM layout) --------------------------------------------------------------
def _sdxl() -> list[TensorInfo]:
    mc, emb, ctx, adm, in_ch, out_ch = 320, 1280, 2048, 2816, 4, 4
    mult = (1, 2, 4)
    depth_in = (0, 2, 10)       # transformer depth per level (input blocks)
    k = _Keys("F16", "model.diffusion_model.")

    def resblock(b, c_in, c_out):
        k.norm(f"{b}.in_layers.0", c_in)
        k.conv(f"{b}.in_layers.2", c_out, c_in, 3, 3)
        k.linear(f"{b}.emb_layers.1", c_out, emb)
        k.norm(f"{b}.out_layers.0", c_out)
        k.conv(f"{b}.out_layers.3", c_out, c_out, 3, 3)
        if c_in != c_out:
            k.conv(f"{b}.skip_connection", c_out, c_in, 1, 1)

    def transformer(b, c, depth):
        k.norm(f"{b}.norm", c)
        k.linear(f"{b}.proj_in", c, c)
        for j in range(depth):
            t = f"{b}.transformer_blocks.{j}"
            for a, kv in (("attn1", c), ("attn2", ctx)):
                k.linear(f"{t}.{a}.to_q", c, c, bias=False)
                k.linear(f"{t}.{a}.to_k", c, kv, bias=False)
                k.linear(f"{t}.{a}.to_v", c, kv, bias=False)
                k.linear(f"{t}.{a}.to_out.0", c, c)
            k.linear(f"{t}.ff.net.0.proj", 8 * c, c)   # GEGLU: 2 x (4c)
            k.linear(f"{t}.ff.net.2", c, 4 * c)
            for n in ("norm1", "norm2", "norm3"):
                k.norm(f"{t}.{n}", c)
        k.linear(f"{b}.proj_out", c, c)

    k.linear("time_embed.0", emb, mc)
    k.linear("time_embed.2", emb, emb)
    k.linear("label_emb.0.0", emb, adm)
    k.linear("label_emb.0.2", emb, emb)
    k.conv("input_blocks.0.0", mc, in_ch, 3, 3)
    chans = [mc]
    ch, n = mc, 1
    for level, m in enumerate(mult):
        for _ in range(2):
            resblock(f"input_blocks.{n}.0", ch, m * mc)
            ch = m * mc
            if depth_in[level]:
                transformer(f"input_blocks.{n}.1", ch, depth_in[level])
            chans.append(ch)
            n += 1
        if level != len(mult) - 1:
            k.conv(f"input_blocks.{n}.0.op", ch, ch, 3, 3)
            chans.append(ch)
            n += 1
    resblock("middle_block.0", ch, ch)
    transformer("middle_block.1", ch, 10)
    resblock("middle_block.2", ch, ch)
    n = 0
    for level, m in reversed(list(enumerate(mult))):
        for i in range(3):
            skip = chans.pop()
            resblock(f"output_blocks.{n}.0", ch + skip, m * mc)
            ch = m * mc
            j = 1
            if depth_in[level]:
                transformer(f"output_blocks.{n}.1", ch, depth_in[level])
                j = 2
            if level and i == 2:
                k.conv(f"output_blocks.{n}.{j}.conv", ch, ch, 3, 3)
            n += 1
    k.norm("out.0", ch)
    k.conv("out.2", out_ch, ch, 3, 3)
    return k.out


# --- Wan 2.1 T2V 14B (Wan-AI layout) ----------------------------------------------------------
def _wan14b() -> list[TensorInfo]:
    dim, ffn, layers, in_dim, out_dim, text_dim, freq = 5120, 13824, 40, 16, 16, 4096, 256
    patch = (1, 2, 2)
    k = _Keys("BF16")
    k.conv("patch_embedding", dim, in_dim, *patch)
    k.linear("text_embedding.0", dim, text_dim)
    k.linear("text_embedding.2", dim, dim)
    k.linear("time_embedding.0", dim, freq)
    k.linear("time_embedding.2", dim, dim)
    k.linear("time_projection.1", 6 * dim, dim)
    for i in range(layers):
        b = f"blocks.{i}"
        for a in ("self_attn", "cross_attn"):
            for p in ("q", "k", "v", "o"):
                k.linear(f"{b}.{a}.{p}", dim, dim)
            k.t(f"{b}.{a}.norm_q.weight", dim)
            k.t(f"{b}.{a}.norm_k.weight", dim)
        k.norm(f"{b}.norm3", dim)
        k.linear(f"{b}.ffn.0", ffn, dim)
        k.linear(f"{b}.ffn.2", dim, ffn)
        k.t(f"{b}.modulation", 1, 6, dim)
    k.linear("head.head", out_dim * math.prod(patch), dim)
    k.t("head.modulation", 1, 2, dim)
    return k.out


_BUILDERS = {
    "flux-dev": lambda: _flux(guidance=True),
    "flux-schnell": lambda: _flux(guidance=False),
    "sdxl": _sdxl,
    "wan2.1-14b": _wan14b,
}
BUILTINS: tuple[str, ...] = tuple(_BUILDERS)


def builtin_infos(name: str) -> list[TensorInfo]:
    """Tensor infos (names, shapes, dtypes, stored bytes; offset 0) of a built-in model shape."""
    try:
        build = _BUILDERS[name]
    except KeyError:
        raise DisTorchError(f"unknown built-in model shape {name!r}; built-in shapes: {', '.join(BUILTINS)}") from None
    return build()
