"""How much host memory DisTorch page-locks (pins), and the pinning calls themselves.

    max_pinned_bytes()    the cap: $DISTORCH_MAX_PINNED_GB (GiB, 0 = never pin) or DEFAULT_PINNED_FRACTION
                          of the machine's RAM
    pinned_bytes()        what this process has pinned through DisTorch now (all models together)
    budget()              what may still be pinned: cap - pinned, at least 0
    register(ptr, n)      cudaHostRegister; True when the memory is page-locked, False (never raises) when not
    unregister(ptr, n)    its undo (idempotent per registration)

The default follows ComfyUI 0.3.75 (comfy/model_management.py: MAX_PINNED_MEMORY = 95 % of system RAM,
45 % on Windows); the library does not import ComfyUI, so the rule is repeated here.  Host homes past
the cap stay in pageable memory, which the copy engine reads about 6x slower (H200: pinned 55 GB/s,
pageable 7-8 GB/s; compiler.inventory.PAGEABLE_FRACTION).  `host_register` / `host_unregister` are module
attributes so that tests on a machine without CUDA can put a fake in (monkeypatch).
"""
from __future__ import annotations

import functools
import logging
import math
import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger("distorch.runtime.pinning")

ENV = "DISTORCH_MAX_PINNED_GB"
DEFAULT_PINNED_FRACTION = 0.45 if os.name == "nt" else 0.95     # ComfyUI 0.3.75's MAX_PINNED_MEMORY
_state = {"pinned": 0, "regs": {}, "bad_env": None}


def total_host_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        try:
            import psutil
            return int(psutil.virtual_memory().total)
        except Exception:
            return 16 << 30


def max_pinned_bytes() -> int:
    """The cap on host bytes DisTorch pins (see the module docstring)."""
    raw = os.environ.get(ENV, "").strip()
    if raw:
        try:
            gb = float(raw)
            if gb != gb or gb < 0:
                raise ValueError(raw)
            return int(gb * 2**30)
        except ValueError:
            if _state["bad_env"] != raw:
                _state["bad_env"] = raw
                log.warning("distorch: %s=%r is not a number of GiB (>= 0); using the default cap", ENV, raw)
    return int(total_host_bytes() * DEFAULT_PINNED_FRACTION)


def pinned_bytes() -> int:
    return _state["pinned"]


def budget() -> int:
    return max(0, max_pinned_bytes() - _state["pinned"])


def host_register(ptr: int, nbytes: int) -> int:
    """cudaHostRegister(ptr, nbytes, 0); returns the CUDA error code (0 = success)."""
    import torch
    err = torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    return int(getattr(err, "value", err))


def host_unregister(ptr: int) -> None:
    import torch
    torch.cuda.cudart().cudaHostUnregister(ptr)


def register(ptr: int, nbytes: int) -> tuple[bool, str]:
    """Page-lock [ptr, ptr + nbytes); (True, "") or (False, why).  Never raises."""
    try:
        err = host_register(ptr, nbytes)
    except Exception as e:          # no CUDA runtime, driver trouble, ...: stay pageable
        return False, f"{type(e).__name__}: {e}"
    if err:
        return False, f"CUDA error {err}"
    _state["regs"][ptr] = nbytes
    _state["pinned"] += nbytes
    return True, ""


def unregister(ptr: int) -> None:
    """Undo register(ptr, ...) once; later calls for the same ptr do nothing."""
    n = _state["regs"].pop(ptr, None)
    if n is None:
        return
    _state["pinned"] -= n
    try:
        host_unregister(ptr)
    except Exception:
        pass


@functools.lru_cache(maxsize=1)
def _libc():
    """glibc, loaded once (drop_pages runs per fill piece); raises OSError where there is none."""
    import ctypes
    return ctypes.CDLL("libc.so.6", use_errno=True)


PAGE = 4096


def _whole_pages(ptr: int, nbytes: int) -> tuple[int, int]:
    """(lo, hi): the whole pages inside [ptr, ptr + nbytes) (hi <= lo when there is none)."""
    return (ptr + PAGE - 1) // PAGE * PAGE, (ptr + nbytes) // PAGE * PAGE


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc malloc_trim); a no-op elsewhere."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):
        pass


DROP_MIN_PAGES = 16     # drop_pages leaves ranges of fewer whole pages alone (not worth a system call)


def droppable_span(ptr: int, nbytes: int) -> tuple[int, int] | None:
    """The whole pages inside [ptr, ptr + nbytes) that drop_pages gives back, as (lo, hi), or None when
    they are fewer than DROP_MIN_PAGES (drop_pages then does nothing)."""
    lo, hi = _whole_pages(ptr, nbytes)
    return (lo, hi) if hi - lo >= DROP_MIN_PAGES * PAGE else None


def drop_pages(ptr: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) on the whole pages inside [ptr, ptr + nbytes) (droppable_span): their memory
    goes back to the OS now (the range reads as zeros afterwards).  Only for unpinned memory nobody reads
    again."""
    span = droppable_span(ptr, nbytes)
    if span is None:
        return
    lo, hi = span
    try:
        import ctypes
        _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)     # 4: MADV_DONTNEED
    except (OSError, AttributeError):
        pass


def file_mapping(ptr: int) -> tuple[int, int] | None:
    """The [start, end) of the file-backed memory mapping holding address `ptr` (a safetensors file mapped by
    its loader, a file in /dev/shm), or None: anonymous memory, or not known (not Linux).  Reads
    /proc/self/maps: for the rare caller (fill's first DROP_EARLY probe), not per piece."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                rng, _perms, _off, _dev, inode = line.split(None, 5)[:5]
                lo, hi = (int(x, 16) for x in rng.split("-"))
                if lo <= ptr < hi:
                    return (lo, hi) if inode != "0" else None
    except (OSError, ValueError):
        pass
    return None


MADV_POPULATE_WRITE = 23      # Linux >= 5.14
_populate = {"ok": True}


def populate(ptr: int, nbytes: int) -> bool:
    """Fault the whole pages inside [ptr, ptr + nbytes) in for writing with one madvise(MADV_POPULATE_WRITE),
    instead of one page fault per page in the copy that follows (runtime/fill.py's PREFAULT).  False where
    it failed; once the kernel says it does not know the advice (EINVAL: before 5.14, or not Linux), later
    calls return False at once.  Contents are unchanged (pages already there stay as they are)."""
    if not _populate["ok"]:
        return False
    lo, hi = _whole_pages(ptr, nbytes)
    if hi <= lo:
        return True
    try:
        import ctypes
        if _libc().madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_POPULATE_WRITE) == 0:
            return True
        if ctypes.get_errno() == 22:      # EINVAL: advice unknown here
            _populate["ok"] = False
    except (OSError, AttributeError):
        _populate["ok"] = False
    return False


MAPPED_MIN_BYTES = 1 << 20   # host copies at least this large get an anonymous mapping of their own


def mapped_empty(shape: "tuple | torch.Size", dtype: "torch.dtype") -> "torch.Tensor":
    """An uninitialised contiguous host tensor in an anonymous memory mapping of its own (see mapped_copy:
    why), for at least MAPPED_MIN_BYTES; a plain torch.empty otherwise or where mapping fails."""
    import torch
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < MAPPED_MIN_BYTES:
        return torch.empty(shape, dtype=dtype)
    import mmap
    try:
        if hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS"):
            # private: counted as the process's anonymous memory (RssAnon), not shared with a forked child
            buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            buf = mmap.mmap(-1, nbytes)
        out = torch.frombuffer(buf, dtype=torch.uint8)
    except (OSError, ValueError, RuntimeError):
        return torch.empty(shape, dtype=dtype)
    del buf                               # the tensor's storage holds the mapping now
    return out.view(dtype).view(tuple(shape))


def mapped_copy(t: "torch.Tensor") -> "torch.Tensor":
    """A host copy of `t` (from the host or a device) in an anonymous memory mapping of its own (mmap), for
    contiguous tensors of at least MAPPED_MIN_BYTES; a plain host copy otherwise or where mapping fails.

    Why: glibc serves allocations under its *dynamic* mmap threshold (raised up to 32 MiB each time a mapped
    chunk is freed, which freeing a model's weights does) from the heap, and heap memory freed later is not
    given back to the OS unless something calls malloc_trim.  Weights copied back to the host by undo() are
    freed whenever ComfyUI drops the model, long after; a mapping of their own is unmapped the moment the
    last view of it dies, so dropping the model gives the memory back (an H200 Wan-14B fp8 run kept 16 GiB
    after the models were dropped: the 26 MB attention weights, 60 % of the bytes, sat in the heap)."""
    nbytes = t.numel() * t.element_size()
    if nbytes < MAPPED_MIN_BYTES or not t.is_contiguous():
        return t.detach().to("cpu", copy=True)
    out = mapped_empty(tuple(t.shape), t.dtype)
    out.copy_(t.detach())
    return out
