"""DisTorch2 on what is not a diffusion UNet, in a real ComfyUI (0.3.75) running in this process on CPU:
an object holding its patcher in an attribute (as VAE / CLIP / ControlNet do), the CLIP and VAE loaders
(random-weight SD1 CLIP-L and SD VAE: conditioning and images unchanged), and the patcher's helpers
(LoRA patches moved between devices, the rest of the base model following the compute device).

ComfyUI is found as for test_comfy_distorch.py (skip without it, fail under DISTORCH_REQUIRE_COMFYUI=1).
"""
from __future__ import annotations

import pytest
import torch

from comfy_calls import unload_models_around
from comfy_harness import boot_inprocess

mm, nodes, folder_paths = boot_inprocess()
import safetensors.torch  # noqa: E402

from distorch.comfy_nodes import entry  # noqa: E402
from distorch.comfy_nodes.patcher import DisTorchPatcherMixin  # noqa: E402

_clean = pytest.fixture(autouse=True)(unload_models_around)


def test_other_holders_and_release():
    """CLIP / VAE / ControlNet keep their patcher in an attribute: the patcher is swapped in place."""
    import comfy.model_patcher as mp

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(torch.nn.Linear(64, 64) for _ in range(4))

        def forward(self, x):
            for b in self.blocks:
                x = torch.tanh(b(x))
            return x

    class Holder:             # the shape of comfy.sd.VAE: .patcher, .device, .first_stage_model
        def __init__(self, net):
            self.first_stage_model = net
            self.device = torch.device("cpu")
            self.patcher = mp.ModelPatcher(net, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))

    torch.manual_seed(0)
    net = Net()
    x = torch.randn(3, 64)
    ref = net(x)
    h = Holder(net)
    out_obj = entry.distorch(h, "cpu", 100.0, "cpu", "", False)
    assert out_obj is h and isinstance(h.patcher, DisTorchPatcherMixin)
    mm.load_models_gpu([h.patcher])
    st = entry.state_of(h)
    assert st.handle is not None and st.plan.offloaded_bytes() == st.plan.model_bytes
    assert torch.equal(net(x), ref)
    assert entry.release(h) is True
    assert st.handle is None and all(p.device.type == "cpu" for p in net.parameters())
    assert torch.equal(net(x), ref)


def test_clip_encoder_same_conditioning(tmp_path):
    """A DisTorch2 CLIP loader: SD1 CLIP-L shaped text encoder (random weights), conditioning unchanged."""
    import comfy.sd1_clip
    m = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float32)
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(tuple(v.shape), generator=g) * 0.02 for k, v in m.transformer.state_dict().items()}
    d = tmp_path / "text_encoders"
    d.mkdir()
    safetensors.torch.save_file(sd, str(d / "tiny_clip.safetensors"))
    folder_paths.add_model_folder_path("text_encoders", str(d))

    def load():
        return nodes.CLIPLoader().load_clip("tiny_clip.safetensors", "stable_diffusion")[0]

    (ref,) = nodes.CLIPTextEncode().encode(load(), "a photo of a cat")
    mm.unload_all_models()
    clip = entry.distorch(load(), "cpu", 0.1, "cpu", "", False)
    assert isinstance(clip.patcher, DisTorchPatcherMixin)
    (out,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
    st = entry.state_of(clip)
    assert st.handle is not None and 0 < st.plan.offloaded_bytes() < st.plan.model_bytes
    assert torch.equal(out[0][0], ref[0][0])
    assert torch.equal(out[0][1]["pooled_output"], ref[0][1]["pooled_output"])
    # ComfyUI encodes through the inner encoder, never the compiled module's forward: the first encode
    # loads units on demand, later encodes stream them (the calls' period learned: runtime free-run)
    rt = st.handle.runtime
    f1 = None
    for k in range(3):
        (again,) = nodes.CLIPTextEncode().encode(clip, "a photo of a cat")
        assert torch.equal(again[0][0], ref[0][0])
        if k == 1:
            f1 = rt.fallback_loads
    assert rt.free_run and rt.fallback_loads == f1
    mm.unload_all_models()
    assert st.handle is None


def test_vae_same_image(tmp_path):
    """A DisTorch2 VAE loader: SD-style VAE (random weights) decodes and encodes exactly as the plain one."""
    from comfy.ldm.models.autoencoder import AutoencoderKL
    ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    with torch.device("meta"):
        shapes = AutoencoderKL(ddconfig=ddconfig, embed_dim=4).state_dict()
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(tuple(v.shape), generator=g) * 0.02 for k, v in shapes.items()}
    d = tmp_path / "vae"
    d.mkdir()
    safetensors.torch.save_file(sd, str(d / "tiny_vae.safetensors"))
    folder_paths.add_model_folder_path("vae", str(d))
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=g)}
    plain = nodes.VAELoader().load_vae("tiny_vae.safetensors")[0]
    (img,) = nodes.VAEDecode().decode(plain, lat)
    (enc,) = nodes.VAEEncode().encode(plain, img)
    mm.unload_all_models()
    vae = entry.distorch(nodes.VAELoader().load_vae("tiny_vae.safetensors")[0], "cpu", 0.1, "cpu", "", True)
    assert isinstance(vae.patcher, DisTorchPatcherMixin) and vae.device == torch.device("cpu")
    (img2,) = nodes.VAEDecode().decode(vae, lat)
    st = entry.state_of(vae)
    assert st.handle is not None and 0 < st.plan.offloaded_bytes() < st.plan.model_bytes
    assert torch.equal(img2, img)
    (enc2,) = nodes.VAEEncode().encode(vae, img)
    assert torch.equal(enc2["samples"], enc["samples"])


def test_patches_to_moves_every_tensor_and_keeps_structure():
    import torch
    from distorch.comfy_nodes.gguf_ops import patches_to

    class Adapter:                       # the shape of ComfyUI's weight adapters: tensors in .weights
        def __init__(self, weights):
            self.loaded_keys = {"k"}
            self.weights = weights
    a, b = torch.ones(3, 2), torch.ones(2, 3)
    patches = [(1.0, Adapter((a, b, None)), 1.0, None, None), (0.5, (a,), 1.0, None, None), (1.0, {"w": b})]
    moved = patches_to(patches, torch.device("meta"))
    assert isinstance(moved, list) and len(moved) == 3
    ad = moved[0][1]
    assert type(ad) is Adapter and ad is not patches[0][1] and ad.loaded_keys == {"k"}
    assert [t.device.type for t in ad.weights[:2]] == ["meta", "meta"] and ad.weights[2] is None
    assert moved[1][1][0].device.type == "meta" and moved[2][1]["w"].device.type == "meta"
    assert moved[0][0] == 1.0 and moved[0][3] is None
    # the original is untouched
    assert patches[0][1].weights[0] is a and a.device.type == "cpu"


def test_rest_of_the_base_model_follows_the_compute_device():
    """model_sampling's tables (outside the compiled diffusion model) go to the compute device, as ComfyUI's
    full load moves them; the diffusion model is left to DisTorch; a large remainder stays (not budgeted)."""
    from distorch.comfy_nodes import patcher

    class Sampling(torch.nn.Module):
        def __init__(self, n):
            super().__init__()
            self.register_buffer("log_sigmas", torch.linspace(-3, 3, n))

    base = torch.nn.Module()
    base.diffusion_model = torch.nn.Linear(8, 8)
    base.model_sampling = Sampling(1000)
    assert patcher.rest_to_device(base, "meta") == 4000
    assert base.model_sampling.log_sigmas.is_meta and not base.diffusion_model.weight.is_meta
    big = torch.nn.Module()
    big.diffusion_model = torch.nn.Linear(8, 8)
    big.model_sampling = Sampling((patcher.REST_MAX_BYTES // 4) + 1)
    assert patcher.rest_to_device(big, "meta") == 0 and not big.model_sampling.log_sigmas.is_meta
    plain = torch.nn.Linear(4, 4)                 # no diffusion_model (a CLIP / VAE model): nothing
    assert patcher.rest_to_device(plain, "meta") == 0 and not plain.weight.is_meta
