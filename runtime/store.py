"""Where the bytes of offloaded units live: one flat buffer per unit (its *home*), and the slot pool.

    store = HomeStore(units, streamed, home_of, pin=True, progress=True, module=m)   # every streamed unit's home
    store.homes[name], store.params[i], store.home_views(), store.detach(rt), store.load_times

A unit's home is ONE contiguous uint8 buffer on its home device -- pinned host memory when the home is
"cpu" and CUDA is there to copy from it, a plain host buffer on a CUDA-less machine, or a buffer on a
donor GPU. The unit's parameters are views into it (the original storages are released, so host RAM
holds one copy). Moving a unit is then one copy of `nbytes` bytes (each copy has ~5 us fixed cost, so
one big copy beats one per tensor).

The slot pool is W flat buffers on the compute device, each as large as the largest streamed unit.
For every (unit, slot) pair the views of the unit's tensors into that slot are built once, so binding
a unit to a slot is a loop of `param.data = view` with nothing allocated.

Undo to the host leaves the parameters as views of their host arena, and the next compile of the same
module adopts those homes when its plan homes exactly the same units the same way (runtime/home_reuse.py);
otherwise the parameters first get memory of their own and the homes are filled as usual.
"""
from __future__ import annotations

import collections
import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
import time
import weakref
from dataclasses import dataclass

import torch

from ..compiler.ring_layout import ALIGN, align as align_up   # one alignment for homes, slots and ring items
from .. import progress as _progress
from ..errors import DisTorchError
from . import gguf_stream as _gs
from . import fill as _fill
from . import home_reuse as _reuse
from . import pinning as _pinning
from .arena import HostArena, host_arenas, pin_arenas, pin_some, report_pinned

from .codec_stream import CodedBinder, decode_home, is_coded
from .download import Download as _Download
from .hooks import UnitPart
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import TextIO
    from .apply import Runtime
    from .codec_stream import Coded

log = logging.getLogger("distorch.runtime.store")


def parse_device(dev: str | torch.device) -> torch.device:
    """'cpu', 'cpu:N' (a named host home / host compute) and 'cuda:N' -> torch.device."""
    s = str(dev)
    if s.startswith("cpu"):
        return torch.device("cpu")
    return torch.device(s)


def is_host(dev: str | torch.device) -> bool:
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

    def __init__(self) -> None:
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


def alloc_flat(nbytes: int, device: str | torch.device, pin: bool) -> torch.Tensor:
    dev = parse_device(device)
    n = max(align_up(nbytes), ALIGN)
    if dev.type == "cpu":
        return torch.empty(n, dtype=torch.uint8, pin_memory=bool(pin))
    return torch.empty(n, dtype=torch.uint8, device=dev)


TRIM_BYTES = 32 << 20       # while filling homes, give freed heap memory back every this many bytes (or 2 %):
#                             the fill's peak is its window + this (weights under glibc's mmap threshold free
#                             into the heap); 64 MiB let a 240 MiB model peak 152 MiB above its start on an H200


class Home:
    """A unit's weights in their home: one flat buffer plus the layout of its tensors."""

    def __init__(self, unit: str, device: str, layout: Layout, flat: torch.Tensor) -> None:
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

    def release(self) -> None:
        self.flat = None


class SlotPool:
    """W flat buffers on the compute device; views of every streamed unit into every slot."""

    def __init__(self, device: str | torch.device, n_slots: int, slot_bytes: int) -> None:
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

    def release(self) -> None:
        self.flats = []


class Progress(_progress.Stage):
    """A byte stage of distorch.progress (ComfyUI's ProgressBar, a terminal bar, or log lines; one INFO line
    with time and GB/s at the end); not shown for totals under `min_bytes` (or 0: progress off)."""

    def __init__(self, total: int, label: str, min_bytes: int = 256 << 20, stream: TextIO | None = None) -> None:
        super().__init__(label, total, "B", enabled=total > 0, min_total=min_bytes, stream=stream)


class HomeStore(UnitPart):
    """The homes of the streamed units (a part: runtime/hooks.py; its detach puts the weights back).

    units      the streamed units' names; unit i of every per-unit list of the runtime is units[i]
    homes      name -> Home; a home given in `given` whose views are the parameters already (runtime.loading
               read the file straight into it) is adopted as it is
    params     params[i]: unit i's parameters as the ring binds them (a GGUF one as its RawBinder)
    arenas     exact-size host arenas per host home device: pinned ones (when `pin`, up to runtime.pinning's
               cap) in pieces of whole units, about arena.PIECE_BYTES each ("<dev>", "<dev>@1", ...), each
               registered once its units are filled, while the fill goes on; "<dev>~pageable" for the units
               past the cap
    load_times {"fill_s", "pin_s", "pin_total_s", "reused", "reuse_miss"}: seconds filling the homes, page-locking
               them after the fill (pinned arenas are page-locked piece by piece during it: pin_total_s), whether
               the homes an undo() left on `module` were adopted (runtime/home_reuse.py), else why not ("")

    Allocating moves every streamed parameter into its home and releases its original storage, so the
    host holds one copy.
    """

    def __init__(self, units: list[str], streamed: dict, home_of: dict, given: dict | None = None, *,
                 pin: bool, progress: bool, coded: Coded | None = None, module: torch.nn.Module | None = None) -> None:
        self.units = units
        self.homes: dict[str, Home] = {}
        self.arenas: dict = {}
        self.held_bytes = 0
        self.load_times = {"fill_s": 0.0, "pin_s": 0.0, "pin_total_s": 0.0, "reused": False, "reuse_miss": ""}
        self._module = weakref.ref(module) if module is not None else None
        kept = _reuse.take(module) if module is not None else None
        given = given or {}
        enc = coded.enc if coded else {}
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
                # a coded tensor (runtime/codec_stream.py) is homed as its packed bytes
                todo[n] = Layout.of([(q, enc[id(p)].buf if id(p) in enc else p) for q, p in tensors])
        if kept is None or not self._adopt(kept, todo, streamed, home_of, pin, given, enc):
            self._fill(todo, streamed, home_of, pin, progress, enc)
        meta = coded.meta if coded else {}
        self.params = [[CodedBinder(p, meta[id(p)], v) if id(p) in meta else _gs.binder(p)
                        for (_, p), v in zip(streamed[n], self.homes[n].views())] for n in units]

    def _adopt(self, kept: _reuse.KeptHomes, todo: dict, streamed: dict, home_of: dict, pin: bool,
               given: dict, enc: dict) -> bool:
        """Take the homes an undo() left on the module when they fit (runtime/home_reuse.py), rebinding the
        parameters to them and page-locking the arenas again; else give the parameters still in the old
        arenas memory of their own and return False (the caller fills)."""
        why = "homes were given (runtime.loading)" if given else "units stream compressed" if enc else ""
        flats, arenas, why = ({}, {}, why) if why else kept.adopt(self.units, todo, streamed, home_of, pin)
        if why:
            log.debug("distorch: the host homes of the previous load are not reused (%s); filling anew", why)
            self.load_times["reuse_miss"] = why
            t0 = time.perf_counter()
            kept.release(self._module())
            self.load_times["fill_s"] = time.perf_counter() - t0
            return False
        with torch.no_grad():
            for n in self.units:
                h = self.homes[n] = Home(n, home_of[n], todo[n], flats[n])
                for (_, p), v in zip(streamed[n], h.views()):
                    _gs.rebind(p, v)        # same bytes, now through the adopted arena's own tensor
        self.arenas = arenas
        pin_s = pin_arenas(arenas)
        self.load_times.update(pin_s=pin_s, pin_total_s=pin_s, reused=True)
        log.info("distorch: reused the host homes of %d units (%.2f GiB) from the previous load; nothing copied",
                 len(self.units), kept.nbytes / 2**30)
        return True

    def _fill(self, todo: dict, streamed: dict, home_of: dict, pin: bool, progress: bool, enc: dict) -> None:
        """The homes of `todo` allocated in fresh arenas (or on donor GPUs) and filled, then pinned."""
        units = self.units
        t0 = time.perf_counter()
        # arenas are filled pageable and pinned afterwards (runtime.pinning caps the pinned bytes)
        self.arenas, arena_of = host_arenas(todo, home_of, pin)
        total = sum(todo[n].nbytes if n in todo else self.homes[n].nbytes for n in units)
        prog = Progress(total if progress else 0, "distorch: weights -> homes")
        order = []
        for n in units:
            if n not in todo:
                prog.update(self.homes[n].nbytes)
            else:
                order.append(Home.allocate(n, home_of[n], todo[n], pin=False, arena=self.arenas.get(arena_of.get(n))))

        # each pinned arena (a piece of about arena.PIECE_BYTES) is page-locked on a thread of its own as soon
        # as its last unit is filled, while the fill goes on
        left = collections.Counter(arena_of[h.unit] for h in order if h.unit in arena_of)
        pinner = ThreadPoolExecutor(1, thread_name_prefix="distorch-pin") \
            if any(a.want_pin for a in self.arenas.values()) else None
        pins = []

        def pin_one(key):
            t = time.perf_counter()
            done, failed = pin_some([(key, self.arenas[key])])
            return done, failed, time.perf_counter() - t

        def homed(h):
            self.homes[h.unit] = h
            prog.update(h.nbytes)
            key = arena_of.get(h.unit)
            if key is not None:
                left[key] -= 1
                if not left[key] and pinner is not None and self.arenas[key].want_pin:
                    pins.append(pinner.submit(pin_one, key))
        try:
            held = _fill.move_into_homes(order, streamed, homed, trim_every=max(TRIM_BYTES, total // 50), coded=enc)
        except BaseException:
            if pinner is not None:
                pinner.shutdown(wait=True)
            for a in self.arenas.values():      # the units homed before the failure stay, pageable
                a.unpin()
            raise
        prog.close()
        _pinning.trim_heap()
        self.load_times["fill_s"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        if pinner is not None:
            pinner.shutdown(wait=True)
        done, failed, reg_s = 0, [], 0.0
        for f in pins:
            d, fl, dt = f.result()
            done, failed, reg_s = done + d, failed + fl, reg_s + dt
        d, fl = pin_some(self.arenas.items())   # any not pinned yet (none, unless an arena had no units)
        after = time.perf_counter() - t1
        report_pinned(done + d, failed + fl, reg_s + after,
                      note=f"; {len(pins)} piece(s), overlapped with the fill but for {after:.2f} s" if pins else "")
        self.load_times["pin_s"] = after
        self.load_times["pin_total_s"] = reg_s + after
        self.held_bytes = sum(nb for r, nb in held.values() if not r.expired())
        if self.held_bytes >= 64 << 20:
            log.warning("distorch: %.2f GiB of the host weights moved into homes are still referenced elsewhere "
                        "(a .data alias, a state dict, a patch backup), so host RAM holds them twice",
                        self.held_bytes / 2**30)

    def home_views(self) -> dict:
        """id(parameter) -> its tensor in its home, for every streamed parameter (a GGUF parameter's entry
        is a GGUFTensor over its quantized bytes in the home) but the compressed ones, whose home holds
        packed bytes (runtime/codec_stream.py: state_dict decodes them; patching them is not supported)."""
        out = {}
        for i, n in enumerate(self.units):
            for p, v in zip(self.params[i], self.homes[n].views()):
                q = _gs.param_of(p)
                if not is_coded(p):       # a compressed one has no dense home (guard's state_dict decodes it)
                    out[id(q)] = v if q is p else q.with_raw(v)    # GGUF: the same weight over its home bytes
        return out

    def adopt_arenas(self, arenas: dict) -> None:
        """Keep host arenas filled elsewhere (runtime.loading), to be freed with the rest."""
        for k, a in arenas.items():
            self.arenas[f"{k}#loaded" if k in self.arenas else k] = a

    @property
    def pinned_bytes(self) -> int:
        return sum(a.nbytes for a in self.arenas.values() if a.pinned)

    @property
    def pageable_bytes(self) -> int:
        return sum(a.nbytes for a in self.arenas.values() if not a.pinned)

    def stage(self, rt: Runtime) -> None:
        """undo, phase 1: every streamed parameter's bytes copied out of its home onto `rt.undo_device`
        (the step that may run out of memory); nothing is rebound yet.  Back to the host, a host home is
        not copied: its views become the parameters (no second copy of the model in RAM, nothing to fail),
        and detach unpins its arena, which then lives as long as those parameters."""
        self.staged = None
        to_host = torch.device(rt.undo_device).type == "cpu"
        dev = torch.device(rt.undo_device)
        # compressed homes decoded on a GPU come back through pinned staging (runtime/download.py)
        back = to_host and torch.cuda.is_available() and any(is_coded(b) for ps in self.params for b in ps)

        def staged(b, v, dl):
            if is_coded(b):       # compressed: decoded (on a GPU when there is one) into memory of its own
                out = _pinning.mapped_empty(b.meta.shape, b.meta.torch_dtype) if to_host and dl is None else None
                return decode_home(b.meta, v, dev, out=out, back=dl)
            return v if to_host and v.device.type == "cpu" else v.to(dev, copy=True)
        with torch.no_grad(), (_Download("cuda") if back else contextlib.nullcontext()) as dl:
            self.staged = [[staged(b, v, dl) for b, v in zip(self.params[i], self.homes[n].views())]
                           for i, n in enumerate(self.units)]
        if dl is not None:
            log.info("distorch: compressed homes decoded back to the host: %s", dl.summary())

    def unstage(self) -> None:
        self.staged = None

    def detach(self, rt: Runtime) -> None:
        """Every streamed parameter bound to its staged copy on `rt.undo_device`; homes and arenas freed.

        Back to the host the staged tensors are the homes' own views.  When every home lies in a host arena
        (none compressed) and the module is known, the parameters stay those views: the arenas are
        unpinned and live as long as the parameters do, and the module's next compile may adopt them
        (runtime/home_reuse.py).  Otherwise, arena by arena, each unit's tensors are copied into memory of
        their own (home_reuse.own_storages), so RAM holds about one unit more than the model at any moment
        and the arena is gone at the end."""
        staged = getattr(self, "staged", None)
        if staged is None:          # detached without stage (a direct call): copy now
            self.stage(rt)
            staged = self.staged
        for i in range(len(self.units)):
            for p, v in zip(self.params[i], staged[i]):
                _gs.rebind(p, v)
        p = v = None               # no local view may keep the arena's use count up (own_storages)
        self.staged = None
        kept = self._kept(staged)
        on_host: dict[int, list] = {}     # arena storage -> [(unit's params but the coded, its home's (ptr, nbytes))]
        for i, n in enumerate(self.units):
            f = self.homes[n].flat
            if kept is None and staged[i] and staged[i][0].device.type == "cpu" and f is not None \
                    and f.device.type == "cpu":
                # coded parameters were decoded into memory of their own (stage): only the others view the arena
                on_host.setdefault(f.untyped_storage().data_ptr(), []).append(
                    ([b for b in self.params[i] if not is_coded(b)], (f.data_ptr(), f.numel())))
            f = None
        del staged
        for h in self.homes.values():
            h.release()
        for a in self.arenas.values():
            a.unpin()
            a.release()
        m = self._module() if self._module is not None else None
        if kept is not None and m is not None:
            _reuse.remember(m, kept)
        for groups in on_host.values():
            _reuse.own_storages(groups)
        self.homes, self.arenas, self.params = {}, {}, []
        _pinning.trim_heap()

    def _kept(self, staged: list) -> _reuse.KeptHomes | None:
        """The note for home_reuse when undo leaves the parameters in their host arenas: the module is known,
        every staged tensor is its home's own host view, and every home lies in one of self.arenas."""
        if self._module is None or self._module() is None or not self.units:
            return None
        spans = {k: (a.flat.data_ptr(), a.nbytes) for k, a in self.arenas.items() if a.flat is not None}
        if "#" in "".join(spans):             # arenas of runtime.loading beside the store's own: not one split
            return None
        units = []
        for i, n in enumerate(self.units):
            h = self.homes[n]
            f = h.flat
            if f is None or f.device.type != "cpu" or any(is_coded(b) for b in self.params[i]):
                return None
            views = h.views()
            if len(staged[i]) != len(views) or any(s.data_ptr() != v.data_ptr() or s.device.type != "cpu"
                                                   for s, v in zip(staged[i], views)):
                return None
            key = next((k for k, (b, nb) in spans.items() if b <= f.data_ptr() and
                        f.data_ptr() + f.numel() <= b + nb), None)
            if key is None:
                return None
            units.append(_reuse.KeptUnit(n, h.device, h.layout, key, f.data_ptr() - spans[key][0], f.numel(),
                                         [v.data_ptr() for v in views]))
        arenas = {k: (weakref.ref(self.arenas[k].array), nb, b) for k, (b, nb) in spans.items()}
        return _reuse.KeptHomes(units, arenas)
