import pytest
import torch

from distorch.compiler.files import graph_from_file
from distorch.compiler.shapes import BUILTINS, builtin_infos
from distorch.errors import DisTorchError



def _diffusers():
    try:
        import diffusers
    except Exception as e:  # absent, or broken by its dependencies in this environment
        pytest.skip(f"diffusers not importable: {e}")
    return diffusers

SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(320, 640, 1280), layers_per_block=2, transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048, attention_head_dim=(5, 10, 20), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)


def numel(infos):
    return sum(i.numel for i in infos)


def params(m, prefix=None):
    return sum(p.numel() for n, p in m.named_parameters() if prefix is None or n.startswith(prefix))


def names(g):
    return [u.name for u in g]


@pytest.fixture(scope="module")
def flux_models():
    diffusers = _diffusers()
    with torch.device("meta"):
        return (diffusers.FluxTransformer2DModel(guidance_embeds=True),   # dev
                diffusers.FluxTransformer2DModel())                       # default config = schnell


def test_flux_counts_match_diffusers(flux_models):
    dev, schnell = flux_models
    d = builtin_infos("flux-dev")
    s = builtin_infos("flux-schnell")
    assert numel(d) == params(dev)
    assert numel(s) == params(schnell)
    assert numel(d) - numel(s) == 256 * 3072 + 3072 + 3072 * 3072 + 3072   # guidance_in
    assert len(d) == 780 and len(s) == 776
    assert {i.dtype_str for i in d} == {"BF16"}
    assert sum(i.nbytes for i in d) == 2 * numel(d)
    assert 23.7e9 < sum(i.nbytes for i in d) < 23.9e9
    # per block, the BFL blocks hold exactly what diffusers' twins hold
    g = graph_from_file("flux-dev")
    for i in (0, 18):
        assert g[f"double_blocks.{i}"].param_bytes == 2 * params(dev, f"transformer_blocks.{i}.")
    for i in (0, 37):
        assert g[f"single_blocks.{i}"].param_bytes == 2 * params(dev, f"single_transformer_blocks.{i}.")


def test_flux_keys_and_units():
    by = {i.name: i for i in builtin_infos("flux-dev")}
    assert by["img_in.weight"].shape == (3072, 64)
    assert by["double_blocks.0.img_attn.qkv.weight"].shape == (9216, 3072)
    assert by["double_blocks.18.txt_attn.norm.key_norm.scale"].shape == (128,)
    assert by["double_blocks.3.txt_mlp.2.weight"].shape == (3072, 12288)
    assert by["single_blocks.37.linear1.weight"].shape == (21504, 3072)
    assert by["single_blocks.0.linear2.weight"].shape == (3072, 15360)
    assert by["single_blocks.5.modulation.lin.bias"].shape == (9216,)
    assert by["final_layer.adaLN_modulation.1.weight"].shape == (6144, 3072)
    assert by["guidance_in.out_layer.weight"].shape == (3072, 3072)
    g = graph_from_file("flux-dev")
    assert names(g) == (["img_in", "time_in", "guidance_in", "vector_in", "txt_in"]
                        + [f"double_blocks.{i}" for i in range(19)] + [f"single_blocks.{i}" for i in range(38)]
                        + ["final_layer"])
    assert g["double_blocks.4"].type == "double_blocks" and g["double_blocks.4"].kind == "block"
    assert g["final_layer"].kind == "leaf"
    assert len(g["double_blocks.4"].tensors) == 2 * 12 and len(g["single_blocks.0"].tensors) == 8
    assert g.source == "builtin:flux-dev"
    gs = graph_from_file("flux-schnell")
    assert "guidance_in" not in gs and len(gs) == len(g) - 1


def test_sdxl_count_matches_diffusers():
    diffusers = _diffusers()
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**SDXL_UNET)
    infos = builtin_infos("sdxl")
    assert numel(infos) == params(unet)
    assert 2.56e9 < numel(infos) < 2.58e9
    assert {i.dtype_str for i in infos} == {"F16"}
    assert all(i.name.startswith("model.diffusion_model.") for i in infos)
    assert len(infos) == 1680


def test_sdxl_keys_and_units():
    p = "model.diffusion_model."
    by = {i.name[len(p):]: i for i in builtin_infos("sdxl")}
    assert by["label_emb.0.0.weight"].shape == (1280, 2816)
    assert by["input_blocks.0.0.weight"].shape == (320, 4, 3, 3)
    assert by["input_blocks.3.0.op.weight"].shape == (320, 320, 3, 3)
    assert by["input_blocks.4.0.skip_connection.weight"].shape == (640, 320, 1, 1)
    assert by["input_blocks.4.1.transformer_blocks.1.attn2.to_k.weight"].shape == (640, 2048)
    assert "input_blocks.4.1.transformer_blocks.2.attn1.to_q.weight" not in by
    assert by["input_blocks.8.1.transformer_blocks.9.ff.net.0.proj.weight"].shape == (10240, 1280)
    assert by["middle_block.1.transformer_blocks.9.norm3.bias"].shape == (1280,)
    assert by["output_blocks.0.0.skip_connection.weight"].shape == (1280, 2560, 1, 1)
    assert by["output_blocks.2.2.conv.weight"].shape == (1280, 1280, 3, 3)
    assert by["output_blocks.5.2.conv.weight"].shape == (640, 640, 3, 3)
    assert by["output_blocks.6.0.in_layers.0.weight"].shape == (960,)
    assert "output_blocks.6.1.norm.weight" not in by
    assert by["out.2.weight"].shape == (4, 320, 3, 3)
    g = graph_from_file("sdxl")
    assert names(g) == (["time_embed", "label_emb"] + [f"input_blocks.{i}" for i in range(9)] + ["middle_block"]
                        + [f"output_blocks.{i}" for i in range(9)] + ["out"])
    assert all(t.startswith(p) for u in g for t in u.tensors)   # keys kept as stored
    assert g["middle_block"].kind == "block"
    assert g.total_bytes == 2 * numel(builtin_infos("sdxl"))


def test_wan_count_matches_diffusers():
    diffusers = _diffusers()
    with torch.device("meta"):
        wan = diffusers.WanTransformer3DModel()   # default config = Wan 2.1 14B
    assert wan.config.num_layers == 40 and wan.config.ffn_dim == 13824
    infos = builtin_infos("wan2.1-14b")
    assert numel(infos) == params(wan)
    assert 14.0e9 < numel(infos) < 14.5e9
    g = graph_from_file("wan2.1-14b")
    for i in (0, 39):
        assert g[f"blocks.{i}"].param_bytes == 2 * params(wan, f"blocks.{i}.")


def test_wan_keys_and_units():
    by = {i.name: i for i in builtin_infos("wan2.1-14b")}
    assert by["patch_embedding.weight"].shape == (5120, 16, 1, 2, 2)
    assert by["blocks.0.self_attn.norm_q.weight"].shape == (5120,)
    assert by["blocks.39.cross_attn.o.weight"].shape == (5120, 5120)
    assert by["blocks.7.ffn.0.weight"].shape == (13824, 5120)
    assert by["blocks.7.modulation"].shape == (1, 6, 5120)
    assert by["time_projection.1.weight"].shape == (30720, 5120)
    assert by["head.head.weight"].shape == (64, 5120)
    assert by["head.modulation"].shape == (1, 2, 5120)
    assert {i.dtype_str for i in by.values()} == {"BF16"}
    g = graph_from_file("wan2.1-14b")
    assert names(g) == (["patch_embedding", "time_embedding", "time_projection", "text_embedding"]
                        + [f"blocks.{i}" for i in range(40)] + ["head"])
    assert g["text_embedding"].kind == "leaf" and len(g["text_embedding"].tensors) == 4


def test_unknown_builtin():
    assert set(BUILTINS) >= {"flux-dev", "flux-schnell", "sdxl", "wan2.1-14b"}
    with pytest.raises(DisTorchError, match="'flux-pro'.*flux-dev, flux-schnell, sdxl, wan2.1-14b"):
        builtin_infos("flux-pro")


_COMFY_SCRIPT = r'''
import json, sys, torch
sys.path.insert(0, ".")
import comfy.options; comfy.options.enable_args_parsing(False)
import comfy.cli_args; comfy.cli_args.args.cpu = True
import comfy.model_detection, comfy.ops
from distorch.compiler.shapes import builtin_infos
out = {}
for name, prefix in [("flux-dev", ""), ("flux-schnell", ""), ("sdxl", "model.diffusion_model."), ("wan2.1-14b", "")]:
    infos = builtin_infos(name)
    sd = {i.name: torch.empty(i.shape, device="meta", dtype=torch.bfloat16) for i in infos}
    cfg = comfy.model_detection.model_config_from_unet(sd, prefix)
    if name.startswith("flux"):
        from comfy.ldm.flux.model import Flux as C
    elif name == "sdxl":
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel as C
    else:
        from comfy.ldm.wan.model import WanModel as C
    uc = dict(cfg.unet_config)
    uc.pop("image_model", None)
    m = C(**uc, device="meta", dtype=torch.bfloat16, operations=comfy.ops.disable_weight_init)
    got = {k: list(v.shape) for k, v in m.state_dict().items()}
    want = {i.name[len(prefix):]: list(i.shape) for i in infos}
    out[name] = [type(cfg).__name__, got == want, sorted(set(got) ^ set(want))[:5]]
print("RESULT " + json.dumps(out))
'''


def test_comfyui_detects_builtins_and_builds_the_same_tensors():
    """ComfyUI (when set up) detects each built-in's keys as the right model, and the model it builds
    has exactly our tensor names and shapes."""
    import subprocess
    import sys
    from comfy_harness import COMFY_DIR, require_comfy
    require_comfy()
    r = subprocess.run([sys.executable, "-c", _COMFY_SCRIPT], cwd=str(COMFY_DIR), capture_output=True, text=True,
                       timeout=300)
    line = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, r.stderr[-3000:]
    import json
    res = json.loads(line[0][7:])
    assert res == {"flux-dev": ["Flux", True, []], "flux-schnell": ["FluxSchnell", True, []],
                   "sdxl": ["SDXL", True, []], "wan2.1-14b": ["WAN21_T2V", True, []]}
