"""Where the bytes of offloaded units live: one flat buffer per unit (its *home*), and the slot pool.

A unit's home is ONE contiguous uint8 buffer on its home device -- pinned host memory when the home is
"cpu" and CUDA is there to copy from it, a plain host buffer on a CUDA-less machine, or a buffer on a
donor GPU. The unit's parameters are views into it (the original storages are released, so host RAM
holds one copy). Moving a unit is then one copy of `nbytes` bytes (each copy has ~5 us fixed cost, so
one big copy beats one per tensor).

The slot pool is W flat buffers on the compute device, each as large as the largest streamed unit.
For every (unit, slot) pair the views of the unit's tensors into that slot are built once, so binding
a unit to a slot is a loop of `param.data = view` with nothing allocated.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

ALIGN = 256  # bytes; keeps every view aligned for any dtype and for vectorised kernels


def align_up(n: int, a: int = ALIGN) -> int:
    return (n + a - 1) // a * a


def parse_device(dev) -> torch.device:
    """'cpu', 'cpu:N' (a named host home / host compute) and 'cuda:N' -> torch.device."""
    s = str(dev)
    if s.startswith("cpu"):
        return torch.device("cpu")
    return torch.device(s)


def is_host(dev) -> bool:
    return str(dev).startswith("cpu")


def _span(t: torch.Tensor) -> int:
    """Elements covered by t's strides (== numel for a dense tensor, contiguous or not)."""
    if t.numel() == 0:
        return 0
    return 1 + sum((s - 1) * st for s, st in zip(t.size(), t.stride()))


@dataclass
class Entry:
    """One tensor of a unit inside its flat buffer."""
    name: str                 # qualified name (first site), for messages and loading
    dtype: torch.dtype
    shape: tuple
    stride: tuple
    offset: int               # byte offset in the flat buffer
    nbytes: int               # bytes covered (span * itemsize)

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        """The tensor as a view into `flat` (uint8, any device)."""
        isz = torch.empty((), dtype=self.dtype).element_size()
        n = self.nbytes // isz
        typed = flat[self.offset:self.offset + self.nbytes].view(self.dtype)
        if len(self.shape) == 0:
            return typed.view(())
        if n == 0:
            return typed.view(self.shape) if all(s >= 0 for s in self.shape) else typed
        return typed.as_strided(self.shape, self.stride)


class Layout:
    """Byte layout of a unit's tensors in one flat buffer."""

    def __init__(self):
        self.entries: list[Entry] = []
        self.nbytes = 0

    def add(self, name: str, t: torch.Tensor) -> Entry:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and getattr(t, "qtype", None) is not None \
                and isinstance(getattr(t, "raw", None), torch.Tensor):
            t = t.raw      # a quantized GGUF tensor: its home holds the stored blocks (runtime.gguf_stream)
        dense = _span(t) == t.numel()
        # size(), not .shape: a tensor subclass may answer .shape with a logical shape that is not its
        # storage's (other packs' quantized byte tensors); the home holds the storage as it is
        size = tuple(t.size())
        stride = tuple(t.stride()) if dense else tuple(torch.empty(size, device="meta").stride())
        e = Entry(name, t.dtype, size, stride, align_up(self.nbytes), t.numel() * t.element_size())
        self.entries.append(e)
        self.nbytes = e.offset + e.nbytes
        return e

    @classmethod
    def of(cls, named: list[tuple[str, torch.Tensor]]) -> "Layout":
        lay = cls()
        for n, t in named:
            lay.add(n, t)
        return lay


def alloc_flat(nbytes: int, device, pin: bool) -> torch.Tensor:
    dev = parse_device(device)
    n = max(align_up(nbytes), ALIGN)
    if dev.type == "cpu":
        return torch.empty(n, dtype=torch.uint8, pin_memory=bool(pin))
    return torch.empty(n, dtype=torch.uint8, device=dev)


class HostArena:
    """One host buffer holding the homes of many units, pinned with ONE cudaHostRegister call.

    torch's pinned allocator rounds every request up to a power of two (a 680 MB block would take
    1 GiB), so the arena is plain host memory of the exact size (numpy-owned), page-locked in place
    when `pin` is true. The registration is undone when the memory is freed (a finalizer on the
    numpy array, which runs before numpy releases the data), i.e. once no view of it is alive.
    """

    def __init__(self, nbytes: int, pin: bool):
        import numpy as np
        import weakref
        n = max(align_up(nbytes, 4096), 4096)
        self.array = np.empty(n, dtype=np.uint8)
        self.flat = torch.from_numpy(self.array)
        self.pinned = False
        self.nbytes = n
        self._next = 0
        if pin:
            ptr = self.flat.data_ptr()
            cudart = torch.cuda.cudart()
            err = cudart.cudaHostRegister(ptr, n, 0)
            if int(getattr(err, "value", err)) == 0:
                self.pinned = True
                weakref.finalize(self.array, _unregister, ptr)
            else:
                import warnings
                warnings.warn(f"distorch: cudaHostRegister of {n} bytes failed ({err}); host homes stay "
                              "pageable (copies will be slower and synchronous)", stacklevel=2)

    def take(self, nbytes: int) -> torch.Tensor:
        off = self._next
        end = off + align_up(max(nbytes, 1))
        if end > self.nbytes:
            raise RuntimeError(f"arena overflow: {end} > {self.nbytes}")
        self._next = end
        return self.flat[off:end]

    def release(self):
        self.flat = None
        self.array = None


def _unregister(ptr: int):
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:
        pass


class Home:
    """A unit's weights in their home: one flat buffer plus the layout of its tensors."""

    def __init__(self, unit: str, device: str, layout: Layout, flat: torch.Tensor):
        self.unit = unit
        self.device = device
        self.layout = layout
        self.flat = flat
        self.nbytes = layout.nbytes

    @classmethod
    def allocate(cls, unit: str, device: str, layout: Layout, pin: bool, arena: "HostArena | None" = None) -> "Home":
        if arena is not None:
            return cls(unit, device, layout, arena.take(layout.nbytes))
        return cls(unit, device, layout, alloc_flat(layout.nbytes, device, pin))

    def views(self) -> list[torch.Tensor]:
        return [e.view(self.flat) for e in self.layout.entries]

    @property
    def src(self) -> torch.Tensor:
        """The bytes one copy moves."""
        return self.flat[:self.nbytes]

    def release(self):
        self.flat = None


class SlotPool:
    """W flat buffers on the compute device; views of every streamed unit into every slot."""

    def __init__(self, device, n_slots: int, slot_bytes: int):
        self.device = parse_device(device)
        self.slot_bytes = align_up(max(slot_bytes, 1))
        self.flats = [alloc_flat(self.slot_bytes, self.device, pin=False) for _ in range(n_slots)]

    def __len__(self):
        return len(self.flats)

    @property
    def nbytes(self) -> int:
        return self.slot_bytes * len(self.flats)

    def views(self, layout: Layout) -> list[list[torch.Tensor]]:
        """views[s] = the unit's tensors as views into slot s."""
        return [[e.view(f) for e in layout.entries] for f in self.flats]

    def release(self):
        self.flats = []


class Progress:
    """A one-line stderr progress bar with a byte rate; silent for small totals."""

    def __init__(self, total: int, label: str, min_bytes: int = 256 << 20, stream=None):
        self.total = max(int(total), 1)
        self.label = label
        self.done = 0
        self.t0 = time.perf_counter()
        self.last = 0.0
        self.on = total >= min_bytes
        self.stream = stream or sys.stderr

    def update(self, n: int):
        self.done += n
        if not self.on:
            return
        now = time.perf_counter()
        if now - self.last < 0.25 and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.t0, 1e-9)
        frac = self.done / self.total
        bar = "#" * int(30 * frac)
        self.stream.write(f"\r{self.label} [{bar:<30}] {frac * 100:5.1f}% "
                          f"{self.done / 2**30:.2f}/{self.total / 2**30:.2f} GiB {rate / 1e9:.2f} GB/s")
        self.stream.flush()

    def close(self):
        if self.on:
            self.stream.write("\n")
            self.stream.flush()
