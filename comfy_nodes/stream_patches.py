"""Weight patches (LoRA ...) of STREAMED weights: baked into their homes, with no second host copy.

Why this design
---------------
A streamed weight lives once in host RAM, in its home (runtime/store.py).  ComfyUI's own patching
(ModelPatcher.patch_weight_to_device) keeps `backup[key]`, a copy of the unpatched weight on the offload
device -- for a model whose blocks all carry a LoRA, a second host copy of nearly the whole model.  The
choices were:

(a) bake the patched bytes into the home and, when the unpatched bytes are needed again (unpatch, a
    strength change, a merge node reading the originals), re-read them from the model file they were
    loaded from (page cache, or disk);
(b) keep homes unpatched and apply the patch on the compute device each time a weight streams in: one
    host copy too, but every step pays the LoRA math (ComfyUI's float32 intermediate + stochastic rounding
    over every patched weight), which is what makes ComfyUI's lowvram path 4x slower than ours;
(c) keep the backup as the home and the patched bytes elsewhere: that elsewhere is a second copy.

We use (a): the step stays exactly as fast as with baked weights (the homes hold the patched bytes, the
ring copies them as it copies any weight), and host RAM holds one copy.  The patched bytes are computed on
the compute device (CUDA: the home's bytes go up, ComfyUI's patch math runs there, the result comes back
into the home; CPU compute: the same on the CPU), never as a float32 CPU pass over the model.

Restoring from the file is exact by construction: when a weight is first patched, its file tensor (found
by name and shape in the files its loader read, see `remember_files`) is read back, cast to the weight's
dtype exactly as the loader cast it, and compared with the home's bytes; only a weight whose bytes match
bit for bit gets a file source.  A weight with none (a converted key, a pickled checkpoint, a loader we
cannot see) keeps ComfyUI's host backup, counted in one log line.  Reads and comparisons run in chunks
of CHUNK bytes, so they add no large temporaries; the home is written in place.

    remember_files(obj, paths)      the model files a loader read (the DisTorch2 nodes call this)
    apply_streamed(patcher, keys, device, index) -> handled keys (patch, re-patch or restore in homes)
    restore_streamed(patcher, index)               unpatched bytes back into the homes (before undo)
    original(patcher, key)                          the unpatched weight (for merge nodes), or None
"""
from __future__ import annotations

import collections
import inspect
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator      # ComfyUI's objects are typed Any: it ships no types

import torch

from ..formats.safetensors import read_range, read_safetensors_header
from ..runtime import fill as _fill
from ..runtime.loading import file_dtype
from .comfy_api import comfy, folder_paths, mp
from .resident_patches import patched_weight

log = logging.getLogger("distorch.comfy.stream_patches")

CHUNK = 32 << 20              # bytes per read / compare / restore chunk
_FILES = "_distorch_files"    # model.__dict__: the files its loader read
_SRC = "_distorch_file_backups"   # model.__dict__: key -> FileSource of a streamed weight patched in its home
_LOW = (torch.float16, torch.bfloat16)
_lock = threading.Lock()
_MODEL_EXT = (".safetensors", ".sft")
_FOLDERS = ("diffusion_models", "unet", "checkpoints", "text_encoders", "clip", "vae", "controlnet")


@dataclass(frozen=True)
class FileSource:
    """Where the unpatched bytes of one weight are in a .safetensors file."""
    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype        # the file's dtype (cast to the weight's on read)

    def chunks(self, numel: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(start element, file tensor chunk) pieces of the whole tensor, CHUNK bytes at a time, read into
        one buffer per thread (reused: a fresh buffer per chunk page-faults every read).  A chunk is only
        valid until the next one is read."""
        isz = torch.empty((), dtype=self.dtype).element_size()
        per = max(1, CHUNK // isz)
        buf = _read_buffer()
        with open(self.path, "rb", buffering=0) as f:
            for s in range(0, numel, per):
                n = min(per, numel - s)
                part = buf[:n * isz]
                read_range(f, self.offset + s * isz, part.numpy(), self.path, "weight backup")
                yield s, part.view(self.dtype)

    def matches(self, home: torch.Tensor) -> bool:
        """Whether the file holds `home`'s bytes exactly (cast to its dtype as the loader cast them)."""
        flat = home.reshape(-1)
        for s, part in self.chunks(flat.numel()):
            if not same_bytes(part.to(home.dtype), flat[s:s + part.numel()]):
                return False
        return True

    def read_into(self, home: torch.Tensor) -> None:
        flat = home.view(-1)
        # an inference tensor (made under ComfyUI's inference mode) is written in inference mode, wherever
        # this runs (an unload from a test's teardown runs outside it)
        with torch.no_grad(), torch.inference_mode(home.is_inference() or torch.is_inference_mode_enabled()):
            for s, part in self.chunks(flat.numel()):
                flat[s:s + part.numel()].copy_(part)

    def read(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype)
        self.read_into(out)
        return out


_tls = threading.local()


def _read_buffer() -> torch.Tensor:
    """This thread's CHUNK-byte read buffer (made once per thread)."""
    buf = getattr(_tls, "buf", None)
    if buf is None:
        buf = _tls.buf = torch.empty(CHUNK, dtype=torch.uint8)
    return buf


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality of two contiguous tensors of one dtype and size.  Compared as int64 words where
    the sizes and addresses allow, else bytes: torch.equal on float8 runs at ~0.3 GB/s on a CPU (int64 at
    ~12), and on floats it calls NaN unequal to itself, which would refuse a weight holding a NaN."""
    if a.dtype != b.dtype or a.numel() != b.numel():
        return False
    x, y = a.contiguous().view(-1).view(torch.uint8), b.contiguous().view(-1).view(torch.uint8)
    if x.numel() % 8 == 0 and x.data_ptr() % 8 == 0 and y.data_ptr() % 8 == 0:
        x, y = x.view(torch.int64), y.view(torch.int64)
    return bool(torch.equal(x, y))


# ---------------------------------------------------------------------------------------------- files
def files_of_inputs(kwargs: dict) -> list[str]:
    """Model files named by a loader node's inputs (names resolved in ComfyUI's model folders)."""
    out = []
    for v in kwargs.values():
        if not isinstance(v, str) or not v.lower().endswith(_MODEL_EXT):
            continue
        for folder in _FOLDERS:
            try:
                p = folder_paths.get_full_path(folder, v)
            except Exception:      # folder not registered in this ComfyUI
                p = None
            if p and os.path.isfile(p):
                out.append(p)
                break
    return out


def remember_inputs(obj: Any, loader_inputs: dict) -> None:
    """remember_files(obj, the model files a loader node's inputs name)."""
    remember_files(obj, files_of_inputs(loader_inputs))


def remember_files(obj: Any, paths: Iterable[str]) -> None:
    """Record the files obj's model(s) were loaded from (a MODEL / CLIP / ... or its patcher)."""
    paths = [str(p) for p in paths if str(p).lower().endswith(_MODEL_EXT)]
    if not paths:
        return
    for p in _patchers(obj):
        m = getattr(p, "model", None)
        if m is not None:
            m.__dict__[_FILES] = list(dict.fromkeys(m.__dict__.get(_FILES, []) + paths))


def _patchers(obj):
    seen = []
    for o in (obj, getattr(obj, "patcher", None)):
        if o is not None and hasattr(o, "model") and hasattr(o, "patches") and o not in seen:
            seen.append(o)
    return seen


class _FileIndex:
    """Tensors of the remembered files by every dotted suffix of their names."""

    def __init__(self, paths):
        self.by_suffix: dict[str, list] = {}
        for path in paths:
            try:
                infos = read_safetensors_header(path)
            except Exception as e:      # unreadable now: no file source from it (backups stay in RAM)
                log.warning("DisTorch: cannot read %s for weight backups (%s)", path, e)
                continue
            for i in infos:
                parts = i.name.split(".")
                for k in range(len(parts)):
                    self.by_suffix.setdefault(".".join(parts[k:]), []).append((path, i))

    def candidates(self, key: str):
        parts = key.split(".")
        for k in range(len(parts)):
            hits = self.by_suffix.get(".".join(parts[k:]))
            if hits:
                return hits
        return []


def _source(index: _FileIndex, key: str, home: torch.Tensor) -> FileSource | None:
    if not home.is_contiguous():
        return None
    for path, i in index.candidates(key):
        dt = file_dtype(i.dtype_str)
        if dt is None or tuple(i.shape) != tuple(home.shape):
            continue
        src = FileSource(path, i.offset, i.nbytes, dt)
        if src.matches(home):
            return src
    return None


# ---------------------------------------------------------------------------------------------- patching
def patch_device(device: torch.device | str) -> torch.device:
    """Where the patch math runs: the compute device (tests replace this to check the path)."""
    return torch.device(device)


def _at_home(model, key, index):
    """Bind the op module's streamed parameters to their homes while a convert/set function reads them
    (on CUDA they rest in slots); returns the undo."""
    op = comfy.utils.get_attr(model, key.rsplit(".", 1)[0]) if "." in key else None
    saved = []
    if op is not None:
        for p in op.parameters(recurse=False):
            h = index.get(id(p))
            if h is not None and type(p) in (torch.Tensor, torch.nn.Parameter) and p.data_ptr() != h.data_ptr():
                saved.append((p, p.data))
                p.data = h

    def undo():
        for p, d in saved:
            p.data = d
    return undo


def patchable(model: Any, key: str) -> bool:
    """Whether `key` can be patched in its home: a plain tensor whose op's set function (if any) can hand
    back the stored tensor (return_weight, as ComfyUI's scaled-fp8 ops do)."""
    try:
        w, set_func, _ = mp.get_key_weight(model, key)
    except Exception:
        return False
    if type(w) not in (torch.Tensor, torch.nn.Parameter):
        return False
    if set_func is None:
        return True
    try:
        ps = inspect.signature(set_func).parameters
    except (TypeError, ValueError):
        return False
    return "return_weight" in ps or any(p.kind is p.VAR_KEYWORD for p in ps.values())


def sources(model: Any) -> dict:
    return model.__dict__.setdefault(_SRC, {})


def apply_streamed(patcher: Any, keys: Iterable[str], device: torch.device | str, index: dict,
                   dtype_rule: Callable | None = None) -> set:
    """Write the current patches of the streamed plain-tensor weights among `keys` into their homes:
    patched bytes for a key in patcher.patches, the unpatched ones for a key no longer patched.  Returns
    the keys handled (the caller treats the others, resident or quantized, the usual way).  `dtype_rule`
    (model_options, weight dtype) -> the dtype of the patch math (patcher.lora_dtype; float32 without)."""
    model = patcher.model
    src = sources(model)
    todo = []
    for key in sorted(keys):
        try:
            live, set_func, convert_func = mp.get_key_weight(model, key)
        except Exception:
            continue
        home = index.get(id(live))
        if home is None or type(home) is not torch.Tensor or not patchable(model, key):
            continue
        todo.append((key, home, set_func, convert_func))
    if not todo:
        return set()
    # first patch of a weight: find where its unpatched bytes are (the file, checked bit for bit); the checks
    # run ahead on a thread pool while this thread patches, and a weight is patched once its own check is done
    first = [(k, h) for k, h, _, _ in todo if k not in src and k not in patcher.backup and k in patcher.patches]
    fresh = {k for k, _ in first}         # their homes hold the unpatched bytes now
    kept = 0
    t0 = time.perf_counter()
    t_wait = 0.0
    dev = patch_device(device)
    done = set()
    # as many threads as the homes' fill (runtime.fill.threads: $DISTORCH_FILL_THREADS, default min(8, CPUs))
    ex = ThreadPoolExecutor(max_workers=_fill.threads()) if first else None
    try:
        if first:
            findex = _FileIndex(model.__dict__.get(_FILES, []))
            checks = {k: ex.submit(_source, findex, k, h) for k, h in first}
        with torch.no_grad():
            for key, home, set_func, convert_func in todo:
                if key in fresh:
                    tw = time.perf_counter()
                    s = checks.pop(key).result()
                    t_wait += time.perf_counter() - tw
                    if s is not None:
                        src[key] = s
                    else:       # no file holds these bytes: ComfyUI's backup (a host copy)
                        patcher.backup[key] = _backup(home.clone(), True)
                        kept += home.numel() * home.element_size()
                if key in patcher.patches:
                    if key in src:
                        orig = home if key in fresh else src[key].read(home.shape, home.dtype)
                    elif key in patcher.backup:
                        orig = patcher.backup[key].weight
                    else:
                        orig = home
                    undo = _at_home(model, key, index) if (set_func or convert_func) else None
                    try:
                        out = patched_weight(patcher, key, orig, set_func, convert_func, dev, dtype_rule)
                    finally:
                        if undo:
                            undo()
                    if type(out) is not torch.Tensor and not isinstance(out, torch.nn.Parameter) or \
                            out.shape != home.shape or out.dtype != home.dtype:
                        raise RuntimeError(f"weight {key!r}: the patched weight is a {type(out).__name__} "
                                           f"{getattr(out, 'dtype', '?')} {tuple(getattr(out, 'shape', ()))}, its "
                                           f"home {home.dtype} {tuple(home.shape)}")
                    # into a pinned home the copy back is queued on the stream (in order after the math and
                    # the upload of the same home; freeing `out` is stream-ordered too), so the host goes on
                    # with the next weight's patch math; everything is synchronized below
                    home.copy_(out, non_blocking=out.device.type == "cuda" and home.is_pinned())
                    del out, orig
                else:              # patch removed: the unpatched bytes back into the home
                    if key in src:
                        src.pop(key).read_into(home)
                    elif key in patcher.backup:
                        home.copy_(patcher.backup.pop(key).weight)
                done.add(key)
    finally:
        if ex is not None:
            for f in checks.values():
                f.cancel()
            ex.shutdown(wait=True)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    nsrc = sum(1 for k in done if k in src)
    log.info("DisTorch: %d streamed weights patched in their homes on %s in %.2f s (%d restorable from the model "
             "file, %.2f s waiting for the file checks%s)", len([k for k in done if k in patcher.patches]), dev,
             time.perf_counter() - t0, nsrc, t_wait,
             f"; {len(done) - nsrc} kept as host copies, {kept / 2**30:.2f} GiB" if kept else "")
    return done


_Backup = collections.namedtuple("Dimension", ["weight", "inplace_update"])     # ComfyUI's backup entry


def _backup(weight, inplace):
    return _Backup(weight, inplace)


def restore_streamed(patcher: Any, index: dict) -> int:
    """Before undo: the unpatched bytes of every file-backed streamed weight read back into its home."""
    src = sources(patcher.model)
    todo = []
    for key, s in list(src.items()):
        try:
            live = mp.get_key_weight(patcher.model, key)[0]
        except Exception:
            live = None
        home = index.get(id(live)) if live is not None else None
        if home is None:
            log.warning("DisTorch: streamed weight %r has no home any more; its unpatched bytes were not "
                        "restored", key)
            continue
        todo.append((s, home))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=_fill.threads()) as ex:      # page cache -> homes, weights in parallel
        list(ex.map(lambda sh: sh[0].read_into(sh[1]), todo))
    src.clear()
    if todo:
        log.debug("DisTorch: %d streamed weights (%.2f GiB) restored from the model file in %.2f s", len(todo),
                  sum(h.numel() * h.element_size() for _, h in todo) / 2**30, time.perf_counter() - t0)
    return len(todo)



def original(patcher: Any, key: str) -> torch.Tensor | None:
    """The unpatched weight of a file-backed streamed key (read from the file), or None."""
    s = sources(patcher.model).get(key)
    if s is None:
        return None
    live = mp.get_key_weight(patcher.model, key)[0]
    return s.read(tuple(live.shape), live.dtype)
