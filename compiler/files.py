"""Plan from a weights file without reading its weight bytes.

`read_header(path)` lists the tensors of a .safetensors or .gguf file from its header only (a few
KB-MB at the start of the file, whatever the file size); `graph_from_tensors(infos, source)` groups
tensor names into transfer units by key structure and orders them like the forward pass of the
known architectures; `graph_from_file(path_or_builtin)` does both, or uses a built-in shape
(`compiler.shapes`).
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from ..errors import DisTorchError, FileFormatError
from .graph import ModuleGraph, Unit

SAFETENSORS_EXTS = (".safetensors", ".sft")
GGUF_EXTS = (".gguf",)
SUPPORTED_EXTS = SAFETENSORS_EXTS + GGUF_EXTS


@dataclass(frozen=True)
class TensorInfo:
    name: str                 # key as stored in the file
    shape: tuple              # torch order (outermost first); GGUF dims are reversed to match
    dtype_str: str            # "BF16", "F16", "F32", "F8_E4M3" (safetensors) / "Q8_0", "F16" (GGUF)
    nbytes: int               # bytes as stored (quantized size for GGUF)
    offset: int = 0           # absolute byte offset of the data in the file (0 for built-in shapes)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


# --- safetensors ------------------------------------------------------------------------------
# bits per element (sub-byte types are packed)
_ST_BITS = {
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8,
    "U64": 64, "U32": 32, "U16": 16, "U8": 8, "BOOL": 8, "C64": 64,
    "F8_E4M3": 8, "F8_E5M2": 8, "F8_E8M0": 8, "F6_E2M3": 6, "F6_E3M2": 6, "F4": 4,
}
_ST_MAX_HEADER = 100 * 1000 * 1000  # the safetensors format caps its header at 100 MB


def _read_safetensors(path: str) -> list[TensorInfo]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(f"{path}: truncated safetensors file ({size} bytes; a valid file starts "
                                  f"with an 8-byte header length)")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise FileFormatError(f"{path}: safetensors header length {n} runs past the end of the file "
                                  f"({size} bytes): the file is truncated or not a safetensors file")
        if n > _ST_MAX_HEADER:
            raise FileFormatError(f"{path}: safetensors header length {n} exceeds the format's 100 MB limit")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: safetensors header is not a JSON object")
    base = 8 + n
    data_len = size - base
    infos: list[TensorInfo] = []
    spans = []
    for name, ent in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(ent["dtype"])
            shape = tuple(int(d) for d in ent["shape"])
            b, e = (int(x) for x in ent["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FileFormatError(f"{path}: tensor {name!r} has a malformed header entry {ent!r} "
                                  f"(needs dtype, shape, data_offsets)") from None
        if b < 0 or e < b or any(d < 0 for d in shape):
            raise FileFormatError(f"{path}: tensor {name!r} has invalid data_offsets [{b}, {e}] or shape {shape}")
        if e > data_len:
            raise FileFormatError(f"{path}: tensor {name!r} data [{b}, {e}) lies beyond the end of the file "
                                  f"(data section holds {data_len} bytes): the file is truncated")
        bits = _ST_BITS.get(dtype)
        if bits is not None:
            want = (math.prod(shape) * bits + 7) // 8
            if want != e - b:
                raise FileFormatError(f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) needs {want} bytes "
                                      f"but its data_offsets span {e - b}")
        infos.append(TensorInfo(name, shape, dtype, e - b, base + b))
        spans.append((b, e, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FileFormatError(f"{path}: tensor {n1!r} data [{b1}, {e1}) overlaps tensor {n0!r} [{b0}, {e0})")
    return infos


# --- gguf -------------------------------------------------------------------------------------
# GGUF metadata value types -> struct format (fixed-size ones)
_GGUF_SCALAR = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Reader:
    def __init__(self, f, path: str, size: int):
        self.f, self.path, self.size = f, path, size

    def read(self, n: int, what: str) -> bytes:
        b = self.f.read(n)
        if len(b) != n:
            raise FileFormatError(f"{self.path}: truncated GGUF header while reading {what} "
                                  f"(file is {self.size} bytes)")
        return b

    def unpack(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.read(struct.calcsize("<" + fmt), what))

    def string(self, what: str) -> str:
        (n,) = self.unpack("Q", what)
        if n > self.size:
            raise FileFormatError(f"{self.path}: corrupt GGUF header: {what} claims a length of {n} bytes")
        return self.read(n, what).decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str):
        if vtype in _GGUF_SCALAR:
            return self.unpack(_GGUF_SCALAR[vtype], what)[0]
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype == _GGUF_ARRAY:
            etype, count = self.unpack("IQ", what)
            if etype in _GGUF_SCALAR:  # skip fixed-size arrays in one read
                sz = struct.calcsize("<" + _GGUF_SCALAR[etype]) * count
                if sz > self.size:
                    raise FileFormatError(f"{self.path}: corrupt GGUF header: array {what} of {count} items")
                self.read(sz, what)
                return None
            if count > self.size:
                raise FileFormatError(f"{self.path}: corrupt GGUF header: array {what} of {count} items")
            for _ in range(count):
                self.value(etype, what)
            return None
        raise FileFormatError(f"{self.path}: corrupt GGUF header: unknown metadata type {vtype} for {what}")


def _ggml_types():
    try:
        import gguf
        return {int(t): (t.name, *gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType
                if t in gguf.GGML_QUANT_SIZES}
    except Exception:  # pragma: no cover - gguf is a dependency; keep the common types working without it
        return {0: ("F32", 1, 4), 1: ("F16", 1, 2), 8: ("Q8_0", 32, 34), 30: ("BF16", 1, 2),
                2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22), 7: ("Q5_1", 32, 24)}


def read_gguf(path: str) -> tuple[list[TensorInfo], dict]:
    """Tensor infos and the scalar/string metadata of a GGUF file (header only)."""
    size = os.path.getsize(path)
    types = _ggml_types()
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        magic = r.read(4, "magic")
        if magic != b"GGUF":
            raise FileFormatError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
        (version,) = r.unpack("I", "version")
        if version not in (2, 3):
            hint = " (a big-endian file? only little-endian GGUF is supported)" if version in (2 << 24, 3 << 24) else ""
            raise FileFormatError(f"{path}: unsupported GGUF version {version} (supported: 2, 3){hint}")
        n_tensors, n_kv = r.unpack("QQ", "tensor/metadata counts")
        if n_tensors > size or n_kv > size:
            raise FileFormatError(f"{path}: corrupt GGUF header: {n_tensors} tensors, {n_kv} metadata entries")
        meta: dict = {}
        for _ in range(n_kv):
            key = r.string("metadata key")
            (vtype,) = r.unpack("I", f"type of {key}")
            v = r.value(vtype, key)
            if v is not None:
                meta[key] = v
        raw = []
        for _ in range(n_tensors):
            name = r.string("tensor name")
            (nd,) = r.unpack("I", f"dims of {name}")
            if nd > 8:
                raise FileFormatError(f"{path}: corrupt GGUF header: tensor {name!r} has {nd} dimensions")
            dims = r.unpack("Q" * nd, f"shape of {name}") if nd else ()
            ttype, off = r.unpack("IQ", f"type/offset of {name}")
            raw.append((name, dims, ttype, off))
        pos = f.tell()
    align = int(meta.get("general.alignment", 32)) or 32
    data_start = (pos + align - 1) // align * align
    infos, spans = [], []
    for name, dims, ttype, off in raw:
        if ttype not in types:
            raise FileFormatError(f"{path}: tensor {name!r} has unknown GGML type {ttype}")
        tname, block, tsize = types[ttype]
        numel = math.prod(dims)
        if dims and dims[0] % block:
            raise FileFormatError(f"{path}: tensor {name!r} ({tname}) row length {dims[0]} is not a multiple "
                                  f"of its block size {block}")
        nbytes = numel // block * tsize
        start = data_start + off
        if start + nbytes > size:
            raise FileFormatError(f"{path}: tensor {name!r} data [{start}, {start + nbytes}) lies beyond the end "
                                  f"of the file ({size} bytes): the file is truncated")
        infos.append(TensorInfo(name, tuple(int(d) for d in reversed(dims)), tname, nbytes, start))
        spans.append((start, start + nbytes, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0:
            raise FileFormatError(f"{path}: tensor {n1!r} data [{b1}, {e1}) overlaps tensor {n0!r} [{b0}, {e0})")
    return infos, meta


def read_header(path) -> list[TensorInfo]:
    """List the tensors of a .safetensors / .gguf file from its header; no weight bytes are read."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DisTorchError(f"weights file {path!r} does not exist (or is not a file)")
    low = path.lower()
    if low.endswith(SAFETENSORS_EXTS):
        return _read_safetensors(path)
    if low.endswith(GGUF_EXTS):
        return read_gguf(path)[0]
    raise DisTorchError(f"{path!r}: unsupported weights file type; supported extensions: {', '.join(SUPPORTED_EXTS)}")


# --- grouping keys into units -----------------------------------------------------------------
# Prefixes of the diffusion model inside single-file checkpoints, longest first.
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.", "unet.")

# Families that are ONE unit although their children are numbered (a block of its own).
NOINDEX_FAMILIES = ("middle_block", "mid_block")

# Forward order of known families. Lower runs earlier. Block lists sit between 100 and 199.
FAMILY_RANK: dict[str, float] = {}
for _rank, _names in [
    # inputs / embedders
    (0, ["img_in", "x_embedder", "patch_embedding", "patch_embed", "pos_embed", "conv_in"]),
    (1, ["time_in", "time_embed", "time_embedding", "time_proj", "time_text_embed", "t_embedder",
         "condition_embedder"]),
    (2, ["guidance_in", "label_emb", "add_embedding", "y_embedder", "time_projection",
         "distilled_guidance_layer"]),
    (3, ["vector_in", "text_embedding", "img_emb"]),
    (4, ["txt_in", "context_embedder", "encoder_hid_proj"]),
    # block lists
    (50, ["noise_refiner", "context_refiner"]),
    (100, ["double_blocks", "input_blocks", "down_blocks", "joint_blocks", "transformer_blocks", "blocks",
           "double_stream_blocks", "double_layers",
           "layers"]),
    (110, ["middle_block", "mid_block"]),
    (120, ["single_blocks", "output_blocks", "up_blocks", "single_transformer_blocks", "single_stream_blocks",
           "single_layers"]),
    # outputs
    (200, ["final_layer", "norm_out", "conv_norm_out", "out", "head", "final_norm"]),
    (201, ["proj_out", "conv_out", "scale_shift_table"]),
]:
    for _n in _names:
        FAMILY_RANK[_n] = _rank

# Families whose numbered children are always blocks (one unit each).
BLOCK_FAMILIES = frozenset(n for n, r in FAMILY_RANK.items() if 100 <= r < 200) - set(NOINDEX_FAMILIES)


def strip_prefix(key: str) -> tuple[str, str]:
    """(prefix, rest) with the known diffusion-model prefix removed (prefix '' when none)."""
    for p in PREFIXES:
        if key.startswith(p):
            return p, key[len(p):]
    return "", key


def _group(keys_stripped: list[str]) -> dict[str, tuple[str, str, str]]:
    """stripped key -> (unit name, family, kind)."""
    # members of indexed families: family -> {index: max key depth}
    members: dict[str, dict[str, int]] = {}
    for k in keys_stripped:
        c = k.split(".")
        if len(c) >= 3 and c[1].isdigit() and c[0] not in NOINDEX_FAMILIES:
            m = members.setdefault(c[0], {})
            m[c[1]] = max(m.get(c[1], 0), len(c))
    blocky = {fam for fam, m in members.items()
              if fam in BLOCK_FAMILIES or (len(m) >= 2 and max(m.values()) > 3)}
    out = {}
    for k in keys_stripped:
        c = k.split(".")
        fam = c[0]
        if len(c) == 1:
            out[k] = (k, k, "root")  # a bare parameter of the model itself (e.g. a top-level `pos_embed`)
        elif fam in NOINDEX_FAMILIES:
            out[k] = (fam, fam, "block")
        elif fam in blocky and len(c) >= 3 and c[1].isdigit():
            out[k] = (f"{fam}.{c[1]}", fam, "block")
        else:
            out[k] = (fam, fam, "leaf")
    return out


def graph_from_tensors(infos, source: str = "", *, keep_other: bool = False) -> ModuleGraph:
    """Group tensors into units by key structure, in the forward order of the known architectures.

    Keys are stripped of a known prefix (model.diffusion_model., diffusion_model., transformer., unet.);
    a unit is `<family>.<int>` for block lists (double_blocks.7, input_blocks.4, blocks.30 ...),
    `middle_block` / `mid_block` as one unit, else the first key component (img_in, final_layer ...).
    Order: known families in forward order (FAMILY_RANK), numeric index inside a family; an unknown
    list of blocks runs among the blocks (after the known ones of its rank; "single..." lists with the
    single blocks); other unknown families keep first-appearance order, each right after the known
    family that appeared before it.
    Unit.tensors keep the keys as stored. When some keys carry a diffusion-model prefix and others do
    not (a full checkpoint with VAE / text encoders), the others are left out unless keep_other=True;
    `graph.excluded` lists them and `graph.excluded_bytes` counts them.
    Bare top-level tensors (a key without a dot) go to one unit named ROOT ("<root>", kind "root").
    """
    from .graph import ROOT
    infos = list(infos)
    stripped = [(strip_prefix(i.name), i) for i in infos]
    has_prefix = any(p for (p, _), _ in stripped)
    excluded = []
    kept = []
    for (p, rest), i in stripped:
        if has_prefix and not p and not keep_other:
            excluded.append(i)
        else:
            kept.append((rest, i))
    groups = _group([rest for rest, _ in kept])
    units: dict[str, Unit] = {}
    fam_first: dict[str, int] = {}
    unit_fam: dict[str, str] = {}
    for rest, i in kept:
        uname, fam, kind = groups[rest]
        if kind == "root":
            uname, fam = ROOT, ROOT
        u = units.get(uname)
        if u is None:
            u = units[uname] = Unit(name=uname, type=fam, kind=kind)
            unit_fam[uname] = fam
            fam_first.setdefault(fam, len(fam_first))
        u.param_bytes += int(i.nbytes)
        u.params += int(i.numel)
        u.tensors.append(i.name)
    # family order: known ranks; unknown families keep first-appearance order, right after the known
    # family that appeared before them (or first, when none did)
    fams = sorted(fam_first, key=fam_first.get)
    block_fams = {unit_fam[u.name] for u in units.values() if u.kind == "block"}
    fam_key: dict[str, tuple] = {ROOT: (-1.0, 0)}
    last_rank = -0.5
    for n, fam in enumerate(fams):
        if fam == ROOT:
            continue
        if fam in FAMILY_RANK:
            last_rank = FAMILY_RANK[fam]
            fam_key[fam] = (last_rank, n)
        elif fam in block_fams:  # an unknown list of blocks runs among the blocks ("single..." ones last)
            fam_key[fam] = (120 if "single" in fam else 110 if "mid" in fam else 100, n)
        else:
            fam_key[fam] = (last_rank + 0.5, n)

    def ukey(name):
        fam = unit_fam[name]
        idx = name[len(fam) + 1:]
        return fam_key[fam] + ((int(idx) if idx.isdigit() else -1),)

    ordered = sorted(units.values(), key=lambda u: ukey(u.name))
    g = ModuleGraph(ordered, source=source)
    g.excluded = [i.name for i in excluded]
    g.excluded_bytes = sum(int(i.nbytes) for i in excluded)
    g.shared = {}
    return g


def graph_from_file(path_or_builtin) -> ModuleGraph:
    """ModuleGraph of a .safetensors / .gguf file (header only) or of a built-in shape ('flux-dev' ...)."""
    from . import shapes
    name = os.fspath(path_or_builtin) if not isinstance(path_or_builtin, str) else path_or_builtin
    if name in shapes.BUILTINS:
        return graph_from_tensors(shapes.builtin_infos(name), source=f"builtin:{name}")
    if os.path.isfile(name) and name.lower().endswith(SUPPORTED_EXTS):
        return graph_from_tensors(read_header(name), source=name)
    why = "does not exist" if not os.path.exists(name) else "is not a supported weights file"
    raise DisTorchError(f"{name!r} {why}: give a path to a {' / '.join(SUPPORTED_EXTS)} file or one of the "
                        f"built-in shapes: {', '.join(shapes.BUILTINS)}")
