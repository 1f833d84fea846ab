"""formats.gguf_loader and formats.gguf_tensor: GGUF files written here with gguf.GGUFWriter."""
from __future__ import annotations

import copy
import struct

import numpy as np
import pytest
import torch
import torch.nn as nn

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QT  # noqa: E402

from distorch.compiler.graph import stored_nbytes  # noqa: E402
from distorch.errors import DisTorchError, FileFormatError, GGUFError, GGUFFileError  # noqa: E402
from distorch.formats.gguf_loader import inspect_gguf, load_gguf  # noqa: E402
from distorch.formats.gguf_tensor import GGUFLinear, GGUFTensor, gguf_ops, materialize  # noqa: E402

P = "model.diffusion_model."


def _k_blocks(qt, n_blocks, seed):
    """Random raw K-quant blocks with finite small fp16 scales (d, dmin)."""
    rng = np.random.default_rng(seed)
    _, ts = gguf.GGML_QUANT_SIZES[qt]
    raw = rng.integers(0, 256, size=(n_blocks, ts), dtype=np.uint8)
    offs = {QT.Q4_K: (0, 2), QT.Q6_K: (208,), QT.Q5_K: (0, 2)}[qt]
    for o in offs:
        raw[:, o:o + 2] = rng.uniform(-0.05, 0.05, size=(n_blocks, 1)).astype(np.float16).view(np.uint8)
    return raw


def write_model(path, *, prefix=P, arch="flux", extra=None):
    """A small Flux-like GGUF: Q8_0, Q4_0, F16, F32, BF16 and a Q4_K tensor given as raw blocks.
    Returns {key without prefix: expected float32 values (torch)}."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), arch)
    expect = {}

    def add(key, arr, raw_dtype=None, ref=None):
        w.add_tensor(prefix + key, arr, raw_dtype=raw_dtype)
        expect[key] = torch.from_numpy(np.ascontiguousarray(ref if ref is not None else arr)).float()

    a = rng.standard_normal((96, 256)).astype(np.float32)
    qa = gguf.quants.quantize(a, QT.Q8_0)
    add("double_blocks.0.img_attn.qkv.weight", qa, QT.Q8_0, gguf.quants.dequantize(qa, QT.Q8_0))
    b = rng.standard_normal((64, 96)).astype(np.float32)
    qb = gguf.quants.quantize(b, QT.Q4_0)
    add("double_blocks.0.img_attn.proj.weight", qb, QT.Q4_0, gguf.quants.dequantize(qb, QT.Q4_0))
    add("double_blocks.0.img_norm.scale", rng.standard_normal(96).astype(np.float16))
    add("double_blocks.0.img_attn.qkv.bias", rng.standard_normal(96).astype(np.float32))
    c = rng.standard_normal((8, 16)).astype(np.float32)
    qc = gguf.quants.quantize(c, QT.BF16)
    add("img_in.weight", qc, QT.BF16, gguf.quants.dequantize(qc, QT.BF16))
    kb = _k_blocks(QT.Q4_K, 32 * 2, 5).reshape(32, 2 * 144)          # 32 rows x 512 values
    add("single_blocks.0.linear1.weight", kb, QT.Q4_K, gguf.quants.dequantize(kb, QT.Q4_K))
    if extra:
        extra(w, expect)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expect


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "tiny-flux-Q8_0.gguf"
    return path, write_model(path)


def test_load_types_shapes_values(model):
    path, expect = model
    sd, meta = load_gguf(path)
    assert set(sd) == set(expect)                                  # prefix removed
    assert meta["architecture"] == "flux"
    assert meta["qtypes"] == {"Q8_0": 1, "Q4_0": 1, "F16": 1, "F32": 1, "BF16": 1, "Q4_K": 1}
    kinds = {k: (type(v).__name__, v.dtype) for k, v in sd.items()}
    assert kinds["double_blocks.0.img_attn.qkv.weight"] == ("GGUFTensor", torch.bfloat16)
    assert kinds["single_blocks.0.linear1.weight"] == ("GGUFTensor", torch.bfloat16)
    assert kinds["double_blocks.0.img_norm.scale"] == ("Tensor", torch.float16)
    assert kinds["double_blocks.0.img_attn.qkv.bias"] == ("Tensor", torch.float32)
    assert kinds["img_in.weight"] == ("Tensor", torch.bfloat16)      # BF16 viewed, not uint8
    for k, v in sd.items():
        assert tuple(v.shape) == tuple(expect[k].shape), k        # torch order (file is reversed)
        got = v.dequantize(torch.float32) if isinstance(v, GGUFTensor) else v.float()
        assert torch.equal(got, expect[k]), k
    q = sd["double_blocks.0.img_attn.qkv.weight"]
    assert q.qtype == QT.Q8_0 and q.raw.dtype == torch.uint8
    assert stored_nbytes(q) == 96 * 256 // 32 * 34                 # cost model sees stored bytes
    assert meta["stored_bytes"] == sum(stored_nbytes(v) for v in sd.values())


def test_quantized_tensors_stay_memory_mapped(model):
    """Raw blocks are views of the file mapping: rewriting the file's bytes shows through."""
    path, _ = model
    sd, _ = load_gguf(path)
    q = sd["double_blocks.0.img_attn.qkv.weight"]
    info = inspect_gguf(path)
    off = next(info["data_start"] + o for n, _, _, o in info["tensors"] if n.endswith("img_attn.qkv.weight"))
    assert bytes(q.raw[:8].numpy()) == path.read_bytes()[off:off + 8]
    with open(path, "r+b") as f:
        f.seek(off + 2)
        f.write(bytes([0x7F]))
    assert int(q.raw[2]) == 0x7F


def test_keys_without_prefix_kept_and_device_arg(tmp_path):
    path = tmp_path / "noprefix.gguf"
    expect = write_model(path, prefix="")
    sd, meta = load_gguf(path, device="cpu", dtype=torch.float16)
    assert set(sd) == set(expect)
    assert sd["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float16


def test_orig_shape_metadata(tmp_path):
    """ComfyUI-GGUF may store a reshaped tensor and record its shape in comfy.gguf.orig_shape.<name>."""
    def extra(w, expect):
        data = np.random.default_rng(3).standard_normal((4, 3 * 2 * 32)).astype(np.float32)
        q = gguf.quants.quantize(data, QT.Q8_0)
        w.add_tensor(P + "conv.weight", q, raw_dtype=QT.Q8_0)
        w.add_array("comfy.gguf.orig_shape." + P + "conv.weight", [4, 3, 2, 32])
        expect["conv.weight"] = torch.from_numpy(gguf.quants.dequantize(q, QT.Q8_0)).reshape(4, 3, 2, 32)

    path = tmp_path / "orig.gguf"
    expect = write_model(path, extra=extra)
    sd, meta = load_gguf(path)
    t = sd["conv.weight"]
    assert tuple(t.shape) == (4, 3, 2, 32) and tuple(t.stored_shape) == (4, 192)
    assert torch.equal(t.dequantize(torch.float32), expect["conv.weight"])
    assert not any(k.startswith("comfy.gguf.orig_shape") for k in meta["metadata"])


# --- bad files -------------------------------------------------------------------------------

def test_truncated_file_names_tensor_and_type(model, tmp_path):
    path, _ = model
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:-100])                 # the last tensor (Q4_K) loses its tail
    with pytest.raises(GGUFFileError) as e:
        load_gguf(cut)
    msg = str(e.value)
    assert "truncated" in msg and "single_blocks.0.linear1.weight" in msg and "Q4_K" in msg
    assert isinstance(e.value, FileFormatError) and isinstance(e.value, DisTorchError)


def test_truncated_header(model, tmp_path):
    path, _ = model
    cut = tmp_path / "head.gguf"
    cut.write_bytes(path.read_bytes()[:60])
    with pytest.raises(GGUFFileError, match="corrupt or truncated GGUF header"):
        load_gguf(cut)


def test_bad_magic(model, tmp_path):
    path, _ = model
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + path.read_bytes()[4:])
    with pytest.raises(GGUFFileError, match="not a GGUF file"):
        load_gguf(bad)


def _type_field_offset(data: bytes, name: str) -> int:
    i = data.index(name.encode()) + len(name)
    (nd,) = struct.unpack_from("<I", data, i)
    return i + 4 + 8 * nd


def test_corrupt_type_id_names_tensor(model, tmp_path):
    path, _ = model
    data = bytearray(path.read_bytes())
    off = _type_field_offset(bytes(data), P + "double_blocks.0.img_attn.proj.weight")
    assert struct.unpack_from("<I", data, off)[0] == int(QT.Q4_0)
    struct.pack_into("<I", data, off, 77)
    bad = tmp_path / "typeid.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(GGUFFileError, match=r"'model.diffusion_model.double_blocks.0.img_attn.proj.weight'.*type id 77"):
        load_gguf(bad)


def test_unsupported_types_named(tmp_path):
    def extra(w, expect):
        rng = np.random.default_rng(1)
        w.add_tensor(P + "ternary.weight", gguf.quants.quantize(rng.standard_normal((2, 256)).astype(np.float32),
                                                                QT.TQ1_0), raw_dtype=QT.TQ1_0)
        w.add_tensor(P + "iq2.weight", rng.integers(0, 256, size=(2, 66), dtype=np.uint8), raw_dtype=QT.IQ2_XXS)

    path = tmp_path / "unsup.gguf"
    write_model(path, extra=extra)
    with pytest.raises(GGUFFileError) as e:
        load_gguf(path)
    msg = str(e.value)
    assert "ternary.weight' (TQ1_0)" in msg and "iq2.weight' (IQ2_XXS)" in msg and "Q4_K" in msg


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="nope.gguf"):
        load_gguf("/nonexistent/nope.gguf")


# --- the tensor type inside modules ---------------------------------------------------------

def test_gguf_parameters_in_modules(model):
    path, expect = model
    sd, _ = load_gguf(path, dtype=torch.float32)      # dequantization target = the model's dtype
    w = sd["double_blocks.0.img_attn.qkv.weight"]                  # (96, 256) Q8_0
    lin = nn.Linear(256, 96)
    lin.load_state_dict({"weight": w, "bias": sd["double_blocks.0.img_attn.qkv.bias"]}, assign=True)
    lin.requires_grad_(False)
    assert isinstance(lin.weight, GGUFTensor) and isinstance(lin.weight, nn.Parameter)
    x = torch.randn(5, 256)
    dense = x @ expect["double_blocks.0.img_attn.qkv.weight"].T + expect["double_blocks.0.img_attn.qkv.bias"]
    # plain nn.Linear: falls back to dequantizing through __torch_dispatch__ (like a dense fp32 weight)
    assert torch.allclose(lin(x), dense, atol=1e-4, rtol=1e-4)
    assert gguf_ops(lin) == 1 and type(lin) is GGUFLinear
    assert torch.allclose(lin(x), dense, atol=1e-4, rtol=1e-4)      # per-call dequant in x's dtype
    # module conversions keep it quantized
    m = nn.Sequential(lin)
    m.to(torch.float16)
    assert isinstance(m[0].weight, GGUFTensor) and m[0].weight.dtype == torch.float16
    assert m[0].weight.qtype == QT.Q8_0 and stored_nbytes(m[0].weight) == 96 * 256 // 32 * 34
    m2 = copy.deepcopy(m)
    assert isinstance(m2[0].weight, GGUFTensor)
    assert m2[0].weight.raw.data_ptr() != m[0].weight.raw.data_ptr()
    assert torch.equal(m2[0].weight.raw, m[0].weight.raw)
    m.to("meta")
    assert m[0].weight.device.type == "meta" and stored_nbytes(m[0].weight) == 96 * 256 // 32 * 34
    # a dense model loading a GGUF state dict without assign gets the dequantized values
    plain = nn.Linear(256, 96)
    plain.load_state_dict({"weight": w, "bias": torch.zeros(96)})
    assert torch.equal(plain.weight.data, expect["double_blocks.0.img_attn.qkv.weight"])


def test_runtime_storage_swap_and_copy(model):
    path, expect = model
    sd, _ = load_gguf(path)
    w = sd["single_blocks.0.linear1.weight"]                        # Q4_K (32, 512)
    slot = torch.zeros(w.stored_nbytes + 64, dtype=torch.uint8)     # a "GPU slot" with other data
    view = slot[16:16 + w.stored_nbytes]
    view.copy_(w.raw)
    w2 = w.with_raw(view)
    assert w2.raw.data_ptr() == view.data_ptr()                     # no copy
    assert torch.equal(w2.dequantize(torch.float32), expect["single_blocks.0.linear1.weight"])
    with pytest.raises(GGUFError, match="needs 9216 uint8 bytes"):
        w.with_raw(slot)
    e = torch.empty_like(w)
    assert isinstance(e, GGUFTensor) and e.stored_nbytes == w.stored_nbytes
    e.copy_(w)
    assert torch.equal(e.raw, w.raw)
    with pytest.raises(GGUFError, match="does not quantize"):
        e.copy_(torch.zeros(32, 512))
    dense = materialize(w, torch.device("cpu"), torch.float32)
    assert torch.equal(dense, expect["single_blocks.0.linear1.weight"])


def test_gguf_tensor_rejects_bad_construction():
    with pytest.raises(GGUFError, match=r"'t'.*Q8_0.*not a multiple of the Q8_0 block size 32"):
        GGUFTensor(torch.zeros(34, dtype=torch.uint8), QT.Q8_0, (1, 33), name="t")
    with pytest.raises(GGUFError, match="needs 34 bytes, got 33"):
        GGUFTensor(torch.zeros(33, dtype=torch.uint8), QT.Q8_0, (1, 32), name="t")
    with pytest.raises(GGUFError, match="TQ2_0 is not supported"):
        GGUFTensor(torch.zeros(66, dtype=torch.uint8), QT.TQ2_0, (256,), name="t")
