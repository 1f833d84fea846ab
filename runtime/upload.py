"""Resident weights to a CUDA device at the link's speed: pinned staging, host copies on threads, copies on a side stream.

    outs = to_device(tensors, device)     # copies of `tensors` on `device`: same shape, dtype, strides and bytes

Why: `t.to("cuda")` from pageable host memory goes through the driver's own small staging, one weight at a
time, the host waiting on each: ~4.6 GB/s for the ~5 GiB a Wan-14B expert keeps resident at virtual_vram_gb 9
on an H200 host (2.2 s of a 26.6 s cold run, bench/results/wan_workflow_h200_r3.md), where the copy engine
reads pinned memory at ~55 GB/s.

How: the bytes of every tensor are laid out in *batches* of at most STAGE_BYTES (a larger tensor goes in
pieces, small ones share a batch).  STAGES buffers of STAGE_BYTES, page-locked once per call, go round: a
thread pool copies batch k's bytes into buffer k % STAGES (host memcpy, pageable -> pinned), the calling thread
queues the batch's host-to-device copies on a side stream and records the buffer's event, and the job that
refills the buffer waits for that event first.  So the copy engine reads one buffer while the threads fill the
next ones.  At the end the side stream is synchronized (the tensors are ready for every stream) and the
buffers are unpinned and unmapped.

Host memory: at most STAGES x STAGE_BYTES = 128 MiB of page-locked staging (kept <= 256 MiB by design), only
while to_device runs (less when the tensors are smaller), in an anonymous mapping of its own and counted in
runtime.pinning's cap like the homes; unpinned and unmapped before it returns (page-locking it again costs a
few tens of ms per call, against the seconds a pageable upload of GiBs takes).  Each buffer is filled by one
pool thread (torch's copy, itself spread over the intra-op threads), so the threads are at most STAGES.

The plain `t.to(device)` stays where staging buys nothing or cannot run: a host device, a source that is
pinned already or not in host memory, an empty tensor, a tensor subclass, less than MIN_STAGED_BYTES in all, or
staging that cannot be page-locked (CUDA refuses, or the pinned cap has no room): a load never fails over
staging.

Exact by construction: uint8 views of each tensor's span of elements are copied.  A source whose elements do
not fill one dense span (a slice, an expanded view) is first made dense in host memory in the layout `.to()`
gives (torch.empty_like: a dense tensor's strides, else contiguous in its stride order).

`copies` is the device side: CudaCopies (side stream, an event per buffer) or HostCopies (copies done when
issued: a host target).  Tests run the batch logic on a CPU with pin=False, small stages and their own copies.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from . import pinning as _pinning
from .fill import threads as fill_threads

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

__all__ = ["STAGE_BYTES", "STAGES", "MIN_STAGED_BYTES", "to_device", "batches", "HostCopies", "CudaCopies",
           "host_job", "pool_workers"]

log = logging.getLogger("distorch.runtime.upload")

STAGE_BYTES = 32 << 20      # bytes per staging buffer
STAGES = 4                  # staging buffers: at most 128 MiB page-locked during a call
MIN_STAGED_BYTES = 4 << 20  # less than this in all goes by plain .to() (not worth page-locking a buffer)
ALIGN = 512                 # pieces start on this byte grid inside a buffer
MIN_PIECE = 1 << 20         # a tensor that would leave a smaller piece at a buffer's end starts the next buffer


class HostCopies:
    """The device side for a host target: each copy is done when issued, so a buffer is free at once."""

    def issue(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for d, s in pairs:
            d.copy_(s)

    def done(self, i: int) -> None:
        """Buffer i's batch is issued."""

    def wait(self, i: int) -> None:
        """Block until buffer i may be written again (called from the filling threads)."""

    def finish(self) -> None:
        """Block until every issued copy is done."""


class CudaCopies(HostCopies):
    """Host-to-device copies on a side stream of `device`, one event per staging buffer."""

    def __init__(self, device: torch.device, n: int) -> None:
        self.stream = torch.cuda.Stream(device=device)
        # the destinations were allocated on the current stream: work queued there on their memory comes first
        self.stream.wait_stream(torch.cuda.current_stream(device))
        self.events: list = [None] * n

    def issue(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with torch.cuda.stream(self.stream):
            for d, s in pairs:
                d.copy_(s, non_blocking=True)

    def done(self, i: int) -> None:
        ev = torch.cuda.Event()
        ev.record(self.stream)
        self.events[i] = ev

    def wait(self, i: int) -> None:
        ev = self.events[i]
        if ev is not None:
            ev.synchronize()

    def finish(self) -> None:
        self.stream.synchronize()


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def batches(sizes: Sequence[int], stage: int) -> list[list[tuple[int, int, int, int]]]:
    """The buffer loads for tensors of `sizes` bytes through buffers of `stage` bytes: per load a list of pieces
    (tensor index, byte start in the tensor, bytes, byte offset in the buffer).  A tensor larger than what is
    left of a buffer is cut; one that would leave a piece smaller than MIN_PIECE there starts the next buffer."""
    out: list[list] = []
    cur: list = []
    off = 0
    small = min(MIN_PIECE, max(1, stage // 4))
    for j, n in enumerate(sizes):
        a = 0
        while a < n:
            if off and stage - off < min(n - a, small):
                out.append(cur)
                cur, off = [], 0
            take = min(n - a, stage - off)
            cur.append((j, a, take, off))
            a += take
            off = _align(off + take)
            if off >= stage:
                out.append(cur)
                cur, off = [], 0
    if cur:
        out.append(cur)
    return out


def _span(t: torch.Tensor) -> torch.Tensor:
    """The bytes of a dense tensor's elements, as one flat uint8 view."""
    return t.as_strided((t.numel(),), (1,), t.storage_offset()).view(torch.uint8)


def _stageable(t: torch.Tensor, device: torch.device, pin: bool) -> bool:
    if type(t) is not torch.Tensor or t.device.type != "cpu" or t.numel() == 0:
        return False
    if not pin:
        return True
    return device.type == "cuda" and not t.is_pinned()


def _staging(nbytes: int, pin: bool) -> tuple[torch.Tensor, Callable[[], None]] | None:
    """A host buffer of `nbytes` and its release; None when pin and it cannot be page-locked."""
    if not pin:
        return torch.empty(nbytes, dtype=torch.uint8), lambda: None
    if _pinning.budget() < nbytes:
        log.debug("distorch: no room under the pinned cap for %d MiB of upload staging; plain copies", nbytes >> 20)
        return None
    buf = _pinning.mapped_empty((nbytes,), torch.uint8)      # a mapping of its own: unmapped when released
    ptr = buf.data_ptr()
    ok, why = _pinning.register(ptr, nbytes)
    if not ok:
        log.debug("distorch: upload staging not page-locked (%s); plain copies", why)
        return None
    return buf, lambda: _pinning.unregister(ptr)


def to_device(tensors: Sequence[torch.Tensor], device: torch.device | str, *, pin: bool = True,
              stage_bytes: int = STAGE_BYTES, stages: int = STAGES, copies: HostCopies | None = None,
              n_threads: int | None = None) -> list[torch.Tensor]:
    """Copies of `tensors` on `device` (see the module docstring), in order.  pin=False stages through ordinary
    host memory into any device (the CPU tests of the batch logic); `copies` replaces the device side."""
    device = torch.device(device)
    outs: list = [None] * len(tensors)
    idx = [i for i, t in enumerate(tensors) if _stageable(t, device, pin)]
    sizes = [tensors[i].numel() * tensors[i].element_size() for i in idx]
    total = sum(sizes)
    got = None
    if idx and (total >= MIN_STAGED_BYTES or not pin):
        stage = min(int(stage_bytes), _align(total))
        nbuf = max(1, min(int(stages), -(-total // stage)))
        got = _staging(stage * nbuf, pin)
    if got is None:
        return [t.to(device) for t in tensors]
    buf, release = got
    t0 = time.perf_counter()
    try:
        srcs, dsts = [], []
        for i in idx:
            t = tensors[i]
            d = torch.empty_like(t, device=device)
            if d.stride() != t.stride():     # not one dense span: dense on the host first, in d's layout
                t = torch.empty_like(t).copy_(t)
            srcs.append(_span(t))
            dsts.append(_span(d))
            outs[i] = d
        _pipeline(srcs, dsts, buf, stage, nbuf, sizes, copies or (
            CudaCopies(device, nbuf) if device.type == "cuda" else HostCopies()), n_threads)
    finally:
        release()
    for i, t in enumerate(tensors):
        if outs[i] is None:
            outs[i] = t.to(device)
    dt = time.perf_counter() - t0
    log.debug("distorch: %d tensors (%.2f GiB) to %s through %d x %d MiB staging in %.2f s (%.1f GB/s)", len(idx),
              total / 2**30, device, nbuf, stage >> 20, dt, total / max(dt, 1e-9) / 1e9)
    return outs


def pool_workers(nbuf: int, n_threads: int | None) -> int:
    """Threads for the host side of a staged copy: one per buffer at most (`n_threads`, else fill.threads())."""
    return max(1, min(nbuf, fill_threads() if n_threads is None else int(n_threads)))


def host_job(loads: list, bufs: list, copies: HostCopies, srcs: list, dsts: list,
             into_buffers: bool) -> Callable[[int], None]:
    """The pool's part of load k, either way: wait until buffer k % len(bufs) may be touched (copies.wait),
    then copy the load's pieces into it from `srcs` (an upload) or out of it into `dsts` (runtime/download.py),
    in the caller's inference mode (thread-local: read here, on the calling thread)."""
    infer = torch.is_inference_mode_enabled()

    def job(k: int) -> None:
        b = bufs[k % len(bufs)]
        copies.wait(k % len(bufs))
        with torch.inference_mode(infer):
            for j, a, n, off in loads[k]:
                if into_buffers:
                    b[off:off + n].copy_(srcs[j][a:a + n])
                else:
                    dsts[j][a:a + n].copy_(b[off:off + n])
    return job


def _pipeline(srcs: list, dsts: list, buf: torch.Tensor, stage: int, nbuf: int, sizes: list, copies: HostCopies,
              n_threads: int | None) -> None:
    """Fill buffer k % nbuf with load k on the pool, issue its copies here, refill once its event is done."""
    loads = batches(sizes, stage)
    bufs = [buf[i * stage:(i + 1) * stage] for i in range(nbuf)]
    fill = host_job(loads, bufs, copies, srcs, dsts, into_buffers=True)
    ex = ThreadPoolExecutor(max_workers=pool_workers(nbuf, n_threads), thread_name_prefix="distorch-upload")
    futs = {}
    try:
        for k in range(min(nbuf, len(loads))):
            futs[k] = ex.submit(fill, k)
        for k in range(len(loads)):
            futs.pop(k).result()
            i = k % nbuf
            copies.issue([(dsts[j][a:a + n], bufs[i][off:off + n]) for j, a, n, off in loads[k]])
            copies.done(i)
            if k + nbuf < len(loads):
                futs[k + nbuf] = ex.submit(fill, k + nbuf)
    finally:
        for f in futs.values():
            f.cancel()
        ex.shutdown(wait=True)
        copies.finish()          # nothing may still read the buffers when they are released
