"""GGUF diffusion models in a real ComfyUI (0.3.75, in this process, CPU) without ComfyUI-GGUF.

A tiny SD3-style MMDiT (ComfyUI detects SD3 from its keys) is written as a .gguf with Q8_0 linear
weights (gguf-py's quantizer) and F32 for the rest.  It loads through our native reader and ComfyUI's
own loader entry point (comfy_nodes/gguf_loaders.py), and through the UnetLoaderGGUFDisTorch2MultiGPU
node function (streamed quantized); both sample through ComfyUI's KSampler and must agree bit for bit.
Every test runs as ComfyUI's executor runs a prompt: inside torch.inference_mode(), and with GGUF strict
mode on (an op on a GGUFTensor without a quantized handler raises instead of dequantizing).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from comfy_calls import ksample, lora  # noqa: E402
from comfy_harness import boot_inprocess  # noqa: E402
from comfy_models import tiny_mmdit_state, unet_lora_dirs  # noqa: E402

mm, nodes, folder_paths = boot_inprocess()

from gguf import GGMLQuantizationType as QT  # noqa: E402

from distorch.comfy_nodes import entry, gguf_loaders  # noqa: E402
from distorch.formats.gguf_tensor import GGUFTensor, strict_gguf  # noqa: E402

DEPTH = 2


def _write_gguf(path, sd, keep=()):
    """2-D weights whose rows split into 32-value blocks -> Q8_0 (except keys containing a `keep`
    string); everything else F32. Returns the quantized keys."""
    w = gguf.GGUFWriter(str(path), "sd3")
    q = []
    for k, v in sd.items():
        a = v.numpy().astype(np.float32)
        if k.endswith(".weight") and a.ndim == 2 and a.shape[1] % 32 == 0 and not any(s in k for s in keep):
            w.add_tensor(k, gguf.quants.quantize(a, QT.Q8_0), raw_dtype=QT.Q8_0)
            q.append(k)
        else:
            w.add_tensor(k, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return q


def _write_lora(sd, path, rank=4, seed=5):
    import safetensors.torch
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.dim() == 2 and k.startswith("joint_blocks."):
            stem = "diffusion_model." + k[:-len(".weight")]
            out[stem + ".lora_up.weight"] = torch.randn(v.shape[0], rank, generator=g) * 0.1
            out[stem + ".lora_down.weight"] = torch.randn(rank, v.shape[1], generator=g) * 0.1
    safetensors.torch.save_file(out, str(path))


def _q8_round_trip(sd, quantized):
    """sd with the tensors named in `quantized` replaced by their Q8_0 round trip (gguf-py): the dense
    twin of a Q8_0 GGUF file, for bit-for-bit references."""
    dense = {}
    for k, v in sd.items():
        if k in quantized:
            qa = gguf.quants.quantize(v.numpy().astype(np.float32), QT.Q8_0)
            v = torch.from_numpy(gguf.quants.dequantize(qa, QT.Q8_0))
        dense[k] = v.contiguous()
    return dense


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    import safetensors.torch
    d, lo = unet_lora_dirs(tmp_path_factory, "comfy_gguf")
    sd = tiny_mmdit_state(DEPTH)
    q = _write_gguf(d / "tiny_sd3_q8.gguf", sd)
    _write_lora(sd, lo / "tiny_sd3_lora.safetensors")
    # the same model with the Q8_0 weights dequantized (float32 safetensors): the LoRA reference
    dense = _q8_round_trip(sd, q)
    safetensors.torch.save_file(dense, str(d / "tiny_sd3_q8_dense.safetensors"))
    return {"name": "tiny_sd3_q8.gguf", "path": str(d / "tiny_sd3_q8.gguf"), "quantized": q,
            "dense": "tiny_sd3_q8_dense.safetensors", "lora": "tiny_sd3_lora.safetensors"}


@pytest.fixture(autouse=True)
def _clean():
    # as ComfyUI's executor runs every node (execution.py: `with torch.inference_mode():`), strict GGUF
    with torch.inference_mode(), strict_gguf():
        mm.unload_all_models()
        yield
        mm.unload_all_models()


_sample = ksample


def _gguf_weights(model):
    return {n: p for n, p in model.model.diffusion_model.named_parameters() if isinstance(p, GGUFTensor)}


def test_native_load_keeps_weights_quantized_and_samples(gguf_model):
    m = gguf_loaders.load_gguf_unet(gguf_model["path"])
    assert type(m.model).__name__ == "SD3"
    ws = _gguf_weights(m)
    assert len(ws) == len(gguf_model["quantized"]) > 10
    assert all(w.qtype == QT.Q8_0 for w in ws.values())
    out = _sample(m)
    assert torch.isfinite(out).all() and out.abs().max() > 0
    # still quantized after ComfyUI loaded it for sampling (nothing was dequantized into the module)
    assert len(_gguf_weights(m)) == len(ws)


def _write_one(path, arch, name, array):
    """A GGUF file holding one tensor."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_tensor(name, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_inputs_named(gguf_model, tmp_path):
    with pytest.raises(ValueError, match="dequant_dtype"):
        gguf_loaders.load_gguf_unet(gguf_model["path"], dequant_dtype="int4")
    bad = _write_one(tmp_path / "nothing.gguf", "none", "some.tensor", np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="could not detect"):
        gguf_loaders.load_gguf_unet(str(bad))
    t5 = _write_one(tmp_path / "t5.gguf", "t5encoder", "enc.blk.0.attn_zzz.weight", np.zeros((4, 32), dtype=np.float32))
    with pytest.raises(ValueError, match="attn_zzz"):
        gguf_loaders.load_gguf_clip([str(t5)], "sd3")


def test_llama_cpp_named_t5_reaches_comfyui_with_original_names(tmp_path, monkeypatch):
    """A T5 encoder GGUF in llama.cpp naming is renamed before ComfyUI sees it (formats/gguf_names.py)."""
    import comfy.sd
    from gguf.quants import quantize, dequantize as gdq
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(tmp_path / "t5q.gguf"), "t5encoder")
    src = {}
    for name, shape in [("token_embd.weight", (32, 64)), ("enc.output_norm.weight", (64,)),
                        ("enc.blk.0.attn_q.weight", (64, 64)), ("enc.blk.0.attn_rel_b.weight", (32, 2)),
                        ("enc.blk.0.ffn_gate.weight", (128, 64)), ("enc.blk.0.ffn_up.weight", (128, 64))]:
        a = rng.standard_normal(shape).astype(np.float32)
        if len(shape) == 2 and shape[1] % 32 == 0:
            q = quantize(a, QT.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=QT.Q8_0)
            src[name] = gdq(q, QT.Q8_0)
        else:
            w.add_tensor(name, a)
            src[name] = a
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    seen = {}

    def fake(sds, **kw):
        seen.update(sds[0])
        return "clip"
    monkeypatch.setattr(comfy.sd, "load_text_encoder_state_dicts", fake)
    assert gguf_loaders.load_gguf_clip([str(tmp_path / "t5q.gguf")], "sd3") == "clip"
    want = {"shared.weight": "token_embd.weight", "encoder.final_layer_norm.weight": "enc.output_norm.weight",
            "encoder.block.0.layer.0.SelfAttention.q.weight": "enc.blk.0.attn_q.weight",
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight": "enc.blk.0.attn_rel_b.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": "enc.blk.0.ffn_gate.weight",
            "encoder.block.0.layer.1.DenseReluDense.wi_1.weight": "enc.blk.0.ffn_up.weight"}
    assert set(seen) == set(want)
    for hf, g in want.items():
        t = seen[hf]
        dense = t.dequantize(torch.float32) if hasattr(t, "qtype") else t.float()
        assert torch.equal(dense, torch.from_numpy(src[g]).reshape(dense.shape)), hf


@pytest.mark.parametrize("vram_gb", [0.0005, 100.0])
def test_distorch2_gguf_node_samples_equal_to_resident_quantized(gguf_model, vram_gb):
    from distorch.comfy_nodes import nodes as N
    ref = _sample(gguf_loaders.load_gguf_unet(gguf_model["path"]))
    mm.unload_all_models()
    cls = N.build()["UnetLoaderGGUFDisTorch2MultiGPU"]
    assert cls.BASE_CLASS is N.UnetLoaderGGUFNative        # ComfyUI-GGUF is not installed here
    (m,) = getattr(cls(), cls.FUNCTION)(unet_name=gguf_model["name"], compute_device="cpu",
                                        virtual_vram_gb=vram_gb, donor_device="cpu",
                                        expert_mode_allocations="", eject_models=False)
    out = _sample(m)
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max().item()}"
    st = entry.state_of(m)
    assert st is not None and st.handle is not None
    off = st.plan.offloaded_bytes()
    assert off > 0
    if vram_gb > 1:
        assert off == st.plan.model_bytes
    # units were counted at their stored (quantized) size, and GGUF weights streamed as such
    rt = st.handle.runtime
    homes = sum(h.nbytes for h in rt.homes.values())
    dense = sum(p.numel() * 4 for p in m.model.diffusion_model.parameters())
    assert homes < 0.6 * dense
    assert _gguf_weights(m)


_lora = lora


def test_lora_on_native_gguf_applied_per_call_and_removed(gguf_model):
    m = gguf_loaders.load_gguf_unet(gguf_model["path"])
    base = _sample(m)
    mm.unload_all_models()
    out = _sample(_lora(m, gguf_model["lora"]))
    assert not torch.equal(out, base)
    mm.unload_all_models()
    # the same LoRA on the dequantized weights loaded by ComfyUI's own UNETLoader
    dense = nodes.UNETLoader().load_unet(gguf_model["dense"], "default")[0]
    assert torch.equal(_sample(dense), base)      # native GGUF == its dequantized twin, bit for bit
    mm.unload_all_models()
    ref = _sample(_lora(dense, gguf_model["lora"]))
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), f"max diff {(out - ref).abs().max().item()}"
    mm.unload_all_models()
    # unpatched: no LoRA function is left behind on the layers
    assert torch.equal(_sample(m), base)
    assert len(_gguf_weights(m)) == len(gguf_model["quantized"])


def test_distorch2_gguf_node_with_lora_equals_plain(gguf_model):
    from distorch.comfy_nodes import nodes as N
    ref = _sample(_lora(gguf_loaders.load_gguf_unet(gguf_model["path"]), gguf_model["lora"]))
    mm.unload_all_models()
    cls = N.build()["UnetLoaderGGUFDisTorch2MultiGPU"]
    (m,) = getattr(cls(), cls.FUNCTION)(unet_name=gguf_model["name"], compute_device="cpu", virtual_vram_gb=0.0005,
                                        donor_device="cpu", expert_mode_allocations="", eject_models=False)
    ml = _lora(m, gguf_model["lora"])
    out = _sample(ml)
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max().item()}"
    mm.unload_all_models()
    plain = _sample(m)
    mm.unload_all_models()
    assert torch.equal(plain, _sample(gguf_loaders.load_gguf_unet(gguf_model["path"])))


def test_clip_text_encoder_from_gguf_same_conditioning(tmp_path):
    import comfy.sd
    import comfy.sd1_clip
    import safetensors.torch
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in comfy.sd1_clip.SDClipModel(device="meta").state_dict().items()}
    g = torch.Generator().manual_seed(3)
    sd = {}
    for k, shp in sorted(shapes.items()):
        if not k.startswith("transformer."):
            continue
        k = k[len("transformer."):]
        if k.endswith("position_ids"):
            continue
        sd[k] = torch.ones(shp) if ("norm" in k and len(shp) == 1 and k.endswith("weight")) else \
            torch.randn(shp, generator=g) * 0.02
    # position_embedding.weight is read directly by ComfyUI's CLIP (not through its layer's forward): a
    # quantized one is dequantized by GGUFTensor's generic path straight into float32 -- correct, but not
    # the fp16-rounded values of the dense reference, so it stays F32 here for the bit-for-bit check
    q = _write_gguf(tmp_path / "clip_l_q8.gguf", sd, keep=("position_embedding",))
    assert "text_model.embeddings.token_embedding.weight" in q
    dense = _q8_round_trip(sd, q)
    safetensors.torch.save_file(dense, str(tmp_path / "clip_l_dense.safetensors"))
    ref = comfy.sd.load_clip([str(tmp_path / "clip_l_dense.safetensors")], clip_type=comfy.sd.CLIPType.STABLE_DIFFUSION)
    wdt = next(p.dtype for n, p in ref.cond_stage_model.named_parameters() if n.endswith("mlp.fc1.weight"))
    # ComfyUI keeps the dense weights in `wdt` and casts them per call: dequantizing into `wdt` first
    # (dequant_dtype) gives the same values, so the same conditioning bit for bit
    ours = gguf_loaders.load_gguf_clip([str(tmp_path / "clip_l_q8.gguf")], "stable_diffusion",
                                 dequant_dtype={torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(wdt, "float32"))
    assert sum(isinstance(p, GGUFTensor) for p in ours.cond_stage_model.parameters()) == len(q)
    tok = ref.tokenize("a photo of a cat")
    a, pa = ours.encode_from_tokens(tok, return_pooled=True)
    b, pb = ref.encode_from_tokens(tok, return_pooled=True)
    assert torch.equal(a, b) and torch.equal(pa, pb), f"max diff {(a - b).abs().max().item()}"
    # default (dequantize straight into the compute dtype): the same within the dense weights' rounding
    c = gguf_loaders.load_gguf_clip([str(tmp_path / "clip_l_q8.gguf")], "stable_diffusion").encode_from_tokens(tok)
    assert torch.allclose(c, b, rtol=0, atol=2e-2)


def test_multigpu_gguf_nodes_load_natively(gguf_model):
    from distorch.comfy_nodes import nodes as N
    mapping = N.build()
    ref = _sample(gguf_loaders.load_gguf_unet(gguf_model["path"]))
    mm.unload_all_models()
    for name in ("UnetLoaderGGUFMultiGPU", "UnetLoaderGGUFAdvancedMultiGPU"):
        cls = mapping[name]
        kw = {"unet_name": gguf_model["name"], "device": "cpu"}
        if "Advanced" in name:
            kw.update(dequant_dtype="default", patch_dtype="default", patch_on_device=False)
        (m,) = getattr(cls(), cls.FUNCTION)(**kw)
        assert _gguf_weights(m) and m.load_device == torch.device("cpu")
        assert torch.equal(_sample(m), ref)
        mm.unload_all_models()


def test_patch_on_device_keeps_a_moved_copy_of_the_lora_and_same_output(gguf_model):
    ref = _sample(_lora(gguf_loaders.load_gguf_unet(gguf_model["path"]), gguf_model["lora"]))
    mm.unload_all_models()
    m = _lora(gguf_loaders.load_gguf_unet(gguf_model["path"], patch_on_device=True), gguf_model["lora"])
    out = _sample(m)
    assert torch.equal(out, ref)
    fns = [f for mod in m.model.modules() for f in getattr(mod, "weight_function", [])
           if type(f).__name__ == "GGUFPatch"]
    assert fns and all(f.local is not None for f in fns)
    # the copy is its own (on the load device): not the patcher's tensors
    f = fns[0]
    assert f.local is not m.patches[f.key]
    mm.unload_all_models()
