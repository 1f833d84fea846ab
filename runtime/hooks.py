"""The hook protocol the runtime's parts are built on, in the shape of accelerate's ModelHook.

A *part* does one job of the runtime (runtime/ring.py streams weights through slots, runtime/profile.py
times steps and units, runtime/autotune.py sizes the ring, ...) and offers six methods, each doing
nothing by default, so a part overrides only what it needs:

    attach(rt)   every part is built: bind to the running module (torch hooks of its own, first copies)
    begin()      the compiled module's forward starts (the outermost call only)
    pre(i)       streamed unit i is about to run: no allocation, no synchronize
    post(i)      streamed unit i ran
    end()        the compiled module's forward returned
    stage(rt)    undo, phase 1: allocate and copy what detach will bind (weights onto rt.undo_device);
                 may raise, and must change nothing the module sees (undo then changed nothing)
    detach(rt)   undo, phase 2: undo what the part's constructor and attach changed; Runtime.undo calls
                 the parts in reverse order; a part that raised is called again by the retried undo()

Composition happens once, not per call (unlike accelerate's SequentialHook): `Chains.compose(parts)`
keeps, per streamed unit, only the parts that override `pre`/`post`, are `enabled` and `cover` the unit;
`pre` and `begin` run in the parts' order, `post` and `end` in reverse, nested like the calls themselves.
A part whose `enabled` changes (profiling switched on, autotune done) has the runtime compose again
(Runtime.compose, between steps).  Per unit call a torch hook then costs one list lookup and, for a
unit only the ring streams, one call.

Streamed units run one at a time: a streamed unit called while another one runs (a forward re-entered
from inside a unit's hook or forward) would reuse slots the running unit reads, so its hook raises
ReentryError instead (and its post hook then does nothing).
"""
from __future__ import annotations

from ..errors import DisTorchError
from .compile_boundary import opaque

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .apply import Runtime
    import torch

__all__ = ["UnitPart", "Chains", "ReentryError"]


class ReentryError(DisTorchError):
    """A streamed unit was called while another streamed unit of the same compiled module runs."""


class UnitPart:
    """One job of the runtime; see the module docstring.  `enabled` False leaves the part out of every
    chain; `covers(i)` False leaves it out of unit i's."""

    enabled = True

    def covers(self, i: int) -> bool:
        return True

    def attach(self, rt: Runtime) -> None:
        pass

    def begin(self) -> None:
        pass

    def pre(self, i: int) -> None:
        pass

    def post(self, i: int) -> None:
        pass

    def end(self) -> None:
        pass

    def stage(self, rt: Runtime) -> None:
        pass

    def detach(self, rt: Runtime) -> None:
        pass


def _overrides(part: UnitPart, name: str) -> bool:
    return getattr(type(part), name) is not getattr(UnitPart, name)


def _nothing(*_args) -> None:
    return None


def _chain(fns: list):
    """One callable running `fns` in order (the function itself when there is one)."""
    if not fns:
        return _nothing
    if len(fns) == 1:
        return fns[0]
    fns = tuple(fns)

    def run(*args):
        for f in fns:
            f(*args)
    return run


class Chains:
    """The composed calls: `begin()`, `end()`, and `pre[i](i)` / `post[i](i)` for streamed unit i.

    The per-unit lists are updated in place by `compose`, so torch hooks made once by `hook` follow."""

    def __init__(self, n_units: int, names: list[str] | None = None) -> None:
        self.names = list(names) if names is not None else [str(i) for i in range(n_units)]
        self.running = -1          # the streamed unit between its pre and post hooks, or -1
        self.refused = 0           # refused (re-entered) calls whose post hooks are still to come
        self.stopped = ""          # set: every hook raises this (an undo() that failed part-way)
        self.pre = [_nothing] * n_units
        self.post = [_nothing] * n_units
        self.begin = _nothing
        self.end = _nothing

    def compose(self, parts: list[UnitPart]) -> None:
        live = [p for p in parts if p.enabled]
        back = live[::-1]
        self.begin = _chain([p.begin for p in live if _overrides(p, "begin")])
        self.end = _chain([p.end for p in back if _overrides(p, "end")])
        pre = [p for p in live if _overrides(p, "pre")]
        post = [p for p in back if _overrides(p, "post")]
        for i in range(len(self.pre)):
            self.pre[i] = _chain([p.pre for p in pre if p.covers(i)])
            self.post[i] = _chain([p.post for p in post if p.covers(i)])

    def hook(self, module: torch.nn.Module, i: int) -> list:
        """Torch forward pre/post hooks on `module` (streamed unit i) that run unit i's chains; returns
        the handles.  The post hook runs even when the forward raises (always_call), so the ring's
        events stay paired."""
        pre_fns, post_fns, ch = self.pre, self.post, self

        def pre(mod, args):
            if ch.running >= 0 or ch.stopped:
                ch.refuse(i)
            ch.running = i
            pre_fns[i](i)

        def post(mod, args, out):
            if ch.refused:
                ch.refused -= 1
                return
            ch.running = -1
            post_fns[i](i)
        # opaque: one graph break per unit boundary under torch.compile, no per-unit guards (compile_boundary)
        return [module.register_forward_pre_hook(opaque(pre)),
                module.register_forward_hook(opaque(post), always_call=True)]

    def refuse(self, i: int) -> None:
        """Unit i's pre hook cannot run (a unit is running, or the runtime is stopped): raise; its post
        hook (always called) then does nothing."""
        self.refused += 1
        if self.stopped:
            raise DisTorchError(self.stopped)
        raise ReentryError(
            f"streamed unit {self.names[i]!r} was called while streamed unit {self.names[self.running]!r} "
            "runs (a forward re-entered from inside a unit's hook or forward?); DisTorch streams one unit "
            "at a time through shared slots: call the model from outside its units' hooks, or keep "
            f"{self.names[self.running]!r} resident (not offloaded)")
