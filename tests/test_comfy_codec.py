"""Compressed streaming inside ComfyUI (issue 14) on CPU: ComfyUI 0.3.75's own nodes (UNETLoader through our
UNETLoaderDisTorch2MultiGPU, LoraLoaderModelOnly, KSampler) in this process, inside torch.inference_mode() as
ComfyUI's executor runs them, with the diffusion model kept in bf16 (ComfyUI's --bf16-unet) and
DISTORCH_COMPRESS=on, so that every offloaded unit streams its weights losslessly compressed.

The latents must equal the plain loader's bit for bit; a unit whose weights get a LoRA streams raw (a packed
home cannot be patched), at every strength, after the LoRA is removed and after an unload."""
from __future__ import annotations

import pytest
import torch

from comfy_calls import distorch_unet as _distorch, ksample, lora as _lora, plain_lora_refs, plain_unet as _plain
from comfy_harness import boot_inprocess
from comfy_models import save_tiny_lora, tiny_mmdit_state, unet_lora_dirs

mm, nodes, folder_paths = boot_inprocess()
import safetensors.torch  # noqa: E402
from comfy.cli_args import args as comfy_args  # noqa: E402

from distorch.comfy_nodes import entry  # noqa: E402

DEPTH = 4        # hidden 256: the block weights (256 x 256 and up) are codable


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    unet_dir, lora_dir = unet_lora_dirs(tmp_path_factory, "codec")
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_mmdit_state(DEPTH, 3).items()}
    safetensors.torch.save_file(sd, str(unet_dir / "codec_unet.safetensors"))
    save_tiny_lora({k: v.float() for k, v in sd.items()}, str(lora_dir / "codec_lora.safetensors"))
    return "codec_unet.safetensors", "codec_lora.safetensors"


@pytest.fixture(autouse=True)
def _bf16_and_compress(monkeypatch):
    monkeypatch.setattr(comfy_args, "bf16_unet", True)
    monkeypatch.setenv("DISTORCH_COMPRESS", "on")
    mm.unload_all_models()
    yield
    mm.unload_all_models()


def test_compressed_unet_bit_identical_to_the_plain_loader(files):
    unet, _ = files
    with torch.inference_mode():
        plain = _plain(unet)
        assert plain.model.diffusion_model.joint_blocks[0].x_block.attn.qkv.weight.dtype == torch.bfloat16
        ref = ksample(plain)
        mm.unload_all_models()
        del plain
        m = _distorch(unet)
        out = ksample(m)
        st = entry.state_of(m)
        assert st.plan.codec, "DISTORCH_COMPRESS=on compressed nothing"
        stats = st.handle.stats
        c = stats["codec"] if isinstance(stats, dict) else stats()["codec"]
        assert c is not None and c["ratio"] < 0.8 and c["tensors"] > 0
        assert torch.equal(out, ref), (out - ref).abs().max()
        mm.unload_all_models()                 # undo decodes the weights back
        assert st.handle is None
        assert torch.equal(ksample(m), ref)  # compiled again, compressed again


def test_units_with_a_lora_stream_raw_and_stay_exact(files):
    unet, lora = files
    with torch.inference_mode():
        refs = plain_lora_refs(unet, lora)
        m = _distorch(unet)
        assert torch.equal(ksample(m), refs[0.0])            # no LoRA yet: compressed
        st = entry.state_of(m)
        assert any(n.startswith("joint_blocks") for n in st.plan.codec)
        for s in (1.0, 0.5, 0.0, 1.0):
            out = ksample(_lora(m, lora, s) if s else m)
            assert torch.equal(out, refs[s]), f"strength {s}: {(out - refs[s]).abs().max()}"
            if s:
                # every joint block carries the LoRA: none of them may stream compressed
                assert not any(n.startswith("joint_blocks") for n in st.plan.codec), st.plan.codec
        mm.unload_all_models()
        assert torch.equal(ksample(_lora(m, lora, 0.5)), refs[0.5])


def test_a_bad_compress_setting_is_a_named_error_at_the_loader(files, monkeypatch):
    """DISTORCH_COMPRESS=zip: the loader node fails naming the value and the three that work; nothing is
    compiled."""
    from distorch.errors import DisTorchError
    unet, _ = files
    monkeypatch.setenv("DISTORCH_COMPRESS", "zip")
    with torch.inference_mode(), pytest.raises(DisTorchError, match=r"DISTORCH_COMPRESS='zip'.*auto.*on.*off"):
        _distorch(unet)
