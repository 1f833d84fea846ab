"""Streams and events, CUDA or host, behind one duck-typed face.

The ring (runtime/ring.py) calls `stream.wait_event(ev)`, `ev.record(stream)`, `with link.ctx():` and
`dst.copy_(src, non_blocking=True)`. On CUDA those are real streams and events (no device-wide
synchronize anywhere on the hot path). On a machine without CUDA the very same calls go to
`HostStream` / `HostEvent`: copies run synchronously, waits are no-ops (everything already
happened in order) and events hold host timestamps, which is what the CPU timeline shows.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import time

import torch

from .store import parse_device


class HostEvent:
    """Same methods as torch.cuda.Event; time is the host clock at record()."""
    __slots__ = ("t",)

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self, stream: torch.cuda.Stream | HostStream | None = None) -> None:
        self.t = time.perf_counter()

    def query(self) -> bool:
        return True

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: "HostEvent") -> float:
        """Milliseconds from self to end (like torch.cuda.Event.elapsed_time)."""
        return (end.t - self.t) * 1e3


class HostStream:
    """A stream on the host: work issued to it has already run."""

    def wait_event(self, ev: HostEvent | torch.cuda.Event) -> None:
        pass

    def wait_stream(self, other: HostStream | torch.cuda.Stream) -> None:
        pass

    def synchronize(self) -> None:
        pass


_NULL = contextlib.nullcontext()


PEER_COPY_MODES = ("memcpy", "srcstream", "torch")


def _cudart_memcpy():
    """cudaMemcpyAsync of the CUDA runtime torch has loaded (found in /proc/self/maps), or None."""
    try:
        with open("/proc/self/maps") as f:
            paths = {ln.split()[-1] for ln in f if "libcudart.so" in ln}
        for path in sorted(paths):
            fn = ctypes.CDLL(path).cudaMemcpyAsync
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
            fn.restype = ctypes.c_int
            return fn
    except (OSError, AttributeError):
        pass
    return None


class Link:
    """One source device -> compute device link with its own copy stream (on the compute device).

    A donor GPU's peer copy (`peer`): torch's cross-device `copy_` runs on the SOURCE device's current
    stream and fences it with the compute device's current stream before and after; mode "memcpy"
    (default) instead issues one cudaMemcpyAsync on this link's own stream (the compute device pulls;
    peer access is enabled through torch first), "srcstream" keeps torch's copy_ but on a dedicated
    stream of the source device, "torch" is torch's copy_ as is.  DISTORCH_PEER_COPY picks one."""

    def __init__(self, src: str, compute: str | torch.device, cuda: bool) -> None:
        self.src = src
        self.cuda = cuda
        self.bytes_per_step = 0
        self.peer = False
        self.mode = "host"
        self._memcpy = None
        self.src_stream = None
        if cuda:
            cdev = parse_device(compute)
            self.stream = torch.cuda.Stream(device=cdev)
            if not str(src).startswith("cpu") and parse_device(src) != cdev:
                self.peer = True
                mode = os.environ.get("DISTORCH_PEER_COPY", "memcpy")
                if mode not in PEER_COPY_MODES:
                    raise ValueError(f"DISTORCH_PEER_COPY={mode!r}: expected one of {', '.join(PEER_COPY_MODES)}")
                sdev = parse_device(src)
                # a tiny torch copy each way enables peer access in both directions (torch does it lazily,
                # for the source device of each copy)
                torch.empty(1, device=cdev).copy_(torch.zeros(1, device=sdev))
                torch.empty(1, device=sdev).copy_(torch.zeros(1, device=cdev))
                torch.cuda.synchronize(sdev)
                torch.cuda.synchronize(cdev)
                if mode == "memcpy":
                    self._memcpy = _cudart_memcpy()
                    if self._memcpy is None:
                        mode = "srcstream"
                if mode == "srcstream":
                    self.src_stream = torch.cuda.Stream(device=sdev)
                self.mode = mode
        else:
            self.stream = HostStream()

    def ctx(self) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(self.stream) if self.cuda else _NULL

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """dst <- src (same byte count), ordered on this link's stream; call inside ctx()."""
        if self._memcpy is not None:
            err = self._memcpy(dst.data_ptr(), src.data_ptr(), src.numel() * src.element_size(), 3,
                               self.stream.cuda_stream)            # 3: cudaMemcpyDeviceToDevice
            if err:
                raise RuntimeError(f"cudaMemcpyAsync {self.src} -> {dst.device} failed with CUDA error {err}")
        elif self.src_stream is not None:
            with torch.cuda.stream(self.src_stream):
                dst.copy_(src, non_blocking=True)
        else:
            dst.copy_(src, non_blocking=True)

    def __repr__(self):
        return f"Link({self.src})"


class Backend:
    """Factory for the compute stream, events and links of one compute device."""

    def __init__(self, compute: str | torch.device) -> None:
        self.device = parse_device(compute)
        self.cuda = self.device.type == "cuda"
        if self.cuda and not torch.cuda.is_available():
            raise RuntimeError(f"compute device {compute!r} needs CUDA, which this torch cannot see")
        self._host_stream = HostStream()

    def event(self, timing: bool = False) -> torch.cuda.Event | HostEvent:
        if self.cuda:
            return torch.cuda.Event(enable_timing=timing)
        return HostEvent()

    def compute_stream(self) -> torch.cuda.Stream | HostStream:
        if self.cuda:
            return torch.cuda.current_stream(self.device)
        return self._host_stream

    def link(self, src: str) -> Link:
        return Link(src, self.device, self.cuda)

    def synchronize(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
