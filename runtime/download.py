"""Weights back from a CUDA device to host memory at the link's speed: the mirror of runtime/upload.py.

    with Download(device) as dl:
        outs = dl.to_host(tensors)     # host copies of `tensors`, each >= 1 MiB in a mapping of its own

Why: undo() to the host (ComfyUI unloading a model) copied every resident weight, and every decoded
compressed home, with one `.copy_()` from the GPU into fresh pageable memory, one tensor at a time: the driver
stages through a small buffer of its own and the host faults the new pages in on one thread.  On the H200
host that ran at ~1.1-1.2 GB/s: 14-21 s to unload the Flux-dev-sized model after every budget of
bench/results/comfy_vram_h200.md (run 8), whatever the budget (resident bytes, or compressed homes decoded
on the GPU, came back the same way).

How: each tensor's bytes are cut into the same batches as an upload (upload.batches).  STAGES page-locked
buffers of STAGE_BYTES go round: the calling thread queues batch k's device-to-host copies into buffer
k % STAGES on a side stream and records the buffer's event; a pool thread waits for that event and copies the
buffer into the destinations (host memcpy, pinned -> fresh pages: the page faults spread over the threads);
batch k + STAGES reuses the buffer once that thread is done.  Destinations are runtime.pinning.mapped_empty
(an anonymous mapping per tensor of 1 MiB or more: unmapped the moment the model is dropped, never left in
glibc's heap), so what comes back is what pinning.mapped_copy gave before, only faster.

The staging (at most STAGES x STAGE_BYTES = 128 MiB page-locked, counted in runtime.pinning's cap) and the
threads live as long as the Download: one per undo, however many calls (runtime/store.py decodes compressed
homes one tensor at a time on the GPU and brings each back through it).  Where staging cannot be had (no CUDA
source, the pinned cap full, CUDA refusing to page-lock) every tensor goes by mapped_copy, as before: an
unload never fails over staging.

Exact by construction (uint8 views of each tensor's span).  A tensor that is not contiguous, a subclass, an
empty one or one already on the host goes by mapped_copy.  Tests run the pipeline on a CPU with pin=False,
small stages and their own copies (`copies`: the device side, as in runtime/upload.py).
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import torch

from . import pinning as _pinning
from .upload import STAGE_BYTES, STAGES, CudaCopies, HostCopies, _align, _span, _staging, batches, host_job, \
    pool_workers

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["Download", "CudaCopiesBack"]

log = logging.getLogger("distorch.runtime.download")


class CudaCopiesBack(CudaCopies):
    """Device-to-host copies on a side stream of `device`, one event per staging buffer (upload's CudaCopies,
    the other way)."""

    def issue(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        # the sources were written on the current stream (a decode, the last forward): that work comes first
        self.stream.wait_stream(torch.cuda.current_stream(self.stream.device))
        super().issue(pairs)


class Download:
    """Host copies of device tensors through reused page-locked staging (module docstring).  A context manager:
    the staging is unpinned and unmapped, and the threads stopped, on exit (or close())."""

    def __init__(self, device: torch.device | str, *, pin: bool = True, stage_bytes: int = STAGE_BYTES,
                 stages: int = STAGES, copies: HostCopies | None = None, n_threads: int | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.pin = pin
        self.stage = int(stage_bytes)
        self.nbuf = max(1, int(stages))
        self._copies = copies
        self._threads = n_threads
        self._got: tuple | None = None     # (buffer, release) once staging was asked for; (None, None): refused
        self._ex: ThreadPoolExecutor | None = None
        self.bytes = 0                     # staged so far, and how long it took
        self.seconds = 0.0

    def __enter__(self) -> "Download":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._ex is not None:
            self._ex.shutdown(wait=True)
            self._ex = None
        if self._got is not None and self._got[1] is not None:
            self._got[1]()
        self._got = None

    def _stageable(self, t: torch.Tensor) -> bool:
        if type(t) is not torch.Tensor and not isinstance(t, torch.nn.Parameter) or t.numel() == 0 \
                or not t.is_contiguous():
            return False
        if not self.pin:
            return True
        return t.device.type == "cuda" and t.device == self.device

    def _buffer(self) -> torch.Tensor | None:
        if self._got is None:
            got = _staging(self.stage * self.nbuf, self.pin)
            self._got = got if got is not None else (None, None)
            if got is not None:
                self._ex = ThreadPoolExecutor(max_workers=pool_workers(self.nbuf, self._threads),
                                              thread_name_prefix="distorch-download")
        return self._got[0]

    def to_host(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host copies of `tensors`, in order: same shape, dtype and bytes; contiguous (a source that is not
        contiguous goes by mapped_copy, which keeps its strides)."""
        idx = [i for i, t in enumerate(tensors) if self._stageable(t)]
        buf = self._buffer() if idx else None
        outs: list = [None] * len(tensors)
        if buf is not None:
            t0 = time.perf_counter()
            srcs, dsts, sizes = [], [], []
            for i in idx:
                t = tensors[i].detach()
                d = _pinning.mapped_empty(tuple(t.shape), t.dtype)
                srcs.append(_span(t))
                dsts.append(_span(d))
                sizes.append(t.numel() * t.element_size())
                outs[i] = d
            self._pipeline(srcs, dsts, buf, sizes)
            self.bytes += sum(sizes)
            self.seconds += time.perf_counter() - t0
        for i, t in enumerate(tensors):
            if outs[i] is None:
                outs[i] = _pinning.mapped_copy(t)
        return outs

    def _pipeline(self, srcs: list, dsts: list, buf: torch.Tensor, sizes: list) -> None:
        """Queue load k into buffer k % nbuf here, drain it on the pool; a buffer is refilled once drained."""
        stage = min(self.stage, _align(sum(sizes)))
        nbuf = max(1, min(self.nbuf, -(-sum(sizes) // stage)))
        loads = batches(sizes, stage)
        bufs = [buf[i * stage:(i + 1) * stage] for i in range(nbuf)]
        copies = self._copies or (CudaCopiesBack(self.device, nbuf) if self.pin else HostCopies())
        drain = host_job(loads, bufs, copies, srcs, dsts, into_buffers=False)

        futs: dict = {}
        try:
            for k in range(len(loads)):
                i = k % nbuf
                if k >= nbuf:
                    futs.pop(k - nbuf).result()        # buffer i drained: it may be written again
                copies.issue([(bufs[i][off:off + n], srcs[j][a:a + n]) for j, a, n, off in loads[k]])
                copies.done(i)
                futs[k] = self._ex.submit(drain, k)
            for k in sorted(futs):
                futs.pop(k).result()
        finally:
            for f in futs.values():
                f.cancel()
            for f in futs.values():
                if not f.cancelled():
                    try:
                        f.result()
                    except BaseException:       # the first failure is the one raised
                        pass
            copies.finish()          # nothing may still write the buffers when they are reused or released

    def summary(self) -> str:
        if not self.bytes:
            return "no staging"
        return (f"{self.bytes / 2**30:.2f} GiB through {self.nbuf} x {self.stage >> 20} MiB staging in "
                f"{self.seconds:.2f} s ({self.bytes / max(self.seconds, 1e-9) / 1e9:.1f} GB/s)")
