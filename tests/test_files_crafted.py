"""Crafted and mutated weight-file headers (issue 12): every bad GGUF or safetensors header gives a clear
FileFormatError naming the file, in bounded time and memory, and random mutations of valid headers give a
result or a DisTorchError, never another exception.  The valid files: tests/weight_files.py."""
import os
import re
import struct

import pytest
import torch

from distorch.compiler.files import read_header
from distorch.errors import DisTorchError, FileFormatError

import weight_files

Q = pytest.importorskip("gguf").GGMLQuantizationType

st_file = weight_files.st_file          # shared fixtures (tests/weight_files.py): pytest finds them here
gguf_file = weight_files.gguf_file


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
