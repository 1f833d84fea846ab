"""The probe cache: link speeds and compute rates measured by `compiler.inventory.probe`, kept as JSON in
~/.cache/distorch/links.json ($XDG_CACHE_HOME/distorch/links.json) keyed by the device names, torch's CUDA
version and the driver version.  The cache is validated when read: an entry that is not a mapping of
`SRC>DST` / `rate@DEV` to a speed / rate within the bounds of compiler/device_spec.py (or names a device
this machine does not have) is ignored with one warning (logger "distorch.compiler.inventory"), that
machine is measured again and the file is rewritten without it."""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Container

from ..errors import InventoryError
from .device_spec import MAX_LINK_BPS, MAX_RATE_FLOPS, MIN_LINK_BPS, MIN_RATE_FLOPS, normalize_device, show

log = logging.getLogger("distorch.compiler.inventory")   # the probe's logger


def cache_path() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "distorch", "links.json")


MAX_CACHE_BYTES = 1 << 20   # the cache holds a few numbers per machine; a larger file is not ours


def check_entry(entry: object, devices: Container[str] | None = None) -> str | None:
    """None when `entry` (one machine's cached measurements) is usable, else why not.  `devices`: the
    devices of this machine, which every key must name (None: only the syntax is checked)."""
    if not isinstance(entry, dict) or not entry:
        return f"not a non-empty mapping ({type(entry).__name__})"
    for k, v in entry.items():
        if not isinstance(k, str):
            return f"key {show(k)} is not a string"
        if k.startswith("rate@"):
            names, lo, hi, what = [k[5:]], MIN_RATE_FLOPS, MAX_RATE_FLOPS, "a compute rate in FLOP/s"
        else:
            a, sep, b = k.partition(">")
            if not sep:
                return f"key {show(k)} is neither SRC>DST nor rate@DEV"
            names, lo, hi, what = [a, b], MIN_LINK_BPS, MAX_LINK_BPS, "a link speed in bytes/s"
            if a == b:
                return f"key {show(k)} is a link from a device to itself"
        for d in names:
            try:
                ok = normalize_device(d) == d
            except InventoryError:
                ok = False
            if not ok or (devices is not None and d not in devices):
                return f"key {show(k)} names {show(d)}, which is not a device of this machine"
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
            return f"{show(k)} = {show(v)} is not {what} between {lo:g} and {hi:g}"
    return None


def read_cache(path: str, key: str, devices: Container[str]) -> tuple[dict, dict | None, bool]:
    """The probe cache at `path`: (its valid entries, this machine's entry or None, whether anything was
    dropped).  Anything unusable is ignored with ONE warning; it never raises."""
    try:
        if os.path.getsize(path) > MAX_CACHE_BYTES:
            raise ValueError(f"larger than {MAX_CACHE_BYTES} bytes")
        with open(path, encoding="utf-8") as fh:
            raw = json.load(fh)
    except FileNotFoundError:
        return {}, None, False
    except (OSError, ValueError, RecursionError) as e:   # unreadable, not JSON (ValueError), nested too deep
        log.warning("probe cache %s is unusable (%s: %s); ignoring it: the machine is measured again and the "
                    "file rewritten", path, type(e).__name__, str(e)[:200])
        return {}, None, True
    if not isinstance(raw, dict):
        log.warning("probe cache %s holds a %s, not a mapping of machines to measurements; ignoring it: the "
                    "machine is measured again and the file rewritten", path, type(raw).__name__)
        return {}, None, True
    good, bad = {}, []
    for k, entry in raw.items():
        why = check_entry(entry, devices if k == key else None)
        if why:
            bad.append(f"{show(k, 40)}: {why}")
        else:
            good[k] = entry
    if bad:
        log.warning("probe cache %s: ignoring %d bad entr%s (%s); %s", path, len(bad),
                    "y" if len(bad) == 1 else "ies", "; ".join(bad[:3]) + ("; ..." if len(bad) > 3 else ""),
                    "the file is rewritten without " + ("it" if len(bad) == 1 else "them"))
    return good, good.get(key), bool(bad)


def write_cache(path: str, stored: dict, progress: bool) -> None:
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + f".{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(stored, fh, indent=1, allow_nan=False)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("probe: could not write cache %s: %s", path, e)
