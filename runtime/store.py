"""Where the bytes of offloaded units live: one flat buffer per unit (its *home*), and the slot pool.

    store = HomeStore(units, streamed, home_of, pin=True, progress=True)   # every streamed unit's home
    store.homes[name], store.params[i], store.home_views(), store.detach(rt)

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

from ..compiler.ring_layout import ALIGN, align as align_up   # one alignment for homes, slots and ring items
from ..errors import DisTorchError
from . import gguf_stream as _gs
from .hooks import UnitPart


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


class HomeStore(UnitPart):
    """The homes of the streamed units (a part: runtime/hooks.py; its detach puts the weights back).

    units      the streamed units' names; unit i of every per-unit list of the runtime is units[i]
    homes      name -> Home; a home given in `given` whose views are the parameters already (runtime.loading
               read the file straight into it) is adopted as it is
    params     params[i]: unit i's parameters as the ring binds them (a GGUF one as its RawBinder)
    arenas     one exact-size host arena per host home device (pinned with one registration when `pin`)

    Allocating moves every streamed parameter into its home and releases its original storage, so the
    host holds one copy.
    """

    def __init__(self, units: list[str], streamed: dict, home_of: dict, given: dict | None = None, *,
                 pin: bool, progress: bool):
        self.units = units
        self.homes: dict[str, Home] = {}
        given = given or {}
        todo: dict[str, Layout] = {}
        for n in units:
            h = given.get(n)
            tensors = streamed[n]
            if h is not None and len(h.layout.entries) == len(tensors) and all(
                    p.data_ptr() == v.data_ptr() for (_, p), v in zip(tensors, h.views())):
                self.homes[n] = h          # loaded straight into its home (runtime.loading)
            else:
                for q, p in tensors:
                    if p.is_meta:
                        raise DisTorchError(f"parameter {q!r} is on the meta device (no data); load weights "
                                            "with distorch.runtime.loading.load_into(module, path, plan) first")
                todo[n] = Layout.of(tensors)
        self.arenas: dict[str, HostArena] = {}
        for hd in sorted({home_of[n] for n in todo if is_host(home_of[n])}):
            need = sum(align_up(max(todo[n].nbytes, 1)) for n in todo if home_of[n] == hd)
            self.arenas[hd] = HostArena(need, pin=pin)
        total = sum(sum(_gs.stored_bytes(p) for _, p in streamed[n]) for n in units)
        prog = Progress(total if progress else 0, "distorch: weights -> homes")
        for n in units:
            if n not in todo:
                prog.update(self.homes[n].nbytes)
                continue
            h = Home.allocate(n, home_of[n], todo[n], pin=False, arena=self.arenas.get(home_of[n]))
            with torch.no_grad():
                for (_, p), v in zip(streamed[n], h.views()):
                    if _gs.is_gguf(p):     # quantized: the home holds the stored blocks
                        v.copy_(p.raw)
                        _gs.set_raw(p, v)
                        continue
                    v.copy_(p.data)
                    p.data = v             # the original storage is released here
            self.homes[n] = h
            prog.update(h.nbytes)
        prog.close()
        self.params = [[_gs.binder(p) for _, p in streamed[n]] for n in units]

    def home_views(self) -> dict:
        """id(parameter) -> its tensor in its home, for every streamed parameter (a GGUF parameter's entry
        is a GGUFTensor over its quantized bytes in the home)."""
        out = {}
        for i, n in enumerate(self.units):
            for p, v in zip(self.params[i], self.homes[n].views()):
                q = _gs.param_of(p)
                out[id(q)] = v if q is p else q.with_raw(v)    # GGUF: the same weight over its home bytes
        return out

    def adopt_arenas(self, arenas: dict) -> None:
        """Keep host arenas filled elsewhere (runtime.loading), to be freed with the rest."""
        for k, a in arenas.items():
            self.arenas[f"{k}#loaded" if k in self.arenas else k] = a

    def detach(self, rt) -> None:
        """Every streamed parameter back on `rt.undo_device` (copied out of its home); homes and arenas freed."""
        with torch.no_grad():
            for i, n in enumerate(self.units):
                for p, v in zip(self.params[i], self.homes[n].views()):
                    _gs.rebind(p, v.to(rt.undo_device, copy=True))
        for h in self.homes.values():
            h.release()
        for a in self.arenas.values():
            a.release()
        self.homes, self.arenas, self.params = {}, {}, []
