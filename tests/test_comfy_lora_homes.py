"""LoRA on STREAMED weights (issue 11, criteria 1 and 4): the patched bytes are baked into the homes, with no
second host copy (the unpatched bytes are re-read from the model file), the patch math runs on the compute
device, and every strength change / removal / unload gives the plain ComfyUI result bit for bit.

Runs ComfyUI 0.3.75's own nodes (UNETLoader through our UNETLoaderDisTorch2MultiGPU, LoraLoaderModelOnly,
KSampler) in this process on CPU, inside torch.inference_mode() as ComfyUI's executor runs nodes.
"""
from __future__ import annotations

import gc

import pytest
import torch

from comfy_calls import distorch_unet as _distorch, ksample, lora as _lora, plain_lora_refs, plain_unet as _plain
from comfy_harness import boot_inprocess
from comfy_models import save_tiny_lora, tiny_mmdit_state, unet_lora_dirs

mm, nodes, folder_paths = boot_inprocess()
import safetensors.torch  # noqa: E402

from distorch.comfy_nodes import entry, stream_patches  # noqa: E402
from distorch.runtime import pinning  # noqa: E402

MiB = 1 << 20


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    unet_dir, lora_dir = unet_lora_dirs(tmp_path_factory, "lora_homes")
    small = tiny_mmdit_state(2, 0)
    safetensors.torch.save_file(small, str(unet_dir / "lh_small.safetensors"))
    save_tiny_lora(small, str(lora_dir / "lh_small_lora.safetensors"))
    # ~300 MiB once loaded (fp16 file, cast to float32 by ComfyUI on CPU): a second copy would show in RSS
    big = {k: v.half() for k, v in tiny_mmdit_state(8, 1).items()}
    safetensors.torch.save_file(big, str(unet_dir / "lh_big.safetensors"))
    save_tiny_lora(big, str(lora_dir / "lh_big_lora.safetensors"))
    del big, small
    return {"small": ("lh_small.safetensors", "lh_small_lora.safetensors"),
            "big": ("lh_big.safetensors", "lh_big_lora.safetensors")}


@pytest.fixture(autouse=True)
def _clean():
    mm.unload_all_models()
    yield
    mm.unload_all_models()


def _anon():
    gc.collect()
    pinning.trim_heap()
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith("RssAnon:"):
                return int(ln.split()[1]) * 1024
    pytest.skip("/proc/self/status has no RssAnon")


def _anon_maps() -> dict:
    """Anonymous resident bytes per mapping (start address and name) from /proc/self/smaps."""
    out, cur = {}, None
    try:
        with open("/proc/self/smaps") as f:
            for ln in f:
                head = ln.split()
                if head and "-" in head[0] and not head[0].endswith(":"):
                    cur = head[0].split("-")[0] + " " + (head[5] if len(head) > 5 else "[anon]")
                elif head and head[0] == "Anonymous:" and cur is not None:
                    out[cur] = int(head[1]) * 1024
    except OSError:
        pass
    return out


def _grown(before: dict, after: dict, top: int = 6) -> str:
    """The mappings whose anonymous bytes grew most (a failure message names where the memory went)."""
    d = sorted(((after[k] - before.get(k, 0), k) for k in after), reverse=True)[:top]
    return ", ".join(f"{k} +{v / MiB:.0f} MiB" for v, k in d if v > 0) or "none"


def test_strength_change_and_removal_bit_identical(files):
    unet, lora = files["small"]
    with torch.inference_mode():
        refs = plain_lora_refs(unet, lora)
        for vram in (0.0015, 100.0):               # some units streamed / every unit streamed
            m = _distorch(unet, vram)
            st = entry.state_of(m)
            for s in (1.0, 0.5, 0.0, 1.0):
                out = ksample(_lora(m, lora, s) if s else m)
                assert torch.equal(out, refs[s]), f"vram {vram} strength {s}: {(out - refs[s]).abs().max()}"
                srcs = stream_patches.sources(m.model)
                assert bool(srcs) == bool(s), "file sources exactly while the LoRA is on"
                assert not any(k in m.backup for k in srcs), "no host backup of a file-backed weight"
            assert st.compiles == 1 and st.repatches >= 2
            mm.unload_all_models()                 # unload restores the file bytes, then undo
            assert st.handle is None and not stream_patches.sources(m.model) and not m.backup
            out = ksample(_lora(m, lora, 0.5))     # load again: same bytes as the plain run
            assert torch.equal(out, refs[0.5])
            mm.unload_all_models()
            assert torch.equal(ksample(m), refs[0.0])
            mm.unload_all_models()


def test_patch_math_runs_on_the_compute_device_path(files, monkeypatch):
    """The streamed weights' patch math goes through patch_device (the compute device; CUDA in production)."""
    unet, lora = files["small"]
    seen = []
    real = stream_patches.patch_device

    def spy(device):
        d = real(device)
        seen.append(d)
        return d

    real_calc = stream_patches.comfy.lora.calculate_weight
    devs = []

    def calc(patches, w, key, *a, **k):
        devs.append(w.device)
        return real_calc(patches, w, key, *a, **k)

    monkeypatch.setattr(stream_patches, "patch_device", spy)
    monkeypatch.setattr(stream_patches.comfy.lora, "calculate_weight", calc)
    with torch.inference_mode():
        m = _distorch(unet, 100.0)
        ksample(_lora(m, lora, 1.0))
    assert seen == [torch.device("cpu")] and devs and all(d == torch.device("cpu") for d in devs)


def test_without_a_file_source_the_backup_stays_in_ram(files):
    """A model whose loader file is unknown keeps ComfyUI's host backup (and stays exact)."""
    unet, lora = files["small"]
    with torch.inference_mode():
        ref = ksample(_lora(_plain(unet), lora, 1.0))
        mm.unload_all_models()
        m = entry.distorch(_plain(unet), "cpu", 100.0, "cpu", "", False)     # no file remembered
        assert torch.equal(ksample(_lora(m, lora, 1.0)), ref)
        assert m.backup and not stream_patches.sources(m.model)


def test_file_changed_on_disk_is_not_a_source(files, tmp_path):
    """Bytes that differ from the home (a converted or replaced file) never become a restore source."""
    sd = tiny_mmdit_state(2, 0)
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({k: v + 1 for k, v in sd.items()}, str(path))
    index = stream_patches._FileIndex([str(path)])
    key = next(k for k in sd if k.endswith(".weight") and sd[k].dim() == 2)
    assert stream_patches._source(index, "diffusion_model." + key, sd[key].clone()) is None
    safetensors.torch.save_file(sd, str(path))
    src = stream_patches._source(stream_patches._FileIndex([str(path)]), "diffusion_model." + key, sd[key].clone())
    assert src is not None and torch.equal(src.read(sd[key].shape, sd[key].dtype), sd[key])


def test_lora_on_streamed_weights_adds_no_host_copy(files):
    unet, lora = files["big"]
    with torch.inference_mode():
        m = _distorch(unet, 100.0)
        # first-use allocations of ComfyUI and of the LoRA path (its kernels, threads and read buffers; on
        # CUDA the lazily loaded modules of the patch math) on the small model: not per patched byte
        ksample(_lora(_distorch(files["small"][0], 100.0), files["small"][1], 1.0))
        mm.unload_all_models()
        lm = _lora(m, lora, 1.0)
        r0, maps0 = _anon(), _anon_maps()
        out = ksample(lm)
        grow = _anon() - r0
        grown = _grown(maps0, _anon_maps())
        st = entry.state_of(m)
        rt = st.handle.runtime
        srcs = stream_patches.sources(m.model)
        index = st.stream_index()
        patched = 0
        for k in srcs:
            w = index[id(stream_patches.mp.get_key_weight(m.model, k)[0])]
            patched += w.numel() * w.element_size()
        assert patched > 200 * MiB and not m.backup
        slots = rt.pool.nbytes                  # the compute device's slots (VRAM on a GPU; host RAM here)
        pinned = 0
        if torch.cuda.is_available():     # reported: the CUDA host allocator's cached pinned blocks
            pinned = torch.cuda.host_memory_stats().get("reserved_bytes.current", 0)
        assert grow <= 0.05 * patched + 64 * MiB + slots, \
            f"LoRA load grew RssAnon by {grow / MiB:.0f} MiB for {patched / MiB:.0f} MiB patched " \
            f"(CUDA host allocator {pinned / MiB:.0f} MiB; grown mappings: {grown})"
        # unpatch restores the file bytes; removal gives the plain model's output again
        mm.unload_all_models()
        assert torch.isfinite(out).all()
        again = ksample(lm)
        assert torch.equal(again, out)
        mm.unload_all_models()


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.bfloat16, torch.float32, torch.uint8])
@pytest.mark.parametrize("n", [1, 7, 8, 4096 + 3])
def test_same_bytes_is_bitwise(dtype, n):
    """The file check compares bits: a NaN equals itself, -0.0 differs from 0.0, odd sizes and addresses work."""
    isz = torch.empty((), dtype=dtype).element_size()
    g = torch.Generator().manual_seed(n)
    raw = torch.randint(0, 256, ((n + 1) * isz,), dtype=torch.uint8, generator=g)
    a = raw[isz:].view(dtype)                     # an address off the 8-byte grid when isz < 8
    b = a.clone()
    assert stream_patches.same_bytes(a, b) and stream_patches.same_bytes(b, a)
    c = b.clone()
    c.view(torch.uint8)[-1] ^= 1
    assert not stream_patches.same_bytes(b, c)
    c = b.clone()
    c.view(torch.uint8)[0] ^= 128
    assert not stream_patches.same_bytes(b, c)
    if dtype.is_floating_point and dtype != torch.float8_e4m3fn:
        nan = torch.full((n,), float("nan"), dtype=dtype)
        assert stream_patches.same_bytes(nan, nan.clone())
        assert not stream_patches.same_bytes(torch.zeros(n, dtype=dtype), torch.full((n,), -0.0, dtype=dtype))
