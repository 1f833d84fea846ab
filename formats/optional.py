"""Optional modules (the Triton kernels) imported on first use, once: importing Triton costs time, and a
machine may lack it or have one we cannot use; the first failure is logged at INFO and remembered."""
from __future__ import annotations

import importlib
import logging
from types import ModuleType
from typing import Callable

__all__ = ["lazy_module"]


def lazy_module(name: str, package: str, what: str, log: logging.Logger) -> Callable[[], ModuleType | None]:
    """A function giving module `name` (relative to `package`), imported on its first call, or None when that
    import failed (logged once on `log` as "<what> unavailable")."""
    got: list = []

    def get() -> ModuleType | None:
        if not got:
            try:
                got.append(importlib.import_module(name, package))
            except Exception as e:  # no triton, or a triton we cannot use
                log.info("distorch: %s unavailable (%s: %s)", what, type(e).__name__, e)
                got.append(None)
        return got[0]
    return get
