"""Map a GGUF text encoder's llama.cpp tensor names back to the original Hugging Face names.

Why: text encoders converted with llama.cpp's tools store their tensors under llama.cpp names
(`enc.blk.0.attn_q.weight`, `blk.0.ffn_up.weight`, `token_embd.weight`, ...), while ComfyUI's
text-encoder modules load the original names (`encoder.block.0.layer.0.SelfAttention.q.weight`,
`model.layers.0.mlp.up_proj.weight`, `shared.weight`, ...).  `to_original_names` renames a state dict
from `formats.gguf_loader.load_gguf(path, prefix=None)` and undoes the value changes the converter
made, so the result loads like the original checkpoint.  Quantized tensors stay quantized.

    is_llama_cpp_named(sd) -> bool
    to_original_names(sd, meta, *, drop_lm_head=None) -> (new_sd, info)

How the names are found: no big table here.  For the file's architecture a short list of original
name templates (per family, `{bid}` = block number) is expanded for block 0 and each candidate is
given to the `gguf` package's own `TensorNameMap.get_name`; the answers, inverted, are the map.  A
block tensor (`blk.N.`) is looked up as block 0 and N is put back into the original name, so the work
does not grow with the block numbers a file claims.  Where two originals give one GGUF name (T5's `wi`, v1.0, and `wi_1`, v1.1 gated, both
become `ffn_up`) the choice is made from the file: `wi_1` when the block has `ffn_gate` (`wi_0`),
`wi` otherwise.

Supported `general.architecture` values (those the installed gguf package knows):
  - "t5", "t5encoder": T5 / T5 v1.1 / UMT5 encoders (llama.cpp writes UMT5 as these too).  Decoder
    tensors (`dec.*`) and the LM head (`output.weight`) are not part of an encoder and are dropped.
  - "llama" (also Mistral-style models written as llama): the converter permuted the rows of the Q and
    K projections (weights and biases) for its rotary layout, with n_head = `llama.attention.head_count`
    for Q and n_head_kv = `llama.attention.head_count_kv` for K (head_count when absent, as llama.cpp
    reads it).  That permutation is undone exactly; for a quantized weight it moves whole rows of
    quantization blocks (no dequantization).
  - "qwen2", "qwen2vl" (Qwen2 / Qwen2-VL / Qwen2.5-VL text model), "qwen3": renamed only; llama.cpp's
    converter for these does not permute Q/K (their classes do not apply the llama permutation).
  - "gemma", "gemma2", "gemma3": renamed, no Q/K permutation; the converter stored every `*norm.weight`
    as weight + 1 (Gemma's RMSNorm multiplies by 1 + weight, llama.cpp's by weight), so 1 is
    subtracted again (in float32, then the tensor's own dtype).
  For the decoder-only families `output.weight` becomes `lm_head.weight` (kept unless
  drop_lm_head=True); `rope_freqs.weight` / `blk.N.attn_rot_embd`, which the converter computes and
  no original checkpoint holds, are dropped.

A state dict with no llama.cpp-style key is returned unchanged.  Problems raise `GGUFNameError` (a
DisTorchError) naming the tensor, the architecture and what is supported.
"""
from __future__ import annotations

import functools
import logging
import re
from typing import Any, Mapping

import gguf
import torch

from ..errors import GGUFNameError
from .gguf_tensor import GGUFTensor

__all__ = ["GGUFNameError", "is_llama_cpp_named", "to_original_names", "supported_architectures",
           "LLAMA_CPP_PREFIXES"]

log = logging.getLogger("distorch.formats.gguf_names")

LLAMA_CPP_PREFIXES = ("enc.blk.", "dec.blk.", "blk.", "token_embd.", "output_norm.", "enc.output_norm.")


# ------------------------------------------------------------------------------------------------
# original-name templates per family ({bid}: block number; suffixes .weight / .bias are added)

def _expand(*parts: str) -> list[str]:
    """'a.{x|y}.b' -> ['a.x.b', 'a.y.b'] (one alternation group per part is enough here)."""
    out = []
    for p in parts:
        m = re.search(r"\{([^{}]*\|[^{}]*)\}", p)
        if m is None:
            out.append(p)
        else:
            out.extend(p[:m.start()] + alt + p[m.end():] for alt in m.group(1).split("|"))
    return out


_T5_TEMPLATES = _expand(
    "shared", "lm_head", "encoder.final_layer_norm", "decoder.final_layer_norm",
    "encoder.block.{bid}.layer.0.layer_norm",
    "encoder.block.{bid}.layer.0.SelfAttention.{q|k|v|o|relative_attention_bias}",
    "encoder.block.{bid}.layer.1.layer_norm",
    "encoder.block.{bid}.layer.1.DenseReluDense.{wi|wi_0|wi_1|wo}",
    "decoder.block.{bid}.layer.0.layer_norm",
    "decoder.block.{bid}.layer.0.SelfAttention.{q|k|v|o|relative_attention_bias}",
    "decoder.block.{bid}.layer.1.layer_norm",
    "decoder.block.{bid}.layer.1.EncDecAttention.{q|k|v|o|relative_attention_bias}",
    "decoder.block.{bid}.layer.2.layer_norm",
    "decoder.block.{bid}.layer.2.DenseReluDense.{wi|wi_0|wi_1|wo}",
)

_LLM_TEMPLATES = _expand(
    "model.embed_tokens", "model.norm", "lm_head",
    "model.layers.{bid}.{input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
    "|post_feedforward_layernorm}",
    "model.layers.{bid}.self_attn.{q_proj|k_proj|v_proj|o_proj|q_norm|k_norm}",
    "model.layers.{bid}.mlp.{gate_proj|up_proj|down_proj}",
)


class _Family:
    def __init__(self, name, templates, *, permute_qk=False, norm_shift=0.0, encoder=False,
                 converter_only=()):
        self.name = name
        self.templates = templates
        self.permute_qk = permute_qk      # llama.cpp permuted Q/K rows for rotary layout
        self.norm_shift = norm_shift      # llama.cpp stored norm weights + this
        self.encoder = encoder            # drop decoder + LM head
        self.converter_only = converter_only  # GGUF names with no original tensor: dropped


_T5 = dict(templates=_T5_TEMPLATES, encoder=True)
_LLM_ONLY = (re.compile(r"^rope_freqs\.weight$"), re.compile(r"^blk\.\d+\.attn_rot_embd(\.weight)?$"))

# general.architecture -> (MODEL_ARCH member name, family)
_ARCHS: dict[str, tuple[str, _Family]] = {
    "t5": ("T5", _Family("t5", **_T5)),
    "t5encoder": ("T5ENCODER", _Family("t5", **_T5)),
    "llama": ("LLAMA", _Family("llama", _LLM_TEMPLATES, permute_qk=True, converter_only=_LLM_ONLY)),
    "qwen2": ("QWEN2", _Family("qwen2", _LLM_TEMPLATES, converter_only=_LLM_ONLY)),
    "qwen2vl": ("QWEN2VL", _Family("qwen2", _LLM_TEMPLATES, converter_only=_LLM_ONLY)),
    "qwen3": ("QWEN3", _Family("qwen3", _LLM_TEMPLATES, converter_only=_LLM_ONLY)),
    "gemma": ("GEMMA", _Family("gemma", _LLM_TEMPLATES, norm_shift=1.0, converter_only=_LLM_ONLY)),
    "gemma2": ("GEMMA2", _Family("gemma", _LLM_TEMPLATES, norm_shift=1.0, converter_only=_LLM_ONLY)),
    "gemma3": ("GEMMA3", _Family("gemma", _LLM_TEMPLATES, norm_shift=1.0, converter_only=_LLM_ONLY)),
}


def supported_architectures() -> list[str]:
    """general.architecture values this module maps (those the installed gguf package knows)."""
    return [a for a, (member, _) in _ARCHS.items() if hasattr(gguf.MODEL_ARCH, member)]


@functools.lru_cache(maxsize=32)
def _reverse_map(arch: str) -> dict[str, tuple[str, ...]]:
    """{GGUF name: original name templates ({bid}: block number)}, template order, from gguf's
    TensorNameMap for ONE block: block tensors are looked up with their number replaced by 0
    (`_candidates`), so the map's size never depends on the block numbers a file claims."""
    member, fam = _ARCHS[arch]
    nmap = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, member), 1)
    rev: dict[str, list[str]] = {}
    for tmpl in fam.templates:
        for suffix in (".weight", ".bias"):
            name = nmap.get_name(tmpl.format(bid=0) + suffix, try_suffixes=(".weight", ".bias"))
            if name is not None:
                lst = rev.setdefault(name, [])
                if tmpl + suffix not in lst:
                    lst.append(tmpl + suffix)
    return {k: tuple(v) for k, v in rev.items()}


# ------------------------------------------------------------------------------------------------

def is_llama_cpp_named(sd: Mapping[str, Any]) -> bool:
    """True when some key uses a llama.cpp tensor name prefix (enc.blk., blk., token_embd., ...)."""
    return any(k.startswith(LLAMA_CPP_PREFIXES) for k in sd)


_BLK = re.compile(r"(?:^|\.)blk\.([0-9]+)\.")


def _n_blocks(keys) -> int:
    n = 0
    for k in keys:
        m = _BLK.search(k)
        if m:
            n = max(n, int(m.group(1)) + 1)
    return n


def _block_of(name: str) -> int | None:
    m = _BLK.search(name)
    return int(m.group(1)) if m else None


def _candidates(rev: dict, gname: str) -> tuple[str, ...] | None:
    """Original names GGUF name `gname` may stand for (its block number put into the templates)."""
    m = _BLK.search(gname)
    if m is None:
        return rev.get(gname)
    tmpls = rev.get(gname[:m.start(1)] + "0" + gname[m.end(1):])
    return None if tmpls is None else tuple(t.format(bid=int(m.group(1))) for t in tmpls)


def _resolve(gname: str, cands: tuple[str, ...], sd: Mapping[str, Any], arch: str) -> str:
    if len(cands) == 1:
        return cands[0]
    # T5 ffn_up: wi (v1.0) or wi_1 (v1.1 gated, with ffn_gate = wi_0 beside it)
    m = re.search(r"\.ffn_up\.(weight|bias)$", gname)
    if m and any(".wi_1." in c for c in cands):
        gated = gname[:m.start()] + ".ffn_gate.weight" in sd
        want = (".wi_1." if gated else ".wi.") + m.group(1)
        for c in cands:
            if c.endswith(want):
                return c
    raise GGUFNameError(f"GGUF tensor {gname!r} ({arch}) maps to several original names {list(cands)} "
                        f"and nothing in the file decides between them")


def _head_count(meta_kv: Mapping[str, Any], arch: str, kv: bool, block: int | None, tname: str) -> int:
    key = f"{arch}.attention.head_count" + ("_kv" if kv else "")
    v = meta_kv.get(key)
    if v is None and kv:
        key_q = f"{arch}.attention.head_count"
        v = meta_kv.get(key_q)           # llama.cpp: n_head_kv defaults to n_head
        if v is None:
            raise GGUFNameError(f"GGUF tensor {tname!r} ({arch}): metadata {key!r} (and {key_q!r}) missing; "
                                f"the head count is needed to undo llama.cpp's Q/K row permutation")
    if v is None:
        raise GGUFNameError(f"GGUF tensor {tname!r} ({arch}): metadata {key!r} missing; the head count is "
                            f"needed to undo llama.cpp's Q/K row permutation")
    if isinstance(v, (list, tuple)):     # per-layer head counts
        if block is None or block >= len(v):
            raise GGUFNameError(f"GGUF tensor {tname!r} ({arch}): metadata {key!r} is a per-layer list of "
                                f"{len(v)} entries, none for block {block}")
        v = v[block]
    n = int(v)
    if n <= 0:
        raise GGUFNameError(f"GGUF tensor {tname!r} ({arch}): metadata {key!r} = {n} is not a head count")
    return n


def _unpermute_rows(n_rows: int, n_head: int, tname: str, arch: str) -> torch.Tensor:
    """Row order that undoes llama.cpp's rotary permutation: new[r] = permuted[idx[r]]."""
    if n_rows % (2 * n_head):
        raise GGUFNameError(f"GGUF tensor {tname!r} ({arch}): {n_rows} rows are not divisible by 2 x "
                            f"{n_head} heads; the head-count metadata does not fit this tensor")
    half = n_rows // n_head // 2
    # the converter: permuted = w.reshape(n, 2, half, ...).swapaxes(1, 2).reshape(...), so
    # permuted viewed as (n, half, 2) holds original (n, 2, half); swap back.
    return torch.arange(n_rows).reshape(n_head, half, 2).transpose(1, 2).reshape(-1)


def _unpermute(t: torch.Tensor, n_head: int, tname: str, arch: str) -> torch.Tensor:
    n_rows = t.shape[0]
    idx = _unpermute_rows(n_rows, n_head, tname, arch)
    if isinstance(t, GGUFTensor):
        if t.stored_shape is not None:
            raise GGUFNameError(f"GGUF tensor {tname!r} ({arch}, {t.qtype.name}) is stored reshaped "
                                f"({list(t.stored_shape)} for {list(t.shape)}); its rows cannot be permuted")
        nbytes = t.raw.numel()
        if nbytes % n_rows:
            raise GGUFNameError(f"GGUF tensor {tname!r} ({arch}, {t.qtype.name}): {nbytes} bytes are not a "
                                f"whole number of rows of {n_rows}")
        rows = t.raw.reshape(n_rows, nbytes // n_rows)
        return t.with_raw(rows[idx.to(rows.device)].reshape(-1))
    return t[idx.to(t.device)].contiguous()


def _unshift_norm(t: torch.Tensor, shift: float, tname: str, arch: str) -> torch.Tensor:
    if isinstance(t, GGUFTensor):
        raise GGUFNameError(f"GGUF norm tensor {tname!r} ({arch}) is quantized ({t.qtype.name}); the "
                            f"converter's +{shift:g} cannot be undone on quantized blocks")
    return (t.float() - shift).to(t.dtype)


def to_original_names(sd: Mapping[str, Any], meta: Mapping[str, Any] | None, *,
                      drop_lm_head: bool | None = None) -> tuple[dict, dict]:
    """Rename a llama.cpp-named GGUF state dict to the original names; see the module docstring.

    `meta` is load_gguf's meta (uses meta["architecture"] and meta["metadata"]).  `drop_lm_head`:
    None = drop for encoders (T5), keep as `lm_head.weight` for decoder-only families.
    Returns (new_sd, info) with info = {"architecture", "family", "n_blocks", "mapped", "dropped"
    [GGUF names], "unpermuted" [original names], "norm_unshifted" [original names], "unchanged"}."""
    meta = meta or {}
    arch = meta.get("architecture")
    if not is_llama_cpp_named(sd):
        return dict(sd), {"architecture": arch, "family": None, "n_blocks": 0, "mapped": 0, "dropped": [],
                          "unpermuted": [], "norm_unshifted": [], "unchanged": True}
    supported = supported_architectures()
    if not isinstance(arch, str) or arch.lower() not in supported:
        raise GGUFNameError(f"GGUF architecture {arch!r} is not supported for llama.cpp tensor names; "
                            f"supported: {', '.join(supported)}")
    arch = arch.lower()
    fam = _ARCHS[arch][1]
    kv = meta.get("metadata") or {}
    if drop_lm_head is None:
        drop_lm_head = fam.encoder
    n_blocks = _n_blocks(sd)
    rev = _reverse_map(arch)

    out: dict[str, Any] = {}
    dropped: list[str] = []
    unpermuted: list[str] = []
    shifted: list[str] = []
    for gname, t in sd.items():
        if fam.encoder and gname.startswith(("dec.", "output.")):
            dropped.append(gname)
            continue
        if any(p.match(gname) for p in fam.converter_only):
            dropped.append(gname)
            continue
        cands = _candidates(rev, gname)
        if cands is None:
            raise GGUFNameError(
                f"GGUF tensor {gname!r} of architecture {arch!r} has no known original name; mapped here: "
                f"the {fam.name} tensors the gguf package names for {arch} "
                f"(e.g. {', '.join(sorted(rev)[:4])}, ...); supported architectures: {', '.join(supported)}")
        name = _resolve(gname, cands, sd, arch)
        if name.startswith("lm_head.") and drop_lm_head:
            dropped.append(gname)
            continue
        if fam.permute_qk and isinstance(t, torch.Tensor) and \
                re.search(r"\.self_attn\.[qk]_proj\.(weight|bias)$", name):
            is_k = ".k_proj." in name
            n = _head_count(kv, arch, is_k, _block_of(gname), gname)
            t = _unpermute(t, n, gname, arch)
            unpermuted.append(name)
        if fam.norm_shift and isinstance(t, torch.Tensor) and name.endswith("norm.weight"):
            t = _unshift_norm(t, fam.norm_shift, gname, arch)
            shifted.append(name)
        if name in out:
            raise GGUFNameError(f"GGUF tensors of architecture {arch!r}: two tensors map to {name!r} "
                                f"(the second is {gname!r})")
        out[name] = t
    if dropped:
        log.info("distorch: GGUF %s text encoder: dropped %d tensor(s) not used by it (%s%s)", arch,
                 len(dropped), ", ".join(dropped[:3]), ", ..." if len(dropped) > 3 else "")
    info = {"architecture": arch, "family": fam.name, "n_blocks": n_blocks, "mapped": len(out),
            "dropped": dropped, "unpermuted": unpermuted, "norm_unshifted": shifted, "unchanged": False}
    return out, info
