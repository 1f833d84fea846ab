"""The module's state as the plain torch API sees it, for a compiled module (a part: runtime/hooks.py).

A streamed parameter is bound to whichever slot view its unit last ran from (runtime/ring.py); its
true bytes are in its home (runtime/store.py).  This part keeps the torch API right about that:

    state_dict()          streamed entries are their homes' tensors (a GGUF one: over its home's blocks)
    load_state_dict()     streamed entries are written into their homes; the ring then copies afresh
    in-place edits        host compute (CPU): between forwards every dense streamed parameter is bound to
                          its home, so reads, `p.mul_()`, `p.copy_()` see and write the home; the next
                          forward notices the version change and copies afresh.  CUDA compute: the
                          parameter sits in a slot, so an in-place edit cannot reach the home: the next
                          forward raises StateError (write through load_state_dict, or undo first)
    p.data = t            the next forward copies t into the home when dtype, shape and device match,
                          else raises StateError
    .to() / .double() / .half() / .cuda() / .cpu()
                          allowed when they leave every streamed parameter's dtype and device as they
                          are; otherwise StateError before anything changes (undo, convert, compile again)
    copy.deepcopy         an uncompiled copy whose streamed weights are copies of their homes
    pickle / torch.save   an uncompiled module (streamed weights saved from their homes)

`p.data.add_()` (through `.data`, which torch does not version) is not noticed; neither are edits
between calls made outside the module's forward (units called by a wrapper, runtime/learn.py).
"""
from __future__ import annotations

import copy

import torch

from ..errors import DisTorchError
from ..formats.bf16_encode import encode
from . import gguf_stream as _gs
from .codec_stream import decode_home, is_coded
from .hooks import UnitPart
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .apply import Runtime
    from .ring import Ring
    from .store import HomeStore

__all__ = ["StateGuard", "StateError"]

_OURS = ("_apply", "__deepcopy__", "__reduce_ex__")   # instance attributes this part sets


class StateError(DisTorchError):
    """A compiled module's streamed weights were changed in a way DisTorch cannot carry into their homes."""


class StateGuard(UnitPart):
    def __init__(self, module: torch.nn.Module, store: HomeStore, ring: Ring, *, host: bool) -> None:
        self.store = store
        self.ring = ring
        self.host = host            # compute on the host: streamed parameters rest on their homes
        self.rt = None
        self.handles: list = []
        self.patched: list = []     # modules given instance attributes (_OURS)
        self.dense: list = []       # (binder, home view, qualified name) of dense streamed parameters
        self.ver: list = []
        self.ptr: list = []

    # ------------------------------------------------------------------ binding
    def attach(self, rt: Runtime) -> None:
        self.rt = rt
        m = rt._module_ref()
        st = self.store
        self.rest = [st.homes[n].views() for n in st.units]      # raw home views (GGUF: its blocks)
        first = {}
        for q, p in m.named_parameters(remove_duplicate=False):
            first.setdefault(id(p), q)
        self.names = {}
        for i, n in enumerate(st.units):
            for b, v in zip(st.params[i], self.rest[i]):
                p = _gs.param_of(b)
                q = first.get(id(p), n)
                self.names[q] = (b, v)
                if b is p:
                    self.dense.append((p, v, q))
        for q, p in m.named_parameters(remove_duplicate=False):   # tied names of one streamed parameter
            if q not in self.names and first.get(id(p)) in self.names:
                self.names[q] = self.names[first[id(p)]]
        if not self.names:
            return
        # plain functions: torch marks public-API hooks with an attribute, which a bound method cannot take
        self.handles = [m.register_state_dict_post_hook(lambda *a: self._state_dict(*a)),
                        m.register_load_state_dict_pre_hook(lambda *a: self._load_pre(*a)),
                        m.register_load_state_dict_post_hook(lambda *a: self._load_post(*a))]
        self._patch(m)

    def snapshot(self) -> None:
        # inference tensors (made under torch.inference_mode(), as ComfyUI runs every node) keep no version
        # counter: only their data_ptr is checked
        self.ver = [None if p.is_inference() else p._version for p, _, _ in self.dense]
        self.ptr = [p.data_ptr() for p, _, _ in self.dense]

    def rest_on_homes(self) -> None:
        for p, v, _ in self.dense:
            p.data = v

    def _in_slots(self, ptr: int) -> bool:
        pool = self.ring.pool
        return pool is not None and any(f.data_ptr() <= ptr < f.data_ptr() + f.numel() for f in pool.flats)

    def begin(self) -> None:
        """Edits since the last forward: an in-place one to a parameter resting on its home, or a rebinding
        to a tensor of the same kind, are copied afresh; anything else raises StateError."""
        if not self.dense:
            return
        stale = False
        for k, (p, v, q) in enumerate(self.dense):
            ptr = p.data_ptr()
            at_home = ptr == v.data_ptr()
            if ptr != self.ptr[k] and not at_home and not self._in_slots(ptr):    # rebound by the user
                d = p.data
                if d.dtype != v.dtype or d.shape != v.shape or d.device.type != self.ring.be.device.type:
                    raise StateError(f"streamed parameter {q!r} was rebound to a {d.dtype} {tuple(d.shape)} "
                                     f"tensor on {d.device} (it is {v.dtype} {tuple(v.shape)}); a compiled "
                                     "model's streamed weights keep their dtype, shape and device: call "
                                     "handle.undo(), change the model, and compile again")
                with torch.no_grad():
                    v.copy_(d)
                stale = True
            elif self.ver[k] is not None and p._version != self.ver[k]:
                if not (self.host and at_home):
                    raise StateError(f"streamed parameter {q!r} was modified in place since the last forward, "
                                     "but it sits in a slot on the compute device, not in its home; write "
                                     "weights with load_state_dict(), or through handle.runtime.home_views() "
                                     "then handle.runtime.invalidate(), or handle.undo() first")
                stale = True
        if stale:
            self.ring.invalidate()
            if self.host:
                self.rest_on_homes()
            self.snapshot()

    def end(self) -> None:
        if self.host:
            self.rest_on_homes()
        self.snapshot()

    # ------------------------------------------------------------------ state dicts
    def _state_dict(self, mod, state_dict, prefix, local_metadata):
        hv = None
        for q, (b, v) in self.names.items():
            k = prefix + q
            if k in state_dict:
                p = _gs.param_of(b)
                if p is b:
                    state_dict[k] = v
                elif is_coded(b):
                    state_dict[k] = decode_home(b.meta, v, "cpu")     # a new tensor: its values, decoded
                else:
                    hv = hv if hv is not None else self.store.home_views()
                    state_dict[k] = hv[id(p)]

    def _load_pre(self, mod, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        # compressed homes first, all or nothing: new values may code to more bytes than their home holds
        coded = _code_all([(prefix + q, b, v, state_dict.get(prefix + q)) for q, (b, v) in self.names.items()
                           if is_coded(b) and state_dict.get(prefix + q) is not None], error_msgs)
        with torch.no_grad():
            for b, v, enc in coded:
                v[:enc.nbytes].copy_(enc.buf)
                b.meta = enc.meta
            for q, (b, v) in self.names.items():
                val = state_dict.get(prefix + q)
                if val is None:
                    continue
                p = _gs.param_of(b)
                if is_coded(b):
                    continue
                elif p is not b:
                    raw = getattr(val, "raw", None)
                    if _gs.is_gguf(val) and raw is not None and raw.numel() == v.numel():
                        v.copy_(raw.reshape(v.shape))
                    else:
                        error_msgs.append(f"{prefix + q}: a streamed GGUF parameter takes a GGUF tensor of "
                                          f"the same type and size (got {type(val).__name__})")
                elif isinstance(val, torch.Tensor) and tuple(val.shape) == tuple(v.shape):
                    v.copy_(val)                  # a mismatch is left to torch's own message

    def _load_post(self, mod, incompatible):
        self.ring.invalidate()
        if self.host:
            self.rest_on_homes()
        self.snapshot()

    # ------------------------------------------------------------------ module-level overrides
    def _patch(self, m: torch.nn.Module) -> None:
        """`_apply` (to/half/double/cuda/cpu) on every module above a streamed parameter; deepcopy and
        pickling on the root."""
        prefixes = {""}
        for q in self.names:
            parts = q.split(".")[:-1]
            prefixes.update(".".join(parts[:k]) for k in range(1, len(parts) + 1))
        for name, sub in m.named_modules():
            if name in prefixes:
                sub._apply = _ApplyGuard(self, sub)
                self.patched.append(sub)
        m.__deepcopy__ = lambda memo: self.clean_copy(memo, share=False)
        m.__reduce_ex__ = lambda protocol: self.clean_copy({}, share=True).__reduce_ex__(protocol)

    def clean_copy(self, memo: dict, share: bool) -> torch.nn.Module:
        """An uncompiled copy of the module: streamed parameters hold their homes' values (copies, or the
        home views themselves when `share`, for pickling), no DisTorch hooks or attributes."""
        m = self.rt._module_ref()
        keep = memo.setdefault(id(memo), [])
        for _, (b, v) in self.names.items():
            p = _gs.param_of(b)
            if id(p) in memo:
                continue
            if is_coded(b):
                new = torch.nn.Parameter(decode_home(b.meta, v, "cpu"), requires_grad=p.requires_grad)
            else:
                val = v if share else v.clone()
                new = torch.nn.Parameter(val, requires_grad=p.requires_grad) if p is b else p.with_raw(val)
            memo[id(p)] = new
            keep.append(p)
        if share:
            for t in list(m.parameters()) + list(m.buffers()):
                memo.setdefault(id(t), t)
        for sub in self.patched:
            memo[id(sub.__dict__["_apply"])] = None          # dropped from the copy below
        handles = list(self.rt.hooks or []) + self.handles + list(getattr(self.rt.profiler, "hooks", [])) + \
            list(getattr(self.rt.autotune, "hooks", []))
        for h in handles:
            d = h.hooks_dict_ref()
            fn = d.get(h.id) if d is not None else None
            if fn is not None:
                memo[id(fn)] = fn
        state = {k: v for k, v in m.__dict__.items() if k not in _OURS and k != "_distorch_runtime"}
        new = m.__class__.__new__(m.__class__)
        memo[id(m)] = new
        keep.append(m)
        new.__setstate__(copy.deepcopy(state, memo))
        for h in handles:
            for ref in (h.hooks_dict_ref,) + tuple(getattr(h, "extra_dict_ref", ())):
                d = ref()
                cd = memo.get(id(d)) if d is not None else None
                if cd is not None and cd is not d:
                    cd.pop(h.id, None)
        for sub in new.modules():
            for k in _OURS + ("_distorch_runtime",):
                sub.__dict__.pop(k, None)
        return new

    def detach(self, rt: Runtime) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        for sub in self.patched:
            for k in _OURS:
                sub.__dict__.pop(k, None)
        self.patched = []
        self.dense, self.names, self.rest = [], {}, []


def _code_all(items: list, error_msgs: list) -> list:
    """[(key, binder, home view, new value)] of compressed parameters -> [(binder, home view, Encoded)] to
    write.  A value of the wrong shape is left to error_msgs (torch's own report); one that codes to more
    bytes than its home holds raises StateError before anything is written."""
    out, over = [], []
    for k, b, home, val in items:
        m = b.meta
        if not isinstance(val, torch.Tensor) or tuple(val.shape) != tuple(m.shape):
            error_msgs.append(f"{k}: a compressed streamed parameter takes a tensor of shape {tuple(m.shape)} "
                              f"(got {tuple(getattr(val, 'shape', ())) or type(val).__name__})")
            continue
        enc = encode(val.detach().to("cpu", m.torch_dtype).contiguous())
        if enc.nbytes > home.numel():
            over.append(f"{k} ({enc.nbytes} bytes coded, its home holds {home.numel()})")
        out.append((b, home, enc))
    if over:
        raise StateError(f"load_state_dict changed nothing: {len(over)} compressed streamed weight(s) code to "
                         f"more bytes than their homes hold: {'; '.join(over[:3])}{' ...' if len(over) > 3 else ''}. "
                         "Call handle.undo(), load the weights, and compile again")
    return out


class _ApplyGuard:
    """A compiled module's `_apply(fn)` (what .to / .half / .double / .cuda / .cpu call): refused when fn
    would change a streamed parameter's dtype or device, else torch's own."""

    def __init__(self, guard: StateGuard, module: torch.nn.Module):
        self.guard = guard
        self.module = module

    def __call__(self, fn, recurse=True):
        g = self.guard
        for q, (b, v) in g.names.items():
            if not q.startswith(self._prefix()):
                continue
            p = _gs.param_of(b)
            probe = torch.empty(0, dtype=p.dtype, device=p.device)
            out = fn(probe)
            if out.dtype != p.dtype or out.device != p.device:
                raise StateError(f"this would change streamed parameter {q!r} from {p.dtype} on {p.device} to "
                                 f"{out.dtype} on {out.device}; a compiled model's streamed weights keep their "
                                 "dtype and device: call handle.undo(), convert the model, and compile again")
        return type(self.module)._apply(self.module, fn, recurse)

    def _prefix(self) -> str:
        m = self.guard.rt._module_ref()
        for name, sub in m.named_modules():
            if sub is self.module:
                return name + "." if name else ""
        return ""
