"""GGUF models through ComfyUI's load / unload paths as its executor runs them: inside
torch.inference_mode(), with GGUF strict mode on (an op on a GGUFTensor without a quantized handler
raises instead of silently dequantizing).  Also high_precision_loras of the checkpoint loader.

The text-encoder test is the issue's Qwen-Image shape at CLIP-L size: a GGUF text encoder is loaded by
the node, encodes (load_models_gpu -> ModelPatcher.load -> module.to), is ejected (eject_models ->
free_memory -> model_unload -> unpatch_model -> model.to), and the process's anonymous memory is
measured at each step: no dense copy of a quantized weight may appear (before the fix every weight was
dequantized and kept beside its blocks).
"""
from __future__ import annotations

import gc
import os
import sys

import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_harness import boot_inprocess  # noqa: E402

mm, nodes, folder_paths = boot_inprocess()

import test_comfy_gguf as G  # noqa: E402  (file helpers of the GGUF ComfyUI tests)

from distorch.comfy_nodes import entry, gguf_loaders  # noqa: E402
from distorch.comfy_nodes import nodes as N  # noqa: E402
from distorch.formats.gguf_tensor import GGUFTensor, strict_gguf  # noqa: E402

gguf_model = G.gguf_model          # the tiny SD3 GGUF (+ dense twin, LoRA) fixture


def _anon() -> int:
    """Anonymous resident memory of this process (bytes): where a dequantized copy would live."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    pytest.skip("no RssAnon in /proc/self/status")


@pytest.fixture(autouse=True)
def _as_comfy_executes():
    with torch.inference_mode(), strict_gguf():
        mm.unload_all_models()
        yield
        mm.unload_all_models()


@pytest.fixture(scope="module")
def clip_gguf(tmp_path_factory):
    """A CLIP-L text encoder (real size: 49408 x 768 token table, 12 layers) as Q8_0 .gguf."""
    import comfy.sd1_clip
    d = tmp_path_factory.mktemp("text_encoders")
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in comfy.sd1_clip.SDClipModel(device="meta").state_dict().items()}
    g = torch.Generator().manual_seed(3)
    sd = {}
    for k, shp in sorted(shapes.items()):
        if not k.startswith("transformer.") or k.endswith("position_ids"):
            continue
        k = k[len("transformer."):]
        sd[k] = torch.ones(shp) if ("norm" in k and len(shp) == 1) else torch.randn(shp, generator=g) * 0.02
    q = G._write_gguf(d / "clip_l_q8.gguf", sd, keep=("position_embedding",))
    folder_paths.add_model_folder_path("text_encoders", str(d))
    return {"name": "clip_l_q8.gguf", "quantized": q,
            "dense_bytes": sum(sd[k].numel() for k in q) * 4}


def _no_dense_storage(p) -> bool:
    """A GGUF wrapper owns no storage (torch: 'invalid python storage'); `param.data = dense` gave it one."""
    try:
        return p.untyped_storage().data_ptr() == 0
    except RuntimeError:
        return True


def _gguf_params(module):
    return {n: p for n, p in module.named_parameters() if isinstance(p, GGUFTensor)}


def test_gguf_text_encoder_load_encode_eject_memory(clip_gguf, capsys):
    gc.collect()
    a0 = _anon()
    cls = N.build()["CLIPLoaderGGUFMultiGPU"]
    (clip,) = getattr(cls(), cls.FUNCTION)(clip_name=clip_gguf["name"], type="stable_diffusion", device="cpu")
    ws = _gguf_params(clip.cond_stage_model)
    assert len(ws) == len(clip_gguf["quantized"])
    ptr = {n: p.raw.data_ptr() for n, p in ws.items()}
    a1 = _anon()
    (cond,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
    assert torch.isfinite(cond[0][0]).all()
    a2 = _anon()
    # eject, as a DisTorch2 node's eject_models does; then every other unload path ComfyUI has
    assert entry.eject("cpu") >= 1
    clip.patcher.partially_unload(torch.device("cpu"), 1e30)
    clip.patcher.detach()
    a3 = _anon()
    mib = 2 ** 20
    with capsys.disabled():
        print(f"\n[gguf inference] quantized weights {clip_gguf['dense_bytes'] / mib:.0f} MiB as float32; anon "
              f"RSS MiB: before {a0 / mib:.0f}, loaded {a1 / mib:.0f}, encoded {a2 / mib:.0f}, ejected {a3 / mib:.0f}")
    now = _gguf_params(clip.cond_stage_model)
    assert set(now) == set(ws)
    # the same blocks (never copied, never dequantized) and no dense storage behind any wrapper
    assert all(now[n].raw.data_ptr() == ptr[n] for n in ws)
    assert all(_no_dense_storage(p) for p in now.values())
    # a dense copy of the quantized weights would be >= 1/2 of dense_bytes (float16); the tokenizer,
    # activations and ComfyUI's own state take a few tens of MiB -- allow 1/4
    assert a2 - a0 < clip_gguf["dense_bytes"] / 4, (a0, a1, a2)
    assert a3 - a2 < clip_gguf["dense_bytes"] / 16, (a2, a3)        # ejecting adds nothing


def test_gguf_unet_every_comfy_load_unload_path_keeps_blocks(gguf_model):
    m = gguf_loaders.load_gguf_unet(gguf_model["path"])
    ws = _gguf_params(m.model.diffusion_model)
    raw = {n: p.raw for n, p in ws.items()}
    out = G._sample(m)                                  # load_models_gpu -> ModelPatcher.load -> module.to
    assert torch.isfinite(out).all()
    cpu = torch.device("cpu")
    mm.load_models_gpu([m])
    m.partially_unload(cpu, 1e30)
    m.partially_load(cpu, 1e30)
    m.unpatch_model(cpu)
    m.patch_model(cpu)
    m.model_patches_to(cpu)
    m.detach()
    mm.unload_all_models()
    m.model.to(cpu)
    assert torch.equal(G._sample(m), out)
    mm.unload_all_models()
    m.model.to(torch.float16)                           # (lossy for the plain F32 tensors: last)
    m.model.float()
    now = _gguf_params(m.model.diffusion_model)
    assert set(now) == set(ws)
    assert all(torch.equal(now[n].raw, raw[n]) for n in ws)
    assert all(_no_dense_storage(p) for p in now.values())


def _calc_spy(monkeypatch):
    import comfy.lora
    seen = []
    real = comfy.lora.calculate_weight

    def spy(patches, weight, key, intermediate_dtype=torch.float32, **kw):
        seen.append((key, weight.dtype, intermediate_dtype))
        return real(patches, weight, key, intermediate_dtype=intermediate_dtype, **kw)
    monkeypatch.setattr(comfy.lora, "calculate_weight", spy)
    return seen


@pytest.mark.parametrize("high", [True, False])
def test_high_precision_loras(gguf_model, monkeypatch, high):
    """CheckpointLoaderAdvancedDisTorch2MultiGPU's high_precision_loras: float32 LoRA math for every
    patched weight (some streamed, some resident) or the fp16 weights' own dtype; kept through clone()."""
    import comfy.sd
    dense = folder_paths.get_full_path("diffusion_models", gguf_model["dense"])

    def fake_load(ckpt_name, unet_device, clip_device, vae_device):   # fp16 weights, float32 compute
        return [comfy.sd.load_diffusion_model(dense, model_options={"dtype": torch.float16}), None, None]
    monkeypatch.setattr(N, "_load_checkpoint", fake_load)
    node = N.build()["CheckpointLoaderAdvancedDisTorch2MultiGPU"]()
    model, clip, vae = node.load_checkpoint("unused", "cpu", 0.0005, "cpu", "cpu", 0.0, "cpu", "cpu",
                                            high_precision_loras=high, eject_models=False)
    lm = G._lora(model, gguf_model["lora"])
    assert lm.model_options["distorch_lora_float32"] is high        # survives the LoRA loader's clone
    seen = _calc_spy(monkeypatch)
    out = G._sample(lm)
    plan = entry.state_of(lm).plan
    assert 0 < plan.offloaded_bytes() < plan.model_bytes             # streamed and resident weights
    assert seen and {k for k, _, _ in seen} == set(lm.patches)
    want = torch.float32 if high else torch.float16
    assert all(w == want and i == want for _, w, i in seen), set((w, i) for _, w, i in seen)
    # a strength change re-patches the kept originals in place: same precision rule
    seen.clear()
    lm2 = G._lora(model, gguf_model["lora"], 0.5)
    G._sample(lm2)
    assert seen and all(w == want and i == want for _, w, i in seen)
    if not high:
        return
    # float32 math == ComfyUI's own patch path (which always computes in float32) on the same weights
    mm.unload_all_models()
    ref = comfy.sd.load_diffusion_model(dense, model_options={"dtype": torch.float16})
    assert torch.equal(out, G._sample(G._lora(ref, gguf_model["lora"])))


def test_high_precision_loras_reaches_gguf_patches(gguf_model):
    from distorch.comfy_nodes.patcher import set_lora_precision
    m = gguf_loaders.load_gguf_unet(gguf_model["path"])
    set_lora_precision(m, True)
    lm = G._lora(m, gguf_model["lora"])
    G._sample(lm)
    fns = [f for mod in lm.model.modules() for f in getattr(mod, "weight_function", [])
           if type(f).__name__ == "GGUFPatch"]
    assert fns and all(f.patch_dtype == torch.float32 for f in fns)
