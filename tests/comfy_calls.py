"""ComfyUI node calls for tests in an in-process ComfyUI (comfy_harness.boot_inprocess): load a UNet (plain
or DisTorch2 on CPU), add a LoRA, sample the tiny SD3-style models with ComfyUI's own KSampler.
"""


def plain_unet(name):
    """ComfyUI's own UNETLoader (default weight dtype)."""
    import nodes
    return nodes.UNETLoader().load_unet(name, "default")[0]


def distorch_unet(name, vram_gb=100.0):
    """The same file through this pack's UNETLoaderDisTorch2MultiGPU node, computing on the CPU, donor cpu."""
    from distorch.comfy_nodes import nodes as pack_nodes
    cls = pack_nodes.build()["UNETLoaderDisTorch2MultiGPU"]
    return cls().load(unet_name=name, weight_dtype="default", compute_device="cpu", virtual_vram_gb=vram_gb,
                      donor_device="cpu", expert_mode_allocations="", eject_models=False)[0]


def lora(model, name, strength=1.0):
    """ComfyUI's own LoraLoaderModelOnly."""
    import nodes
    return nodes.LoraLoaderModelOnly().load_lora_model_only(model, name, strength)[0]


def plain_lora_refs(unet, lora_name, strengths=(1.0, 0.5)):
    """The plain loader's latents with the LoRA at each strength and without it (key 0.0); ComfyUI's models are
    unloaded again afterwards, so the DisTorch loads that follow start from nothing."""
    import comfy.model_management as mm
    plain = plain_unet(unet)
    refs = {s: ksample(lora(plain, lora_name, s)) for s in strengths}
    refs[0.0] = ksample(plain)
    mm.unload_all_models()
    return refs


def sd3_conditioning():
    """Fixed (positive, negative) conditioning for the tiny SD3-style test models (context 32, pooled 64)."""
    import torch
    pos = [[torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(1)),
            {"pooled_output": torch.randn(1, 64, generator=torch.Generator().manual_seed(2))}]]
    neg = [[torch.zeros(1, 8, 32), {"pooled_output": torch.zeros(1, 64)}]]
    return pos, neg


def ksample(model, seed=42, steps=2):
    """Two euler steps of ComfyUI's own KSampler on a tiny 16-channel latent; returns the latent."""
    import torch
    import nodes
    pos, neg = sd3_conditioning()
    lat = {"samples": torch.zeros(1, 16, 8, 8)}
    return nodes.KSampler().sample(model, seed, steps, 3.0, "euler", "normal", pos, neg, lat)[0]["samples"]


def unload_models_around():
    """An autouse fixture's body: ComfyUI's loaded models unloaded before and after each test (a test module
    registers it: `_clean = pytest.fixture(autouse=True)(unload_models_around)`)."""
    import comfy.model_management as mm
    mm.unload_all_models()
    yield
    mm.unload_all_models()
