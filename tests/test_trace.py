import pytest
import torch
from torch import nn

from distorch.compiler.graph import ROOT, register_nbytes
from distorch.compiler.trace import trace
from distorch.errors import DisTorchError


def names(g):
    return [u.name for u in g]


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.a = nn.Linear(d, d)
        self.b = nn.Linear(d, d, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def no_hooks(m):
    return all(not mm._forward_pre_hooks and not mm._forward_hooks for mm in m.modules())


# --- units ------------------------------------------------------------------------------------
def test_blocks_leaves_and_registration_order():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj_out = nn.Linear(8, 4)        # registered first, runs last
            self.x_embedder = nn.Linear(4, 8)
            self.blocks = nn.ModuleList([Block() for _ in range(3)])
            self.act = nn.SiLU()                   # no tensors: not a unit

        def forward(self, x):
            x = self.x_embedder(x)
            for b in self.blocks:
                x = b(x)
            return self.proj_out(self.act(x))

    m = M()
    g = trace(m)
    assert names(g) == ["proj_out", "x_embedder", "blocks.0", "blocks.1", "blocks.2"]
    assert g.traced == "registration"
    assert g["blocks.1"].kind == "block" and g["blocks.1"].type == "Block"
    assert g["proj_out"].kind == "leaf" and g["proj_out"].type == "Linear"
    assert g["blocks.1"].tensors == ["blocks.1.a.weight", "blocks.1.a.bias", "blocks.1.b.weight"]
    assert g["blocks.1"].param_bytes == (64 + 8 + 64) * 4
    assert g.total_bytes == sum(p.numel() * 4 for p in m.parameters())
    # a traced call fixes the order
    g2 = trace(m, (torch.randn(2, 4),))
    assert names(g2) == ["x_embedder", "blocks.0", "blocks.1", "blocks.2", "proj_out"]
    assert g2.traced == "real" and all(u.calls == 1 for u in g2)
    assert no_hooks(m)


def test_nested_lists_take_outermost_and_leaf_granularity():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Sequential(Block(), Block()) for _ in range(2)])

        def forward(self, x):
            for s in self.stages:
                x = s(x)
            return x

    m = M()
    g = trace(m, (torch.randn(1, 8),))
    assert names(g) == ["stages.0", "stages.1"]
    assert g["stages.0"].type == "Sequential"
    assert len(g["stages.0"].tensors) == 6
    gl = trace(m, (torch.randn(1, 8),), granularity="leaf")
    assert names(gl) == [f"stages.{s}.{b}.{l}" for s in range(2) for b in range(2) for l in "ab"]
    assert all(u.kind == "leaf" for u in gl)
    assert gl.total_bytes == g.total_bytes


def test_parent_owned_parameter_goes_to_root_and_buffers_count():
    class Blk(Block):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.ones(8, dtype=torch.float16))
            self.register_buffer("tmp", torch.ones(3), persistent=False)

        def forward(self, x):
            return super().forward(x) * self.scale

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Blk(), Blk()])
            self.head = nn.Linear(8, 2)
            self.pos_embed = nn.Parameter(torch.zeros(1, 8))

        def forward(self, x):
            x = x + self.pos_embed
            for b in self.blocks:
                x = b(x)
            return self.head(x)

    m = M()
    g = trace(m, (torch.randn(3, 8),))
    assert names(g) == [ROOT, "blocks.0", "blocks.1", "head"]
    r = g[ROOT]
    assert r.kind == "root" and r.tensors == ["pos_embed"] and r.param_bytes == 32
    b0 = g["blocks.0"]
    assert "blocks.0.scale" in b0.tensors and "blocks.0.tmp" in b0.tensors
    assert b0.buffer_bytes == 8 * 2 + 3 * 4
    assert b0.param_bytes == (64 + 8 + 64) * 4
    # every tensor of the model is owned exactly once
    owned = [t for u in g for t in u.tensors]
    assert sorted(owned) == sorted(dict(m.named_parameters()).keys() | dict(m.named_buffers()).keys())


def test_module_called_twice_and_untaken_branch():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block() for _ in range(4)])
            self.refiner = nn.Linear(8, 8)

        def forward(self, x, skip=2):
            x = self.blocks[1](x)          # runs first
            x = self.blocks[0](x)
            x = self.blocks[1](x)          # and again
            for i in range(2, 4):
                if i != skip:
                    x = self.blocks[i](x)
            return x                       # refiner never runs

    m = M()
    g = trace(m, (torch.randn(2, 8),))
    # an uncalled unit sits right after its registration-order predecessor
    assert names(g) == ["blocks.1", "blocks.2", "blocks.0", "blocks.3", "refiner"]
    assert g["blocks.1"].calls == 2 and g["blocks.0"].calls == 1
    assert g["blocks.2"].calls == 0 and g["refiner"].calls == 0
    # flops and activation bytes are per call
    assert g["blocks.1"].flops == pytest.approx(g["blocks.0"].flops)
    assert g["blocks.0"].flops == 2 * (2 * 2 * 8 * 8)       # two 2x8 @ 8x8 matmuls
    assert g["blocks.0"].act_bytes == 2 * 8 * 4
    assert g["blocks.2"].flops == 0
    g3 = trace(m, (torch.randn(2, 8),), {"skip": 3})
    assert names(g3) == ["blocks.1", "blocks.0", "blocks.2", "blocks.3", "refiner"]
    assert g3["blocks.3"].calls == 0 and g3["blocks.2"].calls == 1


def test_untaken_first_registered_unit_goes_first():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.unused = nn.Linear(8, 8)
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x))

    g = trace(M(), (torch.randn(1, 8),))
    assert names(g) == ["unused", "blocks.0", "blocks.1"]
    assert g["unused"].calls == 0


def test_shared_parameter_owned_by_first_to_run():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.out = nn.Linear(8, 8, bias=False)      # registered first, runs last
            self.inp = nn.Linear(8, 8, bias=False)
            self.out.weight = self.inp.weight            # tied
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            x = self.inp(x)
            for b in self.blocks:
                x = b(x)
            return self.out(x)

    m = M()
    g = trace(m, (torch.randn(1, 8),))
    assert names(g) == ["inp", "blocks.0", "blocks.1", "out"]
    assert g["inp"].param_bytes == 256 and g["out"].param_bytes == 0
    assert g["inp"].tensors == ["inp.weight"] and g["out"].tensors == []
    assert g.shared == {"inp.weight": ["inp", "out"]}
    assert g.aliases == {"out.weight": "inp.weight"}
    assert g.total_bytes == sum(p.numel() * 4 for p in m.parameters())   # parameters() dedups
    # without a call, registration order decides the owner
    g0 = trace(m)
    assert g0["out"].param_bytes == 256 and g0.shared == {"out.weight": ["out", "inp"]}


def test_exception_during_trace_removes_hooks():
    class Boom(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            x = self.blocks[0](x)
            raise RuntimeError("boom inside forward")

    m = Boom()
    with pytest.raises(RuntimeError, match="boom"):
        trace(m, (torch.randn(1, 8),))
    assert no_hooks(m)
    g = trace(m)  # still usable
    assert names(g) == ["blocks.0", "blocks.1"]


def test_failed_meta_call_warns_and_falls_back():
    class NotMetaSafe(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])

        def forward(self, x):
            x = self.blocks[1](x)
            return self.blocks[0](x) + x.sum().item()   # .item() cannot run on meta

    with torch.device("meta"):
        m = NotMetaSafe()
    with pytest.warns(UserWarning, match="meta-device call of NotMetaSafe failed"):
        g = trace(m, (torch.randn(1, 8),))
    assert g.traced == "registration" and names(g) == ["blocks.0", "blocks.1"]
    assert all(u.calls == 1 and u.flops == 0 for u in g)
    assert no_hooks(m)


def test_bad_arguments():
    with pytest.raises(DisTorchError, match="granularity 'layer'"):
        trace(nn.Linear(2, 2), granularity="layer")
    with pytest.raises(DisTorchError, match="nn.Module"):
        trace({"w": torch.zeros(2)})


# --- bytes as stored --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype,size", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float16, 2),
                                        (torch.float8_e4m3fn, 1)])
def test_stored_bytes_by_dtype(dtype, size):
    m = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 16, bias=False)).to(dtype)
    g = trace(m)
    assert names(g) == ["0", "1"]
    assert g["0"].kind == "leaf"          # a bare layer in a list
    assert g["0"].param_bytes == (16 * 32 + 32) * size
    assert g["1"].param_bytes == 32 * 16 * size


class FakeQ(torch.Tensor):
    """A stand-in for a quantized tensor: logical shape, 4.25 bits per weight as stored."""


register_nbytes(FakeQ, lambda t: t.numel() * 17 // 32)


def test_registered_quantized_subclass_counts_stored_size():
    lin = nn.Linear(64, 64, bias=False)
    q = torch.Tensor._make_subclass(FakeQ, torch.zeros(64, 64))
    lin.weight = nn.Parameter(q, requires_grad=False)
    m = nn.ModuleList([lin, nn.Linear(64, 64)])
    g = trace(m)
    assert g["0"].param_bytes == 64 * 64 * 17 // 32
    assert g["1"].param_bytes == (64 * 64 + 64) * 4


# --- meta device --------------------------------------------------------------------------------
def test_meta_trace_matches_real_trace():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.x_embedder = nn.Linear(4, 16)
            self.blocks = nn.ModuleList([Block(16) for _ in range(3)])
            self.conv = nn.Conv2d(16, 16, 3, padding=1)

        def forward(self, x):
            x = self.x_embedder(x)
            for b in self.blocks:
                x = b(x)
            x = x.transpose(1, 2).reshape(x.shape[0], 16, 4, 4)
            return self.conv(x)

    torch.manual_seed(0)
    real = M()
    with torch.device("meta"):
        meta = M()
    x = torch.randn(2, 16, 4)
    gr = trace(real, (x,))
    gm = trace(meta, (x,))                   # real inputs are moved to meta
    assert gm.traced == "meta" and gr.traced == "real"
    assert names(gm) == names(gr) == ["x_embedder", "blocks.0", "blocks.1", "blocks.2", "conv"]
    for a, b in zip(gr, gm):
        assert (a.flops, a.act_bytes, a.param_bytes, a.calls) == (b.flops, b.act_bytes, b.param_bytes, b.calls)
    assert gm["conv"].flops == 2 * 2 * 16 * 16 * 9 * 16     # 2*B*Cout*Cin*k*k*H*W
    assert gm["x_embedder"].flops == 2 * 2 * 16 * 4 * 16
    assert no_hooks(meta)


def test_record_measures_time_on_real_call():
    m = nn.ModuleList([Block(), Block()])

    class W(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = m
            self.pos = nn.Parameter(torch.zeros(8))

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x + self.pos))

    g = trace(W(), (torch.randn(1, 8),), record=True)
    assert names(g) == [ROOT, "blocks.0", "blocks.1"]
    assert all(u.time_s is not None and u.time_s >= 0 for u in g)
    assert all(u.calls == 1 for u in g)                     # the timed second call is not counted
    assert g["blocks.0"].flops == 2 * (2 * 8 * 8)
    g2 = trace(W(), (torch.randn(1, 8),))
    assert all(u.time_s is None for u in g2)


def test_mixed_meta_and_real_falls_back_with_warning():
    m = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2, device="meta")])
    with pytest.warns(UserWarning, match="mixes meta and real"):
        g = trace(m, (torch.randn(1, 2),))
    assert g.traced == "registration" and names(g) == ["0", "1"]


def test_diffusers_flux_tiny_on_meta():
    try:
        import diffusers
    except Exception as e:  # absent, or broken by its dependencies in this environment
        pytest.skip(f"diffusers not importable: {e}")
    with torch.device("meta"):
        m = diffusers.FluxTransformer2DModel(
            patch_size=1, in_channels=8, num_layers=2, num_single_layers=3, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True,
            axes_dims_rope=(4, 6, 6))
    L, T = 16, 8
    kw = dict(hidden_states=torch.randn(1, L, 8), encoder_hidden_states=torch.randn(1, T, 32),
              pooled_projections=torch.randn(1, 16), timestep=torch.tensor([1.0]), img_ids=torch.zeros(L, 3),
              txt_ids=torch.zeros(T, 3), guidance=torch.tensor([3.5]))
    g = trace(m, (), kw)
    n = names(g)
    assert n[0] == "x_embedder"
    blocks = [x for x in n if "blocks" in x]
    assert blocks == ["transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
                      "single_transformer_blocks.1", "single_transformer_blocks.2"]
    assert n[-2:] == ["norm_out.linear", "proj_out"]
    assert g["transformer_blocks.0"].type == "FluxTransformerBlock"
    assert all(g[b].flops > 0 and g[b].act_bytes > 0 for b in blocks)
    assert g.total_bytes == sum(p.numel() * p.element_size() for p in m.parameters())
    assert ROOT not in g
    assert no_hooks(m)


def test_gguf_tensor_parameters_count_quantized_bytes():
    gguf = pytest.importorskip("gguf")
    gt = pytest.importorskip("distorch.formats.gguf_tensor")
    import numpy as np
    q8 = gguf.GGMLQuantizationType.Q8_0
    raw = gguf.quants.quantize(np.random.default_rng(0).standard_normal((32, 64)).astype(np.float32), q8)
    m = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 8))
    m[0].weight = nn.Parameter(gt.GGUFTensor(torch.from_numpy(raw.copy()).flatten(), q8, (32, 64), torch.float32),
                               requires_grad=False)
    g = trace(m, (torch.randn(2, 64),))
    assert g["0"].param_bytes == 32 * 2 * 34 + 32 * 4      # Q8_0 blocks + fp32 bias
    assert g["0"].flops == 2 * 2 * 64 * 32 and g["0"].act_bytes == 2 * 32 * 4
    # the GGUF facts passes/quant_choice.py reads (no live module needed there)
    assert g["0"].gguf == {"tensors": 1, "stored_bytes": 32 * 2 * 34, "dense_bytes": 32 * 64 * 4,
                           "largest_dense": 32 * 64 * 4, "patched": False, "qtypes": {"Q8_0": 1},
                           "bytes_by_type": {"Q8_0": [32 * 2 * 34, 32 * 64 * 4]}}
    assert g["1"].gguf == {}
    m[0].weight_function = [lambda w: w]          # a per-call patch (ComfyUI's LoRA on a GGUF weight)
    assert trace(m)["0"].gguf["patched"] is True
