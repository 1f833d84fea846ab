"""What stays where: every tensor of a module sorted by the plan, and the part that keeps the rest resident.

    c = classify(module, plan)       # unit modules, homes, streamed-per-unit and resident tensors
    Resident(module, plan)           # GGUF units the plan dequantizes once; resident tensors to the device

A parameter reached only from inside ONE offloaded unit is *streamed* (runtime/store.py gives it a home,
runtime/ring.py brings it in).  Everything else stays resident on the compute device: units placed
there, ROOT (weights a parent uses directly), parameters shared between units or between a unit and its
parent (tied weights), and all buffers (a forward may write to a buffer; a streamed copy would lose the
write).
"""
from __future__ import annotations

import contextlib
import contextvars
import logging

import torch

from ..compiler.graph import ROOT, owner_lookup
from ..compiler.plan import Plan
from ..errors import DisTorchError
from . import gguf_stream as _gs
from .download import Download as _Download
from .hooks import UnitPart
from .store import is_host, parse_device
from .upload import to_device as upload_to
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import Any
    from .apply import Runtime

__all__ = ["Classified", "classify", "Resident", "keep_host_originals", "needs_move"]

log = logging.getLogger("distorch.runtime.place")
_KEEP: contextvars.ContextVar = contextvars.ContextVar("distorch_keep_host", default=None)


class Classified:
    """How apply() sees a module under a plan (also used by runtime.loading)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


def classify(module: torch.nn.Module, plan: Plan) -> Classified:
    """Unit modules, homes, and every parameter sorted into streamed-per-unit or resident."""
    # ---- units and their modules
    placed = sorted(plan.units, key=lambda u: u.order)
    unit_mods: dict[str, torch.nn.Module] = {}
    for u in placed:
        if u.name == ROOT:
            continue
        try:
            unit_mods[u.name] = module.get_submodule(u.name)
        except AttributeError:
            names = [n for n, _ in module.named_modules() if n][:8]
            raise DisTorchError(f"plan unit {u.name!r} is not a submodule of this "
                                f"{type(module).__name__} (some that are: {names})") from None
    uset = set(unit_mods)
    for name in uset:
        parts = name.split(".")
        for k in range(1, len(parts)):
            if ".".join(parts[:k]) in uset:
                raise DisTorchError(f"plan units overlap: {name!r} is inside unit {'.'.join(parts[:k])!r}; "
                                    "units must be disjoint subtrees (use block or leaf granularity, not both)")
    home_of = {u.name: u.device for u in placed}
    offloaded = [u.name for u in placed if u.name != ROOT and u.device != plan.compute]
    for name in offloaded:
        hd = home_of[name]
        if not is_host(hd):
            d = parse_device(hd)
            if d.type != "cuda" or not torch.cuda.is_available():
                raise DisTorchError(f"unit {name!r} has home {hd!r}, which this machine cannot hold "
                                    "(homes are 'cpu' or a CUDA GPU)")
            if d.index is not None and d.index >= torch.cuda.device_count():
                raise DisTorchError(f"unit {name!r} has home {hd!r} but only "
                                    f"{torch.cuda.device_count()} GPU(s) are visible")
    if plan.units and ROOT in home_of and home_of[ROOT] != plan.compute:
        root_note = f"ROOT placed on {home_of[ROOT]!r} is kept resident (a parent uses it anywhere in forward)"
    else:
        root_note = ""

    # ---- classify every parameter by the units that reach it
    owner_of = owner_lookup(uset)

    info: dict[int, list] = {}     # id(param) -> [param, owners set, first qualified name]
    buffers: dict[int, torch.Tensor] = {}
    for mname, m in module.named_modules(remove_duplicate=False):
        own = owner_of(mname)
        for pname, p in m._parameters.items():
            if p is None:
                continue
            rec = info.get(id(p))
            if rec is None:
                info[id(p)] = [p, {own}, f"{mname}.{pname}" if mname else pname]
            else:
                rec[1].add(own)
        for b in m._buffers.values():
            if b is not None:
                buffers[id(b)] = b
    off_set = set(offloaded)
    streamed: dict[str, list] = {n: [] for n in offloaded}
    resident: list[torch.Tensor] = []
    for p, owners, q in info.values():
        if len(owners) == 1:
            (o,) = owners
            if o in off_set:
                streamed[o].append((q, p))
                continue
        resident.append(p)
    shared = [q for p, owners, q in info.values() if len(owners) > 1]
    for o in streamed:         # GGUF tensors of one type back to back (one dequant launch per run)
        streamed[o].sort(key=_gs.gguf_order)

    return Classified(unit_mods=unit_mods, home_of=home_of, offloaded=offloaded, streamed=streamed,
                      resident=resident, buffers=buffers, shared=shared, root_note=root_note)


@contextlib.contextmanager
def keep_host_originals(params: Iterable[torch.Tensor]) -> Iterator[dict[int, torch.Tensor]]:
    """While the block runs, Resident.place hands back the host tensor each of `params` held when it was placed
    (id(param) -> tensor; dense parameters in host memory only; on a host compute device that is its live
    tensor, which does not move).  A caller that needs the unpatched bytes after the move (the backup of a
    LoRA'd resident weight, comfy_nodes/patcher.py) so keeps them without a copy.  Only the listed parameters
    are kept: every other host tensor is dropped by the move as before.  The caller keeps `params` alive."""
    kept: dict[int, torch.Tensor] = {}
    tok = _KEEP.set(({id(p) for p in params}, kept))
    try:
        yield kept
    finally:
        _KEEP.reset(tok)


def needs_move(t: torch.Tensor, device: torch.device) -> bool:
    """Whether `t` (a weight's bytes) must go to `device` (a module attribute: CPU tests make every weight move)."""
    return t.device != device


def _upload(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """upload_to, or the plain per-tensor copies should the staged upload fail (a load never fails over it)."""
    if not tensors:
        return []
    try:
        return upload_to(tensors, device)
    except Exception as e:     # the copies below run after this block: its traceback no longer holds the staged ones
        log.warning("distorch: staged upload of %d resident tensors to %s failed (%s: %s); plain copies",
                    len(tensors), device, type(e).__name__, e)
    return [t.to(device) for t in tensors]


class Resident(UnitPart):
    """The resident side of a compiled module (a part: runtime/hooks.py).

    Built first: the GGUF units the plan dequantizes once (plan.quant == "resident_dq") get dense copies on
    the compute device (runtime.gguf_stream.dequantize_units), before classify() sees the parameters.
    `place` then moves every resident parameter and buffer to the compute device (runtime/upload.py);
    `nbytes` is what they take there.  detach() puts the GGUF parameters back (moved to the undo device)."""

    def __init__(self, module: torch.nn.Module, plan: Plan) -> None:
        self.dequantized = _gs.dequantize_units(module, plan, plan.compute)
        self.nbytes = 0
        self.params: list = []
        self.buffers: list = []
        self.staged: list | None = None

    def place(self, params: list, buffers: dict, device: torch.device) -> None:
        """Every resident parameter (a GGUF one: its stored blocks) and buffer onto `device`, in one upload
        (runtime/upload.py: pinned staging at the link's speed on a CUDA device, else plain copies).  The host
        tensors a `keep_host_originals` block asked for are handed to it before they are dropped."""
        if any(p.is_meta for p in params):
            raise DisTorchError("a resident parameter is on the meta device; load weights first")
        keep = _KEEP.get()
        with torch.no_grad():
            todo = []                 # (parameter or buffer, its bytes now)
            for t in list(params) + [b for b in buffers.values() if not b.is_meta]:
                src = _gs.home_bytes(t)
                if needs_move(src, device):
                    todo.append((t, src))
                elif _gs.is_gguf(t):
                    _gs.retag_device(t, src)
                if keep is not None and id(t) in keep[0] and not _gs.is_gguf(t) and src.device.type == "cpu":
                    keep[1][id(t)] = src
            outs = _upload([s for _, s in todo], device)
            for (t, _), v in zip(todo, outs):
                _gs.rebind(t, v)
        self.params, self.buffers = list(params), list(buffers.values())
        self.nbytes = sum(_gs.stored_bytes(p) for p in params) + \
            sum(b.numel() * b.element_size() for b in buffers.values())

    def stage(self, rt: Runtime) -> None:
        """undo to the host from a GPU: a host copy of every resident weight and buffer, each of 1 MiB or more
        in an anonymous mapping of its own (freed to the OS with the model, never left in glibc's heap, which
        kept 11.6 GiB of a Wan-14B expert's resident weights after ComfyUI dropped it), brought back through
        reused pinned staging (runtime/download.py: one .copy_() per weight into pageable memory ran at
        ~1.2 GB/s on an H200 host); bound in detach.  A parameter the caller gave host bytes for
        (rt.undo_host: ComfyUI's unpatched backup of a LoRA'd weight, which its unpatch puts back right after)
        is bound to those instead: no copy of patched bytes about to be replaced, and no second host copy of
        them while the backup exists.  Elsewhere nothing moves here (undo to the compute device)."""
        self.staged = None
        dev = torch.device(rt.undo_device)
        given = rt.undo_host
        if dev.type != "cpu":
            return
        dense = {id(m._parameters[pn]) for m, pn, _ in self.dequantized.sites}   # dropped by restore()
        out, todo = [], []
        with torch.no_grad():
            for t in self.params + self.buffers:
                if id(t) in dense or t.is_meta:
                    continue
                src = _gs.home_bytes(t)       # a GGUF parameter's stored blocks, else the tensor's data
                if not needs_move(src, dev):
                    continue
                g = given.get(id(t))
                if g is not None and not _gs.is_gguf(t) and not _gs.is_gguf(g) and g.device == dev \
                        and g.dtype == src.dtype and g.shape == src.shape:
                    out.append((t, g))
                else:
                    todo.append((t, src))
            if todo:
                # through reused pinned staging at the link's speed, into mappings of their own
                with _Download(todo[0][1].device) as dl:
                    copies = dl.to_host([s for _, s in todo])
                log.info("distorch: %d resident tensor(s) back to the host: %s", len(todo), dl.summary())
                out += [(t, c) for (t, _), c in zip(todo, copies)]
        self.staged = out

    def detach(self, rt: Runtime) -> None:
        self.dequantized.restore(rt.undo_device)
        with torch.no_grad():
            for t, v in self.staged or ():
                _gs.rebind(t, v)
        self.staged = None
        self.params, self.buffers = [], []

