"""Host homes kept across undo() to the host, and adopted by the next compile of the same module.

    remember(module, units, arenas)      undo to the host (HomeStore.detach): the parameters stay views of
                                         their (unpinned) arena; what the next compile must find is noted
    kept = take(module)                  compile (HomeStore): the note, or None; a note is used once
    flats, arenas, why = kept.adopt(units, layouts, streamed, home_of, pin)   # why == "": adopted
    kept.release(module)                 fallback: the parameters still in the arena get memory of their own
    own_storages(groups)                 that copy, unit by unit (also undo's own path when nothing is kept)

Why: ComfyUI unloads a model to the host (Handle.undo("cpu")) when it needs the VRAM, and loads it again
later.  Copying the homes out on undo and back into a new arena on the next load moved every streamed
byte twice (~13 GB per Wan-14B expert) and page-locked it again.  Now undo leaves the parameters as views
of their arena, and the next compile of the same module under a plan with the same host homes adopts
them as they are: nothing is copied, the arenas are only page-locked again.

Lifetime: a note holds no reference to memory or to parameters (weakrefs to the arenas' numpy arrays;
parameters by qualified name and address: a weakref on a tensor would make torch's swap_tensors, which
Module.to() uses for tensor subclasses such as GGUF weights, refuse it), and notes sit in a
WeakKeyDictionary keyed by the module.  An arena then lives exactly as long as some view of it (the
parameters) does: dropping the module gives it back, as before.  deepcopy and pickling do not carry a
note (a copy's parameters are no views of the arena).

All or nothing: adopted only when the plan streams the same units in the same order, each with the same
home device and byte layout (every entry's name, dtype, shape, stride, offset), every parameter is still
a view at its recorded address (as HomeStore checks homes given by runtime.loading),
every arena is alive, and runtime.arena splits the units into pinned and pageable arenas under the
pinned cap as it stands now exactly as it did.  Anything else (another budget, a parameter rebound or
replaced, compressed units, homes given by runtime.loading) falls back: the parameters still in the old
arena are first copied into mappings of their own (own_storages, so that the fill does not hold the model
twice), then the homes are filled as usual.
"""
from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch

from . import gguf_stream as _gs
from . import pinning as _pinning
from .arena import PAGEABLE, HostArena, arena_bytes, arena_split, warn_past_cap

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .store import Layout

__all__ = ["KeptHomes", "KeptUnit", "remember", "take", "own_storages"]

log = logging.getLogger("distorch.runtime.home_reuse")

_kept: "weakref.WeakKeyDictionary[torch.nn.Module, KeptHomes]" = weakref.WeakKeyDictionary()


def _tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor whose bytes the home holds: a GGUF parameter's stored blocks, else the parameter."""
    q = _gs.param_of(p)
    return q.raw if _gs.is_gguf(q) else q


@dataclass
class KeptUnit:
    """One streamed unit's home as undo() left it: [offset, offset + length) of arena `key`."""
    name: str
    device: str               # its home device ("cpu", "cpu:N")
    layout: Layout            # its entries name the parameters (qualified, first site)
    key: str                  # its arena (runtime.arena's key: "<dev>" or "<dev>~pageable")
    offset: int
    length: int
    ptrs: list                # data_ptr of each entry's tensor in the home


class KeptHomes:
    """The host homes of one module after undo() to the host (module docstring)."""

    def __init__(self, units: list[KeptUnit], arenas: dict) -> None:
        self.units = units
        self.arenas = arenas      # key -> (weakref to the numpy array, nbytes, address)

    @property
    def nbytes(self) -> int:
        return sum(u.layout.nbytes for u in self.units)

    def mismatch(self, units: list[str], layouts: dict, streamed: dict, home_of: dict, pin: bool) -> str:
        """"" when the plan's streamed units are exactly the kept ones (module docstring), else why not."""
        kept = [u.name for u in self.units]
        if list(units) != kept:
            return f"the plan streams other units ({len(units)} now, {len(kept)} before)"
        for u in self.units:
            if home_of.get(u.name) != u.device:
                return f"unit {u.name!r} is homed on {home_of.get(u.name)} now, on {u.device} before"
            lay = layouts.get(u.name)
            if lay is None or lay.entries != u.layout.entries:
                return f"unit {u.name!r} has another byte layout now"
            for (q, p), ptr in zip(streamed[u.name], u.ptrs):
                t = _tensor(p)
                if t.device.type != "cpu" or t.data_ptr() != ptr:
                    return f"parameter {q!r} was rebound (it is no view of its home any more)"
        if any(ref() is None for ref, _, _ in self.arenas.values()):
            return "an arena was freed"
        arena_of, need, _ = arena_split(layouts, home_of, pin)
        if any(arena_of.get(u.name) != u.key for u in self.units) or \
                {k: arena_bytes(b) for k, b in need.items()} != {k: nb for k, (_, nb, _) in self.arenas.items()}:
            return "the pinned-memory cap splits the homes into pinned and pageable arenas differently now"
        return ""

    def adopt(self, units: list[str], layouts: dict, streamed: dict, home_of: dict,
              pin: bool) -> tuple[dict, dict, str]:
        """(unit -> its flat in its arena, arena key -> HostArena (not pinned yet), "") when the kept homes
        fit (mismatch), else ({}, {}, why).  Rebinding the parameters to the homes is the caller's."""
        why = self.mismatch(units, layouts, streamed, home_of, pin)
        if why:
            return {}, {}, why
        arrays = {k: ref() for k, (ref, _, _) in self.arenas.items()}
        if any(a is None for a in arrays.values()):
            return {}, {}, "an arena was freed"
        arena_of, need, over = arena_split(layouts, home_of, pin)
        warn_past_cap(need, over)      # the warning a fill would give, as the split is the same
        arenas = {k: HostArena(a.size, pin=pin and not k.endswith(PAGEABLE), defer=True, array=a)
                  for k, a in sorted(arrays.items())}
        flats = {u.name: arenas[u.key].flat[u.offset:u.offset + u.length] for u in self.units}
        return flats, arenas, ""

    def release(self, module: torch.nn.Module) -> None:
        """Fallback: `module`'s kept parameters still at their recorded addresses copied into memory of
        their own, arena by arena (own_storages), so that the old arenas go once nothing else views them."""
        groups: dict[str, list] = {}
        seen: set[int] = set()
        for u in self.units:
            ref, _, base = self.arenas[u.key]
            if ref() is None:
                continue
            ps = []
            for e, ptr in zip(u.layout.entries, u.ptrs):
                p = _param(module, e.name)
                if p is not None and id(p) not in seen and _tensor(p).device.type == "cpu" \
                        and _tensor(p).data_ptr() == ptr:
                    seen.add(id(p))
                    ps.append(p)
            groups.setdefault(u.key, []).append((ps, (base + u.offset, u.length)))
        for g in groups.values():
            own_storages(g)


def _param(module: torch.nn.Module, name: str) -> torch.Tensor | None:
    """The parameter registered under qualified `name`, or None."""
    owner, _, attr = name.rpartition(".")
    try:
        sub = module.get_submodule(owner) if owner else module
    except AttributeError:
        return None
    return sub._parameters.get(attr)


def remember(module: torch.nn.Module, kept: KeptHomes) -> None:
    """Note the host homes undo() left to `module`'s parameters, for its next compile (replaces any note)."""
    _kept[module] = kept


def take(module: torch.nn.Module) -> KeptHomes | None:
    """The note undo() left on `module`, removed (a note is used once), or None."""
    return _kept.pop(module, None)


def own_storages(groups: list) -> None:
    """Parameters that are views of ONE host arena copied out unit by unit: groups = [(the unit's parameters
    or binders, (address, nbytes) of its home)], each into anonymous mappings of their own
    (runtime.pinning.mapped_copy: unmapped when the model is dropped, never left in glibc's heap), and the
    unit's pages given back at once (runtime.pinning.drop_pages), so RAM holds about one unit more than the
    model at any moment.  Only when nothing but these parameters uses the arena (counted); else they stay
    views of it (still one copy), as they do when a copy fails for lack of memory."""
    first = next((ps[0] for ps, _ in groups if ps), None)
    if first is None:
        return
    st = _tensor(first).untyped_storage()
    # our users of the arena: each parameter's tensor, and the view base a GGUF parameter's bytes keep alive
    bases = {id(b) for ps, _ in groups for p in ps if (b := _tensor(p)._base) is not None}
    bound = sum(len(ps) for ps, _ in groups) + len(bases)
    if _storage_users(st) != bound + 1:      # +1: `st` itself; more = someone else reads the arena
        return
    del st, first
    with torch.no_grad():
        for ps, (ptr, nbytes) in groups:
            try:
                new = [_pinning.mapped_copy(_tensor(p)) for p in ps]
            except (RuntimeError, MemoryError) as e:
                log.warning("distorch: the host weights stay in their arena (copy failed: %s)", e)
                return
            for p, v in zip(ps, new):
                _gs.rebind(p, v)
            del new
            _pinning.drop_pages(ptr, nbytes)


def _storage_users(st: torch.UntypedStorage) -> int:
    try:
        return int(torch._C._storage_Use_Count(st._cdata))
    except (AttributeError, RuntimeError):
        return -1
