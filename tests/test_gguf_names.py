"""formats.gguf_names: llama.cpp-named GGUF text encoders (written here with gguf.GGUFWriter) mapped
back to the original Hugging Face names."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from distorch.errors import DisTorchError  # noqa: E402
from distorch.formats.gguf_loader import load_gguf  # noqa: E402
from distorch.formats.gguf_names import (GGUFNameError, is_llama_cpp_named,  # noqa: E402
                                         supported_architectures, to_original_names)
from distorch.formats.gguf_tensor import GGUFTensor  # noqa: E402

H, FF, VOCAB, NB = 64, 128, 32, 2
N_HEAD, N_HEAD_KV = 4, 2


class Writer:
    """Collects tensors for a GGUF file and the values each original name should load as."""

    def __init__(self, path, arch, seed=0):
        self.path = path
        self.w = gguf.GGUFWriter(str(path), arch)
        self.rng = np.random.default_rng(seed)
        self.expect: dict[str, np.ndarray] = {}   # original name -> float32 values

    def rand(self, *shape):
        return self.rng.standard_normal(shape).astype(np.float32)

    def q8(self, gname, orig, a, *, stored=None):
        """Q8_0 tensor `gname` holding `stored` (default a); `orig` should load as dequant(quant(a))."""
        q = gguf.quants.quantize(a if stored is None else stored, QT.Q8_0)
        self.w.add_tensor(gname, q, raw_dtype=QT.Q8_0)
        if orig:
            self.expect[orig] = gguf.quants.dequantize(gguf.quants.quantize(a, QT.Q8_0), QT.Q8_0)

    def plain(self, gname, orig, a, *, stored=None, dtype=np.float32):
        self.w.add_tensor(gname, (a if stored is None else stored).astype(dtype))
        if orig:
            self.expect[orig] = a.astype(dtype).astype(np.float32)

    def done(self):
        self.w.write_header_to_file()
        self.w.write_kv_data_to_file()
        self.w.write_tensors_to_file()
        self.w.close()
        return load_gguf(self.path, prefix=None)


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The row permutation llama.cpp's converter applies to llama Q/K projections (test's own copy)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def values(t: torch.Tensor) -> np.ndarray:
    if isinstance(t, GGUFTensor):
        return t.dequantize(torch.float32).numpy()
    return t.float().numpy()


def check(out, expect):
    assert set(out) == set(expect)
    for k, v in expect.items():
        assert tuple(out[k].shape) == v.shape, k
        np.testing.assert_array_equal(values(out[k]), v, err_msg=k)


# ------------------------------------------------------------------------------------------------
# T5

def write_t5(path, arch="t5encoder", *, gated=True, decoder=False, rel_every_block=False):
    wr = Writer(path, arch, seed=1)
    wr.q8("token_embd.weight", "shared.weight", wr.rand(VOCAB, H))
    for i in range(NB):
        e, o = f"enc.blk.{i}.", f"encoder.block.{i}.layer."
        wr.plain(e + "attn_norm.weight", o + "0.layer_norm.weight", wr.rand(H))
        for g, n in (("attn_q", "q"), ("attn_k", "k"), ("attn_v", "v"), ("attn_o", "o")):
            wr.q8(e + g + ".weight", f"{o}0.SelfAttention.{n}.weight", wr.rand(H, H))
        if i == 0 or rel_every_block:
            wr.plain(e + "attn_rel_b.weight", o + "0.SelfAttention.relative_attention_bias.weight",
                     wr.rand(32, N_HEAD), dtype=np.float16)
        wr.plain(e + "ffn_norm.weight", o + "1.layer_norm.weight", wr.rand(H))
        if gated:
            wr.q8(e + "ffn_gate.weight", o + "1.DenseReluDense.wi_0.weight", wr.rand(FF, H))
            wr.q8(e + "ffn_up.weight", o + "1.DenseReluDense.wi_1.weight", wr.rand(FF, H))
        else:
            wr.q8(e + "ffn_up.weight", o + "1.DenseReluDense.wi.weight", wr.rand(FF, H))
        wr.q8(e + "ffn_down.weight", o + "1.DenseReluDense.wo.weight", wr.rand(H, FF))
    wr.plain("enc.output_norm.weight", "encoder.final_layer_norm.weight", wr.rand(H))
    dropped = []
    if decoder:
        for g, a in (("dec.blk.0.attn_q.weight", wr.rand(H, H)), ("dec.blk.0.cross_attn_k.weight", wr.rand(H, H)),
                     ("dec.blk.1.ffn_up.weight", wr.rand(FF, H)), ("output.weight", wr.rand(VOCAB, H))):
            wr.q8(g, None, a)
            dropped.append(g)
        wr.plain("dec.output_norm.weight", None, wr.rand(H))
        dropped.append("dec.output_norm.weight")
    sd, meta = wr.done()
    return sd, meta, wr.expect, dropped


def test_t5_v11_encoder(tmp_path):
    sd, meta, expect, _ = write_t5(tmp_path / "t5.gguf")
    assert is_llama_cpp_named(sd) and meta["architecture"] == "t5encoder"
    out, info = to_original_names(sd, meta)
    check(out, expect)
    assert "encoder.block.1.layer.1.DenseReluDense.wi_1.weight" in out
    assert not any(".wi." in k for k in out)
    assert isinstance(out["shared.weight"], GGUFTensor)
    assert out["shared.weight"] is sd["token_embd.weight"]        # renamed, not copied
    assert info["architecture"] == "t5encoder" and info["n_blocks"] == NB
    assert info["mapped"] == len(expect) and info["dropped"] == [] and info["unpermuted"] == []
    assert not is_llama_cpp_named(out)


def test_t5_v10_no_gate_gets_wi(tmp_path):
    sd, meta, expect, _ = write_t5(tmp_path / "t5v10.gguf", gated=False)
    out, _ = to_original_names(sd, meta)
    check(out, expect)
    assert "encoder.block.0.layer.1.DenseReluDense.wi.weight" in out
    assert not any("wi_" in k for k in out)


def test_t5_full_model_drops_decoder_and_lm_head(tmp_path, caplog):
    sd, meta, expect, dropped = write_t5(tmp_path / "t5full.gguf", arch="t5", decoder=True,
                                         rel_every_block=True)   # UMT5: relative bias in every block
    with caplog.at_level(logging.INFO, logger="distorch"):
        out, info = to_original_names(sd, meta)
    check(out, expect)
    assert "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" in out
    assert sorted(info["dropped"]) == sorted(dropped)
    assert f"dropped {len(dropped)} tensor" in caplog.text


# ------------------------------------------------------------------------------------------------
# llama family

def write_llm(path, arch, *, permuted, heads=True, q_dtype="q8", norm_shift=0.0, extra=None, bias=False,
              ffn_norm="post_attention_layernorm"):
    wr = Writer(path, arch, seed=2)
    if heads:
        wr.w.add_head_count(N_HEAD)
        wr.w.add_head_count_kv(N_HEAD_KV)
    wr.w.add_block_count(NB)
    wr.w.add_embedding_length(H)
    hd = H // N_HEAD

    def norm(g, o):
        a = wr.rand(H)
        wr.plain(g, o, a, stored=a + np.float32(norm_shift))

    wr.q8("token_embd.weight", "model.embed_tokens.weight", wr.rand(VOCAB, H))
    for i in range(NB):
        b, o = f"blk.{i}.", f"model.layers.{i}."
        norm(b + "attn_norm.weight", o + "input_layernorm.weight")
        norm(b + "ffn_norm.weight", o + ffn_norm + ".weight")
        for g, n, rows, nh in (("attn_q", "q_proj", H, N_HEAD), ("attn_k", "k_proj", N_HEAD_KV * hd, N_HEAD_KV)):
            a = wr.rand(rows, H)
            stored = permute(a, nh) if permuted else a
            if q_dtype == "q8":
                wr.q8(b + g + ".weight", f"{o}self_attn.{n}.weight", a, stored=stored)
            else:
                wr.plain(b + g + ".weight", f"{o}self_attn.{n}.weight", a, stored=stored, dtype=q_dtype)
            if bias:
                v = wr.rand(rows)
                wr.plain(b + g + ".bias", f"{o}self_attn.{n}.bias", v, stored=permute(v, nh) if permuted else v)
        wr.q8(b + "attn_v.weight", o + "self_attn.v_proj.weight", wr.rand(N_HEAD_KV * hd, H))
        wr.q8(b + "attn_output.weight", o + "self_attn.o_proj.weight", wr.rand(H, H))
        wr.q8(b + "ffn_gate.weight", o + "mlp.gate_proj.weight", wr.rand(FF, H))
        wr.q8(b + "ffn_up.weight", o + "mlp.up_proj.weight", wr.rand(FF, H))
        wr.q8(b + "ffn_down.weight", o + "mlp.down_proj.weight", wr.rand(H, FF))
    norm("output_norm.weight", "model.norm.weight")
    if extra:
        extra(wr)
    return wr.done() + (wr.expect,)


@pytest.mark.parametrize("q_dtype", ["q8", np.float32, np.float16])
def test_llama_unpermutes_q_k_exactly(tmp_path, q_dtype):
    def extra(wr):
        wr.q8("output.weight", "lm_head.weight", wr.rand(VOCAB, H))
        wr.plain("rope_freqs.weight", None, wr.rand(H // N_HEAD // 2))   # converter-only: dropped

    sd, meta, expect = write_llm(tmp_path / "llama.gguf", "llama", permuted=True, q_dtype=q_dtype, extra=extra,
                                 bias=q_dtype is np.float32)
    assert meta["metadata"]["llama.attention.head_count"] == N_HEAD
    out, info = to_original_names(sd, meta)
    check(out, expect)     # exact: Q8_0 blocks lie inside rows, so moving rows == quantizing moved rows
    want = {f"model.layers.{i}.self_attn.{p}_proj.{s}" for i in range(NB) for p in "qk"
            for s in (("weight", "bias") if q_dtype is np.float32 else ("weight",))}
    assert set(info["unpermuted"]) == want
    assert info["dropped"] == ["rope_freqs.weight"]
    q = out["model.layers.0.self_attn.q_proj.weight"]
    if q_dtype == "q8":
        assert isinstance(q, GGUFTensor) and q.qtype == QT.Q8_0 and tuple(q.shape) == (H, H)
        assert q.raw.numel() == sd["blk.0.attn_q.weight"].raw.numel()
    else:
        assert q.dtype == torch.from_numpy(np.zeros(1, q_dtype)).dtype
    # the file's tensors are untouched (row order still permuted there)
    assert not np.array_equal(values(sd["blk.0.attn_k.weight"]), expect["model.layers.0.self_attn.k_proj.weight"])


def test_llama_lm_head_can_be_dropped(tmp_path):
    sd, meta, expect = write_llm(tmp_path / "l.gguf", "llama", permuted=True,
                                 extra=lambda wr: wr.q8("output.weight", None, wr.rand(VOCAB, H)))
    out, info = to_original_names(sd, meta, drop_lm_head=True)
    check(out, expect)
    assert info["dropped"] == ["output.weight"]


def test_qwen2_is_not_unpermuted(tmp_path):
    sd, meta, expect = write_llm(tmp_path / "qwen2.gguf", "qwen2", permuted=False, bias=True)
    out, info = to_original_names(sd, meta)
    check(out, expect)
    assert info["unpermuted"] == [] and "model.layers.1.self_attn.k_proj.bias" in out


@pytest.mark.skipif("gemma2" not in supported_architectures(), reason="gguf package without gemma2")
def test_gemma2_norms_unshifted(tmp_path):
    def extra(wr):
        for i in range(NB):
            a, c = wr.rand(H), wr.rand(H)
            wr.plain(f"blk.{i}.post_attention_norm.weight", f"model.layers.{i}.post_attention_layernorm.weight",
                     a, stored=a + 1)
            wr.plain(f"blk.{i}.post_ffw_norm.weight", f"model.layers.{i}.post_feedforward_layernorm.weight",
                     c, stored=c + 1)

    sd, meta, expect = write_llm(tmp_path / "gemma2.gguf", "gemma2", permuted=False, norm_shift=1.0,
                                 extra=extra, ffn_norm="pre_feedforward_layernorm")  # gemma2's ffn_norm
    out, info = to_original_names(sd, meta)
    assert set(out) == set(expect)
    for k, v in expect.items():
        np.testing.assert_allclose(values(out[k]), v, rtol=0, atol=1e-6, err_msg=k)
    assert len(info["norm_unshifted"]) == 4 * NB + 1 and info["unpermuted"] == []


# ------------------------------------------------------------------------------------------------
# unchanged / errors

def test_original_names_returned_unchanged():
    sd = {"encoder.block.0.layer.0.SelfAttention.q.weight": torch.zeros(4, 4), "shared.weight": torch.ones(2, 4)}
    assert not is_llama_cpp_named(sd)
    out, info = to_original_names(sd, {"architecture": "t5encoder"})
    assert out == sd and all(out[k] is sd[k] for k in sd) and info["unchanged"] and info["mapped"] == 0
    # even for an architecture this module does not know
    assert to_original_names(sd, {"architecture": "bert"})[0] == sd


def test_unknown_tensor_name(tmp_path):
    sd, meta, _ = write_llm(tmp_path / "bad.gguf", "llama", permuted=True,
                            extra=lambda wr: wr.plain("blk.0.mystery.weight", None, wr.rand(H)))
    with pytest.raises(GGUFNameError, match=r"blk\.0\.mystery\.weight.*'llama'") as e:
        to_original_names(sd, meta)
    assert isinstance(e.value, DisTorchError) and "t5encoder" in str(e.value)


def test_unsupported_architecture():
    sd = {"blk.0.attn_q.weight": torch.zeros(4, 4)}
    with pytest.raises(GGUFNameError, match=r"'bert' is not supported.*llama.*t5encoder"):
        to_original_names(sd, {"architecture": "bert", "metadata": {}})
    with pytest.raises(GGUFNameError, match="None is not supported"):
        to_original_names(sd, {})


def test_missing_head_count(tmp_path):
    sd, meta, _ = write_llm(tmp_path / "nohead.gguf", "llama", permuted=True, heads=False)
    with pytest.raises(GGUFNameError, match=r"llama\.attention\.head_count"):
        to_original_names(sd, meta)
    # head_count_kv absent: llama.cpp takes head_count for K as well
    q, k = np.arange(16.).reshape(8, 2), np.arange(16., 32.).reshape(8, 2)
    sd = {"blk.0.attn_q.weight": torch.from_numpy(permute(q, 2)), "blk.0.attn_k.weight": torch.from_numpy(permute(k, 2))}
    out, _ = to_original_names(sd, {"architecture": "llama", "metadata": {"llama.attention.head_count": 2}})
    assert torch.equal(out["model.layers.0.self_attn.q_proj.weight"], torch.from_numpy(q))
    assert torch.equal(out["model.layers.0.self_attn.k_proj.weight"], torch.from_numpy(k))


def test_head_count_not_fitting_rows():
    with pytest.raises(GGUFNameError, match=r"not divisible.*head"):
        to_original_names({"blk.0.attn_q.weight": torch.zeros(12, 4)},
                          {"architecture": "llama", "metadata": {"llama.attention.head_count": 4}})


def test_huge_block_number_costs_nothing_extra():
    """A block number of 99999 (or any) maps in constant work: the name map is built for one block."""
    import time
    import tracemalloc
    sd = {"enc.blk.99999.attn_q.weight": torch.zeros(4, 4), "enc.blk.3.ffn_up.weight": torch.zeros(4, 4),
          "token_embd.weight": torch.zeros(8, 4)}
    tracemalloc.start()
    t0 = time.perf_counter()
    out, info = to_original_names(sd, {"architecture": "t5encoder", "metadata": {}})
    took, peak = time.perf_counter() - t0, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert set(out) == {"encoder.block.99999.layer.0.SelfAttention.q.weight",
                        "encoder.block.3.layer.1.DenseReluDense.wi.weight", "shared.weight"}
    assert info["n_blocks"] == 100000
    assert took < 1.0 and peak < 8 * 2 ** 20, (took, peak)
    with pytest.raises(GGUFNameError, match=r"blk\.5\.attn_qq\.weight"):
        to_original_names({"enc.blk.5.attn_qq.weight": torch.zeros(2)}, {"architecture": "t5encoder"})
