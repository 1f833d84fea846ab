import builtins
import json
import os
import re
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from distorch.compiler.files import graph_from_file, graph_from_tensors, read_header
from distorch.compiler.graph import ROOT
from distorch.errors import DisTorchError, FileFormatError
from distorch.formats import gguf_reader, safetensors as st_reader
from distorch.formats.gguf_reader import read_gguf_header
from distorch.formats.tensor_info import TensorInfo

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
    """Wraps open() for a reader module: records the furthest byte any read reached."""

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
    monkeypatch.setattr(st_reader, "open", counting, raising=False)
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
    meta = read_gguf_header(str(p)).kv
    assert meta["general.architecture"] == "flux" and meta["general.name"] == "tiny flux"
    assert meta["some.ints"] == [1, 2, 3] and meta["some.strings"] == ["a", "bb", "ccc"]


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
    monkeypatch.setattr(gguf_reader, "open", counting, raising=False)
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


# --- crafted files: a clear FileFormatError, bounded time and memory (issue 12) ----------------------
def _bounded(fn, *args, mb: float = 4.0, s: float = 1.0):
    """Run fn(*args), which must raise a FileFormatError; return it. Peak Python memory < mb MB, < s seconds."""
    import time
    import tracemalloc
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(FileFormatError) as e:
            fn(*args)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert time.perf_counter() - t0 < s and peak < mb * 2 ** 20, (str(e.value), peak)
    return str(e.value)


def _s(text) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def _gguf_bytes(kv=(), tensors=(), *, n_tensors=None, n_kv=None, data=b"") -> bytes:
    """A GGUF file by hand: kv = [(key, value type, payload bytes)], tensors = [(name, dims, type, offset)]."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                len(kv) if n_kv is None else n_kv)
    for key, vt, payload in kv:
        out += _s(key) + struct.pack("<I", vt) + payload
    for name, dims, tid, off in tensors:
        out += _s(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims) + struct.pack("<IQ", tid, off)
    return out + b"\0" * (-len(out) % 32) + data


def _write(tmp_path, name, raw: bytes):
    p = tmp_path / name
    p.write_bytes(raw)
    return p


def test_crafted_gguf_headers_fail_clearly_and_cheaply(tmp_path):
    from distorch.formats.gguf_loader import load_gguf
    F32 = int(Q.F32)
    cases = {
        # a metadata array claiming 2^60 items (fixed-size, strings, arrays)
        "arr_u8": ([("a", 9, struct.pack("<IQ", 0, 2 ** 60))], [], r"'a' claims 1152921504606846976 items"),
        "arr_str": ([("a", 9, struct.pack("<IQ", 8, 2 ** 60))], [], r"claims 1152921504606846976 items"),
        "arr_arr": ([("a", 9, struct.pack("<IQ", 9, 2 ** 60))], [], r"claims 1152921504606846976 items"),
        # 5000 nested arrays
        "nested": ([("a", 9, struct.pack("<IQ", 9, 1) * 5000)], [], r"nests arrays more than 8 deep"),
        "vtype": ([("a", 13, b"")], [], r"'a' has unknown value type 13"),
        "itype": ([("a", 9, struct.pack("<IQ", 77, 0))], [], r"'a' has unknown array item type 77"),
        "dupkey": ([("a", 0, b"\1"), ("a", 0, b"\1")], [], r"metadata key 'a' appears twice"),
        "badkey": ([(b"\xff\xfe", 0, b"\1")], [], r"metadata key #0 is not UTF-8 at byte 24"),
        "align_inf": ([("general.alignment", 6, struct.pack("<f", float("inf")))], [], r"general.alignment inf"),
        "align_nan": ([("general.alignment", 6, struct.pack("<f", float("nan")))], [], r"general.alignment nan"),
        "align_str": ([("general.alignment", 8, _s("32"))], [], r"general.alignment '32' is not an integer"),
        "align_3": ([("general.alignment", 4, struct.pack("<I", 3))], [], r"general.alignment 3 is not"),
        "align_0": ([("general.alignment", 4, struct.pack("<I", 0))], [], r"general.alignment 0 is not"),
        # tensor entries
        "offset": ([], [("w", [4], F32, 2 ** 64 - 1)], r"tensor 'w' \(F32, 16 bytes at byte \d+\) runs past the end"),
        "overlap": ([], [("w", [4], F32, 0), ("v", [4], F32, 8)], r"tensor 'v' data .* overlaps tensor 'w'"),
        "dims": ([], [("w", [0, 2 ** 64 - 1], F32, 0)], r"tensor 'w' has dimensions \[0, 18446744073709551615\]"),
        "rank": ([], [("w", [1] * 9, F32, 0)], r"tensor 'w' claims 9 dimensions"),
        "duptensor": ([], [("w", [4], F32, 0), ("w", [4], F32, 32)], r"tensor 'w' appears twice"),
        "typeid": ([], [("w", [4], 99, 0)], r"tensor 'w' has unknown GGML type id 99"),
        "rows": ([], [("w", [33], int(Q.Q8_0), 0)], r"tensor 'w' of type Q8_0 has rows of 33 values"),
    }
    for name, (kv, tensors, want) in cases.items():
        p = _write(tmp_path, f"{name}.gguf", _gguf_bytes(kv, tensors, data=b"\0" * 64))
        assert os.path.getsize(p) < 64 * 1024
        for fn in (read_header, load_gguf):
            msg = _bounded(fn, p)
            assert re.search(want, msg) and str(p) in msg, (name, fn.__name__, msg)
    # 64 bytes claiming 2^60 tensors / metadata entries
    for n_t, n_kv in ((2 ** 60, 0), (0, 2 ** 60)):
        p = _write(tmp_path, "counts.gguf", _gguf_bytes(n_tensors=n_t, n_kv=n_kv, data=b"\0" * 32))
        assert "corrupt GGUF header" in _bounded(load_gguf, p)
    # a string length beyond the file
    p = _write(tmp_path, "strlen.gguf", _gguf_bytes([("a", 8, struct.pack("<Q", 2 ** 62))]))
    assert re.search(r"metadata 'a' at byte \d+ needs 4611686018427387904 bytes", _bounded(load_gguf, p))
    # a valid one still loads
    p = _write(tmp_path, "ok.gguf", _gguf_bytes([("general.alignment", 4, struct.pack("<I", 64))],
                                                [("w", [4], F32, 0), ("v", [2, 2], F32, 64)], data=b"\0" * 128))
    assert [(i.name, i.shape) for i in read_header(p)] == [("w", (4,)), ("v", (2, 2))]
    sd, meta = load_gguf(p)
    assert meta["alignment"] == 64 and sd["v"].shape == (2, 2)


def test_crafted_safetensors_headers_fail_clearly_and_cheaply(tmp_path):
    from distorch.runtime.loading import load_into

    def st(header_text: str, data: bytes = b"\0" * 16) -> bytes:
        h = header_text.encode()
        return struct.pack("<Q", len(h)) + h + data

    ok = '"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}'
    cases = {
        "list": ("[1, 2, 3]", r"header is not a JSON object \(got a JSON list\)"),
        "missing": ('{"w": {"dtype": "F32", "shape": [4]}}', r"tensor 'w' has a malformed header entry"),
        "notdict": ('{"w": 7}', r"tensor 'w' has a malformed header entry 7"),
        "negative": ('{"w": {"dtype": "U8", "shape": [4], "data_offsets": [-4, 0]}}', r"invalid data_offsets \[-4, 0\]"),
        "inf_shape": ('{"w": {"dtype": "F32", "shape": [1e400], "data_offsets": [0, 16]}}', r"shape \[inf\]"),
        "inf_offsets": ('{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1e400]}}',
                        r"data_offsets \[0, inf\]"),
        "big_int": ('{"w": {"dtype": "F32", "shape": [0, ' + "9" * 400 + '], "data_offsets": [0, 0]}}',
                    r"shape \[0, 9999"),
        "string_shape": ('{"w": {"dtype": "U8", "shape": "22", "data_offsets": [0, 4]}}', r"shape '22'"),
        "float_shape": ('{"w": {"dtype": "U8", "shape": [2.7], "data_offsets": [0, 2]}}', r"shape \[2.7\]"),
        "dtype": ('{"w": {"dtype": "FOO", "shape": [4], "data_offsets": [0, 4]}}', r"dtype 'FOO', which is not"),
        "dup": ("{" + ok + ", " + ok + "}", r"has the key 'w' twice"),
        "nested": ('{"w": ' + "[" * 100000 + "]" * 100000 + "}", r"nested too deeply"),
        # 6 GiB claimed by a file of a few bytes: fails before anything is allocated
        "huge": ('{"w": {"dtype": "U8", "shape": [6442450944], "data_offsets": [0, 6442450944]}}',
                 r"tensor 'w' data \[0, 6442450944\) lies beyond the end of the file"),
    }
    for name, (text, want) in cases.items():
        p = _write(tmp_path, f"{name}.safetensors", st(text))
        msg = _bounded(read_header, p)
        assert re.search(want, msg) and str(p) in msg, (name, msg)
        # load_into parses the header before it looks at the module or the plan
        assert _bounded(load_into, torch.nn.Linear(2, 2), str(p), None) == msg


def _mutants(raw: bytes, head: int, n: int, seed: int):
    """n mutated copies of raw (bytes, 8-byte integers and cuts, within the first `head` bytes)."""
    import random
    rng = random.Random(seed)
    big = [0, 1, 2 ** 31, 2 ** 32 - 1, 2 ** 60, 2 ** 63, 2 ** 64 - 1]
    for _ in range(n):
        b = bytearray(raw)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(head)
            kind = rng.random()
            if kind < 0.4:
                b[at] = rng.randrange(256)
            elif kind < 0.8:
                b[at:at + 8] = struct.pack("<Q", rng.choice(big) if rng.random() < 0.5 else rng.getrandbits(64))
            else:
                del b[at:]
                break
        yield bytes(b)


def test_mutated_files_give_a_result_or_a_clear_error(tmp_path, st_file, gguf_file):
    """Random mutations of valid headers: every outcome is a valid result or a DisTorchError, never
    another exception (hypothesis-style, stdlib random: deterministic)."""
    from distorch.formats.gguf_loader import load_gguf
    tried = {"ok": 0, "error": 0}
    for path, head, readers in ((st_file[0], None, (read_header,)), (gguf_file[0], None, (read_header, load_gguf))):
        raw = path.read_bytes()
        head = 8 + struct.unpack("<Q", raw[:8])[0] if path.suffix == ".safetensors" else min(
            i.offset for i in read_header(path))
        for k, m in enumerate(_mutants(raw, head, 300, seed=len(raw))):
            p = _write(tmp_path, f"m{k}{path.suffix}", m)
            for fn in readers:
                try:
                    fn(p)
                    tried["ok"] += 1
                except DisTorchError:
                    tried["error"] += 1
            p.unlink()
    print(f"\n[mutations] {sum(tried.values())} reads of mutated files: {tried}")
    assert tried["error"] > 100
