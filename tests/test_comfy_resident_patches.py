"""LoRA on RESIDENT weights at load (comfy_nodes/resident_patches.py): the backup of a patched resident weight is
the host tensor it held before compile (ComfyUI's inplace_update=False backup, no copy), and unload / reload /
strength changes still give the plain ComfyUI result bit for bit, with the original tensor back in the model.

Two cases on a CPU: the host computing (nothing moves: the live tensor is the original, the parameter is rebound
to the patched result), and every resident weight made to move through the staged upload (runtime/place.py
needs_move + runtime/upload.py with ordinary staging), which is what a GPU does: the backup is the pre-move host
tensor, the patched bytes are written into the uploaded one.
"""
from __future__ import annotations

import functools

import pytest
import torch

from comfy_calls import distorch_unet as _distorch, ksample, lora as _lora, plain_lora_refs
from comfy_harness import boot_inprocess
from comfy_models import save_tiny_lora, tiny_mmdit_state, unet_lora_dirs

mm, nodes, folder_paths = boot_inprocess()
import safetensors.torch  # noqa: E402

from distorch.comfy_nodes import entry, resident_patches, stream_patches  # noqa: E402
from distorch.runtime import download, place, upload  # noqa: E402


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    unet_dir, lora_dir = unet_lora_dirs(tmp_path_factory, "resident_patches")
    sd = tiny_mmdit_state(2, 0)
    safetensors.torch.save_file(sd, str(unet_dir / "rp_small.safetensors"))
    # on every 2-D weight: the blocks, which stream here, and the embedders and final layer, which stay resident
    save_tiny_lora(sd, str(lora_dir / "rp_small_lora.safetensors"), seed=7, blocks_only=False)
    return "rp_small.safetensors", "rp_small_lora.safetensors"


@pytest.fixture(autouse=True)
def _clean():
    mm.unload_all_models()
    yield
    mm.unload_all_models()


@pytest.fixture(params=["host", "moved"])
def how(request, monkeypatch):
    if request.param == "moved":
        monkeypatch.setattr(place, "needs_move", lambda t, device: True)
        monkeypatch.setattr(place, "upload_to", functools.partial(upload.to_device, pin=False, stage_bytes=8192,
                                                                  stages=3))
    return request.param


def _weights(m, keys):
    return {k: stream_patches.mp.get_key_weight(m.model, k)[0] for k in keys}


def test_backup_is_the_host_original_and_unload_restores_it(files, how):
    unet, lora = files
    with torch.inference_mode():
        refs = plain_lora_refs(unet, lora)
        m = _distorch(unet, 0.001)                  # some units streamed, the others resident
        lm = _lora(m, lora, 1.0)
        keys = sorted(lm.patches)
        before = {k: w.data for k, w in _weights(m, keys).items()}      # the tensors the parameters hold now
        saved = {k: t.clone() for k, t in before.items()}
        out = ksample(lm)
        assert torch.equal(out, refs[1.0])
        st = entry.state_of(m)
        idx = st.stream_index()
        live = _weights(m, keys)
        resident = [k for k in keys if id(live[k]) not in idx]
        assert resident and len(resident) < len(keys), "the test needs resident and streamed patched weights"
        for k in resident:
            bk = lm.backup[k]
            assert bk.inplace_update is False, k
            assert bk.weight.data_ptr() == before[k].data_ptr(), f"{k}: the backup is a copy"
            assert live[k].data_ptr() != before[k].data_ptr()          # the model holds the patched bytes
            assert torch.equal(bk.weight, saved[k])
        mm.unload_all_models()
        assert not lm.backup and st.handle is None
        after = _weights(m, keys)
        for k in keys:
            assert torch.equal(after[k].data, saved[k]), f"{k}: not the unpatched bytes after unload"
        for k in resident:
            assert after[k].data_ptr() == before[k].data_ptr(), f"{k}: not the original tensor after unload"
        assert torch.equal(ksample(m), refs[0.0])              # no LoRA: the plain model
        mm.unload_all_models()
        assert torch.equal(ksample(lm), refs[1.0])             # reload with the LoRA
        assert all(lm.backup[k].inplace_update is False for k in resident)
        mm.unload_all_models()


def test_unload_copies_no_patched_resident_weight_back(files, monkeypatch):
    """Undo to the host copies every resident weight off the compute device, except the LoRA'd ones: they are
    bound to ComfyUI's backup (their unpatched host tensor), which unpatch_model puts back right after.  A copy
    of the patched bytes would be wasted and would sit beside the backup during the unload.  Run as a GPU runs
    it: every resident weight moves (needs_move), so undo copies them back."""
    monkeypatch.setattr(place, "needs_move", lambda t, device: True)
    monkeypatch.setattr(place, "upload_to", functools.partial(upload.to_device, pin=False, stage_bytes=8192, stages=3))
    monkeypatch.setattr(place, "_Download", functools.partial(download.Download, pin=False, stage_bytes=8192,
                                                               stages=3))
    copied = []
    real = download.Download.to_host

    def spy(self, tensors):
        copied.extend(t.data_ptr() for t in tensors)
        return real(self, tensors)

    monkeypatch.setattr(download.Download, "to_host", spy)
    unet, lora = files
    with torch.inference_mode():
        refs = plain_lora_refs(unet, lora)
        m = _distorch(unet, 0.001)
        lm = _lora(m, lora, 1.0)
        keys = sorted(lm.patches)
        assert torch.equal(ksample(lm), refs[1.0])
        st = entry.state_of(m)
        idx = st.stream_index()
        live = _weights(m, keys)
        resident = [k for k in keys if id(live[k]) not in idx]
        patched_ptrs = {live[k].data_ptr() for k in resident}
        backups = {k: lm.backup[k].weight for k in resident}
        saved = {k: t.clone() for k, t in backups.items()}
        mm.unload_all_models()
        assert resident and copied, "the test needs patched resident weights and an undo that copies"
        assert not patched_ptrs & set(copied), "undo copied patched resident bytes back to the host"
        after = _weights(m, keys)
        for k in resident:
            assert after[k].data_ptr() == backups[k].data_ptr() and torch.equal(after[k].data, saved[k]), k
        assert torch.equal(ksample(m), refs[0.0])
        mm.unload_all_models()
        assert torch.equal(ksample(lm), refs[1.0])
        mm.unload_all_models()


def test_strength_change_and_removal_while_loaded(files, how):
    unet, lora = files
    with torch.inference_mode():
        refs = plain_lora_refs(unet, lora)
        m = _distorch(unet, 0.001)
        st = entry.state_of(m)
        for s in (1.0, 0.5, 0.0, 1.0):
            assert torch.equal(ksample(_lora(m, lora, s) if s else m), refs[s]), f"strength {s}"
        assert st.compiles == 1 and st.repatches >= 2
        mm.unload_all_models()
        assert torch.equal(ksample(_lora(m, lora, 0.5)), refs[0.5])


def test_without_the_new_path_comfyuis_backup_is_kept(files, monkeypatch):
    """Where patch_resident does not apply, the resident weights get ComfyUI's own (copied) backup, still exact."""
    unet, lora = files
    monkeypatch.setattr("distorch.comfy_nodes.patcher.patch_resident", lambda *a: False)
    with torch.inference_mode():
        refs = plain_lora_refs(unet, lora, strengths=(1.0,))
        m = _distorch(unet, 0.001)
        lm = _lora(m, lora, 1.0)
        assert torch.equal(ksample(lm), refs[1.0])
        assert lm.backup and all(bk.inplace_update is True for bk in lm.backup.values())
        mm.unload_all_models()
        assert torch.equal(ksample(m), refs[0.0])


def test_patch_math_matches_comfyui(files):
    """patched_weight == ModelPatcher.patch_weight_to_device's stored tensor, for every patched key."""
    unet, lora = files
    with torch.inference_mode():
        m = _lora(nodes.UNETLoader().load_unet(unet, "default")[0], lora, 0.7)
        for k in sorted(m.patches)[:6]:
            w, set_func, convert_func = stream_patches.mp.get_key_weight(m.model, k)
            mine = resident_patches.patched_weight(m, k, w, set_func, convert_func, torch.device("cpu"))
            orig = w.data.clone()
            m.patch_weight_to_device(k, device_to=torch.device("cpu"))
            theirs = stream_patches.mp.get_key_weight(m.model, k)[0]
            assert torch.equal(mine, theirs.data) and torch.equal(m.backup[k].weight, orig)
        m.unpatch_model()


def _one_linear(kind):
    """A module with one Linear of ComfyUI's ops: scaled fp8 (set / convert functions), bf16, or fp32."""
    import comfy.ops
    torch.manual_seed(3)
    if kind == "fp8_scaled":
        lin = comfy.ops.scaled_fp8_ops(override_dtype=torch.float8_e4m3fn).Linear(64, 48, device="cpu")
        lin.weight = torch.nn.Parameter((torch.randn(48, 64) * 0.5).to(torch.float8_e4m3fn), requires_grad=False)
        lin.scale_weight = torch.nn.Parameter(torch.tensor(0.37), requires_grad=False)
    else:
        dt = torch.bfloat16 if kind.startswith("bf16") else torch.float32
        lin = comfy.ops.manual_cast.Linear(64, 48, device="cpu", dtype=dt)
        lin.weight = torch.nn.Parameter((torch.randn(48, 64) * 0.5).to(dt), requires_grad=False)
    m = torch.nn.Module()
    m.lin = lin
    return m


@pytest.mark.parametrize("kind", ["fp8_scaled", "bf16_low_precision", "bf16", "fp32"])
def test_patch_resident_is_bit_identical_to_patch_weight_to_device(kind):
    """On a weight that moved (the live tensor a copy of the host one), patch_resident stores what
    patch_weight_to_device(inplace_update=True) stores -- ComfyUI's own, or DisTorch's override for low-precision
    LoRAs -- keeps the host tensor as the backup without copying it, and unpatch puts that tensor back."""
    from comfy.weight_adapter.lora import LoRAAdapter
    from distorch.comfy_nodes.patcher import mixed_class, set_lora_precision
    key = "lin.weight"
    g = torch.Generator().manual_seed(11)
    adapter = LoRAAdapter(set(), (torch.randn(48, 8, generator=g) * 0.2, torch.randn(8, 64, generator=g) * 0.2,
                                  None, None, None, None))
    cls = mixed_class(stream_patches.mp.ModelPatcher)
    out = []
    for mine in (False, True):
        m = _one_linear(kind)
        p = cls(m, torch.device("cpu"), torch.device("cpu"))
        set_lora_precision(p, kind != "bf16_low_precision")
        p.add_patches({key: adapter}, 0.8)
        w = m.lin.weight
        host = w.data
        orig = host.clone()
        w.data = host.clone()                        # "uploaded": the live tensor is another storage
        if mine:
            assert resident_patches.patch_resident(p, key, torch.device("cpu"), w, {id(w): host})
            assert p.backup[key].weight is host and p.backup[key].inplace_update is False
        else:
            p.patch_weight_to_device(key, device_to=torch.device("cpu"), inplace_update=True)
        assert m.lin.weight is w and w.dtype == orig.dtype
        out.append(w.data.clone())
        p.unpatch_model()
        assert torch.equal(m.lin.weight.data.view(torch.uint8), orig.view(torch.uint8))
        if mine:
            assert m.lin.weight.data_ptr() == host.data_ptr(), "unpatch puts the host tensor back"
    assert not torch.equal(out[0].view(torch.uint8), orig.view(torch.uint8)), "the LoRA changed the weight"
    assert torch.equal(out[0].view(torch.uint8), out[1].view(torch.uint8))


def test_patch_resident_declines_and_changes_nothing():
    from comfy.weight_adapter.lora import LoRAAdapter
    from distorch.comfy_nodes.patcher import mixed_class
    key = "lin.weight"
    adapter = LoRAAdapter(set(), (torch.ones(48, 8) * 0.1, torch.ones(8, 64) * 0.1, None, None, None, None))
    cls = mixed_class(stream_patches.mp.ModelPatcher)
    m = _one_linear("fp32")
    p = cls(m, torch.device("cpu"), torch.device("cpu"))
    p.add_patches({key: adapter})
    w = m.lin.weight
    before = w.data.clone()
    assert not resident_patches.patch_resident(p, key, None, w, {})                  # nothing kept
    assert not resident_patches.patch_resident(p, key, None, None, {id(w): w.data})   # not the weight seen before
    p.weight_inplace_update = True
    assert not resident_patches.patch_resident(p, key, None, w, {id(w): w.data})
    assert not p.backup and torch.equal(w.data, before)
