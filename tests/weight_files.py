"""The weight files and helpers the file-reading tests share (tests/test_files.py, test_files_grouping.py,
test_files_crafted.py): a small safetensors file and a small GGUF file written with their own libraries
(fixtures st_file, gguf_file), and names(), a graph's unit names in order.  Importing it skips the importing
test file where the gguf package is missing."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType


def names(g):
    return [u.name for u in g]


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
