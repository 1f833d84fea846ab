"""A second load of the same model reuses its host homes (issue 11; runtime/home_reuse.py), on CPU.

undo() to the host leaves the streamed weights as views of their (unpinned) arena; the next compile of the
same module under the same plan adopts those homes (nothing copied, pinned again), anything else falls
back to copying them out and filling anew.  Outputs stay bit-identical throughout; dropping the module
gives the arena back; a fake cudaHostRegister (as in test_host_memory) stands in for pinning."""
import copy
import gc
import logging
import weakref

import pytest
import torch

from distorch.compiler.plan import PlacedUnit
from distorch.errors import DisTorchError
from distorch.runtime import api
from distorch.runtime import fill as _fill
from distorch.runtime import home_reuse, pinning
from distorch.runtime.apply import apply, classify
from distorch.runtime.store import HomeStore

from test_codec_stream import coded_plan, toy as coded_toy
from test_host_memory import MiB, TinyDiT, anon, nbytes, plan_all


@pytest.fixture
def copies(monkeypatch):
    """Counts the fill's copies (runtime.fill.copy_piece)."""
    n = [0]
    real = _fill.copy_piece

    def count(dst, src):
        n[0] += 1
        real(dst, src)
    monkeypatch.setattr(_fill, "copy_piece", count)
    return n


def model(depth=4, d=128, h=320):
    torch.manual_seed(0)
    m = TinyDiT(depth=depth, d=d, h=h).eval()
    x = torch.randn(2, d)
    with torch.no_grad():
        ref = m(x)
    return m, x, ref


def out(m, x):
    with torch.no_grad():
        return m(x)


def ptrs(m):
    return {k: p.data_ptr() for k, p in m.blocks.named_parameters()}


def half_resident(m):
    """Another plan: the second half of the blocks resident."""
    plan = plan_all(m)
    k = 1 + len(m.blocks) // 2
    plan.units[k:] = [PlacedUnit(u.name, u.type, u.bytes, plan.compute, u.order) for u in plan.units[k:]]
    return plan


def test_second_compile_adopts_the_homes_nothing_copied(copies, caplog):
    m, x, ref = model()
    h = api.compile(m, "cpu", plan=plan_all(m), progress=False)
    assert copies[0] > 0 and h.stats["load"]["reused"] is False and h.stats["load"]["fill_s"] >= 0
    assert torch.equal(out(m, x), ref)
    arena = weakref.ref(h.runtime.arenas["cpu"].array)
    h.undo("cpu")
    assert torch.equal(out(m, x), ref)
    at = ptrs(m)
    copies[0] = 0
    caplog.set_level(logging.INFO, logger="distorch")
    h2 = api.compile(m, "cpu", plan=h.plan, progress=False)
    assert copies[0] == 0, "the homes must be adopted, not filled"
    assert h2.runtime.arenas["cpu"].array is arena()
    assert h2.stats["load"]["reused"] is True and h2.stats["load"]["reuse_miss"] == ""
    assert [r for r in caplog.records if "reused the host homes of 4 units" in r.getMessage()]
    for _ in range(2):
        assert torch.equal(out(m, x), ref)
    h2.undo()
    assert ptrs(m) == at, "undo to the host must leave the weights where they were"
    assert torch.equal(out(m, x), ref)
    assert h2.stats["load"]["reused"] is True          # the statistics as they were at undo()
    h3 = api.compile(m, "cpu", plan=h.plan, progress=False)   # and a third time
    assert copies[0] == 0 and h3.stats["load"]["reused"] and torch.equal(out(m, x), ref)
    h3.undo()


def test_other_plan_falls_back_and_frees_the_old_arena(copies, caplog):
    m, x, ref = model()
    rt = apply(m, plan_all(m), progress=False)
    arena = weakref.ref(rt.arenas["cpu"].array)
    rt.undo()
    caplog.set_level(logging.DEBUG, logger="distorch.runtime.store")
    copies[0] = 0
    rt = apply(m, half_resident(m), progress=False)
    gc.collect()
    assert arena() is None, "the old arena must go once the weights got memory of their own"
    assert copies[0] > 0 and not rt.store.load_times["reused"]
    assert "other units" in rt.store.load_times["reuse_miss"]
    assert [r for r in caplog.records if r.levelno == logging.DEBUG and "not reused" in r.getMessage()]
    assert torch.equal(out(m, x), ref)
    rt.undo()
    assert torch.equal(out(m, x), ref)
    rt = apply(m, half_resident(m), progress=False)       # the same other plan again: adopted
    assert rt.store.load_times["reused"] and torch.equal(out(m, x), ref)
    rt.undo()


def test_rebound_parameter_falls_back(copies):
    m, x, ref = model()
    rt = apply(m, plan_all(m), progress=False)
    arena = weakref.ref(rt.arenas["cpu"].array)
    rt.undo()
    w = m.blocks[1].up.weight
    w.data = w.data.clone()                               # someone rebinds one weight
    copies[0] = 0
    rt = apply(m, plan_all(m), progress=False)
    assert copies[0] > 0 and "blocks.1.up.weight" in rt.store.load_times["reuse_miss"]
    gc.collect()
    assert arena() is None
    assert torch.equal(out(m, x), ref)
    rt.undo()


def test_written_weights_are_kept_by_the_adopted_homes():
    """What is written into the homes (a LoRA baked in, restore_streamed) or into the weights after undo
    is what the next load streams."""
    m, x, ref = model()
    twin = copy.deepcopy(m)
    rt = apply(m, plan_all(m), progress=False)
    hv = rt.home_views()
    w = m.blocks[2].down.weight
    with torch.no_grad():
        hv[id(w)].mul_(2)
        twin.blocks[2].down.weight.mul_(2)
    rt.invalidate()
    assert torch.equal(out(m, x), out(twin, x))
    rt.undo()
    with torch.no_grad():
        m.blocks[0].gate.bias.add_(1)
        twin.blocks[0].gate.bias.add_(1)
    rt = apply(m, plan_all(m), progress=False)
    assert rt.store.load_times["reused"]
    assert torch.equal(out(m, x), out(twin, x)) and not torch.equal(out(m, x), ref)
    rt.undo()


def test_deepcopy_does_not_adopt_the_originals_homes(copies):
    m, x, ref = model()
    apply(m, plan_all(m), progress=False).undo()
    at = ptrs(m)
    m2 = copy.deepcopy(m)
    copies[0] = 0
    rt2 = apply(m2, plan_all(m2), progress=False)
    assert copies[0] > 0 and not rt2.store.load_times["reused"] and rt2.store.load_times["reuse_miss"] == ""
    assert not set(ptrs(m2).values()) & set(at.values())
    assert torch.equal(out(m2, x), ref)
    copies[0] = 0
    rt = apply(m, plan_all(m), progress=False)           # the original still finds its own
    assert copies[0] == 0 and rt.store.load_times["reused"] and ptrs(m) == at
    assert torch.equal(out(m, x), ref) and torch.equal(out(m2, x), ref)
    rt.undo()
    rt2.undo()


def test_note_holds_no_memory_and_is_not_copied():
    m, x, ref = model()
    rt = apply(m, plan_all(m), progress=False)
    arena = weakref.ref(rt.arenas["cpu"].array)
    rt.undo()
    del rt
    assert m in home_reuse._kept
    copy.deepcopy(m)                                      # neither deepcopy ...
    buf = __import__("io").BytesIO()
    torch.save(m, buf)                                    # ... nor pickling trips over the note
    # the weights leave the arena (converted); torch's swap_tensors (Module.to() for tensor subclasses
    # such as GGUF weights, or with this flag) refuses a tensor that has a weakref: the note holds none
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        m.to(torch.float64)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    gc.collect()
    assert arena() is None, "the note must not keep the arena alive"
    mref = weakref.ref(m)
    del m
    gc.collect()
    assert mref() is None and not any(k is None for k in home_reuse._kept.keys())


def test_drop_after_undo_gives_the_memory_back():
    base = anon()
    m, x, ref = model(depth=6, d=1024, h=2560)             # ~190 MiB offloaded
    off = sum(nbytes(b) for b in m.blocks)
    rt = apply(m, plan_all(m), progress=False)
    arena = weakref.ref(rt.arenas["cpu"].array)
    rt.undo()
    assert anon() - base <= off + 64 * MiB, "undo must not copy the model"
    rt = apply(m, plan_all(m), progress=False)             # adopted: no second copy either
    assert rt.store.load_times["reused"] and anon() - base <= off + 64 * MiB + rt.pool.nbytes
    rt.undo()
    del m, rt
    gc.collect()
    assert arena() is None
    assert anon() - base <= 64 * MiB, "the model dropped after undo: its arena must be gone"


def test_compressed_units_fall_back():
    m, args = coded_toy()
    with torch.no_grad():
        ref = m(*args)
    off = ["blocks.0", "blocks.1", "blocks.2"]
    rt = apply(m, coded_plan(m, off, codec=[]), progress=False)
    arena = weakref.ref(rt.arenas["cpu"].array)
    rt.undo()
    rt = apply(m, coded_plan(m, off, codec=["blocks.1"]), progress=False)
    assert not rt.store.load_times["reused"] and "compressed" in rt.store.load_times["reuse_miss"]
    gc.collect()
    assert arena() is None
    with torch.no_grad():
        assert torch.equal(m(*args), ref)
    rt.undo()                                             # a coded unit: nothing is kept
    assert m not in home_reuse._kept
    with torch.no_grad():
        assert torch.equal(m(*args), ref)


def test_failing_fill_after_fallback_leaves_the_weights_whole(monkeypatch, fail_fill_after):
    m, x, ref = model(depth=5)
    want = {k: v.clone() for k, v in m.state_dict().items()}
    apply(m, plan_all(m), progress=False).undo()
    real = fail_fill_after(12)
    with pytest.raises(DisTorchError, match="disk on fire"):
        apply(m, half_resident(m), progress=False)
    assert not hasattr(m, "_distorch_runtime")
    for k, v in m.state_dict().items():
        assert torch.equal(v, want[k]), k
    monkeypatch.setattr(_fill, "copy_piece", real)
    rt = apply(m, plan_all(m), progress=False)
    assert torch.equal(out(m, x), ref)
    rt.undo()


def store_for(m, pin=True):
    plan = plan_all(m)
    c = classify(m, plan)
    units = [n for n in c.offloaded if c.streamed[n]]
    return HomeStore(units, c.streamed, c.home_of, pin=pin, progress=False, module=m)


class _ToHost:
    undo_device = torch.device("cpu")


def test_pinned_again_on_reuse_and_unpinned_on_undo(fake_pin, caplog):
    m, x, ref = model()
    p0 = pinning.pinned_bytes()
    caplog.set_level(logging.INFO, logger="distorch")
    st = store_for(m)
    ptr = st.arenas["cpu"].flat.data_ptr()
    assert fake_pin == {ptr: st.arenas["cpu"].nbytes} and st.load_times["pin_s"] >= 0
    assert [r for r in caplog.records if "page-locked" in r.getMessage() and "GB/s" in r.getMessage()]
    st.stage(_ToHost)
    st.detach(_ToHost)
    assert not fake_pin and pinning.pinned_bytes() == p0, "undo unpins the arena it leaves to the weights"
    caplog.clear()
    st = store_for(m)
    assert st.load_times["reused"] and fake_pin == {ptr: st.arenas["cpu"].nbytes}
    assert pinning.pinned_bytes() - p0 == st.pinned_bytes > 0
    assert [r for r in caplog.records if "page-locked" in r.getMessage()]
    assert torch.equal(out(m, x), ref)
    st.stage(_ToHost)
    st.detach(_ToHost)
    gc.collect()
    assert not fake_pin and pinning.pinned_bytes() == p0


def test_a_changed_pinned_cap_falls_back(fake_pin, monkeypatch):
    m, x, ref = model(depth=6, d=64, h=128)
    st = store_for(m)
    arena = weakref.ref(st.arenas["cpu"].array)
    st.stage(_ToHost)
    st.detach(_ToHost)
    per_block = nbytes(m.blocks[0])
    monkeypatch.setenv(pinning.ENV, str(2.5 * per_block / 2**30))   # now only two blocks fit pinned
    st = store_for(m)
    assert not st.load_times["reused"] and "pinned-memory cap" in st.load_times["reuse_miss"]
    assert st.arenas["cpu"].pinned and not st.arenas["cpu~pageable"].pinned
    gc.collect()
    assert arena() is None
    assert torch.equal(out(m, x), ref)
    st.stage(_ToHost)
    st.detach(_ToHost)
    gc.collect()
    assert not fake_pin


def test_gguf_units_adopted_and_fall_back(copies):
    pytest.importorskip("gguf")
    from test_gguf_stream import bits, hand_plan, make, x_in
    m = make("Q8_0")
    x = x_in()
    with torch.no_grad():
        ref = m(x)
    names = {f"blocks.{i}" for i in range(4)}
    rt = apply(m, hand_plan(m, names), progress=False)
    arena = weakref.ref(rt.arenas["cpu"].array)
    rt.undo()
    raw = [p.raw.data_ptr() for p in m.blocks.parameters() if hasattr(p, "raw")]
    assert raw
    copies[0] = 0
    rt = apply(m, hand_plan(m, names), progress=False)
    assert copies[0] == 0 and rt.store.load_times["reused"]
    assert [p.raw.data_ptr() for p in m.blocks.parameters() if hasattr(p, "raw")] == raw
    with torch.no_grad():
        for _ in range(2):
            assert torch.equal(bits(m(x)), bits(ref))
    rt.undo()
    rt = apply(m, hand_plan(m, {"blocks.0", "blocks.2"}), progress=False)     # another plan
    assert not rt.store.load_times["reused"] and copies[0] > 0
    gc.collect()
    assert arena() is None
    with torch.no_grad():
        assert torch.equal(bits(m(x)), bits(ref))
    rt.undo()
    with torch.no_grad():
        assert torch.equal(bits(m(x)), bits(ref))


def test_comfy_unload_and_reload_with_lora_reuses_the_homes(tmp_path_factory):
    """ComfyUI's own flow: a LoRA baked into the homes, unload (the file bytes restored, then undo to the
    host), load again: the homes are adopted and patched again; every output equals plain ComfyUI's."""
    from comfy_calls import distorch_unet, ksample, lora as _lora, plain_lora_refs
    from comfy_harness import boot_inprocess
    from comfy_models import save_tiny_lora, tiny_mmdit_state, unet_lora_dirs
    mm, _, _ = boot_inprocess()
    import safetensors.torch
    from distorch.comfy_nodes import entry
    unet_dir, lora_dir = unet_lora_dirs(tmp_path_factory, "home_reuse")
    sd = tiny_mmdit_state(2, 0)
    safetensors.torch.save_file(sd, str(unet_dir / "hr_unet.safetensors"))
    save_tiny_lora(sd, str(lora_dir / "hr_lora.safetensors"))
    unet, lora = "hr_unet.safetensors", "hr_lora.safetensors"
    mm.unload_all_models()
    try:
        with torch.inference_mode():
            ref = plain_lora_refs(unet, lora)
            m = distorch_unet(unet, 100.0)
            st = entry.state_of(m)
            assert torch.equal(ksample(_lora(m, lora, 1.0)), ref[1.0])
            assert st.handle.stats["load"]["reused"] is False
            for s in (0.5, 0.0, 1.0):
                mm.unload_all_models()                 # the file bytes back into the homes, then undo
                out = ksample(_lora(m, lora, s) if s else m)
                assert torch.equal(out, ref[s]), f"strength {s}"
                assert st.handle.stats["load"]["reused"] is True, st.handle.stats["load"]
    finally:
        mm.unload_all_models()


def test_pinned_pieces_adopted_and_pinned_again(fake_pin, monkeypatch):
    """Pinned homes in several pieces (arena.PIECE_BYTES): undo unpins every piece, the next load adopts
    them all (same keys, nothing copied) and pins each again."""
    from distorch.runtime import arena as arena_mod
    m, x, ref = model()
    monkeypatch.setattr(arena_mod, "PIECE_BYTES", int(1.5 * nbytes(m.blocks[0])))
    st = store_for(m)
    keys = sorted(st.arenas)
    assert keys == ["cpu", "cpu@1", "cpu@2", "cpu@3"] and len(fake_pin) == 4
    arrays = {k: a.array for k, a in st.arenas.items()}
    st.stage(_ToHost)
    st.detach(_ToHost)
    assert not fake_pin
    st = store_for(m)
    assert st.load_times["reused"] and sorted(st.arenas) == keys and len(fake_pin) == 4
    assert all(st.arenas[k].array is arrays[k] for k in keys)
    del arrays
    assert torch.equal(out(m, x), ref)
    st.stage(_ToHost)
    st.detach(_ToHost)
    gc.collect()
    assert not fake_pin
