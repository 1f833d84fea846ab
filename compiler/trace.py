"""Build a ModuleGraph from an nn.Module: its transfer units, their stored bytes, execution order,
and (when example inputs are given) FLOPs, activation bytes and call counts from one traced call.

Units (granularity="block", the default):
- every child of the outermost ModuleList / Sequential whose children hold tensors is a unit:
  kind "block" (double_blocks.3, transformer_blocks.7, input_blocks.4, down_blocks.1 ...), or kind
  "leaf" when that child is a bare layer whose submodules hold no tensors (time_embed.0 = Linear);
- a tensor outside every block belongs to a "leaf" unit named after its owning module when no
  descendant of that module holds tensors (x_embedder, proj_out, final_layer.linear ...);
- tensors a module with tensor-holding children owns directly (a `pos_embed` Parameter on the
  model) go to the ROOT unit ("<root>", kind "root"), which is created only when it holds something.
granularity="leaf": every module that owns tensors directly and whose submodules hold none is a unit
(kind "leaf"); tensors a module with tensor-holding children owns directly (the model's own, a block's
`modulation` Parameter) go to ROOT, so units stay disjoint subtrees.

Unit.tensors are the qualified names (as in module.state_dict(), buffers included) of the tensors
the unit OWNS. A tensor reachable from two units (tied weights) is owned by the unit that runs
first; the graph records the sharing:
    graph.shared:  {owner tensor name: [owner unit, other unit, ...]}
    graph.aliases: {alias tensor name: owner tensor name}   (every other name of a tied tensor)
Other attributes set on the returned graph: graph.traced ("meta" | "real" | "registration"),
graph.granularity, graph.outside_flops (FLOPs of ops that ran outside every unit, when there is
no ROOT unit to take them), graph.module_names ({unit name: module qualified name}, "" for ROOT).
GGUF parameters a unit owns (formats.gguf_tensor.GGUFTensor) are summed up in `Unit.gguf` (stored and
dense bytes, types, whether a layer patches them per call): the facts passes/quant_choice.py decides
from, so that pass needs no live module.  Likewise the bf16/fp16 parameters the runtime can stream
compressed (formats.bf16_encode.codable; not tied ones, which stay resident) in `Unit.codec`, for
passes/codec_choice.py: their packed size is estimated from the exponent histogram of a sample of each
(`codec_estimate`, compiler/codec_facts.py), or CODEC_RATIO of their bytes for a meta tensor.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map, tree_leaves

from ..errors import DisTorchError
from ..formats.bf16_encode import codable
from .codec_facts import codec_estimate
from ..formats.gguf_tensor import is_gguf
from .graph import ROOT, ModuleGraph, Unit, add_codec_fact, stored_nbytes

if TYPE_CHECKING:
    from typing import Any

GRANULARITIES = ("block", "leaf")
_LISTS = (nn.ModuleList, nn.Sequential)


class _UnitInfo:
    __slots__ = ("name", "module", "kind", "entries", "calls", "first", "flops", "act", "time")

    def __init__(self, name, module, kind):
        self.name, self.module, self.kind = name, module, kind
        self.entries = []      # (qualified tensor name, tensor, is_param, owning module)
        self.calls = 0
        self.first = None      # position of the first call among all unit calls
        self.flops = 0.0
        self.act = 0
        self.time = 0.0


def _direct(mod):
    out = [(n, t, True) for n, t in mod._parameters.items() if t is not None]
    out += [(n, t, False) for n, t in mod._buffers.items() if t is not None]
    return out


def _find_units(module: nn.Module, granularity: str) -> dict[str, _UnitInfo]:
    """Units in registration order (ROOT first when it exists)."""
    holds: dict[int, bool] = {}

    def subtree_holds(m) -> bool:  # memoised: any tensor in m's subtree
        k = id(m)
        if k not in holds:
            holds[k] = False  # guards against cycles
            kids = [subtree_holds(c) for c in m._modules.values() if c is not None]  # no short-circuit
            holds[k] = bool(_direct(m)) or any(kids)
        return holds[k]

    subtree_holds(module)
    root = _UnitInfo(ROOT, module, "root")
    units: dict[str, _UnitInfo] = {ROOT: root}
    seen: set[int] = set()

    def leaf_like(m) -> bool:
        return not any(holds.get(id(c), False) for c in m._modules.values() if c is not None)

    def walk(m, q: str, unit: _UnitInfo | None):
        if id(m) in seen:      # the same module object registered twice: its first name owns it
            return
        seen.add(id(m))
        direct = _direct(m)
        if direct:
            if unit is not None:
                target = unit
            elif q == "":
                target = root
            elif leaf_like(m):
                target = units[q] = _UnitInfo(q, m, "leaf")
            else:
                target = root
            target.entries += [(f"{q}.{n}" if q else n, t, p, m) for n, t, p in direct]
        is_list = isinstance(m, _LISTS)
        for cname, c in m._modules.items():
            if c is None or not holds.get(id(c), False):
                continue
            cq = f"{q}.{cname}" if q else cname
            if unit is None and granularity == "block" and is_list and id(c) not in seen:
                # a list child with tensor-holding submodules is a "block"; a bare layer (the Linear of a
                # Sequential(Linear, SiLU, Linear) time embedding) is a "leaf"
                u = units[cq] = _UnitInfo(cq, c, "leaf" if leaf_like(c) else "block")
                walk(c, cq, u)
            else:
                walk(c, cq, unit)

    walk(module, "", None)
    if not root.entries:
        del units[ROOT]
    return units


def _is_meta(module) -> tuple[bool, bool]:
    """(any meta tensor, all tensors meta)"""
    any_meta, all_meta, n = False, True, 0
    for t in list(module.parameters()) + list(module.buffers()):
        n += 1
        if t.is_meta:
            any_meta = True
        else:
            all_meta = False
    return any_meta, all_meta and n > 0


def _out_bytes(out) -> int:
    return sum(stored_nbytes(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor))


class _FlopMode(TorchDispatchMode):
    """Counts FLOPs per op with torch's flop formulas and adds them to the unit running now."""

    def __init__(self, state):
        super().__init__()
        from torch.utils.flop_counter import flop_registry
        self.registry = flop_registry
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func._overloadpacket
        if packet not in self.registry and func is not torch.ops.prim.device.default:
            with self:
                r = func.decompose(*args, **kwargs)
            if r is not NotImplemented:
                return r
        out = func(*args, **kwargs)
        if packet in self.registry:
            try:
                self.state.add_flops(self.registry[packet](*args, **kwargs, out_val=out))
            except Exception:  # a formula that does not understand these args: count nothing
                pass
        return out


class _State:
    """Hook-side bookkeeping. count: calls / order / FLOPs / output bytes; timed: wall time per unit."""

    def __init__(self, timed: bool, sync, count: bool = True):
        self.stack: list[_UnitInfo] = []
        self.pos = 0
        self.outside = 0.0
        self.timed, self.sync, self.count = timed, sync, count
        self.t0: list[float] = []

    def add_flops(self, f):
        if self.stack:
            self.stack[-1].flops += float(f)
        else:
            self.outside += float(f)

    def pre(self, u: _UnitInfo):
        if self.count:
            u.calls += 1
            if u.first is None:
                u.first = self.pos
            self.pos += 1
            self.stack.append(u)
        if self.timed:
            self.sync()
            self.t0.append(time.perf_counter())

    def post(self, u: _UnitInfo, out):
        if self.timed and self.t0:
            self.sync()
            u.time += time.perf_counter() - self.t0.pop()
        if self.count:
            if self.stack and self.stack[-1] is u:
                self.stack.pop()
            u.act += _out_bytes(out)


def _traced_call(module, units, args, kwargs, on_meta: bool, *, timed: bool = False, count: bool = True):
    """One no_grad call of `module` with hooks on the unit modules (removed afterwards, always).
    count=True counts FLOPs under a dispatch mode; timed=True measures wall time per unit (synchronising
    a CUDA device around each unit), without the dispatch mode so its overhead is not timed."""
    dev = None
    for t in module.parameters():
        dev = t.device
        break
    sync = (lambda: torch.cuda.synchronize(dev)) if (dev is not None and dev.type == "cuda") else (lambda: None)
    state = _State(timed=timed, sync=sync, count=count)
    handles = []
    try:
        for u in units.values():
            handles.append(u.module.register_forward_pre_hook(lambda m, a, _u=u: state.pre(_u)))
            handles.append(u.module.register_forward_hook(lambda m, a, o, _u=u: state.post(_u, o)))
        if on_meta:
            to_meta = (lambda x: x.to("meta") if isinstance(x, torch.Tensor) else x)
            args, kwargs = tree_map(to_meta, args), tree_map(to_meta, kwargs)
        with contextlib.ExitStack() as ctx:
            ctx.enter_context(torch.no_grad())
            if on_meta:
                ctx.enter_context(torch.device("meta"))
            if count:
                ctx.enter_context(_FlopMode(state))
            module(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return state


def _gguf_facts(unit: Unit, t, module) -> None:
    """Add a GGUF parameter to its unit's facts (Unit.gguf), which passes/quant_choice.py reads."""
    f = unit.gguf or {"tensors": 0, "stored_bytes": 0, "dense_bytes": 0, "largest_dense": 0, "patched": False,
                      "qtypes": {}, "bytes_by_type": {}}
    stored, dense, q = stored_nbytes(t), int(t.numel()) * int(t.element_size()), t.qtype.name
    f["tensors"] += 1
    f["stored_bytes"] += stored
    f["dense_bytes"] += dense
    f["largest_dense"] = max(f["largest_dense"], dense)
    f["qtypes"][q] = f["qtypes"].get(q, 0) + 1
    b = f["bytes_by_type"].setdefault(q, [0, 0])
    b[0] += stored
    b[1] += dense
    if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
        f["patched"] = True    # per-call weight patches (ComfyUI's LoRA on GGUF weights)
    unit.gguf = f


def _order(units: dict[str, _UnitInfo]) -> list[_UnitInfo]:
    """Called units by first call; uncalled ones right after their registration-order predecessor."""
    reg = list(units.values())
    called = sorted((u for u in reg if u.calls), key=lambda u: u.first)
    if len(called) == len(reg):
        return called
    out = list(called)
    for i, u in enumerate(reg):
        if u.calls:
            continue
        at = 0 if i == 0 else out.index(reg[i - 1]) + 1
        out.insert(at, u)
    return out


def trace(module: nn.Module, example_args: Any = (), example_kwargs: dict[str, Any] | None = None, *,
          granularity: str = "block", record: bool = False) -> ModuleGraph:
    """ModuleGraph of `module`: units in execution order with their stored bytes.

    With example inputs the module is called once (no_grad) with hooks on the unit modules: on the
    meta device when all its tensors are meta (inputs are moved to meta), else a real call. That call
    gives the execution order, `calls` per unit, FLOPs and output (activation) bytes per call;
    record=True on a real module makes a second, timed call for `time_s` per unit. Without inputs:
    registration order, calls=1, no FLOPs. Hooks are removed afterwards, also when the call raises:
    a real call's error propagates; a failed meta call warns and falls back to registration order.
    """
    if not isinstance(module, nn.Module):
        raise DisTorchError(f"trace() needs a torch.nn.Module, got {type(module).__name__}")
    if granularity not in GRANULARITIES:
        raise DisTorchError(f"granularity {granularity!r} is not one of {', '.join(GRANULARITIES)}")
    if example_kwargs is None:
        example_kwargs = {}
    if not isinstance(example_args, (tuple, list)):
        example_args = (example_args,)
    units = _find_units(module, granularity)
    have_inputs = bool(example_args) or bool(example_kwargs)
    traced = "registration"
    outside = 0.0
    total_time = None
    if have_inputs:
        any_meta, all_meta = _is_meta(module)
        if any_meta and not all_meta:
            warnings.warn(f"trace: {type(module).__name__} mixes meta and real tensors; cannot run it, "
                          f"using registration order without FLOPs", stacklevel=2)
        else:
            t0 = time.perf_counter()
            try:
                state = _traced_call(module, units, tuple(example_args), dict(example_kwargs), all_meta)
                if record and not all_meta:  # a second, timed call (the first one warmed up)
                    _traced_call(module, units, tuple(example_args), dict(example_kwargs), False,
                                 timed=True, count=False)
            except Exception as e:
                if not all_meta:
                    raise
                # model code that cannot run on meta (e.g. asks the allocator for free memory): the graph
                # is still right, only the order falls back to registration and FLOPs are unknown
                warnings.warn(f"trace: the meta-device call of {type(module).__name__} failed "
                              f"({type(e).__name__}: {e}); using registration order without FLOPs", stacklevel=2)
                for u in units.values():
                    u.calls, u.first, u.flops, u.act, u.time = 0, None, 0.0, 0, 0.0
            else:
                total_time = time.perf_counter() - t0
                traced = "meta" if all_meta else "real"
                outside = state.outside
    if traced == "registration":
        ordered = list(units.values())
        for u in ordered:
            u.calls = 1
    else:
        ordered = _order(units)

    # ownership: the first unit to run owns a tensor reachable from several units
    owner_of: dict[int, tuple[str, str]] = {}   # id(tensor) -> (owner tensor name, owner unit)
    shared: dict[str, list[str]] = {}
    aliases: dict[str, str] = {}
    out_units: list[Unit] = []
    coded: list[tuple[Unit, str, torch.Tensor]] = []    # codable parameters, counted once sharing is known
    timed = record and traced == "real"
    for u in ordered:
        unit = Unit(name=u.name, type=type(u.module).__name__, kind=u.kind, calls=u.calls)
        for qn, t, is_param, mod in u.entries:
            k = id(t)
            if k in owner_of:
                oname, ounit = owner_of[k]
                aliases[qn] = oname
                if ounit != u.name:
                    lst = shared.setdefault(oname, [ounit])
                    if u.name not in lst:
                        lst.append(u.name)
                continue
            owner_of[k] = (qn, u.name)
            unit.tensors.append(qn)
            if is_param:
                unit.param_bytes += stored_nbytes(t)
                unit.params += int(t.numel())
                if is_gguf(t):
                    _gguf_facts(unit, t, mod)
                elif codable(t):
                    coded.append((unit, qn, t))
            else:
                unit.buffer_bytes += stored_nbytes(t)
        if traced != "registration" and u.calls:
            unit.flops = u.flops / u.calls
            unit.act_bytes = int(u.act // u.calls)
        if timed and u.calls:
            unit.time_s = u.time
        out_units.append(unit)
    if timed and ROOT in units and total_time is not None:
        # ROOT's own time: the forward minus the units it contains
        r = next(x for x in out_units if x.name == ROOT)
        r.time_s = max(0.0, units[ROOT].time - sum(x.time_s or 0.0 for x in out_units if x.name != ROOT))

    for unit, qn, t in coded:
        if qn not in shared:       # a tied tensor stays resident: it never streams
            add_codec_fact(unit, int(t.numel()) * int(t.element_size()), codec_estimate(t))

    g = ModuleGraph(out_units, source=type(module).__name__)
    g.shared = shared
    g.aliases = aliases
    g.traced = traced
    g.granularity = granularity
    g.outside_flops = outside
    g.module_names = {u.name: ("" if u.name == ROOT else u.name) for u in ordered}
    return g
