import builtins
import json
import os
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distorch.compiler import files
from distorch.compiler.files import TensorInfo, graph_from_file, graph_from_tensors, read_header
from distorch.compiler.graph import ROOT
from distorch.errors import DisTorchError, FileFormatError

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def names(g):
    return [u.name for u in g]


# --- safetensors ----------------------------------------------------------------------------------
@pytest.fixture
def st_file(tmp_path):
    torch.manual_seed(0)
    tensors = {
        "img_in.weight": torch.randn(8, 4, dtype=torch.bfloat16),
        "img_in.bias": torch.randn(8),
        "double_blocks.0.img_mod.lin.weight": torch.randn(16, 8, dtype=torch.float16),
        "double_blocks.1.img_mod.lin.weight": torch.randn(16, 8, dtype=torch.float16),
        "single_blocks.0.linear1.weight": torch.randn(12, 8).to(torch.float8_e4m3fn),
        "final_layer.linear.weight": torch.randn(4, 8, dtype=torch.bfloat16),
    }
    p = tmp_path / "tiny.safetensors"
    save_file(tensors, str(p), metadata={"format": "pt"})
    return p, tensors


def test_safetensors_header_matches_data(st_file):
    p, tensors = st_file
    infos = read_header(p)
    assert {i.name for i in infos} == set(tensors)
    raw = p.read_bytes()
    want_dtype = {torch.bfloat16: "BF16", torch.float32: "F32", torch.float16: "F16", torch.float8_e4m3fn: "F8_E4M3"}
    for i in infos:
        t = tensors[i.name]
        assert i.shape == tuple(t.shape)
        assert i.dtype_str == want_dtype[t.dtype]
        assert i.nbytes == t.numel() * t.element_size()
        # the offset points at this tensor's bytes
        stored = raw[i.offset:i.offset + i.nbytes]
        assert stored == t.contiguous().view(torch.uint8).numpy().tobytes()


def test_graph_from_safetensors_file(st_file):
    p, tensors = st_file
    g = graph_from_file(str(p))
    assert names(g) == ["img_in", "double_blocks.0", "double_blocks.1", "single_blocks.0", "final_layer"]
    assert g["img_in"].param_bytes == 8 * 4 * 2 + 8 * 4
    assert g["single_blocks.0"].param_bytes == 96
    assert g["double_blocks.1"].kind == "block" and g["img_in"].kind == "leaf"
    assert g.total_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert g.source == str(p)


def _write_st(path, header: dict, data_len: int, header_len=None):
    h = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h) if header_len is None else header_len))
        f.write(h)
        f.write(b"\0" * data_len)


def test_safetensors_truncated_and_corrupt(tmp_path, st_file):
    p, _ = st_file
    raw = p.read_bytes()
    # truncated data: the last tensor's bytes run past the end
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(raw[:-3])
    with pytest.raises(FileFormatError, match=r"cut\.safetensors.*tensor '.*'.*beyond the end"):
        read_header(cut)
    # shorter than the 8-byte length
    tiny = tmp_path / "tiny.safetensors"
    tiny.write_bytes(b"\x01\x02")
    with pytest.raises(FileFormatError, match="tiny.safetensors: truncated"):
        read_header(tiny)
    # header length beyond the file
    big = tmp_path / "big.safetensors"
    _write_st(big, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, 4, header_len=10 ** 6)
    with pytest.raises(FileFormatError, match="header length 1000000 runs past the end"):
        read_header(big)
    # not JSON
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 4) + b"{{{{" + b"\0" * 8)
    with pytest.raises(FileFormatError, match="bad.safetensors: .*not valid JSON"):
        read_header(bad)
    # overlapping tensors
    ov = tmp_path / "ov.safetensors"
    _write_st(ov, {"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
                   "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16)
    with pytest.raises(FileFormatError, match="ov.safetensors: tensor 'b' .*overlaps tensor 'a'"):
        read_header(ov)
    # size disagreeing with dtype x shape
    sz = tmp_path / "sz.safetensors"
    _write_st(sz, {"w": {"dtype": "BF16", "shape": [4, 4], "data_offsets": [0, 16]}}, 16)
    with pytest.raises(FileFormatError, match="tensor 'w' \\(BF16, shape \\[4, 4\\]\\) needs 32 bytes"):
        read_header(sz)
    # offsets beyond file
    ob = tmp_path / "ob.safetensors"
    _write_st(ob, {"w": {"dtype": "U8", "shape": [100], "data_offsets": [0, 100]}}, 10)
    with pytest.raises(FileFormatError, match="ob.safetensors: tensor 'w'"):
        read_header(ob)
    # malformed entry
    me = tmp_path / "me.safetensors"
    _write_st(me, {"w": {"dtype": "U8"}}, 0)
    with pytest.raises(FileFormatError, match="tensor 'w' has a malformed header entry"):
        read_header(me)


class _Counting:
    """Wraps open() for the files module: records the furthest byte any read reached."""

    def __init__(self):
        self.max_pos = 0

    def __call__(self, path, mode="r", *a, **k):
        f = builtins.open(path, mode, *a, **k)
        outer = self
        orig_read = f.read

        def read(n=-1):
            assert n is not None and n >= 0, "whole-file read"
            b = orig_read(n)
            outer.max_pos = max(outer.max_pos, f.tell())
            return b

        class Proxy:
            def __getattr__(self, name):
                return read if name == "read" else getattr(f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Proxy()


def test_safetensors_header_only_on_huge_sparse_file(tmp_path, monkeypatch):
    # a 40 GB "checkpoint": header + sparse hole; planning must touch only the header
    n = 10 * 2 ** 30 // 4
    header = {"__metadata__": {"format": "pt"}}
    off = 0
    for i in range(4):
        header[f"blocks.{i}.w"] = {"dtype": "F32", "shape": [n], "data_offsets": [off, off + 4 * n]}
        off += 4 * n
    h = json.dumps(header).encode()
    p = tmp_path / "huge.safetensors"
    with open(p, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h)
        f.truncate(8 + len(h) + off)
    counting = _Counting()
    monkeypatch.setattr(files, "open", counting, raising=False)
    g = graph_from_file(str(p))
    assert names(g) == [f"blocks.{i}" for i in range(4)]
    assert g.total_bytes == off == 40 * 2 ** 30
    assert 0 < counting.max_pos <= 8 + len(h)


# --- gguf -------------------------------------------------------------------------------------
@pytest.fixture
def gguf_file(tmp_path):
    rng = np.random.default_rng(0)
    p = tmp_path / "tiny.gguf"
    w = gguf.GGUFWriter(str(p), arch="flux")
    w.add_string("general.name", "tiny flux")
    w.add_array("some.ints", [1, 2, 3])
    w.add_array("some.strings", ["a", "bb", "ccc"])
    qkv = rng.standard_normal((16, 64)).astype(np.float32)
    q = gguf.quants.quantize(qkv, Q.Q8_0)
    w.add_tensor("double_blocks.0.img_attn.qkv.weight", q, raw_dtype=Q.Q8_0)
    w.add_tensor("img_in.weight", rng.standard_normal((8, 4)).astype(np.float16))
    w.add_tensor("img_in.bias", rng.standard_normal(8).astype(np.float32))
    w.add_tensor("final_layer.linear.weight", rng.standard_normal((4, 64)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p, q


def test_gguf_header_matches_reader(gguf_file):
    p, q = gguf_file
    infos = read_header(p)
    ref = {t.name: t for t in gguf.GGUFReader(str(p)).tensors}
    assert [i.name for i in infos] == list(ref)
    for i in infos:
        r = ref[i.name]
        assert i.shape == tuple(int(d) for d in reversed(r.shape))
        assert i.dtype_str == r.tensor_type.name
        assert i.nbytes == r.n_bytes
        assert i.offset == r.data_offset
    qi = infos[0]
    assert (qi.shape, qi.dtype_str, qi.nbytes) == ((16, 64), "Q8_0", 16 * 2 * 34)
    assert p.read_bytes()[qi.offset:qi.offset + qi.nbytes] == q.tobytes()
    _, meta = files.read_gguf(str(p))
    assert meta["general.architecture"] == "flux" and meta["general.name"] == "tiny flux"


def test_graph_from_gguf_counts_quantized_bytes(gguf_file):
    p, _ = gguf_file
    g = graph_from_file(p)
    assert names(g) == ["img_in", "double_blocks.0", "final_layer"]
    assert g["double_blocks.0"].param_bytes == 1088            # quantized, not 16*64*4
    assert g["img_in"].param_bytes == 8 * 4 * 2 + 8 * 4


def test_gguf_truncated_and_corrupt(tmp_path, gguf_file):
    p, _ = gguf_file
    raw = p.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(raw[:-10])
    with pytest.raises(FileFormatError, match=r"cut\.gguf: tensor 'final_layer.linear.weight' .*truncated"):
        read_header(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(raw[:100])
    with pytest.raises(FileFormatError, match=r"head\.gguf: truncated GGUF header"):
        read_header(head)
    magic = tmp_path / "magic.gguf"
    magic.write_bytes(b"GGML" + raw[4:])
    with pytest.raises(FileFormatError, match="magic.gguf: not a GGUF file"):
        read_header(magic)
    ver = tmp_path / "ver.gguf"
    ver.write_bytes(raw[:4] + struct.pack("<I", 99) + raw[8:])
    with pytest.raises(FileFormatError, match="unsupported GGUF version 99"):
        read_header(ver)
    cnt = tmp_path / "cnt.gguf"
    cnt.write_bytes(raw[:8] + struct.pack("<Q", 2 ** 60) + raw[16:])
    with pytest.raises(FileFormatError, match="cnt.gguf: corrupt GGUF header"):
        read_header(cnt)


def test_gguf_header_only_on_huge_sparse_file(tmp_path, monkeypatch):
    p = tmp_path / "huge.gguf"
    w = gguf.GGUFWriter(str(p), arch="flux")
    rows, cols = 2 ** 20, 8192                      # 8 Gi weights of Q8_0 = 8.5 GiB per tensor
    row_bytes = cols // 32 * 34
    for i in range(3):
        w.add_tensor_info(f"blocks.{i}.w", (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes,
                          raw_dtype=Q.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    head = os.path.getsize(p)
    per = rows * row_bytes
    with open(p, "r+b") as f:
        f.truncate(head + 3 * per + 64)
    counting = _Counting()
    monkeypatch.setattr(files, "open", counting, raising=False)
    g = graph_from_file(p)
    assert names(g) == ["blocks.0", "blocks.1", "blocks.2"]
    assert all(g[n].param_bytes == per for n in names(g))
    assert read_header(p)[0].shape == (rows, cols)
    assert 0 < counting.max_pos <= head


# --- grouping -----------------------------------------------------------------------------------
def _infos(keys, nbytes=4):
    return [TensorInfo(k, (1,), "F32", nbytes) for k in keys]


def test_grouping_prefixes_noindex_and_full_checkpoint():
    keys = ["model.diffusion_model.out.2.weight", "model.diffusion_model.time_embed.0.weight",
            "model.diffusion_model.input_blocks.10.0.in_layers.0.weight",
            "model.diffusion_model.input_blocks.2.0.in_layers.0.weight",
            "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q.weight",
            "model.diffusion_model.middle_block.0.in_layers.0.weight",
            "model.diffusion_model.output_blocks.0.0.in_layers.0.weight",
            "model.diffusion_model.out.0.weight", "model.diffusion_model.label_emb.0.0.weight",
            "first_stage_model.decoder.conv_in.weight", "conditioner.embedders.0.transformer.x.weight"]
    g = graph_from_tensors(_infos(keys), "ckpt")
    assert names(g) == ["time_embed", "label_emb", "input_blocks.2", "input_blocks.10", "middle_block",
                        "output_blocks.0", "out"]
    assert g["middle_block"].kind == "block" and len(g["middle_block"].tensors) == 2
    assert g["out"].tensors == ["model.diffusion_model.out.2.weight", "model.diffusion_model.out.0.weight"]
    assert g.excluded == keys[-2:] and g.excluded_bytes == 8
    g2 = graph_from_tensors(_infos(keys), "ckpt", keep_other=True)
    assert "first_stage_model" in g2 and "conditioner" in g2
    assert g2.total_bytes == 4 * len(keys)


def test_grouping_diffusers_and_unknown_families():
    keys = ["proj_out.weight", "transformer_blocks.1.attn.to_q.weight", "x_embedder.weight",
            "single_transformer_blocks.0.proj_mlp.weight", "transformer_blocks.0.attn.to_q.weight",
            "zz_custom.0.a.b.weight", "zz_custom.1.a.b.weight", "norm_out.linear.weight",
            "pos_embed", "aaa_extra.weight", "time_text_embed.timestep_embedder.linear_1.weight"]
    g = graph_from_tensors(_infos(keys), "x")
    # known families by rank; an unknown list of blocks (zz_custom) runs among the blocks; another unknown
    # family sits right after the known family that appeared last before it (first-appearance order:
    # proj_out, transformer_blocks, x_embedder, single_transformer_blocks, zz_custom, norm_out, pos_embed,
    # aaa_extra, ...); a bare top-level tensor goes to ROOT, first
    assert names(g) == [ROOT, "x_embedder", "time_text_embed", "transformer_blocks.0", "transformer_blocks.1",
                        "zz_custom.0", "zz_custom.1", "single_transformer_blocks.0", "norm_out", "aaa_extra",
                        "proj_out"]
    assert g[ROOT].kind == "root" and g[ROOT].tensors == ["pos_embed"]
    assert g["zz_custom.0"].kind == "block"


def test_unknown_block_families_order_among_blocks():
    # HiDream-like names, as a safetensors file lists them (sorted): blocks must not land after final_layer
    keys = ["caption_projection.0.linear.weight", "double_stream_blocks.0.block.attn1.to_q.weight",
            "double_stream_blocks.1.block.attn1.to_q.weight", "final_layer.linear.weight",
            "single_stream_blocks.0.block.attn1.to_q.weight", "single_stream_blocks.1.block.attn1.to_q.weight",
            "t_embedder.timestep_embedder.linear_1.weight", "x_embedder.proj.weight",
            "my_single_things.0.a.b.weight", "my_single_things.1.a.b.weight",
            "my_pairs.0.a.b.weight", "my_pairs.1.a.b.weight"]
    g = graph_from_tensors(_infos(keys), "x")
    assert names(g) == ["caption_projection", "x_embedder", "t_embedder", "double_stream_blocks.0",
                        "double_stream_blocks.1", "my_pairs.0", "my_pairs.1", "single_stream_blocks.0",
                        "single_stream_blocks.1", "my_single_things.0", "my_single_things.1", "final_layer"]


def test_unknown_name_and_extension(tmp_path):
    with pytest.raises(DisTorchError, match=r"'nope' does not exist.*\.safetensors.*flux-dev.*sdxl"):
        graph_from_file("nope")
    txt = tmp_path / "w.bin"
    txt.write_bytes(b"x")
    with pytest.raises(DisTorchError, match="not a supported weights file.*gguf"):
        graph_from_file(str(txt))
    with pytest.raises(DisTorchError, match="unsupported weights file type"):
        read_header(txt)
    with pytest.raises(DisTorchError, match="does not exist"):
        read_header(tmp_path / "missing.safetensors")
