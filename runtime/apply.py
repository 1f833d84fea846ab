"""Execute a Plan: rewrite a module in place so offloaded units stream through a slot ring.

    rt = apply(module, plan, graph=None, *, window_units=None, profile=False)
    ... module(*args) as usual ...
    rt.undo()

The Runtime assembles parts, one job and one file each, all speaking the hook protocol of
runtime/hooks.py (attach / begin / pre / post / end / detach, composed once):

    resident   weights kept on the compute device; GGUF units the plan dequantizes once   runtime/place.py
    store      the streamed units' homes: one flat (pinned) buffer per unit               runtime/store.py
      reuse    homes an undo() to the host left, adopted by the next compile if they fit  runtime/home_reuse.py
    autotune   a measured step per input signature -> slots (compiler.cost.best_window)  runtime/autotune.py
    ring       slots, copy issue, copied/done events, ring items, fallback loads         runtime/ring.py
      .learn   the call order, free-run periods, deviations -> fallback                  runtime/learn.py
    clock      step events, host time per step, the step count                           runtime/profile.py
    profiler   per-unit and per-copy events (profile=True, or while autotune measures)   runtime/profile.py
    dequant    streamed GGUF units dequantized in their slot, one launch per run         runtime/slot_dequant.py
    codec      units streamed compressed (Plan.codec): packed bf16/fp16 bytes decoded     runtime/codec_stream.py
               from the slot into one scratch buffer, the parameters bound there

Every tensor is classified once (runtime/place.py): a parameter reached only from inside ONE offloaded
unit is *streamed* -- it moves into the unit's home and its original storage is released; everything
else stays resident on the compute device.  Without CUDA the streams/events are host objects
(runtime.stream), so the very same code runs synchronously: homes, slots, ring, fallback, statistics,
timeline.

Rebinding: `param.data = view` keeps every Parameter object (tied weights, optimizer or LoRA code
holding references stay valid) and costs ~0.3-0.5 us per tensor on CPU; swapping entries of
`module._parameters` is ~0.07 us but breaks identity, so it was not chosen. Measured host cost per
streamed unit with 20 tensors (hooks + rebinding + copy issue, CPU): ~10 us; for Flux-dev (57 units,
~20 tensors each) that is well under 1 ms per step, against 64-180 ms of GPU time.

Why hooks: forward pre/post hooks are removable handles that leave the module's class and
`forward` untouched (other tools, e.g. ComfyUI, patch `forward` or wrap modules themselves), and
they fire for whatever calls the unit. Only offloaded units and the root get hooks (a module with
no hooks keeps torch's fast call path), and each hook is a list lookup and a call or two.

Through the plain torch API (runtime/guard.py, runtime/grad.py): backward gives the uncompiled
model's gradients (autograd keeps its own copy of each streamed weight it saves); state_dict() reads the
homes and load_state_dict() writes them; .to()/.half()/.double() that would change a streamed weight's
dtype or device raise StateError; deepcopy and pickling give an uncompiled module.  undo() is all or
nothing (Runtime.undo).  Streamed units run one at a time: one called from inside another's hook raises
ReentryError (runtime/hooks.py).  Nested units are refused.  On CUDA, dense streamed parameters are bound
to a slot from the start, so that they report the compute device before their first call; on the host
they rest on their homes between forwards.
"""
from __future__ import annotations

import weakref

import torch

from ..compiler.plan import Plan
from ..compiler.ring_layout import DEFAULT_SLOTS
from ..errors import DisTorchError
from .autotune import Autotune
from .grad import SavedWeights
from .guard import StateGuard
from .compile_boundary import opaque
from .hooks import Chains
from .place import Resident, classify
from .profile import Closer, Profiler, StepClock
from .ring import Ring
from .codec_stream import SlotDecode, encode_units
from .slot_dequant import SlotDequant
from .store import HomeStore, parse_device
from .stream import Backend

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any
    from ..compiler.graph import ModuleGraph

__all__ = ["Runtime", "apply", "classify", "undo_device"]


def _part_attr(part: str, name: str):
    """A read-only view of a part's state, for callers written against the one-class Runtime."""
    return property(lambda self: getattr(getattr(self, part), name),
                    doc=f"`{part}.{name}` (runtime/apply.py lists the parts)")


class Runtime:
    """A module compiled under a Plan: its parts (module docstring) and the torch hooks driving them.

    units[i] is streamed unit i in every per-unit list of the parts; index maps a name back."""

    def __init__(self, module: torch.nn.Module, plan: Plan, graph: ModuleGraph | None = None, *,
                 window_units: int | None = None, profile: bool = False, homes: dict | None = None,
                 progress: bool = True, unit_dequant: bool | None = None, autotune: bool | None = None) -> None:
        if not isinstance(module, torch.nn.Module):
            raise DisTorchError(f"apply() needs a torch.nn.Module, got {type(module).__name__}")
        if getattr(module, "_distorch_runtime", None) is not None:
            raise DisTorchError("this module is already compiled by DisTorch; call handle.undo() first")
        self.plan = plan
        self.graph = graph
        self.be = be = Backend(plan.compute)
        self.device = be.device
        self.undo_device = self.device       # where undo() puts the weights (the parts' detach read it)
        self.undo_host: dict = {}            # undo(host=...): id(resident param) -> its bytes there (Resident.stage)
        self._module_ref = weakref.ref(module)

        self.resident = Resident(module, plan)        # first: dequantized GGUF units are classified dense
        c = classify(module, plan)
        self.shared_resident = c.shared
        self.root_note = c.root_note
        self.units = [n for n in c.offloaded if c.streamed[n]]
        self.index = {n: i for i, n in enumerate(self.units)}
        if window_units is not None and int(window_units) < 1 and self.units:
            raise DisTorchError(f"window_units={window_units!r}: need at least 1 slot to stream "
                                f"{len(self.units)} unit(s)")
        # Plan.codec units: their bf16/fp16 weights coded once, homed and streamed compressed
        coded_units = [n for n in self.units if n in (plan.codec or {}) and n not in (homes or {})]
        coded = encode_units(c.streamed, coded_units, self.device, progress=progress) if coded_units else None
        try:
            # module: the homes an earlier undo() to the host left are adopted when they fit (runtime/home_reuse.py)
            self.store = HomeStore(self.units, c.streamed, c.home_of, homes, pin=be.cuda, progress=progress,
                                   coded=coded, module=module)
        except BaseException:
            if coded:
                coded.restore()       # every coded weight decoded back (from its home if it got one)
            raise
        if coded:
            coded.enc.clear()         # the binders hold the metadata and the homes the bytes from here on
        self.resident.place(c.resident, c.buffers, self.device)
        hs = [self.store.homes[n] for n in self.units]
        # one slot's share of the plan's window: the largest streamed unit as the plan counts it (the
        # planner sizes the window as n_slots x that, compiler.ring_layout.n_slots_for)
        # (a Plan.codec unit streams its packed bytes; one whose home was given, read straight from the
        # file by runtime.loading, streams raw)
        coded_set = set(coded.units) if coded else set()
        self.unit_bytes = max((((plan.codec or {}).get(u.name) if u.name in coded_set else None) or u.bytes
                               for u in plan.units if u.name in self.index), default=0) or \
            max((h.nbytes for h in hs), default=0)
        if window_units is None:
            big = self.unit_bytes
            window_units = max(1, int(plan.window_bytes // big)) if plan.window_bytes and big else DEFAULT_SLOTS
        if unit_dequant is None:
            unit_dequant = be.cuda
        self.dequant = SlotDequant(self.store.params, hs, self.device, unit_dequant)
        self.codec = SlotDecode(self.store.params, self.device, coded.stats() if coded else None)
        pos = {u.name: k for k, u in enumerate(sorted(plan.units, key=lambda u: u.order))}
        self.ring = Ring(be, hs, self.store.params, [pos[n] for n in self.units], window_units, self.dequant)
        self.learn = self.ring.learn
        self.clock = StepClock(be, self.ring)
        self.profiler = Profiler(be, self.ring, self.clock, self.units, c.unit_mods, profile,
                                 weights={u.name: u.bytes for u in plan.units},
                                 groups={u.name: u.parent or u.name for u in plan.units})
        if autotune is None:
            autotune = be.cuda and (plan.predicted or {}).get("basis") != "measured"
        self.autotune = Autotune(bool(autotune and self.units), measure=bool(autotune and not self.units))
        self.saved = SavedWeights(self.ring, [self.dequant, self.codec])
        self.guard = StateGuard(module, self.store, self.ring, host=not be.cuda)
        # pre/begin run in this order, post/end in reverse, detach in reverse (runtime/hooks.py)
        self.parts = [self.resident, self.store, self.guard, self.autotune, Closer(self.profiler), self.ring,
                      self.clock, self.profiler, self.dequant, self.codec, self.saved]
        self._pending = None           # parts still to detach while an undo() is under way

        self.chains = Chains(len(self.units), self.units)
        self.hooks = [module.register_forward_pre_hook(opaque(self._root_pre)),
                      module.register_forward_hook(opaque(self._root_post), always_call=True)]
        for i, n in enumerate(self.units):
            self.hooks += self.chains.hook(c.unit_mods[n], i)
        self.compose()
        module._distorch_runtime = self
        for p in self.parts:
            p.attach(self)
        self.guard.snapshot()          # the parameters' bindings and versions once every part attached

    # ------------------------------------------------------------------ hooks
    def compose(self) -> None:
        """Chains from the parts as they are now (a part switched on or off calls this between steps)."""
        if self.hooks is None:
            return
        self.chains.compose(self.parts)
        self.ring.prof = self.profiler if self.profiler.on else None

    def _root_pre(self, mod, args):
        if self.chains.stopped:
            raise DisTorchError(self.chains.stopped)
        L = self.learn
        L.depth += 1
        if L.depth == 1:
            self.chains.begin()

    def _root_post(self, mod, args, out):
        if self.chains.stopped:
            return
        L = self.learn
        L.depth -= 1
        if not L.depth:
            self.chains.end()

    @property
    def profile(self) -> bool:
        """Per-unit and per-copy events on (the profiler's chain is composed in or out)."""
        return self.profiler.on

    @profile.setter
    def profile(self, on: bool) -> None:
        self.profiler.on = bool(on)
        self.compose()

    # ------------------------------------------------------------------ between steps
    def home_views(self) -> dict:
        """id(parameter) -> its tensor in its home, for every streamed parameter (for code that reads or
        patches weights between steps, e.g. LoRA; call invalidate() after writing). A GGUF parameter's
        entry is a GGUFTensor over its quantized bytes in the home; a compressed one (Plan.codec) has no
        entry (state_dict() decodes it)."""
        return self.store.home_views()

    def invalidate(self) -> None:
        """Homes were written: copy every unit again before its next use (slots may hold old bytes)."""
        self.ring.invalidate()

    def adopt_arenas(self, arenas: dict) -> "Runtime":
        """Keep the host arenas that runtime.loading filled (freed with the rest by undo())."""
        self.store.adopt_arenas(arenas)
        return self

    def undo(self, device: str | torch.device | None = None, host: dict | None = None) -> None:
        """All weights back resident (on the compute device, or `device`), hooks removed, homes and
        slots freed.  All or nothing: first every part stages what it will bind (the weights copied out
        of their homes onto the device: the step that can run out of memory); a failure there frees the
        staged copies and re-raises with the module still compiled and correct.  Then the parts detach
        in reverse order; should one fail, every hook of the module raises until undo() is called again,
        which finishes the parts left (onto the device of the first attempt).  `host`: id(resident
        parameter) -> a tensor on `device` holding the bytes it should have there (ComfyUI's backup of a
        LoRA'd weight, its unpatched host tensor): bound instead of a copy (runtime/place.Resident.stage)."""
        if self.hooks is None:
            return
        if self._pending is None:
            dev = self.device if device is None else undo_device(device)
            self.be.synchronize()
            self.undo_device = dev
            self.undo_host = dict(host or {})
            try:
                for p in self.parts:
                    p.stage(self)
            except BaseException as e:
                self.store.unstage()
                self.resident.staged = None
                if hasattr(e, "add_note"):
                    e.add_note(f"distorch: undo(device={str(dev)!r}) changed nothing: the module is still "
                               "compiled and runs as before; free memory (or pick another device) and "
                               "call undo() again")
                raise
            finally:
                self.undo_host = {}    # staged (Resident.detach binds what it named) or dropped: not held here
            self.chains.stopped = ("this module's DisTorch undo() failed part-way; its weights are not all "
                                   "back yet: call handle.undo() again (it finishes the rest)")
            self._pending = list(reversed(self.parts))
        while self._pending:
            self._pending[0].detach(self)
            self._pending.pop(0)
        for h in self.hooks:
            h.remove()
        self.hooks = None
        self._pending = None
        self.chains.stopped = ""
        m = self._module_ref()
        if m is not None and getattr(m, "_distorch_runtime", None) is self:
            del m._distorch_runtime

    @property
    def active(self) -> bool:
        return self.hooks is not None

    # the parts' state under the names the one-class Runtime had (bench/, comfy_nodes/, tests read them)
    W = _part_attr("ring", "W")
    slot_bytes = _part_attr("ring", "slot_bytes")
    pool = _part_attr("ring", "pool")
    bytes_moved = _part_attr("ring", "bytes_moved")
    fallback_loads = _part_attr("ring", "fallback_loads")
    deviations = _part_attr("learn", "deviations")
    free_run = _part_attr("learn", "free_run")
    homes = _part_attr("store", "homes")
    arenas = _part_attr("store", "arenas")
    UD = _part_attr("dequant", "UD")
    dq_scratch = _part_attr("dequant", "scratch")
    dq_scratch_bytes = _part_attr("dequant", "nbytes")
    dequantized = _part_attr("resident", "dequantized")
    resident_bytes = _part_attr("resident", "nbytes")
    trace = _part_attr("profiler", "trace")
    tune_result = _part_attr("autotune", "result")


def undo_device(device: str | torch.device | None) -> torch.device:
    """Where undo() may put weights: the host or a visible CUDA GPU (DisTorchError otherwise, before
    anything changes)."""
    try:
        d = parse_device(device)
    except (RuntimeError, TypeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise DisTorchError(f"undo(device={device!r}): weights must go where they keep their values: "
                            "'cpu' or 'cuda:N' (undo first, then move the module, e.g. to 'meta')")
    if d.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (d.index or 0) >= n:
            raise DisTorchError(f"undo(device={device!r}): this machine has {n} visible CUDA GPU(s); "
                                "use 'cpu' or one of them")
    return d


def apply(module: torch.nn.Module, plan: Plan, graph: ModuleGraph | None = None, **kw: Any) -> Runtime:
    """Rewrite `module` in place to run under `plan`; returns the Runtime (see module docstring)."""
    if not isinstance(plan, Plan):
        raise DisTorchError(f"apply() needs a distorch Plan, got {type(plan).__name__}")
    return Runtime(module, plan, graph, **kw)
