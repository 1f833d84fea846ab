"""Streams and events, CUDA or host, behind one duck-typed face.

The scheduler in apply.py calls `stream.wait_event(ev)`, `ev.record(stream)`, `with link.ctx():` and
`dst.copy_(src, non_blocking=True)`. On CUDA those are real streams and events (no device-wide
synchronize anywhere on the hot path). On a machine without CUDA the very same calls go to
`HostStream` / `HostEvent`: copies run synchronously, waits are no-ops (everything already
happened in order) and events hold host timestamps, which is what the CPU timeline shows.
"""
from __future__ import annotations

import contextlib
import time

import torch

from .store import parse_device


class HostEvent:
    """Same methods as torch.cuda.Event; time is the host clock at record()."""
    __slots__ = ("t",)

    def __init__(self, enable_timing: bool = False):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self):
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds from self to end (like torch.cuda.Event.elapsed_time)."""
        return (end.t - self.t) * 1e3


class HostStream:
    """A stream on the host: work issued to it has already run."""

    def wait_event(self, ev):
        pass

    def wait_stream(self, other):
        pass

    def synchronize(self):
        pass


_NULL = contextlib.nullcontext()


class Link:
    """One source device -> compute device link with its own copy stream."""

    def __init__(self, src: str, compute, cuda: bool):
        self.src = src
        self.cuda = cuda
        self.bytes_per_step = 0
        if cuda:
            self.stream = torch.cuda.Stream(device=parse_device(compute))
        else:
            self.stream = HostStream()

    def ctx(self):
        return torch.cuda.stream(self.stream) if self.cuda else _NULL

    def __repr__(self):
        return f"Link({self.src})"


class Backend:
    """Factory for the compute stream, events and links of one compute device."""

    def __init__(self, compute):
        self.device = parse_device(compute)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError(f"compute device {compute!r} needs CUDA, which this torch cannot see")
        self._host_stream = HostStream()

    def event(self, timing: bool = False):
        if self.cuda:
            return torch.cuda.Event(enable_timing=timing)
        return HostEvent()

    def compute_stream(self):
        if self.cuda:
            return torch.cuda.current_stream(self.device)
        return self._host_stream

    def link(self, src: str) -> Link:
        return Link(src, self.device, self.cuda)

    def synchronize(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)
