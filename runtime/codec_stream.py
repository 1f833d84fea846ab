"""Streamed units whose bf16 / fp16 weights travel losslessly compressed, decoded on the compute device.

    coded = encode_units(streamed, units, compute)     # before the homes: each codable tensor coded once
    store = HomeStore(..., coded=coded)                 # homes hold the packed bytes (runtime/store.py)
    part = SlotDecode(store.params, compute)            # pre(i): slot bytes -> dense scratch, params bound

Why.  Fully offloaded, a step is the link: bytes streamed / link bandwidth.  Trained bf16 weights carry
about 2.6 bits of information in their 8 exponent bits; formats/bf16_codec.py codes the exponent with an
exact prefix code (sign and mantissa raw), 0.675 of the raw bytes for bf16, and an H200 decodes it at
~470 GB/s of output (bench/results/codec_h200.md).  Fewer bytes cross the link and sit in host RAM; the
output is bit-identical because decoding is exact.  passes/codec_choice.py decides per unit whether the
link time saved outweighs the decode time on the compute stream (Plan.codec names the units).

How a coded parameter goes through the runtime:

* at apply(), `encode_units` codes every tensor of a Plan.codec unit for which
  formats.bf16_encode.codable() holds (on the compute GPU when there is one, else on the host with a
  thread pool), one tensor at a time, and releases the tensor's dense storage as soon as its packed
  bytes exist, so host RAM never holds both forms of the model.  Should anything fail before the homes
  are filled, `Coded.restore()` decodes every coded tensor back into its parameter: nothing is lost.
* the unit's home (runtime/store.py) holds the packed bytes of its coded tensors (uint8 entries) beside
  its other tensors, raw; one copy per unit moves the lot into a slot, as for any unit.
* the runtime's per-unit parameter list holds a `CodedBinder` for each coded parameter: the ring's
  `b.data = view` (its one statement per tensor) stores the packed bytes' view in the slot, and this
  part's `pre(i)` (after the ring waited for the slot's copy, on the compute stream) decodes each into
  its place in ONE dense scratch buffer on the compute device, as large as the largest coded unit's
  coded tensors (units run one at a time), and binds the parameter there.  The parameter object is the
  same throughout (tied weights and references stay valid) and keeps its dtype and shape.
* state_dict, home_views, undo: the dense values are decoded from the home (`decode_home`), on the
  compute GPU when there is one (the torch reference decoder on a host runs at ~130 MB/s).

The decoders: formats.bf16_codec.decode_triton on CUDA (one launch per tensor); the torch reference
decoder elsewhere (CI), bit-identical to it.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .. import progress as _progress
from ..compiler.ring_layout import align as align_up
from ..errors import DisTorchError
from ..formats import bf16_codec as _codec
from ..formats.bf16_encode import codable, encode
from . import fill as _fill
from . import pinning as _pinning
from .hooks import UnitPart

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .apply import Runtime
    from .download import Download

__all__ = ["CodedBinder", "Coded", "encode_units", "SlotDecode", "decode_home", "is_coded"]

log = logging.getLogger("distorch.runtime.codec_stream")


class CodedBinder:
    """Stands in for a coded parameter in the runtime's per-unit lists.  `data` is where its packed bytes
    are now (a view into its home or into a slot: what the ring binds), `meta` their CodecMeta, `param`
    the parameter itself (bound to its place in the decode scratch while its unit runs)."""
    __slots__ = ("param", "data", "meta")

    def __init__(self, param: torch.Tensor, meta: _codec.CodecMeta, data: torch.Tensor | None = None) -> None:
        self.param = param
        self.meta = meta
        self.data = data


def is_coded(b: object) -> bool:
    return type(b) is CodedBinder


def _decoder(device: torch.device):
    if device.type == "cuda" and _codec.triton_available():
        return _codec.decode_triton
    return _codec.decode


def decode_home(meta: _codec.CodecMeta, packed: torch.Tensor, device: str | torch.device | None = None,
                out: torch.Tensor | None = None, back: "Download | None" = None) -> torch.Tensor:
    """The dense tensor of packed bytes `packed` (any device) on `device` (default: packed's device), into
    `out` when given.  Host bytes with a CUDA device to spare are decoded there (GPU ~470 GB/s against the
    host decoder's ~0.13 GB/s) and come back, through `back` (runtime/download.py: reused pinned staging,
    into memory of its own) when given; `device` None with host bytes uses the first CUDA GPU when there
    is one."""
    dev = torch.device(device) if device is not None else packed.device
    work = dev
    if work.type == "cpu" and torch.cuda.is_available():
        work = torch.device("cuda", torch.cuda.current_device())
    buf = packed if packed.device == work else packed.to(work, non_blocking=False)
    enc = _codec.Encoded(meta, buf[:_codec.layout(meta).total])
    dense = _decoder(work)(enc).view(meta.shape)
    if out is not None:
        out.copy_(dense)
        return out
    if back is not None and dense.device.type == "cuda" and dev.type == "cpu":
        return back.to_host([dense])[0]
    return dense if dense.device == dev else dense.to(dev)


class Coded:
    """What encode_units made: per coded parameter (by id) its Encoded (until the homes take the bytes),
    its CodecMeta, and what it cost."""

    def __init__(self) -> None:
        self.enc: dict[int, _codec.Encoded] = {}      # id(param) -> packed bytes (host), until homed
        self.meta: dict[int, _codec.CodecMeta] = {}
        self.params: dict[int, torch.Tensor] = {}
        self.units: set[str] = set()
        self.raw_bytes = 0
        self.stored_bytes = 0
        self.seconds = 0.0
        self.where = ""

    def __bool__(self) -> bool:
        return bool(self.meta)

    def restore(self) -> None:
        """Every coded parameter whose packed bytes are still here gets its dense values back (a failure
        before the homes took them: nothing is lost)."""
        with torch.no_grad():
            for k, enc in list(self.enc.items()):
                p = self.params[k]
                p.data = decode_home(enc.meta, enc.buf, "cpu").view(enc.meta.shape)
                del self.enc[k]

    def stats(self) -> dict:
        return {"units": len(self.units), "tensors": len(self.meta), "raw_bytes": self.raw_bytes,
                "stored_bytes": self.stored_bytes,
                "ratio": self.stored_bytes / self.raw_bytes if self.raw_bytes else None,
                "encode_s": self.seconds, "encoded_on": self.where}


GPU_WORKERS = 3         # tensors coded at once on a CUDA device (upload, code, download overlap)


STAGE_MIN = 64 << 20    # bytes of a worker's page-locked staging buffer, at least


class Staging:
    """Page-locked host buffers the coding workers download packed bytes into, one per worker thread
    (grown when a tensor needs more), unpinned and freed by close().  Why: on an H200, coding into fresh
    pageable host memory ran at 1.1 GB/s and into page-locked memory at 4.3 GB/s, the download being the
    difference (bench/results/codec_h200.md).  Registration goes through runtime.pinning; where it fails
    (no CUDA, the cap) a buffer stays pageable and everything still works."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.lock = threading.Lock()
        self.bufs: list = []

    def get(self, nbytes: int) -> torch.Tensor:
        """This thread's buffer, its first `nbytes` bytes (uint8)."""
        buf = getattr(self.local, "buf", None)
        if buf is None or buf.numel() < nbytes:
            import numpy as np
            buf = torch.from_numpy(np.empty(max(int(nbytes), STAGE_MIN), dtype=np.uint8))
            ok, _ = _pinning.register(buf.data_ptr(), buf.numel())
            with self.lock:
                self.bufs.append((buf, ok))
            self.local.buf = buf
        return buf[:nbytes]

    def close(self) -> None:
        with self.lock:
            for buf, ok in self.bufs:
                if ok:
                    _pinning.unregister(buf.data_ptr())
            self.bufs = []


def _encode_gpu(t: torch.Tensor, device: torch.device, infer: bool, staging: Staging) -> _codec.Encoded:
    """t coded on `device` (formats.bf16_encode_torch: byte-identical to the host encoder; on a CUDA device
    on a stream of this worker thread's own); the packed bytes come back to the host through the thread's
    staging buffer, into a host buffer of their own.  One sync for the packed size, one for the download."""
    from ..formats.bf16_encode_torch import prepare
    st = None
    ctx = contextlib.nullcontext()
    if device.type == "cuda":
        st = _stream.stream = getattr(_stream, "stream", None) or torch.cuda.Stream(device)
        ctx = torch.cuda.stream(st)
    with torch.inference_mode(infer), ctx:
        job = prepare(t.detach().to(device))
        stage = staging.get(job.nbytes)
        job.write(out=stage)                  # non-blocking when the stage is page-locked
        if st is not None:
            st.synchronize()
        out = torch.empty(job.nbytes, dtype=torch.uint8)
        out.copy_(stage)
        return _codec.Encoded(job.meta, out)


_stream = threading.local()


def _encode_dev_or_host(t: torch.Tensor, device: torch.device, infer: bool, fallbacks: list,
                        staging: Staging) -> _codec.Encoded:
    """_encode_gpu, or the host encoder (byte-identical) when the device is out of memory: a load never
    fails for want of the coding's scratch.  `fallbacks` collects the tensors coded on the host."""
    try:
        return _encode_gpu(t, device, infer, staging)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        fallbacks.append(t.numel() * t.element_size())
        return encode(t.detach())


def encode_units(streamed: dict, units: list[str], compute: str | torch.device, *, progress: bool = True) -> Coded:
    """Code the codable tensors (formats.bf16_encode.codable) of `units` (streamed[name]: [(qualified
    name, param)]), each parameter's dense storage released once its packed bytes exist (module
    docstring).  On a CUDA compute device GPU_WORKERS tensors are coded at once there; else the host
    encoder codes each tensor's chunks on a thread pool.  A failure restores what was coded and re-raises
    as a DisTorchError naming the tensor."""
    dev = torch.device(compute) if not str(compute).startswith("cpu") else torch.device("cpu")
    out = Coded()
    seen: set[int] = set()
    todo = []
    for n in units:
        for q, p in streamed.get(n, ()):
            if codable(p) and id(p) not in seen:      # a tied parameter reached twice is coded once
                seen.add(id(p))
                todo.append((n, q, p))
    total = sum(p.numel() * p.element_size() for _, _, p in todo)
    if not todo:
        return out
    out.where = "cuda" if dev.type == "cuda" else "host"
    prog = _progress.Stage("distorch: compressing weights", total, "B", enabled=progress and total > 0,
                           min_total=256 << 20)
    t0 = time.perf_counter()
    infer = torch.is_inference_mode_enabled()
    workers = GPU_WORKERS if out.where == "cuda" else _fill.threads()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="distorch-encode") if workers > 1 else None

    fallbacks: list = []
    staging = Staging()

    def start(t: torch.Tensor) -> Future:
        if out.where == "cuda":
            return pool.submit(_encode_dev_or_host, t, dev, infer, fallbacks, staging) if pool is not None else \
                _done(_encode_dev_or_host, t, dev, infer, fallbacks, staging)
        return _done(encode, t.detach(), executor=pool)      # chunks of one tensor in parallel
    futs: dict[int, Future] = {}
    try:
        with torch.no_grad():
            for k, (n, q, p) in enumerate(todo):
                # on a GPU a few tensors in flight, in order; the host encoder codes one tensor at a time (its
                # chunks in parallel), so that no packed temporary exists beside a dense tensor still held
                for j in range(k, min(len(todo), k + (2 * workers if out.where == "cuda" else 1))):
                    if j not in futs:
                        futs[j] = start(todo[j][2].data)
                try:
                    enc = futs.pop(k).result()
                except Exception as e:
                    raise DisTorchError(f"compressing {q!r} ({str(p.dtype).removeprefix('torch.')} "
                                        f"{tuple(p.shape)}) failed: {type(e).__name__}: {e}") from e
                nb = p.numel() * p.element_size()
                out.enc[id(p)] = enc
                out.meta[id(p)] = enc.meta
                out.params[id(p)] = p
                out.units.add(n)
                out.raw_bytes += nb
                out.stored_bytes += enc.nbytes
                # the dense bytes are released now (the packed ones hold the same values); the parameter
                # keeps its dtype and, until SlotDecode binds it, an empty storage
                p.data = torch.empty(0, dtype=p.dtype)
                prog.update(nb)
    except BaseException:
        for f in futs.values():
            f.cancel()
        out.restore()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        staging.close()
        if out.where == "cuda":
            torch.cuda.empty_cache()     # the workers' cached blocks (their own streams) back to the driver
        prog.close()
    out.seconds = time.perf_counter() - t0
    if fallbacks:
        log.warning("distorch: %s was out of memory for coding %d tensors (%.2f GiB); they were coded on the "
                    "host instead (slower, same bytes)", dev, len(fallbacks), sum(fallbacks) / 2**30)
    log.info("distorch: compressed %d tensors of %d units on %s: %.2f -> %.2f GiB (x%.3f) in %.1f s (%.2f GB/s)",
             len(out.meta), len(out.units), out.where, out.raw_bytes / 2**30, out.stored_bytes / 2**30,
             out.stored_bytes / max(1, out.raw_bytes), out.seconds, out.raw_bytes / max(out.seconds, 1e-9) / 1e9)
    return out


def _done(fn, *a, **kw) -> Future:
    """fn(*a, **kw) run now, as a finished Future (its exception kept for .result())."""
    f: Future = Future()
    try:
        f.set_result(fn(*a, **kw))
    except Exception as e:
        f.set_exception(e)
    return f


class SlotDecode(UnitPart):
    """The part decoding coded units (runtime/hooks.py): D[i] = [(binder, dense view in the scratch)] for
    unit i's coded parameters; one scratch buffer on the compute device for all units."""

    def __init__(self, params: list, device: str | torch.device, stats: dict | None = None) -> None:
        dev = torch.device(device)
        sizes = []
        for P in params:
            n = 0
            for b in P:
                if type(b) is CodedBinder:
                    n = align_up(n + b.meta.raw_nbytes)
            sizes.append(n)
        self.nbytes = max(sizes, default=0)
        self.scratch = (torch.empty(self.nbytes, dtype=torch.uint8, device=dev) if self.nbytes else None)
        self.D: list[list] = []
        for P in params:
            views, off = [], 0
            for b in P:
                if type(b) is CodedBinder:
                    m = b.meta
                    v = self.scratch[off:off + m.raw_nbytes].view(m.torch_dtype).view(m.shape)
                    views.append((b, v))
                    off = align_up(off + m.raw_nbytes)
            self.D.append(views)
        self.decode = _decoder(dev)
        self.stats = dict(stats or {})         # Coded.stats() of the encoding, and the scratch size
        if self.stats:
            self.stats["scratch_bytes"] = self.nbytes

    def covers(self, i: int) -> bool:
        return bool(self.D[i])

    def attach(self, rt: Runtime) -> None:
        # every coded parameter reports its dtype, shape and the compute device from the start
        for views in self.D:
            for b, v in views:
                b.param.data = v

    def pre(self, i: int) -> None:
        dec = self.decode
        for b, v in self.D[i]:
            dec(_codec.Encoded(b.meta, b.data), v)
            b.param.data = v

    def detach(self, rt: Runtime) -> None:
        self.D = []
        self.scratch = None
