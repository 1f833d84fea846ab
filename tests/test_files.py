"""Reading weight files' headers: the tensors of safetensors and GGUF files (checked against their bytes and
the gguf package's reader), the unit graphs built from them, truncated and corrupt files, huge sparse files
read header-only, unknown names and extensions.  Grouping tensor names into units:
tests/test_files_grouping.py; crafted and mutated headers: tests/test_files_crafted.py; the shared files:
tests/weight_files.py."""
import builtins
import json
import os
import struct

import numpy as np
import pytest
import torch

from distorch.compiler.files import graph_from_file, read_header
from distorch.errors import DisTorchError, FileFormatError
from distorch.formats import gguf_reader, safetensors as st_reader
from distorch.formats.gguf_reader import read_gguf_header

import weight_files
from weight_files import names

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

st_file = weight_files.st_file          # shared fixtures (tests/weight_files.py): pytest finds them here
gguf_file = weight_files.gguf_file


# --- safetensors ----------------------------------------------------------------------------------
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


# --- names and extensions ---------------------------------------------------------------------
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
