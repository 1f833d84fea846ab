"""Plan from a weights file without reading its weight bytes.

`read_header(path)` lists the tensors of a .safetensors or .gguf file from its header only (a few
KB-MB at the start of the file, whatever the file size); `graph_from_tensors(infos, source)` groups
tensor names into transfer units by key structure and orders them like the forward pass of the
known architectures; `graph_from_file(path_or_builtin)` does both, or uses a built-in shape
(`compiler.shapes`).  Units record the bf16/fp16 tensors the runtime could stream compressed
(`Unit.codec`, `codable_info`), their packed size estimated as CODEC_RATIO of their bytes (no values read).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from ..errors import DisTorchError
from ..formats.gguf_reader import read_gguf_header
from ..formats.safetensors import read_safetensors_header
from ..formats.tensor_info import TensorInfo
from . import shapes
from .graph import CODEC_MAX_NUMEL, CODEC_MIN_NUMEL, ROOT, ModuleGraph, Unit, add_codec_fact, codec_default_bytes

if TYPE_CHECKING:
    from typing import Iterable

SAFETENSORS_EXTS = (".safetensors", ".sft")
GGUF_EXTS = (".gguf",)
SUPPORTED_EXTS = SAFETENSORS_EXTS + GGUF_EXTS


def read_header(path: str | os.PathLike[str]) -> list[TensorInfo]:
    """List the tensors of a .safetensors / .gguf file from its header; no weight bytes are read
    (formats/safetensors.py, formats/gguf_reader.py: the same parsers the loaders use)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DisTorchError(f"weights file {path!r} does not exist (or is not a file)")
    low = path.lower()
    if low.endswith(SAFETENSORS_EXTS):
        return read_safetensors_header(path)
    if low.endswith(GGUF_EXTS):
        return _loadable_gguf(path, read_gguf_header(path).infos)
    raise DisTorchError(f"{path!r}: unsupported weights file type; supported extensions: {', '.join(SUPPORTED_EXTS)}")


def _loadable_gguf(path: str, infos: list[TensorInfo]) -> list[TensorInfo]:
    """The infos of a .gguf file the loader (formats/gguf_loader.load_gguf) accepts: a tensor type the
    dequantizer lacks (IQ2_XXS, TQ1_0, ...) is refused here too, so a plan is never made for a file that
    cannot load."""
    from ..errors import GGUFFileError
    from ..formats.dequant import SUPPORTED_TYPES, supported_names
    ok = {t.name for t in SUPPORTED_TYPES}
    bad = [(i.name, i.dtype_str) for i in infos if i.dtype_str not in ok]
    if bad:
        listed = ", ".join(f"{n!r} ({q})" for n, q in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise GGUFFileError(f"{path}: unsupported tensor type: {listed}{more}; DisTorch reads "
                            f"{supported_names()} (re-quantize the model to one of these)")
    return infos


_CODED_DTYPES = {"BF16": "bfloat16", "F16": "float16"}   # header dtype -> codec dtype (safetensors and GGUF
#                                                          spell them alike; GGUF F16/BF16 load as plain tensors)


def codable_info(info: TensorInfo) -> str | None:
    """The codec dtype ("bfloat16" | "float16") of a header's tensor the runtime could stream compressed
    (formats.bf16_encode.codable, from its dtype and size alone), else None."""
    name = _CODED_DTYPES.get(str(info.dtype_str).upper())
    if name is None or not CODEC_MIN_NUMEL <= info.numel <= CODEC_MAX_NUMEL:
        return None
    return name


def _count(u: Unit, i: TensorInfo) -> None:
    u.param_bytes += int(i.nbytes)
    u.params += int(i.numel)
    u.tensors.append(i.name)
    coded = codable_info(i)
    if coded is not None:
        add_codec_fact(u, int(i.nbytes), codec_default_bytes(int(i.nbytes), coded))


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


def graph_from_tensors(infos: Iterable[TensorInfo], source: str = "", *, keep_other: bool = False) -> ModuleGraph:
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
        _count(u, i)
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


def leaf_graph_from_tensors(infos: Iterable[TensorInfo], source: str = "") -> ModuleGraph:
    """The layers inside the block units of graph_from_tensors(infos): one unit per module path (a key
    less its last component, prefix stripped: double_blocks.7.img_attn.qkv) in first-appearance order,
    kind "leaf"; tensors a block owns directly and everything outside blocks are left out.  The leaf
    graph passes/granularity.py splits blocks with when there is no live module to trace."""
    infos = list(infos)
    stripped = [(strip_prefix(i.name), i) for i in infos]
    has_prefix = any(p for (p, _), _ in stripped)
    kept = [(rest, i) for (p, rest), i in stripped if p or not has_prefix]
    groups = _group([rest for rest, _ in kept])
    units: dict[str, Unit] = {}
    for rest, i in kept:
        uname, fam, kind = groups[rest]
        mod = rest.rsplit(".", 1)[0]
        if kind != "block" or mod == uname or not mod.startswith(uname + "."):
            continue
        u = units.get(mod)
        if u is None:      # type: the block family, so tables count "double_blocks layer x120"
            u = units[mod] = Unit(name=mod, type=f"{fam} layer", kind="leaf")
        _count(u, i)
    g = ModuleGraph(list(units.values()), source=source)
    g.shared = {}
    return g


def leaf_graph_from_file(path_or_builtin: str | os.PathLike[str]) -> ModuleGraph:
    """leaf_graph_from_tensors of a weights file's header or of a built-in shape (as graph_from_file)."""
    name = os.fspath(path_or_builtin)
    if name in shapes.BUILTINS:
        return leaf_graph_from_tensors(shapes.builtin_infos(name), source=f"builtin:{name}")
    return leaf_graph_from_tensors(read_header(name), source=name)


def graph_from_file(path_or_builtin: str | os.PathLike[str]) -> ModuleGraph:
    """ModuleGraph of a .safetensors / .gguf file (header only) or of a built-in shape ('flux-dev' ...)."""
    name = os.fspath(path_or_builtin) if not isinstance(path_or_builtin, str) else path_or_builtin
    if name in shapes.BUILTINS:
        return graph_from_tensors(shapes.builtin_infos(name), source=f"builtin:{name}")
    if os.path.isfile(name) and name.lower().endswith(SUPPORTED_EXTS):
        return graph_from_tensors(read_header(name), source=name)
    why = "does not exist" if not os.path.exists(name) else "is not a supported weights file"
    raise DisTorchError(f"{name!r} {why}: give a path to a {' / '.join(SUPPORTED_EXTS)} file or one of the "
                        f"built-in shapes: {', '.join(shapes.BUILTINS)}")
