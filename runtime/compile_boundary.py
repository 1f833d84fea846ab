"""The runtime's torch hooks as opaque calls under torch.compile.

`torch.compile(model)` after `distorch.compile(model, ...)` traces the module's forward together with
the torch hooks the runtime put on it (the root's and every streamed unit's).  Traced, a hook would be
specialised on the runtime's state (the ring's slot of the unit, the learner's call count, ...): guards
that fail at the next unit or step, so the model recompiles per unit until torch hits its recompile limit.

`opaque(hook)` makes each hook one call that Dynamo does not trace: a graph break at each streamed unit's
boundary (before and after it) and at the root's; the code between the breaks -- the units' own
forwards -- compiles once per unit *type* and is reused by every unit and every step (tests/
test_torch_compile.py counts the compilations).  In eager mode the wrapper costs one extra Python call.

The Dynamo-disabled trampoline is made on first use, when torch.compile is already running (so that
importing distorch never imports torch._dynamo).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["opaque"]

_is_compiling = torch.compiler.is_compiling
_DISABLED: Callable[..., Any] | None = None


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _disabled() -> Callable[..., Any]:
    global _DISABLED
    if _DISABLED is None:
        _DISABLED = torch.compiler.disable(_call)
    return _DISABLED


def _hook(fn: Callable[..., Any]) -> Callable[..., Any]:
    def hook(*args: Any) -> Any:
        if _is_compiling():
            return _disabled()(fn, *args)
        return fn(*args)
    return hook


def _skip_frames_of(code) -> bool:
    """Tell Dynamo's frame evaluation never to compile a frame of `code` (the wrapper below), through the C
    entry torch._dynamo.eval_frame.skip_code uses (importing torch._dynamo itself costs ~1 s).  Without it,
    Dynamo compiles the wrapper's own frame when the caller's graph breaks at it, and the resume function after
    the break guards on `fn.__code__`: one recompile per distinct hook function, which passed the recompile
    limit (8) once a profiled step added the profiling hooks (H200, bench/results/torch_compile_h200.md).
    Returns False where this torch has no such entry (the wrapper then still works, with those recompiles)."""
    try:
        from torch._C._dynamo import eval_frame as _ef
        _ef.set_code_exec_strategy(code, _ef._FrameExecStrategy(_ef._FrameAction.SKIP, _ef._FrameAction.SKIP))
        return True
    except Exception:   # older/newer torch: private entry missing or changed
        return False


SKIPPED = _skip_frames_of(_hook(print).__code__)


def opaque(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn` (a torch module hook) as a call torch.compile runs eagerly instead of tracing (a graph break)."""
    hook = _hook(fn)
    hook.__wrapped__ = fn  # type: ignore[attr-defined]
    hook.__name__ = getattr(fn, "__name__", "hook")
    return hook
