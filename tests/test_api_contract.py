"""The plain torch API on a compiled module (issue 12): gradients, undo all-or-nothing, state dicts,
in-place edits, dtype/device conversions, deepcopy, torch.save, example_args leaving the module as it
was, re-entered forwards, and GGUF types the planner and the loader agree on.  CPU only."""
from __future__ import annotations

import copy
import io
import os
import sys

import pytest
import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(__file__))
from runtime_toys import ToyDiT, make_plan, toy_inputs  # noqa: E402

import distorch  # noqa: E402
from distorch.errors import DisTorchError  # noqa: E402
from distorch.runtime.apply import apply  # noqa: E402
from distorch.runtime.guard import StateError  # noqa: E402
from distorch.runtime.hooks import ReentryError  # noqa: E402

OFF = {"blocks.1", "blocks.2", "blocks.4"}


@pytest.fixture
def pair():
    """(compiled model, its runtime, an uncompiled twin, inputs); one slot, so slots are reused."""
    torch.manual_seed(0)
    m = ToyDiT().eval()
    twin = copy.deepcopy(m)
    rt = apply(m, make_plan(m, OFF), window_units=1, progress=False)
    yield m, rt, twin, toy_inputs()
    rt.undo()


def _out(m, args):
    with torch.no_grad():
        return m(*args)


def _grads(model, args, frozen=False):
    x = args[0].clone().requires_grad_(True)
    for p in model.parameters():
        p.requires_grad_(not frozen)
        p.grad = None
    model(x, args[1]).square().sum().backward()
    return x.grad, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("frozen", [False, True])
def test_backward_gives_the_uncompiled_gradients(pair, frozen):
    m, rt, twin, args = pair
    gx0, gp0 = _grads(twin, args, frozen)
    for _ in range(2):
        gx, gp = _grads(m, args, frozen)
        assert torch.equal(gx, gx0)
        for n, g in gp0.items():
            assert (g is None and gp[n] is None) if frozen else torch.equal(gp[n], g), n
    assert rt.saved.copies > 0
    assert torch.equal(_out(m, args), _out(twin, args))


def test_state_dict_reads_homes_and_load_state_dict_writes_them(pair):
    m, rt, twin, args = pair
    _out(m, args)
    sd, sd0 = m.state_dict(), twin.state_dict()
    assert sd.keys() == sd0.keys() and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    new = {k: v * 1.5 for k, v in sd0.items()}
    m.load_state_dict(new)
    twin.load_state_dict(new)
    assert torch.equal(_out(m, args), _out(twin, args))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in new.items())


def test_in_place_edits_reach_streamed_weights(pair):
    m, rt, twin, args = pair
    _out(m, args)
    with torch.no_grad():
        for mod in (m, twin):
            mod.blocks[1].proj.weight.mul_(2)
            mod.blocks[4].mlp[0].bias.add_(0.5)
            mod.blocks[2].attn.weight.copy_(torch.ones_like(mod.blocks[2].attn.weight))
    assert torch.equal(m.blocks[1].proj.weight, twin.blocks[1].proj.weight)
    assert torch.equal(_out(m, args), _out(twin, args))
    with torch.no_grad():                 # p.data = t of the same kind: copied into the home
        for mod in (m, twin):
            mod.blocks[1].proj.weight.data = torch.full_like(mod.blocks[1].proj.weight, 0.01)
    assert torch.equal(_out(m, args), _out(twin, args))


def test_in_place_edit_on_a_slot_bound_parameter_is_refused(pair):
    m, rt, twin, args = pair
    rt.guard.host = False                 # what CUDA compute does: parameters rest in slots
    _out(m, args)
    with torch.no_grad():
        m.blocks[1].proj.weight.mul_(2)
    with pytest.raises(StateError, match=r"blocks\.1\.proj\.weight.*load_state_dict"):
        _out(m, args)


@pytest.mark.parametrize("conv", [lambda m: m.double(), lambda m: m.half(), lambda m: m.blocks[1].double(),
                                  lambda m: m.to(torch.bfloat16), lambda m: m.to("meta")])
def test_dtype_or_device_changes_are_refused_before_anything_changes(pair, conv):
    m, rt, twin, args = pair
    _out(m, args)
    with pytest.raises(StateError, match=r"streamed parameter 'blocks\.\d\..*handle\.undo\(\)"):
        conv(m)
    assert all(p.dtype == torch.float32 and p.device.type == "cpu" for p in m.parameters())
    assert torch.equal(_out(m, args), _out(twin, args))
    m.to("cpu").float()                   # changes nothing: allowed
    assert torch.equal(_out(m, args), _out(twin, args))


def test_deepcopy_and_torch_save_give_uncompiled_modules(pair):
    m, rt, twin, args = pair
    _out(m, args)
    ref = _out(twin, args)
    c = copy.deepcopy(m)
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    for other in (c, loaded):
        assert not hasattr(other, "_distorch_runtime") and "_apply" not in other.blocks[1].__dict__
        assert all(not mod._forward_pre_hooks and not mod._forward_hooks for mod in other.modules())
        assert torch.equal(_out(other, args), ref)
    assert torch.equal(_out(m, args), ref)        # the original still streams
    rt.undo()
    assert torch.equal(_out(c, args), ref) and torch.equal(_out(m, args), ref)


def test_undo_failure_while_copying_changes_nothing_and_retry_completes(pair, monkeypatch):
    import distorch.runtime.store as store
    m, rt, twin, args = pair
    ref = _out(twin, args)
    _out(m, args)
    real = store.HomeStore.stage

    def stage(self, rt_):                 # copies made, then out of memory before the last one
        real(self, rt_)
        raise torch.OutOfMemoryError("simulated: out of memory while moving weights back")
    monkeypatch.setattr(store.HomeStore, "stage", stage)
    with pytest.raises(torch.OutOfMemoryError) as e:
        rt.undo()
    assert "changed nothing" in "".join(getattr(e.value, "__notes__", []))
    assert rt.active and m._distorch_runtime is rt and torch.equal(_out(m, args), ref)
    monkeypatch.setattr(store.HomeStore, "stage", real)
    rt.undo()
    assert not rt.active and not hasattr(m, "_distorch_runtime") and torch.equal(_out(m, args), ref)


def test_undo_failure_part_way_refuses_forwards_until_retried(pair, monkeypatch):
    m, rt, twin, args = pair
    ref = _out(twin, args)
    _out(m, args)
    real = type(rt.ring).detach
    state = {"fail": True}

    def detach(self, rt_):
        if state.pop("fail", False):
            raise RuntimeError("simulated failure while releasing slots")
        return real(self, rt_)
    monkeypatch.setattr(type(rt.ring), "detach", detach)
    with pytest.raises(RuntimeError, match="simulated"):
        rt.undo()
    with pytest.raises(DisTorchError, match=r"undo\(\) failed part-way.*undo\(\) again"):
        _out(m, args)                     # never silently wrong
    with pytest.raises(DisTorchError, match=r"undo\(\) failed part-way"):
        _out(m.blocks[1], (torch.randn(2, 16, 32), torch.randn(2, 32)))
    rt.undo()
    assert not rt.active and torch.equal(_out(m, args), ref)
    assert all(not mod._forward_pre_hooks and not mod._forward_hooks for mod in m.modules())
    h = distorch.compile(m, plan=make_plan(m, {"blocks.0"}), progress=False)      # compiles again
    assert torch.equal(_out(m, args), ref)
    h.undo()


@pytest.mark.parametrize("dev", ["meta", "tpu:0", "cuda:99", 3.5])
def test_undo_to_a_device_that_cannot_hold_weights_is_refused(pair, dev):
    m, rt, twin, args = pair
    with pytest.raises(DisTorchError, match=r"undo\(device="):
        rt.undo(device=dev)
    assert rt.active and torch.equal(_out(m, args), _out(twin, args))


def test_compile_example_args_leaves_train_mode_and_batchnorm_stats():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5),
                      nn.Sequential(nn.Linear(16, 16), nn.ReLU()), nn.Linear(16, 4)).train()
    m[3].eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    modes = [x.training for x in m.modules()]
    h = distorch.compile(m, compute="cpu", expert="cpu:0,50%;cpu,50%", example_args=(torch.randn(4, 8) * 5,),
                         progress=False)
    try:
        assert [x.training for x in m.modules()] == modes
        after = m.state_dict()
        assert all(torch.equal(after[k], v) for k, v in before.items())
    finally:
        h.undo()


def test_forward_re_entered_from_a_units_hook_is_refused(pair):
    m, rt, twin, args = pair
    ref = _out(twin, args)

    def reenter(mod, a):
        m(*args)
    h = m.blocks[2].register_forward_pre_hook(reenter)
    with pytest.raises(ReentryError, match=r"'blocks\.\d' was called while streamed unit 'blocks\.2' runs"):
        _out(m, args)
    h.remove()
    for _ in range(2):
        assert torch.equal(_out(m, args), ref)

    def swallow(mod, a):                  # the hook catches the error: the outer unit stays right
        try:
            m(*args)
        except ReentryError:
            pass
    h = m.blocks[2].register_forward_pre_hook(swallow)
    assert torch.equal(_out(m, args), ref)
    h.remove()
    assert torch.equal(_out(m, args), ref)


def test_nested_forward_from_the_roots_hook_is_right(pair):
    m, rt, twin, args = pair
    ref = _out(twin, args)
    seen = []

    def nested(mod, a):
        if not seen:
            seen.append(None)
            seen[0] = m(*args)
    h = m.register_forward_pre_hook(nested)
    try:
        assert torch.equal(_out(m, args), ref) and torch.equal(seen[0], ref)
    finally:
        h.remove()
    assert torch.equal(_out(m, args), ref)


def test_plan_refuses_gguf_types_the_loader_rejects(tmp_path):
    gguf = pytest.importorskip("gguf")
    import numpy as np
    from gguf import GGMLQuantizationType as QT
    from distorch.compiler.files import graph_from_file
    from distorch.errors import GGUFFileError
    w = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "flux")
    rng = np.random.default_rng(0)
    w.add_tensor("double_blocks.0.img_attn.qkv.weight", rng.standard_normal((4, 32)).astype(np.float32))
    w.add_tensor("double_blocks.1.img_attn.qkv.weight", rng.integers(0, 256, size=(2, 66), dtype=np.uint8),
                 raw_dtype=QT.IQ2_XXS)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFileError, match=r"double_blocks\.1\.img_attn\.qkv\.weight' \(IQ2_XXS\).*Q8_0"):
        graph_from_file(str(tmp_path / "m.gguf"))
