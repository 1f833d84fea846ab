"""DisTorch2 UNet models (comfy_nodes: entry, patcher, state, devices) in a real ComfyUI (0.3.75) running in
this process on CPU: loading, sampling, LoRAs, unloading, granularity.  CLIP, VAE and other patcher holders:
test_comfy_distorch_holders.py.

ComfyUI is found at $DISTORCH_COMFYUI_DIR, else <repo>/.comfy/ComfyUI (.ci/setup_comfyui.sh puts it
there); without it these tests skip, unless DISTORCH_REQUIRE_COMFYUI=1, where they fail.

The model is a tiny random-weight SD3-style DiT (ComfyUI detects it as SD3 from its keys); sampling
goes through ComfyUI's own KSampler node function, loading through its own memory manager.  The
DisTorch runtime is the real one (distorch.runtime.api.compile), on CPU: compute "cpu", donor "cpu".
"""
from __future__ import annotations

import gc
import logging
import os
import types

import pytest
import torch

from comfy_calls import ksample, lora, plain_unet, unload_models_around
from comfy_harness import boot_inprocess
from comfy_models import save_tiny_lora, tiny_mmdit_state, unet_lora_dirs

mm, nodes, folder_paths = boot_inprocess()
import comfy.utils  # noqa: E402
import safetensors.torch  # noqa: E402

from distorch.comfy_nodes import comfy_api, devices, entry  # noqa: E402
from distorch.comfy_nodes.patcher import DisTorchPatcherMixin  # noqa: E402
from distorch.errors import DisTorchError  # noqa: E402

DEPTH = 2          # hidden 128, ~4 MB fp32


def _make_sd3(path, depth=DEPTH, seed=0):
    sd = tiny_mmdit_state(depth, seed)
    safetensors.torch.save_file(sd, path)
    return sd


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    unet_dir, lora_dir = unet_lora_dirs(tmp_path_factory, "comfy_models")
    sd = _make_sd3(str(unet_dir / "tiny_sd3.safetensors"))
    _make_sd3(str(unet_dir / "tiny_sd3_b.safetensors"), seed=1)
    save_tiny_lora(sd, str(lora_dir / "tiny_lora.safetensors"))
    return {"unet": "tiny_sd3.safetensors", "unet_b": "tiny_sd3_b.safetensors", "lora": "tiny_lora.safetensors", "sd": sd}


_clean = pytest.fixture(autouse=True)(unload_models_around)
_sample = ksample


def _load(models):
    return plain_unet(models["unet"])


def _lora(model, models, strength):
    return lora(model, models["lora"], strength)


# ------------------------------------------------------------------------------------------------
def test_discovery(monkeypatch):
    assert comfy_api.core_node_class("UNETLoader") is nodes.NODE_CLASS_MAPPINGS["UNETLoader"]
    assert comfy_api.core_node_class("NoSuchLoader") is None
    devs = devices.device_list()
    assert devs[-1] == "cpu" and len(devs) == len(set(devs))
    # ComfyUI started with --cpu (as this harness starts it): no GPU is offered, even on a GPU machine
    assert devices.mm.cpu_state == devices.mm.CPUState.CPU and devs == ["cpu"]
    monkeypatch.setattr(devices.mm, "cpu_state", devices.mm.CPUState.GPU)
    assert devices.device_list()[-1] == "cpu"
    monkeypatch.undo()
    assert devices.default_device() == devs[0]
    assert comfy_api.path() == "classic"          # 0.3.75 has no ModelPatcherDynamic
    # late registration writes ComfyUI's own registry (its nodes.py)
    registry = types.SimpleNamespace(NODE_CLASS_MAPPINGS={}, NODE_DISPLAY_NAME_MAPPINGS={})
    monkeypatch.setattr(comfy_api, "_registry", registry)
    comfy_api.register_nodes({"XMultiGPU": object}, {"XMultiGPU": "X (MultiGPU)"})
    assert registry.NODE_CLASS_MAPPINGS == {"XMultiGPU": object}
    assert registry.NODE_DISPLAY_NAME_MAPPINGS == {"XMultiGPU": "X (MultiGPU)"}


def test_load_on_device(models):
    (m,) = devices.load_on_device("cpu", nodes.UNETLoader().load_unet, models["unet"], "default")
    assert m.load_device == torch.device("cpu")
    # loaded already for another device (CLIP loaders load eagerly): that ComfyUI entry is unloaded first
    _sample(m)
    (lm,) = [x for x in mm.current_loaded_models if x.model is m]
    lm.device = torch.device("meta")          # stands for "loaded for cuda:0" on this CPU-only machine
    assert devices.load_on_device("cpu", lambda: m) is m
    assert not any(x.model is m for x in mm.current_loaded_models)
    with pytest.raises(DisTorchError, match="cuda:7"):
        devices.load_on_device("cuda:7", nodes.UNETLoader().load_unet, models["unet"], "default")
    with pytest.raises(DisTorchError, match="not a device"):
        devices.load_on_device("gpu zero", nodes.UNETLoader().load_unet, models["unet"], "default")


@pytest.mark.parametrize("vram_gb,expect", [(0.0, "none"), (0.0015, "part"), (100.0, "all")])
def test_same_latent_as_plain_loader(models, vram_gb, expect, caplog):
    ref = _sample(_load(models))
    mm.unload_all_models()
    with caplog.at_level(logging.INFO, logger="distorch"):
        m = entry.distorch(_load(models), "cpu", vram_gb, "cpu", "", False)
    assert "v2 Expert String:" in caplog.text and "% model" in caplog.text
    assert type(m).__name__ == "DisTorchModelPatcher"
    st = entry.state_of(m)
    plan = st.plan
    off = plan.offloaded_bytes()
    if expect == "none":
        assert off == 0
    elif expect == "part":
        assert 0 < off < plan.model_bytes
    else:
        assert off == plan.model_bytes
    with caplog.at_level(logging.INFO, logger="distorch"):
        out = _sample(m)
    assert torch.equal(out, ref), f"max diff {(out - ref).abs().max().item()}"
    assert st.compiles == 1 and st.handle is not None
    # the OUTER_SAMPLE wrapper logs measured vs predicted step time after sampling
    assert st.last_stats is not None and st.last_stats["measured_step_s"] > 0
    assert "measured step" in caplog.text
    # ComfyUI sees what the model really holds on its load device, and the whole model as RAM usage
    assert m.loaded_size() == st.vram_bytes() == m.model_size()
    assert m.get_ram_usage() >= plan.model_bytes
    assert any(lm.model is m for lm in mm.current_loaded_models)


def test_expert_string_and_bad_inputs(models):
    m = entry.distorch(_load(models), "cpu", 0.0, "cpu", "cpu:0,25%;cpu,75%", False)
    plan = entry.state_of(m).plan
    assert 0.6 < plan.offloaded_bytes() / plan.model_bytes < 0.9
    with pytest.raises(DisTorchError, match="virtual_vram_gb"):
        entry.distorch(_load(models), "cpu", -1, "cpu", "", False)
    with pytest.raises(DisTorchError, match="virtual_vram_gb"):
        entry.distorch(_load(models), "cpu", "lots", "cpu", "", False)
    with pytest.raises(DisTorchError, match="cuda:7"):
        entry.distorch(_load(models), "cpu", 1.0, "cuda:7", "", False)
    with pytest.raises(DisTorchError):
        entry.distorch(_load(models), "cpu", 0.0, "cpu", "cpu,banana", False)
    with pytest.raises(DisTorchError, match="MODEL, CLIP"):
        entry.distorch(object(), "cpu", 1.0, "cpu", "", False)


@pytest.mark.parametrize("vram_gb", [0.0015, 100.0])
def test_lora_strength_change_does_not_reload(models, monkeypatch, vram_gb):
    refs = {}
    plain = _load(models)
    for s in (0.5, 1.0, -0.7):
        refs[s] = _sample(_lora(plain, models, s))
    refs[0.0] = _sample(plain)
    mm.unload_all_models()

    import distorch.runtime.api as api
    calls = {"compile": 0, "partition": 0, "read_unet": 0}      # "partition": plans made (trace -> granularity)
    real_compile, real_partition, real_read = api.compile, api.plan_model, comfy.utils.load_torch_file

    def count_compile(*a, **k):
        calls["compile"] += 1
        return real_compile(*a, **k)

    def count_partition(*a, **k):
        calls["partition"] += 1
        return real_partition(*a, **k)

    def count_read(path, *a, **k):
        if os.path.basename(str(path)) == models["unet"]:
            calls["read_unet"] += 1
        return real_read(path, *a, **k)

    monkeypatch.setattr(api, "compile", count_compile)
    monkeypatch.setattr(api, "plan_model", count_partition)
    monkeypatch.setattr(comfy.utils, "load_torch_file", count_read)

    m = entry.distorch(_load(models), "cpu", vram_gb, "cpu", "", False)
    st = entry.state_of(m)
    if vram_gb < 1:
        assert 0 < st.plan.offloaded_bytes() < st.plan.model_bytes     # resident AND streamed weights patched
    else:
        assert st.plan.offloaded_bytes() == st.plan.model_bytes        # every unit streamed through shared slots
    assert calls == {"compile": 0, "partition": 1, "read_unet": 1}
    for s in (0.5, 1.0, -0.7, 0.0):
        out = _sample(_lora(m, models, s))
        assert torch.equal(out, refs[s]), f"strength {s}: max diff {(out - refs[s]).abs().max().item()}"
    # one compile for the first load; every later strength was written in place
    assert calls == {"compile": 1, "partition": 1, "read_unet": 1}
    assert st.compiles == 1 and st.releases == 0 and st.repatches == 3


def test_eject_models(models):
    a = _load(models)
    _sample(a)
    assert any(lm.model is a for lm in mm.current_loaded_models)
    b = entry.distorch(_load(models), "cpu", 0.0015, "cpu", "", False)
    assert any(lm.model is a for lm in mm.current_loaded_models), "eject_models=False must keep other models"
    _sample(b)
    c = entry.distorch(_load(models), "cpu", 0.0015, "cpu", "", True)
    left = [lm.model for lm in mm.current_loaded_models]
    assert a not in left and b not in left, "eject_models=True must unload models on the compute device"
    assert entry.state_of(b).handle is None          # b's homes were released on the way out
    assert entry.state_of(c).handle is None          # nothing compiled before a load


def _rss() -> int:
    gc.collect()
    try:                      # give freed heap pages back, so RSS shows what is really held
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs /proc (Linux)")
def test_unload_cycles_leave_rss_flat(models):
    m = entry.distorch(_load(models), "cpu", 0.0015, "cpu", "", False)
    st = entry.state_of(m)
    module = m.model.diffusion_model
    ref = None
    rss = []
    for i in range(20):
        out = _sample(_lora(m, models, 0.5 if i % 2 else 1.0))
        assert st.handle is not None and getattr(module, "_distorch_runtime", None) is not None
        if ref is None:
            ref = out
        mm.unload_all_models()
        assert st.handle is None, "unloading must undo the runtime (free homes and slots)"
        assert getattr(module, "_distorch_runtime", None) is None
        assert not m.backup, "LoRA backups must be restored on unload"
        rss.append(_rss())
    assert st.compiles == 20 and st.releases == 20
    # the plan is made once; later loads reuse it
    # a leaked copy of the model per cycle would add ~4 MiB x 15 (> 10 %); noise is a few MiB
    first, last = sorted(rss[4:9])[2], sorted(rss[-5:])[2]
    assert abs(last - first) / first < 0.02, f"host RSS not flat over 20 cycles: {[r >> 20 for r in rss]} MiB"
    # every second cycle had the same LoRA strength: same result after reload
    out = _sample(_lora(m, models, 1.0))
    assert torch.equal(out, ref)


def test_dynamic_path_is_detected_and_replaced(models, monkeypatch):
    """2026 ComfyUI: ModelPatcherDynamic (comfy-aimdo). Simulated here: CI runs 0.3.75 only."""
    import comfy.model_patcher as mp

    class ModelPatcherDynamic(mp.ModelPatcher):
        def load(self, *a, **k):          # would page weights through aimdo: must never run
            raise AssertionError("dynamic load used")

    monkeypatch.setattr(mp, "ModelPatcherDynamic", ModelPatcherDynamic, raising=False)
    monkeypatch.setattr(mp, "CoreModelPatcher", ModelPatcherDynamic, raising=False)
    monkeypatch.setattr(comfy_api, "_path", None)   # detected again
    assert comfy_api.path() == "dynamic"
    ref = _sample(_load(models))
    mm.unload_all_models()
    m = _load(models)
    dyn = ModelPatcherDynamic(m.model, m.load_device, m.offload_device)
    out = entry.distorch(dyn, "cpu", 0.0015, "cpu", "", False)
    assert not isinstance(out, ModelPatcherDynamic) and isinstance(out, DisTorchPatcherMixin)
    assert torch.equal(_sample(out), ref)


def test_weights_read_while_streaming(models):
    """state_dict (saving) and get_key_patches (merge nodes) see the real weights, not a slot's content."""
    import comfy_extras.nodes_model_merging as merging
    plain_a = _load(models)
    plain_b = nodes.UNETLoader().load_unet(models["unet_b"], "default")[0]
    ref = _sample(merging.ModelMergeSimple().merge(plain_a, plain_b, 0.3)[0])
    mm.unload_all_models()

    b = entry.distorch(nodes.UNETLoader().load_unet(models["unet_b"], "default")[0], "cpu", 100.0, "cpu", "", False)
    _sample(b)                                 # compiled; streamed params now point into slots
    st = entry.state_of(b)
    assert st.handle is not None and st.plan.offloaded_bytes() > 0
    sd_b = plain_b.model.diffusion_model.state_dict()
    live = b.model.diffusion_model.state_dict()
    assert live.keys() == sd_b.keys()
    assert all(torch.equal(live[k].cpu(), sd_b[k]) for k in sd_b), "state_dict must read streamed weights' homes"
    out = _sample(merging.ModelMergeSimple().merge(plain_a, b, 0.3)[0])
    assert torch.equal(out, ref)
    assert st.handle.runtime.W < len(st.handle.runtime.units), "test needs slots shared between units"


def test_custom_stored_weight_reloads_with_same_plan(models, monkeypatch):
    """A weight stored through a custom op (set_weight, e.g. quantized layers) cannot be re-patched in
    place: a strength change then releases and compiles again with the same Plan, still exact."""
    plain = _load(models)
    refs = {s: _sample(_lora(plain, models, s)) for s in (1.0, 0.5)}
    mm.unload_all_models()
    import distorch.runtime.api as rapi
    calls = []
    real = rapi.plan_model
    monkeypatch.setattr(rapi, "plan_model", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = entry.distorch(_load(models), "cpu", 0.0015, "cpu", "", False)
    lin = m.model.diffusion_model.joint_blocks[0].x_block.attn.qkv

    def set_weight(w, inplace_update=False, seed=None):
        with torch.no_grad():
            lin.weight.data.copy_(w.to(lin.weight.dtype))

    lin.set_weight = set_weight
    st = entry.state_of(m)
    assert torch.equal(_sample(_lora(m, models, 1.0)), refs[1.0])
    assert torch.equal(_sample(_lora(m, models, 0.5)), refs[0.5])
    assert st.compiles == 2 and st.releases == 1 and len(calls) == 1


@pytest.mark.parametrize("gran", ["sub", "auto"])
def test_sub_units_in_comfyui_match_plain_loader_with_lora(models, monkeypatch, gran):
    """DISTORCH_GRANULARITY=sub: the layers inside the blocks stream (smaller slots); the latent equals the
    plain loader's, also with a LoRA and after a strength change (written into the sub-units' homes)."""
    plain = _load(models)
    refs = {s: _sample(_lora(plain, models, s)) for s in (1.0, 0.4)}
    ref0 = _sample(plain)
    mm.unload_all_models()
    monkeypatch.setenv("DISTORCH_GRANULARITY", gran)
    m = entry.distorch(_load(models), "cpu", 0.0015, "cpu", "", False)
    st = entry.state_of(m)
    info = st.plan.predicted["granularity"]
    if gran == "sub":
        assert info["chosen"] == "sub"
        streamed = [u.name for u in st.plan.units if u.device != st.plan.compute]
        assert streamed and all(u.kind == "sub" for u in st.plan.units if u.name in set(streamed) and "blocks." in u.name)
        assert any(n.count(".") >= 3 for n in streamed), streamed     # joint_blocks.0.x_block.attn.qkv ...
    assert torch.equal(_sample(m), ref0)
    for s in (1.0, 0.4):
        assert torch.equal(_sample(_lora(m, models, s)), refs[s]), s


def test_bad_granularity_setting_is_named(models, monkeypatch):
    monkeypatch.setenv("DISTORCH_GRANULARITY", "layers")
    with pytest.raises(DisTorchError, match="DISTORCH_GRANULARITY='layers'.*auto.*block.*sub"):
        entry.distorch(_load(models), "cpu", 0.0015, "cpu", "", False)

